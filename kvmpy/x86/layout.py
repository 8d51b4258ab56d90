"""The PC's fixed addresses and interrupt numbers, each defined once.

Device ports live beside their device models (``kvmpy/devices``); the board
(``kvmpy/x86/pc.py``) puts both together.  Nothing here imports kvmpy.
"""

from __future__ import annotations

# Interrupt controllers (where KVM's in-kernel LAPIC and IOAPIC answer).
LAPIC_ADDR = 0xFEE0_0000
IOAPIC_ADDR = 0xFEC0_0000

# What firmware leaves in low memory.
BDA_ADDR = 0x400  # the BIOS Data Area
BDA_SIZE = 0x100
EBDA_ADDR = 0x9_FC00  # the Extended BDA, just below 640 KiB
BASE_MEMORY_KIB = EBDA_ADDR // 1024  # 639: what the BDA and CMOS report below the EBDA
VGA_HOLE = (0xA_0000, 0xC_0000)  # the legacy video window
ACPI_TABLES_ADDR = 0xE_0000
ACPI_TABLES_SIZE = 0x1_0000
MP_TABLE_ADDR = 0xF_0000  # kernels scan 0xF0000-0xFFFFF for "_MP_"
MP_TABLE_SIZE = 0x1_0000
BIOS_END = 0x10_0000

# Three pages for Intel's real-mode TSS and one for its identity map, just
# below the BIOS area at the top of 4 GiB, where QEMU and kvmtool put them.
HYPERVISOR_SCRATCH_ADDR = 0xFFFB_C000

# ISA interrupt lines.
TIMER_IRQ = 0
KEYBOARD_IRQ = 1
COM2_IRQ = 3
COM1_IRQ = 4
RTC_IRQ = 8
SCI_IRQ = 9  # ACPI's system control interrupt
MOUSE_IRQ = 12

COM1_PORT = 0x3F8
COM2_PORT = 0x2F8


def checksum8(data: bytes) -> int:
    """The byte that makes ``data`` plus it sum to zero (mod 256): ACPI's and Intel MP's rule."""
    return -sum(data) & 0xFF
