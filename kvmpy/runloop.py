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
from typing import Any

from kvmpy._kvm import ffi, lib
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

    def on_stop(self, vcpu: Vcpu) -> None:
        """The vCPU thread has left its run loop."""
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
    """Counts exits and their time per vCPU, at almost no cost.

    The shim keeps the tallies (``struct kvmshim_stat``): while a counter is
    attached, each KVM_RUN is timed in C and added to the row for its exit,
    keyed by ``reason << 40 | where`` (the port, the MMIO page, or 0), and
    the time until the next KVM_RUN goes to that row's handler time.  So the
    vCPU keeps the fast loop; ``tables`` is filled when the vCPU stops:
    {vCPU index: {key: [count, ns in KVM_RUN, ns in kvmpy's handlers]}}.
    """

    OVERFLOW_KEY = (1 << 64) - 1  # every exit kind beyond the table's room

    def __init__(self) -> None:
        self.tables: dict[int, dict[int, list[int]]] = {}
        self._rows: dict[int, Any] = {}

    def on_start(self, vcpu: Vcpu) -> None:
        rows = ffi.new("struct kvmshim_stat[]", lib.KVMSHIM_STATS_SLOTS)
        self._rows[vcpu.index] = rows
        vcpu.shim.last = ffi.NULL
        vcpu.shim.stats = rows

    def on_stop(self, vcpu: Vcpu) -> None:
        vcpu.shim.stats = ffi.NULL
        vcpu.shim.last = ffi.NULL
        rows = self._rows.pop(vcpu.index)
        table = self.tables.setdefault(vcpu.index, {})
        for row in rows:
            if row.key:
                total = table.setdefault(row.key, [0, 0, 0])
                total[0] += row.count
                total[1] += row.run_ns
                total[2] += row.handler_ns


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
    if observer is not None:
        observer.on_start(vcpu)
    try:
        if observer is None or isinstance(observer, ExitCounter):
            # A counter alone leaves the fast loop as it is: the shim counts.
            return _run_fast(vcpu, memory, ports, mmio, stopping, has_irqchip)
        return _run_observed(vcpu, memory, ports, mmio, stopping, has_irqchip, observer)
    except UnhandledAccess as exc:
        return _crash(vcpu, memory, "unhandled access", str(exc))
    except GuestMemoryError as exc:
        return _crash(vcpu, memory, "bad guest memory access", str(exc))
    finally:
        if observer is not None:
            observer.on_stop(vcpu)


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
