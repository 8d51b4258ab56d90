"""The power-off register kernels written for QEMU poke: PM1a_CNT at port 0x604.

QEMU's PC machines put the ACPI PM1a control block at 0x604, and hobby
kernels power off with ``outw(0x604, 0x2000)``: SLP_EN (bit 13) with sleep
type 0, which QEMU's DSDT defines as S5, soft-off.  Only that is modelled;
there are no ACPI tables, so other sleep types are recorded and ignored.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from .base import U8, U16, access_fits, all_ones, bounded, check_state

PM1A_CNT_PORT = 0x604
PM1A_CNT_PORTS = 2

SCI_EN = 1 << 0
SLP_TYP_SHIFT = 10
SLP_TYP_MASK = 0x7 << SLP_TYP_SHIFT
SLP_EN = 1 << 13
SLEEP_TYPE_SOFT_OFF = 0  # S5 in QEMU's DSDT


@dataclass(frozen=True)
class AcpiPmControlState:
    VERSION: ClassVar[int] = 1
    value: int = bounded(0, U16)


class AcpiPmControl:
    """PM1a_CNT: calls ``on_power_off()`` when the guest enters S5.

    ``on_power_off`` runs with the device lock held: it must not call back
    into this device.  Accesses wider than the register keep its bytes only.
    """

    def __init__(self, on_power_off: Callable[[], None]) -> None:
        self.on_power_off = on_power_off
        self.value = 0
        self.ignored_accesses = 0

    def read(self, offset: int, size: int) -> int:
        if not access_fits(offset, size, PM1A_CNT_PORTS):
            self.ignored_accesses += 1
            return all_ones(size)
        # SLP_EN is write-only and always reads as 0.
        return ((self.value & ~SLP_EN) >> (8 * offset)) & ((1 << (8 * size)) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        if not access_fits(offset, size, PM1A_CNT_PORTS):
            self.ignored_accesses += 1
            return
        shift = 8 * offset
        mask = ((1 << (8 * size)) - 1) << shift
        self.value = (self.value & ~mask) | ((value << shift) & mask & 0xFFFF)
        sleep_type = (self.value & SLP_TYP_MASK) >> SLP_TYP_SHIFT
        if self.value & SLP_EN and sleep_type == SLEEP_TYPE_SOFT_OFF:
            self.on_power_off()

    def reset(self) -> None:
        self.value = 0

    def state(self) -> AcpiPmControlState:
        return AcpiPmControlState(self.value)

    def restore(self, state: AcpiPmControlState) -> None:
        self.value = check_state("acpi_pm", state, AcpiPmControlState).value


PM1A_EVT_PORT = 0x600
PM1A_EVT_PORTS = 4


class AcpiPmEvent:
    """PM1a_EVT: the status (offset 0) and enable (offset 2) registers the FADT names.

    Nothing here raises events, so status stays 0; writing 1s clears status
    bits (as ACPI says), and the enable register keeps what the guest wrote.
    """

    def __init__(self) -> None:
        self.registers = bytearray(PM1A_EVT_PORTS)
        self.ignored_accesses = 0

    def read(self, offset: int, size: int) -> int:
        if not access_fits(offset, size, PM1A_EVT_PORTS):
            self.ignored_accesses += 1
            return all_ones(size)
        return int.from_bytes(self.registers[offset : offset + size].ljust(size, b"\0"), "little")

    def write(self, offset: int, size: int, value: int) -> None:
        if not access_fits(offset, size, PM1A_EVT_PORTS):
            self.ignored_accesses += 1
            return
        for i, byte in enumerate((value & all_ones(size)).to_bytes(size, "little")):
            at = offset + i
            if at < 2:
                self.registers[at] &= ~byte & 0xFF  # write 1 to clear
            elif at < PM1A_EVT_PORTS:
                self.registers[at] = byte

    def reset(self) -> None:
        self.registers[:] = bytes(PM1A_EVT_PORTS)

    def state(self) -> AcpiPmEventState:
        return AcpiPmEventState(bytes(self.registers))

    def restore(self, state: AcpiPmEventState) -> None:
        self.registers[:] = check_state("acpi_events", state, AcpiPmEventState).registers


@dataclass(frozen=True)
class AcpiPmEventState:
    VERSION: ClassVar[int] = 1
    registers: bytes = bounded(0, U8, length=PM1A_EVT_PORTS)
