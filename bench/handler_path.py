"""kvmpy's own cost per exit, without KVM: the run loop, the bus and a device.

A stand-in vCPU replays N identical exits (its ``run`` is a C-level
iterator, its exit record a plain slotted object), so what is timed is only
what kvmpy does between two KVM_RUNs: the dispatch, the device's lock, the
device and the write-back.  Exits: an IN from pc-testdev's port 0xe0, an IN
from a port nobody claims, an MMIO read of pc-testdev's window, an MMIO read
of an address nobody claims.  Prints ns per exit (the PC board, no /dev/kvm).

    python bench/handler_path.py [--exits N]
"""

from __future__ import annotations

import argparse
import threading
import time
from typing import Any

from kvmpy.backends.exits import ExitKind, ExitRecord
from kvmpy.board import Wiring
from kvmpy.bus import Bus
from kvmpy.runloop import LoopContext, run_vcpu
from kvmpy.x86.pc import PC


class ReplayVcpu:
    """Returns ``kind`` ``exits`` times with ``fields`` set, then SHUTDOWN."""

    index = 0
    backend_name = "replay"

    def __init__(self, kind: ExitKind, exits: int, fields: dict[str, Any]) -> None:
        self.exit = ExitRecord(**fields)
        self.io_buffer = bytearray(4096)
        self.run = iter([int(kind)] * exits + [int(ExitKind.SHUTDOWN)]).__next__

    def exit_name(self) -> str:
        return "SHUTDOWN"


def pc_buses() -> tuple[Bus, Bus]:
    ports, mmio = Bus("port", PC.port_space), Bus("mmio", PC.mmio_space)
    wiring = Wiring(
        irq=lambda n: lambda level: None,
        request_reset=lambda: None,
        request_power_off=lambda: None,
        guest_exit=lambda code: None,
        serial_output=lambda data: None,
        ram_size=128 << 20,
        low_ram=128 << 20,
        cpus=1,
        cmdline="",
    )
    for entry in PC.devices:
        device = entry.build(wiring)
        lock = threading.Lock()
        for bus, ranges in ((ports, entry.ports), (mmio, entry.mmio)):
            for span in ranges:
                part = getattr(device, span.part) if span.part else device
                bus.register(span.base, span.length, part, span.label, lock)
    return ports, mmio


def per_exit_ns(kind: ExitKind, exits: int, fields: dict[str, Any]) -> float:
    ports, mmio = pc_buses()
    context = LoopContext(ports, mmio, None, threading.Event(), True)  # type: ignore[arg-type]
    vcpu = ReplayVcpu(kind, exits, fields)
    started = time.thread_time_ns()
    run_vcpu(vcpu, context)  # type: ignore[arg-type]
    return (time.thread_time_ns() - started) / exits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exits", type=int, default=200_000)
    args = parser.parse_args()
    cases = {
        "IN  0xe0 (pc-testdev)": (ExitKind.PORT_IN, {"io_port": 0xE0, "io_size": 4}),
        "IN  0x99 (nobody)": (ExitKind.PORT_IN, {"io_port": 0x99, "io_size": 1}),
        "MMIO read 0xff000000": (
            ExitKind.MMIO,
            {"mmio_addr": 0xFF00_0000, "mmio_len": 4, "mmio_is_write": 0},
        ),
        "MMIO read 0xd0000000 (nobody)": (
            ExitKind.MMIO,
            {"mmio_addr": 0xD000_0000, "mmio_len": 4, "mmio_is_write": 0},
        ),
    }
    print(f"kvmpy's handler path: thread CPU ns per exit, best of 5 x {args.exits} exits")
    for label, (kind, fields) in cases.items():
        best = min(per_exit_ns(kind, args.exits, fields) for _ in range(5))
        print(f"  {label:32} {best:8.0f} ns")


if __name__ == "__main__":
    main()
