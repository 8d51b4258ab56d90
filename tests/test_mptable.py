"""Intel MP tables: their bytes, and a guest that finds its CPUs through them."""

from __future__ import annotations

import struct

import pytest

from kvmpy.loaders.flat import load_flat
from kvmpy.machine import Machine
from kvmpy.x86.layout import IOAPIC_ADDR, LAPIC_ADDR, MP_TABLE_ADDR
from kvmpy.x86.mptable import mp_tables
from tests.helpers import Assembler


def parse(blob: bytes) -> tuple[tuple[int, ...], list[tuple[int, bytes]]]:
    """The floating pointer's fields and the table's (type, entry) list."""
    pointer = struct.unpack_from("<4sIBBB5B", blob, 0)
    assert pointer[0] == b"_MP_" and sum(blob[:16]) % 256 == 0
    table = blob[pointer[1] - MP_TABLE_ADDR :]
    signature, length, revision, _, _, _, _, _, count, lapic = struct.unpack_from(
        "<4sHBB8s12sIHHI", table
    )
    assert (signature, revision, lapic) == (b"PCMP", 4, LAPIC_ADDR)
    assert sum(table[:length]) % 256 == 0
    entries, at = [], 44
    for _ in range(count):
        size = 20 if table[at] == 0 else 8
        entries.append((table[at], table[at : at + size]))
        at += size
    assert at == length
    return pointer, entries


def test_tables_for_four_cpus() -> None:
    pointer, entries = parse(mp_tables(4, 0x000806F8, 0x178BFBFF))
    assert pointer[1] == MP_TABLE_ADDR + 16
    processors = [struct.unpack("<BBBBII8x", e) for t, e in entries if t == 0]
    assert [(p[1], p[3]) for p in processors] == [(0, 3), (1, 1), (2, 1), (3, 1)]
    assert processors[0][4:] == (0x000806F8, 0x178BFBFF)
    (ioapic,) = [struct.unpack("<BBBBI", e) for t, e in entries if t == 2]
    assert ioapic == (2, 4, 0x11, 1, IOAPIC_ADDR)
    routes = [struct.unpack("<BBHBBBB", e) for t, e in entries if t == 3]
    assert [(r[4], r[5], r[6]) for r in routes] == [(i, 4, i) for i in range(16) if i != 2]
    assert [e[1] for t, e in entries if t == 4] == [3, 1]  # ExtINT, NMI


def test_irq0_on_pin2_moves_only_the_timer() -> None:
    _, entries = parse(mp_tables(1, 0, 0, irq0_on_pin2=True))
    routes = [struct.unpack("<BBHBBBB", e) for t, e in entries if t == 3]
    assert [(r[4], r[6]) for r in routes] == [(0, 2), (1, 1)] + [(i, i) for i in range(3, 16)]


def test_cpu_count_is_checked() -> None:
    with pytest.raises(ValueError, match="1 to 254 CPUs"):
        mp_tables(0, 0, 0)


@pytest.mark.kvm
def test_a_guest_counts_its_cpus_in_the_mp_table(assemble: Assembler) -> None:
    # Real mode: scan F000:0000-FFFF for "_MP_", follow it to "PCMP" and count
    # the processor entries, then print the count.
    source = """
        mov $0xf000, %ax
        mov %ax, %es
        xor %di, %di
    1:  cmpl $0x5f504d5f, %es:(%di)
        je 2f
        add $16, %di
        jnz 1b
        jmp fail
    2:  mov %es:4(%di), %ebx
        sub $0xf0000, %ebx
        mov %bx, %si
        cmpl $0x504d4350, %es:(%si)
        jne fail
        mov %es:34(%si), %cx
        add $44, %si
        xor %dl, %dl
    3:  cmpb $0, %es:(%si)
        jne 4f
        inc %dl
        add $12, %si
    4:  add $8, %si
        loop 3b
        mov %dl, %al
        add $'0', %al
        mov $0x3f8, %dx
        out %al, %dx
        mov $0, %al
        out %al, $0xf4
    fail:
        mov $1, %al
        out %al, $0xf4
    """
    with Machine(mem_size=16 << 20, cpus=3) as m:
        m.load(load_flat(assemble(source), 0x7C00), mode="real")
        outcome = m.run(timeout=30)
        assert (outcome.exit_code, bytes(m.console)) == (0, b"3")
