"""The ioctl layer: ``Kvm`` (/dev/kvm), ``Vm`` and ``Vcpu``.

Each KVM ioctl is issued from exactly one method here (KVM_RUN from the C
shim, called through ``Vcpu.run``).  Failures raise ``KvmError``, a
``BackendError`` that names the ioctl.  File descriptors and mmaps are
released by ``close()`` or by using the objects as context managers.
``Vm`` and ``Vcpu`` implement the backend protocols of ``kvmpy.backends.base``.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import mmap
import os
import signal
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

from kvmpy.backends.base import (
    KVM_PATH,
    BackendError,
    Capability,
    InterruptController,
    IrqRoute,
    MpState,
    StatsTable,
    Translation,
)
from kvmpy.backends.exits import (
    ANSWERED_IN_BACKEND,
    IO_DIRECTION_OUT,
    ExitKind,
    ExitWindow,
    SystemEvent,
)
from kvmpy.backends.kvm._kvm import ffi, lib
from kvmpy.backends.kvm.windows import ShimWindows
from kvmpy.records import asdict, fields
from kvmpy.x86.cpuid import CpuidEntry
from kvmpy.x86.registers import (
    CONTROL_NAMES,
    DTABLE_NAMES,
    GPR_NAMES,
    SEGMENT_FIELDS,
    SEGMENT_NAMES,
    DTable,
    Fpu,
    Regs,
    Segment,
    Sregs,
    sregs_from_dict,
)

EXPECTED_API_VERSION = 12
# Room for KVM_GET_SUPPORTED_CPUID; the kernel's own limit is 256 entries.
MAX_CPUID_ENTRIES = 256
# The signal that kicks a vCPU thread out of KVM_RUN (see Vcpu.kick).
KICK_SIGNAL = signal.SIGRTMIN

_REGS_FIELDS = (*GPR_NAMES, "rip", "rflags")

EXIT_REASON_NAMES = {
    getattr(lib, name): name.removeprefix("KVM_EXIT_")
    for name in dir(lib)
    if name.startswith("KVM_EXIT_") and name not in ("KVM_EXIT_IO_IN", "KVM_EXIT_IO_OUT")
}
INTERNAL_ERROR_NAMES = {
    lib.KVM_INTERNAL_ERROR_EMULATION: "instruction emulation failed",
    lib.KVM_INTERNAL_ERROR_SIMUL_EX: "simultaneous exceptions",
    lib.KVM_INTERNAL_ERROR_DELIVERY_EV: "exit while delivering an event",
    lib.KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON: "unexpected hardware exit reason",
}
_MP_STATES = {
    lib.KVM_MP_STATE_RUNNABLE: MpState.RUNNABLE,
    lib.KVM_MP_STATE_UNINITIALIZED: MpState.WAIT_FOR_SIPI,
    lib.KVM_MP_STATE_HALTED: MpState.HALTED,
}
_KVM_MP_STATES = {
    MpState.RUNNABLE: lib.KVM_MP_STATE_RUNNABLE,
    MpState.WAIT_FOR_SIPI: lib.KVM_MP_STATE_UNINITIALIZED,
    MpState.HALTED: lib.KVM_MP_STATE_HALTED,
    MpState.OTHER: lib.KVM_MP_STATE_RUNNABLE,
}
_SYSTEM_EVENTS = {
    lib.KVM_SYSTEM_EVENT_SHUTDOWN: SystemEvent.SHUTDOWN,
    lib.KVM_SYSTEM_EVENT_RESET: SystemEvent.RESET,
    lib.KVM_SYSTEM_EVENT_CRASH: SystemEvent.CRASH,
}
_IRQCHIPS = (lib.KVM_IRQCHIP_PIC_MASTER, lib.KVM_IRQCHIP_PIC_SLAVE, lib.KVM_IRQCHIP_IOAPIC)
_IRQCHIP_IDS = {
    InterruptController.PIC_MASTER: lib.KVM_IRQCHIP_PIC_MASTER,
    InterruptController.PIC_SLAVE: lib.KVM_IRQCHIP_PIC_SLAVE,
    InterruptController.IOAPIC: lib.KVM_IRQCHIP_IOAPIC,
}


def _check_exit_kinds() -> None:
    """The shim returns ExitKind values: make sure its table and ours agree."""
    for kind in ExitKind:
        shim_value = getattr(lib, f"KVMSHIM_EXIT_{kind.name}")
        if shim_value != kind.value:
            raise ImportError(f"kvmshim's KVMSHIM_EXIT_{kind.name} is {shim_value}, not {kind}")
    if lib.KVM_EXIT_IO_OUT != IO_DIRECTION_OUT:
        raise ImportError(f"KVM_EXIT_IO_OUT is {lib.KVM_EXIT_IO_OUT}, not {IO_DIRECTION_OUT}")
    if lib.KVMSHIM_STAT_ANSWERED != ANSWERED_IN_BACKEND:
        raise ImportError(f"KVMSHIM_STAT_ANSWERED is {lib.KVMSHIM_STAT_ANSWERED:#x}")


_check_exit_kinds()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


class KvmError(BackendError):
    """A KVM ioctl (or opening /dev/kvm) failed."""

    def __init__(self, ioctl: str, err: int, hint: str = "") -> None:
        super().__init__(ioctl, err, hint)
        self.ioctl = ioctl


def _check(ioctl: str, ret: int) -> int:
    if ret < 0:
        raise KvmError(ioctl, -ret)
    return ret


def _open_kvm(path: str) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        hint = (
            f"{path} does not exist: load the KVM module (modprobe kvm_intel or kvm_amd) "
            "and check that virtualization is enabled"
        )
        raise KvmError(f"open {path}", errno.ENOENT, hint) from None
    except PermissionError as exc:
        hint = (
            f"check `ls -l {path}` and add yourself to its group "
            "(usually: sudo usermod -aG kvm $USER, then log in again)"
        )
        raise KvmError(f"open {path}", exc.errno or errno.EACCES, hint) from None
    except OSError as exc:
        raise KvmError(f"open {path}", exc.errno or errno.EIO) from None


def _to_struct(obj: Any, cdata: Any, names: Iterable[str]) -> None:
    for name in names:
        setattr(cdata, name, getattr(obj, name))


def _get_state(fd: int, ioctl: str, ctype: str, chip_id: int | None = None) -> bytes:
    """Run a KVM_GET_* ioctl whose struct kvmpy keeps as opaque bytes (for snapshots)."""
    c = ffi.new(f"{ctype} *")
    if chip_id is not None:
        c.chip_id = chip_id
    _check(ioctl, lib.kvmshim_ioctl(fd, getattr(lib, ioctl), c))
    return bytes(ffi.buffer(c))


def _set_state(fd: int, ioctl: str, ctype: str, data: bytes) -> None:
    """The KVM_SET_* twin of _get_state: hand KVM back the bytes it gave."""
    c = ffi.new(f"{ctype} *")
    buffer = ffi.buffer(c)
    if len(data) != len(buffer):
        size = len(buffer)
        raise KvmError(ioctl, errno.EINVAL, f"{len(data)} bytes of state, {ctype} has {size}")
    buffer[:] = data
    _check(ioctl, lib.kvmshim_ioctl(fd, getattr(lib, ioctl), c))


def _segment_from(c: Any) -> Segment:
    # Positional, in SEGMENT_FIELDS order: instruction completion reads sregs on every exit.
    return Segment(
        c.base, c.limit, c.selector, c.type, c.present, c.dpl, c.db, c.s, c.l, c.g, c.avl,
        c.unusable,
    )  # fmt: skip


assert SEGMENT_FIELDS == (
    "base", "limit", "selector", "type", "present", "dpl", "db", "s", "l", "g", "avl", "unusable",
)  # fmt: skip


class _Fd:
    """An owned file descriptor, closed once."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Kvm(_Fd):
    """The KVM subsystem (/dev/kvm)."""

    def __init__(self, path: str = KVM_PATH) -> None:
        super().__init__(_open_kvm(path))
        self.path = path
        try:
            version = self.api_version()
            if version != EXPECTED_API_VERSION:
                raise KvmError(
                    "KVM_GET_API_VERSION",
                    errno.EPROTO,
                    f"kernel reports API version {version}, kvmpy needs {EXPECTED_API_VERSION}",
                )
        except BaseException:
            self.close()
            raise

    @property
    def capabilities(self) -> frozenset[Capability]:
        caps = {Capability.SNAPSHOT, Capability.EXIT_STATS, Capability.DIRTY_LOG}
        if self.check_extension(lib.KVM_CAP_IRQCHIP) and self.check_extension(lib.KVM_CAP_PIT2):
            caps |= {Capability.IRQCHIP, Capability.SMP}
        if self.check_extension(lib.KVM_CAP_SET_GUEST_DEBUG):
            caps |= {Capability.GUEST_DEBUG, Capability.HW_BREAKPOINTS}
        return frozenset(caps)

    def api_version(self) -> int:
        return _check(
            "KVM_GET_API_VERSION", lib.kvmshim_ioctl_value(self.fd, lib.KVM_GET_API_VERSION, 0)
        )

    def check_extension(self, capability: int) -> int:
        """KVM_CHECK_EXTENSION: 0 if unsupported, else a capability-specific value."""
        ret = lib.kvmshim_ioctl_value(self.fd, lib.KVM_CHECK_EXTENSION, capability)
        return _check("KVM_CHECK_EXTENSION", ret)

    def vcpu_mmap_size(self) -> int:
        ret = lib.kvmshim_ioctl_value(self.fd, lib.KVM_GET_VCPU_MMAP_SIZE, 0)
        return _check("KVM_GET_VCPU_MMAP_SIZE", ret)

    def supported_cpuid(self) -> list[CpuidEntry]:
        entry_size = ffi.sizeof("struct kvm_cpuid_entry2")
        buf = ffi.new("char[]", ffi.sizeof("struct kvm_cpuid2") + MAX_CPUID_ENTRIES * entry_size)
        header = ffi.cast("struct kvm_cpuid2 *", buf)
        header.nent = MAX_CPUID_ENTRIES
        _check(
            "KVM_GET_SUPPORTED_CPUID",
            lib.kvmshim_ioctl(self.fd, lib.KVM_GET_SUPPORTED_CPUID, buf),
        )
        entries = ffi.cast("struct kvm_cpuid_entry2 *", buf + ffi.sizeof("struct kvm_cpuid2"))
        names = [f.name for f in fields(CpuidEntry)]
        return [
            CpuidEntry(**{name: getattr(entries[i], name) for name in names})
            for i in range(header.nent)
        ]

    def msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: the MSRs KVM saves and restores."""
        count = 1024
        buf = ffi.new("char[]", ffi.sizeof("struct kvm_msr_list") + 4 * count)
        header = ffi.cast("struct kvm_msr_list *", buf)
        header.nmsrs = count
        _check(
            "KVM_GET_MSR_INDEX_LIST", lib.kvmshim_ioctl(self.fd, lib.KVM_GET_MSR_INDEX_LIST, buf)
        )
        indices = ffi.cast("__u32 *", buf + ffi.sizeof("struct kvm_msr_list"))
        return [indices[i] for i in range(header.nmsrs)]

    def create_vm(self) -> Vm:
        ret = lib.kvmshim_ioctl_value(self.fd, lib.KVM_CREATE_VM, 0)
        if ret == -errno.EBUSY:
            raise KvmError(
                "KVM_CREATE_VM",
                errno.EBUSY,
                "another hypervisor may hold the virtualization hardware",
            )
        return Vm(self, _check("KVM_CREATE_VM", ret))


class Vm(_Fd):
    """A virtual machine: memory slots, vCPUs and the in-kernel irqchip."""

    def __init__(self, kvm: Kvm, fd: int) -> None:
        super().__init__(fd)
        self.kvm = kvm
        self.has_irqchip = False
        self.capabilities = kvm.capabilities
        self._saved_msrs: list[int] | None = None
        self.windows: ShimWindows | None = None  # what the shim answers itself, once published

    def answer_windows(self, space: str, windows: list[ExitWindow]) -> bool:
        """The shim answers these ranges of ``space`` ("port" or "mmio") itself."""
        if self.windows is None:
            self.windows = ShimWindows()
        self.windows.publish(space, windows)
        return True

    def window_misses(self, space: str) -> Counter[tuple[str, int]]:
        return Counter() if self.windows is None else self.windows.misses(space)

    def map_memory(
        self, slot: int, gpa: int, backing: mmap.mmap, offset: int, size: int, log_dirty: bool
    ) -> None:
        flags = lib.KVM_MEM_LOG_DIRTY_PAGES if log_dirty else 0
        self.set_user_memory_region(slot, gpa, backing, flags, offset=offset, size=size)

    def dirty_pages(self, slot: int, pages: int) -> bytes:
        return self.get_dirty_log(slot, pages)

    def save_state(self) -> dict[str, Any]:
        """The clock and, with the irqchip, the PICs, the IOAPIC and the PIT (base64)."""
        state = {"clock": _b64(self.get_clock())}
        if self.has_irqchip:
            for chip in _IRQCHIPS:
                state[f"irqchip{chip}"] = _b64(self.get_irqchip(chip))
            state["pit2"] = _b64(self.get_pit2())
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        if self.has_irqchip:
            for chip in _IRQCHIPS:
                self.set_irqchip(_unb64(state[f"irqchip{chip}"]))
            self.set_pit2(_unb64(state["pit2"]))
        self.set_clock(_unb64(state["clock"]))

    def saved_msrs(self, vcpu: Vcpu) -> list[int]:
        """The MSRs KVM can save on this host (its list, less any it refuses to read)."""
        if self._saved_msrs is None:
            wanted = self.kvm.msr_index_list()
            readable: list[int] = []
            while wanted:
                got = vcpu.get_msrs(wanted)
                readable += [index for index in wanted if index in got]
                # KVM_GET_MSRS stops at the first MSR it cannot read: skip it, go on.
                wanted = wanted[len(got) + 1 :]
            self._saved_msrs = readable
        return self._saved_msrs

    def load_interrupt_state(self, state: dict[str, Any]) -> None:
        """The irqchip and PIT part of ``load_state`` (a reset keeps the clock running)."""
        self.load_state({**state, "clock": _b64(self.get_clock())})

    def set_user_memory_region(
        self,
        slot: int,
        guest_phys_addr: int,
        backing: mmap.mmap,
        flags: int = 0,
        *,
        offset: int = 0,
        size: int | None = None,
    ) -> None:
        """Map ``backing`` (which must outlive the VM) at ``guest_phys_addr``.

        All of it by default; ``offset`` and ``size`` (page multiples) map part
        of it, so that one host mapping can back several slots.
        """
        if size is None:
            size = len(backing) - offset
        if offset < 0 or size < 0 or offset + size > len(backing):
            raise ValueError(f"{offset:#x}+{size:#x} is outside the {len(backing):#x}-byte backing")
        pointer = ffi.from_buffer(backing)
        region = ffi.new("struct kvm_userspace_memory_region *")
        region.slot = slot
        region.flags = flags
        region.guest_phys_addr = guest_phys_addr
        region.memory_size = size
        region.userspace_addr = int(ffi.cast("uintptr_t", pointer)) + offset
        ffi.release(pointer)
        ret = lib.kvmshim_ioctl(self.fd, lib.KVM_SET_USER_MEMORY_REGION, region)
        _check("KVM_SET_USER_MEMORY_REGION", ret)

    def get_dirty_log(self, slot: int, pages: int) -> bytes:
        """KVM_GET_DIRTY_LOG: which pages of ``slot`` the guest wrote since the last call.

        The slot must have been registered with KVM_MEM_LOG_DIRTY_PAGES, and
        ``pages`` must be its size in pages: KVM fills a bitmap for the whole
        slot.  The result holds page n in bit ``n % 8`` of byte ``n // 8``.
        KVM clears the log as it hands it over.
        """
        if pages <= 0:
            raise ValueError(f"need at least one page, not {pages}")
        # KVM writes whole 64-bit words, one bit per page of the slot.
        bitmap = ffi.new("uint64_t[]", (pages + 63) // 64)
        log = ffi.new("struct kvm_dirty_log *")
        log.slot = slot
        log.dirty_bitmap = bitmap
        _check("KVM_GET_DIRTY_LOG", lib.kvmshim_ioctl(self.fd, lib.KVM_GET_DIRTY_LOG, log))
        data = bytearray(ffi.buffer(bitmap)[: (pages + 7) // 8])
        if pages % 8:
            data[-1] &= (1 << (pages % 8)) - 1
        return bytes(data)

    def set_tss_addr(self, addr: int) -> None:
        """Three pages KVM needs for real-mode emulation on Intel (below 4 GiB, not RAM)."""
        _check("KVM_SET_TSS_ADDR", lib.kvmshim_ioctl_value(self.fd, lib.KVM_SET_TSS_ADDR, addr))

    def set_identity_map_addr(self, addr: int) -> None:
        """One page for the EPT identity map KVM uses for unpaged guests on Intel."""
        value = ffi.new("__u64 *", addr)
        ret = lib.kvmshim_ioctl(self.fd, lib.KVM_SET_IDENTITY_MAP_ADDR, value)
        _check("KVM_SET_IDENTITY_MAP_ADDR", ret)

    def create_irqchip(self) -> None:
        """In-kernel PIC, IOAPIC and a LAPIC per vCPU; call before creating vCPUs."""
        _check("KVM_CREATE_IRQCHIP", lib.kvmshim_ioctl_value(self.fd, lib.KVM_CREATE_IRQCHIP, 0))
        self.has_irqchip = True

    def create_pit2(self) -> None:
        """In-kernel i8254 PIT on ports 0x40-0x43; port 0x61 (speaker) handled in-kernel too."""
        config = ffi.new("struct kvm_pit_config *")
        config.flags = lib.KVM_PIT_SPEAKER_DUMMY
        _check("KVM_CREATE_PIT2", lib.kvmshim_ioctl(self.fd, lib.KVM_CREATE_PIT2, config))

    def set_irq_routes(self, routes: list[IrqRoute]) -> None:
        """KVM_SET_GSI_ROUTING with irqchip entries (it replaces KVM's default table)."""
        size = ffi.sizeof("struct kvm_irq_routing")
        entry_size = ffi.sizeof("struct kvm_irq_routing_entry")
        buf = ffi.new("char[]", size + len(routes) * entry_size)
        header = ffi.cast("struct kvm_irq_routing *", buf)
        header.nr = len(routes)
        entries = ffi.cast("struct kvm_irq_routing_entry *", buf + size)
        for i, route in enumerate(routes):
            entries[i].gsi = route.gsi
            entries[i].type = lib.KVM_IRQ_ROUTING_IRQCHIP
            entries[i].u.irqchip.irqchip = _IRQCHIP_IDS[route.controller]
            entries[i].u.irqchip.pin = route.pin
        _check("KVM_SET_GSI_ROUTING", lib.kvmshim_ioctl(self.fd, lib.KVM_SET_GSI_ROUTING, buf))

    def irq_line(self, irq: int, level: bool) -> None:
        line = ffi.new("struct kvm_irq_level *")
        line.irq = irq
        line.level = int(level)
        _check("KVM_IRQ_LINE", lib.kvmshim_ioctl(self.fd, lib.KVM_IRQ_LINE, line))

    # Whole-VM state for snapshots, as opaque bytes.

    def get_irqchip(self, chip_id: int) -> bytes:
        return _get_state(self.fd, "KVM_GET_IRQCHIP", "struct kvm_irqchip", chip_id)

    def set_irqchip(self, state: bytes) -> None:
        _set_state(self.fd, "KVM_SET_IRQCHIP", "struct kvm_irqchip", state)

    def get_pit2(self) -> bytes:
        return _get_state(self.fd, "KVM_GET_PIT2", "struct kvm_pit_state2")

    def set_pit2(self, state: bytes) -> None:
        _set_state(self.fd, "KVM_SET_PIT2", "struct kvm_pit_state2", state)

    def get_clock(self) -> bytes:
        return _get_state(self.fd, "KVM_GET_CLOCK", "struct kvm_clock_data")

    def set_clock(self, state: bytes) -> None:
        _set_state(self.fd, "KVM_SET_CLOCK", "struct kvm_clock_data", state)

    def create_vcpu(self, index: int) -> Vcpu:
        fd = _check("KVM_CREATE_VCPU", lib.kvmshim_ioctl_value(self.fd, lib.KVM_CREATE_VCPU, index))
        try:
            return Vcpu(fd, index, self.kvm.vcpu_mmap_size(), self)
        except BaseException:
            os.close(fd)
            raise


_U64 = (1 << 64) - 1
_FPU_SCALARS = ("fcw", "fsw", "ftwx", "last_opcode", "last_ip", "last_dp", "mxcsr")


class Vcpu(_Fd):
    """A virtual CPU and its shared ``kvm_run`` page."""

    backend_name = "KVM"

    def __init__(self, fd: int, index: int, mmap_size: int, vm: Vm | None = None) -> None:
        super().__init__(fd)
        self.index = index
        self.vm = vm
        self.run_page = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._run_ptr = ffi.from_buffer(self.run_page)
        # The shim's per-vCPU state: fd, kvm_run, the decoded exit and, when
        # shim.timing is set, run_ns/handler_ns of the last exit.
        self.shim = ffi.new("struct kvmshim_vcpu *")
        self.shim.fd = fd
        self.shim.run = self._run_ptr
        # Decoded by the shim after every KVM_RUN; the run loop reads its fields.
        self.exit = ffi.addressof(self.shim[0], "exit")
        # KVM_RUN: returns the exit reason or -errno (-EINTR when kicked).  A
        # partial of the C function, so the hot loop pays for no Python frame.
        self.run: Callable[[], int] = partial(lib.kvmshim_run, self.shim)
        self.io_buffer = self.run_page
        self.thread_ident: int | None = None
        self._stats: Any = None

    def close(self) -> None:
        if self.fd >= 0:
            ffi.release(self._run_ptr)
            self.run_page.close()
        super().close()

    # -- stopping a running vCPU -------------------------------------------------

    def kick(self) -> None:
        """Make KVM_RUN return -EINTR now (if running) or on its next call.

        Safe from any thread.  immediate_exit covers the window where the vCPU
        thread is about to enter KVM_RUN; the signal interrupts one in progress.
        """
        lib.kvmshim_set_immediate_exit(self._run_ptr, 1)
        ident = self.thread_ident
        if ident is not None and ident != threading.get_ident():
            with contextlib.suppress(ProcessLookupError):  # the thread has just finished
                signal.pthread_kill(ident, KICK_SIGNAL)

    def clear_kick(self) -> None:
        lib.kvmshim_set_immediate_exit(self._run_ptr, 0)

    # -- register state ------------------------------------------------------------

    def get_regs(self) -> Regs:
        c = ffi.new("struct kvm_regs *")
        _check("KVM_GET_REGS", lib.kvmshim_ioctl(self.fd, lib.KVM_GET_REGS, c))
        return Regs(**{name: getattr(c, name) for name in _REGS_FIELDS})

    def set_regs(self, regs: Regs) -> None:
        c = ffi.new("struct kvm_regs *")
        _to_struct(regs, c, _REGS_FIELDS)
        _check("KVM_SET_REGS", lib.kvmshim_ioctl(self.fd, lib.KVM_SET_REGS, c))

    def get_sregs(self) -> Sregs:
        c = ffi.new("struct kvm_sregs *")
        _check("KVM_GET_SREGS", lib.kvmshim_ioctl(self.fd, lib.KVM_GET_SREGS, c))
        fields: dict[str, Any] = {name: getattr(c, name) for name in CONTROL_NAMES}
        for name in SEGMENT_NAMES:
            fields[name] = _segment_from(getattr(c, name))
        for name in DTABLE_NAMES:
            fields[name] = DTable(getattr(c, name).base, getattr(c, name).limit)
        return Sregs(**fields, interrupt_bitmap=tuple(c.interrupt_bitmap))

    def set_sregs(self, sregs: Sregs) -> None:
        c = ffi.new("struct kvm_sregs *")
        for name in SEGMENT_NAMES:
            _to_struct(getattr(sregs, name), getattr(c, name), SEGMENT_FIELDS)
        for name in DTABLE_NAMES:
            _to_struct(getattr(sregs, name), getattr(c, name), ("base", "limit"))
        _to_struct(sregs, c, CONTROL_NAMES)
        for i, word in enumerate(sregs.interrupt_bitmap):
            c.interrupt_bitmap[i] = word
        _check("KVM_SET_SREGS", lib.kvmshim_ioctl(self.fd, lib.KVM_SET_SREGS, c))

    def get_fpu(self) -> Fpu:
        c = ffi.new("struct kvm_fpu *")
        _check("KVM_GET_FPU", lib.kvmshim_ioctl(self.fd, lib.KVM_GET_FPU, c))
        return Fpu(
            **{name: getattr(c, name) for name in _FPU_SCALARS},
            fpr=bytes(ffi.buffer(c.fpr)),
            xmm=bytes(ffi.buffer(c.xmm)),
        )

    def set_fpu(self, fpu: Fpu) -> None:
        c = ffi.new("struct kvm_fpu *")
        _to_struct(fpu, c, _FPU_SCALARS)
        ffi.buffer(c.fpr)[:] = fpu.fpr
        ffi.buffer(c.xmm)[:] = fpu.xmm
        _check("KVM_SET_FPU", lib.kvmshim_ioctl(self.fd, lib.KVM_SET_FPU, c))

    def _msr_buffer(self, items: list[tuple[int, int]]) -> tuple[Any, Any]:
        buf = ffi.new(
            "char[]",
            ffi.sizeof("struct kvm_msrs") + len(items) * ffi.sizeof("struct kvm_msr_entry"),
        )
        ffi.cast("struct kvm_msrs *", buf).nmsrs = len(items)
        entries = ffi.cast("struct kvm_msr_entry *", buf + ffi.sizeof("struct kvm_msrs"))
        for i, (index, data) in enumerate(items):
            entries[i].index = index
            entries[i].data = data
        return buf, entries

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        """Read MSRs; the result holds those KVM returned (it stops at the first it cannot read)."""
        wanted = list(indices)
        buf, entries = self._msr_buffer([(index, 0) for index in wanted])
        count = _check("KVM_GET_MSRS", lib.kvmshim_ioctl(self.fd, lib.KVM_GET_MSRS, buf))
        return {entries[i].index: entries[i].data for i in range(count)}

    def set_msrs(self, values: dict[int, int]) -> None:
        buf, entries = self._msr_buffer(list(values.items()))
        count = _check("KVM_SET_MSRS", lib.kvmshim_ioctl(self.fd, lib.KVM_SET_MSRS, buf))
        if count != len(values):
            bad = entries[count].index
            raise KvmError("KVM_SET_MSRS", errno.EINVAL, f"MSR {bad:#x} was rejected")

    def set_cpuid(self, table: list[CpuidEntry]) -> None:
        entry_size = ffi.sizeof("struct kvm_cpuid_entry2")
        buf = ffi.new("char[]", ffi.sizeof("struct kvm_cpuid2") + len(table) * entry_size)
        ffi.cast("struct kvm_cpuid2 *", buf).nent = len(table)
        entries = ffi.cast("struct kvm_cpuid_entry2 *", buf + ffi.sizeof("struct kvm_cpuid2"))
        for i, entry in enumerate(table):
            _to_struct(entry, entries[i], [f.name for f in fields(CpuidEntry)])
        _check("KVM_SET_CPUID2", lib.kvmshim_ioctl(self.fd, lib.KVM_SET_CPUID2, buf))

    def translate(self, linear_address: int) -> Translation | None:
        """KVM_TRANSLATE through the guest's current paging; None if unmapped."""
        c = ffi.new("struct kvm_translation *")
        c.linear_address = linear_address
        _check("KVM_TRANSLATE", lib.kvmshim_ioctl(self.fd, lib.KVM_TRANSLATE, c))
        if not c.valid:
            return None
        return Translation(c.physical_address, bool(c.writeable), bool(c.usermode))

    def get_mp_state(self) -> MpState:
        return _MP_STATES.get(self.get_kvm_mp_state(), MpState.OTHER)

    def set_mp_state(self, state: MpState) -> None:
        self.set_kvm_mp_state(_KVM_MP_STATES[state])

    def get_kvm_mp_state(self) -> int:
        c = ffi.new("struct kvm_mp_state *")
        _check("KVM_GET_MP_STATE", lib.kvmshim_ioctl(self.fd, lib.KVM_GET_MP_STATE, c))
        return int(c.mp_state)

    def set_kvm_mp_state(self, state: int) -> None:
        c = ffi.new("struct kvm_mp_state *")
        c.mp_state = state
        _check("KVM_SET_MP_STATE", lib.kvmshim_ioctl(self.fd, lib.KVM_SET_MP_STATE, c))

    # vCPU state for snapshots, as opaque bytes.

    def get_xsave(self) -> bytes:
        return _get_state(self.fd, "KVM_GET_XSAVE", "struct kvm_xsave")

    def set_xsave(self, state: bytes) -> None:
        _set_state(self.fd, "KVM_SET_XSAVE", "struct kvm_xsave", state)

    def get_xcrs(self) -> bytes:
        return _get_state(self.fd, "KVM_GET_XCRS", "struct kvm_xcrs")

    def set_xcrs(self, state: bytes) -> None:
        _set_state(self.fd, "KVM_SET_XCRS", "struct kvm_xcrs", state)

    def get_lapic(self) -> bytes:
        return _get_state(self.fd, "KVM_GET_LAPIC", "struct kvm_lapic_state")

    def set_lapic(self, state: bytes) -> None:
        _set_state(self.fd, "KVM_SET_LAPIC", "struct kvm_lapic_state", state)

    def get_vcpu_events(self) -> bytes:
        return _get_state(self.fd, "KVM_GET_VCPU_EVENTS", "struct kvm_vcpu_events")

    def set_vcpu_events(self, state: bytes) -> None:
        _set_state(self.fd, "KVM_SET_VCPU_EVENTS", "struct kvm_vcpu_events", state)

    # -- completing instructions KVM could not emulate ------------------------------------

    def failed_instruction(self) -> bytes | None:
        """The bytes KVM handed over with an emulation failure; None for any other exit."""
        e = self.exit
        if e.reason != lib.KVM_EXIT_INTERNAL_ERROR:
            return None
        if e.suberror != lib.KVM_INTERNAL_ERROR_EMULATION or e.ndata < 3:
            return None
        if not e.data[0] & lib.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES:
            return None
        blob = e.data[1].to_bytes(8, "little") + e.data[2].to_bytes(8, "little")
        return bytes(blob[1 : 1 + min(blob[0], 15)])

    def inject_exception(self, vector: int, error_code: int | None = None) -> None:
        """KVM_SET_VCPU_EVENTS: deliver exception ``vector`` (0-31) at the next entry.

        The guest's RIP must already be what the exception pushes (the
        faulting instruction for faults).
        """
        if not 0 <= vector < 32 or vector == 2:
            raise ValueError(f"exception vector {vector} (0-31, not NMI)")
        events = self._get_events()
        events.exception.injected = 1
        events.exception.pending = 0
        events.exception.nr = vector
        events.exception.has_error_code = int(error_code is not None)
        events.exception.error_code = error_code or 0
        self._set_events(events)

    def inject_interrupt(self, vector: int) -> None:
        """KVM_SET_VCPU_EVENTS: deliver ``vector`` through the IDT as an external interrupt.

        It pushes RIP unchanged and no error code, on every vendor (a "soft"
        one would use a hardware instruction length user space cannot set);
        see tools/probe_soft_events.py for what this host does with each kind.
        """
        if not 0 <= vector < 256:
            raise ValueError(f"interrupt vector {vector} (0-255)")
        events = self._get_events()
        events.interrupt.injected = 1
        events.interrupt.nr = vector
        events.interrupt.soft = 0
        self._set_events(events)

    def _get_events(self) -> Any:
        c = ffi.new("struct kvm_vcpu_events *")
        ffi.buffer(c)[:] = self.get_vcpu_events()
        return c

    def _set_events(self, events: Any) -> None:
        # Only the exception and interrupt fields change; NMI and SIPI state is left alone.
        events.flags = 0
        self.set_vcpu_events(bytes(ffi.buffer(events)))

    def compare_exchange(
        self, memory: memoryview, expected: int, replacement: int
    ) -> tuple[bool, int]:
        """The CPU's own lock cmpxchg8b/16b on guest RAM (8 or 16 bytes of ``memory``)."""
        size = len(memory)
        value = ffi.new("uint64_t[2]", [expected & _U64, expected >> 64])
        new = ffi.new("uint64_t[2]", [replacement & _U64, replacement >> 64])
        with ffi.from_buffer(memory, require_writable=True) as pointer:
            done = lib.kvmshim_compare_exchange(pointer, size, value, new)
        if done < 0:
            raise KvmError("compare_exchange", -done, f"{size} bytes at a bad size or alignment")
        return bool(done), value[0] | (value[1] << 64 if size == 16 else 0)

    def host_rdpru(self, register: int) -> tuple[int, int]:
        """The host CPU's own rdpru for ECX = ``register``: (EDX:EAX, RFLAGS)."""
        flags = ffi.new("uint64_t *")
        value = lib.kvmshim_rdpru(register & 0xFFFFFFFF, flags)
        return int(value), int(flags[0])

    def get_xcr(self, index: int) -> int | None:
        """KVM_GET_XCRS: extended control register ``index`` (0: XCR0); None if KVM has none."""
        xcrs = ffi.new("struct kvm_xcrs *")
        ffi.buffer(xcrs)[:] = self.get_xcrs()
        for i in range(min(xcrs.nr_xcrs, 16)):
            if xcrs.xcrs[i].xcr == index:
                return int(xcrs.xcrs[i].value)
        return None

    def set_xcr(self, index: int, value: int) -> None:
        """KVM_SET_XCRS for one register; KVM refuses (EINVAL) values the CPU would not take."""
        xcrs = ffi.new("struct kvm_xcrs *")
        xcrs.nr_xcrs = 1
        xcrs.xcrs[0].xcr = index
        xcrs.xcrs[0].value = value
        self.set_xcrs(bytes(ffi.buffer(xcrs)))

    def get_debugregs(self) -> bytes:
        return _get_state(self.fd, "KVM_GET_DEBUGREGS", "struct kvm_debugregs")

    def set_debugregs(self, state: bytes) -> None:
        _set_state(self.fd, "KVM_SET_DEBUGREGS", "struct kvm_debugregs", state)

    def set_guest_debug(
        self,
        enable: bool = True,
        single_step: bool = False,
        breakpoints: list[int] | None = None,
        software_breakpoints: bool = False,
    ) -> None:
        """KVM_SET_GUEST_DEBUG; ``enable=False`` turns guest debugging off.

        ``breakpoints`` (up to 8 values) fills ``arch.debugreg``: DR0-DR3 hold
        the breakpoint addresses and [7] the DR7 enables (USE_HW_BP).
        ``software_breakpoints`` asks KVM to report int3 (USE_SW_BP).
        Call it from the vCPU's thread while it is outside KVM_RUN.
        """
        control = 0
        if enable:
            control = lib.KVM_GUESTDBG_ENABLE
            if single_step:
                control |= lib.KVM_GUESTDBG_SINGLESTEP
            if breakpoints is not None:
                control |= lib.KVM_GUESTDBG_USE_HW_BP
            if software_breakpoints:
                control |= lib.KVM_GUESTDBG_USE_SW_BP
        c = ffi.new("struct kvm_guest_debug *")
        c.control = control
        values = breakpoints or []
        if len(values) > 8:
            raise ValueError(f"kvm_guest_debug has 8 debug registers, not {len(values)}")
        for i, value in enumerate(values):
            c.arch.debugreg[i] = value
        _check("KVM_SET_GUEST_DEBUG", lib.kvmshim_ioctl(self.fd, lib.KVM_SET_GUEST_DEBUG, c))

    # -- describing exits ----------------------------------------------------------------

    def exit_name(self) -> str:
        return "KVM_EXIT_" + EXIT_REASON_NAMES.get(self.exit.reason, str(self.exit.reason))

    def describe_exit(self) -> tuple[str, bytes | None]:
        """Details of a slow exit: internal errors (with the bytes KVM could not run), ..."""
        e = self.exit
        if e.reason == lib.KVM_EXIT_INTERNAL_ERROR:
            name = INTERNAL_ERROR_NAMES.get(e.suberror, "unknown")
            detail = f"suberror {e.suberror} ({name})"
            flags = e.data[0] if e.ndata >= 1 else 0
            if (
                e.suberror == lib.KVM_INTERNAL_ERROR_EMULATION
                and e.ndata >= 3
                and flags & lib.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES
            ):
                blob = e.data[1].to_bytes(8, "little") + e.data[2].to_bytes(8, "little")
                return detail, blob[1 : 1 + min(blob[0], 15)]
            if e.ndata:
                detail += " data " + " ".join(f"{e.data[i]:#x}" for i in range(e.ndata))
            return detail, None
        if e.reason == lib.KVM_EXIT_FAIL_ENTRY:
            return f"hardware entry failure reason {e.hardware_reason:#x} on host CPU {e.cpu}", None
        if e.reason == lib.KVM_EXIT_UNKNOWN:
            return f"hardware reason {e.hardware_reason:#x}", None
        if e.reason == lib.KVM_EXIT_SYSTEM_EVENT:
            return f"type {e.suberror}", None
        return "", None

    @property
    def system_event(self) -> int:
        """A SYSTEM_EVENT exit's type, as a generic ``SystemEvent``."""
        return _SYSTEM_EVENTS.get(self.exit.suberror, SystemEvent.OTHER)

    # -- exit statistics, kept by the shim ---------------------------------------------------

    def answer_exits(self, enabled: bool) -> None:
        """Whether run() answers the VM's published windows itself (off: every exit returns)."""
        windows = self.vm.windows if self.vm is not None else None
        self.shim.windows = windows.tables if enabled and windows is not None else ffi.NULL

    def enable_stats(self) -> None:
        """Let the shim count exits (``struct kvmshim_stat``): the fast loop stays as it is."""
        self._stats = ffi.new("struct kvmshim_stat[]", lib.KVMSHIM_STATS_SLOTS)
        self.shim.last = ffi.NULL
        self.shim.stats = self._stats

    def collect_stats(self) -> StatsTable:
        self.shim.stats = ffi.NULL
        self.shim.last = ffi.NULL
        rows, self._stats = self._stats, None
        table: StatsTable = {}
        for row in rows if rows is not None else ():
            if row.key:
                table[row.key] = [row.count, row.run_ns, row.handler_ns]
        return table

    # -- whole state, for snapshots and reset -----------------------------------------------

    def save_state(self) -> dict[str, Any]:
        """Every register and KVM-kept struct of this vCPU (opaque ones as base64)."""
        msrs = self.vm.saved_msrs(self) if self.vm is not None else []
        lapic = self.vm is None or self.vm.has_irqchip
        return {
            "regs": asdict(self.get_regs()),
            "sregs": asdict(self.get_sregs()),
            "xsave": _b64(self.get_xsave()),
            "xcrs": _b64(self.get_xcrs()),
            "msrs": [[index, value] for index, value in self.get_msrs(msrs).items()],
            "lapic": _b64(self.get_lapic()) if lapic else None,
            "events": _b64(self.get_vcpu_events()),
            "mp_state": self.get_kvm_mp_state(),
            "debugregs": _b64(self.get_debugregs()),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        # The order follows KVM's rules: special registers (and so APIC base)
        # before the LAPIC, registers before events, MSRs after CPUID (set when
        # the vCPU was created).
        self.set_sregs(sregs_from_dict(state["sregs"]))
        self.set_regs(Regs(**state["regs"]))
        self.set_xsave(_unb64(state["xsave"]))
        self.set_xcrs(_unb64(state["xcrs"]))
        self.set_msrs({int(index): int(value) for index, value in state["msrs"]})
        if state["lapic"] is not None:
            self.set_lapic(_unb64(state["lapic"]))
        self.set_vcpu_events(_unb64(state["events"]))
        self.set_kvm_mp_state(int(state["mp_state"]))
        self.set_debugregs(_unb64(state["debugregs"]))


def install_kick_handler() -> None:
    """Let KICK_SIGNAL interrupt KVM_RUN instead of killing the process."""
    _check("sigaction", lib.kvmshim_install_kick_handler(KICK_SIGNAL))
