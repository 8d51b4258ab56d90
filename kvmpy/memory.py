"""Guest physical memory: RAM regions backed by anonymous mmaps.

Every access is bounds-checked against the regions, because addresses often
come from the guest, which is untrusted: an out-of-range access raises
``GuestMemoryError`` and never touches host memory outside a region.
"""

from __future__ import annotations

import contextlib
import mmap
from collections.abc import Iterator

from kvmpy.records import Record, field

# Where the PCI/MMIO hole below 4 GiB starts: RAM beyond this goes above 4 GiB.
LOW_RAM_END = 0xC000_0000
HIGH_RAM_START = 0x1_0000_0000
PAGE_SIZE = 0x1000
# The most guest RAM kvmpy will map (1 TiB): far beyond any test guest, and far
# below the 128 TiB of address space a process has, so that a typo such as
# 100000G gets a clear refusal rather than a failed mmap.
MAX_RAM_SIZE = 1 << 40
# zero() compares file-backed RAM with this many zero bytes at a time.
_ZERO_CHUNK = bytes(1 << 20)


_SIZE_UNITS = {"B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def pc_ram_layout(size: int) -> list[tuple[int, int]]:
    """RAM of ``size`` bytes as a PC lays it out: from 0, and above 4 GiB past the hole."""
    low = min(size, LOW_RAM_END)
    regions = [(0, low)]
    if size > low:
        regions.append((HIGH_RAM_START, size - low))
    return regions


class GuestMemoryError(ValueError):
    """A guest-physical access outside RAM."""


def parse_size(text: str | int) -> int:
    """A size in bytes from "128M", "1G", "64K", "100B" or a bare number of MiB.

    As QEMU's ``-m``: a number without a unit ("128", "0x80", or a TOML
    integer) means MiB; bytes need the explicit unit "B".  K, M and G may
    be followed by "B" or "iB" (all binary).
    """
    if isinstance(text, int) and not isinstance(text, bool):
        text = str(text)
    if not isinstance(text, str):
        raise ValueError(f"not a size: {text!r} (try 128M or 1G)")
    value = text.strip().upper()
    try:
        # A bare number first, so that "0x1B" is 0x1B MiB and not 0x1 with a "B" suffix.
        amount, unit = int(value, 0), "M"
    except ValueError:
        if value[-3:-2] in ("K", "M", "G") and value.endswith("IB"):
            value = value[:-2]  # "64MiB" -> "64M"
        elif value[-2:-1] in ("K", "M", "G") and value.endswith("B"):
            value = value[:-1]  # "64MB" -> "64M"
        unit = value[-1:]
        try:
            if unit not in _SIZE_UNITS:
                raise ValueError(unit)
            amount = int(value[:-1], 0)
        except ValueError:
            raise ValueError(f"not a size: {text!r} (try 128M or 1G)") from None
    if amount <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return amount * _SIZE_UNITS[unit]


class MemoryRegion(Record, frozen=False):
    """A contiguous range of guest RAM and the host mapping behind it."""

    gpa: int
    size: int
    mapping: mmap.mmap = field(repr=False)
    view: memoryview = field(repr=False)
    # A copy-on-write map of a file (a snapshot's memory.bin), not anonymous memory.
    file_backed: bool = False

    @property
    def end(self) -> int:
        return self.gpa + self.size


class GuestMemory:
    """Guest RAM as a set of non-overlapping regions."""

    def __init__(self) -> None:
        self.regions: list[MemoryRegion] = []
        self.map_flags = 0

    @classmethod
    def with_ram(
        cls,
        size: int,
        backing: int | None = None,
        map_flags: int = 0,
        layout: list[tuple[int, int]] | None = None,
    ) -> GuestMemory:
        """RAM of ``size`` bytes in the standard PC layout (split around the MMIO hole).

        With ``backing`` (a file descriptor of a ``size``-byte file holding the
        regions end to end, as a snapshot's memory.bin does), RAM starts as a
        copy-on-write view of that file: nothing is copied until written.
        ``map_flags`` are extra mmap flags from the backend (MAP_NORESERVE:
        guest RAM is sparse and must not reserve swap for all of itself;
        Python's mmap module only names it from 3.13).  ``layout`` is the
        board's (gpa, size) regions; the default is the PC's.
        """
        if size <= 0 or size % PAGE_SIZE:
            raise GuestMemoryError(f"RAM size must be a positive multiple of 4 KiB, not {size:#x}")
        if size > MAX_RAM_SIZE:
            raise GuestMemoryError(
                f"RAM size {size:#x} is more than the {MAX_RAM_SIZE >> 30} GiB kvmpy allows"
            )
        memory = cls()
        memory.map_flags = map_flags
        offset = 0
        try:
            for gpa, length in layout or pc_ram_layout(size):
                memory.add_region(gpa, length, backing, offset)
                offset += length
        except BaseException:
            memory.close()
            raise
        return memory

    @property
    def size(self) -> int:
        return sum(region.size for region in self.regions)

    def add_region(
        self, gpa: int, size: int, backing: int | None = None, offset: int = 0
    ) -> MemoryRegion:
        """RAM at ``gpa``: anonymous, or a copy-on-write map of ``backing`` at ``offset``."""
        if gpa < 0:
            raise GuestMemoryError(f"region {gpa:#x}+{size:#x} has a negative address")
        if gpa % PAGE_SIZE or size <= 0 or size % PAGE_SIZE:
            raise GuestMemoryError(f"region {gpa:#x}+{size:#x} is not page-aligned")
        for other in self.regions:
            if gpa < other.end and other.gpa < gpa + size:
                raise GuestMemoryError(f"region {gpa:#x}+{size:#x} overlaps {other.gpa:#x}")
        try:
            if backing is None:
                flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | self.map_flags
                mapping = mmap.mmap(-1, size, flags=flags)
            else:
                mapping = mmap.mmap(
                    backing,
                    size,
                    flags=mmap.MAP_PRIVATE | self.map_flags,
                    prot=mmap.PROT_READ | mmap.PROT_WRITE,
                    offset=offset,
                )
        except (OSError, OverflowError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise GuestMemoryError(
                f"cannot map {size >> 20} MiB of guest RAM at {gpa:#x}: {reason}"
            ) from None
        region = MemoryRegion(gpa, size, mapping, memoryview(mapping), backing is not None)
        self.regions.append(region)
        self.regions.sort(key=lambda r: r.gpa)
        return region

    def __iter__(self) -> Iterator[MemoryRegion]:
        return iter(self.regions)

    def remap_page(self, gpa: int) -> bool:
        """Make the host re-create its mapping of the RAM page at ``gpa``, keeping its content.

        Changing the page's protection to read-only and back makes the kernel
        drop its page-table entry, and KVM's MMU notifier drops the guest's
        (EPT or shadow) entry with it, so the guest's next access faults in a
        fresh one: what QEMU's pc-testdev flush port does with mprotect.
        Read-only rather than QEMU's no-access, so host threads reading guest
        memory meanwhile cannot fault.  False if ``gpa`` is not RAM.
        """
        import ctypes  # here: only pc-testdev's flush port needs it (start-up time)

        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        for region in self.regions:
            if region.gpa <= gpa < region.end:
                offset = (gpa - region.gpa) & ~(PAGE_SIZE - 1)
                anchor = ctypes.c_char.from_buffer(region.mapping)
                try:
                    address = ctypes.addressof(anchor) + offset
                finally:
                    del anchor  # release the buffer export: the mapping may be closed later
                page = ctypes.c_void_p(address)
                libc.mprotect(page, PAGE_SIZE, mmap.PROT_READ)
                libc.mprotect(page, PAGE_SIZE, mmap.PROT_READ | mmap.PROT_WRITE)
                return True
        return False

    def close(self) -> None:
        regions = list(self.regions)
        self.regions.clear()
        for region in regions:
            region.view.release()
            # A view from view() that the caller still holds keeps the mapping
            # alive; it is unmapped when the last such view goes.
            with contextlib.suppress(BufferError):
                region.mapping.close()

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- bounds-checked access -------------------------------------------------------

    def contains(self, gpa: int, length: int = 1) -> bool:
        if length < 0:
            return False
        return any(r.gpa <= gpa and gpa + length <= r.end for r in self.regions)

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable view of ``length`` bytes at ``gpa``, which must lie in one region."""
        if length < 0 or gpa < 0:
            raise GuestMemoryError(f"bad guest access {gpa:#x}+{length:#x}")
        for region in self.regions:
            if region.gpa <= gpa and gpa + length <= region.end:
                start = gpa - region.gpa
                return region.view[start : start + length]
        raise GuestMemoryError(f"guest physical range {gpa:#x}+{length:#x} is not in RAM")

    def zero(self, gpa: int, length: int) -> None:
        """Set ``length`` bytes at ``gpa`` (in one region) to zero without committing host RAM.

        RAM is never assumed fresh (a reboot in place or a restore leaves data
        behind), so every byte is cleared, but whole pages are discarded rather
        than written: in anonymous RAM, MADV_DONTNEED gives them back and they
        read as zero again.  In a snapshot's copy-on-write file map the same
        call would bring back the file's bytes, so there a page is written only
        when it is not already zero; pages that are (the file's holes, mostly)
        stay shared with the page cache.  Partial pages at either end are written.
        """
        if length == 0:
            return
        self.view(gpa, length).release()  # checks that the range lies in one region
        region = next(r for r in self.regions if r.gpa <= gpa and gpa + length <= r.end)
        start = gpa - region.gpa
        end = start + length
        first_page = -(-start // PAGE_SIZE) * PAGE_SIZE
        last_page = end // PAGE_SIZE * PAGE_SIZE
        if first_page >= last_page:
            region.view[start:end] = bytes(length)
            return
        region.view[start:first_page] = bytes(first_page - start)
        region.view[last_page:end] = bytes(end - last_page)
        if not region.file_backed:
            region.mapping.madvise(mmap.MADV_DONTNEED, first_page, last_page - first_page)
            return
        zero_page = _ZERO_CHUNK[:PAGE_SIZE]
        for chunk in range(first_page, last_page, len(_ZERO_CHUNK)):
            chunk_end = min(chunk + len(_ZERO_CHUNK), last_page)
            # Slicing the mmap copies into bytes, whose comparison is a memcmp.
            if region.mapping[chunk:chunk_end] == _ZERO_CHUNK[: chunk_end - chunk]:
                continue
            for page in range(chunk, chunk_end, PAGE_SIZE):
                if region.mapping[page : page + PAGE_SIZE] != zero_page:
                    region.view[page : page + PAGE_SIZE] = zero_page

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self.view(gpa, len(data))[:] = data

    def read_int(self, gpa: int, size: int) -> int:
        return int.from_bytes(self.view(gpa, size), "little")

    def write_int(self, gpa: int, size: int, value: int) -> None:
        self.view(gpa, size)[:] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def read_u8(self, gpa: int) -> int:
        return self.read_int(gpa, 1)

    def read_u16(self, gpa: int) -> int:
        return self.read_int(gpa, 2)

    def read_u32(self, gpa: int) -> int:
        return self.read_int(gpa, 4)

    def read_u64(self, gpa: int) -> int:
        return self.read_int(gpa, 8)

    def write_u8(self, gpa: int, value: int) -> None:
        self.write_int(gpa, 1, value)

    def write_u16(self, gpa: int, value: int) -> None:
        self.write_int(gpa, 2, value)

    def write_u32(self, gpa: int, value: int) -> None:
        self.write_int(gpa, 4, value)

    def write_u64(self, gpa: int, value: int) -> None:
        self.write_int(gpa, 8, value)
