"""QEMU's ``isa-debug-exit``: a guest writes a value and the VM ends.

As in QEMU, the process exit status is ``(value << 1) | 1``, so a guest can
never produce status 0 this way (that stays "the VM ran normally").  Mapped at
port 0xf4 with 4 ports, like ``-device isa-debug-exit,iobase=0xf4,iosize=4``,
unless the front end places it elsewhere (QEMU's own default is 0x501, 2 ports).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from .base import Stateless, access_fits, all_ones

DEBUG_EXIT_PORT = 0xF4
DEBUG_EXIT_PORTS = 4
# Where QEMU puts -device isa-debug-exit when the command line does not say.
QEMU_DEFAULT_PORT = 0x501
QEMU_DEFAULT_PORTS = 2


def exit_status(value: int) -> int:
    """The process exit status QEMU gives for a written ``value`` (as seen by a shell)."""
    return ((value << 1) | 1) & 0xFF


class DebugExit(Stateless):
    """Calls ``on_exit(value)`` when the guest writes ``value`` (1 to 8 bytes).

    Reads return 0.  It keeps no state: reset, state and restore do nothing.
    ``on_exit`` runs on the calling thread with the device lock held, so it
    must not call back into this device.
    """

    # Only the guest calls it: no host thread does (see Bus.register, only_caller).
    HOST_ENTRY_POINTS: ClassVar[tuple[str, ...]] = ()

    def __init__(self, on_exit: Callable[[int], None], ports: int = DEBUG_EXIT_PORTS) -> None:
        self.on_exit = on_exit
        self.ports = ports
        self.ignored_accesses = 0

    def read(self, offset: int, size: int) -> int:
        if not access_fits(offset, size, self.ports):
            self.ignored_accesses += 1
            return all_ones(size)
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if not access_fits(offset, size, self.ports):
            self.ignored_accesses += 1
            return
        self.on_exit(value)
