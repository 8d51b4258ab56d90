"""QMP, the QEMU Machine Protocol: ``kvmpy run IMAGE --qmp unix:/tmp/qmp.sock,server,wait=off``.

Any QMP client (``qemu.qmp``, ``qmp-shell``, libvirt's, socat) can then drive
kvmpy as it drives QEMU.  Three layers:

- ``JsonStream`` cuts a byte stream into JSON objects, bounded
  (``MAX_MESSAGE`` bytes each), and reports malformed input once per bad
  object (sans-IO);
- ``QmpProtocol`` is the protocol (greeting, capabilities negotiation,
  ``execute``/``return``/``error``) over a table of commands (sans-IO);
- ``QmpServer`` listens on a UNIX or TCP socket and serves one client at a
  time in a thread, sending events as they happen.

``MachineCommands`` implements the commands on a ``Machine`` through a
``RunControl`` (``kvmpy/control.py``).  kvmpy extensions: ``snapshot-save``
and ``snapshot-load`` take ``tag`` as a kvmpy snapshot directory and finish
before they return (QEMU runs them as jobs on qcow2 internal snapshots; here
``job-id``, ``vmstate`` and ``devices`` are accepted and ignored, and no JOB
events are sent).  The greeting's ``qemu`` version is kvmpy's own.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shlex
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import kvmpy
from kvmpy.control import ControlError, RunControl
from kvmpy.memory import PAGE_SIZE, GuestMemoryError
from kvmpy.outcome import Outcome, OutcomeKind
from kvmpy.records import Record

if TYPE_CHECKING:
    from kvmpy.backends.base import Vcpu
    from kvmpy.machine import Machine

MAX_MESSAGE = 64 * 1024  # bytes in one JSON object from a client
# Nesting in one object: json.loads recurses, and a RecursionError can upset
# the interpreter for later code, so deep input never reaches it.
MAX_DEPTH = 32
MAX_QUEUED = 8  # complete commands parsed ahead of their replies (as QEMU)
MAX_DUMP = 1 << 30  # memsave/pmemsave: bytes in one dump
_MAJOR, _MINOR, _MICRO = (int(part) for part in kvmpy.__version__.split(".")[:3])
KVMPY_VERSION = (_MAJOR, _MINOR, _MICRO)
SEND_TIMEOUT = 5.0  # a client that does not read its replies for this long is dropped


# -- errors ---------------------------------------------------------------------------


class QmpError(Exception):
    """A command failed; ``error_class`` is QMP's (GenericError, CommandNotFound...)."""

    def __init__(self, desc: str, error_class: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class


def _error(exc: QmpError, msg_id: object = None) -> dict[str, Any]:
    reply: dict[str, Any] = {"error": {"class": exc.error_class, "desc": exc.desc}}
    if msg_id is not None:
        reply["id"] = msg_id
    return reply


# -- where to listen ------------------------------------------------------------------


class QmpAddress(Record):
    """A parsed ``--qmp`` value."""

    kind: str  # "unix" or "tcp"
    path: str = ""
    host: str = ""
    port: int = 0
    wait: bool = False  # hold the guest until a client connects

    def describe(self) -> str:
        return f"unix:{self.path}" if self.kind == "unix" else f"tcp:{self.host}:{self.port}"


def parse_qmp_address(spec: str) -> QmpAddress:
    """``unix:PATH[,server][,wait=off]`` or ``tcp:[HOST]:PORT[,server][,wait=off]``.

    kvmpy always listens.  As in QEMU, ``server`` without ``wait=off`` (or
    ``nowait``) holds the guest until a client connects; an empty host is
    127.0.0.1.
    """
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in ("unix", "tcp"):
        raise ValueError(f"bad --qmp {spec!r}: expected unix:PATH or tcp:HOST:PORT")
    target, *options = rest.split(",")
    server = False
    wait: bool | None = None
    for option in options:
        name, has_value, value = option.partition("=")
        on = value in ("", "on", "yes", "true") if has_value else True
        if name == "server":
            if not on:
                raise ValueError(f"bad --qmp {spec!r}: kvmpy only listens (server=off)")
            server = True
        elif name == "wait":
            wait = on
        elif name == "nowait" and not has_value:
            wait = False
        else:
            raise ValueError(f"bad --qmp {spec!r}: unknown option {option!r}")
    hold = server if wait is None else wait
    if kind == "unix":
        if not target:
            raise ValueError(f"bad --qmp {spec!r}: no socket path")
        return QmpAddress("unix", path=target, wait=hold)
    host, sep, port_text = target.rpartition(":")
    try:
        port = int(port_text)
    except ValueError:
        port = -1
    if not sep or not 0 <= port <= 0xFFFF:
        raise ValueError(f"bad --qmp {spec!r}: expected tcp:HOST:PORT")
    return QmpAddress("tcp", host=host.strip("[]") or "127.0.0.1", port=port, wait=hold)


# -- framing ---------------------------------------------------------------------------


class JsonStream:
    """Cuts a byte stream into top-level JSON objects (sans-IO).

    ``feed(data)`` adds bytes; ``next()`` returns the next complete object
    (a dict), a ``QmpError`` for input that is not one, or None when more
    bytes are needed.  An object may not exceed ``limit`` bytes; after an
    error the stream resynchronises at the next ``{`` at top level.
    """

    def __init__(self, limit: int = MAX_MESSAGE) -> None:
        self.limit = limit
        self._buffer = bytearray()
        self._scan = 0  # how far the current object has been scanned
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._skipping = False  # inside an oversized object: drop until it ends

    def feed(self, data: bytes) -> None:
        self._buffer += data

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def next(self) -> dict[str, Any] | QmpError | None:
        buffer = self._buffer
        while self._scan < len(buffer):
            if self._depth == 0 and not self._skipping:
                # Between objects: whitespace, or the start of the next one.
                start = self._scan
                while start < len(buffer) and buffer[start] in b" \t\r\n":
                    start += 1
                del buffer[:start]
                self._scan = 0
                if not buffer:
                    return None
                if buffer[0] != ord("{"):
                    junk = self._drop_junk()
                    return QmpError(f"JSON parse error: expected an object, got {junk!r}")
            byte = buffer[self._scan]
            self._scan += 1
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif byte == 0x5C:  # backslash
                    self._escape = True
                elif byte == 0x22:
                    self._in_string = False
            elif byte == 0x22:
                self._in_string = True
            elif byte in b"{[":
                self._depth += 1
                if self._depth > MAX_DEPTH and not self._skipping:
                    self._skipping = True
                    return QmpError(f"JSON parse error: nested deeper than {MAX_DEPTH}")
            elif byte in b"}]":
                self._depth -= 1
                if self._depth == 0:
                    return self._complete()
            if self._scan > self.limit and not self._skipping:
                self._skipping = True
                del buffer[: self._scan]
                self._scan = 0
                return QmpError(f"JSON parse error: message longer than {self.limit} bytes")
            if self._skipping and self._scan > 4096:
                del buffer[: self._scan]
                self._scan = 0
        return None

    def _complete(self) -> dict[str, Any] | QmpError | None:
        text = bytes(self._buffer[: self._scan])
        del self._buffer[: self._scan]
        self._scan = 0
        if self._skipping:
            self._skipping = False
            return self.next()
        try:
            value = json.loads(text)
        except (ValueError, RecursionError) as exc:
            return QmpError(f"JSON parse error: {exc}")
        if not isinstance(value, dict):
            return QmpError("JSON parse error: expected an object")
        return value

    def _drop_junk(self) -> str:
        """Drop bytes up to the next '{' or newline; return (the start of) what went."""
        buffer = self._buffer
        ends = [i for i in (buffer.find(b"{"), buffer.find(b"\n")) if i > 0]
        cut = min(ends) if ends else len(buffer)
        junk = bytes(buffer[:cut])
        del buffer[:cut]
        self._depth = 0
        self._in_string = self._escape = False
        return junk[:40].decode("utf-8", "replace")


# -- the protocol ----------------------------------------------------------------------

Handler = Callable[[dict[str, Any]], object]


class QmpProtocol:
    """One client's session (sans-IO): ``greeting()``, then ``handle(message)`` per object.

    Until ``qmp_capabilities`` only that command is accepted (QEMU's
    capabilities negotiation mode); events are sent only after it
    (``negotiated``).  ``after_reply`` collects actions that must wait until
    the reply is on its way (``quit``).
    """

    def __init__(self, commands: dict[str, Handler], version: tuple[int, int, int]) -> None:
        self.commands = commands
        self.version = version
        self.negotiated = False
        self.after_reply: list[Callable[[], None]] = []

    def greeting(self) -> dict[str, Any]:
        major, minor, micro = self.version
        return {
            "QMP": {
                "version": {
                    "qemu": {"major": major, "minor": minor, "micro": micro},
                    "package": f"kvmpy {major}.{minor}.{micro}",
                },
                "capabilities": [],
            }
        }

    def handle(self, message: dict[str, Any] | QmpError) -> dict[str, Any]:
        """The reply to one message from the client."""
        if isinstance(message, QmpError):
            return _error(message)
        msg_id = message.get("id")
        try:
            return {"return": self._execute(message), **({} if msg_id is None else {"id": msg_id})}
        except QmpError as exc:
            return _error(exc, msg_id)

    def _execute(self, message: dict[str, Any]) -> object:
        if "exec-oob" in message:
            raise QmpError("out-of-band execution is not supported by kvmpy")
        name = message.get("execute")
        if not isinstance(name, str):
            raise QmpError("QMP input lacks member 'execute'")
        unknown = set(message) - {"execute", "arguments", "id"}
        if unknown:
            raise QmpError(f"QMP input member '{sorted(unknown)[0]}' is unexpected")
        arguments = message.get("arguments", {})
        if not isinstance(arguments, dict):
            raise QmpError("QMP input member 'arguments' must be an object")
        if name == "qmp_capabilities":
            if self.negotiated:
                raise QmpError(
                    "Capabilities negotiation is already complete, command ignored",
                    "CommandNotFound",
                )
            enable = arguments.get("enable", [])
            if enable:
                raise QmpError(f"Capability '{enable[0]}' not available")
            self.negotiated = True
            return {}
        if not self.negotiated:
            raise QmpError(
                "Expecting capabilities negotiation with 'qmp_capabilities'", "CommandNotFound"
            )
        handler = self.commands.get(name)
        if handler is None:
            raise QmpError(f"The command {name} has not been found", "CommandNotFound")
        try:
            return handler(arguments)
        except ControlError as exc:
            raise QmpError(str(exc)) from None
        except (KeyError, TypeError) as exc:
            raise QmpError(f"bad arguments for {name}: {exc}") from None


# -- arguments -----------------------------------------------------------------------


def _arg(arguments: dict[str, Any], name: str, kind: type, default: Any = ...) -> Any:
    """A checked argument: QEMU says "Parameter 'x' is missing" / "expects a ..."."""
    if name not in arguments:
        if default is ...:
            raise QmpError(f"Parameter '{name}' is missing")
        return default
    value = arguments[name]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise QmpError(f"Parameter '{name}' expects an integer")
    if not isinstance(value, kind):
        raise QmpError(f"Parameter '{name}' expects a {kind.__name__}")
    return value


def _no_extra(arguments: dict[str, Any], *allowed: str) -> None:
    for name in arguments:
        if name not in allowed:
            raise QmpError(f"Parameter '{name}' is unexpected")


def _writable_file(name: str) -> Path:
    path = Path(name)
    if path.is_dir():
        raise QmpError(f"Could not open '{name}': Is a directory")
    return path


# -- the commands ----------------------------------------------------------------------


def _hex_dump_line(address: int, values: list[int], size: int, fmt: str) -> str:
    if fmt == "c":
        text = "".join(chr(v) if 32 <= v < 127 else "." for v in values)
        return f"{address:016x}: {text}"
    digits = 2 * size
    parts = []
    for value in values:
        if fmt == "x":
            parts.append(f"0x{value:0{digits}x}")
        elif fmt == "d":
            signed = value - (1 << (8 * size)) if value >> (8 * size - 1) else value
            parts.append(str(signed))
        elif fmt == "o":
            parts.append(f"{value:#o}")
        else:
            parts.append(str(value))
    return f"{address:016x}: " + " ".join(parts)


_SIZES = {"b": 1, "h": 2, "w": 4, "g": 8}


def parse_x_format(text: str) -> tuple[int, str, int]:
    """``/10xb`` -> (count 10, format "x", size 1): count, then format and size letters,
    each optional (QEMU's defaults: 1, x, w)."""
    spec = text.removeprefix("/")
    digits = len(spec) - len(spec.lstrip("0123456789"))
    count = int(spec[:digits]) if digits else 1
    fmt, size = "x", 4
    for ch in spec[digits:]:
        if ch in "xduoc":
            fmt = ch
        elif ch in _SIZES:
            size = _SIZES[ch]
        else:
            raise QmpError(f"invalid char '{ch}' in format")
    if fmt == "c":
        size = 1
    return count, fmt, size


class MachineCommands:
    """The QMP commands on one machine; ``table()`` is what ``QmpProtocol`` takes."""

    MAX_X_BYTES = 64 * 1024  # human-monitor x/xp: bytes shown at most

    def __init__(self, machine: Machine, control: RunControl) -> None:
        self.machine = machine
        self.control = control
        self.after_reply: list[Callable[[], None]] = []
        if control.wakeup_handler is None and getattr(machine.board, "wake", None) is not None:
            from kvmpy.x86.pc import press_power_button

            # The PC wakes from S3 on the power button or the RTC alarm.
            control.wakeup_handler = lambda: press_power_button(machine)

    def table(self) -> dict[str, Handler]:
        commands: dict[str, Handler] = {
            "query-status": self.query_status,
            "stop": self.stop,
            "cont": self.cont,
            "system_reset": self.system_reset,
            "system_powerdown": self.system_powerdown,
            "system_wakeup": self.system_wakeup,
            "quit": self.quit,
            "query-cpus-fast": self.query_cpus_fast,
            "query-version": self.query_version,
            "memsave": self.memsave,
            "pmemsave": self.pmemsave,
            "screendump": self.screendump,
            "human-monitor-command": self.human_monitor_command,
            "snapshot-save": self.snapshot_save,
            "snapshot-load": self.snapshot_load,
        }
        names = sorted([*commands, "qmp_capabilities", "query-commands"])
        commands["query-commands"] = lambda arguments: [{"name": name} for name in names]
        return commands

    # run state

    def query_status(self, arguments: dict[str, Any]) -> dict[str, Any]:
        _no_extra(arguments)
        state = self.control.state
        return {"running": state.value == "running", "singlestep": False, "status": state.value}

    def stop(self, arguments: dict[str, Any]) -> dict[str, Any]:
        _no_extra(arguments)
        self.control.pause()
        return {}

    def cont(self, arguments: dict[str, Any]) -> dict[str, Any]:
        _no_extra(arguments)
        self.control.resume()
        return {}

    def system_reset(self, arguments: dict[str, Any]) -> dict[str, Any]:
        _no_extra(arguments)
        self.control.end(Outcome(OutcomeKind.RESET, "reset by QMP system_reset"), reset=True)
        return {}

    def system_powerdown(self, arguments: dict[str, Any]) -> dict[str, Any]:
        """Press the ACPI power button: PWRBTN_STS, and the SCI if the guest enabled it."""
        _no_extra(arguments)
        from kvmpy.x86.pc import press_power_button

        press_power_button(self.machine)
        self.control.emit("POWERDOWN")
        return {}

    def system_wakeup(self, arguments: dict[str, Any]) -> dict[str, Any]:
        _no_extra(arguments)
        self.control.wakeup()
        return {}

    def quit(self, arguments: dict[str, Any]) -> dict[str, Any]:
        _no_extra(arguments)
        outcome = Outcome(OutcomeKind.STOPPED, "quit by QMP")
        self.after_reply.append(lambda: self.control.end(outcome))
        return {}

    def query_cpus_fast(self, arguments: dict[str, Any]) -> list[dict[str, Any]]:
        _no_extra(arguments)
        native = {thread.name: thread.native_id for thread in threading.enumerate()}
        cpus = []
        for vcpu in self.machine.vcpus:
            thread_id = native.get(f"kvmpy-vcpu{vcpu.index}") or os.getpid()
            cpus.append(
                {
                    "cpu-index": vcpu.index,
                    "qom-path": f"/machine/unattached/device[{vcpu.index}]",
                    "thread-id": thread_id,
                    "props": {"socket-id": vcpu.index, "core-id": 0, "thread-id": 0},
                    "target": "x86_64",
                }
            )
        return cpus

    def query_version(self, arguments: dict[str, Any]) -> dict[str, Any]:
        _no_extra(arguments)
        major, minor, micro = KVMPY_VERSION
        return {
            "qemu": {"major": major, "minor": minor, "micro": micro},
            "package": f"kvmpy {major}.{minor}.{micro}",
        }

    # memory

    def _vcpu(self, arguments: dict[str, Any]) -> Vcpu:
        index = _arg(arguments, "cpu-index", int, 0)
        if not 0 <= index < len(self.machine.vcpus):
            raise QmpError("Invalid parameter 'cpu-index'")
        vcpu: Vcpu = self.machine.vcpus[index]
        return vcpu

    @staticmethod
    def _dump_range(arguments: dict[str, Any]) -> tuple[int, int, Path]:
        address = _arg(arguments, "val", int)
        size = _arg(arguments, "size", int)
        path = _writable_file(_arg(arguments, "filename", str))
        if address < 0 or size < 0 or size > MAX_DUMP:
            raise QmpError(f"Invalid parameter 'size' (at most {MAX_DUMP} bytes)")
        return address, size, path

    def memsave(self, arguments: dict[str, Any]) -> dict[str, Any]:
        """Save ``size`` bytes of virtual memory at ``val``, through the vCPU's paging."""
        _no_extra(arguments, "val", "size", "filename", "cpu-index")
        address, size, path = self._dump_range(arguments)
        vcpu = self._vcpu(arguments)
        with self.control.vcpus_stopped(), _open_output(path) as out:
            self._copy_linear(vcpu, address, size, out.write)
        return {}

    def _copy_linear(
        self, vcpu: Vcpu, address: int, size: int, sink: Callable[[bytes], object]
    ) -> None:
        from kvmpy.debug.guestview import translate

        sregs = vcpu.get_sregs()
        done = 0
        while done < size:
            linear = address + done
            chunk = min(size - done, PAGE_SIZE - linear % PAGE_SIZE)
            gpa = translate(vcpu, sregs, linear)
            if gpa is None:
                raise QmpError(f"Invalid addr 0x{linear:016x} specified")
            try:
                sink(self.machine.memory.read(gpa, chunk))
            except GuestMemoryError:
                raise QmpError(f"Invalid addr 0x{linear:016x} specified") from None
            done += chunk

    def pmemsave(self, arguments: dict[str, Any]) -> dict[str, Any]:
        """Save ``size`` bytes of guest-physical memory at ``val`` (the guest may run on)."""
        _no_extra(arguments, "val", "size", "filename")
        address, size, path = self._dump_range(arguments)
        with _open_output(path) as out:
            done = 0
            while done < size:
                chunk = min(size - done, 1 << 20)
                try:
                    out.write(self.machine.memory.read(address + done, chunk))
                except GuestMemoryError:
                    # Across a region boundary: go page by page to find the bad address.
                    for at in range(address + done, address + done + chunk, PAGE_SIZE):
                        piece = min(PAGE_SIZE, address + done + chunk - at)
                        if not self.machine.memory.contains(at, piece):
                            raise QmpError(f"Invalid addr 0x{at:x} specified") from None
                        out.write(self.machine.memory.read(at, piece))
                done += chunk
        return {}

    # the screen

    def screendump(self, arguments: dict[str, Any]) -> dict[str, Any]:
        """The VGA text screen as a 720x400 picture: PPM (QEMU's default) or PNG."""
        _no_extra(arguments, "filename", "device", "head", "format")
        path = _writable_file(_arg(arguments, "filename", str))
        fmt = _arg(arguments, "format", str, "ppm")
        if fmt not in ("ppm", "png"):
            raise QmpError(f"Parameter 'format' does not accept value '{fmt}'")
        from kvmpy.display.png import encode_png
        from kvmpy.display.screen import HEIGHT, WIDTH, TextScreen

        with self.machine.locked("vga") as vga:
            screen = TextScreen.capture(self.machine.memory, vga)
        rgb = screen.to_rgb()
        if fmt == "png":
            data = encode_png(WIDTH, HEIGHT, rgb)
        else:
            data = f"P6\n{WIDTH} {HEIGHT}\n255\n".encode() + rgb
        with _open_output(path) as out:
            out.write(data)
        return {}

    # snapshots (kvmpy extension: see the module's docstring)

    def snapshot_save(self, arguments: dict[str, Any]) -> dict[str, Any]:
        _no_extra(arguments, "job-id", "tag", "vmstate", "devices")
        directory = _arg(arguments, "tag", str)
        from kvmpy.snapshot import SnapshotError

        with self.control.vcpus_stopped():
            try:
                self.machine.snapshot(directory)
            except (SnapshotError, OSError) as exc:
                raise QmpError(str(exc)) from None
        return {}

    def snapshot_load(self, arguments: dict[str, Any]) -> dict[str, Any]:
        _no_extra(arguments, "job-id", "tag", "vmstate", "devices")
        directory = _arg(arguments, "tag", str)
        from kvmpy.snapshot import Snapshot, SnapshotError

        try:
            snapshot = Snapshot.load(directory)
            machine = self.machine
            config = snapshot.config
            mine = {
                "ram": [[region.gpa, region.size] for region in machine.memory],
                "cpus": len(machine.vcpus),
                "irqchip": machine.has_irqchip,
            }
            for key, value in mine.items():
                if config.get(key) != value:
                    raise QmpError(f"{directory}: the snapshot's {key} differs from this machine's")
            with self.control.vcpus_stopped():
                _load_snapshot_memory(snapshot, machine)
                from kvmpy.snapshot import apply_snapshot

                apply_snapshot(snapshot, machine)
        except SnapshotError as exc:
            raise QmpError(str(exc)) from None
        return {}

    # the human monitor

    def human_monitor_command(self, arguments: dict[str, Any]) -> str:
        _no_extra(arguments, "command-line", "cpu-index")
        line = _arg(arguments, "command-line", str).strip()
        vcpu = self._vcpu(arguments)
        try:
            words = shlex.split(line)
        except ValueError as exc:
            return f"{exc}\n"
        if not words:
            return ""
        command, rest = words[0], words[1:]
        if command in ("x", "xp") or command.startswith(("x/", "xp/")):
            return self._hmp_x(command, rest, vcpu)
        if command == "info" and rest[:1] == ["registers"]:
            vcpus = list(self.machine.vcpus) if rest[1:] == ["-a"] else [vcpu]
            with self.control.vcpus_stopped():
                return "".join(_format_registers(each, len(vcpus) > 1) for each in vcpus)
        if command == "info" and rest[:1] == ["status"]:
            state = self.control.state.value
            return f"VM status: {state}\n"
        if command == "info" and rest[:1] == ["version"]:
            return "{}.{}.{} (kvmpy)\n".format(*KVMPY_VERSION)
        if command == "help":
            return HMP_HELP
        return f"unknown command: '{line}'\n"

    def _hmp_x(self, command: str, rest: list[str], vcpu: Vcpu) -> str:
        name, _, fmt_text = command.partition("/")
        if not fmt_text and rest and rest[0].startswith("/"):
            fmt_text, rest = rest[0], rest[1:]
        try:
            count, fmt, size = parse_x_format(fmt_text)
        except QmpError as exc:
            return f"{exc.desc}\n"
        if len(rest) != 1:
            return f"{name}: expected one address\n"
        try:
            address = int(rest[0], 0)
        except ValueError:
            return f"{name}: bad address {rest[0]!r}\n"
        length = count * size
        if length > self.MAX_X_BYTES:
            return f"{name}: at most {self.MAX_X_BYTES} bytes\n"
        data = bytearray()
        try:
            if name == "xp":
                data += self.machine.memory.read(address, length)
            else:
                with self.control.vcpus_stopped():
                    self._copy_linear(vcpu, address, length, data.extend)
        except (GuestMemoryError, QmpError):
            return f"Cannot access memory at {address:#x}\n"
        per_line = 8 if size == 1 else 16
        lines = []
        for offset in range(0, length, per_line):
            piece = data[offset : offset + per_line]
            values = [
                int.from_bytes(piece[i : i + size], "little") for i in range(0, len(piece), size)
            ]
            lines.append(_hex_dump_line(address + offset, values, size, fmt))
        return "\n".join(lines) + "\n"


def monitor_command(commands: MachineCommands, line: str) -> str:
    """One line typed at mon:stdio's monitor prompt: HMP's stop, cont, quit,
    system_reset and system_powerdown, or a human-monitor-command."""
    words = line.split()
    name = {"c": "cont", "q": "quit"}.get(words[0], words[0]) if words else ""
    if name in ("stop", "cont", "quit", "system_reset", "system_powerdown") and len(words) == 1:
        handler = commands.table()[name]
        try:
            handler({})
        except (QmpError, ControlError) as exc:
            return f"{exc}\n"
        actions, commands.after_reply = commands.after_reply, []
        for action in actions:
            with contextlib.suppress(ControlError):
                action()
        return ""
    if name == "help":
        return "stop, cont (c), quit (q), system_reset, system_powerdown\n" + HMP_HELP
    return commands.human_monitor_command({"command-line": line})


HMP_HELP = """\
info registers [-a]  -- the CPU registers (-a: every vCPU)
info status          -- the run state
info version         -- kvmpy's version
x /fmt addr          -- virtual memory dump (through the guest's paging)
xp /fmt addr         -- physical memory dump
                        fmt: count, format (x d u o c), size (b h w g)
"""


@contextlib.contextmanager
def _open_output(path: Path) -> Iterator[Any]:
    try:
        with open(path, "wb") as out:
            yield out
    except OSError as exc:
        raise QmpError(f"Could not open '{path}': {exc.strerror}") from None


def _load_snapshot_memory(snapshot: Any, machine: Machine) -> None:
    """Copy memory.bin (regions end to end) over the machine's RAM."""
    path = snapshot.memory_path
    if path is None:
        return
    try:
        with open(path, "rb") as source:
            for region in machine.memory:
                for start in range(0, region.size, 1 << 20):
                    data = source.read(min(1 << 20, region.size - start))
                    machine.memory.write(region.gpa + start, data)
    except OSError as exc:
        from kvmpy.snapshot import SnapshotError

        raise SnapshotError(f"{path}: {exc.strerror}") from None


def _format_registers(vcpu: Vcpu, header: bool) -> str:
    """QEMU's ``info registers`` layout (x86-64)."""
    from kvmpy.x86.registers import cpu_mode

    regs = vcpu.get_regs()
    sregs = vcpu.get_sregs()
    lines = [f"CPU#{vcpu.index}"] if header else []
    names = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp"]
    names += [f"r{n}" for n in range(8, 16)]
    for row in range(0, 16, 4):
        lines.append(
            " ".join(f"{n.upper():<3}={getattr(regs, n):016x}" for n in names[row : row + 4])
        )
    cpl = sregs.cs.selector & 3 if sregs.cr0 & 1 else 0
    lines.append(f"RIP={regs.rip:016x} RFL={regs.rflags:08x} CPL={cpl} MODE={cpu_mode(sregs)}")
    for name in ("es", "cs", "ss", "ds", "fs", "gs", "ldt", "tr"):
        seg = getattr(sregs, name)
        flags = (
            seg.type << 8
            | seg.s << 12
            | seg.dpl << 13
            | seg.present << 15
            | seg.avl << 20
            | seg.l << 21
            | seg.db << 22
            | seg.g << 23
        )
        label = name.upper()
        lines.append(f"{label:<3}={seg.selector:04x} {seg.base:016x} {seg.limit:08x} {flags:08x}")
    lines.append(f"GDT=     {sregs.gdt.base:016x} {sregs.gdt.limit:08x}")
    lines.append(f"IDT=     {sregs.idt.base:016x} {sregs.idt.limit:08x}")
    lines.append(
        f"CR0={sregs.cr0:08x} CR2={sregs.cr2:016x} CR3={sregs.cr3:016x} CR4={sregs.cr4:08x}"
    )
    lines.append(f"EFER={sregs.efer:016x} APIC_BASE={sregs.apic_base:016x}")
    return "\n".join(lines) + "\n"


# -- the server ------------------------------------------------------------------------


class QmpServer:
    """Listens at ``address`` and serves QMP clients one at a time, in a thread.

    ``commands()`` gives each new client a fresh command table (and the
    object whose ``after_reply`` list holds deferred actions).  ``emit``
    sends an event to the client, if one has negotiated; it is safe from
    any thread.
    """

    def __init__(
        self,
        address: QmpAddress,
        commands: MachineCommands,
        *,
        version: tuple[int, int, int] = KVMPY_VERSION,
    ) -> None:
        self.address = address
        self.commands = commands
        self.version = version
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self._client: socket.socket | None = None
        self._protocol: QmpProtocol | None = None
        self._send_lock = threading.Lock()
        self._connected = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._unlink: str | None = None

    def start(self) -> None:
        """Listen (errors here are ValueErrors: one line for the user), then serve."""
        address = self.address
        try:
            if address.kind == "unix":
                with contextlib.suppress(FileNotFoundError):
                    if stat.S_ISSOCK(os.stat(address.path).st_mode):
                        os.unlink(address.path)  # a stale socket of an earlier run
                listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                listener.bind(address.path)
                listener.listen(1)
                self._unlink = address.path
            else:
                family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
                listener = socket.create_server((address.host, address.port), family=family)
                self.address = QmpAddress(
                    "tcp", host=address.host, port=listener.getsockname()[1], wait=address.wait
                )
        except OSError as exc:
            raise ValueError(
                f"cannot listen for QMP on {address.describe()}: {exc.strerror or exc}"
            ) from None
        self._listener = listener
        self._thread = threading.Thread(target=self._serve, name="kvmpy-qmp", daemon=True)
        self._thread.start()

    def wait_for_client(self, stopping: Callable[[], bool] = lambda: False) -> None:
        """Block until a client connects (``wait`` in the address); returns early if
        ``stopping()`` turns true."""
        while not self._connected.wait(0.2):
            if stopping() or self._closed:
                return

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"!")
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._listener is not None:
            self._listener.close()
        if self._unlink is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._unlink)
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> QmpServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def emit(self, name: str, data: dict[str, Any]) -> None:
        now = time.time()
        seconds = int(now)
        event = {
            "event": name,
            "data": data,
            "timestamp": {"seconds": seconds, "microseconds": int((now - seconds) * 1e6)},
        }
        with self._send_lock:
            client, protocol = self._client, self._protocol
            if client is not None and protocol is not None and protocol.negotiated:
                self._send_locked(client, event)

    def _send_locked(self, client: socket.socket, message: dict[str, Any]) -> None:
        try:
            client.sendall(json.dumps(message).encode() + b"\r\n")
        except OSError:
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)

    def _send(self, client: socket.socket, message: dict[str, Any]) -> None:
        with self._send_lock:
            self._send_locked(client, message)

    def _serve(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._closed:
            readable = select.select([listener, self._wake_r], [], [], 0.5)[0]
            if listener not in readable:
                continue
            try:
                client, _ = listener.accept()
            except OSError:
                continue
            with client:
                client.settimeout(SEND_TIMEOUT)
                self._session(client)

    def _session(self, client: socket.socket) -> None:
        commands = self.commands
        protocol = QmpProtocol(commands.table(), self.version)
        stream = JsonStream()
        with self._send_lock:
            self._client, self._protocol = client, protocol
        self._send(client, protocol.greeting())
        self._connected.set()
        try:
            while not self._closed:
                # Serve what is queued before reading more: the socket's own
                # buffer holds the rest, so at most MAX_QUEUED wait here.
                for _ in range(MAX_QUEUED):
                    message = stream.next()
                    if message is None:
                        break
                    self._send(client, protocol.handle(message))
                    actions, commands.after_reply = commands.after_reply, []
                    for action in actions:
                        with contextlib.suppress(ControlError):
                            action()
                else:
                    continue  # more may be queued: serve it before reading
                readable = select.select([client, self._wake_r], [], [], 0.5)[0]
                if client not in readable:
                    continue
                try:
                    data = client.recv(4096)
                except OSError:
                    return
                if not data:
                    return
                stream.feed(data)
        finally:
            with self._send_lock:
                self._client, self._protocol = None, None


def attach_qmp(machine: Machine, control: RunControl, spec: str) -> QmpServer:
    """Listen for QMP clients as ``--qmp SPEC`` asks; events of ``control`` go to the client."""
    address = parse_qmp_address(spec)
    server = QmpServer(address, MachineCommands(machine, control))
    server.start()
    control.listeners.append(server.emit)
    return server
