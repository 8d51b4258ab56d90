"""Instruction completion under the real /dev/kvm, and what this host's KVM does.

The PVM pins record what tools/probe_soft_events.py found on this host; on
hardware KVM the instructions run and the pins do not apply (they skip, saying so).
"""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest

from kvmpy.backends.exits import ExitKind
from kvmpy.loaders.flat import load_flat
from kvmpy.machine import Machine
from kvmpy.x86.complete import _host_has_rdpru
from tests.helpers import ROOT, assembler, guest, host_kvm_module

pytestmark = pytest.mark.kvm

PVM_ONLY = "pins what PVM does with an instruction it cannot emulate; this host's KVM is {}"


def kvmpy_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvmpy", *args], capture_output=True, text=True, timeout=60, cwd=ROOT
    )


def test_complete64_passes_and_says_what_it_completed() -> None:
    image = str(guest("complete64"))
    done = kvmpy_cli("run", "--mode", "long", "--stats", "--trace=emulated", image)
    assert "complete64 OK: all checks passed" in done.stdout
    assert done.returncode == 1, done.stderr
    if host_kvm_module() == "kvm_pvm":
        assert "[vcpu0] COMPLETED  0x10011b  int3  (vector 3 through the IDT)" in done.stderr
        assert "completed instructions: " in done.stderr
        # 12 in the differential block, 2 faulting (#PF, #GP).
        assert " int3 1" in done.stderr and "popcnt 14" in done.stderr
        assert "COMPLETED  0x100206  popcnt rax, qword ptr [rsi]  (#PF)" in done.stderr
        # SSE and x87 arithmetic: one instruction each on the CPU emulator (the fallback).
        assert "movd xmm15, ecx  (one instruction on the CPU emulator)" in done.stderr
        assert "movd (emulator) 1" in done.stderr and "fistp (emulator) 5" in done.stderr


def test_x87env64_matches_the_cpu_and_says_what_it_completed() -> None:
    """fnstenv, fldenv, fnsave, frstor and the wait forms: exact images at CPL0, and
    at CPL3 (the CPU) the same images byte for byte (pointer fields masked)."""
    image = str(guest("x87env64"))
    done = kvmpy_cli("run", "--mode", "long", "--stats", "--trace=emulated", image)
    assert "x87env64 OK: all checks passed" in done.stdout, done.stdout + done.stderr
    assert done.returncode == 1, done.stderr
    if host_kvm_module() == "kvm_pvm":
        # Each one through completion, none through the CPU emulator.
        for counted in ("frstor 14", "fnstenv 13", "fnsave 8", "fldenv 3", "wait 6"):
            assert counted in done.stderr
        assert "fnsave (emulator)" not in done.stderr
        assert "(28-byte environment stored, exceptions masked)" in done.stderr
        assert "(94-byte state stored, FPU initialised)" in done.stderr
        assert "wait  (#MF)" in done.stderr and "(#NM)" in done.stderr
        assert "fnsave dword ptr [rdi]  (#PF)" in done.stderr


def test_x87env32_images_through_a_segment_base() -> None:
    done = kvmpy_cli("run", "--mode", "protected", "--stats", str(guest("x87env32")))
    assert "x87env32 OK: all checks passed" in done.stdout, done.stdout + done.stderr
    assert done.returncode == 1, done.stderr
    if host_kvm_module() == "kvm_pvm":
        assert "frstor 3, fnsave 2, fnstsw 2, fnstenv 1, fldenv 1" in done.stderr


def test_intn32_exception_tests_written_with_int_n_pass() -> None:
    """A test kernel in kvm-unit-tests' style: int3, int $n (no error code, also for
    8, 13, 14, 17), into, and a DPL-violating gate giving #GP, at CPL0 and CPL1."""
    done = kvmpy_cli("run", "--mode", "protected", "--stats", str(guest("intn32")))
    assert "intn32 OK: int3, int $n, into and the gate DPL check" in done.stdout, done.stderr
    assert done.returncode == 1, done.stderr
    if host_kvm_module() == "kvm_pvm":
        # Every one of them went through completion, the #GP from CPL1 included.
        assert "completed instructions: iretd 11, int 7, int3 2, into 1" in done.stderr


def test_no_complete_shows_the_hosts_raw_behaviour() -> None:
    if host_kvm_module() != "kvm_pvm":
        pytest.skip(PVM_ONLY.format(host_kvm_module() or "missing"))
    done = kvmpy_cli("run", "--mode", "long", "--no-complete", str(guest("complete64")))
    assert done.returncode == 4
    assert "KVM internal error" in done.stderr and "KVM could not run: cc (int3)" in done.stderr


def test_info_says_completion_and_its_fallback_are_on() -> None:
    done = kvmpy_cli("info")
    assert "instruction completion: on" in done.stdout
    assert "completion fallback: active" in done.stdout


# -- the probe's findings, pinned ----------------------------------------------------------


def _gate_to_handler(vector: int) -> str:
    """Long-mode code: IDT gate ``vector`` to ``handler`` (a 64-bit interrupt gate), lidt."""
    return f"""
    lea handler(%rip), %rax
    lea idt + {vector} * 16(%rip), %rdi
    mov %ax, (%rdi)
    movw $0x10, 2(%rdi)
    movw $0x8e00, 4(%rdi)
    shr $16, %rax
    mov %ax, 6(%rdi)
    lidt idtr(%rip)
"""


PROBE = (
    _gate_to_handler(3)
    + """probe:
    int3
    movq $1, 0x200008
    hlt
handler:
    incq 0x200010
    mov (%rsp), %rax
    mov %rax, 0x200000
    iretq
    .data
    .align 16
idtr: .word 256 * 16 - 1
    .quad idt
    .align 16
idt: .space 256 * 16
"""
)


def _int3_probe(tmp_path: Path, advance: bool, how: str) -> tuple[int, int, int, int, int]:
    """(exit kind, RIP of the int3, RIP the handler saw, reached after, handler entries)."""
    image = assembler(tmp_path)(PROBE, "long")
    with Machine(mem_size=4 << 20, irqchip=False) as m:
        m.load(load_flat(image, 0x100000), mode="long")
        vcpu = m.vcpu
        assert vcpu.run() == ExitKind.INTERNAL_ERROR
        at = vcpu.get_regs().rip
        if advance:
            regs = vcpu.get_regs()
            regs.rip += 1
            vcpu.set_regs(regs)
        if how == "interrupt":
            vcpu.inject_interrupt(3)
        else:
            vcpu.inject_exception(3)
        kind = vcpu.run()
        seen, after, entries = struct.unpack("<3Q", m.memory.read(0x200000, 24))
        return kind, at, seen, after, entries


@pytest.mark.parametrize("how", ["interrupt", "exception"])
def test_pvm_delivers_an_injected_event_with_rip_as_it_is(tmp_path: Path, how: str) -> None:
    if host_kvm_module() != "kvm_pvm":
        pytest.skip(PVM_ONLY.format(host_kvm_module() or "missing"))
    kind, at, seen, after, entries = _int3_probe(tmp_path, advance=True, how=how)
    # RIP advanced by kvmpy is what the handler sees, and iretq returns past the int3.
    assert (kind, seen, after, entries) == (ExitKind.HLT, at + 1, 1, 1)


def test_pvm_does_not_skip_the_instruction_itself(tmp_path: Path) -> None:
    if host_kvm_module() != "kvm_pvm":
        pytest.skip(PVM_ONLY.format(host_kvm_module() or "missing"))
    kind, at, seen, after, entries = _int3_probe(tmp_path, advance=False, how="interrupt")
    # The handler ran and returned to the int3, which failed again: no double advance.
    assert (kind, seen, after, entries) == (ExitKind.INTERNAL_ERROR, at, 0, 1)


def test_pvm_runs_lzcnt_as_bsr_without_an_exit(tmp_path: Path) -> None:
    """A host bug completion cannot fix: no exit, a wrong result (lzcnt 0 should be 32)."""
    if host_kvm_module() != "kvm_pvm":
        pytest.skip(PVM_ONLY.format(host_kvm_module() or "missing"))
    image = assembler(tmp_path)(
        "mov $0x55, %eax\n xor %ebx, %ebx\n lzcnt %ebx, %eax\n out %al, $0xf4\n", "long"
    )
    with Machine(mem_size=4 << 20, irqchip=False) as m:
        m.load(load_flat(image, 0x100000), mode="long")
        outcome = m.run(timeout=10)
    assert outcome.exit_code == 0x55  # bsr with a zero source leaves the destination
    assert m.arch.completer.counts == {}


@pytest.mark.parametrize(
    "instruction", ["fnstenv 0x200000", "fldenv 0x200000", "fnsave 0x200000", "frstor 0x200000"]
)
def test_pvm_cannot_emulate_the_x87_environment_instructions(
    tmp_path: Path, instruction: str
) -> None:
    """Why kvmpy completes them: with completion off, each one stops the vCPU."""
    if host_kvm_module() != "kvm_pvm":
        pytest.skip(PVM_ONLY.format(host_kvm_module() or "missing"))
    image = assembler(tmp_path)(f"fninit\n {instruction}\n hlt\n", "long")
    with Machine(mem_size=4 << 20, irqchip=False) as m:
        m.load(load_flat(image, 0x100000), mode="long")
        assert m.vcpu.run() == ExitKind.INTERNAL_ERROR
        assert m.vcpu.get_regs().rip == 0x100000 + 2  # past the fninit, at the instruction


RDPRU_PROBE = (
    _gate_to_handler(6)
    + """    xor %ecx, %ecx
probe:
    .byte 0x0f, 0x01, 0xfd
    mov $0x55, %al
    out %al, $0xf4
handler:
    lea probe(%rip), %rax
    cmp %rax, (%rsp)
    jne 1f
    mov $0x33, %al
    out %al, $0xf4
1:  mov $0x44, %al
    out %al, $0xf4
    .data
    .align 16
idtr: .word 256 * 16 - 1
    .quad idt
    .align 16
idt: .space 256 * 16
"""
)


def test_rdpru_answers_as_the_host_cpu_does(tmp_path: Path) -> None:
    """Capstone cannot decode rdpru, PVM cannot emulate it: kvmpy answers as the host CPU
    would at CPL3 (#UD where the host lacks RDPRU, as this one does)."""
    image = assembler(tmp_path)(RDPRU_PROBE, "long")
    with Machine(mem_size=4 << 20, irqchip=False) as m:
        m.load(load_flat(image, 0x100000), mode="long")
        outcome = m.run(timeout=10)
    if _host_has_rdpru():
        assert outcome.exit_code == 0x55  # read, and went on
    else:
        assert outcome.exit_code == 0x33  # #UD, with RIP at the rdpru
    if host_kvm_module() == "kvm_pvm":
        assert m.arch.completer.counts == {"rdpru": 1}


def test_compare_exchange_is_the_cpus_own_on_guest_ram() -> None:
    with Machine(mem_size=1 << 20, irqchip=False) as m:
        m.memory.write(0x3000, struct.pack("<QQ", 1, 2))
        view = m.memory.view(0x3000, 16)
        assert m.vcpu.compare_exchange(view, 2 << 64 | 1, 4 << 64 | 3) == (True, 2 << 64 | 1)
        assert m.vcpu.compare_exchange(view, 0, 5) == (False, 4 << 64 | 3)
        assert struct.unpack("<QQ", m.memory.read(0x3000, 16)) == (3, 4)
        assert m.vcpu.compare_exchange(m.memory.view(0x3004, 8), 4 << 32, 7) == (True, 4 << 32)
        with pytest.raises(OSError, match="alignment"):
            m.vcpu.compare_exchange(m.memory.view(0x3008, 16), 0, 0)


TSC_AND_ADX = """
    rdtscp
    mov %eax, %r8d
    shl $32, %rdx
    or %rdx, %r8
    mov %ecx, %r9d
    rdtscp
    shl $32, %rdx
    or %rax, %rdx
    cmp %r8, %rdx
    jbe fail
    cmp %r9d, %ecx
    jne fail
    mov %rcx, 0x200000
    /* adcx adds with CF and sets only CF; adox the same with OF. */
    mov $-1, %rax
    mov $1, %rbx
    stc
    adcx %rbx, %rax
    jnc fail
    cmp $1, %rax
    jne fail
    xor %ecx, %ecx
    mov $-1, %rax
    mov $2, %rbx
    adox %rbx, %rax
    jno fail
    jc fail
    cmp $1, %rax
    jne fail
    mov $0x0b, %al
    out %al, $0xf4
fail:
    mov $1, %al
    out %al, $0xf4
"""


def test_rdtscp_and_adx_complete_as_the_cpu_runs_them(tmp_path: Path) -> None:
    """PVM's emulator cannot run rdtscp (kvmpy reads the TSC and TSC_AUX from KVM) nor
    adcx/adox (the fallback runs them on an emulated CPU of the host's vendor)."""
    image = assembler(tmp_path)(TSC_AND_ADX, "long")
    with Machine(mem_size=4 << 20, irqchip=False) as m:
        m.load(load_flat(image, 0x100000), mode="long")
        outcome = m.run(timeout=30)
        assert outcome.exit_code == 0x0B, outcome
        aux = m.vcpu.get_msrs([0xC000_0103]).get(0xC000_0103, 0)
        assert struct.unpack("<Q", m.memory.read(0x200000, 8))[0] == aux & 0xFFFF_FFFF
    if host_kvm_module() == "kvm_pvm":
        counts = m.arch.completer.counts
        assert counts["rdtscp"] == 2
        assert sum(n for name, n in counts.items() if name.startswith("adcx")) == 1
        assert sum(n for name, n in counts.items() if name.startswith("adox")) == 1
