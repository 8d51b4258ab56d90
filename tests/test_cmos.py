"""Unit tests for the MC146818 RTC / CMOS model (no /dev/kvm needed)."""

from __future__ import annotations

import calendar

import pytest

from kvmpy.devices.base import Device
from kvmpy.devices.cmos import (
    CMOS_PORTS,
    NMI_DISABLE,
    REG_A_UIP,
    REG_B_24H,
    REG_B_AIE,
    REG_B_DM,
    REG_B_PIE,
    REG_B_SET,
    REG_B_UIE,
    REG_C_AF,
    REG_C_IRQF,
    REG_C_PF,
    REG_C_UF,
    RTC_CENTURY,
    RTC_DAY_OF_MONTH,
    RTC_DAY_OF_WEEK,
    RTC_HOURS,
    RTC_HOURS_ALARM,
    RTC_MINUTES,
    RTC_MINUTES_ALARM,
    RTC_MONTH,
    RTC_PS2_CENTURY,
    RTC_REG_A,
    RTC_REG_B,
    RTC_REG_C,
    RTC_REG_D,
    RTC_SECONDS,
    RTC_SECONDS_ALARM,
    RTC_YEAR,
    Cmos,
)

MiB = 1024 * 1024
GiB = 1024 * MiB
INDEX = 0
DATA = 1
# Thursday 2024-02-29 13:45:07 UTC.
T0 = float(calendar.timegm((2024, 2, 29, 13, 45, 7)))
TIME_REGS = (
    RTC_SECONDS,
    RTC_MINUTES,
    RTC_HOURS,
    RTC_DAY_OF_WEEK,
    RTC_DAY_OF_MONTH,
    RTC_MONTH,
    RTC_YEAR,
    RTC_CENTURY,
)


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Harness:
    def __init__(self, now: float = T0, **kwargs: int) -> None:
        self.clock = FakeClock(now)
        self.irqs: list[bool] = []
        kwargs.setdefault("low_ram", 128 * MiB)
        self.cmos = Cmos(clock=self.clock, irq=self.irqs.append, **kwargs)

    def rd(self, index: int) -> int:
        self.cmos.write(INDEX, 1, index)
        return self.cmos.read(DATA, 1)

    def wr(self, index: int, value: int) -> None:
        self.cmos.write(INDEX, 1, index)
        self.cmos.write(DATA, 1, value)

    def time_regs(self) -> list[int]:
        return [self.rd(index) for index in TIME_REGS]

    def word(self, index: int) -> int:
        return self.rd(index) | self.rd(index + 1) << 8


@pytest.fixture
def h() -> Harness:
    return Harness()


# Time of day ----------------------------------------------------------------


def test_power_on_time_is_bcd_24_hour(h: Harness) -> None:
    #                       sec   min   hour  dow   day   mon   year  century
    assert h.time_regs() == [0x07, 0x45, 0x13, 0x05, 0x29, 0x02, 0x24, 0x20]


def test_binary_mode(h: Harness) -> None:
    h.wr(RTC_REG_B, REG_B_24H | REG_B_DM)
    assert h.time_regs() == [7, 45, 13, 5, 29, 2, 24, 20]


def test_time_follows_the_clock(h: Harness) -> None:
    h.clock.now += 61.5
    assert h.time_regs()[:3] == [0x08, 0x46, 0x13]
    h.clock.now += 10 * 3600
    assert h.time_regs() == [0x08, 0x46, 0x23, 0x05, 0x29, 0x02, 0x24, 0x20]
    h.clock.now += 3600  # into Friday, March 1st
    assert h.time_regs() == [0x08, 0x46, 0x00, 0x06, 0x01, 0x03, 0x24, 0x20]


def test_sunday_is_day_one() -> None:
    h = Harness(now=calendar.timegm((2024, 3, 3, 0, 0, 0)))
    assert h.rd(RTC_DAY_OF_WEEK) == 1


@pytest.mark.parametrize(
    ("hour", "bcd", "binary"),
    [
        (0, 0x12, 12),
        (1, 0x01, 1),
        (11, 0x11, 11),
        (12, 0x92, 0x8C),
        (13, 0x81, 0x81),
        (23, 0x91, 0x8B),
    ],
)
def test_12_hour_mode_sets_the_pm_bit(hour: int, bcd: int, binary: int) -> None:
    h = Harness(now=calendar.timegm((2024, 2, 29, hour, 0, 0)))
    h.wr(RTC_REG_B, 0)  # BCD, 12-hour
    assert h.rd(RTC_HOURS) == bcd
    h.wr(RTC_REG_B, REG_B_DM)  # binary, 12-hour
    assert h.rd(RTC_HOURS) == binary


def test_century_and_its_ps2_alias(h: Harness) -> None:
    assert h.rd(RTC_CENTURY) == 0x20
    assert h.rd(RTC_PS2_CENTURY) == 0x20
    h.wr(RTC_REG_B, REG_B_24H | REG_B_DM)
    assert h.rd(RTC_CENTURY) == 20


def test_update_in_progress_in_the_last_244_us_of_a_second(h: Harness) -> None:
    assert h.rd(RTC_REG_A) == 0x26
    h.clock.now = T0 + 0.9998
    assert h.rd(RTC_REG_A) == 0x26 | REG_A_UIP
    h.wr(RTC_REG_B, REG_B_SET | REG_B_24H)
    assert h.rd(RTC_REG_A) == 0x26  # a stopped clock never updates
    h.wr(RTC_REG_A, 0xA5)  # UIP is read-only
    assert h.rd(RTC_REG_A) == 0x25


def test_register_d_reports_valid_ram_and_time(h: Harness) -> None:
    assert h.rd(RTC_REG_D) == 0x80
    h.wr(RTC_REG_D, 0)
    assert h.rd(RTC_REG_D) == 0x80


# Setting the clock -------------------------------------------------------------


def test_set_bit_freezes_the_registers_and_clearing_it_starts_the_new_time(h: Harness) -> None:
    h.wr(RTC_REG_B, REG_B_SET | REG_B_24H)
    h.clock.now += 10
    assert h.rd(RTC_SECONDS) == 0x07  # frozen
    for index, value in [
        (RTC_CENTURY, 0x20),
        (RTC_YEAR, 0x25),
        (RTC_MONTH, 0x12),
        (RTC_DAY_OF_MONTH, 0x31),
        (RTC_HOURS, 0x23),
        (RTC_MINUTES, 0x59),
        (RTC_SECONDS, 0x58),
    ]:
        h.wr(index, value)
    assert h.rd(RTC_SECONDS) == 0x58
    h.clock.now += 5  # still frozen
    h.wr(RTC_REG_B, REG_B_24H)
    assert h.time_regs() == [0x58, 0x59, 0x23, 0x04, 0x31, 0x12, 0x25, 0x20]
    h.clock.now += 2  # Thursday, January 1st 2026
    assert h.time_regs() == [0x00, 0x00, 0x00, 0x05, 0x01, 0x01, 0x26, 0x20]


def test_set_time_in_binary_12_hour_mode(h: Harness) -> None:
    mode = REG_B_DM  # binary, 12-hour
    h.wr(RTC_REG_B, REG_B_SET | mode)
    h.wr(RTC_HOURS, 0x80 | 3)  # 3 PM
    h.wr(RTC_MINUTES, 4)
    h.wr(RTC_SECONDS, 5)
    h.wr(RTC_REG_B, mode | REG_B_24H)
    assert h.time_regs()[:3] == [5, 4, 15]


def test_writing_a_time_register_while_running_takes_effect_at_once(h: Harness) -> None:
    h.clock.now += 0.5
    h.wr(RTC_MINUTES, 0x10)
    assert h.time_regs()[:3] == [0x07, 0x10, 0x13]
    h.clock.now += 0.4  # the phase of the second was kept
    assert h.rd(RTC_SECONDS) == 0x07
    h.clock.now += 0.2
    assert h.rd(RTC_SECONDS) == 0x08


def test_divider_reset_stops_the_clock_and_restarts_half_a_second_later(h: Harness) -> None:
    h.wr(RTC_REG_A, 0x66)
    h.clock.now += 100
    assert h.rd(RTC_SECONDS) == 0x07
    h.wr(RTC_REG_A, 0x26)
    h.clock.now += 0.4
    assert h.rd(RTC_SECONDS) == 0x07
    h.clock.now += 0.2
    assert h.rd(RTC_SECONDS) == 0x08


def test_set_clears_uie(h: Harness) -> None:
    h.wr(RTC_REG_B, REG_B_SET | REG_B_UIE | REG_B_24H)
    assert h.rd(RTC_REG_B) == REG_B_SET | REG_B_24H


# Interrupts ------------------------------------------------------------------------


def test_register_c_read_clears_the_flags(h: Harness) -> None:
    assert h.rd(RTC_REG_C) == 0
    h.clock.now += 1
    assert h.rd(RTC_REG_C) == REG_C_UF  # an update happened, no interrupt enabled
    assert h.rd(RTC_REG_C) == 0
    assert h.irqs == []


def test_update_interrupt(h: Harness) -> None:
    h.wr(RTC_REG_B, REG_B_24H | REG_B_UIE)
    h.clock.now += 0.5
    assert h.cmos.poll() == T0 + 1
    assert h.irqs == []
    h.clock.now = T0 + 1
    h.cmos.poll()
    assert h.irqs == [True]
    assert h.rd(RTC_REG_C) == REG_C_IRQF | REG_C_UF
    assert h.irqs == [True, False]
    assert h.rd(RTC_REG_C) == 0


def test_enabling_an_interrupt_whose_flag_is_set_raises_it(h: Harness) -> None:
    h.clock.now += 1
    h.cmos.poll()
    assert h.irqs == []
    h.wr(RTC_REG_B, REG_B_24H | REG_B_UIE)
    assert h.irqs == [True]
    assert h.cmos.irq_level


def test_alarm_interrupt(h: Harness) -> None:
    h.wr(RTC_HOURS_ALARM, 0x13)
    h.wr(RTC_MINUTES_ALARM, 0x45)
    h.wr(RTC_SECONDS_ALARM, 0x10)
    h.wr(RTC_REG_B, REG_B_24H | REG_B_AIE)
    assert h.cmos.poll() == T0 + 3
    h.clock.now = T0 + 2.5
    assert h.rd(RTC_REG_C) == REG_C_UF
    assert h.irqs == []
    h.clock.now = T0 + 3
    assert h.rd(RTC_REG_C) == REG_C_IRQF | REG_C_AF | REG_C_UF
    assert h.irqs == [True, False]
    # Next match is the same time tomorrow.
    assert h.cmos.poll() == T0 + 3 + 86400


def test_alarm_passed_while_nobody_looked_is_still_flagged(h: Harness) -> None:
    h.wr(RTC_HOURS_ALARM, 0x14)
    h.wr(RTC_MINUTES_ALARM, 0xFF)  # don't care
    h.wr(RTC_SECONDS_ALARM, 0x00)
    h.clock.now += 3 * 3600
    assert h.rd(RTC_REG_C) == REG_C_AF | REG_C_UF
    h.clock.now += 3600  # 17:45, no match since
    assert h.rd(RTC_REG_C) == REG_C_UF


def test_dont_care_alarm_fires_every_second(h: Harness) -> None:
    for index in (RTC_HOURS_ALARM, RTC_MINUTES_ALARM, RTC_SECONDS_ALARM):
        h.wr(index, 0xC0)
    h.wr(RTC_REG_B, REG_B_24H | REG_B_AIE)
    assert h.cmos.poll() == T0 + 1
    h.clock.now += 1
    assert h.rd(RTC_REG_C) == REG_C_IRQF | REG_C_AF | REG_C_UF


def test_periodic_interrupt_at_1024_hz(h: Harness) -> None:
    start = h.clock.now
    h.wr(RTC_REG_B, REG_B_24H | REG_B_PIE)
    assert h.cmos.poll() == pytest.approx(start + 1 / 1024, abs=1e-9)
    h.clock.now = start + 0.0005
    assert h.rd(RTC_REG_C) == 0
    h.clock.now = start + 0.0011
    assert h.rd(RTC_REG_C) == REG_C_IRQF | REG_C_PF
    assert h.irqs == [True, False]


@pytest.mark.parametrize(("reg_a", "hz"), [(0x21, 256), (0x22, 128), (0x23, 8192), (0x2F, 2)])
def test_periodic_rates(h: Harness, reg_a: int, hz: int) -> None:
    start = h.clock.now
    h.wr(RTC_REG_A, reg_a)
    h.wr(RTC_REG_B, REG_B_24H | REG_B_PIE)
    assert h.cmos.poll() == pytest.approx(start + 1 / hz, abs=1e-9)


def test_periodic_flag_needs_pie_as_in_qemu(h: Harness) -> None:
    h.clock.now += 0.25
    assert h.rd(RTC_REG_C) == 0


def test_poll_without_enabled_interrupts(h: Harness) -> None:
    assert h.cmos.poll() is None


def test_reset_clears_interrupt_state(h: Harness) -> None:
    h.wr(0x0F, 0x05)
    h.wr(RTC_REG_B, REG_B_24H | REG_B_UIE | REG_B_PIE | REG_B_AIE)
    h.clock.now += 1
    h.cmos.poll()
    assert h.irqs == [True]
    h.wr(0x40, 0x99)
    h.cmos.reset()
    assert h.irqs == [True, False]
    # The power-on state: nothing the guest wrote survives a machine reset.
    assert h.cmos.state() == Cmos(low_ram=128 * MiB, clock=h.clock).state()
    assert h.rd(RTC_REG_B) == REG_B_24H
    assert h.rd(RTC_REG_C) == 0
    assert h.rd(0x0F) == 0
    assert h.rd(0x40) == 0


# CMOS memory ---------------------------------------------------------------------


def test_memory_bytes_for_128_mib(h: Harness) -> None:
    assert h.word(0x15) == 640
    assert h.word(0x17) == 0xFFFF  # 127 MiB in KiB does not fit
    assert h.word(0x30) == 0xFFFF
    assert (h.rd(0x34), h.rd(0x35)) == (0x00, 0x07)  # (128 - 16) MiB / 64 KiB
    assert [h.rd(0x5B), h.rd(0x5C), h.rd(0x5D)] == [0, 0, 0]


def test_memory_bytes_for_small_guests() -> None:
    h = Harness(low_ram=32 * MiB)
    assert h.word(0x17) == 31 * 1024
    assert h.word(0x30) == 31 * 1024
    assert h.word(0x34) == 0x0100
    tiny = Harness(low_ram=512 * 1024)
    assert tiny.word(0x15) == 512
    assert tiny.word(0x17) == 0
    assert tiny.word(0x34) == 0


def test_memory_split_around_the_4_gib_hole() -> None:
    h = Harness(low_ram=3 * GiB + 512 * MiB, high_ram=2 * GiB + 512 * MiB)
    assert h.word(0x15) == 640
    assert h.word(0x17) == 0xFFFF
    assert h.word(0x34) == 0xDF00  # (3.5 GiB - 16 MiB) / 64 KiB
    assert [h.rd(0x5B), h.rd(0x5C), h.rd(0x5D)] == [0x00, 0xA0, 0x00]  # 2.5 GiB / 64 KiB


def test_memory_bytes_with_4_gib_below_the_hole() -> None:
    h = Harness(low_ram=4 * GiB)
    assert h.word(0x34) == 0xFF00  # the most 0x34/0x35 can hold for RAM below 4 GiB
    assert h.word(0x17) == 0xFFFF


def test_memory_above_4_gib_saturates() -> None:
    h = Harness(low_ram=3 * GiB, high_ram=2048 * GiB)
    assert h.word(0x34) == 0xBF00
    assert [h.rd(0x5B), h.rd(0x5C), h.rd(0x5D)] == [0xFF, 0xFF, 0xFF]


@pytest.mark.parametrize(("cpus", "value"), [(1, 0), (4, 3), (255, 254), (256, 0)])
def test_cpu_count_byte(cpus: int, value: int) -> None:
    assert Harness(cpus=cpus).rd(0x5F) == value


def test_nmi_disable_bit_is_not_part_of_the_index(h: Harness) -> None:
    h.cmos.write(INDEX, 1, NMI_DISABLE | RTC_REG_A)
    assert h.cmos.read(DATA, 1) == 0x26
    h.cmos.write(INDEX, 1, NMI_DISABLE | 0x35)
    assert h.cmos.read(DATA, 1) == 0x07


def test_index_port_reads_all_ones(h: Harness) -> None:
    h.cmos.write(INDEX, 1, 0x10)
    assert h.cmos.read(INDEX, 1) == 0xFF


def test_general_ram_bytes_read_back(h: Harness) -> None:
    for index, value in [(0x0E, 0x11), (0x40, 0x5A), (0x7F, 0xA5), (0x15, 0x00)]:
        h.wr(index, value)
    assert [h.rd(0x0E), h.rd(0x40), h.rd(0x7F), h.rd(0x15)] == [0x11, 0x5A, 0xA5, 0x00]
    assert h.rd(0x41) == 0
    h.wr(RTC_SECONDS_ALARM, 0x30)  # alarm registers are storage too
    assert h.rd(RTC_SECONDS_ALARM) == 0x30


def test_wide_accesses_are_split_across_the_two_ports(h: Harness) -> None:
    h.cmos.write(INDEX, 2, 0x5A << 8 | 0x40)  # index 0x40, then data 0x5a
    assert h.rd(0x40) == 0x5A
    h.cmos.write(INDEX, 1, 0x41)
    assert h.cmos.read(INDEX, 2) == 0x00FF  # 0x70 reads 0xff, 0x71 the byte at 0x41


def test_invalid_sizes_are_rejected() -> None:
    with pytest.raises(ValueError):
        Cmos(low_ram=5 * GiB)
    with pytest.raises(ValueError):
        Cmos(low_ram=MiB, cpus=0)


def test_is_a_device_with_two_ports() -> None:
    device: Device = Cmos(low_ram=MiB)
    assert CMOS_PORTS == 2
    assert device.read(INDEX, 1) == 0xFF
