"""Unit tests for the loader plan checks and the flat-binary loader."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmpy import records
from kvmpy.loaders import LoaderError, LoadPlan, LoadSegment, check_plan
from kvmpy.loaders import flat as flat_module
from kvmpy.loaders.flat import MAX_FLAT_SIZE, load_flat
from kvmpy.memory import HIGH_RAM_START, LOW_RAM_END, GuestMemory
from kvmpy.x86.modes import long_mode, protected_mode
from kvmpy.x86.registers import Sregs

RAM_SIZE = 2 << 20  # 2 MiB: 0x0-0x1fffff
# What long mode reserves: the GDT and the page tables.
RESERVED = [(0x500, 0x520), (0x1000, 0x7000)]


@pytest.fixture
def ram() -> Iterator[GuestMemory]:
    with GuestMemory.with_ram(RAM_SIZE) as memory:
        yield memory


def plan(*segments: LoadSegment, source: str = "kernel.bin") -> LoadPlan:
    entry = segments[0].gpa if segments else 0x100000  # check_plan wants it in the image
    return LoadPlan(source=source, entry=entry, segments=list(segments))


# -- load_flat -------------------------------------------------------------------------


def test_load_flat(tmp_path: Path) -> None:
    image = tmp_path / "boot.bin"
    image.write_bytes(b"\xeb\xfe" + bytes(510))
    result = load_flat(image, 0x7C00)
    assert result == LoadPlan(
        source=str(image),
        entry=0x7C00,
        segments=[LoadSegment(0x7C00, b"\xeb\xfe" + bytes(510), 512)],
        mode=None,
    )
    assert result.segments[0].end == 0x7E00


def test_load_flat_accepts_a_str_path(tmp_path: Path) -> None:
    image = tmp_path / "k.bin"
    image.write_bytes(b"\x90")
    result = load_flat(str(image), 0x100000)
    assert result.source == str(image)
    assert result.segments == [LoadSegment(0x100000, b"\x90", 1)]


def test_load_flat_entry_override(tmp_path: Path) -> None:
    image = tmp_path / "k.bin"
    image.write_bytes(bytes(64))
    assert load_flat(image, 0x100000).entry == 0x100000
    assert load_flat(image, 0x100000, entry=0x100020).entry == 0x100020
    assert load_flat(image, 0x100000, entry=0).entry == 0  # 0 is a real entry, not "default"
    assert load_flat(image, 0x100000, entry=0x100020).segments[0].gpa == 0x100000


def test_load_flat_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.bin"
    with pytest.raises(LoaderError) as info:
        load_flat(missing, 0x7C00)
    assert str(info.value) == f"{missing}: cannot read image: No such file or directory"


def test_load_flat_directory(tmp_path: Path) -> None:
    with pytest.raises(LoaderError) as info:
        load_flat(tmp_path, 0x7C00)
    assert str(info.value) == f"{tmp_path}: cannot read image: Is a directory"


def test_load_flat_empty_file(tmp_path: Path) -> None:
    image = tmp_path / "empty.bin"
    image.write_bytes(b"")
    with pytest.raises(LoaderError) as info:
        load_flat(image, 0x7C00)
    assert str(info.value) == f"{image}: image is empty"


@pytest.mark.parametrize(("addr", "text"), [(-1, "-0x1"), (-0x7C00, "-0x7c00")])
def test_load_flat_negative_address(tmp_path: Path, addr: int, text: str) -> None:
    image = tmp_path / "k.bin"
    image.write_bytes(b"\xf4")
    with pytest.raises(LoaderError) as info:
        load_flat(image, addr)
    assert str(info.value) == f"{image}: load address {text} is negative"


def test_load_flat_too_large(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert MAX_FLAT_SIZE == 1 << 30
    monkeypatch.setattr(flat_module, "MAX_FLAT_SIZE", 16)
    image = tmp_path / "big.bin"
    image.write_bytes(bytes(17))
    with pytest.raises(LoaderError) as info:
        load_flat(image, 0)
    assert str(info.value) == f"{image}: image is 17 bytes, more than the 16 allowed"
    image.write_bytes(bytes(16))
    assert load_flat(image, 0).segments[0].memsz == 16


def test_loader_error_is_a_value_error() -> None:
    assert issubclass(LoaderError, ValueError)


# -- check_plan -------------------------------------------------------------------------


def test_check_plan_ok(ram: GuestMemory) -> None:
    check_plan(plan(LoadSegment(0x100000, b"\x90" * 0x100, 0x1000)), ram, RESERVED)
    with pytest.raises(LoaderError, match="entry 0x100000 is not inside the loaded image"):
        check_plan(plan(), ram, RESERVED)  # nothing loaded: nowhere to start
    # Touching the reserved ranges and the end of RAM is fine.
    check_plan(
        plan(
            LoadSegment(0x520, b"x", 0xAE0),  # 0x520-0xfff, between GDT and tables
            LoadSegment(0x7000, b"y", 1),
            LoadSegment(RAM_SIZE - 0x10, bytes(0x10), 0x10),
            LoadSegment(0x0, b"z", 0x500),
        ),
        ram,
        RESERVED,
    )


def test_check_plan_segment_outside_ram(ram: GuestMemory) -> None:
    bad = plan(LoadSegment(0x400000, b"abc", 3), source="far.bin")
    with pytest.raises(LoaderError) as info:
        check_plan(bad, ram, RESERVED)
    assert str(info.value) == (
        "far.bin: segment 0x400000-0x400002 does not fit in guest RAM (2 MiB)"
    )


def test_check_plan_segment_straddling_end_of_ram(ram: GuestMemory) -> None:
    bad = plan(LoadSegment(RAM_SIZE - 0x10, bytes(0x20), 0x20), source="tail.bin")
    with pytest.raises(LoaderError) as info:
        check_plan(bad, ram, RESERVED)
    assert str(info.value) == (
        "tail.bin: segment 0x1ffff0-0x20000f does not fit in guest RAM (2 MiB)"
    )


def test_check_plan_bss_straddling_end_of_ram(ram: GuestMemory) -> None:
    """The zero-filled part beyond the file bytes must fit too."""
    bad = plan(LoadSegment(RAM_SIZE - 0x1000, b"code", 0x1001), source="bss.bin")
    with pytest.raises(LoaderError, match=r"^bss\.bin: segment 0x1ff000-0x200000 does not fit"):
        check_plan(bad, ram, RESERVED)


def test_check_plan_segment_in_the_mmio_hole() -> None:
    with GuestMemory.with_ram(LOW_RAM_END + 0x2000) as memory:
        check_plan(plan(LoadSegment(HIGH_RAM_START, bytes(0x2000), 0x2000)), memory, [])
        check_plan(plan(LoadSegment(LOW_RAM_END - 0x10, bytes(0x10), 0x10)), memory, [])
        for gpa in (LOW_RAM_END - 0x10, LOW_RAM_END, 0xFEE0_0000, HIGH_RAM_START - 1):
            with pytest.raises(LoaderError, match="does not fit in guest RAM"):
                check_plan(plan(LoadSegment(gpa, bytes(0x20), 0x20)), memory, [])


def test_check_plan_negative_address(ram: GuestMemory) -> None:
    with pytest.raises(LoaderError, match="does not fit in guest RAM"):
        check_plan(plan(LoadSegment(-0x10, bytes(0x20), 0x20)), ram, [])


@pytest.mark.parametrize(
    ("gpa", "memsz", "reserved"),
    [
        (0x6FFF, 0x10, "0x1000-0x6fff"),  # starts inside the page tables
        (0x0, 0x1001, "0x500-0x51f"),  # covers the GDT (the first range hit)
        (0x51F, 1, "0x500-0x51f"),  # last byte of the GDT
        (0x800, 0x1000, "0x1000-0x6fff"),  # runs into the page tables
        (0x2000, 0x10, "0x1000-0x6fff"),  # entirely inside
    ],
)
def test_check_plan_overlapping_reserved(
    ram: GuestMemory, gpa: int, memsz: int, reserved: str
) -> None:
    bad = plan(LoadSegment(gpa, b"\x01", memsz), source="low.bin")
    with pytest.raises(LoaderError) as info:
        check_plan(bad, ram, RESERVED)
    end = gpa + memsz - 1
    assert str(info.value) == (
        f"low.bin: segment {gpa:#x}-{end:#x} overlaps the boot structures at {reserved}"
    )


def test_check_plan_bss_overlapping_reserved(ram: GuestMemory) -> None:
    """Only the file bytes are clear; the zero fill would wipe the page tables."""
    bad = plan(LoadSegment(0x800, b"\x01" * 0x10, 0x900), source="bss.bin")
    with pytest.raises(LoaderError, match="overlaps the boot structures at 0x1000-0x6fff"):
        check_plan(bad, ram, RESERVED)


def test_check_plan_memsz_smaller_than_filesz(ram: GuestMemory) -> None:
    bad = plan(LoadSegment(0x100000, bytes(0x20), 0x10), source="elf.bin")
    with pytest.raises(LoaderError) as info:
        check_plan(bad, ram, RESERVED)
    assert str(info.value) == "elf.bin: segment at 0x100000 has memsz < filesz"


def test_check_plan_checks_every_segment(ram: GuestMemory) -> None:
    bad = plan(
        LoadSegment(0x100000, b"ok", 2),
        LoadSegment(0x100100, b"ok", 2),
        LoadSegment(0x300000, b"no", 2),
        source="multi.bin",
    )
    with pytest.raises(LoaderError, match=r"multi\.bin: segment 0x300000-0x300001"):
        check_plan(bad, ram, RESERVED)


def test_check_plan_message_names_the_flat_file(tmp_path: Path, ram: GuestMemory) -> None:
    image = tmp_path / "guest.bin"
    image.write_bytes(b"\x90" * 16)
    with pytest.raises(LoaderError) as info:
        check_plan(load_flat(image, 0x6000), ram, RESERVED)
    assert str(info.value).startswith(f"{image}: segment 0x6000-0x600f overlaps")
    with pytest.raises(LoaderError) as info:
        check_plan(load_flat(image, RAM_SIZE - 8), ram, RESERVED)
    assert str(info.value).startswith(f"{image}: segment 0x1ffff8-0x200007 does not fit")
    check_plan(load_flat(image, 0x100000), ram, RESERVED)


def test_check_plan_with_the_real_reserved_ranges(ram: GuestMemory) -> None:
    assert long_mode(Sregs(), 0x100000).reserved() == RESERVED
    low = plan(LoadSegment(0x500, b"\0", 1))
    with pytest.raises(LoaderError, match="0x500-0x51f"):
        check_plan(low, ram, protected_mode(Sregs(), 0x100000).reserved())


def test_load_segment_end() -> None:
    segment = LoadSegment(0x1000, b"abc", 0x10)
    assert segment.end == 0x1010
    with pytest.raises(records.FrozenRecordError):
        segment.gpa = 0  # type: ignore[misc]
