"""ACPI tables: their bytes, and a guest that finds its CPUs and powers off through them."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from kvmpy.devices.acpi_pm import (
    PM1A_CNT_PORT,
    PM_TIMER_PORT,
    RTC_EN,
    RTC_STS,
    TMR_STS,
    WAK_STS,
    AcpiPmControl,
    AcpiPmEvent,
    AcpiPmTimer,
)
from kvmpy.devices.pci import pci_interrupt_gsi
from kvmpy.devices.testdev import TESTDEV_BASE
from kvmpy.loaders.flat import load_flat
from kvmpy.machine import Machine
from kvmpy.x86.acpi import FADT_TMR_VAL_EXT, acpi_tables, aml_pkg_length, eisa_id
from kvmpy.x86.layout import ACPI_TABLES_ADDR, IOAPIC_ADDR
from kvmpy.x86.mptable import mp_tables
from kvmpy.x86.pc import ISA_DEVICES, PC, pci_windows
from tests.helpers import Assembler

LOW_RAM = 16 << 20


def tables(cpus: int, irq0_on_pin2: bool = False) -> dict[bytes, bytes]:
    """Every table reachable from the RSDP, by signature, each checksum verified.

    Built as the PC board builds them, for ``LOW_RAM`` bytes of RAM.
    """
    image = acpi_tables(
        cpus,
        irq0_on_pin2=irq0_on_pin2,
        pci_windows=pci_windows(LOW_RAM),
        pci_gsi=pci_interrupt_gsi,
        isa_devices=ISA_DEVICES,
    )

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


# -- the PM timer, the FACS and the DSDT's AML -------------------------------------------


def test_fadt_declares_the_24_bit_pm_timer() -> None:
    fadt = tables(1)[b"FACP"]
    assert struct.unpack_from("<I", fadt, 76)[0] == PM_TIMER_PORT == 0x608  # PM_TMR_BLK
    assert fadt[91] == 4  # PM_TMR_LEN
    flags = struct.unpack_from("<I", fadt, 112)[0]
    assert not flags & FADT_TMR_VAL_EXT  # 24 bits, as the timer is


def test_facs_is_version_2_with_empty_waking_vectors_and_64_bit_wake() -> None:
    facs = tables(1)[b"FACS"]
    assert struct.unpack_from("<4sI", facs) == (b"FACS", 64)
    assert facs[32] == 2
    assert struct.unpack_from("<IQ", facs, 12)[0] == 0
    assert struct.unpack_from("<Q", facs, 24)[0] == 0
    assert struct.unpack_from("<I", facs, 20)[0] == 1 << 1  # 64BIT_WAKE_SUPPORTED_F
    assert struct.unpack_from("<I", facs, 36)[0] == 0  # OSPM flags: the guest's to set


def _pkg_length(aml: bytes, at: int) -> tuple[int, int]:
    """(package length, bytes it took) of the PkgLength at ``at``."""
    lead = aml[at]
    extra = lead >> 6
    if not extra:
        return lead & 0x3F, 1
    value = lead & 0xF
    for i in range(extra):
        value |= aml[at + 1 + i] << (4 + 8 * i)
    return value, 1 + extra


def _parse_terms(aml: bytes, scope: str, names: dict[str, object]) -> None:
    """A walker for the few AML terms the DSDT uses; fails on anything else."""
    at = 0
    while at < len(aml):
        op = aml[at]
        if op == 0x08:  # Name
            name = aml[at + 1 : at + 5].decode()
            at += 5
            value, at = _parse_data(aml, at)
            names[f"{scope}.{name}"] = value
        elif op == 0x10:  # Scope
            length, took = _pkg_length(aml, at + 1)
            end = at + 1 + length
            body = aml[at + 1 + took : end]
            assert body[0] == 0x5C  # a path from the root
            path = "\\" + body[1:5].decode()
            _parse_terms(body[5:], path, names)
            at = end
        elif op == 0x5B and aml[at + 1] == 0x82:  # Device
            length, took = _pkg_length(aml, at + 2)
            end = at + 2 + length
            body = aml[at + 2 + took : end]
            path = f"{scope}.{body[:4].decode()}"
            names[path] = "Device"
            _parse_terms(body[4:], path, names)
            at = end
        else:
            raise AssertionError(f"unexpected AML opcode {op:#x} at {at}")
        assert at <= len(aml)


def _parse_data(aml: bytes, at: int) -> tuple[object, int]:
    op = aml[at]
    if op in (0x00, 0x01):
        return op, at + 1
    if op == 0x0A:
        return aml[at + 1], at + 2
    if op == 0x0B:
        return struct.unpack_from("<H", aml, at + 1)[0], at + 3
    if op == 0x0C:
        return struct.unpack_from("<I", aml, at + 1)[0], at + 5
    if op == 0x11:  # Buffer: its bytes
        length, took = _pkg_length(aml, at + 1)
        end = at + 1 + length
        size, cursor = _parse_data(aml, at + 1 + took)
        assert isinstance(size, int) and cursor + size == end
        return aml[cursor:end], end
    if op == 0x12:  # Package
        length, took = _pkg_length(aml, at + 1)
        end = at + 1 + length
        count = aml[at + 1 + took]
        items, cursor = [], at + 2 + took
        for _ in range(count):
            item, cursor = _parse_data(aml, cursor)
            items.append(item)
        assert cursor == end
        return tuple(items), end
    raise AssertionError(f"unexpected data opcode {op:#x}")


def test_dsdt_has_the_sleep_states_and_the_pci_root_bridge() -> None:
    dsdt = tables(1)[b"DSDT"]
    names: dict[str, object] = {}
    _parse_terms(dsdt[36:], "\\", names)
    assert names["\\._S3_"] == (1, 1, 0, 0)
    assert names["\\._S5_"] == (0, 0, 0, 0)
    assert names["\\_SB_.PCI0"] == "Device"
    assert names["\\_SB_.PCI0._HID"] == eisa_id("PNP0A03") == 0x030AD041
    assert names["\\_SB_.PCI0._UID"] == 0


def _resources(template: bytes) -> list[tuple[object, ...]]:
    """The descriptors of a resource template, decoded: (kind, ...fields)."""
    found: list[tuple[object, ...]] = []
    at = 0
    while True:
        tag = template[at]
        if tag == 0x79:  # end tag
            assert at + 2 == len(template)
            return found
        if tag == 0x47:  # I/O port
            found.append(("io", *struct.unpack_from("<BHHBB", template, at + 1)))
            at += 8
        elif tag == 0x22:  # IRQ, no flags: a mask of ISA lines
            mask = struct.unpack_from("<H", template, at + 1)[0]
            found.append(("irq", *(line for line in range(16) if mask >> line & 1)))
            at += 3
        elif tag in (0x87, 0x88):  # DWord, Word address space
            length = struct.unpack_from("<H", template, at + 1)[0]
            width = "I" if tag == 0x87 else "H"
            space, general, specific, *numbers = struct.unpack_from(
                f"<BBB5{width}", template, at + 3
            )
            _, low, high, translation, size = numbers
            assert translation == 0 and size == high - low + 1 and general == 0x0C
            found.append((("memory", "io", "bus")[space], low, high, specific))
            at += 3 + length
        else:
            raise AssertionError(f"unexpected resource descriptor {tag:#x}")


def test_the_pci_root_bridge_resources_are_the_boards_windows() -> None:
    names: dict[str, object] = {}
    _parse_terms(tables(1)[b"DSDT"][36:], "\\", names)
    crs = names["\\_SB_.PCI0._CRS"]
    assert isinstance(crs, bytes)
    assert _resources(crs) == [
        ("bus", 0, 0xFF, 0),
        ("io", 1, 0xCF8, 0xCF8, 1, 8),
        ("io", 0, 0xCF7, 3),
        ("io", 0xD00, 0xFFFF, 3),  # where I/O BARs decode
        ("memory", LOW_RAM, TESTDEV_BASE - 1, 1),  # ...and memory BARs: RAM's end to testdev
    ]
    assert pci_windows(LOW_RAM).memory == (LOW_RAM, TESTDEV_BASE)


def test_the_isa_bridge_lists_the_pcs_legacy_devices_with_qemus_pnp_ids() -> None:
    names: dict[str, object] = {}
    _parse_terms(tables(1)[b"DSDT"][36:], "\\", names)
    assert names["\\_SB_.PCI0.ISA_._ADR"] == 0x0001_0000  # 00:01.0, the PIIX3
    expected = {
        "KBD_": ("PNP0303", [("io", 1, 0x60, 0x60, 1, 1), ("io", 1, 0x64, 0x64, 1, 1), ("irq", 1)]),
        "RTC_": ("PNP0B00", [("io", 1, 0x70, 0x70, 1, 2), ("irq", 8)]),
        "COM1": ("PNP0501", [("io", 1, 0x3F8, 0x3F8, 1, 8), ("irq", 4)]),
        "COM2": ("PNP0501", [("io", 1, 0x2F8, 0x2F8, 1, 8), ("irq", 3)]),
    }
    for name, (hid, resources) in expected.items():
        path = f"\\_SB_.PCI0.ISA_.{name}"
        assert names[path] == "Device"
        assert names[f"{path}._HID"] == eisa_id(hid)
        crs = names[f"{path}._CRS"]
        assert isinstance(crs, bytes) and _resources(crs) == resources
    assert (names["\\_SB_.PCI0.ISA_.COM1._UID"], names["\\_SB_.PCI0.ISA_.COM2._UID"]) == (1, 2)


def test_the_pci_routing_table_matches_the_mp_table_and_the_gsi_routes() -> None:
    names: dict[str, object] = {}
    _parse_terms(tables(1)[b"DSDT"][36:], "\\", names)
    prt = names["\\_SB_.PCI0._PRT"]
    assert isinstance(prt, tuple) and len(prt) == 32 * 4
    routes = {}
    for entry in prt:
        assert isinstance(entry, tuple)
        address, pin, source, gsi = entry
        assert isinstance(address, int) and address & 0xFFFF == 0xFFFF and source == 0
        routes[(address >> 16, pin + 1)] = gsi
    assert routes == {
        (slot, pin): pci_interrupt_gsi(slot, pin) for slot in range(32) for pin in range(1, 5)
    }
    assert set(routes.values()) == {16, 17, 18, 19}
    # The MP table says the same for a function with a pin, and the GSIs reach the IOAPIC.
    table = mp_tables(1, 0, 0, pci_interrupts=[(3, 1, routes[(3, 1)])])
    assert struct.pack("<BBHBBBB", 3, 0, 0x0F, 0, 3 << 2, 1, 19) in table
    assert {(r.gsi, r.pin) for r in PC.irq_routes if r.gsi >= 16} >= {(g, g) for g in range(16, 20)}


def test_aml_package_lengths_of_every_size() -> None:
    for size in (0, 0x3E, 0x3F, 0x40, 0xFFE, 0xFFF, 0x1000, 0xFFFFE):
        encoded = aml_pkg_length(size)
        assert _pkg_length(encoded + bytes(size), 0) == (size + len(encoded), len(encoded))


@pytest.mark.skipif(shutil.which("iasl") is None, reason="iasl (acpica-tools) is not installed")
def test_iasl_disassembles_the_dsdt(tmp_path: Path) -> None:
    (tmp_path / "dsdt.dat").write_bytes(tables(1)[b"DSDT"])
    subprocess.run(["iasl", "-d", "dsdt.dat"], cwd=tmp_path, check=True, capture_output=True)
    text = (tmp_path / "dsdt.dsl").read_text()
    assert "Name (_S3, Package (0x04)" in text
    assert "Device (PCI0)" in text and 'EisaId ("PNP0A03")' in text
    # iasl took the _CRS buffer for a valid resource template, and every descriptor in it.
    assert "Name (_CRS, ResourceTemplate ()" in text
    for descriptor in ("WordBusNumber (", "IO (Decode16,", "WordIO (", "DWordMemory ("):
        assert descriptor in text
    assert "Name (_PRT, Package (0x80)" in text
    assert "Device (COM1)" in text and "IRQNoFlags ()" in text
    # And the disassembly compiles back cleanly: no errors, no warnings.
    compiled = subprocess.run(
        ["iasl", "-p", "again", "dsdt.dsl"], cwd=tmp_path, capture_output=True, text=True
    )
    assert compiled.returncode == 0, compiled.stdout + compiled.stderr
    assert "0 Errors, 0 Warnings" in compiled.stdout, compiled.stdout


def test_pm_timer_counts_at_3_579545_mhz_in_24_bits() -> None:
    now = [0]
    timer = AcpiPmTimer(clock=lambda: now[0])
    assert timer.read(0, 4) == 0
    now[0] = 1_000_000_000
    assert timer.read(0, 4) == 3_579_545
    assert timer.read(1, 2) == (3_579_545 >> 8) & 0xFFFF
    now[0] = 5_000_000_000  # past 2**24 ticks: it wraps
    assert timer.read(0, 4) == (5 * 3_579_545) & 0xFFFFFF
    timer.write(0, 4, 0)  # read-only
    assert timer.read(0, 4) == (5 * 3_579_545) & 0xFFFFFF


def test_tmr_sts_follows_bit_23_and_clears_by_writing_1() -> None:
    now = [0]
    events = AcpiPmEvent(clock=lambda: now[0])
    assert not events.read(0, 2) & TMR_STS
    now[0] = (1 << 23) * 1_000_000_000 // 3_579_545 + 1000  # bit 23 flipped
    assert events.read(0, 2) & TMR_STS
    events.write(0, 2, TMR_STS)
    assert not events.read(0, 2) & TMR_STS


def test_sci_follows_status_and_enable() -> None:
    levels: list[bool] = []
    events = AcpiPmEvent(irq=levels.append)
    events.raise_status(RTC_STS | WAK_STS)
    assert levels == []  # not enabled
    events.write(2, 2, RTC_EN)
    assert levels == [True]
    events.write(0, 2, RTC_STS)
    assert levels == [True, False]
    assert events.read(0, 2) & WAK_STS


def test_sleep_types_5_and_3() -> None:
    calls: list[str] = []
    control = AcpiPmControl(lambda: calls.append("off"), lambda: calls.append("s3"))
    control.write(0, 2, 1 << 10 | 1 << 13)
    control.write(0, 2, 0 << 10 | 1 << 13)
    control.write(0, 2, 5 << 10 | 1 << 13)  # S4 and others: ignored
    control.write(0, 2, 1 << 10)  # no SLP_EN: nothing
    assert calls == ["s3", "off"]
    assert control.read(0, 2) == 1 << 10


@pytest.mark.kvm
def test_a_guest_reads_the_pm_timer_advancing_in_24_bits(assemble: Assembler) -> None:
    # Two reads of the FADT's PM timer port, 100 reads apart: the count moved
    # and bits 24-31 read 0 (TMR_VAL_EXT is clear).
    source = """
        mov $0x608, %dx
        in %dx, %eax
        mov %eax, %ebx
        mov $100, %cx
    1:  in %dx, %eax
        loop 1b
        test $0xff000000, %eax
        jnz 2f
        cmp %eax, %ebx
        je 2f
        mov $0x11, %al
        out %al, $0xf4
    2:  mov $0x22, %al
        out %al, $0xf4
    """
    with Machine(mem_size=16 << 20) as m:
        m.load(load_flat(assemble(source), 0x7C00), mode="real")
        assert m.run(timeout=30).exit_code == 0x11
