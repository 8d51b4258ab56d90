"""The ACPI fixed-feature registers of QEMU's PC: PM1a event and control blocks, PM timer.

=========== ===== ======================================================
port        size  register
=========== ===== ======================================================
0x600-0x601 2     PM1a status: TMR_STS (0), PWRBTN_STS (8), RTC_STS (10),
                  WAK_STS (15); write 1 to clear
0x602-0x603 2     PM1a enable: TMR_EN, PWRBTN_EN, RTC_EN at the same bits
0x604-0x605 2     PM1a control: SCI_EN (0), SLP_TYP (10-12), SLP_EN (13)
0x608-0x60b 4     PM timer: a free-running 24-bit count at 3.579545 MHz
=========== ===== ======================================================

Writing SLP_EN with a sleep type enters that state, with QEMU's numbering
(the DSDT's ``\\_S3`` and ``\\_S5`` say the same): type 0 is S5, soft-off,
which hobby kernels enter with ``outw(0x604, 0x2000)``; type 1 is S3,
suspend to RAM.  Other types are recorded and ignored.

The event block raises the SCI (IRQ 9) while a status bit and its enable bit
are both set.  TMR_STS is computed when read: it is set whenever bit 23 of the
PM timer has changed since the guest last cleared it.

Accesses that start past a block read all ones and are dropped, counted in
``ignored_accesses``; wider ones keep the block's bytes only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import ClassVar

from kvmpy.records import Record

from .base import (
    U8,
    U16,
    IrqCallback,
    Stateless,
    access_fits,
    all_ones,
    boolean,
    bounded,
    check_state,
    no_irq,
)

PM1A_CNT_PORT = 0x604
PM1A_CNT_PORTS = 2

SCI_EN = 1 << 0
SLP_TYP_SHIFT = 10
SLP_TYP_MASK = 0x7 << SLP_TYP_SHIFT
SLP_EN = 1 << 13
SLEEP_TYPE_SOFT_OFF = 0  # S5 in QEMU's DSDT and ours
SLEEP_TYPE_SUSPEND = 1  # S3


class AcpiPmControlState(Record):
    VERSION: ClassVar[int] = 1
    value: int = bounded(0, U16)


class AcpiPmControl:
    """PM1a_CNT: calls ``on_power_off()`` on S5 and ``on_suspend()`` on S3.

    Both run with the device lock held: they must not call back into this
    device.  SLP_EN is write-only: it reads 0 and is not kept.
    """

    # Only the guest calls it: no host thread does (see Bus.register, only_caller).
    HOST_ENTRY_POINTS: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self, on_power_off: Callable[[], None], on_suspend: Callable[[], None] | None = None
    ) -> None:
        self.on_power_off = on_power_off
        self.on_suspend = on_suspend
        self.value = 0
        self.ignored_accesses = 0

    def read(self, offset: int, size: int) -> int:
        if not access_fits(offset, size, PM1A_CNT_PORTS):
            self.ignored_accesses += 1
            return all_ones(size)
        return (self.value >> (8 * offset)) & ((1 << (8 * size)) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        if not access_fits(offset, size, PM1A_CNT_PORTS):
            self.ignored_accesses += 1
            return
        shift = 8 * offset
        mask = ((1 << (8 * size)) - 1) << shift
        written = (self.value & ~mask) | ((value << shift) & mask & 0xFFFF)
        self.value = written & ~SLP_EN
        if not written & SLP_EN:
            return
        sleep_type = (written & SLP_TYP_MASK) >> SLP_TYP_SHIFT
        if sleep_type == SLEEP_TYPE_SOFT_OFF:
            self.on_power_off()
        elif sleep_type == SLEEP_TYPE_SUSPEND and self.on_suspend is not None:
            self.on_suspend()

    def reset(self) -> None:
        self.value = 0

    def state(self) -> AcpiPmControlState:
        return AcpiPmControlState(self.value)

    def restore(self, state: AcpiPmControlState) -> None:
        self.value = check_state("acpi_pm", state, AcpiPmControlState).value & ~SLP_EN


PM1A_EVT_PORT = 0x600
PM1A_EVT_PORTS = 4

TMR_STS = 1 << 0
PWRBTN_STS = 1 << 8
RTC_STS = 1 << 10
WAK_STS = 1 << 15
TMR_EN = TMR_STS
PWRBTN_EN = PWRBTN_STS
RTC_EN = RTC_STS
STATUS_BITS = TMR_STS | PWRBTN_STS | RTC_STS | WAK_STS
ENABLE_BITS = TMR_EN | PWRBTN_EN | RTC_EN

PM_TIMER_PORT = 0x608
PM_TIMER_PORTS = 4
PM_TIMER_HZ = 3_579_545
PM_TIMER_BITS = 24
PM_TIMER_MASK = (1 << PM_TIMER_BITS) - 1
NS = 1_000_000_000


def pm_timer_count(clock_ns: int) -> int:
    """The PM timer's full (unwrapped) count at host monotonic time ``clock_ns``."""
    return clock_ns * PM_TIMER_HZ // NS


def _timer_epoch(clock_ns: int) -> int:
    """How many times bit 23 of the count has changed: TMR_STS's clock."""
    return pm_timer_count(clock_ns) >> (PM_TIMER_BITS - 1)


class AcpiPmEventState(Record):
    VERSION: ClassVar[int] = 2
    registers: bytes = bounded(0, U8, length=PM1A_EVT_PORTS)
    timer_status: bool = boolean()  # TMR_STS: the count's bit 23 changed since cleared


class AcpiPmEvent:
    """PM1a_EVT: the status (offset 0) and enable (offset 2) registers the FADT names.

    ``registers`` holds them little-endian, TMR_STS aside.  ``irq`` is the
    SCI; ``clock`` (ns, monotonic) must be the PM timer's, for TMR_STS.

    Host entry points (under the device lock): ``raise_status`` (an RTC
    alarm, the power button, a wake-up), ``status`` and ``enable``.
    """

    def __init__(
        self, irq: IrqCallback = no_irq, clock: Callable[[], int] = time.monotonic_ns
    ) -> None:
        self._sci = irq
        self._clock = clock
        self.registers = bytearray(PM1A_EVT_PORTS)
        self._timer_epoch = _timer_epoch(clock())
        self._sci_level = False
        self.ignored_accesses = 0

    @property
    def status(self) -> int:
        value = self.registers[0] | self.registers[1] << 8
        if _timer_epoch(self._clock()) != self._timer_epoch:
            value |= TMR_STS
        return value

    @property
    def enable(self) -> int:
        return self.registers[2] | self.registers[3] << 8

    def raise_status(self, bits: int) -> None:
        """The host sets status ``bits`` (RTC_STS, WAK_STS, PWRBTN_STS) and updates the SCI."""
        value = (self.registers[0] | self.registers[1] << 8 | bits) & STATUS_BITS & ~TMR_STS
        self.registers[0:2] = value.to_bytes(2, "little")
        self._update_sci()

    def read(self, offset: int, size: int) -> int:
        if not access_fits(offset, size, PM1A_EVT_PORTS):
            self.ignored_accesses += 1
            return all_ones(size)
        word = self.status | self.enable << 16
        return (word >> (8 * offset)) & ((1 << (8 * min(size, PM1A_EVT_PORTS - offset))) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        if not access_fits(offset, size, PM1A_EVT_PORTS):
            self.ignored_accesses += 1
            return
        for i, byte in enumerate((value & all_ones(size)).to_bytes(size, "little")):
            at = offset + i
            if at < 2:
                if at == 0 and byte & TMR_STS:
                    self._timer_epoch = _timer_epoch(self._clock())
                self.registers[at] &= ~byte & 0xFF  # write 1 to clear
            elif at < PM1A_EVT_PORTS:
                self.registers[at] = byte
        self._update_sci()

    def reset(self) -> None:
        self.registers[:] = bytes(PM1A_EVT_PORTS)
        self._timer_epoch = _timer_epoch(self._clock())
        self._update_sci()

    def state(self) -> AcpiPmEventState:
        return AcpiPmEventState(bytes(self.registers), bool(self.status & TMR_STS))

    def restore(self, state: AcpiPmEventState) -> None:
        checked = check_state("acpi_events", state, AcpiPmEventState)
        self.registers[:] = checked.registers
        self.registers[0] &= ~TMR_STS & 0xFF  # TMR_STS lives in the epoch
        epoch = _timer_epoch(self._clock())
        self._timer_epoch = epoch - 1 if checked.timer_status else epoch
        # The line's level is the irqchip's to restore: only remember it.
        self._sci_level = bool(self.status & self.enable & (PWRBTN_STS | RTC_STS))

    def _update_sci(self) -> None:
        # TMR_STS is only known when read; the timer's SCI is not raised by itself.
        level = bool(self.status & self.enable & (PWRBTN_STS | RTC_STS))
        if level != self._sci_level:
            self._sci_level = level
            self._sci(level)


class AcpiPmTimer(Stateless):
    """The PM timer at PM base + 8: reads the 24-bit count, ignores writes.

    Its count is host time, so it has no state of its own to save.
    """

    # Only the guest calls it: no host thread does (see Bus.register, only_caller).
    HOST_ENTRY_POINTS: ClassVar[tuple[str, ...]] = ()

    def __init__(self, clock: Callable[[], int] = time.monotonic_ns) -> None:
        self._clock = clock
        self.ignored_accesses = 0

    def read(self, offset: int, size: int) -> int:
        if not access_fits(offset, size, PM_TIMER_PORTS):
            self.ignored_accesses += 1
            return all_ones(size)
        count = pm_timer_count(self._clock()) & PM_TIMER_MASK
        return (count >> (8 * offset)) & ((1 << (8 * size)) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        if not access_fits(offset, size, PM_TIMER_PORTS):
            self.ignored_accesses += 1
        # A read-only register: what fits is dropped too.
