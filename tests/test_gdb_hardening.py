"""Whatever a gdb client sends, the stub neither dies, nor grows without bound, nor hangs.

Anything that can connect to the stub's port is untrusted (issue 9, items 17-19).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kvmpy.debug.gdblisten import is_loopback
from kvmpy.debug.gdbproto import E_INVAL, E_NOSPC, TargetError
from kvmpy.debug.gdbstub import MAX_DEFERRED, GdbStub
from kvmpy.debug.hostprobe import DebugSupport
from kvmpy.machine import Machine
from kvmpy.x86.debugregs import DebugRegisters
from tests.helpers import Assembler, guest
from tests.test_gdbstub import Client, FakeTarget, RunningGuest, session_with

TOO_BIG = f"{1 << 64:x}"  # 2^64: one past the last linear address
SPIN = "spin:\n    jmp spin\n"


@pytest.fixture
def running() -> Iterator[list[RunningGuest]]:
    guests: list[RunningGuest] = []
    yield guests
    for each in guests:
        each.close()


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


# -- item 17: every number the protocol parses is bounded -------------------------------


@pytest.mark.parametrize(
    "packet",
    [
        f"m{TOO_BIG},4",
        f"m0,{TOO_BIG}",
        f"M{TOO_BIG},1:00",
        f"X{TOO_BIG},1:a",
        f"c{TOO_BIG}",
        f"s{TOO_BIG}",
        f"C05;{TOO_BIG}",
        f"S05;{TOO_BIG}",
        f"Z0,{TOO_BIG},1",
        f"Z1,{TOO_BIG},1",
        f"Z2,1000,{TOO_BIG}",
        f"z1,{TOO_BIG},1",
        f"Hg{TOO_BIG}",
        f"T{TOO_BIG}",
        f"p{TOO_BIG}",
        f"qXfer:features:read:target.xml:{TOO_BIG},10",
        "m" + "f" * 5000 + ",4",  # past int()'s digit limit
        "m1_0,4",  # int() takes these; gdb never sends them
        "m+10,4",
        "m 10,4",
        "m0x10,4",
        "Z1_0,1000,1",
    ],
)
def test_numbers_that_are_not_plain_64_bit_hex_are_refused(packet: str) -> None:
    session, target = session_with(FakeTarget(memory={0x10: 1, 0x1000: 2}))
    assert session.handle(packet.encode()) == E_INVAL
    assert not target.breakpoints and not target.resumed and not target.registers
    assert target.memory == {0x10: 1, 0x1000: 2}
    assert not session.running


def test_the_largest_64_bit_numbers_are_still_accepted() -> None:
    session, target = session_with()
    assert session.handle(b"Z1,ffffffffffffffff,1") == "OK"
    assert session.handle(b"c" + b"f" * 16) is None
    assert target.registers[1]["rip"] == (1 << 64) - 1


def test_debug_registers_refuse_ranges_past_the_address_space() -> None:
    dregs = DebugRegisters()
    for kind, address, length in ((1, 1 << 64, 1), (2, (1 << 64) - 4, 8), (1, -1, 1)):
        with pytest.raises(TargetError) as info:
            dregs.insert(kind, address, length)
        assert info.value.reply == E_INVAL
    # A huge watch is refused before it is cut into pieces (which would never end).
    with pytest.raises(TargetError) as info:
        dregs.insert(2, 0, 1 << 62)
    assert info.value.reply == E_NOSPC
    assert not dregs.active


def _still_serves_and_kills(run: RunningGuest) -> None:
    """A new connection still gets the stop reply, and its kill ends the run."""
    client = Client(run.stub.port)
    try:
        assert client.ask("?") == "T05thread:1;"
        client.send("k")
    finally:
        client.close()
    assert run.finish().message == "killed by gdb"


@pytest.mark.kvm
def test_bad_numbers_leave_the_server_and_the_guest_alive(running: list[RunningGuest]) -> None:
    run = RunningGuest(guest("gdb_target"), wait=True)
    running.append(run)
    client = Client(run.stub.port)
    try:
        assert client.ask("?") == "T05thread:1;"
        for packet in (f"m{TOO_BIG},4", f"m{'f' * 16},4", f"M{TOO_BIG},1:00",
                       f"X{TOO_BIG},1:a", f"c{TOO_BIG}", f"C05;{TOO_BIG}",
                       f"Z1,{TOO_BIG},1", f"Z0,{TOO_BIG},1", f"z1,{TOO_BIG},1"):  # fmt: skip
            assert client.ask(packet).startswith("E"), packet
        first = guest("gdb_target").read_bytes()[0]
        assert client.ask("m100000,1") == f"{first:02x}"  # still serving
        client.send("c")  # the refused Z1 cannot end the run
        assert client.reply() == "W00"
    finally:
        client.close()
    outcome = run.finish()
    assert (outcome.reason, outcome.exit_code) == ("exit", 0)


@pytest.mark.kvm
def test_a_later_connection_is_served_after_a_bad_packet(
    running: list[RunningGuest], assemble: Assembler
) -> None:
    run = RunningGuest(assemble(SPIN, mode="long"), wait=True)
    running.append(run)
    client = Client(run.stub.port)
    try:
        assert client.ask(f"m{TOO_BIG},4").startswith("E")
    finally:
        client.close()
    _still_serves_and_kills(run)


@pytest.mark.kvm
def test_an_internal_error_closes_only_that_connection(
    running: list[RunningGuest], assemble: Assembler
) -> None:
    run = RunningGuest(assemble(SPIN, mode="long"), wait=True)
    running.append(run)

    def broken(thread: int) -> dict[str, int]:
        raise RuntimeError("a bug in the stub")

    run.stub.read_registers = broken  # type: ignore[method-assign]
    client = Client(run.stub.port)
    try:
        assert client.ask("?") == "T05thread:1;"
        client.send("g")
        with pytest.raises(ConnectionError):
            client.reply()
    finally:
        client.close()
    assert any("internal error" in line and "a bug in the stub" in line for line in run.log)
    _still_serves_and_kills(run)


# -- item 18: nothing a client sends or fails to read grows without bound ----------------


@pytest.mark.kvm
def test_packets_sent_while_the_guest_runs_are_bounded(
    running: list[RunningGuest], assemble: Assembler
) -> None:
    run = RunningGuest(assemble(SPIN, mode="long"), wait=True)
    running.append(run)
    client = Client(run.stub.port)
    sent = 1000
    try:
        assert client.ask("QStartNoAckMode") == "OK"
        client.no_ack = True
        client.send("c")
        time.sleep(0.1)
        client.sock.sendall(b"".join(b"$g#67" for _ in range(sent)))
        wait_for(lambda: run.stub.dropped_packets == sent - MAX_DEFERRED, "the stub to drop")
        client.sock.sendall(b"\x03")
        assert client.reply() == "T02thread:1;"
        # Those kept are answered once the guest has stopped, in order.
        for _ in range(MAX_DEFERRED):
            reply = client.reply()
            assert len(reply) > 100 and not reply.startswith("E"), reply  # a g reply
        assert any(f"more than {MAX_DEFERRED} packets" in line for line in run.log)
        client.send("k")
    finally:
        client.close()
    run.finish()


@pytest.mark.kvm
def test_a_client_that_never_reads_is_disconnected(
    running: list[RunningGuest], assemble: Assembler
) -> None:
    run = RunningGuest(assemble(SPIN, mode="long"), wait=True)
    running.append(run)
    run.stub.send_timeout = 0.5
    silent = socket.socket()
    silent.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    silent.settimeout(10)
    silent.connect(("127.0.0.1", run.stub.port))
    try:
        # Each reply is 16 KiB of hex; the client reads none of them.
        silent.sendall(b"".join(b"$m100000,1ff0#" + b"%02x" % (sum(b"m100000,1ff0") & 0xFF)
                                for _ in range(2000)))  # fmt: skip
        wait_for(lambda: any("read nothing" in line for line in run.log), "a disconnect")
    finally:
        silent.close()
    client = Client(run.stub.port)  # the stub still serves the next client
    try:
        assert client.ask("?") == "T05thread:1;"
        client.send("k")
    finally:
        client.close()
    run.finish()


# -- item 19: loopback unless asked, and a warning when asked ----------------------------


def test_is_loopback() -> None:
    for address in ("127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1"):
        assert is_loopback(address), address
    for address in ("0.0.0.0", "::", "192.168.1.2", "fe80::1%eth0", "localhost", ""):
        assert not is_loopback(address), address


@pytest.mark.kvm
def test_listening_beyond_loopback_warns_once() -> None:
    with Machine(mem_size=4 << 20, irqchip=False) as machine:
        for host, warnings in (("127.0.0.1", 0), ("0.0.0.0", 1)):
            log: list[str] = []
            stub = GdbStub(machine, host, 0, support=DebugSupport(), log=log.append)
            stub.start()
            stub.close()
            beyond = [line for line in log if "beyond loopback" in line]
            assert len(beyond) == warnings, log
            if warnings:
                assert beyond[0].startswith("warning: listening on 0.0.0.0:")


@pytest.mark.kvm
def test_the_cli_warns_on_stderr_for_tcp_0() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kvmpy", "run", str(guest("real_hello")), "--gdb", "tcp:0:0"],
        capture_output=True, text=True, timeout=60, cwd=Path(__file__).parent.parent,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr  # the guest passed
    warnings = [line for line in result.stderr.splitlines() if "beyond loopback" in line]
    assert len(warnings) == 1, result.stderr
    assert warnings[0].startswith("kvmpy: gdb: warning: listening on 0:")
