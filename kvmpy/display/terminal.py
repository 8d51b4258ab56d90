"""A live view of the guest's text screen in the terminal.

``TerminalDisplay`` switches a terminal to its alternate screen buffer and,
from a background thread, redraws the rows that changed whenever its
``changed`` callback says so (KVM's dirty log of the VGA window, and the VGA
registers).  The terminal's own cursor stands in for the VGA cursor.  ``stop``
restores the terminal (also at interpreter exit, should ``stop`` be missed)
and prints the final screen where the user can still see it.

When the stream is not a terminal nothing is drawn live: ``stop`` writes
the final screen once, as plain text.
"""

from __future__ import annotations

import atexit
import os
import shutil
import threading
from collections.abc import Callable
from typing import TextIO

from kvmpy.devices.vga import COLUMNS, ROWS
from kvmpy.display.screen import TextScreen

# Escape sequences (xterm and everything since).
ALT_SCREEN_ON = "\x1b[?1049h"
ALT_SCREEN_OFF = "\x1b[?1049l"
CURSOR_HIDE = "\x1b[?25l"
CURSOR_SHOW = "\x1b[?25h"
WRAP_OFF = "\x1b[?7l"  # clip, rather than wrap, rows wider than the terminal
WRAP_ON = "\x1b[?7h"
CLEAR = "\x1b[2J"
RESET = "\x1b[0m"

DEFAULT_INTERVAL = 1 / 30  # seconds between checks for a change


def _wants_truecolor() -> bool:
    return os.environ.get("COLORTERM", "").lower() in ("truecolor", "24bit")


def _goto(row: int, column: int) -> str:
    return f"\x1b[{row + 1};{column + 1}H"


class TerminalDisplay:
    """Draws ``capture()`` on ``stream`` when ``changed()`` says the screen changed.

    ``status`` (optional) returns a line to show under the screen, such as
    the guest's last serial output.  ``live`` defaults to whether the stream
    is a terminal; ``truecolor`` to whether $COLORTERM says it can show 24-bit
    colour (the guest's exact palette) rather than the terminal's 16 colours.
    """

    def __init__(
        self,
        capture: Callable[[], TextScreen],
        changed: Callable[[], bool],
        stream: TextIO,
        *,
        status: Callable[[], str] | None = None,
        live: bool | None = None,
        truecolor: bool | None = None,
        interval: float = DEFAULT_INTERVAL,
    ) -> None:
        self.capture = capture
        self.changed = changed
        self.stream = stream
        self.status = status
        self.live = stream.isatty() if live is None else live
        self.truecolor = _wants_truecolor() if truecolor is None else truecolor
        self.interval = interval
        self.frames = 0  # frames drawn live (for tests and curiosity)
        self.error: BaseException | None = None  # what stopped the drawing thread, if anything
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._terminal_set_up = False
        self._finished = False
        self._screen: TextScreen | None = None
        self._screen_lines: list[str] = []
        self._shown: list[str] = []  # the rows on the terminal now
        self._cursor: tuple[int, int] | None = None
        self._size: tuple[int, int] | None = None
        self._lock = threading.Lock()

    # -- life cycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Take over the terminal and start redrawing (does nothing when not live)."""
        if not self.live or self._thread is not None:
            return
        atexit.register(self._restore_terminal)
        self._write(ALT_SCREEN_ON + CURSOR_HIDE + WRAP_OFF)
        self._terminal_set_up = True
        try:
            self.refresh(force=True)
        except BaseException:
            self._restore_terminal()
            atexit.unregister(self._restore_terminal)
            raise
        self._thread = threading.Thread(target=self._loop, name="kvmpy-display", daemon=True)
        self._thread.start()

    def stop(self, final: TextScreen | None = None) -> None:
        """Stop redrawing, give the terminal back, and print the final screen.

        ``final`` is that screen (default: capture it now).  Safe to call twice.
        """
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._finished:
            return
        self._finished = True
        was_live = self._terminal_set_up
        self._restore_terminal()
        atexit.unregister(self._restore_terminal)
        screen = final or self.capture()
        if was_live:
            self._write(screen.to_ansi(truecolor=self.truecolor))
        else:
            self._write(screen.plain_text())

    def _restore_terminal(self) -> None:
        with self._lock:
            if not self._terminal_set_up:
                return
            self._terminal_set_up = False
            self._write(RESET + WRAP_ON + CURSOR_SHOW + ALT_SCREEN_OFF)

    # -- drawing ---------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while not self._stop.wait(self.interval):
                self.refresh()
        except BaseException as exc:  # a dead terminal or machine: stop drawing, keep running
            self.error = exc

    def refresh(self, *, force: bool = False) -> bool:
        """Redraw the rows that changed since the last frame; True if anything was drawn."""
        size = shutil.get_terminal_size((COLUMNS, ROWS + 1))
        resized = (size.columns, size.lines) != self._size
        self._size = (size.columns, size.lines)
        redraw_all = force or resized or not self._shown
        if self.changed() or redraw_all or self._screen is None:
            self._screen = self.capture()
            self._screen_lines = self._screen.ansi_lines(truecolor=self.truecolor)
        screen = self._screen
        lines = list(self._screen_lines)
        if self.status is not None:
            status = self.status()[:COLUMNS].ljust(COLUMNS)
            lines.append(f"\x1b[0;7m{status}{RESET}")
        visible = min(len(lines), size.lines)
        rows = [
            row
            for row in range(visible)
            if redraw_all or row >= len(self._shown) or self._shown[row] != lines[row]
        ]
        if not rows and screen.cursor == self._cursor:
            return False
        out = [RESET + CLEAR] if redraw_all else []
        out.extend(_goto(row, 0) + lines[row] for row in rows)
        if screen.cursor is not None and screen.cursor[0] < visible:
            out.append(_goto(*screen.cursor) + CURSOR_SHOW)
        else:
            out.append(CURSOR_HIDE)
        with self._lock:
            if not self._terminal_set_up:
                return False
            self._write("".join(out))
        self._shown = lines
        self._cursor = screen.cursor
        self.frames += 1
        return True

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()
