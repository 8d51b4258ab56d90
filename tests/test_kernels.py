"""Kernels as QEMU's -kernel takes them: multiboot and ELF images, command lines, SMP."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from kvmpy.loaders.detect import detect_format, load_image
from kvmpy.loaders.flat import load_flat
from kvmpy.machine import Machine
from tests.helpers import ROOT, Assembler, guest, take_sigint

pytestmark = pytest.mark.kvm


def kvmpy_cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "kvmpy", "run", *args], capture_output=True, timeout=120, cwd=ROOT
    )


def build_elf64(tmp_path: Path, source: str, address: int = 0x200000) -> Path:
    """A 64-bit ELF executable linked at ``address``."""
    src, obj, elf = tmp_path / "k.S", tmp_path / "k.o", tmp_path / "k.elf"
    src.write_text(".code64\n.globl _start\n_start:\n" + source + "\n")
    subprocess.run(["as", "--64", "-o", str(obj), str(src)], check=True)
    subprocess.run(
        ["ld", "-m", "elf_x86_64", f"-Ttext={address:#x}", "-o", str(elf), str(obj)], check=True
    )
    return elf


def test_multiboot_kernel_gets_its_command_line_like_under_qemu() -> None:
    image = guest("multiboot_hello", ".elf")
    result = kvmpy_cli(str(image.relative_to(ROOT)), "--append", "console=ttyS0 quiet")
    assert result.stdout == (
        b"Hello from a multiboot kernel! command line: "
        b"guests/out/multiboot_hello.elf console=ttyS0 quiet\n"
    )
    assert result.returncode == 1


def test_multiboot_entry_state() -> None:
    image = guest("multiboot_hello", ".elf")
    assert detect_format(image) == "multiboot"
    with Machine(mem_size=32 << 20) as m:
        plan = load_image(image, ram=[(r.gpa, r.size) for r in m.memory], load_addr=0)
        m.load(plan)
        regs, sregs = m.vcpu.get_regs(), m.vcpu.get_sregs()
        assert regs.rax == 0x2BADB002
        assert regs.rbx == 0x9000
        assert regs.rip == 0x10000C
        assert not regs.rflags & (1 << 9)  # interrupts off
        assert sregs.cr0 & 1 and not sregs.cr0 & (1 << 31)  # protected, paging off
        assert sregs.cs.db == 1 and sregs.cs.base == 0 and sregs.cs.limit == 0xFFFFFFFF
        # The info structure says 32 MiB: 639 KiB below the EBDA, the rest from 1 MiB.
        assert m.memory.read_u32(0x9000 + 4) == 639
        assert m.memory.read_u32(0x9000 + 8) == (32 << 10) - 1024
        outcome = m.run(timeout=30)
    assert outcome.exit_code == 0


def test_elf64_kernel_enters_in_long_mode(tmp_path: Path) -> None:
    # Exit with CS.L as seen from inside: 64-bit code can use a 64-bit immediate.
    elf = build_elf64(
        tmp_path,
        "movabs $0x4200000000, %rax\nshr $32, %rax\nout %al, $0xf4",
    )
    assert detect_format(elf) == "elf"
    result = kvmpy_cli(str(elf))
    assert result.returncode == (0x42 << 1 | 1) & 0xFF, result.stderr


def test_a_bad_image_is_one_error_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.elf"
    bad.write_bytes(b"\x7fELF" + bytes(60))
    result = kvmpy_cli(str(bad))
    assert result.returncode == 2
    assert result.stderr.startswith(b"kvmpy: error: ")
    assert str(bad).encode() in result.stderr
    assert result.stderr.count(b"\n") == 1


def test_modules_need_a_multiboot_kernel() -> None:
    result = kvmpy_cli(str(guest("real_hello")), "--module", str(guest("real_hello")))
    assert result.returncode == 2
    assert b"boot modules need a multiboot kernel" in result.stderr


def test_smp_machine_stops_every_vcpu_thread() -> None:
    # The APs never get a SIPI: they sit in the kernel's LAPIC until the BSP
    # exits, and must still be stopped and joined.
    before = {t.name for t in threading.enumerate()}
    with Machine(mem_size=16 << 20, cpus=4) as m:
        plan = load_image(
            guest("real_hello"), ram=[(r.gpa, r.size) for r in m.memory], load_addr=0x7C00
        )
        m.load(plan)
        outcome = m.run(timeout=30)
        assert outcome.exit_code == 0
        assert len(m.vcpus) == 4
    after = {t.name for t in threading.enumerate()}
    assert not {name for name in after - before if name.startswith("kvmpy-vcpu")}


def test_smp_needs_the_irqchip() -> None:
    with pytest.raises(ValueError, match="needs the in-kernel irqchip"):
        Machine(cpus=2, irqchip=False)


def test_smp_start_and_stop_is_race_free() -> None:
    # The BSP exits at once, often before the AP threads have started: every
    # run must still stop every thread (this once hung on a lost kick).
    image = guest("real_hello")
    with Machine(mem_size=16 << 20, cpus=4) as m:
        plan = load_image(image, ram=[(r.gpa, r.size) for r in m.memory], load_addr=0x7C00)
        for _ in range(20):
            m.load(plan)
            assert m.run(timeout=30).exit_code == 0


@pytest.mark.parametrize("cpus", [1, 2])
def test_toykernel(cpus: int) -> None:
    image = guest("toykernel", ".elf")
    result = kvmpy_cli(
        str(image.relative_to(ROOT)), "--cpus", str(cpus), "--append", "hello world",
        "--timeout", "60",
    )  # fmt: skip
    lines = result.stdout.decode().splitlines()
    assert result.returncode == 1, result.stdout + result.stderr
    assert lines[0] == "toykernel: hello from 64-bit long mode"
    assert 'multiboot: cmdline "guests/out/toykernel.elf hello world"' in lines
    assert "lapic: timer ticked 3 times" in lines
    assert f"smp: fw_cfg says {cpus} cpu(s)" in lines
    assert ("cpu 1: online" in lines) == (cpus == 2)
    assert (
        'testdev: id "KVMP", scratch wrote 0xc0ffee42 read 0xc0ffee42, counter 0 then 1: ok'
        in lines
    )
    assert lines[-1] == "toykernel: all checks passed"


def test_fw_cfg_read_from_a_guest(assemble: Assembler) -> None:
    # Select the signature (key 0), read 4 bytes, then NB_CPUS (key 5).
    source = """
        mov $0x510, %dx
        xor %ax, %ax
        out %ax, %dx
        mov $4, %cx
    1:  mov $0x511, %dx
        in %dx, %al
        mov $0x3f8, %dx
        out %al, %dx
        loop 1b
        mov $0x510, %dx
        mov $5, %ax
        out %ax, %dx
        mov $0x511, %dx
        in %dx, %al
        add $'0', %al
        mov $0x3f8, %dx
        out %al, %dx
        mov $0, %al
        out %al, $0xf4
    """
    with Machine(mem_size=16 << 20, cpus=3) as m:
        m.load(load_flat(assemble(source), 0x7C00), mode="real")
        outcome = m.run(timeout=30)
        assert (bytes(m.console), outcome.exit_code) == (b"QEMU3", 0)


@pytest.mark.parametrize(
    "source",
    ["mov $1, %al\nout %al, $0x92\n1: jmp 1b", "mov $0xfe, %al\nout %al, $0x64\n1: jmp 1b"],
    ids=["port 0x92", "i8042 0xFE"],
)
def test_guest_reset_stops_the_vm(assemble: Assembler, source: str) -> None:
    with Machine(mem_size=16 << 20) as m:
        m.load(load_flat(assemble(source), 0x7C00), mode="real")
        outcome = m.run(timeout=30)
    assert (outcome.reason, outcome.status, outcome.message) == ("reset", 6, "guest reset")


def test_reboot_restarts_the_guest(assemble: Assembler) -> None:
    image = assemble("mov $0x3f8, %dx\nmov $'B', %al\nout %al, %dx\nmov $1, %al\nout %al, $0x92")
    result = kvmpy_cli(str(image), "--reboot", "--timeout", "3")
    assert result.returncode == 124
    assert result.stdout.count(b"B") >= 2
    assert b"kvmpy: guest reset: restarting" in result.stderr


def test_cmos_from_a_guest(assemble: Assembler) -> None:
    # Status register D says the RTC is valid; 0x34/0x35 hold RAM above
    # 16 MiB in 64 KiB units: (128 MiB - 16 MiB) / 64 KiB = 0x0700.
    source = """
        mov $0x0d, %al
        out %al, $0x70
        in $0x71, %al
        cmp $0x80, %al
        jne 1f
        mov $0x35, %al
        out %al, $0x70
        in $0x71, %al
        out %al, $0xf4
    1:  mov $0xee, %al
        out %al, $0xf4
    """
    with Machine() as m:
        m.load(load_flat(assemble(source), 0x7C00), mode="real")
        assert m.run(timeout=30).exit_code == 0x07


def test_acpi_power_off_like_under_qemu(assemble: Assembler) -> None:
    image = assemble("mov $0x604, %dx\nmov $0x2000, %ax\nout %ax, %dx\n1: jmp 1b")
    result = kvmpy_cli(str(image))
    assert result.returncode == 0
    assert result.stderr == b"kvmpy: guest powered off\n"


def test_guest_finds_com1_in_the_bios_data_area(assemble: Assembler) -> None:
    source = """
        xor %ax, %ax
        mov %ax, %ds
        mov (0x400), %dx
        mov $'!', %al
        out %al, %dx
        mov $0, %al
        out %al, $0xf4
    """
    with Machine(mem_size=16 << 20) as m:
        m.load(load_flat(assemble(source), 0x7C00), mode="real")
        assert m.run(timeout=30).exit_code == 0
        assert bytes(m.console) == b"!"
        # COM2 too, and two serial ports in the equipment word, as SeaBIOS leaves them.
        assert m.memory.read(0x402, 2) == (0x2F8).to_bytes(2, "little")
        assert (int.from_bytes(m.memory.read(0x410, 2), "little") >> 9) & 7 == 2


def test_ctrl_c_stops_every_vcpu_and_exits_130(assemble: Assembler) -> None:
    image = assemble("mov $0x3f8, %dx\nmov $'S', %al\nout %al, %dx\n1: jmp 1b")
    process = subprocess.Popen(
        [sys.executable, "-m", "kvmpy", "run", str(image), "--cpus", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, preexec_fn=take_sigint,
    )  # fmt: skip
    assert process.stdout is not None
    assert process.stdout.read(1) == b"S"  # the guest is running
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130
    assert stderr.startswith(b"kvmpy: vCPU 0: interrupted"), stderr


RTC_GUEST = """
    /* IVT vector 0x28 -> handler; the PIC pair maps IRQ 8 there. */
	cli
	xor %ax, %ax
	mov %ax, %ds
	mov %ax, %ss
	mov $0x7c00, %sp
	movw $handler, (0x28 * 4)
	movw $0, (0x28 * 4 + 2)
	mov $0x11, %al	/* ICW1..ICW4 to both PICs: bases 0x20 and 0x28 */
	out %al, $0x20
	out %al, $0xa0
	mov $0x20, %al
	out %al, $0x21
	mov $0x28, %al
	out %al, $0xa1
	mov $0x04, %al
	out %al, $0x21
	mov $0x02, %al
	out %al, $0xa1
	mov $0x01, %al
	out %al, $0x21
	out %al, $0xa1
	mov $0xfb, %al	/* unmask the cascade (IRQ 2) and IRQ 8 */
	out %al, $0x21
	mov $0xfe, %al
	out %al, $0xa1
	mov $0x0a, %al	/* RTC register A: rate 6 = 1024 Hz */
	out %al, $0x70
	mov $0x26, %al
	out %al, $0x71
	mov $0x0b, %al
	out %al, $0x70
	in $0x71, %al
	or $0x40, %al	/* register B: PIE, the periodic interrupt */
	mov %al, %ah
	mov $0x0b, %al
	out %al, $0x70
	mov %ah, %al
	out %al, $0x71
1:	sti
	hlt
	cli
	cmpw $5, ticks
	jb 1b
	mov $0x3f8, %dx
	mov $'R', %al
	out %al, %dx
	mov $0, %al
	out %al, $0xf4
handler:
	push %ax
	incw ticks
	mov $0x0c, %al	/* reading register C acknowledges the RTC */
	out %al, $0x70
	in $0x71, %al
	mov $0x20, %al	/* EOI to both PICs */
	out %al, $0xa0
	out %al, $0x20
	pop %ax
	iret
ticks: .word 0
"""


def test_rtc_periodic_interrupts_reach_a_halted_guest(assemble: Assembler) -> None:
    # The guest programs the PICs, enables the RTC's periodic interrupt
    # (1024 Hz) and halts; only a timer on the host side can wake it.
    with Machine(mem_size=16 << 20) as m:
        m.load(load_flat(assemble(RTC_GUEST), 0x7C00), mode="real")
        outcome = m.run(timeout=30)
    assert (outcome.exit_code, bytes(m.console)) == (0, b"R")
