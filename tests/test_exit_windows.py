"""Exit windows: plain-memory and unclaimed ranges the KVM shim answers without Python.

The buses publish them (``Bus.windows``), the shim answers them, and every
answer must be the one the Python run loop would give: these tests run the
same guests with the windows on and off, and check the devices' contract.
"""

from __future__ import annotations

import random
import subprocess
import sys
from collections.abc import Callable

import pytest

from kvmpy.backends.exits import ExitKind, ExitWindow
from kvmpy.bus import Bus
from kvmpy.devices.base import Stateless
from kvmpy.devices.pc_testdev import IOMEM_BASE, PcTestDevice
from kvmpy.loaders.flat import load_flat
from kvmpy.machine import Machine
from kvmpy.runloop import ExitObserver
from tests.helpers import Assembler


class Stub(Stateless):
    """A device that answers a constant and keeps nothing (not plain memory)."""

    def __init__(self, value: int = 0x42) -> None:
        self.value = value

    def read(self, offset: int, size: int) -> int:
        return self.value

    def write(self, offset: int, size: int, value: int) -> None:
        return None


class Memory(Stub):
    """A plain-memory device: reads and writes its bytes (window_memory)."""

    def __init__(self, length: int) -> None:
        super().__init__()
        self.window_memory = bytearray(length)


# -- the buses' side ------------------------------------------------------------------


def test_windows_are_the_memory_ranges_and_every_gap() -> None:
    bus = Bus("port", 0x10000)
    memory = Memory(4)
    bus.register(0x10, 4, Stub(), "stub")
    bus.register(0x20, 4, memory, "memory")
    assert bus.windows() == [
        ExitWindow(0, 0x10),
        ExitWindow(0x14, 0xC),
        ExitWindow(0x20, 4, memory.window_memory),
        ExitWindow(0x24, 0x10000 - 0x24),
    ]


def test_a_strict_bus_publishes_no_gaps() -> None:
    bus = Bus("mmio", 1 << 32, strict=True)
    memory = Memory(0x1000)
    bus.register(0xD000_0000, 0x1000, memory, "memory")
    bus.register(0xE000_0000, 0x1000, Stub(), "stub")
    assert bus.windows() == [ExitWindow(0xD000_0000, 0x1000, memory.window_memory)]


def test_memory_shorter_than_its_range_is_left_to_the_device() -> None:
    bus = Bus("port", 0x10000, strict=True)
    bus.register(0x20, 8, Memory(4), "short")
    assert bus.windows() == []


def test_every_change_of_the_ranges_is_published() -> None:
    bus = Bus("port", 0x100)
    published: list[list[ExitWindow]] = []
    bus.publish_windows(published.append, lambda: __import__("collections").Counter())
    stub = Stub()
    bus.register(0x80, 0x10, stub, "stub")
    bus.unregister(0x80, stub)
    assert published == [
        [ExitWindow(0, 0x100)],
        [ExitWindow(0, 0x80), ExitWindow(0x90, 0x70)],
        [ExitWindow(0, 0x100)],
    ]


def test_misses_counted_elsewhere_add_to_the_bus_report() -> None:
    from collections import Counter

    bus = Bus("port", 0x100)
    bus.publish_windows(lambda windows: None, lambda: Counter({("read", 0x99): 5}))
    bus.read(0x99, 1)
    assert bus.unhandled[("read", 0x99)] == 6


def _plain_read(memory: bytearray, length: int, offset: int, size: int) -> int:
    return int.from_bytes(
        bytes(memory[offset + i] if offset + i < length else 0 for i in range(size)), "little"
    )


@pytest.mark.parametrize("part", ["scratch_port", "byte_port", "iomem"])
def test_pc_testdev_parts_behave_exactly_as_plain_memory(part: str) -> None:
    # The contract (kvmpy.devices.base): a part with window_memory reads and
    # writes as plain memory, so the shim answering it changes nothing.
    dev = PcTestDevice(lambda line: lambda level: None, lambda address: None)
    target = getattr(dev, part)
    memory: bytearray = target.window_memory
    length = 4 if part != "iomem" else len(memory)
    rng = random.Random(part)
    offsets = range(length) if length <= 4 else [0, 1, 7, 4093, length - 9, length - 8, length - 1]
    sizes = (1, 2, 4) if part != "iomem" else tuple(range(1, 9))
    for offset in offsets:
        for size in sizes:
            if part == "iomem" and offset + size > length:
                continue  # the bus leaves an access past an MMIO range to itself
            value = rng.getrandbits(8 * size)
            before = bytearray(memory)
            target.write(offset, size, value)
            expected = bytearray(before)
            for i in range(size):
                if offset + i < length:
                    expected[offset + i] = (value >> (8 * i)) & 0xFF
            assert memory == expected, (offset, size)
            assert target.read(offset, size) == _plain_read(memory, length, offset, size)


# -- under KVM ------------------------------------------------------------------------

# Real mode: the scratch register at every width and offset, through both
# twins, and three reads of an unclaimed port; then a dword sum in 0xe0.
PORT_GUEST = """
    mov $0x11223344, %eax
    out %eax, $0xe0
    in $0xe1, %ax
    cmp $0x2233, %ax
    jne fail
    in $0xe3, %eax
    cmp $0x11, %eax
    jne fail
    mov $0xab, %al
    out %al, $0xea
    in $0xe8, %eax
    cmp $0x11ab3344, %eax
    jne fail
    mov $0xbeef, %ax
    out %ax, $0xe3
    in $0xe0, %eax
    cmp $0xefab3344, %eax
    jne fail
    in $0x99, %al
    in $0x99, %ax
    in $0x99, %eax
    cmp $0xffffffff, %eax
    jne fail
    mov $0x0b, %al
    out %al, $0xf4
fail:
    mov $1, %al
    out %al, $0xf4
"""

# Long mode: the MMIO window at every width, an unaligned qword, and an
# unclaimed address read and written.
MMIO_GUEST = """
    mov $0xff000000, %rbx
    mov $0x8877665544332211, %rax
    mov %rax, 0x103(%rbx)
    movzbl 0x104(%rbx), %ecx
    cmp $0x22, %ecx
    jne fail
    movzwl 0x105(%rbx), %ecx
    cmp $0x4433, %ecx
    jne fail
    mov 0x107(%rbx), %ecx
    cmp $0x88776655, %ecx
    jne fail
    movabs $0xd0000000, %rdx
    movl $7, (%rdx)
    mov (%rdx), %rcx
    cmp $-1, %rcx
    jne fail
    mov $0x0b, %al
    out %al, $0xf4
fail:
    mov $1, %al
    out %al, $0xf4
"""


def _run_counting(m: Machine, wanted: Callable[[int], bool]) -> tuple[object, int]:
    """Run ``m``, counting the exits run() returned to Python that ``wanted`` picks."""
    vcpu = m.vcpu
    run = vcpu.run
    seen = 0

    def counted() -> int:
        nonlocal seen
        reason = run()
        if reason > 0 and wanted(reason):
            seen += 1
        return reason

    vcpu.run = counted  # type: ignore[method-assign]
    try:
        return m.run(timeout=30), seen
    finally:
        vcpu.run = run  # type: ignore[method-assign]


@pytest.mark.kvm
@pytest.mark.parametrize("windows", [True, False], ids=["shim", "python"])
def test_port_windows_give_the_python_answers(assemble: Assembler, windows: bool) -> None:
    with Machine(mem_size=1 << 20, exit_windows=windows) as m:
        m.load(load_flat(assemble(PORT_GUEST), 0x7C00), mode="real")
        exit_ = m.vcpu.exit

        def testdev_or_0x99(reason: int) -> bool:
            return reason in (ExitKind.PORT_IN, ExitKind.PORT_OUT) and (
                0xE0 <= exit_.io_port < 0xEC or exit_.io_port == 0x99
            )

        outcome, in_python = _run_counting(m, testdev_or_0x99)
        assert outcome.exit_code == 0x0B, outcome  # type: ignore[attr-defined]
        assert m.device("pc_testdev", PcTestDevice).scratch == 0xEFAB3344
        assert m.ports.unhandled[("read", 0x99)] == 3
        assert in_python == (0 if windows else 10)
        assert m.exit_windows is windows


@pytest.mark.kvm
@pytest.mark.parametrize("windows", [True, False], ids=["shim", "python"])
def test_mmio_windows_give_the_python_answers(assemble: Assembler, windows: bool) -> None:
    with Machine(mem_size=16 << 20, exit_windows=windows) as m:
        m.load(load_flat(assemble(MMIO_GUEST, "long"), 0x100000), mode="long")
        outcome, in_python = _run_counting(m, lambda reason: reason == ExitKind.MMIO)
        assert outcome.exit_code == 0x0B, outcome  # type: ignore[attr-defined]
        memory = m.device("pc_testdev", PcTestDevice).memory
        assert memory[0x103:0x10B] == bytes.fromhex("1122334455667788")
        assert m.mmio.unhandled == {("write", 0xD000_0000): 1, ("read", 0xD000_0000): 1}
        assert in_python == (0 if windows else 6)
        assert IOMEM_BASE == 0xFF00_0000


@pytest.mark.kvm
def test_a_range_claimed_while_the_guest_runs_is_no_longer_answered(
    assemble: Assembler,
) -> None:
    # Port 0x99 is unclaimed (the shim answers 0xff) until the guest's write
    # to port 0x500 makes the host register a device there, as a PCI BAR
    # moving does; the next read must reach that device.
    source = """
        in $0x99, %al
        cmp $0xff, %al
        jne fail
        mov $0x500, %dx
        out %al, %dx
        in $0x99, %al
        cmp $0x42, %al
        jne fail
        mov $0x0b, %al
        out %al, $0xf4
    fail:
        mov $1, %al
        out %al, $0xf4
    """

    with Machine(mem_size=1 << 20) as m:

        class Claimer(Stub):
            def write(self, offset: int, size: int, value: int) -> None:
                m.ports.register(0x99, 1, Stub(0x42), "late")

        m.ports.register(0x500, 1, Claimer(), "claimer")
        m.load(load_flat(assemble(source), 0x7C00), mode="real")
        outcome = m.run(timeout=30)
        assert outcome.exit_code == 0x0B, outcome
        assert m.ports.unhandled[("read", 0x99)] == 1


@pytest.mark.kvm
def test_tracers_still_see_every_exit(assemble: Assembler) -> None:
    class Tracer(ExitObserver):
        def __init__(self) -> None:
            self.ports: list[int] = []

        def on_exit(self, vcpu: object, reason: int, run_ns: int, handle_ns: int) -> None:
            if reason in (ExitKind.PORT_IN, ExitKind.PORT_OUT):
                self.ports.append(vcpu.exit.io_port)  # type: ignore[attr-defined]

    tracer = Tracer()
    with Machine(mem_size=1 << 20) as m:
        m.observer = tracer
        m.load(load_flat(assemble(PORT_GUEST), 0x7C00), mode="real")
        assert m.run(timeout=30).exit_code == 0x0B
    assert tracer.ports.count(0x99) == 3
    assert len([port for port in tracer.ports if 0xE0 <= port < 0xEC]) == 7


@pytest.mark.kvm
@pytest.mark.parametrize("windows", [True, False], ids=["shim", "python"])
def test_statistics_count_the_exits_the_shim_answered(assemble: Assembler, windows: bool) -> None:
    from kvmpy.debug.trace import ExitStats

    with Machine(mem_size=1 << 20, exit_windows=windows) as m:
        stats = ExitStats(m.ports, m.mmio)
        m.observer = stats
        m.load(load_flat(assemble(PORT_GUEST), 0x7C00), mode="real")
        assert m.run(timeout=30).exit_code == 0x0B
    counts = {(name, where.split()[0]): row.count for name, where, row in stats.rows()}
    mark = "*" if windows else ""
    assert counts[(f"IO_IN{mark}", "0x99")] == 3
    assert counts[(f"IO_IN{mark}", "0xe0")] == 1
    assert counts[("IO_OUT", "0xf4")] == 1  # the debug-exit device is Python's
    assert ("answered in the KVM shim" in stats.format()) is windows


@pytest.mark.kvm
def test_the_sequence_lock_wraps_and_stays_even_when_idle() -> None:
    from kvmpy.backends.kvm.windows import ShimWindows

    windows = ShimWindows()
    windows.tables.sequence = 0xFFFF_FFFE
    windows.publish("port", [ExitWindow(0, 0x10)])
    assert windows.tables.sequence == 0
    assert windows.tables.port_count == 1
    windows.publish("port", [ExitWindow(0, 1)] * 300)  # more than fit: none published
    assert windows.tables.port_count == 0


@pytest.mark.kvm
def test_info_says_exit_windows_are_on() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "kvmpy", "info"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0
    assert "exit windows: on" in done.stdout
