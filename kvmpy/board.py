"""How a board is declared: RAM, reserved ranges, devices, firmware tables.

A board (``kvmpy/x86/pc.py`` for the PC) is data: ``Machine`` builds the
buses, the snapshot list, the per-device locks and resets from it, and
knows no board constants of its own.  A new device is one ``DeviceEntry``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from kvmpy.backends.base import IrqRoute
from kvmpy.devices.base import IrqCallback
from kvmpy.records import Record, field

if TYPE_CHECKING:
    from kvmpy.bus import DeviceSpaces


class IoRange(Record):
    """A port or MMIO range a device answers; ``part``: the attribute that serves it."""

    base: int
    length: int
    label: str  # what traces, statistics and errors call it ("COM1", "i8042 data")
    part: str | None = None  # e.g. the i8042's "data_port"; None: the device itself


def _no_flush(gpa: int) -> None:
    """A flush_page for machines whose backend needs none."""


def _no_suspend() -> None:
    """A request_suspend for machines that cannot suspend: the request is ignored."""


class Wiring(Record):
    """What a device factory may connect a device to."""

    irq: Callable[[int], IrqCallback]  # an interrupt line by number (a no-op without irqchip)
    request_reset: Callable[[], None]
    request_power_off: Callable[[], None]
    guest_exit: Callable[[int], None]
    serial_output: Callable[[bytes], None]
    ram_size: int
    low_ram: int  # RAM below the hole
    cpus: int
    cmdline: str
    # Drop and re-create the host mapping of the RAM page at a guest-physical address.
    flush_page: Callable[[int], None] = _no_flush
    # The guest asked for ACPI sleep state S3 (suspend to RAM).
    request_suspend: Callable[[], None] = _no_suspend


class DeviceEntry(Record):
    """One device on the board: its name (also its snapshot key), how to build it, where."""

    name: str
    build: Callable[[Wiring], Any]
    ports: tuple[IoRange, ...] = ()
    mmio: tuple[IoRange, ...] = ()
    # For a device that maps ranges while the guest runs (a PCI host's BARs):
    # called once with the device and its hold on the buses.
    attach: Callable[[Any, DeviceSpaces], None] | None = None


class FirmwareContext(Record):
    """What firmware tables are built from."""

    cpus: int
    cpu_signature: tuple[int, int]  # CPUID leaf 1 EAX, EDX
    has_irqchip: bool
    low_ram: int  # RAM below the hole: where the PCI memory window may start


class FirmwareTable(Record):
    """Data firmware would leave in RAM, at ``address``, reserved up to ``address + size``."""

    name: str
    address: int
    size: int
    build: Callable[[FirmwareContext], bytes]
    needs_irqchip: bool = False


class Board(Record):
    """A whole machine's description."""

    name: str
    ram_layout: Callable[[int], list[tuple[int, int]]]
    devices: tuple[DeviceEntry, ...]
    firmware: tuple[FirmwareTable, ...] = ()
    # (start, end, what) ranges no image may load into, besides the firmware tables.
    reserved: tuple[tuple[int, int, str], ...] = ()
    # Non-RAM pages a backend may use for itself (KVM on Intel: TSS, identity map).
    scratch_base: int = 0
    # A RAM window whose writes are logged (the VGA text screen): (start, end).
    logged_window: tuple[int, int] | None = None
    # Where the ACPI RSDP is when the firmware tables are written (0: none).
    acpi_rsdp: int = 0
    # With the irqchip: which controller pins each GSI drives (empty: the backend's default).
    irq_routes: tuple[IrqRoute, ...] = ()
    port_space: int = 0x10000
    mmio_space: int = 1 << 52
    min_ram: int = 1 << 20
    default_ram: int = 128 << 20
    extra: dict[str, Any] = field(default_factory=dict)
    # Suspend to RAM (ACPI S3).  ``wake(locked)`` is asked, while the machine
    # sleeps, whether a wake event arrived (``locked(name)`` gives a device
    # under its lock); ``resume_setup(memory, reset_sregs)`` says where the
    # boot CPU resumes (a CpuSetup; its memory, which must lie in the board's
    # firmware area, is written first).  None: the board cannot sleep, and a
    # request to is ignored.
    wake: Callable[[Callable[[str], AbstractContextManager[Any]]], bool] | None = None
    resume_setup: Callable[[Any, Any], Any] | None = None

    def reserved_ranges(self) -> list[tuple[int, int, str]]:
        """Every range an image must leave alone: firmware tables and the board's own."""
        tables = [(t.address, t.address + t.size, t.name) for t in self.firmware]
        return [*tables, *self.reserved]

    def entry(self, name: str) -> DeviceEntry:
        for entry in self.devices:
            if entry.name == name:
                return entry
        raise KeyError(name)
