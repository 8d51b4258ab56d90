"""Snapshots built without KVM, and ways to edit one on disk, for the snapshot tests."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvmpy import records
from kvmpy.snapshot import Snapshot, device_state
from kvmpy.x86.registers import Regs, Sregs
from tests.device_catalog import FACTORIES, build

MiB = 1 << 20
MEM_SIZE = 2 * MiB


def _b64(size: int) -> str:
    return base64.b64encode(bytes(size)).decode()


def synthetic(tag: str = "old", extents: list[tuple[int, bytes]] | None = None) -> Snapshot:
    """A well-formed snapshot (as far as files go; KVM would refuse its zeroed structs)."""
    vcpu = {
        "regs": records.asdict(Regs(rip=0x7C00)),
        "sregs": records.asdict(Sregs()),
        "xsave": _b64(4096),
        "xcrs": _b64(392),
        "msrs": [[0x10, 5]],
        "lapic": None,
        "events": _b64(64),
        "mp_state": 0,
        "debugregs": _b64(128),
    }
    if extents is None:
        extents = [(0x1000, tag.encode().ljust(4096, b"\x11")), (0x7000, b"\x22" * 8192)]
    return Snapshot(
        config={
            "mem_size": MEM_SIZE,
            "ram": [[0, MEM_SIZE]],
            "cpus": 1,
            "irqchip": False,
            "cmdline": tag,
        },
        vcpus=[vcpu],
        vm={"clock": _b64(48)},
        devices={name: device_state(build(name).device) for name in sorted(FACTORIES)},
        extents=extents,
    )


def header(directory: Path) -> dict[str, Any]:
    data = json.loads((directory / "snapshot.json").read_text())
    assert isinstance(data, dict)
    return data


def memory_file(directory: Path) -> Path:
    return directory / str(header(directory)["body"]["memory"]["file"])


def write_body(directory: Path, body: Any) -> None:
    """Write ``body`` as the snapshot's header with a correct checksum."""
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    (directory / "snapshot.json").write_text(json.dumps({"sha256": digest, "body": body}))


def edit_body(directory: Path, change: Callable[[dict[str, Any]], object]) -> None:
    body = header(directory)["body"]
    change(body)
    write_body(directory, body)
