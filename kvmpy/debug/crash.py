"""Crash reports: what a vCPU looked like when the guest died.

A ``CrashReport`` is plain data (tests assert on its fields) and formats
itself for people: registers, segments with their descriptor fields, control
registers decoded into flag names, the code around RIP with the faulting
instruction marked, and the top of the stack.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmpy.backends.base import BackendError
from kvmpy.debug.guestview import (
    capstone_mode,
    code_address,
    disassemble,
    disassemble_around,
    read_linear,
)
from kvmpy.records import Record, field
from kvmpy.x86.registers import (
    CR0_FLAG_NAMES,
    CR4_FLAG_NAMES,
    EFER_FLAG_NAMES,
    GPR_NAMES,
    RFLAGS_FLAG_NAMES,
    SEGMENT_NAMES,
    Regs,
    Sregs,
    cpu_mode,
    flag_names,
    segment_summary,
)

if TYPE_CHECKING:
    from kvmpy.backends.base import Vcpu
    from kvmpy.memory import GuestMemory

STACK_WORDS = 8


class CrashReport(Record, frozen=False):
    """A fatal guest event and the vCPU state that goes with it."""

    reason: str
    detail: str = ""
    vcpu: int = 0
    regs: Regs | None = None
    sregs: Sregs | None = None
    mode: str = "unknown"
    code_address: int = 0
    # The instruction KVM reported it could not run (internal errors), if any.
    code: bytes = b""
    # (address, length, text) around RIP; the one at code_address is the faulting one.
    instructions: list[tuple[int, int, str]] = field(default_factory=list)
    # (linear address, value) words from the top of the stack.
    stack: list[tuple[int, int]] = field(default_factory=list)

    @property
    def faulting_instruction(self) -> str:
        """The disassembly of the instruction at RIP ("" if unreadable)."""
        for address, _size, text in self.instructions:
            if address == self.code_address:
                return text
        return ""

    @property
    def capstone_mode(self) -> int:
        return capstone_mode(self.sregs) if self.sregs else capstone_mode(Sregs())

    def summary(self) -> str:
        """One line: what happened and where."""
        where = f" at RIP={self.regs.rip:#x}" if self.regs else ""
        detail = f": {self.detail}" if self.detail else ""
        return f"vCPU {self.vcpu}: {self.reason}{detail}{where} ({self.mode} mode)"

    def format(self) -> str:
        lines = [self.summary()]
        if self.regs:
            values = [(name, getattr(self.regs, name)) for name in GPR_NAMES]
            for i in range(0, len(values), 4):
                lines.append(
                    "  "
                    + "  ".join(
                        f"{name.upper():>3}={value:016x}" for name, value in values[i : i + 4]
                    )
                )
            flags = flag_names(self.regs.rflags, RFLAGS_FLAG_NAMES)
            lines.append(f"  RIP={self.regs.rip:016x}  RFLAGS={self.regs.rflags:#x} [{flags}]")
        if self.sregs:
            s = self.sregs
            lines.append(f"  CR0={s.cr0:#x} [{flag_names(s.cr0, CR0_FLAG_NAMES)}]")
            lines.append(f"  CR4={s.cr4:#x} [{flag_names(s.cr4, CR4_FLAG_NAMES)}]")
            lines.append(f"  EFER={s.efer:#x} [{flag_names(s.efer, EFER_FLAG_NAMES)}]")
            lines.append(f"  CR2={s.cr2:#x}  CR3={s.cr3:#x}  CR8={s.cr8:#x}")
            for name in SEGMENT_NAMES:
                lines.append(f"  {name.upper():<3} {segment_summary(getattr(s, name))}")
            lines.append(
                f"  GDT base={s.gdt.base:#x} limit={s.gdt.limit:#x}  "
                f"IDT base={s.idt.base:#x} limit={s.idt.limit:#x}"
            )
        if self.code:
            decoded = disassemble(self.code, self.code_address, self.capstone_mode, 1)
            shown = self.code[: decoded[0][1]] if decoded else self.code
            text = f" ({decoded[0][2]})" if decoded else ""
            lines.append(f"  KVM could not run: {shown.hex(' ')}{text}")
        if self.instructions:
            lines.append("  code:")
            for address, _size, text in self.instructions:
                marker = "=>" if address == self.code_address else "  "
                lines.append(f"  {marker} {address:#x}: {text}")
        elif self.regs:
            lines.append(f"  code at {self.code_address:#x}: unreadable")
        if self.stack:
            lines.append("  stack:")
            for address, value in self.stack:
                lines.append(f"     {address:#x}: {value:#x}")
        return "\n".join(lines)


def crash_report(
    vcpu: Vcpu, memory: GuestMemory, reason: str, detail: str = "", code: bytes | None = None
) -> CrashReport:
    """Gather a report from a stopped vCPU.  ``code``: the bytes KVM said it could not run."""
    report = CrashReport(reason=reason, detail=detail, vcpu=vcpu.index, code=code or b"")
    try:
        report.regs = regs = vcpu.get_regs()
        report.sregs = sregs = vcpu.get_sregs()
    except BackendError as exc:
        report.detail += f" (registers unavailable: {exc})"
        return report
    report.mode = cpu_mode(sregs)
    report.code_address = linear = code_address(sregs, regs.rip)
    report.instructions = disassemble_around(vcpu, memory, sregs, linear)
    if code and not any(address == linear for address, _, _ in report.instructions):
        # Guest memory is unreadable there: show at least what KVM handed us.
        report.instructions = disassemble(code, linear, report.capstone_mode, 1)
    report.stack = _stack(vcpu, memory, regs, sregs)
    return report


def _stack(vcpu: Vcpu, memory: GuestMemory, regs: Regs, sregs: Sregs) -> list[tuple[int, int]]:
    mode = cpu_mode(sregs)
    width = 8 if mode == "long" else (4 if sregs.ss.db else 2)
    mask = (1 << (8 * width)) - 1
    top = (regs.rsp & mask) if mode == "long" else (sregs.ss.base + (regs.rsp & mask)) & 0xFFFFFFFF
    try:
        raw = read_linear(vcpu, memory, sregs, top, STACK_WORDS * width)
    except BackendError:
        return []
    return [
        (top + at, int.from_bytes(raw[at : at + width], "little"))
        for at in range(0, len(raw) - width + 1, width)
    ]
