"""Pause, resume, reset and quit a running Machine from another thread (QMP, a monitor).

    control = RunControl(machine, start_paused=False)
    outcome = control.run(timeout)        # the main thread: returns when the run really ends
    control.pause(); control.resume()     # any other thread

A pause ends the Machine's run with a private ``Outcome`` (every vCPU is
kicked out of the backend and its thread joins); the vCPUs' state stays in
the backend, so ``resume`` just starts the threads again.  This needs
nothing from the run loop: the fast loop stays as it is.  While the machine
is paused (or held by ``vcpus_stopped``), any thread may read registers and
translate addresses, since no vCPU is inside the backend.

Events (``STOP``, ``RESUME``, ``RESET``, ``SHUTDOWN``, ``POWERDOWN``,
``SUSPEND``, ``WAKEUP``: the machine's S3 state, watched while it runs) go to
``listeners`` as ``(name, data)``, named and shaped as QMP's.
"""

from __future__ import annotations

import contextlib
import enum
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from kvmpy.outcome import Outcome, OutcomeKind

if TYPE_CHECKING:
    from kvmpy.machine import Machine

EventListener = Callable[[str, dict[str, Any]], None]
_WAIT_SLICE = 0.25  # a paused main thread wakes this often (Ctrl-C, the deadline)
_SLEEP_POLL = 0.05  # how often a running machine is asked whether it sleeps in S3


class RunState(str, enum.Enum):
    """What ``query-status`` calls the machine's state."""

    PRELAUNCH = "prelaunch"  # -S: never ran yet
    RUNNING = "running"
    PAUSED = "paused"
    SUSPENDED = "suspended"  # ACPI S3 (set through ``suspended``/``woken``)
    SHUTDOWN = "shutdown"  # the run has ended

    def __str__(self) -> str:
        return self.value


class ControlError(Exception):
    """A request that does not fit the machine's state (the QMP layer makes it GenericError)."""


# SHUTDOWN's "reason", as QEMU names it, for each way a run ends.
_SHUTDOWN_REASONS = {
    OutcomeKind.EXIT: "guest-shutdown",
    OutcomeKind.HALT: "guest-shutdown",
    OutcomeKind.SHUTDOWN: "guest-shutdown",
    OutcomeKind.RESET: "guest-reset",
    OutcomeKind.TRIPLE_FAULT: "guest-reset",
    OutcomeKind.CRASH: "guest-panic",
    OutcomeKind.TIMEOUT: "host-error",
    OutcomeKind.STEP_LIMIT: "host-error",
    OutcomeKind.STOPPED: "host-qmp-quit",
    OutcomeKind.INTERRUPTED: "host-signal",
    OutcomeKind.HOST_ERROR: "host-error",
}


class RunControl:
    """The run state of one machine, shared by the main thread and control threads.

    ``reboot``: the front end restarts the guest after a reset (``--reboot``),
    so a reset is reported as ``RESET`` rather than ``SHUTDOWN``.
    """

    def __init__(self, machine: Machine, *, start_paused: bool = False, reboot: bool = False):
        self.machine = machine
        self.reboot = reboot
        self.listeners: list[EventListener] = []
        self._cond = threading.Condition()
        self._want_running = not start_paused
        self._prelaunch = start_paused  # -S: never ran yet
        self._live = False  # vCPU threads are running
        self._holds = 0  # vcpus_stopped() sections in progress
        self._suspended = False  # what SUSPEND/WAKEUP last said
        self._sleep_lock = threading.Lock()
        self._ended = False
        self._pause = Outcome(OutcomeKind.STOPPED, "paused")
        self._end: Outcome | None = None  # quit or reset asked for by a control thread
        self._reset_requested = False
        self._restart_requested = False
        self._reset_event: dict[str, Any] | None = None  # sent when the next run starts
        # Called once, when the first run() begins: the guest is loaded by then
        # (a control socket starts listening here, so no client sees empty RAM).
        self.before_first_run: list[Callable[[], None]] = []
        # Wakes a guest sleeping in S3 (QMP ``system_wakeup``); the front end sets it.
        self.wakeup_handler: Callable[[], None] | None = None

    # -- the main thread ---------------------------------------------------------------

    def run(self, timeout: float | None = None) -> Outcome:
        """Run until the guest stops, ``timeout`` seconds pass (paused time included),
        a control thread asks to quit or reset, or Ctrl-C."""
        deadline = None if timeout is None else time.monotonic() + timeout
        hooks, self.before_first_run = self.before_first_run, []
        for hook in hooks:
            hook()
        with self._cond:
            self._ended = False
            reset, self._reset_event = self._reset_event, None
        if reset is not None:  # the front end has reset the machine: say so now
            self.emit("RESET", reset)
        while True:
            try:
                outcome = self._run_once(deadline)
            except KeyboardInterrupt:  # Ctrl-C while paused
                from kvmpy.machine import CTRL_C

                outcome = self.machine.with_report(CTRL_C)
            if outcome is not None:
                self._finished(outcome)
                return outcome

    def _run_once(self, deadline: float | None) -> Outcome | None:
        with self._cond:
            while self._end is None and not (self._want_running and self._holds == 0):
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return self.machine.with_report(
                        Outcome(OutcomeKind.TIMEOUT, "timeout: no guest exit (paused)")
                    )
                self._cond.wait(_WAIT_SLICE if remaining is None else min(remaining, _WAIT_SLICE))
            if self._end is not None:
                outcome, self._end = self._end, None
                return outcome
            # Started under the lock, so a pause cannot slip in before the run exists.
            self.machine.start()
            self._live = True
            threading.Thread(target=self._watch_sleep, name="kvmpy-s3-watch", daemon=True).start()
            self._prelaunch = False
            self._pause = Outcome(OutcomeKind.STOPPED, "paused")
            pause = self._pause
        try:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            outcome = self._wait(remaining)
        finally:
            with self._cond:
                self._live = False
                self._cond.notify_all()
        self._sync_sleep()  # a wake-up shortly before the end still gets its WAKEUP
        if outcome is pause:
            return None  # paused (or held): wait above for resume, quit or reset
        if outcome is self._end:
            with self._cond:
                self._end = None
        return outcome

    def _watch_sleep(self) -> None:
        """SUSPEND and WAKEUP as the machine enters and leaves S3 (Machine.suspended),
        looked at every _SLEEP_POLL while the vCPU threads run."""
        while True:
            with self._cond:
                if not self._live:
                    return
            self._sync_sleep()
            time.sleep(_SLEEP_POLL)

    def _sync_sleep(self) -> None:
        """Emit SUSPEND or WAKEUP if the machine's S3 state changed since the last look."""
        with self._sleep_lock:
            asleep = self.is_suspended
            if asleep == self._suspended:
                return
            self._suspended = asleep
            self.emit("SUSPEND" if asleep else "WAKEUP")

    def _wait(self, timeout: float | None) -> Outcome:
        from kvmpy.machine import CTRL_C

        while True:
            try:
                return self.machine.wait(timeout)
            except KeyboardInterrupt:  # while joining the threads
                self.machine.stop(CTRL_C)

    def _finished(self, outcome: Outcome) -> None:
        with self._cond:
            requested, self._reset_requested = self._reset_requested, False
            self._suspended = False
            restart = outcome.kind is OutcomeKind.RESET and requested
            restart = restart or (
                self.reboot and outcome.kind in (OutcomeKind.RESET, OutcomeKind.TRIPLE_FAULT)
            )
            self._ended = not restart
            self._cond.notify_all()
        if restart:
            reason = "host-qmp-system-reset" if requested else "guest-reset"
            self._reset_event = {"guest": not requested, "reason": reason}
        else:
            reason = _SHUTDOWN_REASONS.get(outcome.kind, "host-error")
            self.emit("SHUTDOWN", {"guest": reason.startswith("guest"), "reason": reason})
        if restart and requested:
            self._restart_requested = True

    def take_reset_request(self) -> bool:
        """True once after a control thread's ``system_reset`` ended the run: restart it."""
        requested, self._restart_requested = self._restart_requested, False
        return requested

    # -- control threads ---------------------------------------------------------------

    @property
    def state(self) -> RunState:
        with self._cond:
            if self._ended:
                return RunState.SHUTDOWN
            if self._want_running and self.is_suspended:
                return RunState.SUSPENDED
            if self._want_running:
                return RunState.RUNNING
            return RunState.PRELAUNCH if self._prelaunch else RunState.PAUSED

    def emit(self, name: str, data: dict[str, Any] | None = None) -> None:
        for listener in list(self.listeners):
            listener(name, data or {})

    def _stop_threads(self) -> None:
        """Kick the vCPUs out and wait until their threads have joined (caller holds the lock)."""
        if self._live:
            self.machine.stop(self._pause)
        while self._live:
            self._cond.wait(_WAIT_SLICE)

    def pause(self) -> None:
        """Stop the vCPUs (QMP ``stop``); returns once none is running.  Emits STOP."""
        with self._cond:
            if self._ended:
                raise ControlError("the guest has shut down")
            was_running = self._want_running
            self._want_running = False
            self._stop_threads()
        if was_running:
            self.emit("STOP")

    def resume(self) -> None:
        """Let the vCPUs run again (QMP ``cont``).  Emits RESUME."""
        with self._cond:
            if self._ended:
                raise ControlError("the guest has shut down: it cannot continue")
            was_running = self._want_running
            self._want_running = True
            self._cond.notify_all()
        if not was_running:
            self.emit("RESUME")

    @contextlib.contextmanager
    def vcpus_stopped(self) -> Iterator[None]:
        """Hold every vCPU out of the backend for a moment (no events): read registers,
        translate addresses, save or load state.  A paused machine stays paused."""
        with self._cond:
            self._holds += 1
            self._stop_threads()
        try:
            yield
        finally:
            with self._cond:
                self._holds -= 1
                self._cond.notify_all()

    def end(self, outcome: Outcome, *, reset: bool = False) -> None:
        """End the run with ``outcome`` (QMP ``quit``; with ``reset``, ``system_reset``)."""
        with self._cond:
            if self._ended:
                raise ControlError("the guest has shut down")
            self._end = outcome
            self._reset_requested = reset
            if self._live:
                self.machine.stop(outcome)
            self._cond.notify_all()

    # -- ACPI S3 --------------------------------------------------------------------

    def wakeup(self) -> None:
        """QMP ``system_wakeup``: wake a guest sleeping in S3 (``wakeup_handler``)."""
        handler = self.wakeup_handler
        if not self.is_suspended or handler is None:
            raise ControlError("the guest is not suspended")
        handler()
        deadline = time.monotonic() + 2.0  # the machine notices the wake event on its timer
        while self.is_suspended and time.monotonic() < deadline:
            time.sleep(0.01)
        self._sync_sleep()

    @property
    def is_suspended(self) -> bool:
        return bool(getattr(self.machine, "suspended", False))
