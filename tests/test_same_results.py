"""Same guest, both backends: serial output, exit status and VGA text screen must match.

Every built guest that needs no in-kernel irqchip runs under the software
backend (the Unicorn CPU emulator) and, where /dev/kvm opens, under KVM; the
results are compared byte for byte.  Where KVM cannot run, the software run
is still checked against the guest's own success report, and the KVM half is
skipped with the reason.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvmpy.backends.base import BackendError, open_backend
from kvmpy.machine import Machine
from kvmpy.outcome import STATUS_CRASH
from tests.helpers import GUESTS, ROOT, host_kvm_module

pytest.importorskip("unicorn", reason="the software backend needs kvmpy[soft] (unicorn)")

VGA_TEXT = (0xB8000, 80 * 25 * 2)


@dataclass(frozen=True)
class GuestRun:
    name: str
    image: str
    mode: str | None = None
    append: str = ""
    stdin: bytes = b""
    status: int = 1  # debug-exit code 0: the guest's checks passed
    expect: bytes = b""  # in the output, for the software-only check
    kvm_cannot: str = ""  # why this host's KVM cannot run it ("" if it can)


RUNS = [
    GuestRun("real_hello", "real_hello.bin", expect=b"real mode OK"),
    GuestRun("protected_hello", "protected_hello.bin", "protected", expect=b"protected mode OK"),
    GuestRun("long_hello", "long_hello.bin", "long", expect=b"long mode OK"),
    GuestRun(
        "paged32_hello",
        "paged32_hello.bin",
        "paged32",
        expect=b"paged32 OK",
        kvm_cannot="PVM drops CR0.PG outside long mode" if host_kvm_module() == "kvm_pvm" else "",
    ),
    GuestRun("multiboot_hello", "multiboot_hello.elf", append="hello world", expect=b"hello world"),
    GuestRun("pvh_hello", "pvh_hello.elf", append="hello pvh", expect=b"hello pvh"),
    GuestRun("mmio_hello", "mmio_hello.bin", "long", expect=b"scratch register"),
    GuestRun("triple_fault", "triple_fault.bin", "long", status=STATUS_CRASH),
    GuestRun("vga_colors", "vga_colors.bin", expect=b"80x25 screen drawn"),
    GuestRun("pio_loop", "pio_loop.bin"),
    GuestRun("counter", "counter.bin", stdin=b"x" * 20, expect=b"count 19"),
    GuestRun("runner_pass", "runner_pass.bin", expect=b"PASS: 40 + 2 == 42"),
    GuestRun("runner_fail", "runner_fail.bin", status=3, expect=b"FAIL"),
    GuestRun("runner_skip", "runner_skip.bin", status=77, expect=b"SKIP"),
]


@dataclass
class Result:
    output: bytes
    status: int
    kind: str
    screen: bytes


def run_guest(backend: str, run: GuestRun, timeout: float = 30) -> Result:
    image = GUESTS / run.image
    if not image.exists():
        pytest.fail(f"{image} is missing: run `make guests`", pytrace=False)
    # Without the irqchip on both sides: the software backend has none.
    with Machine(mem_size=32 << 20, backend=backend, irqchip=False, cmdline=run.append) as m:
        m.boot(Path(image), mode=run.mode)
        m.start()
        pending = run.stdin
        deadline = time.monotonic() + timeout
        while pending and not m.stopped and time.monotonic() < deadline:
            with m.device_lock("serial"):
                pending = pending[m.serial.feed(pending) :]
            time.sleep(0.005)
        outcome = m.wait(max(0.1, deadline - time.monotonic()))
        screen = m.memory.read(*VGA_TEXT)
        return Result(bytes(m.console), outcome.status, outcome.kind.value, bytes(screen))


def kvm_problem() -> str:
    try:
        open_backend("kvm").close()
    except (BackendError, OSError) as exc:
        return str(exc)
    return ""


@pytest.mark.parametrize("run", RUNS, ids=[r.name for r in RUNS])
def test_guest_gives_the_same_results_on_both_backends(run: GuestRun) -> None:
    soft = run_guest("soft", run)
    assert (soft.kind, soft.status) != ("timeout", 124), soft.output
    assert soft.status == run.status, soft.output
    assert run.expect in soft.output
    problem = run.kvm_cannot or kvm_problem()
    if problem:
        pytest.skip(f"software run checked; no KVM run to compare with: {problem}")
    kvm = run_guest("kvm", run)
    assert soft.output == kvm.output
    assert (soft.status, soft.kind) == (kvm.status, kvm.kind)
    assert soft.screen == kvm.screen


def test_the_comparison_can_fail() -> None:
    # Two different guests must not compare equal: the matrix above compares something.
    a = run_guest("soft", RUNS[0])
    b = run_guest("soft", RUNS[2])
    assert a.output != b.output


@pytest.mark.kvm
def test_triple_fault_crash_reports_match_but_for_the_exit_name() -> None:
    def report(accel: str) -> bytes:
        result = subprocess.run(
            [sys.executable, "-m", "kvmpy", "run", "--accel", accel, "--mode", "long",
             str(GUESTS / "triple_fault.bin")],
            capture_output=True, timeout=60, cwd=ROOT,
        )  # fmt: skip
        assert result.returncode == STATUS_CRASH
        return result.stderr

    kvm, soft = report("kvm"), report("soft")
    assert b"RFLAGS=0x10002 [RF]" in soft  # a fault leaves RF set, as under KVM
    assert soft.replace(b"SOFT_EXIT_SHUTDOWN", b"KVM_EXIT_SHUTDOWN") == kvm
