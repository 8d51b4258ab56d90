"""Ports where a PC has nothing (or nothing kvmpy models) that Linux probes at boot.

Reads float high (all ones), as on an ISA bus with nothing behind the
address, and writes are dropped, so the kernel concludes the hardware is
absent, without each probe counting as an unhandled access (or ending a
``--strict`` run).  Seen in Linux 6.1's boot under kvmpy:

    0x87           DMA page register: read once during early boot
    0x2e8-0x2ef    COM4  \\ the 8250 driver probes the legacy UARTs
    0x3e8-0x3ef    COM3  /

(COM2, also probed, is a real UART on the board; the PCI configuration
ports belong to the PCI host bridge.)
"""

from __future__ import annotations

from typing import ClassVar

from kvmpy.records import Record

from .base import all_ones, check_state

LINUX_PROBED_PORTS: tuple[tuple[int, int, str], ...] = (
    (0x87, 1, "DMA page register"),
    (0x2E8, 8, "COM4 (absent)"),
    (0x3E8, 8, "COM3 (absent)"),
)


class AbsentPortsState(Record):
    """Nothing there has state."""

    VERSION: ClassVar[int] = 1


class AbsentPorts:
    """Nothing there: reads return all ones, writes are dropped.

    ``reads`` and ``writes`` count the probes (host-side statistics, kept
    across reset and restore).
    """

    # Only the guest calls it: no host thread does (see Bus.register, only_caller).
    HOST_ENTRY_POINTS: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        self.reads = 0
        self.writes = 0

    def read(self, offset: int, size: int) -> int:
        self.reads += 1
        return all_ones(size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes += 1

    def reset(self) -> None:
        pass

    def state(self) -> AbsentPortsState:
        return AbsentPortsState()

    def restore(self, state: AbsentPortsState) -> None:
        check_state("absent", state, AbsentPortsState)
