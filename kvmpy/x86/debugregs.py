"""x86 debug registers (SDM Vol. 3B, 18.2) shared out among gdb's breakpoints and watchpoints.

DR0-DR3 hold linear addresses; DR7 enables each one (its L bit) and says
what it watches (R/W) and how many bytes (LEN); DR6 says which one fired,
or BS for a single step.  A data watchpoint covers 1, 2, 4 or 8 aligned
bytes, so gdb's ``watch`` on an unaligned range takes several registers.
"""

from __future__ import annotations

from kvmpy.debug.gdbproto import (
    BP_HARDWARE,
    BP_SOFTWARE,
    E_INVAL,
    E_NOSPC,
    WATCH_ACCESS,
    WATCH_READ,
    WATCH_REASONS,
    WATCH_WRITE,
    TargetError,
)
from kvmpy.records import Record

DR6_BS = 1 << 14  # single-step
DR_SLOTS = 4
# DR7's R/W field for each gdb breakpoint type: x86 has no read-only watchpoint,
# so a read watchpoint watches every access.
DR7_RW = {BP_SOFTWARE: 0b00, BP_HARDWARE: 0b00, WATCH_WRITE: 0b01}
DR7_RW.update({WATCH_READ: 0b11, WATCH_ACCESS: 0b11})
DR7_LEN = {1: 0b00, 2: 0b01, 8: 0b10, 4: 0b11}  # bytes -> DR7's LEN field
DEBUG_VECTOR = 1  # #DB
BREAKPOINT_VECTOR = 3  # #BP, from int3
INT3 = 0xCC
LINEAR_LIMIT = 1 << 64  # no linear address reaches this


def dr7_bits(index: int, rw: int, length: int) -> int:
    """DR7's enable, R/W and LEN bits for debug register ``index``."""
    return 1 << (2 * index) | rw << (16 + 4 * index) | length << (18 + 4 * index)


class Slot(Record):
    """One debug register's worth of a gdb breakpoint or watchpoint."""

    kind: int  # the Z packet type
    address: int  # what gdb asked for (reported back on a watchpoint hit)
    length: int
    linear: int  # the aligned piece this register covers
    size: int

    @property
    def is_data(self) -> bool:
        return self.kind in WATCH_REASONS


def split_watch(address: int, length: int, allow_8: bool) -> list[tuple[int, int]]:
    """Cover [address, address+length) with aligned 1/2/4(/8)-byte pieces."""
    if length <= 0:
        raise ValueError(f"watch length {length}")
    sizes = (8, 4, 2, 1) if allow_8 else (4, 2, 1)
    pieces = []
    end = address + length
    while address < end:
        size = next(s for s in sizes if address % s == 0 and address + s <= end)
        pieces.append((address, size))
        address += size
    return pieces


class DebugRegisters:
    """DR0-DR3 shared out among gdb's hardware breakpoints and watchpoints."""

    def __init__(self, slots: int = DR_SLOTS) -> None:
        self.slots: list[Slot | None] = [None] * slots

    def insert(self, kind: int, address: int, length: int, allow_8: bool = True) -> None:
        if not 0 <= address < LINEAR_LIMIT or not 0 <= length <= LINEAR_LIMIT - address:
            raise TargetError(f"{address:#x}+{length:#x} is past the address space", E_INVAL)
        if self.find(kind, address, length):
            return
        is_data = kind in WATCH_REASONS
        free = [i for i, slot in enumerate(self.slots) if slot is None]
        if is_data and length > 8 * len(free):  # more than the free registers can cover
            raise TargetError(f"{length} bytes to watch, {len(free)} debug registers free", E_NOSPC)
        pieces = split_watch(address, length, allow_8) if is_data else [(address, 1)]
        if len(pieces) > len(free):
            raise TargetError(f"{len(pieces)} debug registers needed, {len(free)} free", E_NOSPC)
        for i, (linear, size) in zip(free, pieces, strict=False):
            self.slots[i] = Slot(kind, address, length, linear, size)

    def find(self, kind: int, address: int, length: int) -> list[int]:
        return [
            i
            for i, slot in enumerate(self.slots)
            if slot is not None
            and (slot.kind, slot.address, slot.length) == (kind, address, length)
        ]

    def remove(self, kind: int, address: int, length: int) -> None:
        for i in self.find(kind, address, length):
            self.slots[i] = None

    def clear(self) -> None:
        self.slots = [None] * len(self.slots)

    @property
    def active(self) -> bool:
        return any(slot is not None for slot in self.slots)

    def has_exec_at(self, linear: int) -> bool:
        return any(
            slot is not None and not slot.is_data and slot.linear == linear for slot in self.slots
        )

    def debugreg(self, with_exec: bool = True) -> list[int]:
        """``kvm_guest_debug.arch.debugreg``: DR0-DR3 and DR7 (L bits, R/W, LEN)."""
        regs = [0] * 8
        dr7 = 0
        for i, slot in enumerate(self.slots):
            if slot is None or (not with_exec and not slot.is_data):
                continue
            regs[i] = slot.linear
            length = DR7_LEN[slot.size] if slot.is_data else 0
            dr7 |= dr7_bits(i, DR7_RW[slot.kind], length)
        regs[7] = dr7
        return regs

    def hit(self, dr6: int) -> Slot | None:
        """The slot DR6 names; a watchpoint wins over an instruction breakpoint."""
        hits = [slot for i, slot in enumerate(self.slots) if slot is not None and dr6 & (1 << i)]
        hits.sort(key=lambda slot: not slot.is_data)
        return hits[0] if hits else None
