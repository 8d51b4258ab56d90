"""The Intel MultiProcessor Specification (1.4) tables, as firmware leaves them.

Kernels written for QEMU's PC find their CPUs and the IOAPIC either through
ACPI or through these tables (xv6 and many teaching kernels use them): a
16-byte floating pointer, found by scanning 0xF0000-0xFFFFF for "_MP_", that
points at a configuration table listing processors, the buses (PCI bus 0,
whose host bridge configuration mechanism #1 reaches, and the ISA bus 1, as
SeaBIOS numbers them), the IOAPIC and how interrupts reach it.  With KVM's
default interrupt routing, ISA IRQ n drives IOAPIC pin n; PCI interrupts
(level-triggered, active low) are listed per slot and pin.  A board that
routes GSI 0 (the in-kernel PIT) to IOAPIC pin 2, as QEMU's PC does with
KVM_SET_GSI_ROUTING, asks for ``irq0_on_pin2``: the table then says ISA IRQ 0
arrives on pin 2.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from kvmpy.x86.layout import IOAPIC_ADDR, LAPIC_ADDR, MP_TABLE_ADDR, checksum8

LAPIC_VERSION = 0x14
IOAPIC_VERSION = 0x11
SPEC_REVISION = 4  # 1.4
ISA_IRQS = 16
TIMER_IRQ = 0
TIMER_PIN_OVERRIDE = 2  # where QEMU's PC wires ISA IRQ 0 on the IOAPIC
PCI_BUS_ID = 0
ISA_BUS_ID = 1
# Interrupt entry flags: PCI interrupts are active low (polarity 3), level (trigger 3).
PCI_INTERRUPT_FLAGS = 0x3 | 0x3 << 2

_PROCESSOR, _BUS, _IOAPIC, _IO_INTERRUPT, _LOCAL_INTERRUPT = range(5)
_INT, _NMI, _EXTINT = 0, 1, 3
CPU_ENABLED = 1 << 0
CPU_BOOTSTRAP = 1 << 1


def mp_tables(
    cpus: int,
    cpu_signature: int,
    cpu_features: int,
    address: int = MP_TABLE_ADDR,
    *,
    irq0_on_pin2: bool = False,
    pci_interrupts: Sequence[tuple[int, int, int]] = (),
) -> bytes:
    """The floating pointer at ``address`` followed by the configuration table.

    ``cpu_signature`` and ``cpu_features`` are CPUID leaf 1's EAX and EDX.
    APIC IDs are 0..cpus-1, and the IOAPIC takes the next ID.
    ``pci_interrupts`` are (device, pin 1-4, IOAPIC pin) on PCI bus 0.  With
    ``irq0_on_pin2`` ISA IRQ 0 is listed on IOAPIC pin 2 (the interrupt
    routing must match: see the module's docstring).
    """
    if not 1 <= cpus <= 254:
        raise ValueError(f"the MP table describes 1 to 254 CPUs, not {cpus}")
    ioapic_id = cpus
    entries = []
    for apic_id in range(cpus):
        flags = CPU_ENABLED | (CPU_BOOTSTRAP if apic_id == 0 else 0)
        entries.append(
            struct.pack(
                "<BBBBII8x", _PROCESSOR, apic_id, LAPIC_VERSION, flags, cpu_signature, cpu_features
            )
        )
    entries.append(struct.pack("<BB6s", _BUS, PCI_BUS_ID, b"PCI   "))
    entries.append(struct.pack("<BB6s", _BUS, ISA_BUS_ID, b"ISA   "))
    entries.append(struct.pack("<BBBBI", _IOAPIC, ioapic_id, IOAPIC_VERSION, 1, IOAPIC_ADDR))
    for irq in range(ISA_IRQS):
        if irq == 2:  # the cascade: IRQ 2 never comes from the ISA bus
            continue
        pin = TIMER_PIN_OVERRIDE if irq == TIMER_IRQ and irq0_on_pin2 else irq
        entries.append(
            struct.pack("<BBHBBBB", _IO_INTERRUPT, _INT, 0, ISA_BUS_ID, irq, ioapic_id, pin)
        )
    for device, pin, gsi in pci_interrupts:
        source = (device << 2) | (pin - 1)  # the MP spec's PCI source: slot and INTx
        flags = PCI_INTERRUPT_FLAGS
        entries.append(
            struct.pack("<BBHBBBB", _IO_INTERRUPT, _INT, flags, PCI_BUS_ID, source, ioapic_id, gsi)
        )
    # Every LAPIC's LINT0 takes the PIC's output (ExtINT), LINT1 the NMI.
    entries.append(struct.pack("<BBHBBBB", _LOCAL_INTERRUPT, _EXTINT, 0, 0, 0, 0xFF, 0))
    entries.append(struct.pack("<BBHBBBB", _LOCAL_INTERRUPT, _NMI, 0, 0, 0, 0xFF, 1))

    body = b"".join(entries)
    header = struct.pack(
        "<4sHBB8s12sIHHIHBx",
        b"PCMP", 44 + len(body), SPEC_REVISION, 0, b"KVMPY   ", b"KVMPY PC    ",
        0, 0, len(entries), LAPIC_ADDR, 0, 0,
    )  # fmt: skip
    table = header + body
    table = table[:7] + bytes([checksum8(table)]) + table[8:]

    pointer = struct.pack("<4sIBBB5x", b"_MP_", address + 16, 1, SPEC_REVISION, 0)
    pointer = pointer[:10] + bytes([checksum8(pointer)]) + pointer[11:]
    return pointer + table
