"""Linux boot time, kvmpy against QEMU: the tiny kernel with the BusyBox initramfs.

Time from process start to "Run /init as init process" on the serial port,
under ``qemu-system-x86_64 -accel kvm`` and under ``kvmpy run``, with the same
kernel, initramfs and command line, booted as a bzImage and as PVH (the
stripped vmlinux), alternating QEMU and kvmpy in one script.  Prints medians
and the kvmpy/QEMU ratio (target: <= 0.8), of the wall time and of the CPU
time the VMM's process used (on a PVM host nearly all of it is the guest's
emulated CPL0 code, charged to the vCPU thread), which other load on a
shared host disturbs less than the wall time.

QEMU is a comparison only: without qemu-system-x86_64 (Debian:
qemu-system-x86) this prints why and exits 0.  The images come from
`make linux-guests`.  On a PVM host QEMU needs ``-cpu host,-arch-capabilities``
(plain ``-cpu host`` aborts on MSR 0x10a); the same CPU model is used on
any host, so both see the host's CPU.

    python bench/linux_boot.py [--rounds R] [--only bzimage|pvh]
"""

from __future__ import annotations

import argparse
import os
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "guests" / "linux" / "cache" / "out"
KERNELS = {"bzimage": IMAGES / "tiny-bzImage", "pvh": IMAGES / "tiny-pvh.elf"}
INITRD = IMAGES / "initramfs.cpio"
APPEND = "console=ttyS0 noxsave clearcpuid=smap,popcnt panic=-1 reboot=k"
MARKER = b"Run /init as init process"
TIMEOUT = 600.0
TARGET_RATIO = 0.8


def qemu_command(qemu: str, kernel: Path) -> list[str]:
    return [
        qemu, "-accel", "kvm", "-cpu", "host,-arch-capabilities", "-m", "128",
        "-kernel", str(kernel), "-initrd", str(INITRD), "-append", APPEND,
        "-display", "none", "-nodefaults", "-serial", "stdio", "-no-reboot",
    ]  # fmt: skip


def kvmpy_command(kernel: Path) -> list[str]:
    return [
        sys.executable, "-m", "kvmpy", "run", str(kernel), "--initrd", str(INITRD),
        "--append", APPEND, "--mem", "128M", "--timeout", str(TIMEOUT),
    ]  # fmt: skip


def time_to_marker(command: list[str]) -> tuple[float, float] | None:
    """Wall and CPU seconds from starting ``command`` to MARKER on its stdout (None: never)."""
    start = time.perf_counter()
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        cwd=ROOT,
        start_new_session=True,
    )
    assert process.stdout is not None
    seen = b""
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    wall: float | None = None
    try:
        while time.perf_counter() - start < TIMEOUT:
            if not selector.select(timeout=1.0):
                continue
            chunk = os.read(process.stdout.fileno(), 65536)
            if not chunk:
                break
            seen = seen[-len(MARKER) :] + chunk
            if MARKER in seen:
                wall = time.perf_counter() - start
                break
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        # The direct child is the VMM itself (no shell): its rusage is the VMM's CPU time.
        _, _, usage = os.wait4(process.pid, 0)
        process.returncode = -signal.SIGKILL
    if wall is None:
        return None
    return wall, usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=sorted(KERNELS))
    args = parser.parse_args()
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        print("linux_boot: skipped: no qemu-system-x86_64 (apt-get install qemu-system-x86)")
        return
    for path in [*KERNELS.values(), INITRD]:
        if not path.exists():
            sys.exit(f"{path} is missing: run `make linux-guests` first")
    kinds = [args.only] if args.only else list(KERNELS)
    times: dict[tuple[str, str], list[tuple[float, float]]] = {}
    failures: list[str] = []
    for round_number in range(args.rounds):
        for kind in kinds:
            for vmm, command in (
                ("qemu", qemu_command(qemu, KERNELS[kind])),
                ("kvmpy", kvmpy_command(KERNELS[kind])),
            ):
                measured = time_to_marker(command)
                label = f"round {round_number + 1} {kind:7} {vmm:5}"
                if measured is None:
                    failures.append(label)
                    print(f"  {label}: no {MARKER.decode()!r} within {TIMEOUT:g} s", flush=True)
                    continue
                times.setdefault((kind, vmm), []).append(measured)
                print(f"  {label}: {measured[0]:7.1f} s  (CPU {measured[1]:7.1f} s)", flush=True)
    print(f"time to {MARKER.decode()!r}, --append {APPEND!r}, median of {args.rounds}")
    for kind in kinds:
        q, k = times.get((kind, "qemu")), times.get((kind, "kvmpy"))
        if not q or not k:
            print(f"  {kind:7}: not enough runs reached the marker")
            continue
        q_wall, k_wall = (statistics.median(t[0] for t in runs) for runs in (q, k))
        q_cpu, k_cpu = (statistics.median(t[1] for t in runs) for runs in (q, k))
        print(
            f"  {kind:7}: wall QEMU {q_wall:6.1f} s  kvmpy {k_wall:6.1f} s  "
            f"ratio {k_wall / q_wall:5.3f} | CPU QEMU {q_cpu:6.1f} s  kvmpy {k_cpu:6.1f} s  "
            f"ratio {k_cpu / q_cpu:5.3f}  (target <= {TARGET_RATIO})"
        )
    if failures:
        print(f"  runs that did not reach the marker: {', '.join(failures)}")


if __name__ == "__main__":
    main()
