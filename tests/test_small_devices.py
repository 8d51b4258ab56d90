"""Unit tests for QEMU's debug-exit port and debugcon, the POST-code sink, absent ports."""

from __future__ import annotations

import pytest

from kvmpy.bus import Bus
from kvmpy.devices.absent import LINUX_PROBED_PORTS, AbsentPorts
from kvmpy.devices.base import Device
from kvmpy.devices.debug_exit import DEBUG_EXIT_PORT, DEBUG_EXIT_PORTS, DebugExit, exit_status
from kvmpy.devices.debugcon import DEBUGCON_PORT, DebugCon
from kvmpy.devices.post import POST_PORT, PostCode
from kvmpy.machine import Machine
from kvmpy.x86.pc import PC, with_debugcon


@pytest.mark.parametrize(
    ("value", "status"),
    [
        (0, 1),
        (1, 3),
        (0x31, 0x63),
        (0x7F, 0xFF),
        (0xFF, 0xFF),  # (0xff << 1) | 1 = 0x1ff, truncated to 8 bits by exit()
        (0x80, 0x01),
        (0x12345678, 0xF1),  # a 4-byte write: 0x2468acf1 & 0xff
        (0xFFFF_FFFF, 0xFF),
    ],
)
def test_exit_status(value: int, status: int) -> None:
    assert exit_status(value) == status


def test_exit_status_is_always_odd() -> None:
    assert all(exit_status(v) % 2 == 1 for v in range(0x200))


def test_debug_exit_constants() -> None:
    assert (DEBUG_EXIT_PORT, DEBUG_EXIT_PORTS) == (0xF4, 4)
    assert POST_PORT == 0x80


@pytest.mark.parametrize(("size", "value"), [(1, 0x31), (2, 0xBEEF), (4, 0xDEADBEEF), (1, 0)])
def test_debug_exit_calls_on_exit_with_the_value(size: int, value: int) -> None:
    calls: list[int] = []
    device = DebugExit(calls.append)
    device.write(0, size, value)
    assert calls == [value]


def test_debug_exit_every_write_reports() -> None:
    calls: list[int] = []
    device = DebugExit(calls.append)
    device.write(0, 1, 1)
    device.write(3, 1, 2)
    assert calls == [1, 2]


def test_debug_exit_reads_zero_and_do_not_exit() -> None:
    calls: list[int] = []
    device = DebugExit(calls.append)
    for size in (1, 2, 4):
        assert device.read(0, size) == 0
    assert calls == []


def test_debug_exit_on_a_port_bus() -> None:
    calls: list[int] = []
    bus = Bus("port", 0x10000, strict=True)
    device: Device = DebugExit(calls.append)
    bus.register(DEBUG_EXIT_PORT, DEBUG_EXIT_PORTS, device, "debug-exit")
    bus.write(0xF4, 1, 0x10)
    bus.write(0xF4, 4, 0x1234_5678)
    bus.write(0xF7, 1, 0x7F)
    assert calls == [0x10, 0x1234_5678, 0x7F]
    assert [exit_status(v) for v in calls] == [0x21, 0xF1, 0xFF]
    assert bus.read(0xF5, 2) == 0
    assert not bus.unhandled


def test_post_code_starts_empty() -> None:
    post = PostCode()
    assert (post.last, post.writes) == (0, 0)
    assert post.read(0, 1) == 0


def test_post_code_keeps_the_last_byte() -> None:
    post = PostCode()
    post.write(0, 1, 0x12)
    assert (post.last, post.writes) == (0x12, 1)
    assert post.read(0, 1) == 0x12
    post.write(0, 2, 0xABCD)
    assert (post.last, post.writes) == (0xCD, 2)
    post.write(0, 4, 0xFFFF_FF00)
    assert (post.last, post.writes) == (0x00, 3)
    assert post.read(0, 1) == 0


def test_post_code_reads_do_not_count() -> None:
    post = PostCode()
    post.write(0, 1, 0x55)
    for _ in range(3):
        assert post.read(0, 1) == 0x55
    assert post.writes == 1


def test_post_code_on_a_port_bus() -> None:
    bus = Bus("port", 0x10000)
    post = PostCode()
    bus.register(POST_PORT, 1, post, "POST")
    for code in (0x01, 0x02, 0xAA):
        bus.write(0x80, 1, code)
    assert (post.last, post.writes) == (0xAA, 3)
    assert bus.read(0x80, 1) == 0xAA
    bus.write(0x81, 1, 0x99)  # next port: nobody there
    assert post.writes == 3
    assert bus.unhandled == {("write", 0x81): 1}


@pytest.mark.kvm
def test_ports_linux_probes_are_absent_not_unhandled() -> None:
    with Machine(mem_size=2 << 20, strict=True) as m:
        for port, count, _ in LINUX_PROBED_PORTS:
            assert m.ports.read(port + count - 1, 1) == 0xFF
            m.ports.write(port, 1, 0x5A)
        assert not m.ports.unhandled
        assert m.device("absent", AbsentPorts).reads == len(LINUX_PROBED_PORTS)


def test_debugcon_sends_the_low_byte_and_reads_back_0xe9() -> None:
    sent: list[bytes] = []
    device = DebugCon(sent.append)
    device.write(0, 1, ord("h"))
    device.write(0, 2, 0x4100 | ord("i"))  # QEMU splits it: the high byte falls past the port
    assert sent == [b"h", b"i"]
    assert device.read(0, 1) == 0xE9
    assert device.read(0, 2) == 0xFFE9
    device.write(1, 1, ord("x"))  # outside its one port: dropped, counted
    assert (device.read(1, 1), device.ignored_accesses, sent) == (0xFF, 2, [b"h", b"i"])
    device.set_output(None)
    device.write(0, 1, ord("y"))  # no host side: dropped
    assert sent == [b"h", b"i"]
    assert DEBUGCON_PORT == 0xE9


def test_debugcon_joins_the_board_only_when_asked() -> None:
    assert not any(entry.name == "debugcon" for entry in PC.devices)
    board = with_debugcon(PC)
    assert board.entry("debugcon").ports[0].base == 0xE9
    assert with_debugcon(board) is board
    # pc-testdev's byte twin (0xe8-0xeb) gives port 0xe9 up; its scratch register stays.
    parts = {r.part for r in board.entry("pc_testdev").ports}
    assert "byte_port" not in parts and "scratch_port" in parts
    assert "byte_port" in {r.part for r in PC.entry("pc_testdev").ports}
