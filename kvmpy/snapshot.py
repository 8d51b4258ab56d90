"""Snapshot and restore: a whole machine to a directory, and back.

A snapshot directory holds two files:

    snapshot.json   header, machine configuration, every vCPU's and the VM's
                    KVM state (opaque structs as base64), device models' state,
                    and the memory extents; with a SHA-256 of its own content
    memory.bin      guest RAM as a sparse file: only non-zero pages are
                    written, so untouched memory costs no disk and no time

The KVM state structs (xsave, LAPIC, events, irqchip, PIT, clock...) are
saved as the exact bytes KVM returned and handed back unchanged on restore:
kvmpy never needs to understand them.  The format is versioned; a snapshot
with another version, a bad checksum or a mismatched memory file is refused
with one clear error.  Restoring needs the same kind of host CPU.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import dataclasses
import hashlib
import json
import mmap
import os
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvmpy.machine import Machine

FORMAT = "kvmpy-snapshot"
VERSION = 1
HEADER_FILE = "snapshot.json"
MEMORY_FILE = "memory.bin"
PAGE = 4096
_ZERO_PAGE = bytes(PAGE)
_CHUNK = 1 << 20
_ZERO_CHUNK = bytes(_CHUNK)


class SnapshotError(ValueError):
    """A snapshot that cannot be written, or one that is corrupt or foreign."""


@dataclass
class Snapshot:
    """A machine's complete state, in memory (see ``save``/``load`` for the files)."""

    config: dict[str, Any]
    vcpus: list[dict[str, Any]]
    vm: dict[str, str]
    devices: dict[str, Any]
    # (guest-physical address, bytes) runs of non-zero pages: for a snapshot
    # taken in this process; a loaded one has its memory in ``memory_path``.
    extents: list[tuple[int, bytes]]
    memory_path: Path | None = None

    @contextlib.contextmanager
    def open_memory(self) -> Iterator[int | None]:
        """A read-only fd of memory.bin for a machine to map (None: copy the extents)."""
        if self.memory_path is None:
            yield None
            return
        try:
            fd = os.open(self.memory_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise SnapshotError(f"{self.memory_path}: {exc.strerror}") from None
        try:
            yield fd
        finally:
            os.close(fd)

    # -- files ---------------------------------------------------------------------------

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            offsets = self._write_memory(directory / MEMORY_FILE)
        except OSError as exc:
            raise SnapshotError(f"{directory}: cannot write the snapshot: {exc.strerror}") from None
        body = {
            "format": FORMAT,
            "version": VERSION,
            "config": self.config,
            "vcpus": self.vcpus,
            "vm": self.vm,
            "devices": self.devices,
            "memory": {
                "file": MEMORY_FILE,
                "size": self.config["mem_size"],
                "extents": offsets,
            },
        }
        text = json.dumps(body, sort_keys=True)
        header = {"sha256": hashlib.sha256(text.encode()).hexdigest(), "body": body}
        (directory / HEADER_FILE).write_text(json.dumps(header, sort_keys=True, indent=1))

    def _write_memory(self, path: Path) -> list[list[int]]:
        """Write the extents at their RAM offsets; returns [gpa, offset, length, crc32] each."""
        offsets = []
        with open(path, "wb") as out:
            out.truncate(self.config["mem_size"])  # holes read as zeros and cost nothing
            for gpa, data in self.extents:
                offset = _ram_offset(self.config, gpa)
                out.seek(offset)
                out.write(data)
                offsets.append([gpa, offset, len(data), zlib.crc32(data)])
        return offsets

    @classmethod
    def load(cls, directory: str | Path) -> Snapshot:
        directory = Path(directory)
        try:
            header = json.loads((directory / HEADER_FILE).read_text())
        except FileNotFoundError:
            raise SnapshotError(f"{directory}: not a kvmpy snapshot (no {HEADER_FILE})") from None
        except (OSError, ValueError) as exc:
            raise SnapshotError(f"{directory}/{HEADER_FILE}: unreadable: {exc}") from None
        body = header.get("body") if isinstance(header, dict) else None
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            raise SnapshotError(f"{directory}: not a kvmpy snapshot")
        if body.get("version") != VERSION:
            raise SnapshotError(
                f"{directory}: snapshot format version {body.get('version')!r}; "
                f"this kvmpy reads version {VERSION}"
            )
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        if digest != header.get("sha256"):
            raise SnapshotError(
                f"{directory}/{HEADER_FILE}: checksum mismatch: the file is corrupt"
            )
        memory = directory / body["memory"]["file"]
        cls._check_memory(memory, body)
        return cls(body["config"], body["vcpus"], body["vm"], body["devices"], [], memory)

    @staticmethod
    def _check_memory(path: Path, body: dict[str, Any]) -> None:
        """Check memory.bin's size and every extent's checksum."""
        try:
            size = path.stat().st_size
            if size != body["memory"]["size"]:
                raise SnapshotError(
                    f"{path}: {size} bytes, the snapshot says {body['memory']['size']}"
                )
            # Checksum the file through a read-only map: no copies of the data.
            flags = mmap.MAP_SHARED
            with (
                open(path, "rb") as file,
                mmap.mmap(file.fileno(), 0, flags=flags, prot=mmap.PROT_READ) as mapped,
                memoryview(mapped) as memory,
            ):
                for gpa, offset, length, crc in body["memory"]["extents"]:
                    with memory[offset : offset + length] as data:
                        intact = len(data) == length and zlib.crc32(data) == crc
                    if not intact:
                        raise SnapshotError(
                            f"{path}: memory at {gpa:#x} is corrupt (checksum mismatch)"
                        )
        except OSError as exc:
            raise SnapshotError(f"{path}: cannot read guest memory: {exc.strerror}") from None


def _ram_offset(config: dict[str, Any], gpa: int) -> int:
    """Where ``gpa`` lives in memory.bin: RAM regions laid end to end."""
    offset = 0
    for start, size in config["ram"]:
        if start <= gpa < start + size:
            return int(offset + gpa - start)
        offset += size
    raise SnapshotError(f"guest address {gpa:#x} is not in RAM")


# -- taking a snapshot ---------------------------------------------------------------------


def take_snapshot(machine: Machine) -> Snapshot:
    """The state of a stopped machine (call between runs, not while it runs)."""
    if machine.is_running:
        raise SnapshotError("stop the machine (or let run() return) before taking a snapshot")
    return Snapshot(
        config={
            "mem_size": machine.memory.size,
            "ram": [[region.gpa, region.size] for region in machine.memory],
            "cpus": len(machine.vcpus),
            "irqchip": machine.has_irqchip,
            "cmdline": machine.cmdline,
        },
        vcpus=[vcpu.save_state() for vcpu in machine.vcpus],
        vm=machine.vm.save_state(),
        devices={name: device_state(device) for name, device in machine.devices().items()},
        extents=_memory_extents(machine),
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"))


def _memory_extents(machine: Machine) -> list[tuple[int, bytes]]:
    """Runs of pages that are not all zero: what a sparse snapshot stores.

    Whole megabytes are compared with zeros first (at C speed), and only
    those that are not all zero are looked at page by page.
    """
    extents: list[tuple[int, bytes]] = []
    for region in machine.memory:
        view = region.view
        start: int | None = None
        for chunk in range(0, region.size, _CHUNK):
            chunk_end = min(chunk + _CHUNK, region.size)
            # bytes == bytes is a memcmp; comparing memoryviews goes byte by byte.
            if region.mapping[chunk:chunk_end] == _ZERO_CHUNK[: chunk_end - chunk]:
                pages = [(chunk, True)]
            else:
                pages = [
                    (page, region.mapping[page : page + PAGE] == _ZERO_PAGE)
                    for page in range(chunk, chunk_end, PAGE)
                ]
            for offset, zero in pages:
                if not zero and start is None:
                    start = offset
                elif zero and start is not None:
                    extents.append((region.gpa + start, bytes(view[start:offset])))
                    start = None
        if start is not None:
            extents.append((region.gpa + start, bytes(view[start:])))
    return extents


# -- device state as plain data ------------------------------------------------------------

_LOCK_TYPES = (type(threading.Lock()), type(threading.RLock()), threading.Condition)


def device_state(device: object) -> dict[str, Any]:
    """A device model's plain-data attributes, encoded for JSON.

    Callbacks (interrupt lines, outputs), locks and the attributes a class
    lists in ``SNAPSHOT_EXCLUDE`` (its wiring) are left out; anything else
    that is not plain data is an error, so a device cannot be half-saved
    without anyone noticing.
    """
    state = {}
    exclude = getattr(device, "SNAPSHOT_EXCLUDE", ())
    for name, value in vars(device).items():
        if callable(value) or isinstance(value, _LOCK_TYPES) or name in exclude:
            continue
        state[name] = _encode(value, f"{type(device).__name__}.{name}")
    return state


def restore_device_state(device: object, state: dict[str, Any]) -> None:
    current = vars(device)
    for name, encoded in state.items():
        if name not in current:
            raise SnapshotError(f"{type(device).__name__} has no attribute {name!r} to restore")
        value = _decode(encoded)
        if isinstance(current[name], collections.deque):
            value = collections.deque(value, maxlen=current[name].maxlen)
        elif isinstance(current[name], bytearray):
            value = bytearray(value)
        setattr(device, name, value)


def _encode(value: Any, where: str) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, bytes | bytearray):
        return {"bytes": _b64(bytes(value))}
    if isinstance(value, list | tuple | collections.deque):
        return {"list": [_encode(item, where) for item in value], "tuple": isinstance(value, tuple)}
    if isinstance(value, dict):
        return {"dict": [[_encode(k, where), _encode(v, where)] for k, v in value.items()]}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"dataclass": type(value).__name__, "fields": device_state(value)}
    raise SnapshotError(f"cannot save {where}: {type(value).__name__} is not plain data")


def _decode(value: Any) -> Any:
    if not isinstance(value, dict):
        return value
    if "bytes" in value:
        return _unb64(value["bytes"])
    if "list" in value:
        items = [_decode(item) for item in value["list"]]
        return tuple(items) if value["tuple"] else items
    if "dict" in value:
        return {_decode(k): _decode(v) for k, v in value["dict"]}
    raise SnapshotError(f"cannot restore {value!r}")


# -- restoring -----------------------------------------------------------------------------


def apply_snapshot(snapshot: Snapshot, machine: Machine) -> None:
    """Load ``snapshot`` into a fresh machine built with the same configuration."""
    if len(snapshot.vcpus) != len(machine.vcpus):
        raise SnapshotError("the machine has a different number of vCPUs")
    for gpa, data in snapshot.extents:
        machine.memory.write(gpa, data)
    try:
        machine.vm.load_state(snapshot.vm)
        for vcpu, state in zip(machine.vcpus, snapshot.vcpus, strict=True):
            vcpu.load_state(state)
    except (KeyError, TypeError, ValueError) as exc:
        raise SnapshotError(f"snapshot state is incomplete or malformed: {exc}") from None
    devices = machine.devices()
    for name, state in snapshot.devices.items():
        if name not in devices:
            raise SnapshotError(f"the snapshot has a device {name!r} this machine lacks")
        restore_device_state(devices[name], state)


def file_size_on_disk(path: str | Path) -> int:
    """Bytes the file really occupies (a sparse memory.bin is much less than its size)."""
    return os.stat(path).st_blocks * 512
