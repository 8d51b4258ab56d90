"""What kvmpy stands in for firmware: the BDA and QEMU's ACPI power-off port."""

from __future__ import annotations

import struct

from kvmpy.devices.acpi_pm import AcpiPmControl
from kvmpy.x86.bios import bios_data_area


def test_bda_lists_com1_and_base_memory() -> None:
    bda = bios_data_area((0x3F8,))
    assert len(bda) == 256
    assert struct.unpack_from("<4H", bda, 0) == (0x3F8, 0, 0, 0)
    assert struct.unpack_from("<H", bda, 0x0E)[0] == 0x9FC0
    equipment = struct.unpack_from("<H", bda, 0x10)[0]
    assert (equipment >> 9) & 7 == 1
    assert struct.unpack_from("<H", bda, 0x13)[0] == 639


def test_bda_with_two_com_ports() -> None:
    bda = bios_data_area((0x3F8, 0x2F8))
    assert struct.unpack_from("<4H", bda, 0) == (0x3F8, 0x2F8, 0, 0)
    assert (struct.unpack_from("<H", bda, 0x10)[0] >> 9) & 7 == 2


def test_qemu_power_off_sequence() -> None:
    calls: list[str] = []
    pm = AcpiPmControl(lambda: calls.append("off"))
    pm.write(0, 2, 0x2000)  # SLP_EN with SLP_TYP 0: S5
    assert calls == ["off"]


def test_other_sleep_types_and_plain_writes_do_not_power_off() -> None:
    calls: list[str] = []
    pm = AcpiPmControl(lambda: calls.append("off"))
    pm.write(0, 2, 0x0001)  # SCI_EN only
    pm.write(0, 2, 0x2000 | (5 << 10))  # SLP_EN with sleep type 5
    assert calls == []
    assert pm.read(0, 2) == 0x1400  # SLP_EN reads as 0


def test_byte_writes_build_the_register() -> None:
    calls: list[str] = []
    pm = AcpiPmControl(lambda: calls.append("off"))
    pm.write(0, 1, 0x00)
    assert calls == []
    pm.write(1, 1, 0x20)  # high byte: SLP_EN
    assert calls == ["off"]
