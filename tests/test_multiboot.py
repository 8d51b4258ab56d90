"""Multiboot v1 loader: header search, a.out kludge, ELF kernels, the boot information."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from kvmpy.loaders import LoaderError, LoadPlan, LoadSegment, check_plan
from kvmpy.loaders.elf import read_image
from kvmpy.loaders.multiboot import (
    MultibootHeader,
    find_header,
    is_multiboot,
    load_multiboot,
    memory_map,
)
from kvmpy.memory import GuestMemory
from tests.test_elf import Phdr, build_elf

MAGIC = 0x1BADB002
AOUT = 1 << 16
RAM_128M = [(0, 128 << 20)]
RAM_5G = [(0, 0xC000_0000), (0x1_0000_0000, 0x8000_0000)]


def header(flags: int, *fields: int, checksum: int | None = None) -> bytes:
    """A Multiboot header: magic, flags, checksum, then any address/video fields."""
    if checksum is None:
        checksum = -(MAGIC + flags) & 0xFFFFFFFF
    return struct.pack(f"<III{len(fields)}I", MAGIC, flags, checksum, *fields)


def aout_image(
    *,
    load_addr: int = 0x100000,
    prefix: int = 0,
    code: bytes = b"\xf4" * 16,
    header_addr: int | None = None,
    load_end_addr: int | None = None,
    bss_end_addr: int = 0,
    entry_addr: int | None = None,
    flags: int = AOUT,
) -> bytes:
    """``prefix`` junk bytes, the header (loaded at load_addr), then ``code``."""
    if header_addr is None:
        header_addr = load_addr
    if entry_addr is None:
        entry_addr = header_addr + 32
    if load_end_addr is None:
        load_end_addr = header_addr + 32 + len(code)
    hdr = header(flags, header_addr, load_addr, load_end_addr, bss_end_addr, entry_addr)
    return b"\xcc" * prefix + hdr + code


def write(tmp_path: Path, data: bytes, name: str = "kernel") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def load(tmp_path: Path, data: bytes, **kwargs: object) -> LoadPlan:
    kwargs.setdefault("ram", RAM_128M)
    return load_multiboot(write(tmp_path, data), **kwargs)  # type: ignore[arg-type]


def error(tmp_path: Path, data: bytes, **kwargs: object) -> str:
    with pytest.raises(LoaderError) as info:
        load(tmp_path, data, **kwargs)
    return str(info.value)


def peek(plan: LoadPlan, addr: int, size: int) -> bytes:
    """Read guest memory as the plan would leave it."""
    for seg in plan.segments:
        if seg.gpa <= addr and addr + size <= seg.end:
            start = addr - seg.gpa
            return (seg.data + bytes(seg.memsz - len(seg.data)))[start : start + size]
    raise AssertionError(f"{addr:#x}+{size:#x} is not in the plan")


def u32(plan: LoadPlan, addr: int) -> int:
    value: int = struct.unpack("<I", peek(plan, addr, 4))[0]
    return value


def c_string(plan: LoadPlan, addr: int) -> bytes:
    for seg in plan.segments:
        if seg.gpa <= addr < seg.gpa + len(seg.data):
            tail = seg.data[addr - seg.gpa :]
            assert b"\0" in tail, "string is not NUL-terminated"
            return tail[: tail.index(b"\0")]
    raise AssertionError(f"no string at {addr:#x}")


# -- the header -------------------------------------------------------------------------


def test_find_header_at_start() -> None:
    found = find_header(header(0x3) + bytes(100))
    assert found == MultibootHeader(offset=0, flags=3, checksum=-(MAGIC + 3) & 0xFFFFFFFF)
    assert not found.has_addresses


def test_find_header_reads_address_and_video_fields() -> None:
    flags = AOUT | 0x4
    data = bytes(8) + header(flags, *range(1, 10)) + bytes(4)
    found = find_header(data)
    assert found is not None
    assert found.offset == 8
    assert found.has_addresses
    assert (
        found.header_addr,
        found.load_addr,
        found.load_end_addr,
        found.bss_end_addr,
        found.entry_addr,
    ) == (1, 2, 3, 4, 5)
    assert (found.mode_type, found.width, found.height, found.depth) == (6, 7, 8, 9)


def test_header_at_last_aligned_slot_is_found() -> None:
    data = bytes(8180) + header(0)
    found = find_header(data)
    assert found is not None and found.offset == 8180
    assert is_multiboot(data)


@pytest.mark.parametrize("offset", [8184, 8192, 9000])
def test_header_past_8_kib_is_not_found(offset: int) -> None:
    data = bytes(offset) + header(0) + bytes(64)
    assert find_header(data) is None
    assert not is_multiboot(data)


@pytest.mark.parametrize("offset", [1, 2, 3, 6])
def test_misaligned_header_is_not_found(offset: int) -> None:
    data = bytes(offset) + header(0) + bytes(64)
    assert find_header(data) is None
    assert not is_multiboot(data)


def test_bad_checksum_is_skipped_for_a_later_good_header() -> None:
    data = header(0, checksum=0x1234) + header(0x2)
    assert find_header(b"\0" * 4 + header(0, checksum=0)) is None
    found = find_header(data)
    assert found is not None and found.offset == 12 and found.flags == 2


def test_optional_unknown_flags_are_ignored_and_video_accepted() -> None:
    found = find_header(header(0x00FE0007, 0, 0, 0, 0, 0, 0, 0, 0, 0))
    assert found is not None and found.flags == 0x00FE0007


@pytest.mark.parametrize("bit", range(3, 16))
def test_unknown_required_flag_is_refused(bit: int) -> None:
    with pytest.raises(LoaderError) as info:
        find_header(header(1 << bit | 0x3) + bytes(64), "k")
    assert str(info.value) == (
        f"k: multiboot header at offset 0x0: flags {1 << bit | 3:#010x} set required bits "
        f"{1 << bit:#x} that kvmpy does not support (only bits 0-2)"
    )
    assert is_multiboot(header(1 << bit) + bytes(64))  # still a multiboot image


def test_truncated_address_fields() -> None:
    with pytest.raises(LoaderError) as info:
        find_header(header(AOUT) + bytes(8), "k")
    assert str(info.value) == (
        "k: multiboot header at offset 0x0: flags 0x00010000 need a 32-byte header, but the "
        "file ends at 0x14"
    )


def test_address_fields_past_8_kib() -> None:
    data = bytes(8176) + header(AOUT) + bytes(64)
    with pytest.raises(LoaderError) as info:
        find_header(data, "k")
    assert str(info.value) == (
        "k: multiboot header at offset 0x1ff0: flags 0x00010000 need a 32-byte header, which "
        "ends at 0x2010, past the first 8192 bytes"
    )


def test_missing_header_messages(tmp_path: Path) -> None:
    path = str(tmp_path / "kernel")
    assert error(tmp_path, bytes(64)) == (
        f"{path}: not a multiboot kernel: no magic 0x1badb002 in the first 8192 bytes"
    )
    assert error(tmp_path, header(0, checksum=5) + bytes(64)) == (
        f"{path}: not a multiboot kernel: magic at offset 0x0 has checksum 0x00000005, but "
        "magic + flags 0x00000000 + checksum is 0x1badb007, not 0"
    )
    assert error(tmp_path, bytes(2) + header(0) + bytes(64)) == (
        f"{path}: not a multiboot kernel: magic 0x1badb002 at offset 0x2 is not 4-byte aligned"
    )
    assert error(tmp_path, bytes(8192) + header(0) + bytes(64)) == (
        f"{path}: not a multiboot kernel: magic 0x1badb002 at offset 0x2000 is past the first "
        "8192 bytes"
    )


# -- the a.out kludge -------------------------------------------------------------------


def test_aout_kernel_segment_entry_and_registers(tmp_path: Path) -> None:
    code = bytes(range(48))
    image = aout_image(prefix=0x40, code=code, bss_end_addr=0x110000, entry_addr=0x100020)
    plan = load(tmp_path, image)
    assert plan.mode == "protected"
    assert plan.entry == 0x100020
    assert plan.registers == {"rax": 0x2BADB002, "rbx": 0x9000}
    assert plan.segments[0] == LoadSegment(0x100000, image[0x40:], 0x10000)
    boot = plan.segments[-1]
    assert boot.gpa == 0x9000
    assert plan.reserved == [(0x9000, boot.end)]
    assert len(plan.segments) == 2


def test_aout_header_after_load_addr(tmp_path: Path) -> None:
    # The header sits 0x20 bytes into the text, and the text starts 0x20 bytes into the file.
    image = bytes(0x40) + header(AOUT, 0x200020, 0x200000, 0, 0, 0x200030) + bytes(range(16))
    plan = load(tmp_path, image)
    assert plan.segments[0] == LoadSegment(0x200000, image[0x20:], len(image) - 0x20)
    assert plan.entry == 0x200030


def test_aout_load_end_addr_limits_the_file_bytes(tmp_path: Path) -> None:
    image = aout_image(code=bytes(64), load_end_addr=0x100030) + b"trailing debug data"
    seg = load(tmp_path, image).segments[0]
    assert seg == LoadSegment(0x100000, image[:0x30], 0x30)


def test_aout_elf64_file_uses_the_address_fields(tmp_path: Path) -> None:
    elf = build_elf(64, 0x400000, [Phdr(0x400000, bytes(16))])
    image = elf[:0x80].ljust(0x80, b"\0") + header(AOUT, 0x100080, 0x100000, 0, 0x120000, 0x100080)
    image = image.ljust(0x100, b"\0") + elf[0x80:]
    plan = load(tmp_path, image)
    assert plan.segments[0] == LoadSegment(0x100000, image, 0x20000)
    assert plan.entry == 0x100080
    assert plan.mode == "protected"


def test_aout_load_addr_above_header_addr(tmp_path: Path) -> None:
    message = error(tmp_path, aout_image(load_addr=0x100010, header_addr=0x100000))
    assert message.endswith(
        "kernel: multiboot header at offset 0x0: load_addr 0x100010 is above header_addr 0x100000"
    )


def test_aout_text_before_start_of_file(tmp_path: Path) -> None:
    message = error(tmp_path, aout_image(prefix=8, header_addr=0x100010))
    assert message.endswith(
        "multiboot header at offset 0x8: header_addr 0x100010 - load_addr 0x100000 is more than "
        "the header's file offset, so loading would start before the file"
    )


@pytest.mark.parametrize("load_end", [0x100000, 0xFFFFF])
def test_aout_load_end_not_above_load_addr(tmp_path: Path, load_end: int) -> None:
    message = error(tmp_path, aout_image(load_end_addr=load_end))
    assert message.endswith(f"load_end_addr {load_end:#x} is not above load_addr 0x100000")


def test_aout_load_end_past_end_of_file(tmp_path: Path) -> None:
    message = error(tmp_path, aout_image(code=bytes(16), load_end_addr=0x100100))
    assert message.endswith(
        "load_end_addr 0x100100 needs file bytes up to 0x100, but the file is 0x30 bytes"
    )


def test_aout_bss_end_below_load_end(tmp_path: Path) -> None:
    message = error(tmp_path, aout_image(code=bytes(16), bss_end_addr=0x100020))
    assert message.endswith("bss_end_addr 0x100020 is below the end of the loaded bytes 0x100030")


def test_aout_bss_end_equal_to_load_end_means_no_bss(tmp_path: Path) -> None:
    seg = load(tmp_path, aout_image(code=bytes(16), bss_end_addr=0x100030)).segments[0]
    assert (seg.gpa, len(seg.data), seg.memsz) == (0x100000, 0x30, 0x30)


@pytest.mark.parametrize("entry", [0xFFFFF, 0x100030, 0x100100])
def test_aout_entry_outside_loaded_bytes(tmp_path: Path, entry: int) -> None:
    # 0x100100 is in the bss: zeros, not code.
    image = aout_image(code=bytes(16), bss_end_addr=0x200000, entry_addr=entry)
    assert error(tmp_path, image).endswith(
        f"entry_addr {entry:#x} is not inside the loaded bytes 0x100000-0x10002f"
    )


def test_aout_header_outside_loaded_bytes(tmp_path: Path) -> None:
    image = aout_image(code=bytes(16), load_end_addr=0x100008, entry_addr=0x100000)
    assert error(tmp_path, image).endswith(
        "header_addr 0x100000 is not inside the loaded bytes 0x100000-0x100007"
    )


def test_aout_image_past_4_gib(tmp_path: Path) -> None:
    image = aout_image(load_addr=0xFFFFFFE0, load_end_addr=0, entry_addr=0xFFFFFFE0)
    assert error(tmp_path, image).endswith(
        "load_addr 0xffffffe0 + the 0x30 bytes to the end of the file (load_end_addr 0) go "
        "past 4 GiB"
    )


def test_kernel_outside_ram(tmp_path: Path) -> None:
    image = aout_image(load_addr=0x7F00000, bss_end_addr=0x8100000)
    assert error(tmp_path, image).endswith(
        "kernel: kernel segment 0x7f00000-0x80fffff is not inside guest RAM"
    )


def boot_base(plan: LoadPlan) -> int:
    """Where the plan put the boot data, checked against EBX and ``reserved``."""
    boot = plan.segments[-1]
    assert plan.registers["rbx"] == boot.gpa
    assert plan.reserved == [(boot.gpa, boot.end)]
    return boot.gpa


def assert_intact(plan: LoadPlan) -> None:
    """EBX points at the information, and nothing else in the plan overlaps it."""
    base = boot_base(plan)
    assert u32(plan, base) == 0x24D
    assert u32(plan, base + 4) == 639
    assert c_string(plan, u32(plan, base + 64)) == b"kvmpy"
    boot = plan.segments[-1]
    for seg in plan.segments[:-1]:
        assert seg.end <= boot.gpa or boot.end <= seg.gpa, (seg, boot)


def test_kernel_linked_over_0x9000_moves_the_boot_information(tmp_path: Path) -> None:
    # Linked at 0x8000-0xa86b, as a kernel QEMU boots: the data goes past its end.
    plan = load(tmp_path, aout_image(load_addr=0x8000, bss_end_addr=0xA86C))
    assert boot_base(plan) == 0xA870
    assert_intact(plan)


@pytest.mark.parametrize(
    ("load_addr", "bss_end", "expected"),
    [
        (0x100000, 0, 0x9000),  # high: the usual place
        (0x7000, 0x9000, 0x9000),  # ending right where the data goes
        (0x9000, 0x70000, 0x80000),  # filling low memory up to the stack
        (0x7000, 0x9FC00, 0x100000),  # filling all of it: above 1 MiB
    ],
)
def test_boot_information_goes_where_there_is_room(
    tmp_path: Path, load_addr: int, bss_end: int, expected: int
) -> None:
    plan = load(tmp_path, aout_image(load_addr=load_addr, bss_end_addr=bss_end))
    assert boot_base(plan) == expected
    assert_intact(plan)


def test_boot_information_avoids_modules(tmp_path: Path) -> None:
    module = write(tmp_path, b"M" * 0x2000, "module")
    image = aout_image(load_addr=0x8000, bss_end_addr=0x9000)
    plan = load(tmp_path, image, modules=[(str(module), "")])
    assert plan.segments[1].gpa == 0x9000  # the module, page-aligned after the kernel
    assert boot_base(plan) == 0xB000
    assert_intact(plan)


def test_kernel_below_the_boot_information_is_fine(tmp_path: Path) -> None:
    plan = load(tmp_path, aout_image(load_addr=0x8000))
    assert plan.segments[0].gpa == 0x8000
    assert plan.segments[-1].gpa == 0x9000


# -- ELF kernels ------------------------------------------------------------------------


def multiboot_elf(bits: int = 32, flags: int = 0x3) -> bytes:
    text = header(flags) + b"\x90" * 4 + b"\xf4"
    return build_elf(
        bits,
        0x10000C,
        [Phdr(0x100000, text), Phdr(0x101000, b"data", memsz=0x3000, flags=6)],
    )


def test_elf_kernel(tmp_path: Path) -> None:
    data = multiboot_elf()
    plan = load(tmp_path, data)
    assert plan.entry == 0x10000C
    assert plan.mode == "protected"
    assert plan.segments[:2] == [
        LoadSegment(0x100000, header(0x3) + b"\x90" * 4 + b"\xf4", 17),
        LoadSegment(0x101000, b"data", 0x3000),
    ]
    assert plan.registers == {"rax": 0x2BADB002, "rbx": 0x9000}
    assert is_multiboot(data)


def test_elf64_kernel_without_aout_kludge_is_refused(tmp_path: Path) -> None:
    assert error(tmp_path, multiboot_elf(64)) == (
        f"{tmp_path / 'kernel'}: ELF64 multiboot kernels are not supported without the a.out "
        "kludge (flags bit 16), as in QEMU: give a 32-bit ELF"
    )


def test_elf_errors_propagate(tmp_path: Path) -> None:
    data = bytearray(multiboot_elf())
    data[18] = 0x28  # e_machine
    assert error(tmp_path, bytes(data)).endswith(
        "kernel: e_machine 0x28 is not x86 (expected EM_386 or EM_X86_64)"
    )


def test_neither_elf_nor_aout(tmp_path: Path) -> None:
    assert error(tmp_path, header(0x3) + bytes(64)).endswith(
        "kernel: multiboot flags 0x00000003 lack bit 16 (address fields) and the image is not "
        "ELF, so there is no telling where to load it"
    )


# -- the boot information ---------------------------------------------------------------


def test_boot_information_layout(tmp_path: Path) -> None:
    mod_a = write(tmp_path, b"A" * 5000, "mod_a")
    mod_b = write(tmp_path, b"module b", "mod_b")
    kernel = write(tmp_path, aout_image(code=bytes(0x100), bss_end_addr=0x100123 + 0x1000))
    plan = load_multiboot(
        kernel,
        ram=RAM_128M,
        cmdline="console=ttyS0 quiet",
        modules=[(str(mod_a), "root=/dev/x  v=1"), (str(mod_b), "")],
    )
    mbi = plan.registers["rbx"]
    assert mbi == 0x9000
    flags, mem_lower, mem_upper, boot_device = struct.unpack("<IIII", peek(plan, mbi, 16))
    assert flags == (1 << 0) | (1 << 2) | (1 << 3) | (1 << 6) | (1 << 9) == 0x24D
    assert mem_lower == 639
    assert mem_upper == (128 << 10) - 1024
    assert boot_device == 0
    cmdline, mods_count, mods_addr = struct.unpack("<III", peek(plan, mbi + 16, 12))
    assert c_string(plan, cmdline) == f"{kernel} console=ttyS0 quiet".encode()
    assert mods_count == 2
    assert mods_addr % 16 == 0
    assert peek(plan, mbi + 28, 16) == bytes(16)  # syms: flags 4 and 5 are clear
    mmap_length, mmap_addr = struct.unpack("<II", peek(plan, mbi + 44, 8))
    assert mmap_addr == 0x9080
    assert mmap_length == 4 * 24
    entries = [
        struct.unpack("<IQQI", peek(plan, mmap_addr + i, 24)) for i in range(0, mmap_length, 24)
    ]
    assert entries == [
        (20, 0, 0x9FC00, 1),
        (20, 0x9FC00, 0x400, 2),
        (20, 0xF0000, 0x10000, 2),
        (20, 0x100000, (128 << 20) - 0x100000, 1),
    ]
    assert peek(plan, mbi + 52, 12) == bytes(12)  # drives, config table
    assert c_string(plan, u32(plan, mbi + 64)) == b"kvmpy"
    assert peek(plan, mbi + 68, 116 - 68) == bytes(48)  # apm, vbe, framebuffer

    # Modules: page-aligned, after the kernel's bss, one after the other.
    first = struct.unpack("<IIII", peek(plan, mods_addr, 16))
    second = struct.unpack("<IIII", peek(plan, mods_addr + 16, 16))
    assert first[:2] == (0x102000, 0x102000 + 5000)
    assert second[:2] == (0x104000, 0x104008)
    assert first[3] == second[3] == 0
    assert c_string(plan, first[2]) == f"{mod_a} root=/dev/x  v=1".encode()
    assert c_string(plan, second[2]) == str(mod_b).encode()
    assert peek(plan, 0x102000, 5000) == b"A" * 5000
    assert peek(plan, 0x104000, 8) == b"module b"
    assert LoadSegment(0x102000, b"A" * 5000, 5000) in plan.segments
    assert LoadSegment(0x104000, b"module b", 8) in plan.segments

    boot = plan.segments[-1]
    assert plan.reserved == [(0x9000, boot.end)]
    assert boot.end < 0x70000
    strings_end = max(first[2] + len(c_string(plan, first[2])), second[2] + len(str(mod_b)))
    assert boot.end == strings_end + 1


def test_empty_cmdline_is_just_the_kernel_path(tmp_path: Path) -> None:
    plan = load(tmp_path, aout_image(), cmdline="")
    cmdline = u32(plan, 0x9000 + 16)
    assert c_string(plan, cmdline) == str(tmp_path / "kernel").encode()
    assert peek(plan, cmdline, len(str(tmp_path / "kernel")) + 1)[-1] == 0
    assert u32(plan, 0x9000) & (1 << 2)
    assert u32(plan, 0x9000 + 20) == 0  # mods_count, flag 3 still set
    assert u32(plan, 0x9000) & (1 << 3)


def test_kernel_path_is_given_as_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, aout_image(), "k.bin")
    monkeypatch.chdir(tmp_path)
    plan = load_multiboot("./k.bin", ram=RAM_128M, cmdline="a b")
    assert plan.source == "./k.bin"
    assert c_string(plan, u32(plan, 0x9000 + 16)) == b"./k.bin a b"


def test_memory_map_with_high_ram(tmp_path: Path) -> None:
    plan = load(tmp_path, aout_image(), ram=RAM_5G)
    assert u32(plan, 0x9000 + 8) == (0xC000_0000 - 0x100000) // 1024
    length, addr = u32(plan, 0x9000 + 44), u32(plan, 0x9000 + 48)
    entries = [struct.unpack("<IQQI", peek(plan, addr + i, 24)) for i in range(0, length, 24)]
    assert entries == [
        (20, 0, 0x9FC00, 1),
        (20, 0x9FC00, 0x400, 2),
        (20, 0xF0000, 0x10000, 2),
        (20, 0x100000, 0xC000_0000 - 0x100000, 1),
        (20, 0x1_0000_0000, 0x8000_0000, 1),
    ]


def test_memory_map_function() -> None:
    assert memory_map([(0, 0x80000)]) == [
        (0, 0x80000, 1),
        (0x9FC00, 0x400, 2),
        (0xF0000, 0x10000, 2),
    ]
    # Adjacent regions merge; RAM in the legacy hole is not reported as available.
    assert memory_map([(0x200000, 0x100000), (0, 0x200000)]) == [
        (0, 0x9FC00, 1),
        (0x9FC00, 0x400, 2),
        (0xF0000, 0x10000, 2),
        (0x100000, 0x200000, 1),
    ]


def test_mem_upper_stops_at_the_first_hole(tmp_path: Path) -> None:
    plan = load(tmp_path, aout_image(), ram=[(0, 0x400000), (0x800000, 0x100000)])
    assert u32(plan, 0x9000 + 4) == 639
    assert u32(plan, 0x9000 + 8) == (0x400000 - 0x100000) // 1024


def test_small_low_ram_is_reported(tmp_path: Path) -> None:
    plan = load(tmp_path, aout_image(load_addr=0x20000), ram=[(0, 0x80000)])
    assert u32(plan, 0x9000 + 4) == 512
    assert u32(plan, 0x9000 + 8) == 0


def test_bad_ram_regions(tmp_path: Path) -> None:
    assert error(tmp_path, aout_image(), ram=[]).endswith("kernel: no RAM regions given")
    assert error(tmp_path, aout_image(), ram=[(0, 0x200000), (0x100000, 0x1000)]).endswith(
        "kernel: RAM region 0x100000-0x100fff overlaps 0x0-0x1fffff"
    )
    assert error(tmp_path, aout_image(), ram=[(0, 0)]).endswith(
        "kernel: RAM region gpa 0x0 size 0x0 is invalid"
    )


def test_boot_information_in_ram_that_starts_at_1_mib(tmp_path: Path) -> None:
    plan = load(tmp_path, aout_image(), ram=[(0x100000, 0x100000)])
    assert boot_base(plan) == 0x100030  # right after the kernel


def test_no_room_for_the_boot_information(tmp_path: Path) -> None:
    image = aout_image(load_addr=0x8000, bss_end_addr=0x70000)
    message = error(tmp_path, image, ram=[(0, 0xA0000)], cmdline="x" * 0x20000)
    assert "kernel: no room for the 0x20" in message
    assert "multiboot information, command line and module list" in message


def test_a_long_cmdline_goes_above_the_kernel(tmp_path: Path) -> None:
    plan = load(tmp_path, aout_image(), cmdline="x" * 0x70000)
    assert boot_base(plan) == 0x100030
    assert c_string(plan, u32(plan, 0x100030 + 16)).endswith(b" " + b"x" * 0x70000)


def test_cmdline_with_nul_is_refused(tmp_path: Path) -> None:
    assert error(tmp_path, aout_image(), cmdline="a\0b").endswith(
        "kernel: command line 'a\\x00b' contains a NUL byte"
    )


# -- modules ----------------------------------------------------------------------------


def test_module_placement_respects_alignment(tmp_path: Path) -> None:
    mods = [write(tmp_path, bytes([i]) * size, f"m{i}") for i, size in enumerate((1, 4096, 0, 3))]
    plan = load(tmp_path, aout_image(code=bytes(0x1001)), modules=[(str(m), "") for m in mods])
    mods_addr = u32(plan, 0x9000 + 24)
    spans = [struct.unpack("<II", peek(plan, mods_addr + 16 * i, 8)) for i in range(4)]
    # The kernel ends at 0x101021 (header + code).
    assert spans == [
        (0x102000, 0x102001),
        (0x103000, 0x104000),
        (0x104000, 0x104000),
        (0x104000, 0x104003),
    ]
    assert all(start % 0x1000 == 0 for start, _ in spans)
    module_segments = plan.segments[1:-1]
    assert [(s.gpa, s.memsz) for s in module_segments] == [
        (0x102000, 1),
        (0x103000, 4096),
        (0x104000, 3),
    ]


def test_missing_module(tmp_path: Path) -> None:
    message = error(tmp_path, aout_image(), modules=[(str(tmp_path / "nope"), "x")])
    assert message.endswith(
        f"kernel: module {tmp_path / 'nope'}: cannot read: No such file or directory"
    )


def test_empty_module_path(tmp_path: Path) -> None:
    assert error(tmp_path, aout_image(), modules=[("", "x")]).endswith("module path is empty")


def test_module_bigger_than_ram_is_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    big = tmp_path / "big"
    with big.open("wb") as f:
        f.truncate((128 << 20) + 1)
    reads: list[str] = []

    def spy(path: str | Path, limit: int = 1 << 30, what: str = "image") -> bytes:
        reads.append(str(path))
        return read_image(path, limit, what)

    monkeypatch.setattr("kvmpy.loaders.multiboot.read_image", spy)
    message = error(tmp_path, aout_image(), modules=[(str(big), "")])
    assert message.endswith(
        f"kernel: module {big}: 0x8000001 bytes at 0x101000 do not fit in available guest RAM "
        "below 4 GiB"
    )
    assert reads == [str(tmp_path / "kernel")]


def test_module_past_end_of_ram(tmp_path: Path) -> None:
    mod = write(tmp_path, bytes(0x2000), "mod")
    image = aout_image(bss_end_addr=(4 << 20) - 0x1000)
    message = error(tmp_path, image, ram=[(0, 4 << 20)], modules=[(str(mod), "")])
    assert message.endswith(
        f"module {mod}: 0x2000 bytes at 0x3ff000 do not fit in available guest RAM below 4 GiB"
    )


def test_module_at_0x9000_moves_the_boot_information(tmp_path: Path) -> None:
    mod = write(tmp_path, bytes(16), "mod")
    image = aout_image(load_addr=0x8000)  # ends before 0x9000: the module goes to 0x9000
    plan = load(tmp_path, image, modules=[(str(mod), "")])
    assert plan.segments[1].gpa == 0x9000
    assert boot_base(plan) == 0x9010
    assert_intact(plan)


def test_module_in_the_legacy_hole_is_refused(tmp_path: Path) -> None:
    mod = write(tmp_path, bytes(0x1000), "mod")
    image = aout_image(load_addr=0x90000, bss_end_addr=0x9F000)
    message = error(tmp_path, image, modules=[(str(mod), "")])
    assert message.endswith("0x1000 bytes at 0x9f000 do not fit in available guest RAM below 4 GiB")


# -- the plan in guest memory -----------------------------------------------------------


def test_plan_passes_check_plan(tmp_path: Path) -> None:
    mod = write(tmp_path, b"initrd", "mod")
    plan = load(tmp_path, multiboot_elf(), ram=[(0, 16 << 20)], modules=[(str(mod), "")])
    with GuestMemory.with_ram(16 << 20) as memory:
        check_plan(plan, memory, [(0x500, 0x530), (0x1000, 0x7000)])
        for seg in plan.segments:
            memory.write(seg.gpa, seg.data)
        assert memory.read(0x9000, 4) == struct.pack("<I", 0x24D)
        assert memory.read(0x104000, 6) == b"initrd"


AS_SOURCE = """
    .section .text
    .globl _start
    .align 4
mb_header:
    .long 0x1BADB002
    .long 0x00000003
    .long -(0x1BADB002 + 0x00000003)
_start:
    cmpl $0x2BADB002, %eax
    hlt
    .section .bss
    .skip 0x2000
"""


@pytest.mark.skipif(
    shutil.which("as") is None or shutil.which("ld") is None, reason="needs GNU as and ld"
)
def test_real_multiboot_elf_kernel(tmp_path: Path) -> None:
    src, obj, kernel = tmp_path / "k.S", tmp_path / "k.o", tmp_path / "k.elf"
    src.write_text(AS_SOURCE)
    subprocess.run(["as", "--32", "-o", str(obj), str(src)], check=True)
    subprocess.run(
        ["ld", "-m", "elf_i386", "-Ttext=0x100000", "-e", "_start", "-o", str(kernel), str(obj)],
        check=True,
    )
    data = kernel.read_bytes()
    assert is_multiboot(data)
    plan = load_multiboot(kernel, ram=RAM_128M, cmdline="hello")
    assert plan.entry == 0x10000C
    text = next(seg for seg in plan.segments if seg.gpa == 0x100000)
    assert text.data[:12] == header(0x3)
    assert text.data[12:18] == b"\x3d\x02\xb0\xad\x2b\xf4"  # cmp $0x2badb002, %eax; hlt
    assert any(seg.memsz - len(seg.data) >= 0x2000 for seg in plan.segments)  # the bss
    assert c_string(plan, u32(plan, 0x9000 + 16)) == f"{kernel} hello".encode()
    with GuestMemory.with_ram(128 << 20) as memory:
        check_plan(plan, memory, [(0x500, 0x530), (0x1000, 0x7000)])


# 32-bit code: exit 0x11 if EAX has the magic and EBX points at flags 0x24d and
# mem_lower 639, else exit 0x22.
CHECK_EBX = bytes.fromhex(
    "3d02b0ad2b 7515 813b4d020000 750d 817b047f020000 7504 b011 e6f4 b022 e6f4 f4"
)


@pytest.mark.kvm
@pytest.mark.parametrize(
    ("load_addr", "bss_end"), [(0x8000, 0xA86C), (0x100000, 0), (0x7000, 0x9000)]
)
def test_kernel_finds_intact_information_at_ebx(
    tmp_path: Path, load_addr: int, bss_end: int
) -> None:
    from kvmpy.machine import Machine

    image = write(tmp_path, aout_image(load_addr=load_addr, code=CHECK_EBX, bss_end_addr=bss_end))
    with Machine(mem_size=16 << 20) as m:
        m.boot(image, image_format="multiboot")
        assert m.run(timeout=30).exit_code == 0x11
