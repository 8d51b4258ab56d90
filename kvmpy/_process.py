"""Process-level safety for the ``kvmpy`` command: signals and the standard streams.

Stdlib only, so the entry point can set it up before the heavy imports.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType

# The shell's status for a process ended by SIGTERM (128 + 15), which kvmpy
# also uses when a SIGTERM stopped it cleanly.
STATUS_TERMINATED = 128 + signal.SIGTERM


class Terminated(KeyboardInterrupt):
    """Raised by the SIGTERM handler: code that stops a run on Ctrl-C stops it for this too."""


_terminated = False


def terminated() -> bool:
    """True once a SIGTERM arrived."""
    return _terminated


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    global _terminated
    if _terminated:
        return  # already stopping: let the run end and the snapshot be saved
    _terminated = True
    raise Terminated


def install_sigterm_handler() -> None:
    """Make SIGTERM stop kvmpy the way Ctrl-C does (only the main thread can do this)."""
    signal.signal(signal.SIGTERM, _on_sigterm)


def reset_sigterm_state() -> None:
    """Forget an earlier SIGTERM (for in-process callers such as tests)."""
    global _terminated
    _terminated = False


_closed_at_start: set[int] = set()


def fill_closed_std_fds() -> set[int]:
    """Put /dev/null on any of fds 0, 1, 2 that is closed; return which were closed.

    Otherwise the next file kvmpy opens (/dev/kvm, a snapshot, a trace) would
    get that number, and guest output meant for stdout would be written into it.
    Calling it again returns the same set: what matters is how kvmpy was started.
    """
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            _closed_at_start.add(fd)
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    # Python leaves a stream that was closed at start-up as None, and
    # print(file=None) would send error messages to stdout.
    if sys.stdin is None:
        sys.stdin = open(0, closefd=False)  # noqa: SIM115 - lives as long as the process
    if sys.stdout is None:
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
    if sys.stderr is None:
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
    return set(_closed_at_start)
