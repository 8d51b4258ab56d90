"""What --stats costs: the exit round-trip guest with and without ExitStats.

Runs guests/out/pio_loop.bin (EXITS port writes) alternately under the fast
run loop and under the observed loop with exit statistics, in this process,
and prints per-exit medians and their ratio (target: at most about 1.05).

    python bench/stats_overhead.py [--exits N] [--rounds R]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

from kvmpy.debug.trace import ExitStats
from kvmpy.loaders.flat import load_flat
from kvmpy.machine import Machine

GUEST = Path(__file__).resolve().parent.parent / "guests" / "out" / "pio_loop.bin"
TARGET_RATIO = 1.05


def per_exit(exits: int, with_stats: bool) -> float:
    with Machine(mem_size=1 << 20, irqchip=False) as machine:
        if with_stats:
            machine.observer = ExitStats(machine.ports, machine.mmio)
        machine.load(load_flat(GUEST, 0x7C00), mode="real")
        machine.vcpu.set_regs(dataclasses.replace(machine.vcpu.get_regs(), rcx=exits))
        start = time.perf_counter()
        outcome = machine.run(timeout=600)
        elapsed = time.perf_counter() - start
    if outcome.exit_code != 0:
        sys.exit(f"bench guest failed: {outcome.message}")
    return elapsed / (exits + 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exits", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if not GUEST.exists():
        sys.exit(f"{GUEST} is missing: run `make guests` first")
    plain, stats = [], []
    for _ in range(args.rounds):
        plain.append(per_exit(args.exits, False))
        stats.append(per_exit(args.exits, True))
    ratios = [s / p for s, p in zip(stats, plain, strict=True)]
    print(f"--stats overhead, {args.exits} port-I/O exits x {args.rounds} rounds (medians)")
    print(f"  fast loop       : {statistics.median(plain) * 1e6:7.3f} us/exit")
    print(f"  with ExitStats  : {statistics.median(stats) * 1e6:7.3f} us/exit")
    print(f"  ratio           : {statistics.median(ratios):7.3f}  (target <= {TARGET_RATIO})")


if __name__ == "__main__":
    main()
