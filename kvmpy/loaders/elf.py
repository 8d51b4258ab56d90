"""ELF executables: 32-bit (EM_386) and 64-bit (EM_X86_64), little-endian.

The loader reads the program headers only (sections are never needed to boot)
and turns every ``PT_LOAD`` segment into a ``LoadSegment``:

* Segments are placed at ``p_paddr``, as QEMU and GRUB do for kernels: a
  higher-half kernel links at a high ``p_vaddr`` and loads at a low ``p_paddr``.
  The zero fill ``p_memsz - p_filesz`` is a segment whose ``memsz`` exceeds its data.
* ``ET_EXEC`` and ``ET_DYN`` are accepted. An ``ET_DYN`` (PIE) image is placed
  at its link-time addresses and not relocated: at those addresses its
  relative relocations are already correct. A PIE linked at 0 therefore lands
  on the low-memory boot structures, which ``check_plan`` reports.
  ``ET_REL`` and ``ET_CORE`` files are refused, as is a ``PT_INTERP`` segment
  (a dynamically linked program needs a loader that kvmpy is not).
* ``e_entry`` is a virtual address. If it lies in the file-backed part of a
  ``PT_LOAD`` segment's virtual range, it is translated to that segment's
  physical address (as QEMU does when ``p_vaddr != p_paddr``); otherwise it
  must lie in the file-backed part of a segment's physical range (kernels that
  set ``e_entry`` to a physical address). Unlike QEMU, an entry that is in no
  segment is refused: the vCPU would start in unloaded or zero-filled memory.
* Validation is strict: magic, class, data encoding, both version fields,
  machine (and that it matches the class: x32 and EM_386-in-ELF64 are
  refused), header sizes (``e_ehsize``, ``e_phentsize`` must be the standard
  ones), ``e_phnum`` (no ``PN_XNUM`` extension), the program header table and
  every segment's file bytes inside the file, ``p_filesz <= p_memsz``, segment
  ends inside the address space (4 GiB for ELF32, 2**52 for ELF64), at most
  4 GiB of segments in all, no two ``PT_LOAD`` segments overlapping
  physically, and at least one non-empty ``PT_LOAD``. ``p_align`` is neither
  used nor checked. Segments with ``p_memsz == 0`` are skipped.

``mode`` is "protected" for ELF32 and "long" for ELF64; ``Machine.load`` may
override it.
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
import struct
from pathlib import Path

from kvmpy.loaders import LoaderError, LoadPlan, LoadSegment
from kvmpy.records import Record

ELF_MAGIC = b"\x7fELF"
ELFCLASS32 = 1
ELFCLASS64 = 2
ELFDATA2LSB = 1
EV_CURRENT = 1
ET_REL, ET_EXEC, ET_DYN, ET_CORE = 1, 2, 3, 4
EM_386 = 3
EM_X86_64 = 62
PT_LOAD = 1
PT_INTERP = 3
PF_X = 1
PN_XNUM = 0xFFFF

# Reading a file bigger than this whole would only waste host memory.
MAX_IMAGE_SIZE = 1 << 30
# How much read_image asks the kernel for at a time.
_READ_CHUNK = 1 << 20
# The sum of all segments' p_memsz; no guest of ours has more RAM for one image.
MAX_LOAD_SIZE = 4 << 30
# Where segments must end: 32-bit addresses, or x86's widest physical address.
ADDRESS_LIMIT = {ELFCLASS32: 1 << 32, ELFCLASS64: 1 << 52}

_EHDR = {
    ELFCLASS32: struct.Struct("<HHIIIIIHHHHHH"),
    ELFCLASS64: struct.Struct("<HHIQQQIHHHHHH"),
}
_PHDR32 = struct.Struct("<IIIIIIII")  # type offset vaddr paddr filesz memsz flags align
_PHDR64 = struct.Struct("<IIQQQQQQ")  # type flags offset vaddr paddr filesz memsz align
_IDENT_SIZE = 16
_TYPE_NAMES = {ET_REL: "ET_REL", ET_EXEC: "ET_EXEC", ET_DYN: "ET_DYN", ET_CORE: "ET_CORE"}
_MACHINE_NAMES = {EM_386: "EM_386", EM_X86_64: "EM_X86_64"}
_EXPECTED_MACHINE = {ELFCLASS32: EM_386, ELFCLASS64: EM_X86_64}


class ElfSegment(Record):
    """One ``PT_LOAD`` program header."""

    index: int
    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int
    flags: int


class ElfImage(Record):
    """The parts of a validated ELF file that loading needs."""

    elf_class: int  # ELFCLASS32 or ELFCLASS64
    elf_type: int  # ET_EXEC or ET_DYN
    machine: int  # EM_386 or EM_X86_64
    e_entry: int  # as written in the header (a virtual address)
    entry: int  # the physical entry point
    segments: tuple[ElfSegment, ...]  # the non-empty PT_LOAD segments, in file order


def is_elf(data: bytes) -> bool:
    """True when ``data`` starts with the ELF magic (nothing else is checked)."""
    return data[:4] == ELF_MAGIC


def _file_kind(mode: int) -> str:
    """What kind of file ``st_mode`` describes, in words."""
    if stat.S_ISREG(mode):
        return "regular file"
    if stat.S_ISFIFO(mode):
        return "pipe"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISCHR(mode):
        return "character device"
    if stat.S_ISBLK(mode):
        return "block device"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "special file"


def _check_kind(path: Path, mode: int, what: str) -> None:
    kind = _file_kind(mode)
    if kind == "directory":
        raise LoaderError(f"{path}: cannot read {what}: {os.strerror(errno.EISDIR)}")
    if kind not in ("regular file", "pipe"):
        # A device such as /dev/zero never ends and has no size to check first.
        raise LoaderError(
            f"{path}: cannot read {what}: it is a {kind}, not a regular file or a pipe"
        )


def read_image(path: str | Path, limit: int = MAX_IMAGE_SIZE, what: str = "image") -> bytes:
    """Read a whole regular file or pipe (``<(cmd)``, a FIFO) once, at most ``limit`` bytes.

    A regular file bigger than ``limit`` is refused before reading; a pipe is
    read until it ends or passes ``limit``.  Devices, directories and sockets
    are refused without being opened.
    """
    path = Path(path)
    try:
        _check_kind(path, os.stat(path).st_mode, what)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        raise LoaderError(f"{path}: cannot read {what}: {exc.strerror}") from None
    chunks: list[bytes] = []
    total = 0
    try:
        info = os.fstat(fd)  # what was opened: the path may have changed since stat()
        _check_kind(path, info.st_mode, what)
        if stat.S_ISREG(info.st_mode) and info.st_size > limit:
            raise LoaderError(
                f"{path}: {what} is {info.st_size} bytes, more than the {limit} allowed"
            )
        # Read at most one byte past the limit: a growing file or endless pipe is still capped.
        while total <= limit:
            chunk = os.read(fd, min(_READ_CHUNK, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError as exc:
        raise LoaderError(f"{path}: cannot read {what}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if total > limit:
        raise LoaderError(f"{path}: {what} is more than the {limit} bytes allowed")
    return b"".join(chunks)


def parse_elf(data: bytes, name: str = "<elf>") -> ElfImage:
    """Validate ``data`` as an x86 ELF executable; ``name`` goes into error messages."""

    def fail(message: str) -> LoaderError:
        return LoaderError(f"{name}: {message}")

    if len(data) < _IDENT_SIZE:
        raise fail(f"file is {len(data)} bytes, too short for an ELF header")
    if not is_elf(data):
        raise fail(f"e_ident magic {data[:4].hex()} is not 7f454c46 (\\x7fELF)")
    elf_class, encoding, ident_version = data[4], data[5], data[6]
    if elf_class not in _EHDR:
        raise fail(f"EI_CLASS {elf_class} is neither ELFCLASS32 (1) nor ELFCLASS64 (2)")
    if encoding != ELFDATA2LSB:
        raise fail(f"EI_DATA {encoding} is not ELFDATA2LSB (1): x86 images are little-endian")
    if ident_version != EV_CURRENT:
        raise fail(f"EI_VERSION {ident_version} is not EV_CURRENT (1)")
    ehdr = _EHDR[elf_class]
    ehdr_size = _IDENT_SIZE + ehdr.size
    if len(data) < ehdr_size:
        raise fail(f"file is {len(data)} bytes, too short for the {ehdr_size}-byte ELF header")
    (
        e_type,
        e_machine,
        e_version,
        e_entry,
        e_phoff,
        _e_shoff,
        _e_flags,
        e_ehsize,
        e_phentsize,
        e_phnum,
        _e_shentsize,
        _e_shnum,
        _e_shstrndx,
    ) = ehdr.unpack_from(data, _IDENT_SIZE)
    bits = 32 if elf_class == ELFCLASS32 else 64

    if e_type not in (ET_EXEC, ET_DYN):
        kind = _TYPE_NAMES.get(e_type, "unknown")
        raise fail(f"e_type {e_type:#x} ({kind}) is not an executable (expected ET_EXEC or ET_DYN)")
    if e_machine not in _MACHINE_NAMES:
        raise fail(f"e_machine {e_machine:#x} is not x86 (expected EM_386 or EM_X86_64)")
    if e_machine != _EXPECTED_MACHINE[elf_class]:
        expected = _MACHINE_NAMES[_EXPECTED_MACHINE[elf_class]]
        raise fail(
            f"e_machine {e_machine:#x} ({_MACHINE_NAMES[e_machine]}) does not match "
            f"ELFCLASS{bits} (expected {expected})"
        )
    if e_version != EV_CURRENT:
        raise fail(f"e_version {e_version} is not EV_CURRENT (1)")
    if e_ehsize != ehdr_size:
        raise fail(f"e_ehsize {e_ehsize} is not {ehdr_size}, the ELF{bits} header size")

    phdr = _PHDR32 if elf_class == ELFCLASS32 else _PHDR64
    if e_phnum == 0:
        raise fail("e_phnum is 0: no program headers, nothing to load")
    if e_phnum == PN_XNUM:
        raise fail(f"e_phnum {PN_XNUM:#x} (PN_XNUM, count in section 0) is not supported")
    if e_phentsize != phdr.size:
        raise fail(f"e_phentsize {e_phentsize} is not {phdr.size}, the ELF{bits} size")
    if e_phoff < ehdr_size:
        raise fail(f"e_phoff {e_phoff:#x} points into the ELF header")
    table_end = e_phoff + e_phnum * e_phentsize
    if table_end > len(data):
        raise fail(
            f"program headers at e_phoff {e_phoff:#x} ({e_phnum} x {e_phentsize} bytes) end at "
            f"{table_end:#x}, past the end of the file ({len(data):#x} bytes)"
        )

    limit = ADDRESS_LIMIT[elf_class]
    segments: list[ElfSegment] = []
    total = 0
    for index in range(e_phnum):
        fields = phdr.unpack_from(data, e_phoff + index * e_phentsize)
        if elf_class == ELFCLASS32:
            p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_flags, _p_align = fields
        else:
            p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, _p_align = fields
        where = f"program header {index}"
        if p_type == PT_INTERP:
            raise fail(f"{where} is PT_INTERP: a dynamically linked program, not a kernel")
        if p_type != PT_LOAD:
            continue
        where += " (PT_LOAD)"
        if p_filesz > p_memsz:
            raise fail(f"{where}: p_filesz {p_filesz:#x} is larger than p_memsz {p_memsz:#x}")
        if p_offset + p_filesz > len(data):
            raise fail(
                f"{where}: p_offset {p_offset:#x} + p_filesz {p_filesz:#x} extends past the end "
                f"of the file ({len(data):#x} bytes)"
            )
        if p_memsz == 0:
            continue
        if p_paddr + p_memsz > limit:
            raise fail(
                f"{where}: p_paddr {p_paddr:#x} + p_memsz {p_memsz:#x} ends beyond the "
                f"{bits}-bit limit {limit:#x}"
            )
        if p_vaddr + p_memsz > 1 << bits:
            raise fail(
                f"{where}: p_vaddr {p_vaddr:#x} + p_memsz {p_memsz:#x} wraps around the "
                f"{bits}-bit address space"
            )
        total += p_memsz
        if total > MAX_LOAD_SIZE:
            raise fail(
                f"{where}: p_memsz {p_memsz:#x} brings the segments to {total:#x} bytes, "
                f"more than the {MAX_LOAD_SIZE:#x} allowed"
            )
        segments.append(ElfSegment(index, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_flags))

    if not segments:
        raise fail("no PT_LOAD segment with p_memsz > 0: nothing to load")
    ordered = sorted(segments, key=lambda s: s.paddr)
    for low, high in itertools.pairwise(ordered):
        if high.paddr < low.paddr + low.memsz:
            raise fail(
                f"program headers {low.index} and {high.index} overlap: p_paddr "
                f"{low.paddr:#x}-{low.paddr + low.memsz - 1:#x} and "
                f"{high.paddr:#x}-{high.paddr + high.memsz - 1:#x}"
            )

    return ElfImage(
        elf_class=elf_class,
        elf_type=e_type,
        machine=e_machine,
        e_entry=e_entry,
        entry=_physical_entry(name, e_entry, segments),
        segments=tuple(segments),
    )


def _physical_entry(name: str, e_entry: int, segments: list[ElfSegment]) -> int:
    """Translate ``e_entry`` to a physical address inside a segment's file bytes."""
    for seg in segments:
        if seg.vaddr <= e_entry < seg.vaddr + seg.filesz:
            return seg.paddr + (e_entry - seg.vaddr)
    for seg in segments:
        if seg.paddr <= e_entry < seg.paddr + seg.filesz:
            return e_entry
    raise LoaderError(
        f"{name}: e_entry {e_entry:#x} is not inside the file-backed part of any PT_LOAD "
        f"segment (virtual or physical)"
    )


def load_elf(path: str | Path, data: bytes | None = None) -> LoadPlan:
    """Plan to load the ELF executable at ``path`` (or ``data``, named ``path``)."""
    name = str(path)
    if data is None:
        data = read_image(path, what="ELF image")
    image = parse_elf(data, name)
    return LoadPlan(
        source=name,
        entry=image.entry,
        segments=[
            LoadSegment(seg.paddr, data[seg.offset : seg.offset + seg.filesz], seg.memsz)
            for seg in image.segments
        ],
        mode="protected" if image.elf_class == ELFCLASS32 else "long",
    )
