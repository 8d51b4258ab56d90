"""The interface every device implements, and the interrupt callback type."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

# Set an interrupt line high (True) or low (False).  The machine connects it to
# KVM_IRQ_LINE; tests connect it to a list.
IrqCallback = Callable[[bool], None]


def no_irq(level: bool) -> None:
    """Interrupt callback for a device wired to nothing."""


class Device(Protocol):
    """A port-I/O or MMIO device.

    ``offset`` is relative to the base of the range the device is mapped at,
    ``size`` is the access width in bytes (1, 2, 4, or 8 for MMIO) and values
    are little-endian integers of that width.
    """

    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...
