"""QEMU's ``pci-testdev``: the PCI test device (Red Hat 1b36:0005) of x86 test kernels.

Test kernels (kvm-unit-tests' ``vmexit`` and its PCI library) find it by its
IDs and time or check accesses through its two BARs:

======= ======== ==========================================================
BAR     size     use
======= ======== ==========================================================
BAR0    4 KiB    memory: the MMIO tests
BAR1    256      I/O ports: the port I/O tests
======= ======== ==========================================================

Six tests, three per BAR: "no-eventfd", "wildcard-eventfd" and
"datamatch-eventfd" (``mmio-…`` on BAR0, ``portio-…`` on BAR1).  A byte
written at offset 0 of a BAR selects that BAR's test of that number (3 or
more: none) and zeroes its count.  Reads of either BAR then give the selected
test's header, byte by byte::

    0  test   (u8)   its number, 0-5        8  data  (u8)   the value to write
    1  width  (u8)   1                     12  count (u32)  matching writes seen
    4  offset (u32)  where to write        16  name         NUL-terminated

Each byte written at ``offset`` of the BAR it belongs to counts when it equals
``data`` (wildcard: any value).  With no test selected, or past the header,
reads give 0.  QEMU takes accesses a byte at a time, so a wider one acts as
that many byte accesses.

Under QEMU the two eventfd tests are answered by KVM's ioeventfd and never
reach the device (their count stays 0); kvmpy counts them.  The test library
accepts either: a count of 0 or of the writes made.
"""

from __future__ import annotations

import struct
from typing import Any, ClassVar

from kvmpy.devices.base import U32, bounded, check_state
from kvmpy.devices.pci import PciBar, PciFunction
from kvmpy.records import Record

REDHAT_VENDOR = 0x1B36
PCI_TESTDEV_DEVICE = 0x0005
# QEMU's PCI_CLASS_OTHERS in its 16-bit class ID: subclass 0xff, base class 0.
CLASS_UNCLASSIFIED_OTHER = 0x00FF00
# Every PCI device QEMU builds carries these unless it says otherwise.
QEMU_SUBSYSTEM_VENDOR = 0x1AF4
QEMU_SUBSYSTEM = 0x1100

MEMORY_BAR, IO_BAR = 0, 1
MEMORY_BAR_SIZE = 4096  # two halves of 2 KiB: headers, then the test offsets
IO_BAR_SIZE = 256  # two halves of 128 ports
KINDS = ("no-eventfd", "wildcard-eventfd", "datamatch-eventfd")
TESTS = len(KINDS) * 2  # mmio-*, then portio-*
DATA_MATCH = 0xFA
DATA_ANY = 0xCE  # what the wildcard test's header shows


class _Test:
    """One test's header, as the guest reads it."""

    def __init__(self, number: int) -> None:
        memory = number < len(KINDS)
        kind = KINDS[number % len(KINDS)]
        self.matches_data = kind != "wildcard-eventfd"
        data = DATA_MATCH if self.matches_data else DATA_ANY
        half = (MEMORY_BAR_SIZE if memory else IO_BAR_SIZE) // 2
        self.offset = half + number
        name = f"{'mmio' if memory else 'portio'}-{kind}".encode()
        self.header = bytearray(struct.pack("<BBxxIBxxxI", number, 1, self.offset, data, 0))
        self.header += name + b"\0"
        self.data = data

    @property
    def count(self) -> int:
        return int(struct.unpack_from("<I", self.header, 12)[0])

    @count.setter
    def count(self, value: int) -> None:
        struct.pack_into("<I", self.header, 12, value & U32)


class PciTestDeviceState(Record):
    VERSION: ClassVar[int] = 1
    selected: int = bounded(-1, TESTS - 1)  # -1: none
    counts: tuple[int, ...] = bounded(0, U32, length=TESTS)


class PciTestDevice(PciFunction):
    """pci-testdev's configuration space and BARs (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__(
            REDHAT_VENDOR,
            PCI_TESTDEV_DEVICE,
            CLASS_UNCLASSIFIED_OTHER,
            subsystem_vendor=QEMU_SUBSYSTEM_VENDOR,
            subsystem=QEMU_SUBSYSTEM,
            bars=(PciBar(MEMORY_BAR_SIZE), PciBar(IO_BAR_SIZE, io=True)),
        )
        self.tests = [_Test(number) for number in range(TESTS)]
        self.selected = -1

    def read_bar(self, index: int, offset: int, size: int) -> int:
        value = 0
        for at in range(size):
            value |= self._read_byte(offset + at) << (8 * at)
        return value

    def _read_byte(self, offset: int) -> int:
        if self.selected < 0:
            return 0
        header = self.tests[self.selected].header
        # As QEMU: the byte past the last one it serves (the name's NUL) reads 0 too.
        return header[offset] if offset + 1 < len(header) else 0

    def write_bar(self, index: int, offset: int, size: int, value: int) -> None:
        for at in range(size):
            self._write_byte(index, offset + at, (value >> (8 * at)) & 0xFF)

    def _write_byte(self, index: int, offset: int, byte: int) -> None:
        if offset == 0:
            self.selected = -1
            if byte < len(KINDS):
                self.selected = byte + (len(KINDS) if index == IO_BAR else 0)
                self.tests[self.selected].count = 0
            return
        if self.selected < 0:
            return
        test = self.tests[self.selected]
        if offset != test.offset or (test.matches_data and byte != test.data):
            return
        test.count += 1

    def reset(self) -> None:
        super().reset()
        self.selected = -1
        for test in self.tests:
            test.count = 0

    def state(self) -> PciTestDeviceState:
        return PciTestDeviceState(self.selected, tuple(test.count for test in self.tests))

    def restore(self, state: Any) -> None:
        checked = check_state("pci-testdev", state, PciTestDeviceState)
        self.selected = checked.selected
        for test, count in zip(self.tests, checked.counts, strict=True):
            test.count = count
