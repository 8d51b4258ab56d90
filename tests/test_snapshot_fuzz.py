"""Mutated snapshots: each one is restored, or refused with one SnapshotError.

The header is mutated with its checksum fixed, so that the schema checks are
what stands in the way; the raw header bytes and the memory file are mutated
too.  Without /dev/kvm a loaded snapshot's device states are restored into
device models; with it (the ``kvm`` tests) into a whole machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmpy.loaders.flat import load_flat
from kvmpy.machine import Machine
from kvmpy.snapshot import Snapshot, SnapshotError, restore_device_state
from tests.device_catalog import FACTORIES, build
from tests.fuzzing import EXAMPLES, budget
from tests.helpers import guest
from tests.snapshot_helpers import header, memory_file, synthetic, write_body

TEMPLATE = synthetic()

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(1 << 70), 1 << 70)
    | st.floats(allow_nan=True)
    | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=8,
)


def mutate(data: st.DataObject, node: Any) -> Any:
    """``node`` with one random change somewhere inside it."""
    children: list[Any] = list(node) if isinstance(node, dict) else []
    if isinstance(node, list):
        children = list(range(len(node)))
    deeper = data.draw(st.integers(0, 3)) > 0  # usually
    if children and deeper:
        key = data.draw(st.sampled_from(children))
        node[key] = mutate(data, node[key])
        return node
    action = data.draw(st.sampled_from(["replace", "delete", "grow"]))
    if action == "delete" and children:
        del node[data.draw(st.sampled_from(children))]
        return node
    if action == "grow" and isinstance(node, list):
        return node + data.draw(st.lists(json_values, min_size=1, max_size=3))
    if action == "grow" and isinstance(node, int) and not isinstance(node, bool):
        return node + data.draw(st.sampled_from([1, -1, 4096, 1 << 32, 1 << 64]))
    return data.draw(json_values)


def load_or_refuse(directory: Path) -> Snapshot | None:
    try:
        return Snapshot.load(directory)
    except SnapshotError as exc:
        assert str(exc) and "\n" not in str(exc)
        return None


def restore_devices(snapshot: Snapshot) -> None:
    """Restore each saved device state into a device model: taken, or one SnapshotError."""
    for name, saved in snapshot.devices.items():
        if name in FACTORIES:
            with contextlib.suppress(SnapshotError):
                restore_device_state(build(name).device, saved, name)


@contextlib.contextmanager
def fresh_copy(template: Snapshot = TEMPLATE) -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as parent:
        directory = Path(parent) / "snap"
        template.save(directory)
        yield directory


@budget()
@given(data=st.data())
def test_mutated_headers_with_a_good_checksum(data: st.DataObject) -> None:
    with fresh_copy() as directory:
        body = mutate(data, header(directory)["body"])
        write_body(directory, body)
        loaded = load_or_refuse(directory)
        if loaded is not None:
            restore_devices(loaded)


@budget()
@given(data=st.data())
def test_mutated_header_bytes(data: st.DataObject) -> None:
    with fresh_copy() as directory:
        path = directory / "snapshot.json"
        raw = bytearray(path.read_bytes())
        for _ in range(data.draw(st.integers(1, 4))):
            at = data.draw(st.integers(0, len(raw)))
            kind = data.draw(st.sampled_from(["flip", "cut", "insert"]))
            if kind == "flip" and at < len(raw):
                raw[at] ^= data.draw(st.integers(1, 255))
            elif kind == "cut":
                del raw[at : at + data.draw(st.integers(1, 64))]
            else:
                raw[at:at] = data.draw(st.binary(min_size=1, max_size=16))
        path.write_bytes(bytes(raw))
        load_or_refuse(directory)


@budget()
@given(data=st.data())
def test_mutated_memory_files(data: st.DataObject) -> None:
    with fresh_copy() as directory:
        memory = memory_file(directory)
        size = memory.stat().st_size
        with open(memory, "r+b") as file:
            for _ in range(data.draw(st.integers(1, 3))):
                if data.draw(st.integers(0, 5)) == 0:
                    file.truncate(data.draw(st.integers(0, size + 8192)))
                else:
                    file.seek(data.draw(st.integers(0, size + 4096)))
                    file.write(data.draw(st.binary(min_size=1, max_size=16)))
        loaded = load_or_refuse(directory)
        if loaded is not None:
            # Accepted: then every byte outside the saved extents is still zero.
            with loaded.open_memory() as fd:
                assert fd is not None
                assert os.fstat(fd).st_size == size


# -- with KVM: a real machine's snapshot, mutated, restored into a machine ---------------


@pytest.fixture(scope="module")
def machine_snapshot() -> Snapshot:
    with tempfile.TemporaryDirectory() as parent, Machine(mem_size=2 << 20) as m:
        m.load(load_flat(guest("counter"), 0x7C00), mode="real")
        m.serial.feed(b"xy")
        m.snapshot(Path(parent) / "snap")
        loaded = Snapshot.load(Path(parent) / "snap")
        with loaded.open_memory() as fd:
            assert fd is not None
            memory = os.pread(fd, loaded.config["mem_size"], 0)
        page = 4096
        loaded.extents = [
            (start, memory[start : start + page])
            for start in range(0, len(memory), page)
            if memory[start : start + page].strip(b"\0")
        ]
        loaded.memory_path = None
        return loaded


@pytest.mark.kvm
@budget(max(EXAMPLES // 3, 40))
@given(data=st.data())
def test_mutated_machine_snapshots_restore_or_refuse(
    machine_snapshot: Snapshot, data: st.DataObject
) -> None:
    with fresh_copy(machine_snapshot) as directory:
        body = mutate(data, header(directory)["body"])
        write_body(directory, body)
        if load_or_refuse(directory) is None:
            return
        try:
            with Machine.restore(directory):
                pass
        except SnapshotError as exc:
            assert "\n" not in str(exc)


@pytest.mark.kvm
def test_machine_snapshot_round_trip(machine_snapshot: Snapshot) -> None:
    with fresh_copy(machine_snapshot) as directory, Machine.restore(directory) as m:
        assert m.serial.rx_pending == 2
        assert json.loads((directory / "snapshot.json").read_text())["body"]["version"] == 2
