"""PVH boot: the Xen PHYS32_ENTRY note, hvm_start_info, and a PVH guest."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest

from kvmpy.loaders import LoaderError
from kvmpy.loaders.detect import detect_format
from kvmpy.loaders.pvh import HVM_START_MAGIC, START_INFO_ADDR, load_pvh, pvh_entry
from tests.helpers import ROOT, guest

RAM = [(0, 32 << 20)]


def build(tmp_path: Path, note: str, text_address: int = 0x100000) -> Path:
    """A small ELF32 kernel with ``note`` (assembler) in its .note.Xen section."""
    src, obj, elf = tmp_path / "k.S", tmp_path / "k.o", tmp_path / "k.elf"
    src.write_text(
        '.section .note.Xen, "a"\n.align 4\n' + note + "\n"
        ".code32\n.text\n.globl _start\n_start:\nentry:\nnop\nhlt\n"
    )
    subprocess.run(["as", "--32", "-o", str(obj), str(src)], check=True)
    subprocess.run(
        ["ld", "-m", "elf_i386", f"-Ttext={text_address:#x}", "-o", str(elf), str(obj)], check=True
    )
    return elf


PHYS32_NOTE = '.long 4\n.long 4\n.long 18\n.asciz "Xen"\n.long entry'


def test_entry_comes_from_the_note(tmp_path: Path) -> None:
    elf = build(tmp_path, PHYS32_NOTE)
    assert pvh_entry(elf.read_bytes()) == 0x100000
    assert detect_format(elf) == "pvh"


def test_an_elf_without_the_note_is_plain_elf(tmp_path: Path) -> None:
    elf = build(tmp_path, '.long 4\n.long 4\n.long 17\n.asciz "Xen"\n.long 0')
    assert pvh_entry(elf.read_bytes()) is None
    assert detect_format(elf) == "elf"
    with pytest.raises(LoaderError, match="no Xen PHYS32_ENTRY note"):
        load_pvh(elf, ram=RAM)


def test_a_bad_descriptor_size_is_refused(tmp_path: Path) -> None:
    elf = build(tmp_path, '.long 4\n.long 2\n.long 18\n.asciz "Xen"\n.short 0\n.short 0')
    with pytest.raises(LoaderError, match="PHYS32_ENTRY note has 2 bytes"):
        pvh_entry(elf.read_bytes(), str(elf))


def test_start_info_layout(tmp_path: Path) -> None:
    plan = load_pvh(build(tmp_path, PHYS32_NOTE), ram=RAM, cmdline="quiet", rsdp=0xE0000)
    assert (plan.entry, plan.mode, plan.registers) == (0x100000, "protected", {"rbx": 0x9000})
    info = next(s for s in plan.segments if s.gpa == START_INFO_ADDR).data
    magic, version, _, modules, _, cmdline, rsdp, memmap, entries, _ = struct.unpack_from(
        "<IIIIQQQQII", info
    )
    assert (magic, version, modules, rsdp) == (HVM_START_MAGIC, 1, 0, 0xE0000)
    table = [struct.unpack_from("<QQII", info, memmap - START_INFO_ADDR + 24 * i)[:3]
             for i in range(entries)]  # fmt: skip
    assert table == [
        (0, 0x9FC00, 1),
        (0x9FC00, 0x400, 2),
        (0xF0000, 0x10000, 2),
        (0x100000, 31 << 20, 1),
    ]
    assert info[cmdline - START_INFO_ADDR :].split(b"\0")[0] == b"quiet"
    assert plan.reserved == [(START_INFO_ADDR, START_INFO_ADDR + len(info))]


def test_a_kernel_over_the_start_info_is_refused(tmp_path: Path) -> None:
    with pytest.raises(LoaderError, match="overlaps the PVH start info"):
        load_pvh(build(tmp_path, PHYS32_NOTE, text_address=0x9000), ram=RAM)


@pytest.mark.kvm
def test_pvh_guest_like_under_qemu() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kvmpy", "run", str(guest("pvh_hello", ".elf")), "--append",
         "console=ttyS0"],
        capture_output=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert result.stdout == (
        b"Hello from a PVH kernel! command line: console=ttyS0\nmemory map entries: 4\n"
    )
