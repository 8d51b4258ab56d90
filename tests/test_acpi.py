"""ACPI tables: their bytes, and a guest that finds its CPUs and powers off through them."""

from __future__ import annotations

import struct

import pytest

from kvmpy.devices.acpi_pm import PM1A_CNT_PORT, AcpiPmEvent
from kvmpy.loaders.flat import load_flat
from kvmpy.machine import Machine
from kvmpy.x86.acpi import acpi_tables
from kvmpy.x86.layout import ACPI_TABLES_ADDR, IOAPIC_ADDR
from tests.helpers import Assembler


def tables(cpus: int, irq0_on_pin2: bool = False) -> dict[bytes, bytes]:
    """Every table reachable from the RSDP, by signature, each checksum verified."""
    image = acpi_tables(cpus, irq0_on_pin2=irq0_on_pin2)

    def at(address: int) -> bytes:
        return image[address - ACPI_TABLES_ADDR :]

    assert image[:8] == b"RSD PTR " and sum(image[:20]) % 256 == 0
    (rsdt_address,) = struct.unpack_from("<I", image, 16)
    found = {}

    def table(address: int) -> bytes:
        data = at(address)
        length = struct.unpack_from("<I", data, 4)[0]
        assert sum(data[:length]) % 256 == 0, data[:4]
        return data[:length]

    rsdt = table(rsdt_address)
    for (pointer,) in struct.iter_unpack("<I", rsdt[36:]):
        found[table(pointer)[:4]] = table(pointer)
    fadt = found[b"FACP"]
    facs_address, dsdt_address = struct.unpack_from("<II", fadt, 36)
    found[b"DSDT"] = table(dsdt_address)
    found[b"FACS"] = at(facs_address)[:64]
    assert facs_address % 64 == 0
    return found


def test_madt_lists_every_cpu_and_the_ioapic() -> None:
    madt = tables(4)[b"APIC"]
    entries, at = [], 44
    while at < len(madt):
        entries.append(madt[at : at + madt[at + 1]])
        at += madt[at + 1]
    cpus = [struct.unpack("<BBBBI", e) for e in entries if e[0] == 0]
    assert [(c[3], c[4]) for c in cpus] == [(i, 1) for i in range(4)]
    (ioapic,) = [struct.unpack("<BBBBII", e) for e in entries if e[0] == 1]
    assert ioapic == (1, 12, 4, 0, IOAPIC_ADDR, 0)


def test_fadt_points_at_the_power_off_register_and_dsdt_has_s5() -> None:
    found = tables(1)
    fadt = found[b"FACP"]
    assert len(fadt) == 116
    assert struct.unpack_from("<H", fadt, 46)[0] == 9  # SCI
    assert struct.unpack_from("<II", fadt, 56) == (0x600, 0)  # PM1a/PM1b event blocks
    assert struct.unpack_from("<I", fadt, 64)[0] == PM1A_CNT_PORT
    assert fadt[89] == 2  # PM1 control block length
    assert b"_S5_" in found[b"DSDT"]
    assert found[b"FACS"][:4] == b"FACS"


def test_pm1_event_status_is_write_one_to_clear() -> None:
    events = AcpiPmEvent()
    events.registers[0] = 0x21
    events.write(0, 2, 0x0001)
    assert events.read(0, 2) == 0x20
    events.write(2, 2, 0x0120)
    assert events.read(2, 2) == 0x0120


@pytest.mark.kvm
def test_a_guest_finds_its_cpus_and_powers_off_through_acpi(assemble: Assembler) -> None:
    # Real mode: find "RSD PTR " in E000:0000-FFFF, walk the RSDT; count the
    # MADT's local APICs and print the count; write SLP_EN to the FADT's
    # PM1a control block.
    source = """
        mov $0xe000, %ax
        mov %ax, %es
        xor %di, %di
    1:  cmpl $0x20445352, %es:(%di)      /* "RSD " */
        jne 2f
        cmpl $0x20525450, %es:4(%di)     /* "PTR " */
        je 3f
    2:  add $16, %di
        jnz 1b
        jmp fail
    3:  mov %es:16(%di), %bx             /* the RSDT, as an offset in E000 */
        mov %es:4(%bx), %cx
        sub $36, %cx
        shr $2, %cx                      /* its entries */
        lea 36(%bx), %si
    4:  mov %es:(%si), %bx
        cmpl $0x43495041, %es:(%bx)      /* "APIC" */
        je madt
        cmpl $0x50434146, %es:(%bx)      /* "FACP" */
        jne 5f
        mov %es:64(%bx), %bp             /* PM1a_CNT_BLK */
    5:  add $4, %si
        loop 4b
        jmp done
    madt:
        push %cx
        push %si
        mov %es:4(%bx), %cx
        add %bx, %cx                     /* the end of the MADT */
        lea 44(%bx), %si
        xor %dl, %dl
    6:  cmpb $0, %es:(%si)
        jne 7f
        inc %dl
    7:  movzbw %es:1(%si), %ax
        add %ax, %si
        cmp %cx, %si
        jb 6b
        mov %dl, %al
        add $'0', %al
        mov $0x3f8, %dx
        out %al, %dx
        pop %si
        pop %cx
        jmp 5b
    done:
        mov %bp, %dx
        mov $0x2000, %ax                 /* SLP_EN, sleep type 0 (\\\\_S5) */
        out %ax, %dx
    fail:
        mov $1, %al
        out %al, $0xf4
    """
    with Machine(mem_size=16 << 20, cpus=2) as m:
        m.load(load_flat(assemble(source), 0x7C00), mode="real")
        outcome = m.run(timeout=30)
        assert (outcome.reason, bytes(m.console)) == ("shutdown", b"2")


def madt_entries(madt: bytes) -> list[bytes]:
    entries, at = [], 44
    while at < len(madt):
        entries.append(madt[at : at + madt[at + 1]])
        at += madt[at + 1]
    return entries


def test_the_madt_overrides_the_sci_and_with_irq0_on_pin2_the_timer() -> None:
    def overrides(irq0_on_pin2: bool) -> list[tuple[int, ...]]:
        madt = tables(1, irq0_on_pin2)[b"APIC"]
        return [struct.unpack("<BBBBIH", e)[3:] for e in madt_entries(madt) if e[0] == 2]

    assert overrides(False) == [(9, 9, 0xD)]  # SCI: level, active high
    assert overrides(True) == [(0, 2, 0), (9, 9, 0xD)]
