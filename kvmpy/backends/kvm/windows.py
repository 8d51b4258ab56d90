"""Exit windows: port and MMIO ranges the shim answers without returning to Python.

An exit to user space costs this host's kernel about 8 µs; a trip through
Python's run loop and a device method adds about 1 µs more.  For a range
that is plain memory (pc-testdev's scratch register and MMIO window) or
that nothing claims (reads all-ones), the answer needs no device code, so
the shim gives it in C and enters KVM_RUN again, as KVM answers its
in-kernel devices.  Everything else still goes to Python.

``ShimWindows`` owns the tables (``struct kvmshim_windows`` in
csrc/kvmshim.h), shared by the machine's vCPUs.  The buses publish their
windows here when the machine is built and after every change of their
ranges (a PCI BAR moving while vCPUs run), under the shim's sequence lock:
a vCPU that looks while the tables are being rewritten leaves that exit to
Python, which gives the same answer.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

from kvmpy.backends.exits import ExitWindow
from kvmpy.backends.kvm._kvm import ffi, lib

# Windows per bus.  A layout with more (many PCI BARs and gaps between them)
# publishes none for that bus: every access then goes to Python.
CAPACITY = 256

SPACES = ("port", "mmio")
_U32 = 0xFFFF_FFFF  # the sequence wraps, as the C counter does; its parity still tells


class ShimWindows:
    """The windows of one machine, in the form the shim reads them."""

    def __init__(self) -> None:
        self.tables = ffi.new("struct kvmshim_windows *")
        self._arrays = {space: ffi.new("struct kvmshim_window[]", CAPACITY) for space in SPACES}
        self._misses = ffi.new("struct kvmshim_miss[]", lib.KVMSHIM_MISS_SLOTS)
        self.tables.capacity = CAPACITY
        self.tables.ports = self._arrays["port"]
        self.tables.mmio = self._arrays["mmio"]
        self.tables.misses = self._misses
        # id(bytearray) -> (bytearray, its cdata): the shim holds raw pointers,
        # so each buffer is exported once and kept for the machine's life.
        self._buffers: dict[int, tuple[bytearray, Any]] = {}
        self._writer = threading.Lock()  # one rewrite at a time (the buses have a lock each)

    def publish(self, space: str, windows: list[ExitWindow]) -> None:
        """Make ``windows`` (sorted, not overlapping) the ones the shim answers on ``space``."""
        array = self._arrays[space]
        if len(windows) > CAPACITY:
            windows = []
        with self._writer:
            tables = self.tables
            tables.sequence = (tables.sequence + 1) & _U32  # odd: vCPUs leave exits to Python
            for index, window in enumerate(windows):
                entry = array[index]
                entry.base = window.base
                entry.length = window.length
                entry.memory = ffi.NULL if window.memory is None else self._pointer(window.memory)
            if space == "port":
                tables.port_count = len(windows)
            else:
                tables.mmio_count = len(windows)
            tables.sequence = (tables.sequence + 1) & _U32

    def misses(self, space: str) -> Counter[tuple[str, int]]:
        """(kind, address) -> unclaimed accesses on ``space`` the shim answered."""
        want_mmio = space == "mmio"
        counts: Counter[tuple[str, int]] = Counter()
        tag = lib.KVMSHIM_MISS_TAG
        for row in self._misses:
            key = row.key
            if key == 0 or bool(key & 2) != want_mmio:
                continue
            counts[("write" if key & 1 else "read", (key & ~tag) >> 2)] += row.count
        return counts

    def _pointer(self, memory: bytearray) -> Any:
        held = self._buffers.get(id(memory))
        if held is None or held[0] is not memory:
            held = self._buffers[id(memory)] = (memory, ffi.from_buffer("uint8_t[]", memory))
        return held[1]
