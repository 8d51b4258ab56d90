"""The vCPU run loop: ``run()`` the vCPU, then turn the exit into a bus call.

This is the hot path, the same for every backend.  ``run()`` returns an
``ExitKind`` (see ``kvmpy/backends/exits.py``); single port writes and reads
are kinds of their own, so the common exits cost one branch, a few field
reads, a dict lookup and the device's lock.  Everything rare (string I/O,
halts, faults, internal errors) goes through ``_slow_exit``; what only the
architecture understands goes to its hook.  Nothing here logs, allocates
beyond the integers it reads, or builds crash reports: the loop returns a
typed ``Outcome`` and ``Machine`` attaches the report.
"""

from __future__ import annotations

import errno
import struct
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from kvmpy.backends.base import BackendError
from kvmpy.backends.exits import IO_DIRECTION_OUT, ExitKind, SystemEvent
from kvmpy.bus import Bus, UnhandledAccess
from kvmpy.memory import GuestMemoryError
from kvmpy.outcome import Outcome, OutcomeKind

if TYPE_CHECKING:
    from kvmpy.backends.base import StatsTable, Vcpu


def _packer(size: int) -> Callable[[bytearray, int, int], None]:
    """Writes a ``size``-byte little-endian value at an offset (the odd sizes of split MMIO)."""

    def pack_into(buffer: bytearray, offset: int, value: int) -> None:
        buffer[offset : offset + size] = value.to_bytes(size, "little")

    return pack_into


_STRUCTS = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}
# Indexed by access size: packers and masks for 1 to 8 bytes.
_PACK: tuple[Callable[[bytearray, int, int], None], ...] = tuple(
    struct.Struct(_STRUCTS[size]).pack_into if size in _STRUCTS else _packer(size)
    for size in range(9)
)
_MASK = tuple((1 << (8 * size)) - 1 for size in range(9))

_PORT_OUT = int(ExitKind.PORT_OUT)
_PORT_IN = int(ExitKind.PORT_IN)
_MMIO = int(ExitKind.MMIO)


class Arch(Protocol):
    """What the loop asks the architecture (``kvmpy.x86.arch.X86Arch``)."""

    def halt(self, vcpu: Vcpu, has_irqchip: bool) -> Outcome | None: ...

    def other_exit(self, vcpu: Vcpu) -> Outcome | None: ...

    def complete(self, vcpu: Vcpu) -> bool:
        """An INTERNAL_ERROR: finish the failed instruction if possible (True: go on)."""


class ExitObserver:
    """Sees every exit of a run: the tracer, the statistics, the single-stepper.

    With no observer the run loop takes its fast path; with one, it times each
    run() and each handler and reports them after the exit was handled.
    Subclasses override what they need; the defaults do nothing.  An observer
    with ``fast = True`` (the statistics) is called only at start and stop,
    and leaves the fast loop as it is.
    """

    fast = False

    def on_start(self, vcpu: Vcpu) -> None:
        """The vCPU thread is about to run the guest for the first time."""
        return None

    def on_stop(self, vcpu: Vcpu) -> None:
        """The vCPU thread has left its run loop."""
        return None

    def on_exit(self, vcpu: Vcpu, reason: int, run_ns: int, handle_ns: int) -> None:
        """An exit (``reason``: its ExitKind) was handled; ``vcpu.exit`` still describes it."""
        return None

    def on_debug(self, vcpu: Vcpu) -> bool:
        """A DEBUG exit: return True if handled and the guest should go on."""
        return False

    def on_interrupt(self, vcpu: Vcpu) -> None:
        """run() was interrupted (a kick) but the run goes on: a debugger may pause here."""
        return None


class ExitCounter(ExitObserver):
    """Counts exits and their time per vCPU, at almost no cost.

    The backend keeps the tallies (``Vcpu.enable_stats``), keyed by
    ``kind << 40 | where`` (the port, the MMIO page, or the backend's reason
    for OTHER), with ``ANSWERED_IN_BACKEND`` set for exits the backend
    answered itself (exit windows), so the vCPU keeps the fast loop.  ``tables`` is filled when
    the vCPU stops: {vCPU index: {key: [count, ns in run(), ns in handlers]}}.
    """

    fast = True
    OVERFLOW_KEY = (1 << 64) - 1  # every exit kind beyond the table's room

    def __init__(self) -> None:
        self.tables: dict[int, StatsTable] = {}

    def on_start(self, vcpu: Vcpu) -> None:
        vcpu.enable_stats()

    def on_stop(self, vcpu: Vcpu) -> None:
        table = self.tables.setdefault(vcpu.index, {})
        for key, (count, run_ns, handler_ns) in vcpu.collect_stats().items():
            total = table.setdefault(key, [0, 0, 0])
            total[0] += count
            total[1] += run_ns
            total[2] += handler_ns


class LoopContext:
    """What every vCPU loop of one machine shares: buses, the arch, the stop flag."""

    def __init__(
        self,
        ports: Bus,
        mmio: Bus,
        arch: Arch,
        stopping: threading.Event,
        has_irqchip: bool,
    ) -> None:
        self.ports = ports
        self.mmio = mmio
        self.arch = arch
        self.stopping = stopping
        self.has_irqchip = has_irqchip


def run_vcpu(
    vcpu: Vcpu, context: LoopContext, observer: ExitObserver | None = None
) -> Outcome | None:
    """Run ``vcpu`` until the guest stops it (an Outcome) or ``context.stopping`` is set (None)."""
    if observer is not None:
        observer.on_start(vcpu)
    try:
        if observer is None or observer.fast:
            return _run_fast(vcpu, context)
        return _run_observed(vcpu, context, observer)
    except UnhandledAccess as exc:
        return _crash(vcpu, OutcomeKind.CRASH, "unhandled access", str(exc))
    except GuestMemoryError as exc:
        return _crash(vcpu, OutcomeKind.CRASH, "bad guest memory access", str(exc))
    finally:
        if observer is not None:
            observer.on_stop(vcpu)


def _interrupted(vcpu: Vcpu, reason: int, stopping: threading.Event) -> bool:
    """run() returned -errno: True if the run should end (it was kicked to stop)."""
    if reason != -errno.EINTR and reason != -errno.EAGAIN:
        raise BackendError("run", -reason)
    if stopping.is_set():
        return True
    # Interrupted by some other signal: clear the kick, then look again, since
    # a stop may have come in between.
    vcpu.clear_kick()
    return stopping.is_set()


def _run_fast(vcpu: Vcpu, context: LoopContext) -> Outcome | None:
    # Port I/O is dispatched inline, with everything bound to locals: this
    # loop is what the exit round-trip benchmark measures.
    run = vcpu.run
    exit_ = vcpu.exit
    buffer = vcpu.io_buffer
    ports = context.ports
    mmio = context.mmio
    stopping = context.stopping
    handlers = ports.handlers
    pages = mmio.pages
    port_out = _PORT_OUT
    port_in = _PORT_IN
    exit_mmio = _MMIO
    pack = _PACK
    mask = _MASK
    while True:
        reason = run()
        if reason == port_out:
            port = exit_.io_port
            handler = handlers.get(port)
            if handler is not None:
                lock = handler[3]
                if lock is None:  # the device's only caller is this vCPU
                    handler[1](port - handler[2], exit_.io_size, exit_.value)
                else:
                    with lock:
                        handler[1](port - handler[2], exit_.io_size, exit_.value)
            else:
                ports.write(port, exit_.io_size, exit_.value)
        elif reason == port_in:
            port = exit_.io_port
            size = exit_.io_size
            handler = handlers.get(port)
            if handler is not None:
                lock = handler[3]
                if lock is None:
                    value = handler[0](port - handler[2], size)
                else:
                    with lock:
                        value = handler[0](port - handler[2], size)
            else:
                value = ports.read(port, size)
            pack[size](buffer, exit_.data_offset, value & mask[size])
        elif reason == exit_mmio:
            # A page one device owns alone is one lookup, as a port is.
            address = exit_.mmio_addr
            size = exit_.mmio_len
            page = pages.get(address >> 12)
            # (read, write, base, end, lock): the access must lie in [base, end).
            if page is None or not 0 < size <= 8:
                _mmio(vcpu, mmio)  # shared pages, unclaimed addresses, bad sizes
                continue
            read, write, base, end, lock = page
            if not base <= address <= end - size:
                _mmio(vcpu, mmio)  # runs past the device's range
            elif exit_.mmio_is_write:
                if lock is None:  # the device's only caller is this vCPU
                    write(address - base, size, exit_.value & mask[size])
                else:
                    with lock:
                        write(address - base, size, exit_.value & mask[size])
            else:
                if lock is None:
                    value = read(address - base, size) & mask[size]
                else:
                    with lock:
                        value = read(address - base, size) & mask[size]
                pack[size](buffer, exit_.data_offset, value)
        elif reason < 0:
            if _interrupted(vcpu, reason, stopping):
                return None
        else:
            outcome = _slow_exit(vcpu, reason, context)
            if outcome is not None:
                return outcome


def _run_observed(vcpu: Vcpu, context: LoopContext, observer: ExitObserver) -> Outcome | None:
    run = vcpu.run
    exit_ = vcpu.exit
    ports = context.ports
    clock = time.perf_counter_ns
    while True:
        started = clock()
        reason = run()
        returned = clock()
        outcome = None
        if reason == _PORT_OUT:
            ports.write(exit_.io_port, exit_.io_size, exit_.value)
        elif reason == _PORT_IN:
            size = exit_.io_size
            value = ports.read(exit_.io_port, size) & _MASK[size]
            _PACK[size](vcpu.io_buffer, exit_.data_offset, value)
        elif reason == _MMIO:
            _mmio(vcpu, context.mmio)
        elif reason < 0:
            if _interrupted(vcpu, reason, context.stopping):
                return None
            observer.on_interrupt(vcpu)
            continue
        elif not (reason == ExitKind.DEBUG and observer.on_debug(vcpu)):
            outcome = _slow_exit(vcpu, reason, context)
        observer.on_exit(vcpu, reason, returned - started, clock() - returned)
        if outcome is not None:
            return outcome


def _string_io(vcpu: Vcpu, ports: Bus) -> None:
    """rep ins/outs: ``io_count`` items of ``io_size`` bytes, packed in the I/O buffer."""
    e = vcpu.exit
    buffer = vcpu.io_buffer
    size, port, offset = e.io_size, e.io_port, e.data_offset
    if size not in (1, 2, 4):
        raise BackendError("run", errno.EINVAL, f"string I/O of {size}-byte items")
    end = offset + e.io_count * size
    if end > len(buffer):
        raise BackendError("run", errno.EFAULT, f"string I/O data overruns the buffer ({end})")
    if e.io_direction == IO_DIRECTION_OUT:
        for at in range(offset, end, size):
            ports.write(port, size, int.from_bytes(buffer[at : at + size], "little"))
    else:
        for at in range(offset, end, size):
            value = ports.read(port, size) & _MASK[size]
            buffer[at : at + size] = value.to_bytes(size, "little")


def _mmio(vcpu: Vcpu, mmio: Bus) -> None:
    e = vcpu.exit
    size = e.mmio_len
    if not 1 <= size <= 8:
        raise BackendError("run", errno.EINVAL, f"MMIO access of {size} bytes")
    if e.mmio_is_write:
        mmio.write(e.mmio_addr, size, e.value & _MASK[size])
    else:
        value = mmio.read(e.mmio_addr, size) & _MASK[size]
        offset = e.data_offset
        vcpu.io_buffer[offset : offset + size] = value.to_bytes(size, "little")


def _crash(
    vcpu: Vcpu, kind: OutcomeKind, what: str, detail: str = "", code: bytes | None = None
) -> Outcome:
    """A fatal guest event; ``Machine`` adds the crash report and the full message."""
    return Outcome(kind, what, vcpu=vcpu.index, detail=detail, code=code)


def _slow_exit(vcpu: Vcpu, reason: int, context: LoopContext) -> Outcome | None:
    """Exits off the hot path: return an Outcome to stop, or None to keep running."""
    if reason == ExitKind.PORT_STRING:
        _string_io(vcpu, context.ports)
        return None
    if reason == ExitKind.SPURIOUS:
        return None
    if reason == ExitKind.HLT:
        return context.arch.halt(vcpu, context.has_irqchip)
    if reason == ExitKind.SHUTDOWN:
        # A real PC resets here; kvmpy reports it (and restarts with --reboot).
        return _crash(vcpu, OutcomeKind.TRIPLE_FAULT, f"triple fault ({vcpu.exit_name()})")
    if reason == ExitKind.INTERNAL_ERROR:
        if context.arch.complete(vcpu):
            return None
        detail, code = vcpu.describe_exit()
        return _crash(vcpu, OutcomeKind.CRASH, f"{vcpu.backend_name} internal error", detail, code)
    if reason == ExitKind.FAIL_ENTRY:
        detail, _ = vcpu.describe_exit()
        return _crash(vcpu, OutcomeKind.CRASH, f"VM entry failed ({vcpu.exit_name()})", detail)
    if reason == ExitKind.SYSTEM_EVENT:
        event = vcpu.system_event
        if event == SystemEvent.SHUTDOWN:
            return Outcome(
                OutcomeKind.SHUTDOWN, f"vCPU {vcpu.index}: guest powered off", vcpu=vcpu.index
            )
        if event == SystemEvent.RESET:
            return Outcome(OutcomeKind.RESET, f"vCPU {vcpu.index}: guest reset", vcpu=vcpu.index)
        detail, _ = vcpu.describe_exit()
        return _crash(vcpu, OutcomeKind.CRASH, "system event", detail)
    if reason == ExitKind.DEBUG:
        return _crash(vcpu, OutcomeKind.CRASH, f"unhandled exit {vcpu.exit_name()}")
    return context.arch.other_exit(vcpu)
