"""The vCPU run loop: KVM_RUN, then turn the exit into a bus call.

This is the hot path.  The shim returns the exit reason, with single port
writes and reads as reasons of their own, so the common exits cost one
branch, a few field reads and a dict lookup; everything rare (string I/O,
halts, faults, internal errors) goes through ``_other_exit``.  Nothing here
logs, and nothing allocates beyond the integers it reads.
"""

from __future__ import annotations

import errno
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from kvmpy._kvm import lib
from kvmpy.bus import Bus, UnhandledAccess
from kvmpy.debug.crash import CrashReport, crash_report
from kvmpy.kvm import KvmError, Vcpu
from kvmpy.memory import GuestMemory, GuestMemoryError
from kvmpy.x86.registers import RFLAGS_IF

EXIT_REASON_NAMES = {
    getattr(lib, name): name.removeprefix("KVM_EXIT_")
    for name in dir(lib)
    if name.startswith("KVM_EXIT_") and name not in ("KVM_EXIT_IO_IN", "KVM_EXIT_IO_OUT")
}

INTERNAL_ERROR_NAMES = {
    lib.KVM_INTERNAL_ERROR_EMULATION: "instruction emulation failed",
    lib.KVM_INTERNAL_ERROR_SIMUL_EX: "simultaneous exceptions",
    lib.KVM_INTERNAL_ERROR_DELIVERY_EV: "exit while delivering an event",
    lib.KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON: "unexpected hardware exit reason",
}

# Process exit statuses for outcomes that are not the guest's own debug exit
# (those are always odd: (code << 1) | 1).
STATUS_HALT = 0
STATUS_ERROR = 2
STATUS_CRASH = 4
STATUS_RESET = 6
STATUS_TIMEOUT = 124
STATUS_INTERRUPTED = 130

# Indexed by access size: struct packers and masks for 1, 2, 4 and 8 bytes.
_PACK: tuple[Callable[..., None] | None, ...] = (
    None,
    struct.Struct("<B").pack_into,
    struct.Struct("<H").pack_into,
    None,
    struct.Struct("<I").pack_into,
    None,
    None,
    None,
    struct.Struct("<Q").pack_into,
)
_MASK = tuple((1 << (8 * size)) - 1 for size in range(9))


@dataclass(frozen=True)
class Outcome:
    """How a VM run ended."""

    reason: str  # exit, halt, shutdown, reset, triple-fault, crash, timeout, interrupted
    status: int  # the process exit status the CLI uses
    message: str
    exit_code: int | None = None  # the value the guest wrote to the debug-exit port
    report: CrashReport | None = None


class ExitObserver:
    """Sees every exit of a run: the tracer, the statistics, the single-stepper.

    With no observer the run loop takes its fast path; with one, it times each
    KVM_RUN and each handler and reports them after the exit was handled.
    Subclasses override what they need; the defaults do nothing.
    """

    def on_start(self, vcpu: Vcpu) -> None:
        """The vCPU thread is about to enter its first KVM_RUN."""
        return None

    def on_exit(self, vcpu: Vcpu, reason: int, run_ns: int, handle_ns: int) -> None:
        """An exit was handled (``vcpu.exit`` still describes it)."""
        return None

    def on_debug(self, vcpu: Vcpu) -> bool:
        """A KVM_EXIT_DEBUG: return True if handled and the guest should go on."""
        return False

    def on_interrupt(self, vcpu: Vcpu) -> None:
        """KVM_RUN was interrupted (a kick) but the run goes on: a debugger may pause here."""
        return None


class ExitCounter(ExitObserver):
    """Counts exits and their time, per vCPU, cheaply enough to leave on.

    Rows are keyed by ``reason << 40 | where`` (the port, the MMIO page, or 0)
    and hold [count, ns in KVM_RUN, ns in kvmpy's handlers].  The times come
    from the shim's clock, so alone a counter runs a loop that is the fast
    one plus the tallies; next to other observers it records from on_exit.
    """

    def __init__(self) -> None:
        self.tables: dict[int, dict[int, list[int]]] = {}

    @staticmethod
    def key(vcpu: Vcpu, reason: int) -> int:
        e = vcpu.exit
        if reason == lib.KVMSHIM_EXIT_PORT_OUT or reason == lib.KVMSHIM_EXIT_PORT_IN:
            return reason << 40 | int(e.io_port)
        if reason == lib.KVM_EXIT_MMIO:
            return reason << 40 | int(e.mmio_addr) >> 12
        return reason << 40

    def on_start(self, vcpu: Vcpu) -> None:
        self.tables[vcpu.index] = {}

    def on_exit(self, vcpu: Vcpu, reason: int, run_ns: int, handle_ns: int) -> None:
        row = self.tables[vcpu.index].setdefault(self.key(vcpu, reason), [0, 0, 0])
        row[0] += 1
        row[1] += run_ns
        row[2] += handle_ns


def run_vcpu(
    vcpu: Vcpu,
    memory: GuestMemory,
    ports: Bus,
    mmio: Bus,
    stopping: threading.Event,
    has_irqchip: bool,
    observer: ExitObserver | None = None,
) -> Outcome | None:
    """Run ``vcpu`` until the guest stops it (returns an Outcome) or ``stopping`` is set (None)."""
    try:
        if isinstance(observer, ExitCounter):
            return _run_counted(vcpu, memory, ports, mmio, stopping, has_irqchip, observer)
        if observer is not None:
            return _run_observed(vcpu, memory, ports, mmio, stopping, has_irqchip, observer)
        return _run_fast(vcpu, memory, ports, mmio, stopping, has_irqchip)
    except UnhandledAccess as exc:
        report = crash_report(vcpu, memory, "unhandled access", str(exc))
        return Outcome("crash", STATUS_CRASH, report.summary(), report=report)
    except GuestMemoryError as exc:
        report = crash_report(vcpu, memory, "bad guest memory access", str(exc))
        return Outcome("crash", STATUS_CRASH, report.summary(), report=report)


def _interrupted(vcpu: Vcpu, reason: int, stopping: threading.Event) -> bool:
    """KVM_RUN returned -errno: True if the run should end (it was kicked to stop)."""
    if reason != -errno.EINTR and reason != -errno.EAGAIN:
        raise KvmError("KVM_RUN", -reason)
    if stopping.is_set():
        return True
    # Interrupted by some other signal: clear the kick, then look again, since
    # a stop may have come in between.
    vcpu.clear_kick()
    return stopping.is_set()


def _run_fast(
    vcpu: Vcpu,
    memory: GuestMemory,
    ports: Bus,
    mmio: Bus,
    stopping: threading.Event,
    has_irqchip: bool,
) -> Outcome | None:
    # Port I/O is dispatched inline, with everything bound to locals: this
    # loop is what the exit round-trip benchmark measures.
    run = vcpu.run
    exit_ = vcpu.exit
    page = vcpu.run_page
    handlers = ports.handlers
    port_out = lib.KVMSHIM_EXIT_PORT_OUT
    port_in = lib.KVMSHIM_EXIT_PORT_IN
    exit_mmio = lib.KVM_EXIT_MMIO
    pack = _PACK
    mask = _MASK
    while True:
        reason = run()
        if reason == port_out:
            port = exit_.io_port
            handler = handlers.get(port)
            if handler is not None:
                handler[1](port - handler[2], exit_.io_size, exit_.value)
            else:
                ports.write(port, exit_.io_size, exit_.value)
        elif reason == port_in:
            port = exit_.io_port
            size = exit_.io_size
            handler = handlers.get(port)
            if handler is not None:
                value = handler[0](port - handler[2], size)
            else:
                value = ports.read(port, size)
            pack[size](page, exit_.data_offset, value & mask[size])
        elif reason == exit_mmio:
            _mmio(vcpu, mmio)
        elif reason < 0:
            if _interrupted(vcpu, reason, stopping):
                return None
        else:
            outcome = _other_exit(vcpu, memory, ports, has_irqchip)
            if outcome is not None:
                return outcome


def _run_counted(
    vcpu: Vcpu,
    memory: GuestMemory,
    ports: Bus,
    mmio: Bus,
    stopping: threading.Event,
    has_irqchip: bool,
    counter: ExitCounter,
) -> Outcome | None:
    # _run_fast plus the tallies, on the shim's clock: --stats must cost
    # little, so this stays a copy of the fast loop rather than an observer.
    run = vcpu.run
    exit_ = vcpu.exit
    shim = vcpu.shim
    page = vcpu.run_page
    handlers = ports.handlers
    port_out = lib.KVMSHIM_EXIT_PORT_OUT
    port_in = lib.KVMSHIM_EXIT_PORT_IN
    exit_mmio = lib.KVM_EXIT_MMIO
    pack = _PACK
    mask = _MASK
    counter.on_start(vcpu)
    table = counter.tables[vcpu.index]
    shim.timing = 1
    shim.returned_ns = 0
    previous = [0, 0, 0]  # the row of the exit handled before this KVM_RUN
    try:
        while True:
            reason = run()
            previous[2] += shim.handler_ns
            if reason == port_out:
                port = exit_.io_port
                key = reason << 40 | port
                handler = handlers.get(port)
                if handler is not None:
                    handler[1](port - handler[2], exit_.io_size, exit_.value)
                else:
                    ports.write(port, exit_.io_size, exit_.value)
            elif reason == port_in:
                port = exit_.io_port
                key = reason << 40 | port
                size = exit_.io_size
                handler = handlers.get(port)
                if handler is not None:
                    value = handler[0](port - handler[2], size)
                else:
                    value = ports.read(port, size)
                pack[size](page, exit_.data_offset, value & mask[size])
            elif reason == exit_mmio:
                key = ExitCounter.key(vcpu, reason)
                _mmio(vcpu, mmio)
            elif reason < 0:
                if _interrupted(vcpu, reason, stopping):
                    return None
                continue
            else:
                key = reason << 40
                outcome = _other_exit(vcpu, memory, ports, has_irqchip)
                if outcome is not None:
                    table.setdefault(key, [0, 0, 0])[0] += 1
                    return outcome
            row = table.get(key)
            if row is None:
                row = table[key] = [0, 0, 0]
            row[0] += 1
            row[1] += shim.run_ns
            previous = row
    finally:
        shim.timing = 0


def _run_observed(
    vcpu: Vcpu,
    memory: GuestMemory,
    ports: Bus,
    mmio: Bus,
    stopping: threading.Event,
    has_irqchip: bool,
    observer: ExitObserver,
) -> Outcome | None:
    run = vcpu.run
    exit_ = vcpu.exit
    clock = time.perf_counter_ns
    observer.on_start(vcpu)
    while True:
        started = clock()
        reason = run()
        returned = clock()
        outcome = None
        if reason == lib.KVMSHIM_EXIT_PORT_OUT:
            ports.write(exit_.io_port, exit_.io_size, exit_.value)
        elif reason == lib.KVMSHIM_EXIT_PORT_IN:
            size = exit_.io_size
            value = ports.read(exit_.io_port, size) & _MASK[size]
            _PACK[size](vcpu.run_page, exit_.data_offset, value)
        elif reason == lib.KVM_EXIT_MMIO:
            _mmio(vcpu, mmio)
        elif reason < 0:
            if _interrupted(vcpu, reason, stopping):
                return None
            observer.on_interrupt(vcpu)
            continue
        elif not (reason == lib.KVM_EXIT_DEBUG and observer.on_debug(vcpu)):
            outcome = _other_exit(vcpu, memory, ports, has_irqchip)
        observer.on_exit(vcpu, reason, returned - started, clock() - returned)
        if outcome is not None:
            return outcome


def _string_io(vcpu: Vcpu, ports: Bus) -> None:
    """rep ins/outs: ``count`` items of ``size`` bytes, packed in the kvm_run page."""
    e = vcpu.exit
    page = vcpu.run_page
    size, port, offset = e.io_size, e.io_port, e.data_offset
    end = offset + e.io_count * size
    if end > len(page):
        raise KvmError("KVM_RUN", errno.EFAULT, f"string I/O data overruns kvm_run ({end} bytes)")
    if e.io_direction == lib.KVM_EXIT_IO_OUT:
        for at in range(offset, end, size):
            ports.write(port, size, int.from_bytes(page[at : at + size], "little"))
    else:
        for at in range(offset, end, size):
            value = ports.read(port, size) & _MASK[size]
            page[at : at + size] = value.to_bytes(size, "little")


def _mmio(vcpu: Vcpu, mmio: Bus) -> None:
    e = vcpu.exit
    size = e.mmio_len
    if not 1 <= size <= 8:
        raise KvmError("KVM_RUN", errno.EINVAL, f"MMIO access of {size} bytes")
    if e.mmio_is_write:
        mmio.write(e.mmio_addr, size, e.value)
    else:
        value = mmio.read(e.mmio_addr, size) & _MASK[size]
        offset = e.data_offset
        vcpu.run_page[offset : offset + size] = value.to_bytes(size, "little")


def _internal_error(vcpu: Vcpu) -> tuple[str, bytes | None]:
    """Describe a KVM_EXIT_INTERNAL_ERROR; also return the instruction bytes KVM reported."""
    e = vcpu.exit
    name = INTERNAL_ERROR_NAMES.get(e.suberror, "unknown")
    detail = f"suberror {e.suberror} ({name})"
    code = None
    flags = e.data[0] if e.ndata >= 1 else 0
    if (
        e.suberror == lib.KVM_INTERNAL_ERROR_EMULATION
        and e.ndata >= 3
        and flags & lib.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES
    ):
        blob = e.data[1].to_bytes(8, "little") + e.data[2].to_bytes(8, "little")
        code = blob[1 : 1 + min(blob[0], 15)]
    elif e.ndata:
        detail += " data " + " ".join(f"{e.data[i]:#x}" for i in range(e.ndata))
    return detail, code


def _crash(
    vcpu: Vcpu,
    memory: GuestMemory,
    reason: str,
    detail: str = "",
    code: bytes | None = None,
    kind: str = "crash",
) -> Outcome:
    report = crash_report(vcpu, memory, reason, detail, code)
    return Outcome(kind, STATUS_CRASH, report.summary(), report=report)


def _other_exit(vcpu: Vcpu, memory: GuestMemory, ports: Bus, has_irqchip: bool) -> Outcome | None:
    """Exits off the hot path: return an Outcome to stop, or None to keep running."""
    e = vcpu.exit
    reason = e.reason
    if reason == lib.KVM_EXIT_IO:  # string I/O: the shim returned KVMSHIM_EXIT_PORT_STRING
        _string_io(vcpu, ports)
        return None
    name = EXIT_REASON_NAMES.get(reason, str(reason))
    if reason in (lib.KVM_EXIT_INTR, lib.KVM_EXIT_IRQ_WINDOW_OPEN):
        return None
    if reason == lib.KVM_EXIT_HLT:
        regs = vcpu.get_regs()
        if regs.rflags & RFLAGS_IF and has_irqchip:
            return None
        why = "interrupts disabled" if not regs.rflags & RFLAGS_IF else "no interrupt controller"
        return Outcome(
            "halt", STATUS_HALT, f"vCPU {vcpu.index}: guest halted ({why}) at RIP={regs.rip:#x}"
        )
    if reason == lib.KVM_EXIT_SHUTDOWN:
        # A real PC resets here; kvmpy reports it (and restarts with --reboot).
        return _crash(vcpu, memory, "triple fault (KVM_EXIT_SHUTDOWN)", kind="triple-fault")
    if reason == lib.KVM_EXIT_INTERNAL_ERROR:
        detail, code = _internal_error(vcpu)
        return _crash(vcpu, memory, "KVM internal error", detail, code)
    if reason == lib.KVM_EXIT_FAIL_ENTRY:
        detail = f"hardware entry failure reason {e.hardware_reason:#x} on host CPU {e.cpu}"
        return _crash(vcpu, memory, "VM entry failed (KVM_EXIT_FAIL_ENTRY)", detail)
    if reason == lib.KVM_EXIT_SYSTEM_EVENT:
        if e.suberror == lib.KVM_SYSTEM_EVENT_SHUTDOWN:
            return Outcome("shutdown", STATUS_HALT, f"vCPU {vcpu.index}: guest powered off")
        if e.suberror == lib.KVM_SYSTEM_EVENT_RESET:
            return Outcome("reset", STATUS_RESET, f"vCPU {vcpu.index}: guest reset")
        return _crash(vcpu, memory, "system event", f"type {e.suberror}")
    detail = f"hardware reason {e.hardware_reason:#x}" if reason == lib.KVM_EXIT_UNKNOWN else ""
    return _crash(vcpu, memory, f"unhandled exit KVM_EXIT_{name}", detail)
