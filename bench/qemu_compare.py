"""Side by side with QEMU: the same multiboot kernel under qemu-system-x86_64 -accel kvm
and under kvmpy, as whole processes, with the same serial output and exit status.

QEMU is a comparison only, never a dependency: without qemu-system-x86_64
installed (Debian: qemu-system-x86) this prints why and exits 0.

    python bench/qemu_compare.py [--rounds R] [KERNEL]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_KERNEL = ROOT / "guests" / "out" / "multiboot_hello.elf"
APPEND = "hello world"
TARGET_RATIO = 0.5


def qemu_command(qemu: str, kernel: Path) -> list[str]:
    return [
        qemu, "-accel", "kvm", "-m", "128", "-kernel", str(kernel), "-append", APPEND,
        "-display", "none", "-nodefaults", "-serial", "stdio", "-no-reboot",
        "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
    ]  # fmt: skip


def kvmpy_command(kernel: Path) -> list[str]:
    return [sys.executable, "-m", "kvmpy", "run", str(kernel), "--append", APPEND]


def timed(command: list[str]) -> tuple[float, int, bytes]:
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, timeout=300, cwd=ROOT)
    return time.perf_counter() - start, result.returncode, result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kernel", nargs="?", type=Path, default=DEFAULT_KERNEL)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        print("qemu_compare: skipped: no qemu-system-x86_64 (apt-get install qemu-system-x86)")
        return
    if not args.kernel.exists():
        sys.exit(f"{args.kernel} is missing: run `make guests` first")
    kernel = args.kernel.resolve().relative_to(ROOT) if args.kernel.is_absolute() else args.kernel
    qemu_times, kvmpy_times = [], []
    for _ in range(args.rounds):
        q_time, q_status, q_out = timed(qemu_command(qemu, kernel))
        k_time, k_status, k_out = timed(kvmpy_command(kernel))
        qemu_times.append(q_time)
        kvmpy_times.append(k_time)
    q, k = statistics.median(qemu_times), statistics.median(kvmpy_times)
    print(f"{kernel} --append {APPEND!r}, {args.rounds} rounds (median wall time)")
    if (q_status, q_out) == (k_status, k_out):
        print(f"  same output and exit status ({k_status}): {k_out!r}")
    else:
        print(f"  outputs differ: QEMU status {q_status}, kvmpy status {k_status}")
        for label, text in (("QEMU", q_out), ("kvmpy", k_out)):
            lines = set(text.splitlines()) - set((k_out if label == "QEMU" else q_out).splitlines())
            for line in sorted(lines):
                print(f"    only {label:5}: {line.decode(errors='replace')}")
    print(f"  qemu-system-x86_64 -accel kvm : {q * 1000:8.1f} ms")
    print(f"  kvmpy                         : {k * 1000:8.1f} ms")
    print(f"  ratio kvmpy/QEMU              : {k / q:8.3f}  (target <= {TARGET_RATIO})")


if __name__ == "__main__":
    main()
