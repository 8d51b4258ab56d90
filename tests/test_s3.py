"""ACPI S3: suspend to RAM, wake on the RTC alarm or the power button, resume at the FACS vector."""

from __future__ import annotations

import threading
import time

import pytest

from kvmpy.devices.acpi_pm import PWRBTN_STS
from kvmpy.loaders.flat import load_flat
from kvmpy.machine import Machine
from kvmpy.memory import GuestMemory
from kvmpy.x86.acpi import acpi_tables
from kvmpy.x86.layout import ACPI_TABLES_ADDR
from kvmpy.x86.pc import PC, press_power_button
from kvmpy.x86.registers import Sregs
from tests.helpers import Assembler, guest

FACS = ACPI_TABLES_ADDR + 0x40


def resume_at(memory: GuestMemory) -> tuple[str, int, int, int]:
    assert PC.resume_setup is not None
    setup = PC.resume_setup(memory, Sregs())
    return setup.mode, setup.sregs.cs.selector, setup.sregs.cs.base, setup.regs.rip


def test_resume_goes_to_the_facs_vectors() -> None:
    with GuestMemory.with_ram(1 << 20) as memory:
        memory.write(ACPI_TABLES_ADDR, acpi_tables(1))
        memory.write_u32(FACS + 12, 0x9A123)
        assert resume_at(memory) == ("real", 0x9A12, 0x9A120, 3)  # CS = vector >> 4
        memory.write_u64(FACS + 24, 0x20_0000)
        mode, _, _, rip = resume_at(memory)
        assert (mode, rip) == ("protected", 0x20_0000)  # the x vector: 32-bit
        memory.write_u32(FACS + 36, 1)  # OSPM flags: 64BIT_WAKE_F
        mode, _, _, rip = resume_at(memory)
        assert (mode, rip) == ("long", 0x20_0000)
        memory.write_u32(FACS + 20, 0)  # without 64BIT_WAKE_SUPPORTED_F: 32-bit
        assert resume_at(memory)[0] == "protected"
        memory.write_u32(FACS + 20, 2)
        memory.write_u8(FACS + 32, 1)  # a version 1 FACS has no OSPM flags
        assert resume_at(memory)[0] == "protected"
        memory.write_u8(FACS + 32, 0)  # a version 0 FACS has no x vector
        assert resume_at(memory)[0] == "real"
        memory.write_u8(FACS + 32, 2)
        memory.write_u64(FACS + 24, 1 << 40)  # beyond 32 bits: not usable
        assert resume_at(memory)[0] == "real"


def test_a_64_bit_resume_runs_on_firmwares_own_gdt_and_identity_map() -> None:
    assert PC.resume_setup is not None
    with GuestMemory.with_ram(1 << 20) as memory:
        memory.write(ACPI_TABLES_ADDR, acpi_tables(1))
        memory.write_u64(FACS + 24, 0x30_0000)
        memory.write_u32(FACS + 36, 1)
        setup = PC.resume_setup(memory, Sregs())
    assert setup.sregs.efer & 0x500 == 0x500 and setup.sregs.cr0 & 1 << 31  # LME, LMA, PG
    assert setup.sregs.cs.l == 1 and setup.regs.rflags & 1 << 9 == 0  # 64-bit code, IF clear
    # The GDT and page tables go to the ACPI area past the tables, not into the
    # guest's RAM (the memory maps leave 0x9fc00-0xfffff out).
    firmware = (ACPI_TABLES_ADDR + 0x1000, ACPI_TABLES_ADDR + 0x10000)
    assert all(firmware[0] <= gpa and gpa + len(data) <= firmware[1] for gpa, data in setup.memory)
    assert setup.sregs.gdt.base in dict(setup.memory)
    assert setup.sregs.cr3 in dict(setup.memory)
    assert len(acpi_tables(1)) <= 0x1000  # the tables stay clear of them


@pytest.mark.kvm
def test_a_guest_resumes_in_32_then_64_bit_mode_at_the_x_vector() -> None:
    with Machine(mem_size=16 << 20) as m:
        m.load(load_flat(guest("s3_wake64"), 0x10_0000), mode="long")
        outcome = m.run(timeout=60)
        assert outcome.exit_code == 0, (outcome, m.console)
        assert b"32-bit protected mode" in bytes(m.console)
        assert b"64-bit mode with 64BIT_WAKE_F: PASS" in bytes(m.console)


@pytest.mark.kvm
def test_guest_suspends_and_the_rtc_alarm_wakes_it() -> None:
    with Machine(mem_size=16 << 20) as m:
        m.load(load_flat(guest("s3_resume"), 0x7C00), mode="real")
        started = time.monotonic()
        outcome = m.run(timeout=30)
        elapsed = time.monotonic() - started
        assert outcome.exit_code == 0, (outcome, m.console)
        assert b"PASS" in bytes(m.console)
        assert elapsed >= 1.0  # the alarm is set 2 s ahead, to the second


@pytest.mark.kvm
def test_the_power_button_wakes_a_sleeping_guest(assemble: Assembler) -> None:
    # Waking vector = resume (0x7c00 + ...), no RTC wake; sleep.  Resumed, exit
    # with PM1 status' high byte: WAK_STS | PWRBTN_STS = 0x81.
    source = """
        xor %ax, %ax
        mov %ax, %ds
        mov $0xe000, %ax
        mov %ax, %es
        movl $resume, %es:0x4c          /* the FACS's firmware_waking_vector */
        mov $0x600, %dx
        mov $0xffff, %ax
        out %ax, %dx                    /* clear PM1 status */
        mov $0x604, %dx
        mov $0x2400, %ax
        out %ax, %dx
        mov $0x7f, %al
        out %al, $0xf4
    resume:
        ljmp $0, $1f
    1:  mov $0x601, %dx
        in %dx, %al
        out %al, $0xf4
    """
    with Machine(mem_size=16 << 20) as m:
        m.load(load_flat(assemble(source), 0x7C00), mode="real")
        m.start()
        deadline = time.monotonic() + 20
        while not m.suspended and time.monotonic() < deadline:
            time.sleep(0.01)
        assert m.suspended
        time.sleep(0.2)  # still asleep: nothing wakes it by itself
        assert m.suspended
        threading.Thread(target=press_power_button, args=(m,)).start()
        outcome = m.wait(20)
        assert outcome.exit_code == (0x8000 | PWRBTN_STS) >> 8, outcome
