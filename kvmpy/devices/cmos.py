"""The PC's MC146818 real-time clock and its 128 bytes of CMOS memory.

Map at :data:`CMOS_PORT` with :data:`CMOS_PORTS` ports: the guest writes a
register number to 0x70 (bit 7 is the NMI-disable gate of a real PC and is
ignored here) and reads or writes it through 0x71.  Reading 0x70 returns
0xff, as in QEMU.  Wider accesses are split into byte accesses at
consecutive ports, so a 16-bit write to 0x70 selects and writes in one go.

The clock is not stored: while it runs, the time registers are computed from
``clock()`` (seconds since the epoch, UTC) plus an offset that the guest
changes by setting the time.  Setting it works as on the chip: set SET in
register B (the registers freeze), write them, clear SET and the clock
starts from the written time, read in the format (BCD/binary, 12/24-hour)
register B had while SET was set, as QEMU does; holding the divider in reset (register A bits
4-6 = 11x) also stops it, and releasing it starts the first second half a
second later.  A time register written while the clock runs takes effect at
once.  Day of week is derived from the date and never set on its own.

Register C's flags are computed lazily, when a register is accessed or
:meth:`Cmos.poll` runs: UF at every second boundary the running clock
crossed, AF at one whose time matched the alarm registers (0xc0-0xff in an
alarm register matches anything) and PF at the rate register A selects.
As in QEMU, PF only counts while PIE is set.  IRQF and the ``irq`` line are
high while a flag and its enable bit in register B are both set; reading
register C clears the flags and lowers the line.  Without a host timer
nobody notices an event while the guest is not touching the RTC, so a
machine that wants RTC interrupts delivered while the guest waits calls
:meth:`Cmos.poll`, which returns when the next enabled event is due.

Memory-size bytes are filled in like QEMU's ``pc_cmos_init`` (in KiB or
64 KiB blocks, see :class:`Cmos`); all other bytes from 0x0e up are plain
battery-backed RAM, except the century at 0x32 (and its PS/2 alias 0x37).
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from typing import ClassVar

from kvmpy.records import Record

from .base import (
    U8,
    IrqCallback,
    access_fits,
    all_ones,
    bounded,
    check_state,
    flags,
    no_irq,
)

CMOS_PORT = 0x70
CMOS_PORTS = 2
INDEX_PORT = 0  # offsets from CMOS_PORT
DATA_PORT = 1
NMI_DISABLE = 0x80  # bit 7 of the index: not part of the register number
CMOS_SIZE = 128
INDEX_MASK = CMOS_SIZE - 1

# Clock, alarm and calendar registers.
RTC_SECONDS = 0x00
RTC_SECONDS_ALARM = 0x01
RTC_MINUTES = 0x02
RTC_MINUTES_ALARM = 0x03
RTC_HOURS = 0x04
RTC_HOURS_ALARM = 0x05
RTC_DAY_OF_WEEK = 0x06  # 1 = Sunday
RTC_DAY_OF_MONTH = 0x07
RTC_MONTH = 0x08
RTC_YEAR = 0x09  # year within the century
RTC_REG_A = 0x0A
RTC_REG_B = 0x0B
RTC_REG_C = 0x0C
RTC_REG_D = 0x0D
RTC_SHUTDOWN_STATUS = 0x0F
RTC_CENTURY = 0x32
RTC_PS2_CENTURY = 0x37  # IBM PS/2's century location; QEMU aliases it to 0x32
TIME_REGISTERS = frozenset(
    (
        RTC_SECONDS,
        RTC_MINUTES,
        RTC_HOURS,
        RTC_DAY_OF_WEEK,
        RTC_DAY_OF_MONTH,
        RTC_MONTH,
        RTC_YEAR,
        RTC_CENTURY,
    )
)

# Register A.
REG_A_UIP = 0x80  # update in progress (read-only)
REG_A_DIVIDER = 0x70  # 010: 32.768 kHz time base
REG_A_DIVIDER_RESET = 0x60  # both bits set: divider chain held in reset
REG_A_DIVIDER_RUNNING = 0x20  # dividers 000-010 keep the clock running, as in QEMU
REG_A_RATE = 0x0F  # periodic interrupt rate select
REG_A_DEFAULT = 0x26  # 32.768 kHz, 1024 Hz periodic rate

# Register B.
REG_B_SET = 0x80  # freeze the clock so the time can be set
REG_B_PIE = 0x40
REG_B_AIE = 0x20
REG_B_UIE = 0x10
REG_B_SQWE = 0x08
REG_B_DM = 0x04  # binary (1) or BCD (0) time registers
REG_B_24H = 0x02
REG_B_DSE = 0x01  # daylight saving: stored, never applied
REG_B_DEFAULT = REG_B_24H  # BCD, 24-hour, like QEMU

# Register C (read-only; reading clears it) and D.
REG_C_IRQF = 0x80
REG_C_PF = 0x40
REG_C_AF = 0x20
REG_C_UF = 0x10
REG_C_FLAGS = REG_C_PF | REG_C_AF | REG_C_UF  # aligned with their enables in B
REG_D_VRT = 0x80  # valid RAM and time: the battery is fine

HOURS_PM = 0x80  # in 12-hour mode
ALARM_DONT_CARE = 0xC0  # alarm register values at or above this match anything

RTC_CLOCK_HZ = 32768
NS = 1_000_000_000
UIP_HOLD_NS = 8 * NS // RTC_CLOCK_HZ  # UIP rises 244 us before each update
SECONDS_PER_DAY = 86400

# Memory-size bytes written by QEMU's pc_cmos_init, low byte first.
CMOS_EQUIPMENT = 0x14
EQUIPMENT_FPU = 0x02
CMOS_BASE_MEMORY = 0x15  # KiB below 1 MiB, at most 640
CMOS_EXTENDED_MEMORY = 0x17  # KiB above 1 MiB, at most 0xffff
CMOS_EXTENDED_MEMORY_COPY = 0x30  # the same value again
CMOS_MEMORY_ABOVE_16M = 0x34  # 64 KiB blocks between 16 MiB and 4 GiB, at most 0xffff
CMOS_MEMORY_ABOVE_4G = 0x5B  # 3 bytes: 64 KiB blocks above 4 GiB
CMOS_CPU_COUNT = 0x5F  # vCPUs minus one
KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
# QEMU's CMOS reports all 640 KiB; the BDA (kvmpy/x86/bios.py) reports 639, less the EBDA.
CMOS_BASE_MEMORY_KIB = 640
MAX_CMOS_CPUS = 0xFF  # more and QEMU writes 0 so that firmware must use fw_cfg

_EPOCH_ORDINAL = datetime.date(1970, 1, 1).toordinal()
# Host times, in ns: far beyond any real date.
NS_LOW = -(1 << 63)
NS_HIGH = (1 << 63) - 1
# The guest clock's offset from host time, in ns: a guest may set any date of
# years 1-9999 (and more through day and month overflow), about 2**68 ns away.
OFFSET_LIMIT = 1 << 72


class CmosState(Record):
    """The CMOS RAM (with the stopped clock's registers) and the clock's bookkeeping.

    ``offset`` is the guest time minus the host time, ``checked`` the host
    time up to which register C is computed and ``periodic_start`` the host
    time the periodic interrupt counts from, all in ns on ``clock``'s scale.
    """

    VERSION: ClassVar[int] = 1
    ram: bytes = bounded(0, U8, length=CMOS_SIZE)
    index: int = bounded(0, INDEX_MASK)
    offset: int = bounded(-OFFSET_LIMIT, OFFSET_LIMIT)
    flags: int = flags(REG_C_FLAGS)
    checked: int = bounded(NS_LOW, NS_HIGH)
    periodic_start: int = bounded(NS_LOW, NS_HIGH)


def _days_since_epoch(year: int, month: int, day: int) -> int:
    """Days from 1970-01-01 to the given date, which need not be valid.

    Months outside 1-12 roll into neighbouring years and days past the end of
    a month into the next, like mktime; years are clamped to 1-9999.
    """
    year += (month - 1) // 12
    month = (month - 1) % 12 + 1
    year = min(max(year, datetime.MINYEAR), datetime.MAXYEAR)
    return datetime.date(year, month, 1).toordinal() - _EPOCH_ORDINAL + day - 1


class Cmos:
    """The RTC and CMOS RAM, mapped at :data:`CMOS_PORT` with :data:`CMOS_PORTS` ports.

    ``low_ram`` is the guest RAM below 4 GiB and ``high_ram`` the RAM above
    it, in bytes; they fill in 0x15-0x18, 0x30-0x31, 0x34-0x35 and 0x5b-0x5d
    as QEMU's ``pc_cmos_init`` does (values that do not fit saturate).  0x5f
    holds ``cpus`` - 1 (0 above 255 CPUs, as in QEMU) and 0x14 says an FPU is
    present.  ``clock`` gives the host time in seconds since the epoch (UTC)
    and ``irq`` is driven with the level of the RTC interrupt (IRQ 8), only
    when it changes.  Callbacks run under the device lock.

    An access outside the two ports, or wider than 8 bytes, reads all ones,
    is not written and is counted in ``ignored_accesses``.

    Host entry points (take the device lock): :meth:`poll` (the RTC timer
    thread), :meth:`alarm_wakes` (a sleeping machine's wake check) and
    ``irq_level``.
    """

    def __init__(
        self,
        *,
        low_ram: int,
        high_ram: int = 0,
        cpus: int = 1,
        clock: Callable[[], float] = time.time,
        irq: IrqCallback = no_irq,
    ) -> None:
        if not 0 <= low_ram <= 4 * GiB:
            raise ValueError(f"low_ram {low_ram:#x} must be between 0 and 4 GiB")
        if high_ram < 0:
            raise ValueError("high_ram must not be negative")
        if cpus < 1:
            raise ValueError("need at least one CPU")
        self._clock = clock
        self._irq = irq
        self.ignored_accesses = 0
        self._ram = bytearray(CMOS_SIZE)
        self._index = 0
        self._offset = 0  # guest RTC time minus host time, in ns
        self._flags = 0  # register C's PF/AF/UF
        self._irq_level = False
        now = self._now()
        self._checked = now  # host time up to which flags are computed
        self._periodic_start = now  # periodic ticks count from here
        self._ram[RTC_REG_A] = REG_A_DEFAULT
        self._ram[RTC_REG_B] = REG_B_DEFAULT
        self._ram[CMOS_EQUIPMENT] = EQUIPMENT_FPU
        self._put(CMOS_BASE_MEMORY, 2, min(low_ram // KiB, CMOS_BASE_MEMORY_KIB))
        extended = min(max(low_ram - MiB, 0) // KiB, 0xFFFF)
        self._put(CMOS_EXTENDED_MEMORY, 2, extended)
        self._put(CMOS_EXTENDED_MEMORY_COPY, 2, extended)
        self._put(CMOS_MEMORY_ABOVE_16M, 2, min(max(low_ram - 16 * MiB, 0) // (64 * KiB), 0xFFFF))
        self._put(CMOS_MEMORY_ABOVE_4G, 3, min(high_ram // (64 * KiB), 0xFFFFFF))
        self._ram[CMOS_CPU_COUNT] = cpus - 1 if cpus <= MAX_CMOS_CPUS else 0
        self._power_on_ram = bytes(self._ram)

    def _put(self, index: int, size: int, value: int) -> None:
        self._ram[index : index + size] = value.to_bytes(size, "little")

    def _now(self) -> int:
        return round(self._clock() * NS)

    # Host side ------------------------------------------------------------

    def poll(self) -> float | None:
        """Bring register C up to date and drive the IRQ line accordingly.

        Returns the host time (on ``clock``'s scale) at which the next enabled
        interrupt source fires, or None when none is enabled, so a machine can
        arm a timer and call again then.
        """
        now = self._now()
        self._advance(now)
        self._update_irq()
        due = self._next_due(now)
        return None if due is None else due / NS

    def alarm_wakes(self) -> bool:
        """Whether the alarm has fired with its interrupt enabled: a wake-up from S3, as in QEMU.

        A host entry point: call it under the device lock.
        """
        self._advance(self._now())
        return bool(self._flags & REG_C_AF and self._ram[RTC_REG_B] & REG_B_AIE)

    def reset(self) -> None:
        """Back to the power-on state: the RAM as built, the clock on host time.

        Unlike a PC's battery-backed chip (and QEMU's reset), nothing the guest
        wrote survives: a machine reset leaves nothing of the old guest.
        """
        now = self._now()
        self._ram[:] = self._power_on_ram
        self._index = 0
        self._offset = 0
        self._flags = 0
        self._checked = now
        self._periodic_start = now
        self._update_irq()

    def state(self) -> CmosState:
        return CmosState(
            ram=bytes(self._ram),
            index=self._index,
            offset=self._offset,
            flags=self._flags,
            checked=self._checked,
            periodic_start=self._periodic_start,
        )

    def restore(self, state: CmosState) -> None:
        """Take ``state``; the interrupt level it implies is taken as already driven."""
        state = check_state("cmos", state, CmosState)
        self._ram[:] = state.ram
        self._index = state.index
        self._offset = state.offset
        self._flags = state.flags
        self._checked = state.checked
        self._periodic_start = state.periodic_start
        self._irq_level = bool(self._flags & self._ram[RTC_REG_B] & REG_C_FLAGS)

    @property
    def irq_level(self) -> bool:
        """The level last driven on the ``irq`` callback."""
        return self._irq_level

    # Guest side -----------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        if not access_fits(offset, size, CMOS_PORTS):
            self.ignored_accesses += 1
            return all_ones(size)
        now = self._now()
        self._advance(now)
        value = 0
        for i in range(size):
            value |= self._read_port(offset + i, now) << (8 * i)
        self._update_irq()
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        if not access_fits(offset, size, CMOS_PORTS):
            self.ignored_accesses += 1
            return
        now = self._now()
        self._advance(now)
        for i in range(size):
            self._write_port(offset + i, (value >> (8 * i)) & 0xFF, now)
        self._update_irq()

    def _read_port(self, port: int, now: int) -> int:
        if port != DATA_PORT:
            return 0xFF  # the index register is write-only
        index = RTC_CENTURY if self._index == RTC_PS2_CENTURY else self._index
        if index in TIME_REGISTERS and self._running():
            return self._clock_registers(now)[index]
        if index == RTC_REG_A:
            return self._ram[RTC_REG_A] | (REG_A_UIP if self._update_in_progress(now) else 0)
        if index == RTC_REG_C:
            value = self._flags
            if self._flags & self._ram[RTC_REG_B] & REG_C_FLAGS:
                value |= REG_C_IRQF
            self._flags = 0
            return value
        if index == RTC_REG_D:
            return REG_D_VRT
        return self._ram[index]

    def _write_port(self, port: int, value: int, now: int) -> None:
        if port == INDEX_PORT:
            self._index = value & INDEX_MASK
        elif port == DATA_PORT:
            self._write_data(value, now)

    def _write_data(self, value: int, now: int) -> None:
        index = RTC_CENTURY if self._index == RTC_PS2_CENTURY else self._index
        if index in TIME_REGISTERS:
            if self._running():
                # Change one field now, keeping the others and the phase of the second.
                phase = (now + self._offset) % NS
                self._latch(now)
                self._ram[index] = value
                self._start(now, phase)
            else:
                self._ram[index] = value
        elif index == RTC_REG_A:
            self._write_a(value, now)
        elif index == RTC_REG_B:
            self._write_b(value, now)
        elif index not in (RTC_REG_C, RTC_REG_D):  # C and D are read-only
            self._ram[index] = value

    def _write_a(self, value: int, now: int) -> None:
        old = self._ram[RTC_REG_A]
        new = value & ~REG_A_UIP
        was_running = self._running()
        if was_running and not self._runs_with(new, self._ram[RTC_REG_B]):
            self._latch(now)
        self._ram[RTC_REG_A] = new
        if not was_running and self._running():
            if old & REG_A_DIVIDER_RESET == REG_A_DIVIDER_RESET:
                phase = NS // 2  # the first update comes half a second after the reset ends
            else:
                phase = (now + self._offset) % NS
            self._start(now, phase)
        if (old ^ new) & REG_A_RATE:
            self._periodic_start = now

    def _write_b(self, value: int, now: int) -> None:
        old = self._ram[RTC_REG_B]
        if value & REG_B_SET:
            value &= ~REG_B_UIE  # setting SET clears UIE, per the datasheet
        was_running = self._running()
        will_run = self._runs_with(self._ram[RTC_REG_A], value)
        # Both use the old format, the one the guest read or wrote the registers
        # in, so a write that also changes DM or 24H applies to the running clock.
        if was_running and not will_run:
            self._latch(now)
        elif will_run and not was_running:
            self._start(now, (now + self._offset) % NS)
        self._ram[RTC_REG_B] = value
        if (old ^ value) & REG_B_PIE:
            self._periodic_start = now

    # The clock --------------------------------------------------------------

    @staticmethod
    def _runs_with(reg_a: int, reg_b: int) -> bool:
        return not reg_b & REG_B_SET and reg_a & REG_A_DIVIDER <= REG_A_DIVIDER_RUNNING

    def _running(self) -> bool:
        return self._runs_with(self._ram[RTC_REG_A], self._ram[RTC_REG_B])

    def _update_in_progress(self, now: int) -> bool:
        return self._running() and (now + self._offset) % NS >= NS - UIP_HOLD_NS

    def _to_register(self, value: int) -> int:
        if self._ram[RTC_REG_B] & REG_B_DM:
            return value & 0xFF
        return ((value // 10) << 4 | value % 10) & 0xFF

    def _from_register(self, value: int) -> int:
        if self._ram[RTC_REG_B] & REG_B_DM:
            return value
        return (value >> 4) * 10 + (value & 0x0F)

    def _encode_hour(self, hour: int) -> int:
        if self._ram[RTC_REG_B] & REG_B_24H:
            return self._to_register(hour)
        value = self._to_register(hour % 12 or 12)
        return value | HOURS_PM if hour >= 12 else value

    def _decode_hour(self, value: int) -> int:
        if self._ram[RTC_REG_B] & REG_B_24H:
            return self._from_register(value)
        hour = self._from_register(value & ~HOURS_PM) % 12
        return hour + 12 if value & HOURS_PM else hour

    def _clock_registers(self, now: int) -> dict[int, int]:
        """The time registers for the running clock at host time ``now``."""
        tm = time.gmtime((now + self._offset) // NS)
        return {
            RTC_SECONDS: self._to_register(tm.tm_sec),
            RTC_MINUTES: self._to_register(tm.tm_min),
            RTC_HOURS: self._encode_hour(tm.tm_hour),
            RTC_DAY_OF_WEEK: self._to_register((tm.tm_wday + 1) % 7 + 1),  # tm: Monday = 0
            RTC_DAY_OF_MONTH: self._to_register(tm.tm_mday),
            RTC_MONTH: self._to_register(tm.tm_mon),
            RTC_YEAR: self._to_register(tm.tm_year % 100),
            RTC_CENTURY: self._to_register(tm.tm_year // 100),
        }

    def _latch(self, now: int) -> None:
        """Store the running time in the registers, which then hold still."""
        for index, value in self._clock_registers(now).items():
            self._ram[index] = value

    def _start(self, now: int, phase: int) -> None:
        """Run the clock from the time in the registers, ``phase`` ns into its second."""
        ram = self._ram
        year = self._from_register(ram[RTC_YEAR]) + 100 * self._from_register(ram[RTC_CENTURY])
        days = _days_since_epoch(
            year, self._from_register(ram[RTC_MONTH]), self._from_register(ram[RTC_DAY_OF_MONTH])
        )
        seconds = (
            days * SECONDS_PER_DAY
            + self._decode_hour(ram[RTC_HOURS]) * 3600
            + self._from_register(ram[RTC_MINUTES]) * 60
            + self._from_register(ram[RTC_SECONDS])
        )
        self._offset = seconds * NS + phase - now

    # Interrupt flags ----------------------------------------------------------

    def _periodic_ticks(self) -> int:
        """The periodic interrupt period in 32.768 kHz ticks, 0 when it is off."""
        rate = self._ram[RTC_REG_A] & REG_A_RATE
        if not rate or not self._ram[RTC_REG_B] & REG_B_PIE:
            return 0
        if rate <= 2:
            rate += 7  # rates 1 and 2 repeat 8 and 9 with a 32.768 kHz time base
        return 1 << (rate - 1)

    def _ticks(self, now: int) -> int:
        return (now - self._periodic_start) * RTC_CLOCK_HZ // NS

    def _advance(self, now: int) -> None:
        """Set the flags for every event between the last check and ``now``."""
        last, self._checked = self._checked, now
        if now <= last:
            return
        if self._running():
            before = (last + self._offset) // NS
            after = (now + self._offset) // NS
            if after > before:
                self._flags |= REG_C_UF
                alarm = self._next_alarm(before)
                if alarm is not None and alarm <= after:
                    self._flags |= REG_C_AF
        period = self._periodic_ticks()
        if period and self._ticks(now) // period > self._ticks(last) // period:
            self._flags |= REG_C_PF

    def _alarm_values(self, index: int, limit: int, hours: bool) -> range | None:
        """The values alarm register ``index`` matches, or None if it never matches."""
        value = self._ram[index]
        if value >= ALARM_DONT_CARE:
            return range(limit)
        if hours and not self._ram[RTC_REG_B] & REG_B_24H:
            if not 1 <= self._from_register(value & ~HOURS_PM) <= 12:
                return None
            decoded = self._decode_hour(value)
        else:
            decoded = self._from_register(value)
        return range(decoded, decoded + 1) if decoded < limit else None

    def _next_alarm(self, after: int) -> int | None:
        """The first guest second after ``after`` whose time matches the alarm."""
        hours = self._alarm_values(RTC_HOURS_ALARM, 24, True)
        minutes = self._alarm_values(RTC_MINUTES_ALARM, 60, False)
        seconds = self._alarm_values(RTC_SECONDS_ALARM, 60, False)
        if hours is None or minutes is None or seconds is None:
            return None
        day, second_of_day = divmod(after, SECONDS_PER_DAY)
        minute_of_day, second = divmod(second_of_day, 60)
        current = (*divmod(minute_of_day, 60), second)
        for h in hours:
            if h < current[0]:
                continue
            for m in minutes:
                if (h, m) < current[:2]:
                    continue
                for s in seconds:
                    if (h, m, s) > current:
                        return day * SECONDS_PER_DAY + h * 3600 + m * 60 + s
        return (day + 1) * SECONDS_PER_DAY + hours[0] * 3600 + minutes[0] * 60 + seconds[0]

    def _next_due(self, now: int) -> int | None:
        """Host time of the next event whose interrupt is enabled."""
        enables = self._ram[RTC_REG_B]
        candidates: list[int] = []
        period = self._periodic_ticks()
        if period:
            tick = (self._ticks(now) // period + 1) * period
            candidates.append(self._periodic_start - (-tick * NS // RTC_CLOCK_HZ))
        if self._running():
            guest_second = (now + self._offset) // NS
            if enables & REG_B_UIE:
                candidates.append((guest_second + 1) * NS - self._offset)
            if enables & REG_B_AIE:
                alarm = self._next_alarm(guest_second)
                if alarm is not None:
                    candidates.append(alarm * NS - self._offset)
        return min(candidates, default=None)

    def _update_irq(self) -> None:
        level = bool(self._flags & self._ram[RTC_REG_B] & REG_C_FLAGS)
        if level != self._irq_level:
            self._irq_level = level
            self._irq(level)
