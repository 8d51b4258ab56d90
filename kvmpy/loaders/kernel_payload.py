"""Decompress a bzImage's kernel payload on the host.

A bzImage carries the kernel (an ELF ``vmlinux``, possibly followed by its
relocation table) compressed, at ``payload_offset``/``payload_length`` of the
setup header (protocol 2.08+).  Linux's build appends the uncompressed size as
four little-endian bytes.  Python's standard library covers gzip, xz, lzma
and bzip2; LZ4 (the "legacy" frame the kernel's build writes, and what
Debian's kernels use) is decoded here.  LZO and zstd are not: the caller
then lets the kernel decompress itself.

Every length and offset comes from an untrusted image: the output is capped
at the size the caller allows, and any inconsistency raises ``PayloadError``.
"""

from __future__ import annotations

import bz2
import lzma
import struct
import zlib
from typing import Protocol

GZIP_MAGIC = b"\x1f\x8b"
XZ_MAGIC = b"\xfd7zXZ\x00"
LZMA_MAGIC = b"\x5d\x00\x00"
BZIP2_MAGIC = b"BZh"
LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"
LZO_MAGIC = b"\x89LZO"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
SIZE_FOOTER = 4
# A legacy-frame LZ4 block decompresses to at most 8 MiB.
LZ4_LEGACY_BLOCK_MAX = 8 << 20
LZ4_MIN_MATCH = 4


class PayloadError(ValueError):
    """The payload cannot be decompressed here (unknown codec or bad data)."""


def codec_name(payload: bytes) -> str:
    """The compression format named by the payload's magic bytes."""
    for magic, name in (
        (GZIP_MAGIC, "gzip"),
        (XZ_MAGIC, "xz"),
        (LZMA_MAGIC, "lzma"),
        (BZIP2_MAGIC, "bzip2"),
        (LZ4_LEGACY_MAGIC, "lz4"),
        (LZO_MAGIC, "lzo"),
        (ZSTD_MAGIC, "zstd"),
    ):
        if payload.startswith(magic):
            return name
    return "unknown"


def decompress_payload(payload: bytes, limit: int) -> bytes:
    """The decompressed payload; at most ``limit`` bytes, or PayloadError."""
    if len(payload) <= SIZE_FOOTER:
        raise PayloadError(f"a {len(payload)}-byte payload is too short")
    expected = struct.unpack_from("<I", payload, len(payload) - SIZE_FOOTER)[0]
    if expected > limit:
        raise PayloadError(f"it says it decompresses to {expected:#x} bytes, over {limit:#x}")
    codec = codec_name(payload)
    if codec == "lz4":
        result = _lz4_legacy(payload[:-SIZE_FOOTER], expected)
    elif codec == "gzip":
        result = _stream(zlib.decompressobj(wbits=31), payload, expected, "gzip")
    elif codec in ("xz", "lzma"):
        format_ = lzma.FORMAT_XZ if codec == "xz" else lzma.FORMAT_ALONE
        result = _stream(lzma.LZMADecompressor(format=format_), payload, expected, codec)
    elif codec == "bzip2":
        result = _stream(bz2.BZ2Decompressor(), payload, expected, codec)
    else:
        raise PayloadError(f"no host decompressor for the {codec} format")
    if len(result) != expected:
        raise PayloadError(
            f"{codec} data decompressed to {len(result):#x} bytes, its size footer says "
            f"{expected:#x}"
        )
    return result


class _Decompressor(Protocol):
    """What zlib's, lzma's and bz2's incremental decompressors have in common."""

    @property
    def unused_data(self) -> bytes: ...

    @property
    def eof(self) -> bool: ...

    def decompress(self, data: bytes, max_length: int = ..., /) -> bytes: ...


def _stream(stream: _Decompressor, payload: bytes, expected: int, codec: str) -> bytes:
    """Run a standard-library decompressor over one stream, capped at ``expected`` bytes."""
    try:
        # One byte past the expected size is enough to tell "too long".
        result = stream.decompress(payload, expected + 1)
    except (zlib.error, lzma.LZMAError, OSError, EOFError, ValueError) as exc:
        raise PayloadError(f"bad {codec} data: {exc}") from None
    if not stream.eof:
        raise PayloadError(f"the {codec} stream is truncated or longer than its size footer")
    trailing = len(stream.unused_data)
    # gzip carries its size itself; the others leave the 4-byte footer unused.
    if trailing not in (0, SIZE_FOOTER):
        raise PayloadError(f"{trailing} bytes follow the {codec} stream")
    return result


def _lz4_legacy(data: bytes, expected: int) -> bytes:
    """Decode an LZ4 legacy frame: the magic, then (le32 size, block) pairs."""
    out = bytearray()
    pos = 0
    while pos < len(data):
        if data.startswith(LZ4_LEGACY_MAGIC, pos):  # a frame starts (or another one)
            pos += len(LZ4_LEGACY_MAGIC)
            continue
        if pos == 0:
            raise PayloadError("no LZ4 legacy magic")
        if pos + 4 > len(data):
            raise PayloadError(f"truncated LZ4 block size at {pos:#x}")
        size = struct.unpack_from("<I", data, pos)[0]
        pos += 4
        if size == 0 or pos + size > len(data):
            raise PayloadError(f"LZ4 block of {size:#x} bytes at {pos:#x} overruns the payload")
        _lz4_block(data, pos, pos + size, out, min(expected, len(out) + LZ4_LEGACY_BLOCK_MAX))
        pos += size
    return bytes(out)


def _lz4_block(data: bytes, pos: int, end: int, out: bytearray, limit: int) -> None:
    """Append the LZ4 block ``data[pos:end]`` to ``out``, which may not pass ``limit``."""
    block_start = len(out)
    while True:
        if pos >= end:
            raise PayloadError("LZ4 block ends inside a sequence")
        token = data[pos]
        pos += 1
        literals = token >> 4
        if literals == 15:
            while True:
                if pos >= end:
                    raise PayloadError("LZ4 literal length runs past the block")
                extra = data[pos]
                pos += 1
                literals += extra
                if extra != 255:
                    break
        if pos + literals > end or len(out) + literals > limit:
            raise PayloadError("LZ4 literals run past the block or the size limit")
        out += data[pos : pos + literals]
        pos += literals
        if pos == end:
            return  # the last sequence has literals only
        if pos + 2 > end:
            raise PayloadError("LZ4 match offset runs past the block")
        offset = data[pos] | data[pos + 1] << 8
        pos += 2
        length = token & 15
        if length == 15:
            while True:
                if pos >= end:
                    raise PayloadError("LZ4 match length runs past the block")
                extra = data[pos]
                pos += 1
                length += extra
                if extra != 255:
                    break
        length += LZ4_MIN_MATCH
        start = len(out) - offset
        if offset == 0 or start < block_start:
            raise PayloadError(f"LZ4 match offset {offset} reaches before the block")
        if len(out) + length > limit:
            raise PayloadError("LZ4 match runs past the size limit")
        if offset >= length:
            out += out[start : start + length]
        else:  # the match overlaps what it produces: a repeating pattern
            pattern = out[start:]
            out += (pattern * (length // offset + 1))[:length]
