"""The GDB Remote Serial Protocol, without I/O: framing, register layouts, commands.

Nothing here touches a socket or KVM, so every byte gdb can send is testable
against a fake target.  ``gdbstub`` puts it on a TCP connection and a VM.

Framing: a packet is ``$payload#cc`` where ``cc`` is the sum of the payload's
bytes modulo 256 in two hex digits.  Until ``QStartNoAckMode`` each side
answers a packet with ``+`` (good) or ``-`` (resend).  A lone 0x03 byte,
outside any packet, asks a running target to stop.  Binary data (``X``
writes, ``qXfer`` replies) escapes ``$ # } *`` as ``}`` then the byte XOR
0x20.

Registers: gdb learns the register set from the target description that
``qXfer:features:read:target.xml`` returns, and ``g``/``G``/``p``/``P``
carry register values in that order, each little-endian in hex.  A
``RegisterLayout`` describes one set; the x86 ones are in
``kvmpy.x86.gdb_registers``.

Every number gdb sends is untrusted: it must be plain hex and fit in 64
bits, or the reply is an error.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Protocol

from kvmpy.records import Record, field

# -- signals (gdb's own numbering, include/gdb/signals.def) ------------------------------

SIGINT = 2
SIGTRAP = 5
SIGKILL = 9
SIGSEGV = 11

PACKET_SIZE = 0x4000  # the largest packet we accept, announced in qSupported
INTERRUPT = 0x03

# Z/z packet types.
BP_SOFTWARE = 0
BP_HARDWARE = 1
WATCH_WRITE = 2
WATCH_READ = 3
WATCH_ACCESS = 4
BREAKPOINT_TYPES = (BP_SOFTWARE, BP_HARDWARE, WATCH_WRITE, WATCH_READ, WATCH_ACCESS)
WATCH_REASONS = {WATCH_WRITE: "watch", WATCH_READ: "rwatch", WATCH_ACCESS: "awatch"}

# Error replies carry a hex errno.
E_FAULT = "E0e"  # EFAULT: memory that is not there
E_INVAL = "E16"  # EINVAL: a malformed request
E_SRCH = "E03"  # ESRCH: no such thread
E_NOSPC = "E1c"  # ENOSPC: no free debug register
E_FAIL = "E01"


class TargetError(Exception):
    """The target cannot do what gdb asked: the reply is ``reply`` (an ``Exx``)."""

    def __init__(self, message: str, reply: str = E_FAIL) -> None:
        super().__init__(message)
        self.reply = reply


class Unsupported(TargetError):
    """gdb asked for something the target does not do: the reply is empty."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "")


# -- framing -----------------------------------------------------------------------------


def checksum(payload: bytes) -> int:
    return sum(payload) & 0xFF


def frame(payload: bytes | str) -> bytes:
    """``$payload#cc``; the payload must already be escaped if it holds binary data."""
    data = payload.encode("latin-1") if isinstance(payload, str) else payload
    return b"$" + data + b"#" + f"{checksum(data):02x}".encode()


_ESCAPED = frozenset(b"$#}*")


def escape(data: bytes) -> bytes:
    """Escape binary data for a packet: ``$ # } *`` become ``}`` and the byte XOR 0x20."""
    out = bytearray()
    for byte in data:
        if byte in _ESCAPED:
            out += bytes((0x7D, byte ^ 0x20))
        else:
            out.append(byte)
    return bytes(out)


def unescape(data: bytes) -> bytes:
    out = bytearray()
    escaped = False
    for byte in data:
        if escaped:
            out.append(byte ^ 0x20)
            escaped = False
        elif byte == 0x7D:
            escaped = True
        else:
            out.append(byte)
    if escaped:
        raise ValueError("binary data ends in the middle of an escape")
    return bytes(out)


class Packet(Record):
    payload: bytes


class BadPacket(Record):
    """A packet whose checksum did not match (ask for it again with ``-``)."""

    payload: bytes


class Interrupt(Record):
    """gdb's 0x03: stop the running target."""


class Ack(Record):
    good: bool


Event = Packet | BadPacket | Interrupt | Ack


class PacketDecoder:
    """Turns bytes from gdb into events; keeps a partial packet between calls."""

    def __init__(self, max_size: int = 2 * PACKET_SIZE) -> None:
        self.max_size = max_size
        self._body: bytearray | None = None  # inside $...; None between packets
        self._sum: bytearray | None = None  # the checksum digits after '#'

    def feed(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        for byte in data:
            if self._sum is not None:
                self._sum.append(byte)
                if len(self._sum) == 2:
                    events.append(self._finish())
            elif self._body is not None:
                if byte == ord("#"):
                    self._sum = bytearray()
                elif byte == ord("$"):  # a new packet: the old one was cut short
                    self._body = bytearray()
                elif len(self._body) < self.max_size:
                    self._body.append(byte)
                else:  # runaway packet: drop it and wait for the next '$'
                    self._body = None
            elif byte == ord("$"):
                self._body = bytearray()
            elif byte == INTERRUPT:
                events.append(Interrupt())
            elif byte == ord("+"):
                events.append(Ack(True))
            elif byte == ord("-"):
                events.append(Ack(False))
            # anything else between packets is line noise
        return events

    @property
    def buffered(self) -> int:
        """Bytes held of a packet not yet complete (at most ``max_size`` + 2)."""
        return len(self._body or b"") + len(self._sum or b"")

    def _finish(self) -> Packet | BadPacket:
        assert self._body is not None and self._sum is not None
        body, digits = bytes(self._body), bytes(self._sum)
        self._body = self._sum = None
        try:
            good = int(digits, 16) == checksum(body)
        except ValueError:
            good = False
        return Packet(body) if good else BadPacket(body)


# -- registers and target descriptions -----------------------------------------------


class Register(Record):
    name: str
    bits: int
    type: str = "int"
    group: str = ""

    @property
    def size(self) -> int:
        return self.bits // 8


class Feature(Record):
    name: str
    registers: tuple[Register, ...]
    types: str = ""  # XML type definitions the registers use


class RegisterLayout(Record):
    """One register set: its gdb architecture, features and the g-packet order."""

    architecture: str
    features: tuple[Feature, ...]
    pc: str  # the program counter's name
    registers: tuple[Register, ...] = field(init=False)

    def __post_init__(self) -> None:
        regs = tuple(reg for feature in self.features for reg in feature.registers)
        object.__setattr__(self, "registers", regs)

    @property
    def names(self) -> list[str]:
        return [reg.name for reg in self.registers]

    def target_xml(self) -> str:
        lines = [
            '<?xml version="1.0"?>',
            '<!DOCTYPE target SYSTEM "gdb-target.dtd">',
            "<target>",
            f"  <architecture>{self.architecture}</architecture>",
        ]
        number = 0
        for feature in self.features:
            lines.append(f'  <feature name="{feature.name}">')
            if feature.types:
                lines.append(feature.types.strip("\n"))
            for reg in feature.registers:
                group = f' group="{reg.group}"' if reg.group else ""
                lines.append(
                    f'    <reg name="{reg.name}" bitsize="{reg.bits}" type="{reg.type}"'
                    f' regnum="{number}"{group}/>'
                )
                number += 1
            lines.append("  </feature>")
        lines.append("</target>")
        return "\n".join(lines) + "\n"

    def encode(self, values: dict[str, int]) -> str:
        """The ``g`` reply: every register in order; ``xx`` bytes for those not given."""
        return "".join(encode_register(reg, values.get(reg.name)) for reg in self.registers)

    def decode(self, text: str) -> dict[str, int]:
        """A ``G`` packet's registers (those sent as ``xx`` are left out)."""
        values: dict[str, int] = {}
        at = 0
        for reg in self.registers:
            chunk = text[at : at + 2 * reg.size]
            if not chunk:
                break
            if len(chunk) != 2 * reg.size:
                raise ValueError(f"register {reg.name}: {len(chunk)} hex digits")
            at += len(chunk)
            if "x" not in chunk.lower():
                values[reg.name] = int.from_bytes(bytes.fromhex(chunk), "little")
        if at != len(text):
            raise ValueError(f"{len(text) - at} hex digits past the last register")
        return values


def encode_register(reg: Register, value: int | None) -> str:
    if value is None:
        return "xx" * reg.size
    return (value & ((1 << reg.bits) - 1)).to_bytes(reg.size, "little").hex()


# -- what a target must do ---------------------------------------------------------------


class Stop(Record):
    """The target stopped: a signal, the thread, and why (for the T reply)."""

    signal: int
    thread: int
    reason: str = ""  # "", swbreak, hwbreak, watch, rwatch, awatch
    address: int = 0  # the data address, for watchpoints


class Exited(Record):
    """The target is gone: exited with ``code``, or terminated by ``signal``."""

    code: int = 0
    signal: int | None = None


Status = Stop | Exited


class GdbTarget(Protocol):
    """What the session needs from a stopped target.  Threads are numbered from 1.

    Methods raise TargetError (an ``Exx`` reply) or Unsupported (an empty reply).
    """

    def layout(self) -> RegisterLayout: ...

    def threads(self) -> list[int]: ...

    def read_registers(self, thread: int) -> dict[str, int]: ...

    def write_registers(self, thread: int, values: dict[str, int]) -> None: ...

    def read_memory(self, thread: int, address: int, length: int) -> bytes:
        """Up to ``length`` bytes; fewer if the range runs into unmapped memory."""
        ...

    def write_memory(self, thread: int, address: int, data: bytes) -> None: ...

    def insert_breakpoint(self, kind: int, address: int, length: int) -> None: ...

    def remove_breakpoint(self, kind: int, address: int, length: int) -> None: ...

    def resume(self, actions: dict[int, str]) -> None:
        """Resume: thread -> "c" or "s"; threads left out stay stopped.

        The stop comes later: the transport asks ``GdbSession.stopped``.
        """
        ...

    def interrupt(self) -> None: ...

    def status(self) -> Status:
        """Why the target is stopped now (for ``?``)."""
        ...

    def kill(self) -> None: ...

    def detach(self) -> None: ...


# -- the session ---------------------------------------------------------------------


_HEX = re.compile(r"[0-9a-fA-F]{1,64}")
NUMBER_LIMIT = 1 << 64  # every address, length and thread fits in 64 bits


def _hex_int(text: str) -> int:
    """Plain hex (no sign, prefix, spaces or underscores) below 2^64, else ValueError."""
    if not _HEX.fullmatch(text):
        raise ValueError(f"not a hex number: {text[:20]!r}")
    value = int(text, 16)
    if value >= NUMBER_LIMIT:
        raise ValueError(f"{text[:20]!r}... does not fit in 64 bits")
    return value


class GdbSession:
    """One gdb connection's command handling.

    ``handle(payload)`` returns the reply payload, or None when there is none
    to send now: after a resume (the stop reply comes from ``stopped``), and
    after ``k``.  ``no_ack`` tells the transport to stop sending ``+``;
    ``closing`` that gdb is done (detach or kill).
    """

    def __init__(self, target: GdbTarget) -> None:
        self.target = target
        self.no_ack = False
        self.running = False
        self.closing = False
        self.gdb_features: set[str] = set()
        self.general_thread = 0  # Hg: 0 = any
        self.continue_thread = -1  # Hc: -1 = all
        self.current_thread = 1  # the thread of the last stop
        self._layout: RegisterLayout | None = None

    @property
    def layout(self) -> RegisterLayout:
        if self._layout is None:
            self._layout = self.target.layout()
        return self._layout

    # -- replies the transport asks for --

    def stopped(self, status: Status) -> str:
        """The stop reply for a target that stopped after a resume."""
        self.running = False
        return self.stop_reply(status)

    def stop_reply(self, status: Status) -> str:
        if isinstance(status, Exited):
            if status.signal is not None:
                return f"X{status.signal & 0xFF:02x}"
            return f"W{status.code & 0xFF:02x}"
        self.current_thread = status.thread
        self.general_thread = 0
        reply = f"T{status.signal:02x}thread:{status.thread:x};"
        if status.reason in ("swbreak", "hwbreak"):
            if status.reason in self.gdb_features:
                reply += f"{status.reason}:;"
        elif status.reason:
            reply += f"{status.reason}:{status.address:x};"
        return reply

    # -- commands --

    def handle(self, payload: bytes) -> str | None:
        if not payload:
            return ""
        try:
            return self._dispatch(payload)
        except Unsupported:
            return ""
        except TargetError as exc:
            return exc.reply
        except (ValueError, IndexError, KeyError, OverflowError):
            return E_INVAL

    def _dispatch(self, payload: bytes) -> str | None:
        if payload[:1] == b"X":  # the only command with binary data
            return self._write_binary(payload[1:])
        text = payload.decode("latin-1")
        first, rest = text[0], text[1:]
        simple: dict[str, Callable[[], str | None]] = {
            "?": lambda: self.stop_reply(self.target.status()),
            "g": self._read_all,
            "G": lambda: self._write_all(rest),
            "p": lambda: self._read_one(rest),
            "P": lambda: self._write_one(rest),
            "m": lambda: self._read_memory(rest),
            "M": lambda: self._write_memory(rest),
            "c": lambda: self._resume_all("c", rest),
            "s": lambda: self._resume_all("s", rest),
            "C": lambda: self._resume_all("c", rest.partition(";")[2]),
            "S": lambda: self._resume_all("s", rest.partition(";")[2]),
            "Z": lambda: self._breakpoint(rest, insert=True),
            "z": lambda: self._breakpoint(rest, insert=False),
            "H": lambda: self._set_thread(rest),
            "T": lambda: self._thread_alive(rest),
            "D": self._detach,
            "k": self._kill,
        }
        handler = simple.get(first)
        if handler is not None:
            return handler()
        if first == "q":
            return self._query(rest)
        if first == "Q":
            return self._set(rest)
        if first == "v":
            return self._v_packet(rest)
        return ""

    # registers

    def _thread(self) -> int:
        threads = self.target.threads()
        thread = self.general_thread
        if thread in (0, -1):
            thread = self.current_thread
        if thread not in threads:
            if not threads:
                raise TargetError("no threads", E_SRCH)
            thread = threads[0]
        return thread

    def _read_all(self) -> str:
        return self.layout.encode(self.target.read_registers(self._thread()))

    def _write_all(self, text: str) -> str:
        self.target.write_registers(self._thread(), self.layout.decode(text))
        return "OK"

    def _register(self, text: str) -> Register:
        number = _hex_int(text)
        registers = self.layout.registers
        if number >= len(registers):
            raise TargetError(f"no register {number}", E_INVAL)
        return registers[number]

    def _read_one(self, text: str) -> str:
        reg = self._register(text)
        value = self.target.read_registers(self._thread()).get(reg.name)
        return encode_register(reg, value)

    def _write_one(self, text: str) -> str:
        number, _, value = text.partition("=")
        reg = self._register(number)
        data = bytes.fromhex(value)
        if len(data) != reg.size:
            raise TargetError(f"{reg.name} has {reg.size} bytes, not {len(data)}", E_INVAL)
        self.target.write_registers(self._thread(), {reg.name: int.from_bytes(data, "little")})
        return "OK"

    # memory

    @staticmethod
    def _address_length(text: str) -> tuple[int, int]:
        address, _, length = text.partition(",")
        return _hex_int(address), _hex_int(length)

    def _read_memory(self, text: str) -> str:
        address, length = self._address_length(text)
        length = min(length, (PACKET_SIZE - 4) // 2)
        if length == 0:
            return ""
        data = self.target.read_memory(self._thread(), address, length)
        if not data:
            raise TargetError(f"cannot read {address:#x}", E_FAULT)
        return data.hex()

    def _write_memory(self, text: str) -> str:
        where, _, hexdata = text.partition(":")
        address, length = self._address_length(where)
        data = bytes.fromhex(hexdata)
        if len(data) != length:
            raise TargetError(f"M says {length} bytes but carries {len(data)}", E_INVAL)
        if data:
            self.target.write_memory(self._thread(), address, data)
        return "OK"

    def _write_binary(self, payload: bytes) -> str:
        where, sep, raw = payload.partition(b":")
        if not sep:
            return E_INVAL
        try:
            address, length = self._address_length(where.decode("latin-1"))
            data = unescape(raw)
        except ValueError:
            return E_INVAL
        if len(data) != length:
            return E_INVAL
        try:
            if data:
                self.target.write_memory(self._thread(), address, data)
        except TargetError as exc:
            return exc.reply
        return "OK"

    # execution

    def _resume_all(self, action: str, address: str) -> str | None:
        threads = self.target.threads()
        if address:
            pc = self.layout.pc
            self.target.write_registers(self._thread(), {pc: _hex_int(address)})
        if action == "s":
            # Step the Hc thread (or the current one); the others stay stopped.
            thread = self.continue_thread
            if thread in (0, -1) or thread not in threads:
                thread = self.current_thread if self.current_thread in threads else threads[0]
            actions = {thread: "s"}
        else:
            actions = dict.fromkeys(threads, "c")
        return self._resume(actions)

    def _resume(self, actions: dict[int, str]) -> str | None:
        self.target.resume(actions)
        self.running = True
        return None

    def _v_packet(self, text: str) -> str | None:
        if text == "Cont?":
            return "vCont;c;C;s;S"
        if text.startswith("Cont;"):
            return self._vcont(text[5:])
        if text.startswith("Kill"):
            self.target.kill()
            self.closing = True
            return "OK"
        return ""  # vMustReplyEmpty, vFile, vAttach, vRun...

    def _vcont(self, text: str) -> str | None:
        threads = self.target.threads()
        actions: dict[int, str] = {}
        for item in text.split(";"):
            verb, _, thread_text = item.partition(":")
            if not verb or verb[0] not in "cCsS":
                raise Unsupported(f"vCont action {verb!r}")
            action = verb[0].lower()
            if thread_text:
                thread = self._parse_thread(thread_text)
                selected = threads if thread in (0, -1) else [thread]
            else:
                selected = threads
            for each in selected:
                if each in threads:
                    actions.setdefault(each, action)  # the leftmost action that matches wins
        if not actions:
            raise TargetError("vCont names no thread", E_SRCH)
        return self._resume(actions)

    def _breakpoint(self, text: str, insert: bool) -> str:
        fields = text.split(";")[0].split(",")
        kind, address, length = _hex_int(fields[0]), _hex_int(fields[1]), _hex_int(fields[2])
        if kind not in BREAKPOINT_TYPES:
            raise Unsupported(f"breakpoint type {kind}")
        if insert:
            self.target.insert_breakpoint(kind, address, length)
        else:
            self.target.remove_breakpoint(kind, address, length)
        return "OK"

    def _detach(self) -> str:
        self.target.detach()
        self.closing = True
        return "OK"

    def _kill(self) -> None:
        self.target.kill()
        self.closing = True
        return None

    # threads

    @staticmethod
    def _parse_thread(text: str) -> int:
        if text.startswith("p"):  # multiprocess form p<pid>.<tid>: we have one process
            text = text.partition(".")[2] or "-1"
        return -1 if text == "-1" else _hex_int(text)

    def _set_thread(self, text: str) -> str:
        which, thread = text[:1], self._parse_thread(text[1:])
        if thread not in (0, -1) and thread not in self.target.threads():
            return E_SRCH
        if which == "g":
            self.general_thread = thread
        elif which == "c":
            self.continue_thread = thread
        else:
            return E_INVAL
        return "OK"

    def _thread_alive(self, text: str) -> str:
        return "OK" if self._parse_thread(text) in self.target.threads() else E_SRCH

    # queries

    def _query(self, text: str) -> str:
        name, _, args = text.partition(":")
        if name == "Supported":
            self.gdb_features = {
                feature[:-1] for feature in args.split(";") if feature.endswith("+")
            }
            return (
                f"PacketSize={PACKET_SIZE:x};qXfer:features:read+;QStartNoAckMode+;"
                "swbreak+;hwbreak+;vContSupported+"
            )
        if name == "Xfer":
            return self._xfer(args)
        if text == "Attached" or text.startswith("Attached:"):
            return "1"  # a VM that was running: on quit, gdb detaches instead of killing
        if text == "C":
            return f"QC{self.current_thread:x}"
        if text == "fThreadInfo":
            return "m" + ",".join(f"{thread:x}" for thread in self.target.threads())
        if text == "sThreadInfo":
            return "l"
        if text.startswith("ThreadExtraInfo,"):
            thread = self._parse_thread(text.partition(",")[2])
            return f"vCPU {thread - 1}".encode().hex()
        if name == "Symbol":
            return "OK"
        return ""  # qOffsets, qTStatus, qRcmd and the rest: not supported

    def _xfer(self, args: str) -> str:
        obj, operation, annex, span = [*args.split(":"), "", "", ""][:4]
        if obj != "features" or operation != "read":
            return ""
        if annex != "target.xml":
            return E_FAIL
        offset, length = self._address_length(span)
        length = min(length, PACKET_SIZE // 2)  # escaping may double it
        document = self.layout.target_xml().encode()
        chunk = document[offset : offset + length]
        marker = "l" if offset + length >= len(document) else "m"
        return marker + escape(chunk).decode("latin-1")

    def _set(self, text: str) -> str:
        if text == "StartNoAckMode":
            self.no_ack = True
            return "OK"
        return ""
