"""Minimal ACPI tables, as firmware leaves them for a kernel to find.

Kernels written for QEMU's PC often find their CPUs and interrupt
controllers through ACPI's MADT, the power-management registers through the
FADT, and the sleep states in the DSDT.  kvmpy writes just those:

    RSDP  "RSD PTR "  found by scanning 0xE0000-0xFFFFF on 16-byte boundaries
    RSDT  "RSDT"      points at the FADT and the MADT
    FADT  "FACP"      PM1a event block 0x600, control 0x604, PM timer 0x608
                      (24-bit: TMR_VAL_EXT clear), SCI 9
    FACS  "FACS"      version 2: the waking vectors a resume from S3 jumps to,
                      with 64BIT_WAKE_SUPPORTED_F (a 64-bit resume on request)
    DSDT  "DSDT"      \\_S3 (SLP_TYP 1), \\_S5 (SLP_TYP 0), as QEMU numbers
                      them, and \\_SB.PCI0, the PCI host bridge (PNP0A03) that
                      configuration mechanism #1 at 0xCF8 reaches: its _CRS
                      (bus numbers, I/O and memory windows) and _PRT (each
                      slot's INTA-D on a fixed IOAPIC input, as the MP table)
    MADT  "APIC"      a local APIC per CPU, the IOAPIC, LINT1 as NMI

With KVM's default routing ISA IRQ n is IOAPIC pin n, so the MADT needs no
interrupt source override for it.  A board that routes GSI 0 (the in-kernel
PIT) to IOAPIC pin 2, as QEMU's PC does, asks for ``irq0_on_pin2``: the MADT
then carries QEMU's override, ISA IRQ 0 -> GSI 2.  The SCI (IRQ 9) always
gets an override saying level-triggered, active high, as QEMU's tables say:
without one, ACPI assumes active low.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from kvmpy.devices.acpi_pm import (
    PM1A_CNT_PORT,
    PM1A_CNT_PORTS,
    PM1A_EVT_PORT,
    PM1A_EVT_PORTS,
    PM_TIMER_PORT,
    PM_TIMER_PORTS,
    SLEEP_TYPE_SOFT_OFF,
    SLEEP_TYPE_SUSPEND,
)
from kvmpy.devices.cmos import RTC_CENTURY
from kvmpy.devices.pci import (
    CONFIG_ADDRESS_PORT,
    MAX_DEVICES,
    NO_WINDOWS,
    PCI_IRQ_PINS,
    PciWindows,
    pci_interrupt_gsi,
)
from kvmpy.records import Record
from kvmpy.x86.layout import (
    ACPI_TABLES_ADDR,
    IOAPIC_ADDR,
    LAPIC_ADDR,
    SCI_IRQ,
    TIMER_IOAPIC_PIN,
    TIMER_IRQ,
    checksum8,
)

OEM_ID = b"KVMPY "
OEM_TABLE_ID = b"KVMPY PC"

# FADT flags: WBINVD works, C1 on all CPUs, no sleep button, RTC wakes from S4.
# TMR_VAL_EXT (bit 8) stays clear: the PM timer is 24 bits wide.
FADT_WBINVD = 1 << 0
FADT_PROC_C1 = 1 << 2
FADT_SLP_BUTTON = 1 << 5
FADT_RTC_S4 = 1 << 7
FADT_TMR_VAL_EXT = 1 << 8
FADT_FLAGS = FADT_WBINVD | FADT_PROC_C1 | FADT_SLP_BUTTON | FADT_RTC_S4

FACS_OFFSET = 0x40  # from the RSDP: the FACS is 64-byte aligned
FACS_VERSION = 2  # ACPI 4.0 on: x_firmware_waking_vector, the flags, the OSPM flags
FACS_SIZE = 64
FACS_FIRMWARE_WAKING_VECTOR = 12  # offsets inside the FACS
FACS_FLAGS = 20
FACS_X_FIRMWARE_WAKING_VECTOR = 24
FACS_VERSION_OFFSET = 32
FACS_OSPM_FLAGS = 36
# FACS flags: the platform can resume at x_firmware_waking_vector in 64-bit mode...
FACS_64BIT_WAKE_SUPPORTED = 1 << 1
# ...and OSPM flags: the guest asks it to.
OSPM_64BIT_WAKE = 1 << 0

# AML opcodes (ACPI 6.x, chapter 20).
AML_ZERO = 0x00
AML_ONE = 0x01
AML_NAME = 0x08
AML_BYTE = 0x0A
AML_WORD = 0x0B
AML_DWORD = 0x0C
AML_SCOPE = 0x10
AML_BUFFER = 0x11
AML_PACKAGE = 0x12
AML_EXT_PREFIX = 0x5B
AML_DEVICE = 0x82  # after the prefix
AML_ROOT = 0x5C  # the root prefix, a backslash


def aml_pkg_length(body_length: int) -> bytes:
    """A PkgLength encoding that counts itself plus ``body_length`` bytes."""
    for extra in range(4):
        total = body_length + 1 + extra
        if extra == 0 and total < 0x40:
            return bytes([total])
        if extra and total < 1 << (4 + 8 * extra):
            lead = (extra << 6) | (total & 0xF)
            return bytes([lead]) + (total >> 4).to_bytes(extra, "little")
    raise ValueError(f"AML package of {body_length} bytes is too long")


def aml_integer(value: int) -> bytes:
    if value in (0, 1):
        return bytes([value])
    if 0 <= value <= 0xFF:
        return bytes([AML_BYTE, value])
    if 0 <= value <= 0xFFFF:
        return bytes([AML_WORD]) + value.to_bytes(2, "little")
    return bytes([AML_DWORD]) + value.to_bytes(4, "little")


def aml_name(name: bytes, value: bytes) -> bytes:
    """Name (NAME, value): a four-character name and an encoded data object."""
    assert len(name) == 4
    return bytes([AML_NAME]) + name + value


def aml_package(*integers: int) -> bytes:
    return aml_package_of(*(aml_integer(i) for i in integers))


def aml_package_of(*elements: bytes) -> bytes:
    """A package of already encoded data objects (at most 255)."""
    body = bytes([len(elements)]) + b"".join(elements)
    return bytes([AML_PACKAGE]) + aml_pkg_length(len(body)) + body


def aml_buffer(data: bytes) -> bytes:
    body = aml_integer(len(data)) + data
    return bytes([AML_BUFFER]) + aml_pkg_length(len(body)) + body


# Resource descriptors (ACPI 6.x, 6.4): the bridge's windows, in ``_CRS``.
_IO_PORT_DESCRIPTOR = 0x47  # small item: I/O port, 7 bytes
_END_TAG = 0x79  # small item: end tag, 1 byte (a zero checksum: not checked)
_DWORD_ADDRESS_SPACE = 0x87
_WORD_ADDRESS_SPACE = 0x88
_SPACE_MEMORY, _SPACE_IO, _SPACE_BUS = 0, 1, 2
# General flags: a window the bridge produces, positive decode, fixed bounds.
_PRODUCER_FIXED = 0x0C  # _MAF | _MIF
_IO_ENTIRE_RANGE = 0x3
_MEMORY_READ_WRITE = 0x1  # non-cacheable


def _word_space(space: int, specific: int, start: int, end: int) -> bytes:
    """A Word Address Space Descriptor for [start, end)."""
    return struct.pack(
        "<BHBBBHHHHH", _WORD_ADDRESS_SPACE, 13, space, _PRODUCER_FIXED, specific,
        0, start, end - 1, 0, end - start,
    )  # fmt: skip


def _dword_space(space: int, specific: int, start: int, end: int) -> bytes:
    """A DWord Address Space Descriptor for [start, end)."""
    return struct.pack(
        "<BHBBBIIIII", _DWORD_ADDRESS_SPACE, 23, space, _PRODUCER_FIXED, specific,
        0, start, end - 1, 0, end - start,
    )  # fmt: skip


def pci_host_resources(windows: PciWindows) -> bytes:
    """``_CRS`` of the host bridge: buses 0-255, the configuration ports, the windows.

    As QEMU's PC: I/O below the configuration ports goes to the ISA devices
    behind the ISA bridge, I/O from 0xd00 and the memory window to PCI BARs.
    """
    io_start, io_end = windows.io
    memory_start, memory_end = windows.memory
    resources = [
        _word_space(_SPACE_BUS, 0, 0, 0x100),
        struct.pack(
            "<BBHHBB", _IO_PORT_DESCRIPTOR, 1, CONFIG_ADDRESS_PORT, CONFIG_ADDRESS_PORT, 1, 8
        ),  # decodes 16 bits
        _word_space(_SPACE_IO, _IO_ENTIRE_RANGE, 0, CONFIG_ADDRESS_PORT),
    ]
    if io_start < io_end:
        resources.append(_word_space(_SPACE_IO, _IO_ENTIRE_RANGE, io_start, io_end))
    if memory_start < memory_end:
        resources.append(_dword_space(_SPACE_MEMORY, _MEMORY_READ_WRITE, memory_start, memory_end))
    return b"".join((*resources, bytes([_END_TAG, 0])))


def pci_routing_table(gsi: Callable[[int, int], int]) -> bytes:
    """``_PRT``: every slot's INTA-INTD, wired to a fixed GSI (``gsi(slot, pin 1-4)``).

    The form with source 0: the GSI is hard-wired, level-triggered and active
    low, as the MP table's PCI entries say.  It names IOAPIC inputs, so it
    holds in APIC mode only; no link devices route PCI interrupts to the PICs.
    """
    return aml_package_of(
        *(
            aml_package(slot << 16 | 0xFFFF, pin - 1, 0, gsi(slot, pin))
            for slot in range(MAX_DEVICES)
            for pin in range(1, PCI_IRQ_PINS + 1)
        )
    )


def aml_scope(path: bytes, *terms: bytes) -> bytes:
    body = path + b"".join(terms)
    return bytes([AML_SCOPE]) + aml_pkg_length(len(body)) + body


def aml_device(name: bytes, *terms: bytes) -> bytes:
    body = name + b"".join(terms)
    return bytes([AML_EXT_PREFIX, AML_DEVICE]) + aml_pkg_length(len(body)) + body


def eisa_id(text: str) -> int:
    """A compressed EISA ID ("PNP0A03") as the 32-bit integer AML stores."""
    letters = [ord(c) - 0x40 for c in text[:3]]
    vendor = (letters[0] << 10) | (letters[1] << 5) | letters[2]
    product = int(text[3:], 16)
    return int.from_bytes(vendor.to_bytes(2, "big") + product.to_bytes(2, "big"), "little")


class IsaDevice(Record):
    """A legacy device behind the ISA bridge, as the DSDT describes it for PnP."""

    name: bytes  # four characters
    hid: str  # its PnP ID ("PNP0501")
    ports: tuple[tuple[int, int], ...]  # (first port, count)
    irqs: tuple[int, ...]
    uid: int = 0


_IRQ_NO_FLAGS = 0x22  # small item: IRQ, 2 bytes (edge, active high, exclusive)


def isa_resources(device: IsaDevice) -> bytes:
    """``_CRS`` of an ISA device: its fixed I/O ports (16-bit decode) and ISA IRQs."""
    items = [
        struct.pack("<BBHHBB", _IO_PORT_DESCRIPTOR, 1, first, first, 1, count)
        for first, count in device.ports
    ]
    items += [struct.pack("<BH", _IRQ_NO_FLAGS, 1 << irq) for irq in device.irqs]
    return b"".join((*items, bytes([_END_TAG, 0])))


def _isa_bridge(devices: tuple[IsaDevice, ...]) -> bytes:
    """The ISA bridge at 00:01.0 (``_ADR``) and the devices behind it, as QEMU's PC has."""
    return aml_device(
        b"ISA_",
        aml_name(b"_ADR", aml_integer(0x0001_0000)),
        *(
            aml_device(
                device.name,
                aml_name(b"_HID", aml_integer(eisa_id(device.hid))),
                aml_name(b"_UID", aml_integer(device.uid)),
                aml_name(b"_CRS", aml_buffer(isa_resources(device))),
            )
            for device in devices
        ),
    )


def dsdt_aml(
    windows: PciWindows,
    gsi: Callable[[int, int], int] = pci_interrupt_gsi,
    isa_devices: tuple[IsaDevice, ...] = (),
) -> bytes:
    """The DSDT's definition block: sleep states, the PCI host bridge and, with
    ``isa_devices``, the ISA bridge and what is behind it (for Linux's PnP drivers)."""
    isa = (_isa_bridge(isa_devices),) if isa_devices else ()
    return b"".join(
        (
            # Package {PM1a SLP_TYP, PM1b SLP_TYP, reserved, reserved}, as QEMU's.
            aml_name(b"_S3_", aml_package(SLEEP_TYPE_SUSPEND, SLEEP_TYPE_SUSPEND, 0, 0)),
            aml_name(b"_S5_", aml_package(SLEEP_TYPE_SOFT_OFF, SLEEP_TYPE_SOFT_OFF, 0, 0)),
            aml_scope(
                bytes([AML_ROOT]) + b"_SB_",
                aml_device(
                    b"PCI0",
                    aml_name(b"_HID", aml_integer(eisa_id("PNP0A03"))),
                    aml_name(b"_UID", aml_integer(0)),
                    aml_name(b"_CRS", aml_buffer(pci_host_resources(windows))),
                    aml_name(b"_PRT", pci_routing_table(gsi)),
                    *isa,
                ),
            ),
        )
    )


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


def _override(source_irq: int, gsi: int, flags: int) -> bytes:
    """An interrupt source override: ISA IRQ ``source_irq`` arrives at ``gsi``."""
    return struct.pack("<BBBBIH", _INTERRUPT_SOURCE_OVERRIDE, 10, 0, source_irq, gsi, flags)


def _madt(cpus: int, irq0_on_pin2: bool = False) -> bytes:
    body = struct.pack("<II", LAPIC_ADDR, 1)  # flags: PCAT_COMPAT, there are 8259s too
    for apic_id in range(cpus):
        body += struct.pack("<BBBBI", 0, 8, apic_id, apic_id, 1)  # enabled local APIC
    body += struct.pack("<BBBBII", 1, 12, cpus, 0, IOAPIC_ADDR, 0)  # IOAPIC, GSI base 0
    if irq0_on_pin2:
        body += _override(TIMER_IRQ, TIMER_IOAPIC_PIN, _MPS_INTI_CONFORMING)
    body += _override(SCI_IRQ, SCI_IRQ, _MPS_INTI_LEVEL_HIGH)
    body += struct.pack("<BBBHB", 4, 6, 0xFF, 0, 1)  # every CPU's LINT1 is NMI
    return _table(b"APIC", 1, body)


def _fadt(facs: int, dsdt: int) -> bytes:
    body = struct.pack(
        "<IIBBHIBBBBIIIIIIIIBBBBBBBBHHHHBBBBBHBI",
        facs, dsdt, 0, 0, SCI_IRQ,
        0, 0, 0, 0, 0,  # no SMI command port: ACPI is always on
        PM1A_EVT_PORT, 0, PM1A_CNT_PORT, 0, 0, PM_TIMER_PORT, 0, 0,  # no GPE blocks
        PM1A_EVT_PORTS, PM1A_CNT_PORTS, 0, PM_TIMER_PORTS, 0, 0, 0, 0,  # block lengths
        0, 0, 0, 0, 0, 0, 0, 0, RTC_CENTURY, 0, 0, FADT_FLAGS,
    )  # fmt: skip
    return _table(b"FACP", 1, body)


def acpi_tables(
    cpus: int,
    address: int = ACPI_TABLES_ADDR,
    *,
    irq0_on_pin2: bool = False,
    pci_windows: PciWindows = NO_WINDOWS,
    pci_gsi: Callable[[int, int], int] = pci_interrupt_gsi,
    isa_devices: tuple[IsaDevice, ...] = (),
) -> bytes:
    """All the tables, laid out from ``address`` (16-byte aligned; FACS 64-byte aligned).

    ``irq0_on_pin2``: the MADT says ISA IRQ 0 arrives at GSI 2 (see above).
    ``pci_windows`` and ``pci_gsi`` are the host bridge's (its ``_CRS`` and
    ``_PRT``): the board's, which decode BARs and route interrupts the same way.
    ``isa_devices``: the legacy devices the DSDT lists behind the ISA bridge.
    """
    if not 1 <= cpus <= 254:
        raise ValueError(f"the MADT describes 1 to 254 CPUs here, not {cpus}")
    facs_at = address + FACS_OFFSET
    dsdt_at = facs_at + 0x40
    dsdt = _table(b"DSDT", 1, dsdt_aml(pci_windows, pci_gsi, isa_devices))
    fadt_at = _align(dsdt_at + len(dsdt))
    fadt = _fadt(facs_at, dsdt_at)
    madt_at = _align(fadt_at + len(fadt))
    madt = _madt(cpus, irq0_on_pin2)
    rsdt_at = _align(madt_at + len(madt))
    rsdt = _table(b"RSDT", 1, struct.pack("<II", fadt_at, madt_at))
    rsdp = struct.pack("<8sB6sBI", b"RSD PTR ", 0, OEM_ID, 0, rsdt_at)
    rsdp = rsdp[:8] + bytes([checksum8(rsdp)]) + rsdp[9:]
    facs = bytearray(FACS_SIZE)
    struct.pack_into("<4sI", facs, 0, b"FACS", FACS_SIZE)
    struct.pack_into("<I", facs, FACS_FLAGS, FACS_64BIT_WAKE_SUPPORTED)
    facs[FACS_VERSION_OFFSET] = FACS_VERSION

    image = bytearray(rsdt_at + len(rsdt) - address)
    for at, data in (
        (address, rsdp), (facs_at, facs), (dsdt_at, dsdt), (fadt_at, fadt),
        (madt_at, madt), (rsdt_at, rsdt),
    ):  # fmt: skip
        image[at - address : at - address + len(data)] = data
    return bytes(image)


def _align(address: int, alignment: int = 16) -> int:
    return (address + alignment - 1) & ~(alignment - 1)
