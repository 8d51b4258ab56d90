"""The VGA's I/O registers, as far as an 80x25 colour text mode needs them.

The text itself is plain RAM at 0xB8000 (two bytes a cell: the CP437 code,
then the attribute); the machine maps it and kvmpy.display renders it.  This
device is the register file at ports 0x3C0-0x3DF that a kernel programs:

=======  ======================================================================
0x3C0    attribute controller: index and data, alternating (a flip-flop that
         a read of 0x3DA resets to "index"); 0x3C1 reads the data back
0x3C2    misc output (write; read back at 0x3CC); reads give input status 0
0x3C4/5  sequencer index/data
0x3C6    DAC pel mask; 0x3C7 DAC read index (reads: DAC state);
0x3C8    DAC write index; 0x3C9 DAC data, three 6-bit components an entry
0x3CE/F  graphics controller index/data
0x3D4/5  CRTC index/data: cursor shape (0x0A/0x0B), display start
         (0x0C/0x0D), cursor location (0x0E/0x0F)
0x3DA    input status 1 (read: retrace bits, toggling so that wait-for-retrace
         loops end); feature control (write)
=======  ======================================================================

Registers start with the values BIOS mode 3 leaves.  Ports nothing here
models read as 0xFF and ignore writes.  Wider accesses are split into bytes
at consecutive ports, so ``outw(0x3D4, index | value << 8)`` works as on a PC.
The monochrome aliases (0x3B4/0x3B5/0x3BA) are not mapped: the misc output
register says the colour ports are in use, as after mode 3.  An access
outside the 32 ports or wider than 8 bytes reads all ones, is not written
and is counted in ``ignored_accesses``.
"""

from __future__ import annotations

from typing import ClassVar

from kvmpy.records import Record

from .base import U8, U64, access_fits, all_ones, boolean, bounded, check_state

VGA_PORT_BASE = 0x3C0
VGA_PORTS = 0x20
CRTC_INDEX_PORT = 0x3D4
CRTC_DATA_PORT = 0x3D5

# The colour text buffer: 32 KiB of RAM from 0xB8000 (text mode uses 4000 bytes of it).
VGA_TEXT_BASE = 0xB8000
VGA_TEXT_WINDOW = 0x8000
COLUMNS = 80
ROWS = 25
TEXT_BYTES = COLUMNS * ROWS * 2

# CRTC registers.
CRTC_CURSOR_START = 0x0A
CRTC_CURSOR_END = 0x0B
CRTC_START_HIGH = 0x0C
CRTC_START_LOW = 0x0D
CRTC_CURSOR_HIGH = 0x0E
CRTC_CURSOR_LOW = 0x0F
CRTC_VRETRACE_END = 0x11
CURSOR_DISABLE = 0x20
CRTC_PROTECT = 0x80  # in register 0x11: registers 0-7 are read-only

# Attribute controller registers.
ATTR_MODE = 0x10
ATTR_LINE_GRAPHICS = 0x04  # in ATTR_MODE: 9th column copies the 8th for 0xC0-0xDF
ATTR_BLINK = 0x08  # in ATTR_MODE: attribute bit 7 blinks (else: bright background)
ATTR_P54S = 0x80  # in ATTR_MODE: palette bits 5-4 come from the colour select register
ATTR_COLOR_SELECT = 0x14
ATTR_PAS = 0x20  # in the index: palette address source (0 blanks the screen)

# Input status 1 bits.
STATUS_DISPLAY_DISABLED = 0x01
STATUS_VRETRACE = 0x08

# Mode 3 (80x25, 16 colours, 9x16 cells) as the BIOS sets it up.
_MODE3_CRTC = bytes.fromhex(
    "5f 4f 50 82 55 81 bf 1f 00 4f 0d 0e 00 00 00 00 9c 8e 8f 28 1f 96 b9 a3 ff"
)
_MODE3_SEQUENCER = bytes.fromhex("03 00 03 00 02")
_MODE3_GRAPHICS = bytes.fromhex("00 00 00 00 00 10 0e 00 ff")
# Palette registers 0-15, then mode control, overscan, plane enable, panning, colour select.
_MODE3_ATTRIBUTE = bytes.fromhex("00 01 02 03 04 05 14 07 38 39 3a 3b 3c 3d 3e 3f 0c 00 0f 08 00")
_MODE3_MISC_OUTPUT = 0x67


RGB = tuple[int, int, int]


def _ega_color(index: int) -> RGB:
    """The 6-bit DAC entry for an EGA-style colour number (bits: B G R b g r)."""

    # Bits 0-2 give 2/3 of blue, green and red; bits 3-5 add the other 1/3.
    def level(bit: int) -> int:
        return 0x2A * (index >> bit & 1) + 0x15 * (index >> (bit + 3) & 1)

    return level(2), level(1), level(0)


# The DAC as BIOS mode 3 leaves it, computed once: every machine starts from it.
_MODE3_DAC: tuple[RGB, ...] = tuple(_ega_color(i & 0x3F) for i in range(256))
DAC_ENTRIES = 256
DAC_LEVEL = 0x3F  # the DAC's components have 6 bits


class VgaState(Record):
    """Every register, the DAC (red, green, blue per entry, entry by entry) and its latches."""

    VERSION: ClassVar[int] = 1
    crtc: bytes = bounded(0, U8, length=len(_MODE3_CRTC))
    crtc_index: int = bounded(0, U8)
    sequencer: bytes = bounded(0, U8, length=len(_MODE3_SEQUENCER))
    sequencer_index: int = bounded(0, U8)
    graphics: bytes = bounded(0, U8, length=len(_MODE3_GRAPHICS))
    graphics_index: int = bounded(0, U8)
    attribute: bytes = bounded(0, U8, length=len(_MODE3_ATTRIBUTE))
    attribute_index: int = bounded(0, 0x3F)
    attribute_flip_flop: bool = boolean()
    misc_output: int = bounded(0, U8)
    feature_control: int = bounded(0, U8)
    vga_enable: int = bounded(0, 1)
    dac: bytes = bounded(0, DAC_LEVEL, length=3 * DAC_ENTRIES)
    dac_mask: int = bounded(0, U8)
    dac_write_index: int = bounded(0, U8)
    dac_read_index: int = bounded(0, U8)
    dac_reading: bool = boolean()
    dac_latch: tuple[int, ...] = bounded(0, DAC_LEVEL, max_length=2)
    dac_read_component: int = bounded(0, 2)
    status_reads: int = bounded(0, U64)


class Vga:
    """The VGA register file at 0x3C0-0x3DF (map it with ``VGA_PORTS`` ports).

    Host entry points (take the device lock): what a display reads, the
    properties from ``cursor_offset`` on, :meth:`palette` and ``generation``.
    """

    def __init__(self) -> None:
        self.ignored_accesses = 0
        # Bumped by every register write: a display redraws when it changes.
        self.generation = 0
        self._power_on()

    def _power_on(self) -> None:
        self.crtc = bytearray(_MODE3_CRTC)
        self.crtc_index = 0
        self.sequencer = bytearray(_MODE3_SEQUENCER)
        self.sequencer_index = 0
        self.graphics = bytearray(_MODE3_GRAPHICS)
        self.graphics_index = 0
        self.attribute = bytearray(_MODE3_ATTRIBUTE)
        self.attribute_index = ATTR_PAS
        self.attribute_flip_flop = False  # False: the next 0x3C0 write is an index
        self.misc_output = _MODE3_MISC_OUTPUT
        self.feature_control = 0
        self.vga_enable = 1
        self.dac: list[RGB] = list(_MODE3_DAC)
        self.dac_mask = 0xFF
        self.dac_write_index = 0
        self.dac_read_index = 0
        self.dac_reading = False
        self._dac_latch: list[int] = []
        self._dac_read_component = 0
        self._status_reads = 0

    def reset(self) -> None:
        """Back to the registers BIOS mode 3 leaves."""
        self._power_on()
        self.generation += 1

    def state(self) -> VgaState:
        return VgaState(
            crtc=bytes(self.crtc),
            crtc_index=self.crtc_index,
            sequencer=bytes(self.sequencer),
            sequencer_index=self.sequencer_index,
            graphics=bytes(self.graphics),
            graphics_index=self.graphics_index,
            attribute=bytes(self.attribute),
            attribute_index=self.attribute_index,
            attribute_flip_flop=self.attribute_flip_flop,
            misc_output=self.misc_output,
            feature_control=self.feature_control,
            vga_enable=self.vga_enable,
            dac=bytes(level for entry in self.dac for level in entry),
            dac_mask=self.dac_mask,
            dac_write_index=self.dac_write_index,
            dac_read_index=self.dac_read_index,
            dac_reading=self.dac_reading,
            dac_latch=tuple(self._dac_latch),
            dac_read_component=self._dac_read_component,
            status_reads=self._status_reads,
        )

    def restore(self, state: VgaState) -> None:
        state = check_state("vga", state, VgaState)
        self.crtc[:] = state.crtc
        self.crtc_index = state.crtc_index
        self.sequencer[:] = state.sequencer
        self.sequencer_index = state.sequencer_index
        self.graphics[:] = state.graphics
        self.graphics_index = state.graphics_index
        self.attribute[:] = state.attribute
        self.attribute_index = state.attribute_index
        self.attribute_flip_flop = state.attribute_flip_flop
        self.misc_output = state.misc_output
        self.feature_control = state.feature_control
        self.vga_enable = state.vga_enable
        dac = state.dac
        self.dac = [(dac[i], dac[i + 1], dac[i + 2]) for i in range(0, len(dac), 3)]
        self.dac_mask = state.dac_mask
        self.dac_write_index = state.dac_write_index
        self.dac_read_index = state.dac_read_index
        self.dac_reading = state.dac_reading
        self._dac_latch = list(state.dac_latch)
        self._dac_read_component = state.dac_read_component
        self._status_reads = state.status_reads
        self.generation += 1

    # -- port access -------------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        if not access_fits(offset, size, VGA_PORTS):
            self.ignored_accesses += 1
            return all_ones(size)
        value = 0
        for i in range(size):
            value |= self._read_byte(offset + i) << (8 * i)
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        if not access_fits(offset, size, VGA_PORTS):
            self.ignored_accesses += 1
            return
        for i in range(size):
            self._write_byte(offset + i, (value >> (8 * i)) & 0xFF)
        self.generation += 1

    def _read_byte(self, offset: int) -> int:
        port = VGA_PORT_BASE + offset
        if port == 0x3C0:
            return self.attribute_index
        if port == 0x3C1:
            return self._indexed(self.attribute, self.attribute_index & 0x1F)
        if port == 0x3C2:
            return 0x00  # input status 0: no switch sense, no pending vertical interrupt
        if port == 0x3C3:
            return self.vga_enable
        if port == 0x3C4:
            return self.sequencer_index
        if port == 0x3C5:
            return self._indexed(self.sequencer, self.sequencer_index)
        if port == 0x3C6:
            return self.dac_mask
        if port == 0x3C7:
            return 0x03 if self.dac_reading else 0x00
        if port == 0x3C8:
            return self.dac_write_index
        if port == 0x3C9:
            return self._dac_read()
        if port == 0x3CA:
            return self.feature_control
        if port == 0x3CC:
            return self.misc_output
        if port == 0x3CE:
            return self.graphics_index
        if port == 0x3CF:
            return self._indexed(self.graphics, self.graphics_index)
        if port == CRTC_INDEX_PORT:
            return self.crtc_index
        if port == CRTC_DATA_PORT:
            return self._indexed(self.crtc, self.crtc_index)
        if port == 0x3DA:
            return self._input_status_1()
        return 0xFF

    def _write_byte(self, offset: int, value: int) -> None:
        port = VGA_PORT_BASE + offset
        if port == 0x3C0:
            if self.attribute_flip_flop:
                index = self.attribute_index & 0x1F
                if index < len(self.attribute):
                    self.attribute[index] = value
            else:
                self.attribute_index = value & 0x3F
            self.attribute_flip_flop = not self.attribute_flip_flop
        elif port == 0x3C2:
            self.misc_output = value
        elif port == 0x3C3:
            self.vga_enable = value & 1
        elif port == 0x3C4:
            self.sequencer_index = value
        elif port == 0x3C5:
            self._set_indexed(self.sequencer, self.sequencer_index, value)
        elif port == 0x3C6:
            self.dac_mask = value
        elif port == 0x3C7:
            self.dac_read_index = value
            self.dac_reading = True
            self._dac_read_component = 0
        elif port == 0x3C8:
            self.dac_write_index = value
            self.dac_reading = False
            self._dac_latch.clear()
        elif port == 0x3C9:
            self._dac_write(value)
        elif port == 0x3CE:
            self.graphics_index = value
        elif port == 0x3CF:
            self._set_indexed(self.graphics, self.graphics_index, value)
        elif port == CRTC_INDEX_PORT:
            self.crtc_index = value
        elif port == CRTC_DATA_PORT:
            self._crtc_write(self.crtc_index, value)
        elif port == 0x3DA:
            self.feature_control = value

    @staticmethod
    def _indexed(registers: bytearray, index: int) -> int:
        return registers[index] if index < len(registers) else 0xFF

    @staticmethod
    def _set_indexed(registers: bytearray, index: int, value: int) -> None:
        if index < len(registers):
            registers[index] = value

    def _crtc_write(self, index: int, value: int) -> None:
        if index >= len(self.crtc):
            return
        if self.crtc[CRTC_VRETRACE_END] & CRTC_PROTECT and index <= 7:
            if index != 7:
                return
            # Register 7 stays writable in its line-compare bit (bit 4) only.
            value = (self.crtc[7] & ~0x10) | (value & 0x10)
        self.crtc[index] = value

    def _input_status_1(self) -> int:
        # Reading it resets the attribute flip-flop, as on the real card.
        self.attribute_flip_flop = False
        # No real timing: alternate between "displaying" and "in vertical
        # retrace", so both halves of a wait-for-retrace loop finish at once.
        self._status_reads = (self._status_reads + 1) & U64
        if self._status_reads & 1:
            return STATUS_VRETRACE | STATUS_DISPLAY_DISABLED
        return 0x00

    def _dac_write(self, value: int) -> None:
        self._dac_latch.append(value & 0x3F)
        if len(self._dac_latch) == 3:
            red, green, blue = self._dac_latch
            self.dac[self.dac_write_index] = (red, green, blue)
            self.dac_write_index = (self.dac_write_index + 1) & 0xFF
            self._dac_latch.clear()

    def _dac_read(self) -> int:
        value = self.dac[self.dac_read_index][self._dac_read_component]
        self._dac_read_component += 1
        if self._dac_read_component == 3:
            self._dac_read_component = 0
            self.dac_read_index = (self.dac_read_index + 1) & 0xFF
        return value

    # -- what a display needs ------------------------------------------------------------

    @property
    def cursor_offset(self) -> int:
        """The cursor location register: a cell index into video memory."""
        return (self.crtc[CRTC_CURSOR_HIGH] << 8) | self.crtc[CRTC_CURSOR_LOW]

    @property
    def start_address(self) -> int:
        """The cell shown at the top left (CRTC 0x0C/0x0D), in cells from 0xB8000."""
        return (self.crtc[CRTC_START_HIGH] << 8) | self.crtc[CRTC_START_LOW]

    @property
    def cursor_shape(self) -> tuple[int, int]:
        """The first and last scan lines of the cursor within a cell (0-31)."""
        return self.crtc[CRTC_CURSOR_START] & 0x1F, self.crtc[CRTC_CURSOR_END] & 0x1F

    @property
    def cursor_enabled(self) -> bool:
        return not self.crtc[CRTC_CURSOR_START] & CURSOR_DISABLE

    @property
    def cursor_position(self) -> tuple[int, int] | None:
        """(row, column) of the cursor on screen, or None when it is off or off screen."""
        cell = self.cursor_offset - self.start_address
        if not self.cursor_enabled or not 0 <= cell < COLUMNS * ROWS:
            return None
        return divmod(cell, COLUMNS)

    @property
    def blink_enabled(self) -> bool:
        """Attribute bit 7 means blink (True, the default) or a bright background."""
        return bool(self.attribute[ATTR_MODE] & ATTR_BLINK)

    @property
    def line_graphics(self) -> bool:
        """Characters 0xC0-0xDF repeat their 8th column in the 9th."""
        return bool(self.attribute[ATTR_MODE] & ATTR_LINE_GRAPHICS)

    def palette(self) -> tuple[RGB, ...]:
        """The 16 text colours as 8-bit RGB, through the attribute palette and the DAC."""
        mode = self.attribute[ATTR_MODE]
        select = self.attribute[ATTR_COLOR_SELECT]
        colors: list[RGB] = []
        for color in range(16):
            entry = self.attribute[color] & 0x3F
            if mode & ATTR_P54S:
                entry = (entry & 0x0F) | (select & 0x03) << 4
            index = ((select & 0x0C) << 4 | entry) & self.dac_mask
            red, green, blue = self.dac[index]
            colors.append((_scale(red), _scale(green), _scale(blue)))
        return tuple(colors)


def _scale(level: int) -> int:
    """A 6-bit DAC level as 8 bits (0x2A -> 0xAA, 0x3F -> 0xFF)."""
    return (level * 255 + 31) // 63
