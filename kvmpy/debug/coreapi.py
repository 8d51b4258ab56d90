"""The names the gdb stub and the host probe take from kvmpy's core, in one place.

The core is being reorganised (the KVM code moves behind a backend boundary,
outcomes get their own module): when a name moves, only this file changes.
"""

from __future__ import annotations

from kvmpy._kvm import lib
from kvmpy.kvm import KVM_PATH, Fpu, KvmError, Vcpu
from kvmpy.runloop import STATUS_INTERRUPTED, ExitObserver, Outcome

__all__ = [
    "CRASH_EXITS",
    "GUESTDBG_ENABLE",
    "GUESTDBG_SINGLESTEP",
    "GUESTDBG_USE_HW_BP",
    "GUESTDBG_USE_SW_BP",
    "KVM_PATH",
    "STATUS_INTERRUPTED",
    "ExitObserver",
    "Fpu",
    "KvmError",
    "Outcome",
    "Vcpu",
]

# KVM_SET_GUEST_DEBUG control flags.
GUESTDBG_ENABLE: int = lib.KVM_GUESTDBG_ENABLE
GUESTDBG_SINGLESTEP: int = lib.KVM_GUESTDBG_SINGLESTEP
GUESTDBG_USE_HW_BP: int = lib.KVM_GUESTDBG_USE_HW_BP
GUESTDBG_USE_SW_BP: int = lib.KVM_GUESTDBG_USE_SW_BP

# Exit reasons after which the run loop ends the VM as a crash.
CRASH_EXITS: tuple[int, ...] = (
    lib.KVM_EXIT_INTERNAL_ERROR,
    lib.KVM_EXIT_SHUTDOWN,
    lib.KVM_EXIT_FAIL_ENTRY,
)
