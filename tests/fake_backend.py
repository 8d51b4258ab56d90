"""A backend with scripted exits: runs Machine and the run loop without /dev/kvm.

Each vCPU plays a script of ``Step``s: ``run()`` returns the next step's
kind with its exit fields set.  A step may check what the loop wrote back
(IN and MMIO-read data land in ``io_buffer``).  When the script runs out,
the vCPU "spins": ``run()`` sleeps a little and returns SPURIOUS until it
is kicked, as a busy guest would under KVM.
"""

from __future__ import annotations

import errno
import mmap
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from kvmpy import records
from kvmpy.backends.base import (
    BackendError,
    Capability,
    IrqRoute,
    MpState,
    StatsTable,
    Translation,
)
from kvmpy.backends.exits import ExitKind, ExitRecord, ExitWindow, SystemEvent
from kvmpy.x86.cpuid import CpuidEntry
from kvmpy.x86.registers import Fpu, Regs, Sregs

ALL_CAPABILITIES = frozenset(Capability)


@dataclass
class Step:
    """One scripted exit: its kind and ExitRecord fields, and an optional check after it."""

    kind: ExitKind
    fields: dict[str, Any] = field(default_factory=dict)
    data: bytes = b""  # what the guest "wrote" (string OUT items), placed at data_offset
    regs: dict[str, int] = field(default_factory=dict)  # register values at this exit
    system_event: SystemEvent = SystemEvent.OTHER
    detail: str = ""
    code: bytes | None = None


class FakeVcpu:
    backend_name = "the fake backend"

    def __init__(self, index: int, script: list[Step]) -> None:
        self.index = index
        self.script = list(script)
        self.exit = ExitRecord()
        self.io_buffer = bytearray(4096)
        self.thread_ident: int | None = None
        self.kicked = threading.Event()
        self.regs = Regs()
        self.sregs = Sregs()
        self.fpu = Fpu()
        self.mp_state = MpState.RUNNABLE
        self.cpuid: list[CpuidEntry] = []
        self.debug: dict[str, Any] = {}
        self.runs = 0
        self.closed = False
        self._event = SystemEvent.OTHER
        self._detail: tuple[str, bytes | None] = ("", None)
        self._stats: StatsTable | None = None
        # The data the loop left in io_buffer after each exit: (kind, bytes).
        self.replies: list[tuple[ExitKind, bytes]] = []
        self._last: Step | None = None
        # Events handed to inject_exception/inject_interrupt: (how, vector, error code).
        self.injected: list[tuple[str, int, int | None]] = []
        # Page (linear, 4 KiB aligned) -> its translation (None: not present), for translate().
        self.pages: dict[int, Translation | None] = {}
        self.xcr0 = 1
        # What get_msrs() reads.
        self.msrs: dict[int, int] = {}
        # What host_rdpru() answers: ECX -> (EDX:EAX, RFLAGS); None: no answer.
        self.rdpru: Callable[[int], tuple[int, int]] | None = None
        # The XSAVE area at power-on: FCW 0x37F, MXCSR 0x1F80, nothing in use.
        self.xsave = b"\x7f\x03" + bytes(22) + (0x1F80).to_bytes(4, "little") + bytes(4068)

    def run(self) -> int:
        self._record_reply()
        if self.kicked.is_set():
            return -errno.EINTR
        self.runs += 1
        if not self.script:
            time.sleep(0.001)
            return -errno.EINTR if self.kicked.is_set() else int(ExitKind.SPURIOUS)
        step = self.script.pop(0)
        self._last = step
        # One record, updated in place: the run loop holds on to it.
        fresh = ExitRecord(**step.fields)
        for spec in records.fields(ExitRecord):
            setattr(self.exit, spec.name, getattr(fresh, spec.name))
        if step.data:
            offset = self.exit.data_offset
            self.io_buffer[offset : offset + len(step.data)] = step.data
        for name, value in step.regs.items():
            setattr(self.regs, name, value)
        self._event = step.system_event
        self._detail = (step.detail, step.code)
        if self._stats is not None:
            key = int(step.kind) << 40 | self.exit.io_port
            self._stats.setdefault(key, [0, 0, 0])[0] += 1
        return int(step.kind)

    def _record_reply(self) -> None:
        step, self._last = self._last, None
        if step is None:
            return
        e = self.exit
        size = e.io_size * max(e.io_count, 1) if step.kind != ExitKind.MMIO else e.mmio_len
        reply = bytes(self.io_buffer[e.data_offset : e.data_offset + size])
        self.replies.append((step.kind, reply))

    def kick(self) -> None:
        self.kicked.set()

    def clear_kick(self) -> None:
        self.kicked.clear()

    def close(self) -> None:
        self.closed = True

    def get_regs(self) -> Regs:
        return Regs(**vars(self.regs))

    def set_regs(self, regs: Regs) -> None:
        self.regs = Regs(**vars(regs))

    def get_sregs(self) -> Sregs:
        return self.sregs

    def set_sregs(self, sregs: Sregs) -> None:
        self.sregs = sregs

    def get_fpu(self) -> Fpu:
        return self.fpu

    def set_fpu(self, fpu: Fpu) -> None:
        self.fpu = fpu

    def set_cpuid(self, table: list[CpuidEntry]) -> None:
        self.cpuid = table

    def translate(self, linear_address: int) -> Translation | None:
        """Identity, writeable supervisor pages, unless ``pages`` says otherwise for a page."""
        page = linear_address & ~0xFFF
        if page in self.pages:
            found = self.pages[page]
            if found is None:
                return None
            address = found.physical_address | linear_address & 0xFFF
            return Translation(address, found.writeable, found.usermode)
        return Translation(linear_address, True, False)

    def get_mp_state(self) -> MpState:
        return self.mp_state

    def set_mp_state(self, state: MpState) -> None:
        self.mp_state = state

    def set_guest_debug(
        self,
        enable: bool = True,
        single_step: bool = False,
        breakpoints: list[int] | None = None,
        software_breakpoints: bool = False,
    ) -> None:
        self.debug = {"enable": enable, "single_step": single_step}

    def describe_exit(self) -> tuple[str, bytes | None]:
        return self._detail

    def failed_instruction(self) -> bytes | None:
        """An INTERNAL_ERROR step's ``code``: the bytes of the instruction that "failed"."""
        if self._last is None or self._last.kind != ExitKind.INTERNAL_ERROR:
            return None
        return self._detail[1]

    def inject_exception(self, vector: int, error_code: int | None = None) -> None:
        self.injected.append(("exception", vector, error_code))

    def inject_interrupt(self, vector: int) -> None:
        self.injected.append(("interrupt", vector, None))

    def compare_exchange(
        self, memory: memoryview, expected: int, replacement: int
    ) -> tuple[bool, int]:
        found = int.from_bytes(memory, "little")  # one thread per fake vCPU: no race to fear
        if found == expected:
            memory[:] = replacement.to_bytes(len(memory), "little")
        return found == expected, found

    def host_rdpru(self, register: int) -> tuple[int, int]:
        """What a test set in ``rdpru``: (EDX:EAX, RFLAGS) for each ECX."""
        if self.rdpru is None:
            raise BackendError("host_rdpru", errno.EOPNOTSUPP, "no rdpru answer scripted")
        return self.rdpru(register)

    def get_xsave(self) -> bytes:
        return self.xsave

    def set_xsave(self, state: bytes) -> None:
        self.xsave = state

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        return {index: self.msrs[index] for index in indices if index in self.msrs}

    def get_xcr(self, index: int) -> int | None:
        return self.xcr0 if index == 0 else None

    def set_xcr(self, index: int, value: int) -> None:
        if index != 0 or not value & 1:
            raise BackendError("set_xcr", errno.EINVAL)
        self.xcr0 = value

    def exit_name(self) -> str:
        return f"FAKE_EXIT_{self.exit.reason}"

    @property
    def system_event(self) -> int:
        return self._event

    def answer_exits(self, enabled: bool) -> None:
        return None  # no windows: nothing to answer

    def enable_stats(self) -> None:
        self._stats = {}

    def collect_stats(self) -> StatsTable:
        stats, self._stats = self._stats or {}, None
        return stats

    def save_state(self) -> dict[str, Any]:
        return {"regs": vars(self.regs).copy(), "mp_state": int(self.mp_state)}

    def load_state(self, state: dict[str, Any]) -> None:
        self.regs = Regs(**state["regs"])
        self.mp_state = MpState(state["mp_state"])


class FakeVm:
    def __init__(self, backend: FakeBackend, irqchip: bool) -> None:
        self.backend = backend
        self.capabilities = backend.capabilities
        self.irqchip = irqchip
        self.slots: dict[int, tuple[int, int, bool]] = {}
        self.irq_levels: list[tuple[int, bool]] = []
        self.irq_routes: list[IrqRoute] = []
        self.vcpus: list[FakeVcpu] = []
        self.closed = False

    def map_memory(
        self, slot: int, gpa: int, backing: mmap.mmap, offset: int, size: int, log_dirty: bool
    ) -> None:
        self.slots[slot] = (gpa, size, log_dirty)

    def dirty_pages(self, slot: int, pages: int) -> bytes:
        return bytes((pages + 7) // 8)

    def irq_line(self, irq: int, level: bool) -> None:
        self.irq_levels.append((irq, level))

    def set_irq_routes(self, routes: list[IrqRoute]) -> None:
        self.irq_routes = list(routes)

    def answer_windows(self, space: str, windows: list[ExitWindow]) -> bool:
        return False  # every exit comes back to the run loop

    def window_misses(self, space: str) -> Counter[tuple[str, int]]:
        return Counter()

    def create_vcpu(self, index: int) -> FakeVcpu:
        scripts = self.backend.scripts
        vcpu = FakeVcpu(index, scripts[index] if index < len(scripts) else [])
        self.vcpus.append(vcpu)
        return vcpu

    def save_state(self) -> dict[str, Any]:
        return {"irq_levels": list(self.irq_levels)}

    def load_state(self, state: dict[str, Any]) -> None:
        self.irq_levels = [(int(irq), bool(level)) for irq, level in state["irq_levels"]]

    def load_interrupt_state(self, state: dict[str, Any]) -> None:
        self.load_state(state)

    def close(self) -> None:
        self.closed = True


class FakeBackend:
    name = "fake"
    ram_map_flags = 0

    def __init__(
        self,
        *scripts: list[Step],
        capabilities: frozenset[Capability] = ALL_CAPABILITIES,
        on_create: Callable[[FakeVm], None] | None = None,
    ) -> None:
        self.scripts = list(scripts)
        self.capabilities = capabilities
        self.vms: list[FakeVm] = []
        self.on_create = on_create

    def max_vcpus(self) -> int:
        return 8

    def supported_cpuid(self) -> list[CpuidEntry]:
        return [CpuidEntry(1, eax=0x806F8, edx=0x178BFBFF)]

    def create_vm(self, *, irqchip: bool, scratch_base: int) -> FakeVm:
        vm = FakeVm(self, irqchip)
        self.vms.append(vm)
        if self.on_create is not None:
            self.on_create(vm)
        return vm

    def describe(self) -> str:
        return "fake backend"

    def close(self) -> None:
        pass
