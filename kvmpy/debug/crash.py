"""Crash reports: what a vCPU looked like when the guest died."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvmpy.debug.guestview import capstone_mode, code_address, disassemble, read_linear
from kvmpy.kvm import KvmError
from kvmpy.x86.registers import GPR_NAMES, Regs, Sregs, cpu_mode

if TYPE_CHECKING:
    from kvmpy.kvm import Vcpu
    from kvmpy.memory import GuestMemory

CODE_BYTES = 32


@dataclass
class CrashReport:
    """A fatal guest event and the vCPU state that goes with it."""

    reason: str
    detail: str = ""
    vcpu: int = 0
    regs: Regs | None = None
    sregs: Sregs | None = None
    mode: str = "unknown"
    code_address: int = 0
    code: bytes = b""
    instructions: list[tuple[int, int, str]] = field(default_factory=list)

    def summary(self) -> str:
        """One line: what happened and where."""
        where = f" at RIP={self.regs.rip:#x}" if self.regs else ""
        detail = f": {self.detail}" if self.detail else ""
        return f"vCPU {self.vcpu}: {self.reason}{detail}{where} ({self.mode} mode)"

    def format(self) -> str:
        lines = [self.summary()]
        if self.regs:
            values = [(name, getattr(self.regs, name)) for name in (*GPR_NAMES, "rip", "rflags")]
            for i in range(0, len(values), 4):
                lines.append(
                    "  "
                    + "  ".join(
                        f"{name.upper():>3}={value:016x}" for name, value in values[i : i + 4]
                    )
                )
        if self.sregs:
            s = self.sregs
            lines.append(
                f"  CR0={s.cr0:#x} CR2={s.cr2:#x} CR3={s.cr3:#x} CR4={s.cr4:#x} EFER={s.efer:#x}"
            )
            lines.append(
                "  "
                + " ".join(
                    f"{name.upper()}={getattr(s, name).selector:04x}"
                    for name in ("cs", "ds", "ss", "es")
                )
                + f" GDT={s.gdt.base:#x}/{s.gdt.limit:#x} IDT={s.idt.base:#x}/{s.idt.limit:#x}"
            )
        if self.instructions:
            for address, _size, text in self.instructions:
                marker = "=>" if address == self.code_address else "  "
                lines.append(f"  {marker} {address:#x}: {text}")
        elif self.regs:
            lines.append(f"  code at {self.code_address:#x}: {self.code.hex(' ') or 'unreadable'}")
        return "\n".join(lines)


def crash_report(
    vcpu: Vcpu, memory: GuestMemory, reason: str, detail: str = "", code: bytes | None = None
) -> CrashReport:
    """Gather a report from a stopped vCPU.  ``code`` overrides the bytes read at RIP."""
    report = CrashReport(reason=reason, detail=detail, vcpu=vcpu.index)
    try:
        report.regs = regs = vcpu.get_regs()
        report.sregs = sregs = vcpu.get_sregs()
    except KvmError as exc:
        report.detail += f" (registers unavailable: {exc})"
        return report
    report.mode = cpu_mode(sregs)
    report.code_address = code_address(sregs, regs.rip)
    try:
        report.code = (
            code
            if code is not None
            else read_linear(vcpu, memory, sregs, report.code_address, CODE_BYTES)
        )
    except KvmError:
        report.code = b""
    report.instructions = disassemble(report.code, report.code_address, capstone_mode(sregs), 4)
    return report
