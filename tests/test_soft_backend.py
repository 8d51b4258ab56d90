"""The software backend (Unicorn) on its own: exits, events, debugging, state, selection.

None of this needs /dev/kvm; the comparison with KVM is in test_same_results.py.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvmpy.backends.base import BackendError, Capability, open_backend
from kvmpy.backends.exits import ExitKind
from kvmpy.backends.soft import events
from kvmpy.loaders.flat import load_flat
from kvmpy.machine import Machine
from kvmpy.outcome import STATUS_CRASH, Outcome, OutcomeKind
from kvmpy.x86.modes import default_load_addr
from kvmpy.x86.registers import Segment
from tests.helpers import ROOT, Assembler, guest

pytest.importorskip("unicorn", reason="the software backend needs kvmpy[soft] (unicorn)")


def run_soft(image: Path, mode: str = "real", timeout: float = 10) -> tuple[Outcome, bytes]:
    with Machine(mem_size=16 << 20, backend="soft") as m:
        m.load(load_flat(image, default_load_addr(mode)), mode=mode)
        outcome = m.run(timeout=timeout)
        return outcome, bytes(m.console)


def test_the_soft_backend_has_no_irqchip_and_one_vcpu() -> None:
    backend = open_backend("soft")
    try:
        assert backend.name == "soft"
        assert Capability.IRQCHIP not in backend.capabilities
        assert Capability.SMP not in backend.capabilities
        assert backend.max_vcpus() == 1
        assert "Unicorn" in backend.describe()
    finally:
        backend.close()


def test_asking_the_soft_backend_for_an_irqchip_or_smp_is_one_clear_error() -> None:
    with pytest.raises(BackendError, match="lacks irqchip"):
        Machine(mem_size=1 << 20, backend="soft", irqchip=True)
    with pytest.raises(BackendError, match="lacks irqchip, smp"):
        Machine(mem_size=1 << 20, backend="soft", cpus=2)
    with Machine(mem_size=1 << 20, backend="soft") as m:
        assert not m.has_irqchip


def test_in_completes_with_the_device_value_before_the_next_instruction(
    assemble: Assembler,
) -> None:
    # The compare right behind each IN must see the bus's value (all-ones here).
    source = """
        in $0x99, %al
        cmp $0xff, %al
        jne 1f
        in $0x99, %ax
        cmp $0xffff, %ax
        jne 1f
        mov $0x99, %dx
        in %dx, %eax
        cmp $0xffffffff, %eax
        jne 1f
        mov $0, %al
        out %al, $0xf4
    1:  mov $1, %al
        out %al, $0xf4
    """
    with Machine(mem_size=1 << 20, backend="soft") as m:
        m.load(load_flat(assemble(source), 0x7C00), mode="real")
        outcome = m.run(timeout=10)
        assert outcome.exit_code == 0
        assert m.ports.unhandled[("read", 0x99)] == 3


def test_mmio_outside_ram_reaches_the_bus_and_reads_all_ones(assemble: Assembler) -> None:
    source = """
        movabs $0xd0000000, %rbx
        movl $0xcafef00d, 4(%rbx)
        mov (%rbx), %rax
        cmp $-1, %rax
        jne 1f
        mov $0, %al
        out %al, $0xf4
    1:  mov $1, %al
        out %al, $0xf4
    """
    with Machine(mem_size=16 << 20, backend="soft") as m:
        m.load(load_flat(assemble(source, "long"), 0x100000), mode="long")
        assert m.run(timeout=10).exit_code == 0
        assert m.mmio.unhandled[("write", 0xD0000004)] == 1
        assert m.mmio.unhandled[("read", 0xD0000000)] == 1


def test_hlt_with_interrupts_off_ends_the_run(assemble: Assembler) -> None:
    outcome, _ = run_soft(assemble("cli\nhlt"))
    assert outcome.kind is OutcomeKind.HALT
    assert "interrupts disabled" in outcome.message


def test_a_spinning_guest_is_stopped_by_the_timeout(assemble: Assembler) -> None:
    outcome, _ = run_soft(assemble("1: jmp 1b"), timeout=0.5)
    assert outcome.kind is OutcomeKind.TIMEOUT
    assert outcome.report is not None and outcome.report.regs is not None
    assert outcome.report.regs.rip == 0x7C00


def test_real_mode_int_and_divide_error_go_through_the_ivt(assemble: Assembler) -> None:
    # IVT[0x30] and IVT[0] point at handlers; #DE pushes the address of the div itself.
    source = """
        xor %ax, %ax
        mov %ax, %ds
        movw $soft_int, 0x30*4
        movw $0, 0x30*4+2
        movw $divide, 0
        movw $0, 2
        mov $0, %bl
        int $0x30
        cmp $1, %bl
        jne 1f
        xor %cl, %cl
    faulting:
        div %cl
        cmp $2, %bl
        jne 1f
        mov $0, %al
        out %al, $0xf4
    1:  mov $1, %al
        out %al, $0xf4
    soft_int:
        mov $1, %bl
        iret
    divide:
        mov %sp, %bp
        cmpw $faulting, (%bp)
        jne 1b
        addw $2, (%bp)          /* skip the 2-byte div on return */
        mov $2, %bl
        iret
    """
    outcome, _ = run_soft(assemble(source))
    assert (outcome.kind, outcome.exit_code) == (OutcomeKind.EXIT, 0)


LONG_IDT = """
        lea idt(%rip), %rdi
        mov $32, %ecx
    fill:
        lea handler(%rip), %rax
        mov %ax, (%rdi)
        movw $0x10, 2(%rdi)
        movw $0x8e00, 4(%rdi)
        shr $16, %rax
        mov %ax, 6(%rdi)
        shr $16, %rax
        mov %eax, 8(%rdi)
        movl $0, 12(%rdi)
        add $16, %rdi
        loop fill
        lidt idtr(%rip)
"""


def test_long_mode_page_fault_pushes_an_error_code_and_sets_cr2(assemble: Assembler) -> None:
    # The identity map covers 4 GiB: 8 GiB is not present, so a read faults
    # with error code 0 (not present, read, supervisor) and CR2 = the address.
    source = (
        LONG_IDT
        + """
        movabs $0x200000000, %rbx
        mov (%rbx), %rax
        mov $1, %al
        out %al, $0xf4
    handler:
        pop %rdx                /* the error code */
        test %rdx, %rdx
        jnz 1f
        mov %cr2, %rax
        cmp %rbx, %rax
        jne 1f
        mov $0, %al
        out %al, $0xf4
    1:  mov $2, %al
        out %al, $0xf4
        .balign 16
    idt: .space 32*16
    idtr: .word 32*16-1
        .quad idt
    """
    )
    outcome, _ = run_soft(assemble(source, "long"), "long")
    assert (outcome.kind, outcome.exit_code) == (OutcomeKind.EXIT, 0)


def test_a_fault_at_ring_3_switches_to_the_tss_stack(assemble: Assembler) -> None:
    # GDT with ring-3 code and data and a 64-bit TSS whose RSP0 is `kstack`,
    # user pages for the first 2 MiB;
    # iretq to ring 3, ud2 there: #UD must arrive at ring 0 on RSP0 with the
    # ring-3 SS:RSP and CS in the frame.
    source = (
        LONG_IDT
        + """
        lea tss(%rip), %rax
        lea gdt(%rip), %rdi
        mov %ax, 0x2a(%rdi)         /* TSS descriptor at 0x28: base 15..0 */
        shr $16, %rax
        mov %al, 0x2c(%rdi)         /* base 23..16 */
        mov %ah, 0x2f(%rdi)         /* base 31..24 */
        shr $16, %rax
        mov %eax, 0x30(%rdi)        /* base 63..32 */
        lea kstack(%rip), %rax
        mov %rax, tss+4(%rip)       /* RSP0 */
        lgdt gdtr(%rip)
        orq $4, 0x1000              /* user pages: PML4[0], PDPT[0], PD[0] (kvmpy's map) */
        orq $4, 0x2000
        orq $4, 0x3000
        mov %cr3, %rax
        mov %rax, %cr3
        mov $0x28, %ax
        ltr %ax
        pushq $0x23                 /* SS: ring-3 data */
        pushq $0x70000
        pushq $0x3002               /* RFLAGS: IOPL 3 */
        pushq $0x1b                 /* CS: ring-3 code */
        lea user(%rip), %rax
        push %rax
        iretq
    user:
        ud2
    handler:
        lea kstack(%rip), %rax
        sub $40, %rax
        cmp %rax, %rsp
        jne 1f
        cmpq $0x1b, 8(%rsp)         /* CS */
        jne 1f
        cmpq $0x70000, 24(%rsp)     /* RSP */
        jne 1f
        cmpq $0x23, 32(%rsp)        /* SS */
        jne 1f
        mov %cs, %ax
        cmp $0x10, %ax
        jne 1f
        mov $0, %al
        out %al, $0xf4
    1:  mov $1, %al
        out %al, $0xf4
        .balign 16
    idt: .space 32*16
    idtr: .word 32*16-1
        .quad idt
        .balign 8
    gdt: .quad 0, 0
        .quad 0x00af9b000000ffff    /* 0x10 ring-0 code */
        .quad 0x00affb000000ffff    /* 0x18 ring-3 code: 0x1b */
        .quad 0x00cff3000000ffff    /* 0x20 ring-3 data: 0x23 */
        .quad 0x0000890000000067    /* 0x28 TSS (base patched) */
        .quad 0
    gdtr: .word gdtr-gdt-1
        .quad gdt
        .balign 16
    tss: .space 104
        .balign 16
        .space 512
    kstack:
    """
    )
    outcome, _ = run_soft(assemble(source, "long"), "long")
    assert (outcome.kind, outcome.exit_code) == (OutcomeKind.EXIT, 0), outcome.message


def test_a_fault_with_no_idt_is_a_triple_fault() -> None:
    outcome, _ = run_soft(guest("triple_fault"), "long")
    assert outcome.kind is OutcomeKind.TRIPLE_FAULT
    assert outcome.report is not None and outcome.report.regs is not None
    assert outcome.report.regs.rip == 0x100007  # at the ud2


def test_single_step_and_breakpoints_give_debug_exits(assemble: Assembler) -> None:
    image = assemble("nop\nnop\nnop\nmov $0, %al\nout %al, $0xf4")
    with Machine(mem_size=1 << 20, backend="soft") as m:
        m.load(load_flat(image, 0x7C00), mode="real")
        vcpu = m.vcpu
        vcpu.set_guest_debug(single_step=True)
        pcs = []
        for _ in range(3):
            assert vcpu.run() == ExitKind.DEBUG
            pcs.append(vcpu.exit.debug_pc)
        assert pcs == [0x7C01, 0x7C02, 0x7C03]
        # DR0 = 0x7c05 (the out), enabled for execution in DR7.
        vcpu.set_guest_debug(breakpoints=[0x7C05, 0, 0, 0, 0, 0, 0, 0x1])
        assert vcpu.run() == ExitKind.DEBUG
        assert vcpu.exit.debug_pc == 0x7C05
        assert vcpu.exit.debug_dr6 & 1
        vcpu.set_guest_debug(enable=False)
        assert vcpu.run() == ExitKind.PORT_OUT
        assert (vcpu.exit.io_port, vcpu.exit.value) == (0xF4, 0)


def test_cli_step_works_on_the_soft_backend() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kvmpy", "run", "--accel", "soft", "--step", "--max-steps", "5",
         str(guest("real_hello"))],
        capture_output=True,
        timeout=60,
        cwd=ROOT,
    )  # fmt: skip
    assert result.stderr.count(b"\n") >= 5, result.stderr


def test_snapshot_and_restore_on_the_soft_backend(tmp_path: Path) -> None:
    with Machine(mem_size=16 << 20, backend="soft") as m:
        m.load(load_flat(guest("counter"), 0x7C00), mode="real")
        with m.device_lock("serial"):
            m.serial.feed(b"xxx")
        outcome = m.run(timeout=1)
        assert outcome.kind is OutcomeKind.TIMEOUT  # waiting for the 4th byte
        assert bytes(m.console).endswith(b"count 02\n")
        m.snapshot(tmp_path / "snap")
    with Machine.restore(tmp_path / "snap", backend="soft") as m:
        with m.device_lock("serial"):
            m.serial.feed(b"x" * 10)
        m.run(timeout=1)
        assert bytes(m.console).startswith(b"count 03\n")


def test_reset_in_place_runs_the_guest_again() -> None:
    with Machine(mem_size=16 << 20, backend="soft") as m:
        m.boot(guest("long_hello"), mode="long")
        first = m.run(timeout=10)
        m.reset()
        m.boot(guest("long_hello"), mode="long")
        second = m.run(timeout=10)
        assert first.exit_code == second.exit_code == 0
        assert bytes(m.console).count(b"long mode OK") == 2


def test_cli_accel_soft_and_auto() -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [sys.executable, "-m", "kvmpy", *args], capture_output=True, timeout=60, cwd=ROOT
        )

    soft = cli("run", "--accel", "soft", "-v", str(guest("real_hello")))
    assert soft.returncode == 1
    assert soft.stdout.startswith(b"Hello from real mode!")
    assert b"kvmpy: accelerator: soft" in soft.stderr
    auto = cli("run", "--accel", "auto", "-v", str(guest("real_hello")))
    assert auto.returncode == 1
    assert b"kvmpy: accelerator: " in auto.stderr
    info = cli("info")
    assert b"software backend: Unicorn" in info.stdout
    assert info.stdout.count(b"\n\n") >= 1  # KVM's section (or why not), then soft's
    bad = cli("run", "--accel", "soft", "--cpus", "2", str(guest("real_hello")))
    assert bad.returncode == 2
    assert bad.stderr.startswith(b"kvmpy: error:") and b"lacks irqchip" in bad.stderr


# -- event delivery, without the emulator ------------------------------------------------


class FakeCpu:
    """Flat memory and a CPU state, for events.deliver."""

    def __init__(self, frame: events.Frame) -> None:
        self.memory = bytearray(0x10000)
        self.state = frame
        self.jumps: list[tuple[int, int, int]] = []

    def frame(self) -> events.Frame:
        return self.state

    def read_linear(self, address: int, size: int) -> bytes:
        if address + size > len(self.memory):
            raise events.Fault(events.PAGE_FAULT, 0)
        return bytes(self.memory[address : address + size])

    def write_linear(self, address: int, data: bytes) -> None:
        if address + len(data) > len(self.memory):
            raise events.Fault(events.PAGE_FAULT, 2)
        self.memory[address : address + len(data)] = data

    def jump(self, cs: Segment, rip: int, rsp: int, rflags: int, ss: Segment | None) -> None:
        self.jumps.append((cs.selector, rip, rsp))


def protected_frame(idt_limit: int) -> events.Frame:
    flat_code = Segment(selector=0x10, limit=0xFFFFFFFF, type=0xB, db=1, g=1)
    flat_data = Segment(selector=0x18, limit=0xFFFFFFFF, type=0x3, db=1, g=1)
    return events.Frame(
        cr0=1, efer=0, rip=0x1234, rsp=0x8000, rflags=0x202, cs=flat_code, ss=flat_data,
        idt_base=0x1000, idt_limit=idt_limit, gdt_base=0x500, gdt_limit=0x1F, tr_base=0,
    )  # fmt: skip


def test_no_idt_escalates_to_a_double_fault_and_then_shuts_down() -> None:
    cpu = FakeCpu(protected_frame(idt_limit=0))
    assert events.deliver(cpu, events.GENERAL_PROTECTION, 0) is events.Result.SHUTDOWN
    assert cpu.jumps == []


def test_protected_mode_interrupt_gate_pushes_the_frame_and_error_code() -> None:
    cpu = FakeCpu(protected_frame(idt_limit=0x7FF))
    code_descriptor = 0x00CF9B000000FFFF
    cpu.memory[0x510:0x518] = code_descriptor.to_bytes(8, "little")
    gate = 0x5678 | 0x10 << 16 | 0x8E00 << 32 | 0x0000 << 48  # interrupt gate to 0x10:0x5678
    cpu.memory[0x1000 + 13 * 8 : 0x1000 + 14 * 8] = gate.to_bytes(8, "little")
    assert events.deliver(cpu, events.GENERAL_PROTECTION, 0x28) is events.Result.DELIVERED
    assert cpu.jumps == [(0x10, 0x5678, 0x8000 - 16)]
    frame = [int.from_bytes(cpu.memory[0x8000 - 16 + 4 * i : 0x8000 - 12 + 4 * i], "little")
             for i in range(4)]  # fmt: skip
    assert frame == [0x28, 0x1234, 0x10, 0x10202]  # error code, EIP, CS, EFLAGS with RF (a fault)


def test_a_not_present_gate_is_a_segment_fault_then_a_double_fault() -> None:
    cpu = FakeCpu(protected_frame(idt_limit=0x7FF))
    cpu.memory[0x510:0x518] = (0x00CF9B000000FFFF).to_bytes(8, "little")
    df_gate = 0x4444 | 0x10 << 16 | 0x8E00 << 32
    cpu.memory[0x1000 + 8 * 8 : 0x1000 + 9 * 8] = df_gate.to_bytes(8, "little")
    # Vector 13's gate is empty (not present): #NP, contributory after #GP: #DF.
    assert events.deliver(cpu, events.GENERAL_PROTECTION, 0) is events.Result.DELIVERED
    assert cpu.jumps[-1][:2] == (0x10, 0x4444)


def test_gdb_session_of_the_tutorial_on_the_soft_backend(tmp_path: Path) -> None:
    # Tutorial step 9 (hbreak, registers, stepi, memory write) under the emulator.
    if shutil.which("gdb") is None:
        pytest.skip("gdb is not installed")
    err, out = tmp_path / "err", tmp_path / "out"
    command = (
        f"kvmpy run --accel soft --mode long guests/out/gdb_target.bin --gdb tcp::0 --gdb-wait"
        f" > {out} 2> {err} & until grep -qs waiting {err}; do sleep 0.1; done;"
        f" port=$(grep -o 'waiting for gdb on 127.0.0.1:[0-9]*' {err} | cut -d: -f2);"
        ' gdb -q -batch -ex "target remote :$port" -ex "hbreak store" -ex continue'
        ' -ex "info registers rax rdx" -ex stepi -ex "x/gx &counter"'
        ' -ex "set var *(long *)&counter = 0x2000" -ex continue guests/out/gdb_target.elf;'
        f" wait; cat {out}"
    )
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(
        ["bash", "-c", command], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env
    )
    assert result.stdout.splitlines()[-7:] == [
        "rax            0x1001              4097",
        "rdx            0x1                 1",
        "0x0000000000100023 in after_store ()",
        "0x1000a8 <counter>:\t0x0000000000001001",
        "[Inferior 1 (Remote target) exited normally]",
        "gdb_target: running",
        "counter=0000000000002000",
    ], result.stdout + result.stderr


def test_code_in_mmio_space_is_an_internal_error_with_a_report(assemble: Assembler) -> None:
    # KVM cannot run code from MMIO either: both end with an internal error, status 4.
    outcome, _ = run_soft(assemble("movabs $0xd0000000, %rax\njmp *%rax", "long"), "long")
    assert outcome.kind is OutcomeKind.CRASH
    assert outcome.status == STATUS_CRASH
    assert "the CPU emulator internal error: Unicorn:" in outcome.message
    assert outcome.report is not None and outcome.report.regs is not None
    assert outcome.report.regs.rip == 0xD0000000


def test_state_saved_by_another_backend_is_refused_in_one_error() -> None:
    with Machine(mem_size=1 << 20, backend="soft") as m:
        vcpu_state = m.vcpu.save_state()
        kvm_like = dict(vcpu_state, xsave="AAAA", lapic=None)
        with pytest.raises(BackendError, match="not saved by the software backend"):
            m.vcpu.load_state(kvm_like)
        with pytest.raises(BackendError, match="not saved by the software backend"):
            m.vm.load_state({"clock": "AAAA"})
        m.vcpu.load_state(vcpu_state)  # its own state loads


@pytest.mark.parametrize("mode", ["real", "protected", "long"])
@pytest.mark.parametrize("seed", range(8))
def test_random_code_ends_in_an_outcome_on_the_emulator(
    mode: str, seed: int, tmp_path: Path
) -> None:
    # Garbage exercises the event delivery paths (faults in every mode, #DF,
    # triple faults) and odd I/O: every run must end in an Outcome.
    image = tmp_path / "garbage.bin"
    image.write_bytes(random.Random(f"soft{mode}{seed}").randbytes(4096))
    with Machine(mem_size=16 << 20, backend="soft", strict=seed == 2) as m:
        m.load(load_flat(image, default_load_addr(mode)), mode=mode)
        outcome = m.run(timeout=1)
    assert outcome.kind.value in {
        "exit", "halt", "shutdown", "reset", "triple-fault", "crash", "timeout"
    }, outcome  # fmt: skip
    if outcome.report is not None:
        assert outcome.report.format().startswith("vCPU 0: ")
