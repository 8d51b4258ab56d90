"""The run loop and Machine on the fake backend: scripted exits, no /dev/kvm."""

from __future__ import annotations

import pytest

from kvmpy.backends.base import BackendError, Capability
from kvmpy.backends.exits import IO_DIRECTION_OUT, ExitKind, SystemEvent
from kvmpy.devices.testdev import TESTDEV_BASE, TESTDEV_ID
from kvmpy.machine import Machine
from kvmpy.outcome import Outcome, OutcomeKind, exit_status
from kvmpy.x86.registers import RFLAGS_IF
from tests.fake_backend import FakeBackend, Step

COM1 = 0x3F8
DEBUG_EXIT = 0xF4


def out(port: int, value: int, size: int = 1) -> Step:
    return Step(ExitKind.PORT_OUT, {"io_port": port, "io_size": size, "value": value})


def inp(port: int, size: int = 1, offset: int = 16) -> Step:
    return Step(ExitKind.PORT_IN, {"io_port": port, "io_size": size, "data_offset": offset})


def guest_exit(code: int = 0) -> Step:
    return out(DEBUG_EXIT, code)


def machine(*steps: Step, irqchip: bool = True, strict: bool = False) -> Machine:
    return Machine(mem_size=1 << 20, irqchip=irqchip, strict=strict, backend=FakeBackend([*steps]))


def test_port_writes_reach_the_uart_and_the_debug_exit_ends_the_run() -> None:
    with machine(out(COM1, ord("h")), out(COM1, ord("i")), guest_exit(3)) as m:
        outcome = m.run(timeout=5)
        assert bytes(m.console) == b"hi"
        assert (outcome.kind, outcome.exit_code, outcome.status) == (OutcomeKind.EXIT, 3, 7)


def test_port_reads_put_the_device_value_where_the_backend_said() -> None:
    with machine(inp(COM1 + 5, offset=40), guest_exit()) as m:
        m.run(timeout=5)
        vcpu = m.vm.vcpus[0]  # type: ignore[attr-defined]
        # LSR: transmitter empty (0x60), nothing received.
        assert vcpu.replies[0] == (ExitKind.PORT_IN, b"\x60")
        assert vcpu.io_buffer[40] == 0x60


def test_mmio_reads_writes_and_unhandled_addresses() -> None:
    steps = [
        Step(ExitKind.MMIO, {"mmio_addr": TESTDEV_BASE, "mmio_len": 4, "data_offset": 8}),
        Step(ExitKind.MMIO, {"mmio_addr": 0xD000_0000, "mmio_len": 2, "data_offset": 8}),
        Step(ExitKind.MMIO, {"mmio_addr": 0xD000_0000, "mmio_len": 1, "mmio_is_write": 1}),
        guest_exit(),
    ]
    with machine(*steps) as m:
        assert m.run(timeout=5).kind is OutcomeKind.EXIT
        replies = m.vm.vcpus[0].replies  # type: ignore[attr-defined]
        assert replies[0] == (ExitKind.MMIO, TESTDEV_ID.to_bytes(4, "little"))
        assert replies[1] == (ExitKind.MMIO, b"\xff\xff")  # nothing there: all ones
        assert m.mmio.unhandled[("read", 0xD000_0000)] == 1
        assert m.mmio.unhandled[("write", 0xD000_0000)] == 1


def test_string_io_moves_every_item() -> None:
    rep_outs = Step(
        ExitKind.PORT_STRING,
        {"io_port": COM1, "io_size": 1, "io_count": 3, "data_offset": 64,
         "io_direction": IO_DIRECTION_OUT},
        data=b"abc",
    )  # fmt: skip
    with machine(rep_outs, guest_exit()) as m:
        m.run(timeout=5)
        assert bytes(m.console) == b"abc"


def test_halt_with_interrupts_off_ends_the_run() -> None:
    with machine(Step(ExitKind.HLT, regs={"rflags": 0x2, "rip": 0x7C05})) as m:
        outcome = m.run(timeout=5)
        assert (outcome.kind, outcome.status) == (OutcomeKind.HALT, 0)
        assert "interrupts disabled" in outcome.message and "0x7c05" in outcome.message


def test_halt_with_interrupts_on_waits_for_the_irqchip() -> None:
    hlt = Step(ExitKind.HLT, regs={"rflags": 0x2 | RFLAGS_IF})
    with machine(hlt, hlt, guest_exit(1)) as m:
        assert m.run(timeout=5).exit_code == 1
    with machine(hlt, guest_exit(1), irqchip=False) as m:
        outcome = m.run(timeout=5)
        assert outcome.kind is OutcomeKind.HALT
        assert "no interrupt controller" in outcome.message


def test_shutdown_is_a_triple_fault_with_a_report() -> None:
    with machine(Step(ExitKind.SHUTDOWN, {"reason": 8}, regs={"rip": 0x1234})) as m:
        outcome = m.run(timeout=5)
        assert (outcome.kind, outcome.status) == (OutcomeKind.TRIPLE_FAULT, 4)
        assert outcome.report is not None and outcome.report.regs is not None
        assert outcome.report.regs.rip == 0x1234
        assert outcome.message.startswith("vCPU 0: triple fault (FAKE_EXIT_8)")


def test_internal_error_reports_the_instruction_the_backend_could_not_run() -> None:
    failing = Step(ExitKind.INTERNAL_ERROR, detail="suberror 1", code=b"\xcd\x80")
    with machine(failing) as m:
        outcome = m.run(timeout=5)
        assert (outcome.kind, outcome.status) == (OutcomeKind.CRASH, 4)
        assert outcome.report is not None
        assert outcome.report.code == b"\xcd\x80"
        assert "the fake backend internal error: suberror 1" in outcome.message


def test_system_events_power_off_and_reset() -> None:
    off = Step(ExitKind.SYSTEM_EVENT, system_event=SystemEvent.SHUTDOWN)
    with machine(off) as m:
        assert m.run(timeout=5).kind is OutcomeKind.SHUTDOWN
    reset = Step(ExitKind.SYSTEM_EVENT, system_event=SystemEvent.RESET)
    with machine(reset) as m:
        assert m.run(timeout=5).status == 6


def test_spurious_exits_are_ignored_and_unknown_ones_go_to_the_arch_hook() -> None:
    with machine(Step(ExitKind.SPURIOUS), guest_exit(2)) as m:
        assert m.run(timeout=5).exit_code == 2
    with machine(Step(ExitKind.OTHER, {"reason": 99})) as m:
        outcome = m.run(timeout=5)
        assert outcome.kind is OutcomeKind.CRASH
        assert "unhandled exit FAKE_EXIT_99" in outcome.message


def test_a_running_guest_is_kicked_out_on_timeout() -> None:
    with machine() as m:  # the script is empty: the vCPU spins until kicked
        outcome = m.run(timeout=0.2)
        assert (outcome.kind, outcome.status) == (OutcomeKind.TIMEOUT, 124)
        assert outcome.report is not None  # where the guest was
        assert m.vm.vcpus[0].kicked.is_set()  # type: ignore[attr-defined]


def test_stop_from_another_thread_wins_once() -> None:
    with machine() as m:
        m.start()
        m.stop(Outcome(OutcomeKind.STOPPED, "first"))
        m.stop(Outcome(OutcomeKind.TIMEOUT, "second"))
        assert m.wait(5).message == "first"


def test_strict_bus_turns_unhandled_ports_into_a_crash() -> None:
    with machine(out(0x1234, 0), strict=True) as m:
        outcome = m.run(timeout=5)
        assert outcome.kind is OutcomeKind.CRASH
        assert "unhandled port write at 0x1234" in outcome.message


def test_a_machine_needs_what_it_asks_the_backend_for() -> None:
    bare = FakeBackend([], capabilities=frozenset())
    with pytest.raises(BackendError, match="lacks irqchip"):
        Machine(mem_size=1 << 20, irqchip=True, backend=bare)
    Machine(mem_size=1 << 20, irqchip=False, backend=bare).close()
    # Without a word about it, the irqchip follows the backend: none here.
    with Machine(mem_size=1 << 20, backend=bare) as m:
        assert not m.has_irqchip
    with Machine(mem_size=1 << 20, backend=FakeBackend([])) as m:
        assert m.has_irqchip
    two = FakeBackend([], [], capabilities=frozenset({Capability.IRQCHIP}))
    with pytest.raises(BackendError, match="lacks smp"):
        Machine(mem_size=1 << 20, cpus=2, backend=two)


def test_application_processors_wait_for_sipi_and_every_vcpu_runs() -> None:
    with Machine(mem_size=1 << 20, cpus=2, backend=FakeBackend([guest_exit()], [])) as m:
        assert [v.mp_state for v in m.vm.vcpus] == [0, 1]  # type: ignore[attr-defined]
        assert m.run(timeout=5).kind is OutcomeKind.EXIT


def test_each_outcome_kind_has_one_status() -> None:
    assert exit_status(OutcomeKind.EXIT, 0) == 1
    assert exit_status(OutcomeKind.EXIT, 0x7F) == 0xFF
    statuses = {kind: exit_status(kind, 0) for kind in OutcomeKind}
    assert statuses[OutcomeKind.HALT] == statuses[OutcomeKind.SHUTDOWN] == 0
    assert statuses[OutcomeKind.CRASH] == statuses[OutcomeKind.TRIPLE_FAULT] == 4
    assert statuses[OutcomeKind.INTERRUPTED] == 130
    assert statuses[OutcomeKind.TIMEOUT] == 124
    assert statuses[OutcomeKind.RESET] == 6
    assert statuses[OutcomeKind.HOST_ERROR] == 2


def test_reset_in_place_clears_ram_and_devices() -> None:
    with machine(out(COM1 + 7, 0x5A), guest_exit()) as m:
        m.memory.write(0x2000, b"guest data")
        m.run(timeout=5)
        assert m.serial.read(7, 1) == 0x5A  # the UART's scratch register
        m.reset()
        assert m.memory.read(0x2000, 10) == bytes(10)
        assert m.serial.read(7, 1) == 0
        assert m.vm.vcpus[0].regs.rip == 0  # type: ignore[attr-defined]


def test_a_chatty_guest_cannot_grow_the_console_without_bound() -> None:
    chatter = [out(COM1, ord("x")) for _ in range(5000)]
    with Machine(
        mem_size=1 << 20, backend=FakeBackend([*chatter, guest_exit()]), console_limit=1000
    ) as m:
        assert m.run(timeout=30).kind is OutcomeKind.EXIT
        assert m.console.end == 5000
        assert len(m.console) < 2000
        assert m.console.dropped == 5000 - len(m.console)


def test_mmio_of_every_length_and_across_a_device_end_never_raises() -> None:
    # KVM splits an 8-byte access across a page boundary into pieces of any length.
    steps = [
        Step(ExitKind.MMIO, {"mmio_addr": TESTDEV_BASE + 0x1000 - 3, "mmio_len": 5})
        for _ in range(2)
    ]
    steps += [
        Step(ExitKind.MMIO, {"mmio_addr": TESTDEV_BASE + 0xFF8 + off, "mmio_len": size})
        for size in range(1, 9)
        for off in range(0, 8 - size + 1)
    ]
    with machine(*steps, guest_exit()) as m:
        assert m.run(timeout=5).kind is OutcomeKind.EXIT
        replies = m.vm.vcpus[0].replies  # type: ignore[attr-defined]
        assert replies[0] == (ExitKind.MMIO, b"\xff" * 5)  # runs past the device: all ones
        assert all(len(reply) == step for (_, reply), step in zip(replies, [5, 5], strict=False))
        assert m.mmio.unhandled[("read", TESTDEV_BASE + 0xFFD)] == 2


def test_only_devices_no_host_thread_calls_skip_the_lock_and_only_with_one_vcpu() -> None:
    with machine() as m:
        assert m.ports.handlers[0x80][3] is None  # POST: only the guest calls it
        assert m.ports.handlers[COM1][3] is m.device_lock("serial")  # stdin feeds it
    with Machine(mem_size=1 << 20, cpus=2, backend=FakeBackend([], [])) as m:
        assert m.ports.handlers[0x80][3] is m.device_lock("post")  # two vCPUs may race
