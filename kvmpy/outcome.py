"""How a run ended: a typed ``Outcome``, and the one table of process exit statuses.

The run loop, the devices and the front ends all speak in ``OutcomeKind``;
only ``exit_status`` turns a kind into the number a shell sees.  Crash
reports are not built here: ``Machine`` attaches them (``Outcome.report``)
after the vCPU threads have stopped, so the hot path never imports the
disassembler.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from kvmpy.devices.debug_exit import exit_status as debug_exit_status
from kvmpy.records import Record

if TYPE_CHECKING:
    from kvmpy.debug.crash import CrashReport


class OutcomeKind(str, enum.Enum):
    """Why a run ended.  A ``str`` enum, so ``kind == "exit"`` reads naturally."""

    EXIT = "exit"  # the guest wrote its exit code to the debug-exit port
    HALT = "halt"  # HLT that nothing can wake
    SHUTDOWN = "shutdown"  # ACPI power-off, or a backend's shutdown event
    RESET = "reset"  # the guest asked for a platform reset
    TRIPLE_FAULT = "triple-fault"
    CRASH = "crash"  # internal error, failed entry, unhandled exit or access
    TIMEOUT = "timeout"
    STEP_LIMIT = "step-limit"  # --step ran out of steps
    STOPPED = "stopped"  # stopped by the embedding program (a test)
    INTERRUPTED = "interrupted"  # Ctrl-C, SIGTERM, gdb's kill, machine closed
    HOST_ERROR = "host-error"  # kvmpy itself failed (a vCPU thread raised)

    def __str__(self) -> str:
        return self.value


# Process exit statuses (a debug exit is always odd: (code << 1) | 1, as QEMU).
STATUS_OK = 0
STATUS_ERROR = 2
STATUS_CRASH = 4
STATUS_RESET = 6
STATUS_TIMEOUT = 124
STATUS_INTERRUPTED = 130

_STATUSES = {
    OutcomeKind.HALT: STATUS_OK,
    OutcomeKind.SHUTDOWN: STATUS_OK,
    OutcomeKind.STOPPED: STATUS_OK,
    OutcomeKind.RESET: STATUS_RESET,
    OutcomeKind.TRIPLE_FAULT: STATUS_CRASH,
    OutcomeKind.CRASH: STATUS_CRASH,
    OutcomeKind.TIMEOUT: STATUS_TIMEOUT,
    OutcomeKind.STEP_LIMIT: STATUS_TIMEOUT,
    OutcomeKind.INTERRUPTED: STATUS_INTERRUPTED,
    OutcomeKind.HOST_ERROR: STATUS_ERROR,
}

# Kinds whose outcome gets a crash report (registers, code, stack) from Machine.
REPORTED_KINDS = frozenset(
    (OutcomeKind.TRIPLE_FAULT, OutcomeKind.CRASH, OutcomeKind.TIMEOUT, OutcomeKind.INTERRUPTED)
)


def exit_status(kind: OutcomeKind, exit_code: int | None = None) -> int:
    """The process exit status for an outcome of ``kind``: the one table."""
    if kind is OutcomeKind.EXIT:
        return debug_exit_status(exit_code or 0)
    return _STATUSES[kind]


class Outcome(Record):
    """How a run ended.

    ``vcpu`` is the vCPU the event happened on (None for machine-wide
    events); ``detail`` and ``code`` (instruction bytes the backend could
    not run) feed the crash report that ``Machine`` attaches.
    """

    kind: OutcomeKind
    message: str
    exit_code: int | None = None  # the value the guest wrote to the debug-exit port
    vcpu: int | None = None
    detail: str = ""
    code: bytes | None = None
    report: CrashReport | None = None
    # The host signal that ended the run (SIGINT for Ctrl-C), if one did.
    signal: int | None = None

    @property
    def status(self) -> int:
        """The process exit status the CLI uses."""
        return exit_status(self.kind, self.exit_code)

    @property
    def reason(self) -> str:
        """The kind as a plain string ("exit", "halt", "timeout", ...)."""
        return self.kind.value
