"""A plain ``kvmpy run`` leaves what it does not use unloaded (bench/startup.py times it)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import ROOT, guest

# Loaded only by the options that need them: --gdb, --trace/--step/crash
# reports, --display/--screenshot, snapshots, --qmp.
LAZY = (
    "capstone",
    "kvmpy.debug.gdbstub",
    "kvmpy.debug.gdbproto",
    "kvmpy.debug.step",
    "kvmpy.display.screen",
    "kvmpy.display.font",
    "kvmpy.display.terminal",
    "kvmpy.snapshot",
    "kvmpy.qmp",
    "kvmpy.control",
    "socket",
    "json",
    "ctypes",
    "tempfile",
)

_PROBE = """
import sys
import kvmpy.cli
status = kvmpy.cli.main(sys.argv[1:])
print("loaded:", *sorted(name for name in {lazy!r} if name in sys.modules), file=sys.stderr)
sys.exit(status)
"""


def _loaded(*argv: str) -> tuple[int, set[str]]:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE.format(lazy=LAZY), *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    last = result.stderr.strip().splitlines()[-1].split()
    assert last[0] == "loaded:", result.stderr
    return result.returncode, set(last[1:])


def test_importing_the_cli_loads_none_of_the_optional_parts() -> None:
    status, loaded = _loaded("info", "--kvm", "/nonexistent")
    assert status == 2
    assert loaded == set()


@pytest.mark.kvm
def test_a_plain_run_loads_none_of_the_optional_parts() -> None:
    status, loaded = _loaded("run", str(guest("multiboot_hello", ".elf")))
    assert status == 1
    assert loaded == set()
