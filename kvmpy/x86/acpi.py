"""Minimal ACPI 1.0 tables, as firmware leaves them for a kernel to find.

Kernels written for QEMU's PC often find their CPUs and interrupt
controllers through ACPI's MADT, and how to power off through the FADT and
the DSDT's ``\\_S5`` object.  kvmpy writes just those:

    RSDP  "RSD PTR "  found by scanning 0xE0000-0xFFFFF on 16-byte boundaries
    RSDT  "RSDT"      points at the FADT and the MADT
    FADT  "FACP"      PM1a event block at 0x600, PM1a control at 0x604, SCI 9
    FACS  "FACS"      required by ACPI 1.0; empty
    DSDT  "DSDT"      one object: Name (_S5, Package () {0, 0, 0, 0})
    MADT  "APIC"      a local APIC per CPU, the IOAPIC, LINT1 as NMI

The sleep type in ``\\_S5`` is 0, the one kvmpy's PM1a control register
treats as soft-off.  With KVM's default routing ISA IRQ n is IOAPIC pin n,
so the MADT needs no interrupt source override for it.  A board that routes
GSI 0 (the in-kernel PIT) to IOAPIC pin 2, as QEMU's PC does, asks for
``irq0_on_pin2``: the MADT then carries QEMU's override, ISA IRQ 0 -> GSI 2.
The SCI (IRQ 9) always gets an override saying level-triggered, active
high, as QEMU's tables say: without one, ACPI assumes active low.
"""

from __future__ import annotations

import struct

from kvmpy.devices.acpi_pm import PM1A_CNT_PORT, PM1A_EVT_PORT
from kvmpy.devices.cmos import RTC_CENTURY
from kvmpy.x86.layout import ACPI_TABLES_ADDR, IOAPIC_ADDR, LAPIC_ADDR, SCI_IRQ, checksum8

OEM_ID = b"KVMPY "
OEM_TABLE_ID = b"KVMPY PC"

# AML for: Name (_S5, Package (0x04) {Zero, Zero, Zero, Zero})
_S5_AML = bytes.fromhex("08 5f53355f 12 06 04 00 00 00 00")


def _table(signature: bytes, revision: int, body: bytes) -> bytes:
    """An ACPI table: the common 36-byte header, ``body``, checksummed."""
    header = struct.pack(
        "<4sIBB6s8sI4sI",
        signature, 36 + len(body), revision, 0, OEM_ID, OEM_TABLE_ID, 1, b"KVMP", 1,
    )  # fmt: skip
    table = header + body
    return table[:9] + bytes([checksum8(table)]) + table[10:]


_INTERRUPT_SOURCE_OVERRIDE = 2
_MPS_INTI_CONFORMING = 0x0
_MPS_INTI_LEVEL_HIGH = 0xD  # polarity 01 (active high), trigger 11 (level)
TIMER_IRQ = 0
TIMER_GSI_OVERRIDE = 2


def _override(source_irq: int, gsi: int, flags: int) -> bytes:
    """An interrupt source override: ISA IRQ ``source_irq`` arrives at ``gsi``."""
    return struct.pack("<BBBBIH", _INTERRUPT_SOURCE_OVERRIDE, 10, 0, source_irq, gsi, flags)


def _madt(cpus: int, irq0_on_pin2: bool = False) -> bytes:
    body = struct.pack("<II", LAPIC_ADDR, 1)  # flags: PCAT_COMPAT, there are 8259s too
    for apic_id in range(cpus):
        body += struct.pack("<BBBBI", 0, 8, apic_id, apic_id, 1)  # enabled local APIC
    body += struct.pack("<BBBBII", 1, 12, cpus, 0, IOAPIC_ADDR, 0)  # IOAPIC, GSI base 0
    if irq0_on_pin2:
        body += _override(TIMER_IRQ, TIMER_GSI_OVERRIDE, _MPS_INTI_CONFORMING)
    body += _override(SCI_IRQ, SCI_IRQ, _MPS_INTI_LEVEL_HIGH)
    body += struct.pack("<BBBHB", 4, 6, 0xFF, 0, 1)  # every CPU's LINT1 is NMI
    return _table(b"APIC", 1, body)


def _fadt(facs: int, dsdt: int) -> bytes:
    body = struct.pack(
        "<IIBBHIBBBBIIIIIIIIBBBBBBBBHHHHBBBBBHBI",
        facs, dsdt, 0, 0, SCI_IRQ,
        0, 0, 0, 0, 0,  # no SMI command port: ACPI is always on
        PM1A_EVT_PORT, 0, PM1A_CNT_PORT, 0, 0, 0, 0, 0,  # no PM timer, no GPE blocks
        4, 2, 0, 0, 0, 0, 0, 0,  # PM1 event and control block lengths
        0, 0, 0, 0, 0, 0, 0, 0, RTC_CENTURY, 0, 0, 0,
    )  # fmt: skip
    return _table(b"FACP", 1, body)


def acpi_tables(
    cpus: int, address: int = ACPI_TABLES_ADDR, *, irq0_on_pin2: bool = False
) -> bytes:
    """All the tables, laid out from ``address`` (16-byte aligned; FACS 64-byte aligned).

    ``irq0_on_pin2``: the MADT says ISA IRQ 0 arrives at GSI 2 (see above).
    """
    if not 1 <= cpus <= 254:
        raise ValueError(f"the MADT describes 1 to 254 CPUs here, not {cpus}")
    facs_at = address + 0x40
    dsdt_at = facs_at + 0x40
    dsdt = _table(b"DSDT", 1, _S5_AML)
    fadt_at = _align(dsdt_at + len(dsdt))
    fadt = _fadt(facs_at, dsdt_at)
    madt_at = _align(fadt_at + len(fadt))
    madt = _madt(cpus, irq0_on_pin2)
    rsdt_at = _align(madt_at + len(madt))
    rsdt = _table(b"RSDT", 1, struct.pack("<II", fadt_at, madt_at))
    rsdp = struct.pack("<8sB6sBI", b"RSD PTR ", 0, OEM_ID, 0, rsdt_at)
    rsdp = rsdp[:8] + bytes([checksum8(rsdp)]) + rsdp[9:]
    facs = struct.pack("<4sI", b"FACS", 64).ljust(64, b"\0")

    image = bytearray(rsdt_at + len(rsdt) - address)
    for at, data in (
        (address, rsdp), (facs_at, facs), (dsdt_at, dsdt), (fadt_at, fadt),
        (madt_at, madt), (rsdt_at, rsdt),
    ):  # fmt: skip
        image[at - address : at - address + len(data)] = data
    return bytes(image)


def _align(address: int, alignment: int = 16) -> int:
    return (address + alignment - 1) & ~(alignment - 1)
