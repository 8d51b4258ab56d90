"""Restore time: a 128 MiB guest with 16 MiB of touched memory, from disk and from memory.

Saves one snapshot of guests/out/counter.bin stopped half-way with 16 MiB of
RAM filled, then times Machine.restore() from the directory (read, checksum,
VM set-up, memory copy, KVM state) and from an already loaded Snapshot (the
"boot once, hand each test a fresh copy" case).  Prints medians; target: at
most 20 ms.

    python bench/snapshot_restore.py [--rounds R]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from kvmpy.loaders.flat import load_flat
from kvmpy.machine import Machine
from kvmpy.outcome import Outcome, OutcomeKind
from kvmpy.snapshot import Snapshot

GUEST = Path(__file__).resolve().parent.parent / "guests" / "out" / "counter.bin"
TOUCHED = 16 << 20
TARGET_MS = 20.0


def make_snapshot(directory: Path) -> None:
    with Machine(mem_size=128 << 20) as m:
        m.load(load_flat(GUEST, 0x7C00), mode="real")
        pattern = bytes(range(1, 256)) * (TOUCHED // 255 + 1)
        m.memory.write(32 << 20, pattern[:TOUCHED])
        m.serial.feed(b"xxx")
        m.start()
        with m.console_changed:
            m.console_changed.wait_for(lambda: m.console.count(b"\n") == 3, 60)
        m.stop(Outcome(OutcomeKind.INTERRUPTED, "snapshot"))
        m.wait()
        m.snapshot(directory)


def time_restore(source: Path | Snapshot, rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        machine = Machine.restore(source)
        times.append(time.perf_counter() - start)
        machine.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=11)
    args = parser.parse_args()
    if not GUEST.exists():
        sys.exit(f"{GUEST} is missing: run `make guests` first")
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "snap"
        make_snapshot(directory)
        on_disk = sum(p.stat().st_blocks * 512 for p in directory.iterdir())
        from_disk = time_restore(directory, args.rounds)
        loaded = Snapshot.load(directory)
        from_memory = time_restore(loaded, args.rounds)
    print(f"restore, 128 MiB RAM with {TOUCHED >> 20} MiB touched, {args.rounds} rounds (medians)")
    print(f"  snapshot on disk          : {on_disk / (1 << 20):7.1f} MiB")
    print(f"  from the directory        : {statistics.median(from_disk) * 1e3:7.2f} ms")
    print(f"  from a loaded Snapshot    : {statistics.median(from_memory) * 1e3:7.2f} ms")
    print(f"  target                    : {TARGET_MS:7.2f} ms")


if __name__ == "__main__":
    main()
