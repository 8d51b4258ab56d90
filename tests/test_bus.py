"""Unit tests for the port-I/O and MMIO buses (kvmpy.bus): no /dev/kvm needed."""

from __future__ import annotations

import threading

import pytest

from kvmpy.bus import Bus, BusError, UnhandledAccess
from kvmpy.devices.base import Device, Stateless


class Recorder(Stateless):
    """A device that records every access and reads back ``value``."""

    def __init__(self, value: int = 0) -> None:
        self.value = value
        self.reads: list[tuple[int, int]] = []
        self.writes: list[tuple[int, int, int]] = []

    def read(self, offset: int, size: int) -> int:
        self.reads.append((offset, size))
        return self.value

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes.append((offset, size, value))


class Echo(Stateless):
    """Reads return ``tag | offset`` so a test sees which device and offset answered."""

    def __init__(self, tag: int) -> None:
        self.tag = tag

    def read(self, offset: int, size: int) -> int:
        return self.tag | offset

    def write(self, offset: int, size: int, value: int) -> None:
        raise AssertionError("not written in these tests")


def _port_bus(strict: bool = False) -> Bus:
    return Bus("port", 0x10000, strict=strict)


def _mmio_bus(strict: bool = False) -> Bus:
    return Bus("mmio", 1 << 52, strict=strict)


def test_devices_satisfy_the_protocol() -> None:
    device: Device = Recorder()
    assert device.read(0, 1) == 0


# -- register ----------------------------------------------------------------------------


def test_register_keeps_mappings_sorted() -> None:
    bus = _port_bus()
    a, b, c = Recorder(), Recorder(), Recorder()
    bus.register(0x3F8, 8, a, "COM1")
    bus.register(0x80, 1, b, "POST")
    bus.register(0xF4, 4, c)
    assert [(m.base, m.length, m.device, m.name) for m in bus.mappings] == [
        (0x80, 1, b, "POST"),
        (0xF4, 4, c, "Recorder"),
        (0x3F8, 8, a, "COM1"),
    ]
    assert bus._starts == [0x80, 0xF4, 0x3F8]
    assert [m.end for m in bus.mappings] == [0x81, 0xF8, 0x400]


def test_register_default_name_is_the_device_class() -> None:
    bus = _port_bus()
    bus.register(0x60, 1, Recorder())
    bus.register(0x64, 1, Recorder(), "")
    assert [m.name for m in bus.mappings] == ["Recorder", "Recorder"]


@pytest.mark.parametrize(
    ("base", "length", "text"),
    [
        (0x3F0, 0x10, "0x3f0-0x3ff overlaps COM1 at 0x3f8-0x3ff"),  # covers the start
        (0x3FF, 2, "0x3ff-0x400 overlaps COM1 at 0x3f8-0x3ff"),  # covers the end
        (0x3F8, 8, "0x3f8-0x3ff overlaps COM1 at 0x3f8-0x3ff"),  # identical
        (0x3FA, 1, "0x3fa-0x3fa overlaps COM1 at 0x3f8-0x3ff"),  # inside
        (0x300, 0x200, "0x300-0x4ff overlaps COM1 at 0x3f8-0x3ff"),  # around
    ],
)
def test_register_overlap_names_both_devices(base: int, length: int, text: str) -> None:
    bus = _port_bus()
    com1 = Recorder()
    bus.register(0x3F8, 8, com1, "COM1")
    handlers_before = dict(bus.handlers)
    with pytest.raises(BusError) as info:
        bus.register(base, length, Recorder(), "probe")
    assert str(info.value) == f"probe: port range {text}"
    # Nothing of the failed registration is left behind.
    assert [(m.base, m.length, m.device, m.name) for m in bus.mappings] == [
        (0x3F8, 8, com1, "COM1")
    ]
    assert bus._starts == [0x3F8]
    assert bus.handlers == handlers_before


def test_register_overlap_uses_default_names() -> None:
    bus = _mmio_bus()
    bus.register(0xFEE0_0000, 0x1000, Echo(0), "lapic")
    with pytest.raises(BusError) as info:
        bus.register(0xFEE0_0800, 0x1000, Recorder())
    assert str(info.value) == (
        "Recorder: mmio range 0xfee00800-0xfee017ff overlaps lapic at 0xfee00000-0xfee00fff"
    )


def test_register_adjacent_ranges() -> None:
    bus = _port_bus()
    bus.register(0x3F8, 8, Recorder(), "COM1")
    bus.register(0x3F0, 8, Recorder(), "below")
    bus.register(0x400, 8, Recorder(), "above")
    assert [(m.base, m.end, m.name) for m in bus.mappings] == [
        (0x3F0, 0x3F8, "below"),
        (0x3F8, 0x400, "COM1"),
        (0x400, 0x408, "above"),
    ]


@pytest.mark.parametrize(
    ("base", "length", "text"),
    [
        (0x100, 0, "0x100+0x0"),
        (0x100, -1, "0x100+-0x1"),
        (-1, 2, "-0x1+0x2"),
        (0xFFFF, 2, "0xffff+0x2"),
        (0x10000, 1, "0x10000+0x1"),
    ],
)
def test_register_out_of_bounds(base: int, length: int, text: str) -> None:
    bus = _port_bus()
    with pytest.raises(BusError) as info:
        bus.register(base, length, Recorder(), "dev")
    assert str(info.value) == f"dev: port range {text} is out of bounds"
    assert bus.mappings == []
    assert bus.handlers == {}


def test_register_up_to_the_limit() -> None:
    bus = _port_bus()
    bus.register(0xFFFF, 1, Recorder(), "last")
    bus.register(0, 1, Recorder(), "first")
    assert bus.find(0xFFFF) is not None
    assert bus.find(0) is not None


def test_bus_error_is_a_value_error() -> None:
    assert issubclass(BusError, ValueError)


# -- dispatch ------------------------------------------------------------------------------


def test_port_dispatch_passes_the_offset() -> None:
    bus = _port_bus()
    com1 = Recorder(value=0x60)
    post = Recorder(value=0x12)
    bus.register(0x3F8, 8, com1, "COM1")
    bus.register(0x80, 1, post, "POST")
    assert bus.read(0x3FD, 1) == 0x60
    bus.write(0x3F8, 1, ord("A"))
    bus.write(0x3FF, 2, 0xBEEF)
    assert bus.read(0x80, 1) == 0x12
    bus.write(0x80, 1, 0x55)
    assert com1.reads == [(5, 1)]
    assert com1.writes == [(0, 1, ord("A")), (7, 2, 0xBEEF)]
    assert post.reads == [(0, 1)]
    assert post.writes == [(0, 1, 0x55)]
    assert not bus.unhandled


def test_port_handlers_cover_every_port() -> None:
    bus = _port_bus()
    com1 = Recorder()
    post = Recorder()
    bus.register(0x3F8, 8, com1, "COM1")
    bus.register(0x80, 1, post, "POST")
    assert sorted(bus.handlers) == [0x80, *range(0x3F8, 0x400)]
    for port in range(0x3F8, 0x400):
        assert bus.handlers[port][:3] == (com1.read, com1.write, 0x3F8)
    assert bus.handlers[0x80][:3] == (post.read, post.write, 0x80)
    # One lock per device, shared by all its ports.
    assert bus.handlers[0x3F8][3] is bus.handlers[0x3FF][3] is not bus.handlers[0x80][3]
    assert 0x3F7 not in bus.handlers
    assert 0x400 not in bus.handlers

    # The run loop's fast path: one lookup, then offset = port - base.
    read, write, base, _lock = bus.handlers[0x3FC]
    write(0x3FC - base, 1, 3)
    assert read(0x3FC - base, 1) == 0
    assert com1.writes == [(4, 1, 3)]
    assert com1.reads == [(4, 1)]


def test_mmio_bus_keeps_no_handlers() -> None:
    bus = _mmio_bus()
    bus.register(0xFEC0_0000, 0x1000, Recorder(), "ioapic")
    assert bus.handlers == {}
    assert bus.find(0xFEC0_0010) is not None


def test_mmio_dispatch_passes_the_offset() -> None:
    bus = _mmio_bus()
    lapic = Recorder(value=0xDEADBEEF)
    bus.register(0xFEE0_0000, 0x1000, lapic, "lapic")
    assert bus.read(0xFEE0_0020, 4) == 0xDEADBEEF
    bus.write(0xFEE0_00B0, 4, 0)
    bus.write(0xFEE0_0FF8, 8, 0x1122334455667788)
    assert lapic.reads == [(0x20, 4)]
    assert lapic.writes == [(0xB0, 4, 0), (0xFF8, 8, 0x1122334455667788)]


def test_mmio_binary_search_at_range_edges() -> None:
    bus = _mmio_bus()
    # Registered out of order; two of them adjacent.
    ranges = [
        (0xFEE0_0000, 0x1000, 0xE000_0000),
        (0x1000, 0x1000, 0x1000_0000),
        (0xFEC0_0000, 0x20, 0xC000_0000),
        (0x2000, 0x100, 0x2000_0000),
        (0x1_0000_0000, 0x10, 0xF000_0000),
    ]
    for base, length, tag in ranges:
        bus.register(base, length, Echo(tag), f"dev{tag >> 28:x}")
    assert bus._starts == sorted(base for base, _, _ in ranges)
    for base, length, tag in ranges:
        assert bus.read(base, 4) == tag
        assert bus.read(base + length - 1, 1) == tag | (length - 1)
        found = bus.find(base + length - 1)
        assert found is not None
        assert (found.base, found.length) == (base, length)

    # 0x1fff is the last byte of dev1 and 0x2000 the first of dev2.
    assert bus.read(0x1FFF, 1) == 0x1000_0FFF
    assert bus.read(0x2000, 1) == 0x2000_0000
    # Just outside every range: before the first, in the gaps, after the last.
    misses = [
        0,
        0xFFF,
        0x2100,
        0xFEBF_FFFF,
        0xFEC0_0020,
        0xFEDF_FFFF,
        0xFEE0_1000,
        0xFFFF_FFFF,
        0x1_0000_0010,
        (1 << 52) - 1,
    ]
    for address in misses:
        assert bus.find(address) is None, hex(address)
        assert bus.read(address, 4) == 0xFFFF_FFFF
    assert bus.unhandled == {("read", address): 1 for address in misses}


def test_find_negative_address_is_none() -> None:
    bus = _mmio_bus()
    bus.register(0, 0x1000, Recorder(), "ram-ish")
    assert bus.find(-1) is None
    found = bus.find(0)
    assert found is not None
    assert found.name == "ram-ish"


# -- unhandled accesses -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "expected"), [(1, 0xFF), (2, 0xFFFF), (4, 0xFFFF_FFFF), (8, 0xFFFF_FFFF_FFFF_FFFF)]
)
def test_unhandled_read_is_all_ones_of_the_size(size: int, expected: int) -> None:
    bus = _port_bus()
    bus.register(0x3F8, 8, Recorder(), "COM1")
    assert bus.read(0x2F8, size) == expected
    assert bus.unhandled == {("read", 0x2F8): 1}


def test_unhandled_accesses_are_counted_per_kind_and_address() -> None:
    bus = _port_bus()
    bus.read(0x61, 1)
    bus.read(0x61, 1)
    bus.read(0x61, 2)
    bus.write(0x61, 1, 0)
    bus.write(0x70, 1, 0x8F)
    bus.read(0x71, 1)
    assert bus.unhandled == {
        ("read", 0x61): 3,
        ("write", 0x61): 1,
        ("write", 0x70): 1,
        ("read", 0x71): 1,
    }
    assert bus.unhandled[("write", 0x71)] == 0


def test_unhandled_write_is_dropped() -> None:
    bus = _mmio_bus()
    device = Recorder()
    bus.register(0x1000, 0x10, device, "dev")
    bus.write(0x1010, 4, 0x1234)
    bus.write(0xFFF, 1, 1)
    bus.write(0x0, 8, 1)
    assert device.writes == []
    assert device.reads == []
    assert bus.unhandled == {("write", 0x1010): 1, ("write", 0xFFF): 1, ("write", 0x0): 1}


def test_handled_accesses_are_not_counted() -> None:
    bus = _port_bus()
    bus.register(0x80, 1, Recorder(), "POST")
    bus.write(0x80, 1, 1)
    bus.read(0x80, 1)
    assert sum(bus.unhandled.values()) == 0


def test_strict_bus_raises_on_unhandled_read() -> None:
    bus = _port_bus(strict=True)
    bus.register(0x3F8, 8, Recorder(), "COM1")
    assert bus.read(0x3F8, 1) == 0
    with pytest.raises(UnhandledAccess) as info:
        bus.read(0x2F8, 2)
    error = info.value
    assert str(error) == "unhandled port read at 0x2f8 (size 2)"
    assert (error.bus, error.kind, error.address, error.size) == ("port", "read", 0x2F8, 2)
    assert bus.unhandled == {("read", 0x2F8): 1}


def test_strict_bus_raises_on_unhandled_write() -> None:
    bus = _mmio_bus(strict=True)
    device = Recorder()
    bus.register(0xFEE0_0000, 0x1000, device, "lapic")
    bus.write(0xFEE0_0000, 4, 7)
    with pytest.raises(UnhandledAccess) as info:
        bus.write(0xFEE0_1000, 4, 0xABCD)
    error = info.value
    assert str(error) == "unhandled mmio write at 0xfee01000 (size 4)"
    assert (error.bus, error.kind, error.address, error.size) == ("mmio", "write", 0xFEE0_1000, 4)
    assert device.writes == [(0, 4, 7)]
    assert bus.unhandled == {("write", 0xFEE0_1000): 1}


def test_unhandled_access_is_not_a_bus_error() -> None:
    """Tests catch UnhandledAccess separately from registration errors."""
    assert not issubclass(UnhandledAccess, BusError)
    assert issubclass(UnhandledAccess, Exception)


def test_mmio_pages_index_only_pages_one_mapping_owns() -> None:
    bus = Bus("mmio", 1 << 52)
    lock = threading.Lock()
    a, b, c = Recorder(), Recorder(), Recorder()
    bus.register(0x10000, 0x2000, a, "a", lock)  # two whole pages
    bus.register(0x20800, 0x100, b, "b")  # part of a page, alone there
    bus.register(0x30000, 0x800, c, "c")
    assert set(bus.pages) == {0x10, 0x11, 0x20, 0x30}
    assert bus.pages[0x20][2:4] == (0x20800, 0x20900)
    bus.register(0x30800, 0x800, Recorder(), "d")  # shares c's page
    assert 0x30 not in bus.pages
    assert bus.read(0x30000, 4) == c.read(0, 4)  # still found, by binary search


def test_unclaimed_ports_get_a_counting_stub() -> None:
    bus = Bus("port", 0x10000)
    assert bus.read(0x99, 2) == 0xFFFF
    assert 0x99 in bus.handlers  # the next access is one lookup
    read, _write, base, lock = bus.handlers[0x99]
    assert lock is not None
    with lock:
        assert read(0x99 - base, 1) == 0xFF
    bus.write(0x99, 1, 5)
    assert bus.unhandled == {("read", 0x99): 2, ("write", 0x99): 1}
    strict = Bus("port", 0x10000, strict=True)
    with pytest.raises(UnhandledAccess):
        strict.read(0x99, 1)
    assert 0x99 not in strict.handlers


def test_unclaimed_mmio_pages_get_a_counting_stub_until_claimed() -> None:
    bus = Bus("mmio", 1 << 52)
    assert bus.read(0xD000_0010, 4) == 0xFFFF_FFFF
    read, write, _base, _end, lock = bus.pages[0xD0000]
    assert lock is not None  # two vCPUs may count at once
    with lock:
        assert read(0x20, 2) == 0xFFFF
        write(0x20, 1, 0)
    assert bus.unhandled == {("read", 0xD000_0010): 1, ("read", 0xD000_0020): 1,
                             ("write", 0xD000_0020): 1}  # fmt: skip
    device = Recorder(7)
    bus.register(0xD000_0000, 0x100, device, "late")  # claims the page: the stub goes
    assert bus.pages[0xD0000][2:4] == (0xD000_0000, 0xD000_0100)
    huge = Recorder(9)
    bus.read(0x1_0000_0000, 1)
    assert 0x100000 in bus.pages
    bus.register(0x1_0000_0000, 1 << 30, huge, "huge")  # not indexed, and the stub goes
    assert 0x100000 not in bus.pages
    assert bus.read(0x1_0000_0000, 1) == 9
    strict = Bus("mmio", 1 << 52, strict=True)
    with pytest.raises(UnhandledAccess):
        strict.read(0xD000_0000, 4)
    assert not strict.pages


def test_a_device_whose_only_caller_is_the_vcpu_skips_the_lock_on_the_fast_path() -> None:
    bus = Bus("port", 0x10000)
    lock = threading.Lock()
    only, shared = Recorder(), Recorder()
    bus.register(0x80, 1, only, "POST", lock, only_caller=True)
    bus.register(0x3F8, 8, shared, "COM1")
    assert bus.handlers[0x80][3] is None
    assert bus.handlers[0x3F8][3] is not None
    # Everything else (host threads, through Machine.device_lock) still has the lock.
    assert [m.lock for m in bus.mappings if m.name == "POST"] == [lock]
    bus.write(0x80, 1, 7)
    assert only.writes == [(0, 1, 7)]


def test_with_one_vcpu_the_stubs_and_only_caller_devices_dispatch_without_a_lock() -> None:
    ports = Bus("port", 0x10000, one_vcpu=True)
    mmio = Bus("mmio", 1 << 52, one_vcpu=True)
    ports.read(0x99, 1)
    mmio.read(0xD000_0000, 4)
    assert ports.handlers[0x99][3] is None and mmio.pages[0xD0000][4] is None
    assert ports.unhandled == {("read", 0x99): 1}
    mmio.register(0xE000_0000, 0x1000, Recorder(1), "alone", only_caller=True)
    mmio.register(0xE000_1000, 0x1000, Recorder(2), "shared")
    assert mmio.pages[0xE0000][4] is None
    assert mmio.pages[0xE0001][4] is mmio.mappings[-1].lock  # a host thread may call it


def test_unregister_gives_the_range_back() -> None:
    ports = _port_bus()
    a, b = Recorder(1), Recorder(2)
    ports.read(0x1002, 1)  # unclaimed first: a stub
    ports.register(0x1000, 4, a, "bar")
    assert ports.read(0x1002, 1) == 1
    with pytest.raises(BusError, match="not Recorder's"):
        ports.unregister(0x1000, b)
    with pytest.raises(BusError):
        ports.unregister(0x1001, a)
    ports.unregister(0x1000, a)
    assert ports.mappings == [] and ports._starts == []
    assert ports.read(0x1002, 1) == 0xFF and ports.read(0x1000, 1) == 0xFF
    assert ports.handlers[0x1002][0] == ports._unclaimed[0x1002].read  # its stub again
    assert ports.unhandled == {("read", 0x1002): 2, ("read", 0x1000): 1}
    ports.register(0x1000, 4, b, "moved back")
    assert ports.read(0x1003, 1) == 2

    mmio = _mmio_bus()
    mmio.register(0xE000_0000, 0x800, a, "first half")
    mmio.register(0xE000_0800, 0x800, b, "second half")
    assert 0xE0000 not in mmio.pages  # shared: found by binary search
    assert mmio.read(0xE000_0900, 4) == 2
    mmio.unregister(0xE000_0000, a)
    assert mmio.pages[0xE0000][2:4] == (0xE000_0800, 0xE000_1000)  # b has it alone now
    assert mmio.read(0xE000_0100, 4) == 0xFFFF_FFFF and mmio.read(0xE000_0900, 4) == 2
    mmio.unregister(0xE000_0800, b)
    assert 0xE0000 not in mmio.pages or mmio.pages[0xE0000][0] != b.read
    assert mmio.read(0xE000_0900, 4) == 0xFFFF_FFFF
    assert mmio.find(0xE000_0900) is None
