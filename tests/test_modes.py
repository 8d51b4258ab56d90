"""Unit tests for the CPU mode builders (kvmpy.x86.modes, kvmpy.x86.registers).

Everything here is pure: the builders return registers and bytes, and the
tests decode those bytes the way the CPU would (SDM Vol. 3A, chapters 3 and 4).
"""

from __future__ import annotations

import copy
import itertools
import struct
from collections.abc import Callable, Iterator

import pytest

from kvmpy import records
from kvmpy.memory import GuestMemory
from kvmpy.x86.modes import (
    CODE_SELECTOR,
    DATA_SELECTOR,
    GDT_ADDR,
    LOAD_ADDR,
    MODES,
    PAGE_TABLE_ADDR,
    PAGE_TABLE_END,
    REAL_MODE_LOAD_ADDR,
    STACK_TOP,
    CpuSetup,
    default_load_addr,
    descriptor,
    long_mode,
    long_mode_page_tables,
    paged32_mode,
    paged32_page_directory,
    protected_mode,
    real_mode,
    segment_from_descriptor,
    setup_mode,
)
from kvmpy.x86.registers import (
    CR0_AM,
    CR0_CD,
    CR0_EM,
    CR0_ET,
    CR0_MP,
    CR0_NE,
    CR0_NW,
    CR0_PE,
    CR0_PG,
    CR0_TS,
    CR0_WP,
    CR4_OSFXSR,
    CR4_OSXMMEXCPT,
    CR4_PAE,
    CR4_PGE,
    CR4_PSE,
    EFER_LMA,
    EFER_LME,
    EFER_SCE,
    RFLAGS_RESERVED,
    DTable,
    Regs,
    Segment,
    Sregs,
    cpu_mode,
)

FLAT_CODE64 = 0x00AF_9B00_0000_FFFF
FLAT_CODE32 = 0x00CF_9B00_0000_FFFF
FLAT_DATA = 0x00CF_9300_0000_FFFF
DATA_SEGMENTS = ("ds", "es", "fs", "gs", "ss")
ALL_SEGMENTS = ("cs", *DATA_SEGMENTS)

PRESENT = 1 << 0
WRITABLE = 1 << 1
HUGE = 1 << 7
ADDR_MASK_4K = 0x000F_FFFF_FFFF_F000
ADDR_MASK_2M = 0x000F_FFFF_FFE0_0000


def reset_sregs() -> Sregs:
    """Sregs as KVM reports them for a vCPU just after reset (SDM Vol. 3A, 9.1.1)."""
    code = Segment(base=0xFFFF_0000, limit=0xFFFF, selector=0xF000, type=0xB)
    data = Segment(base=0, limit=0xFFFF, selector=0, type=0x3)
    return Sregs(
        cs=code,
        ds=data,
        es=records.replace(data),
        fs=records.replace(data),
        gs=records.replace(data),
        ss=records.replace(data),
        tr=Segment(limit=0xFFFF, type=0xB, s=0),
        ldt=Segment(limit=0xFFFF, type=0x2, s=0),
        gdt=DTable(0, 0xFFFF),
        idt=DTable(0, 0xFFFF),
        cr0=CR0_CD | CR0_NW | CR0_ET,  # 0x60000010
        apic_base=0xFEE0_0900,
    )


def dirty_sregs() -> Sregs:
    """Reset state with bits a builder must clear (or keep) set."""
    return records.replace(
        reset_sregs(),
        cr0=CR0_CD | CR0_NW | CR0_ET | CR0_EM | CR0_PE | CR0_PG,
        cr4=CR4_PGE | CR4_PAE | CR4_PSE,
        efer=EFER_SCE | EFER_LME | EFER_LMA,
        cr2=0x1234,
        cr8=5,
    )


@pytest.fixture
def ram() -> Iterator[GuestMemory]:
    with GuestMemory.with_ram(1 << 20) as memory:
        yield memory


def place(setup: CpuSetup, memory: GuestMemory) -> None:
    for gpa, data in setup.memory:
        memory.write(gpa, data)


# -- descriptors ----------------------------------------------------------------------


def test_flat_descriptor_encodings() -> None:
    assert descriptor(0, 0xFFFFF, 0x9B, 0xA) == FLAT_CODE64
    assert descriptor(0, 0xFFFFF, 0x9B, 0xC) == FLAT_CODE32
    assert descriptor(0, 0xFFFFF, 0x93, 0xC) == FLAT_DATA


def test_descriptor_field_layout() -> None:
    desc = descriptor(0x1234_5678, 0xABCDE, 0x93, 0x4)
    assert desc == 0x124A_9334_5678_BCDE
    # Bytes 0-1 limit 15:0, 2-4 base 23:0, 5 access, 6 flags|limit 19:16, 7 base 31:24.
    assert struct.pack("<Q", desc) == bytes([0xDE, 0xBC, 0x78, 0x56, 0x34, 0x93, 0x4A, 0x12])


def test_segment_from_flat_code64() -> None:
    assert segment_from_descriptor(0x10, FLAT_CODE64) == Segment(
        base=0, limit=0xFFFF_FFFF, selector=0x10, type=0xB, present=1, dpl=0,
        db=0, s=1, l=1, g=1, avl=0, unusable=0,
    )  # fmt: skip


def test_segment_from_flat_data() -> None:
    assert segment_from_descriptor(0x18, FLAT_DATA) == Segment(
        base=0, limit=0xFFFF_FFFF, selector=0x18, type=0x3, present=1, dpl=0,
        db=1, s=1, l=0, g=1, avl=0, unusable=0,
    )  # fmt: skip


def test_segment_from_byte_granular_descriptor() -> None:
    seg = segment_from_descriptor(0x28, descriptor(0x0001_0000, 0xFFFF, 0x93, 0x0))
    assert (seg.base, seg.limit, seg.g, seg.db) == (0x10000, 0xFFFF, 0, 0)


def test_segment_from_descriptor_decodes_every_field() -> None:
    # Base 0xAB123456, limit 0x54321 (4 KiB units), not present, DPL 3, system
    # segment (S=0) of type 9 (available 64-bit TSS), G=1, AVL=1.
    desc = descriptor(0xAB12_3456, 0x54321, 0x69, 0x9)
    seg = segment_from_descriptor(0x2B, desc)
    assert seg == Segment(
        base=0xAB12_3456, limit=0x5432_1FFF, selector=0x2B, type=9, present=0, dpl=3,
        db=0, s=0, l=0, g=1, avl=1,
    )  # fmt: skip


def encode(seg: Segment) -> int:
    """Inverse of segment_from_descriptor."""
    access = seg.present << 7 | seg.dpl << 5 | seg.s << 4 | seg.type
    flags = seg.g << 3 | seg.db << 2 | seg.l << 1 | seg.avl
    limit = seg.limit >> 12 if seg.g else seg.limit
    return descriptor(seg.base, limit, access, flags)


@pytest.mark.parametrize(
    ("base", "limit", "access", "flags"),
    [
        (0, 0xFFFFF, 0x9B, 0xA),
        (0, 0xFFFFF, 0x93, 0xC),
        (0, 0xFFFFF, 0x9B, 0xC),
        (0xFFFF_FFFF, 0xFFFFF, 0xFF, 0xF),
        (0x0010_0000, 0x0FFFF, 0x9A, 0x0),
        (0x00AB_CDEF, 0x12345, 0xF3, 0x5),
        (0x8000_0000, 0x00000, 0x89, 0x8),
        (0, 0, 0, 0),
    ],
)
def test_descriptor_round_trip(base: int, limit: int, access: int, flags: int) -> None:
    desc = descriptor(base, limit, access, flags)
    seg = segment_from_descriptor(0x20, desc)
    assert seg.base == base
    assert seg.limit == ((limit << 12) | 0xFFF if flags & 0x8 else limit)
    assert seg.type == access & 0xF
    assert seg.s == (access >> 4) & 1
    assert seg.dpl == (access >> 5) & 3
    assert seg.present == access >> 7
    assert (seg.g, seg.db, seg.l, seg.avl) == (
        flags >> 3,
        (flags >> 2) & 1,
        (flags >> 1) & 1,
        flags & 1,
    )
    assert encode(seg) == desc


# -- real mode ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "selector", "ip"),
    [
        (0x7C00, 0x0000, 0x7C00),
        (0x10000, 0x1000, 0x0000),
        (0x12345, 0x1000, 0x2345),
        (0x0, 0x0000, 0x0000),
        (0xFFFFF, 0xF000, 0xFFFF),
        (0x9FFF0, 0x9000, 0xFFF0),
    ],
)
def test_real_mode_cs_ip(entry: int, selector: int, ip: int) -> None:
    setup = real_mode(reset_sregs(), entry)
    assert setup.mode == "real"
    assert (setup.sregs.cs.selector, setup.regs.rip) == (selector, ip)
    assert setup.sregs.cs.base == selector << 4
    assert setup.sregs.cs.base + setup.regs.rip == entry
    for name in DATA_SEGMENTS:
        seg = getattr(setup.sregs, name)
        assert (seg.selector, seg.base, seg.limit, seg.type) == (selector, selector << 4, 0xFFFF, 3)


def test_real_mode_default_entry_is_boot_sector() -> None:
    setup = real_mode(reset_sregs())
    assert setup.sregs.cs == Segment(base=0, limit=0xFFFF, selector=0, type=0xB)
    assert setup.regs == Regs(rip=0x7C00, rsp=0x7C00, rflags=RFLAGS_RESERVED)
    assert setup.regs.rflags == 0x2
    assert setup.memory == []
    assert setup.reserved() == []


def test_real_mode_segments_are_16_bit() -> None:
    setup = real_mode(dirty_sregs(), 0x7C00)
    for name in ALL_SEGMENTS:
        seg = getattr(setup.sregs, name)
        assert (seg.db, seg.l, seg.g, seg.present, seg.s, seg.dpl) == (0, 0, 0, 1, 1, 0), name


def test_real_mode_clears_pe_pg_and_efer() -> None:
    base = dirty_sregs()
    setup = real_mode(base, 0x7C00)
    assert setup.sregs.cr0 & (CR0_PE | CR0_PG) == 0
    assert setup.sregs.cr0 == CR0_CD | CR0_NW | CR0_ET | CR0_EM
    assert setup.sregs.efer == 0
    assert cpu_mode(setup.sregs) == "real"


@pytest.mark.parametrize("entry", [0x100000, 0x1000000, -1])
def test_real_mode_rejects_entry_outside_first_mib(entry: int) -> None:
    with pytest.raises(ValueError, match="above 1 MiB") as info:
        real_mode(reset_sregs(), entry)
    assert f"{entry:#x}" in str(info.value)


# -- protected and paged32 ---------------------------------------------------------------


def check_gdt(setup: CpuSetup, memory: GuestMemory, code_desc: int) -> None:
    """The GDT in guest RAM holds descriptors that load exactly the hidden segments."""
    sregs = setup.sregs
    assert sregs.gdt == DTable(GDT_ADDR, 4 * 8 - 1)
    assert sregs.idt == DTable(0, 0)
    gdt = memory.read(sregs.gdt.base, sregs.gdt.limit + 1)
    assert struct.unpack("<4Q", gdt) == (0, 0, code_desc, FLAT_DATA)
    for name in ALL_SEGMENTS:
        seg = getattr(sregs, name)
        assert seg.selector & 7 == 0  # GDT, RPL 0
        assert seg.selector + 7 <= sregs.gdt.limit
        (desc,) = struct.unpack_from("<Q", gdt, seg.selector)
        assert segment_from_descriptor(seg.selector, desc) == seg, name
    assert sregs.cs.selector == CODE_SELECTOR == 0x10
    for name in DATA_SEGMENTS:
        assert getattr(sregs, name).selector == DATA_SELECTOR == 0x18


def check_32bit_segments(sregs: Sregs) -> None:
    for name in ALL_SEGMENTS:
        seg = getattr(sregs, name)
        assert (seg.base, seg.limit, seg.db, seg.l, seg.g) == (0, 0xFFFF_FFFF, 1, 0, 1), name
    assert sregs.cs.type == 0xB
    assert all(getattr(sregs, name).type == 0x3 for name in DATA_SEGMENTS)


def test_protected_mode_control_registers() -> None:
    setup = protected_mode(reset_sregs(), 0x100000)
    sregs = setup.sregs
    assert setup.mode == "protected"
    assert sregs.cr0 == CR0_PE | CR0_MP | CR0_ET | CR0_NE == 0x33
    assert sregs.cr4 == CR4_OSFXSR | CR4_OSXMMEXCPT == 0x600
    assert sregs.efer == 0
    assert cpu_mode(sregs) == "protected"


def test_protected_mode_from_dirty_state() -> None:
    setup = protected_mode(dirty_sregs(), 0x100000)
    sregs = setup.sregs
    assert sregs.cr0 & (CR0_PE | CR0_NE | CR0_MP | CR0_ET) == CR0_PE | CR0_NE | CR0_MP | CR0_ET
    assert sregs.cr0 & (CR0_PG | CR0_EM | CR0_CD | CR0_NW) == 0
    assert sregs.cr4 == CR4_OSFXSR | CR4_OSXMMEXCPT
    assert sregs.efer == 0


def test_protected_mode_keeps_unrelated_cr0_bits() -> None:
    base = records.replace(reset_sregs(), cr0=CR0_WP | CR0_AM | CR0_TS)
    assert protected_mode(base, 0).sregs.cr0 == CR0_WP | CR0_AM | CR0_TS | 0x33


def test_protected_mode_registers_and_gdt(ram: GuestMemory) -> None:
    setup = protected_mode(reset_sregs(), 0x123456)
    assert setup.regs == Regs(rip=0x123456, rsp=STACK_TOP, rflags=RFLAGS_RESERVED)
    assert setup.regs.rsp == 0x80000
    assert [gpa for gpa, _ in setup.memory] == [GDT_ADDR]
    assert setup.reserved() == [(0x500, 0x520)]
    check_32bit_segments(setup.sregs)
    place(setup, ram)
    check_gdt(setup, ram, FLAT_CODE32)


def test_protected_mode_custom_stack() -> None:
    assert protected_mode(reset_sregs(), 0x100000, stack=0x9F000).regs.rsp == 0x9F000


def test_builders_do_not_mutate_the_base() -> None:
    base = dirty_sregs()
    before = copy.deepcopy(base)
    for mode in MODES:
        setup_mode(mode, base, 0x7C00)
    assert base == before


def test_builders_keep_unrelated_state() -> None:
    base = dirty_sregs()
    for mode in MODES:
        sregs = setup_mode(mode, base, 0x7C00).sregs
        assert sregs.tr == base.tr, mode
        assert sregs.ldt == base.ldt, mode
        assert (sregs.apic_base, sregs.cr2, sregs.cr8) == (0xFEE0_0900, 0x1234, 5), mode
        assert sregs.interrupt_bitmap == base.interrupt_bitmap


def test_paged32_control_registers() -> None:
    setup = paged32_mode(dirty_sregs(), 0x100000)
    sregs = setup.sregs
    assert setup.mode == "paged32"
    assert sregs.cr0 & (CR0_PE | CR0_PG | CR0_NE | CR0_MP) == CR0_PE | CR0_PG | CR0_NE | CR0_MP
    assert sregs.cr0 & (CR0_EM | CR0_CD | CR0_NW) == 0
    assert protected_mode(reset_sregs(), 0).sregs.cr0 | CR0_PG == 0x8000_0033
    assert paged32_mode(reset_sregs(), 0).sregs.cr0 == 0x8000_0033
    assert sregs.cr3 == PAGE_TABLE_ADDR == 0x1000
    assert sregs.cr4 == CR4_PSE | CR4_OSFXSR | CR4_OSXMMEXCPT
    assert sregs.cr4 & CR4_PAE == 0
    assert sregs.efer == 0
    assert cpu_mode(sregs) == "paged32"


def test_paged32_memory_and_gdt(ram: GuestMemory) -> None:
    setup = paged32_mode(reset_sregs(), 0x100000)
    assert setup.regs == Regs(rip=0x100000, rsp=STACK_TOP, rflags=RFLAGS_RESERVED)
    assert setup.reserved() == [(0x500, 0x520), (0x1000, 0x2000)]
    assert setup.memory[1] == (PAGE_TABLE_ADDR, paged32_page_directory())
    check_32bit_segments(setup.sregs)
    place(setup, ram)
    check_gdt(setup, ram, FLAT_CODE32)


def walk32(memory: GuestMemory, cr3: int, va: int) -> int:
    """Translate ``va`` through a 32-bit page directory of 4 MiB pages."""
    pde = memory.read_u32(cr3 + 4 * (va >> 22))
    assert pde & PRESENT, f"{va:#x}: PDE not present"
    assert pde & WRITABLE, f"{va:#x}: PDE read-only"
    assert pde & HUGE, f"{va:#x}: PDE is not a 4 MiB page"
    assert pde & 0x003F_E000 == 0, f"{va:#x}: PSE-36 high bits or reserved bits set"
    return (pde & 0xFFC0_0000) | (va & 0x003F_FFFF)


VIRTUAL_ADDRESSES = [0, 0x7C00, 0x80000 - 8, 0x100000, 0x3F_FFFF, 0x40_0000, 0xC000_0000,
                     0xFEC0_0000, 0xFEE0_0000, 0xFFFF_FFFF]  # fmt: skip


def test_paged32_identity_maps_4gib(ram: GuestMemory) -> None:
    setup = paged32_mode(reset_sregs(), 0x100000)
    place(setup, ram)
    for va in VIRTUAL_ADDRESSES:
        assert walk32(ram, setup.sregs.cr3, va) == va, hex(va)


def test_paged32_page_directory_entries() -> None:
    table = paged32_page_directory()
    assert len(table) == 4096
    entries = struct.unpack("<1024I", table)
    assert entries[0] == 0x0000_0083
    assert entries[1] == 0x0040_0083
    assert entries[0x3FB] == 0xFEC0_0083
    assert entries[1023] == 0xFFC0_0083
    assert all(entry == (i << 22) | 0x83 for i, entry in enumerate(entries))


# -- long mode --------------------------------------------------------------------------


def test_long_mode_control_registers() -> None:
    for base in (reset_sregs(), dirty_sregs()):
        sregs = long_mode(base, 0x100000).sregs
        assert sregs.cr0 & (CR0_PE | CR0_PG | CR0_NE | CR0_MP) == CR0_PE | CR0_PG | CR0_NE | CR0_MP
        assert sregs.cr0 & (CR0_EM | CR0_CD | CR0_NW) == 0
        assert sregs.cr3 == PAGE_TABLE_ADDR
        assert sregs.cr4 == CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT == 0x620
        assert sregs.efer == EFER_LME | EFER_LMA == 0x500
        assert cpu_mode(sregs) == "long"
    assert long_mode(reset_sregs(), 0).sregs.cr0 == 0x8000_0033


def test_long_mode_segments(ram: GuestMemory) -> None:
    setup = long_mode(reset_sregs(), 0x100000)
    sregs = setup.sregs
    assert setup.mode == "long"
    assert (sregs.cs.l, sregs.cs.db, sregs.cs.g, sregs.cs.type) == (1, 0, 1, 0xB)
    assert sregs.cs == segment_from_descriptor(0x10, FLAT_CODE64)
    for name in DATA_SEGMENTS:
        seg = getattr(sregs, name)
        assert (seg.l, seg.db, seg.type, seg.selector) == (0, 1, 0x3, 0x18), name
    place(setup, ram)
    check_gdt(setup, ram, FLAT_CODE64)


def test_long_mode_registers_and_reserved() -> None:
    setup = long_mode(reset_sregs(), 0x200000, stack=0x70000)
    assert setup.regs == Regs(rip=0x200000, rsp=0x70000, rflags=RFLAGS_RESERVED)
    assert long_mode(reset_sregs(), 0x100000).regs.rsp == STACK_TOP
    assert [gpa for gpa, _ in setup.memory] == [GDT_ADDR, PAGE_TABLE_ADDR]
    assert setup.reserved() == [(0x500, 0x520), (0x1000, 0x7000)]
    assert setup.memory[1][1] == long_mode_page_tables()


def walk64(memory: GuestMemory, cr3: int, va: int) -> int:
    """Translate ``va`` through 4-level paging that ends in 2 MiB pages."""
    pml4e = memory.read_u64((cr3 & ADDR_MASK_4K) + 8 * ((va >> 39) & 511))
    assert pml4e & (PRESENT | WRITABLE) == PRESENT | WRITABLE, f"{va:#x}: PML4E {pml4e:#x}"
    assert pml4e & HUGE == 0
    pdpte = memory.read_u64((pml4e & ADDR_MASK_4K) + 8 * ((va >> 30) & 511))
    assert pdpte & (PRESENT | WRITABLE) == PRESENT | WRITABLE, f"{va:#x}: PDPTE {pdpte:#x}"
    assert pdpte & HUGE == 0, f"{va:#x}: PDPTE maps a 1 GiB page"
    pde = memory.read_u64((pdpte & ADDR_MASK_4K) + 8 * ((va >> 21) & 511))
    assert pde & (PRESENT | WRITABLE) == PRESENT | WRITABLE, f"{va:#x}: PDE {pde:#x}"
    assert pde & HUGE, f"{va:#x}: PDE is not a 2 MiB page"
    assert pde & 0x1F_E000 == 0, f"{va:#x}: reserved bits set in {pde:#x}"
    return (pde & ADDR_MASK_2M) | (va & 0x1F_FFFF)


def test_long_mode_identity_maps_4gib(ram: GuestMemory) -> None:
    setup = long_mode(reset_sregs(), 0x100000)
    place(setup, ram)
    for va in VIRTUAL_ADDRESSES:
        assert walk64(ram, setup.sregs.cr3, va) == va, hex(va)


def test_long_mode_maps_nothing_above_4gib(ram: GuestMemory) -> None:
    setup = long_mode(reset_sregs(), 0x100000)
    place(setup, ram)
    pml4 = struct.unpack("<512Q", ram.read(PAGE_TABLE_ADDR, 0x1000))
    assert pml4[0] == 0x2003
    assert not any(pml4[1:])
    pdpt = struct.unpack("<512Q", ram.read(PAGE_TABLE_ADDR + 0x1000, 0x1000))
    assert pdpt[:4] == (0x3003, 0x4003, 0x5003, 0x6003)
    assert not any(pdpt[4:])
    with pytest.raises(AssertionError, match="PDPTE"):
        walk64(ram, setup.sregs.cr3, 0x1_0000_0000)


def test_long_mode_page_tables_layout() -> None:
    tables = long_mode_page_tables()
    assert len(tables) == 6 * 0x1000 == PAGE_TABLE_END - PAGE_TABLE_ADDR
    pds = struct.unpack("<2048Q", tables[0x2000:])
    assert pds[0] == 0x83
    assert pds[1] == 0x20_0083
    assert pds[2047] == 0xFFE0_0083
    assert all(entry == (i << 21) | 0x83 for i, entry in enumerate(pds))


def test_long_mode_page_tables_at_another_root() -> None:
    """The tables are position-dependent only through ``root``."""
    root = 0x20000
    tables = long_mode_page_tables(root)
    assert len(tables) == 0x6000
    with GuestMemory.with_ram(1 << 20) as memory:
        memory.write(root, tables)
        assert memory.read_u64(root) == 0x21003
        assert memory.read_u64(root + 0x1000 + 8 * 3) == 0x25003
        for va in VIRTUAL_ADDRESSES:
            assert walk64(memory, root, va) == va, hex(va)


# -- shared layout, dispatch, cpu_mode -----------------------------------------------------


BUILDERS: dict[str, Callable[[Sregs, int], CpuSetup]] = {
    "real": real_mode,
    "protected": protected_mode,
    "paged32": paged32_mode,
    "long": long_mode,
}


@pytest.mark.parametrize("mode", MODES)
def test_reserved_ranges_stay_below_the_load_addresses(mode: str) -> None:
    setup = setup_mode(mode, reset_sregs(), default_load_addr(mode))
    ranges = sorted(setup.reserved())
    for (_, end), (start, _) in itertools.pairwise(ranges):
        assert end <= start, "reserved ranges overlap"
    for start, end in ranges:
        assert 0x500 <= start < end <= REAL_MODE_LOAD_ADDR
        assert end <= PAGE_TABLE_END
        # The initial stack grows down from STACK_TOP without reaching them soon.
        assert end <= STACK_TOP - 0x10000
    assert setup.reserved() == [(gpa, gpa + len(data)) for gpa, data in setup.memory]


def test_cpu_setup_reserved() -> None:
    setup = CpuSetup("long", Regs(), Sregs(), [(0x500, bytes(32)), (0x1000, bytes(0x6000))])
    assert setup.reserved() == [(0x500, 0x520), (0x1000, 0x7000)]
    assert CpuSetup("real", Regs(), Sregs()).reserved() == []
    assert CpuSetup("real", Regs(), Sregs()).memory == []


def test_modes_tuple() -> None:
    assert MODES == ("real", "protected", "paged32", "long")


@pytest.mark.parametrize("mode", MODES)
def test_setup_mode_dispatches(mode: str) -> None:
    base = reset_sregs()
    setup = setup_mode(mode, base, 0x7C00)
    assert setup.mode == mode
    assert setup == BUILDERS[mode](base, 0x7C00)
    assert setup.regs.rip == 0x7C00
    assert cpu_mode(setup.sregs) == mode


@pytest.mark.parametrize("mode", ["", "Real", "long64", "compat", "pae32", "vm86"])
def test_setup_mode_rejects_unknown_mode(mode: str) -> None:
    with pytest.raises(ValueError) as info:
        setup_mode(mode, reset_sregs(), 0x7C00)
    assert str(info.value) == (
        f"unknown CPU mode {mode!r} (choose from real, protected, paged32, long)"
    )


def test_setup_mode_real_validates_entry() -> None:
    with pytest.raises(ValueError, match="above 1 MiB"):
        setup_mode("real", reset_sregs(), LOAD_ADDR)


def test_cpu_mode_for_each_state() -> None:
    base = reset_sregs()
    assert cpu_mode(base) == "real"
    assert cpu_mode(Sregs()) == "real"
    assert cpu_mode(real_mode(base).sregs) == "real"
    assert cpu_mode(protected_mode(base, 0).sregs) == "protected"
    assert cpu_mode(paged32_mode(base, 0).sregs) == "paged32"
    long = long_mode(base, 0).sregs
    assert cpu_mode(long) == "long"
    compat = records.replace(long, cs=segment_from_descriptor(0x10, FLAT_CODE32))
    assert compat.cs.l == 0
    assert cpu_mode(compat) == "compat"
    pae32 = records.replace(long, efer=0, cs=compat.cs)
    assert cpu_mode(pae32) == "pae32"
    paged32_pae = records.replace(paged32_mode(base, 0).sregs, cr4=CR4_PAE)
    assert cpu_mode(paged32_pae) == "pae32"


def test_cpu_mode_pe_decides_real() -> None:
    # EFER.LMA or CR0.PG without CR0.PE is not a state the builders produce, but
    # cpu_mode still names it by CR0.PE first.
    assert cpu_mode(Sregs(cr0=CR0_PG, efer=EFER_LMA)) == "real"
    assert cpu_mode(Sregs(cr0=CR0_PE)) == "protected"
    assert cpu_mode(Sregs(cr0=CR0_PE | CR0_PG)) == "paged32"
    assert cpu_mode(Sregs(cr0=CR0_PE | CR0_PG, cr4=CR4_PAE)) == "pae32"
    assert cpu_mode(Sregs(cr0=CR0_PE | CR0_PG, efer=EFER_LMA, cs=Segment(l=1))) == "long"
    assert cpu_mode(Sregs(cr0=CR0_PE | CR0_PG, efer=EFER_LMA, cs=Segment(l=0))) == "compat"


def test_default_load_addr() -> None:
    assert default_load_addr("real") == REAL_MODE_LOAD_ADDR == 0x7C00
    assert default_load_addr("protected") == LOAD_ADDR == 0x100000
    assert default_load_addr("paged32") == 0x100000
    assert default_load_addr("long") == 0x100000
