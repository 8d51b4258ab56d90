"""Single-stepping: run the guest one instruction at a time and show each one.

KVM_SET_GUEST_DEBUG with SINGLESTEP makes every instruction end in a
KVM_EXIT_DEBUG.  At each one the stepper prints the registers the last
instruction changed, then the instruction about to run.  Port I/O and MMIO
exits in between are handled by the run loop as usual, so stepping over an
``out`` or a ``hlt`` behaves as it would without stepping.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, TextIO

from kvmpy.backends.base import BackendError
from kvmpy.backends.exits import ExitKind
from kvmpy.debug.guestview import capstone_mode, code_address, disassemble, read_linear
from kvmpy.debug.trace import format_address
from kvmpy.outcome import Outcome, OutcomeKind
from kvmpy.records import fields
from kvmpy.runloop import ExitObserver
from kvmpy.x86.registers import RFLAGS_IF, Regs, cpu_mode

if TYPE_CHECKING:
    from kvmpy.backends.base import Vcpu
    from kvmpy.memory import GuestMemory

_REG_FIELDS = tuple(field.name for field in fields(Regs))


def changed_registers(before: Regs, after: Regs) -> list[tuple[str, int, int]]:
    """(name, old, new) for every register that differs, RIP left out."""
    return [
        (name, getattr(before, name), getattr(after, name))
        for name in _REG_FIELDS
        if name != "rip" and getattr(before, name) != getattr(after, name)
    ]


class SingleStepper(ExitObserver):
    """Steps vCPU 0 and writes each instruction to ``output``.

    ``stop`` ends the run: after ``max_steps`` instructions, and after a HLT
    that nothing could wake.  (Under single-step KVM traps right after a HLT
    instead of halting, so the stepper decides what the halt means: without
    an irqchip, or with interrupts off, the guest is done, as in a plain run.)
    """

    def __init__(
        self,
        memory: GuestMemory,
        output: TextIO,
        stop: Callable[[Outcome], None],
        *,
        max_steps: int | None = None,
        has_irqchip: bool = True,
    ) -> None:
        self.memory = memory
        self.output = output
        self.stop = stop
        self.max_steps = max_steps
        self.has_irqchip = has_irqchip
        self.steps = 0
        self._next_is_hlt = False
        self._previous: Regs | None = None
        self._shown_by_exit: int | None = None
        self._done = False
        self._lock = threading.Lock()

    def on_start(self, vcpu: Vcpu) -> None:
        if vcpu.index == 0:
            vcpu.set_guest_debug(single_step=True)
            self._show(vcpu)

    def on_exit(self, vcpu: Vcpu, reason: int, run_ns: int, handle_ns: int) -> None:
        # KVM does not always report the single-step trap of an instruction
        # that exited to userspace (an OUT, an MMIO write): if RIP moved, that
        # instruction is done, so count the step here, and not again when the
        # debug exit for the same RIP arrives.
        if vcpu.index != 0 or reason == ExitKind.DEBUG or self._done:
            return
        regs = vcpu.get_regs()
        if self._previous is not None and regs.rip != self._previous.rip:
            self._step(vcpu, regs)
            self._shown_by_exit = regs.rip

    def on_debug(self, vcpu: Vcpu) -> bool:
        if vcpu.index != 0:
            return False
        regs = vcpu.get_regs()
        if self._shown_by_exit == regs.rip:
            self._shown_by_exit = None
        elif not self._done:
            self._step(vcpu, regs)
        return True

    def _step(self, vcpu: Vcpu, regs: Regs) -> None:
        self.steps += 1
        self._shown_by_exit = None
        halted = self._next_is_hlt and not (self.has_irqchip and regs.rflags & RFLAGS_IF)
        if halted or (self.max_steps is not None and self.steps >= self.max_steps):
            self._done = True
            self._show(vcpu, regs, next_instruction=False)
            if halted:
                enabled = regs.rflags & RFLAGS_IF
                why = "no interrupt controller" if enabled else "interrupts disabled"
                message = f"vCPU 0: guest halted ({why}) at RIP={regs.rip:#x}"
                self.stop(Outcome(OutcomeKind.HALT, message))
            else:
                message = f"stopped after {self.steps} steps"
                self.stop(Outcome(OutcomeKind.STEP_LIMIT, message))
            return
        self._show(vcpu, regs)

    def _show(self, vcpu: Vcpu, regs: Regs | None = None, next_instruction: bool = True) -> None:
        regs = regs or vcpu.get_regs()
        sregs = vcpu.get_sregs()
        lines = []
        if self._previous is not None:
            for name, old, new in changed_registers(self._previous, regs):
                lines.append(f"{'':>10}{name}: {old:#x} -> {new:#x}")
        self._previous = regs
        if next_instruction:
            linear = code_address(sregs, regs.rip)
            try:
                code = read_linear(vcpu, self.memory, sregs, linear, 15)
            except BackendError:
                code = b""
            decoded = disassemble(code, linear, capstone_mode(sregs), 1)
            text = decoded[0][2] if decoded else f"(undecodable: {code.hex(' ') or 'unreadable'})"
            self._next_is_hlt = text == "hlt"
            where = format_address(sregs, regs.rip)
            lines.append(f"step {self.steps:<5}{cpu_mode(sregs):<9} {where:<11} {text}")
        with self._lock:
            self.output.write("".join(line + "\n" for line in lines))
            self.output.flush()
