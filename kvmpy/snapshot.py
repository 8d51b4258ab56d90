"""Snapshot and restore: a whole machine to a directory, and back.

A snapshot directory holds two files:

    snapshot.json        header, machine configuration, every vCPU's and the
                         VM's KVM state (opaque structs as base64), each
                         device's explicit state (its versioned record),
                         and the memory extents; with a SHA-256 of its content
    memory-<random>.bin  guest RAM as a sparse file: only non-zero pages are
                         written, so untouched memory costs no disk and no time

The KVM state structs (xsave, LAPIC, events, irqchip, PIT, clock...) are
saved as the exact bytes KVM returned and handed back unchanged on restore:
kvmpy never needs to understand them.  Restoring needs the same kind of host
CPU.

A snapshot is untrusted input.  Loading reads snapshot.json once, with a size
cap, only from a regular file, and validates the whole schema (every key,
type and range) before anything uses it; memory is read only from a file
named by the header inside the snapshot's own directory, never through a
symbolic link, and its extents, its holes and its size are all checked.
Anything wrong gives one :class:`SnapshotError`.  Format version 1 (kvmpy
before explicit device states) is refused, not misread.

Saving never follows a symbolic link, refuses a directory owned by another
user, and replaces an earlier snapshot atomically: the memory goes to a new
file and is synced, the header naming it goes to a temporary file that is
synced and renamed over snapshot.json (the commit point), the directory is
synced, and only then is the old memory file deleted.  A save killed at any
moment leaves the old or the new snapshot.  One save at a time per directory.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import hashlib
import json
import mmap
import os
import re
import secrets
import stat
import types
import typing
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvmpy.devices.base import (
    U8,
    U16,
    U32,
    U64,
    DeviceStateError,
    NoState,
    state_field_types,
)
from kvmpy.records import Record, fields
from kvmpy.x86.registers import Regs, Sregs
from kvmpy.x86.topology import checked_topology

if TYPE_CHECKING:
    from kvmpy.machine import Machine

FORMAT = "kvmpy-snapshot"
VERSION = 2
HEADER_FILE = "snapshot.json"
LEGACY_MEMORY_FILE = "memory.bin"  # version 1's memory file
MEMORY_NAME = re.compile(r"memory-[0-9a-f]{32}\.bin")
TEMP_HEADER_NAME = re.compile(r"\.snapshot-[0-9a-f]{32}\.json\.tmp")
PAGE = 4096
_ZERO_PAGE = bytes(PAGE)
_CHUNK = 1 << 20
_ZERO_CHUNK = bytes(_CHUNK)

# Bounds on what a snapshot may ask for (far beyond what kvmpy writes).
MAX_HEADER_BYTES = 16 << 20
MIN_MEM_SIZE = 1 << 20
MAX_MEM_SIZE = 1 << 40
MAX_RAM_REGIONS = 8
MAX_CPUS = 1024
MAX_CMDLINE = 1 << 16
MAX_MSRS = 4096
MAX_BLOB = 1 << 20  # one KVM state struct, base64-decoded
MAX_DEVICES = 64
MAX_VM_BLOBS = 16
VM_BLOB_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")

_SEGMENT_WIDTHS = {
    "base": U64,
    "limit": U32,
    "selector": U16,
    **{name: U8 for name in "type present dpl db s l g avl unusable".split()},
}
_DTABLE_WIDTHS = {"base": U64, "limit": U16}
_SEGMENT_NAMES = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
_CONTROL_NAMES = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")
_VCPU_BLOBS = ("xsave", "xcrs", "events", "debugregs")


class SnapshotError(ValueError):
    """A snapshot that cannot be written, or one that is corrupt or foreign."""


class Snapshot(Record, frozen=False):
    """A machine's complete state, in memory (see ``save``/``load`` for the files)."""

    config: dict[str, Any]
    vcpus: list[dict[str, Any]]
    vm: dict[str, str]
    # name -> {"version": n, "state": {field: JSON value}}, see device_state().
    devices: dict[str, Any]
    # (guest-physical address, bytes) runs of non-zero pages: for a snapshot
    # taken in this process; a loaded one has its memory in ``memory_path``.
    extents: list[tuple[int, bytes]]
    memory_path: Path | None = None
    # (st_dev, st_ino, st_size, st_ctime_ns) of the memory file checked at load.
    memory_identity: tuple[int, int, int, int] | None = None

    @contextlib.contextmanager
    def open_memory(self) -> Iterator[int | None]:
        """A read-only fd of the memory file for a machine to map (None: copy the extents).

        It must still be the file that was checked when the snapshot was loaded.
        """
        if self.memory_path is None:
            yield None
            return
        try:
            fd = os.open(self.memory_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError as exc:
            raise SnapshotError(f"{self.memory_path}: {exc.strerror}") from None
        try:
            info = os.fstat(fd)
            if _identity(info) != self.memory_identity:
                raise SnapshotError(f"{self.memory_path}: changed since the snapshot was loaded")
            yield fd
        finally:
            _close(fd)

    # -- saving --------------------------------------------------------------------------

    def save(self, directory: str | Path) -> None:
        """Write the snapshot to ``directory`` (created if needed), replacing any there."""
        directory = Path(directory)
        if self.memory_path is not None:
            # Its memory is in that file, not in ``extents``: copy the directory instead.
            raise SnapshotError(f"{directory}: a snapshot loaded from disk cannot be saved again")
        if directory.is_symlink():
            raise SnapshotError(f"{directory}: cannot write the snapshot: it is a symbolic link")
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise SnapshotError(f"{directory}: cannot write the snapshot: {_reason(exc)}") from None
        try:
            owner = os.fstat(dir_fd).st_uid
            if owner != os.geteuid():
                raise SnapshotError(
                    f"{directory}: owned by user {owner}, not by you: not writing a snapshot there"
                )
            self._save_in(dir_fd)
        except OSError as exc:
            raise SnapshotError(f"{directory}: cannot write the snapshot: {_reason(exc)}") from None
        finally:
            _close(dir_fd)

    def _save_in(self, dir_fd: int) -> None:
        token = secrets.token_hex(16)
        memory_name = f"memory-{token}.bin"
        temp_name = f".snapshot-{token}.json.tmp"
        committed = False
        try:
            offsets = self._write_memory(dir_fd, memory_name)
            body = {
                "format": FORMAT,
                "version": VERSION,
                "config": self.config,
                "vcpus": self.vcpus,
                "vm": self.vm,
                "devices": self.devices,
                "memory": {
                    "file": memory_name,
                    "size": self.config["mem_size"],
                    "extents": offsets,
                },
            }
            header = {"sha256": _body_digest(body), "body": body}
            _write_new_file(
                dir_fd, temp_name, json.dumps(header, sort_keys=True, indent=1).encode()
            )
            os.rename(temp_name, HEADER_FILE, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            committed = True  # snapshot.json now names the new memory file
            os.fsync(dir_fd)
        finally:
            if not committed:
                for name in (temp_name, memory_name):
                    with contextlib.suppress(OSError):
                        os.unlink(name, dir_fd=dir_fd)
        # The old memory file, and what interrupted saves left behind.
        for name in os.listdir(dir_fd):
            stale_memory = MEMORY_NAME.fullmatch(name) or name == LEGACY_MEMORY_FILE
            if (stale_memory and name != memory_name) or TEMP_HEADER_NAME.fullmatch(name):
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=dir_fd)

    def _write_memory(self, dir_fd: int, name: str) -> list[list[int]]:
        """Write the extents at their RAM offsets; returns [gpa, offset, length, crc32] each."""
        offsets = []
        fd = _create(dir_fd, name)
        try:
            os.ftruncate(fd, self.config["mem_size"])  # holes read as zeros and cost nothing
            for gpa, data in self.extents:
                offset = _ram_offset(self.config, gpa)
                written = 0
                with memoryview(data) as view:
                    while written < len(data):
                        written += os.pwrite(fd, view[written:], offset + written)
                offsets.append([gpa, offset, len(data), zlib.crc32(data)])
            os.fsync(fd)
        finally:
            _close(fd)
        return offsets

    # -- loading -------------------------------------------------------------------------

    @classmethod
    def load(cls, directory: str | Path) -> Snapshot:
        """Read and check the snapshot in ``directory``; SnapshotError if it is not sound."""
        directory = Path(directory)
        try:
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise SnapshotError(f"{directory}: not a kvmpy snapshot: {_reason(exc)}") from None
        try:
            body = _read_header(directory, dir_fd)
            try:
                _check_body(body)
            except _Invalid as exc:
                raise SnapshotError(f"{directory}/{HEADER_FILE}: {exc}") from None
            memory_name = body["memory"]["file"]
            identity = _check_memory(directory / memory_name, dir_fd, memory_name, body)
        finally:
            _close(dir_fd)
        return cls(
            body["config"],
            body["vcpus"],
            body["vm"],
            body["devices"],
            [],
            directory / memory_name,
            identity,
        )


def _close(fd: int) -> None:
    # Data was synced before: a failing close loses nothing (and must not mask an error).
    with contextlib.suppress(OSError):
        os.close(fd)


def _identity(info: os.stat_result) -> tuple[int, int, int, int]:
    return info.st_dev, info.st_ino, info.st_size, info.st_ctime_ns


def _reason(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "it is a symbolic link"
    return exc.strerror or str(exc)


def _create(dir_fd: int, name: str) -> int:
    """A new file ``name`` in the directory: never an existing file, never through a link."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.open(name, flags, 0o600, dir_fd=dir_fd)


def _write_new_file(dir_fd: int, name: str, data: bytes) -> None:
    fd = _create(dir_fd, name)
    try:
        with memoryview(data) as view:
            written = 0
            while written < len(data):
                written += os.write(fd, view[written:])
        os.fsync(fd)
    finally:
        _close(fd)


def _body_digest(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _read_regular(dir_fd: int, name: str, limit: int) -> bytes:
    """At most ``limit`` bytes of regular file ``name``: no FIFO, device or link target."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    fd = os.open(name, flags, dir_fd=dir_fd)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SnapshotError("not a regular file")
        if info.st_size > limit:
            raise SnapshotError(f"{info.st_size} bytes, more than the limit of {limit}")
        chunks = []
        total = 0
        while total <= limit:
            chunk = os.read(fd, limit + 1 - total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:
            raise SnapshotError(f"more than the limit of {limit} bytes")
        return b"".join(chunks)
    finally:
        _close(fd)


def _read_header(directory: Path, dir_fd: int) -> dict[str, Any]:
    where = f"{directory}/{HEADER_FILE}"
    try:
        raw = _read_regular(dir_fd, HEADER_FILE, MAX_HEADER_BYTES)
    except FileNotFoundError:
        raise SnapshotError(f"{directory}: not a kvmpy snapshot (no {HEADER_FILE})") from None
    except OSError as exc:
        raise SnapshotError(f"{where}: unreadable: {_reason(exc)}") from None
    except SnapshotError as exc:
        raise SnapshotError(f"{where}: {exc}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise SnapshotError(f"{where}: unreadable: nested too deeply") from None
    except ValueError as exc:  # bad UTF-8, bad JSON, integers too long to parse
        raise SnapshotError(f"{where}: unreadable: {exc}") from None
    body = header.get("body") if isinstance(header, dict) else None
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise SnapshotError(f"{directory}: not a kvmpy snapshot")
    version = body.get("version")
    if version != VERSION:
        older = (
            " (written by an older kvmpy that saved device internals; take the snapshot again)"
            if version == 1
            else ""
        )
        raise SnapshotError(
            f"{directory}: snapshot format version {version!r}{older}; "
            f"this kvmpy reads version {VERSION} only"
        )
    if set(header) != {"sha256", "body"} or _body_digest(body) != header["sha256"]:
        raise SnapshotError(f"{where}: checksum mismatch: the file is corrupt")
    return body


# -- schema ----------------------------------------------------------------------------------


class _Invalid(Exception):
    """A schema violation; the message says where."""


def _keys(value: object, where: str, keys: typing.Collection[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Invalid(f"{where}: not an object")
    if set(value) != set(keys):
        missing = sorted(set(keys) - set(value))
        extra = sorted(set(value) - set(keys))
        detail = "; ".join(
            part
            for part in (
                f"missing {', '.join(missing)}" if missing else "",
                f"unexpected {', '.join(map(repr, extra))}" if extra else "",
            )
            if part
        )
        raise _Invalid(f"{where}: {detail}")
    return value


def _int(value: object, where: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _Invalid(f"{where}: not an integer")
    if not low <= value <= high:
        raise _Invalid(f"{where}: {value} is outside {low}..{high}")
    return value


def _list(value: object, where: str, max_items: int) -> list[Any] | tuple[Any, ...]:
    # Tuples too: a snapshot taken in this process has not been through JSON.
    if not isinstance(value, list | tuple):
        raise _Invalid(f"{where}: not a list")
    if len(value) > max_items:
        raise _Invalid(f"{where}: {len(value)} items, more than {max_items}")
    return value


def _blob(value: object, where: str) -> bytes:
    if not isinstance(value, str) or len(value) > 2 * MAX_BLOB:
        raise _Invalid(f"{where}: not a base64 string of at most {MAX_BLOB} bytes")
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (ValueError, binascii.Error):
        raise _Invalid(f"{where}: not valid base64") from None


def _check_body(body: dict[str, Any]) -> None:
    _keys(body, "snapshot", ("format", "version", "config", "vcpus", "vm", "devices", "memory"))
    config = _check_parts(body["config"], body["vcpus"], body["vm"], body["devices"])
    _check_memory_header(body["memory"], config)


def _check_parts(config_value: object, vcpus_value: object, vm: object, devices: object) -> Any:
    """Validate everything but the memory description; returns the configuration."""
    config = _check_config(config_value)
    vcpus = _list(vcpus_value, "vcpus", MAX_CPUS)
    if len(vcpus) != config["cpus"]:
        raise _Invalid(f"vcpus: {len(vcpus)} saved, the configuration says {config['cpus']}")
    for index, vcpu in enumerate(vcpus):
        _check_vcpu(vcpu, f"vcpus[{index}]", config["irqchip"])
    # The VM's state is the backend's business (KVM: clock, PICs, IOAPIC, PIT):
    # here only its shape, named base64 blobs, is checked.
    if not isinstance(vm, dict) or not 1 <= len(vm) <= MAX_VM_BLOBS:
        raise _Invalid(f"vm: not an object of 1 to {MAX_VM_BLOBS} entries")
    for name, value in vm.items():
        if not VM_BLOB_NAME.fullmatch(name):
            raise _Invalid(f"vm: {name!r} is not a state name")
        _blob(value, f"vm.{name}")
    if not isinstance(devices, dict) or len(devices) > MAX_DEVICES:
        raise _Invalid(f"devices: not an object of at most {MAX_DEVICES} devices")
    for name, saved in devices.items():
        saved = _keys(saved, f"devices.{name}", ("version", "state"))
        _int(saved["version"], f"devices.{name}.version", 1, U32)
        if not isinstance(saved["state"], dict):
            raise _Invalid(f"devices.{name}.state: not an object")
    return config


def _check_config(value: object) -> dict[str, Any]:
    keys = ["mem_size", "ram", "cpus", "irqchip", "cmdline"]
    if isinstance(value, dict) and "topology" in value:  # optional: older snapshots lack it
        keys.append("topology")
    config = _keys(value, "config", keys)
    mem_size = _int(config["mem_size"], "config.mem_size", MIN_MEM_SIZE, MAX_MEM_SIZE)
    if mem_size % PAGE:
        raise _Invalid(f"config.mem_size: {mem_size:#x} is not a multiple of 4 KiB")
    end = 0
    total = 0
    for index, region in enumerate(_list(config["ram"], "config.ram", MAX_RAM_REGIONS)):
        where = f"config.ram[{index}]"
        if not isinstance(region, list | tuple) or len(region) != 2:
            raise _Invalid(f"{where}: not a [address, size] pair")
        gpa = _int(region[0], f"{where} address", 0, U64)
        size = _int(region[1], f"{where} size", PAGE, mem_size)
        if gpa % PAGE or size % PAGE or gpa < end:
            raise _Invalid(f"{where}: not page-aligned, or out of order")
        end = gpa + size
        total += size
    if total != mem_size:
        raise _Invalid(f"config.ram: {total:#x} bytes of regions, mem_size is {mem_size:#x}")
    cpus = _int(config["cpus"], "config.cpus", 1, MAX_CPUS)
    if not isinstance(config["irqchip"], bool):
        raise _Invalid("config.irqchip: not a boolean")
    if cpus > 1 and not config["irqchip"]:
        raise _Invalid("config: more than one vCPU needs the irqchip")
    if "topology" in config:
        counts = _list(config["topology"], "config.topology", 3)
        try:
            topology = checked_topology(*counts)
        except (TypeError, ValueError) as exc:
            raise _Invalid(f"config.topology: {exc}") from None
        if topology.cpus != cpus:
            raise _Invalid(f"config.topology: {topology.describe()} CPUs, config.cpus is {cpus}")
    cmdline = config["cmdline"]
    if not isinstance(cmdline, str) or len(cmdline) > MAX_CMDLINE or "\0" in cmdline:
        raise _Invalid(f"config.cmdline: not a string of at most {MAX_CMDLINE} characters")
    return config


def _check_fields(value: object, where: str, widths: dict[str, int]) -> None:
    fields = _keys(value, where, widths)
    for name, high in widths.items():
        _int(fields[name], f"{where}.{name}", 0, high)


def _check_vcpu(value: object, where: str, irqchip: bool) -> None:
    vcpu = _keys(
        value,
        where,
        ("regs", "sregs", "xsave", "xcrs", "msrs", "lapic", "events", "mp_state", "debugregs"),
    )
    _check_fields(vcpu["regs"], f"{where}.regs", {f.name: U64 for f in fields(Regs)})
    sregs = _keys(vcpu["sregs"], f"{where}.sregs", [f.name for f in fields(Sregs)])
    for name in _SEGMENT_NAMES:
        _check_fields(sregs[name], f"{where}.sregs.{name}", _SEGMENT_WIDTHS)
    for name in ("gdt", "idt"):
        _check_fields(sregs[name], f"{where}.sregs.{name}", _DTABLE_WIDTHS)
    for name in _CONTROL_NAMES:
        _int(sregs[name], f"{where}.sregs.{name}", 0, U64)
    bitmap = _list(sregs["interrupt_bitmap"], f"{where}.sregs.interrupt_bitmap", 4)
    if len(bitmap) != 4:
        raise _Invalid(f"{where}.sregs.interrupt_bitmap: not 4 words")
    for word in bitmap:
        _int(word, f"{where}.sregs.interrupt_bitmap", 0, U64)
    for name in _VCPU_BLOBS:
        _blob(vcpu[name], f"{where}.{name}")
    if irqchip or vcpu["lapic"] is not None:
        _blob(vcpu["lapic"], f"{where}.lapic")
    for entry in _list(vcpu["msrs"], f"{where}.msrs", MAX_MSRS):
        if not isinstance(entry, list | tuple) or len(entry) != 2:
            raise _Invalid(f"{where}.msrs: not an [index, value] pair")
        _int(entry[0], f"{where}.msrs index", 0, U32)
        _int(entry[1], f"{where}.msrs value", 0, U64)
    _int(vcpu["mp_state"], f"{where}.mp_state", 0, U32)


def _check_memory_header(value: object, config: dict[str, Any]) -> None:
    memory = _keys(value, "memory", ("file", "size", "extents"))
    name = memory["file"]
    if not isinstance(name, str) or not MEMORY_NAME.fullmatch(name):
        # Only a plain name kvmpy makes: no path, so nothing outside the directory.
        raise _Invalid(f"memory.file: {name!r} is not a memory file name kvmpy writes")
    size = _int(memory["size"], "memory.size", 0, MAX_MEM_SIZE)
    if size != config["mem_size"]:
        raise _Invalid(f"memory.size: {size:#x}, mem_size is {config['mem_size']:#x}")
    end = 0
    for index, extent in enumerate(_list(memory["extents"], "memory.extents", size // PAGE)):
        where = f"memory.extents[{index}]"
        if not isinstance(extent, list | tuple) or len(extent) != 4:
            raise _Invalid(f"{where}: not [address, offset, length, crc32]")
        gpa = _int(extent[0], f"{where} address", 0, U64)
        offset = _int(extent[1], f"{where} offset", end, size)
        length = _int(extent[2], f"{where} length", 1, size - offset)
        _int(extent[3], f"{where} crc32", 0, U32)
        try:
            expected = _ram_offset(config, gpa)
            last = _ram_offset(config, gpa + length - 1)
        except SnapshotError as exc:
            raise _Invalid(f"{where}: {exc}") from None
        if expected != offset or last != offset + length - 1:
            raise _Invalid(f"{where}: does not match the RAM layout")
        end = offset + length


def _check_memory(
    path: Path, dir_fd: int, name: str, body: dict[str, Any]
) -> tuple[int, int, int, int]:
    """Check the memory file's type, size, extents and holes; return its identity."""
    size = body["memory"]["size"]
    extents = body["memory"]["extents"]
    try:
        fd = os.open(
            name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd
        )
    except OSError as exc:
        raise SnapshotError(f"{path}: cannot read guest memory: {_reason(exc)}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SnapshotError(f"{path}: not a regular file")
        if info.st_size != size:
            raise SnapshotError(f"{path}: {info.st_size} bytes, the snapshot says {size}")
        # Checksum the file through a read-only map: no copies of the data.
        with (
            mmap.mmap(fd, 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ) as mapped,
            memoryview(mapped) as memory,
        ):
            for gpa, offset, length, crc in extents:
                with memory[offset : offset + length] as data:
                    if zlib.crc32(data) != crc:
                        raise SnapshotError(
                            f"{path}: memory at {gpa:#x} is corrupt (checksum mismatch)"
                        )
            covered = [(offset, offset + length) for _, offset, length, _ in extents]
            for start, end in _uncovered(_data_ranges(fd, size), covered):
                for chunk in range(start, end, _CHUNK):
                    stop = min(chunk + _CHUNK, end)
                    if mapped[chunk:stop] != _ZERO_CHUNK[: stop - chunk]:
                        raise SnapshotError(
                            f"{path}: data at offset {chunk:#x} outside every extent "
                            "(the file is corrupt)"
                        )
    except OSError as exc:
        raise SnapshotError(f"{path}: cannot read guest memory: {_reason(exc)}") from None
    finally:
        _close(fd)
    return _identity(info)


def _data_ranges(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """The parts of the file that are not holes (all of it where holes are not reported)."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole from here to the end
                return
            if exc.errno == errno.EINVAL:  # a file system without SEEK_DATA
                yield offset, size
                return
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end
        offset = end


def _uncovered(
    ranges: Iterator[tuple[int, int]], covered: list[tuple[int, int]]
) -> Iterator[tuple[int, int]]:
    """The parts of ``ranges`` outside the sorted, disjoint ``covered`` ranges."""
    for start, end in ranges:
        position = start
        for low, high in covered:
            if high <= position:
                continue
            if low >= end:
                break
            if low > position:
                yield position, low
            position = max(position, high)
        if position < end:
            yield position, end


def _ram_offset(config: dict[str, Any], gpa: int) -> int:
    """Where ``gpa`` lives in the memory file: RAM regions laid end to end."""
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
            "topology": [
                machine.topology.sockets,
                machine.topology.cores,
                machine.topology.threads,
            ],
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


# -- device state as JSON ------------------------------------------------------------------


def device_state(device: Any) -> dict[str, Any]:
    """``device.state()`` as JSON data: its record's VERSION and every field."""
    state = device.state()
    values = {spec.name: _to_json(getattr(state, spec.name)) for spec in fields(state)}
    return {"version": type(state).VERSION, "state": values}


def restore_device_state(device: Any, saved: object, name: str | None = None) -> None:
    """Give ``device`` the state ``device_state`` saved; SnapshotError if it is unacceptable."""
    state = _device_state_from_json(device, saved, name or type(device).__name__)
    try:
        device.restore(state)
    except DeviceStateError as exc:
        raise SnapshotError(f"device {name or type(device).__name__}: {exc}") from None


def _to_json(value: object) -> Any:
    if isinstance(value, bytes):
        return _b64(value)
    if isinstance(value, tuple):
        return [_to_json(item) for item in value]
    return value


def _device_state_from_json(device: Any, saved: object, name: str) -> Any:
    """The device's state record built from JSON, each field of its declared type."""
    cls: Any = type(device.state())
    try:
        saved = _keys(saved, f"device {name}", ("version", "state"))
        version = saved["version"]
        saved_state = saved["state"]
        upgrade = getattr(cls, "upgrade", None)
        if (
            type(version) is int
            and 1 <= version < cls.VERSION
            and upgrade is not None
            and isinstance(saved_state, dict)
        ):
            # An older version this kvmpy still reads: its fields, brought up to date
            # (and then checked like any others).
            saved_state = upgrade(version, saved_state)
        elif version != cls.VERSION:
            raise _Invalid(
                f"device {name}: state version {version!r}, this kvmpy reads {cls.VERSION}"
            )
        hints = state_field_types(cls)
        names = [spec.name for spec in fields(cls)]
        saved_fields = _keys(saved_state, f"device {name} state", names)
        values = {
            field: _from_json(saved_fields[field], hints[field], f"device {name} state.{field}")
            for field in names
        }
    except _Invalid as exc:
        raise SnapshotError(str(exc)) from None
    return cls(**values)


def _from_json(value: object, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if hint is bool:
        if not isinstance(value, bool):
            raise _Invalid(f"{where}: not a boolean")
        return value
    if hint is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise _Invalid(f"{where}: not an integer")
        return value
    if hint is bytes:
        return _blob(value, where)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        (option,) = [option for option in options if option is not type(None)]
        return _from_json(value, option, where)
    if origin is tuple:
        items = _list(value, where, MAX_BLOB)
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_from_json(item, args[0], f"{where}[{i}]") for i, item in enumerate(items))
        if len(items) != len(args):
            raise _Invalid(f"{where}: {len(items)} items, not {len(args)}")
        return tuple(
            _from_json(item, arg, f"{where}[{i}]")
            for i, (item, arg) in enumerate(zip(items, args, strict=True))
        )
    raise TypeError(f"state field type {hint!r} is not supported")


# -- restoring -----------------------------------------------------------------------------


def apply_snapshot(snapshot: Snapshot, machine: Machine) -> None:
    """Load ``snapshot`` into a fresh machine built with the same configuration.

    Everything is validated before the machine is touched; a state KVM
    refuses is reported as a SnapshotError as well.
    """
    try:
        _check_parts(snapshot.config, snapshot.vcpus, snapshot.vm, snapshot.devices)
    except _Invalid as exc:
        raise SnapshotError(f"snapshot: {exc}") from None
    if len(snapshot.vcpus) != len(machine.vcpus):
        raise SnapshotError("the machine has a different number of vCPUs")
    layout = [(region.gpa, region.size) for region in machine.memory]
    if layout != [tuple(region) for region in snapshot.config["ram"]]:
        raise SnapshotError("the machine's RAM layout differs from the snapshot's")
    devices: dict[str, Any] = machine.devices()
    # A device with nothing to save may be missing (a snapshot from before it was listed).
    needed = {name for name, device in devices.items() if type(device.state()) is not NoState}
    if not needed <= set(snapshot.devices) or not set(snapshot.devices) <= set(devices):
        missing = sorted(needed - set(snapshot.devices))
        extra = sorted(set(snapshot.devices) - set(devices))
        raise SnapshotError(
            f"the snapshot's devices differ from this machine's: missing {missing}, extra {extra}"
            " (kvmpy restore needs the --device, --debugcon and --debug-exit options the run had)"
        )
    states = {
        name: _device_state_from_json(device, snapshot.devices[name], name)
        for name, device in devices.items()
        if name in snapshot.devices
    }
    for gpa, data in snapshot.extents:
        machine.memory.write(gpa, data)
    try:
        machine.vm.load_state(snapshot.vm)
        for vcpu, state in zip(machine.vcpus, snapshot.vcpus, strict=True):
            vcpu.load_state(state)
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise SnapshotError(f"snapshot state is incomplete or malformed: {exc}") from None
    except OSError as exc:  # the backend refused a state (BackendError is an OSError)
        raise SnapshotError(f"the snapshot's state was refused: {exc}") from None
    for name, device_state_value in states.items():
        try:
            devices[name].restore(device_state_value)
        except DeviceStateError as exc:
            raise SnapshotError(f"device {name}: {exc}") from None


def file_size_on_disk(path: str | Path) -> int:
    """Bytes the file really occupies (a sparse memory.bin is much less than its size)."""
    return os.stat(path).st_blocks * 512
