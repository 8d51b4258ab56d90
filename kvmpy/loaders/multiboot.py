"""Multiboot v1 kernels (Multiboot Specification 0.6.96).

The header is looked for in the first 8192 bytes of the image, 4-byte
aligned: magic 0x1BADB002, flags, and a checksum such that the three sum to
0 mod 2**32. Required flags (bits 0-15) other than bit 0 (page-align
modules: modules are always page-aligned), bit 1 (memory information: always
given) and bit 2 (video mode: accepted, but no video information is given,
as QEMU does) are refused. Optional flags (bits 16-31) other than bit 16 are
ignored.

With flag bit 16 (the "a.out kludge") the header's address fields say where
the image goes, whatever its format; the header must lie inside the loaded
bytes and the entry inside the loaded file bytes. Without it the image must
be an ELF32 file, loaded by ``load_elf``; an ELF64 kernel without bit 16 is
refused, as QEMU refuses it.

The kernel starts in 32-bit protected mode with paging and interrupts off and
flat segments (``mode="protected"``), with EAX = 0x2BADB002 and EBX = the
address of the Multiboot information (``registers``).

Placement of what the loader builds (one segment, listed in ``reserved``),
from its base B:

    B        Multiboot information (116 bytes, all fields up to color_info)
    B+0x80   memory map: 24-byte entries (size = 20, base_addr, length, type)
    ...      module list: 16 bytes per module (mod_start, mod_end, string, 0),
             16-byte aligned
    ...      strings: the command line, "kvmpy", the module strings

B is the first 16-byte aligned address, from 0x9000 up (then below 0x9000),
where the whole of it fits in RAM the memory map calls available, below
4 GiB, that no kernel segment (bss included) or module uses and that is clear
of kvmpy's own low-memory structures: the IVT, BDA and GDT, the page tables
(0x1000-0x6fff) and the 64 KiB under the initial stack top (0x70000-0x7ffff).
Usually that is 0x9000; a kernel linked over it moves the data past its end.
Only when no gap is big enough is the kernel refused.

The command line is the kernel path as given, then a space and ``cmdline``
when that is not empty, NUL-terminated. Modules are placed one after the other
at page-aligned addresses above the kernel's highest address (bss included);
mod_end is exclusive (start + size). A module's string is its path as given,
followed by a space and its arguments when there are any, which is the string
QEMU passes for ``-initrd "path args"``.

The information sets flags 0 (mem_lower = KiB of RAM from 0 up to the EBDA,
so 639 as under QEMU, matching the memory map;
mem_upper = KiB of RAM contiguous from 1 MiB up to the first hole), 2
(cmdline), 3 (mods, possibly 0 of them), 6 (mmap) and 9 (boot_loader_name).
The memory map lists RAM below 0x9fc00 and from 1 MiB up as available (type 1),
and 0x9fc00-0x9ffff and 0xf0000-0xfffff as reserved (type 2).
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Sequence
from pathlib import Path

from kvmpy.loaders import LoaderError, LoadPlan, LoadSegment
from kvmpy.loaders.elf import ELFCLASS64, MAX_IMAGE_SIZE, is_elf, load_elf, read_image
from kvmpy.records import Record
from kvmpy.x86.modes import PAGE_TABLE_END, STACK_TOP

MULTIBOOT_MAGIC = 0x1BADB002
BOOTLOADER_MAGIC = 0x2BADB002
HEADER_SEARCH_SIZE = 8192
HEADER_ALIGN = 4

FLAG_PAGE_ALIGN = 1 << 0
FLAG_MEMORY_INFO = 1 << 1
FLAG_VIDEO_MODE = 1 << 2
FLAG_AOUT_KLUDGE = 1 << 16
REQUIRED_FLAGS_MASK = 0xFFFF
SUPPORTED_REQUIRED_FLAGS = FLAG_PAGE_ALIGN | FLAG_MEMORY_INFO | FLAG_VIDEO_MODE

# Header sizes: the magic/flags/checksum, then the address fields, then the video fields.
HEADER_BASE_SIZE = 12
HEADER_ADDR_SIZE = 32
HEADER_VIDEO_SIZE = 48

# Multiboot information flags that this loader sets.
MBI_FLAG_MEMORY = 1 << 0
MBI_FLAG_CMDLINE = 1 << 2
MBI_FLAG_MODS = 1 << 3
MBI_FLAG_MMAP = 1 << 6
MBI_FLAG_BOOT_LOADER_NAME = 1 << 9
MBI_FLAGS = (
    MBI_FLAG_MEMORY | MBI_FLAG_CMDLINE | MBI_FLAG_MODS | MBI_FLAG_MMAP | MBI_FLAG_BOOT_LOADER_NAME
)

# Field offsets in the Multiboot information.
MBI_MEM_LOWER = 4
MBI_MEM_UPPER = 8
MBI_CMDLINE = 16
MBI_MODS_COUNT = 20
MBI_MODS_ADDR = 24
MBI_MMAP_LENGTH = 44
MBI_MMAP_ADDR = 48
MBI_BOOT_LOADER_NAME = 64
MBI_SIZE = 116  # up to and including color_info

MMAP_ENTRY = struct.Struct("<IQQI")  # size, base_addr, length, type
MMAP_ENTRY_SIZE_FIELD = MMAP_ENTRY.size - 4  # 20: the size field does not count itself
MMAP_AVAILABLE = 1
MMAP_RESERVED = 2
MODULE_ENTRY = struct.Struct("<IIII")  # mod_start, mod_end, string, reserved

BOOT_DATA_ADDR = 0x9000  # the first choice
BOOT_DATA_ALIGN = 16
MMAP_OFFSET = 0x80
BOOT_DATA_LIMIT = STACK_TOP - 0x10000  # 0x70000: 64 KiB left for the initial stack
# What kvmpy itself uses in low RAM, in any mode: the IVT, the BIOS Data Area
# and the GDT (0x500), page tables (0x1000-0x6fff), and the initial stack.
FIXED_BOOT_RANGES = ((0, PAGE_TABLE_END), (BOOT_DATA_LIMIT, STACK_TOP))
BOOT_LOADER_NAME = "kvmpy"

EBDA_START = 0x9FC00
LOW_MEMORY_END = 0xA0000
BIOS_START = 0xF0000
HIGH_MEMORY_START = 0x100000  # where mem_upper starts counting
PAGE_SIZE = 0x1000
ADDRESS_LIMIT_32 = 1 << 32
PHYS_ADDRESS_LIMIT = 1 << 52


class MultibootHeader(Record):
    """A Multiboot header found at ``offset`` in the image.

    The address fields are 0 unless ``flags`` has bit 16, the video fields 0
    unless it has bit 2.
    """

    offset: int
    flags: int
    checksum: int
    header_addr: int = 0
    load_addr: int = 0
    load_end_addr: int = 0
    bss_end_addr: int = 0
    entry_addr: int = 0
    mode_type: int = 0
    width: int = 0
    height: int = 0
    depth: int = 0

    @property
    def has_addresses(self) -> bool:
        return bool(self.flags & FLAG_AOUT_KLUDGE)


def _u32(data: bytes, offset: int) -> int:
    value: int = struct.unpack_from("<I", data, offset)[0]
    return value


def _candidates(data: bytes) -> list[int]:
    """Offsets of 4-byte aligned magics with a valid checksum in the search window."""
    window = data[:HEADER_SEARCH_SIZE]
    magic = MULTIBOOT_MAGIC.to_bytes(4, "little")
    found: list[int] = []
    at = window.find(magic)
    while at >= 0:
        if at % HEADER_ALIGN == 0 and at + HEADER_BASE_SIZE <= len(window):
            flags, checksum = struct.unpack_from("<II", window, at + 4)
            if (MULTIBOOT_MAGIC + flags + checksum) & 0xFFFFFFFF == 0:
                found.append(at)
        at = window.find(magic, at + 1)
    return found


def is_multiboot(data: bytes) -> bool:
    """True when ``data`` has a Multiboot header (magic and checksum) where one may be."""
    return bool(_candidates(data))


def find_header(data: bytes, name: str = "<image>") -> MultibootHeader | None:
    """The first Multiboot header in ``data``, or None; LoaderError if it is unusable."""
    found = _candidates(data)
    if not found:
        return None
    offset = found[0]
    flags, checksum = struct.unpack_from("<II", data, offset + 4)
    where = f"{name}: multiboot header at offset {offset:#x}"
    unsupported = flags & REQUIRED_FLAGS_MASK & ~SUPPORTED_REQUIRED_FLAGS
    if unsupported:
        raise LoaderError(
            f"{where}: flags {flags:#010x} set required bits {unsupported:#x} that kvmpy does "
            f"not support (only bits 0-2)"
        )
    size = HEADER_BASE_SIZE
    if flags & FLAG_AOUT_KLUDGE:
        size = HEADER_ADDR_SIZE
    if flags & FLAG_VIDEO_MODE:
        size = HEADER_VIDEO_SIZE
    end = offset + size
    if end > len(data):
        raise LoaderError(
            f"{where}: flags {flags:#010x} need a {size}-byte header, but the file ends at "
            f"{len(data):#x}"
        )
    if end > HEADER_SEARCH_SIZE:
        raise LoaderError(
            f"{where}: flags {flags:#010x} need a {size}-byte header, which ends at {end:#x}, "
            f"past the first {HEADER_SEARCH_SIZE} bytes"
        )
    fields = [_u32(data, offset + 12 + 4 * i) for i in range((size - 12) // 4)]
    fields += [0] * (9 - len(fields))
    return MultibootHeader(offset, flags, checksum, *fields)


def _explain_missing(data: bytes) -> str:
    """Why no header was found: the nearest miss, if any."""
    magic = MULTIBOOT_MAGIC.to_bytes(4, "little")
    at = data.find(magic)
    first_far: int | None = None
    while at >= 0:
        if at + HEADER_BASE_SIZE > HEADER_SEARCH_SIZE:
            if first_far is None:
                first_far = at
        elif at % HEADER_ALIGN:
            return f"magic {MULTIBOOT_MAGIC:#x} at offset {at:#x} is not 4-byte aligned"
        elif at + HEADER_BASE_SIZE <= len(data):
            flags, checksum = struct.unpack_from("<II", data, at + 4)
            total = (MULTIBOOT_MAGIC + flags + checksum) & 0xFFFFFFFF
            return (
                f"magic at offset {at:#x} has checksum {checksum:#010x}, but magic + flags "
                f"{flags:#010x} + checksum is {total:#010x}, not 0"
            )
        at = data.find(magic, at + 1)
    if first_far is not None:
        return (
            f"magic {MULTIBOOT_MAGIC:#x} at offset {first_far:#x} is past the first "
            f"{HEADER_SEARCH_SIZE} bytes"
        )
    return f"no magic {MULTIBOOT_MAGIC:#x} in the first {HEADER_SEARCH_SIZE} bytes"


# -- RAM and the memory map -------------------------------------------------------------


def _ram_runs(name: str, ram: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Validate the RAM regions and merge them into sorted, maximal (start, end) runs."""
    if not ram:
        raise LoaderError(f"{name}: no RAM regions given")
    spans: list[tuple[int, int]] = []
    for gpa, size in ram:
        if gpa < 0 or size <= 0 or gpa + size > PHYS_ADDRESS_LIMIT:
            raise LoaderError(f"{name}: RAM region gpa {gpa:#x} size {size:#x} is invalid")
        spans.append((gpa, gpa + size))
    spans.sort()
    runs: list[tuple[int, int]] = []
    for start, end in spans:
        if runs and start < runs[-1][1]:
            raise LoaderError(
                f"{name}: RAM region {start:#x}-{end - 1:#x} overlaps "
                f"{runs[-1][0]:#x}-{runs[-1][1] - 1:#x}"
            )
        if runs and start == runs[-1][1]:
            runs[-1] = (runs[-1][0], end)
        else:
            runs.append((start, end))
    return runs


def _run_end(runs: list[tuple[int, int]], addr: int) -> int:
    """The end of the RAM run holding ``addr``, or ``addr`` itself when it is not RAM."""
    for start, end in runs:
        if start <= addr < end:
            return end
    return addr


def parse_module(text: str) -> tuple[str, str]:
    """Split a "FILE[,ARGS]" boot-module option (QEMU's -initrd spelling) into (file, args)."""
    path, _, args = text.partition(",")
    return path, args


def memory_map(ram: Sequence[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """The Multiboot memory map for ``ram`` regions: sorted (base, length, type) entries."""
    entries = [
        (EBDA_START, LOW_MEMORY_END - EBDA_START, MMAP_RESERVED),
        (BIOS_START, HIGH_MEMORY_START - BIOS_START, MMAP_RESERVED),
    ]
    for start, end in _ram_runs("memory map", ram):
        for lo, hi in ((0, EBDA_START), (HIGH_MEMORY_START, PHYS_ADDRESS_LIMIT)):
            a, b = max(start, lo), min(end, hi)
            if a < b:
                entries.append((a, b - a, MMAP_AVAILABLE))
    return sorted(entries)


def _available(entries: list[tuple[int, int, int]], start: int, end: int) -> bool:
    return any(
        kind == MMAP_AVAILABLE and base <= start and end <= base + length
        for base, length, kind in entries
    )


def _free_spans(
    entries: list[tuple[int, int, int]], occupied: Sequence[tuple[int, int]]
) -> list[tuple[int, int]]:
    """Available RAM below 4 GiB, less the ``occupied`` and fixed ranges: sorted (start, end)."""
    taken = sorted([*occupied, *FIXED_BOOT_RANGES])
    spans: list[tuple[int, int]] = []
    for base, length, kind in entries:
        if kind != MMAP_AVAILABLE:
            continue
        start, end = base, min(base + length, ADDRESS_LIMIT_32)
        for taken_start, taken_end in taken:
            if taken_end <= start or end <= taken_start:
                continue
            if start < taken_start:
                spans.append((start, taken_start))
            start = max(start, taken_end)
            if start >= end:
                break
        if start < end:
            spans.append((start, end))
    return sorted(spans)


def place_boot_data(
    size: int, entries: list[tuple[int, int, int]], occupied: Sequence[tuple[int, int]]
) -> int | None:
    """Where ``size`` bytes of boot data fit in free RAM, or None when nowhere.

    The first fit at or above ``BOOT_DATA_ADDR`` (0x9000, where it has always
    gone: low memory, clear of a kernel at 1 MiB), else the first fit below it.
    """
    spans = _free_spans(entries, occupied)
    preferred = [(max(start, BOOT_DATA_ADDR), end) for start, end in spans if end > BOOT_DATA_ADDR]
    lower = [(start, min(end, BOOT_DATA_ADDR)) for start, end in spans if start < BOOT_DATA_ADDR]
    for start, end in [*preferred, *lower]:
        base = _align(start, BOOT_DATA_ALIGN)
        if base + size <= end:
            return base
    return None


# -- the kernel image -------------------------------------------------------------------


def _aout_segment(name: str, data: bytes, header: MultibootHeader) -> tuple[LoadSegment, int]:
    """The kernel segment and entry point from the header's address fields (flag 16)."""
    where = f"{name}: multiboot header at offset {header.offset:#x}"
    load_addr, header_addr = header.load_addr, header.header_addr
    if load_addr > header_addr:
        raise LoaderError(
            f"{where}: load_addr {load_addr:#x} is above header_addr {header_addr:#x}"
        )
    text_offset = header.offset - (header_addr - load_addr)
    if text_offset < 0:
        raise LoaderError(
            f"{where}: header_addr {header_addr:#x} - load_addr {load_addr:#x} is more than the "
            f"header's file offset, so loading would start before the file"
        )
    if header.load_end_addr:
        if header.load_end_addr <= load_addr:
            raise LoaderError(
                f"{where}: load_end_addr {header.load_end_addr:#x} is not above load_addr "
                f"{load_addr:#x}"
            )
        load_size = header.load_end_addr - load_addr
        if text_offset + load_size > len(data):
            raise LoaderError(
                f"{where}: load_end_addr {header.load_end_addr:#x} needs file bytes up to "
                f"{text_offset + load_size:#x}, but the file is {len(data):#x} bytes"
            )
    else:
        load_size = len(data) - text_offset
        if load_addr + load_size > ADDRESS_LIMIT_32:
            raise LoaderError(
                f"{where}: load_addr {load_addr:#x} + the {load_size:#x} bytes to the end of "
                f"the file (load_end_addr 0) go past 4 GiB"
            )
    load_end = load_addr + load_size
    if header_addr + HEADER_BASE_SIZE > load_end:
        raise LoaderError(
            f"{where}: header_addr {header_addr:#x} is not inside the loaded bytes "
            f"{load_addr:#x}-{load_end - 1:#x}"
        )
    memsz = load_size
    if header.bss_end_addr:
        if header.bss_end_addr < load_end:
            raise LoaderError(
                f"{where}: bss_end_addr {header.bss_end_addr:#x} is below the end of the "
                f"loaded bytes {load_end:#x}"
            )
        memsz = header.bss_end_addr - load_addr
    if not load_addr <= header.entry_addr < load_end:
        raise LoaderError(
            f"{where}: entry_addr {header.entry_addr:#x} is not inside the loaded bytes "
            f"{load_addr:#x}-{load_end - 1:#x}"
        )
    segment = LoadSegment(load_addr, data[text_offset : text_offset + load_size], memsz)
    return segment, header.entry_addr


def _kernel(name: str, data: bytes, header: MultibootHeader) -> tuple[list[LoadSegment], int]:
    if header.has_addresses:
        segment, entry = _aout_segment(name, data, header)
        return [segment], entry
    if not is_elf(data):
        raise LoaderError(
            f"{name}: multiboot flags {header.flags:#010x} lack bit 16 (address fields) and "
            f"the image is not ELF, so there is no telling where to load it"
        )
    if len(data) > 4 and data[4] == ELFCLASS64:
        raise LoaderError(
            f"{name}: ELF64 multiboot kernels are not supported without the a.out kludge "
            f"(flags bit 16), as in QEMU: give a 32-bit ELF"
        )
    plan = load_elf(name, data)
    return plan.segments, plan.entry


# -- strings ----------------------------------------------------------------------------


def _c_string(name: str, what: str, text: str) -> bytes:
    """``text`` NUL-terminated, encoded as the host encodes file names and arguments."""
    try:
        raw = os.fsencode(text)
    except UnicodeEncodeError:
        raise LoaderError(f"{name}: {what} {text!r} cannot be encoded") from None
    if b"\0" in raw:
        raise LoaderError(f"{name}: {what} {text!r} contains a NUL byte")
    return raw + b"\0"


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


# -- the plan ---------------------------------------------------------------------------


def load_multiboot(
    path: str | Path,
    *,
    ram: Sequence[tuple[int, int]],
    cmdline: str = "",
    modules: Sequence[tuple[str, str]] = (),
    data: bytes | None = None,
) -> LoadPlan:
    """Plan to boot the Multiboot kernel at ``path`` in a VM with ``ram`` (gpa, size) regions.

    ``data`` is the kernel already read from ``path``, if it was (each file is read once).

    ``modules`` are (file path, arguments) pairs, loaded in order after the kernel.
    """
    name = str(path)
    runs = _ram_runs(name, ram)
    entries = memory_map(ram)
    ram_size = sum(end - start for start, end in runs)

    if data is None:
        data = read_image(path, MAX_IMAGE_SIZE, "kernel")
    header = find_header(data, name)
    if header is None:
        raise LoaderError(f"{name}: not a multiboot kernel: {_explain_missing(data)}")
    kernel, entry = _kernel(name, data, header)
    for seg in kernel:
        if not any(start <= seg.gpa and seg.end <= end for start, end in runs):
            raise LoaderError(
                f"{name}: kernel segment {seg.gpa:#x}-{seg.end - 1:#x} is not inside guest RAM"
            )
    kernel_end = max(seg.end for seg in kernel)

    # Modules: stat first, so that one too big for the guest is never read.
    module_segments: list[LoadSegment] = []
    placed: list[tuple[int, int, bytes, str]] = []  # start, end, string, path
    cursor = kernel_end
    for module_path, args in modules:
        if not module_path:
            raise LoaderError(f"{name}: module path is empty")
        label = f"{name}: module {module_path}"
        string = module_path + (" " + args if args else "")
        raw_string = _c_string(name, "module string", string)
        try:
            file_info = os.stat(module_path)
        except OSError as exc:
            raise LoaderError(f"{label}: cannot read: {exc.strerror}") from None
        start = _align(cursor, PAGE_SIZE)

        def check_fits(size: int, label: str = label, start: int = start) -> None:
            end = start + size
            if size > ram_size or end > ADDRESS_LIMIT_32 or not _available(entries, start, end):
                raise LoaderError(
                    f"{label}: {size:#x} bytes at {start:#x} do not fit in available guest RAM "
                    f"below 4 GiB"
                )

        if stat.S_ISREG(file_info.st_mode):
            # A regular file's size is known: one too big for the guest is never read.
            check_fits(file_info.st_size)
            content = read_image(module_path, file_info.st_size, "module")
            if len(content) != file_info.st_size:
                raise LoaderError(
                    f"{label}: size changed from {file_info.st_size} to {len(content)} while read"
                )
        else:  # a pipe has no size before it is read: read it, capped, then check
            content = read_image(module_path, min(ram_size, MAX_IMAGE_SIZE), "module")
            check_fits(len(content))
        size = len(content)
        end = start + size
        if size:
            module_segments.append(LoadSegment(start, content, size))
        placed.append((start, end, raw_string, module_path))
        cursor = end

    # The boot data: information, memory map, module list, strings.  Sizes
    # first: where it goes depends on how much room it needs.
    argv = _c_string(name, "kernel path", name)
    if cmdline:
        argv = argv[:-1] + b" " + _c_string(name, "command line", cmdline)
    loader_name = _c_string(name, "boot loader name", BOOT_LOADER_NAME)
    mmap_length = MMAP_ENTRY.size * len(entries)
    mods_offset = _align(MMAP_OFFSET + mmap_length, 16)
    strings_offset = mods_offset + MODULE_ENTRY.size * len(placed)
    strings_length = len(argv) + len(loader_name) + sum(len(raw) for _, _, raw, _ in placed)
    boot_size = strings_offset + strings_length
    occupied = [(seg.gpa, seg.end) for seg in kernel]
    occupied += [(start, end) for start, end, _raw, _path in placed]
    base = place_boot_data(boot_size, entries, occupied)
    if base is None:
        raise LoaderError(
            f"{name}: no room for the {boot_size:#x} bytes of multiboot information, command "
            f"line and module list: every gap in guest RAM below 4 GiB is taken by the "
            f"kernel, its modules or the boot structures"
        )

    mmap_addr = base + MMAP_OFFSET
    mods_addr = base + mods_offset
    strings = bytearray()

    def add_string(raw: bytes) -> int:
        addr = base + strings_offset + len(strings)
        strings.extend(raw)
        return addr

    cmdline_addr = add_string(argv)
    loader_name_addr = add_string(loader_name)
    module_list = b"".join(
        MODULE_ENTRY.pack(start, end, add_string(raw), 0) for start, end, raw, _ in placed
    )

    mem_lower = min(_run_end(runs, 0), EBDA_START) // 1024
    mem_upper = min((_run_end(runs, HIGH_MEMORY_START) - HIGH_MEMORY_START) // 1024, 0xFFFFFFFF)
    info = bytearray(MBI_SIZE)
    struct.pack_into("<III", info, 0, MBI_FLAGS, mem_lower, mem_upper)
    struct.pack_into("<III", info, MBI_CMDLINE, cmdline_addr, len(placed), mods_addr)
    struct.pack_into("<II", info, MBI_MMAP_LENGTH, mmap_length, mmap_addr)
    struct.pack_into("<I", info, MBI_BOOT_LOADER_NAME, loader_name_addr)
    mmap = b"".join(MMAP_ENTRY.pack(MMAP_ENTRY_SIZE_FIELD, *entry) for entry in entries)
    blob = (
        bytes(info).ljust(MMAP_OFFSET, b"\0")
        + mmap.ljust(mods_offset - MMAP_OFFSET, b"\0")
        + module_list
        + bytes(strings)
    )
    assert len(blob) == boot_size
    boot = LoadSegment(base, blob, len(blob))

    return LoadPlan(
        source=name,
        entry=entry,
        segments=[*kernel, *module_segments, boot],
        mode="protected",
        registers={"rax": BOOTLOADER_MAGIC, "rbx": base},
        reserved=[(boot.gpa, boot.end)],
    )
