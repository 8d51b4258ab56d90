"""x86's part of running a vCPU: what the generic run loop hands over.

The loop in ``kvmpy/runloop.py`` handles the exits every architecture has
(I/O, MMIO, shutdown, internal errors); a HLT's meaning and any exit it does
not know come here.  A second architecture would bring its own ``Arch``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmpy.backends.base import MpState
from kvmpy.outcome import Outcome, OutcomeKind
from kvmpy.x86.complete import Completer, xsave_layout
from kvmpy.x86.cpuid import CpuidEntry, vcpu_cpuid
from kvmpy.x86.registers import RFLAGS_IF
from kvmpy.x86.topology import CpuTopology, apply_topology

if TYPE_CHECKING:
    from kvmpy.backends.base import Vcpu
    from kvmpy.memory import GuestMemory


class X86Arch:
    """The x86 hooks: vCPU set-up, HLT, and exits beyond the generic ones."""

    name = "x86_64"

    def __init__(self, supported_cpuid: list[CpuidEntry], topology: CpuTopology) -> None:
        self.supported_cpuid = supported_cpuid
        self.topology = topology
        leaf1 = next((e for e in supported_cpuid if e.function == 1), None)
        # (EAX, EDX) of leaf 1: the CPU signature and features the MP table records.
        self.cpu_signature = (leaf1.eax, leaf1.edx) if leaf1 else (0, 0)
        # Finishes instructions the backend could not emulate (kvmpy/x86/complete.py).
        self.completer = Completer(xsave_layout(supported_cpuid))

    def attach_memory(self, memory: GuestMemory) -> None:
        """Guest RAM, which completing memory instructions and IDT checks need."""
        self.completer.memory = memory

    def complete(self, vcpu: Vcpu) -> bool:
        """An internal error: True if the instruction was completed and the vCPU may go on."""
        return self.completer.complete(vcpu)

    def init_vcpu(self, vcpu: Vcpu, index: int, irqchip: bool) -> None:
        """CPUID with this vCPU's APIC ID; application processors wait for INIT/SIPI."""
        table = vcpu_cpuid(self.supported_cpuid, apic_id=index)
        vcpu.set_cpuid(apply_topology(table, self.topology, apic_id=index))
        if index and irqchip:
            vcpu.set_mp_state(MpState.WAIT_FOR_SIPI)

    @staticmethod
    def halt(vcpu: Vcpu, has_irqchip: bool) -> Outcome | None:
        """A HLT exit: go on if an interrupt can still wake the vCPU, else end the run."""
        regs = vcpu.get_regs()
        if regs.rflags & RFLAGS_IF and has_irqchip:
            return None
        why = "interrupts disabled" if not regs.rflags & RFLAGS_IF else "no interrupt controller"
        return Outcome(
            OutcomeKind.HALT,
            f"vCPU {vcpu.index}: guest halted ({why}) at RIP={regs.rip:#x}",
            vcpu=vcpu.index,
        )

    @staticmethod
    def other_exit(vcpu: Vcpu) -> Outcome | None:
        """An exit the generic loop does not know: none is handled on x86 yet."""
        detail, code = vcpu.describe_exit()
        return Outcome(
            OutcomeKind.CRASH,
            f"unhandled exit {vcpu.exit_name()}",
            vcpu=vcpu.index,
            detail=detail,
            code=code,
        )
