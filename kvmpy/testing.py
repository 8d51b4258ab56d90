"""Drive a guest from a test: start it, talk to it over serial, collect the result.

The pytest plugin (``kvmpy.pytest_plugin``) hands these out through its
``kvm_machine`` fixture; nothing here needs pytest, so a script or another
test framework can use :func:`load_machine` directly::

    with load_machine("guests/out/real_hello.bin", mem="16M", timeout=10) as m:
        m.start()
        m.serial.expect(b"Hello")
        assert m.wait().status == 1
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvmpy.console import ConsoleOverrun
from kvmpy.debug.crash import CrashReport, crash_report
from kvmpy.devices.vga import Vga
from kvmpy.display.screen import TextScreen
from kvmpy.loaders.multiboot import parse_module
from kvmpy.machine import Machine
from kvmpy.memory import parse_size
from kvmpy.outcome import Outcome, OutcomeKind
from kvmpy.records import Record

__all__ = [
    "GuestStopped",
    "RunResult",
    "ScreenTimeout",
    "SerialConsole",
    "SerialTimeout",
    "TestMachine",
    "TextScreenConsole",
    "format_tail",
    "guest_results",
    "load_machine",
]

# How much serial output an exception message shows, and a report section keeps.
TAIL_BYTES = 2048
SECTION_BYTES = 64 << 10

Pattern = bytes | str | re.Pattern[bytes]


# -- results and errors ------------------------------------------------------------------


class SerialTimeout(AssertionError):
    """The pattern did not appear on the serial port in time.

    ``output`` holds the whole serial output so far; the message shows its tail.
    """

    def __init__(self, message: str, output: bytes, outcome: Outcome | None = None) -> None:
        super().__init__(f"{message}\n{format_tail(output)}")
        self.output = output
        self.outcome = outcome


class GuestStopped(SerialTimeout):
    """The guest stopped (exited, crashed, timed out) before the pattern appeared."""


class ScreenTimeout(AssertionError):
    """The pattern did not appear on the VGA text screen in time (or the guest stopped).

    ``screen`` holds the screen's text at the end; the message shows it.
    """

    def __init__(self, message: str, screen: str) -> None:
        super().__init__(f"{message}\nthe screen:\n{screen}")
        self.screen = screen


class RunResult(Record):
    """How a run ended, with the serial output it produced."""

    outcome: Outcome
    output: bytes
    # The match of ``run(until=...)``.
    match: re.Match[bytes] | None = None

    @property
    def status(self) -> int:
        """The exit status ``kvmpy run`` would give: ``(code << 1) | 1`` for a debug exit."""
        return self.outcome.status

    @property
    def exit_code(self) -> int | None:
        """The value written to the debug-exit port, or None."""
        return self.outcome.exit_code

    @property
    def reason(self) -> str:
        """exit, halt, shutdown, reset, triple-fault, crash, timeout, stopped, interrupted."""
        return self.outcome.reason

    @property
    def message(self) -> str:
        return self.outcome.message

    @property
    def report(self) -> CrashReport | None:
        return self.outcome.report

    @property
    def text(self) -> str:
        """The serial output, decoded (undecodable bytes replaced)."""
        return self.output.decode(errors="replace")


def format_tail(output: bytes, limit: int = TAIL_BYTES) -> str:
    """The last ``limit`` bytes of serial output, as an indented block for a message."""
    if not output:
        return "serial output: (none)"
    tail = output[-limit:]
    head = (
        f"last {len(tail)} of {len(output)} bytes of serial output:"
        if len(tail) < len(output)
        else f"serial output ({len(output)} bytes):"
    )
    lines = tail.decode(errors="backslashreplace").splitlines()
    return "\n".join([head, *(f"  | {line}" for line in lines)])


_RESULT_LINE = re.compile(r"^(PASS|FAIL|SKIP|XPASS|XFAIL): ?(.*?)\r?$", re.MULTILINE)


def guest_results(output: bytes) -> list[tuple[str, str]]:
    """The ``PASS: name`` / ``FAIL:`` / ``SKIP:`` (and XPASS/XFAIL) lines of a guest's output."""
    text = output.decode(errors="replace")
    return [(m.group(1), m.group(2)) for m in _RESULT_LINE.finditer(text)]


def _compile(pattern: Pattern) -> re.Pattern[bytes]:
    if isinstance(pattern, re.Pattern):
        return pattern
    if isinstance(pattern, str):
        pattern = pattern.encode()
    return re.compile(re.escape(pattern))


def _describe(pattern: Pattern) -> str:
    return f"re.compile({pattern.pattern!r})" if isinstance(pattern, re.Pattern) else repr(pattern)


# -- the machine a test drives -------------------------------------------------------------


class SerialConsole:
    """COM1 of a :class:`TestMachine`, driven like pexpect.

    ``expect`` searches the output from a read position that each match
    advances, so successive ``expect`` calls consume the output in order.
    """

    def __init__(self, owner: TestMachine) -> None:
        self._owner = owner
        self._position = 0
        # The output between the previous read position and the last match.
        self.before = b""

    @property
    def output(self) -> bytes:
        """Everything the guest has written to the serial port so far."""
        with self._owner.machine.console_changed:
            return bytes(self._owner.machine.console)

    @property
    def position(self) -> int:
        """Where the next ``expect`` starts searching ``output``."""
        return self._position

    def expect(self, pattern: Pattern, timeout: float | None = None) -> re.Match[bytes]:
        """Wait until ``pattern`` appears after the read position; return the match.

        ``pattern`` is bytes (or str) to find literally, or a compiled bytes
        regex.  ``timeout`` defaults to the machine's.  Raises
        :class:`SerialTimeout` when time runs out, :class:`GuestStopped` when
        the guest stops first; both are AssertionErrors and show the output's tail.
        """
        __tracebackhide__ = True  # pytest: show the test's line, not this one
        owner = self._owner
        if not owner.started:
            raise RuntimeError("start the machine (m.start()) before expecting its output")
        regex = _compile(pattern)
        if timeout is None:
            timeout = owner.timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        machine = owner.machine
        with machine.console_changed:
            while True:
                # Read the flag first: output written before the stop is then in the buffer.
                stopped = machine.stopped
                match = self._search(regex)
                if match is not None:
                    return match
                if stopped:
                    break
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise SerialTimeout(
                        f"{_describe(pattern)} did not appear on the serial port within "
                        f"{timeout:g} s (searched from byte {self._position})",
                        bytes(machine.console),
                    )
                machine.console_changed.wait(remaining)
        # The guest stopped: collect the outcome (joining every vCPU, so that
        # all output is in), then look one last time.
        result = owner.wait()
        with machine.console_changed:
            match = self._search(regex)
        if match is not None:
            return match
        raise GuestStopped(
            f"the guest stopped before {_describe(pattern)} appeared on the serial port "
            f"(searched from byte {self._position}): {result.message}",
            result.output,
            result.outcome,
        )

    def _search(self, regex: re.Pattern[bytes]) -> re.Match[bytes] | None:
        """Search the console (lock held) from the read position; advance past a match.

        Positions are absolute byte counts; the console keeps only its most
        recent output, so a search that fell behind it fails clearly.
        """
        console = self._owner.machine.console
        try:
            found = console.search(regex, self._position)
        except ConsoleOverrun as exc:
            raise SerialTimeout(f"expect fell behind the console: {exc}", bytes(console)) from None
        if found is None:
            return None
        match, absolute_start = found
        self.before = console.since(self._position)[: absolute_start - self._position]
        self._position = absolute_start + (match.end() - match.start())
        return match

    def send(self, data: bytes | str, timeout: float | None = None) -> None:
        """Type ``data`` into the UART, waiting while its input queue is full.

        ``timeout`` (default: the machine's) bounds the wait for the guest to
        read; :class:`SerialTimeout` or :class:`GuestStopped` end it.
        """
        __tracebackhide__ = True  # pytest: show the test's line, not this one
        owner = self._owner
        pending = data.encode() if isinstance(data, str) else bytes(data)
        if timeout is None:
            timeout = owner.timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        while pending:
            pending = pending[owner.machine.serial.feed(pending) :]
            if not pending:
                return
            if not owner.started:
                raise RuntimeError(
                    f"the UART's input queue is full with {len(pending)} bytes left to send: "
                    "start the machine first"
                )
            if owner.machine.stopped:
                raise GuestStopped(
                    f"the guest stopped with {len(pending)} bytes of input unread",
                    self.output,
                )
            if deadline is not None and time.monotonic() >= deadline:
                raise SerialTimeout(
                    f"the guest did not read its input within {timeout:g} s "
                    f"({len(pending)} bytes left to send)",
                    self.output,
                )
            time.sleep(0.001)


class TextScreenConsole:
    """The VGA text screen of a :class:`TestMachine`, for guests that draw, not print.

    A guest that paints video memory (memtest86+, a BIOS-style kernel) shows its
    state there at once, while what it sends to a serial console may follow its
    own schedule.  The screen has no change events, so ``expect`` polls it.
    """

    POLL_SECONDS = 0.05

    def __init__(self, owner: TestMachine) -> None:
        self._owner = owner

    def text(self) -> str:
        """The screen now, as plain text (rows without trailing blanks)."""
        machine = self._owner.machine
        vga = machine.devices().get("vga")
        screen = TextScreen.capture(machine.memory, vga if isinstance(vga, Vga) else None)
        return screen.plain_text()

    def expect(self, pattern: str | re.Pattern[str], timeout: float | None = None) -> re.Match[str]:
        """Wait until ``pattern`` (a literal str or a compiled str regex) is on the screen.

        ``timeout`` defaults to the machine's.  Raises :class:`ScreenTimeout`
        when time runs out or the guest stops first.
        """
        __tracebackhide__ = True  # pytest: show the test's line, not this one
        owner = self._owner
        if not owner.started:
            raise RuntimeError("start the machine (m.start()) before expecting its screen")
        regex = pattern if isinstance(pattern, re.Pattern) else re.compile(re.escape(pattern))
        if timeout is None:
            timeout = owner.timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            stopped = owner.machine.stopped  # read first: a final paint is then on the screen
            screen = self.text()
            match = regex.search(screen)
            if match is not None:
                return match
            if stopped:
                reason = f"the guest stopped: {owner.wait().message}"
                break
            if deadline is not None and time.monotonic() >= deadline:
                reason = f"not within {timeout:g} s"
                break
            time.sleep(self.POLL_SECONDS)
        described = f"re.compile({regex.pattern!r})" if regex is pattern else repr(pattern)
        raise ScreenTimeout(f"{described} did not appear on the screen: {reason}", screen)


class TestMachine:
    """A loaded guest for one test: start, talk to it over serial, collect the result.

    Made by the ``kvm_machine`` fixture, which closes it when the test ends.
    ``machine`` is the underlying :class:`kvmpy.machine.Machine` (memory,
    vCPUs, devices) for anything this class does not wrap.  A TestMachine
    runs once.
    """

    __test__ = False  # not a test class, whatever its name

    def __init__(self, machine: Machine, image: Path, timeout: float | None) -> None:
        self.machine = machine
        self.image = image
        # Seconds the guest may run before it is stopped as timed out (None: no limit).
        self.timeout = timeout
        self.serial = SerialConsole(self)
        self.screen = TextScreenConsole(self)
        self.result: RunResult | None = None
        self.started = False
        self.closed = False
        self._watchdog: threading.Timer | None = None
        self._reported = False

    def __repr__(self) -> str:
        state = "closed" if self.closed else "running" if self.running else "ready"
        if self.result is not None:
            state = f"{self.result.reason}, status {self.result.status}"
        return f"<TestMachine {self.image.name} ({state})>"

    @property
    def output(self) -> bytes:
        """The serial output so far (as ``serial.output``)."""
        return self.serial.output

    @property
    def running(self) -> bool:
        """Started and its result not yet collected (the guest may have stopped already)."""
        return self.started and self.result is None

    def start(self) -> None:
        """Start the guest in the background; its timeout starts counting now."""
        if self.closed:
            raise RuntimeError("the machine is closed")
        if self.started:
            raise RuntimeError("a TestMachine runs once: ask kvm_machine for another one")
        self.started = True
        self.machine.start()
        if self.timeout is not None:
            self._watchdog = threading.Timer(self.timeout, self._time_out)
            self._watchdog.daemon = True
            self._watchdog.name = f"kvmpy-watchdog-{self.image.name}"
            self._watchdog.start()

    def _time_out(self) -> None:
        self.machine.stop(
            Outcome(OutcomeKind.TIMEOUT, f"timeout: no guest exit after {self.timeout:g} s")
        )

    def wait(self, timeout: float | None = None) -> RunResult:
        """Wait for the guest to stop and return the result (at once if already collected).

        With ``timeout``, stop the guest as timed out if it runs that much longer.
        """
        if self.result is not None:
            return self.result
        if not self.started:
            raise RuntimeError("the machine was not started")
        try:
            outcome = self.machine.wait(timeout)
        finally:
            if self._watchdog is not None:
                self._watchdog.cancel()
        self.result = RunResult(outcome, self.serial.output)
        if outcome.signal == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C during the wait: let pytest stop the session
        return self.result

    def run(self, until: Pattern | None = None, *, timeout: float | None = None) -> RunResult:
        """Start the guest (unless started) and return its result.

        With ``until`` (as ``serial.expect`` takes it), wait for that output,
        then stop the guest: the result's reason is then "stopped" and its
        ``match`` the match.  Without it, run until the guest stops itself.
        ``timeout`` bounds that wait; the machine's timeout applies in any case.
        """
        __tracebackhide__ = True  # pytest: show the test's line, not this one
        if not self.started:
            self.start()
        if until is None:
            return self.wait(timeout)
        match = self.serial.expect(until, timeout)
        result = self.stop(f"stopped by the test: {_describe(until)} appeared")
        self.result = result = RunResult(result.outcome, result.output, match)
        return result

    def stop(self, message: str = "stopped by the test") -> RunResult:
        """Stop the guest now (if it has not stopped already) and return the result."""
        if self.result is None and self.started:
            self.machine.stop(Outcome(OutcomeKind.STOPPED, message))
        return self.wait()

    def close(self) -> None:
        """Stop the guest if it runs, and free the VM (file descriptors, memory)."""
        if self.closed:
            return
        self.closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        try:
            if self.running:
                self.stop("stopped: the test ended")
        finally:
            self.machine.close()

    def __enter__(self) -> TestMachine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def report_sections(self, label: str) -> list[tuple[str, str]]:
        """(title, text) sections describing this machine, for a failed test's report."""
        if self._reported:
            return []
        self._reported = True
        title = f"{label} ({self.image.name})"
        if not self.started:
            return [(f"{title}: not started", f"{self.image} was loaded but never started")]
        outcome: Outcome | None = None
        problem = ""
        if self.running and not self.closed:
            try:
                outcome = self.stop("stopped: the test failed").outcome
            except (Exception, KeyboardInterrupt) as exc:
                problem = f"could not stop the guest: {exc}"
        elif self.result is not None:
            outcome = self.result.outcome
        output = self.serial.output
        shown = output[-SECTION_BYTES:]
        text = shown.decode(errors="backslashreplace") or "(no output)"
        if len(shown) < len(output):
            text = f"[first {len(output) - len(shown)} bytes left out]\n{text}"
        sections = [(f"{title}: serial output", text)]
        if outcome is None:
            sections.append((f"{title}: outcome unknown", problem))
            return sections
        body = outcome.message
        try:
            report = outcome.report
            if report is None and not self.closed:
                # A clean exit, or a stop by the test: the vCPU state is still worth showing.
                report = crash_report(self.machine.vcpu, self.machine.memory, outcome.reason)
            if report is not None:
                body += "\n" + report.format()
        except Exception as exc:  # a report must never hide the test's own failure
            body += f"\n(vCPU state unavailable: {exc})"
        sections.append((f"{title}: {outcome.reason}, status {outcome.status}", body))
        return sections


def load_machine(
    image: str | os.PathLike[str],
    *,
    mem: int | str = "128M",
    cpus: int = 1,
    append: str = "",
    modules: Sequence[str | tuple[str, str]] = (),
    initrd: str | os.PathLike[str] | None = None,
    mode: str | None = None,
    image_format: str | None = None,
    load_addr: int | None = None,
    entry: int | None = None,
    timeout: float | None = None,
    **machine_kwargs: Any,
) -> TestMachine:
    """A new Machine with ``image`` loaded, as ``kvmpy run`` loads it, ready to start.

    The image is a Linux bzImage, a multiboot or PVH kernel, an ELF executable
    or a flat binary (detected in that order unless ``image_format`` says); a flat binary
    runs in real mode at 0x7c00 unless ``mode`` (and ``load_addr``) say
    otherwise.  ``modules`` are multiboot modules, as "path[,args]" or
    (path, args); ``initrd``, an initial RAM disk (QEMU's -initrd).
    ``timeout``: seconds the guest may run (None: no limit).
    Other keyword arguments go to :class:`~kvmpy.machine.Machine`
    (``irqchip``, ``strict``, ``kvm_path``, ...).
    """
    path = Path(image)
    mem_size = parse_size(mem) if isinstance(mem, str) else mem
    boot_modules = [
        module if isinstance(module, tuple) else parse_module(module) for module in modules
    ]
    machine = Machine(mem_size=mem_size, cpus=cpus, cmdline=append, **machine_kwargs)
    try:
        machine.boot(
            path,
            image_format=image_format,
            mode=mode,
            load_addr=load_addr,
            entry=entry,
            modules=boot_modules,
            initrd=None if initrd is None else Path(initrd),
        )
    except BaseException:
        machine.close()
        raise
    return TestMachine(machine, path, timeout)
