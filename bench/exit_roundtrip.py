"""Exit round-trip: the kvmpy run loop against a minimal C run loop.

Both run guests/out/pio_loop.bin, which makes EXITS port writes to 0x80 (one
VM exit each), on the same host in the same script, alternating, and we
compare per-exit times.  KVM's own exit cost dominates both, so the ratio is
what tells how much the Python loop adds.

    python bench/exit_roundtrip.py [--exits N] [--rounds R]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kvmpy import records
from kvmpy.debug.trace import ExitStats
from kvmpy.loaders.flat import load_flat
from kvmpy.machine import Machine

ROOT = Path(__file__).resolve().parent.parent
GUEST = ROOT / "guests" / "out" / "pio_loop.bin"
REFERENCE_SOURCE = ROOT / "bench" / "exit_loop_ref.c"
TARGET_RATIO = 1.10


def build_reference(workdir: Path) -> Path:
    binary = workdir / "exit_loop_ref"
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(REFERENCE_SOURCE)], check=True)
    return binary


def time_reference(binary: Path, exits: int) -> float:
    """Seconds per exit for the C loop (it times its own loop)."""
    out = subprocess.run(
        [str(binary), str(GUEST), str(exits)], check=True, capture_output=True, text=True
    ).stdout
    fields = dict(item.split("=") for item in out.split())
    return float(fields["seconds"]) / int(fields["exits"])


def time_kvmpy(exits: int, with_stats: bool = False) -> float:
    """Seconds per exit for kvmpy's run loop (VM set-up not included).

    With ``with_stats`` the vCPU runs the counting loop behind --stats.
    """
    # No irqchip, like the C loop: the same VM, so only the run loops differ.
    with Machine(mem_size=1 << 20, irqchip=False) as machine:
        if with_stats:
            machine.observer = ExitStats(machine.ports, machine.mmio)
        machine.load(load_flat(GUEST, 0x7C00), mode="real")
        machine.vcpu.set_regs(records.replace(machine.vcpu.get_regs(), rcx=exits))
        start = time.perf_counter()
        outcome = machine.run(timeout=600)
        elapsed = time.perf_counter() - start
        if outcome.exit_code != 0 or machine.post.writes != exits:
            sys.exit(f"bench guest failed: {outcome.message}, {machine.post.writes} writes")
    return elapsed / (exits + 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exits", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if not GUEST.exists():
        sys.exit(f"{GUEST} is missing: run `make guests` first")
    with tempfile.TemporaryDirectory() as tmp:
        reference = build_reference(Path(tmp))
        c_times, py_times = [], []
        for _ in range(args.rounds):
            c_times.append(time_reference(reference, args.exits))
            py_times.append(time_kvmpy(args.exits))
    c_us = statistics.median(c_times) * 1e6
    py_us = statistics.median(py_times) * 1e6
    ratios = [p / c for p, c in zip(py_times, c_times, strict=True)]
    ratio = statistics.median(ratios)
    print(f"exit round-trip, {args.exits} port-I/O exits x {args.rounds} rounds (medians)")
    print(f"  C reference loop : {c_us:7.3f} us/exit")
    print(f"  kvmpy run loop   : {py_us:7.3f} us/exit  (+{py_us - c_us:.3f} us in Python)")
    print(
        f"  ratio kvmpy/C    : {ratio:7.3f}  (per-round: {', '.join(f'{r:.3f}' for r in ratios)})"
    )
    print(f"  target <= {TARGET_RATIO}: {'met' if ratio <= TARGET_RATIO else 'NOT met'}")


if __name__ == "__main__":
    main()
