"""Boot Debian's stock cloud kernel under kvmpy to `Run /init as init process`.

This is the long run behind docs/completion.md's cloud-kernel rows: on a PVM
host it takes about 25 minutes (CPL0 code is emulated), too long for CI, so
`make linux-cloud-init` runs it by hand.  It prints each milestone's line
(with the kernel's timestamp), then kvmpy's summary and the wall time, and exits 0 when
the kernel got to `Run /init`, 1 when it did not.

The command line hides what this host's KVM cannot run or runs too slowly:
`clearcpuid=avx` (PVM shows guests the host's AVX-512, and nothing here can
run AVX at CPL0), `ssse3` and `cryptomgr.notests` (the SSSE3 BLAKE2s and the
crypto self-tests would run one fallback exit per instruction), and `smap`
(every user copy would complete a clac/stac).  The kernel itself is unchanged.

    python guests/linux/cloud_to_init.py [--timeout S] [--cpus N]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "cache" / "out"
CMDLINE = (
    "earlyprintk=serial console=ttyS0 printk.time=1 "
    "clearcpuid=avx,ssse3,smap cryptomgr.notests reboot=k panic=-1"
)
MILESTONES = (
    "Linux version",
    "SLUB:",
    "ACPI: PM-Timer",
    "PCI host bridge",
    "clocksource: Switched to clocksource",
    "Unpacking initramfs",
    "evm: HMAC attrs",
    "Freeing unused kernel image",
    "Run /init as init process",
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--cpus", type=int, default=1)
    args = parser.parse_args()
    kernel, initrd = OUT / "cloud-vmlinuz", OUT / "initramfs.cpio"
    if not kernel.exists() or not initrd.exists():
        print(f"{kernel} or {initrd} is missing: run `make linux-guests`", file=sys.stderr)
        return 2
    command = [
        sys.executable, "-m", "kvmpy", "run", str(kernel), "--initrd", str(initrd),
        "-m", "256M", "-smp", str(args.cpus), "--append", CMDLINE, "--stats",
        "--timeout", str(args.timeout),
    ]  # fmt: skip
    started = time.monotonic()
    reached = False
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as run:
        assert run.stdout is not None and run.stderr is not None
        for raw in run.stdout:
            line = raw.decode(errors="replace").rstrip()
            if any(marker in line for marker in MILESTONES):
                print(line, flush=True)  # the kernel's own timestamp says when
            if "Run /init as init process" in line:
                reached = True
        errors = run.stderr.read().decode(errors="replace")
    summary = [line for line in errors.splitlines() if line.startswith(("completed", "kvmpy"))]
    print("\n".join(summary))
    verdict = "reached" if reached else "NOT reached"
    print(f"Run /init {verdict} in {time.monotonic() - started:.0f} s")
    return 0 if reached else 1


if __name__ == "__main__":
    sys.exit(main())
