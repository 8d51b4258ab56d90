"""QEMU's ``isa-debugcon`` (``-debugcon``): Bochs' port 0xe9 console.

Kernels and firmware written for QEMU print through it before they have a
serial driver: each byte written to port 0xe9 goes to the host, as is.  A
read returns 0xe9, which is how a guest tells that the port is there (an
absent port reads 0xff).  Only the first byte of an access counts: QEMU
splits a wider one into bytes, and the rest fall past its one-port range.

On kvmpy's PC it is there only when the front end asks (``--debugcon``,
QEMU's ``-debugcon``), as on QEMU's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from kvmpy.devices.base import Stateless, access_fits, all_ones

DEBUGCON_PORT = 0xE9
DEBUGCON_PORTS = 1
READBACK = 0xE9
# One bytes object per value, made once: a write hands one over without allocating.
_BYTES = tuple(bytes((value,)) for value in range(256))


class DebugCon(Stateless):
    """Writes go to ``output`` a byte at a time; reads give 0xe9.  No state.

    Host entry points: ``set_output``, before the run or holding the device lock.
    """

    HOST_ENTRY_POINTS: ClassVar[tuple[str, ...]] = ("set_output",)

    def __init__(self, output: Callable[[bytes], None] | None = None) -> None:
        self._output = output
        self.ignored_accesses = 0

    def set_output(self, output: Callable[[bytes], None] | None) -> None:
        """Send the guest's bytes to ``output`` from now on (None: drop them)."""
        self._output = output

    def read(self, offset: int, size: int) -> int:
        if not access_fits(offset, size, DEBUGCON_PORTS):
            self.ignored_accesses += 1
            return all_ones(size)
        return all_ones(size) & ~0xFF | READBACK

    def write(self, offset: int, size: int, value: int) -> None:
        if not access_fits(offset, size, DEBUGCON_PORTS):
            self.ignored_accesses += 1
            return
        if self._output is not None:
            self._output(_BYTES[value & 0xFF])
