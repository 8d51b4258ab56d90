"""The PCI host bridge (configuration mechanism #1) and the generic PCI function."""

from __future__ import annotations

import base64
import itertools
import json
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, ClassVar, Protocol

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmpy import records
from kvmpy.board import Board, Wiring
from kvmpy.bus import Bus, DeviceSpaces
from kvmpy.devices.base import DeviceStateError, bounded, check_state
from kvmpy.devices.pci import (
    CLASS_HOST_BRIDGE,
    CLASS_ISA_BRIDGE,
    PciAddress,
    PciBar,
    PciFunction,
    PciHost,
    PciHostState,
    PciWindows,
    i440fx_host_bridge,
    pci_interrupt_gsi,
    piix3_isa_bridge,
)
from kvmpy.loaders.flat import load_flat
from kvmpy.machine import Machine
from kvmpy.records import Record
from kvmpy.snapshot import SnapshotError, device_state, restore_device_state
from kvmpy.x86.mptable import mp_tables
from kvmpy.x86.pc import PC, PCI_FUNCTIONS, PciSlot, pci_entry, pci_windows
from tests.fuzzing import budget
from tests.helpers import ROOT, Assembler
from tests.snapshot_helpers import edit_body


class PortRange(Protocol):
    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


def address(device: int, function: int = 0, register: int = 0, bus: int = 0) -> int:
    return 1 << 31 | bus << 16 | device << 11 | function << 8 | register


class Host:
    """A PciHost reached through its ports, as the board maps them."""

    def __init__(self, functions: dict[PciAddress, PciFunction] | None = None) -> None:
        self.resets = 0
        if functions is None:
            functions = {
                PciAddress(0, 0, 0): i440fx_host_bridge(),
                PciAddress(0, 1, 0): piix3_isa_bridge(),
            }
        self.pci = PciHost(functions, self._reset)

    def _reset(self) -> None:
        self.resets += 1

    def outl(self, port: int, value: int) -> None:
        self.write(port, 4, value)

    def write(self, port: int, size: int, value: int) -> None:
        part, base = self._part(port)
        part.write(port - base, size, value)

    def read(self, port: int, size: int) -> int:
        part, base = self._part(port)
        return part.read(port - base, size)

    def _part(self, port: int) -> tuple[PortRange, int]:
        p = self.pci
        if port == 0xCF8:
            return p.address_port, 0xCF8
        if port == 0xCF9:
            return p.reset_port, 0xCF9
        if port in (0xCFA, 0xCFB):
            return p.address_tail_port, 0xCFA
        return p.data_port, 0xCFC

    def config(self, device: int, function: int, register: int, size: int) -> int:
        self.outl(0xCF8, address(device, function, register & ~3))
        return self.read(0xCFC + (register & 3), size)


def test_the_two_functions_of_qemus_pc() -> None:
    host = Host()
    assert host.config(0, 0, 0, 4) == 0x1237_8086
    assert host.config(1, 0, 0, 4) == 0x7000_8086
    assert host.config(0, 0, 0x08, 4) >> 8 == CLASS_HOST_BRIDGE
    assert host.config(1, 0, 0x08, 4) >> 8 == CLASS_ISA_BRIDGE
    assert host.config(1, 0, 0x0E, 1) & 0x80  # multi-function, as in QEMU
    assert host.config(0, 0, 0x02, 2) == 0x1237  # word at an offset
    assert host.config(0, 0, 0x01, 1) == 0x80


def test_absent_functions_and_other_buses_read_all_ones() -> None:
    host = Host()
    assert host.config(2, 0, 0, 4) == 0xFFFF_FFFF
    assert host.config(1, 1, 0, 2) == 0xFFFF
    host.outl(0xCF8, address(0, bus=1))
    assert host.read(0xCFC, 4) == 0xFFFF_FFFF
    host.outl(0xCF8, 0)  # enable bit clear
    assert host.read(0xCFC, 4) == 0xFFFF_FFFF
    host.write(0xCFC, 4, 0)  # dropped


def test_address_register_is_dword_only_and_survives_linux_probe() -> None:
    host = Host()
    host.outl(0xCF8, 0x8000_0000)
    assert host.read(0xCF8, 4) == 0x8000_0000
    host.write(0xCFB, 1, 0x01)  # Linux's pci_check_type1 does this first
    host.write(0xCF8, 2, 0x1234)
    assert host.read(0xCF8, 4) == 0x8000_0000
    assert host.read(0xCF8, 1) == 0xFF  # so the type 2 probe fails, as it should
    assert host.read(0xCFA, 4) == 0xFFFF_FFFF  # a dword at 0xcfa is not the register
    host.write(0xCFA, 4, 0)
    assert host.read(0xCF8, 4) == 0x8000_0000


def test_piix_reset_control() -> None:
    host = Host()
    host.write(0xCF9, 1, 0x02)
    assert host.read(0xCF9, 1) == 0x02 and host.resets == 0
    host.write(0xCF9, 1, 0x06)
    assert host.resets == 1
    host.pci.reset()
    assert host.read(0xCF9, 1) == 0


def test_write_mask_bars_and_status() -> None:
    function = PciFunction(0x1AF4, 0x1000, 0x020000, bars=(PciBar(0x100, io=True), PciBar(0x4000)))
    host = Host({PciAddress(0, 3, 0): function})
    host.outl(0xCF8, address(3, register=0))
    host.write(0xCFC, 4, 0xFFFF_FFFF)  # IDs are read-only
    assert host.read(0xCFC, 4) == 0x1000_1AF4
    for bar, expected in ((0x10, 0xFFFF_FF01), (0x14, 0xFFFF_C000)):
        host.outl(0xCF8, address(3, register=bar))
        host.write(0xCFC, 4, 0xFFFF_FFFF)  # the size probe
        assert host.read(0xCFC, 4) == expected
    host.write(0xCFC, 4, 0xFEBF_0000)
    assert function.bar_address(1) == 0xFEBF_0000
    host.outl(0xCF8, address(3, register=0x18))
    host.write(0xCFC, 4, 0xFFFF_FFFF)  # no third BAR: stays 0
    assert host.read(0xCFC, 4) == 0
    host.outl(0xCF8, address(3, register=0x04))
    host.write(0xCFC, 2, 0xFFFF)
    assert host.read(0xCFC, 2) == 0x0547
    function.config[0x07] = 0x80  # a detected parity error...
    host.write(0xCFE, 1, 0x00)
    host.write(0xCFF, 1, 0x80)  # ...is cleared by writing 1
    assert function.config[0x07] == 0
    function.reset()
    assert host.read(0xCFC, 2) == 0


def test_interrupt_pin_routing_and_the_mp_table() -> None:
    levels: list[bool] = []
    function = PciFunction(0x1AF4, 0x1000, 0x020000)
    function.connect_interrupt(1, pci_interrupt_gsi(3, 1), levels.append)
    assert (function.config[0x3D], function.config[0x3C]) == (1, 19)
    function.set_interrupt(True)
    function.write_config(0x04, 2, 1 << 10)  # INTx disable
    function.set_interrupt(True)
    assert levels == [True, False]
    with pytest.raises(ValueError):
        function.connect_interrupt(5, 16, levels.append)

    table = mp_tables(1, 0, 0, pci_interrupts=[(3, 1, 19)])
    entries = table[16 + 44 :]
    buses = []
    interrupts = []
    at = 0
    while at < len(entries):
        kind = entries[at]
        size = 20 if kind == 0 else 8
        if kind == 1:
            buses.append((entries[at + 1], entries[at + 2 : at + 8]))
        if kind == 3:
            interrupts.append(struct.unpack_from("<BBHBBBB", entries, at))
        at += size
    assert buses == [(0, b"PCI   "), (1, b"ISA   ")]
    assert (3, 0, 0x0F, 0, 3 << 2, 1, 19) in interrupts  # level, active low
    assert (3, 0, 0, 1, 4, 1, 4) in interrupts  # COM1 from the ISA bus


def test_board_entry() -> None:
    entry = PC.entry("pci")
    ports = sorted((r.base, r.length, r.part) for r in entry.ports)
    assert ports == [
        (0xCF8, 1, "address_port"),
        (0xCF9, 1, "reset_port"),
        (0xCFA, 2, "address_tail_port"),
        (0xCFC, 4, "data_port"),
    ]


@pytest.mark.kvm
def test_a_guest_scans_bus_0_and_resets_through_0xcf9(assemble: Assembler) -> None:
    # Real mode: count the functions on bus 0 whose vendor ID is not 0xffff
    # (device 0-31, function 0), print the count, then reset through 0xcf9.
    source = """
        xor %bl, %bl
        xor %ecx, %ecx
    1:  mov %ecx, %eax
        shl $11, %eax
        or $0x80000000, %eax
        mov $0xcf8, %dx
        out %eax, %dx
        mov $0xcfc, %dx
        in %dx, %ax
        cmp $0xffff, %ax
        je 2f
        inc %bl
    2:  inc %ecx
        cmp $32, %ecx
        jb 1b
        mov %bl, %al
        add $'0', %al
        mov $0x3f8, %dx
        out %al, %dx
        mov $0xcf9, %dx
        mov $0x06, %al
        out %al, %dx
        hlt
    """
    with Machine(mem_size=16 << 20) as m:
        m.load(load_flat(assemble(source), 0x7C00), mode="real")
        outcome = m.run(timeout=30)
        assert (outcome.kind.value, bytes(m.console)) == ("reset", b"2")


def test_state_round_trips_and_read_only_bytes_are_refused() -> None:
    host = Host()
    host.outl(0xCF8, address(1, register=0x3C))
    host.write(0xCFC, 1, 0x0B)  # the interrupt line: writable
    state = host.pci.state()
    other = Host()
    other.pci.restore(state)
    assert other.config(1, 0, 0x3C, 1) == 0x0B
    assert other.read(0xCF8, 4) == address(1, register=0x3C)
    forged = bytearray(state.configs[0])
    forged[0] = 0x34  # the vendor ID is read-only
    bad = records.replace(state, configs=(bytes(forged), state.configs[1]))
    with pytest.raises(DeviceStateError, match="configs: byte 0x0"):
        other.pci.restore(bad)
    with pytest.raises(DeviceStateError, match="1 functions, not 2"):
        other.pci.restore(records.replace(state, configs=state.configs[:1]))
    assert other.config(0, 0, 0, 2) == 0x8086  # nothing was taken


# -- BARs on the buses ---------------------------------------------------------------------


class ScratchFunction(PciFunction):
    """A test function: BAR0 16 I/O ports, BAR1 4 KiB of memory, BAR2 (64-bit) 4 KiB.

    Each BAR is plain memory: reads give back what was written, so a test
    sees which BAR, at which offset, answered.
    """

    def __init__(self) -> None:
        super().__init__(
            0x1B36,
            0x0005,
            0xFF0000,
            bars=(PciBar(16, io=True), PciBar(0x1000), PciBar(0x1000, address64=True)),
        )
        self.memory = [bytearray(bar.size) for bar in self.bars]

    def read_bar(self, index: int, offset: int, size: int) -> int:
        return int.from_bytes(
            self.memory[index][offset : offset + size].ljust(size, b"\xff"), "little"
        )

    def write_bar(self, index: int, offset: int, size: int, value: int) -> None:
        data = value.to_bytes(size, "little")[: len(self.memory[index]) - offset]
        self.memory[index][offset : offset + len(data)] = data

    # What the BARs hold is the device's state, as a virtio function's registers would be.
    def reset(self) -> None:
        super().reset()
        for memory in self.memory:
            memory[:] = bytes(len(memory))

    def state(self) -> ScratchState:
        return ScratchState(tuple(bytes(memory) for memory in self.memory))

    def restore(self, state: ScratchState) -> None:
        checked = check_state("scratch", state, ScratchState)
        for memory, saved in zip(self.memory, checked.memory, strict=True):
            if len(saved) != len(memory):
                raise DeviceStateError(
                    "scratch", "memory", f"{len(saved)} bytes, not {len(memory)}"
                )
        for memory, saved in zip(self.memory, checked.memory, strict=True):
            memory[:] = saved


class ScratchState(Record):
    VERSION: ClassVar[int] = 1
    memory: tuple[bytes, ...] = bounded(0, 0xFF, length=3)


WINDOWS = PciWindows(io=(0x0D00, 0x10000), memory=(0x0800_0000, 0xFEB0_0000))


class Attached:
    """A host with ScratchFunction at 00:03.0, its BARs mapped on two real buses."""

    def __init__(self) -> None:
        self.function = ScratchFunction()
        self.host = Host({PciAddress(0, 3, 0): self.function})
        self.host.pci.windows = WINDOWS
        self.ports, self.mmio = Bus("port", 0x10000), Bus("mmio", 1 << 52)
        self.other = Recorder()
        self.mmio.register(0xFEB0_0000 - 0x2000, 0x1000, self.other, "another device")
        self.host.pci.attach(DeviceSpaces(self.ports, self.mmio, threading.Lock()))

    def config_write(self, register: int, size: int, value: int) -> None:
        self.host.outl(0xCF8, address(3, register=register & ~3))
        self.host.write(0xCFC + (register & 3), size, value)

    def config_read(self, register: int) -> int:
        return self.host.config(3, 0, register, 4)

    def mapped(self) -> dict[int, int]:
        return {index: at for (_, index), at in self.host.pci.mapped_bars().items()}


class Recorder:
    def __init__(self) -> None:
        self.reads = 0

    def read(self, offset: int, size: int) -> int:
        self.reads += 1
        return 0x5A

    def write(self, offset: int, size: int, value: int) -> None:
        return None

    def reset(self) -> None:
        return None

    def state(self) -> None:
        return None

    def restore(self, state: object) -> None:
        return None


def test_64_bit_bar_sizing_reads_the_size_mask_in_both_halves() -> None:
    setup = Attached()
    assert setup.config_read(0x18) == 0x4  # 64-bit memory, not prefetchable
    for register in (0x18, 0x1C):
        setup.config_write(register, 4, 0xFFFF_FFFF)
    assert (setup.config_read(0x18), setup.config_read(0x1C)) == (0xFFFF_F004, 0xFFFF_FFFF)
    setup.config_write(0x1C, 4, 0x1)
    setup.config_write(0x18, 4, 0x2000)
    assert setup.function.bar_address(2) == 0x1_0000_2000
    with pytest.raises(ValueError, match="6 BAR registers"):
        PciFunction(1, 1, 0, bars=[PciBar(16, address64=True)] * 4)


def test_a_programmed_bar_is_mapped_only_while_decode_is_on() -> None:
    setup = Attached()
    setup.config_write(0x10, 4, 0xFFFF_FFFF)  # sizing: nothing decodes up there
    assert setup.config_read(0x10) == 0xFFFF_FFF1
    setup.config_write(0x10, 4, 0x1000)
    setup.config_write(0x14, 4, 0xE000_0000)
    assert setup.mapped() == {}  # decode is still off
    setup.config_write(0x04, 2, 0x1)  # I/O space on
    assert setup.mapped() == {0: 0x1000}
    setup.ports.write(0x1004, 2, 0xBEEF)
    assert setup.ports.read(0x1004, 2) == 0xBEEF
    assert setup.function.memory[0][4:6] == b"\xef\xbe"
    assert setup.mmio.read(0xE000_0000, 4) == 0xFFFF_FFFF  # memory decode is off
    setup.config_write(0x04, 2, 0x3)  # and memory space
    assert setup.mapped() == {0: 0x1000, 1: 0xE000_0000}
    setup.mmio.write(0xE000_0FFC, 4, 0x1234_5678)
    assert setup.mmio.read(0xE000_0FFC, 4) == 0x1234_5678
    assert setup.function.memory[1][0xFFC:] == (0x1234_5678).to_bytes(4, "little")
    assert setup.mmio.read(0xE000_0FFE, 4) == 0xFFFF_FFFF  # runs past the BAR's end

    setup.config_write(0x10, 4, 0x2000)  # move the I/O BAR
    assert setup.mapped()[0] == 0x2000
    assert setup.ports.read(0x1004, 2) == 0xFFFF  # the old place is unclaimed again
    assert setup.ports.read(0x2004, 2) == 0xBEEF
    setup.config_write(0x04, 2, 0x2)  # I/O decode off
    assert setup.mapped() == {1: 0xE000_0000}
    assert setup.ports.read(0x2004, 2) == 0xFFFF
    assert [m.name for m in setup.ports.mappings] == []


def test_a_bar_over_a_taken_range_or_outside_the_window_is_refused() -> None:
    setup = Attached()
    setup.config_write(0x04, 2, 0x3)
    setup.config_write(0x14, 4, 0xFEB0_0000 - 0x2000)  # over another device's page
    assert setup.mapped() == {} and setup.host.pci.refused_bars == 1
    assert setup.mmio.read(0xFEB0_0000 - 0x2000, 1) == 0x5A  # which keeps it
    setup.config_write(0x18, 4, 0xFEB0_0000 - 0x2000)  # the 64-bit BAR too
    assert setup.host.pci.refused_bars == 2
    setup.config_write(0x18, 4, 0x0900_0000)
    assert setup.mapped() == {2: 0x0900_0000}
    setup.config_write(0x14, 4, 0x0900_0000)  # over the other BAR
    assert setup.mapped() == {2: 0x0900_0000}
    setup.config_write(0x14, 4, 0x0400_0000)  # below the window (RAM)
    setup.config_write(0x10, 4, 0x0CF8)  # over the configuration ports, below the window
    setup.config_write(0x1C, 4, 0x1)  # the 64-bit BAR above 4 GiB: outside the window
    assert setup.mapped() == {}
    setup.config_write(0x1C, 4, 0x0)
    setup.config_write(0x14, 4, 0x0A00_0000)
    setup.config_write(0x10, 4, 0xFFF0)  # the last 16 ports
    assert setup.mapped() == {0: 0xFFF0, 1: 0x0A00_0000, 2: 0x0900_0000}
    setup.config_write(0x10, 4, 0xFFFF_FFFF)  # sizing while decoding: 0xfffffff0 is no port
    assert 0 not in setup.mapped()
    setup.config_write(0x10, 4, 0xFFF0)

    state = setup.host.pci.state()
    setup.host.pci.reset()
    assert setup.mapped() == {} and setup.ports.mappings == [] and len(setup.mmio.mappings) == 1
    setup.host.pci.restore(state)
    assert setup.mapped() == {0: 0xFFF0, 1: 0x0A00_0000, 2: 0x0900_0000}


def test_adding_a_pci_function_is_one_board_entry() -> None:
    board = board_with(PciSlot(PciAddress(0, 3, 0), lambda w: ScratchFunction(), interrupt_pin=1))
    entry = board.entry("pci")
    assert entry.attach is not None
    host = entry.build(fake_wiring())
    assert isinstance(host.functions[PciAddress(0, 3, 0)], ScratchFunction)
    assert host.functions[PciAddress(0, 3, 0)].config[0x3C] == pci_interrupt_gsi(3, 1)
    assert host.windows == pci_windows(16 << 20)


def board_with(*slots: PciSlot) -> Board:
    devices = tuple(
        pci_entry((*PCI_FUNCTIONS, *slots), firmware_bars=False) if entry.name == "pci" else entry
        for entry in PC.devices
    )
    return records.replace(PC, devices=devices)


def fake_wiring() -> Wiring:
    return Wiring(
        irq=lambda n: lambda level: None,
        request_reset=lambda: None,
        request_power_off=lambda: None,
        guest_exit=lambda code: None,
        serial_output=lambda data: None,
        ram_size=16 << 20,
        low_ram=16 << 20,
        cpus=1,
        cmdline="",
    )


@pytest.mark.kvm
def test_a_guest_sizes_programs_enables_and_uses_bars(assemble: Assembler) -> None:
    # Long mode (identity-mapped 4 GiB): size BAR0 (I/O) and BAR1 (memory) of
    # 00:03.0, place them at 0x1000 and 0xe0000000, enable decode, write
    # through both, read back; exit with code 0 when all matched, else the
    # number of the failed check.
    source = """
        mov $0xcf8, %dx
        mov $0x80001810, %eax           /* 00:03.0 BAR0 */
        out %eax, %dx
        mov $0xcfc, %dx
        mov $0xffffffff, %eax
        out %eax, %dx
        in %dx, %eax
        mov $1, %bl
        cmp $0xfffffff1, %eax           /* 16 ports, I/O */
        jne fail
        mov $0x1000, %eax
        out %eax, %dx
        mov $0xcf8, %dx
        mov $0x80001814, %eax           /* BAR1 */
        out %eax, %dx
        mov $0xcfc, %dx
        mov $0xffffffff, %eax
        out %eax, %dx
        in %dx, %eax
        mov $2, %bl
        cmp $0xfffff000, %eax           /* 4 KiB of memory */
        jne fail
        mov $0xe0000000, %eax
        out %eax, %dx
        mov $0x1004, %dx
        mov $3, %bl
        in %dx, %ax
        cmp $0xffff, %ax                /* decode off: nobody answers */
        jne fail
        mov $0xcf8, %dx
        mov $0x80001804, %eax           /* command: I/O and memory space */
        out %eax, %dx
        mov $0xcfc, %dx
        mov $0x3, %ax
        out %ax, %dx
        mov $0x1004, %dx
        mov $0xbeef, %ax
        out %ax, %dx
        xor %ax, %ax
        in %dx, %ax
        mov $4, %bl
        cmp $0xbeef, %ax
        jne fail
        mov $0xe0000ff8, %rsi
        movl $0x12345678, (%rsi)
        mov (%rsi), %eax
        mov $5, %bl
        cmp $0x12345678, %eax
        jne fail
        xor %bl, %bl
    fail:
        mov %bl, %al
        out %al, $0xf4
        hlt
    """
    board = board_with(PciSlot(PciAddress(0, 3, 0), lambda w: ScratchFunction()))
    with Machine(mem_size=16 << 20, board=board) as m:
        m.load(load_flat(assemble(source, "long"), 0x10_0000), mode="long")
        outcome = m.run(timeout=30)
        assert outcome.exit_code == 0, outcome
        function = m.device("pci", PciHost).functions[PciAddress(0, 3, 0)]
        assert isinstance(function, ScratchFunction)
        assert function.memory[1][0xFF8:0xFFC] == (0x12345678).to_bytes(4, "little")


@st.composite
def config_writes(draw: st.DrawFn) -> list[tuple[int, int, int]]:
    """(register, size, value) writes to 00:03.0: command, BARs, and sizing probes."""
    register = st.sampled_from([0x04, 0x10, 0x14, 0x18, 0x1C, 0x20, 0x3C])
    value = st.one_of(
        st.just(0xFFFF_FFFF),
        st.sampled_from([0, 1, 2, 3, 0x1000, 0xFFF0, 0x0CF8, 0xE000_0000, 0xFEB0_0000 - 0x2000]),
        st.integers(0, 0xFFFF_FFFF),
    )
    write = st.tuples(register, st.sampled_from([1, 2, 4]), value)
    return draw(st.lists(write, max_size=40))


def _check_buses(setup: Attached) -> None:
    """What a hostile guest must never achieve: a BAR outside the windows, over
    another range, or buses that disagree with the configuration space."""
    function = setup.function
    mapped = setup.mapped()
    command = function.read_config(0x04, 2)
    for index, at in mapped.items():
        bar = function.bars[index]
        assert at == function.bar_address(index)
        assert command & (1 if bar.io else 2)
        start, end = WINDOWS.io if bar.io else WINDOWS.memory
        assert start <= at and at + bar.size <= end
    assert setup.mmio.find(0xFEB0_0000 - 0x2000) is not None
    assert setup.mmio.find(0xFEB0_0000 - 0x2000).device is setup.other  # type: ignore[union-attr]
    for bus in (setup.ports, setup.mmio):
        ranges = bus.mappings
        for first, second in itertools.pairwise(ranges):
            assert first.end <= second.base
    for mapping in setup.ports.mappings:
        for port in range(mapping.base, mapping.end):
            assert setup.ports.handlers[port][0] == mapping.device.read
    for port, handler in setup.ports.handlers.items():  # the rest are unclaimed stubs
        if setup.ports.find(port) is None:
            assert handler[0] == setup.ports._unclaimed[port].read


@given(config_writes())
@budget()
def test_a_hostile_guest_cannot_put_a_bar_where_it_does_not_belong(
    writes: list[tuple[int, int, int]],
) -> None:
    setup = Attached()
    for register, size, value in writes:
        setup.ports.read(0x1000, 1)  # touched unclaimed too, now and then
        setup.config_write(register, size, value & ((1 << (8 * size)) - 1))
        _check_buses(setup)
    setup.host.pci.reset()
    assert setup.mapped() == {} and setup.ports.mappings == []
    assert [m.device for m in setup.mmio.mappings] == [setup.other]


# -- BARs across a snapshot and a reset ----------------------------------------------------

OTHER_PAGE = 0xFEB0_0000 - 0x2000  # Attached's other device


def saved_state(writes: list[tuple[int, int]], mapped_bars: int) -> PciHostState:
    """A host state for Attached: ScratchFunction's config after ``writes`` (register,
    dword), with ``mapped_bars`` saying which BARs were on a bus."""
    function = ScratchFunction()
    for register, value in writes:
        function.write_config(register, 4, value)
    return PciHostState(0, 0, (bytes(function.config),), (mapped_bars,))


def bus_ranges(setup: Attached) -> list[list[tuple[int, int, str]]]:
    return [[(m.base, m.length, m.name) for m in bus.mappings] for bus in (setup.ports, setup.mmio)]


def test_restore_maps_exactly_the_bars_that_were_mapped_with_their_contents() -> None:
    setup = Attached()
    setup.config_write(0x04, 2, 0x3)
    setup.config_write(0x10, 4, 0x1000)
    setup.config_write(0x18, 4, 0x0900_0000)  # BAR2 first...
    setup.config_write(0x14, 4, 0x0900_0000)  # ...so BAR1, put over it, is refused
    setup.ports.write(0x1002, 2, 0xCAFE)
    setup.mmio.write(0x0900_0010, 4, 0x1234_5678)
    assert setup.mapped() == {0: 0x1000, 2: 0x0900_0000}
    state = setup.host.pci.state()
    assert state.mapped_bars == (0b101,)

    other = Attached()
    other.host.pci.restore(state)
    other.function.restore(setup.function.state())
    assert other.mapped() == {0: 0x1000, 2: 0x0900_0000}  # BAR2 keeps the place it won
    assert bus_ranges(other) == bus_ranges(setup)
    assert other.ports.read(0x1002, 2) == 0xCAFE
    assert other.mmio.read(0x0900_0010, 4) == 0x1234_5678
    _check_buses(other)
    other.config_write(0x14, 4, 0x0A00_0000)  # the refused BAR, moved somewhere free
    assert other.mapped() == {0: 0x1000, 1: 0x0A00_0000, 2: 0x0900_0000}
    assert other.host.pci.refused_bars == 0  # its refusal was the saved machine's

    # The other order: BAR1 won the place, and keeps it across a restore.
    first = Attached()
    first.config_write(0x04, 2, 0x2)
    first.config_write(0x14, 4, 0x0900_0000)
    first.config_write(0x18, 4, 0x0900_0000)
    assert first.mapped() == {1: 0x0900_0000}
    again = Attached()
    again.host.pci.restore(first.host.pci.state())
    assert again.mapped() == {1: 0x0900_0000}
    assert again.mmio.find(0x0900_0000).name == "PCI 00:03.0 BAR1"  # type: ignore[union-attr]


def test_restore_over_mapped_bars_can_swap_their_places() -> None:
    # Each BAR goes where the other is now: mapping them one by one would refuse the first.
    setup = Attached()
    setup.config_write(0x04, 2, 0x2)
    setup.config_write(0x14, 4, 0x0900_0000)
    setup.config_write(0x18, 4, 0x0A00_0000)
    swapped = saved_state([(0x04, 0x2), (0x14, 0x0A00_0000), (0x18, 0x0900_0000)], 0b110)
    setup.host.pci.restore(swapped)
    assert setup.mapped() == {1: 0x0A00_0000, 2: 0x0900_0000}
    _check_buses(setup)
    setup.host.pci.restore(saved_state([(0x04, 0x2), (0x14, 0x0A00_0000)], 0))
    assert setup.mapped() == {}  # decoding, but saved as refused: left off
    assert [m.device for m in setup.mmio.mappings] == [setup.other]


def test_reset_unmaps_every_bar_and_clears_the_device() -> None:
    setup = Attached()
    setup.config_write(0x04, 2, 0x3)
    setup.config_write(0x10, 4, 0x1000)
    setup.config_write(0x14, 4, 0x0900_0000)
    setup.config_write(0x18, 4, 0x0900_0000)  # refused
    setup.mmio.write(0x0900_0000, 4, 0x1234_5678)
    setup.host.pci.reset()
    assert setup.mapped() == {} and setup.ports.mappings == []
    assert [m.device for m in setup.mmio.mappings] == [setup.other]
    assert setup.mmio.read(0x0900_0000, 4) == 0xFFFF_FFFF
    assert setup.function.read_config(0x04, 2) == 0 and setup.function.bar_address(1) == 0
    assert setup.function.memory[1] == bytes(0x1000)
    assert setup.host.pci.state().mapped_bars == (0,)
    setup.config_write(0x04, 2, 0x2)
    setup.config_write(0x18, 4, OTHER_PAGE)  # a new refusal after the reset is counted
    assert setup.host.pci.refused_bars == 2


DECODING = [(0x04, 0x3), (0x10, 0x1000), (0x14, 0x0900_0000), (0x18, 0x0A00_0000)]


@pytest.mark.parametrize(
    ("state", "message"),
    [
        (saved_state([(0x04, 0x1), *DECODING[1:]], 0b010), "BAR1 is mapped, but its command"),
        (saved_state([*DECODING, (0x14, 0x0400_0000)], 0b010), "outside the host bridge's windows"),
        (saved_state([*DECODING, (0x10, 0xFFFF_FFF0)], 0b001), "outside the host bridge's windows"),
        (saved_state([*DECODING, (0x1C, 0x1)], 0b100), "outside the host bridge's windows"),
        (saved_state([*DECODING, (0x14, 0x0A00_0000)], 0b110), "BAR1 and 00:03.0 BAR2 are both"),
        (saved_state([*DECODING, (0x14, OTHER_PAGE)], 0b010), "overlaps another device"),
        (saved_state(DECODING, 0b1000), "has 3 BARs, not BAR3"),
        (saved_state(DECODING, 0b100_0000), "mapped_bars: 0x40 is outside"),
        (records.replace(saved_state(DECODING, 0), mapped_bars=(0, 0)), "2 functions, not 1"),
    ],
)
def test_a_hostile_state_cannot_map_a_bar_and_changes_nothing(
    state: PciHostState, message: str
) -> None:
    setup = Attached()
    setup.config_write(0x04, 2, 0x3)
    setup.config_write(0x10, 4, 0x2000)
    setup.config_write(0x14, 4, 0x0B00_0000)
    before = (bus_ranges(setup), bytes(setup.function.config), setup.host.pci.state())
    with pytest.raises(DeviceStateError, match=f"^pci state: .*{message}"):
        setup.host.pci.restore(state)
    assert (bus_ranges(setup), bytes(setup.function.config), setup.host.pci.state()) == before
    _check_buses(setup)


def test_a_version_1_state_maps_what_decodes_as_the_live_rule_does() -> None:
    # Version 1 did not save which BARs were mapped: the upgrade leaves mapped_bars
    # empty, and restore maps each decoding BAR in order unless an earlier one took
    # its place (BAR2 here, over BAR1).
    setup = Attached()
    saved = device_state(setup.host.pci)
    state = saved_state([*DECODING, (0x18, 0x0900_0000)], 0)

    class Saved:
        def state(self) -> PciHostState:
            return state

    fields = json.loads(json.dumps(device_state(Saved())))["state"]
    del fields["mapped_bars"]
    restore_device_state(setup.host.pci, {"version": 1, "state": fields}, "pci")
    assert setup.mapped() == {0: 0x1000, 1: 0x0900_0000}
    assert saved["version"] == 2
    _check_buses(setup)


def test_a_hostile_snapshot_entry_is_one_snapshot_error() -> None:
    setup = Attached()
    saved = device_state(setup.host.pci)
    saved["state"]["mapped_bars"] = [0b111]  # decoding is off: nothing may be mapped
    with pytest.raises(SnapshotError, match=r"^device pci: pci state: mapped_bars: 00:03\.0 BAR0"):
        restore_device_state(Attached().host.pci, json.loads(json.dumps(saved)), "pci")
    scratch = device_state(setup.function)
    scratch["state"]["memory"][1] = "AAAA"  # 3 bytes, not 4 KiB
    with pytest.raises(SnapshotError, match="memory: 3 bytes, not 4096"):
        restore_device_state(ScratchFunction(), scratch, "pci/00:03.0")


def _config_write(register: int, value: int) -> str:
    """Guest code: dword ``value`` to 00:03.0's configuration ``register``."""
    return f"""
        mov $0xcf8, %dx
        mov ${0x8000_1800 | register:#x}, %eax
        out %eax, %dx
        mov $0xcfc, %dx
        mov ${value:#x}, %eax
        out %eax, %dx
    """


def _expect_port(port: int, value: int, check: int) -> str:
    return f"""
        mov ${port:#x}, %dx
        in %dx, %ax
        mov ${check}, %bl
        cmp ${value:#x}, %ax
        jne fail
    """


def _expect_memory(address: int, value: int, check: int) -> str:
    return f"""
        mov ${address:#x}, %rsi
        mov (%rsi), %eax
        mov ${check}, %bl
        cmp ${value:#x}, %eax
        jne fail
    """


PHASE_DONE = 0x10  # the guest's exit code when it is ready for the snapshot
SCRATCH = PciAddress(0, 3, 0)


def _bar_guest(*, moved: bool, decoding: bool) -> str:
    """Long mode.  First: program 00:03.0's three BARs (I/O at 0x1000, memory at
    0xe0000000, 64-bit memory at 0xe0001000), turn decoding on, write through
    each, maybe move BAR0 to 0x3000 and BAR1 to 0xe0100000, maybe turn decoding
    off, and exit with PHASE_DONE.  Then (run again, after a restore): check
    what each address answers; exit 0 when all matched, else the failed check."""
    io, memory = (0x3000, 0xE010_0000) if moved else (0x1000, 0xE000_0000)
    first = [
        _config_write(0x10, 0x1000),
        _config_write(0x14, 0xE000_0000),
        _config_write(0x18, 0xE000_1000),
        _config_write(0x1C, 0),
        _config_write(0x04, 0x3),
        "mov $0x1004, %dx; mov $0xbeef, %ax; out %ax, %dx",
        "mov $0xe0000ff8, %rsi; movl $0x12345678, (%rsi)",
        "mov $0xe0001010, %rsi; movl $0xcafef00d, (%rsi)",
    ]
    if moved:
        first += [_config_write(0x10, 0x3000), _config_write(0x14, 0xE010_0000)]
    if not decoding:
        first.append(_config_write(0x04, 0))
    first.append(f"mov ${PHASE_DONE}, %al; out %al, $0xf4")
    then = []
    if not decoding:  # nothing answers, until decoding is on again
        then += [
            _expect_port(io + 4, 0xFFFF, 1),
            _expect_memory(memory + 0xFF8, 0xFFFF_FFFF, 2),
            _expect_memory(0xE000_1010, 0xFFFF_FFFF, 3),
            _config_write(0x04, 0x3),
        ]
    then += [
        _expect_port(io + 4, 0xBEEF, 4),
        _expect_memory(memory + 0xFF8, 0x1234_5678, 5),
        _expect_memory(0xE000_1010, 0xCAFE_F00D, 6),
        "mov $0xe0001020, %rsi; movl $0x600df00d, (%rsi)",
        _expect_memory(0xE000_1020, 0x600D_F00D, 7),
    ]
    if moved:  # the old places are unclaimed: all-ones
        then += [_expect_port(0x1004, 0xFFFF, 8), _expect_memory(0xE000_0FF8, 0xFFFF_FFFF, 9)]
    return "\n".join([*first, *then, "xor %bl, %bl", "fail: mov %bl, %al", "out %al, $0xf4", "hlt"])


def _scratch(machine: Machine) -> ScratchFunction:
    function = machine.device("pci", PciHost).functions[SCRATCH]
    assert isinstance(function, ScratchFunction)
    return function


def _pci_ranges(machine: Machine) -> list[tuple[str, int, int]]:
    """(name, base, length) of every BAR range on the buses, by name."""
    return sorted(
        (m.name, m.base, m.length)
        for bus in (machine.ports, machine.mmio)
        for m in bus.mappings
        if m.name.startswith("PCI ") and " BAR" in m.name
    )


def _run_first_phase(assemble: Assembler, path: Path, *, moved: bool, decoding: bool) -> Board:
    board = board_with(PciSlot(SCRATCH, lambda w: ScratchFunction()))
    with Machine(mem_size=16 << 20, board=board) as m:
        m.load(
            load_flat(assemble(_bar_guest(moved=moved, decoding=decoding), "long"), 0x10_0000),
            mode="long",
        )
        outcome = m.run(timeout=30)
        assert outcome.exit_code == PHASE_DONE, outcome
        m.snapshot(path)
    return board


@pytest.mark.kvm
@pytest.mark.parametrize(
    ("moved", "decoding", "exit_windows"),
    [(False, True, True), (True, True, True), (True, True, False), (True, False, True)],
)
def test_bars_a_guest_programmed_survive_a_snapshot(
    assemble: Assembler, tmp_path: Path, moved: bool, decoding: bool, exit_windows: bool
) -> None:
    board = _run_first_phase(assemble, tmp_path / "snap", moved=moved, decoding=decoding)
    io, memory = (0x3000, 0xE010_0000) if moved else (0x1000, 0xE000_0000)
    with Machine.restore(tmp_path / "snap", board=board, exit_windows=exit_windows) as m:
        ranges = [
            (f"PCI {SCRATCH} BAR0", io, 16),
            (f"PCI {SCRATCH} BAR1", memory, 0x1000),
            (f"PCI {SCRATCH} BAR2", 0xE000_1000, 0x1000),
        ]
        assert _pci_ranges(m) == (ranges if decoding else [])
        assert _scratch(m).memory[1][0xFF8:0xFFC] == (0x1234_5678).to_bytes(4, "little")
        if decoding:  # the host sees them through the buses too
            assert m.ports.read(io + 4, 2) == 0xBEEF
            assert m.mmio.read(0xE000_1010, 4) == 0xCAFE_F00D
        outcome = m.run(timeout=30)
        assert outcome.exit_code == 0, outcome
        assert _pci_ranges(m) == ranges
        assert _scratch(m).memory[2][0x20:0x24] == (0x600D_F00D).to_bytes(4, "little")


@pytest.mark.kvm
def test_reset_in_place_unmaps_the_bars_a_guest_programmed(
    assemble: Assembler, tmp_path: Path
) -> None:
    board = board_with(PciSlot(SCRATCH, lambda w: ScratchFunction()))
    with Machine(mem_size=16 << 20, board=board) as m:
        m.load(
            load_flat(assemble(_bar_guest(moved=True, decoding=True), "long"), 0x10_0000),
            mode="long",
        )
        assert m.run(timeout=30).exit_code == PHASE_DONE
        assert len(_pci_ranges(m)) == 3
        m.reset()
        assert _pci_ranges(m) == [] and m.device("pci", PciHost).mapped_bars() == {}
        assert _scratch(m).memory[1] == bytes(0x1000)
        # What the guest now finds: power-on BARs, and nothing where they were.
        source = "\n".join(
            [
                "mov $0xcf8, %dx; mov $0x80001804, %eax; out %eax, %dx",
                _expect_port(0xCFC, 0, 1),  # the command register
                "mov $0xcf8, %dx; mov $0x80001814, %eax; out %eax, %dx",
                "mov $0xcfc, %dx; in %dx, %eax; mov $2, %bl; cmp $0, %eax; jne fail",
                _expect_port(0x3004, 0xFFFF, 3),
                _expect_memory(0xE010_0FF8, 0xFFFF_FFFF, 4),
                _expect_memory(0xE000_1010, 0xFFFF_FFFF, 5),
                "xor %bl, %bl",
                "fail: mov %bl, %al",
                "out %al, $0xf4",
                "hlt",
            ]
        )
        m.load(load_flat(assemble(source, "long"), 0x10_0000), mode="long")
        outcome = m.run(timeout=30)
        assert outcome.exit_code == 0, outcome
        assert _pci_ranges(m) == []


def _forge_scratch_bar1(body: dict[str, Any], address: int) -> None:
    """Put 00:03.0's BAR1 at ``address`` in a snapshot body, and mark all its BARs mapped."""
    state = body["devices"]["pci"]["state"]
    config = bytearray(base64.b64decode(state["configs"][-1]))
    struct.pack_into("<I", config, 0x14, address)
    state["configs"][-1] = base64.b64encode(bytes(config)).decode()
    state["mapped_bars"][-1] = 0b111


@pytest.mark.kvm
def test_a_hostile_snapshot_cannot_map_bars_over_each_other(
    assemble: Assembler, tmp_path: Path
) -> None:
    board = _run_first_phase(assemble, tmp_path / "snap", moved=True, decoding=True)
    edit_body(tmp_path / "snap", lambda body: _forge_scratch_bar1(body, 0xE000_1000))
    with pytest.raises(
        SnapshotError,
        match=r"^device pci: pci state: mapped_bars: 00:03\.0 BAR1 and 00:03\.0 BAR2 are both "
        r"mapped at 0xe0001000$",
    ):
        Machine.restore(tmp_path / "snap", board=board)
    edit_body(tmp_path / "snap", lambda body: _forge_scratch_bar1(body, 0xE100_0000))
    with Machine.restore(tmp_path / "snap", board=board) as m:  # the same edit, elsewhere: fine
        assert (f"PCI {SCRATCH} BAR1", 0xE100_0000, 0x1000) in _pci_ranges(m)


@pytest.mark.kvm
def test_the_cli_refuses_a_snapshot_mapping_a_bar_that_does_not_exist(
    assemble: Assembler, tmp_path: Path
) -> None:
    with Machine(mem_size=16 << 20) as m:
        m.load(load_flat(assemble("mov $0x10, %al; out %al, $0xf4; hlt"), 0x7C00), mode="real")
        assert m.run(timeout=30).exit_code == 0x10
        m.snapshot(tmp_path / "snap")
    edit_body(
        tmp_path / "snap",
        lambda body: body["devices"]["pci"]["state"]["mapped_bars"].__setitem__(0, 1),
    )
    result = subprocess.run(
        [sys.executable, "-m", "kvmpy", "restore", str(tmp_path / "snap")],
        capture_output=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert result.stderr == (
        b"kvmpy: error: device pci: pci state: mapped_bars: 00:00.0 has 0 BARs, not BAR0\n"
    )
