"""Exception and interrupt delivery, done by the backend because the emulator does not.

Unicorn reports a CPU exception or an ``int n`` to a hook and then carries
on as if nothing happened; a real CPU would look up the handler in the IVT
(real mode) or the IDT (protected and long mode), push a frame, and jump.
``deliver`` does that on a ``CpuAccess`` (registers and linear memory), and
follows the SDM's rules for a fault during delivery: the second fault is
delivered instead, two contributory faults (or a page fault and then a
contributory or page fault) make a double fault (#DF), and a fault while
delivering #DF is a triple fault: the CPU shuts down.
"""

from __future__ import annotations

import enum
from typing import Protocol

from kvmpy.records import Record, replace
from kvmpy.x86.modes import segment_from_descriptor
from kvmpy.x86.registers import CR0_PE, EFER_LMA, RFLAGS_IF, RFLAGS_TF, Segment

DIVIDE_ERROR = 0
DEBUG = 1
BREAKPOINT = 3
INVALID_OPCODE = 6
DOUBLE_FAULT = 8
INVALID_TSS = 10
SEGMENT_NOT_PRESENT = 11
STACK_FAULT = 12
GENERAL_PROTECTION = 13
PAGE_FAULT = 14

# Faults (not traps, aborts or interrupts): their saved RFLAGS has RF set, so
# that returning to the faulting instruction does not hit a breakpoint there again.
FAULT_VECTORS = frozenset({0, 5, 6, 7, 10, 11, 12, 13, 14, 16, 17, 19, 20, 21})
# Vectors that push an error code (SDM Vol. 3A, table 6-1).
ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})
_CONTRIBUTORY = frozenset({DIVIDE_ERROR, INVALID_TSS, SEGMENT_NOT_PRESENT, STACK_FAULT, 13})

RFLAGS_NT = 1 << 14
RFLAGS_RF = 1 << 16
RFLAGS_VM = 1 << 17
RFLAGS_AC = 1 << 18

GATE_TASK = 0x5
GATE_INTERRUPT_16 = 0x6
GATE_TRAP_16 = 0x7
GATE_INTERRUPT = 0xE  # 32-bit, or 64-bit in long mode
GATE_TRAP = 0xF


class Fault(Exception):
    """A fault raised while delivering an event: vector and error code."""

    def __init__(self, vector: int, error_code: int = 0) -> None:
        super().__init__(vector, error_code)
        self.vector = vector
        self.error_code = error_code


class Unsupported(Exception):
    """Delivery needs something this backend does not model (a task gate, a ring switch)."""


class Result(enum.Enum):
    DELIVERED = "delivered"
    SHUTDOWN = "shutdown"  # triple fault


class Frame(Record, frozen=False):
    """What the CPU state is at the event: enough to build the frame and find the handler."""

    cr0: int
    efer: int
    rip: int
    rsp: int
    rflags: int
    cs: Segment
    ss: Segment
    idt_base: int
    idt_limit: int
    gdt_base: int
    gdt_limit: int
    tr_base: int

    @property
    def cpl(self) -> int:
        return self.ss.dpl if self.cr0 & CR0_PE else 0


class CpuAccess(Protocol):
    """What delivery needs from the vCPU: its state, linear memory, and the jump."""

    def frame(self) -> Frame: ...

    def read_linear(self, address: int, size: int) -> bytes:
        """``size`` bytes at a linear address; raise Fault(PAGE_FAULT) when not mapped."""

    def write_linear(self, address: int, data: bytes) -> None: ...

    def jump(self, cs: Segment, rip: int, rsp: int, rflags: int, ss: Segment | None) -> None:
        """Load CS (and SS on a stack switch) with their hidden state, RIP, RSP and RFLAGS."""


def _is_double_fault(first: int, second: int) -> bool:
    if first == PAGE_FAULT:
        return second in _CONTRIBUTORY or second == PAGE_FAULT
    return first in _CONTRIBUTORY and second in _CONTRIBUTORY


def deliver(cpu: CpuAccess, vector: int, error_code: int | None, software: bool = False) -> Result:
    """Deliver ``vector`` (with ``error_code`` when it has one) as the CPU would.

    ``software``: an INT n, INT3 or INTO, which is never a fault.
    """
    current, code = vector, error_code
    fault = vector in FAULT_VECTORS and not software
    while True:
        try:
            _deliver_once(cpu, current, code, fault)
            return Result.DELIVERED
        except Fault as nested:
            if current == DOUBLE_FAULT:
                return Result.SHUTDOWN
            if _is_double_fault(current, nested.vector):
                current, code, fault = DOUBLE_FAULT, 0, False
            else:
                current, code, fault = nested.vector, nested.error_code, True
                if current not in ERROR_CODE_VECTORS:
                    code = None


def _u(data: bytes) -> int:
    return int.from_bytes(data, "little")


def _idt_error(vector: int) -> int:
    return vector * 8 + 2  # the error code's IDT bit (SDM 6.13)


def _deliver_once(cpu: CpuAccess, vector: int, error_code: int | None, fault: bool) -> None:
    state = cpu.frame()
    if fault:
        state.rflags |= RFLAGS_RF
    if not state.cr0 & CR0_PE:
        _deliver_real(cpu, state, vector)
    elif state.efer & EFER_LMA:
        _deliver_long(cpu, state, vector, error_code)
    else:
        _deliver_protected(cpu, state, vector, error_code)


def _deliver_real(cpu: CpuAccess, state: Frame, vector: int) -> None:
    if vector * 4 + 3 > state.idt_limit:
        raise Fault(GENERAL_PROTECTION, 0)
    entry = _u(cpu.read_linear(state.idt_base + vector * 4, 4))
    sp = state.rsp & 0xFFFF
    for value in (state.rflags & 0xFFFF, state.cs.selector, state.rip & 0xFFFF):
        sp = (sp - 2) & 0xFFFF
        cpu.write_linear(state.ss.base + sp, value.to_bytes(2, "little"))
    rflags = state.rflags & ~(RFLAGS_IF | RFLAGS_TF | RFLAGS_AC | RFLAGS_RF)
    selector = entry >> 16
    cs = replace(state.cs, selector=selector, base=selector << 4)
    cpu.jump(cs, entry & 0xFFFF, (state.rsp & ~0xFFFF) | sp, rflags, None)


def _descriptor(cpu: CpuAccess, state: Frame, selector: int) -> Segment:
    """The GDT descriptor for ``selector`` as a loaded segment; #GP if there is none."""
    if selector & 0xFFFC == 0 or selector & 4 or (selector | 7) > state.gdt_limit:
        raise Fault(GENERAL_PROTECTION, selector & 0xFFFC)  # null, in an LDT, or past the GDT
    raw = _u(cpu.read_linear(state.gdt_base + (selector & ~7), 8))
    return segment_from_descriptor(selector, raw)


def _code_segment(cpu: CpuAccess, state: Frame, selector: int) -> Segment:
    segment = _descriptor(cpu, state, selector)
    if not segment.s or not segment.type & 0x8:
        raise Fault(GENERAL_PROTECTION, selector & 0xFFFC)
    if not segment.present:
        raise Fault(SEGMENT_NOT_PRESENT, selector & 0xFFFC)
    return segment


def _read_gate(cpu: CpuAccess, state: Frame, vector: int, size: int) -> tuple[int, int, int]:
    """(gate type, selector, raw gate) for ``vector``, with the checks the CPU makes."""
    if vector * size + size - 1 > state.idt_limit:
        raise Fault(GENERAL_PROTECTION, _idt_error(vector))
    raw = _u(cpu.read_linear(state.idt_base + vector * size, size))
    kind = (raw >> 40) & 0xF
    if not (raw >> 47) & 1:
        raise Fault(SEGMENT_NOT_PRESENT, _idt_error(vector))
    return kind, (raw >> 16) & 0xFFFF, raw


def _flags_after(rflags: int, kind: int) -> int:
    rflags &= ~(RFLAGS_TF | RFLAGS_NT | RFLAGS_RF | RFLAGS_VM)
    if kind in (GATE_INTERRUPT, GATE_INTERRUPT_16):
        rflags &= ~RFLAGS_IF
    return rflags


def _push(cpu: CpuAccess, base: int, sp: int, mask: int, width: int, values: list[int]) -> int:
    for value in values:
        sp = (sp - width) & mask
        cpu.write_linear(
            (base + sp) & 0xFFFF_FFFF_FFFF_FFFF,
            (value & ((1 << 8 * width) - 1)).to_bytes(width, "little"),
        )
    return sp


def _deliver_protected(cpu: CpuAccess, state: Frame, vector: int, error_code: int | None) -> None:
    kind, selector, raw = _read_gate(cpu, state, vector, 8)
    if kind == GATE_TASK:
        raise Unsupported(f"vector {vector} goes through a task gate")
    if kind not in (GATE_INTERRUPT, GATE_TRAP, GATE_INTERRUPT_16, GATE_TRAP_16):
        raise Fault(GENERAL_PROTECTION, _idt_error(vector))
    cs = _code_segment(cpu, state, selector)
    offset = (raw & 0xFFFF) | ((raw >> 48) & 0xFFFF) << 16
    width = 4 if kind in (GATE_INTERRUPT, GATE_TRAP) else 2
    values = [state.rflags, state.cs.selector, state.rip]
    if error_code is not None:
        values.append(error_code)
    new_ss: Segment | None = None
    ss, rsp = state.ss, state.rsp
    if cs.dpl < state.cpl and not cs.type & 0x4:  # to an inner ring: the TSS's stack
        tss = state.tr_base + 8 * cs.dpl
        new_esp = _u(cpu.read_linear(tss + 4, 4))
        new_selector = _u(cpu.read_linear(tss + 8, 2))
        new_ss = _descriptor(cpu, state, new_selector)
        if new_ss.dpl != cs.dpl or not new_ss.present:
            raise Fault(INVALID_TSS, new_selector & 0xFFFC)
        values[:0] = [state.ss.selector, state.rsp]
        ss, rsp = new_ss, new_esp
    stack_mask = 0xFFFF_FFFF if ss.db else 0xFFFF
    sp = _push(cpu, ss.base, rsp & stack_mask, stack_mask, width, values)
    cs.selector = (selector & ~3) | cs.dpl
    if width == 2:
        offset &= 0xFFFF
    cpu.jump(cs, offset, (rsp & ~stack_mask) | sp, _flags_after(state.rflags, kind), new_ss)


def _deliver_long(cpu: CpuAccess, state: Frame, vector: int, error_code: int | None) -> None:
    kind, selector, raw = _read_gate(cpu, state, vector, 16)
    if kind not in (GATE_INTERRUPT, GATE_TRAP):
        raise Fault(GENERAL_PROTECTION, _idt_error(vector))
    cs = _code_segment(cpu, state, selector)
    if not cs.l or cs.db:
        raise Fault(GENERAL_PROTECTION, selector & 0xFFFC)
    offset = (raw & 0xFFFF) | ((raw >> 48) & 0xFFFF) << 16 | ((raw >> 64) & 0xFFFF_FFFF) << 32
    ist = (raw >> 32) & 7
    new_ss: Segment | None = None
    rsp = state.rsp
    if cs.dpl < state.cpl and not cs.type & 0x4:
        rsp = _u(cpu.read_linear(state.tr_base + 4 + 8 * cs.dpl, 8))
        # In long mode the new SS is the null selector with RPL = the new CPL.
        new_ss = Segment(selector=cs.dpl, base=0, limit=0, type=0, present=0, dpl=cs.dpl, s=0)
    if ist:
        rsp = _u(cpu.read_linear(state.tr_base + 0x24 + 8 * (ist - 1), 8))
    rsp &= ~0xF
    values = [state.ss.selector, state.rsp, state.rflags, state.cs.selector, state.rip]
    if error_code is not None:
        values.append(error_code)
    rsp = _push(cpu, 0, rsp, 0xFFFF_FFFF_FFFF_FFFF, 8, values)
    cs.selector = (selector & ~3) | cs.dpl
    cpu.jump(cs, offset, rsp, _flags_after(state.rflags, kind), new_ss)
