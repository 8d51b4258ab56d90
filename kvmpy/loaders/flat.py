"""Flat binaries: the file's bytes at one address, entered at that address."""

from __future__ import annotations

from pathlib import Path

from kvmpy.loaders import LoaderError, LoadPlan, LoadSegment

# No flat image this big makes sense; reading it would only waste host memory.
MAX_FLAT_SIZE = 1 << 30


def load_flat(path: str | Path, load_addr: int, entry: int | None = None) -> LoadPlan:
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_FLAT_SIZE:
            raise LoaderError(f"{path}: {size} bytes is too large for a flat image")
        data = path.read_bytes()
    except OSError as exc:
        raise LoaderError(f"{path}: cannot read image: {exc.strerror}") from None
    if not data:
        raise LoaderError(f"{path}: image is empty")
    if load_addr < 0:
        raise LoaderError(f"{path}: load address {load_addr:#x} is negative")
    return LoadPlan(
        source=str(path),
        entry=load_addr if entry is None else entry,
        segments=[LoadSegment(load_addr, data, len(data))],
    )
