"""The BIOS Data Area, as firmware leaves it: kvmpy has no BIOS, so it writes one.

Kernels written for QEMU sometimes read the BDA at 0x400 rather than probe:
the COM port addresses, the equipment word and the base-memory size.  These
are the values SeaBIOS leaves on a QEMU PC with COM1 and COM2.
"""

from __future__ import annotations

import struct

from kvmpy.x86.layout import BASE_MEMORY_KIB, BDA_SIZE, COM1_PORT, EBDA_ADDR

EBDA_SEGMENT = EBDA_ADDR >> 4


def bios_data_area(com_ports: tuple[int, ...] = (COM1_PORT,)) -> bytes:
    """The 256-byte BDA for a PC with ``com_ports`` (at most four)."""
    if len(com_ports) > 4:
        raise ValueError("the BDA has room for four COM ports")
    bda = bytearray(BDA_SIZE)
    struct.pack_into("<4H", bda, 0x00, *com_ports, *([0] * (4 - len(com_ports))))
    # Equipment word: bits 9-11 count the serial ports; bit 1 says an FPU is present.
    struct.pack_into("<H", bda, 0x10, (len(com_ports) << 9) | (1 << 1))
    struct.pack_into("<H", bda, 0x0E, EBDA_SEGMENT)
    struct.pack_into("<H", bda, 0x13, BASE_MEMORY_KIB)
    return bytes(bda)
