"""Pick the loader for an image, in QEMU's -kernel order: multiboot, then an ELF
with a PVH entry note, then (beyond QEMU) any ELF, then a flat binary.

The image is read once, with a size cap, and the same bytes go to detection
and to the loader: a pipe (``kvmpy run <(cat kernel)``) or a FIFO can only be
read once, and a file that changes between two reads would be checked in one
state and loaded in another.
"""

from __future__ import annotations

from pathlib import Path

from kvmpy.loaders import LoaderError, LoadPlan
from kvmpy.loaders.elf import MAX_IMAGE_SIZE, is_elf, load_elf, read_image
from kvmpy.loaders.flat import load_flat
from kvmpy.loaders.multiboot import is_multiboot, load_multiboot
from kvmpy.loaders.pvh import is_pvh, load_pvh

FORMATS = ("multiboot", "pvh", "elf", "flat")
# The multiboot header must lie in the first 8 KiB; the ELF magic in the first 4 bytes.
_DETECT_BYTES = 8192


def detect_format(path: str | Path, data: bytes | None = None) -> str:
    """The format of the image at ``path`` (``data``: its bytes, if already read)."""
    if data is None:
        data = read_image(path, MAX_IMAGE_SIZE, "image")
    if is_multiboot(data[:_DETECT_BYTES]):
        return "multiboot"
    if is_elf(data):
        return "pvh" if is_pvh(data, str(path)) else "elf"
    return "flat"


def load_image(
    path: str | Path,
    *,
    ram: list[tuple[int, int]],
    image_format: str | None = None,
    load_addr: int,
    entry: int | None = None,
    cmdline: str = "",
    modules: list[tuple[str, str]] | None = None,
    rsdp: int = 0,
    data: bytes | None = None,
) -> LoadPlan:
    """Load ``path`` with the loader for ``image_format`` (detected when None).

    ``data`` is the image's bytes when the caller has them already; otherwise
    ``path`` is read, once.  ``load_addr`` and ``entry`` apply to flat images;
    ``cmdline`` to multiboot and PVH kernels, ``modules`` to multiboot ones
    (other formats get the command line through fw_cfg only); ``rsdp``, the
    ACPI tables' address, to PVH kernels.
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
    if image_format == "multiboot":
        return load_multiboot(path, ram=ram, cmdline=cmdline, modules=modules or [], data=data)
    if image_format == "pvh":
        return load_pvh(path, ram=ram, cmdline=cmdline, rsdp=rsdp, data=data)
    if image_format == "elf":
        return load_elf(path, data)
    return load_flat(path, load_addr, entry, data)
