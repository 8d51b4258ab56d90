"""Address buses: map port-I/O or MMIO ranges to devices.

The run loop hands each I/O exit to a bus, and the bus hands it to the device
that owns the address, with the offset into the device's range.  Accesses that
no device claims, and MMIO accesses that run past the end of a device's range
(an 8-byte read that KVM split at a page boundary, say), read as all-ones and
are dropped on write, like an ISA bus with nothing answering; they are
counted, and with ``strict`` they raise ``UnhandledAccess`` so a test can fail
on them.
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from kvmpy.devices.base import Device

ReadHandler = Callable[[int, int], int]
WriteHandler = Callable[[int, int, int], None]


class BusError(ValueError):
    """A device range that cannot be registered."""


class UnhandledAccess(Exception):
    """A guest access that no device claims, on a strict bus."""

    def __init__(self, bus: str, kind: str, address: int, size: int) -> None:
        super().__init__(f"unhandled {bus} {kind} at {address:#x} (size {size})")
        self.bus = bus
        self.kind = kind
        self.address = address
        self.size = size


@dataclass(frozen=True)
class Mapping:
    base: int
    length: int
    device: Device
    name: str
    # The device's one lock: every caller, vCPU or host thread, holds it around a call.
    lock: threading.Lock

    @property
    def end(self) -> int:
        return self.base + self.length


class Bus:
    """A set of non-overlapping ranges, each owned by one device.

    ``name`` is "port" or "mmio" (used in messages).  Port buses keep
    ``handlers``, a dict from every claimed port to its device's bound read and
    write methods, the range base and the device's lock, so the run loop
    dispatches with one hash lookup; MMIO buses, whose ranges can be large,
    binary-search the range starts.

    Devices take no locks of their own: the bus holds the device's lock
    (given at registration, one per device even when it spans several
    ranges) around every read and write, and host threads take the same lock.
    """

    def __init__(self, name: str, address_limit: int, *, strict: bool = False) -> None:
        self.name = name
        self.address_limit = address_limit
        self.strict = strict
        self.mappings: list[Mapping] = []
        self._starts: list[int] = []
        self._dense = name == "port"
        self.handlers: dict[int, tuple[ReadHandler, WriteHandler, int, threading.Lock]] = {}
        # (kind, address) -> count of accesses nobody handled.
        self.unhandled: Counter[tuple[str, int]] = Counter()

    def register(
        self,
        base: int,
        length: int,
        device: Device,
        name: str | None = None,
        lock: threading.Lock | None = None,
    ) -> None:
        """Give ``device`` the range; ``lock`` is its lock (a new one if not shared)."""
        label = name or type(device).__name__
        lock = lock or threading.Lock()
        if length <= 0 or base < 0 or base + length > self.address_limit:
            raise BusError(f"{label}: {self.name} range {base:#x}+{length:#x} is out of bounds")
        for other in self.mappings:
            if base < other.end and other.base < base + length:
                raise BusError(
                    f"{label}: {self.name} range {base:#x}-{base + length - 1:#x} overlaps "
                    f"{other.name} at {other.base:#x}-{other.end - 1:#x}"
                )
        mapping = Mapping(base, length, device, label, lock)
        index = bisect.bisect(self._starts, base)
        self._starts.insert(index, base)
        self.mappings.insert(index, mapping)
        if self._dense:
            for address in range(base, base + length):
                self.handlers[address] = (device.read, device.write, base, lock)

    def find(self, address: int) -> Mapping | None:
        """The mapping that owns ``address``."""
        index = bisect.bisect(self._starts, address) - 1
        if index >= 0:
            mapping = self.mappings[index]
            if address < mapping.end:
                return mapping
        return None

    def read(self, address: int, size: int) -> int:
        mapping = self.find(address)
        if mapping is None or (not self._dense and address + size > mapping.end):
            return self._unhandled("read", address, size, (1 << (8 * size)) - 1)
        with mapping.lock:
            return mapping.device.read(address - mapping.base, size)

    def write(self, address: int, size: int, value: int) -> None:
        mapping = self.find(address)
        if mapping is None or (not self._dense and address + size > mapping.end):
            self._unhandled("write", address, size, 0)
            return
        with mapping.lock:
            mapping.device.write(address - mapping.base, size, value)

    def _unhandled(self, kind: str, address: int, size: int, result: int) -> int:
        self.unhandled[(kind, address)] += 1
        if self.strict:
            raise UnhandledAccess(self.name, kind, address, size)
        return result
