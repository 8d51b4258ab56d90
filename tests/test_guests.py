"""Whole guests under the real /dev/kvm: the built guests, and small ones assembled here."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from kvmpy import records
from kvmpy.backends.base import BackendError as KvmError
from kvmpy.devices.base import Stateless
from kvmpy.loaders.flat import load_flat
from kvmpy.machine import Machine
from kvmpy.outcome import STATUS_CRASH, STATUS_TIMEOUT, Outcome
from kvmpy.outcome import STATUS_OK as STATUS_HALT
from kvmpy.x86.modes import default_load_addr
from tests.helpers import ROOT, Assembler, guest, host_kvm_module

pytestmark = pytest.mark.kvm


def run_image(
    image: Path, mode: str = "real", timeout: float = 10, **machine: object
) -> tuple[Outcome, bytes]:
    with Machine(mem_size=16 << 20, **machine) as m:  # type: ignore[arg-type]
        m.load(load_flat(image, default_load_addr(mode)), mode=mode)
        outcome = m.run(timeout=timeout)
        return outcome, bytes(m.console)


def kvmpy_cli(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "kvmpy", *args],
        input=stdin,
        capture_output=True,
        timeout=60,
        cwd=ROOT,
    )


def test_real_mode_hello() -> None:
    outcome, output = run_image(guest("real_hello"), "real")
    assert output == (
        b"Hello from real mode!\nreal mode OK: CR0.PE=0, segment:offset addressing works\n"
    )
    assert (outcome.reason, outcome.exit_code, outcome.status) == ("exit", 0, 1)


def test_long_mode_hello() -> None:
    outcome, output = run_image(guest("long_hello"), "long")
    assert output.startswith(b"Hello from 64-bit long mode!\nlong mode OK: EFER.LMA=1")
    assert b"FAIL" not in output
    assert (outcome.reason, outcome.exit_code, outcome.status) == ("exit", 0, 1)


def test_protected_mode_hello() -> None:
    outcome, output = run_image(guest("protected_hello"), "protected")
    assert output == (
        b"Hello from 32-bit protected mode!\n"
        b"protected mode OK: CR0.PE=1, CR0.PG=0, 32-bit operands, flat segments\n"
    )
    assert (outcome.reason, outcome.exit_code) == ("exit", 0)


def test_paged32_hello_or_a_clear_host_error() -> None:
    if host_kvm_module() == "kvm_pvm":
        # PVM drops CR0.PG outside long mode: kvmpy must say so, not run garbage.
        with pytest.raises(
            KvmError, match=r"ignored CR0\.PG: it cannot run guests in paged32 mode"
        ):
            run_image(guest("paged32_hello"), "paged32")
        return
    outcome, output = run_image(guest("paged32_hello"), "paged32")
    assert b"paged32 OK: CR0.PG=1, CR4.PSE=1, CR4.PAE=0" in output
    assert (outcome.reason, outcome.exit_code) == ("exit", 0)


def test_long_mode_guest_fails_its_checks_in_real_mode(assemble: Assembler) -> None:
    # The same check the long-mode guest makes, run where it must fail: the
    # guest's self-checks can tell modes apart.
    image = assemble("smsw %ax\nand $1, %al\nout %al, $0xf4\n")
    outcome, _ = run_image(image, "real")
    assert outcome.exit_code == 0  # PE clear in real mode


@pytest.mark.parametrize(
    ("value_asm", "code", "status"),
    [
        ("mov $0x00, %al\nout %al, $0xf4", 0x00, 1),
        ("mov $0x31, %al\nout %al, $0xf4", 0x31, 0x63),
        ("mov $0x1234, %ax\nout %ax, $0xf4", 0x1234, 0x69),
        ("mov $0x80000001, %eax\nout %eax, $0xf4", 0x80000001, 3),
    ],
)
def test_debug_exit_sizes_and_status(
    assemble: Assembler, value_asm: str, code: int, status: int
) -> None:
    outcome, _ = run_image(assemble(value_asm))
    assert (outcome.exit_code, outcome.status) == (code, status)


def test_halt_with_interrupts_disabled_stops_the_guest(assemble: Assembler) -> None:
    # Without the in-kernel irqchip, HLT exits to kvmpy, and nothing could wake the guest.
    outcome, _ = run_image(assemble("cli\nhlt"), irqchip=False)
    assert outcome.reason == "halt"
    assert outcome.status == STATUS_HALT
    assert "interrupts disabled" in outcome.message


def test_timeout_stops_a_guest_that_never_exits(assemble: Assembler) -> None:
    outcome, _ = run_image(assemble("1: jmp 1b"), timeout=0.5)
    assert outcome.reason == "timeout"
    assert outcome.status == STATUS_TIMEOUT
    assert outcome.report is not None
    assert outcome.report.regs is not None
    assert outcome.report.regs.rip == 0x7C00
    assert outcome.report.faulting_instruction.startswith("jmp")


def test_port_in_sizes_and_unhandled_ports_read_all_ones(assemble: Assembler) -> None:
    # Port 0x99 has no device: 1-, 2- and 4-byte reads give all-ones.
    source = """
        in $0x99, %al
        cmp $0xff, %al
        jne 1f
        in $0x99, %ax
        cmp $0xffff, %ax
        jne 1f
        in $0x99, %eax
        cmp $0xffffffff, %eax
        jne 1f
        mov $0, %al
        out %al, $0xf4
    1:  mov $1, %al
        out %al, $0xf4
    """
    with Machine(mem_size=1 << 20) as m:
        m.load(load_flat(assemble(source), 0x7C00), mode="real")
        outcome = m.run(timeout=10)
        assert outcome.exit_code == 0
        assert m.ports.unhandled[("read", 0x99)] == 3


def test_strict_bus_turns_unhandled_io_into_a_crash(assemble: Assembler) -> None:
    outcome, _ = run_image(assemble("mov $1, %al\nout %al, $0x99\nhlt"), strict=True)
    assert outcome.reason == "crash"
    assert outcome.status == STATUS_CRASH
    assert "unhandled port write at 0x99" in outcome.message


def test_string_io_out_and_in(assemble: Assembler) -> None:
    # rep outsb prints a string in one exit; rep insb reads three bytes the
    # host fed to the UART, and the guest echoes them back.
    source = """
        xor %ax, %ax
        mov %ax, %ds
        mov %ax, %es
        cld
        mov $0x3f8, %dx
        mov $msg, %si
        mov $6, %cx
        rep outsb
        mov $buf, %di
        mov $3, %cx
        rep insb
        mov $buf, %si
        mov $3, %cx
        rep outsb
        mov $0, %al
        out %al, $0xf4
    msg: .ascii "hello "
    buf: .space 3
    """
    with Machine(mem_size=1 << 20) as m:
        m.load(load_flat(assemble(source), 0x7C00), mode="real")
        assert m.serial.feed(b"abc") == 3
        outcome = m.run(timeout=10)
        assert outcome.exit_code == 0
        assert bytes(m.console) == b"hello abc"


def test_mmio_exit_reaches_the_mmio_bus(assemble: Assembler) -> None:
    class Scratch(Stateless):
        def __init__(self) -> None:
            self.writes: list[tuple[int, int, int]] = []

        def read(self, offset: int, size: int) -> int:
            return 0x1122334455667788 >> (8 * offset) & ((1 << (8 * size)) - 1)

        def write(self, offset: int, size: int, value: int) -> None:
            self.writes.append((offset, size, value))

    # 64-bit guest: store 4 bytes and load 8 bytes at an address with no RAM.
    source = """
        movabs $0xd0000000, %rbx
        movl $0xcafef00d, 4(%rbx)
        mov (%rbx), %rax
        movabs $0x1122334455667788, %rcx
        cmp %rcx, %rax
        jne 1f
        mov $0, %al
        out %al, $0xf4
    1:  mov $1, %al
        out %al, $0xf4
    """
    scratch = Scratch()
    with Machine(mem_size=16 << 20) as m:
        m.mmio.register(0xD000_0000, 0x1000, scratch, "scratch")
        m.load(load_flat(assemble(source, "long"), 0x100000), mode="long")
        outcome = m.run(timeout=10)
    assert outcome.exit_code == 0
    assert scratch.writes == [(4, 4, 0xCAFEF00D)]


def test_triple_fault_gives_a_crash_report() -> None:
    outcome, _ = run_image(guest("triple_fault"), "long")
    assert outcome.reason == "triple-fault"
    assert outcome.status == STATUS_CRASH
    report = outcome.report
    assert report is not None and report.regs is not None
    assert "triple fault" in report.reason
    assert report.regs.rax == 0x1234
    assert report.mode == "long"
    assert report.faulting_instruction == "ud2"
    text = report.format()
    assert "RAX=0000000000001234" in text
    assert "=> 0x100007: ud2" in text


def test_internal_error_is_reported_with_the_instruction(assemble: Assembler) -> None:
    if host_kvm_module() != "kvm_pvm":
        pytest.skip(
            f"needs a host whose KVM cannot emulate int3 at CPL0 (kvm_pvm); this one has "
            f"{host_kvm_module() or 'no module'}, where int3 is delivered through the IDT"
        )
    # With instruction completion off: with it on, kvmpy would finish the int3 (test_complete*).
    with Machine(mem_size=16 << 20) as m:
        m.arch.completer.enabled = False
        m.load(load_flat(assemble("mov $0x77, %rax\nint3", "long"), 0x100000), mode="long")
        outcome = m.run(timeout=10)
    assert outcome.reason == "crash"
    report = outcome.report
    assert report is not None
    assert report.reason == "KVM internal error"
    assert "suberror 1 (instruction emulation failed)" in report.detail
    assert report.faulting_instruction == "int3"
    assert report.code[:1] == b"\xcc"
    assert "KVM could not run: cc (int3)" in report.format()


def test_guest_memory_is_shared_with_the_guest(assemble: Assembler) -> None:
    # The guest writes a word; the host reads it back through GuestMemory.
    image = assemble("movw $0xbeef, (0x5000)\nmov $0, %al\nout %al, $0xf4")
    with Machine(mem_size=1 << 20) as m:
        m.load(load_flat(image, 0x7C00), mode="real")
        m.run(timeout=10)
        assert m.memory.read_u16(0x5000) == 0xBEEF


def test_run_can_resume_after_a_timeout(assemble: Assembler) -> None:
    # Spin until RCX is cleared from outside, then exit.
    image = assemble("1: test %ecx, %ecx\njnz 1b\nmov $5, %al\nout %al, $0xf4")
    with Machine(mem_size=1 << 20) as m:
        m.load(load_flat(image, 0x7C00), mode="real")
        m.vcpu.set_regs(records.replace(m.vcpu.get_regs(), rcx=1))
        assert m.run(timeout=0.3).reason == "timeout"
        m.vcpu.set_regs(records.replace(m.vcpu.get_regs(), rcx=0))
        assert m.run(timeout=10).exit_code == 5


# -- the command line -------------------------------------------------------------


def test_cli_runs_the_real_mode_guest() -> None:
    result = kvmpy_cli("run", str(guest("real_hello")))
    assert result.returncode == 1
    assert result.stdout.startswith(b"Hello from real mode!\n")
    assert result.stderr == b""


def test_cli_runs_the_long_mode_guest() -> None:
    result = kvmpy_cli("run", "--mode", "long", str(guest("long_hello")))
    assert result.returncode == 1
    assert b"long mode OK" in result.stdout


def test_cli_streams_stdin_to_the_guest(assemble: Assembler) -> None:
    # Echo three bytes from the UART, polling LSR.DR.
    source = """
        mov $3, %cx
    1:  mov $0x3fd, %dx
    2:  in %dx, %al
        test $1, %al
        jz 2b
        mov $0x3f8, %dx
        in %dx, %al
        out %al, %dx
        loop 1b
        mov $0, %al
        out %al, $0xf4
    """
    result = kvmpy_cli("run", "--timeout", "20", str(assemble(source)), stdin=b"xyz")
    assert (result.returncode, result.stdout) == (1, b"xyz")


def test_cli_reports_a_crash_in_one_block_with_status_4() -> None:
    result = kvmpy_cli("run", "--mode", "long", str(guest("triple_fault")))
    assert result.returncode == STATUS_CRASH
    assert result.stderr.startswith(
        b"kvmpy: vCPU 0: triple fault (KVM_EXIT_SHUTDOWN) at RIP=0x100007"
    )
    assert b"Traceback" not in result.stderr


def test_cli_timeout(assemble: Assembler) -> None:
    result = kvmpy_cli("run", "--timeout", "0.3", str(assemble("1: jmp 1b")))
    assert result.returncode == STATUS_TIMEOUT
    assert b"kvmpy: vCPU 0: timeout" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "/nonexistent.bin"], b"kvmpy: error: /nonexistent.bin: cannot read image"),
        (
            ["run", "--mode", "long", "--load-addr", "0x1000", "IMAGE"],
            b"overlaps the boot structures",
        ),
        (
            ["run", "--mode", "long", "--mem", "64M", "--load-addr", "0x8000000", "IMAGE"],
            b"does not fit in guest RAM",
        ),
        (["run", "--mem", "512K", "IMAGE"], b"guest RAM must be at least 1 MiB"),
        (["run", "--kvm", "/nonexistent-kvm", "IMAGE"], b"/nonexistent-kvm does not exist"),
        (["info", "--kvm", "/nonexistent-kvm"], b"/nonexistent-kvm does not exist"),
    ],
)
def test_cli_bad_input_gives_one_error_line(args: list[str], message: bytes) -> None:
    image = str(guest("long_hello"))
    result = kvmpy_cli(*[image if a == "IMAGE" else a for a in args])
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stderr.count(b"\n") == 1, result.stderr


def test_cli_info_names_the_module_and_capabilities() -> None:
    result = kvmpy_cli("info")
    assert result.returncode == 0
    text = result.stdout.decode()
    assert "KVM API version:   12" in text
    module = host_kvm_module()
    assert module and module in text
    assert "IMMEDIATE_EXIT           yes" in text


def test_kvmpy_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "kvmpy"
    assert script.exists() and os.access(script, os.X_OK)


def test_start_wait_and_close_while_running(assemble: Assembler) -> None:
    # Print, then spin: the caller sees the output while the guest runs, and
    # closing the machine stops the vCPU thread.
    image = assemble("mov $0x3f8, %dx\nmov $'R', %al\nout %al, %dx\n1: jmp 1b")
    m = Machine(mem_size=1 << 20)
    m.load(load_flat(image, 0x7C00), mode="real")
    m.start()
    with m.console_changed:
        assert m.console_changed.wait_for(lambda: bytes(m.console) == b"R", timeout=10)
    assert not m.stopped
    m.close()
    assert m.stopped
    assert not [t for t in threading.enumerate() if t.name.startswith("kvmpy-vcpu")]
