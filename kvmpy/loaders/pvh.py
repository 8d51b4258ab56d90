"""PVH boot: an ELF kernel with a Xen PHYS32_ENTRY note, as QEMU's -kernel boots it.

QEMU boots an ELF that is not multiboot only if it carries this note (Linux,
and unikernels built for QEMU's microvm, do).  The kernel is entered in
32-bit protected mode with paging off at the note's address, with EBX
pointing at a ``struct hvm_start_info`` (version 1): the command line, the
ACPI RSDP and an E820-style memory map.  kvmpy builds it at 0x9000, like the
multiboot information, and lists that range as reserved.

An initrd is passed as module 0 (``nr_modules`` = 1, ``modlist_paddr``
pointing at one ``hvm_modlist_entry`` after the memory map), which is where
Linux looks for it.  It is placed as high as RAM below 4 GiB allows,
page-aligned, clear of the kernel's segments.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from pathlib import Path

from kvmpy.loaders import LoaderError, LoadPlan, LoadSegment
from kvmpy.loaders.bzimage import place_initrd, validate_e820
from kvmpy.loaders.elf import ELFCLASS32, load_elf, parse_elf, read_image
from kvmpy.loaders.multiboot import memory_map

PT_NOTE = 4
XEN_ELFNOTE_PHYS32_ENTRY = 18
HVM_START_MAGIC = 0x336EC578
START_INFO_ADDR = 0x9000
START_INFO_LIMIT = 0x70000  # as for multiboot: clear of the boot stack at 0x80000
_START_INFO = struct.Struct("<IIIIQQQQII")  # hvm_start_info, version 1
_MEMMAP_ENTRY = struct.Struct("<QQII")
_MODLIST_ENTRY = struct.Struct("<QQQQ")  # paddr, size, cmdline_paddr, reserved
# The initrd stays below 4 GiB, inside the identity map of kvmpy's long mode.
INITRD_LIMIT = 1 << 32
# Linux keeps early page tables and its brk area past its image: leave room.
KERNEL_SLACK = 16 << 20


def _program_headers(data: bytes) -> list[tuple[int, int, int]]:
    """(p_type, p_offset, p_filesz) of each program header of a validated ELF."""
    if data[4] == ELFCLASS32:
        phoff, phentsize, phnum = struct.unpack_from("<I10xHH", data, 28)
        layout, fields = "<IIIIIIII", (0, 1, 4)
    else:
        phoff, phentsize, phnum = struct.unpack_from("<Q14xHH", data, 32)
        layout, fields = "<IIQQQQQQ", (0, 2, 5)
    headers = []
    for i in range(phnum):
        values = struct.unpack_from(layout, data, phoff + i * phentsize)
        headers.append(tuple(values[f] for f in fields))
    return [(h[0], h[1], h[2]) for h in headers]


def pvh_entry(data: bytes, name: str = "<elf>") -> int | None:
    """The PHYS32_ENTRY address from the ELF's "Xen" notes, or None without one."""
    parse_elf(data, name)  # validates the headers read below
    for p_type, offset, size in _program_headers(data):
        if p_type != PT_NOTE:
            continue
        if offset + size > len(data):
            raise LoaderError(f"{name}: PT_NOTE at {offset:#x}+{size:#x} is outside the file")
        at, end = offset, offset + size
        while at + 12 <= end:
            namesz, descsz, kind = struct.unpack_from("<III", data, at)
            name_at = at + 12
            desc_at = name_at + (namesz + 3) // 4 * 4
            at = desc_at + (descsz + 3) // 4 * 4
            if at > end:
                raise LoaderError(f"{name}: a note in PT_NOTE at {offset:#x} overruns it")
            note_name = data[name_at : name_at + namesz].rstrip(b"\0")
            if note_name == b"Xen" and kind == XEN_ELFNOTE_PHYS32_ENTRY:
                if descsz not in (4, 8):
                    raise LoaderError(f"{name}: PHYS32_ENTRY note has {descsz} bytes, not 4 or 8")
                return int.from_bytes(data[desc_at : desc_at + descsz], "little") & 0xFFFFFFFF
    return None


def is_pvh(data: bytes, name: str = "<elf>") -> bool:
    return pvh_entry(data, name) is not None


def load_pvh(
    path: str | Path,
    *,
    ram: Sequence[tuple[int, int]],
    cmdline: str = "",
    rsdp: int = 0,
    initrd: str | Path | None = None,
    e820: Sequence[tuple[int, int, int]] | None = None,
    data: bytes | None = None,
) -> LoadPlan:
    """Plan a PVH boot of the ELF at ``path`` (or ``data``, already read from it).

    ``rsdp``: the ACPI RSDP's address (0: none); ``initrd``: a file passed as
    module 0; ``e820``: the memory map as (start, size, type) entries (by
    default ``ram`` with the firmware areas reserved).
    """
    name = str(path)
    if data is None:
        data = read_image(path, what="ELF image")
    entry = pvh_entry(data, name)
    if entry is None:
        raise LoaderError(f"{name}: no Xen PHYS32_ENTRY note: not a PVH kernel")
    plan = load_elf(path, data)
    if not any(seg.gpa <= entry < seg.gpa + len(seg.data) for seg in plan.segments):
        # As for e_entry: the vCPU must start in the kernel's bytes, not in zeros.
        raise LoaderError(
            f"{name}: PHYS32_ENTRY {entry:#x} is not inside the file-backed part of any "
            f"PT_LOAD segment"
        )

    entries = validate_e820(memory_map(ram) if e820 is None else e820, name)
    memmap_at = START_INFO_ADDR + _START_INFO.size
    modlist_at = memmap_at + len(entries) * _MEMMAP_ENTRY.size
    modules = b""
    if initrd is not None:
        ramdisk = read_image(initrd, what="initrd")
        kernel_end = max((segment.end for segment in plan.segments), default=0)
        ramdisk_at = place_initrd(
            len(ramdisk),
            entries,
            floor=kernel_end + KERNEL_SLACK,
            limit=INITRD_LIMIT,
            name=str(initrd),
        )
        plan.segments.append(LoadSegment(ramdisk_at, ramdisk, len(ramdisk)))
        modules = _MODLIST_ENTRY.pack(ramdisk_at, len(ramdisk), 0, 0)
    cmdline_at = modlist_at + len(modules)
    command = cmdline.encode() + b"\0"
    if b"\0" in command[:-1]:
        raise LoaderError(f"{name}: the command line contains a NUL byte")
    info = _START_INFO.pack(
        HVM_START_MAGIC,
        1,
        0,
        len(modules) // _MODLIST_ENTRY.size,
        modlist_at if modules else 0,
        cmdline_at,
        rsdp,
        memmap_at,
        len(entries),
        0,
    )
    memmap = b"".join(_MEMMAP_ENTRY.pack(base, length, kind, 0) for base, length, kind in entries)
    boot_data = info + memmap + modules + command
    end = START_INFO_ADDR + len(boot_data)
    if end > START_INFO_LIMIT:
        raise LoaderError(f"{name}: the PVH start info does not fit below {START_INFO_LIMIT:#x}")
    for segment in plan.segments:
        if segment.gpa < end and segment.end > START_INFO_ADDR:
            raise LoaderError(
                f"{name}: segment {segment.gpa:#x}-{segment.end - 1:#x} overlaps the PVH start "
                f"info at {START_INFO_ADDR:#x}-{end - 1:#x}"
            )
    plan.entry = entry
    plan.mode = "protected"
    plan.registers = {"rbx": START_INFO_ADDR}
    plan.segments.append(LoadSegment(START_INFO_ADDR, boot_data, len(boot_data)))
    plan.reserved.append((START_INFO_ADDR, end))
    return plan
