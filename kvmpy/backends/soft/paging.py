"""x86 address translation for the software backend: what the MMU would do.

The emulator translates for itself while it runs; the backend needs the
same walk outside it, to deliver events (the IDT, the TSS and the stack
are linear addresses) and for ``Vcpu.translate``.  Pure functions over a
``read_phys(gpa, size) -> bytes | None`` callback (None: not RAM).
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from kvmpy.backends.base import Translation
from kvmpy.x86.registers import CR0_PG, CR4_PAE, CR4_PSE, EFER_LMA

ReadPhys = Callable[[int, int], "bytes | None"]

_PRESENT = 1 << 0
_WRITABLE = 1 << 1
_USER = 1 << 2
_HUGE = 1 << 7
_ADDRESS_64 = 0x000F_FFFF_FFFF_F000


def _entry(read_phys: ReadPhys, gpa: int, size: int) -> int | None:
    data = read_phys(gpa, size)
    if data is None:
        return None
    return int(struct.unpack("<I" if size == 4 else "<Q", data)[0])


def translate(
    linear: int, cr0: int, cr3: int, cr4: int, efer: int, read_phys: ReadPhys
) -> Translation | None:
    """The physical address behind ``linear`` under these control registers; None: fault."""
    if not cr0 & CR0_PG:
        return Translation(linear & 0xFFFF_FFFF, True, True)
    writable = user = True
    if efer & EFER_LMA or cr4 & CR4_PAE:
        if efer & EFER_LMA:
            levels = [(39, cr3 & _ADDRESS_64), (30, None), (21, None), (12, None)]
        else:
            linear &= 0xFFFF_FFFF
            pdpte = _entry(read_phys, (cr3 & 0xFFFF_FFE0) + ((linear >> 30) & 3) * 8, 8)
            if pdpte is None or not pdpte & _PRESENT:
                return None
            levels = [(21, pdpte & _ADDRESS_64), (12, None)]
        table = levels[0][1]
        assert table is not None
        for depth, (shift, _) in enumerate(levels):
            entry = _entry(read_phys, table + ((linear >> shift) & 0x1FF) * 8, 8)
            if entry is None or not entry & _PRESENT:
                return None
            writable = writable and bool(entry & _WRITABLE)
            user = user and bool(entry & _USER)
            last = depth == len(levels) - 1
            if last or (shift in (21, 30) and entry & _HUGE):
                page = (entry & _ADDRESS_64) & ~((1 << shift) - 1)
                return Translation(page | (linear & ((1 << shift) - 1)), writable, user)
            table = entry & _ADDRESS_64
        return None  # not reached: the last level always returns
    linear &= 0xFFFF_FFFF
    pde = _entry(read_phys, (cr3 & 0xFFFF_F000) + (linear >> 22) * 4, 4)
    if pde is None or not pde & _PRESENT:
        return None
    if pde & _HUGE and cr4 & CR4_PSE:
        base = (pde & 0xFFC0_0000) | ((pde >> 13) & 0xFF) << 32
        return Translation(base | (linear & 0x3F_FFFF), bool(pde & _WRITABLE), bool(pde & _USER))
    pte = _entry(read_phys, (pde & 0xFFFF_F000) + ((linear >> 12) & 0x3FF) * 4, 4)
    if pte is None or not pte & _PRESENT:
        return None
    return Translation(
        (pte & 0xFFFF_F000) | (linear & 0xFFF),
        bool(pde & pte & _WRITABLE),
        bool(pde & pte & _USER),
    )
