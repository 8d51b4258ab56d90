"""QEMU's ``pc-testdev``: the ISA test device that x86 test kernels expect.

Test kernels written for ``qemu-system-x86_64 -device pc-testdev`` use it to
check the instruction emulator, interrupt delivery and page flushing:

=============== ======= ====================================================
where           width   behaviour
=============== ======= ====================================================
ports 0xe0-0xe3 any     a 32-bit scratch register: an access of ``size``
                        bytes at byte ``offset`` reads or replaces those
                        bytes of it (bytes past 0xe3 are dropped)
ports 0xe4-0xe7 dword   flush: the written value is a guest-physical address;
                        the host drops and re-creates its mapping of that
                        page (content kept), so the guest's next access
                        faults in a fresh translation.  Other widths are
                        ignored, as QEMU ignores them.  Reads 0.
ports 0xe8-0xeb any     the same scratch register, accessed byte by byte
                        (QEMU's ``ioport_byte`` twin: same result, split
                        into byte accesses)
ports 0x2000+n  byte    n < 24: a write sets ISA interrupt line n high (value
                        non-zero) or low (0).  Wider writes are ignored.
                        Reads 0.
MMIO 0xff000000 any     64 KiB of plain memory behind MMIO exits: any size
                        (1-8) at any offset; bytes past the end read 0 and
                        are dropped
=============== ======= ====================================================

The scratch register and the MMIO window are plain memory (``window_memory``
on their parts), so a backend that can (KVM's shim) answers their accesses
without calling into Python, as exit-latency benchmarks want.

The device is sans-IO: the interrupt lines and the page flush are callbacks
the board wires up (``Wiring.irq``, ``Wiring.flush_page``).  Accesses of a
size outside 1-8, or starting outside a part's range, read all ones and are
dropped, counted in ``ignored_accesses``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import ClassVar

from kvmpy.devices.base import (
    MAX_ACCESS_SIZE,
    U8,
    U32,
    IrqCallback,
    access_fits,
    all_ones,
    bounded,
    check_state,
)
from kvmpy.records import Record

SCRATCH_PORT = 0xE0
FLUSH_PORT = 0xE4
SCRATCH_BYTE_PORT = 0xE8
PORT_BLOCK = 4  # each of the three is 4 ports wide
IRQ_PORT_BASE = 0x2000
IRQ_LINES = 24  # ISA IRQs 0-15 and the IOAPIC's pins 16-23
IOMEM_BASE = 0xFF00_0000
IOMEM_SIZE = 0x1_0000
PAGE_MASK = ~0xFFF

_MASK32 = 0xFFFF_FFFF
_FORMATS = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}
_UNPACK = {size: struct.Struct(fmt).unpack_from for size, fmt in _FORMATS.items()}
_PACK = {size: struct.Struct(fmt).pack_into for size, fmt in _FORMATS.items()}


class PcTestDeviceState(Record):
    VERSION: ClassVar[int] = 1
    scratch: int = bounded(0, U32)
    memory: bytes = bounded(0, U8, length=IOMEM_SIZE)
    irq_levels: tuple[bool, ...] = bounded(0, 1, length=IRQ_LINES)


class _Part:
    """One address range of the device: checks the access, then calls the device."""

    def __init__(
        self,
        device: PcTestDevice,
        length: int,
        read: Callable[[int, int], int],
        write: Callable[[int, int, int], None],
        window_memory: bytearray | None = None,
    ) -> None:
        self._device = device
        if window_memory is not None:
            self.window_memory = window_memory
        self._length = length
        self._read = read
        self._write = write

    def read(self, offset: int, size: int) -> int:
        if not access_fits(offset, size, self._length):
            self._device.ignored_accesses += 1
            return all_ones(size)
        return self._read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        if not access_fits(offset, size, self._length):
            self._device.ignored_accesses += 1
            return
        self._write(offset, size, value & all_ones(size))


class _Window:
    """A plain-memory part: the device's own reader and writer, no wrapper, and the bytes."""

    def __init__(
        self,
        read: Callable[[int, int], int],
        write: Callable[[int, int, int], None],
        window_memory: bytearray,
    ) -> None:
        self.read = read
        self.write = write
        self.window_memory = window_memory


class PcTestDevice:
    """The register file in the module docstring; map each part at its range.

    ``irq(n)`` gives ISA line n's callback; ``flush_page(gpa)`` asks the host
    to re-create its mapping of the RAM page at ``gpa`` (page aligned).
    """

    __test__ = False  # a device, not a pytest test class
    # Only the guest calls it: no host thread does (see Bus.register, only_caller).
    HOST_ENTRY_POINTS: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        irq: Callable[[int], IrqCallback],
        flush_page: Callable[[int], None],
    ) -> None:
        self._lines = tuple(irq(line) for line in range(IRQ_LINES))
        self.flush_page = flush_page
        # The scratch register's bytes, little-endian.  Both buffers are changed
        # in place only: a backend may hold their addresses (window_memory).
        self._scratch = bytearray(PORT_BLOCK)
        self.memory = bytearray(IOMEM_SIZE)
        self.irq_levels = [False] * IRQ_LINES
        self.flushes = 0  # how many flush requests arrived (host side, not state)
        self.ignored_accesses = 0
        # The scratch port and the MMIO window are what exit benchmarks time:
        # their parts are the bare reader and writer, which check for themselves.
        self.scratch_port = _Window(self._read_scratch, self._write_scratch, self._scratch)
        self.byte_port = _Part(
            self, PORT_BLOCK, self._read_scratch_bytes, self._write_scratch_bytes, self._scratch
        )
        self.flush_port = _Part(self, PORT_BLOCK, self._read_nothing, self._write_flush)
        self.irq_port = _Part(self, IRQ_LINES, self._read_nothing, self._write_irq)
        self.iomem = _Window(self._read_memory, self._write_memory, self.memory)

    # The Device protocol on the device itself is the scratch register, so
    # that code holding the device (not a part) gets the common register.
    def read(self, offset: int, size: int) -> int:
        return self.scratch_port.read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.scratch_port.write(offset, size, value)

    @property
    def scratch(self) -> int:
        """The scratch register's 32-bit value."""
        return int.from_bytes(self._scratch, "little")

    @scratch.setter
    def scratch(self, value: int) -> None:
        self._scratch[:] = (value & _MASK32).to_bytes(PORT_BLOCK, "little")

    def state(self) -> PcTestDeviceState:
        return PcTestDeviceState(self.scratch, bytes(self.memory), tuple(self.irq_levels))

    def restore(self, state: PcTestDeviceState) -> None:
        checked = check_state("pc_testdev", state, PcTestDeviceState)
        self.scratch = checked.scratch
        self.memory[:] = checked.memory
        # The lines' levels are the irqchip's to restore: only remember them.
        self.irq_levels = list(checked.irq_levels)

    def reset(self) -> None:
        """Power-on state: scratch and memory cleared, every raised line lowered."""
        self.scratch = 0
        self.memory[:] = bytes(IOMEM_SIZE)
        for line, level in enumerate(self.irq_levels):
            if level:
                self._set_line(line, False)

    # -- the scratch register ---------------------------------------------------------

    def _read_scratch(self, offset: int, size: int) -> int:
        if not (0 <= offset < PORT_BLOCK and 0 < size <= MAX_ACCESS_SIZE):
            self.ignored_accesses += 1
            return all_ones(size)
        # Bytes past the register read 0, as plain memory's do (window_memory).
        return int.from_bytes(self._scratch[offset : offset + size], "little")

    def _write_scratch(self, offset: int, size: int, value: int) -> None:
        if not (0 <= offset < PORT_BLOCK and 0 < size <= MAX_ACCESS_SIZE):
            self.ignored_accesses += 1
            return
        data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        end = min(offset + size, PORT_BLOCK)  # bytes past the register are dropped
        self._scratch[offset:end] = data[: end - offset]

    def _read_scratch_bytes(self, offset: int, size: int) -> int:
        value = 0
        for i in range(size):
            if offset + i < PORT_BLOCK:
                value |= self._read_scratch(offset + i, 1) << (8 * i)
        return value

    def _write_scratch_bytes(self, offset: int, size: int, value: int) -> None:
        for i in range(size):
            if offset + i < PORT_BLOCK:
                self._write_scratch(offset + i, 1, (value >> (8 * i)) & 0xFF)

    # -- flush and interrupt lines ----------------------------------------------------

    @staticmethod
    def _read_nothing(offset: int, size: int) -> int:
        return 0

    def _write_flush(self, offset: int, size: int, value: int) -> None:
        if offset != 0 or size != 4:
            return  # QEMU takes dword writes only
        self.flushes += 1
        self.flush_page(value & _MASK32 & PAGE_MASK)

    def _write_irq(self, offset: int, size: int, value: int) -> None:
        if size != 1 or not 0 <= offset < IRQ_LINES:
            return  # QEMU takes byte writes only
        self._set_line(offset, value != 0)

    def _set_line(self, line: int, level: bool) -> None:
        self.irq_levels[line] = level
        self._lines[line](level)

    # -- the MMIO window --------------------------------------------------------------

    def _read_memory(self, offset: int, size: int) -> int:
        # The struct readers are the fast path: this is what MMIO benchmarks time.
        unpack = _UNPACK.get(size)
        if unpack is not None and 0 <= offset <= IOMEM_SIZE - size:
            value: int = unpack(self.memory, offset)[0]
            return value
        if not access_fits(offset, size, IOMEM_SIZE):
            self.ignored_accesses += 1
            return all_ones(size)
        return int.from_bytes(self.memory[offset : offset + size], "little")

    def _write_memory(self, offset: int, size: int, value: int) -> None:
        pack = _PACK.get(size)
        if pack is not None and 0 <= offset <= IOMEM_SIZE - size:
            pack(self.memory, offset, value & ((1 << (8 * size)) - 1))
            return
        if not access_fits(offset, size, IOMEM_SIZE):
            self.ignored_accesses += 1
            return
        data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        end = min(offset + size, IOMEM_SIZE)
        self.memory[offset:end] = data[: end - offset]
