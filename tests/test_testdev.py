"""Unit tests for the MMIO test device (no /dev/kvm needed), and one guest that reads it."""

from __future__ import annotations

import pytest

from kvmpy.bus import Bus
from kvmpy.devices.base import Device
from kvmpy.devices.testdev import (
    DOORBELL_LIMIT,
    REG_COUNTER,
    REG_DOORBELL,
    REG_ID,
    REG_SCRATCH,
    TESTDEV_BASE,
    TESTDEV_ID,
    TESTDEV_SIZE,
    TestDevice,
)
from kvmpy.loaders.flat import load_flat
from kvmpy.machine import Machine
from tests.helpers import Assembler


@pytest.fixture
def dev() -> TestDevice:
    return TestDevice()


def test_constants() -> None:
    assert TESTDEV_BASE == 0xFEB00000
    assert TESTDEV_SIZE == 0x1000
    assert TESTDEV_ID.to_bytes(4, "little") == b"KVMP"
    assert (REG_ID, REG_SCRATCH, REG_COUNTER, REG_DOORBELL) == (0, 4, 8, 0xC)


def test_satisfies_device_protocol() -> None:
    device: Device = TestDevice()
    assert device.read(REG_ID, 4) == 0x504D564B


def test_id_is_read_only(dev: TestDevice) -> None:
    dev.write(REG_ID, 4, 0x12345678)
    assert dev.read(REG_ID, 4) == TESTDEV_ID


def test_scratch_reads_back(dev: TestDevice) -> None:
    assert dev.read(REG_SCRATCH, 4) == 0
    dev.write(REG_SCRATCH, 4, 0xCAFEF00D)
    assert dev.read(REG_SCRATCH, 4) == 0xCAFEF00D
    assert dev.scratch == 0xCAFEF00D


def test_scratch_keeps_32_bits(dev: TestDevice) -> None:
    dev.write(REG_SCRATCH, 4, 0x1_FFFF_FFFF)
    assert dev.read(REG_SCRATCH, 4) == 0xFFFFFFFF


def test_counter_counts_reads_from_zero(dev: TestDevice) -> None:
    assert [dev.read(REG_COUNTER, 4) for _ in range(4)] == [0, 1, 2, 3]


def test_counter_ignores_writes(dev: TestDevice) -> None:
    dev.read(REG_COUNTER, 4)
    dev.write(REG_COUNTER, 4, 100)
    assert dev.read(REG_COUNTER, 4) == 1


def test_counter_wraps_at_32_bits(dev: TestDevice) -> None:
    dev.counter = 0xFFFFFFFF
    assert dev.read(REG_COUNTER, 4) == 0xFFFFFFFF
    assert dev.read(REG_COUNTER, 4) == 0


def test_doorbell_records_writes_and_reads_zero(dev: TestDevice) -> None:
    dev.write(REG_DOORBELL, 4, 7)
    dev.write(REG_DOORBELL, 4, 0xDEADBEEF)
    dev.write(REG_DOORBELL, 4, 7)
    assert dev.doorbell == [7, 0xDEADBEEF, 7]
    assert dev.read(REG_DOORBELL, 4) == 0


@pytest.mark.parametrize("offset", [0x10, 0x14, 0x100, 0xFFC])
def test_unused_offsets_read_zero_and_ignore_writes(dev: TestDevice, offset: int) -> None:
    dev.write(offset, 4, 0xFFFFFFFF)
    assert dev.read(offset, 4) == 0
    assert dev.scratch == 0
    assert dev.doorbell == []


def test_narrow_reads_return_register_bytes(dev: TestDevice) -> None:
    assert bytes(dev.read(REG_ID + i, 1) for i in range(4)) == b"KVMP"
    assert dev.read(REG_ID, 2) == 0x564B
    assert dev.read(REG_ID + 2, 2) == 0x504D
    assert dev.read(REG_ID + 1, 2) == 0x4D56  # unaligned, inside one register


def test_narrow_scratch_write_merges_bytes(dev: TestDevice) -> None:
    dev.write(REG_SCRATCH, 4, 0x11223344)
    dev.write(REG_SCRATCH + 1, 1, 0xAA)
    assert dev.read(REG_SCRATCH, 4) == 0x1122AA44
    dev.write(REG_SCRATCH + 2, 2, 0xBBCC)
    assert dev.read(REG_SCRATCH, 4) == 0xBBCCAA44
    assert dev.read(REG_SCRATCH + 3, 1) == 0xBB


def test_narrow_counter_read_advances_once(dev: TestDevice) -> None:
    assert dev.read(REG_COUNTER, 1) == 0
    assert dev.read(REG_COUNTER + 2, 2) == 0  # value 1, upper half
    assert dev.read(REG_COUNTER, 4) == 2


def test_narrow_doorbell_write_keeps_byte_position(dev: TestDevice) -> None:
    dev.write(REG_DOORBELL, 1, 0x1FF)  # only the low byte is written
    dev.write(REG_DOORBELL + 1, 1, 0x12)
    dev.write(REG_DOORBELL + 2, 2, 0xABCD)
    assert dev.doorbell == [0xFF, 0x1200, 0xABCD0000]


def test_wide_read_covers_two_registers(dev: TestDevice) -> None:
    dev.write(REG_SCRATCH, 4, 0x89ABCDEF)
    assert dev.read(REG_ID, 8) == 0x89ABCDEF_504D564B
    # COUNTER (advanced once) and DOORBELL (reads 0)
    assert dev.read(REG_COUNTER, 8) == 0
    assert dev.read(REG_COUNTER, 8) == 1
    assert dev.counter == 2


def test_wide_write_covers_two_registers(dev: TestDevice) -> None:
    dev.write(REG_ID, 8, 0x01020304_AAAAAAAA)  # ID ignores, SCRATCH takes the high half
    assert dev.scratch == 0x01020304
    dev.write(REG_COUNTER, 8, 0x55_00000009)  # COUNTER ignores, DOORBELL gets the high half
    assert dev.counter == 0
    assert dev.doorbell == [0x55]


def test_unaligned_access_spanning_registers(dev: TestDevice) -> None:
    dev.write(REG_SCRATCH, 4, 0x44332211)
    # bytes 2..5: "MP" from ID, then 0x11 0x22 from SCRATCH
    assert dev.read(REG_ID + 2, 4) == 0x2211504D
    dev.write(REG_SCRATCH + 2, 4, 0xEEDDCCBB)  # SCRATCH high half, COUNTER bytes dropped
    assert dev.scratch == 0xCCBB2211
    assert dev.counter == 0


def test_access_straddling_the_end(dev: TestDevice) -> None:
    assert dev.read(TESTDEV_SIZE - 4, 8) == 0
    dev.write(TESTDEV_SIZE - 2, 8, 0xFFFF_FFFF_FFFF_FFFF)
    assert dev.doorbell == []


@pytest.mark.parametrize("size", [0, 9, 16])
def test_sizes_beyond_8_are_ignored_and_counted(dev: TestDevice, size: int) -> None:
    assert dev.read(REG_SCRATCH, size) == (1 << (8 * min(size, 8))) - 1
    dev.write(REG_SCRATCH, size, 0x12345678)
    assert dev.scratch == 0
    assert dev.ignored_accesses == 2


def test_page_crossing_8_byte_read_split_3_plus_5() -> None:
    # Issue 9 item 1: an 8-byte read at 0xfeb00ffd crosses a page and KVM hands
    # it over as 3 + 5 bytes; it used to raise ValueError ("access size 3").
    bus = Bus("mmio", 1 << 32)
    dev = TestDevice()
    bus.register(TESTDEV_BASE, TESTDEV_SIZE, dev, "testdev")
    assert bus.read(TESTDEV_BASE + 0xFFD, 3) == 0
    assert bus.read(TESTDEV_BASE + 0x1000, 5) == 0xFF_FFFF_FFFF  # past the device
    dev.write(REG_SCRATCH + 1, 3, 0xAABBCC)
    assert dev.read(REG_SCRATCH, 5) == 0xAABBCC00
    assert dev.read(1, 7) == 0xAABBCC00_504D56
    assert dev.ignored_accesses == 0


def test_doorbell_is_a_bounded_ring_that_counts_drops(dev: TestDevice) -> None:
    # Issue 9 item 2: a guest ringing in a loop grew the list without bound.
    for value in range(DOORBELL_LIMIT + 10):
        dev.write(REG_DOORBELL, 4, value)
    assert len(dev.doorbell) == DOORBELL_LIMIT
    assert dev.doorbell[0] == 10
    assert dev.doorbell[-1] == DOORBELL_LIMIT + 9
    assert dev.doorbell_dropped == 10


def test_on_an_mmio_bus() -> None:
    bus = Bus("mmio", 1 << 32)
    dev = TestDevice()
    bus.register(TESTDEV_BASE, TESTDEV_SIZE, dev, "testdev")
    assert bus.read(TESTDEV_BASE, 4) == TESTDEV_ID
    bus.write(TESTDEV_BASE + REG_SCRATCH, 4, 0x1234)
    assert bus.read(TESTDEV_BASE + REG_SCRATCH, 4) == 0x1234
    bus.write(TESTDEV_BASE + REG_DOORBELL, 4, 42)
    assert dev.doorbell == [42]
    assert bus.read(TESTDEV_BASE + TESTDEV_SIZE, 4) == 0xFFFFFFFF  # past the device


@pytest.mark.kvm
def test_a_guest_reading_8_bytes_across_the_page_end(assemble: Assembler) -> None:
    # Issue 9 item 1: KVM splits this read at the page boundary (3 + 5 bytes);
    # the 3-byte part made the test device raise, and m.run() with it.
    source = """
        movabs $0xfeb00ffd, %rbx
        mov (%rbx), %rax
        movabs $0xffffffffff000000, %rcx
        cmp %rcx, %rax
        je 1f
        test %rax, %rax
        jz 2f
        mov $1, %al
        out %al, $0xf4
    1:  mov $0, %al
        out %al, $0xf4
    2:  mov $2, %al
        out %al, $0xf4
    """
    with Machine(mem_size=16 << 20) as m:
        m.load(load_flat(assemble(source, "long"), 0x100000), mode="long")
        outcome = m.run(timeout=10)
        device = m.device("testdev", TestDevice)
    # Split: 3 bytes of the device (0) and 5 past its end (all-ones); or, if a
    # host hands over the whole access, 8 bytes read as 0 past the registers.
    assert outcome.exit_code in (0, 2), outcome
    assert device.ignored_accesses == 0
