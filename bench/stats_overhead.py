"""What --stats costs: the exit round-trip guest with and without ExitStats.

Runs guests/out/pio_loop.bin (EXITS port writes) alternately under the fast
run loop and under the observed loop with exit statistics, in this process,
and prints per-exit medians and their ratio (target: at most about 1.05).

    python bench/stats_overhead.py [--exits N] [--rounds R]
"""

from __future__ import annotations

import argparse
import statistics
import sys

from exit_roundtrip import GUEST, time_kvmpy

TARGET_RATIO = 1.05


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exits", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if not GUEST.exists():
        sys.exit(f"{GUEST} is missing: run `make guests` first")
    plain, stats = [], []
    for _ in range(args.rounds):
        plain.append(time_kvmpy(args.exits))
        stats.append(time_kvmpy(args.exits, with_stats=True))
    ratios = [s / p for s, p in zip(stats, plain, strict=True)]
    print(f"--stats overhead, {args.exits} port-I/O exits x {args.rounds} rounds (medians)")
    print(f"  fast loop       : {statistics.median(plain) * 1e6:7.3f} us/exit")
    print(f"  with ExitStats  : {statistics.median(stats) * 1e6:7.3f} us/exit")
    print(f"  ratio           : {statistics.median(ratios):7.3f}  (target <= {TARGET_RATIO})")


if __name__ == "__main__":
    main()
