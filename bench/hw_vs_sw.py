"""Hardware against software virtualization: the same guests under KVM and the CPU emulator.

    python bench/hw_vs_sw.py [--rounds R] [--quick]

Four workloads, each run on both backends in this one script, alternating:

- cpl0: guests/out/cpl0_loop.bin, a compute loop in long mode at CPL 0;
- cpl3: guests/out/cpl3_loop.bin, the same loop after dropping to CPL 3;
- exits: guests/out/pio_loop.bin, one port write (one exit) per iteration;
- boot: guests/out/multiboot_hello.elf, machine creation to guest exit.

Loops get a per-backend iteration count so that each run lasts long enough
to time; the table compares rates (iterations or exits per second, and
instructions per second where the loop's instruction count is known: 2 per
iteration), so the counts do not matter.  The ratio column is
soft time / KVM time for the same work: above 1, KVM is faster.  Nothing here
is asserted: the machine is shared and noisy.  See docs/hardware-vs-software.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from kvmpy import records
from kvmpy.backends.base import BackendError, open_backend
from kvmpy.loaders.flat import load_flat
from kvmpy.machine import Machine

ROOT = Path(__file__).resolve().parent.parent
GUESTS = ROOT / "guests" / "out"
BACKENDS = ("kvm", "soft")

# Iterations per run, per backend: about a second each on this PVM host.
LOOP_COUNTS = {
    "cpl0": {"kvm": 2_000_000, "soft": 50_000_000},
    "cpl3": {"kvm": 500_000_000, "soft": 50_000_000},
    "exits": {"kvm": 100_000, "soft": 100_000},
}
INSTRUCTIONS_PER_ITERATION = {"cpl0": 2, "cpl3": 2, "exits": 3}


@dataclasses.dataclass
class Sample:
    seconds: float
    units: int  # iterations or exits done in ``seconds``


def run_loop(backend: str, image: Path, count: int) -> Sample:
    """Time one loop guest from its first instruction to its debug exit."""
    with Machine(mem_size=16 << 20, backend=backend, irqchip=False) as machine:
        mode = "real" if image.name == "pio_loop.bin" else "long"
        machine.load(load_flat(image, 0x7C00 if mode == "real" else 0x100000), mode=mode)
        machine.vcpu.set_regs(records.replace(machine.vcpu.get_regs(), rcx=count))
        start = time.perf_counter()
        outcome = machine.run(timeout=600)
        elapsed = time.perf_counter() - start
    if outcome.exit_code != 0:
        raise RuntimeError(f"{image.name} on {backend}: {outcome.message}")
    return Sample(elapsed, count)


def run_boot(backend: str) -> Sample:
    """Machine creation, multiboot load and run to the guest's exit: one boot."""
    start = time.perf_counter()
    with Machine(mem_size=32 << 20, backend=backend, irqchip=False, cmdline="bench") as machine:
        machine.boot(GUESTS / "multiboot_hello.elf")
        outcome = machine.run(timeout=60)
    elapsed = time.perf_counter() - start
    if outcome.exit_code != 0:
        raise RuntimeError(f"multiboot_hello on {backend}: {outcome.message}")
    return Sample(elapsed, 1)


def available() -> dict[str, str]:
    """Why each backend cannot run here ("" when it can)."""
    problems = {}
    for name in BACKENDS:
        try:
            open_backend(name).close()
            problems[name] = ""
        except (BackendError, OSError) as exc:
            problems[name] = str(exc)
    return problems


def measure(rounds: int, scale: float) -> dict[str, dict[str, list[Sample]]]:
    problems = available()
    for name, problem in problems.items():
        if problem:
            print(f"{name}: not measured: {problem}", file=sys.stderr)
    runners: dict[str, Callable[[str], Sample]] = {
        "cpl0": lambda b: run_loop(b, GUESTS / "cpl0_loop.bin", _count("cpl0", b, scale)),
        "cpl3": lambda b: run_loop(b, GUESTS / "cpl3_loop.bin", _count("cpl3", b, scale)),
        "exits": lambda b: run_loop(b, GUESTS / "pio_loop.bin", _count("exits", b, scale)),
        "boot": run_boot,
    }
    results: dict[str, dict[str, list[Sample]]] = {w: {b: [] for b in BACKENDS} for w in runners}
    for _ in range(rounds):
        for workload, runner in runners.items():
            for backend in BACKENDS:  # alternating, so drift hits both alike
                if not problems[backend]:
                    results[workload][backend].append(runner(backend))
    return results


def _count(workload: str, backend: str, scale: float) -> int:
    return max(1000, int(LOOP_COUNTS[workload][backend] * scale))


def _rate(samples: list[Sample]) -> float:
    """Units per second, from the median run."""
    return statistics.median(s.units / s.seconds for s in samples)


def format_table(results: dict[str, dict[str, list[Sample]]]) -> str:
    lines = [
        f"{'workload':<8} {'backend':<5} {'runs':>4} {'median s':>9} {'units/s':>12} "
        f"{'instr/s':>10} {'us/unit':>9}  soft/kvm",
    ]
    for workload, by_backend in results.items():
        rates = {b: _rate(s) for b, s in by_backend.items() if s}
        for backend, samples in by_backend.items():
            if not samples:
                continue
            rate = rates[backend]
            per_instr = INSTRUCTIONS_PER_ITERATION.get(workload)
            instr = f"{rate * per_instr:10.3g}" if per_instr else f"{'-':>10}"
            ratio = ""
            if backend == "soft" and "kvm" in rates:
                ratio = f"{rates['kvm'] / rate:8.3g}"
            median_s = statistics.median(s.seconds for s in samples)
            lines.append(
                f"{workload:<8} {backend:<5} {len(samples):>4} {median_s:>9.4f} {rate:>12.4g} "
                f"{instr} {1e6 / rate:>9.3f}  {ratio}"
            )
    lines.append("units: loop iterations (cpl0, cpl3), port exits (exits), boots (boot)")
    lines.append("soft/kvm: time per unit under the CPU emulator / under KVM (above 1: KVM faster)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a tenth of the iterations")
    args = parser.parse_args()
    print(format_table(measure(args.rounds, 0.1 if args.quick else 1.0)))


if __name__ == "__main__":
    main()
