"""Flat binaries: the file's bytes at one address, entered at that address."""

from __future__ import annotations

from pathlib import Path

from kvmpy.loaders import LoaderError, LoadPlan, LoadSegment
from kvmpy.loaders.elf import read_image

# No flat image this big makes sense; reading it would only waste host memory.
MAX_FLAT_SIZE = 1 << 30


def load_flat(
    path: str | Path, load_addr: int, entry: int | None = None, data: bytes | None = None
) -> LoadPlan:
    """Plan to load the flat binary at ``path`` (or ``data``, already read from it)."""
    if data is None:
        data = read_image(path, MAX_FLAT_SIZE, "image")
    elif len(data) > MAX_FLAT_SIZE:
        raise LoaderError(
            f"{path}: image is {len(data)} bytes, more than the {MAX_FLAT_SIZE} allowed"
        )
    if not data:
        raise LoaderError(f"{path}: image is empty")
    if load_addr < 0:
        raise LoaderError(f"{path}: load address {load_addr:#x} is negative")
    return LoadPlan(
        source=str(path),
        entry=load_addr if entry is None else entry,
        segments=[LoadSegment(load_addr, data, len(data))],
    )
