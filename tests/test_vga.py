"""VGA text mode: the register file, cell decoding, the font, PNG and ANSI output,
the terminal display, and a guest that paints the screen under KVM."""

from __future__ import annotations

import io
import re
import struct
import subprocess
import sys
import threading
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import cast

import pytest

from kvmpy.backends.base import BackendError as KvmError
from kvmpy.devices.vga import (
    CRTC_DATA_PORT,
    CRTC_INDEX_PORT,
    TEXT_BYTES,
    VGA_PORT_BASE,
    VGA_PORTS,
    VGA_TEXT_BASE,
    VGA_TEXT_WINDOW,
    Vga,
)
from kvmpy.display import DisplaySession, open_display, save_screenshot
from kvmpy.display.font import FONT, GLYPH_HEIGHT
from kvmpy.display.png import PNG_SIGNATURE, encode_png
from kvmpy.display.screen import (
    CELL_HEIGHT,
    CELL_WIDTH,
    CP437,
    HEIGHT,
    VGA_PALETTE,
    WIDTH,
    Cell,
    TextScreen,
    decode_attribute,
    decode_cells,
)
from kvmpy.display.terminal import ALT_SCREEN_OFF, ALT_SCREEN_ON, TerminalDisplay
from kvmpy.loaders.flat import load_flat
from kvmpy.machine import Machine
from kvmpy.memory import GuestMemory
from tests.helpers import ROOT, Assembler, guest

RGB = tuple[int, int, int]


def port(number: int) -> int:
    """The device offset of an I/O port."""
    return number - VGA_PORT_BASE


def crtc_write(vga: Vga, index: int, value: int) -> None:
    vga.write(port(CRTC_INDEX_PORT), 1, index)
    vga.write(port(CRTC_DATA_PORT), 1, value)


def crtc_read(vga: Vga, index: int) -> int:
    vga.write(port(CRTC_INDEX_PORT), 1, index)
    return vga.read(port(CRTC_DATA_PORT), 1)


# -- the register file -------------------------------------------------------------------


def test_vga_starts_in_mode_3() -> None:
    vga = Vga()
    assert vga.cursor_offset == 0 and vga.start_address == 0
    assert vga.cursor_position == (0, 0)
    assert vga.cursor_shape == (13, 14) and vga.cursor_enabled
    assert vga.blink_enabled and vga.line_graphics
    assert vga.read(port(0x3CC), 1) == 0x67  # misc output: colour ports, 28 MHz clock
    assert vga.palette() == VGA_PALETTE


def test_crtc_cursor_location_registers() -> None:
    vga = Vga()
    crtc_write(vga, 0x0E, 0x07)
    crtc_write(vga, 0x0F, 0xCF)  # 0x7CF = 1999: the last cell
    assert vga.cursor_offset == 1999
    assert vga.cursor_position == (24, 79)
    assert crtc_read(vga, 0x0E) == 0x07 and crtc_read(vga, 0x0F) == 0xCF
    assert vga.read(port(CRTC_INDEX_PORT), 1) == 0x0F  # the index reads back
    crtc_write(vga, 0x0F, 0xD0)  # 2000: below the screen
    assert vga.cursor_offset == 2000 and vga.cursor_position is None


def test_crtc_word_write_sends_index_then_value() -> None:
    vga = Vga()
    vga.write(port(CRTC_INDEX_PORT), 2, 0x05 << 8 | 0x0E)  # outw(0x3D4, 0x050E)
    vga.write(port(CRTC_INDEX_PORT), 2, 0x1A << 8 | 0x0F)
    assert vga.cursor_offset == 0x051A
    assert vga.cursor_position == divmod(0x051A, 80)
    assert vga.read(port(CRTC_INDEX_PORT), 2) == 0x1A << 8 | 0x0F


def test_cursor_shape_disable_and_start_address() -> None:
    vga = Vga()
    crtc_write(vga, 0x0A, 0x06)
    crtc_write(vga, 0x0B, 0x0F)
    assert vga.cursor_shape == (6, 15) and vga.cursor_enabled
    crtc_write(vga, 0x0A, 0x20 | 0x06)  # bit 5: cursor off
    assert not vga.cursor_enabled and vga.cursor_position is None
    assert vga.cursor_shape == (6, 15)
    crtc_write(vga, 0x0A, 0x06)
    crtc_write(vga, 0x0F, 100)
    crtc_write(vga, 0x0D, 80)  # the display starts one row further on
    assert vga.start_address == 80
    assert vga.cursor_position == (0, 20)


def test_crtc_protect_bit_guards_registers_0_to_7() -> None:
    vga = Vga()
    before = crtc_read(vga, 0x01)
    crtc_write(vga, 0x01, 0x27)
    assert crtc_read(vga, 0x01) == before  # mode 3 sets the protect bit in register 0x11
    crtc_write(vga, 0x11, crtc_read(vga, 0x11) & 0x7F)
    crtc_write(vga, 0x01, 0x27)
    assert crtc_read(vga, 0x01) == 0x27


def test_unknown_registers_and_ports_are_harmless() -> None:
    vga = Vga()
    crtc_write(vga, 0x40, 0x12)  # no such CRTC register
    assert crtc_read(vga, 0x40) == 0xFF
    for offset in range(VGA_PORTS):
        for size in (1, 2):
            vga.write(offset, size, 0)
            assert 0 <= vga.read(offset, size) < 1 << (8 * size)
    assert Vga().read(port(0x3D0), 1) == 0xFF  # not modelled


def test_attribute_controller_flip_flop() -> None:
    vga = Vga()
    vga.read(port(0x3DA), 1)  # reset the flip-flop to "index"
    vga.write(port(0x3C0), 1, 0x20 | 0x10)  # index 0x10 (mode control), PAS kept
    vga.write(port(0x3C0), 1, 0x04)  # data: line graphics on, blink off
    assert not vga.blink_enabled and vga.line_graphics
    assert vga.read(port(0x3C0), 1) == 0x30
    assert vga.read(port(0x3C1), 1) == 0x04
    # The next write is an index again; reading 0x3DA resets it halfway too.
    vga.write(port(0x3C0), 1, 0x20 | 0x10)
    vga.read(port(0x3DA), 1)
    vga.write(port(0x3C0), 1, 0x20 | 0x10)
    vga.write(port(0x3C0), 1, 0x0C)
    assert vga.blink_enabled


def test_input_status_toggles_retrace_so_wait_loops_end() -> None:
    vga = Vga()
    reads = [vga.read(port(0x3DA), 1) & 0x08 for _ in range(4)]
    assert 0 in reads and 0x08 in reads
    assert reads[0] != reads[1]


def test_dac_changes_the_palette() -> None:
    vga = Vga()
    vga.write(port(0x3C8), 1, 1)  # DAC entry 1: what colour 1 (blue) uses
    for component in (0x3F, 0x20, 0x00):
        vga.write(port(0x3C9), 1, component)
    assert vga.palette()[1] == (255, 130, 0)
    assert vga.palette()[2] == VGA_PALETTE[2]
    vga.write(port(0x3C7), 1, 1)
    assert [vga.read(port(0x3C9), 1) for _ in range(3)] == [0x3F, 0x20, 0x00]
    assert vga.read(port(0x3C7), 1) == 0x03  # DAC in read mode


def test_attribute_palette_registers_pick_dac_entries() -> None:
    vga = Vga()
    vga.read(port(0x3DA), 1)
    vga.write(port(0x3C0), 1, 0x20 | 0x01)  # palette register 1
    vga.write(port(0x3C0), 1, 0x3F)  # -> DAC entry 63, white
    assert vga.palette()[1] == (255, 255, 255)


def test_every_write_bumps_the_generation() -> None:
    vga = Vga()
    before = vga.generation
    crtc_write(vga, 0x0F, 1)
    assert vga.generation == before + 2


# -- cells and palette -------------------------------------------------------------------


def test_decode_attribute() -> None:
    assert decode_attribute(0x1F) == (15, 1, False)
    assert decode_attribute(0x8E) == (14, 0, True)
    assert decode_attribute(0xF0) == (0, 7, True)
    assert decode_attribute(0x8E, blink_enabled=False) == (14, 8, False)
    assert decode_attribute(0xF0, blink_enabled=False) == (0, 15, False)


def test_decode_cells() -> None:
    cells = decode_cells(b"A\x1fB\x8e")
    assert cells == [Cell(0x41, 15, 1, False), Cell(0x42, 14, 0, True)]
    assert cells[0].text == "A"
    with pytest.raises(ValueError, match="two bytes a cell"):
        decode_cells(b"A\x1fB")


def test_palette_is_the_16_vga_colours() -> None:
    assert len(VGA_PALETTE) == 16
    assert VGA_PALETTE[0] == (0, 0, 0)
    assert VGA_PALETTE[1] == (0, 0, 0xAA)  # blue
    assert VGA_PALETTE[6] == (0xAA, 0x55, 0)  # brown, not dark yellow
    assert VGA_PALETTE[7] == (0xAA, 0xAA, 0xAA)
    assert VGA_PALETTE[8] == (0x55, 0x55, 0x55)
    assert VGA_PALETTE[14] == (0xFF, 0xFF, 0x55)
    assert VGA_PALETTE[15] == (0xFF, 0xFF, 0xFF)


def test_cp437_table() -> None:
    assert len(CP437) == 256
    assert CP437[0x41] == "A" and CP437[0x01] == "\u263a" and CP437[0x7F] == "\u2302"
    assert CP437[0xC9] == "\u2554" and CP437[0xDB] == "\u2588" and CP437[0xE1] == "\u00df"


def make_text(cells: dict[tuple[int, int], tuple[int, int]], fill: int = 0x07) -> bytes:
    """A text buffer of blanks in attribute ``fill``, with ``cells[(row, col)] = (char, attr)``."""
    text = bytearray(b" " + bytes([fill])) * (TEXT_BYTES // 2)
    for (row, column), (char, attribute) in cells.items():
        text[2 * (row * 80 + column)] = char
        text[2 * (row * 80 + column) + 1] = attribute
    return bytes(text)


def test_text_screen_cells_and_lines() -> None:
    screen = TextScreen(make_text({(0, 0): (0x41, 0x1F), (24, 79): (0xDB, 0x4E)}))
    assert screen.cell(0, 0) == Cell(0x41, 15, 1, False)
    assert screen.cell(24, 79) == Cell(0xDB, 14, 4, False)
    lines = screen.lines()
    assert len(lines) == 25 and all(len(line) == 80 for line in lines)
    assert lines[0].startswith("A ") and lines[24].endswith("\u2588")
    assert screen.plain_text().startswith("A\n\n")
    with pytest.raises(IndexError):
        screen.cell(25, 0)
    with pytest.raises(ValueError, match="4000 bytes"):
        TextScreen(b"A\x07")


# -- the font ----------------------------------------------------------------------------


def test_font_has_256_glyphs_of_16_rows() -> None:
    assert len(FONT) == 256
    assert all(len(glyph) == GLYPH_HEIGHT == 16 for glyph in FONT)


def test_blank_glyphs() -> None:
    for code in (0x00, 0x20, 0xFF):
        assert FONT[code] == bytes(16), hex(code)


def test_letters_and_digits_are_drawn_in_columns_0_to_6() -> None:
    assert sum(bin(row).count("1") for row in FONT[ord("A")]) > 20
    glyphs = [chr(c) for c in range(0x21, 0x7F)]
    assert len({FONT[ord(ch)] for ch in glyphs}) == len(glyphs)  # all different
    for ch in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789":
        rows = FONT[ord(ch)]
        assert any(rows), ch
        assert not any(row & 1 for row in rows), f"{ch} uses column 7"
        assert not any(rows[:2]), f"{ch} reaches into rows 0-1"
    # Capitals stand on the baseline (row 11); descenders go below it.
    assert FONT[ord("H")][11] and not FONT[ord("H")][12]
    assert FONT[ord("g")][13] and FONT[ord("p")][13]


def test_box_drawing_lines_reach_the_cell_edges() -> None:
    horizontal, vertical, cross = FONT[0xC4], FONT[0xB3], FONT[0xC5]
    assert horizontal[7] == 0xFF and sum(horizontal) == 0xFF
    assert all(row == vertical[0] != 0 for row in vertical)
    assert cross[7] == 0xFF and cross[0] == cross[15] == vertical[0]
    double = FONT[0xCD]  # two horizontal lines
    assert [row for row in double if row] == [0xFF, 0xFF]
    corner = FONT[0xC9]  # a double-line top-left corner: open to the right and down
    assert corner[15] and corner[6] & 1 and not corner[0]


def test_blocks_and_shades() -> None:
    assert FONT[0xDB] == b"\xff" * 16
    assert FONT[0xDC] == bytes(8) + b"\xff" * 8
    assert FONT[0xDF] == b"\xff" * 8 + bytes(8)
    assert FONT[0xDD] == b"\xf0" * 16 and FONT[0xDE] == b"\x0f" * 16

    def lit(code: int) -> int:
        return sum(bin(row).count("1") for row in FONT[code])

    assert lit(0xB0) < lit(0xB1) < lit(0xB2) < lit(0xDB)


# -- PNG ---------------------------------------------------------------------------------


def parse_png(data: bytes) -> tuple[int, int, bytes]:
    """Decode an 8-bit RGB, non-interlaced PNG that uses filter 0: (width, height, pixels)."""
    assert data[:8] == PNG_SIGNATURE
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, kind
        chunks.append((kind, body))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    width, height, depth, color_type, compression, filtering, interlace = struct.unpack(
        ">IIBBBBB", chunks[0][1]
    )
    assert (depth, color_type, compression, filtering, interlace) == (8, 2, 0, 0, 0)
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    stride = width * 3
    assert len(raw) == height * (stride + 1)
    rows = []
    for y in range(height):
        line = raw[y * (stride + 1) : (y + 1) * (stride + 1)]
        assert line[0] == 0, "filter type 0 (none) on every row"
        rows.append(line[1:])
    return width, height, b"".join(rows)


class Picture:
    def __init__(self, png: bytes) -> None:
        self.width, self.height, self.rgb = parse_png(png)

    def pixel(self, x: int, y: int) -> RGB:
        i = (y * self.width + x) * 3
        return self.rgb[i], self.rgb[i + 1], self.rgb[i + 2]

    def cell_pixel(self, row: int, column: int, x: int, y: int) -> RGB:
        """Pixel (x, y) inside the 9x16 cell at (row, column)."""
        return self.pixel(column * CELL_WIDTH + x, row * CELL_HEIGHT + y)


def first_lit_pixel(code: int) -> tuple[int, int]:
    """(x, y) of the first lit pixel of a glyph, scanning rows from the top."""
    for y, row in enumerate(FONT[code]):
        for x in range(8):
            if row & (0x80 >> x):
                return x, y
    raise AssertionError(f"glyph {code:#x} is blank")


def test_encode_png_structure() -> None:
    rgb = bytes([255, 0, 0, 0, 255, 0, 0, 0, 255, 1, 2, 3])
    assert parse_png(encode_png(2, 2, rgb)) == (2, 2, rgb)
    with pytest.raises(ValueError, match="needs 12 bytes"):
        encode_png(2, 2, rgb[:-1])
    with pytest.raises(ValueError, match="positive"):
        encode_png(0, 2, b"")


def test_screen_png_pixels() -> None:
    screen = TextScreen(
        make_text(
            {
                (0, 0): (ord("A"), 0x1F),  # white on blue
                (3, 10): (0xC4, 0x4E),  # single horizontal line, yellow on red
                (3, 11): (ord("-"), 0x4E),  # a line that is not line-graphics
                (5, 5): (ord("B"), 0x8A),  # blinking light green on black
                (24, 79): (0xDB, 0x0C),  # full block, light red
            }
        ),
        cursor=(10, 40),
        cursor_shape=(14, 15),
    )
    picture = Picture(screen.to_png())
    assert (picture.width, picture.height) == (WIDTH, HEIGHT) == (720, 400)
    blue, white = VGA_PALETTE[1], VGA_PALETTE[15]
    assert picture.cell_pixel(0, 0, 0, 0) == blue  # row 0 of 'A' is blank
    assert picture.cell_pixel(0, 0, 8, 5) == blue  # the 9th column is background
    assert picture.cell_pixel(0, 0, *first_lit_pixel(ord("A"))) == white
    assert picture.cell_pixel(0, 1, 3, 8) == VGA_PALETTE[0]  # a blank: black background
    # Line graphics (0xC0-0xDF) repeat the 8th column in the 9th; others do not.
    yellow, red = VGA_PALETTE[14], VGA_PALETTE[4]
    assert picture.cell_pixel(3, 10, 8, 7) == yellow
    assert picture.cell_pixel(3, 11, 8, 7) == red
    assert all(picture.cell_pixel(24, 79, x, y) == VGA_PALETTE[12] for x in (0, 8) for y in (0, 15))
    # The cursor: scan lines 14-15 of its cell, in the cell's foreground colour.
    grey = VGA_PALETTE[7]
    assert picture.cell_pixel(10, 40, 4, 14) == picture.cell_pixel(10, 40, 8, 15) == grey
    assert picture.cell_pixel(10, 40, 4, 13) == VGA_PALETTE[0]
    # Blinking text shows in the "on" phase and disappears in the "off" phase.
    lit = first_lit_pixel(ord("B"))
    assert picture.cell_pixel(5, 5, *lit) == VGA_PALETTE[10]
    hidden = Picture(screen.to_png(blink_on=False, show_cursor=False))
    assert hidden.cell_pixel(5, 5, *lit) == VGA_PALETTE[0]
    assert hidden.cell_pixel(10, 40, 4, 14) == VGA_PALETTE[0]


def test_screen_png_uses_the_screens_palette() -> None:
    palette = (*VGA_PALETTE[:1], (1, 2, 3), *VGA_PALETTE[2:])
    screen = TextScreen(make_text({(1, 1): (ord(" "), 0x10)}), palette=palette)
    assert Picture(screen.to_png()).cell_pixel(1, 1, 4, 4) == (1, 2, 3)


def test_bright_backgrounds_without_blink() -> None:
    screen = TextScreen(make_text({(2, 2): (ord(" "), 0xE0)}), blink_enabled=False)
    assert screen.cell(2, 2) == Cell(0x20, 0, 14, False)
    assert Picture(screen.to_png()).cell_pixel(2, 2, 4, 4) == VGA_PALETTE[14]


# -- ANSI --------------------------------------------------------------------------------

SGR = re.compile(r"\x1b\[[0-9;]*m")


def test_ansi_rendering() -> None:
    screen = TextScreen(make_text({(0, 0): (ord("A"), 0x1F), (0, 1): (0xC9, 0x8E)}))
    lines = screen.ansi_lines()
    assert len(lines) == 25
    # white (15 -> bright 97) on blue (VGA 1 -> ANSI 4), then blinking yellow on black
    assert lines[0].startswith("\x1b[0;97;44mA\x1b[0;5;93;40m\u2554\x1b[0;37;40m ")
    assert lines[0].endswith("\x1b[0m")
    assert [SGR.sub("", line) for line in lines] == screen.lines()
    red_on_cyan = TextScreen(make_text({}, fill=0x34)).ansi_lines()[3]
    assert red_on_cyan.startswith("\x1b[0;31;46m" + " " * 80)
    true = screen.to_ansi(truecolor=True)
    assert "\x1b[0;38;2;255;255;255;48;2;0;0;170mA" in true
    assert true.count("\n") == 25


# -- the terminal display ----------------------------------------------------------------


@pytest.fixture
def terminal_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    monkeypatch.setenv("LINES", "40")


def test_terminal_not_a_tty_prints_the_final_screen_once() -> None:
    screen = TextScreen(make_text({(0, 0): (ord("H"), 0x07), (0, 1): (ord("i"), 0x07)}))
    out = io.StringIO()
    display = TerminalDisplay(lambda: screen, lambda: True, out)
    assert not display.live
    display.start()
    assert out.getvalue() == ""
    display.stop()
    display.stop()
    assert out.getvalue() == "Hi\n"


@pytest.mark.usefixtures("terminal_size")
def test_terminal_live_redraws_changed_rows_and_restores() -> None:
    text = bytearray(make_text({}))
    changed = [True]
    out = io.StringIO()
    display = TerminalDisplay(
        lambda: TextScreen(bytes(text), cursor=(3, 4)),
        lambda: changed[0],
        out,
        live=True,
        truecolor=False,
        interval=3600,  # no redraws from the thread: the test calls refresh()
    )
    display.start()
    first = out.getvalue()
    assert first.startswith(ALT_SCREEN_ON)
    assert "\x1b[4;5H\x1b[?25h" in first  # the terminal cursor stands in for the VGA's
    changed[0] = False
    assert display.refresh() is False
    text[2 * (7 * 80)] = ord("Z")
    changed[0] = True
    mark = len(out.getvalue())
    assert display.refresh() is True
    update = out.getvalue()[mark:]
    assert update.startswith("\x1b[8;1H") and "Z" in update
    assert update.count("\x1b[") < 10  # one row, not the whole screen
    display.stop()
    tail = out.getvalue()
    assert ALT_SCREEN_OFF in tail
    assert tail.rstrip("\n").endswith("\x1b[0m")  # the final frame, on the normal screen
    assert display.error is None


class FakeMachine:
    """What a DisplaySession uses of a Machine, without KVM."""

    def __init__(self) -> None:
        self.memory = GuestMemory.with_ram(1 << 20)
        self.vga = Vga()
        self.printed: list[bytes] = []
        self.serial_output = self.printed.append
        self.dirty = True

        self.listeners: list[Callable[[bytes], None]] = []
        self.held: bytearray | None = None
        self.lock = threading.Lock()

    def screen_dirty(self) -> bool:
        dirty, self.dirty = self.dirty, False
        return dirty

    def device_lock(self, name: str) -> threading.Lock:
        return self.lock

    def hold_output(self) -> None:
        self.held = bytearray()

    def release_output(self) -> None:
        held, self.held = self.held, None
        if held:
            self.serial_output(bytes(held))

    def add_console_listener(self, listener: Callable[[bytes], None]) -> None:
        self.listeners.append(listener)

    def remove_console_listener(self, listener: Callable[[bytes], None]) -> None:
        self.listeners.remove(listener)

    def guest_writes(self, data: bytes) -> None:
        """What Machine does with the UART's output."""
        for listener in self.listeners:
            listener(data)
        if self.held is not None:
            self.held += data
        else:
            self.serial_output(data)


@pytest.mark.usefixtures("terminal_size")
def test_display_session_holds_serial_output_while_live(tmp_path: Path) -> None:
    fake = FakeMachine()
    fake.memory.write(VGA_TEXT_BASE, b"O\x0aK\x0a")
    out = io.StringIO()
    shot = tmp_path / "screen.png"
    session = DisplaySession(cast(Machine, fake), "term", shot, stream=out, live=True)
    session.start()
    fake.guest_writes(b"booting\nhalf a li")
    assert fake.printed == []
    assert session.status_line() == " COM1: half a li"
    fake.guest_writes(b"ne\n")
    assert session.status_line() == " COM1: half a line"
    final = session.finish()
    assert fake.printed == [b"booting\nhalf a line\n"]
    assert fake.serial_output == fake.printed.append
    assert final.lines()[0].startswith("OK")
    picture = Picture(shot.read_bytes())
    assert picture.cell_pixel(0, 0, *first_lit_pixel(ord("O"))) == VGA_PALETTE[10]
    assert session.finish() is final
    fake.memory.close()


def test_display_session_without_live_view(tmp_path: Path) -> None:
    fake = FakeMachine()
    shot = tmp_path / "screen.png"
    with open_display(cast(Machine, fake), None, shot) as session:
        fake.memory.write(VGA_TEXT_BASE + 160, b"x\x07")
    assert session.terminal is None
    assert session.finish().lines()[1].startswith("x")
    assert shot.read_bytes().startswith(PNG_SIGNATURE)
    with pytest.raises(ValueError, match="unknown display"):
        open_display(cast(Machine, fake), "sdl", None)
    unwritable = open_display(cast(Machine, fake), None, tmp_path / "no" / "such" / "dir.png")
    with pytest.raises(ValueError, match=r"cannot write the screenshot to .*dir\.png"):
        unwritable.finish()
    fake.memory.close()


# -- under KVM ---------------------------------------------------------------------------


@pytest.mark.kvm
def test_vga_colors_guest_screenshot(tmp_path: Path) -> None:
    shot = tmp_path / "vga_colors.png"
    with Machine(mem_size=16 << 20) as m:
        m.load(load_flat(guest("vga_colors"), 0x7C00), mode="real")
        session = open_display(m, None, shot)
        session.start()
        outcome = m.run(timeout=20)
        screen = session.finish()
        assert (outcome.reason, outcome.exit_code) == ("exit", 0)
        assert bytes(m.console) == b"vga_colors: 80x25 screen drawn, cursor at row 22 column 22\n"
        assert m.vga.cursor_position == (22, 22) and m.vga.cursor_shape == (12, 15)
        # The guest's writes are in KVM's dirty log, once.
        assert m.screen_dirty() is True
        assert m.screen_dirty() is False

    assert screen.cursor == (22, 22)
    assert screen.lines()[12].startswith("  \u2551    Hello from VGA text mode!")
    assert screen.cell(22, 40) == Cell(ord("B"), 14, 0, True)
    assert [screen.cell(15 + code // 64, 8 + code % 64).char for code in range(256)] == list(
        range(256)
    )

    picture = Picture(shot.read_bytes())
    palette = VGA_PALETTE
    assert picture.cell_pixel(0, 0, 4, 8) == palette[1]  # title bar: blue
    assert picture.cell_pixel(24, 0, 4, 8) == palette[3]  # status bar: cyan
    # The attribute chart: cell " bf " at row 2 + b, column 8 + 4f.
    for b in range(8):
        for f in range(16):
            row, column = 2 + b, 8 + 4 * f
            assert picture.cell_pixel(row, column, 4, 8) == palette[b], (b, f)
            digit = "0123456789ABCDEF"[f]
            assert picture.cell_pixel(row, column + 2, *first_lit_pixel(ord(digit))) == palette[f]
    # The band of colours: 5 full blocks of colour c from column 5c, 9th column included.
    for c in range(16):
        for x, y in ((0, 0), (4, 8), (8, 15)):
            assert picture.cell_pixel(20, 5 * c + 2, x, y) == palette[c], c
    # The double-line box's top-left corner joins the line to its right (yellow on blue).
    yellow = palette[14]
    assert picture.cell_pixel(11, 2, 8, 6) == yellow and picture.cell_pixel(11, 3, 0, 6) == yellow
    assert picture.cell_pixel(11, 2, 0, 0) == palette[1]
    # The cursor: scan lines 12-15 at (22, 22), in the cell's light grey.
    assert picture.cell_pixel(22, 22, 4, 12) == picture.cell_pixel(22, 22, 4, 15) == palette[7]
    assert picture.cell_pixel(22, 22, 4, 11) == palette[0]


@pytest.mark.kvm
def test_vga_window_is_ram_split_into_its_own_slot(assemble: Assembler, tmp_path: Path) -> None:
    # Writes on both sides of each slot boundary land in the one host mapping.
    image = assemble(
        """
        mov $0xb000, %ax
        mov %ax, %es
        movw $0x1111, %es:0x7ffe    /* 0xB7FFE: below the window */
        movw $0x2222, %es:0x8000    /* 0xB8000: its first cell */
        mov $0xbf00, %ax
        mov %ax, %es
        movw $0x3333, %es:0xffe     /* 0xBFFFE: its last bytes */
        movw $0x4444, %es:0x1000    /* 0xC0000: above it */
        xor %al, %al
        out %al, $0xf4
        """
    )
    with Machine(mem_size=2 << 20) as m:
        assert m.logged_slot is not None
        m.load(load_flat(image, 0x7C00), mode="real")
        m.memory.write(VGA_TEXT_BASE + 2, b"\x55\x55")  # written by kvmpy: not in the log
        assert m.screen_dirty() is False
        outcome = m.run(timeout=10)
        assert (outcome.reason, outcome.exit_code) == ("exit", 0)
        assert m.memory.read_u16(0xB7FFE) == 0x1111
        assert m.memory.read_u16(VGA_TEXT_BASE) == 0x2222
        assert m.memory.read_u16(VGA_TEXT_BASE + VGA_TEXT_WINDOW - 2) == 0x3333
        assert m.memory.read_u16(VGA_TEXT_BASE + VGA_TEXT_WINDOW) == 0x4444
        # The guest wrote the window's first page (bit 0) and its last (bit 7).
        assert m.vm.dirty_pages(m.logged_slot, VGA_TEXT_WINDOW // 0x1000) == b"\x81"
        assert m.vm.dirty_pages(m.logged_slot, VGA_TEXT_WINDOW // 0x1000) == b"\x00"
        screen = save_screenshot(m, tmp_path / "screen.png")
        assert screen.cell(0, 0) == Cell(0x22, 2, 2, False)
        with pytest.raises(KvmError, match="KVM_GET_DIRTY_LOG"):
            m.vm.dirty_pages(0, VGA_TEXT_BASE // 0x1000)  # slot 0 logs nothing


@pytest.mark.kvm
def test_cli_screenshot(tmp_path: Path) -> None:
    shot = tmp_path / "screen.png"
    result = subprocess.run(
        [sys.executable, "-m", "kvmpy", "run", str(guest("vga_colors")), "--screenshot",
         str(shot)],
        capture_output=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", data[16:24]) == (720, 400)
