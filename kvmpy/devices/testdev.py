"""A tiny MMIO "test device" for guests that want to prove their MMIO path works.

Mapped at physical ``TESTDEV_BASE`` (0xFEB00000, a hole below the IOAPIC that
PCs leave free) with ``TESTDEV_SIZE`` bytes.  Four 32-bit registers:

====== ========= ==========================================================
offset name      behaviour
====== ========= ==========================================================
0x00   ID        reads ``TESTDEV_ID`` (0x504D564B, the bytes "KVMP"); writes
                 are ignored
0x04   SCRATCH   read/write; holds whatever was last written
0x08   COUNTER   every read returns the next value, starting at 0 (wraps at
                 2**32); writes are ignored
0x0C   DOORBELL  every write appends the value to ``doorbell``; reads 0
====== ========= ==========================================================

Every other offset reads 0 and ignores writes.

``doorbell`` is a ring of the last :data:`DOORBELL_LIMIT` values: a guest
ringing in a loop cannot grow the host process.  Values pushed out of the
ring are counted in ``doorbell_dropped``.

Access widths: any size from 1 to 8 bytes at any offset (KVM splits an
8-byte access that crosses a page into, say, 3 + 5 bytes).  An access is
split into the 32-bit registers whose bytes it covers, little-endian, and
each covered register is accessed exactly once.  So:

* a 1- or 2-byte read returns those bytes of the register (``read(0x01, 1)``
  is 0x56, the "V" of the ID); a narrow read of COUNTER still advances it by
  one;
* a narrow write to SCRATCH replaces only the bytes written;
* a write to DOORBELL appends the written bytes at their position in the
  register, other bytes zero (``write(0x0D, 1, 0x12)`` appends 0x1200);
* an 8-byte access at 0x00 or 0x08 covers two registers (ID and SCRATCH, or
  COUNTER and DOORBELL), as a 64-bit load on a bus of 32-bit registers would.

Bytes past ``TESTDEV_SIZE`` (an access straddling the end) read 0 and are
dropped on write.  A size outside 1-8 or an offset outside the device reads
all ones, is not written, and is counted in ``ignored_accesses``.
"""

from __future__ import annotations

from collections import deque
from typing import ClassVar

from kvmpy.records import Record

from .base import U32, access_fits, all_ones, bounded, check_state

TESTDEV_BASE = 0xFEB00000
TESTDEV_SIZE = 0x1000

TESTDEV_ID = 0x504D564B  # b"KVMP" read as a little-endian 32-bit integer

REG_ID = 0x00
REG_SCRATCH = 0x04
REG_COUNTER = 0x08
REG_DOORBELL = 0x0C

DOORBELL_LIMIT = 1024  # doorbell values kept; older ones are dropped (and counted)


class TestDeviceState(Record):
    """The registers and the doorbell ring, oldest value first."""

    __test__: ClassVar[bool] = False  # not a pytest test class
    VERSION: ClassVar[int] = 1
    scratch: int = bounded(0, U32)
    counter: int = bounded(0, U32)
    doorbell: tuple[int, ...] = bounded(0, U32, max_length=DOORBELL_LIMIT)


def _registers(offset: int, size: int) -> list[tuple[int, int, int, int]]:
    """Split an access into ``(register offset, first byte, byte count, shift)`` parts.

    ``first byte`` is the byte index inside the 32-bit register, and ``shift``
    is where that part's bytes sit in the access value, in bits.
    """
    parts = []
    address = offset
    end = offset + size
    while address < end:
        register = address & ~3
        first = address - register
        count = min(4 - first, end - address)
        parts.append((register, first, count, 8 * (address - offset)))
        address += count
    return parts


class TestDevice:
    """The register file described in the module docstring; see there for widths.

    Host entry points (take the device lock): reading ``doorbell``.
    """

    __test__ = False  # a device, not a pytest test class

    def __init__(self) -> None:
        self.scratch = 0
        self.counter = 0
        self._doorbell: deque[int] = deque(maxlen=DOORBELL_LIMIT)
        self.doorbell_dropped = 0
        self.ignored_accesses = 0

    @property
    def doorbell(self) -> list[int]:
        """The last :data:`DOORBELL_LIMIT` values written to DOORBELL, oldest first."""
        return list(self._doorbell)

    def read(self, offset: int, size: int) -> int:
        if not access_fits(offset, size, TESTDEV_SIZE):
            self.ignored_accesses += 1
            return all_ones(size)
        value = 0
        for register, first, count, shift in _registers(offset, size):
            word = self._read_register(register)
            part = (word >> (8 * first)) & ((1 << (8 * count)) - 1)
            value |= part << shift
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        if not access_fits(offset, size, TESTDEV_SIZE):
            self.ignored_accesses += 1
            return
        for register, first, count, shift in _registers(offset, size):
            part = (value >> shift) & ((1 << (8 * count)) - 1)
            mask = ((1 << (8 * count)) - 1) << (8 * first)
            self._write_register(register, part << (8 * first), mask)

    def reset(self) -> None:
        self.scratch = 0
        self.counter = 0
        self._doorbell.clear()

    def state(self) -> TestDeviceState:
        return TestDeviceState(self.scratch, self.counter, tuple(self._doorbell))

    def restore(self, state: TestDeviceState) -> None:
        state = check_state("testdev", state, TestDeviceState)
        self.scratch = state.scratch
        self.counter = state.counter
        self._doorbell = deque(state.doorbell, maxlen=DOORBELL_LIMIT)

    def _read_register(self, register: int) -> int:
        if register == REG_ID:
            return TESTDEV_ID
        if register == REG_SCRATCH:
            return self.scratch
        if register == REG_COUNTER:
            value = self.counter
            self.counter = (self.counter + 1) & U32
            return value
        return 0  # DOORBELL, the unused offsets, and anything past the end

    def _write_register(self, register: int, bits: int, mask: int) -> None:
        """Write ``bits`` (already in register position) to the bytes selected by ``mask``."""
        if register == REG_SCRATCH:
            self.scratch = (self.scratch & ~mask) | bits
        elif register == REG_DOORBELL:
            if len(self._doorbell) == DOORBELL_LIMIT:
                self.doorbell_dropped += 1
            self._doorbell.append(bits)
        # ID, COUNTER, unused offsets and bytes past the end ignore writes.
