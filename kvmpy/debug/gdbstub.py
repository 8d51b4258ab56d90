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

Elsewhere: the protocol in ``gdbproto``, the x86 register layouts in
``x86.gdb_registers``, DR0-DR7 in ``x86.debugregs``, int3 breakpoints in
``softbreak``, the host probe in ``hostprobe``, the listening socket in
``gdblisten``.  A gdb connection is untrusted: packets sent while the guest
runs are kept up to ``MAX_DEFERRED``, a gdb that stops reading is cut off
after ``send_timeout``, and listening beyond loopback prints a warning.
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
from typing import TYPE_CHECKING, TypeVar

from kvmpy.debug.coreapi import (
    CRASH_EXITS,
    BackendError,
    ExitObserver,
    Outcome,
    OutcomeKind,
    Vcpu,
)
from kvmpy.debug.gdblisten import DEFAULT_HOST, exposure_warning, listen, parse_gdb_spec
from kvmpy.debug.gdbproto import (
    BP_SOFTWARE,
    E_FAULT,
    E_INVAL,
    E_NOSPC,
    SIGINT,
    SIGKILL,
    SIGSEGV,
    SIGTRAP,
    WATCH_REASONS,
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
from kvmpy.debug.guestview import code_address, read_linear, translate, write_linear
from kvmpy.debug.hostprobe import DebugSupport, probe_debug_support
from kvmpy.debug.softbreak import SoftBreakpoints
from kvmpy.memory import GuestMemoryError
from kvmpy.records import Record, field
from kvmpy.x86.debugregs import BREAKPOINT_VECTOR, DEBUG_VECTOR, DebugRegisters
from kvmpy.x86.gdb_registers import (
    AMD64,
    I386,
    layout_for,
    mask_linear,
    mask_linear_for,
    read_registers,
    write_registers,
)
from kvmpy.x86.registers import cpu_mode

if TYPE_CHECKING:
    from kvmpy.machine import Machine

T = TypeVar("T")

REQUEST_TIMEOUT = 10.0  # seconds a parked vCPU has to answer a register/memory request
PARK_POLL = 0.1  # how often a parked vCPU looks for the machine stopping
STOP_TIMEOUT = 10.0  # how long a new connection waits for the vCPUs to stop
SEND_TIMEOUT = 10.0  # a gdb that reads nothing for this long is disconnected
MAX_DEFERRED = 64  # packets kept while the guest runs (all-stop gdb sends none)


# -- the stub ----------------------------------------------------------------------------


class _Request(Record, frozen=False):
    fn: Callable[[Vcpu], object]
    done: threading.Event = field(default_factory=threading.Event)
    result: object = None
    error: BaseException | None = None


class _VcpuState(Record, frozen=False):
    vcpu: Vcpu
    started: bool = False
    parked: bool = False
    resume: str | None = None  # what gdb told this parked vCPU to do
    stepping: bool = False  # a single step is armed
    step_over: str | None = None  # stepping past a breakpoint, then "c" or "s"
    pending: Stop | None = None  # a stop not reported yet (another vCPU's came first)
    debug_on: bool = False  # KVM_SET_GUEST_DEBUG is enabled on it
    requests: deque[_Request] = field(default_factory=deque)


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
        send_timeout: float = SEND_TIMEOUT,
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
        self.send_timeout = send_timeout
        self.dropped_packets = 0  # sent while the guest ran, past MAX_DEFERRED
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
        self._soft = SoftBreakpoints(machine.memory)
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
            backend = self.machine.backend
            self.support = probe_debug_support(getattr(backend, "path", None), backend=backend.name)
        self._listener = listener = listen(self.host, self.port)
        self.port = listener.getsockname()[1]
        warning = exposure_warning(listener, self.host)
        if warning is not None:
            self.log(warning)
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
        if reason in CRASH_EXITS and self._attached and not self.machine.stopped:
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
        linear = code_address(sregs, regs.rip)
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
                code_address(vcpu.get_sregs(), vcpu.get_regs().rip)
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
                except TimeoutError:
                    self.log(f"gdb read nothing for {self.send_timeout:g} s: disconnected")
                except OSError as exc:
                    self.log(f"connection lost: {exc}")
                except Exception as exc:  # a bug must not stop the stub serving the next gdb
                    self.log(f"internal error, connection closed: {exc!r}")
                finally:
                    self._end_session()

    def _connection(self, conn: socket.socket, peer: str) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.settimeout(self.send_timeout)  # bounds sendall; recv runs only when readable
        self._begin_session(peer)
        session = GdbSession(self)
        decoder = PacketDecoder()
        last = b""
        deferred: deque[bytes] = deque()
        dropped = 0

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
                        if not session.running:
                            last = reply(event.payload)
                        elif len(deferred) < MAX_DEFERRED:
                            deferred.append(event.payload)
                        else:
                            dropped += 1
                            self.dropped_packets += 1
                            if dropped == 1:
                                self.log(f"more than {MAX_DEFERRED} packets while running: dropped")
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
            mode, layout = cpu_mode(sregs), layout_for(sregs)
        except TargetError:
            mode, layout = "unknown", AMD64
        if self.arch is not None:
            layout = AMD64 if self.arch == AMD64.architecture else I386
        self._layout = layout
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
        outcome = self.machine.outcome
        if outcome is not None and outcome.exit_code is not None:
            return Exited(code=outcome.exit_code)
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
        deadline = time.monotonic() + REQUEST_TIMEOUT
        with self._cond:
            # A vCPU thread that has started but not parked yet is on its way
            # there (a slow start on a busy host): wait for it, a while.
            while not state.parked and state.vcpu.thread_ident is not None and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, PARK_POLL))
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
            if isinstance(request.error, BackendError | ValueError | OverflowError):
                raise TargetError(str(request.error))
            raise request.error
        return request.result  # type: ignore[return-value]

    # -- GdbTarget: called by the session in the server thread -------------------

    def layout(self) -> RegisterLayout:
        return self._layout

    def threads(self) -> list[int]:
        return [state.vcpu.index + 1 for state in self._states]

    def read_registers(self, thread: int) -> dict[str, int]:
        return self._call(thread, read_registers)

    def write_registers(self, thread: int, values: dict[str, int]) -> None:
        self._call(thread, lambda vcpu: write_registers(vcpu, values))

    def read_memory(self, thread: int, address: int, length: int) -> bytes:
        def read(vcpu: Vcpu) -> bytes:
            sregs = vcpu.get_sregs()
            start = mask_linear(sregs, address)
            return self._soft.hide(
                start, read_linear(vcpu, self.machine.memory, sregs, start, length)
            )

        return self._call(thread, read)

    def write_memory(self, thread: int, address: int, data: bytes) -> None:
        def write(vcpu: Vcpu) -> None:
            sregs = vcpu.get_sregs()
            start = mask_linear(sregs, address)
            try:
                self._soft.write(
                    start,
                    data,
                    lambda out: write_linear(vcpu, self.machine.memory, sregs, start, out),
                )
            except GuestMemoryError as exc:
                raise TargetError(str(exc), E_FAULT) from None

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
            linear = mask_linear_for(self._layout, address)
            self._dregs.insert(kind, linear, length, allow_8=self._layout is AMD64)

    def remove_breakpoint(self, kind: int, address: int, length: int) -> None:
        linear = mask_linear_for(self._layout, address)
        if kind == BP_SOFTWARE and self._soft.remove(linear):
            return
        with self._cond:
            self._dregs.remove(kind, linear, length)

    def _insert_soft(self, address: int) -> None:
        linear = mask_linear_for(self._layout, address)
        if linear not in self._soft:
            gpa = self._call(
                self._current_thread(), lambda vcpu: translate(vcpu, vcpu.get_sregs(), linear)
            )
            self._soft.insert(linear, gpa)

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
        self._soft.clear()
        with self._cond:
            self._dregs.clear()
            self._attached = False
            self._running = False
            self._stop = None
            for state in self._states:
                state.pending = None
            self._release_all()


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
