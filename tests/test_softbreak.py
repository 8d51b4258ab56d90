"""gdb's int3 breakpoints in guest RAM, without KVM: patched, hidden, kept under writes, removed."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kvmpy.debug.gdbproto import E_FAULT, TargetError
from kvmpy.debug.softbreak import SoftBreakpoints
from kvmpy.memory import PAGE_SIZE, GuestMemory, GuestMemoryError


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    memory = GuestMemory()
    memory.add_region(0, PAGE_SIZE)
    memory.write(0x100, bytes(range(0x10, 0x20)))
    yield memory
    memory.close()


def test_int3s_are_written_hidden_and_removed(memory: GuestMemory) -> None:
    soft = SoftBreakpoints(memory)
    assert not soft
    soft.insert(0x7000_0104, 0x104)  # gdb's linear address, and where it maps
    soft.insert(0x7000_0104, 0x104)  # the same again: still one, original kept
    assert soft and 0x7000_0104 in soft
    assert memory.read_u8(0x104) == 0xCC
    raw = memory.read(0x100, 8)
    assert soft.hide(0x7000_0100, raw) == bytes(range(0x10, 0x18))
    assert soft.hide(0x7000_0105, raw[5:]) == raw[5:]  # a read that does not cover it
    assert soft.remove(0x7000_0104)
    assert not soft.remove(0x7000_0104)
    assert memory.read_u8(0x104) == 0x14


def test_a_write_under_an_int3_keeps_it_and_changes_what_removal_restores(
    memory: GuestMemory,
) -> None:
    soft = SoftBreakpoints(memory)
    soft.insert(0x104, 0x104)
    soft.write(0x102, b"\xaa\xbb\xcc\xdd", lambda data: memory.write(0x102, data))
    assert memory.read(0x102, 4) == b"\xaa\xbb\xcc\xdd"  # the int3 is still there
    assert soft.hide(0x102, memory.read(0x102, 4)) == b"\xaa\xbb\xcc\xdd"
    soft.write(0x104, b"\x90", lambda data: memory.write(0x104, data))
    assert memory.read_u8(0x104) == 0xCC

    def fail(data: bytes) -> None:
        raise GuestMemoryError("not mapped")

    with pytest.raises(GuestMemoryError):
        soft.write(0x104, b"\x11", fail)  # a failed write changes nothing
    soft.clear()
    assert not soft
    assert memory.read_u8(0x104) == 0x90


def test_an_int3_outside_ram_is_refused(memory: GuestMemory) -> None:
    soft = SoftBreakpoints(memory)
    for gpa in (None, PAGE_SIZE, 1 << 64):
        with pytest.raises(TargetError) as info:
            soft.insert(0x5000, gpa)
        assert info.value.reply == E_FAULT
    assert not soft
