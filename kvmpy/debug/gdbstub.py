"""A GDB remote stub: ``kvmpy run --gdb tcp::1234`` and a real gdb debugs the guest.

    stub = attach_gdb(machine, "tcp::1234", wait=True)   # machine.observer = stub
    try:
        outcome = machine.run()
    finally:
        stub.close()

then ``gdb -ex 'target remote :1234'``.  ``GdbStub`` is an ``ExitObserver``:
the vCPU threads call it, and a server thread speaks the protocol
(``gdbproto``) to one gdb at a time.

All-stop: when gdb interrupts (0x03) or a vCPU stops (breakpoint, step,
watchpoint, crash), every vCPU is kicked out of KVM_RUN and parks in the
observer hook it was in (``on_interrupt``, ``on_debug``, ``on_exit`` or
``on_start``).  While it is parked, gdb's register and memory requests are
handed to the vCPU's own thread, which runs them between KVM_RUNs.  ``c``
and ``s`` release the parked threads; each arms KVM_SET_GUEST_DEBUG
(single-step, DR0-DR3) for itself before it enters the guest again.

Breakpoints: ``Z1`` uses one of DR0-DR3.  ``Z0`` writes int3 when this
host's KVM reports int3 as KVM_EXIT_DEBUG (``USE_SW_BP``); otherwise it also
takes a debug register (PVM: int3 at CPL0 is an emulation failure there), and
the console says so.  Resuming from an instruction breakpoint first steps one
instruction with the instruction breakpoints off.  ``Z2``/``Z3``/``Z4`` are
data watchpoints (DR7 R/W = write, or read/write: x86 has no read-only
watchpoint, so ``Z3`` watches every access and gdb sorts out the writes);
they are refused when a probe showed they do not fire here.

Register layout: chosen when gdb connects, from vCPU 0's mode: ``i386:x86-64``
when EFER.LMA is set (64-bit or compatibility mode), else ``i386`` (32-bit
and 16-bit code; in real mode gdb sees the offsets, so use ``$cs*16+$eip``
for the code's linear address).  gdb cannot change architecture within a
session: after the guest switches to long mode, reconnect (or force the
layout with ``arch=``).  Memory addresses are linear: they go through the
guest's paging (KVM_TRANSLATE), as the vCPU sees them.
"""

from __future__ import annotations

import contextlib
import select
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from kvmpy.backends.base import BackendError, Vcpu
from kvmpy.backends.exits import ExitKind
from kvmpy.debug.gdbproto import (
    AMD64,
    AMD64_GPRS,
    BP_HARDWARE,
    BP_SOFTWARE,
    E_FAULT,
    E_INVAL,
    E_NOSPC,
    I386,
    I386_GPRS,
    SEGMENT_REGISTERS,
    SIGINT,
    SIGKILL,
    SIGSEGV,
    SIGTRAP,
    WATCH_ACCESS,
    WATCH_READ,
    WATCH_REASONS,
    WATCH_WRITE,
    Ack,
    BadPacket,
    Exited,
    GdbSession,
    Interrupt,
    Packet,
    PacketDecoder,
    RegisterLayout,
    Status,
    Stop,
    TargetError,
    frame,
)
from kvmpy.debug.guestview import read_linear, translate
from kvmpy.devices.debug_exit import DEBUG_EXIT_PORT, DEBUG_EXIT_PORTS
from kvmpy.memory import PAGE_SIZE, GuestMemory, GuestMemoryError
from kvmpy.outcome import Outcome, OutcomeKind
from kvmpy.runloop import ExitObserver
from kvmpy.x86.registers import EFER_LMA, Fpu, Regs, Sregs, cpu_mode

if TYPE_CHECKING:
    from kvmpy.machine import Machine

T = TypeVar("T")

DEFAULT_HOST = "127.0.0.1"
REQUEST_TIMEOUT = 10.0  # seconds a parked vCPU has to answer a register/memory request
PARK_POLL = 0.1  # how often a parked vCPU looks for the machine stopping
STOP_TIMEOUT = 10.0  # how long a new connection waits for the vCPUs to stop

# DR6 and DR7 (SDM Vol. 3B, 18.2).
DR6_BS = 1 << 14  # single-step
DR_SLOTS = 4
_DR7_RW = {BP_SOFTWARE: 0b00, BP_HARDWARE: 0b00, WATCH_WRITE: 0b01}
_DR7_RW.update({WATCH_READ: 0b11, WATCH_ACCESS: 0b11})
_DR7_LEN = {1: 0b00, 2: 0b01, 8: 0b10, 4: 0b11}
DEBUG_VECTOR = 1
BREAKPOINT_VECTOR = 3
INT3 = 0xCC

_CRASH_EXITS = (ExitKind.INTERNAL_ERROR, ExitKind.SHUTDOWN, ExitKind.FAIL_ENTRY)


# -- where to listen ---------------------------------------------------------------------


def parse_gdb_spec(spec: str) -> tuple[str, int]:
    """``tcp::1234``, ``tcp:HOST:1234``, ``:1234`` or ``1234`` -> (host, port).

    An empty host means 127.0.0.1: the stub can read and write all guest
    memory, so it listens on all interfaces only when asked (``tcp:0.0.0.0:1234``).
    """
    text = spec.removeprefix("tcp:")
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = "", text
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(
            f"bad --gdb address {spec!r}: expected tcp::PORT or tcp:HOST:PORT"
        ) from None
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"bad --gdb port {port} in {spec!r}")
    return host.strip("[]") or DEFAULT_HOST, port


# -- what this host's KVM can do -------------------------------------------------------


@dataclass(frozen=True)
class DebugSupport:
    """Which KVM_SET_GUEST_DEBUG features a probe guest (long mode, CPL0) saw work."""

    single_step: bool = True
    hw_breakpoints: bool = True
    watchpoints: bool = True
    sw_breakpoints: bool = False

    def describe(self) -> str:
        def word(ok: bool) -> str:
            return "yes" if ok else "no"

        return (
            f"single-step {word(self.single_step)}, hardware breakpoints "
            f"{word(self.hw_breakpoints)}, watchpoints {word(self.watchpoints)}, "
            f"int3 breakpoints {word(self.sw_breakpoints)}"
        )


# movl $1, 0x101000 ; nop ; int3 ; hlt  -- at 1 MiB, in long mode
_PROBE_CODE = bytes.fromhex("c70425001010000100000090ccf4")
_PROBE_ENTRY = 0x100000
_PROBE_DATA = 0x101000
_PROBE_NOP = _PROBE_ENTRY + 11


class _Probe(ExitObserver):
    def __init__(self) -> None:
        self.seen: set[str] = set()

    def on_start(self, vcpu: Vcpu) -> None:
        self._arm(vcpu, step=True, exec_bp=True)

    @staticmethod
    def _arm(vcpu: Vcpu, step: bool, exec_bp: bool) -> None:
        dr7 = 1 | _DR7_RW[WATCH_WRITE] << 16 | _DR7_LEN[4] << 18
        if exec_bp:
            dr7 |= 1 << 2
        vcpu.set_guest_debug(
            single_step=step,
            breakpoints=[_PROBE_DATA, _PROBE_NOP, 0, 0, 0, 0, 0, dr7],
            software_breakpoints=True,
        )

    def on_exit(self, vcpu: Vcpu, reason: int, run_ns: int, handle_ns: int) -> None:
        pass

    def on_debug(self, vcpu: Vcpu) -> bool:
        exit_ = vcpu.exit
        if exit_.debug_exception == BREAKPOINT_VECTOR:
            self.seen.add("int3")
            regs = vcpu.get_regs()
            if regs.rip == _PROBE_NOP + 1:  # still on the int3: skip it
                regs.rip += 1
                vcpu.set_regs(regs)
            vcpu.set_guest_debug(enable=False)
            return True
        if exit_.debug_dr6 & DR6_BS:
            self.seen.add("step")
        if exit_.debug_dr6 & 1:
            self.seen.add("watch")
        if exit_.debug_dr6 & 2:
            self.seen.add("break")
        self._arm(vcpu, step=False, exec_bp="break" not in self.seen)
        return True

    def on_interrupt(self, vcpu: Vcpu) -> None:
        pass


def probe_debug_support(kvm_path: str | None = None, timeout: float = 2.0) -> DebugSupport:
    """Run a tiny guest to see which debug features this host's KVM delivers.

    It writes a watched word with single-step on, runs into an instruction
    breakpoint, then executes int3 with USE_SW_BP.  Takes a few milliseconds.
    """
    from kvmpy.loaders import LoadPlan, LoadSegment
    from kvmpy.machine import Machine

    probe = _Probe()
    try:
        with Machine(mem_size=4 << 20, irqchip=False, kvm_path=kvm_path) as machine:
            plan = LoadPlan(
                "debug probe",
                _PROBE_ENTRY,
                [LoadSegment(_PROBE_ENTRY, _PROBE_CODE, len(_PROBE_CODE))],
            )
            machine.load(plan, mode="long")
            machine.observer = probe
            machine.run(timeout=timeout)
    except OSError:
        return DebugSupport(False, False, False, False)
    seen = probe.seen
    return DebugSupport("step" in seen, "break" in seen, "watch" in seen, "int3" in seen)


# -- debug registers -------------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """One debug register's worth of a gdb breakpoint or watchpoint."""

    kind: int  # the Z packet type
    address: int  # what gdb asked for (reported back on a watchpoint hit)
    length: int
    linear: int  # the aligned piece this register covers
    size: int

    @property
    def is_data(self) -> bool:
        return self.kind in WATCH_REASONS


def split_watch(address: int, length: int, allow_8: bool) -> list[tuple[int, int]]:
    """Cover [address, address+length) with aligned 1/2/4(/8)-byte pieces."""
    if length <= 0:
        raise ValueError(f"watch length {length}")
    sizes = (8, 4, 2, 1) if allow_8 else (4, 2, 1)
    pieces = []
    end = address + length
    while address < end:
        size = next(s for s in sizes if address % s == 0 and address + s <= end)
        pieces.append((address, size))
        address += size
    return pieces


class DebugRegisters:
    """DR0-DR3 shared out among gdb's hardware breakpoints and watchpoints."""

    def __init__(self, slots: int = DR_SLOTS) -> None:
        self.slots: list[Slot | None] = [None] * slots

    def insert(self, kind: int, address: int, length: int, allow_8: bool = True) -> None:
        if self.find(kind, address, length):
            return
        is_data = kind in WATCH_REASONS
        pieces = split_watch(address, length, allow_8) if is_data else [(address, 1)]
        free = [i for i, slot in enumerate(self.slots) if slot is None]
        if len(pieces) > len(free):
            raise TargetError(f"{len(pieces)} debug registers needed, {len(free)} free", E_NOSPC)
        for i, (linear, size) in zip(free, pieces, strict=False):
            self.slots[i] = Slot(kind, address, length, linear, size)

    def find(self, kind: int, address: int, length: int) -> list[int]:
        return [
            i
            for i, slot in enumerate(self.slots)
            if slot is not None
            and (slot.kind, slot.address, slot.length) == (kind, address, length)
        ]

    def remove(self, kind: int, address: int, length: int) -> None:
        for i in self.find(kind, address, length):
            self.slots[i] = None

    def clear(self) -> None:
        self.slots = [None] * len(self.slots)

    @property
    def active(self) -> bool:
        return any(slot is not None for slot in self.slots)

    def has_exec_at(self, linear: int) -> bool:
        return any(
            slot is not None and not slot.is_data and slot.linear == linear for slot in self.slots
        )

    def debugreg(self, with_exec: bool = True) -> list[int]:
        """``kvm_guest_debug.arch.debugreg``: DR0-DR3 and DR7 (L bits, R/W, LEN)."""
        regs = [0] * 8
        dr7 = 0
        for i, slot in enumerate(self.slots):
            if slot is None or (not with_exec and not slot.is_data):
                continue
            regs[i] = slot.linear
            length = _DR7_LEN[slot.size] if slot.is_data else 0
            dr7 |= 1 << (2 * i) | _DR7_RW[slot.kind] << (16 + 4 * i) | length << (18 + 4 * i)
        regs[7] = dr7
        return regs

    def hit(self, dr6: int) -> Slot | None:
        """The slot DR6 names; a watchpoint wins over an instruction breakpoint."""
        hits = [slot for i, slot in enumerate(self.slots) if slot is not None and dr6 & (1 << i)]
        hits.sort(key=lambda slot: not slot.is_data)
        return hits[0] if hits else None


# -- x87 helpers -------------------------------------------------------------------------


def _full_tag_word(fpu: Fpu) -> int:
    """gdb's ftag (2 bits per register) from FXSAVE's abridged tag byte."""
    top = (fpu.fsw >> 11) & 7
    tag = 0
    for physical in range(8):
        stack = (physical - top) & 7
        if not fpu.ftwx & (1 << physical):
            value = 3  # empty
        else:
            raw = int.from_bytes(fpu.fpr[stack * 16 : stack * 16 + 10], "little")
            exponent = (raw >> 64) & 0x7FFF
            integer_bit = (raw >> 63) & 1
            if exponent == 0x7FFF:
                value = 2  # special
            elif exponent == 0:
                value = 1 if raw & ((1 << 64) - 1) == 0 else 2  # zero, or denormal
            else:
                value = 0 if integer_bit else 2
        tag |= value << (2 * physical)
    return tag


def _abridged_tag(full: int) -> int:
    return sum(1 << i for i in range(8) if (full >> (2 * i)) & 3 != 3)


# -- the stub ----------------------------------------------------------------------------


@dataclass
class _Request:
    fn: Callable[[Vcpu], object]
    done: threading.Event = field(default_factory=threading.Event)
    result: object = None
    error: BaseException | None = None


@dataclass
class _VcpuState:
    vcpu: Vcpu
    started: bool = False
    parked: bool = False
    resume: str | None = None  # what gdb told this parked vCPU to do
    stepping: bool = False  # a single step is armed
    step_over: str | None = None  # stepping past a breakpoint, then "c" or "s"
    pending: Stop | None = None  # a stop not reported yet (another vCPU's came first)
    debug_on: bool = False  # KVM_SET_GUEST_DEBUG is enabled on it
    requests: deque[_Request] = field(default_factory=deque)


@dataclass(frozen=True)
class _SoftBreakpoint:
    gpa: int
    original: int


def _stderr_log(message: str) -> None:
    print(f"kvmpy: gdb: {message}", file=sys.stderr, flush=True)


class GdbStub(ExitObserver):
    """The target side of the gdb connection; set as ``machine.observer``.

    ``start()`` listens (``port`` is then the real port, useful with port 0);
    ``close()`` ends the session, releases any parked vCPU and stops listening.
    With ``wait``, vCPUs wait in ``on_start`` until gdb connects and resumes.
    ``support`` says what the host's KVM can do (None: probe it in ``start``);
    ``arch`` forces "i386:x86-64" or "i386" instead of choosing by mode.
    """

    def __init__(
        self,
        machine: Machine,
        host: str = DEFAULT_HOST,
        port: int = 1234,
        *,
        wait: bool = False,
        support: DebugSupport | None = None,
        arch: str | None = None,
        log: Callable[[str], None] = _stderr_log,
    ) -> None:
        if arch not in (None, AMD64.architecture, I386.architecture):
            raise ValueError(f"unknown gdb architecture {arch!r}")
        self.machine = machine
        self.host = host
        self.port = port
        self.wait = wait
        self.support = support
        self.arch = arch
        self.log = log
        self._states = [_VcpuState(vcpu) for vcpu in machine.vcpus]
        self._cond = threading.Condition()
        self._pausing = wait  # vCPUs park at their next chance
        self._attached = False  # a gdb is connected
        self._running = False  # gdb resumed the target and waits for a stop
        self._interrupted = False  # gdb sent 0x03
        self._stop: Stop | None = None  # the first stop since the resume
        self._last: Status = Stop(SIGTRAP, 1)
        self._layout: RegisterLayout = AMD64
        self._dregs = DebugRegisters()
        self._soft: dict[int, _SoftBreakpoint] = {}
        self._exit_value: int | None = None
        self._crashed = False
        self._killed = False
        self._closed = False
        self._warned: set[str] = set()
        self._listener: socket.socket | None = None
        self._server: threading.Thread | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    # -- life cycle ------------------------------------------------------------------

    def start(self) -> None:
        """Probe the host (if ``support`` is None), listen, and serve in a thread."""
        if self.support is None:
            self.support = probe_debug_support(getattr(self.machine.backend, "path", None))
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        try:
            listener = socket.create_server((self.host, self.port), family=family)
        except OSError as exc:
            raise ValueError(
                f"cannot listen for gdb on {self.host}:{self.port}: {exc.strerror or exc}"
            ) from None
        listener.settimeout(0.2)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._server = threading.Thread(target=self._serve, name="kvmpy-gdb", daemon=True)
        self._server.start()

    def close(self) -> None:
        """Detach from gdb (the guest runs on), stop listening, join the server thread."""
        with self._cond:
            self._closed = True
            self._attached = False
            self._cond.notify_all()
        self._wake()
        if self._listener is not None:
            self._listener.close()
        if self._server is not None and self._server is not threading.current_thread():
            self._server.join(timeout=5)
        with self._cond:
            self._release_all()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> GdbStub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- ExitObserver: called in the vCPU threads ---------------------------------

    def on_start(self, vcpu: Vcpu) -> None:
        state = self._state(vcpu)
        with self._cond:
            state.started = True
            must_park = self._pausing or state.resume is not None
            action: str | None = "c" if self._attached else None
        if must_park:
            action = self._park(state, None)
        self._arm(state, action)

    def on_exit(self, vcpu: Vcpu, reason: int, run_ns: int, handle_ns: int) -> None:
        if reason == ExitKind.PORT_OUT:
            if DEBUG_EXIT_PORT <= vcpu.exit.io_port < DEBUG_EXIT_PORT + DEBUG_EXIT_PORTS:
                self._exit_value = vcpu.exit.value
        elif reason in _CRASH_EXITS and self._attached and not self.machine.stopped:
            # Let gdb look at the crash before the run loop ends the VM.
            self._crashed = True
            state = self._state(vcpu)
            self._park(state, Stop(SIGSEGV, vcpu.index + 1))

    def on_debug(self, vcpu: Vcpu) -> bool:
        state = self._state(vcpu)
        if not state.debug_on:
            return False  # not ours
        if not self._attached:
            vcpu.set_guest_debug(enable=False)
            state.debug_on = False
            return True
        event = self._debug_event(state)
        if event is None:  # stepped past a breakpoint: go on, unless a stop is under way
            action = self._park(state, None) if self._pausing else "c"
        else:
            action = self._park(state, event)
        self._arm(state, action)
        return True

    def on_interrupt(self, vcpu: Vcpu) -> None:
        if self._pausing:
            state = self._state(vcpu)
            self._arm(state, self._park(state, None))

    def _state(self, vcpu: Vcpu) -> _VcpuState:
        return self._states[vcpu.index]

    def _debug_event(self, state: _VcpuState) -> Stop | None:
        """What a KVM_EXIT_DEBUG means; None when it ends a step past a breakpoint."""
        exit_ = state.vcpu.exit
        thread = state.vcpu.index + 1
        dr6 = exit_.debug_dr6
        stepping, step_over = state.stepping, state.step_over
        state.stepping, state.step_over = False, None
        slot = None
        if exit_.debug_exception == DEBUG_VECTOR:
            with self._cond:
                slot = self._dregs.hit(dr6)
        if slot is not None and slot.is_data:
            return Stop(SIGTRAP, thread, WATCH_REASONS[slot.kind], slot.address)
        if step_over == "c":
            return None
        if stepping or step_over == "s":
            return Stop(SIGTRAP, thread)
        if slot is not None:
            return Stop(SIGTRAP, thread, "swbreak" if slot.kind == BP_SOFTWARE else "hwbreak")
        if exit_.debug_exception == BREAKPOINT_VECTOR:
            return self._int3_event(state)
        return Stop(SIGTRAP, thread)

    def _int3_event(self, state: _VcpuState) -> Stop:
        thread = state.vcpu.index + 1
        regs = state.vcpu.get_regs()
        sregs = state.vcpu.get_sregs()
        linear = _code_linear(sregs, regs.rip)
        with self._cond:
            ours = linear in self._soft or linear - 1 in self._soft
        if ours and linear - 1 in self._soft and linear not in self._soft:
            regs.rip -= 1  # report (and resume) at the breakpoint, not after it
            state.vcpu.set_regs(regs)
        return Stop(SIGTRAP, thread, "swbreak" if ours else "")

    def _park(self, state: _VcpuState, event: Stop | None) -> str | None:
        """Stop this vCPU (and all the others) until gdb resumes it; serve gdb meanwhile.

        Returns "c" or "s", or None when the machine or the stub is shutting down.
        """
        with self._cond:
            if event is not None and self._attached:
                if self._running and self._stop is None:
                    self._stop = event
                else:
                    state.pending = event
            self._pausing = True
            for other in self._states:
                if other is not state and not other.parked:
                    other.vcpu.kick()
            state.parked = True
            self._cond.notify_all()
            self._wake()
            action: str | None = None
            try:
                while True:
                    if state.requests:
                        self._serve_request(state.vcpu, state.requests.popleft())
                        continue
                    if state.resume is not None:
                        action, state.resume = state.resume, None
                        break
                    if self._closed or self.machine.stopped:
                        break
                    self._cond.wait(PARK_POLL)
            finally:
                state.parked = False
                while state.requests:
                    request = state.requests.popleft()
                    request.error = TargetError("the vCPU is no longer stopped")
                    request.done.set()
                self._cond.notify_all()
        return action

    @staticmethod
    def _serve_request(vcpu: Vcpu, request: _Request) -> None:
        try:
            request.result = request.fn(vcpu)
        except BaseException as exc:
            request.error = exc
        request.done.set()

    def _arm(self, state: _VcpuState, action: str | None) -> None:
        """Set KVM_SET_GUEST_DEBUG for ``action`` before this vCPU enters the guest again."""
        vcpu = state.vcpu
        state.stepping = False
        state.step_over = None
        if action is None or not self._attached or self.machine.stopped:
            if state.debug_on:
                vcpu.set_guest_debug(enable=False)
                state.debug_on = False
            return
        with self._cond:
            dregs = self._dregs
            soft = bool(self._soft)
            over = dregs.active and dregs.has_exec_at(
                _code_linear(vcpu.get_sregs(), vcpu.get_regs().rip)
            )
            debugreg = dregs.debugreg(with_exec=not over)
            hardware = debugreg[7] != 0
        step = False
        if over:
            state.step_over = action
            step = True
        elif action == "s":
            state.stepping = True
            step = True
        enable = step or hardware or soft
        if enable or state.debug_on:
            vcpu.set_guest_debug(
                enable=enable,
                single_step=step,
                breakpoints=debugreg if hardware else None,
                software_breakpoints=soft,
            )
            state.debug_on = enable

    # -- the server thread -------------------------------------------------------------

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"!")

    def _serve(self) -> None:
        listener = self._listener
        assert listener is not None
        if self.wait:
            self.log(f"waiting for gdb on {self.host}:{self.port}")
        while not self._closed:
            try:
                conn, peer = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            with conn:
                try:
                    self._connection(conn, f"{peer[0]}:{peer[1]}")
                except OSError as exc:
                    self.log(f"connection lost: {exc}")
                finally:
                    self._end_session()

    def _connection(self, conn: socket.socket, peer: str) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._begin_session(peer)
        session = GdbSession(self)
        decoder = PacketDecoder()
        last = b""
        deferred: deque[bytes] = deque()

        def reply(payload: bytes) -> bytes:
            text = session.handle(payload)
            if text is None:
                return last
            packet = frame(text)
            conn.sendall(packet)
            return packet

        while not self._closed and not session.closing:
            readable = select.select([conn, self._wake_r], [], [], 0.2)[0]
            if self._wake_r in readable:
                with contextlib.suppress(OSError):
                    self._wake_r.recv(4096)
            if conn in readable:
                data = conn.recv(65536)
                if not data:
                    return
                for event in decoder.feed(data):
                    if isinstance(event, Packet):
                        if not session.no_ack:
                            conn.sendall(b"+")
                        if session.running:
                            deferred.append(event.payload)
                        else:
                            last = reply(event.payload)
                    elif isinstance(event, BadPacket):
                        if not session.no_ack:
                            conn.sendall(b"-")
                    elif isinstance(event, Interrupt):
                        if session.running:
                            self.interrupt()
                    elif isinstance(event, Ack) and not event.good and last and not session.no_ack:
                        conn.sendall(last)
            if session.running:
                status = self._poll_stop()
                if status is not None:
                    last = frame(session.stopped(status))
                    conn.sendall(last)
                    while deferred and not session.running and not session.closing:
                        last = reply(deferred.popleft())

    def _begin_session(self, peer: str) -> None:
        with self._cond:
            self._attached = True
            self._pausing = True
            self._running = False
            self._interrupted = False
            self._stop = None
            self._kick_running()
            deadline = time.monotonic() + STOP_TIMEOUT
            while not self._all_stopped() and not self._closed and not self.machine.stopped:
                if time.monotonic() > deadline:
                    self.log(f"not every vCPU stopped within {STOP_TIMEOUT:g} s")
                    break
                self._cond.wait(PARK_POLL)
        try:
            sregs = self._call(1, lambda vcpu: vcpu.get_sregs())
            mode = cpu_mode(sregs)
            long_mode = bool(sregs.efer & EFER_LMA)
        except TargetError:
            mode, long_mode = "unknown", True
        if self.arch is not None:
            long_mode = self.arch == AMD64.architecture
        self._layout = AMD64 if long_mode else I386
        self._last = self._status_now() if self.machine.stopped else Stop(SIGTRAP, 1)
        support = self.support.describe() if self.support else "not probed"
        self.log(
            f"connected from {peer}; vCPU 0 is in {mode} mode: target {self._layout.architecture}"
            f" ({support})"
        )

    def _end_session(self) -> None:
        if self._attached:
            self.detach()

    def _kick_running(self) -> None:
        for state in self._states:
            if not state.parked:
                state.vcpu.kick()

    def _all_stopped(self) -> bool:
        """Every vCPU is parked, not started yet, or finished (caller holds the lock)."""
        return all(
            state.parked or not state.started or state.vcpu.thread_ident is None
            for state in self._states
        )

    def _poll_stop(self) -> Status | None:
        with self._cond:
            if self.machine.stopped:
                self._running = False
                self._last = self._status_now()
                return self._last
            if self._stop is None and not self._interrupted:
                return None
            if not self._all_stopped():
                return None
            event = self._stop or Stop(SIGINT, self._current_thread())
            self._running = False
            self._interrupted = False
            self._stop = None
            self._last = event
            return event

    def _current_thread(self) -> int:
        last = self._last
        return last.thread if isinstance(last, Stop) else 1

    def _status_now(self) -> Exited:
        if self._exit_value is not None:
            return Exited(code=self._exit_value)
        if self._killed:
            return Exited(signal=SIGKILL)
        if self._crashed:
            return Exited(signal=SIGSEGV)
        return Exited(code=0)

    def _release_all(self) -> None:
        """Let every parked vCPU go on, without debugging (caller holds the lock)."""
        self._pausing = False
        for state in self._states:
            if state.parked or not state.started:
                state.resume = "c" if state.parked else None
        self._cond.notify_all()

    def _call(self, thread: int, fn: Callable[[Vcpu], T]) -> T:
        """Run ``fn(vcpu)`` in the stopped vCPU's own thread (or here, if it has none)."""
        if not 1 <= thread <= len(self._states):
            raise TargetError(f"no thread {thread}")
        state = self._states[thread - 1]
        request = _Request(fn)
        with self._cond:
            if state.parked:
                state.requests.append(request)
                self._cond.notify_all()
            elif state.vcpu.thread_ident is not None:
                raise TargetError(f"vCPU {thread - 1} is running")
            else:
                self._serve_request(state.vcpu, request)
        if not request.done.wait(REQUEST_TIMEOUT):
            raise TargetError(f"vCPU {thread - 1} did not answer")
        if request.error is not None:
            if isinstance(request.error, TargetError):
                raise request.error
            if isinstance(request.error, BackendError | GuestMemoryError | ValueError):
                raise TargetError(str(request.error))
            raise request.error
        return request.result  # type: ignore[return-value]

    # -- GdbTarget: called by the session in the server thread -------------------

    def layout(self) -> RegisterLayout:
        return self._layout

    def threads(self) -> list[int]:
        return [state.vcpu.index + 1 for state in self._states]

    def read_registers(self, thread: int) -> dict[str, int]:
        return self._call(thread, _read_registers)

    def write_registers(self, thread: int, values: dict[str, int]) -> None:
        self._call(thread, lambda vcpu: _write_registers(vcpu, values))

    def read_memory(self, thread: int, address: int, length: int) -> bytes:
        def read(vcpu: Vcpu) -> bytes:
            sregs = vcpu.get_sregs()
            start = _mask_linear(sregs, address)
            data = bytearray(read_linear(vcpu, self.machine.memory, sregs, start, length))
            with self._cond:
                for linear, soft in self._soft.items():
                    if start <= linear < start + len(data):
                        data[linear - start] = soft.original
            return bytes(data)

        return self._call(thread, read)

    def write_memory(self, thread: int, address: int, data: bytes) -> None:
        def write(vcpu: Vcpu) -> None:
            sregs = vcpu.get_sregs()
            start = _mask_linear(sregs, address)
            buffer = bytearray(data)
            with self._cond:
                for linear, soft in list(self._soft.items()):
                    if start <= linear < start + len(buffer):
                        self._soft[linear] = _SoftBreakpoint(soft.gpa, buffer[linear - start])
                        buffer[linear - start] = INT3
            _write_linear(vcpu, self.machine.memory, sregs, start, bytes(buffer))

        self._call(thread, write)

    def insert_breakpoint(self, kind: int, address: int, length: int) -> None:
        support = self.support or DebugSupport()
        if kind == BP_SOFTWARE and support.sw_breakpoints:
            self._insert_soft(address)
            return
        if kind in WATCH_REASONS:
            if not support.watchpoints:
                self._warn(
                    "watch",
                    "this host's KVM did not deliver a test watchpoint (on PVM, CPL0 code is "
                    "emulated), so hardware watchpoints are refused; "
                    "`set can-use-hw-watchpoints 0` gives software watchpoints",
                )
                raise TargetError("watchpoints do not work on this host", E_NOSPC)
        elif not support.hw_breakpoints:
            raise TargetError("hardware breakpoints do not work on this host", E_NOSPC)
        elif kind == BP_SOFTWARE:
            self._warn(
                "int3",
                "this host's KVM does not report int3 (KVM_GUESTDBG_USE_SW_BP), so "
                "`break` uses a hardware debug register, like `hbreak` (4 at most)",
            )
        with self._cond:
            linear = _mask_linear_for(self._layout, address)
            self._dregs.insert(kind, linear, length, allow_8=self._layout is AMD64)

    def remove_breakpoint(self, kind: int, address: int, length: int) -> None:
        with self._cond:
            linear = _mask_linear_for(self._layout, address)
            soft = self._soft.pop(linear, None) if kind == BP_SOFTWARE else None
            if soft is None:
                self._dregs.remove(kind, linear, length)
                return
        self.machine.memory.write_u8(soft.gpa, soft.original)

    def _insert_soft(self, address: int) -> None:
        thread = self._current_thread()
        address = _mask_linear_for(self._layout, address)

        def locate(vcpu: Vcpu) -> int | None:
            return translate(vcpu, vcpu.get_sregs(), address)

        with self._cond:
            if address in self._soft:
                return
        gpa = self._call(thread, locate)
        memory = self.machine.memory
        if gpa is None or not memory.contains(gpa):
            raise TargetError(f"{address:#x} is not mapped to RAM", E_FAULT)
        with self._cond:
            self._soft[address] = _SoftBreakpoint(gpa, memory.read_u8(gpa))
        memory.write_u8(gpa, INT3)

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self.log(message)

    def resume(self, actions: dict[int, str]) -> None:
        if not actions:
            raise TargetError("nothing to resume", E_INVAL)
        with self._cond:
            for state in self._states:
                if state.pending is not None:
                    # Report the stop that came second last time, without running anything.
                    self._stop, state.pending = state.pending, None
                    self._running = True
                    self._wake()
                    return
            self._stop = None
            self._interrupted = False
            self._pausing = False
            self._running = True
            for thread, action in actions.items():
                state = self._states[thread - 1]
                if state.parked or not state.started:
                    state.resume = action
            self._cond.notify_all()

    def interrupt(self) -> None:
        with self._cond:
            self._interrupted = True
            self._pausing = True
            self._kick_running()
        self._wake()

    def status(self) -> Status:
        if self.machine.stopped:
            return self._status_now()
        return self._last

    def kill(self) -> None:
        self._killed = True
        self.log("killed by gdb")
        self.machine.stop(Outcome(OutcomeKind.INTERRUPTED, "killed by gdb"))
        with self._cond:
            self._attached = False
            self._cond.notify_all()

    def detach(self) -> None:
        """Remove every breakpoint and let the guest run on without debugging."""
        if self._attached and not self.machine.stopped:
            self.log("detached: the guest runs on without breakpoints")
        with self._cond:
            soft = list(self._soft.values())
            self._soft.clear()
            self._dregs.clear()
            self._attached = False
            self._running = False
            self._stop = None
            for state in self._states:
                state.pending = None
            self._release_all()
        for breakpoint_ in soft:
            with contextlib.suppress(GuestMemoryError, ValueError):
                self.machine.memory.write_u8(breakpoint_.gpa, breakpoint_.original)


def attach_gdb(machine: Machine, spec: str, wait: bool = False) -> GdbStub:
    """Listen for gdb at ``spec`` (``tcp::PORT``) and add the stub to ``machine.observer``.

    An observer already set (a tracer, statistics) is kept: both go into a
    CompositeObserver, the stub last.  Do not combine it with another
    single-stepper.  Call before ``machine.run()`` and ``stub.close()`` after
    it.  Raises ValueError for a bad ``spec`` or a port that cannot be bound.
    """
    from kvmpy.debug.trace import CompositeObserver

    host, port = parse_gdb_spec(spec)
    stub = GdbStub(machine, host, port, wait=wait)
    stub.start()
    existing = machine.observer
    machine.observer = stub if existing is None else CompositeObserver([existing, stub])
    return stub


# -- registers and memory through one vCPU (run in its thread) ------------------------

_I386_TO_AMD64 = dict(
    zip(I386_GPRS, ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi"), strict=True)
)
_I386_TO_AMD64["eip"] = "rip"
_FPU_SCALARS = ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop", "mxcsr")
_SYSTEM = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer")
_LOW32 = 0xFFFF_FFFF


def _code_linear(sregs: Sregs, rip: int) -> int:
    if cpu_mode(sregs) == "long":
        return rip
    return (sregs.cs.base + rip) & _LOW32


def _mask_linear(sregs: Sregs, address: int) -> int:
    return address if sregs.efer & EFER_LMA else address & _LOW32


def _mask_linear_for(layout: RegisterLayout, address: int) -> int:
    return address if layout is AMD64 else address & _LOW32


def _read_registers(vcpu: Vcpu) -> dict[str, int]:
    regs, sregs, fpu = vcpu.get_regs(), vcpu.get_sregs(), vcpu.get_fpu()
    values = {name: getattr(regs, name) for name in (*AMD64_GPRS, "rip")}
    for short, name in _I386_TO_AMD64.items():
        values[short] = values[name] & _LOW32
    values["eflags"] = regs.rflags & _LOW32
    for name in SEGMENT_REGISTERS:
        values[name] = getattr(sregs, name).selector
    for i in range(8):
        values[f"st{i}"] = int.from_bytes(fpu.fpr[16 * i : 16 * i + 10], "little")
    for i in range(16):
        values[f"xmm{i}"] = int.from_bytes(fpu.xmm[16 * i : 16 * i + 16], "little")
    values.update(
        fctrl=fpu.fcw,
        fstat=fpu.fsw,
        ftag=_full_tag_word(fpu),
        fiseg=fpu.last_ip >> 32,
        fioff=fpu.last_ip & _LOW32,
        foseg=fpu.last_dp >> 32,
        fooff=fpu.last_dp & _LOW32,
        fop=fpu.last_opcode & 0x7FF,
        mxcsr=fpu.mxcsr,
        fs_base=sregs.fs.base,
        gs_base=sregs.gs.base,
    )
    for name in _SYSTEM:
        values[name] = getattr(sregs, name)
    return values


def _merge32(old: int, value: int) -> int:
    return (old & ~_LOW32) | (value & _LOW32)


def _write_registers(vcpu: Vcpu, values: dict[str, int]) -> None:
    regs: Regs | None = None
    sregs: Sregs | None = None
    fpu: Fpu | None = None
    for name, value in values.items():
        if name in AMD64_GPRS or name == "rip" or name in _I386_TO_AMD64 or name == "eflags":
            regs = regs or vcpu.get_regs()
            if name == "eflags":
                regs.rflags = _merge32(regs.rflags, value)
            elif name in _I386_TO_AMD64:
                full = _I386_TO_AMD64[name]
                setattr(regs, full, _merge32(getattr(regs, full), value))
            else:
                setattr(regs, name, value)
        elif name in SEGMENT_REGISTERS or name in ("fs_base", "gs_base") or name in _SYSTEM:
            sregs = sregs or vcpu.get_sregs()
            _set_system(sregs, name, value)
        elif name.startswith(("st", "xmm")) or name in _FPU_SCALARS:
            fpu = fpu or vcpu.get_fpu()
            _set_fpu(fpu, name, value)
        else:
            raise TargetError(f"no register {name}", E_INVAL)
    if regs is not None:
        vcpu.set_regs(regs)
    if sregs is not None:
        vcpu.set_sregs(sregs)
    if fpu is not None:
        vcpu.set_fpu(fpu)


def _set_system(sregs: Sregs, name: str, value: int) -> None:
    if name in ("fs_base", "gs_base"):
        getattr(sregs, name[:2]).base = value
    elif name in _SYSTEM:
        setattr(sregs, name, value)
    else:
        segment = getattr(sregs, name)
        value &= 0xFFFF
        if segment.selector == value:
            return
        if cpu_mode(sregs) != "real":
            raise TargetError(
                f"cannot load {name} outside real mode (its descriptor would not change)", E_INVAL
            )
        segment.selector = value
        segment.base = value << 4


def _set_fpu(fpu: Fpu, name: str, value: int) -> None:
    if name.startswith("st") and name[2:].isdigit():
        i = int(name[2:])
        fpr = bytearray(fpu.fpr)
        fpr[16 * i : 16 * i + 10] = value.to_bytes(10, "little")
        fpu.fpr = bytes(fpr)
    elif name.startswith("xmm"):
        i = int(name[3:])
        xmm = bytearray(fpu.xmm)
        xmm[16 * i : 16 * i + 16] = value.to_bytes(16, "little")
        fpu.xmm = bytes(xmm)
    elif name == "fctrl":
        fpu.fcw = value & 0xFFFF
    elif name == "fstat":
        fpu.fsw = value & 0xFFFF
    elif name == "ftag":
        fpu.ftwx = _abridged_tag(value)
    elif name == "fioff":
        fpu.last_ip = _merge32(fpu.last_ip, value)
    elif name == "fiseg":
        fpu.last_ip = (fpu.last_ip & _LOW32) | (value & _LOW32) << 32
    elif name == "fooff":
        fpu.last_dp = _merge32(fpu.last_dp, value)
    elif name == "foseg":
        fpu.last_dp = (fpu.last_dp & _LOW32) | (value & _LOW32) << 32
    elif name == "fop":
        fpu.last_opcode = value & 0x7FF
    elif name == "mxcsr":
        fpu.mxcsr = value & _LOW32


def _write_linear(vcpu: Vcpu, memory: GuestMemory, sregs: Sregs, linear: int, data: bytes) -> None:
    """Write ``data`` at ``linear`` through the guest's paging; all of it or an error."""
    done = 0
    while done < len(data):
        address = linear + done
        chunk = min(len(data) - done, PAGE_SIZE - address % PAGE_SIZE)
        gpa = translate(vcpu, sregs, address)
        if gpa is None or not memory.contains(gpa, chunk):
            raise TargetError(f"{address:#x} is not mapped to RAM", E_FAULT)
        memory.write(gpa, data[done : done + chunk])
        done += chunk
