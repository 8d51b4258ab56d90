"""The names the gdb stub and the host probe take from kvmpy's core, in one place.

They come through the backend boundary and the outcome module, never from a
backend's own modules; when one moves, only this file changes.
"""

from __future__ import annotations

from kvmpy.backends.base import BackendError, Vcpu
from kvmpy.backends.exits import ExitKind
from kvmpy.outcome import Outcome, OutcomeKind
from kvmpy.runloop import ExitObserver
from kvmpy.x86.registers import Fpu

__all__ = [
    "CRASH_EXITS",
    "BackendError",
    "ExitObserver",
    "Fpu",
    "Outcome",
    "OutcomeKind",
    "Vcpu",
]

# Exits after which the run loop ends the VM as a crash.
CRASH_EXITS: tuple[int, ...] = (ExitKind.INTERNAL_ERROR, ExitKind.SHUTDOWN, ExitKind.FAIL_ENTRY)
