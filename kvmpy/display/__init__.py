"""The guest's VGA text screen: live in a terminal, and as a PNG screenshot.

    from kvmpy.display import open_display

    session = open_display(machine, "term", Path("screen.png"))
    session.start()                   # before the run: takes over the terminal
    try:
        outcome = machine.run(timeout=10)
    finally:
        session.finish()              # after it: final frame, PNG written

``machine.vga`` holds the VGA registers (cursor, palette, ...), the text is
guest RAM at 0xB8000, and ``machine.screen_dirty()`` asks KVM's dirty log
whether the guest wrote it.  ``screenshot(machine)`` is the screen now.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from kvmpy.display.screen import TextScreen
    from kvmpy.display.terminal import TerminalDisplay
    from kvmpy.machine import Machine

# The screen, font and terminal modules load when a display is used, not with
# every `kvmpy run` (start-up time).

DISPLAY_MODES = ("none", "term")


def screenshot(machine: Machine) -> TextScreen:
    """The guest's text screen as it is now."""
    from kvmpy.display.screen import TextScreen

    return TextScreen.capture(machine.memory, machine.vga)


def save_screenshot(machine: Machine, path: str | Path) -> TextScreen:
    """Write the guest's screen to ``path`` as a 720x400 PNG; return the screen."""
    from kvmpy.display.png import write_png
    from kvmpy.display.screen import HEIGHT, WIDTH

    screen = screenshot(machine)
    write_png(path, WIDTH, HEIGHT, screen.to_rgb())
    return screen


def _printable(data: bytes) -> str:
    text = data.decode("utf-8", "replace")
    return "".join(ch if ch.isprintable() else " " for ch in text)


class DisplaySession:
    """The display of one machine for one run: ``start()`` before, ``finish()`` after.

    ``mode`` "term" shows the screen live in the terminal behind ``stream``
    (default: stdout) while the guest runs.  While the live view is up, the
    guest's serial output is held back, its last line shown under the screen,
    and written out after the final frame.  On a stream that is not a
    terminal, nothing is drawn until ``finish`` prints the final screen as
    text.  ``screenshot``: where ``finish`` writes the final screen as a PNG.
    """

    def __init__(
        self,
        machine: Machine,
        mode: str | None = None,
        screenshot: Path | None = None,
        *,
        stream: TextIO | None = None,
        live: bool | None = None,
        interval: float | None = None,
    ) -> None:
        if mode not in (None, *DISPLAY_MODES):
            raise ValueError(f"unknown display {mode!r} (choose from {', '.join(DISPLAY_MODES)})")
        self.machine = machine
        self.mode = mode
        self.screenshot = screenshot
        self.final: TextScreen | None = None
        self._vga_generation = -1
        self._partial = b""  # the serial line being written
        self._last_line = b""  # the last complete one
        self._serial_lock = threading.Lock()
        self._holding = False
        self._started = False
        self._finished = False
        self.terminal: TerminalDisplay | None = None
        if mode == "term":
            from kvmpy.display.terminal import DEFAULT_INTERVAL, TerminalDisplay

            self.terminal = TerminalDisplay(
                self.capture,
                self.changed,
                stream or sys.stdout,
                status=self.status_line,
                live=live,
                interval=DEFAULT_INTERVAL if interval is None else interval,
            )

    def capture(self) -> TextScreen:
        from kvmpy.display.screen import TextScreen

        with self.machine.device_lock("vga"):
            return TextScreen.capture(self.machine.memory, self.machine.vga)

    def changed(self) -> bool:
        """Whether the screen may look different since the last call."""
        dirty = self.machine.screen_dirty()
        with self.machine.device_lock("vga"):
            generation = self.machine.vga.generation
        registers = generation != self._vga_generation
        self._vga_generation = generation
        return dirty or registers

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        if self.terminal is not None and self.terminal.live:
            # Serial output waits while the screen is live, and comes out after it.
            self.machine.hold_output()
            self.machine.add_console_listener(self._track_serial)
            self._holding = True
            self.terminal.start()

    def finish(self) -> TextScreen:
        """End the live view, print the final screen, write the screenshot; return the screen.

        Raises ValueError when the screenshot cannot be written.
        """
        if self._finished:
            assert self.final is not None
            return self.final
        self._finished = True
        self.final = self.capture()
        try:
            if self.terminal is not None:
                self.terminal.stop(self.final)
        finally:
            if self._holding:
                self.machine.remove_console_listener(self._track_serial)
                self.machine.release_output()
        if self.screenshot is not None:
            from kvmpy.display.png import write_png
            from kvmpy.display.screen import HEIGHT, WIDTH

            try:
                write_png(self.screenshot, WIDTH, HEIGHT, self.final.to_rgb())
            except OSError as exc:
                raise ValueError(
                    f"cannot write the screenshot to {self.screenshot}: {exc.strerror}"
                ) from None
        return self.final

    def __enter__(self) -> DisplaySession:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()

    def _track_serial(self, data: bytes) -> None:
        """Console listener: keep the line being written, for the status line."""
        with self._serial_lock:
            *complete, partial = (self._partial + data).split(b"\n")
            if complete:
                self._last_line = complete[-1]
            self._partial = partial[-200:]

    def status_line(self) -> str:
        """The line under the live screen: the guest's serial line in progress, or its last."""
        with self._serial_lock:
            line = self._partial if self._partial.strip() else self._last_line
        return f" COM1: {_printable(line).strip()}" if line else " COM1: (no output yet)"


def open_display(
    machine: Machine,
    mode: str | None,
    screenshot: Path | None,
    *,
    stream: TextIO | None = None,
    live: bool | None = None,
) -> DisplaySession:
    """The display for ``kvmpy run --display=MODE --screenshot FILE``: start() it, then finish().

    ``mode`` is None or one of DISPLAY_MODES; "none" and None show nothing
    live.  ``screenshot`` None writes no PNG.
    """
    return DisplaySession(machine, mode, screenshot, stream=stream, live=live)
