"""Linux boot protocol images (bzImage), as in Linux's Documentation/arch/x86/boot.rst.

An image is recognised by "HdrS" at offset 0x202 and must speak protocol
2.06 or later.  kvmpy has no BIOS to run the 16-bit setup code, so it does
what the setup code would have done and enters the kernel directly, as
Firecracker does:

- the protected-mode part (everything after the ``setup_sects`` + 1 sectors
  of setup code) is loaded at 1 MiB, or at ``pref_address`` when the kernel
  is relocatable and that address is free;
- the zero page (``struct boot_params``) is built at 0x7000: the setup
  header copied from the image, then the e820 map, the command line's
  address, the initrd, and what a boot loader must fill in;
- a kernel with XLF_KERNEL_64 (protocol 2.12+) starts at its 64-bit entry,
  load address + 0x200, in long mode with the first 4 GiB identity-mapped
  and RSI = the zero page; any other kernel starts at the load address in
  flat 32-bit protected mode, paging off, ESI = the zero page;
- but first, a 64-bit kernel's compressed payload (``payload_offset``,
  ``payload_length``) is decompressed here when the host has the codec, and
  the ``vmlinux`` inside is placed and entered as the kernel's own
  decompressor would (``host_decompressed_kernel``): on a PVM host the
  guest's decompressor runs at emulated CPL0 and costs seconds to minutes.

Low-memory layout (clear of the GDT at 0x500, the page tables at
0x1000-0x6fff and the stack below 0x80000):

    0x07000  zero page (4 KiB)
    0x20000  command line (at most the kernel's cmdline_size, and 64 KiB)

The initrd goes as high as it can: below ``initrd_addr_max`` (and below
4 GiB), page-aligned, in available RAM and clear of the kernel's footprint,
which is ``init_size`` bytes from where the kernel will decompress itself.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Sequence
from pathlib import Path

from kvmpy.loaders import LoaderError, LoadPlan, LoadSegment
from kvmpy.loaders.elf import ELFCLASS64, MAX_IMAGE_SIZE, ElfImage, parse_elf, read_image
from kvmpy.records import Record

HDRS_MAGIC = b"HdrS"
HDRS_OFFSET = 0x202
BOOT_FLAG = 0xAA55
MIN_PROTOCOL = 0x206
SECTOR = 512
DEFAULT_SETUP_SECTS = 4  # setup_sects 0 means 4, for ancient compatibility

# Setup header fields: (offset in the image and in boot_params, struct format).
SETUP_SECTS = 0x1F1
BOOT_FLAG_AT = 0x1FE
JUMP = 0x200
VERSION = 0x206
TYPE_OF_LOADER = 0x210
LOADFLAGS = 0x211
CODE32_START = 0x214
RAMDISK_IMAGE = 0x218
RAMDISK_SIZE = 0x21C
HEAP_END_PTR = 0x224
CMD_LINE_PTR = 0x228
INITRD_ADDR_MAX = 0x22C
KERNEL_ALIGNMENT = 0x230
RELOCATABLE_KERNEL = 0x234
XLOADFLAGS = 0x236
CMDLINE_SIZE = 0x238
PAYLOAD_OFFSET = 0x248  # protocol 2.08, as is PAYLOAD_LENGTH
PAYLOAD_LENGTH = 0x24C
PREF_ADDRESS = 0x258
INIT_SIZE = 0x260
# The setup header ends where its jump (at 0x200, "jmp short") lands: 0x202 + the
# byte at 0x201.  boot_params has room for it up to 0x290.
SETUP_HEADER_LIMIT = 0x290

# boot_params fields outside the setup header.
SCREEN_INFO = 0x000
ACPI_RSDP_ADDR = 0x070  # protocol 2.14
EXT_RAMDISK_IMAGE = 0x0C0
EXT_RAMDISK_SIZE = 0x0C4
EXT_CMD_LINE_PTR = 0x0C8
ALT_MEM_K = 0x1E0
E820_ENTRIES = 0x1E8
E820_TABLE = 0x2D0
E820_MAX_ENTRIES = 128
E820_ENTRY = struct.Struct("<QQI")
ZERO_PAGE_SIZE = 0x1000

LOADFLAG_LOADED_HIGH = 0x01
LOADFLAG_KASLR = 0x02  # set only by the kernel's own decompressor, for the kernel
LOADFLAG_CAN_USE_HEAP = 0x80
XLF_KERNEL_64 = 0x01
XLF_CAN_BE_LOADED_ABOVE_4G = 0x02
TYPE_OF_LOADER_UNDEFINED = 0xFF
# As the real-mode setup code would have it: heap up to 0xfe00 in its 64 KiB segment.
HEAP_END = 0xFE00 - 0x200

E820_RAM = 1
ZERO_PAGE_ADDR = 0x7000
CMDLINE_ADDR = 0x20000
CMDLINE_LIMIT = 0x10000
KERNEL_ADDR = 0x100000  # where protocol 2.x kernels without pref_address go
ENTRY_64_OFFSET = 0x200
PAGE_SIZE = 0x1000
LIMIT_4G = 1 << 32
# What the first 4 GiB identity map of kvmpy's long mode covers.
IDENTITY_MAPPED = LIMIT_4G
# Protocols before 2.10 do not say how much room the kernel needs to decompress
# itself; assume what such kernels needed (a few times the compressed size).
OLD_KERNEL_EXPANSION = 4


class SetupHeader(Record):
    """The setup header fields the loader needs, from the image."""

    version: int
    setup_sects: int
    loadflags: int
    initrd_addr_max: int
    kernel_alignment: int
    relocatable: bool
    xloadflags: int
    cmdline_size: int
    pref_address: int
    init_size: int
    header_end: int
    payload_offset: int = 0  # the compressed kernel, relative to the protected-mode code
    payload_length: int = 0

    @property
    def has_64bit_entry(self) -> bool:
        return self.version >= 0x20C and bool(self.xloadflags & XLF_KERNEL_64)

    @property
    def setup_size(self) -> int:
        return (self.setup_sects + 1) * SECTOR


def is_bzimage(data: bytes) -> bool:
    """True when ``data`` has the Linux boot protocol's "HdrS" signature."""
    return data[HDRS_OFFSET : HDRS_OFFSET + 4] == HDRS_MAGIC


def _field(data: bytes | bytearray, offset: int, fmt: str) -> int:
    value: int = struct.unpack_from("<" + fmt, data, offset)[0]
    return value


def parse_setup_header(data: bytes, name: str = "<bzImage>") -> SetupHeader:
    """Validate and return the setup header of a Linux boot protocol image."""
    if len(data) < SETUP_HEADER_LIMIT:
        raise LoaderError(f"{name}: {len(data)} bytes is too short for a Linux setup header")
    if not is_bzimage(data):
        raise LoaderError(f"{name}: no 'HdrS' signature at {HDRS_OFFSET:#x}: not a bzImage")
    where = f"{name}: Linux setup header"
    version = _field(data, VERSION, "H")
    if version < MIN_PROTOCOL:
        raise LoaderError(
            f"{where}: boot protocol version {version >> 8}.{version & 0xFF:02} is older than "
            f"2.06, which kvmpy needs"
        )
    boot_flag = _field(data, BOOT_FLAG_AT, "H")
    if boot_flag != BOOT_FLAG:
        raise LoaderError(f"{where}: boot_flag is {boot_flag:#06x}, not {BOOT_FLAG:#06x}")
    header_end = HDRS_OFFSET + data[JUMP + 1]
    if data[JUMP] != 0xEB or not HDRS_OFFSET + 0x30 <= header_end <= SETUP_HEADER_LIMIT:
        raise LoaderError(
            f"{where}: jump at {JUMP:#x} ({data[JUMP]:#04x} {data[JUMP + 1]:#04x}) does not "
            f"give a setup header end between {HDRS_OFFSET + 0x30:#x} and {SETUP_HEADER_LIMIT:#x}"
        )
    setup_sects = data[SETUP_SECTS] or DEFAULT_SETUP_SECTS
    loadflags = data[LOADFLAGS]
    if not loadflags & LOADFLAG_LOADED_HIGH:
        raise LoaderError(
            f"{where}: loadflags {loadflags:#04x} lack LOADED_HIGH: a zImage that must load "
            f"at 0x10000, which kvmpy does not support"
        )
    relocatable = bool(data[RELOCATABLE_KERNEL])
    kernel_alignment = _field(data, KERNEL_ALIGNMENT, "I")
    if relocatable and (kernel_alignment < PAGE_SIZE or kernel_alignment & (kernel_alignment - 1)):
        raise LoaderError(
            f"{where}: kernel_alignment {kernel_alignment:#x} is not a power of two of at "
            f"least 4 KiB"
        )
    xloadflags = _field(data, XLOADFLAGS, "H") if version >= 0x20C else 0
    cmdline_size = _field(data, CMDLINE_SIZE, "I")  # 2.06
    if cmdline_size == 0:
        raise LoaderError(f"{where}: cmdline_size is 0")
    pref_address = _field(data, PREF_ADDRESS, "Q") if version >= 0x20A else KERNEL_ADDR
    payload_size = len(data) - setup_sects * SECTOR - SECTOR
    if payload_size <= 0:
        raise LoaderError(
            f"{where}: setup_sects {setup_sects} leaves no protected-mode code in a "
            f"{len(data)}-byte file"
        )
    if version >= 0x20A:
        init_size = _field(data, INIT_SIZE, "I")
        if init_size < payload_size:
            raise LoaderError(
                f"{where}: init_size {init_size:#x} is smaller than the {payload_size:#x}-byte "
                f"protected-mode code"
            )
        if relocatable and pref_address % kernel_alignment:
            raise LoaderError(
                f"{where}: pref_address {pref_address:#x} is not a multiple of "
                f"kernel_alignment {kernel_alignment:#x}"
            )
        if pref_address < KERNEL_ADDR or pref_address + init_size > IDENTITY_MAPPED:
            raise LoaderError(
                f"{where}: pref_address {pref_address:#x} with init_size {init_size:#x} is not "
                f"between 1 MiB and 4 GiB"
            )
    else:
        init_size = payload_size * OLD_KERNEL_EXPANSION
    payload_offset = payload_length = 0
    if version >= 0x208:
        payload_offset, payload_length = struct.unpack_from("<II", data, PAYLOAD_OFFSET)
        if payload_offset + payload_length > payload_size:
            # Only host decompression reads these; a kernel that lies here is left to
            # decompress itself, so the header is not refused for it.
            payload_offset = payload_length = 0
    return SetupHeader(
        version=version,
        setup_sects=setup_sects,
        loadflags=loadflags,
        initrd_addr_max=_field(data, INITRD_ADDR_MAX, "I"),
        kernel_alignment=kernel_alignment,
        relocatable=relocatable,
        xloadflags=xloadflags,
        cmdline_size=cmdline_size,
        pref_address=pref_address,
        init_size=init_size,
        header_end=header_end,
        payload_offset=payload_offset,
        payload_length=payload_length,
    )


def _available(e820: Sequence[tuple[int, int, int]], start: int, end: int) -> bool:
    return any(
        kind == E820_RAM and base <= start and end <= base + size for base, size, kind in e820
    )


def validate_e820(e820: Sequence[tuple[int, int, int]], name: str) -> list[tuple[int, int, int]]:
    """The e820 entries, sorted; LoaderError for a map the zero page cannot carry."""
    if not e820:
        raise LoaderError(f"{name}: the e820 memory map is empty")
    if len(e820) > E820_MAX_ENTRIES:
        raise LoaderError(
            f"{name}: the e820 map has {len(e820)} entries; the zero page holds {E820_MAX_ENTRIES}"
        )
    entries = sorted(e820)
    for base, size, kind in entries:
        if base < 0 or size <= 0 or base + size > 1 << 64 or not 0 < kind < 1 << 32:
            raise LoaderError(
                f"{name}: bad e820 entry (start {base:#x}, size {size:#x}, type {kind})"
            )
    for (base, size, _), (next_base, _, _) in itertools.pairwise(entries):
        if base + size > next_base:
            raise LoaderError(f"{name}: e820 entries at {base:#x} and {next_base:#x} overlap")
    return entries


def kernel_placement(
    header: SetupHeader, e820: Sequence[tuple[int, int, int]], name: str
) -> tuple[int, int]:
    """Where to load the protected-mode code, and the end of the kernel's footprint.

    The footprint runs from the load address to ``init_size`` bytes past where
    the kernel decompresses itself: its load address rounded up to
    ``kernel_alignment`` when relocatable, else ``pref_address``.
    """
    candidates = [KERNEL_ADDR]
    if header.relocatable and header.pref_address != KERNEL_ADDR:
        candidates.insert(0, header.pref_address)
    for load in candidates:
        if header.relocatable:
            run_at = -(-load // header.kernel_alignment) * header.kernel_alignment
        else:
            run_at = max(load, header.pref_address)
        end = run_at + header.init_size
        if end <= IDENTITY_MAPPED and _available(e820, load, end):
            return load, end
    raise LoaderError(
        f"{name}: the kernel needs init_size {header.init_size:#x} bytes of RAM at "
        f"{candidates[-1]:#x}, which the memory map does not have: give the guest more memory"
    )


def place_initrd(
    size: int,
    e820: Sequence[tuple[int, int, int]],
    *,
    floor: int,
    limit: int,
    name: str,
) -> int:
    """The highest page-aligned address for ``size`` bytes of initrd in RAM in [floor, limit)."""
    for base, length, kind in sorted(e820, reverse=True):
        if kind != E820_RAM:
            continue
        top = min(base + length, limit)
        start = (top - size) // PAGE_SIZE * PAGE_SIZE
        if start >= max(base, floor):
            return start
    raise LoaderError(
        f"{name}: no room for the {size:#x}-byte initrd in RAM between {floor:#x} and "
        f"{limit:#x}: give the guest more memory"
    )


def host_decompressed_kernel(
    data: bytes, header: SetupHeader, footprint_end: int
) -> tuple[ElfImage, bytes] | None:
    """The kernel's ELF (parsed, and its bytes), decompressed here, when it can start as
    its own decompressor would start it.

    What the kernel's decompressor does, without KASLR, is: decompress the
    payload (an ELF ``vmlinux``), copy each PT_LOAD segment to its physical
    address, and jump to the entry with RSI = the zero page, in long mode with
    an identity map.  Doing that here saves running the decompressor at the
    guest's CPL0, which a PVM host emulates about 1000 times slower than
    native.  vmlinux's ``startup_64`` is written for this ("we come here
    either directly from a 64bit bootloader, or from the decompressor").

    None, and the kernel decompresses itself, unless: the kernel has the
    64-bit entry; the payload's codec is one the host has (gzip, xz, lzma,
    bzip2, LZ4); it holds an ELF64 x86-64 executable; and its segments lie in
    the ``init_size`` footprint the decompressor would use, the lowest at its
    start, so no relocation is needed.
    """
    from kvmpy.loaders.kernel_payload import PayloadError, decompress_payload

    if not header.has_64bit_entry or header.payload_length == 0:
        return None
    start = header.setup_size + header.payload_offset
    payload = data[start : start + header.payload_length]
    try:
        # The vmlinux file (plus its relocation table) is not much larger than
        # the memory it needs, init_size: twice that, and at most what kvmpy
        # reads of any image, bounds a hostile one.
        kernel = decompress_payload(payload, limit=min(2 * header.init_size, MAX_IMAGE_SIZE))
        image = parse_elf(kernel, "<decompressed payload>")
    except (PayloadError, LoaderError):
        return None
    if image.elf_class != ELFCLASS64 or not image.segments:
        return None
    run_at = footprint_end - header.init_size
    if min(seg.paddr for seg in image.segments) != run_at:
        return None
    if any(seg.paddr + seg.memsz > footprint_end for seg in image.segments):
        return None
    return image, kernel


def _screen_info() -> bytes:
    """A VGA text console of 80x25 in mode 3, as the BIOS leaves it."""
    info = bytearray(0x40)
    info[0x06] = 3  # orig_video_mode
    info[0x07] = 80  # orig_video_cols
    info[0x0E] = 25  # orig_video_lines
    info[0x0F] = 1  # orig_video_isVGA
    struct.pack_into("<H", info, 0x10, 16)  # orig_video_points: font height
    return bytes(info)


def load_bzimage(
    path: str | Path,
    *,
    e820: Sequence[tuple[int, int, int]],
    cmdline: str = "",
    initrd: str | Path | None = None,
    rsdp: int = 0,
    data: bytes | None = None,
    host_decompress: bool = True,
) -> LoadPlan:
    """Plan a Linux boot protocol boot of the image at ``path``.

    ``e820``: the board's memory map as (start, size, type) entries;
    ``initrd``: a file to pass as the initial RAM disk; ``rsdp``: the ACPI
    RSDP's address, passed to kernels of protocol 2.14+ (0: none; older ones scan);
    ``data``: the image's bytes, when already read from ``path``;
    ``host_decompress``: decompress a 64-bit kernel here and start it as its
    decompressor would (see ``host_decompressed_kernel``), at its link
    address, as with ``nokaslr``; False lets the kernel decompress itself.
    """
    name = str(path)
    if data is None:
        data = read_image(path, what="bzImage")
    header = parse_setup_header(data, name)
    entries = validate_e820(e820, name)
    load_addr, footprint_end = kernel_placement(header, entries, name)

    command = cmdline.encode()
    if b"\0" in command:
        raise LoaderError(f"{name}: the command line contains a NUL byte")
    if len(command) > min(header.cmdline_size, CMDLINE_LIMIT - 1):
        raise LoaderError(
            f"{name}: the command line is {len(command)} bytes; the kernel's cmdline_size "
            f"allows {header.cmdline_size}"
        )

    params = bytearray(ZERO_PAGE_SIZE)
    params[SCREEN_INFO : SCREEN_INFO + 0x40] = _screen_info()
    params[SETUP_SECTS : header.header_end] = data[SETUP_SECTS : header.header_end]
    params[TYPE_OF_LOADER] = TYPE_OF_LOADER_UNDEFINED
    params[LOADFLAGS] = (header.loadflags | LOADFLAG_CAN_USE_HEAP) & ~LOADFLAG_KASLR
    struct.pack_into("<I", params, CODE32_START, load_addr)
    struct.pack_into("<H", params, HEAP_END_PTR, HEAP_END)
    struct.pack_into("<I", params, CMD_LINE_PTR, CMDLINE_ADDR)
    if rsdp and header.version >= 0x20E:
        struct.pack_into("<Q", params, ACPI_RSDP_ADDR, rsdp)
    above_1m = sum(
        min(base + size, LIMIT_4G) - max(base, KERNEL_ADDR)
        for base, size, kind in entries
        if kind == E820_RAM and base + size > KERNEL_ADDR and base < LIMIT_4G
    )
    struct.pack_into("<I", params, ALT_MEM_K, above_1m >> 10)
    params[E820_ENTRIES] = len(entries)
    for index, entry in enumerate(entries):
        E820_ENTRY.pack_into(params, E820_TABLE + index * E820_ENTRY.size, *entry)

    plan = LoadPlan(source=name, entry=load_addr)
    decompressed = (
        host_decompressed_kernel(data, header, footprint_end) if host_decompress else None
    )
    if decompressed is None:
        plan.segments.append(
            LoadSegment(load_addr, data[header.setup_size :], len(data) - header.setup_size)
        )
    else:
        image, kernel = decompressed
        plan.segments += [
            LoadSegment(seg.paddr, kernel[seg.offset : seg.offset + seg.filesz], seg.memsz)
            for seg in image.segments
        ]
    if initrd is not None:
        ramdisk = read_image(initrd, what="initrd")
        limit = header.initrd_addr_max + 1
        if not header.xloadflags & XLF_CAN_BE_LOADED_ABOVE_4G:
            limit = min(limit, LIMIT_4G)
        limit = min(limit, IDENTITY_MAPPED)
        ramdisk_at = place_initrd(
            len(ramdisk), entries, floor=footprint_end, limit=limit, name=f"{initrd}"
        )
        struct.pack_into("<II", params, RAMDISK_IMAGE, ramdisk_at, len(ramdisk))
        plan.segments.append(LoadSegment(ramdisk_at, ramdisk, len(ramdisk)))
    plan.segments.append(LoadSegment(ZERO_PAGE_ADDR, bytes(params), ZERO_PAGE_SIZE))
    plan.segments.append(LoadSegment(CMDLINE_ADDR, command + b"\0", len(command) + 1))
    plan.reserved += [
        (ZERO_PAGE_ADDR, ZERO_PAGE_ADDR + ZERO_PAGE_SIZE),
        (CMDLINE_ADDR, CMDLINE_ADDR + len(command) + 1),
    ]
    if decompressed is not None:
        plan.entry = decompressed[0].entry
        plan.mode = "long"
        plan.detail = "kernel decompressed by kvmpy, at its link address (no KASLR)"
    elif header.has_64bit_entry:
        plan.entry = load_addr + ENTRY_64_OFFSET
        plan.mode = "long"
    else:
        plan.mode = "protected"
    plan.registers = {"rsi": ZERO_PAGE_ADDR}
    return plan
