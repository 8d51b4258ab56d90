"""Snapshot files as untrusted input, and saving them safely (issue 9, items 12-16).

No /dev/kvm needed: the snapshots here are built by hand (tests/snapshot_helpers.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import kvmpy.snapshot
from kvmpy.snapshot import MAX_HEADER_BYTES, Snapshot, SnapshotError, restore_device_state
from tests.device_catalog import build
from tests.helpers import ROOT
from tests.snapshot_helpers import (
    MEM_SIZE,
    edit_body,
    header,
    memory_file,
    synthetic,
    write_body,
)


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    directory = tmp_path / "snap"
    synthetic().save(directory)
    return directory


def test_a_saved_snapshot_loads_with_its_memory(saved: Path) -> None:
    loaded = Snapshot.load(saved)
    assert loaded.config["cmdline"] == "old"
    with loaded.open_memory() as fd:
        assert fd is not None
        assert os.pread(fd, 3, 0x1000) == b"old"
    assert sorted(os.listdir(saved)) == sorted(["snapshot.json", memory_file(saved).name])


# -- item 12: names from the header stay inside the directory ---------------------------


@pytest.mark.parametrize(
    "name", ["../../etc/passwd", "/etc/passwd", "memory.bin", "sub/memory-" + "0" * 32 + ".bin", 7]
)
def test_a_memory_file_outside_the_directory_is_refused(saved: Path, name: object) -> None:
    edit_body(saved, lambda body: body["memory"].__setitem__("file", name))
    with pytest.raises(SnapshotError, match="not a memory file name kvmpy writes"):
        Snapshot.load(saved)


def test_a_memory_file_that_is_a_symlink_is_refused(saved: Path, tmp_path: Path) -> None:
    memory = memory_file(saved)
    outside = tmp_path / "outside.bin"
    memory.rename(outside)
    memory.symlink_to(outside)
    with pytest.raises(SnapshotError, match="symbolic link"):
        Snapshot.load(saved)


def test_a_memory_file_swapped_after_loading_is_not_mapped(saved: Path) -> None:
    loaded = Snapshot.load(saved)
    memory = memory_file(saved)
    data = memory.read_bytes()
    memory.unlink()
    memory.write_bytes(data)  # same name and content, another file
    with pytest.raises(SnapshotError, match="changed since"), loaded.open_memory():
        pass


# -- item 13: saving follows no symlink and writes only where we own -------------------


def test_save_does_not_follow_symlinks(tmp_path: Path) -> None:
    directory = tmp_path / "snap"
    directory.mkdir()
    victims = {name: tmp_path / f"victim-{name}" for name in ("snapshot.json", "memory.bin")}
    for name, victim in victims.items():
        victim.write_text("precious")
        (directory / name).symlink_to(victim)
    synthetic().save(directory)
    assert all(victim.read_text() == "precious" for victim in victims.values())
    assert not (directory / "snapshot.json").is_symlink()
    assert Snapshot.load(directory).config["cmdline"] == "old"


def test_save_refuses_a_symlinked_directory(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(SnapshotError, match="symbolic link"):
        synthetic().save(tmp_path / "link")
    assert os.listdir(tmp_path / "real") == []


def test_save_refuses_a_directory_owned_by_someone_else(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give a directory to another user")
    directory = tmp_path / "theirs"
    directory.mkdir()
    os.chown(directory, 4242, -1)
    with pytest.raises(SnapshotError, match="owned by user 4242"):
        synthetic().save(directory)
    assert os.listdir(directory) == []


def test_save_errors_are_snapshot_errors(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(SnapshotError, match="cannot write the snapshot"):
        synthetic().save(tmp_path / "file")


def test_a_loaded_snapshot_is_not_saved_with_empty_memory(saved: Path, tmp_path: Path) -> None:
    # Its RAM is in the memory file, not in ``extents``: saving it wrote zeros.
    with pytest.raises(SnapshotError, match="cannot be saved again"):
        Snapshot.load(saved).save(tmp_path / "copy")


# -- item 14: an overwrite is atomic ---------------------------------------------------


class FailingOs:
    """``os`` as kvmpy.snapshot sees it, failing the ``fail_at``-th file system call."""

    CALLS = ("open", "write", "pwrite", "ftruncate", "fsync", "rename", "unlink", "close")

    def __init__(self, fail_at: int) -> None:
        self.fail_at = fail_at
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        real = getattr(os, name)
        if name not in self.CALLS:
            return real

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            if self.calls == self.fail_at:
                raise OSError(5, f"simulated failure in os.{name}")
            return real(*args, **kwargs)

        return call


def test_a_save_failing_at_any_step_leaves_the_old_or_the_new(
    saved: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outcomes = []
    for fail_at in range(1, 100):
        failing = FailingOs(fail_at)
        monkeypatch.setattr(kvmpy.snapshot, "os", failing)
        # A failure before the commit must leave the old snapshot, one after it
        # the new; one while deleting stale files is ignored (the next save retries).
        with contextlib.suppress(SnapshotError):
            synthetic("new").save(saved)
        monkeypatch.setattr(kvmpy.snapshot, "os", os)
        failed = failing.calls >= fail_at
        loaded = Snapshot.load(saved)
        with loaded.open_memory() as fd:
            assert fd is not None
            assert os.pread(fd, 3, 0x1000).decode() == loaded.config["cmdline"]
        outcomes.append(loaded.config["cmdline"])
        if not failed:
            break
        synthetic("old").save(saved)  # start again from the old one
    assert outcomes[0] == "old" and outcomes[-1] == "new"
    assert len(outcomes) > 5  # every step up to the commit was tried
    synthetic("new").save(saved)  # and a clean save leaves nothing stale behind
    assert sorted(os.listdir(saved)) == sorted(["snapshot.json", memory_file(saved).name])


SAVER = """
import sys
from tests.snapshot_helpers import synthetic
extents = [(0x1000 + i * 0x2000, bytes([i + 1]) * 0x1000) for i in range(200)]
snapshots = [synthetic(tag, extents) for tag in ("one", "two")]
for n in range(10**6):
    snapshots[n % 2].save(sys.argv[1])
    if n == 0:
        print("saved", flush=True)
"""


def test_a_save_killed_at_random_moments_leaves_a_loadable_snapshot(tmp_path: Path) -> None:
    directory = tmp_path / "snap"
    for round_ in range(5):
        saver = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(SAVER), str(directory)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
        )
        assert saver.stdout is not None
        assert saver.stdout.readline() == b"saved\n"
        time.sleep(0.01 + 0.037 * round_)
        saver.send_signal(signal.SIGKILL)
        saver.wait()
        loaded = Snapshot.load(directory)
        assert loaded.config["cmdline"] in ("one", "two")


# -- item 15: malformed headers give one SnapshotError ---------------------------------


def _set(path: str, value: object) -> Callable[[dict[str, Any]], None]:
    def change(body: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = body
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if isinstance(node, list):
            node[int(last)] = value
        elif value is DELETE:
            del node[last]
        else:
            node[last] = value

    return change


DELETE = object()
MALFORMED = {
    "missing key": ("config.cpus", DELETE, "missing cpus"),
    "extra key": ("config.extra", 1, "unexpected 'extra'"),
    "string size": ("config.mem_size", "big", "not an integer"),
    "huge size": ("config.mem_size", 1 << 64, "outside"),
    "bool cpus": ("config.cpus", True, "not an integer"),
    "rip 2**64": ("vcpus.0.regs.rip", 1 << 64, "outside"),
    "selector": ("vcpus.0.sregs.cs.selector", 70000, "outside"),
    "bitmap": ("vcpus.0.sregs.interrupt_bitmap", [0], "not 4 words"),
    "vcpus object": ("vcpus", {}, "not a list"),
    "blob type": ("vm.clock", 5, "base64"),
    "blob text": ("vm.clock", "not base64!", "base64"),
    "msr": ("vcpus.0.msrs", [[1, 2, 3]], "pair"),
    "extent length": ("memory.extents.0", [0x1000, 0x1000, -1, 0], "outside"),
    "extent beyond": ("memory.extents.0", [0x1000, 0x1000, 1 << 70, 0], "outside"),
    "extent layout": ("memory.extents.0", [0x2000, 0x1000, 0x1000, 0], "RAM layout"),
    "device state": ("devices.serial.state", "oops", "not an object"),
    "device version": ("devices.serial.version", True, "not an integer"),
    "cmdline NUL": ("config.cmdline", "a\0b", "cmdline"),
    "ram sum": ("config.ram", [[0, 0x100000]], "mem_size is"),
    "memory size": ("memory.size", MEM_SIZE * 2, "mem_size is"),
    "cpus vs vcpus": ("config.cpus", 2, "irqchip|vcpus"),
    "mp_state": ("vcpus.0.mp_state", -1, "outside"),
    "topology count": ("config.topology", [1, 1, 2], "config.topology: .*config.cpus is 1"),
    "topology type": ("config.topology", [1, "1", 1], "config.topology: .*cores='1'"),
    "topology shape": ("config.topology", [1, 1], "config.topology"),
    "topology gaps": ("config.topology", [2, 3, 1], "config.topology: .*power of two"),
    "topology list": ("config.topology", 5, "config.topology: not a list"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_headers_with_a_good_checksum_are_refused(saved: Path, case: str) -> None:
    path, value, message = MALFORMED[case]
    edit_body(saved, _set(path, value))
    with pytest.raises(SnapshotError, match=message):
        Snapshot.load(saved)


@pytest.mark.parametrize(
    "text",
    [
        '{"body": ' + "[" * 100_000 + "]" * 100_000 + "}",
        '{"body": {"format": "kvmpy-snapshot", "version": ' + "9" * 5000 + "}}",
        "\xff\xfe not json",
        "[]",
        "",
    ],
    ids=["deep", "long int", "garbage", "list", "empty"],
)
def test_unparsable_headers_are_refused(saved: Path, text: str) -> None:
    (saved / "snapshot.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(SnapshotError):
        Snapshot.load(saved)


def test_the_topology_is_optional_and_checked(saved: Path) -> None:
    assert "topology" not in Snapshot.load(saved).config  # as kvmpy before -smp topologies
    edit_body(saved, _set("config.topology", [1, 1, 1]))
    assert Snapshot.load(saved).config["topology"] == [1, 1, 1]


def test_version_1_snapshots_are_refused_as_such(saved: Path) -> None:
    edit_body(saved, _set("version", 1))
    with pytest.raises(SnapshotError, match=r"version 1 .*older kvmpy.* reads version 2"):
        Snapshot.load(saved)


def _load_in_thread(directory: Path) -> BaseException | None:
    result: list[BaseException | None] = []

    def load() -> None:
        try:
            Snapshot.load(directory)
            result.append(None)
        except BaseException as exc:
            result.append(exc)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "Snapshot.load hangs"
    return result[0]


def test_a_fifo_as_snapshot_json_is_refused_without_hanging(saved: Path) -> None:
    (saved / "snapshot.json").unlink()
    os.mkfifo(saved / "snapshot.json")
    error = _load_in_thread(saved)
    assert isinstance(error, SnapshotError) and "not a regular file" in str(error)


def test_dev_zero_as_snapshot_json_is_refused(saved: Path) -> None:
    (saved / "snapshot.json").unlink()
    (saved / "snapshot.json").symlink_to("/dev/zero")
    error = _load_in_thread(saved)
    assert isinstance(error, SnapshotError) and "not a regular file" in str(error)


def test_an_oversized_header_is_refused_unread(saved: Path) -> None:
    with open(saved / "snapshot.json", "r+b") as file:
        file.truncate(MAX_HEADER_BYTES + 1)
    with pytest.raises(SnapshotError, match="more than the limit"):
        Snapshot.load(saved)


def test_a_device_state_of_the_wrong_type_or_size_is_refused() -> None:
    serial = build("serial").device
    for field, value, message in [
        ("rx", [[1, 2]] * 100, "rx"),
        ("rx", "AAAA", "not a list"),
        ("divisor", 1 << 64, "divisor"),
        ("thre_pending", 1, "not a boolean"),
    ]:
        saved = kvmpy.snapshot.device_state(serial)
        saved["state"][field] = value
        with pytest.raises(SnapshotError, match=message):
            restore_device_state(serial, saved, "serial")
    vga = build("vga").device
    saved = kvmpy.snapshot.device_state(vga)
    saved["state"]["dac"] = "AAAA"  # 3 bytes, not 768
    with pytest.raises(SnapshotError, match="dac"):
        restore_device_state(vga, saved, "vga")


def test_the_cli_reports_a_malformed_snapshot_in_one_line(saved: Path) -> None:
    edit_body(saved, _set("vcpus.0.regs.rip", 1 << 64))
    result = subprocess.run(
        [sys.executable, "-m", "kvmpy", "restore", str(saved)],
        capture_output=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert result.stderr.startswith(b"kvmpy: error: ")
    assert result.stderr.count(b"\n") == 1


# -- item 16: the memory file is checked whole ----------------------------------------


def test_data_in_a_hole_of_the_memory_file_is_refused(saved: Path) -> None:
    with open(memory_file(saved), "r+b") as file:
        file.seek(0x100000)  # no extent covers it
        file.write(b"\x01")
    with pytest.raises(SnapshotError, match="outside every extent"):
        Snapshot.load(saved)


def test_a_memory_file_of_another_size_is_refused(saved: Path) -> None:
    with open(memory_file(saved), "r+b") as file:
        file.truncate(MEM_SIZE + 4096)
    with pytest.raises(SnapshotError, match="bytes, the snapshot says"):
        Snapshot.load(saved)


def test_an_absurd_memory_size_is_refused(saved: Path) -> None:
    def grow(body: dict[str, Any]) -> None:
        body["config"]["mem_size"] = body["memory"]["size"] = 1 << 50
        body["config"]["ram"] = [[0, 1 << 50]]

    edit_body(saved, grow)
    with pytest.raises(SnapshotError, match="mem_size"):
        Snapshot.load(saved)


def test_overlapping_extents_are_refused(saved: Path) -> None:
    def overlap(body: dict[str, Any]) -> None:
        first = body["memory"]["extents"][0]
        body["memory"]["extents"] = [first, first]

    edit_body(saved, overlap)
    with pytest.raises(SnapshotError, match="outside"):
        Snapshot.load(saved)


def test_write_body_helper_round_trips(saved: Path) -> None:
    write_body(saved, header(saved)["body"])
    assert Snapshot.load(saved).config["cmdline"] == "old"
    assert json.loads((saved / "snapshot.json").read_text())["body"]["version"] == 2
