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


DESCRIPTOR_CHECKS = """
    mov $0x200000, %rdi
    mov %cs, %ax
    mov %ds, %bx
    mov $-1, %rdx
    mov %rdx, %rcx
    lar %ax, %rcx
    setz (%rdi)
    mov %rcx, 8(%rdi)
    mov %rdx, %rcx
    lsl %bx, %ecx
    setz 1(%rdi)
    mov %rcx, 16(%rdi)
    verr %ax
    setz 2(%rdi)
    verw %ax
    setz 3(%rdi)
    verw %bx
    setz 4(%rdi)
    xor %eax, %eax
    lar %ax, %rcx
    setz 5(%rdi)
    mov $0xfff8, %ax
    lsl %ax, %ecx
    setz 6(%rdi)
    mov $0x0b, %al
    out %al, $0xf4
"""


def test_descriptor_checks_complete_against_the_guests_gdt(tmp_path: Path) -> None:
    """PVM's emulator fails lar, lsl, verr and verw at CPL0; kvmpy reads the descriptors."""
    image = assembler(tmp_path)(DESCRIPTOR_CHECKS, "long")
    with Machine(mem_size=4 << 20, irqchip=False) as m:
        m.load(load_flat(image, 0x100000), mode="long")
        sregs = m.vcpu.get_sregs()
        gdt = m.memory.read(sregs.gdt.base, sregs.gdt.limit + 1)
        assert m.run(timeout=30).exit_code == 0x0B
        flags = m.memory.read(0x200000, 7)
        access, limit = struct.unpack("<2Q", m.memory.read(0x200008, 16))
    code = struct.unpack_from("<Q", gdt, sregs.cs.selector & ~7)[0]
    data = struct.unpack_from("<Q", gdt, sregs.ds.selector & ~7)[0]
    data_limit = data & 0xFFFF | (data >> 48 & 0xF) << 16
    if data >> 55 & 1:
        data_limit = data_limit << 12 | 0xFFF
    # lar cs, lsl ds, verr cs (readable code), verw cs (never), verw ds, null, past the GDT
    assert flags == bytes([1, 1, 1, 0, 1, 0, 0])
    assert access == code >> 32 & 0x00FFFF00
    assert limit == data_limit
    if host_kvm_module() == "kvm_pvm":
        counts = m.arch.completer.counts
        assert counts["lar"] == 2 and counts["lsl"] == 2
        assert counts["verr"] == 1 and counts["verw"] == 2


# -- the SHA extensions: kvmpy at CPL0 against the host CPU's own ---------------------------

SHA_INPUTS = (
    0x0123456789ABCDEF_FEDCBA9876543210,
    0x243F6A8885A308D3_13198A2E03707344,
    0xA4093822299F31D0_082EFA98EC4E6C89,
)
# (mnemonic and immediate, destination input, source input); xmm0 holds SHA_INPUTS[2].
SHA_CASES = [
    ("sha1rnds4 $0", 0, 1),
    ("sha1rnds4 $1", 0, 1),
    ("sha1rnds4 $2", 1, 0),
    ("sha1rnds4 $3", 1, 2),
    ("sha1nexte", 0, 1),
    ("sha1msg1", 0, 1),
    ("sha1msg2", 1, 2),
    ("sha256rnds2", 0, 1),
    ("sha256msg1", 0, 1),
    ("sha256msg2", 1, 2),
]


def _sha_guest() -> str:
    """Long mode: each case on xmm1 (destination) and xmm2, or a 16-byte memory source
    for the last; results stored at 0x200000 + 16 * case."""
    lines = ["    movdqu inputs + 32(%rip), %xmm0"]
    for index, (mnemonic, first, second) in enumerate(SHA_CASES):
        lines += [
            f"    movdqu inputs + {16 * first}(%rip), %xmm1",
            f"    movdqu inputs + {16 * second}(%rip), %xmm2",
        ]
        operands = "%xmm2, %xmm1" if index % 2 else f"inputs + {16 * second}(%rip), %xmm1"
        if mnemonic.startswith("sha1rnds4"):
            name, immediate = mnemonic.split()
            lines.append(f"    {name} {immediate}, {operands}")
        else:
            lines.append(f"    {mnemonic} {operands}")
        lines.append(f"    movdqu %xmm1, {0x200000 + 16 * index}")
    data = "".join(
        f"    .quad {value & (2**64 - 1):#x}, {value >> 64:#x}\n" for value in SHA_INPUTS
    )
    return "\n".join(
        [*lines, "    mov $0x0b, %al", "    out %al, $0xf4", "    .align 16", "inputs:", data]
    )


def _sha_native(tmp_path: Path) -> list[int]:
    """The same cases on the host CPU, through a small C program."""
    body = []
    for mnemonic, first, second in SHA_CASES:
        name, _, immediate = mnemonic.partition(" ")
        operand = f"{immediate}, %2, %0" if immediate else "%2, %0"
        extra = ', "Yz"(in[2])' if name == "sha256rnds2" else ""
        body.append(
            f"r = in[{first}]; "
            f'__asm__("{name} {operand}" : "+x"(r) : "x"(r), "x"(in[{second}]){extra}); '
            "out(r);"
        )
    values = ", ".join(
        f"{{{value & (2**64 - 1):#x}ULL, {value >> 64:#x}ULL}}" for value in SHA_INPUTS
    )
    source = f"""
#include <stdio.h>
#include <emmintrin.h>
static void out(__m128i r) {{ unsigned long long q[2]; _mm_storeu_si128((__m128i *)q, r);
    printf("%016llx%016llx\\n", q[1], q[0]); }}
int main(void) {{
    unsigned long long raw[3][2] = {{{values}}};
    __m128i in[3], r;
    for (int i = 0; i < 3; i++) in[i] = _mm_loadu_si128((__m128i *)raw[i]);
    {" ".join(body)}
    return 0;
}}
"""
    program = tmp_path / "sha_native"
    (tmp_path / "sha_native.c").write_text(source)
    subprocess.run(["cc", "-O1", "-o", str(program), str(tmp_path / "sha_native.c")], check=True)
    output = subprocess.run([str(program)], check=True, capture_output=True, text=True).stdout
    return [int(line, 16) for line in output.split()]


def test_sha_extensions_complete_as_the_host_cpu_computes_them(tmp_path: Path) -> None:
    from kvmpy.x86.complete import _host_flags

    if "sha_ni" not in _host_flags():
        pytest.skip("the host CPU has no SHA extensions to compare with (and guests see none)")
    image = assembler(tmp_path)(_sha_guest(), "long")
    with Machine(mem_size=4 << 20, irqchip=False) as m:
        m.load(load_flat(image, 0x100000), mode="long")
        sregs = m.vcpu.get_sregs()
        sregs.cr4 |= 1 << 9  # OSFXSR: SSE on
        m.vcpu.set_sregs(sregs)
        assert m.run(timeout=60).exit_code == 0x0B
        raw = m.memory.read(0x200000, 16 * len(SHA_CASES))
    guest = [int.from_bytes(raw[16 * i : 16 * i + 16], "little") for i in range(len(SHA_CASES))]
    native = _sha_native(tmp_path)
    assert [f"{value:032x}" for value in guest] == [f"{value:032x}" for value in native]
    if host_kvm_module() == "kvm_pvm":
        counts = m.arch.completer.counts
        assert sum(counts.get(name, 0) for name in ("sha1rnds4", "sha256rnds2")) == 5
