"""Pick the loader for an image.

A header always wins over the file's name, in QEMU's -kernel order: the
Linux boot protocol ("HdrS" at 0x202, so a bzImage, or memtest86+'s
``memtest86+x64.bin``), then multiboot, then an ELF with a PVH entry note,
then (beyond QEMU) any ELF.  A file with none of these is run as raw code
only when asked for: with ``--format flat`` (``image_format="flat"``), or
when its name ends in ``.bin``, the conventional name of a flat binary (as
kvmpy's own guests/out/*.bin).  Anything else is refused, saying what was
looked for, so that an unrecognised kernel is never executed as real-mode code.

The image is read once, with a size cap, and the same bytes go to detection
and to the loader: a pipe (``kvmpy run <(cat kernel)``) or a FIFO can only be
read once, and a file that changes between two reads would be checked in one
state and loaded in another.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from pathlib import Path

from kvmpy.loaders import LoaderError, LoadPlan
from kvmpy.loaders.bzimage import is_bzimage, load_bzimage
from kvmpy.loaders.elf import MAX_IMAGE_SIZE, is_elf, load_elf, read_image
from kvmpy.loaders.flat import load_flat
from kvmpy.loaders.multiboot import (
    HEADER_ALIGN,
    HEADER_SEARCH_SIZE,
    MULTIBOOT_MAGIC,
    is_multiboot,
    load_multiboot,
    memory_map,
)
from kvmpy.loaders.pvh import is_pvh, load_pvh

FORMATS = ("bzimage", "multiboot", "pvh", "elf", "flat")
FLAT_SUFFIX = ".bin"
# The multiboot header must lie in the first 8 KiB; "HdrS" and the ELF magic are earlier.
_DETECT_BYTES = HEADER_SEARCH_SIZE


def bad_multiboot_magic(head: bytes) -> int | None:
    """The offset of a multiboot magic whose checksum does not add up, if there is one."""
    window = head[:HEADER_SEARCH_SIZE]
    magic = MULTIBOOT_MAGIC.to_bytes(4, "little")
    at = window.find(magic)
    while at >= 0:
        if at % HEADER_ALIGN == 0 and at + 12 <= len(window):
            flags, checksum = struct.unpack_from("<II", window, at + 4)
            if (MULTIBOOT_MAGIC + flags + checksum) & 0xFFFFFFFF:
                return at
        at = window.find(magic, at + 1)
    return None


def initrd_modules(text: str) -> list[tuple[str, str]]:
    """QEMU's -initrd for a multiboot kernel: "file1 args,file2" -> (path, args) modules."""
    modules = []
    for item in text.split(","):
        path, _, args = item.strip().partition(" ")
        modules.append((path, args.strip()))
    return modules


def detect_format(path: str | Path, data: bytes | None = None) -> str:
    """The format of the image at ``path`` (``data``: its bytes, if already read).

    LoaderError when no header matches and the name does not say flat (see above).
    """
    if data is None:
        data = read_image(path, MAX_IMAGE_SIZE, "image")
    head = data[:_DETECT_BYTES]
    if is_bzimage(head):
        return "bzimage"
    if is_multiboot(head):
        return "multiboot"
    if is_elf(data):
        return "pvh" if is_pvh(data, str(path)) else "elf"
    if Path(path).name.lower().endswith(FLAT_SUFFIX):
        return "flat"
    message = f"{path}: no multiboot header, not ELF, no Linux boot header"
    bad = bad_multiboot_magic(head)
    if bad is not None:
        message += f" (a multiboot magic at offset {bad:#x} has a bad checksum)"
    raise LoaderError(f"{message}: pass --format flat to run it as raw code")


def load_image(
    path: str | Path,
    *,
    ram: list[tuple[int, int]],
    image_format: str | None = None,
    load_addr: int,
    entry: int | None = None,
    cmdline: str = "",
    modules: list[tuple[str, str]] | None = None,
    initrd: str | Path | None = None,
    rsdp: int = 0,
    e820: Sequence[tuple[int, int, int]] | None = None,
    data: bytes | None = None,
    host_decompress: bool = True,
) -> LoadPlan:
    """Load ``path`` with the loader for ``image_format`` (detected when None).

    ``data`` is the image's bytes when the caller has them already; otherwise
    ``path`` is read, once.  ``load_addr`` and ``entry`` apply to flat images;
    ``cmdline`` to bzImage, multiboot and PVH kernels, ``modules`` to
    multiboot ones (other formats get the command line through fw_cfg only),
    ``initrd`` to bzImage and PVH kernels (for a multiboot kernel it is
    QEMU's -initrd list of modules, "file1 args,file2", before ``modules``);
    ``rsdp``, the ACPI tables' address, to PVH and bzImage kernels.  ``e820``
    is the board's memory map as (start, size, type) entries; by default,
    ``ram`` with the firmware areas reserved.  ``host_decompress``: a 64-bit
    bzImage's kernel is decompressed here rather than by its own code
    (``kvmpy.loaders.bzimage.host_decompressed_kernel``).
    """
    if image_format is not None and image_format not in FORMATS:
        raise LoaderError(
            f"{path}: unknown image format {image_format!r} (choose from {', '.join(FORMATS)})"
        )
    if data is None:
        data = read_image(path, MAX_IMAGE_SIZE, "image")
    image_format = image_format or detect_format(path, data)
    if modules and image_format != "multiboot":
        raise LoaderError(
            f"{path}: boot modules need a multiboot kernel, not a {image_format} image"
        )
    if initrd is not None and image_format not in ("bzimage", "pvh", "multiboot"):
        raise LoaderError(
            f"{path}: an initrd needs a bzImage, PVH or multiboot kernel, not a "
            f"{image_format} image"
        )
    memory = list(e820) if e820 is not None else memory_map(ram)
    if image_format == "bzimage":
        return load_bzimage(
            path,
            e820=memory,
            cmdline=cmdline,
            initrd=initrd,
            rsdp=rsdp,
            data=data,
            host_decompress=host_decompress,
        )
    if image_format == "multiboot":
        mods = initrd_modules(str(initrd)) if initrd is not None else []
        return load_multiboot(
            path, ram=ram, cmdline=cmdline, modules=mods + list(modules or []), data=data
        )
    if image_format == "pvh":
        return load_pvh(
            path, ram=ram, cmdline=cmdline, rsdp=rsdp, initrd=initrd, e820=memory, data=data
        )
    if image_format == "elf":
        return load_elf(path, data)
    return load_flat(path, load_addr, entry, data)
