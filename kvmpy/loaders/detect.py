"""Pick the loader for an image, in QEMU's -kernel order: multiboot, then an ELF
with a PVH entry note, then (beyond QEMU) any ELF, then a flat binary."""

from __future__ import annotations

from pathlib import Path

from kvmpy.loaders import LoaderError, LoadPlan
from kvmpy.loaders.elf import is_elf, load_elf, read_image
from kvmpy.loaders.flat import load_flat
from kvmpy.loaders.multiboot import is_multiboot, load_multiboot
from kvmpy.loaders.pvh import is_pvh, load_pvh

FORMATS = ("multiboot", "pvh", "elf", "flat")
# The multiboot header must lie in the first 8 KiB; the ELF magic in the first 4 bytes.
_DETECT_BYTES = 8192


def detect_format(path: str | Path) -> str:
    try:
        with open(path, "rb") as image:
            head = image.read(_DETECT_BYTES)
    except OSError as exc:
        raise LoaderError(f"{path}: cannot read image: {exc.strerror}") from None
    if is_multiboot(head):
        return "multiboot"
    if is_elf(head):
        return "pvh" if is_pvh(read_image(path, what="ELF image"), str(path)) else "elf"
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
) -> LoadPlan:
    """Load ``path`` with the loader for ``image_format`` (detected when None).

    ``load_addr`` and ``entry`` apply to flat images; ``cmdline`` to
    multiboot and PVH kernels, ``modules`` to multiboot ones (other formats
    get the command line through fw_cfg only); ``rsdp``, the ACPI tables'
    address, to PVH kernels.
    """
    image_format = image_format or detect_format(path)
    if modules and image_format != "multiboot":
        raise LoaderError(
            f"{path}: boot modules need a multiboot kernel, not a {image_format} image"
        )
    if image_format == "multiboot":
        return load_multiboot(path, ram=ram, cmdline=cmdline, modules=modules or [])
    if image_format == "pvh":
        return load_pvh(path, ram=ram, cmdline=cmdline, rsdp=rsdp)
    if image_format == "elf":
        return load_elf(path)
    if image_format == "flat":
        return load_flat(path, load_addr, entry)
    raise LoaderError(
        f"{path}: unknown image format {image_format!r} (choose from {', '.join(FORMATS)})"
    )
