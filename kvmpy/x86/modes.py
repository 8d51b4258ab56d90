"""CPU mode setup as pure functions.

Each builder takes the vCPU's reset-state ``Sregs`` and returns a ``CpuSetup``:
the registers to load and the bytes (GDT, page tables) to place in guest RAM.
Nothing here touches KVM or guest memory, so it can be read next to the Intel
SDM (Vol. 3A, chapters 3, 4 and 9) and tested with plain asserts.

Low-memory layout used by the builders (all below the 1 MiB load address):

    0x00000-0x004ff  real-mode IVT and BIOS data area (left zero)
    0x00500-0x0052f  GDT
    0x01000-0x06fff  page tables (long mode: PML4, PDPT, 4 PDs; paged32: one PD)
    0x07c00          default load address in real mode (stack grows down below it)
    0x80000          initial stack top in protected and long mode
    0x100000         default load address in protected and long mode
"""

from __future__ import annotations

import struct
from typing import Any

from kvmpy.records import Record, field, replace
from kvmpy.x86.registers import (
    CR0_CD,
    CR0_EM,
    CR0_ET,
    CR0_MP,
    CR0_NE,
    CR0_NW,
    CR0_PE,
    CR0_PG,
    CR4_OSFXSR,
    CR4_OSXMMEXCPT,
    CR4_PAE,
    CR4_PSE,
    EFER_LMA,
    EFER_LME,
    RFLAGS_RESERVED,
    DTable,
    Regs,
    Segment,
    Sregs,
)

MODES = ("real", "protected", "paged32", "long")

GDT_ADDR = 0x500
PAGE_TABLE_ADDR = 0x1000
PAGE_TABLE_END = 0x7000
REAL_MODE_LOAD_ADDR = 0x7C00
REAL_MODE_STACK = 0x7C00
STACK_TOP = 0x80000
LOAD_ADDR = 0x100000

# Selectors follow the Linux boot protocol (__BOOT_CS = 0x10, __BOOT_DS = 0x18),
# so the same GDT serves kernels that expect it.
CODE_SELECTOR = 0x10
DATA_SELECTOR = 0x18

# Descriptor access bytes: present, DPL 0, code/data, and the type.
ACCESS_CODE = 0x9B  # execute/read, accessed
ACCESS_DATA = 0x93  # read/write, accessed
# Descriptor flag nibbles (G, D/B, L, AVL).
FLAGS_CODE64 = 0xA  # 4 KiB granularity, long mode
FLAGS_32 = 0xC  # 4 KiB granularity, 32-bit default size

PTE_PRESENT = 1 << 0
PTE_WRITABLE = 1 << 1
PTE_HUGE = 1 << 7  # PS: 2 MiB (PAE) or 4 MiB (32-bit) page
TWO_MIB = 2 << 20
FOUR_MIB = 4 << 20
ONE_GIB = 1 << 30
IDENTITY_MAP_SIZE = 4 << 30  # 4 GiB covers low RAM and the MMIO hole (LAPIC, IOAPIC)


class CpuSetup(Record, frozen=False):
    """Registers to load and guest memory to fill before the first KVM_RUN."""

    mode: str
    regs: Regs
    sregs: Sregs
    memory: list[tuple[int, bytes]] = field(default_factory=list)

    def reserved(self) -> list[tuple[int, int]]:
        """The (start, end) guest-physical ranges this setup occupies."""
        return [(gpa, gpa + len(data)) for gpa, data in self.memory]


def descriptor(base: int, limit: int, access: int, flags: int) -> int:
    """Encode a GDT segment descriptor (SDM Vol. 3A, 3.4.5)."""
    return (
        (limit & 0xFFFF)
        | (base & 0xFFFFFF) << 16
        | access << 40
        | ((limit >> 16) & 0xF) << 48
        | flags << 52
        | ((base >> 24) & 0xFF) << 56
    )


def segment_from_descriptor(selector: int, desc: int) -> Segment:
    """The hidden segment state the CPU loads for ``selector`` -> ``desc``."""
    access = (desc >> 40) & 0xFF
    flags = (desc >> 52) & 0xF
    limit = (desc & 0xFFFF) | ((desc >> 48) & 0xF) << 16
    granular = bool(flags & 0x8)
    return Segment(
        base=((desc >> 16) & 0xFFFFFF) | ((desc >> 56) & 0xFF) << 24,
        limit=(limit << 12) | 0xFFF if granular else limit,
        selector=selector,
        type=access & 0xF,
        present=(access >> 7) & 1,
        dpl=(access >> 5) & 3,
        s=(access >> 4) & 1,
        avl=flags & 1,
        l=(flags >> 1) & 1,
        db=(flags >> 2) & 1,
        g=int(granular),
    )


def _flat_gdt(code_flags: int) -> tuple[bytes, Segment, Segment]:
    """A GDT with a flat code and data segment; returns it and the loaded segments."""
    code = descriptor(0, 0xFFFFF, ACCESS_CODE, code_flags)
    data = descriptor(0, 0xFFFFF, ACCESS_DATA, FLAGS_32)
    table = [0, 0, code, data]
    gdt = struct.pack(f"<{len(table)}Q", *table)
    return (
        gdt,
        segment_from_descriptor(CODE_SELECTOR, code),
        segment_from_descriptor(DATA_SELECTOR, data),
    )


def _load_segments(base: Sregs, code: Segment, data: Segment, **changes: Any) -> Sregs:
    """``base`` with CS = ``code``, every data segment = ``data``, and ``changes``."""
    return replace(base, cs=code, ds=data, es=data, fs=data, gs=data, ss=data, **changes)


def _with_segments(base: Sregs, code: Segment, data: Segment, gdt_size: int) -> Sregs:
    return _load_segments(base, code, data, gdt=DTable(GDT_ADDR, gdt_size - 1), idt=DTable(0, 0))


def _protected_cr0(base: Sregs) -> int:
    # Caches on, x87 error reporting native, SSE usable (MP set, EM clear).
    return (base.cr0 | CR0_PE | CR0_ET | CR0_NE | CR0_MP) & ~(CR0_CD | CR0_NW | CR0_EM)


def real_mode(base: Sregs, entry: int = REAL_MODE_LOAD_ADDR) -> CpuSetup:
    """16-bit real mode with every segment at the 64 KiB block holding ``entry``.

    The entry 0x7c00 gives CS:IP = 0000:7C00, as a BIOS starts a boot sector.
    """
    if not 0 <= entry < 0x100000:
        raise ValueError(f"real-mode entry {entry:#x} is above 1 MiB")
    selector = (entry >> 4) & 0xF000
    code = Segment(base=selector << 4, limit=0xFFFF, selector=selector, type=0xB)
    data = Segment(base=selector << 4, limit=0xFFFF, selector=selector, type=0x3)
    sregs = _load_segments(base, code, data, cr0=base.cr0 & ~(CR0_PE | CR0_PG), efer=0)
    regs = Regs(rip=entry - (selector << 4), rsp=REAL_MODE_STACK, rflags=RFLAGS_RESERVED)
    return CpuSetup("real", regs, sregs)


def real_mode_vector(base: Sregs, vector: int) -> CpuSetup:
    """Real mode at CS:IP = (vector >> 4):(vector & 0xF): how ACPI resumes from S3."""
    if not 0 <= vector < 0x100000:
        raise ValueError(f"real-mode vector {vector:#x} is above 1 MiB")
    selector = vector >> 4
    code = Segment(base=selector << 4, limit=0xFFFF, selector=selector, type=0xB)
    data = Segment(base=0, limit=0xFFFF, selector=0, type=0x3)
    sregs = _load_segments(base, code, data, cr0=base.cr0 & ~(CR0_PE | CR0_PG), efer=0)
    regs = Regs(rip=vector & 0xF, rsp=0, rflags=RFLAGS_RESERVED)
    return CpuSetup("real", regs, sregs)


def protected_mode(base: Sregs, entry: int, stack: int = STACK_TOP) -> CpuSetup:
    """32-bit flat protected mode, paging off."""
    gdt, code, data = _flat_gdt(FLAGS_32)
    sregs = replace(
        _with_segments(base, code, data, len(gdt)),
        cr0=_protected_cr0(base) & ~CR0_PG,
        cr4=CR4_OSFXSR | CR4_OSXMMEXCPT,
        efer=0,
    )
    regs = Regs(rip=entry, rsp=stack, rflags=RFLAGS_RESERVED)
    return CpuSetup("protected", regs, sregs, [(GDT_ADDR, gdt)])


def paged32_page_directory() -> bytes:
    """One page directory of 4 MiB pages identity-mapping 4 GiB (needs CR4.PSE)."""
    entries = [(i * FOUR_MIB) | PTE_PRESENT | PTE_WRITABLE | PTE_HUGE for i in range(1024)]
    return struct.pack("<1024I", *entries)


def paged32_mode(base: Sregs, entry: int, stack: int = STACK_TOP) -> CpuSetup:
    """32-bit protected mode with paging: 4 MiB identity-mapped pages."""
    setup = protected_mode(base, entry, stack)
    sregs = replace(
        setup.sregs,
        cr0=setup.sregs.cr0 | CR0_PG,
        cr3=PAGE_TABLE_ADDR,
        cr4=setup.sregs.cr4 | CR4_PSE,
    )
    memory = [*setup.memory, (PAGE_TABLE_ADDR, paged32_page_directory())]
    return CpuSetup("paged32", setup.regs, sregs, memory)


def long_mode_page_tables(root: int = PAGE_TABLE_ADDR) -> bytes:
    """PML4, PDPT and four page directories of 2 MiB pages identity-mapping 4 GiB.

    Laid out as consecutive 4 KiB pages starting at ``root``.
    """
    pdpt_addr, pd_addr = root + 0x1000, root + 0x2000
    directories = IDENTITY_MAP_SIZE // ONE_GIB
    pml4 = struct.pack("<Q", pdpt_addr | PTE_PRESENT | PTE_WRITABLE).ljust(0x1000, b"\0")
    pdpt = struct.pack(
        f"<{directories}Q",
        *((pd_addr + i * 0x1000) | PTE_PRESENT | PTE_WRITABLE for i in range(directories)),
    ).ljust(0x1000, b"\0")
    pds = struct.pack(
        f"<{directories * 512}Q",
        *(i * TWO_MIB | PTE_PRESENT | PTE_WRITABLE | PTE_HUGE for i in range(directories * 512)),
    )
    tables = pml4 + pdpt + pds
    assert len(tables) <= PAGE_TABLE_END - PAGE_TABLE_ADDR  # fits the slot long_mode() uses
    return tables


def long_mode(base: Sregs, entry: int, stack: int = STACK_TOP) -> CpuSetup:
    """64-bit long mode: EFER.LME/LMA, PAE paging with the identity map, CS.L=1."""
    gdt, code, data = _flat_gdt(FLAGS_CODE64)
    sregs = replace(
        _with_segments(base, code, data, len(gdt)),
        cr0=_protected_cr0(base) | CR0_PG,
        cr3=PAGE_TABLE_ADDR,
        cr4=CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT,
        efer=EFER_LME | EFER_LMA,
    )
    regs = Regs(rip=entry, rsp=stack, rflags=RFLAGS_RESERVED)
    memory = [(GDT_ADDR, gdt), (PAGE_TABLE_ADDR, long_mode_page_tables())]
    return CpuSetup("long", regs, sregs, memory)


def setup_mode(mode: str, base: Sregs, entry: int) -> CpuSetup:
    """Dispatch on a mode name from ``MODES``."""
    if mode == "real":
        return real_mode(base, entry)
    if mode == "protected":
        return protected_mode(base, entry)
    if mode == "paged32":
        return paged32_mode(base, entry)
    if mode == "long":
        return long_mode(base, entry)
    raise ValueError(f"unknown CPU mode {mode!r} (choose from {', '.join(MODES)})")


def default_load_addr(mode: str) -> int:
    return REAL_MODE_LOAD_ADDR if mode == "real" else LOAD_ADDR
