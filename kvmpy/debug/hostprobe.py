"""Which guest-debug features this host's KVM delivers, found by running a tiny guest.

Hosts differ: on PVM (shared/HOST-KVM.md) int3 at CPL0 is an emulation
failure rather than a KVM_EXIT_DEBUG.  The gdb stub asks once, at start-up,
and refuses what would not work instead of letting gdb wait for a stop that
never comes.
"""

from __future__ import annotations

from kvmpy.debug.coreapi import ExitObserver, Vcpu
from kvmpy.debug.gdbproto import WATCH_WRITE
from kvmpy.records import Record
from kvmpy.x86.debugregs import BREAKPOINT_VECTOR, DR6_BS, DR7_LEN, DR7_RW, dr7_bits


class DebugSupport(Record):
    """Which KVM_SET_GUEST_DEBUG features a probe guest (long mode, CPL0) saw work."""

    single_step: bool = True
    hw_breakpoints: bool = True
    watchpoints: bool = True
    sw_breakpoints: bool = False

    def describe(self) -> str:
        def word(ok: bool) -> str:
            return "yes" if ok else "no"

        return (
            f"single-step {word(self.single_step)}, hardware breakpoints "
            f"{word(self.hw_breakpoints)}, watchpoints {word(self.watchpoints)}, "
            f"int3 breakpoints {word(self.sw_breakpoints)}"
        )


# movl $1, 0x101000 ; nop ; int3 ; hlt  -- at 1 MiB, in long mode
_PROBE_CODE = bytes.fromhex("c70425001010000100000090ccf4")
_PROBE_ENTRY = 0x100000
_PROBE_DATA = 0x101000
_PROBE_NOP = _PROBE_ENTRY + 11


class _Probe(ExitObserver):
    def __init__(self) -> None:
        self.seen: set[str] = set()

    def on_start(self, vcpu: Vcpu) -> None:
        self._arm(vcpu, step=True, exec_bp=True)

    @staticmethod
    def _arm(vcpu: Vcpu, step: bool, exec_bp: bool) -> None:
        dr7 = dr7_bits(0, DR7_RW[WATCH_WRITE], DR7_LEN[4])
        if exec_bp:
            dr7 |= dr7_bits(1, 0, 0)
        vcpu.set_guest_debug(
            single_step=step,
            breakpoints=[_PROBE_DATA, _PROBE_NOP, 0, 0, 0, 0, 0, dr7],
            software_breakpoints=True,
        )

    def on_exit(self, vcpu: Vcpu, reason: int, run_ns: int, handle_ns: int) -> None:
        pass

    def on_debug(self, vcpu: Vcpu) -> bool:
        exit_ = vcpu.exit
        if exit_.debug_exception == BREAKPOINT_VECTOR:
            self.seen.add("int3")
            regs = vcpu.get_regs()
            if regs.rip == _PROBE_NOP + 1:  # still on the int3: skip it
                regs.rip += 1
                vcpu.set_regs(regs)
            vcpu.set_guest_debug(enable=False)
            return True
        if exit_.debug_dr6 & DR6_BS:
            self.seen.add("step")
        if exit_.debug_dr6 & 1:
            self.seen.add("watch")
        if exit_.debug_dr6 & 2:
            self.seen.add("break")
        self._arm(vcpu, step=False, exec_bp="break" not in self.seen)
        return True

    def on_interrupt(self, vcpu: Vcpu) -> None:
        pass


def probe_debug_support(
    kvm_path: str | None = None, timeout: float = 2.0, backend: str = "kvm"
) -> DebugSupport:
    """Run a tiny guest to see which debug features this host's KVM (or ``backend``) delivers.

    It writes a watched word with single-step on, runs into an instruction
    breakpoint, then executes int3 with USE_SW_BP.  Takes a few milliseconds.
    """
    from kvmpy.loaders import LoadPlan, LoadSegment
    from kvmpy.machine import Machine

    probe = _Probe()
    try:
        with Machine(
            mem_size=4 << 20, irqchip=False, kvm_path=kvm_path, backend=backend
        ) as machine:
            plan = LoadPlan(
                "debug probe",
                _PROBE_ENTRY,
                [LoadSegment(_PROBE_ENTRY, _PROBE_CODE, len(_PROBE_CODE))],
            )
            machine.load(plan, mode="long")
            machine.observer = probe
            machine.run(timeout=timeout)
    except (OSError, ValueError):  # no such backend here, or it cannot run the probe
        return DebugSupport(False, False, False, False)
    seen = probe.seen
    return DebugSupport("step" in seen, "break" in seen, "watch" in seen, "int3" in seen)
