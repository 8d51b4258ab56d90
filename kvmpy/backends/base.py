"""The backend boundary: what the run loop and ``Machine`` need from a VM and a vCPU.

A backend runs guest code: KVM (``backends/kvm``), a CPU emulator, or a fake
with scripted exits in the tests.  Nothing above this package imports a
backend's own modules; everything goes through these protocols, the exit
kinds in ``exits.py`` and ``open_backend``.

Register state crosses the boundary as the architecture's records
(``kvmpy.x86.registers`` for x86); a second architecture would bring its
own.  State a backend keeps for itself (KVM's LAPIC, xsave and irqchip
structs) crosses it only as opaque, JSON-safe dicts for snapshots.
"""

from __future__ import annotations

import enum
import errno
import mmap
import os
from collections import Counter
from collections.abc import Iterable
from typing import Any, Protocol

from kvmpy.backends.exits import ExitWindow
from kvmpy.records import Record
from kvmpy.x86.cpuid import CpuidEntry
from kvmpy.x86.registers import Fpu, Regs, Sregs

KVM_PATH = "/dev/kvm"  # the KVM backend's default device


class BackendError(OSError):
    """A backend operation failed (an ioctl, opening /dev/kvm, an emulator call)."""

    def __init__(self, operation: str, err: int, hint: str = "") -> None:
        message = f"{operation} failed: {os.strerror(err)} ({errno.errorcode.get(err, err)})"
        if hint:
            message += f"; {hint}"
        super().__init__(err, message)
        self.operation = operation

    def __str__(self) -> str:
        return str(self.strerror)


class Capability(str, enum.Enum):
    """What a backend can do beyond running code and reporting exits."""

    IRQCHIP = "irqchip"  # in-kernel interrupt controllers and timer (LAPIC, IOAPIC, PIC, PIT)
    SMP = "smp"  # more than one vCPU
    GUEST_DEBUG = "guest-debug"  # single-step through set_guest_debug
    HW_BREAKPOINTS = "hw-breakpoints"  # debug registers through set_guest_debug
    DIRTY_LOG = "dirty-log"  # dirty_pages() on a logged slot
    EXIT_STATS = "exit-stats"  # enable_stats()/collect_stats() without slowing the loop
    SNAPSHOT = "snapshot"  # save_state()/load_state() on VM and vCPUs


class MpState(enum.IntEnum):
    """A vCPU's multiprocessing state, as the boundary names it."""

    RUNNABLE = 0
    WAIT_FOR_SIPI = 1  # an application processor before INIT/SIPI
    HALTED = 2
    OTHER = 3


class Translation(Record):
    """A linear address translated through the guest's paging."""

    physical_address: int
    writeable: bool
    usermode: bool


class InterruptController(str, enum.Enum):
    """The in-kernel interrupt controllers a GSI can be routed to."""

    PIC_MASTER = "pic-master"
    PIC_SLAVE = "pic-slave"
    IOAPIC = "ioapic"


class IrqRoute(Record):
    """Global system interrupt ``gsi`` drives ``pin`` of ``controller``."""

    gsi: int
    controller: InterruptController
    pin: int


# One exit-statistics row: [count, ns in run(), ns in kvmpy's handlers].
StatsTable = dict[int, list[int]]


class Vcpu(Protocol):
    """One virtual CPU.  ``run`` and the fields of ``exit`` are the hot path."""

    index: int
    # Who runs the code, for messages ("KVM", "the CPU emulator").
    backend_name: str
    # The decoded last exit (ExitRecord fields), read right after run() returns:
    # one object for the vCPU's life, updated in place by every run().
    exit: Any
    # Where IN and MMIO-read results go (at exit.data_offset) and string I/O data lives.
    io_buffer: Any
    # The thread that runs this vCPU (set by Machine), so kick() can interrupt it.
    thread_ident: int | None

    def run(self) -> int:
        """Run until the next exit: an ExitKind value, or -errno (-EINTR: kicked)."""

    def kick(self) -> None:
        """Make run() return -EINTR now, or at its next call.  Safe from any thread."""

    def clear_kick(self) -> None: ...

    def close(self) -> None: ...

    def get_regs(self) -> Regs: ...

    def set_regs(self, regs: Regs) -> None: ...

    def get_sregs(self) -> Sregs: ...

    def set_sregs(self, sregs: Sregs) -> None: ...

    def get_fpu(self) -> Fpu: ...

    def set_fpu(self, fpu: Fpu) -> None: ...

    def set_cpuid(self, table: list[CpuidEntry]) -> None: ...

    def translate(self, linear_address: int) -> Translation | None:
        """The guest-physical address behind ``linear_address`` now; None if unmapped."""

    def get_mp_state(self) -> MpState: ...

    def set_mp_state(self, state: MpState) -> None: ...

    def set_guest_debug(
        self,
        enable: bool = True,
        single_step: bool = False,
        breakpoints: list[int] | None = None,
        software_breakpoints: bool = False,
    ) -> None:
        """Single-step and/or ``breakpoints`` (x86: DR0-DR3, and DR7 in slot 7);
        ``software_breakpoints``: report int3 as a DEBUG exit; ``enable=False``: all off."""

    def failed_instruction(self) -> bytes | None:
        """After an INTERNAL_ERROR: the bytes of the instruction the backend could not
        emulate, when that is what happened (kvmpy/x86/complete.py may finish it)."""

    def inject_exception(self, vector: int, error_code: int | None = None) -> None:
        """Deliver exception ``vector`` (0-31) through the guest's IDT at the next run()."""

    def inject_interrupt(self, vector: int) -> None:
        """Deliver ``vector`` through the guest's IDT at the next run(), as an external
        interrupt does: RIP pushed as it is, no error code, whatever RFLAGS.IF says."""

    def compare_exchange(
        self, memory: memoryview, expected: int, replacement: int
    ) -> tuple[bool, int]:
        """Atomically, against every vCPU: if the 8 or 16 bytes of guest RAM in ``memory``
        hold ``expected``, store ``replacement``.  Returns (exchanged, the value found)."""

    def host_rdpru(self, register: int) -> tuple[int, int]:
        """The host CPU's own rdpru for ECX = ``register``: (EDX:EAX, RFLAGS); only where
        the host CPU has it (the caller checks).  For completing a guest's rdpru."""

    def get_xsave(self) -> bytes:
        """The XSAVE area in the standard (non-compacted) format, as the CPU's XSAVE writes it."""

    def set_xsave(self, state: bytes) -> None:
        """Load an XSAVE area in the standard format (as from get_xsave, changed)."""

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        """Model-specific registers by index; those the backend cannot read are left out."""

    def get_xcr(self, index: int) -> int | None:
        """Extended control register ``index`` (0: XCR0); None if the backend has none."""

    def set_xcr(self, index: int, value: int) -> None:
        """Set an extended control register; raises BackendError for a value the CPU refuses."""

    def describe_exit(self) -> tuple[str, bytes | None]:
        """A slow exit, for people: (detail, instruction bytes the backend reported)."""

    def exit_name(self) -> str:
        """The backend's own name for the last exit (KVM_EXIT_*, for traces)."""

    @property
    def system_event(self) -> int:
        """A SYSTEM_EVENT exit's ``SystemEvent``."""

    def answer_exits(self, enabled: bool) -> None:
        """Whether run() may answer the VM's windows (``Vm.answer_windows``) itself;
        off, every exit returns, as tracers and debuggers need."""

    def enable_stats(self) -> None:
        """Start counting exits and their times per kind and address."""

    def collect_stats(self) -> StatsTable:
        """Stop counting and return {key: [count, run ns, handler ns]} (key = kind<<40 | where)."""

    def save_state(self) -> dict[str, Any]:
        """Everything about this vCPU, JSON-safe, for snapshots and reset."""

    def load_state(self, state: dict[str, Any]) -> None: ...


class Vm(Protocol):
    """A virtual machine: memory slots, interrupt lines, vCPUs."""

    capabilities: frozenset[Capability]

    def map_memory(
        self, slot: int, gpa: int, backing: mmap.mmap, offset: int, size: int, log_dirty: bool
    ) -> None:
        """Back guest-physical [gpa, gpa+size) with ``backing[offset:offset+size]``."""

    def dirty_pages(self, slot: int, pages: int) -> bytes:
        """Which pages of a logged slot the guest wrote since the last call (a bitmap)."""

    def irq_line(self, irq: int, level: bool) -> None: ...

    def set_irq_routes(self, routes: list[IrqRoute]) -> None:
        """Replace the irqchip's GSI routing: each GSI drives these controller pins."""

    def create_vcpu(self, index: int) -> Vcpu: ...

    def answer_windows(self, space: str, windows: list[ExitWindow]) -> bool:
        """Answer accesses to ``windows`` of ``space`` ("port" or "mmio") without run()
        returning, in place of any published before; False if this backend cannot."""

    def window_misses(self, space: str) -> Counter[tuple[str, int]]:
        """(kind, address) -> the accesses to empty windows answered so far."""

    def save_state(self) -> dict[str, Any]:
        """VM-wide state (irqchip, PIT, clock), JSON-safe, for snapshots and reset."""

    def load_state(self, state: dict[str, Any]) -> None: ...

    def load_interrupt_state(self, state: dict[str, Any]) -> None:
        """The interrupt controllers' part of ``load_state`` (reset, resume from S3)."""

    def close(self) -> None: ...


class Backend(Protocol):
    """An opened backend: the factory for VMs, and what it says about the host."""

    name: str
    capabilities: frozenset[Capability]
    # Extra mmap flags for guest RAM (MAP_NORESERVE where the host has it).
    ram_map_flags: int

    def max_vcpus(self) -> int: ...

    def supported_cpuid(self) -> list[CpuidEntry]: ...

    def create_vm(self, *, irqchip: bool, scratch_base: int) -> Vm:
        """A VM; ``scratch_base``: 4 non-RAM pages the backend may use (KVM on Intel does)."""

    def describe(self) -> str:
        """What ``kvmpy info`` prints about this backend and the host."""

    def close(self) -> None: ...


BACKENDS = ("kvm", "soft", "auto")


class BackendUnavailable(BackendError):
    """A backend that cannot run on this host or install (no /dev/kvm, no shim, no Unicorn)."""


def _open_kvm(**options: Any) -> Backend:
    try:
        from kvmpy.backends.kvm import KvmBackend
    except ImportError as exc:
        raise BackendUnavailable(
            "opening the KVM backend",
            errno.ENOENT,
            f"kvmpy was installed without its KVM shim ({exc}); "
            "reinstall where <linux/kvm.h> and a C compiler exist, or use --accel soft",
        ) from None
    return KvmBackend(**options)


def _open_soft() -> Backend:
    try:
        from kvmpy.backends.soft import SoftBackend
    except ImportError as exc:
        raise BackendUnavailable(
            "opening the software backend",
            errno.ENOENT,
            f"the CPU emulator is not installed ({exc}); pip install 'kvmpy[soft]'",
        ) from None
    return SoftBackend()


def open_backend(name: str = "kvm", **options: Any) -> Backend:
    """Open a backend by name: "kvm", "soft" (the CPU emulator), or "auto".

    ``auto`` opens KVM when /dev/kvm opens and the software backend otherwise;
    ``options`` go to KVM (``path``).  The backend's ``name`` says which one opened.
    """
    if name == "kvm":
        return _open_kvm(**options)
    if name == "soft":
        return _open_soft()
    if name == "auto":
        try:
            return _open_kvm(**options)
        except OSError as kvm_error:
            try:
                return _open_soft()
            except BackendUnavailable as soft_error:
                raise BackendUnavailable(
                    "opening a backend", errno.ENOENT, f"{kvm_error}; and {soft_error}"
                ) from None
    raise ValueError(f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})")


def require(capabilities: Iterable[Capability], have: frozenset[Capability], what: str) -> None:
    """Raise one clear error when a backend lacks what the machine was asked for."""
    missing = [cap.value for cap in capabilities if cap not in have]
    if missing:
        raise BackendError(what, errno.EOPNOTSUPP, f"this backend lacks {', '.join(missing)}")
