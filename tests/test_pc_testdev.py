"""QEMU's pc-testdev: the model alone, on the board, and from a guest."""

from __future__ import annotations

import json

import pytest

from kvmpy.devices.pc_testdev import IOMEM_BASE, IOMEM_SIZE, IRQ_LINES, PcTestDevice
from kvmpy.loaders.flat import load_flat
from kvmpy.machine import Machine
from kvmpy.memory import GuestMemory
from kvmpy.snapshot import device_state, restore_device_state
from kvmpy.x86.pc import PC
from tests.helpers import Assembler


class Recorder:
    def __init__(self) -> None:
        self.irqs: list[tuple[int, bool]] = []
        self.flushed: list[int] = []

    def irq(self, line: int) -> object:
        return lambda level: self.irqs.append((line, level))

    def device(self) -> PcTestDevice:
        return PcTestDevice(self.irq, self.flushed.append)  # type: ignore[arg-type]


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


def test_scratch_register_any_width_any_offset(rec: Recorder) -> None:
    dev = rec.device()
    port = dev.scratch_port
    port.write(0, 4, 0x12345678)
    assert port.read(0, 4) == 0x12345678
    assert [port.read(i, 1) for i in range(4)] == [0x78, 0x56, 0x34, 0x12]
    assert port.read(1, 2) == 0x3456
    port.write(2, 1, 0xAB)
    assert port.read(0, 4) == 0x12AB5678
    port.write(3, 2, 0xFFEE)  # the byte past 0xe3 is dropped, as in QEMU
    assert port.read(0, 4) == 0xEEAB5678
    port.write(2, 4, 0xCAFEBABE)  # dword at an offset: the upper half lands
    assert port.read(0, 4) == 0xBABE5678
    assert port.read(2, 4) == 0xBABE


def test_byte_twin_shares_the_register(rec: Recorder) -> None:
    dev = rec.device()
    dev.byte_port.write(0, 4, 0xDEADBEEF)
    assert dev.scratch_port.read(0, 4) == 0xDEADBEEF
    dev.scratch_port.write(1, 1, 0x00)
    assert dev.byte_port.read(0, 4) == 0xDEAD00EF
    assert dev.byte_port.read(3, 1) == 0xDE
    assert dev.byte_port.read(2, 4) == 0xDEAD  # bytes past 0xeb read 0


def test_flush_takes_dword_writes_of_a_page_address(rec: Recorder) -> None:
    dev = rec.device()
    dev.flush_port.write(0, 4, 0x12345ABC)
    dev.flush_port.write(0, 2, 0x1000)  # not a dword: ignored
    dev.flush_port.write(1, 1, 0x10)
    assert rec.flushed == [0x12345000]
    assert dev.flush_port.read(0, 4) == 0


def test_irq_ports_raise_and_lower_lines(rec: Recorder) -> None:
    dev = rec.device()
    dev.irq_port.write(10, 1, 1)
    dev.irq_port.write(23, 1, 0x80)
    dev.irq_port.write(10, 1, 0)
    dev.irq_port.write(5, 2, 1)  # wider than a byte: ignored, as QEMU does
    assert rec.irqs == [(10, True), (23, True), (10, False)]
    dev.reset()  # lowers what is still raised
    assert rec.irqs[-1] == (23, False)
    assert IRQ_LINES == 24


def test_iomem_is_plain_memory_at_any_size_and_offset(rec: Recorder) -> None:
    mem = rec.device().iomem
    mem.write(3, 8, 0x0102030405060708)
    assert mem.read(3, 8) == 0x0102030405060708
    assert mem.read(4, 2) == 0x0607
    mem.write(5, 1, 0xFF)
    assert mem.read(3, 4) == 0x05FF0708
    mem.write(IOMEM_SIZE - 2, 4, 0xAABBCCDD)  # straddles the end: the rest is dropped
    assert mem.read(IOMEM_SIZE - 2, 4) == 0xCCDD


def test_it_is_on_the_pc_board_and_snapshots_as_plain_data(rec: Recorder) -> None:
    entry = PC.entry("pc_testdev")
    assert {(r.base, r.length) for r in entry.ports} == {
        (0xE0, 4), (0xE4, 4), (0xE8, 4), (0x2000, 24),
    }  # fmt: skip
    assert [(r.base, r.length) for r in entry.mmio] == [(IOMEM_BASE, 0x10000)]
    dev = rec.device()
    dev.scratch_port.write(0, 4, 7)
    dev.irq_port.write(3, 1, 1)
    dev.iomem.write(0x10, 2, 0xBEEF)
    saved = json.loads(json.dumps(device_state(dev)))
    assert saved["state"]["scratch"] == 7 and set(saved["state"]) == {
        "scratch", "memory", "irq_levels",
    }  # fmt: skip
    other = rec.device()
    restore_device_state(other, saved, "pc_testdev")
    assert other.state() == dev.state()
    assert other.iomem.read(0x10, 2) == 0xBEEF and other.irq_levels[3]


def test_remap_page_keeps_the_content() -> None:
    with GuestMemory.with_ram(1 << 20) as memory:
        memory.write_u32(0x5004, 0xFEEDF00D)
        assert memory.remap_page(0x5ABC)
        assert memory.read_u32(0x5004) == 0xFEEDF00D
        memory.write_u32(0x5008, 1)  # still writable
        assert not memory.remap_page(0xFF000000)  # not RAM: ignored


@pytest.mark.kvm
def test_a_guest_uses_every_part(assemble: Assembler) -> None:
    # Real mode.  Scratch through 0xe0 (dword) and read back through 0xe8
    # byte by byte; flush the page holding the code; raise and lower IRQ 5;
    # then, in long mode, the MMIO window: write a qword, read a byte of it.
    source = """
        mov $0x11223344, %eax
        out %eax, $0xe0
        in $0xeb, %al
        cmp $0x11, %al
        jne fail
        in $0xe9, %al
        cmp $0x33, %al
        jne fail
        mov $0x7c00, %eax
        out %eax, $0xe4
        mov $0x2005, %dx
        mov $1, %al
        out %al, %dx
        mov $0, %al
        out %al, %dx
        mov $0x0b, %al
        out %al, $0xf4
    fail:
        mov $1, %al
        out %al, $0xf4
    """
    with Machine(mem_size=16 << 20) as m:
        m.load(load_flat(assemble(source), 0x7C00), mode="real")
        outcome = m.run(timeout=30)
        assert outcome.exit_code == 0x0B, outcome
        dev = m.device("pc_testdev", PcTestDevice)
        assert dev.flushes == 1 and dev.irq_levels[5] is False

    long_source = """
        mov $0xff000000, %rbx
        mov $0x8877665544332211, %rax
        mov %rax, 8(%rbx)
        movzbl 13(%rbx), %eax
        out %al, $0xf4
    """
    with Machine(mem_size=16 << 20) as m:
        m.load(load_flat(assemble(long_source, "long"), 0x100000), mode="long")
        outcome = m.run(timeout=30)
        assert outcome.exit_code == 0x66, outcome
        assert m.device("pc_testdev", PcTestDevice).memory[8:16] == bytes.fromhex(
            "1122334455667788"
        )
