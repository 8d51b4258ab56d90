"""Snapshot and restore: mid-run, across processes, corrupt files, many copies."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvmpy.backends.kvm._kvm import lib
from kvmpy.devices.serial import Serial16550
from kvmpy.loaders.flat import load_flat
from kvmpy.machine import Machine
from kvmpy.outcome import Outcome, OutcomeKind
from kvmpy.snapshot import (
    Snapshot,
    SnapshotError,
    _body_digest,
    device_state,
    restore_device_state,
)
from tests.helpers import ROOT, guest

FULL_COUNT = b"".join(b"count %02d\n" % i for i in range(20))


def kvmpy(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "kvmpy", *args], input=stdin, capture_output=True, timeout=120,
        cwd=ROOT,
    )  # fmt: skip


def memory_file(directory: Path) -> Path:
    """The memory file the snapshot in ``directory`` names."""
    name = json.loads((directory / "snapshot.json").read_text())["body"]["memory"]["file"]
    return directory / str(name)


def counted_halfway(directory: Path, lines: int = 8, cpus: int = 1) -> bytes:
    """Run the counter until it printed ``lines`` lines, stop it, snapshot it."""
    with Machine(cpus=cpus) as m:
        m.load(load_flat(guest("counter"), 0x7C00), mode="real")
        m.serial.feed(b"x" * lines)
        m.start()
        with m.console_changed:
            assert m.console_changed.wait_for(lambda: m.console.count(b"\n") == lines, 60)
        m.stop(Outcome(OutcomeKind.INTERRUPTED, "stopped for a snapshot"))
        m.wait()
        m.snapshot(directory)
        return bytes(m.console)


def test_device_state_round_trip() -> None:
    serial = Serial16550()
    serial.write(3, 1, 0x83)  # DLAB, 8N1
    serial.write(0, 1, 0x01)
    serial.feed(b"queued")
    state = json.loads(json.dumps(device_state(serial)))
    fresh = Serial16550()
    restore_device_state(fresh, state)
    assert fresh.read(3, 1) == 0x83
    assert fresh.read(0, 1) == 0x01  # the divisor latch, still selected
    fresh.write(3, 1, 0x03)
    assert bytes(fresh.read(0, 1) for _ in range(6)) == b"queued"


@pytest.mark.kvm
@pytest.mark.parametrize("cpus", [1, 2])
def test_snapshot_mid_run_and_restore_in_a_new_process(tmp_path: Path, cpus: int) -> None:
    # With 2 vCPUs the second waits for INIT/SIPI in the in-kernel LAPIC: its
    # mp_state and LAPIC must come back too, or the restored run would differ.
    uninterrupted = kvmpy("run", str(guest("counter")), "--cpus", str(cpus), stdin=b"x" * 20)
    assert (uninterrupted.returncode, uninterrupted.stdout) == (1, FULL_COUNT)

    first = counted_halfway(tmp_path / "snap", cpus=cpus)
    saved = Snapshot.load(tmp_path / "snap")
    assert [vcpu["mp_state"] for vcpu in saved.vcpus] == [
        lib.KVM_MP_STATE_RUNNABLE,
        *[lib.KVM_MP_STATE_UNINITIALIZED] * (cpus - 1),
    ]
    assert first == FULL_COUNT[: len(b"count 00\n") * 8]
    rest = kvmpy("restore", str(tmp_path / "snap"), "--timeout", "60", stdin=b"x" * 12)
    assert rest.returncode == 1, rest.stderr
    assert first + rest.stdout == uninterrupted.stdout


@pytest.mark.kvm
def test_cli_snapshot_at_exit_then_restore(tmp_path: Path) -> None:
    # The counter waits for input that never comes: the timeout stops it.
    part = kvmpy(
        "run", str(guest("counter")), "--timeout", "2", "--snapshot-at-exit",
        str(tmp_path / "s"), stdin=b"x" * 3,
    )  # fmt: skip
    assert part.returncode == 124
    assert b"kvmpy: snapshot saved to" in part.stderr
    rest = kvmpy("restore", str(tmp_path / "s"), stdin=b"x" * 17)
    assert part.stdout + rest.stdout == FULL_COUNT
    # Untouched RAM costs nothing: 128 MiB of guest memory, a few pages on disk.
    memory = memory_file(tmp_path / "s")
    assert memory.stat().st_size == 128 << 20
    assert memory.stat().st_blocks * 512 < 1 << 20


@pytest.mark.kvm
def test_one_snapshot_many_fresh_copies(tmp_path: Path) -> None:
    first = counted_halfway(tmp_path / "snap", lines=5)
    template = Snapshot.load(tmp_path / "snap")
    outputs = []
    for _ in range(3):
        with Machine.restore(template) as copy:
            copy.serial.feed(b"x" * 15)
            assert copy.run(timeout=60).exit_code == 0
            outputs.append(first + bytes(copy.console))
    assert outputs == [FULL_COUNT] * 3


@pytest.mark.kvm
def test_corrupt_and_foreign_snapshots_are_refused(tmp_path: Path) -> None:
    counted_halfway(tmp_path / "snap", lines=2)
    header = tmp_path / "snap" / "snapshot.json"
    original = header.read_text()

    header.write_text(original.replace('"cpus": 1', '"cpus": 2'))
    with pytest.raises(SnapshotError, match="checksum mismatch"):
        Snapshot.load(tmp_path / "snap")

    data = json.loads(original)
    data["body"]["version"] = 99
    header.write_text(json.dumps(data))
    with pytest.raises(SnapshotError, match="format version 99"):
        Snapshot.load(tmp_path / "snap")

    header.write_text(original)
    memory = memory_file(tmp_path / "snap")
    with open(memory, "r+b") as f:
        f.seek(0x7C00)
        f.write(b"\xff")
    with pytest.raises(SnapshotError, match="memory at 0x7000 is corrupt"):
        Snapshot.load(tmp_path / "snap")

    with pytest.raises(SnapshotError, match="not a kvmpy snapshot"):
        Snapshot.load(tmp_path)
    result = kvmpy("restore", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.startswith(b"kvmpy: error: ")
    assert result.stderr.count(b"\n") == 1


@pytest.mark.kvm
def test_snapshot_of_a_running_machine_is_refused(tmp_path: Path) -> None:
    with Machine(mem_size=16 << 20) as m:
        m.load(load_flat(guest("counter"), 0x7C00), mode="real")
        m.start()
        with pytest.raises(SnapshotError, match="stop the machine"):
            m.snapshot(tmp_path / "s")


@pytest.mark.kvm
def test_a_snapshot_from_before_the_pci_state_version_2_still_restores(tmp_path: Path) -> None:
    # What the last kvmpy saved: the PCI host's state at version 1 (no mapped_bars),
    # and no entries for the functions, which have nothing to save.
    first = counted_halfway(tmp_path / "snap", lines=5)
    path = tmp_path / "snap" / "snapshot.json"
    header = json.loads(path.read_text())
    devices = header["body"]["devices"]
    pci = devices["pci"]
    assert pci["version"] == 2
    pci["version"] = 1
    del pci["state"]["mapped_bars"]
    for name in [name for name in devices if name.startswith("pci/")]:
        del devices[name]
    header["sha256"] = _body_digest(header["body"])
    path.write_text(json.dumps(header))
    with Machine.restore(tmp_path / "snap") as copy:
        copy.serial.feed(b"x" * 15)
        assert copy.run(timeout=60).exit_code == 0
        assert first + bytes(copy.console) == FULL_COUNT
    # A device with state may not be missing, and a version never seen is refused.
    del devices["serial"]
    header["sha256"] = _body_digest(header["body"])
    path.write_text(json.dumps(header))
    with pytest.raises(SnapshotError, match=r"missing \['serial'\]"):
        Machine.restore(tmp_path / "snap")
