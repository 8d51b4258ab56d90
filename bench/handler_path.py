"""kvmpy's own cost per exit, without KVM: the run loop, the bus and a device.

A stand-in vCPU replays N identical exits (its ``run`` is a C-level
iterator; its exit record is the KVM shim's own C struct, read through cffi
as the KVM backend's is), so what is timed is only what kvmpy does between
two KVM_RUNs: the dispatch, the device's lock, the device and the write-back.
The buses are built as ``Machine`` builds them for one vCPU.  Exits: IN and
OUT at pc-testdev's port 0xe0 and at a port nobody claims, MMIO reads of
pc-testdev's window and of an address nobody claims.  Prints the median and
the best of ``--rounds`` rounds, in thread CPU ns per exit (stable on a
loaded host, unlike wall time).

    python bench/handler_path.py [--exits N] [--rounds R]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from typing import Any

from kvmpy.backends.exits import ExitKind, ExitRecord
from kvmpy.board import Wiring
from kvmpy.bus import Bus
from kvmpy.runloop import LoopContext, run_vcpu
from kvmpy.x86.pc import PC


def exit_record(fields: dict[str, Any]) -> Any:
    """The KVM shim's exit struct with ``fields`` set (a Python record without the shim)."""
    try:
        from kvmpy.backends.kvm._kvm import ffi
    except ImportError:
        return ExitRecord(**fields)
    record = ffi.new("struct kvmshim_exit *")
    for name, value in fields.items():
        setattr(record, name, value)
    return record


class ReplayVcpu:
    """Returns ``kind`` ``exits`` times with ``fields`` set, then SHUTDOWN."""

    index = 0
    backend_name = "replay"

    def __init__(self, kind: ExitKind, exits: int, fields: dict[str, Any]) -> None:
        self.exit = exit_record({"data_offset": 0x1000, **fields})
        self.io_buffer = bytearray(8192)
        self.run = iter([int(kind)] * exits + [int(ExitKind.SHUTDOWN)]).__next__

    def exit_name(self) -> str:
        return "SHUTDOWN"


def pc_buses() -> tuple[Bus, Bus]:
    """The PC's buses, as Machine builds them for one vCPU."""
    ports = Bus("port", PC.port_space, one_vcpu=True)
    mmio = Bus("mmio", PC.mmio_space, one_vcpu=True)
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
        only_caller = getattr(device, "HOST_ENTRY_POINTS", None) == ()
        for bus, ranges in ((ports, entry.ports), (mmio, entry.mmio)):
            for span in ranges:
                part = getattr(device, span.part) if span.part else device
                bus.register(
                    span.base, span.length, part, span.label, lock, only_caller=only_caller
                )
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
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    cases = {
        "IN  0xe0 (pc-testdev)": (ExitKind.PORT_IN, {"io_port": 0xE0, "io_size": 4}),
        "OUT 0xe0 (pc-testdev)": (ExitKind.PORT_OUT, {"io_port": 0xE0, "io_size": 4}),
        "IN  0x99 (nobody)": (ExitKind.PORT_IN, {"io_port": 0x99, "io_size": 1}),
        "OUT 0x99 (nobody)": (ExitKind.PORT_OUT, {"io_port": 0x99, "io_size": 1}),
        "MMIO read 0xff000000": (
            ExitKind.MMIO,
            {"mmio_addr": 0xFF00_0000, "mmio_len": 4, "mmio_is_write": 0},
        ),
        "MMIO read 0xd0000000 (nobody)": (
            ExitKind.MMIO,
            {"mmio_addr": 0xD000_0000, "mmio_len": 4, "mmio_is_write": 0},
        ),
    }
    print(
        f"kvmpy's handler path: thread CPU ns per exit, {args.rounds} rounds x {args.exits} exits"
    )
    print(f"  {'':32} {'median':>8} {'best':>8}")
    for label, (kind, fields) in cases.items():
        rounds = sorted(per_exit_ns(kind, args.exits, fields) for _ in range(args.rounds))
        print(f"  {label:32} {statistics.median(rounds):8.0f} {rounds[0]:8.0f}")


if __name__ == "__main__":
    main()
