"""VM lifecycles per second: what the kvm_machine fixture does, against C doing the same.

One lifecycle: create a VM (irqchip, PIT, 16 MiB of RAM, one vCPU), load a
tiny real-mode guest, run it to its debug-exit write, tear everything down.
kvmpy's side goes through kvmpy.testing.load_machine, the function behind
the pytest fixture; the reference is bench/lifecycle_ref.c, built here.
Both alternate in this script; medians per round are compared.  Target:
kvmpy at most 1.3x the C loop's time.

    python bench/lifecycle.py [--runs N] [--rounds R]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from kvmpy.testing import load_machine

ROOT = Path(__file__).resolve().parent.parent
REFERENCE_SOURCE = ROOT / "bench" / "lifecycle_ref.c"
TARGET_RATIO = 1.3


def build(workdir: Path) -> tuple[Path, Path]:
    """The C reference and the guest: `mov $0, %al; out %al, $0xf4` at 0x7c00."""
    reference = workdir / "lifecycle_ref"
    subprocess.run(["gcc", "-O2", "-o", str(reference), str(REFERENCE_SOURCE)], check=True)
    guest = workdir / "exit0.bin"
    guest.write_bytes(bytes.fromhex("b000e6f4"))
    return reference, guest


def time_reference(reference: Path, guest: Path, runs: int) -> float:
    out = subprocess.run(
        [str(reference), str(guest), str(runs)], check=True, capture_output=True, text=True
    ).stdout
    fields = dict(item.split("=") for item in out.split())
    return float(fields["seconds"]) / runs


def time_kvmpy(guest: Path, runs: int) -> float:
    start = time.perf_counter()
    for _ in range(runs):
        with load_machine(guest, mem="16M", timeout=10) as machine:
            result = machine.run()
            assert result.exit_code == 0, result.message
    return (time.perf_counter() - start) / runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        reference, guest = build(Path(tmp))
        c_times, py_times = [], []
        for _ in range(args.rounds):
            c_times.append(time_reference(reference, guest, args.runs))
            py_times.append(time_kvmpy(guest, args.runs))
    c, py = statistics.median(c_times), statistics.median(py_times)
    ratios = [p / q for p, q in zip(py_times, c_times, strict=True)]
    print(f"VM lifecycles, {args.runs} per round x {args.rounds} rounds (medians)")
    print(f"  C reference      : {c * 1e3:7.2f} ms  ({1 / c:6.1f} lifecycles/s)")
    print(f"  kvmpy (fixture)  : {py * 1e3:7.2f} ms  ({1 / py:6.1f} lifecycles/s)")
    print(f"  ratio kvmpy/C    : {statistics.median(ratios):7.3f}  (target <= {TARGET_RATIO})")


if __name__ == "__main__":
    main()
