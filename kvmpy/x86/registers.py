"""x86 register state as plain records (kvmpy.records) (no KVM, no cffi).

Field names follow ``struct kvm_regs`` / ``struct kvm_sregs`` so the ioctl
layer can convert by name, and so code here reads like the Intel SDM.
"""

from __future__ import annotations

from typing import Any

from kvmpy.records import Record, field, fields

GPR_NAMES = (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
)  # fmt: skip

# RFLAGS bit 1 is reserved and always reads as 1.
RFLAGS_RESERVED = 1 << 1
RFLAGS_IF = 1 << 9
RFLAGS_TF = 1 << 8

CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_EM = 1 << 2
CR0_TS = 1 << 3
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR0_AM = 1 << 18
CR0_NW = 1 << 29
CR0_CD = 1 << 30
CR0_PG = 1 << 31

CR4_PSE = 1 << 4
CR4_PAE = 1 << 5
CR4_PGE = 1 << 7
CR4_OSFXSR = 1 << 9
CR4_OSXMMEXCPT = 1 << 10

EFER_SCE = 1 << 0
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11


class Regs(Record, frozen=False):
    """General-purpose registers, RIP and RFLAGS."""

    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    rsp: int = 0
    rbp: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0
    rip: int = 0
    rflags: int = RFLAGS_RESERVED


class Segment(Record, frozen=False):
    """A segment register with its hidden descriptor cache."""

    base: int = 0
    limit: int = 0xFFFF
    selector: int = 0
    type: int = 0
    present: int = 1
    dpl: int = 0
    db: int = 0
    s: int = 1
    l: int = 0  # noqa: E741 - the field's name in the SDM and in kvm.h
    g: int = 0
    avl: int = 0
    unusable: int = 0


class DTable(Record, frozen=False):
    """GDTR or IDTR."""

    base: int = 0
    limit: int = 0xFFFF


class Sregs(Record, frozen=False):
    """Segment, control and descriptor-table registers."""

    cs: Segment = field(default_factory=Segment)
    ds: Segment = field(default_factory=Segment)
    es: Segment = field(default_factory=Segment)
    fs: Segment = field(default_factory=Segment)
    gs: Segment = field(default_factory=Segment)
    ss: Segment = field(default_factory=Segment)
    tr: Segment = field(default_factory=Segment)
    ldt: Segment = field(default_factory=Segment)
    gdt: DTable = field(default_factory=DTable)
    idt: DTable = field(default_factory=DTable)
    cr0: int = 0
    cr2: int = 0
    cr3: int = 0
    cr4: int = 0
    cr8: int = 0
    efer: int = 0
    apic_base: int = 0
    interrupt_bitmap: tuple[int, ...] = (0, 0, 0, 0)


SEGMENT_NAMES = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
DTABLE_NAMES = ("gdt", "idt")
CONTROL_NAMES = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")
SEGMENT_FIELDS = tuple(f.name for f in fields(Segment))


def cpu_mode(sregs: Sregs) -> str:
    """Name the mode the CPU is in: real, protected, paged32, pae32, long, compat."""
    if not sregs.cr0 & CR0_PE:
        return "real"
    if sregs.efer & EFER_LMA:
        return "long" if sregs.cs.l else "compat"
    if sregs.cr0 & CR0_PG:
        return "pae32" if sregs.cr4 & CR4_PAE else "paged32"
    return "protected"


# Flag names by bit, for decoding control registers in reports.
CR0_FLAG_NAMES = {
    0: "PE", 1: "MP", 2: "EM", 3: "TS", 4: "ET", 5: "NE", 16: "WP", 18: "AM",
    29: "NW", 30: "CD", 31: "PG",
}  # fmt: skip
CR4_FLAG_NAMES = {
    0: "VME", 1: "PVI", 2: "TSD", 3: "DE", 4: "PSE", 5: "PAE", 6: "MCE", 7: "PGE",
    8: "PCE", 9: "OSFXSR", 10: "OSXMMEXCPT", 11: "UMIP", 12: "LA57", 13: "VMXE",
    14: "SMXE", 16: "FSGSBASE", 17: "PCIDE", 18: "OSXSAVE", 20: "SMEP", 21: "SMAP",
    22: "PKE",
}  # fmt: skip
EFER_FLAG_NAMES = {0: "SCE", 8: "LME", 10: "LMA", 11: "NXE", 12: "SVME", 14: "FFXSR"}
RFLAGS_FLAG_NAMES = {
    0: "CF", 2: "PF", 4: "AF", 6: "ZF", 7: "SF", 8: "TF", 9: "IF", 10: "DF", 11: "OF",
    14: "NT", 16: "RF", 17: "VM", 18: "AC", 19: "VIF", 20: "VIP", 21: "ID",
}  # fmt: skip


def flag_names(value: int, names: dict[int, str]) -> str:
    """The set bits of ``value`` by name, e.g. "PE|ET|PG" (empty when none)."""
    return "|".join(name for bit, name in sorted(names.items()) if value >> bit & 1)


def segment_summary(segment: Segment) -> str:
    """A segment register and its descriptor fields, in one line."""
    if segment.unusable or not segment.present:
        state = "unusable" if segment.unusable else "not present"
        return f"{segment.selector:04x} ({state})"
    kind = (
        ("code" if segment.type & 0x8 else "data") if segment.s else f"system type {segment.type}"
    )
    size = "64-bit" if segment.l else ("32-bit" if segment.db else "16-bit")
    return (
        f"{segment.selector:04x} base={segment.base:#x} limit={segment.limit:#x} "
        f"type={segment.type:#x} {kind} dpl={segment.dpl} {size}{' g' if segment.g else ''}"
    )


class Fpu(Record, frozen=False):
    """x87/SSE state from ``struct kvm_fpu``."""

    fcw: int = 0x37F
    fsw: int = 0
    ftwx: int = 0
    last_opcode: int = 0
    last_ip: int = 0
    last_dp: int = 0
    mxcsr: int = 0x1F80
    fpr: bytes = bytes(128)
    xmm: bytes = bytes(256)


def sregs_from_dict(data: dict[str, Any]) -> Sregs:
    """The inverse of ``records.asdict`` for ``Sregs`` (snapshots store them so)."""
    fields: dict[str, Any] = {}
    for name, value in data.items():
        if name in ("gdt", "idt"):
            fields[name] = DTable(**value)
        elif isinstance(value, dict):
            fields[name] = Segment(**value)
        elif name == "interrupt_bitmap":
            fields[name] = tuple(value)
        else:
            fields[name] = value
    return Sregs(**fields)
