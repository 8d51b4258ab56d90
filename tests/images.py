"""Small valid images of every format, built in Python (no assembler): for fuzzing and
for the loaders' hardening tests."""

from __future__ import annotations

import struct

LOAD_ADDR = 0x100000
CODE = b"\xfa\xf4\xeb\xfd"  # cli; hlt; jmp back to the hlt

MULTIBOOT_MAGIC = 0x1BADB002
AOUT_KLUDGE = 1 << 16
PT_LOAD, PT_NOTE = 1, 4
XEN_ELFNOTE_PHYS32_ENTRY = 18


def elf32(
    code: bytes = CODE, *, memsz: int | None = None, notes: bytes = b"", paddr: int = LOAD_ADDR
) -> bytes:
    """An ELF32 (EM_386) executable: one PT_LOAD of the whole file at ``paddr``, entered at
    ``code``; with ``notes``, a PT_NOTE over them too."""
    phnum = 2 if notes else 1
    code_at = 52 + 32 * phnum
    notes_at = code_at + len(code)
    size = notes_at + len(notes)
    ehdr = (
        b"\x7fELF\x01\x01\x01"
        + bytes(9)
        + struct.pack("<HHIIIIIHHHHHH", 2, 3, 1, paddr + code_at, 52, 0, 0, 52, 32, phnum, 40, 0, 0)
    )
    load = struct.pack(
        "<IIIIIIII", PT_LOAD, 0, paddr, paddr, size, size if memsz is None else memsz, 5, 0x1000
    )
    note = struct.pack("<IIIIIIII", PT_NOTE, notes_at, 0, 0, len(notes), len(notes), 4, 4)
    return ehdr + load + (note if notes else b"") + code + notes


def elf64(code: bytes = CODE, *, memsz: int | None = None, paddr: int = LOAD_ADDR) -> bytes:
    """An ELF64 (EM_X86_64) executable: one PT_LOAD of the whole file, entered at ``code``."""
    code_at = 64 + 56
    size = code_at + len(code)
    ehdr = (
        b"\x7fELF\x02\x01\x01"
        + bytes(9)
        + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, paddr + code_at, 64, 0, 0, 64, 56, 1, 64, 0, 0)
    )
    load = struct.pack(
        "<IIQQQQQQ", PT_LOAD, 5, 0, paddr, paddr, size, size if memsz is None else memsz, 0x1000
    )
    return ehdr + load + code


def xen_entry_note(entry: int) -> bytes:
    """A "Xen" PHYS32_ENTRY ELF note naming ``entry``."""
    return struct.pack("<III", 4, 4, XEN_ELFNOTE_PHYS32_ENTRY) + b"Xen\0" + struct.pack("<I", entry)


def pvh() -> bytes:
    """An ELF32 PVH kernel whose note points at its code."""
    code_at = 52 + 32 * 2
    return elf32(notes=xen_entry_note(LOAD_ADDR + code_at))


def multiboot_aout(code: bytes = CODE, *, bss: int = 0x1000) -> bytes:
    """A multiboot kernel with the a.out kludge: header and code loaded at LOAD_ADDR."""
    flags = AOUT_KLUDGE
    header_size = 32
    load_end = LOAD_ADDR + header_size + len(code)
    header = struct.pack(
        "<IIIIIIII",
        MULTIBOOT_MAGIC,
        flags,
        -(MULTIBOOT_MAGIC + flags) & 0xFFFFFFFF,
        LOAD_ADDR,  # header_addr
        LOAD_ADDR,  # load_addr
        load_end,
        load_end + bss,
        LOAD_ADDR + header_size,  # entry
    )
    return header + code


def multiboot_elf() -> bytes:
    """A multiboot kernel that is an ELF32 (no a.out kludge): the header sits in its code."""
    header = struct.pack("<III", MULTIBOOT_MAGIC, 0, -MULTIBOOT_MAGIC & 0xFFFFFFFF)
    return elf32(CODE + header)


def flat() -> bytes:
    return b"\xfa\xf4" * 8


def bzimage(code: bytes = CODE) -> bytes:
    """A Linux boot protocol 2.15 image: one setup sector with the header, then ``code``
    at the 64-bit entry (+0x200); relocatable, 2 MiB-aligned, init_size 64 KiB."""
    setup = bytearray(2 * 512)
    setup[0x1F1] = 1  # setup_sects
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)
    setup[0x200:0x206] = b"\xeb\x66HdrS"
    struct.pack_into("<H", setup, 0x206, 0x20F)
    setup[0x211] = 0x01  # LOADED_HIGH
    struct.pack_into("<III", setup, 0x22C, 0x7FFFFFFF, 0x200000, 0)  # initrd max, alignment
    setup[0x234] = 1  # relocatable
    struct.pack_into("<HI", setup, 0x236, 0x03, 255)  # xloadflags, cmdline_size
    struct.pack_into("<QI", setup, 0x258, 0x1000000, 0x10000)  # pref_address, init_size
    return bytes(setup) + b"\x90" * 0x200 + code


# name -> (bytes, format detection should find)
IMAGES = {
    "flat.bin": (flat(), "flat"),  # flat by its name: it has no header
    "bzimage": (bzimage(), "bzimage"),
    "elf32": (elf32(), "elf"),
    "elf64": (elf64(), "elf"),
    "multiboot-aout": (multiboot_aout(), "multiboot"),
    "multiboot-elf": (multiboot_elf(), "multiboot"),
    "pvh": (pvh(), "pvh"),
}
