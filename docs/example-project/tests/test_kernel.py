"""The example kernel under KVM, through kvmpy's pytest plugin only.

Run `make` first: the tests use build/kernel.elf.  `kvm_machine` comes from
the plugin kvmpy installs; every test that uses it is skipped without a
usable /dev/kvm (and fails instead with KVMPY_REQUIRE_KVM=1).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kvmpy.pytest_plugin import MachineFactory, TestMachine

KERNEL = Path(__file__).resolve().parent.parent / "build" / "kernel.elf"


@pytest.fixture
def shell(kvm_machine: MachineFactory) -> TestMachine:
    """The kernel, booted up to its first prompt."""
    if not KERNEL.exists():
        pytest.fail(f"{KERNEL} is missing: run `make` first", pytrace=False)
    m = kvm_machine(KERNEL, mem="32M", append="console=ttyS0")
    m.start()
    m.serial.expect(b"> ")
    return m


def test_boots_with_its_command_line(shell: TestMachine) -> None:
    assert re.search(rb'command line "\S*kernel.elf console=ttyS0"', shell.serial.before)


def test_echoes_a_line(shell: TestMachine) -> None:
    shell.serial.send(b"hello kernel\n")
    shell.serial.expect(b"echo: hello kernel\n", timeout=5)
    shell.serial.expect(b"> ")


def test_quit_exits_with_success(shell: TestMachine) -> None:
    shell.serial.send(b"quit\n")
    result = shell.wait()
    assert (result.reason, result.exit_code, result.status) == ("exit", 0, 1)
    assert result.output.endswith(b"> bye\n")


def test_a_long_line_is_cut_not_overflowed(shell: TestMachine) -> None:
    shell.serial.send(b"x" * 200 + b"\n")
    match = shell.serial.expect(re.compile(rb"echo: (x+)\n"))
    assert len(match.group(1)) == 79


def test_run_until_the_prompt(kvm_machine: MachineFactory) -> None:
    # run(until=...) starts the guest, waits for the pattern, then stops it.
    result = kvm_machine(KERNEL, mem="32M", timeout=10).run(until=b"> ")
    assert result.reason == "stopped"
    assert result.output.startswith(b"example kernel: booted")
