"""Hostile guests against kvmpy's memory: RSS must stay flat.

Runs ``kvmpy run`` on two guests that never stop, each for a while, and
samples the kvmpy process's resident memory once a second:

- ``stress_io``: random values of random widths to random ports, and reads
  and writes of 1 to 8 bytes across the test device's page end and in
  unclaimed MMIO space (so KVM splits them), with a line on COM1 now and then;
- ``chatty``: serial output as fast as the UART takes it.

The reference is the same process's own RSS: growth in the first half of
the run, and in the second half, in KiB per minute.  The CLI keeps the last
256-512 KiB of serial output (kvmpy.cli.CLI_CONSOLE_LIMIT), so the first
half may grow while that fills; a bounded kvmpy shows the second half flat.
Not a test: these machines are shared and noisy, so read the numbers.

    python bench/rss_stress.py [--seconds S]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KVMPY = [sys.executable, "-m", "kvmpy", "run"]
GUESTS = {
    "stress_io": ["--mode", "long", str(ROOT / "guests/out/stress_io.bin")],
    "chatty": [str(ROOT / "guests/out/chatty.bin")],
}


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def sample(name: str, arguments: list[str], seconds: float) -> list[int]:
    process = subprocess.Popen(
        [*KVMPY, *arguments, "--timeout", str(seconds + 5)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    samples: list[int] = []
    try:
        time.sleep(1.0)  # start-up: imports, VM creation
        end = time.monotonic() + seconds
        while time.monotonic() < end and process.poll() is None:
            samples.append(rss_kib(process.pid))
            time.sleep(1.0)
    finally:
        process.kill()
        process.wait()
    if len(samples) < 3:
        raise RuntimeError(f"{name}: kvmpy stopped early (status {process.returncode})")
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    print(f"RSS of kvmpy under hostile guests, {args.seconds:g} s each, sampled every second")
    for name, arguments in GUESTS.items():
        samples = sample(name, arguments, args.seconds)
        first, middle, last = samples[0], samples[len(samples) // 2], samples[-1]
        half_minutes = (len(samples) // 2) / 60
        print(
            f"  {name:<10} RSS {first} -> {middle} -> {last} KiB (peak {max(samples)}); "
            f"growth {(middle - first) / half_minutes:+.0f} KiB/min, then "
            f"{(last - middle) / half_minutes:+.0f} KiB/min"
        )


if __name__ == "__main__":
    main()
