"""--serial back ends, COM2, the terminal filter and mon:stdio driven through a real pty."""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import socket
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmpy.serialio import (
    EscapeDecoder,
    SerialSpec,
    TerminalFilter,
    parse_serial,
    parse_serials,
)
from tests.helpers import ROOT, Assembler, guest

# -- parsing -------------------------------------------------------------------------------


def test_qemu_spellings_parse() -> None:
    assert parse_serial("stdio") == SerialSpec("stdio")
    assert parse_serial("stdio,raw") == SerialSpec("stdio", raw=True)
    assert parse_serial("mon:stdio") == SerialSpec("mon")
    assert parse_serial("file:/tmp/x") == SerialSpec("file", path="/tmp/x")
    assert parse_serial("pty") == SerialSpec("pty")
    assert parse_serial("null") == SerialSpec("null")
    assert parse_serial("unix:/tmp/s,server") == SerialSpec("unix", path="/tmp/s", wait=True)
    assert parse_serial("unix:/tmp/s,server,wait=off").wait is False
    assert parse_serial("tcp::4555,server,nowait") == SerialSpec(
        "tcp", host="127.0.0.1", port=4555, wait=False
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("vc", "expected stdio"),
        ("file:", "no file name"),
        ("unix:/tmp/s", "only listens"),
        ("tcp:host,server", "expected tcp:HOST:PORT"),
        ("stdio,frob", "unknown option"),
    ],
)
def test_bad_specs_are_refused(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_serial(spec)


def test_at_most_two_ports_and_one_stdio() -> None:
    assert parse_serials(None) == [SerialSpec("stdio")]
    with pytest.raises(ValueError, match="COM1 and COM2"):
        parse_serials(["null", "null", "null"])
    with pytest.raises(ValueError, match="only one"):
        parse_serials(["stdio", "mon:stdio"])


# -- the terminal filter -------------------------------------------------------------------


def test_filter_keeps_text_newlines_and_colours() -> None:
    text = "héllo\tworld\r\n\x1b[1;31mred\x1b[0m\x08".encode()
    assert TerminalFilter().feed(text) == text


@pytest.mark.parametrize(
    "hostile",
    [
        b"\x1b]0;new title\x07",  # OSC: window title
        b"\x1b]52;c;Y2xpcA==\x1b\\",  # OSC 52: the clipboard
        b"\x1b[2J\x1b[H",  # clear screen, cursor home
        b"\x1b[?1049h",  # alternate screen
        b"\x1bc",  # full reset
        b"\x1bP$q\x1b\\",  # DCS
        b"\x00\x07\x0e\x7f",  # NUL, bell, shift out, DEL
        b"\x1b[" + b"1;" * 100 + b"m",  # a colour sequence too long to be honest
    ],
)
def test_filter_drops_other_controls(hostile: bytes) -> None:
    assert TerminalFilter().feed(b"a" + hostile + b"b") == b"ab"


def test_filter_state_carries_across_chunks() -> None:
    flt = TerminalFilter()
    pieces = [b"x\x1b", b"]0;ti", b"tle\x07y\x1b[3", b"2mz"]
    assert b"".join(flt.feed(piece) for piece in pieces) == b"xy\x1b[32mz"


# -- the Ctrl-A escapes --------------------------------------------------------------------


def test_escape_decoder() -> None:
    decoder = EscapeDecoder()
    assert decoder.feed(b"ab\x01hcd\x01\x01e\x01") == [
        ("data", b"ab"),
        ("command", "h"),
        ("data", b"cd\x01e"),
    ]
    assert decoder.feed(b"x\x03") == [("command", "x"), ("data", b"\x03")]
    assert decoder.feed(b"\x01z!") == [("data", b"!")]  # unknown command: dropped


# -- back ends with a real guest -------------------------------------------------------------

COM2_GUEST = """
    mov $0x3f8, %dx
    mov $'1', %al
    out %al, %dx
    mov $0x2f8, %dx
    mov $'2', %al
    out %al, %dx
    mov $'\\n', %al
    out %al, %dx
    mov $0, %al
    out %al, $0xf4
    hlt
"""


def _kvmpy(*argv: str, **kwargs: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        [sys.executable, "-m", "kvmpy", *argv], capture_output=True, cwd=ROOT, timeout=60, **kwargs
    )


@pytest.mark.kvm
def test_com2_goes_to_its_own_back_end(assemble: Assembler, tmp_path: Path) -> None:
    image = assemble(COM2_GUEST)
    com2 = tmp_path / "com2.txt"
    result = _kvmpy("run", str(image), "--serial", "stdio", "--serial", f"file:{com2}")
    assert result.returncode == 1, result.stderr
    assert result.stdout == b"1"
    assert com2.read_bytes() == b"2\n"
    com1 = tmp_path / "com1.txt"
    quiet = _kvmpy("run", str(image), "--serial", f"file:{com1}")
    assert (quiet.returncode, quiet.stdout, com1.read_bytes()) == (1, b"", b"1")
    assert _kvmpy("run", str(image), "--serial", "null").stdout == b""


@pytest.mark.kvm
def test_unix_socket_server_carries_both_ways(tmp_path: Path) -> None:
    path = tmp_path / "com1.sock"
    process = subprocess.Popen(
        [sys.executable, "-m", "kvmpy", "run", str(guest("counter")), "--serial",
         f"unix:{path},server"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(path))
            client.settimeout(30)
            received = b""
            for _ in range(20):
                client.sendall(b"x")
                while received.count(b"\n") < _ + 1:
                    received += client.recv(100)
        assert received.splitlines()[-1] == b"count 19"
        _, stderr = process.communicate(timeout=30)
        assert process.returncode == 1, stderr
        assert b"waiting for a client" in stderr
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


@pytest.mark.kvm
def test_pty_back_end(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "kvmpy", "run", str(guest("counter")), "--serial", "pty"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    try:
        assert process.stderr is not None
        line = process.stderr.readline().decode()
        match = re.match(r"kvmpy: COM1 on (/dev/pts/\d+)", line)
        assert match, line
        fd = os.open(match.group(1), os.O_RDWR | os.O_NOCTTY)
        try:
            os.write(fd, b"ab")
            assert _read_until(fd, b"count 01\n", 30).endswith(b"count 01\n")
        finally:
            os.close(fd)
    finally:
        process.kill()
        process.communicate()


# -- the interactive console, in a real terminal ------------------------------------------------


def _read_until(fd: int, wanted: bytes, timeout: float) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while wanted not in seen:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"never saw {wanted!r}; got {seen!r}")
        if select.select([fd], [], [], remaining)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                chunk = b""
            if not chunk:
                raise AssertionError(f"EOF before {wanted!r}; got {seen!r}")
            seen += chunk
    return seen


@contextlib.contextmanager
def _in_a_terminal(*argv: str) -> Iterator[tuple[subprocess.Popen[bytes], int, int]]:
    """kvmpy with a pty as its controlling terminal: (process, master, slave)."""
    master, slave = os.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "kvmpy", *argv],
        stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, start_new_session=True,
    )  # fmt: skip
    try:
        yield process, master, slave
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)
        os.close(master)
        os.close(slave)


@pytest.mark.kvm
def test_mon_stdio_keys_help_monitor_and_quit() -> None:
    with _in_a_terminal("run", str(guest("counter")), "--serial", "mon:stdio") as (
        process,
        master,
        slave,
    ):
        before = termios.tcgetattr(slave)
        time.sleep(1.0)  # let kvmpy switch the terminal to raw
        assert not termios.tcgetattr(slave)[3] & termios.ECHO
        os.write(master, b"\x03")  # Ctrl-C is a key for the guest, not a signal
        _read_until(master, b"count 00", 30)
        os.write(master, b"\x01h")
        _read_until(master, b"C-a x    exit kvmpy", 10)
        os.write(master, b"\x01c")
        _read_until(master, b"(kvmpy) ", 10)
        os.write(master, b"info status\r")
        _read_until(master, b"VM status: running", 10)
        os.write(master, b"stop\rinfo status\r")
        _read_until(master, b"VM status: paused", 10)
        os.write(master, b"cont\r\x01c")
        os.write(master, b"y")
        _read_until(master, b"count 01", 30)
        os.write(master, b"\x01x")
        assert process.wait(timeout=30) == 0
        assert termios.tcgetattr(slave) == before  # the terminal is back as it was


@pytest.mark.kvm
def test_mon_stdio_restores_the_terminal_on_sigterm() -> None:
    with _in_a_terminal("run", str(guest("counter")), "--serial", "mon:stdio") as (
        process,
        _master,
        slave,
    ):
        before = termios.tcgetattr(slave)
        time.sleep(1.0)
        assert termios.tcgetattr(slave) != before
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        assert termios.tcgetattr(slave) == before


@pytest.mark.kvm
def test_plain_stdio_on_a_terminal_filters_escapes(assemble: Assembler) -> None:
    text = "\x1b]0;pwned\x07\x1b[2Jok \x1b[32mgreen\x1b[0m\n"
    body = "".join(f"mov ${ord(ch)}, %al\nout %al, %dx\n" for ch in text)  # one OUT per character
    image = assemble(f"mov $0x3f8, %dx\n{body}mov $0, %al\nout %al, $0xf4\nhlt")
    for extra, expected in (((), b"ok \x1b[32mgreen\x1b[0m"), (("--serial", "stdio,raw"), None)):
        with _in_a_terminal("run", str(image), *extra) as (process, master, _slave):
            seen = _read_until(master, b"\x1b[0m", 30)
            assert process.wait(timeout=30) == 1
        if expected is not None:
            assert expected in seen and b"pwned" not in seen and b"\x1b[2J" not in seen
        else:
            assert b"\x1b]0;pwned\x07\x1b[2J" in seen
