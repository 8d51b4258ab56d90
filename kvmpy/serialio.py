"""The host side of the serial ports: ``--serial stdio|mon:stdio|file:PATH|pty|unix:PATH,server|
tcp:HOST:PORT,server|null``, QEMU's spellings, one per COM port (COM1, then COM2).

- ``TerminalFilter`` and ``EscapeDecoder`` are sans-IO: what a terminal may
  be shown, and the Ctrl-A escapes of ``mon:stdio``;
- each ``HostPort`` carries one UART's bytes to a file, a pty, a socket
  client or nowhere, and feeds what comes back to the guest;
- ``MonitorConsole`` is ``mon:stdio``: the terminal in raw mode (keys,
  Ctrl-C included, go to the guest), Ctrl-A x quits, Ctrl-A h helps, Ctrl-A c
  toggles a small monitor prompt.  The terminal is restored however kvmpy
  ends.

Output to a terminal passes printable text, newlines, tabs and colour (SGR)
sequences only, unless the port says ``raw`` (``stdio,raw``): a guest's
escape sequences could otherwise retitle, redefine or wedge the terminal.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import select
import stat
import sys
import termios
import threading
import time
from _thread import LockType
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from kvmpy.records import Record

if TYPE_CHECKING:
    import socket

    from kvmpy.devices.serial import Serial16550

OutputSetter = Callable[[Callable[[bytes], None] | None], None]
MAX_PORTS = 2  # COM1 and COM2
_POLL = 0.2  # how often input threads look whether kvmpy is closing
_HELD_LIMIT = 64 * 1024  # guest output kept while the monitor has the terminal


# -- parsing ----------------------------------------------------------------------------


class SerialSpec(Record):
    """One ``--serial`` value."""

    kind: str  # stdio, mon, file, pty, unix, tcp, null
    path: str = ""
    host: str = ""
    port: int = 0
    wait: bool = False  # a server port holds the guest until a client connects
    raw: bool = False  # stdio: pass every byte to the terminal

    @property
    def uses_stdio(self) -> bool:
        return self.kind in ("stdio", "mon")


STDIO = SerialSpec("stdio")


def parse_serial(spec: str, option: str = "--serial") -> SerialSpec:
    """Parse one ``--serial`` value (see the module docstring); ValueError if bad."""
    head, *options = spec.split(",")
    flags: dict[str, str] = {}
    for option in options:
        name, _, value = option.partition("=")
        flags[name] = value
    kind, _, rest = head.partition(":")

    def refuse(why: str) -> ValueError:
        return ValueError(f"bad {option} {spec!r}: {why}")

    def allow(*names: str) -> None:
        for name in flags:
            if name not in names:
                raise refuse(f"unknown option {name!r}")

    if head in ("stdio", "mon:stdio"):
        allow("raw")
        return SerialSpec("mon" if head == "mon:stdio" else "stdio", raw="raw" in flags)
    if head in ("null", "pty", "none"):
        allow()
        return SerialSpec("null" if head == "none" else head)
    if kind == "file":
        allow()
        if not rest:
            raise refuse("no file name")
        return SerialSpec("file", path=rest)
    if kind in ("unix", "tcp"):
        allow("server", "wait", "nowait")
        if "server" not in flags or flags["server"] not in ("", "on"):
            raise refuse("kvmpy only listens: add ,server")
        wait = flags.get("wait", "on") not in ("off", "no") and "nowait" not in flags
        if kind == "unix":
            if not rest:
                raise refuse("no socket path")
            return SerialSpec("unix", path=rest, wait=wait)
        host, sep, port_text = rest.rpartition(":")
        if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 0xFFFF:
            raise refuse("expected tcp:HOST:PORT,server")
        return SerialSpec(
            "tcp", host=host.strip("[]") or "127.0.0.1", port=int(port_text), wait=wait
        )
    raise refuse(
        "expected stdio, mon:stdio, file:PATH, pty, unix:PATH,server, tcp:HOST:PORT,server or null"
    )


def parse_serials(specs: list[str] | None) -> list[SerialSpec]:
    """COM1's and COM2's specs (COM1 defaults to stdio); at most one may use stdio."""
    parsed = [parse_serial(spec) for spec in specs or ["stdio"]]
    if len(parsed) > MAX_PORTS:
        raise ValueError(f"--serial given {len(parsed)} times: kvmpy has COM1 and COM2")
    if sum(spec.uses_stdio for spec in parsed) > 1:
        raise ValueError("only one --serial can use stdio")
    return parsed


def parse_debugcon(spec: str) -> SerialSpec:
    """One ``--debugcon`` value: where port 0xe9's bytes go (output only)."""
    parsed = parse_serial(spec, "--debugcon")
    if parsed.kind not in ("stdio", "file", "null"):
        raise ValueError(f"bad --debugcon {spec!r}: it is output only: stdio, file:PATH or null")
    return parsed


# -- what a terminal may be shown (sans-IO) -------------------------------------------------

_NORMAL, _ESC, _CSI, _CSI_SKIP, _STRING, _STRING_ESC = range(6)
_MAX_SEQUENCE = 64  # longer escape sequences are dropped whole
_KEPT_CONTROLS = frozenset(b"\n\r\t\b")


class TerminalFilter:
    """Passes printable text (UTF-8 included), newline, carriage return, tab,
    backspace and SGR colour sequences (``ESC [ digits;... m``); drops every
    other control character and escape sequence, across chunk boundaries."""

    def __init__(self) -> None:
        self._state = _NORMAL
        self._sequence = bytearray()

    def feed(self, data: bytes) -> bytes:
        out = bytearray()
        for byte in data:
            state = self._state
            if state == _NORMAL:
                if byte == 0x1B:
                    self._state = _ESC
                    self._sequence = bytearray(b"\x1b")
                elif (byte >= 0x20 and byte != 0x7F) or byte in _KEPT_CONTROLS:
                    out.append(byte)
            elif state == _ESC:
                if byte == ord("["):
                    self._state = _CSI
                    self._sequence.append(byte)
                elif byte in b"]PX^_":  # OSC, DCS, SOS, PM, APC: strings up to ST or BEL
                    self._state = _STRING
                else:
                    self._state = _NORMAL  # a two-byte escape: dropped
            elif state == _CSI:
                self._sequence.append(byte)
                if 0x40 <= byte <= 0x7E:  # the final byte
                    params = bytes(self._sequence[2:-1])
                    if byte == ord("m") and all(ch in b"0123456789;" for ch in params):
                        out += self._sequence
                    self._state = _NORMAL
                elif not 0x20 <= byte <= 0x3F:
                    self._state = _NORMAL  # not a CSI sequence after all: dropped
                elif len(self._sequence) > _MAX_SEQUENCE:
                    self._state = _CSI_SKIP  # too long: dropped, up to its final byte
            elif state == _CSI_SKIP:
                if not 0x20 <= byte <= 0x3F:
                    self._state = _NORMAL
            elif state == _STRING:
                if byte == 0x07:
                    self._state = _NORMAL
                elif byte == 0x1B:
                    self._state = _STRING_ESC
            else:  # _STRING_ESC: ST is ESC backslash
                self._state = _NORMAL if byte == ord("\\") else _STRING
        return bytes(out)


# -- the Ctrl-A escapes of mon:stdio (sans-IO) ------------------------------------------

CTRL_A = 0x01
MON_HELP = (
    "C-a h    print this help\n"
    "C-a x    exit kvmpy\n"
    "C-a c    switch between the guest's console and the monitor\n"
    "C-a C-a  send C-a to the guest\n"
)


class EscapeDecoder:
    """Splits keyboard input into bytes for the guest and Ctrl-A commands.

    ``feed`` returns a list of ("data", bytes) and ("command", letter)
    events, in order.  Ctrl-A Ctrl-A sends one Ctrl-A; Ctrl-A followed by a
    key kvmpy does not know is dropped.
    """

    def __init__(self) -> None:
        self._escaped = False

    def feed(self, data: bytes) -> list[tuple[str, bytes | str]]:
        events: list[tuple[str, bytes | str]] = []
        plain = bytearray()
        for byte in data:
            if self._escaped:
                self._escaped = False
                if byte == CTRL_A:
                    plain.append(CTRL_A)
                    continue
                if plain:
                    events.append(("data", bytes(plain)))
                    plain = bytearray()
                letter = chr(byte).lower()
                if letter in "xhc":
                    events.append(("command", letter))
            elif byte == CTRL_A:
                self._escaped = True
            else:
                plain.append(byte)
        if plain:
            events.append(("data", bytes(plain)))
        return events


# -- feeding the guest ----------------------------------------------------------------


class GuestInput:
    """Where a port's input goes: a UART and its lock, set once the machine exists."""

    def __init__(self) -> None:
        self.serial: Serial16550 | None = None
        self.lock: LockType | None = None
        self.closed = threading.Event()

    def feed(self, data: bytes) -> None:
        """Give ``data`` to the guest, waiting while the UART's queue is full."""
        while data and not self.closed.is_set():
            serial, lock = self.serial, self.lock
            accepted = 0
            if serial is not None and lock is not None:
                with lock:
                    accepted = serial.feed(data)
            data = data[accepted:]
            if data:
                time.sleep(0.01)


# -- host ports -----------------------------------------------------------------------


class HostPort:
    """One UART's host side.  ``write`` is called on a vCPU thread with the device
    lock held: it must never block (a port with no reader drops output)."""

    name = ""

    def __init__(self) -> None:
        self.input = GuestInput()

    def write(self, data: bytes) -> None:
        return None

    def received(self, data: bytes) -> None:
        """Input from the host side (an input thread): to the guest."""
        self.input.feed(data)

    def disconnected(self) -> None:
        """The input fd reached its end (a client left)."""
        time.sleep(_POLL)

    def start(self) -> None:
        """Start reading input (after the machine exists)."""
        return None

    def wait_for_client(self) -> None:
        return None

    def close(self) -> None:
        self.input.closed.set()


class NullPort(HostPort):
    pass


class FilePort(HostPort):
    def __init__(self, path: str) -> None:
        super().__init__()
        try:
            self._file = open(path, "wb", buffering=0)  # noqa: SIM115 - closed in close()
        except OSError as exc:
            raise ValueError(f"--serial file:{path}: {exc.strerror}") from None

    def write(self, data: bytes) -> None:
        with contextlib.suppress(OSError):
            self._file.write(data)

    def close(self) -> None:
        super().close()
        self._file.close()


def _reader_thread(port: HostPort, fd_source: Callable[[], int | None], name: str) -> None:
    """Read from whatever fd ``fd_source`` gives and feed the guest, until closed."""

    def pump() -> None:
        while not port.input.closed.is_set():
            fd = fd_source()
            if fd is None:
                time.sleep(_POLL)
                continue
            try:
                if not select.select([fd], [], [], _POLL)[0]:
                    continue
                data = os.read(fd, 4096)
            except (OSError, ValueError):
                data = b""
            if not data:
                port.disconnected()
                continue
            port.received(data)

    threading.Thread(target=pump, name=name, daemon=True).start()


class PtyPort(HostPort):
    """A pseudo-terminal; its name is printed (as QEMU's "char device redirected to")."""

    def __init__(self, label: str) -> None:
        super().__init__()
        self._master, self._slave = os.openpty()
        attrs = termios.tcgetattr(self._slave)
        attrs[0] = attrs[3] = 0  # raw: no input processing, no echo or signals
        attrs[1] &= ~termios.OPOST
        termios.tcsetattr(self._slave, termios.TCSANOW, attrs)
        os.set_blocking(self._master, False)
        self.path = os.ttyname(self._slave)
        self.label = label
        # kvmpy keeps the slave open, so the master never sees EIO between clients.

    def write(self, data: bytes) -> None:
        with contextlib.suppress(OSError):  # nobody reading and the buffer full: dropped
            os.write(self._master, data)

    def start(self) -> None:
        print(f"kvmpy: {self.label} on {self.path}", file=sys.stderr, flush=True)
        _reader_thread(self, lambda: self._master, f"kvmpy-{self.label}-pty")

    def close(self) -> None:
        super().close()
        for fd in (self._master, self._slave):
            with contextlib.suppress(OSError):
                os.close(fd)


class SocketPort(HostPort):
    """A listening socket; one client at a time gets the output and types the input."""

    def __init__(self, spec: SerialSpec, label: str) -> None:
        import socket  # here: a plain run needs no sockets (start-up time)

        super().__init__()
        self._dontwait = socket.MSG_DONTWAIT
        self.spec = spec
        self.label = label
        self._client: socket.socket | None = None
        self._lock = threading.Lock()
        self._connected = threading.Event()
        try:
            if spec.kind == "unix":
                with contextlib.suppress(FileNotFoundError):
                    if stat.S_ISSOCK(os.stat(spec.path).st_mode):
                        os.unlink(spec.path)
                self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self._listener.bind(spec.path)
                self._listener.listen(1)
                self.where = f"unix:{spec.path}"
            else:
                family = socket.AF_INET6 if ":" in spec.host else socket.AF_INET
                self._listener = socket.create_server((spec.host, spec.port), family=family)
                self.where = f"tcp:{spec.host}:{self._listener.getsockname()[1]}"
        except OSError as exc:
            raise ValueError(f"--serial: cannot listen on {spec.kind}: {exc.strerror}") from None

    def write(self, data: bytes) -> None:
        client = self._client
        if client is None:
            return
        with contextlib.suppress(OSError):  # a slow client loses output, the guest never waits
            client.send(data, self._dontwait)

    def _client_fd(self) -> int | None:
        client = self._client
        return None if client is None else client.fileno()

    def start(self) -> None:
        threading.Thread(
            target=self._accept, name=f"kvmpy-{self.label}-accept", daemon=True
        ).start()
        _reader_thread(self, self._client_fd, f"kvmpy-{self.label}-socket")

    def _accept(self) -> None:
        while not self.input.closed.is_set():
            try:
                if not select.select([self._listener], [], [], _POLL)[0]:
                    continue
                client, _ = self._listener.accept()
            except (OSError, ValueError):
                return
            with self._lock:
                old, self._client = self._client, client
            if old is not None:
                old.close()
            self._connected.set()

    def wait_for_client(self) -> None:
        if self.spec.wait:
            print(f"kvmpy: {self.label}: waiting for a client on {self.where}", file=sys.stderr)
            while not self._connected.wait(_POLL):
                if self.input.closed.is_set():
                    return

    def disconnected(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def close(self) -> None:
        super().close()
        self.disconnected()
        self._listener.close()
        if self.spec.kind == "unix":
            with contextlib.suppress(OSError):
                os.unlink(self.spec.path)


# -- stdio ---------------------------------------------------------------------------


class StdioPort(HostPort):
    """stdout for output (through ``sink``), stdin for input: plain, or ``mon:stdio``."""

    def __init__(self, spec: SerialSpec, sink: Callable[[bytes], None]) -> None:
        super().__init__()
        self.spec = spec
        self._sink = sink
        isatty = _isatty(1)
        self._filter = TerminalFilter() if isatty and not spec.raw else None
        self.console: MonitorConsole | None = None
        self._held = bytearray()
        self._held_lock = threading.Lock()

    def write(self, data: bytes) -> None:
        if self._filter is not None:
            data = self._filter.feed(data)
        console = self.console
        if console is not None and console.in_monitor:
            with self._held_lock:  # shown when the guest's console is back
                self._held += data
                del self._held[: max(0, len(self._held) - _HELD_LIMIT)]
            return
        if data:
            self._sink(data)

    def received(self, data: bytes) -> None:
        console = self.console
        if console is None:
            self.input.feed(data)
            return
        data = console.handle(data)
        serial, lock = self.input.serial, self.input.lock
        if data and serial is not None and lock is not None:
            # Never wait for the guest here, or Ctrl-A x would wait behind it:
            # what the UART's queue cannot take is dropped.
            with lock:
                serial.feed(data)

    def disconnected(self) -> None:
        self.input.closed.set()  # stdin ended: no more keys for the guest

    def release_held(self) -> None:
        with self._held_lock:
            held, self._held = bytes(self._held), bytearray()
        if held:
            self._sink(held)


def _isatty(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


class MonitorConsole:
    """``mon:stdio``: the terminal raw, Ctrl-A commands, and a monitor prompt.

    ``on_quit()`` ends the run; ``on_command(line)`` runs a monitor command
    and returns its text.  The terminal's settings come back in ``close``,
    and at interpreter exit should anything skip it.
    """

    PROMPT = "(kvmpy) "

    def __init__(
        self,
        port: StdioPort,
        on_quit: Callable[[], None],
        on_command: Callable[[str], str],
        fd: int = 0,
    ) -> None:
        self.port = port
        self.on_quit = on_quit
        self.on_command = on_command
        self.fd = fd
        self.in_monitor = False
        self._decoder = EscapeDecoder()
        self._line = bytearray()
        self._saved: list[Any] | None = None
        port.console = self

    # the terminal

    def start(self) -> None:
        if _isatty(self.fd):
            self._saved = termios.tcgetattr(self.fd)
            raw = termios.tcgetattr(self.fd)
            raw[0] &= ~(
                termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP
                | termios.INLCR | termios.IGNCR | termios.ICRNL | termios.IXON
            )  # fmt: skip
            raw[3] &= ~(
                termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN
            )
            raw[2] = (raw[2] & ~(termios.CSIZE | termios.PARENB)) | termios.CS8
            raw[6][termios.VMIN] = 1
            raw[6][termios.VTIME] = 0
            # Output processing stays on (as QEMU's): a guest's "\n" still starts a line.
            termios.tcsetattr(self.fd, termios.TCSANOW, raw)
            atexit.register(self.restore_terminal)
        _reader_thread(self.port, lambda: self.fd, "kvmpy-console")

    def restore_terminal(self) -> None:
        saved, self._saved = self._saved, None
        if saved is not None:
            with contextlib.suppress(OSError, termios.error):
                termios.tcsetattr(self.fd, termios.TCSADRAIN, saved)

    def close(self) -> None:
        self.port.close()
        self.restore_terminal()

    # the keys

    def _say(self, text: str) -> None:
        with contextlib.suppress(OSError):
            os.write(1, text.encode())

    def handle(self, data: bytes) -> bytes:
        """Act on the Ctrl-A commands in ``data``; return what goes to the guest."""
        to_guest = bytearray()
        for kind, value in self._decoder.feed(data):
            if kind == "command":
                self._command(str(value))
            elif self.in_monitor:
                assert isinstance(value, bytes)
                self._monitor_keys(value)
            else:
                assert isinstance(value, bytes)
                to_guest += value
        return bytes(to_guest)

    def _command(self, letter: str) -> None:
        if letter == "x":
            self._say("\nkvmpy: quit (C-a x)\n")
            self.on_quit()
        elif letter == "h":
            self._say("\n" + MON_HELP)
        elif letter == "c":
            self.in_monitor = not self.in_monitor
            if self.in_monitor:
                self._line.clear()
                self._say(
                    "\nkvmpy monitor: help for the commands, C-a c for the guest\n" + self.PROMPT
                )
            else:
                self._say("\n")
                self.port.release_held()

    def _monitor_keys(self, data: bytes) -> None:
        for byte in data:
            if byte in (0x0D, 0x0A):
                line = self._line.decode("utf-8", "replace").strip()
                self._line.clear()
                self._say("\n")
                if line:
                    try:
                        reply = self.on_command(line)
                    except Exception as exc:  # a monitor command must not end the console
                        reply = f"error: {exc}\n"
                    self._say(reply)
                self._say(self.PROMPT)
            elif byte in (0x7F, 0x08):
                if self._line:
                    del self._line[-1]
                    self._say("\b \b")
            elif byte == 0x03:  # Ctrl-C clears the line, as a shell does
                self._line.clear()
                self._say("^C\n" + self.PROMPT)
            elif 0x20 <= byte < 0x7F and len(self._line) < 256:
                self._line.append(byte)
                self._say(chr(byte))


# -- all ports of one run ---------------------------------------------------------------


class SerialPorts:
    """The host ports for COM1 and COM2, from the ``--serial`` values (and port 0xe9's,
    from ``--debugcon``).

    ``com1_output`` is what the Machine's ``serial_output`` should be;
    ``attach(machine)`` wires COM2's output and both ports' input once the
    machine exists; ``close()`` ends it all (terminal settings included).
    """

    def __init__(
        self,
        specs: list[str] | None,
        stdout_sink: Callable[[bytes], None],
        debugcon: str | None = None,
    ) -> None:
        self.specs = parse_serials(specs)
        debugcon_spec = None if debugcon is None else parse_debugcon(debugcon)
        self.ports: list[HostPort] = []
        # Port 0xe9's host side (--debugcon): output only, sharing stdout if asked.
        self.debugcon: HostPort | None = None
        self.console: MonitorConsole | None = None
        try:
            for index, spec in enumerate(self.specs):
                self.ports.append(_open_port(spec, f"COM{index + 1}", stdout_sink))
            if debugcon_spec is not None:
                self.debugcon = _open_port(debugcon_spec, "debugcon", stdout_sink)
        except BaseException:
            self.close()
            raise

    @property
    def plain_stdin(self) -> bool:
        """COM1 is plain stdio: the front end's own stdin handling applies."""
        return self.specs[0].kind == "stdio"

    @property
    def monitor(self) -> bool:
        return any(spec.kind == "mon" for spec in self.specs)

    def com1_output(self, data: bytes) -> None:
        self.ports[0].write(data)

    def attach(
        self,
        serials: Sequence[tuple[Serial16550, threading.Lock, OutputSetter]],
        on_quit: Callable[[], None] | None = None,
        on_command: Callable[[str], str] | None = None,
    ) -> None:
        """``serials``: per COM port, its UART, its lock, and a setter for its output."""
        for index, port in enumerate(self.ports):
            serial, lock, set_output = serials[index]
            port.input.serial, port.input.lock = serial, lock
            if index > 0:
                set_output(port.write)
            if isinstance(port, StdioPort) and port.spec.kind == "mon":
                self.console = MonitorConsole(
                    port, on_quit or (lambda: None), on_command or (lambda line: "")
                )
                self.console.start()
            elif not isinstance(port, StdioPort):
                port.start()
        for port in self.ports:
            port.wait_for_client()

    def close(self) -> None:
        if self.console is not None:
            self.console.close()
        for port in self.ports:
            port.close()
        if self.debugcon is not None:
            self.debugcon.close()


def _open_port(spec: SerialSpec, label: str, stdout_sink: Callable[[bytes], None]) -> HostPort:
    if spec.uses_stdio:
        return StdioPort(spec, stdout_sink)
    if spec.kind == "file":
        return FilePort(spec.path)
    if spec.kind == "pty":
        return PtyPort(label)
    if spec.kind in ("unix", "tcp"):
        return SocketPort(spec, label)
    return NullPort()
