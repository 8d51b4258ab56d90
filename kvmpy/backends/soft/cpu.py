"""The software backend's VM and vCPU: guest code runs in the Unicorn CPU emulator.

How a vCPU keeps the run loop's contract (``run()`` returns one exit, the loop
handles it, the next ``run()`` completes it): the emulator runs in a thread
of its own.  An IN, OUT or MMIO access reaches a Unicorn hook in the middle
of an instruction; the hook fills ``exit``, hands control to the vCPU thread
(``run()`` returns PORT_IN, say), and waits.  The loop calls the device and
puts the value in ``io_buffer``; the next ``run()`` wakes the hook, which
returns that value to the instruction, and emulation goes on exactly where
it was.  Stopping Unicorn from a hook would not do: it stops only at the end
of the translated block, after the instructions behind the IN have run.

Guest RAM is GuestMemory's own mapping, handed to Unicorn with
``mem_map_ptr``; everything else in the physical address space is MMIO.
Unicorn keeps translated code, so after the host writes guest memory
(loading, reset, restore, a debugger) the cache must be flushed: every
host-side change of vCPU state (registers, ``clear_kick`` at the start of a
run, guest-debug settings) and ``Vm.invalidate`` schedule a flush before
the emulator next runs.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import errno
import mmap
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any

from unicorn import (
    UC_ARCH_X86,
    UC_ERR_INSN_INVALID,
    UC_HOOK_CODE,
    UC_HOOK_INSN,
    UC_HOOK_INTR,
    UC_MODE_64,
    UC_PROT_ALL,
    Uc,
    UcError,
)
from unicorn import x86_const as x86

from kvmpy.backends.base import (
    BackendError,
    Capability,
    IrqRoute,
    MpState,
    StatsTable,
    Translation,
)
from kvmpy.backends.exits import EXIT_NAMES, ExitKind, ExitRecord, ExitWindow, SystemEvent
from kvmpy.backends.soft import events
from kvmpy.backends.soft.paging import translate
from kvmpy.records import Record, asdict
from kvmpy.x86.cpuid import CpuidEntry
from kvmpy.x86.registers import (
    CR0_PE,
    CR0_PG,
    EFER_LMA,
    GPR_NAMES,
    SEGMENT_NAMES,
    DTable,
    Fpu,
    Regs,
    Segment,
    Sregs,
    sregs_from_dict,
)

CAPABILITIES = frozenset(
    {Capability.GUEST_DEBUG, Capability.HW_BREAKPOINTS, Capability.EXIT_STATS, Capability.SNAPSHOT}
)
MSR_EFER = 0xC000_0080
# MSRs a snapshot keeps besides EFER: SYSENTER, STAR/LSTAR/CSTAR/SFMASK, KERNEL_GS_BASE, PAT.
SAVED_MSRS = (0x174, 0x175, 0x176, 0xC000_0081, 0xC000_0082, 0xC000_0083, 0xC000_0084,
              0xC000_0102, 0x277)  # fmt: skip
# The FPU in a snapshot's "xsave" blob, marked as the emulator's own.
SOFT_STATE_MAGIC = b"kvmpy-soft-fpu\0\1"
_FPU_STATE = struct.Struct("<HHBI128s256s")
# Physical space the emulator maps: RAM, and MMIO everywhere else below this.
PHYSICAL_LIMIT = 1 << 36
APIC_BASE = 0xFEE0_0900  # enabled, bootstrap processor
# emu_start's end address, ignored: exits are enabled with none set (see SoftVm).
NO_END = 0
MAX_INSTRUCTION = 15
# A kick that lands while the emulator thread is just entering Unicorn is repeated.
REKICK_DELAY = 0.01

# Unicorn's API loads CS, DS, ES and SS by selector alone in 64-bit mode, and
# cannot set hidden segment state at all; the CPU state itself (QEMU's
# CPUX86State, copied whole by uc_context_save) can.  These are its offsets
# in a Unicorn 2 context, checked when a VM is created (``_check_layout``).
_ENV = 40  # the context's header, then CPUX86State
_RAX, _EIP, _HFLAGS, _SEGS = 0, 128, 176, 184
_SEGMENT_CACHE = struct.Struct("<I4xQII")  # selector, base, limit, flags
_CACHE_ORDER = ("es", "cs", "ss", "ds", "fs", "gs", "ldt", "tr")
_GDT, _IDT = _SEGS + 8 * _SEGMENT_CACHE.size, _SEGS + 9 * _SEGMENT_CACHE.size
_CR = _SEGS + 10 * _SEGMENT_CACHE.size
# QEMU's hidden flags (target/i386/cpu.h) that follow from CS and SS.
HF_CPL = 3
HF_CS32 = 1 << 4
HF_SS32 = 1 << 5
HF_ADDSEG = 1 << 6
HF_PE = 1 << 7
HF_LMA = 1 << 14
HF_CS64 = 1 << 15
DESC_B = 1 << 22
DESC_L = 1 << 21
RFLAGS_VM = 1 << 17


def _cache_flags(segment: Segment) -> int:
    """A segment's attributes as QEMU keeps them (the descriptor's high dword)."""
    present = segment.present and not segment.unusable
    return (
        segment.type << 8 | segment.s << 12 | segment.dpl << 13 | int(bool(present)) << 15
        | segment.avl << 20 | segment.l << 21 | segment.db << 22 | segment.g << 23
    )  # fmt: skip


def _segment(selector: int, base: int, limit: int, flags: int) -> Segment:
    present = (flags >> 15) & 1
    return Segment(
        base=base,
        limit=limit,
        selector=selector,
        type=(flags >> 8) & 0xF,
        present=present,
        dpl=(flags >> 13) & 3,
        s=(flags >> 12) & 1,
        avl=(flags >> 20) & 1,
        l=(flags >> 21) & 1,
        db=(flags >> 22) & 1,
        g=(flags >> 23) & 1,
        unusable=1 - present,
    )


class _CpuState:
    """Read and patch the emulator's CPU state where the register API cannot reach."""

    def __init__(self, uc: Uc) -> None:
        self.uc = uc
        self.context = uc.context_save()
        self.address = ctypes.cast(self.context.context, ctypes.c_void_p).value or 0

    def read(self) -> bytes:
        self.uc.context_update(self.context)
        return ctypes.string_at(self.address + _ENV, _CR + 5 * 8)

    def segments(self) -> dict[str, Segment]:
        data = self.read()
        return {
            name: _segment(*_SEGMENT_CACHE.unpack_from(data, _SEGS + i * _SEGMENT_CACHE.size))
            for i, name in enumerate(_CACHE_ORDER)
        }

    def load(self, segments: dict[str, Segment], cr0: int, rflags: int) -> None:
        """Put ``segments`` in the segment caches, and the hidden flags that follow from them."""
        data = bytearray(self.read())
        for i, name in enumerate(_CACHE_ORDER):
            segment = segments.get(name)
            if segment is not None:
                _SEGMENT_CACHE.pack_into(
                    data,
                    _SEGS + i * _SEGMENT_CACHE.size,
                    segment.selector,
                    segment.base,
                    segment.limit,
                    _cache_flags(segment),
                )
        caches = {
            name: _SEGMENT_CACHE.unpack_from(data, _SEGS + i * _SEGMENT_CACHE.size)
            for i, name in enumerate(_CACHE_ORDER)
        }
        hflags = struct.unpack_from("<I", data, _HFLAGS)[0]
        cs_flags, ss_flags = caches["cs"][3], caches["ss"][3]
        # What QEMU's cpu_x86_load_seg_cache works out when CS and SS are loaded.
        if hflags & HF_LMA and cs_flags & DESC_L:
            hflags |= HF_CS32 | HF_SS32 | HF_CS64
        else:
            hflags = (hflags & ~(HF_CS32 | HF_CS64)) | (cs_flags & DESC_B) >> 18
        hflags = (hflags & ~HF_CPL) | ((ss_flags >> 13) & 3 if cr0 & CR0_PE else 0)
        extra = (ss_flags & DESC_B) >> 17
        # Segment bases are added to addresses unless long mode or flat 32-bit makes them 0.
        legacy = not cr0 & CR0_PE or rflags & RFLAGS_VM or not hflags & HF_CS32
        bases = caches["ds"][1] | caches["es"][1] | caches["ss"][1]
        if not hflags & HF_CS64 and (legacy or bases):
            extra |= HF_ADDSEG
        hflags = (hflags & ~(HF_SS32 | HF_ADDSEG)) | extra
        struct.pack_into("<I", data, _HFLAGS, hflags)
        ctypes.memmove(self.address + _ENV, bytes(data), len(data))
        self.uc.context_restore(self.context)


def _check_layout(uc: Uc) -> None:
    """Refuse a Unicorn whose CPU state is laid out differently from what _CpuState expects."""
    saved = uc.reg_read(x86.UC_X86_REG_RAX), uc.reg_read(x86.UC_X86_REG_RIP)
    uc.reg_write(x86.UC_X86_REG_RAX, 0x0123_4567_89AB_CDEF)
    uc.reg_write(x86.UC_X86_REG_RIP, 0x0FED_CBA9_8765_4321)
    uc.reg_write(x86.UC_X86_REG_CR3, 0x7000)
    data = _CpuState(uc).read()
    uc.reg_write(x86.UC_X86_REG_RAX, saved[0])
    uc.reg_write(x86.UC_X86_REG_RIP, saved[1])
    uc.reg_write(x86.UC_X86_REG_CR3, 0)
    if (
        struct.unpack_from("<QQ", data, _RAX)[0] != 0x0123_4567_89AB_CDEF
        or struct.unpack_from("<Q", data, _EIP)[0] != 0x0FED_CBA9_8765_4321
        or struct.unpack_from("<Q", data, _CR + 3 * 8)[0] != 0x7000
    ):
        raise BackendError(
            "opening the CPU emulator",
            errno.ENOTSUP,
            "this Unicorn's CPU state layout is not the one kvmpy knows (Unicorn 2.1)",
        )


def _reset_to_real_mode(uc: Uc) -> None:
    """Unicorn's 64-bit mode starts with EFER.LMA set and paging off; make it a CPU at reset.

    LMA only clears when paging is turned off in long mode, so turn it on first.
    """
    uc.reg_write(x86.UC_X86_REG_CR4, 0x20)  # PAE
    uc.reg_write(x86.UC_X86_REG_CR0, 0x8000_0011)
    uc.reg_write(x86.UC_X86_REG_CR0, 0x11)
    uc.reg_write(x86.UC_X86_REG_CR0, 0x10)
    uc.reg_write(x86.UC_X86_REG_CR4, 0)
    uc.msr_write(MSR_EFER, 0)
    uc.reg_write(x86.UC_X86_REG_GDTR, (0, 0, 0xFFFF, 0))
    uc.reg_write(x86.UC_X86_REG_IDTR, (0, 0, 0xFFFF, 0))  # the IVT at 0, as at reset
    real = {
        name: Segment(base=0, limit=0xFFFF, selector=0, type=0xB if name == "cs" else 3)
        for name in SEGMENT_NAMES[:6]
    }
    real["tr"] = Segment(limit=0xFFFF, type=0xB, s=0)
    real["ldt"] = Segment(limit=0xFFFF, type=0x2, s=0)
    _CpuState(uc).load(real, 0x10, 2)


_GPRS = {name: getattr(x86, f"UC_X86_REG_{name.upper()}") for name in GPR_NAMES}
_SEGMENT_REGS = {name: getattr(x86, f"UC_X86_REG_{name.upper()}") for name in SEGMENT_NAMES[:6]}
_REG_RIP = x86.UC_X86_REG_RIP
_REG_RFLAGS = x86.UC_X86_REG_RFLAGS
_REG_RAX = x86.UC_X86_REG_RAX


def _mapping_address(backing: mmap.mmap, offset: int) -> int:
    """The host address of ``backing[offset]``, without keeping a buffer export alive."""
    view = ctypes.c_char.from_buffer(backing, offset)
    address = ctypes.addressof(view)
    del view  # a live export would stop GuestMemory from closing the map
    return address


def _emulator_cpuid() -> list[CpuidEntry]:
    """What the emulated CPU answers to CPUID (the leaves kvmpy reads)."""
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, 0x1000)
    uc.mem_write(0, b"\x0f\xa2")  # cpuid
    entries = []
    for leaf in (0, 1, 0x8000_0000, 0x8000_0001):
        uc.reg_write(x86.UC_X86_REG_RAX, leaf)
        uc.reg_write(x86.UC_X86_REG_RCX, 0)
        uc.emu_start(0, 2)
        eax, ebx, ecx, edx = (
            uc.reg_read(getattr(x86, f"UC_X86_REG_{name}")) for name in ("EAX", "EBX", "ECX", "EDX")
        )
        entries.append(CpuidEntry(leaf, eax=eax, ebx=ebx, ecx=ecx, edx=edx))
    return entries


class SoftBackend:
    """The Unicorn CPU emulator: runs anywhere, slowly, without /dev/kvm."""

    name = "soft"
    capabilities = CAPABILITIES
    # Guest RAM is sparse: MAP_NORESERVE where the host has it (Python names it from 3.13).
    ram_map_flags = getattr(mmap, "MAP_NORESERVE", 0x4000 if hasattr(mmap, "MAP_POPULATE") else 0)

    def __init__(self) -> None:
        self._cpuid = _emulator_cpuid()

    def max_vcpus(self) -> int:
        return 1

    def supported_cpuid(self) -> list[CpuidEntry]:
        return list(self._cpuid)

    def create_vm(self, *, irqchip: bool, scratch_base: int) -> SoftVm:
        if irqchip:
            raise BackendError(
                "creating the VM", errno.EOPNOTSUPP, "the CPU emulator has no in-kernel irqchip"
            )
        return SoftVm()

    def describe(self) -> str:
        import unicorn

        leaf0 = self._cpuid[0]
        vendor = b"".join(r.to_bytes(4, "little") for r in (leaf0.ebx, leaf0.edx, leaf0.ecx))
        return (
            f"software backend: Unicorn {unicorn.__version__} (QEMU's TCG), "
            f"emulated CPU {vendor.decode(errors='replace')}, 1 vCPU, no in-kernel irqchip\n"
            f"capabilities: {', '.join(sorted(c.value for c in self.capabilities))}"
        )

    def close(self) -> None:
        pass


class _Slot(Record, frozen=False):
    gpa: int
    size: int
    backing: mmap.mmap
    offset: int


class SoftVm:
    """One emulator instance: its physical address space and its one vCPU."""

    capabilities = CAPABILITIES

    def __init__(self) -> None:
        # 64-bit mode: the 16- and 32-bit modes cannot reach RAX..R15 and RIP.
        self.uc = Uc(UC_ARCH_X86, UC_MODE_64)
        _check_layout(self.uc)
        # No end address: Unicorn would look it up through the guest's page
        # tables before each run, and a miss there sets the guest's CR2.
        self.uc.ctl_exits_enabled(True)
        self.uc.ctl_set_exits([])
        _reset_to_real_mode(self.uc)
        self.slots: dict[int, _Slot] = {}
        self.vcpus: list[SoftVcpu] = []
        self._mmio_mapped = False
        self._closed = False

    def map_memory(
        self, slot: int, gpa: int, backing: mmap.mmap, offset: int, size: int, log_dirty: bool
    ) -> None:
        if self._mmio_mapped:
            raise BackendError("map_memory", errno.EBUSY, "RAM must be mapped before the first run")
        if gpa % mmap.PAGESIZE or size % mmap.PAGESIZE or size <= 0:
            raise BackendError(
                "map_memory", errno.EINVAL, f"{gpa:#x}+{size:#x} is not page-aligned"
            )
        if offset < 0 or offset + size > len(backing):
            raise BackendError("map_memory", errno.EINVAL, "slot beyond its mapping")
        try:
            self.uc.mem_map_ptr(gpa, size, UC_PROT_ALL, _mapping_address(backing, offset))
        except UcError as exc:
            raise BackendError("map_memory", errno.EINVAL, str(exc)) from None
        self.slots[slot] = _Slot(gpa, size, backing, offset)
        self.invalidate(gpa, size)

    def ensure_mmio(self, vcpu: SoftVcpu) -> None:
        """Map every physical range that is not RAM as MMIO (before the first run)."""
        if self._mmio_mapped:
            return
        self._mmio_mapped = True
        at = 0
        for slot in sorted(self.slots.values(), key=lambda s: s.gpa):
            if slot.gpa > at:
                self._map_mmio(at, slot.gpa - at, vcpu)
            at = max(at, slot.gpa + slot.size)
        if at < PHYSICAL_LIMIT:
            self._map_mmio(at, PHYSICAL_LIMIT - at, vcpu)

    def _map_mmio(self, base: int, size: int, vcpu: SoftVcpu) -> None:
        def read(uc: Uc, offset: int, length: int, _: object) -> int:
            return vcpu.mmio_read(base + offset, length)

        def write(uc: Uc, offset: int, length: int, value: int, _: object) -> None:
            vcpu.mmio_write(base + offset, length, value)

        self.uc.mmio_map(base, size, read, None, write, None)

    def read_phys(self, gpa: int, size: int) -> bytes | None:
        """``size`` bytes of RAM at ``gpa``; None when any of it is not RAM."""
        for slot in self.slots.values():
            if slot.gpa <= gpa and gpa + size <= slot.gpa + slot.size:
                start = slot.offset + gpa - slot.gpa
                return slot.backing[start : start + size]
        return None

    def write_phys(self, gpa: int, data: bytes) -> bool:
        for slot in self.slots.values():
            if slot.gpa <= gpa and gpa + len(data) <= slot.gpa + slot.size:
                start = slot.offset + gpa - slot.gpa
                slot.backing[start : start + len(data)] = data
                self.invalidate(gpa, len(data))
                return True
        return False

    def invalidate(self, gpa: int, size: int) -> None:
        """Guest memory changed behind the emulator's back: drop translated code."""
        for vcpu in self.vcpus:
            vcpu.flush_code_cache()

    def dirty_pages(self, slot: int, pages: int) -> bytes:
        # No dirty log here: report every page written, so a display always redraws.
        return b"\xff" * ((pages + 7) // 8)

    def irq_line(self, irq: int, level: bool) -> None:
        raise BackendError("irq_line", errno.EOPNOTSUPP, "the CPU emulator has no irqchip")

    def set_irq_routes(self, routes: list[IrqRoute]) -> None:
        raise BackendError("set_irq_routes", errno.EOPNOTSUPP, "the CPU emulator has no irqchip")

    def answer_windows(self, space: str, windows: list[ExitWindow]) -> bool:
        return False  # every exit comes back to the run loop

    def window_misses(self, space: str) -> Counter[tuple[str, int]]:
        return Counter()

    def create_vcpu(self, index: int) -> SoftVcpu:
        if index != 0 or self.vcpus:
            raise BackendError("creating a vCPU", errno.EOPNOTSUPP, "the CPU emulator runs 1 vCPU")
        vcpu = SoftVcpu(self, index)
        self.vcpus.append(vcpu)
        return vcpu

    def save_state(self) -> dict[str, Any]:
        # No irqchip, PIT or clock: one empty entry, the shape snapshots expect.
        return {"soft": ""}

    def load_state(self, state: dict[str, Any]) -> None:
        if set(state) != {"soft"}:
            raise BackendError(
                "loading VM state",
                errno.EINVAL,
                "the state was not saved by the software backend: "
                "restore a snapshot under the backend that took it",
            )

    def load_interrupt_state(self, state: dict[str, Any]) -> None:
        """Nothing to do: the CPU emulator has no interrupt controllers."""

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            for vcpu in self.vcpus:
                vcpu.close()


class SoftVcpu:
    """The emulated CPU.  ``run`` hands over to the emulator thread and waits for an exit."""

    backend_name = "the CPU emulator"

    def __init__(self, vm: SoftVm, index: int) -> None:
        self.vm = vm
        self.uc = vm.uc
        self.index = index
        self.exit = ExitRecord()
        self.io_buffer = bytearray(4096)
        self.thread_ident: int | None = None
        self._kicked = False
        self._closing = False
        self._resume = threading.Lock()
        self._resume.acquire()
        self._exited = threading.Lock()
        self._exited.acquire()
        self._thread: threading.Thread | None = None
        self._result = 0
        self._in_guest = False
        self._suspended = False
        self._in_io_hook = False
        self._draining = False
        self._stop_requests = 0
        self._flush = True
        self._pending_vector: int | None = None
        self._detail: tuple[str, bytes | None] = ("", None)
        self._event = SystemEvent.OTHER
        self._mp_state = MpState.RUNNABLE
        self._single_step = False
        self._breakpoint_hooks: list[int] = []
        self._runs = 0  # emulator runs (emu_start calls) so far
        self._skip_breakpoint: tuple[int, int] | None = None  # (address, in run number)
        self._stats: StatsTable | None = None
        self._stats_key = 0
        self._returned_ns = 0
        self._cpuid: list[CpuidEntry] = []
        self._state = _CpuState(self.uc)
        self.uc.hook_add(UC_HOOK_INSN, self._on_in, None, 1, 0, x86.UC_X86_INS_IN)
        self.uc.hook_add(UC_HOOK_INSN, self._on_out, None, 1, 0, x86.UC_X86_INS_OUT)
        self.uc.hook_add(UC_HOOK_INTR, self._on_interrupt)

    # -- the run loop's side -------------------------------------------------------------

    def run(self) -> int:
        if self._stats is not None:
            return self._run_counted()
        if self._kicked:
            return -errno.EINTR
        if self._thread is None:
            self._start_thread()
        self._resume.release()
        self._exited.acquire()
        return self._result

    def _run_counted(self) -> int:
        stats = self._stats
        assert stats is not None
        started = time.perf_counter_ns()
        if self._stats_key:
            stats[self._stats_key][2] += started - self._returned_ns
        self._stats = None
        try:
            reason = self.run()
        finally:
            self._stats = stats
        self._returned_ns = time.perf_counter_ns()
        if reason < 0:
            self._stats_key = 0
            return reason
        where = self.exit.io_port
        if reason == ExitKind.MMIO:
            where = self.exit.mmio_addr >> 12
        key = int(reason) << 40 | where
        row = stats.setdefault(key, [0, 0, 0])
        row[0] += 1
        row[1] += self._returned_ns - started
        self._stats_key = key
        return reason

    def _start_thread(self) -> None:
        self.vm.ensure_mmio(self)
        self._thread = threading.Thread(
            target=self._emulate, name=f"kvmpy-emulator{self.index}", daemon=True
        )
        self._thread.start()

    def kick(self) -> None:
        self._kicked = True
        if self._in_guest:
            self._request_stop()
        timer = threading.Timer(REKICK_DELAY, self._rekick)
        timer.daemon = True
        timer.start()

    def _rekick(self) -> None:
        if self._kicked and self._in_guest:
            self._request_stop()

    def clear_kick(self) -> None:
        self._kicked = False
        # A new run may follow host-side writes to guest memory.
        self.flush_code_cache()

    def flush_code_cache(self) -> None:
        self._flush = True
        if self._suspended:
            # The emulator is inside a hook: make it leave Unicorn when it resumes.
            self._request_stop()

    def _request_stop(self) -> None:
        self._stop_requests += 1
        self.uc.emu_stop()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        thread = self._thread
        if thread is not None and thread.is_alive():
            self._request_stop()
            # Wake the emulator wherever it waits (in a hook, or for the first run).
            with contextlib.suppress(RuntimeError):
                self._resume.release()
            thread.join(5)

    # -- the emulator thread -------------------------------------------------------------

    def _post(self, kind: int) -> None:
        """Hand exit ``kind`` to run() and wait for the next run() (or close)."""
        self._result = kind
        self._suspended = True
        self._exited.release()
        self._resume.acquire()
        self._suspended = False
        if self._closing or self._flush:
            self._request_stop()

    def _post_io(self, kind: ExitKind) -> bool:
        """Post an I/O or MMIO exit from its hook; False while draining (nobody to see it)."""
        if self._draining:
            return False
        self._in_io_hook = True
        self._post(int(kind))
        self._in_io_hook = False
        return True

    def _leave_emulator(self) -> None:
        """Before the host changes CPU state: get the emulator out of a pending I/O hook.

        An I/O hook sits inside a translated block; state written now would be
        overwritten by the rest of that block.  So the block is run to its end
        (its further I/O dropped) and Unicorn left; the host's state then wins.
        """
        if not (self._suspended and self._in_io_hook):
            return
        self._draining = True
        self._request_stop()
        self._resume.release()
        self._exited.acquire()
        self._draining = False

    def _emulate(self) -> None:
        self._resume.acquire()
        uc = self.uc
        while not self._closing:
            if self._kicked:
                self._post(-errno.EINTR)
                continue
            if self._flush:
                self._flush = False
                uc.ctl_flush_tb()
            seen = self._stop_requests
            self._pending_vector = None
            error: UcError | None = None
            rip = uc.reg_read(_REG_RIP)
            self._runs += 1
            stepping = self._single_step
            self._in_guest = True
            try:
                if stepping:
                    uc.emu_start(rip, NO_END, 0, 1)
                else:
                    uc.emu_start(rip, NO_END)
            except UcError as exc:
                error = exc
            finally:
                self._in_guest = False
            if self._closing:
                break
            if self._draining:
                self._post(int(ExitKind.SPURIOUS))
                continue
            if error is not None:
                if error.errno == UC_ERR_INSN_INVALID:
                    self._raise_event(events.INVALID_OPCODE, None)
                else:
                    self._internal_error(f"Unicorn: {error}")
            elif self._pending_vector is not None:
                self._raise_event(self._pending_vector, self._error_code(self._pending_vector))
            elif self._stop_requests != seen:
                continue  # stopped on request: a kick, a flush, a debugger's change
            elif stepping:
                self._debug_exit(uc.reg_read(_REG_RIP), 1 << 14)
            else:
                # Unicorn returned by itself, not stepping: the guest executed HLT.
                self.exit.reason = int(ExitKind.HLT)
                self._mp_state = MpState.HALTED
                self._post(int(ExitKind.HLT))
        self._in_guest = False

    def _on_in(self, uc: Uc, port: int, size: int, _: object) -> int:
        e = self.exit
        e.reason = int(ExitKind.PORT_IN)
        e.io_port, e.io_size, e.io_direction, e.io_count, e.data_offset = port, size, 0, 1, 0
        if not self._post_io(ExitKind.PORT_IN):
            return (1 << 8 * size) - 1
        return int.from_bytes(self.io_buffer[:size], "little")

    def _on_out(self, uc: Uc, port: int, size: int, value: int, _: object) -> None:
        e = self.exit
        e.reason = int(ExitKind.PORT_OUT)
        e.io_port, e.io_size, e.io_direction, e.io_count = port, size, 1, 1
        e.value = value
        self._post_io(ExitKind.PORT_OUT)

    def mmio_read(self, address: int, size: int) -> int:
        e = self.exit
        e.reason = int(ExitKind.MMIO)
        e.mmio_addr, e.mmio_len, e.mmio_is_write, e.data_offset, e.value = address, size, 0, 0, 0
        if not self._post_io(ExitKind.MMIO):
            return (1 << 8 * size) - 1
        return int.from_bytes(self.io_buffer[:size], "little")

    def mmio_write(self, address: int, size: int, value: int) -> None:
        e = self.exit
        e.reason = int(ExitKind.MMIO)
        e.mmio_addr, e.mmio_len, e.mmio_is_write, e.value = address, size, 1, value
        self._post_io(ExitKind.MMIO)

    def _on_interrupt(self, uc: Uc, vector: int, _: object) -> None:
        # Unicorn would go on past the event; stop it and deliver the event ourselves.
        self._pending_vector = vector
        self._request_stop()

    def _on_breakpoint(self, uc: Uc, address: int, size: int, slot: int) -> None:
        if self._skip_breakpoint == (address, self._runs):
            self._skip_breakpoint = None  # resuming from this very breakpoint
            return
        self._debug_exit(address, 1 << slot)
        # Resuming.  The rest of this translated block predates whatever the
        # debugger changed (breakpoints, single-step): leave it.  Writing RIP
        # inside a code hook abandons the block before this instruction; the
        # next emulator run starts here and passes this breakpoint once, as
        # RFLAGS.RF makes a CPU do.
        if uc.reg_read(_REG_RIP) == address:
            uc.reg_write(_REG_RIP, address)
            self._skip_breakpoint = (address, self._runs + 1)
        self._request_stop()

    def _debug_exit(self, pc: int, dr6: int) -> None:
        e = self.exit
        e.reason = int(ExitKind.DEBUG)
        e.debug_exception, e.debug_pc, e.debug_dr6, e.debug_dr7 = 1, pc, dr6 | 0xFFFF0FF0, 0x400
        self._post(int(ExitKind.DEBUG))

    def _error_code(self, vector: int) -> int | None:
        """The error code a fault pushes, as far as it can be known outside the emulator."""
        if vector not in events.ERROR_CODE_VECTORS or self._software_interrupt(vector):
            return None
        if vector != events.PAGE_FAULT:
            return 0  # Unicorn does not report error codes: a selector-less fault
        sregs = self.get_sregs()
        present = self.translate(sregs.cr2) is not None
        user = sregs.cs.selector & 3 == 3
        fetch = sregs.cr2 == self._linear_rip(sregs)
        return int(present) | int(user) << 2 | int(fetch) << 4

    def _software_interrupt(self, vector: int) -> bool:
        """Whether ``vector`` came from an INT n / INT3 / INTO just before RIP."""
        sregs = self.get_sregs()
        rip = self._linear_rip(sregs)
        try:
            before = self._peek(rip - 2, 2)
        except events.Fault:
            return False
        return (
            before == bytes((0xCD, vector))
            or (before[1] == 0xCC and vector == 3)
            or (before[1] == 0xCE and vector == 4)
        )

    def _linear_rip(self, sregs: Sregs) -> int:
        return (sregs.cs.base + int(self.uc.reg_read(_REG_RIP))) & 0xFFFF_FFFF_FFFF_FFFF

    def _raise_event(self, vector: int, error_code: int | None) -> None:
        software = vector in (events.BREAKPOINT, 4) or self._software_interrupt(vector)
        try:
            result = events.deliver(self, vector, error_code, software)
        except events.Unsupported as exc:
            self._internal_error(f"cannot deliver exception {vector}: {exc}")
            return
        except UcError as exc:
            self._internal_error(f"cannot deliver exception {vector}: {exc}")
            return
        if result is events.Result.SHUTDOWN:
            if vector in events.FAULT_VECTORS and not software:
                # As after a fault a CPU could not deliver: RF set (KVM reports the same).
                rflags = self.uc.reg_read(_REG_RFLAGS)
                self.uc.reg_write(_REG_RFLAGS, rflags | events.RFLAGS_RF)
            self.exit.reason = int(ExitKind.SHUTDOWN)
            self._post(int(ExitKind.SHUTDOWN))

    def _internal_error(self, detail: str) -> None:
        code = None
        with contextlib.suppress(events.Fault):
            code = self._peek(self._linear_rip(self.get_sregs()), MAX_INSTRUCTION)
        self._detail = (detail, code)
        self.exit.reason = int(ExitKind.INTERNAL_ERROR)
        self._post(int(ExitKind.INTERNAL_ERROR))

    # -- what event delivery needs (events.CpuAccess) ------------------------------------

    def frame(self) -> events.Frame:
        regs = self.get_regs()
        sregs = self.get_sregs()
        return events.Frame(
            cr0=sregs.cr0,
            efer=sregs.efer,
            rip=regs.rip,
            rsp=regs.rsp,
            rflags=regs.rflags,
            cs=sregs.cs,
            ss=sregs.ss,
            idt_base=sregs.idt.base,
            idt_limit=sregs.idt.limit,
            gdt_base=sregs.gdt.base,
            gdt_limit=sregs.gdt.limit,
            tr_base=sregs.tr.base,
        )

    def _physical(self, address: int, write: bool, fault: bool = True) -> int:
        result = self.translate(address)
        if result is None or (write and not result.writeable and self._write_protect()):
            if fault:
                self.uc.reg_write(x86.UC_X86_REG_CR2, address)
            raise events.Fault(events.PAGE_FAULT, int(result is not None) | int(write) << 1)
        return result.physical_address

    def _write_protect(self) -> bool:
        return bool(self.uc.reg_read(x86.UC_X86_REG_CR0) & (1 << 16))

    def _peek(self, address: int, size: int) -> bytes:
        """Guest memory at a linear address for kvmpy's own use: no fault, no CR2."""
        return self.read_linear(address, size, fault=False)

    def read_linear(self, address: int, size: int, fault: bool = True) -> bytes:
        out = bytearray()
        while size > 0:
            chunk = min(size, 0x1000 - (address & 0xFFF))
            data = self.vm.read_phys(self._physical(address, False, fault), chunk)
            if data is None:
                raise events.Fault(events.GENERAL_PROTECTION, 0)
            out += data
            address += chunk
            size -= chunk
        return bytes(out)

    def write_linear(self, address: int, data: bytes) -> None:
        while data:
            chunk = min(len(data), 0x1000 - (address & 0xFFF))
            if not self.vm.write_phys(self._physical(address, True), data[:chunk]):
                raise events.Fault(events.GENERAL_PROTECTION, 0)
            address += chunk
            data = data[chunk:]

    def jump(self, cs: Segment, rip: int, rsp: int, rflags: int, ss: Segment | None) -> None:
        uc = self.uc
        segments = {"cs": cs} if ss is None else {"cs": cs, "ss": ss}
        self._state.load(segments, uc.reg_read(x86.UC_X86_REG_CR0), rflags)
        uc.reg_write(x86.UC_X86_REG_RSP, rsp)
        uc.reg_write(_REG_RFLAGS, rflags)
        uc.reg_write(_REG_RIP, rip)
        self._mp_state = MpState.RUNNABLE

    # -- registers -----------------------------------------------------------------------

    def get_regs(self) -> Regs:
        uc = self.uc
        values = {name: uc.reg_read(reg) for name, reg in _GPRS.items()}
        return Regs(**values, rip=uc.reg_read(_REG_RIP), rflags=uc.reg_read(_REG_RFLAGS))

    def set_regs(self, regs: Regs) -> None:
        self._leave_emulator()
        uc = self.uc
        for name, reg in _GPRS.items():
            uc.reg_write(reg, getattr(regs, name))
        uc.reg_write(_REG_RFLAGS, regs.rflags)
        uc.reg_write(_REG_RIP, regs.rip)
        self.flush_code_cache()

    def get_sregs(self) -> Sregs:
        uc = self.uc
        segments = self._state.segments()
        _, gdt_base, gdt_limit, _ = uc.reg_read(x86.UC_X86_REG_GDTR)
        _, idt_base, idt_limit, _ = uc.reg_read(x86.UC_X86_REG_IDTR)
        return Sregs(
            cs=segments["cs"],
            ds=segments["ds"],
            es=segments["es"],
            fs=segments["fs"],
            gs=segments["gs"],
            ss=segments["ss"],
            tr=segments["tr"],
            ldt=segments["ldt"],
            gdt=DTable(gdt_base, gdt_limit),
            idt=DTable(idt_base, idt_limit),
            cr0=uc.reg_read(x86.UC_X86_REG_CR0),
            cr2=uc.reg_read(x86.UC_X86_REG_CR2),
            cr3=uc.reg_read(x86.UC_X86_REG_CR3),
            cr4=uc.reg_read(x86.UC_X86_REG_CR4),
            cr8=0,
            efer=uc.msr_read(MSR_EFER),
            apic_base=APIC_BASE,
        )

    def set_sregs(self, sregs: Sregs) -> None:
        """Control registers through Unicorn's API (it keeps its mode flags), then the
        segment caches, hidden state included, straight into the CPU state."""
        self._leave_emulator()
        uc = self.uc
        try:
            # Paging off first: leaving long mode clears EFER.LMA only that way.
            uc.reg_write(x86.UC_X86_REG_CR0, uc.reg_read(x86.UC_X86_REG_CR0) & ~CR0_PG)
            uc.reg_write(x86.UC_X86_REG_CR4, sregs.cr4)
            uc.msr_write(MSR_EFER, sregs.efer & ~EFER_LMA)
            uc.reg_write(x86.UC_X86_REG_CR3, sregs.cr3)
            uc.reg_write(x86.UC_X86_REG_CR0, sregs.cr0)
            uc.reg_write(x86.UC_X86_REG_CR2, sregs.cr2)
            uc.reg_write(x86.UC_X86_REG_GDTR, (0, sregs.gdt.base, sregs.gdt.limit, 0))
            uc.reg_write(x86.UC_X86_REG_IDTR, (0, sregs.idt.base, sregs.idt.limit, 0))
        except UcError as exc:
            raise BackendError(
                "set_sregs", errno.EINVAL, f"the CPU emulator refused: {exc}"
            ) from None
        if bool(uc.msr_read(MSR_EFER) & EFER_LMA) != bool(sregs.efer & EFER_LMA):
            raise BackendError(
                "set_sregs",
                errno.EINVAL,
                f"EFER.LMA={int(bool(sregs.efer & EFER_LMA))} does not follow from "
                f"CR0={sregs.cr0:#x}, CR4={sregs.cr4:#x}, EFER={sregs.efer:#x}",
            )
        self._state.load(
            {name: getattr(sregs, name) for name in SEGMENT_NAMES},
            sregs.cr0,
            uc.reg_read(_REG_RFLAGS),
        )
        self.flush_code_cache()

    def get_fpu(self) -> Fpu:
        uc = self.uc
        fpr = b"".join(
            (mantissa | exponent << 64).to_bytes(16, "little")
            for mantissa, exponent in (uc.reg_read(x86.UC_X86_REG_FP0 + i) for i in range(8))
        )
        xmm = b"".join(
            uc.reg_read(x86.UC_X86_REG_XMM0 + i).to_bytes(16, "little") for i in range(16)
        )
        return Fpu(
            fcw=uc.reg_read(x86.UC_X86_REG_FPCW),
            fsw=uc.reg_read(x86.UC_X86_REG_FPSW),
            ftwx=uc.reg_read(x86.UC_X86_REG_FPTAG) & 0xFF,
            mxcsr=uc.reg_read(x86.UC_X86_REG_MXCSR),
            fpr=fpr,
            xmm=xmm,
        )

    def set_fpu(self, fpu: Fpu) -> None:
        self._leave_emulator()
        uc = self.uc
        uc.reg_write(x86.UC_X86_REG_FPCW, fpu.fcw)
        uc.reg_write(x86.UC_X86_REG_FPSW, fpu.fsw)
        uc.reg_write(x86.UC_X86_REG_MXCSR, fpu.mxcsr)
        for i in range(8):
            raw = int.from_bytes(fpu.fpr[16 * i : 16 * i + 10], "little")
            uc.reg_write(x86.UC_X86_REG_FP0 + i, (raw & ((1 << 64) - 1), raw >> 64))
        for i in range(16):
            uc.reg_write(
                x86.UC_X86_REG_XMM0 + i, int.from_bytes(fpu.xmm[16 * i : 16 * i + 16], "little")
            )

    def set_cpuid(self, table: list[CpuidEntry]) -> None:
        # The emulator answers CPUID from its own CPU model; kept for snapshots only.
        self._cpuid = list(table)

    def translate(self, linear_address: int) -> Translation | None:
        uc = self.uc
        return translate(
            linear_address,
            uc.reg_read(x86.UC_X86_REG_CR0),
            uc.reg_read(x86.UC_X86_REG_CR3),
            uc.reg_read(x86.UC_X86_REG_CR4),
            uc.msr_read(MSR_EFER),
            self.vm.read_phys,
        )

    def get_mp_state(self) -> MpState:
        return self._mp_state

    def set_mp_state(self, state: MpState) -> None:
        if state not in (MpState.RUNNABLE, MpState.HALTED):
            raise BackendError("set_mp_state", errno.EOPNOTSUPP, f"{state.name} needs SMP")
        self._mp_state = state

    def set_guest_debug(
        self,
        enable: bool = True,
        single_step: bool = False,
        breakpoints: list[int] | None = None,
        software_breakpoints: bool = False,
    ) -> None:
        """Single-step one instruction per run(); DR0-DR3 execute breakpoints as code hooks.

        ``software_breakpoints``: int3 goes to the guest, as on this host's KVM.
        """
        self._leave_emulator()
        for hook in self._breakpoint_hooks:
            self.uc.hook_del(hook)
        self._breakpoint_hooks = []
        self._single_step = enable and single_step
        values = breakpoints or []
        if len(values) > 8:
            raise ValueError(f"8 debug registers, not {len(values)}")
        if enable and len(values) == 8:
            dr7 = values[7]
            for slot in range(4):
                kind = (dr7 >> (16 + 4 * slot)) & 3
                if dr7 >> (2 * slot) & 3 and kind == 0:  # enabled, on execution
                    address = values[slot]
                    self._breakpoint_hooks.append(
                        self.uc.hook_add(UC_HOOK_CODE, self._on_breakpoint, slot, address, address)
                    )
        self.flush_code_cache()

    def describe_exit(self) -> tuple[str, bytes | None]:
        if self.exit.reason == ExitKind.INTERNAL_ERROR:
            return self._detail
        return "", None

    # Instruction completion (kvmpy/x86/complete.py) is for backends that give up on
    # instructions; the emulator runs them, so it reports none and takes no events.

    def failed_instruction(self) -> bytes | None:
        return None

    def inject_exception(self, vector: int, error_code: int | None = None) -> None:
        raise BackendError("inject_exception", errno.EOPNOTSUPP, "the CPU emulator takes none")

    def inject_interrupt(self, vector: int) -> None:
        raise BackendError("inject_interrupt", errno.EOPNOTSUPP, "the CPU emulator takes none")

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        found = {}
        for index in indices:
            with contextlib.suppress(UcError):
                found[index] = int(self.uc.msr_read(index))
        return found

    def get_xcr(self, index: int) -> int | None:
        return None

    def set_xcr(self, index: int, value: int) -> None:
        raise BackendError("set_xcr", errno.EOPNOTSUPP, "the CPU emulator has no XCRs")

    def get_xsave(self) -> bytes:
        raise BackendError("get_xsave", errno.EOPNOTSUPP, "the CPU emulator has no XSAVE area")

    def set_xsave(self, state: bytes) -> None:
        raise BackendError("set_xsave", errno.EOPNOTSUPP, "the CPU emulator has no XSAVE area")

    def compare_exchange(
        self, memory: memoryview, expected: int, replacement: int
    ) -> tuple[bool, int]:
        raise BackendError("compare_exchange", errno.EOPNOTSUPP, "not needed by the emulator")

    def host_rdpru(self, register: int) -> tuple[int, int]:
        raise BackendError("host_rdpru", errno.EOPNOTSUPP, "not needed by the emulator")

    def exit_name(self) -> str:
        try:
            return "SOFT_EXIT_" + EXIT_NAMES[ExitKind(self.exit.reason)]
        except (KeyError, ValueError):
            return f"SOFT_EXIT_{self.exit.reason}"

    @property
    def system_event(self) -> int:
        return self._event

    def answer_exits(self, enabled: bool) -> None:
        return None  # no windows: nothing to answer

    def enable_stats(self) -> None:
        self._stats = {}
        self._stats_key = 0

    def collect_stats(self) -> StatsTable:
        stats, self._stats = self._stats or {}, None
        self._stats_key = 0
        return stats

    def save_state(self) -> dict[str, Any]:
        """The snapshot format's vCPU shape (KVM's): the FPU goes in "xsave" as
        ``_FPU_STATE`` bytes, the blobs the emulator has no state for are empty."""
        fpu = self.get_fpu()
        packed = _FPU_STATE.pack(fpu.fcw, fpu.fsw, fpu.ftwx, fpu.mxcsr, fpu.fpr, fpu.xmm)
        return {
            "regs": asdict(self.get_regs()),
            "sregs": asdict(self.get_sregs()),
            "xsave": base64.b64encode(SOFT_STATE_MAGIC + packed).decode("ascii"),
            "xcrs": "",
            "events": "",
            "debugregs": "",
            "lapic": None,
            "msrs": [[index, self.uc.msr_read(index)] for index in SAVED_MSRS],
            "mp_state": int(self._mp_state),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self._leave_emulator()
        try:
            blob = base64.b64decode(state["xsave"])
            if not blob.startswith(SOFT_STATE_MAGIC) or state["lapic"] is not None:
                raise ValueError("not saved by the CPU emulator")
            fcw, fsw, ftwx, mxcsr, fpr, xmm = _FPU_STATE.unpack(blob[len(SOFT_STATE_MAGIC) :])
            mp_state = MpState(int(state["mp_state"]))
            msrs = {int(index): int(value) for index, value in state["msrs"]}
        except (KeyError, ValueError, TypeError, struct.error) as exc:
            raise BackendError(
                "loading vCPU state",
                errno.EINVAL,
                f"the state was not saved by the software backend ({exc}): "
                "restore a snapshot under the backend that took it",
            ) from None
        self.set_sregs(sregs_from_dict(state["sregs"]))
        self.set_regs(Regs(**state["regs"]))
        self.set_fpu(Fpu(fcw=fcw, fsw=fsw, ftwx=ftwx, mxcsr=mxcsr, fpr=fpr, xmm=xmm))
        for index, value in msrs.items():
            if index in SAVED_MSRS:
                self.uc.msr_write(index, value)
        self._mp_state = mp_state
