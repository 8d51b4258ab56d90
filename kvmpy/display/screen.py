"""An 80x25 VGA text screen: decoded cells, an RGB picture, ANSI text.

The text buffer holds two bytes a cell, row by row: the CP437 character code,
then the attribute: foreground colour in bits 0-3, background in bits 4-6,
and bit 7 either blink (the default) or the background's intensity bit.
Colours index the 16-colour palette (VGA_PALETTE unless the guest changed
the DAC).

The picture is what a VGA sends to the monitor in this mode: 720x400, cells
of 9x16 pixels; the 9th column is background, except for characters
0xC0-0xDF, whose 8th column is repeated so that box-drawing lines join.
"""

from __future__ import annotations

from typing import NamedTuple

from kvmpy.devices.vga import (
    COLUMNS,
    ROWS,
    TEXT_BYTES,
    VGA_TEXT_BASE,
    VGA_TEXT_WINDOW,
    Vga,
)
from kvmpy.display.font import FONT, GLYPH_HEIGHT
from kvmpy.display.png import encode_png
from kvmpy.memory import GuestMemory
from kvmpy.records import Record, field

RGB = tuple[int, int, int]

CELL_WIDTH = 9
CELL_HEIGHT = GLYPH_HEIGHT
WIDTH = COLUMNS * CELL_WIDTH  # 720
HEIGHT = ROWS * CELL_HEIGHT  # 400

# The colours of BIOS mode 3: black, blue, green, cyan, red, magenta, brown,
# light grey, then their bright versions (dark grey ... white).
VGA_PALETTE: tuple[RGB, ...] = (
    (0x00, 0x00, 0x00), (0x00, 0x00, 0xAA), (0x00, 0xAA, 0x00), (0x00, 0xAA, 0xAA),
    (0xAA, 0x00, 0x00), (0xAA, 0x00, 0xAA), (0xAA, 0x55, 0x00), (0xAA, 0xAA, 0xAA),
    (0x55, 0x55, 0x55), (0x55, 0x55, 0xFF), (0x55, 0xFF, 0x55), (0x55, 0xFF, 0xFF),
    (0xFF, 0x55, 0x55), (0xFF, 0x55, 0xFF), (0xFF, 0xFF, 0x55), (0xFF, 0xFF, 0xFF),
)  # fmt: skip

# Characters 0x00-0x1F and 0x7F drawn as the pictures a VGA shows for them.
_CONTROL_PICTURES = (
    " \u263a\u263b\u2665\u2666\u2663\u2660\u2022\u25d8\u25cb\u25d9\u2642\u2640\u266a\u266b\u263c"
    "\u25ba\u25c4\u2195\u203c\u00b6\u00a7\u25ac\u21a8\u2191\u2193\u2192\u2190\u221f\u2194\u25b2\u25bc"
)
CP437: str = (
    _CONTROL_PICTURES
    + "".join(chr(code) for code in range(0x20, 0x7F))
    + "\u2302"
    + bytes(range(0x80, 0x100)).decode("cp437")
)

# VGA colour numbers have blue in bit 0 and red in bit 2; ANSI's the other way round.
_ANSI_COLOR = (0, 4, 2, 6, 1, 5, 3, 7)
_LINE_GRAPHICS = range(0xC0, 0xE0)


class Cell(NamedTuple):
    """One character cell: CP437 code, colours (0-15) and whether it blinks."""

    char: int
    fg: int
    bg: int
    blink: bool

    @property
    def text(self) -> str:
        return CP437[self.char]


def decode_attribute(attribute: int, blink_enabled: bool = True) -> tuple[int, int, bool]:
    """(foreground, background, blink) of an attribute byte."""
    if blink_enabled:
        return attribute & 0x0F, (attribute >> 4) & 0x07, bool(attribute & 0x80)
    return attribute & 0x0F, attribute >> 4, False


def decode_cells(text: bytes | bytearray, blink_enabled: bool = True) -> list[Cell]:
    """Decode a text buffer (two bytes a cell) into cells, row by row."""
    if len(text) % 2:
        raise ValueError(f"a text buffer has two bytes a cell, not {len(text)} bytes in all")
    return [
        Cell(text[i], *decode_attribute(text[i + 1], blink_enabled)) for i in range(0, len(text), 2)
    ]


class TextScreen(Record):
    """A snapshot of the screen: the 4000-byte text buffer and the display state."""

    text: bytes
    cursor: tuple[int, int] | None = None  # (row, column); None: no cursor shown
    cursor_shape: tuple[int, int] = (13, 14)  # first and last scan line
    palette: tuple[RGB, ...] = VGA_PALETTE
    blink_enabled: bool = True
    line_graphics: bool = True
    _cells: list[Cell] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.text) != TEXT_BYTES:
            raise ValueError(f"an 80x25 text buffer is {TEXT_BYTES} bytes, not {len(self.text)}")
        if len(self.palette) != 16:
            raise ValueError(f"the palette needs 16 colours, not {len(self.palette)}")
        object.__setattr__(self, "_cells", decode_cells(self.text, self.blink_enabled))

    @classmethod
    def capture(cls, memory: GuestMemory, vga: Vga | None = None) -> TextScreen:
        """The screen as a VGA in mode 3 would show it now (without ``vga``: the defaults)."""
        vga = vga or Vga()
        start = 2 * vga.start_address % VGA_TEXT_WINDOW
        if start + TEXT_BYTES <= VGA_TEXT_WINDOW:
            text = memory.read(VGA_TEXT_BASE + start, TEXT_BYTES)
        else:  # the display wraps around the end of video memory
            window = memory.read(VGA_TEXT_BASE, VGA_TEXT_WINDOW)
            text = (window + window)[start : start + TEXT_BYTES]
        return cls(
            text,
            cursor=vga.cursor_position,
            cursor_shape=vga.cursor_shape,
            palette=vga.palette(),
            blink_enabled=vga.blink_enabled,
            line_graphics=vga.line_graphics,
        )

    # -- cells and text --------------------------------------------------------------------

    @property
    def cells(self) -> list[Cell]:
        return self._cells

    def cell(self, row: int, column: int) -> Cell:
        if not (0 <= row < ROWS and 0 <= column < COLUMNS):
            raise IndexError(f"no cell at row {row}, column {column} on an 80x25 screen")
        return self._cells[row * COLUMNS + column]

    def lines(self) -> list[str]:
        """The characters of each row as Unicode, trailing blanks kept."""
        return [
            "".join(CP437[cell.char] for cell in self._cells[row * COLUMNS : (row + 1) * COLUMNS])
            for row in range(ROWS)
        ]

    def plain_text(self) -> str:
        """The screen as plain text, without trailing blanks or blank rows at the end."""
        return "\n".join(line.rstrip(" \u00a0") for line in self.lines()).rstrip("\n") + "\n"

    # -- the picture -----------------------------------------------------------------------

    def to_rgb(self, *, blink_on: bool = True, show_cursor: bool = True) -> bytes:
        """The 720x400 picture, 3 bytes a pixel, row by row.

        ``blink_on``: blinking characters are shown (True) or hidden (the
        other half of the blink cycle).  The cursor is drawn in its cell's
        foreground colour over the scan lines of ``cursor_shape``.
        """
        colors = [bytes(rgb) for rgb in self.palette]
        # (char, fg, bg) -> the cell's 16 pixel rows, 27 bytes each
        cache: dict[tuple[int, int, int], list[bytes]] = {}
        row_cells: list[list[bytes]] = []
        for cell in self._cells:
            fg = cell.bg if cell.blink and not blink_on else cell.fg
            key = (cell.char, fg, cell.bg)
            rows = cache.get(key)
            if rows is None:
                rows = cache[key] = self._cell_pixels(cell.char, colors[fg], colors[cell.bg])
            row_cells.append(rows)
        if show_cursor and self.cursor is not None:
            row, column = self.cursor
            index = row * COLUMNS + column
            first, last = self.cursor_shape
            if first <= last and first < CELL_HEIGHT:
                rows = list(row_cells[index])
                bar = colors[self._cells[index].fg] * CELL_WIDTH
                for line in range(first, min(last, CELL_HEIGHT - 1) + 1):
                    rows[line] = bar
                row_cells[index] = rows
        out = []
        for row in range(ROWS):
            cells = row_cells[row * COLUMNS : (row + 1) * COLUMNS]
            for line in range(CELL_HEIGHT):
                out.append(b"".join(pixels[line] for pixels in cells))
        return b"".join(out)

    def _cell_pixels(self, char: int, fg: bytes, bg: bytes) -> list[bytes]:
        ninth = self.line_graphics and char in _LINE_GRAPHICS
        rows = []
        for bits in FONT[char]:
            pixels = [fg if bits & (0x80 >> x) else bg for x in range(8)]
            pixels.append(fg if ninth and bits & 1 else bg)
            rows.append(b"".join(pixels))
        return rows

    def to_png(self, *, blink_on: bool = True, show_cursor: bool = True) -> bytes:
        return encode_png(WIDTH, HEIGHT, self.to_rgb(blink_on=blink_on, show_cursor=show_cursor))

    # -- ANSI terminal text ----------------------------------------------------------------

    def ansi_lines(self, *, truecolor: bool = False) -> list[str]:
        """Each row as Unicode text with SGR colour escapes, ending in a reset.

        16-colour escapes by default (the terminal's own palette); with
        ``truecolor``, 24-bit escapes in this screen's exact palette.
        """
        lines = []
        for row in range(ROWS):
            parts = []
            current: tuple[int, int, bool] | None = None
            for cell in self._cells[row * COLUMNS : (row + 1) * COLUMNS]:
                style = (cell.fg, cell.bg, cell.blink)
                if style != current:
                    parts.append(self._sgr(*style, truecolor=truecolor))
                    current = style
                parts.append(CP437[cell.char])
            parts.append("\x1b[0m")
            lines.append("".join(parts))
        return lines

    def _sgr(self, fg: int, bg: int, blink: bool, *, truecolor: bool) -> str:
        codes = ["0"]
        if blink:
            codes.append("5")
        if truecolor:
            codes.append("38;2;{};{};{}".format(*self.palette[fg]))
            codes.append("48;2;{};{};{}".format(*self.palette[bg]))
        else:
            codes.append(str((90 if fg & 8 else 30) + _ANSI_COLOR[fg & 7]))
            codes.append(str((100 if bg & 8 else 40) + _ANSI_COLOR[bg & 7]))
        return f"\x1b[{';'.join(codes)}m"

    def to_ansi(self, *, truecolor: bool = False) -> str:
        """The whole screen for a terminal: 25 lines of ``ansi_lines``."""
        return "\n".join(self.ansi_lines(truecolor=truecolor)) + "\n"
