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
from _thread import LockType
from collections import Counter
from collections.abc import Callable

from kvmpy.backends.exits import ExitWindow
from kvmpy.devices.base import Device, all_ones
from kvmpy.records import Record

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


class Mapping(Record):
    base: int
    length: int
    device: Device
    name: str
    # The device's one lock: every caller, vCPU or host thread, holds it around a call.
    lock: threading.Lock
    # Whether the vCPU thread is the device's only caller (dispatch skips the lock).
    only_caller: bool = False

    @property
    def end(self) -> int:
        return self.base + self.length


PAGE_SHIFT = 12
# A mapping of up to this many pages is indexed page by page (``pages``);
# larger ones (a framebuffer of GiBs, say) are found by binary search.
MAX_INDEXED_PAGES = 1 << 16


class _Unclaimed:
    """What an unclaimed port dispatches to once touched: all-ones, dropped, counted.

    So the run loop handles a port nobody claims as it handles one a device
    claims (one dict lookup, one call), instead of searching the ranges and
    building a counter key on every access.
    """

    def __init__(self) -> None:
        self.reads = 0
        self.writes = 0

    def read(self, offset: int, size: int) -> int:
        self.reads += 1
        return (1 << (size << 3)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes += 1


class _UnclaimedPage:
    """What a 4 KiB MMIO page no device touches dispatches to: all-ones, dropped, counted."""

    def __init__(self, base: int) -> None:
        self.base = base
        self.reads: dict[int, int] = {}  # offset -> count
        self.writes: dict[int, int] = {}

    def read(self, offset: int, size: int) -> int:
        reads = self.reads
        reads[offset] = reads.get(offset, 0) + 1
        return (1 << (size << 3)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        writes = self.writes
        writes[offset] = writes.get(offset, 0) + 1


class Bus:
    """A set of non-overlapping ranges, each owned by one device.

    ``name`` is "port" or "mmio" (used in messages).  Port buses keep
    ``handlers``, a dict from every claimed port to its device's bound read and
    write methods, the range base and the device's lock, so the run loop
    dispatches with one hash lookup; a port nobody claims gets a counting
    stub there on its first access (unless the bus is strict).  MMIO buses
    keep ``pages``, a dict from each 4 KiB page that one mapping covers
    alone to (read, write, base, end, lock), so the run loop dispatches MMIO
    with one lookup too; anything else binary-searches the range starts.

    Devices take no locks of their own: the bus holds the device's lock
    (given at registration, one per device even when it spans several
    ranges) around every read and write, and host threads take the same lock.
    Dispatch skips it for a device whose only caller is the vCPU thread
    (``only_caller``); with ``one_vcpu`` (a machine of one vCPU: nothing but
    its thread dispatches) the unclaimed stubs skip theirs too.
    """

    def __init__(
        self, name: str, address_limit: int, *, strict: bool = False, one_vcpu: bool = False
    ) -> None:
        self.name = name
        self.address_limit = address_limit
        self.strict = strict
        # (range starts, mappings), sorted, replaced whole on every change so
        # that a vCPU thread searching it never sees a half-updated pair.
        self._table: tuple[list[int], list[Mapping]] = ([], [])
        # Serialises register/unregister (a guest moving a PCI BAR on one vCPU
        # while another does the same); lookups take no lock.
        self._layout_lock = threading.Lock()
        self._dense = name == "port"
        self.handlers: dict[int, tuple[ReadHandler, WriteHandler, int, LockType | None]] = {}
        # page -> (read, write, base, end, the lock dispatch takes, or None)
        self.pages: dict[int, tuple[ReadHandler, WriteHandler, int, int, LockType | None]] = {}
        self._shared_pages: set[int] = set()  # pages two mappings touch: not in ``pages``
        # (kind, address) -> count of accesses nobody handled, but for the
        # unclaimed ports' stubs (``unhandled`` adds them up).
        self._misses: Counter[tuple[str, int]] = Counter()
        self._unclaimed: dict[int, _Unclaimed] = {}
        self._unclaimed_pages: dict[int, _UnclaimedPage] = {}
        # What dispatch to an unclaimed stub holds: nothing if one vCPU is all that calls.
        self._unclaimed_lock: LockType | None = None if one_vcpu else threading.Lock()
        # Called, under the layout lock, after every change of the ranges (publish_windows).
        self._layout_listeners: list[Callable[[list[ExitWindow]], object]] = []
        # Unclaimed accesses counted elsewhere (a backend answering windows itself).
        self._miss_sources: list[Callable[[], Counter[tuple[str, int]]]] = []

    @property
    def mappings(self) -> list[Mapping]:
        """Every registered range, sorted by base (a snapshot: do not change it)."""
        return self._table[1]

    @property
    def _starts(self) -> list[int]:
        return self._table[0]

    @property
    def unhandled(self) -> Counter[tuple[str, int]]:
        """(kind, address) -> how many accesses nobody handled."""
        counts = Counter(self._misses)
        for source in self._miss_sources:
            counts.update(source())
        for port, stub in self._unclaimed.items():
            if stub.reads:
                counts[("read", port)] += stub.reads
            if stub.writes:
                counts[("write", port)] += stub.writes
        for page in self._unclaimed_pages.values():
            for kind, tally in (("read", page.reads), ("write", page.writes)):
                for offset, count in tally.items():
                    counts[(kind, page.base + offset)] += count
        return counts

    def register(
        self,
        base: int,
        length: int,
        device: Device,
        name: str | None = None,
        lock: LockType | None = None,  # threading.Lock is a function before 3.13
        *,
        only_caller: bool = False,
    ) -> None:
        """Give ``device`` the range; ``lock`` is its lock (a new one if not shared).

        ``only_caller``: the vCPU thread is the device's only caller (one vCPU,
        and the device has no host entry points), so the run loop's dispatch,
        port or MMIO, skips the lock; it stays in the mapping for anyone else.
        """
        label = name or type(device).__name__
        lock = lock or threading.Lock()
        if length <= 0 or base < 0 or base + length > self.address_limit:
            raise BusError(f"{label}: {self.name} range {base:#x}+{length:#x} is out of bounds")
        with self._layout_lock:
            starts, mappings = self._table
            for other in mappings:
                if base < other.end and other.base < base + length:
                    raise BusError(
                        f"{label}: {self.name} range {base:#x}-{base + length - 1:#x} overlaps "
                        f"{other.name} at {other.base:#x}-{other.end - 1:#x}"
                    )
            mapping = Mapping(base, length, device, label, lock, only_caller)
            index = bisect.bisect(starts, base)
            self._table = (
                [*starts[:index], base, *starts[index:]],
                [*mappings[:index], mapping, *mappings[index:]],
            )
            if self._dense:
                handler = (device.read, device.write, base, None if only_caller else lock)
                for address in range(base, base + length):
                    self.handlers[address] = handler
            else:
                self._index_pages(mapping)
            self._layout_changed()

    def unregister(self, base: int, device: Device) -> None:
        """Take back the range at ``base`` that ``device`` was given (a PCI BAR moving).

        Accesses to it are unclaimed again.  BusError if ``device`` has no range there.
        """
        with self._layout_lock:
            starts, mappings = self._table
            index = bisect.bisect_left(starts, base)
            if (
                index == len(starts)
                or starts[index] != base
                or mappings[index].device is not device
            ):
                raise BusError(f"{self.name} range at {base:#x} is not {type(device).__name__}'s")
            mapping = mappings[index]
            self._table = (
                starts[:index] + starts[index + 1 :],
                mappings[:index] + mappings[index + 1 :],
            )
            if self._dense:
                for address in range(mapping.base, mapping.end):
                    stub = self._unclaimed.get(address)
                    if stub is None:
                        self.handlers.pop(address, None)
                    else:  # a port touched while unclaimed before: its stub again
                        self.handlers[address] = (
                            stub.read,
                            stub.write,
                            address,
                            self._unclaimed_lock,
                        )
                self._layout_changed()
                return
            first = mapping.base >> PAGE_SHIFT
            last = (mapping.end - 1) >> PAGE_SHIFT
            # A huge mapping indexed no pages, and can share only its edge pages.
            span = range(first, last + 1) if last - first < MAX_INDEXED_PAGES else (first, last)
            for page in span:
                self.pages.pop(page, None)
                self._shared_pages.discard(page)
            # The neighbours that shared a page with it may now own it alone.
            for other in self._table[1]:
                if other.base >> PAGE_SHIFT <= last and first <= (other.end - 1) >> PAGE_SHIFT:
                    self._index_pages(other)
            self._layout_changed()

    def windows(self) -> list[ExitWindow]:
        """The ranges a backend may answer without the run loop, sorted by base.

        Each mapping whose device is plain memory (``window_memory``, see
        kvmpy.devices.base) and, unless the bus is strict, every gap no
        mapping claims, which reads all-ones and is counted as here.
        """
        windows = []
        at = 0
        for mapping in self.mappings:
            if mapping.base > at and not self.strict:
                windows.append(ExitWindow(at, mapping.base - at))
            memory = getattr(mapping.device, "window_memory", None)
            if isinstance(memory, bytearray) and len(memory) >= mapping.length:
                windows.append(ExitWindow(mapping.base, mapping.length, memory))
            at = mapping.end
        if at < self.address_limit and not self.strict:
            windows.append(ExitWindow(at, self.address_limit - at))
        return windows

    def publish_windows(
        self,
        publish: Callable[[list[ExitWindow]], object],
        misses: Callable[[], Counter[tuple[str, int]]],
    ) -> None:
        """Give ``publish`` the windows now and after every change of the ranges, and
        count the unclaimed accesses ``misses`` reports as this bus's own."""
        with self._layout_lock:
            self._layout_listeners.append(publish)
            self._miss_sources.append(misses)
            publish(self.windows())

    def _layout_changed(self) -> None:
        if self._layout_listeners:
            windows = self.windows()
            for publish in self._layout_listeners:
                publish(windows)

    def _index_pages(self, mapping: Mapping) -> None:
        first = mapping.base >> PAGE_SHIFT
        last = (mapping.end - 1) >> PAGE_SHIFT
        if last - first >= MAX_INDEXED_PAGES:
            for page in [page for page in self.pages if first <= page <= last]:
                del self.pages[page]  # unclaimed-page stubs it now claims
            return
        lock = None if mapping.only_caller else mapping.lock
        entry = (mapping.device.read, mapping.device.write, mapping.base, mapping.end, lock)
        for page in range(first, last + 1):
            start, end = page << PAGE_SHIFT, (page + 1) << PAGE_SHIFT
            shared = page in self._shared_pages or any(
                other is not mapping and other.base < end and start < other.end
                for other in self.mappings
            )
            if shared:  # two devices in one page: found by binary search
                self._shared_pages.add(page)
                self.pages.pop(page, None)
            else:  # the callers check the access lies inside [base, end)
                self.pages[page] = entry

    def find(self, address: int) -> Mapping | None:
        """The mapping that owns ``address``."""
        starts, mappings = self._table
        index = bisect.bisect(starts, address) - 1
        if index >= 0:
            mapping = mappings[index]
            if address < mapping.end:
                return mapping
        return None

    def read(self, address: int, size: int) -> int:
        if self._dense:
            handler = self.handlers.get(address)
            if handler is None:
                if self.strict or not 0 <= address < self.address_limit:
                    return self._unhandled("read", address, size, all_ones(size))
                return self._unclaimed_port(address).read(0, size)
            lock = handler[3]
            if lock is None:  # the device's only caller is the vCPU thread
                return handler[0](address - handler[2], size)
            with lock:
                return handler[0](address - handler[2], size)
        mapping = self.find(address)
        if mapping is None or address + size > mapping.end:
            self._claim_unclaimed_page(address, mapping)
            return self._unhandled("read", address, size, (1 << (8 * size)) - 1)
        with mapping.lock:
            return mapping.device.read(address - mapping.base, size)

    def write(self, address: int, size: int, value: int) -> None:
        if self._dense:
            handler = self.handlers.get(address)
            if handler is None:
                if self.strict or not 0 <= address < self.address_limit:
                    self._unhandled("write", address, size, 0)
                else:
                    self._unclaimed_port(address).write(0, size, value)
                return
            lock = handler[3]
            if lock is None:
                handler[1](address - handler[2], size, value)
                return
            with lock:
                handler[1](address - handler[2], size, value)
            return
        mapping = self.find(address)
        if mapping is None or address + size > mapping.end:
            self._claim_unclaimed_page(address, mapping)
            self._unhandled("write", address, size, 0)
            return
        with mapping.lock:
            mapping.device.write(address - mapping.base, size, value)

    def _unclaimed_port(self, port: int) -> _Unclaimed:
        """The counting stub for ``port``, installed in ``handlers`` (not on a strict bus)."""
        stub = self._unclaimed.get(port)
        if stub is None:
            stub = self._unclaimed[port] = _Unclaimed()
            self.handlers[port] = (stub.read, stub.write, port, self._unclaimed_lock)
        return stub

    def _claim_unclaimed_page(self, address: int, mapping: Mapping | None) -> None:
        """Give an MMIO page no mapping touches a counting stub in ``pages`` (not if strict)."""
        page = address >> PAGE_SHIFT
        if self.strict or mapping is not None or page in self.pages or page in self._shared_pages:
            return
        start, end = page << PAGE_SHIFT, (page + 1) << PAGE_SHIFT
        if end > self.address_limit or any(m.base < end and start < m.end for m in self.mappings):
            return
        stub = self._unclaimed_pages.get(page)  # kept from before a range there went away
        if stub is None:
            stub = self._unclaimed_pages[page] = _UnclaimedPage(start)
        self.pages[page] = (stub.read, stub.write, start, end, self._unclaimed_lock)

    def _unhandled(self, kind: str, address: int, size: int, result: int) -> int:
        self._misses[(kind, address)] += 1
        if self.strict:
            raise UnhandledAccess(self.name, kind, address, size)
        return result


class DeviceSpaces:
    """A device's hold on both buses, for ranges it maps while the guest runs (PCI BARs).

    Every range is registered under the device's own lock, so a guest access
    to it and a guest write that moves it are never in flight together.
    """

    def __init__(self, ports: Bus, mmio: Bus, lock: LockType) -> None:
        self.ports = ports
        self.mmio = mmio
        self.lock = lock

    def register(self, io: bool, base: int, length: int, device: Device, label: str) -> None:
        (self.ports if io else self.mmio).register(base, length, device, label, self.lock)

    def unregister(self, io: bool, base: int, device: Device) -> None:
        (self.ports if io else self.mmio).unregister(base, device)
