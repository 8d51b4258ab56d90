"""QMP: the framing and protocol without KVM, then a real guest driven by ``qemu.qmp``."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from kvmpy.qmp import (
    MAX_MESSAGE,
    JsonStream,
    QmpError,
    QmpProtocol,
    parse_qmp_address,
    parse_x_format,
)
from tests.helpers import ROOT, guest

# -- addresses -------------------------------------------------------------------------


def test_addresses_in_qemus_spelling() -> None:
    unix = parse_qmp_address("unix:/tmp/q.sock,server,wait=off")
    assert (unix.kind, unix.path, unix.wait) == ("unix", "/tmp/q.sock", False)
    assert parse_qmp_address("unix:/tmp/q.sock,server").wait  # QEMU waits by default
    assert not parse_qmp_address("unix:/tmp/q.sock").wait
    assert parse_qmp_address("unix:/q,server=on,nowait").wait is False
    tcp = parse_qmp_address("tcp:127.0.0.1:4444")
    assert (tcp.kind, tcp.host, tcp.port) == ("tcp", "127.0.0.1", 4444)
    assert parse_qmp_address("tcp::4444,server,wait=off").host == "127.0.0.1"


@pytest.mark.parametrize(
    "spec",
    ["stdio", "unix:", "tcp:host", "tcp:h:99999", "unix:/q,server=off", "unix:/q,frob"],
)
def test_bad_addresses_are_refused(spec: str) -> None:
    with pytest.raises(ValueError, match="bad --qmp"):
        parse_qmp_address(spec)


# -- framing ---------------------------------------------------------------------------


def _drain(stream: JsonStream) -> list[dict[str, Any] | QmpError]:
    out = []
    while (message := stream.next()) is not None:
        out.append(message)
    return out


def test_stream_splits_objects_across_reads() -> None:
    stream = JsonStream()
    text = b'{"execute": "a", "arguments": {"s": "}{\\"x"}}{"execute":"b"}\r\n  {"exec'
    for byte in text:
        stream.feed(bytes([byte]))
    stream.feed(b'ute": "c"}')
    messages = _drain(stream)
    assert messages == [
        {"execute": "a", "arguments": {"s": '}{"x'}},
        {"execute": "b"},
        {"execute": "c"},
    ]


def test_malformed_json_gets_one_error_and_the_stream_goes_on() -> None:
    stream = JsonStream()
    stream.feed(b'{"execute": nonsense}\ngarbage here\n[1, 2]\n{"execute": "ok"}')
    messages = _drain(stream)
    errors = [m for m in messages if isinstance(m, QmpError)]
    assert len(errors) == 3
    assert all("JSON parse error" in e.desc for e in errors)
    assert messages[-1] == {"execute": "ok"}


def test_oversized_message_is_dropped_with_one_error() -> None:
    stream = JsonStream(limit=1000)
    stream.feed(b'{"execute": "x", "arguments": {"pad": "' + b"a" * 5000 + b'"}}')
    stream.feed(b'{"execute": "after"}')
    messages = _drain(stream)
    assert len(messages) == 2
    assert isinstance(messages[0], QmpError) and "longer than 1000" in messages[0].desc
    assert messages[1] == {"execute": "after"}
    assert stream.pending < 1000  # nothing of the big one is kept
    assert MAX_MESSAGE >= 4096


def test_deep_nesting_is_an_error_not_a_crash() -> None:
    stream = JsonStream()
    stream.feed(b'{"a":' + b"[" * 5000 + b"]" * 5000 + b'}{"execute": "next"}')
    messages = _drain(stream)
    assert len(messages) == 2
    assert isinstance(messages[0], QmpError) and "nested deeper" in messages[0].desc
    assert messages[1] == {"execute": "next"}


# -- the protocol ----------------------------------------------------------------------


def _protocol() -> QmpProtocol:
    return QmpProtocol({"echo": lambda arguments: arguments}, (0, 1, 0))


def test_greeting_has_the_version_and_no_capabilities() -> None:
    greeting = _protocol().greeting()["QMP"]
    assert greeting["version"]["qemu"] == {"major": 0, "minor": 1, "micro": 0}
    assert greeting["version"]["package"].startswith("kvmpy")
    assert greeting["capabilities"] == []


def test_commands_wait_for_capabilities_negotiation() -> None:
    protocol = _protocol()
    reply = protocol.handle({"execute": "echo", "id": 7})
    assert reply == {
        "error": {
            "class": "CommandNotFound",
            "desc": "Expecting capabilities negotiation with 'qmp_capabilities'",
        },
        "id": 7,
    }
    assert protocol.handle({"execute": "qmp_capabilities"}) == {"return": {}}
    assert protocol.handle({"execute": "echo", "arguments": {"a": 1}, "id": "x"}) == {
        "return": {"a": 1},
        "id": "x",
    }
    again = protocol.handle({"execute": "qmp_capabilities"})
    assert again["error"]["class"] == "CommandNotFound"


def test_errors_use_qmp_classes() -> None:
    protocol = _protocol()
    protocol.handle({"execute": "qmp_capabilities"})
    assert protocol.handle({"execute": "nope"})["error"]["class"] == "CommandNotFound"
    assert protocol.handle({"execute": 3})["error"]["class"] == "GenericError"
    assert protocol.handle({"execute": "echo", "arguments": []})["error"]["class"] == "GenericError"
    assert "out-of-band" in protocol.handle({"exec-oob": "echo"})["error"]["desc"]
    refused = _protocol().handle({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}})
    assert refused["error"]["class"] == "GenericError"


def test_x_formats() -> None:
    assert parse_x_format("") == (1, "x", 4)
    assert parse_x_format("/10xb") == (10, "x", 1)
    assert parse_x_format("/2g") == (2, "x", 8)
    assert parse_x_format("/4c") == (4, "c", 1)
    with pytest.raises(QmpError):
        parse_x_format("/3z")


# -- a real guest, driven by qemu.qmp ------------------------------------------------------


class Kvmpy:
    """``kvmpy run`` in a subprocess, with stdin to type into the guest."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "kvmpy", "run", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
        )

    def type(self, data: bytes) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(data)
        self.process.stdin.flush()

    def finish(self, timeout: float = 60) -> tuple[int, str, str]:
        out, err = self.process.communicate(timeout=timeout)
        return self.process.returncode, out.decode(), err.decode()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()


def _connect(path: Path, process: Kvmpy) -> QEMUMonitorProtocol:
    deadline = time.monotonic() + 60
    while not path.exists():
        if process.process.poll() is not None or time.monotonic() > deadline:
            _, _, err = process.finish()
            pytest.fail(f"kvmpy never listened on {path}: {err}")
        time.sleep(0.05)
    qmp = QEMUMonitorProtocol(str(path))
    qmp.connect()
    return qmp


def _close(qmp: QEMUMonitorProtocol) -> None:
    with contextlib.suppress(EOFError):  # kvmpy may have closed its end first
        qmp.close()


def _cmd(qmp: QEMUMonitorProtocol, name: str, **arguments: object) -> Any:
    """qemu.qmp's ``cmd``: the return value, or ExecuteError."""
    return qmp.cmd(name, **arguments)


# Events the client had queued when kvmpy closed the socket, per client.
_LEFT_OVER: dict[int, list[dict[str, Any]]] = {}


def _event(qmp: QEMUMonitorProtocol, name: str) -> dict[str, Any]:
    left = _LEFT_OVER.get(id(qmp))
    if left is not None:
        event = left.pop(0) if left else None
    else:
        try:
            event = qmp.pull_event(wait=30.0)
        except EOFError:
            # kvmpy closes the socket right after SHUTDOWN (as QEMU does); the legacy
            # client then raises before it hands out what it had already queued.
            pending = [dict(e) for e in qmp._qmp.events.clear()]  # its default listener
            _LEFT_OVER[id(qmp)] = pending[1:]
            event = pending[0] if pending else None
    assert event is not None and event["event"] == name, event
    assert set(event["timestamp"]) == {"seconds", "microseconds"}
    return event


@pytest.fixture
def counter(tmp_path: Path) -> Iterator[tuple[Kvmpy, QEMUMonitorProtocol]]:
    socket_path = tmp_path / "qmp.sock"
    process = Kvmpy(str(guest("counter")), "--qmp", f"unix:{socket_path},server", "--timeout", "90")
    try:
        qmp = _connect(socket_path, process)
        try:
            yield process, qmp
        finally:
            _close(qmp)
    finally:
        process.kill()


@pytest.mark.kvm
def test_pause_dump_and_resume_a_running_guest(
    counter: tuple[Kvmpy, QEMUMonitorProtocol], tmp_path: Path
) -> None:
    process, qmp = counter
    assert _cmd(qmp, "query-status") == {"running": True, "singlestep": False, "status": "running"}
    process.type(b"a")  # the counter prints a line per byte
    _cmd(qmp, "stop")
    _event(qmp, "STOP")
    assert _cmd(qmp, "query-status")["status"] == "paused"

    image = guest("counter").read_bytes()
    physical, virtual, screen = tmp_path / "p.bin", tmp_path / "v.bin", tmp_path / "s.ppm"
    _cmd(qmp, "pmemsave", val=0x7C00, size=len(image), filename=str(physical))
    _cmd(qmp, "memsave", val=0x7C00, size=len(image), filename=str(virtual))
    assert physical.read_bytes() == image
    assert virtual.read_bytes() == image  # real mode: linear is physical
    registers = _cmd(qmp, "human-monitor-command", **{"command-line": "info registers"})
    assert "RIP=" in registers and "CR0=" in registers
    dump = _cmd(qmp, "human-monitor-command", **{"command-line": "xp /4xb 0x7c00"})
    assert dump == "0000000000007c00: " + " ".join(f"0x{b:02x}" for b in image[:4]) + "\n"
    _cmd(qmp, "screendump", filename=str(screen))
    assert screen.read_bytes().startswith(b"P6\n720 400\n255\n")
    assert len(screen.read_bytes()) == len(b"P6\n720 400\n255\n") + 720 * 400 * 3
    png = tmp_path / "s.png"
    _cmd(qmp, "screendump", filename=str(png), format="png")
    assert png.read_bytes().startswith(b"\x89PNG")
    cpus = _cmd(qmp, "query-cpus-fast")
    assert [cpu["cpu-index"] for cpu in cpus] == [0]

    _cmd(qmp, "cont")
    _event(qmp, "RESUME")
    process.type(b"bc")
    names = {entry["name"] for entry in _cmd(qmp, "query-commands")}
    assert {"stop", "cont", "quit", "memsave", "screendump", "snapshot-save"} <= names
    assert _cmd(qmp, "query-version")["qemu"]["major"] == 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # give the guest time to count the last two bytes
        dump = _cmd(qmp, "human-monitor-command", **{"command-line": "info registers"})
        if dump.splitlines()[0].startswith("RAX=") and "RBX=0000000000000003" in dump:
            break
        time.sleep(0.1)
    _cmd(qmp, "quit")
    shutdown = _event(qmp, "SHUTDOWN")
    assert shutdown["data"] == {"guest": False, "reason": "host-qmp-quit"}
    status, out, err = process.finish()
    assert status == 0, err
    assert [line for line in out.splitlines() if line] == ["count 00", "count 01", "count 02"]


@pytest.mark.kvm
def test_errors_from_a_live_machine(counter: tuple[Kvmpy, QEMUMonitorProtocol]) -> None:
    _, qmp = counter
    cases: list[tuple[str, dict[str, object], str]] = [
        ("no-such-command", {}, "CommandNotFound"),
        ("memsave", {"val": 0, "size": 16}, "GenericError"),
        ("pmemsave", {"val": 1 << 40, "size": 16, "filename": "/dev/null"}, "GenericError"),
        ("screendump", {"filename": "/dev/null", "format": "bmp"}, "GenericError"),
        ("system_wakeup", {}, "GenericError"),
        ("stop", {"bogus": 1}, "GenericError"),
    ]
    for command, arguments, error_class in cases:
        reply: Any = qmp.cmd_raw(command, arguments or None)
        assert reply["error"]["class"] == error_class, (command, reply)
    assert _cmd(qmp, "query-status")["status"] == "running"


@pytest.mark.kvm
def test_malformed_json_on_the_socket_gets_one_error(tmp_path: Path) -> None:
    socket_path = tmp_path / "qmp.sock"
    process = Kvmpy(str(guest("counter")), "--qmp", f"unix:{socket_path},server,wait=off")
    try:
        deadline = time.monotonic() + 60
        while not socket_path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        with socket.socket(socket.AF_UNIX) as raw:
            raw.connect(str(socket_path))
            reader = raw.makefile("rb")
            assert "QMP" in json.loads(reader.readline())
            raw.sendall(b'{"execute": qmp_capabilities}\n{"execute": "qmp_capabilities"}\n')
            first, second = json.loads(reader.readline()), json.loads(reader.readline())
            assert first["error"]["class"] == "GenericError"
            assert "JSON parse error" in first["error"]["desc"]
            assert second == {"return": {}}
            raw.sendall(b'{"execute": "quit"}')
            assert json.loads(reader.readline()) == {"return": {}}
        status, _, _ = process.finish()
        assert status == 0
    finally:
        process.kill()


@pytest.mark.kvm
def test_start_paused_until_cont(tmp_path: Path) -> None:
    socket_path = tmp_path / "qmp.sock"
    process = Kvmpy(str(guest("real_hello")), "-S", "--qmp", f"unix:{socket_path},server,wait=off")
    try:
        qmp = _connect(socket_path, process)
        assert _cmd(qmp, "query-status")["status"] == "prelaunch"
        time.sleep(0.3)
        _cmd(qmp, "cont")
        _event(qmp, "RESUME")
        _event(qmp, "SHUTDOWN")
        _close(qmp)
        status, out, _ = process.finish()
        assert status == 1 and "real mode OK" in out
    finally:
        process.kill()


@pytest.mark.kvm
def test_system_reset_restarts_the_guest_and_snapshots_round_trip(
    counter: tuple[Kvmpy, QEMUMonitorProtocol], tmp_path: Path
) -> None:
    process, qmp = counter
    process.type(b"x")
    time.sleep(0.5)
    saved = tmp_path / "snap"
    _cmd(qmp, "snapshot-save", **{"job-id": "s", "tag": str(saved), "vmstate": "x", "devices": []})
    assert (saved / "snapshot.json").exists()
    _cmd(qmp, "system_reset")
    reset = _event(qmp, "RESET")
    assert reset["data"] == {"guest": False, "reason": "host-qmp-system-reset"}
    assert _cmd(qmp, "query-status")["status"] == "running"
    process.type(b"y")  # counts from 0 again after the reset
    time.sleep(0.5)
    _cmd(qmp, "snapshot-load", **{"job-id": "l", "tag": str(saved), "vmstate": "x", "devices": []})
    process.type(b"z")  # back where the snapshot was: this is count 01
    time.sleep(0.5)
    _cmd(qmp, "system_powerdown")
    _event(qmp, "POWERDOWN")
    _cmd(qmp, "quit")
    status, out, _ = process.finish()
    assert status == 0
    assert [line for line in out.splitlines() if line] == ["count 00", "count 00", "count 01"]


@pytest.mark.kvm
def test_suspend_and_wakeup_events_of_a_guest_in_s3(tmp_path: Path) -> None:
    socket_path = tmp_path / "qmp.sock"
    process = Kvmpy(str(guest("s3_resume")), "-S", "--qmp", f"unix:{socket_path},server")
    try:
        qmp = _connect(socket_path, process)
        _cmd(qmp, "cont")  # once negotiated: events before that are not sent
        _event(qmp, "RESUME")
        _event(qmp, "SUSPEND")  # the guest wrote SLP_TYP 1 | SLP_EN
        assert _cmd(qmp, "query-status")["status"] == "suspended"
        _event(qmp, "WAKEUP")  # its RTC alarm, two seconds later
        _event(qmp, "SHUTDOWN")
        _close(qmp)
        status, _, err = process.finish()
        assert status == 1, err  # resumed, checked RAM and WAK_STS, passed
    finally:
        process.kill()


@pytest.mark.kvm
def test_system_wakeup_wakes_a_sleeping_guest(tmp_path: Path) -> None:
    socket_path = tmp_path / "qmp.sock"
    # Paused until the client has negotiated: events before that are not sent
    # (as in QEMU), and a busy host could let the guest suspend before it.
    process = Kvmpy(str(guest("s3_resume")), "-S", "--qmp", f"unix:{socket_path},server")
    try:
        qmp = _connect(socket_path, process)
        _cmd(qmp, "cont")
        _event(qmp, "RESUME")
        _event(qmp, "SUSPEND")
        started = time.monotonic()
        _cmd(qmp, "system_wakeup")  # before the guest's alarm: kvmpy presses the power button
        _event(qmp, "WAKEUP")
        assert time.monotonic() - started < 1.5  # the alarm is two seconds away
        _close(qmp)
        process.finish()  # it finds RTC_STS clear after this wake-up, and says so
    finally:
        process.kill()
