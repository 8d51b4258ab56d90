"""Unit tests for port 0x92 and the i8042 reset paths (no /dev/kvm needed)."""

from __future__ import annotations

import pytest

from kvmpy.bus import Bus
from kvmpy.devices.reset import (
    CB_KBD_INT,
    CB_XLATE,
    I8042,
    STATUS_AUX_OBF,
    STATUS_CMD,
    STATUS_IBF,
    STATUS_OBF,
    STATUS_SYS,
    SYSTEM_CONTROL_PORT_A,
    SystemControlPortA,
)


class Resets:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


# System Control Port A -----------------------------------------------------------


def test_port_a_bit_0_resets() -> None:
    resets = Resets()
    port = SystemControlPortA(resets)
    port.write(0, 1, 0x01)
    assert resets.count == 1


def test_port_a_resets_only_on_a_rising_edge_of_bit_0() -> None:
    resets = Resets()
    port = SystemControlPortA(resets)
    port.write(0, 1, 0x02)
    assert resets.count == 0
    port.write(0, 1, 0x03)
    port.write(0, 1, 0x03)  # writing back what was read does not reset again
    assert resets.count == 1
    port.reset()
    assert port.read(0, 1) == 0x00  # the power-on value
    port.write(0, 1, 0x03)
    assert resets.count == 2


def test_port_a_a20_bit_reads_back() -> None:
    port = SystemControlPortA(Resets())
    assert port.read(0, 1) == 0x00
    port.write(0, 1, 0x02)
    assert port.read(0, 1) == 0x02
    assert port.a20
    port.write(0, 1, 0x00)
    assert port.read(0, 1) == 0x00
    assert not port.a20


# i8042 -------------------------------------------------------------------------------


class Kbc:
    def __init__(self) -> None:
        self.resets = Resets()
        self.irq1: list[bool] = []
        self.irq12: list[bool] = []
        self.dev = I8042(self.resets, irq_kbd=self.irq1.append, irq_aux=self.irq12.append)

    def status(self) -> int:
        return self.dev.command_port.read(0, 1)

    def command(self, value: int) -> None:
        self.dev.command_port.write(0, 1, value)

    def data(self) -> int:
        return self.dev.data_port.read(0, 1)

    def send(self, value: int) -> None:
        self.dev.data_port.write(0, 1, value)

    def drain(self) -> list[int]:
        out = []
        while self.status() & STATUS_OBF:
            out.append(self.data())
        return out


@pytest.fixture
def kbc() -> Kbc:
    return Kbc()


def test_power_on_status(kbc: Kbc) -> None:
    status = kbc.status()
    assert status & STATUS_OBF == 0
    assert status & STATUS_IBF == 0
    assert status & STATUS_SYS
    assert status == 0x1C  # SYS | CMD | unlocked


def test_command_0xfe_resets(kbc: Kbc) -> None:
    kbc.command(0xFE)
    assert kbc.resets.count == 1


@pytest.mark.parametrize(("command", "resets"), [(0xF0, 1), (0xFC, 1), (0xFF, 0), (0xF1, 0)])
def test_pulse_commands_reset_when_bit_0_is_pulsed(kbc: Kbc, command: int, resets: int) -> None:
    kbc.command(command)
    assert kbc.resets.count == resets


def test_self_test_returns_0x55_then_obf_clears(kbc: Kbc) -> None:
    kbc.command(0xAA)
    assert kbc.status() & STATUS_OBF
    assert kbc.status() & STATUS_IBF == 0
    assert kbc.data() == 0x55
    assert kbc.status() & STATUS_OBF == 0
    assert kbc.status() & STATUS_SYS


def test_interface_tests_pass(kbc: Kbc) -> None:
    kbc.command(0xAB)
    assert kbc.drain() == [0x00]
    kbc.command(0xA9)
    assert kbc.drain() == [0x00]


def test_command_byte_read_and_write(kbc: Kbc) -> None:
    kbc.command(0x20)
    assert kbc.drain() == [0x07]
    kbc.command(0x60)
    kbc.send(0x65)
    assert kbc.dev.command_byte == 0x65
    kbc.command(0x20)
    assert kbc.drain() == [0x65]


def test_keyboard_enable_and_disable_update_the_command_byte(kbc: Kbc) -> None:
    kbc.command(0xAD)
    kbc.command(0x20)
    assert kbc.drain() == [0x17]
    kbc.command(0xAE)
    kbc.command(0xA7)
    kbc.command(0x20)
    assert kbc.drain() == [0x27]


def test_status_cmd_bit_tracks_the_last_port_written(kbc: Kbc) -> None:
    kbc.send(0xF4)
    assert kbc.status() & STATUS_CMD == 0
    kbc.command(0x20)
    assert kbc.status() & STATUS_CMD


def test_write_output_port_with_bit_0_clear_resets(kbc: Kbc) -> None:
    kbc.command(0xD1)
    kbc.send(0xDF)  # bit 0 set: no reset, A20 on
    assert kbc.resets.count == 0
    kbc.command(0xD1)
    kbc.send(0xDE)
    assert kbc.resets.count == 1


def test_output_port_a20(kbc: Kbc) -> None:
    assert kbc.dev.a20
    kbc.command(0xD1)
    kbc.send(0xCD)  # A20 off
    assert not kbc.dev.a20
    kbc.command(0xD0)
    assert kbc.drain() == [0xCD]
    kbc.command(0xDF)
    assert kbc.dev.a20
    kbc.command(0xDD)
    assert not kbc.dev.a20
    assert kbc.resets.count == 0


def test_read_output_port_shows_a_full_buffer(kbc: Kbc) -> None:
    kbc.command(0xAA)
    kbc.command(0xD0)
    assert kbc.drain() == [0x55, 0xCF | 0x10]


def test_read_input_port(kbc: Kbc) -> None:
    kbc.command(0xC0)
    assert kbc.drain() == [0x80]


def test_write_output_buffers(kbc: Kbc) -> None:
    kbc.command(0xD2)
    kbc.send(0x12)
    assert kbc.status() & (STATUS_OBF | STATUS_AUX_OBF) == STATUS_OBF
    assert kbc.data() == 0x12
    kbc.command(0xD3)
    kbc.send(0x5A)  # the aux loopback a driver uses to find the mouse port
    assert kbc.status() & (STATUS_OBF | STATUS_AUX_OBF) == STATUS_OBF | STATUS_AUX_OBF
    assert kbc.data() == 0x5A


def test_empty_buffer_repeats_the_last_byte(kbc: Kbc) -> None:
    kbc.command(0xAA)
    assert kbc.data() == 0x55
    assert kbc.data() == 0x55


def test_keyboard_answers_a_probe(kbc: Kbc) -> None:
    kbc.send(0xFF)
    assert kbc.drain() == [0xFA, 0xAA]
    kbc.send(0xF2)
    assert kbc.drain() == [0xFA, 0xAB, 0x83]
    kbc.send(0xED)
    kbc.send(0x07)
    assert kbc.drain() == [0xFA, 0xFA]
    kbc.send(0xEE)
    assert kbc.drain() == [0xEE]
    kbc.send(0x42)
    assert kbc.drain() == [0xFE]


def test_keyboard_id_and_scan_code_set_through_translation(kbc: Kbc) -> None:
    kbc.command(0x60)
    kbc.send(0x07 | CB_XLATE)
    kbc.send(0xF2)
    assert kbc.drain() == [0xFA, 0xAB, 0x41]
    kbc.send(0xF0)
    kbc.send(0x00)
    assert kbc.drain() == [0xFA, 0xFA, 0x41]
    kbc.command(0x60)
    kbc.send(0x07)
    kbc.send(0xF0)
    kbc.send(0x03)
    kbc.send(0xF0)
    kbc.send(0x00)
    assert kbc.drain() == [0xFA, 0xFA, 0xFA, 0xFA, 0x03]


def test_mouse_bytes_are_dropped(kbc: Kbc) -> None:
    kbc.command(0xD4)
    kbc.send(0xF2)
    assert kbc.status() & STATUS_OBF == 0


def test_keyboard_irq_follows_the_output_buffer(kbc: Kbc) -> None:
    kbc.send(0xFF)
    assert kbc.irq1 == [True]
    assert kbc.data() == 0xFA
    assert kbc.irq1 == [True, False, True]  # pulsed for the next byte
    assert kbc.data() == 0xAA
    assert kbc.irq1 == [True, False, True, False]
    kbc.command(0x60)
    kbc.send(0x07 & ~CB_KBD_INT)
    kbc.command(0xAA)
    assert kbc.irq1 == [True, False, True, False]
    assert kbc.irq12 == []


def test_aux_irq(kbc: Kbc) -> None:
    kbc.command(0xD3)
    kbc.send(0x01)
    assert kbc.irq12 == [True]
    assert kbc.irq1 == []
    kbc.data()
    assert kbc.irq12 == [True, False]


def test_reset_restores_power_on_state(kbc: Kbc) -> None:
    kbc.command(0x60)
    kbc.send(0x00)
    kbc.command(0xD1)
    kbc.send(0xCC)  # asserts reset and drops A20
    kbc.command(0xAA)
    kbc.dev.reset()
    assert kbc.status() & STATUS_OBF == 0
    assert kbc.dev.command_byte == 0x07
    assert kbc.dev.a20


def test_mapped_on_a_port_bus_beside_port_0x61() -> None:
    resets = Resets()
    kbc = I8042(resets)
    port_a = SystemControlPortA(resets)
    bus = Bus("port", 0x10000, strict=True)
    for base, length, device, name in kbc.mappings():
        bus.register(base, length, device, name)
    bus.register(SYSTEM_CONTROL_PORT_A, 1, port_a, "port-a")
    assert [(m.base, m.length) for m in bus.mappings] == [(0x60, 1), (0x64, 1), (0x92, 1)]
    bus.write(0x64, 1, 0xAA)
    assert bus.read(0x64, 1) & STATUS_OBF
    assert bus.read(0x60, 1) == 0x55
    bus.write(0x64, 1, 0xFE)
    bus.write(0x92, 1, 0x01)
    assert resets.count == 2
