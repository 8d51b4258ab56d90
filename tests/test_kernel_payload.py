"""Host-side decompression of a bzImage's kernel payload (kvmpy.loaders.kernel_payload)."""

from __future__ import annotations

import bz2
import gzip
import lzma
import random
import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmpy.loaders.kernel_payload import (
    LZ4_LEGACY_MAGIC,
    PayloadError,
    codec_name,
    decompress_payload,
)
from tests.fuzzing import budget

LIMIT = 1 << 24


def footer(data: bytes) -> bytes:
    """The uncompressed size Linux's build appends to a compressed kernel."""
    return struct.pack("<I", len(data))


def lz4_length(value: int) -> bytes:
    """The extra length bytes of an LZ4 token nibble that is 15."""
    out = bytearray()
    while value >= 255:
        out.append(255)
        value -= 255
    out.append(value)
    return bytes(out)


def lz4_sequence(literals: bytes, offset: int = 0, match: int = 0) -> bytes:
    """One LZ4 sequence; ``match`` 0 ends the block (literals only)."""
    lit_nibble = min(len(literals), 15)
    match_nibble = min(match - 4, 15) if match else 0
    out = bytearray([lit_nibble << 4 | match_nibble])
    if lit_nibble == 15:
        out += lz4_length(len(literals) - 15)
    out += literals
    if match:
        out += struct.pack("<H", offset)
        if match_nibble == 15:
            out += lz4_length(match - 4 - 15)
    return bytes(out)


def lz4_frame(*blocks: bytes) -> bytes:
    return LZ4_LEGACY_MAGIC + b"".join(struct.pack("<I", len(b)) + b for b in blocks)


def sample(size: int = 200_000) -> bytes:
    """Compressible bytes with runs, repeats and noise, like a kernel image."""
    rng = random.Random(1)
    out = bytearray()
    while len(out) < size:
        out += rng.choice([b"\0" * rng.randrange(1, 3000), rng.randbytes(rng.randrange(1, 64))])
        if len(out) > 100:
            start = rng.randrange(len(out) - 50)
            out += out[start : start + rng.randrange(4, 50)]
    return bytes(out[:size])


def test_lz4_literals_matches_and_overlapping_runs() -> None:
    block = (
        lz4_sequence(b"abcdef", offset=3, match=10)  # "def" repeated: the match overlaps
        + lz4_sequence(b"x" * 20, offset=26, match=300)  # long lengths on both sides
        + lz4_sequence(b"end")
    )
    expected = b"abcdef" + b"defdefdefd" + b"x" * 20
    expected += (expected[-26:] * 12)[:300] + b"end"
    payload = lz4_frame(block) + footer(expected)
    assert codec_name(payload) == "lz4"
    assert decompress_payload(payload, LIMIT) == expected


def test_lz4_blocks_are_independent_and_frames_may_repeat() -> None:
    first, second = lz4_sequence(b"first"), lz4_sequence(b"second")
    payload = lz4_frame(first, second) + lz4_frame(first) + footer(b"firstsecondfirst")
    assert decompress_payload(payload, LIMIT) == b"firstsecondfirst"
    reaching_back = lz4_sequence(b"abcd", offset=9, match=4) + lz4_sequence(b"!")
    with pytest.raises(PayloadError, match="before the block"):
        decompress_payload(lz4_frame(first, reaching_back) + footer(b"x" * 14), LIMIT)


@pytest.mark.skipif(shutil.which("lz4") is None, reason="no lz4 tool (Debian: lz4)")
def test_lz4_as_the_kernel_build_writes_it(tmp_path: Path) -> None:
    data = sample()
    source = tmp_path / "vmlinux.bin"
    source.write_bytes(data)
    # The kernel's build: lz4 -l (legacy frame), then the size appended.
    compressed = subprocess.run(
        ["lz4", "-l", "-9", "-c", str(source)], check=True, capture_output=True
    ).stdout
    assert decompress_payload(compressed + footer(data), LIMIT) == data


@pytest.mark.parametrize(
    ("codec", "compress"),
    [
        ("gzip", lambda data: gzip.compress(data, mtime=0)),  # carries its own size
        ("xz", lambda data: lzma.compress(data, check=lzma.CHECK_CRC32) + footer(data)),
        ("lzma", lambda data: lzma.compress(data, format=lzma.FORMAT_ALONE) + footer(data)),
        ("bzip2", lambda data: bz2.compress(data) + footer(data)),
    ],
)
def test_standard_library_codecs(codec: str, compress: Callable[[bytes], bytes]) -> None:
    data = sample()
    payload = compress(data)
    assert codec_name(payload) == codec
    assert decompress_payload(payload, LIMIT) == data
    with pytest.raises(PayloadError, match=r"size footer|length check"):
        decompress_payload(payload[:-4] + struct.pack("<I", len(data) - 1), LIMIT)
    with pytest.raises(PayloadError):
        decompress_payload(payload[: len(payload) // 2] + payload[-4:], LIMIT)


def test_codecs_without_a_host_decompressor_are_refused() -> None:
    for magic, name in ((b"\x28\xb5\x2f\xfd", "zstd"), (b"\x89LZO", "lzo"), (b"????", "unknown")):
        with pytest.raises(PayloadError, match=f"no host decompressor for the {name} format"):
            decompress_payload(magic + bytes(16) + footer(b"x"), LIMIT)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\x02\x21", "too short"),
        (lz4_frame(lz4_sequence(b"abc")) + footer(b"x" * (LIMIT + 1)), "over"),
        (lz4_frame(lz4_sequence(b"abc")) + footer(b"abcd"), "size footer"),
        (lz4_frame(lz4_sequence(b"abc", offset=0, match=4) + b"!") + footer(b"x" * 7), "offset 0"),
        (lz4_frame(b"\xf0") + footer(b"x"), "runs past the block"),
        (LZ4_LEGACY_MAGIC + struct.pack("<I", 99) + b"\x10a" + footer(b"a"), "overruns"),
        (b"\x02\x21\x4c\x18"[:3] + b"\x00" * 8, "no host decompressor"),
    ],
)
def test_bad_lz4_payloads_are_refused(payload: bytes, message: str) -> None:
    with pytest.raises(PayloadError, match=message):
        decompress_payload(payload, LIMIT)


@budget()
@given(st.binary(max_size=300), st.integers(min_value=0, max_value=4096))
def test_arbitrary_lz4_bytes_decode_or_are_refused(body: bytes, size: int) -> None:
    payload = LZ4_LEGACY_MAGIC + body + struct.pack("<I", size)
    try:
        result = decompress_payload(payload, 4096)
    except PayloadError:
        return
    assert len(result) == size
