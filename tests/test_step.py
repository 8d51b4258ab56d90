"""--step: one line per executed instruction, with the registers it changed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kvmpy.debug.step import changed_registers
from kvmpy.x86.registers import Regs
from tests.helpers import ROOT, Assembler, guest


def step(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvmpy", "run", *args, "--step"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip


def test_changed_registers_leaves_rip_out() -> None:
    before, after = Regs(rax=1, rip=5), Regs(rax=2, rbx=3, rip=7)
    assert changed_registers(before, after) == [("rax", 1, 2), ("rbx", 0, 3)]


@pytest.mark.kvm
def test_stepping_over_port_io() -> None:
    result = step(str(guest("real_hello")), "--max-steps", "31")
    lines = result.stderr.splitlines()
    assert result.returncode == 124
    assert lines[0] == "step 0    real      0000:7c00   cli"
    # The OUT at 0x7c4e is one step, and the next instruction is not skipped.
    out = lines.index("step 8    real      0000:7c4e   out dx, al")
    assert lines[out + 1] == "step 9    real      0000:7c4f   mov dx, 0x3f8"
    assert lines[out + 2] == "          rdx: 0x3fb -> 0x3f8"
    # An IN shows the value it read (LSR: transmitter empty).
    read = lines.index("step 30   real      0000:7c6a   in al, dx")
    assert lines[read + 1] == "          rax: 0x48 -> 0x60"
    assert lines[-1] == "kvmpy: stopped after 31 steps"


@pytest.mark.kvm
def test_stepping_into_hlt_without_irqchip(assemble: Assembler) -> None:
    result = step(str(assemble("nop\nmov $5, %bl\ncli\nhlt")), "--no-irqchip")
    lines = result.stderr.splitlines()
    assert result.returncode == 0
    assert [line.split()[-1] for line in lines if line.startswith("step")] == [
        "nop", "5", "cli", "hlt",
    ]  # fmt: skip
    assert "          rbx: 0x0 -> 0x5" in lines
    assert lines[-1].startswith("kvmpy: vCPU 0: guest halted (interrupts disabled)")


def test_max_steps_needs_step() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kvmpy", "run", str(guest("real_hello")), "--max-steps", "3"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--max-steps needs --step" in result.stderr
