"""``python -m kvmpy`` and the ``kvmpy`` command.

``entry`` catches Ctrl-C and SIGTERM from the very start, while the modules
that need cffi, capstone and /dev/kvm are still being imported.
"""

import sys

from kvmpy._process import (
    STATUS_TERMINATED,
    Terminated,
    fill_closed_std_fds,
    install_sigterm_handler,
)

# The shell's status for Ctrl-C (128 + SIGINT); kvmpy.runloop names it too.
_STATUS_INTERRUPTED = 130


def entry() -> int:
    try:
        install_sigterm_handler()
        fill_closed_std_fds()
        from kvmpy.cli import main
    except KeyboardInterrupt as exc:  # also the SIGTERM handler's Terminated
        terminated = isinstance(exc, Terminated)
        print(f"kvmpy: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return STATUS_TERMINATED if terminated else _STATUS_INTERRUPTED
    return main()


if __name__ == "__main__":
    sys.exit(entry())
