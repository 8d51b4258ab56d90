"""Probe: how this host's KVM delivers events injected with KVM_SET_VCPU_EVENTS.

A 64-bit CPL0 guest runs one instruction KVM cannot emulate (int3, int $n),
and this script injects the event in several ways, with RIP left at the
instruction or advanced past it.  The guest's handler records the RIP and the
word below it that it found on its stack; the script prints what it saw.
Run: .venv/bin/python tools/probe_soft_events.py [INSN...]
(default: int3, int $0x80, int $13, int1).
"""

from __future__ import annotations

import struct
import subprocess
import sys
import tempfile
from pathlib import Path

from kvmpy.backends.exits import ExitKind
from kvmpy.backends.kvm.ioctls import Vcpu as KvmVcpu
from kvmpy.loaders.flat import load_flat
from kvmpy.machine import Machine

RESULT = 0x200000  # where the handler stores what it saw

SOURCE = r"""
    .code64
    .globl _start
_start:
    lea handler(%rip), %rax
    mov $256, %ecx
    lea idt(%rip), %rdi
1:  mov %ax, (%rdi)
    movw $0x10, 2(%rdi)
    movw $0xee00, 4(%rdi)       /* present, DPL 3, interrupt gate */
    mov %rax, %rdx
    shr $16, %rdx
    mov %dx, 6(%rdi)
    movl $0, 8(%rdi)
    add $16, %rdi
    add $16, %rax              /* each vector's stub is 16 bytes */
    loop 1b
    lidt idtr(%rip)
    mov $0x70000, %rsp
    movq $0x5a5a, (%rsp)
    sub $8, %rsp
    movq $0xa5a5, (%rsp)
probe:
    INSN
after:
    movq $1, 0x200018
    hlt
    .align 8
    .align 16
handler:
    .set vec, 0
    .rept 256
    .align 16
    pushq $vec
    jmp common
    .set vec, vec + 1
    .endr
common:
    /* stack: stub marker, [error code], rip, cs, rflags, rsp, ss */
    mov (%rsp), %rax
    mov %rax, 0x200000         /* which stub (vector, roughly) */
    mov 8(%rsp), %rax
    mov %rax, 0x200008         /* RIP or error code */
    mov 16(%rsp), %rax
    mov %rax, 0x200010         /* CS or RIP */
    incq 0x200020              /* handler entries */
    add $8, %rsp
    cmpq $0x10, 8(%rsp)
    je 2f
    add $8, %rsp               /* drop an error code */
2:  iretq
    .data
    .align 16
idtr: .word 256*16-1
    .quad idt
    .align 16
idt: .space 256*16
"""


def build(insn: str, workdir: Path) -> Path:
    src = workdir / "probe.S"
    src.write_text(SOURCE.replace("INSN", insn))
    obj, binary = workdir / "probe.o", workdir / "probe.bin"
    subprocess.run(["as", "--64", "-o", str(obj), str(src)], check=True)
    root = Path(__file__).resolve().parent.parent
    subprocess.run(
        ["ld", "-m", "elf_x86_64", "-T", str(root / "guests/long.ld"), "-o", str(binary), str(obj)],
        check=True,
    )
    return binary


def probe(insn: str, how: str, advance: bool, workdir: Path) -> str:
    image = build(insn, workdir)
    with Machine(mem_size=8 << 20, irqchip=False) as m:
        m.load(load_flat(image, 0x100000), mode="long")
        # The raw KVM vCPU: this probe sets kvm_vcpu_events fields the boundary does not name.
        vcpu = m.vcpu
        assert isinstance(vcpu, KvmVcpu)
        for _ in range(4):
            reason = vcpu.run()
            if reason != ExitKind.INTERNAL_ERROR:
                break
            _detail, _code = vcpu.describe_exit()
            regs = vcpu.get_regs()
            at = regs.rip
            length = len(insn_bytes(insn))
            if advance:
                regs.rip += length
                vcpu.set_regs(regs)
            vector = (
                int(insn.split("$")[1], 0)
                if "$" in insn
                else {"int3": 3, "into": 4, "int1": 1}[insn]
            )
            events = bytearray(vcpu.get_vcpu_events())
            if how == "exception":
                events[0:4] = bytes([1, vector, 0, 0])
            elif how == "exception+pending":
                events[0:4] = bytes([0, vector, 0, 1])
            elif how == "soft-interrupt":
                events[8:11] = bytes([1, vector, 1])
            elif how == "interrupt":
                events[8:11] = bytes([1, vector, 0])
            try:
                vcpu.set_vcpu_events(bytes(events))
            except OSError as exc:
                return f"set_vcpu_events failed: {exc}"
        else:
            seen = struct.unpack_from("<5Q", m.memory.read(RESULT, 40))
            return (
                f"still internal errors after 4 injections, handler entries={seen[4]} "
                f"[rsp+8]={seen[1]:#x}"
            )
        regs = vcpu.get_regs()
        seen = struct.unpack_from("<5Q", m.memory.read(RESULT, 40))
        if reason != ExitKind.HLT:
            return (
                f"entries={seen[4]} stub={seen[0]} [rsp+8]={seen[1]:#x} "
                f"exit {vcpu.exit_name()} {vcpu.describe_exit()} rip={regs.rip:#x}"
            )
        probe_at = at
        return (
            f"fault rip={probe_at:#x} stub={seen[0]} [rsp+8]={seen[1]:#x} [rsp+16]={seen[2]:#x} "
            f"reached-after={seen[3]} entries={seen[4]} final rip={regs.rip:#x}"
        )


def insn_bytes(insn: str) -> bytes:
    return {"int3": b"\xcc", "int1": b"\xf1", "into": b"\xce"}.get(insn, b"\xcd\x00")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        insns = sys.argv[1:] or ["int3", "int $0x80", "int $13", "int1"]
        for insn in insns:
            for how in ("exception", "soft-interrupt", "interrupt"):
                for advance in (False, True):
                    result = probe(insn, how, advance, workdir)
                    print(f"{insn:10} {how:15} rip {'after ' if advance else 'at    '}: {result}")


if __name__ == "__main__":
    main()
