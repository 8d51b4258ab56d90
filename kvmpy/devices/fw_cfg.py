"""QEMU's firmware configuration device (fw_cfg), traditional port-I/O interface.

A guest selects an item by writing its 16-bit key to the selector and then
reads the item's bytes, one per access, from the data port; selecting again
restarts at the item's first byte and reads past its end return 0.  The
layout follows QEMU's ``docs/specs/fw_cfg.rst``: selector at 0x510, data at
0x511, numeric items little-endian, the file directory big-endian.

As in QEMU on x86, the two ports form one 2-port region (map it at
:data:`FW_CFG_PORT` with :data:`FW_CFG_PORTS` ports) and QEMU's rules for it
are kept:

* a 16-bit write at either port selects an item; byte writes are writes to
  the data port, which QEMU has ignored since 2.4, so they are dropped here
  too (as are 4-byte writes, which QEMU rejects);
* a read at either port returns data: QEMU's selector is write-only and the
  byte-wide data register overlaps its upper half.

Wider reads, which QEMU does not accept on this interface, return the next
``size`` bytes as a little-endian integer, so a 32-bit ``in`` stored to
memory lays the bytes out in item order.  There is no DMA interface, and
:data:`FW_CFG_ID` says so (traditional interface only).

File selectors are handed out in the order files are added and never change;
QEMU instead renumbers files to follow name order.  Guests find files by
name through the directory, which is sorted by name as in QEMU, so they
cannot tell the difference.
"""

from __future__ import annotations

from typing import ClassVar

from kvmpy.records import Record

from .base import U16, U32, DeviceStateError, access_fits, all_ones, bounded, check_state

FW_CFG_PORT = 0x510
FW_CFG_PORTS = 2  # offset 0: selector (0x510), offset 1: data (0x511)

# Selector keys (docs/specs/fw_cfg.rst, include/standard-headers/linux/qemu_fw_cfg.h).
FW_CFG_SIGNATURE = 0x00
FW_CFG_ID = 0x01
FW_CFG_UUID = 0x02
FW_CFG_RAM_SIZE = 0x03
FW_CFG_NOGRAPHIC = 0x04
FW_CFG_NB_CPUS = 0x05
FW_CFG_MACHINE_ID = 0x06
FW_CFG_KERNEL_ADDR = 0x07
FW_CFG_KERNEL_SIZE = 0x08
FW_CFG_KERNEL_CMDLINE = 0x09  # the old, pre-0x13 command-line address item
FW_CFG_INITRD_ADDR = 0x0A
FW_CFG_INITRD_SIZE = 0x0B
FW_CFG_BOOT_DEVICE = 0x0C
FW_CFG_NUMA = 0x0D
FW_CFG_BOOT_MENU = 0x0E
FW_CFG_MAX_CPUS = 0x0F
FW_CFG_KERNEL_ENTRY = 0x10
FW_CFG_KERNEL_DATA = 0x11
FW_CFG_INITRD_DATA = 0x12
FW_CFG_CMDLINE_ADDR = 0x13
FW_CFG_CMDLINE_SIZE = 0x14
FW_CFG_CMDLINE_DATA = 0x15
FW_CFG_SETUP_ADDR = 0x16
FW_CFG_SETUP_SIZE = 0x17
FW_CFG_SETUP_DATA = 0x18
FW_CFG_FILE_DIR = 0x19
FW_CFG_FILE_FIRST = 0x20

FW_CFG_WRITE_CHANNEL = 0x4000  # meaningless without write support; ignored on select
FW_CFG_ARCH_LOCAL = 0x8000  # a second key space for architecture items (e820, ACPI...)
FW_CFG_ENTRY_MASK = 0x3FFF
FW_CFG_KEY_MASK = FW_CFG_ARCH_LOCAL | FW_CFG_ENTRY_MASK

SIGNATURE = b"QEMU"
FW_CFG_VERSION = 0x01  # FW_CFG_ID bit 0: traditional interface
FW_CFG_VERSION_DMA = 0x02  # FW_CFG_ID bit 1: DMA interface (never set here)

# One directory entry: be32 size, be16 select, be16 reserved, char name[56].
FILE_NAME_SIZE = 56  # including the terminating NUL
FILE_ENTRY_SIZE = 4 + 2 + 2 + FILE_NAME_SIZE
MAX_FILES = FW_CFG_ENTRY_MASK - FW_CFG_FILE_FIRST + 1

U16_MAX = U16
U32_MAX = U32


class FwCfgState(Record):
    """The selected key and how far into its item the guest has read.

    The items themselves are configuration, built by the machine again.
    """

    VERSION: ClassVar[int] = 1
    key: int = bounded(0, U16)
    offset: int = bounded(0, U32)


def _u16(value: int) -> bytes:
    return value.to_bytes(2, "little")


def _u32(value: int) -> bytes:
    return value.to_bytes(4, "little")


class FwCfg:
    """The fw_cfg device; map at :data:`FW_CFG_PORT` with :data:`FW_CFG_PORTS` ports.

    ``ram_size`` is all guest RAM in bytes (below and above 4 GiB), reported
    as u64 at :data:`FW_CFG_RAM_SIZE`.  ``cpus`` and ``max_cpus`` (default:
    ``cpus``) are the u16 items :data:`FW_CFG_NB_CPUS` and
    :data:`FW_CFG_MAX_CPUS`.

    ``kernel``, ``initrd`` and ``cmdline`` add the ADDR/SIZE/DATA triples
    QEMU's ``-kernel``/``-initrd``/``-append`` produce (u32 ADDR and SIZE).
    The command line's DATA is NUL-terminated and its SIZE counts the NUL.
    The ADDR items tell firmware where to copy the data; this hypervisor
    copies nothing, so they default to 0 unless ``*_addr`` is given.

    Also present, as in QEMU: a zero UUID, NOGRAPHIC = 1 and BOOT_MENU = 0.
    No files exist until :meth:`add_file` adds them.

    Writes other than 16 bits and accesses outside the two ports (or wider
    than 8 bytes) are ignored and counted in ``ignored_accesses``.

    Host entry points (take the device lock): :meth:`add_item`,
    :meth:`add_file` and :meth:`item`.
    """

    def __init__(
        self,
        *,
        ram_size: int,
        cpus: int,
        max_cpus: int | None = None,
        cmdline: bytes | None = None,
        kernel: bytes | None = None,
        initrd: bytes | None = None,
        kernel_addr: int = 0,
        initrd_addr: int = 0,
        cmdline_addr: int = 0,
    ) -> None:
        if max_cpus is None:
            max_cpus = cpus
        if not 1 <= cpus <= max_cpus <= U16_MAX:
            raise ValueError(f"need 1 <= cpus ({cpus}) <= max_cpus ({max_cpus}) <= {U16_MAX}")
        if not 0 <= ram_size < 1 << 64:
            raise ValueError(f"ram_size {ram_size:#x} does not fit in 64 bits")
        self.ignored_accesses = 0
        self._items: dict[int, bytes] = {}
        # name -> (selector, data); the directory is rebuilt from it.
        self._files: dict[str, tuple[int, bytes]] = {}

        self._items[FW_CFG_SIGNATURE] = SIGNATURE
        self._items[FW_CFG_ID] = _u32(FW_CFG_VERSION)
        self._items[FW_CFG_UUID] = bytes(16)
        self._items[FW_CFG_RAM_SIZE] = ram_size.to_bytes(8, "little")
        self._items[FW_CFG_NOGRAPHIC] = _u16(1)
        self._items[FW_CFG_NB_CPUS] = _u16(cpus)
        self._items[FW_CFG_MAX_CPUS] = _u16(max_cpus)
        self._items[FW_CFG_BOOT_MENU] = _u16(0)
        if kernel is not None:
            self._add_blob(
                FW_CFG_KERNEL_ADDR, kernel_addr, FW_CFG_KERNEL_SIZE, FW_CFG_KERNEL_DATA, kernel
            )
        if initrd is not None:
            self._add_blob(
                FW_CFG_INITRD_ADDR, initrd_addr, FW_CFG_INITRD_SIZE, FW_CFG_INITRD_DATA, initrd
            )
        if cmdline is not None:
            if b"\0" in cmdline:
                raise ValueError("cmdline must not contain NUL bytes (one is appended)")
            self._add_blob(
                FW_CFG_CMDLINE_ADDR,
                cmdline_addr,
                FW_CFG_CMDLINE_SIZE,
                FW_CFG_CMDLINE_DATA,
                cmdline + b"\0",
            )
        self._items[FW_CFG_FILE_DIR] = self._directory()
        self._key = FW_CFG_SIGNATURE
        self._data = b""
        self._offset = 0
        self._select(FW_CFG_SIGNATURE)

    def _add_blob(
        self, addr_key: int, addr: int, size_key: int, data_key: int, data: bytes
    ) -> None:
        if not 0 <= addr <= U32_MAX:
            raise ValueError(f"load address {addr:#x} does not fit in 32 bits")
        if len(data) > U32_MAX:
            raise ValueError("fw_cfg items are limited to 4 GiB")
        self._items[addr_key] = _u32(addr)
        self._items[size_key] = _u32(len(data))
        self._items[data_key] = bytes(data)

    # Host side ------------------------------------------------------------

    def add_item(self, key: int, data: bytes) -> None:
        """Add (or replace) the numbered item ``key``, e.g. an arch-local table.

        Files go through :meth:`add_file`, so ``key`` may not be the directory,
        a file selector, or carry the write-channel bit.
        """
        if not 0 <= key <= U16_MAX or key & FW_CFG_WRITE_CHANNEL:
            raise ValueError(f"invalid fw_cfg key {key:#x}")
        if key == FW_CFG_FILE_DIR or (not key & FW_CFG_ARCH_LOCAL and key >= FW_CFG_FILE_FIRST):
            raise ValueError(f"fw_cfg key {key:#x} is managed by add_file")
        if len(data) > U32_MAX:
            raise ValueError("fw_cfg items are limited to 4 GiB")
        self._items[key] = bytes(data)

    def add_file(self, name: str, data: bytes) -> int:
        """Add a named file and return the selector that reads it."""
        encoded = name.encode()
        if not encoded or b"\0" in encoded:
            raise ValueError(f"invalid fw_cfg file name {name!r}")
        if len(encoded) >= FILE_NAME_SIZE:
            raise ValueError(f"fw_cfg file name {name!r} is longer than {FILE_NAME_SIZE - 1} bytes")
        if len(data) > U32_MAX:
            raise ValueError("fw_cfg items are limited to 4 GiB")
        if name in self._files:
            raise ValueError(f"duplicate fw_cfg file name {name!r}")
        if len(self._files) >= MAX_FILES:
            raise ValueError("no fw_cfg file selectors left")
        selector = FW_CFG_FILE_FIRST + len(self._files)
        self._files[name] = (selector, bytes(data))
        self._items[selector] = bytes(data)
        self._items[FW_CFG_FILE_DIR] = self._directory()
        return selector

    def item(self, key: int) -> bytes | None:
        """The contents of item ``key`` (files included), or None if absent."""
        return self._items.get(key & FW_CFG_KEY_MASK)

    def reset(self) -> None:
        """Select the signature again, as QEMU's device reset does."""
        self._select(FW_CFG_SIGNATURE)

    def state(self) -> FwCfgState:
        return FwCfgState(self._key, self._offset)

    def restore(self, state: FwCfgState) -> None:
        state = check_state("fw_cfg", state, FwCfgState)
        data = self._items.get(state.key & FW_CFG_KEY_MASK, b"")
        if state.offset > len(data):
            raise DeviceStateError(
                "fw_cfg", "offset", f"{state.offset} is past the {len(data)}-byte item"
            )
        self._select(state.key)
        self._offset = state.offset

    def _directory(self) -> bytes:
        # Sorted by the bytes of the name, like QEMU's strcmp.
        entries = sorted(self._files.items(), key=lambda item: item[0].encode())
        out = bytearray(len(entries).to_bytes(4, "big"))
        for name, (selector, data) in entries:
            out += len(data).to_bytes(4, "big")
            out += selector.to_bytes(2, "big")
            out += bytes(2)  # reserved
            out += name.encode().ljust(FILE_NAME_SIZE, b"\0")
        return bytes(out)

    # Guest side -----------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        """The next ``size`` bytes of the selected item, little-endian, 0 past its end."""
        if not access_fits(offset, size, FW_CFG_PORTS):
            self.ignored_accesses += 1
            return all_ones(size)
        chunk = self._data[self._offset : self._offset + size]
        self._offset += len(chunk)
        return int.from_bytes(chunk.ljust(size, b"\0"), "little")

    def write(self, offset: int, size: int, value: int) -> None:
        """A 16-bit write selects; anything else is a (dropped) data write."""
        if size == 2 and access_fits(offset, size, FW_CFG_PORTS):
            self._select(value & U16_MAX)
        else:
            self.ignored_accesses += 1

    def _select(self, key: int) -> None:
        self._key = key
        # An unknown key selects nothing, which reads as zeros.  The data is
        # captured now so that a file added meanwhile cannot shift the bytes.
        self._data = self._items.get(key & FW_CFG_KEY_MASK, b"")
        self._offset = 0
