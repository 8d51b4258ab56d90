"""QEMU's ``isa-debug-exit``: a guest writes a value and the VM ends.

As in QEMU, the process exit status is ``(value << 1) | 1``, so a guest can
never produce status 0 this way (that stays "the VM ran normally").  Mapped at
port 0xf4 with 4 ports, like ``-device isa-debug-exit,iobase=0xf4,iosize=4``.
"""

from __future__ import annotations

from collections.abc import Callable

DEBUG_EXIT_PORT = 0xF4
DEBUG_EXIT_PORTS = 4


def exit_status(value: int) -> int:
    """The process exit status QEMU gives for a written ``value`` (as seen by a shell)."""
    return ((value << 1) | 1) & 0xFF


class DebugExit:
    """Calls ``on_exit(value)`` when the guest writes ``value`` (1, 2 or 4 bytes)."""

    def __init__(self, on_exit: Callable[[int], None]) -> None:
        self.on_exit = on_exit

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.on_exit(value)
