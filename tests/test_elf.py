"""ELF loader: images crafted with struct, good and malformed."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvmpy.loaders import LoaderError, LoadPlan, LoadSegment, check_plan
from kvmpy.loaders.elf import (
    EM_386,
    EM_X86_64,
    ET_CORE,
    ET_DYN,
    ET_EXEC,
    ET_REL,
    PT_INTERP,
    PT_LOAD,
    is_elf,
    load_elf,
    parse_elf,
    read_image,
)
from kvmpy.memory import GuestMemory

PT_NOTE = 4
PF_RX = 5
PF_RW = 6


@dataclass
class Phdr:
    """A program header for ``build_elf``; None fields are filled from the data."""

    paddr: int
    data: bytes = b""
    memsz: int | None = None
    vaddr: int | None = None
    type: int = PT_LOAD
    flags: int = PF_RX
    offset: int | None = None
    filesz: int | None = None


def build_elf(
    bits: int,
    entry: int,
    phdrs: list[Phdr],
    *,
    e_type: int = ET_EXEC,
    machine: int | None = None,
    ident: bytes | None = None,
    version: int = 1,
    ehsize: int | None = None,
    phentsize: int | None = None,
    phnum: int | None = None,
    phoff: int | None = None,
) -> bytes:
    """An ELF file: header, program headers right after it, then each segment's data."""
    is64 = bits == 64
    hdr_size = 64 if is64 else 52
    ph_size = 56 if is64 else 32
    table = hdr_size if phoff is None else phoff
    body = bytearray()
    data_start = max(table + ph_size * len(phdrs), hdr_size)
    offsets: list[int] = []
    for ph in phdrs:
        offsets.append(data_start + len(body))
        body += ph.data
        body += b"\0" * (-len(body) % 16)
    if ident is None:
        ident = b"\x7fELF" + bytes([2 if is64 else 1, 1, 1]) + b"\0" * 9
    if machine is None:
        machine = EM_X86_64 if is64 else EM_386
    fields = (
        e_type,
        machine,
        version,
        entry,
        table,
        0,  # e_shoff
        0,  # e_flags
        hdr_size if ehsize is None else ehsize,
        ph_size if phentsize is None else phentsize,
        len(phdrs) if phnum is None else phnum,
        0,
        0,
        0,
    )
    header = ident + struct.pack("<HHIQQQIHHHHHH" if is64 else "<HHIIIIIHHHHHH", *fields)
    image = bytearray(header.ljust(data_start, b"\0"))
    for index, (ph, default_offset) in enumerate(zip(phdrs, offsets, strict=True)):
        offset = default_offset if ph.offset is None else ph.offset
        filesz = len(ph.data) if ph.filesz is None else ph.filesz
        memsz = filesz if ph.memsz is None else ph.memsz
        vaddr = ph.paddr if ph.vaddr is None else ph.vaddr
        if is64:
            raw = struct.pack(
                "<IIQQQQQQ", ph.type, ph.flags, offset, vaddr, ph.paddr, filesz, memsz, 0x1000
            )
        else:
            raw = struct.pack(
                "<IIIIIIII", ph.type, offset, vaddr, ph.paddr, filesz, memsz, ph.flags, 0x1000
            )
        position = table + ph_size * index
        image[position : position + ph_size] = raw
    image += body
    return bytes(image)


CODE = bytes(range(1, 33))
DATA = b"data" * 4


def good32() -> bytes:
    return build_elf(
        32,
        0x100004,
        [
            Phdr(0x100000, CODE),
            Phdr(0x101000, DATA, memsz=0x2000, flags=PF_RW),
        ],
    )


def load(data: bytes, name: str = "k.elf") -> LoadPlan:
    return load_elf(name, data)


def error(data: bytes, name: str = "k.elf") -> str:
    with pytest.raises(LoaderError) as info:
        load_elf(name, data)
    return str(info.value)


# -- good images ------------------------------------------------------------------------


def test_elf32_segments_entry_and_mode() -> None:
    plan = load(good32())
    assert plan.source == "k.elf"
    assert plan.entry == 0x100004
    assert plan.mode == "protected"
    assert plan.segments == [
        LoadSegment(0x100000, CODE, 32),
        LoadSegment(0x101000, DATA, 0x2000),
    ]
    assert plan.registers == {}
    assert plan.reserved == []


def test_elf64_higher_half_entry_is_translated_to_physical() -> None:
    base = 0xFFFFFFFF80000000
    data = build_elf(
        64,
        base + 0x100010,
        [Phdr(0x100000, CODE, vaddr=base + 0x100000), Phdr(0x200000, DATA, vaddr=base + 0x200000)],
    )
    plan = load(data)
    assert plan.mode == "long"
    assert plan.entry == 0x100010
    assert [(s.gpa, s.memsz) for s in plan.segments] == [(0x100000, 32), (0x200000, 16)]


def test_physical_entry_is_accepted_when_vaddr_differs() -> None:
    data = build_elf(32, 0x100008, [Phdr(0x100000, CODE, vaddr=0xC0100000)])
    assert load(data).entry == 0x100008


def test_virtual_match_wins_over_physical() -> None:
    # 0x200000 is segment 1's virtual address and segment 0's physical one: e_entry is virtual.
    data = build_elf(
        32, 0x200004, [Phdr(0x200000, CODE, vaddr=0x900000), Phdr(0x300000, DATA, vaddr=0x200000)]
    )
    assert load(data).entry == 0x300004


def test_et_dyn_is_loaded_at_its_link_addresses() -> None:
    data = build_elf(64, 0x100000, [Phdr(0x100000, CODE)], e_type=ET_DYN)
    plan = load(data)
    assert plan.segments == [LoadSegment(0x100000, CODE, 32)]
    assert parse_elf(data).elf_type == ET_DYN


@pytest.mark.parametrize(("e_type", "label"), [(ET_REL, "ET_REL"), (ET_CORE, "ET_CORE"), (0, "")])
def test_non_executable_types_are_refused(e_type: int, label: str) -> None:
    message = error(build_elf(32, 0x100000, [Phdr(0x100000, CODE)], e_type=e_type))
    assert f"k.elf: e_type {e_type:#x} ({label or 'unknown'}) is not an executable" in message


def test_non_load_and_empty_segments_are_skipped() -> None:
    data = build_elf(
        32,
        0x100000,
        [Phdr(0, b"note", type=PT_NOTE), Phdr(0x100000, CODE), Phdr(0x500, b"", memsz=0)],
    )
    assert load(data).segments == [LoadSegment(0x100000, CODE, 32)]


def test_adjacent_segments_do_not_overlap() -> None:
    data = build_elf(32, 0x100000, [Phdr(0x100000, CODE), Phdr(0x100020, DATA)])
    assert [s.gpa for s in load(data).segments] == [0x100000, 0x100020]


def test_segment_ending_exactly_at_4_gib_is_accepted() -> None:
    data = build_elf(32, 0xFFFFF000, [Phdr(0xFFFFF000, CODE, memsz=0x1000)])
    assert load(data).segments[0].end == 1 << 32


def test_program_headers_anywhere_in_the_file() -> None:
    data = build_elf(64, 0x100000, [Phdr(0x100000, CODE)], phoff=0x200)
    assert struct.unpack_from("<Q", data, 32)[0] == 0x200  # e_phoff
    assert load(data).segments == [LoadSegment(0x100000, CODE, 32)]


def test_load_from_file(tmp_path: Path) -> None:
    path = tmp_path / "kernel.elf"
    path.write_bytes(good32())
    plan = load_elf(path)
    assert plan.source == str(path)
    assert plan.entry == 0x100004
    assert plan.segments[1] == LoadSegment(0x101000, DATA, 0x2000)


def test_is_elf() -> None:
    assert is_elf(good32())
    assert is_elf(b"\x7fELF")
    assert not is_elf(b"\x7fEL")
    assert not is_elf(b"MZ\x90\x00")
    assert not is_elf(b"")


def test_plan_passes_check_plan_in_ram() -> None:
    with GuestMemory.with_ram(4 << 20) as memory:
        check_plan(load(good32()), memory, [(0x500, 0x530)])


def test_segment_outside_ram_fails_check_plan() -> None:
    data = build_elf(32, 0x100000, [Phdr(0x100000, CODE, memsz=0x400000)])
    with GuestMemory.with_ram(4 << 20) as memory, pytest.raises(LoaderError) as info:
        check_plan(load(data), memory, [])
    assert "segment 0x100000-0x4fffff does not fit in guest RAM (4 MiB)" in str(info.value)


def test_segment_on_reserved_structures_fails_check_plan() -> None:
    data = build_elf(32, 0x1000, [Phdr(0x1000, CODE)])
    with GuestMemory.with_ram(4 << 20) as memory, pytest.raises(LoaderError) as info:
        check_plan(load(data), memory, [(0x1000, 0x7000)])
    assert "overlaps the boot structures at 0x1000-0x6fff" in str(info.value)


# -- malformed images -------------------------------------------------------------------


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(LoaderError, match=r"missing\.elf: cannot read ELF image"):
        load_elf(tmp_path / "missing.elf")


def test_oversized_file_is_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "big"
    with path.open("wb") as f:
        f.truncate(1 << 20)
    with pytest.raises(LoaderError, match=r"big: image is 1048576 bytes, more than the 4096"):
        read_image(path, 4096)
    assert read_image(path, 1 << 20) == bytes(1 << 20)


@pytest.mark.parametrize("size", [0, 4, 15])
def test_truncated_ident(size: int) -> None:
    assert error(good32()[:size]) == f"k.elf: file is {size} bytes, too short for an ELF header"


def test_truncated_header() -> None:
    message = error(good32()[:40])
    assert message == "k.elf: file is 40 bytes, too short for the 52-byte ELF header"
    message = error(build_elf(64, 0, [Phdr(0, CODE)])[:63])
    assert message == "k.elf: file is 63 bytes, too short for the 64-byte ELF header"


def test_bad_magic() -> None:
    message = error(b"\x7fELG" + good32()[4:])
    assert message == "k.elf: e_ident magic 7f454c47 is not 7f454c46 (\\x7fELF)"


def test_bad_class() -> None:
    data = bytearray(good32())
    data[4] = 3
    assert "EI_CLASS 3 is neither ELFCLASS32 (1) nor ELFCLASS64 (2)" in error(bytes(data))


def test_big_endian_is_refused() -> None:
    data = bytearray(good32())
    data[5] = 2
    assert "k.elf: EI_DATA 2 is not ELFDATA2LSB (1)" in error(bytes(data))


def test_bad_ident_version() -> None:
    data = bytearray(good32())
    data[6] = 0
    assert "k.elf: EI_VERSION 0 is not EV_CURRENT (1)" in error(bytes(data))


def test_bad_e_version() -> None:
    data = build_elf(32, 0x100000, [Phdr(0x100000, CODE)], version=2)
    assert error(data) == "k.elf: e_version 2 is not EV_CURRENT (1)"


def test_arm_machine_is_refused() -> None:
    data = build_elf(32, 0x100000, [Phdr(0x100000, CODE)], machine=0x28)
    assert error(data) == "k.elf: e_machine 0x28 is not x86 (expected EM_386 or EM_X86_64)"


def test_class_machine_mismatch() -> None:
    x32 = build_elf(32, 0x100000, [Phdr(0x100000, CODE)], machine=EM_X86_64)
    assert error(x32) == (
        "k.elf: e_machine 0x3e (EM_X86_64) does not match ELFCLASS32 (expected EM_386)"
    )
    odd = build_elf(64, 0x100000, [Phdr(0x100000, CODE)], machine=EM_386)
    assert error(odd) == (
        "k.elf: e_machine 0x3 (EM_386) does not match ELFCLASS64 (expected EM_X86_64)"
    )


def test_bad_ehsize() -> None:
    data = build_elf(32, 0x100000, [Phdr(0x100000, CODE)], ehsize=64)
    assert error(data) == "k.elf: e_ehsize 64 is not 52, the ELF32 header size"


def test_bad_phentsize() -> None:
    data = build_elf(64, 0x100000, [Phdr(0x100000, CODE)], phentsize=32)
    assert error(data) == "k.elf: e_phentsize 32 is not 56, the ELF64 size"


def test_no_program_headers() -> None:
    data = build_elf(32, 0x100000, [Phdr(0x100000, CODE)], phnum=0)
    assert error(data) == "k.elf: e_phnum is 0: no program headers, nothing to load"


def test_pn_xnum_is_refused() -> None:
    data = build_elf(32, 0x100000, [Phdr(0x100000, CODE)], phnum=0xFFFF)
    assert "e_phnum 0xffff (PN_XNUM" in error(data)


def test_phoff_inside_header() -> None:
    data = bytearray(good32())
    struct.pack_into("<I", data, 28, 16)  # e_phoff
    assert error(bytes(data)) == "k.elf: e_phoff 0x10 points into the ELF header"


def test_program_headers_past_end_of_file() -> None:
    data = build_elf(32, 0x100000, [Phdr(0x100000, CODE)], phnum=3)
    assert error(data) == (
        "k.elf: program headers at e_phoff 0x34 (3 x 32 bytes) end at 0x94, past the end of "
        f"the file ({len(data):#x} bytes)"
    )
    truncated = good32()[: 52 + 40]
    assert "past the end of the file (0x5c bytes)" in error(truncated)


def test_segment_data_past_end_of_file() -> None:
    data = build_elf(32, 0x100000, [Phdr(0x100000, CODE, offset=0x40, filesz=0x1000)])
    assert error(data) == (
        "k.elf: program header 0 (PT_LOAD): p_offset 0x40 + p_filesz 0x1000 extends past the "
        f"end of the file ({len(data):#x} bytes)"
    )
    far = build_elf(64, 0x100000, [Phdr(0x100000, CODE, offset=1 << 63)])
    assert "p_offset 0x8000000000000000 + p_filesz 0x20 extends past" in error(far)


def test_empty_segment_with_bad_offset_is_still_refused() -> None:
    data = build_elf(
        32, 0x100000, [Phdr(0x100000, CODE), Phdr(0x200000, memsz=0, offset=0x10000, filesz=4)]
    )
    assert "program header 1 (PT_LOAD): p_filesz 0x4 is larger than p_memsz 0x0" in error(data)


def test_filesz_larger_than_memsz() -> None:
    data = build_elf(32, 0x100000, [Phdr(0x100000, CODE, memsz=16)])
    assert error(data) == (
        "k.elf: program header 0 (PT_LOAD): p_filesz 0x20 is larger than p_memsz 0x10"
    )


def test_huge_memsz_is_refused() -> None:
    data = build_elf(64, 0x100000, [Phdr(0x100000, CODE, memsz=5 << 30)])
    assert error(data) == (
        "k.elf: program header 0 (PT_LOAD): p_memsz 0x140000000 brings the segments to "
        "0x140000000 bytes, more than the 0x100000000 allowed"
    )


def test_huge_total_memsz_is_refused() -> None:
    data = build_elf(
        64,
        0x100000,
        [Phdr(0x100000, CODE, memsz=3 << 30), Phdr(0x100000000, DATA, memsz=3 << 30)],
    )
    assert "program header 1 (PT_LOAD): p_memsz 0xc0000000 brings the segments to 0x180000000" in (
        error(data)
    )


def test_elf32_segment_wrapping_4_gib() -> None:
    data = build_elf(32, 0xFFFFF000, [Phdr(0xFFFFF000, CODE, memsz=0x2000)])
    assert error(data) == (
        "k.elf: program header 0 (PT_LOAD): p_paddr 0xfffff000 + p_memsz 0x2000 ends beyond "
        "the 32-bit limit 0x100000000"
    )


def test_elf64_segment_beyond_physical_address_width() -> None:
    data = build_elf(64, 0x100000, [Phdr(1 << 52, CODE, vaddr=0x100000)])
    assert "p_paddr 0x10000000000000 + p_memsz 0x20 ends beyond the 64-bit limit" in error(data)


def test_elf64_virtual_wrap() -> None:
    data = build_elf(64, 0x100000, [Phdr(0x100000, CODE, vaddr=(1 << 64) - 16)])
    assert "p_vaddr 0xfffffffffffffff0 + p_memsz 0x20 wraps around the 64-bit" in error(data)


def test_overlapping_segments() -> None:
    data = build_elf(
        32, 0x100000, [Phdr(0x100000, CODE, memsz=0x1000), Phdr(0x100800, DATA, flags=PF_RW)]
    )
    assert error(data) == (
        "k.elf: program headers 0 and 1 overlap: p_paddr 0x100000-0x100fff and 0x100800-0x10080f"
    )


def test_overlap_is_found_whatever_the_order() -> None:
    data = build_elf(32, 0x100000, [Phdr(0x200000, DATA), Phdr(0x100000, CODE, memsz=0x100001)])
    assert "program headers 1 and 0 overlap" in error(data)


def test_no_load_segment() -> None:
    data = build_elf(32, 0x100000, [Phdr(0, b"note", type=PT_NOTE)])
    assert error(data) == "k.elf: no PT_LOAD segment with p_memsz > 0: nothing to load"


def test_interp_is_refused() -> None:
    data = build_elf(64, 0x100000, [Phdr(0, b"/lib/ld.so\0", type=PT_INTERP), Phdr(0x100000, CODE)])
    assert error(data) == (
        "k.elf: program header 0 is PT_INTERP: a dynamically linked program, not a kernel"
    )


@pytest.mark.parametrize("entry", [0, 0xFFFFF, 0x100020, 0x101010, 0x103000])
def test_entry_outside_file_backed_bytes(entry: int) -> None:
    # 0x100020 is just past the code; 0x101010 is in the data segment's zero fill.
    data = build_elf(
        32, entry, [Phdr(0x100000, CODE), Phdr(0x101000, DATA, memsz=0x2000, flags=PF_RW)]
    )
    assert error(data) == (
        f"k.elf: e_entry {entry:#x} is not inside the file-backed part of any PT_LOAD segment "
        "(virtual or physical)"
    )
