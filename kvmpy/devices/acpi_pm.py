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
"""

from __future__ import annotations

import time
from collections.abc import Callable

from kvmpy.devices.base import IrqCallback, no_irq

PM1A_CNT_PORT = 0x604
PM1A_CNT_PORTS = 2

SCI_EN = 1 << 0
SLP_TYP_SHIFT = 10
SLP_TYP_MASK = 0x7 << SLP_TYP_SHIFT
SLP_EN = 1 << 13
SLEEP_TYPE_SOFT_OFF = 0  # S5 in QEMU's DSDT and ours
SLEEP_TYPE_SUSPEND = 1  # S3


class AcpiPmControl:
    """PM1a_CNT: calls ``on_power_off()`` on S5 and ``on_suspend()`` on S3."""

    def __init__(
        self, on_power_off: Callable[[], None], on_suspend: Callable[[], None] | None = None
    ) -> None:
        self.on_power_off = on_power_off
        self.on_suspend = on_suspend
        self.value = 0

    def read(self, offset: int, size: int) -> int:
        # SLP_EN is write-only and always reads as 0.
        return ((self.value & ~SLP_EN) >> (8 * offset)) & ((1 << (8 * size)) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        shift = 8 * offset
        mask = ((1 << (8 * size)) - 1) << shift
        self.value = (self.value & ~mask) | ((value << shift) & mask & 0xFFFF)
        if not self.value & SLP_EN:
            return
        self.value &= ~SLP_EN
        sleep_type = (self.value & SLP_TYP_MASK) >> SLP_TYP_SHIFT
        if sleep_type == SLEEP_TYPE_SOFT_OFF:
            self.on_power_off()
        elif sleep_type == SLEEP_TYPE_SUSPEND and self.on_suspend is not None:
            self.on_suspend()

    def reset(self) -> None:
        self.value = 0


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


class AcpiPmEvent:
    """PM1a_EVT: the status (offset 0) and enable (offset 2) registers the FADT names.

    ``registers`` holds them little-endian.  Status bits are set by the host
    (``raise_status``) and cleared by the guest writing 1s.  ``irq`` is the
    SCI; ``clock`` (ns, monotonic) must be the PM timer's, for TMR_STS.
    """

    SNAPSHOT_EXCLUDE = ("_sci",)

    def __init__(
        self, irq: IrqCallback = no_irq, clock: Callable[[], int] = time.monotonic_ns
    ) -> None:
        self._sci = irq
        self.clock = clock
        self.registers = bytearray(4)
        self.timer_epoch = pm_timer_count(clock()) >> (PM_TIMER_BITS - 1)
        self.sci_level = False

    @property
    def status(self) -> int:
        value = self.registers[0] | self.registers[1] << 8
        if pm_timer_count(self.clock()) >> (PM_TIMER_BITS - 1) != self.timer_epoch:
            value |= TMR_STS
        return value

    @property
    def enable(self) -> int:
        return self.registers[2] | self.registers[3] << 8

    def raise_status(self, bits: int) -> None:
        """The host sets status ``bits`` (RTC_STS, WAK_STS, PWRBTN_STS) and updates the SCI."""
        value = (self.registers[0] | self.registers[1] << 8 | bits) & STATUS_BITS
        self.registers[0:2] = value.to_bytes(2, "little")
        self._update_sci()

    def read(self, offset: int, size: int) -> int:
        word = self.status | self.enable << 16
        return (word >> (8 * offset)) & ((1 << (8 * size)) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        for i, byte in enumerate(value.to_bytes(size, "little")):
            at = offset + i
            if at < 2:
                if at == 0 and byte & TMR_STS:
                    self.timer_epoch = pm_timer_count(self.clock()) >> (PM_TIMER_BITS - 1)
                self.registers[at] &= ~byte & 0xFF  # write 1 to clear
            elif at < 4:
                self.registers[at] = byte
        self._update_sci()

    def reset(self) -> None:
        self.registers[:] = bytes(4)
        self.timer_epoch = pm_timer_count(self.clock()) >> (PM_TIMER_BITS - 1)
        self._update_sci()

    def _update_sci(self) -> None:
        # TMR_STS is only known when read; the timer's SCI is not raised by itself.
        level = bool(self.status & self.enable & (PWRBTN_STS | RTC_STS))
        if level != self.sci_level:
            self.sci_level = level
            self._sci(level)


class AcpiPmTimer:
    """The PM timer at PM base + 8: reads the 24-bit count, ignores writes."""

    def __init__(self, clock: Callable[[], int] = time.monotonic_ns) -> None:
        self.clock = clock

    def read(self, offset: int, size: int) -> int:
        count = pm_timer_count(self.clock()) & PM_TIMER_MASK
        return (count >> (8 * offset)) & ((1 << (8 * size)) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        return None
