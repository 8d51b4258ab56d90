"""``python -m kvmpy`` and the ``kvmpy`` command.

``entry`` catches Ctrl-C and SIGTERM from the very start, while the modules
that need cffi, capstone and /dev/kvm are still being imported.

``command`` (the installed ``kvmpy`` script, and ``kvmpy-qemu`` through
``qemu_command``) ends the process as soon as the
work is done: it flushes the standard streams, runs the ``atexit`` handlers
(which restore the terminal) and leaves with ``os._exit``.  Tearing down the
interpreter's thousands of objects would add about 10 ms to every run and
change nothing: every file kvmpy writes is closed by the code that wrote it.
"""

import atexit
import contextlib
import gc
import os
import sys
from typing import NoReturn

from kvmpy._process import (
    STATUS_TERMINATED,
    Terminated,
    fill_closed_std_fds,
    install_sigterm_handler,
)

# The shell's status for Ctrl-C (128 + SIGINT); kvmpy.runloop names it too.
_STATUS_INTERRUPTED = 130


def entry(front_end: str = "kvmpy") -> int:
    # The collector would walk the import's objects again and again; they live
    # as long as the process, so they are moved out of its way once imported.
    gc.disable()
    try:
        install_sigterm_handler()
        fill_closed_std_fds()
        if front_end == "qemu":
            from kvmpy.qemu_front import main
        else:
            from kvmpy.cli import main
    except KeyboardInterrupt as exc:  # also the SIGTERM handler's Terminated
        terminated = isinstance(exc, Terminated)
        print(f"kvmpy: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return STATUS_TERMINATED if terminated else _STATUS_INTERRUPTED
    finally:
        gc.freeze()
        gc.enable()
    return main()


def command(front_end: str = "kvmpy") -> NoReturn:
    status = entry(front_end)
    for stream in (sys.stdout, sys.stderr):
        # A reader that left: the status already says what happened.
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    atexit._run_exitfuncs()
    os._exit(status)


def qemu_command() -> NoReturn:
    """The installed ``kvmpy-qemu`` script: QEMU's command line (kvmpy.qemu_front)."""
    command("qemu")


if __name__ == "__main__":
    command()
