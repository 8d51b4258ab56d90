"""A PNG encoder for 8-bit RGB images, with the standard library only.

One IHDR chunk (colour type 2, bit depth 8, no interlace), one IDAT chunk
holding the zlib stream of every scan line prefixed by filter type 0 (none),
and IEND.  Each chunk is its length, type, data and a CRC-32 of type and data.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
COLOR_TYPE_RGB = 2
BIT_DEPTH = 8


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def encode_png(width: int, height: int, rgb: bytes | bytearray | memoryview) -> bytes:
    """A PNG file of ``width`` x ``height`` pixels, ``rgb`` holding 3 bytes a pixel, row by row."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, not {width}x{height}")
    stride = width * 3
    if len(rgb) != stride * height:
        raise ValueError(f"{width}x{height} RGB needs {stride * height} bytes, not {len(rgb)}")
    data = memoryview(rgb).cast("B")
    raw = b"".join(b"\x00" + data[y * stride : (y + 1) * stride] for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, BIT_DEPTH, COLOR_TYPE_RGB, 0, 0, 0)
    return (
        PNG_SIGNATURE
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(raw, 6))
        + _chunk(b"IEND", b"")
    )


def write_png(path: str | Path, width: int, height: int, rgb: bytes | bytearray) -> None:
    """Write ``encode_png(width, height, rgb)`` to ``path``."""
    Path(path).write_bytes(encode_png(width, height, rgb))
