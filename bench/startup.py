"""Start-up time: ``kvmpy run`` of the multiboot hello guest vs ``python -c pass``.

Alternates the two as whole processes (exec to exit), ROUNDS times, and
prints the medians and their ratio (target: at most 4).  Both use this
Python, so the interpreter's own start-up is in both.

    python bench/startup.py [--rounds R]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GUEST = ROOT / "guests" / "out" / "multiboot_hello.elf"
TARGET_RATIO = 4.0


def _kvmpy_command() -> list[str]:
    script = Path(sys.executable).parent / "kvmpy"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "kvmpy"]
    return [*command, "run", str(GUEST)]


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# As a user's install runs: with its bytecode cached (a development shell may
# set PYTHONDONTWRITEBYTECODE, and every run would compile kvmpy again).
_ENV = {name: value for name, value in os.environ.items() if name != "PYTHONDONTWRITEBYTECODE"}


def _time(command: list[str], expect: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one run of ``command``."""
    cpu = _cpu()
    started = time.perf_counter()
    result = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_ENV)
    elapsed = time.perf_counter() - started
    if result.returncode != expect:
        sys.exit(f"{' '.join(command)}: status {result.returncode}: {result.stderr.decode()}")
    return elapsed, _cpu() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=21)
    args = parser.parse_args()
    if not GUEST.exists():
        sys.exit(f"{GUEST} is missing: run `make guests` first")
    python = [sys.executable, "-c", "pass"]
    kvmpy = _kvmpy_command()
    _time(kvmpy, 1)  # warm the page cache, and write the bytecode cache
    plain, runs = [], []
    for _ in range(args.rounds):
        plain.append(_time(python, 0))
        runs.append(_time(kvmpy, 1))
    print(f"start-up, exec to exit, {args.rounds} alternating rounds (medians)")
    print("                            wall ms   CPU ms")
    for name, times in (("python -c pass", plain), ("kvmpy run multiboot_hello", runs)):
        wall = statistics.median(t[0] for t in times) * 1e3
        cpu = statistics.median(t[1] for t in times) * 1e3
        print(f"  {name:<25} {wall:7.1f}  {cpu:7.1f}")
    wall_ratio = statistics.median(r[0] / p[0] for r, p in zip(runs, plain, strict=True))
    cpu_ratio = statistics.median(r[1] / p[1] for r, p in zip(runs, plain, strict=True) if p[1])
    verdict = "met" if wall_ratio <= TARGET_RATIO else "not met"
    print(f"  ratio (wall)              {wall_ratio:7.2f}  (target <= {TARGET_RATIO:g}: {verdict})")
    print(f"  ratio (CPU)               {cpu_ratio:7.2f}  (less sensitive to a busy host)")


if __name__ == "__main__":
    main()
