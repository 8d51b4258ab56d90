"""gdb's software breakpoints: int3 bytes written into guest RAM, and memory as gdb must see it.

gdb never sees the int3s: a read shows the original bytes, and a write
under a breakpoint changes the byte restored on removal, leaving the int3.
Used from the gdb server thread and from vCPU threads; it has its own lock.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

from kvmpy.debug.gdbproto import E_FAULT, TargetError
from kvmpy.memory import GuestMemory, GuestMemoryError
from kvmpy.records import Record
from kvmpy.x86.debugregs import INT3


class _Patched(Record):
    gpa: int
    original: int


class SoftBreakpoints:
    """The int3s in guest RAM, by the linear address gdb gave."""

    def __init__(self, memory: GuestMemory) -> None:
        self._memory = memory
        self._lock = threading.Lock()
        self._patched: dict[int, _Patched] = {}

    def __bool__(self) -> bool:
        return bool(self._patched)

    def __contains__(self, linear: int) -> bool:
        return linear in self._patched

    def insert(self, linear: int, gpa: int | None) -> None:
        """Write an int3 at ``gpa`` (where ``linear`` maps now); E_FAULT if that is not RAM."""
        if gpa is None or not self._memory.contains(gpa):
            raise TargetError(f"{linear:#x} is not mapped to RAM", E_FAULT)
        with self._lock:
            if linear in self._patched:
                return
            self._patched[linear] = _Patched(gpa, self._memory.read_u8(gpa))
            self._memory.write_u8(gpa, INT3)

    def remove(self, linear: int) -> bool:
        """Put the original byte back; False if there was no breakpoint at ``linear``."""
        with self._lock:
            patched = self._patched.pop(linear, None)
            if patched is not None:
                self._memory.write_u8(patched.gpa, patched.original)
        return patched is not None

    def clear(self) -> None:
        """Remove them all (RAM that has gone away is left alone)."""
        with self._lock:
            for patched in self._patched.values():
                with contextlib.suppress(GuestMemoryError, ValueError):
                    self._memory.write_u8(patched.gpa, patched.original)
            self._patched.clear()

    def hide(self, start: int, data: bytes) -> bytes:
        """``data`` read at linear ``start``, with the original bytes in place of the int3s."""
        shown = bytearray(data)
        with self._lock:
            for linear, patched in self._patched.items():
                if start <= linear < start + len(shown):
                    shown[linear - start] = patched.original
        return bytes(shown)

    def write(self, start: int, data: bytes, write: Callable[[bytes], None]) -> None:
        """``write(data)`` at linear ``start``, keeping the int3s and remembering the new bytes."""
        with self._lock:
            buffer = bytearray(data)
            covered = {}
            for linear, patched in self._patched.items():
                if start <= linear < start + len(buffer):
                    covered[linear] = _Patched(patched.gpa, buffer[linear - start])
                    buffer[linear - start] = INT3
            write(bytes(buffer))  # may raise: then nothing changed
            self._patched.update(covered)
