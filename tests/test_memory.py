"""Unit tests for guest RAM (kvmpy.memory): no /dev/kvm needed."""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmpy.backends.kvm._kvm import lib
from kvmpy.memory import (
    HIGH_RAM_START,
    LOW_RAM_END,
    PAGE_SIZE,
    GuestMemory,
    GuestMemoryError,
    MemoryRegion,
    parse_size,
)

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    """64 KiB of RAM at 0."""
    with GuestMemory.with_ram(0x10000) as memory:
        yield memory


@pytest.fixture
def two_regions() -> Iterator[GuestMemory]:
    """Two adjacent one-page regions (0x0-0xfff, 0x1000-0x1fff) and one at 0x10000."""
    memory = GuestMemory()
    memory.add_region(0x1000, PAGE_SIZE)
    memory.add_region(0, PAGE_SIZE)
    memory.add_region(0x10000, PAGE_SIZE)
    yield memory
    memory.close()


# -- parse_size ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("128M", 128 * MiB),
        ("1G", GiB),
        ("64K", 64 * KiB),
        # A bare number is MiB, as QEMU's -m; bytes need "B".
        ("4096", 4096 * MiB),
        ("0x10", 16 * MiB),
        ("4096B", 4096),
        ("512b", 512),
        ("16m", 16 * MiB),
        ("  2g\n", 2 * GiB),
        ("128MB", 128 * MiB),
        ("128MiB", 128 * MiB),
        ("2GiB", 2 * GiB),
        ("64kb", 64 * KiB),
        ("100B", 100),
        ("0x10M", 16 * MiB),
        ("0x10MiB", 16 * MiB),
        # Hex digits that look like a "B" (bytes) suffix are digits, not a suffix.
        ("0xB", 0xB * MiB),
        ("0x1b", 0x1B * MiB),
        ("0x7B00", 0x7B00 * MiB),
        ("0x1BM", 0x1B * MiB),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "   ", "M", "B", "MiB", "abc", "1.5G", "1T", "12Q", "1iB", "1i", "G1", "0x"],
)
def test_parse_size_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError, match="not a size") as info:
        parse_size(text)
    assert repr(text) in str(info.value)


@pytest.mark.parametrize("text", ["0", "0M", "0x0", "-1", "-1M", "-0x1000"])
def test_parse_size_rejects_non_positive(text: str) -> None:
    with pytest.raises(ValueError, match="size must be positive"):
        parse_size(text)


# -- layout ----------------------------------------------------------------------------


def test_with_ram_small_is_one_region_at_zero() -> None:
    with GuestMemory.with_ram(16 * MiB) as memory:
        assert [(r.gpa, r.size, r.end) for r in memory] == [(0, 16 * MiB, 16 * MiB)]
        assert memory.size == 16 * MiB
        assert len(memory.regions[0].mapping) == 16 * MiB
        assert len(memory.regions[0].view) == 16 * MiB


def test_with_ram_exactly_low_ram_end_is_one_region() -> None:
    with GuestMemory.with_ram(LOW_RAM_END) as memory:
        assert [(r.gpa, r.size) for r in memory] == [(0, LOW_RAM_END)]
        assert memory.contains(LOW_RAM_END - 1)
        assert not memory.contains(LOW_RAM_END)
        assert not memory.contains(HIGH_RAM_START)


def test_with_ram_above_low_ram_end_splits_around_the_hole() -> None:
    size = LOW_RAM_END + 2 * PAGE_SIZE
    with GuestMemory.with_ram(size) as memory:
        assert [(r.gpa, r.size) for r in memory] == [
            (0, LOW_RAM_END),
            (HIGH_RAM_START, 2 * PAGE_SIZE),
        ]
        assert memory.size == size
        # The hole between 3 GiB and 4 GiB is not RAM.
        assert memory.contains(LOW_RAM_END - 1)
        assert not memory.contains(LOW_RAM_END)
        assert not memory.contains(0xFEE0_0000)
        assert not memory.contains(HIGH_RAM_START - 1)
        assert memory.contains(HIGH_RAM_START)
        assert memory.contains(HIGH_RAM_START + 2 * PAGE_SIZE - 1)
        assert not memory.contains(HIGH_RAM_START + 2 * PAGE_SIZE)
        # Both sides are usable and distinct.
        memory.write_u32(LOW_RAM_END - 4, 0x11223344)
        memory.write_u32(HIGH_RAM_START, 0x55667788)
        assert memory.read_u32(LOW_RAM_END - 4) == 0x11223344
        assert memory.read_u32(HIGH_RAM_START) == 0x55667788
        assert memory.regions[1].mapping[0:4] == bytes.fromhex("88776655")
        with pytest.raises(GuestMemoryError, match="not in RAM"):
            memory.read(LOW_RAM_END - 2, 4)
        with pytest.raises(GuestMemoryError, match="not in RAM"):
            memory.read(LOW_RAM_END, 1)
        with pytest.raises(GuestMemoryError, match="not in RAM"):
            memory.write(HIGH_RAM_START - 1, b"xy")


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of the host mapping that starts at ``address`` (from /proc/self/smaps)."""
    in_mapping = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(" ", 1)[0]
        if "-" in head and ":" not in head:
            in_mapping = int(head.split("-")[0], 16) == address
        elif in_mapping and line.startswith("VmFlags:"):
            return line.split()[1:]
    raise AssertionError(f"no mapping at {address:#x}")


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc")
def test_ram_is_mapped_noreserve_and_private() -> None:
    """RAM must not reserve swap, so a big guest costs only the pages it touches.

    The flag is a host fact the backend hands over, as Machine does.
    """
    with GuestMemory.with_ram(4 * MiB, map_flags=lib.MAP_NORESERVE) as memory:
        pointer = ctypes.c_char.from_buffer(memory.regions[0].mapping)
        try:
            flags = _vm_flags(ctypes.addressof(pointer))
        finally:
            del pointer
        assert "nr" in flags  # MAP_NORESERVE
        assert "sh" not in flags  # MAP_PRIVATE
        assert {"rd", "wr"} <= set(flags)


@pytest.mark.parametrize("size", [0, -PAGE_SIZE, 1, PAGE_SIZE + 1, 0x1800])
def test_with_ram_rejects_bad_sizes(size: int) -> None:
    with pytest.raises(GuestMemoryError, match="positive multiple of 4 KiB"):
        GuestMemory.with_ram(size)


def test_guest_memory_error_is_a_value_error() -> None:
    assert issubclass(GuestMemoryError, ValueError)


# -- add_region ------------------------------------------------------------------------


def test_add_region_returns_region_and_keeps_regions_sorted() -> None:
    with GuestMemory() as memory:
        high = memory.add_region(0x20000, 0x2000)
        low = memory.add_region(0, 0x1000)
        middle = memory.add_region(0x1000, 0x1000)  # adjacent on both sides is fine
        assert isinstance(high, MemoryRegion)
        assert memory.regions == [low, middle, high]
        assert [(r.gpa, r.end) for r in memory] == [
            (0, 0x1000),
            (0x1000, 0x2000),
            (0x20000, 0x22000),
        ]
        assert memory.size == 0x4000
        assert high.end == 0x22000


@pytest.mark.parametrize(
    ("gpa", "size"),
    [(0x800, 0x1000), (0x1000, 0x800), (0x1000, 0), (0x1000, -0x1000), (1, 1), (0, 0x1001)],
)
def test_add_region_rejects_misaligned_or_empty(gpa: int, size: int) -> None:
    with GuestMemory() as memory:
        with pytest.raises(GuestMemoryError, match="not page-aligned"):
            memory.add_region(gpa, size)
        assert memory.regions == []


@pytest.mark.parametrize("gpa", [-PAGE_SIZE, -0x10_0000])
def test_add_region_rejects_negative_address(gpa: int) -> None:
    with GuestMemory() as memory:
        with pytest.raises(GuestMemoryError, match="negative"):
            memory.add_region(gpa, PAGE_SIZE)
        assert memory.regions == []


@pytest.mark.parametrize(
    ("gpa", "size"),
    [
        (0x10000, 0x4000),  # identical
        (0xF000, 0x2000),  # overlaps the start
        (0x13000, 0x2000),  # overlaps the end
        (0x11000, 0x1000),  # inside
        (0x0, 0x20000),  # contains it
        (0x13000, 0x1000),  # last page only
    ],
)
def test_add_region_rejects_overlap(gpa: int, size: int) -> None:
    with GuestMemory() as memory:
        memory.add_region(0x10000, 0x4000)
        with pytest.raises(GuestMemoryError) as info:
            memory.add_region(gpa, size)
        assert str(info.value) == f"region {gpa:#x}+{size:#x} overlaps 0x10000"
        assert [(r.gpa, r.size) for r in memory] == [(0x10000, 0x4000)]


def test_add_region_adjacent_is_not_overlap() -> None:
    with GuestMemory() as memory:
        memory.add_region(0x10000, 0x4000)
        memory.add_region(0xF000, 0x1000)
        memory.add_region(0x14000, 0x1000)
        assert [(r.gpa, r.end) for r in memory] == [
            (0xF000, 0x10000),
            (0x10000, 0x14000),
            (0x14000, 0x15000),
        ]


# -- reads and writes --------------------------------------------------------------------


def test_fresh_ram_reads_zero(mem: GuestMemory) -> None:
    assert mem.read(0, 16) == bytes(16)
    assert mem.read(0xFFF0, 16) == bytes(16)


def test_write_then_read_round_trip(mem: GuestMemory) -> None:
    mem.write(0x100, b"hello")
    mem.write(0x200, bytearray(b"ba"))
    mem.write(0x300, memoryview(b"mv"))
    assert mem.read(0x100, 5) == b"hello"
    assert mem.read(0xFF, 7) == b"\0hello\0"
    assert mem.read(0x200, 2) == b"ba"
    assert mem.read(0x300, 2) == b"mv"
    assert isinstance(mem.read(0x100, 5), bytes)


def test_last_byte_of_ram_is_accessible(mem: GuestMemory) -> None:
    mem.write(0xFFFF, b"\xaa")
    assert mem.read(0xFFFF, 1) == b"\xaa"
    mem.write(0xFFF8, b"12345678")
    assert mem.read(0xFFF8, 8) == b"12345678"
    assert mem.read_u64(0xFFF8) == int.from_bytes(b"12345678", "little")


def test_zero_length_access_at_end_of_ram_is_allowed(mem: GuestMemory) -> None:
    assert mem.read(0x10000, 0) == b""
    mem.write(0x10000, b"")  # a no-op, as the loader's zero-fill can be
    assert mem.read(0, 0) == b""


@pytest.mark.parametrize(
    ("gpa", "length"),
    [(0x10000, 1), (0xFFFF, 2), (0xFFF0, 0x20), (0, 0x10001), (0x20000, 4), (1 << 40, 1)],
)
def test_read_outside_ram_raises(mem: GuestMemory, gpa: int, length: int) -> None:
    with pytest.raises(GuestMemoryError) as info:
        mem.read(gpa, length)
    assert str(info.value) == f"guest physical range {gpa:#x}+{length:#x} is not in RAM"


def test_write_straddling_end_raises_and_writes_nothing(mem: GuestMemory) -> None:
    with pytest.raises(GuestMemoryError, match=r"0xfffe\+0x4 is not in RAM"):
        mem.write(0xFFFE, b"abcd")
    assert mem.read(0xFFFC, 4) == bytes(4)
    with pytest.raises(GuestMemoryError):
        mem.write(0x10000, b"x")


@pytest.mark.parametrize(("gpa", "length"), [(-1, 1), (-0x1000, 0x2000), (0, -1), (0x10, -0x10)])
def test_negative_address_or_length_raises(mem: GuestMemory, gpa: int, length: int) -> None:
    with pytest.raises(GuestMemoryError, match="bad guest access"):
        mem.read(gpa, length)
    with pytest.raises(GuestMemoryError, match="bad guest access"):
        mem.view(gpa, length)


def test_negative_address_write_raises(mem: GuestMemory) -> None:
    with pytest.raises(GuestMemoryError, match="bad guest access"):
        mem.write(-4, b"abcd")
    with pytest.raises(GuestMemoryError, match="bad guest access"):
        mem.write_u32(-4, 1)
    with pytest.raises(GuestMemoryError, match="bad guest access"):
        mem.read_u8(-1)
    assert mem.read(0, 4) == bytes(4)


def test_access_straddling_two_adjacent_regions_raises(two_regions: GuestMemory) -> None:
    """Each access must lie inside one region, even when the neighbour is RAM too."""
    two_regions.write(0xFFC, b"abcd")
    two_regions.write(0x1000, b"efgh")
    assert two_regions.read(0xFFC, 4) == b"abcd"
    assert two_regions.read(0x1000, 4) == b"efgh"
    with pytest.raises(GuestMemoryError, match=r"0xffe\+0x4 is not in RAM"):
        two_regions.read(0xFFE, 4)
    with pytest.raises(GuestMemoryError):
        two_regions.write(0xFFF, b"zz")
    with pytest.raises(GuestMemoryError):
        two_regions.read_u64(0xFFC)
    assert two_regions.read(0xFFC, 4) == b"abcd"
    assert two_regions.read(0x1000, 4) == b"efgh"


def test_gap_between_regions_is_not_ram(two_regions: GuestMemory) -> None:
    for gpa in (0x2000, 0x8000, 0xFFFF, 0x11000):
        with pytest.raises(GuestMemoryError, match="not in RAM"):
            two_regions.read(gpa, 1)
    two_regions.write(0x10FFF, b"\x01")
    assert two_regions.read_u8(0x10FFF) == 1
    assert two_regions.regions[2].mapping[0xFFF] == 1
    with pytest.raises(GuestMemoryError):
        two_regions.read(0x10FFF, 2)


def test_region_offset_translation(two_regions: GuestMemory) -> None:
    two_regions.write(0x10010, b"xyz")
    assert two_regions.regions[2].gpa == 0x10000
    assert two_regions.regions[2].mapping[0x10:0x13] == b"xyz"
    assert two_regions.regions[0].mapping[0x10:0x13] == bytes(3)
    assert two_regions.regions[1].mapping[0x10:0x13] == bytes(3)


# -- integer helpers ---------------------------------------------------------------------


def test_int_writes_are_little_endian(mem: GuestMemory) -> None:
    mem.write_u8(0x10, 0xAB)
    mem.write_u16(0x20, 0xBEEF)
    mem.write_u32(0x30, 0xDEADBEEF)
    mem.write_u64(0x40, 0x0123456789ABCDEF)
    mem.write_int(0x50, 3, 0x112233)
    assert mem.read(0x10, 2) == b"\xab\x00"
    assert mem.read(0x20, 3) == b"\xef\xbe\x00"
    assert mem.read(0x30, 5) == b"\xef\xbe\xad\xde\x00"
    assert mem.read(0x40, 9) == bytes.fromhex("efcdab8967452301") + b"\0"
    assert mem.read(0x50, 4) == b"\x33\x22\x11\x00"


def test_int_reads_are_little_endian(mem: GuestMemory) -> None:
    mem.write(0x100, bytes(range(1, 9)))
    assert mem.read_u8(0x100) == 0x01
    assert mem.read_u16(0x100) == 0x0201
    assert mem.read_u32(0x100) == 0x04030201
    assert mem.read_u64(0x100) == 0x0807060504030201
    assert mem.read_int(0x101, 3) == 0x040302
    assert mem.read_int(0x100, 0) == 0


def test_int_writes_truncate_to_the_width(mem: GuestMemory) -> None:
    mem.write(0x200, b"\x77" * 16)
    mem.write_u8(0x200, 0x1FF)
    mem.write_u16(0x202, 0x12345)
    mem.write_u32(0x204, -1)
    mem.write_u64(0x208, (1 << 64) + 5)
    assert mem.read_u8(0x200) == 0xFF
    assert mem.read_u8(0x201) == 0x77
    assert mem.read_u16(0x202) == 0x2345
    assert mem.read_u32(0x204) == 0xFFFF_FFFF
    assert mem.read_u64(0x208) == 5


@pytest.mark.parametrize(
    ("gpa", "size"), [(0xFFFF, 2), (0xFFFE, 4), (0xFFFC, 8), (0x10000, 1), (0xFFF9, 8)]
)
def test_int_helpers_bounds_checked_at_end(mem: GuestMemory, gpa: int, size: int) -> None:
    with pytest.raises(GuestMemoryError):
        mem.read_int(gpa, size)
    with pytest.raises(GuestMemoryError):
        mem.write_int(gpa, size, 0)


def test_sized_helpers_bounds_checked(mem: GuestMemory) -> None:
    with pytest.raises(GuestMemoryError):
        mem.read_u16(0xFFFF)
    with pytest.raises(GuestMemoryError):
        mem.read_u32(0xFFFD)
    with pytest.raises(GuestMemoryError):
        mem.read_u64(0xFFF9)
    with pytest.raises(GuestMemoryError):
        mem.write_u8(0x10000, 0)
    with pytest.raises(GuestMemoryError):
        mem.write_u16(0xFFFF, 0)
    with pytest.raises(GuestMemoryError):
        mem.write_u32(0xFFFD, 0)
    with pytest.raises(GuestMemoryError):
        mem.write_u64(0xFFF9, 0)
    assert mem.read_u64(0xFFF8) == 0


# -- view and contains --------------------------------------------------------------------


def test_view_is_a_writable_window_onto_ram(mem: GuestMemory) -> None:
    view = mem.view(0x400, 8)
    assert len(view) == 8
    assert not view.readonly
    view[0:3] = b"abc"
    assert mem.read(0x400, 4) == b"abc\0"
    mem.write(0x407, b"z")
    assert view[7] == ord("z")
    view.release()


def test_view_in_second_region_uses_offset(two_regions: GuestMemory) -> None:
    view = two_regions.view(0x1FF0, 0x10)
    view[:] = bytes(range(0x10))
    assert two_regions.regions[1].mapping[0xFF0:0x1000] == bytes(range(0x10))
    assert two_regions.read(0x1FFF, 1) == b"\x0f"
    view.release()


def test_view_out_of_range_raises(mem: GuestMemory) -> None:
    with pytest.raises(GuestMemoryError, match="not in RAM"):
        mem.view(0xFFFF, 2)
    with pytest.raises(GuestMemoryError, match="not in RAM"):
        mem.view(0x10000, 1)


def test_contains(mem: GuestMemory) -> None:
    assert mem.contains(0)
    assert mem.contains(0xFFFF)
    assert not mem.contains(0x10000)
    assert mem.contains(0, 0x10000)
    assert not mem.contains(0, 0x10001)
    assert mem.contains(0xFFF0, 0x10)
    assert not mem.contains(0xFFF0, 0x11)
    assert not mem.contains(-1)
    assert not mem.contains(-1, 2)


def test_contains_rejects_negative_length(mem: GuestMemory) -> None:
    """contains() agrees with view(), which rejects a negative length."""
    assert not mem.contains(0x100, -1)
    assert not mem.contains(0x10, -0x10)
    assert not mem.contains(0x20000, -0x10010)


def test_contains_needs_one_region(two_regions: GuestMemory) -> None:
    assert two_regions.contains(0, 0x1000)
    assert two_regions.contains(0x1000, 0x1000)
    assert not two_regions.contains(0xFFF, 2)
    assert not two_regions.contains(0, 0x2000)
    assert not two_regions.contains(0x2000)
    assert two_regions.contains(0x10000, 0x1000)


# -- close -------------------------------------------------------------------------------


def test_close_unmaps_everything() -> None:
    memory = GuestMemory.with_ram(0x4000)
    region = memory.regions[0]
    memory.write(0, b"data")
    memory.close()
    assert memory.regions == []
    assert memory.size == 0
    assert region.mapping.closed
    with pytest.raises(ValueError, match="released"):
        region.view[0]
    with pytest.raises(GuestMemoryError, match="not in RAM"):
        memory.read(0, 4)
    with pytest.raises(GuestMemoryError, match="not in RAM"):
        memory.write(0, b"x")
    assert not memory.contains(0)
    memory.close()  # idempotent
    assert memory.regions == []


def test_context_manager_closes() -> None:
    with GuestMemory.with_ram(0x2000) as memory:
        region = memory.regions[0]
        assert not region.mapping.closed
    assert region.mapping.closed
    assert memory.regions == []


def test_close_with_a_live_view_still_detaches_ram() -> None:
    """A view the caller still holds must not make close() fail halfway."""
    memory = GuestMemory.with_ram(0x2000)
    memory.write(0, b"live")
    view = memory.view(0, 4)
    memory.close()
    assert memory.regions == []
    assert memory.size == 0
    with pytest.raises(GuestMemoryError, match="not in RAM"):
        memory.read(0, 4)
    # The mapping stays valid for as long as the caller's view does.
    assert bytes(view) == b"live"
    view.release()
    memory.close()


def test_mapping_flags_are_private_anonymous() -> None:
    with GuestMemory.with_ram(PAGE_SIZE) as memory:
        mapping = memory.regions[0].mapping
        assert isinstance(mapping, mmap.mmap)
        assert len(mapping) == PAGE_SIZE


def test_sizes_in_guests_toml_and_the_fixture_are_mib_without_a_unit(tmp_path: Path) -> None:
    from kvmpy.pytest_plugin import parse_guest

    spec = parse_guest({"name": "g", "image": "g.bin", "mem": 32}, tmp_path, "guests.toml")
    assert parse_size(spec.mem) == 32 * MiB
    assert parse_size(64) == 64 * MiB
    with pytest.raises(ValueError, match="not a size"):
        parse_size(True)


# -- zero: clearing ranges without committing host RAM ----------------------------------


def vm_rss() -> int:
    """This process's resident set size, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * KiB
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.parametrize(
    ("gpa", "length"),
    [(0x123, 0x5000), (0x1000, 0x3000), (0x10, 0x20), (0x0, 0x10000), (0xFFF, 2), (0x5000, 0)],
)
def test_zero_clears_exactly_the_range(mem: GuestMemory, gpa: int, length: int) -> None:
    """RAM is not assumed fresh: old bytes go, and the bytes around the range stay."""
    mem.write(0, b"\xaa" * 0x10000)
    mem.zero(gpa, length)
    expected = bytearray(b"\xaa" * 0x10000)
    expected[gpa : gpa + length] = bytes(length)
    assert mem.read(0, 0x10000) == expected


def test_zero_outside_ram_raises(mem: GuestMemory) -> None:
    mem.write(0xF000, b"\xaa" * 0x1000)
    with pytest.raises(GuestMemoryError):
        mem.zero(0xF000, 0x1001)
    assert mem.read(0xF000, 0x1000) == b"\xaa" * 0x1000  # nothing cleared
    with pytest.raises(GuestMemoryError):
        mem.zero(-0x1000, 0x2000)


def test_zero_of_a_large_range_discards_pages() -> None:
    """Zeroing 1 GiB neither writes it (committing 1 GiB) nor keeps what was there."""
    with GuestMemory.with_ram(GiB + 2 * PAGE_SIZE) as memory:
        for gpa in range(0, 64 * MiB, PAGE_SIZE):  # commit 64 MiB
            memory.write_u8(gpa + 7, 0x5A)
        before = vm_rss()
        memory.zero(5, GiB)
        after = vm_rss()
        assert after < before + 32 * MiB, (before, after)
        assert after < before - 32 * MiB, "the committed pages were not given back"
        assert memory.read(0, 8) == bytes(8)
        assert memory.read(63 * MiB, 8) == bytes(8)
        assert memory.read_u8(GiB + 5) == 0


def test_zero_in_copy_on_write_file_ram_clears_without_touching_the_file(
    tmp_path: Path,
) -> None:
    """In a snapshot's file-backed RAM, discarding would bring back the file's bytes."""
    backing = tmp_path / "memory.bin"
    content = bytes(range(256)) * (0x40000 // 256)
    content = content[:0x10000] + bytes(0x20000) + content[0x30000:]  # a zero run in the middle
    backing.write_bytes(content)
    with backing.open("rb") as f, GuestMemory.with_ram(0x40000, f.fileno()) as memory:
        assert memory.regions[0].file_backed
        memory.zero(0x800, 0x3F000)
        assert memory.read(0, 0x40000) == content[:0x800] + bytes(0x3F000) + content[0x3F800:]
    assert backing.read_bytes() == content
