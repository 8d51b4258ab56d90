"""A Machine ties the layers together: a backend's VM, guest RAM, buses, devices, vCPUs.

with Machine(mem_size=16 << 20) as m:
    m.load(load_flat("guests/out/real_hello.bin", 0x7C00), mode="real")
    outcome = m.run(timeout=5)
    print(m.console.decode(), outcome.status)

Everything board-specific comes from a ``Board`` (the PC, ``kvmpy.x86.pc``);
everything about running code from a backend (``kvmpy.backends``).  Machine
owns the threads: one per vCPU, and one for the devices' timers.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from kvmpy._process import Terminated
from kvmpy.backends.base import Backend, BackendError, Capability, Vcpu, Vm, open_backend, require
from kvmpy.board import Board, DeviceEntry, FirmwareContext, Wiring
from kvmpy.bus import Bus, DeviceSpaces
from kvmpy.console import DEFAULT_CONSOLE_LIMIT, ConsoleLog
from kvmpy.devices.base import IrqCallback, no_irq
from kvmpy.devices.debug_exit import exit_status as debug_exit_status
from kvmpy.hostinfo import kvm_modules
from kvmpy.loaders import LoaderError, LoadPlan, check_plan
from kvmpy.loaders.detect import load_image
from kvmpy.memory import PAGE_SIZE, GuestMemory
from kvmpy.outcome import REPORTED_KINDS, Outcome, OutcomeKind
from kvmpy.records import replace
from kvmpy.runloop import ExitObserver, LoopContext, run_vcpu
from kvmpy.x86.arch import X86Arch
from kvmpy.x86.modes import CpuSetup, default_load_addr, setup_mode
from kvmpy.x86.pc import PC
from kvmpy.x86.registers import CR0_PG
from kvmpy.x86.topology import CpuTopology

if TYPE_CHECKING:
    from kvmpy.snapshot import Snapshot

DEFAULT_MEM_SIZE = PC.default_ram
MIN_MEM_SIZE = PC.min_ram
# How often the timer thread looks whether the guest enabled a timed interrupt.
TIMER_IDLE_POLL = 0.05

D = TypeVar("D")
CTRL_C = Outcome(OutcomeKind.INTERRUPTED, "interrupted", signal=signal.SIGINT)
SIGTERM = Outcome(OutcomeKind.INTERRUPTED, "terminated", signal=signal.SIGTERM)


def _interrupted_by(exc: KeyboardInterrupt) -> Outcome:
    """Ctrl-C, or a SIGTERM that kvmpy's handler turned into the same exception."""
    return SIGTERM if isinstance(exc, Terminated) else CTRL_C


class Machine:
    """A VM built from a board: RAM, vCPUs, the in-kernel irqchip and PIT, and devices.

    The default board is the PC a kernel written for ``qemu-system-x86_64
    -kernel`` expects (see ``kvmpy/x86/pc.py`` and the README's machine
    table).  With ``irqchip`` (the default, and required for more than one
    vCPU) the backend emulates the LAPICs, IOAPIC, PIC and PIT; vCPUs
    1..n-1 then wait for INIT/SIPI from the guest.  Without it, HLT exits
    to kvmpy, which ends the run.

    ``topology`` (``kvmpy.x86.topology``, QEMU's ``-smp``) sets the sockets,
    cores and threads CPUID describes; by default one socket of ``cpus`` cores.

    Serial output is kept in ``console`` and passed to ``serial_output``.
    Every device has one lock (``device_lock``): the buses hold it around
    guest accesses, and host threads (timers, stdin, displays) take it too.

    With ``exit_windows`` (the default) a backend that can (KVM's shim)
    answers accesses to plain-memory ranges (pc-testdev's scratch register
    and MMIO window) and to addresses nobody claims without returning to
    the run loop, so those exits cost no Python; tracers and debuggers
    still see every exit.  ``exit_windows=False`` sends every exit through
    Python.
    """

    def __init__(
        self,
        *,
        mem_size: int = DEFAULT_MEM_SIZE,
        cpus: int = 1,
        topology: CpuTopology | None = None,
        irqchip: bool | None = None,
        strict: bool = False,
        serial_output: Callable[[bytes], None] | None = None,
        cmdline: str = "",
        kvm_path: str | None = None,
        memory_file: int | None = None,
        backend: str | Backend = "kvm",
        board: Board = PC,
        console_limit: int = DEFAULT_CONSOLE_LIMIT,
        exit_windows: bool = True,
    ) -> None:
        if mem_size < board.min_ram:
            raise ValueError(f"guest RAM must be at least 1 MiB, not {mem_size} bytes")
        if topology is not None:
            if cpus not in (1, topology.cpus):
                raise ValueError(f"{cpus} vCPUs asked for, but the topology has {topology.cpus}")
            cpus = topology.cpus
        if cpus < 1:
            raise ValueError(f"need at least one vCPU, not {cpus}")
        if cpus > 1 and irqchip is False:
            raise ValueError("more than one vCPU needs the in-kernel irqchip")
        self.board = board
        # Serial output, bounded (kvmpy.console): a chatty guest cannot grow kvmpy.
        self.console = ConsoleLog(console_limit)
        self.serial_output = serial_output
        self.cmdline = cmdline
        self._stopping = threading.Event()
        # What the vCPU loops watch: set by stop(), and by a suspend (S3) too.
        self._vcpus_stop = threading.Event()
        self._sleep = threading.Condition()  # guards the suspend state below
        self._suspended = False
        self._parked = 0
        self._resumes = 0
        self._lock = threading.Lock()
        self._outcome: Outcome | None = None
        self._thread_error: BaseException | None = None
        self._threads: list[threading.Thread] = []
        self._held_output: bytearray | None = None
        self._console_listeners: list[Callable[[bytes], None]] = []
        # Set before run() to trace, time or single-step every exit (slower).
        self.observer: ExitObserver | None = None
        # Notified whenever serial output arrives, for callers waiting on it.
        self.console_changed = threading.Condition()

        with ExitStack() as stack:
            if isinstance(backend, str):
                options = {} if kvm_path is None else {"path": kvm_path}
                self.backend: Backend = open_backend(backend, **options)
                stack.callback(self.backend.close)
            else:
                self.backend = backend
            if irqchip is None:  # the default follows the backend (none in the CPU emulator)
                irqchip = Capability.IRQCHIP in self.backend.capabilities or cpus > 1
            self.has_irqchip = irqchip
            wanted = [Capability.IRQCHIP] if irqchip else []
            if cpus > 1:
                wanted.append(Capability.SMP)
            require(wanted, self.backend.capabilities, "creating the machine")
            max_cpus = self.backend.max_vcpus()
            if cpus > max_cpus:
                raise ValueError(f"{cpus} vCPUs asked for, but this host's KVM allows {max_cpus}")
            # As QEMU's -smp N: N cores in one socket unless told otherwise.
            self.topology = topology or CpuTopology(cores=cpus)
            self.arch = X86Arch(self.backend.supported_cpuid(), self.topology)
            self.vm: Vm = self.backend.create_vm(irqchip=irqchip, scratch_base=board.scratch_base)
            stack.callback(self.vm.close)
            if irqchip and board.irq_routes:
                self.vm.set_irq_routes(list(board.irq_routes))
            self.memory = stack.enter_context(
                GuestMemory.with_ram(
                    mem_size,
                    memory_file,
                    map_flags=self.backend.ram_map_flags,
                    layout=board.ram_layout(mem_size),
                )
            )
            self.logged_slot = self._map_ram()
            self.arch.attach_memory(self.memory)
            self.vcpus: list[Vcpu] = []
            for index in range(cpus):
                vcpu = self.vm.create_vcpu(index)
                stack.callback(vcpu.close)
                self.arch.init_vcpu(vcpu, index, irqchip)
                self.vcpus.append(vcpu)
            self._closer = stack.pop_all()
        self.vcpu = self.vcpus[0]  # the bootstrap processor
        self.loaded_plan: LoadPlan | None = None  # what load() placed last

        # Only vCPU threads dispatch on the buses: with one, unclaimed stubs need no lock.
        one_vcpu = len(self.vcpus) == 1
        self.ports = Bus("port", board.port_space, strict=strict, one_vcpu=one_vcpu)
        self.mmio = Bus("mmio", board.mmio_space, strict=strict, one_vcpu=one_vcpu)
        wiring = Wiring(
            irq=self.irq_line,
            request_reset=self.request_reset,
            request_power_off=self.request_power_off,
            guest_exit=self._guest_exit,
            serial_output=self._serial_out,
            ram_size=mem_size,
            low_ram=self.memory.regions[0].size,
            cpus=cpus,
            cmdline=cmdline,
            flush_page=self._flush_page,
            request_suspend=self._request_suspend,
        )
        self._devices: dict[str, Any] = {}
        self._device_locks: dict[str, threading.Lock] = {}
        for entry in board.devices:
            self._add_device(entry, wiring)
        # Whether the backend answers plain-memory and unclaimed ranges itself.
        self.exit_windows = exit_windows and self._publish_windows()
        # The power-on state a reset in place returns to (taken before any run).
        self._power_on: dict[str, Any] | None = None
        self._loaded: Callable[[], object] | None = None

    def _publish_windows(self) -> bool:
        """Let the backend answer the buses' windows (``Bus.windows``) without the run
        loop, now and after every change of their ranges; False if it cannot."""
        buses = (self.ports, self.mmio)
        if not all(self.vm.answer_windows(bus.name, []) for bus in buses):
            return False
        for bus in buses:
            bus.publish_windows(
                functools.partial(self.vm.answer_windows, bus.name),
                functools.partial(self.vm.window_misses, bus.name),
            )
        return True

    def _add_device(self, entry: DeviceEntry, wiring: Wiring) -> None:
        device = entry.build(wiring)
        lock = threading.Lock()
        # A device no host thread calls, on a one-vCPU machine, has one caller:
        # the fast path may skip its lock (the exit round trip pays for it).
        only_caller = len(self.vcpus) == 1 and getattr(device, "HOST_ENTRY_POINTS", None) == ()
        for bus, ranges in ((self.ports, entry.ports), (self.mmio, entry.mmio)):
            for span in ranges:
                part = getattr(device, span.part) if span.part else device
                bus.register(
                    span.base, span.length, part, span.label, lock, only_caller=only_caller
                )
        if entry.attach is not None:
            entry.attach(device, DeviceSpaces(self.ports, self.mmio, lock))
        self._devices[entry.name] = device
        self._device_locks[entry.name] = lock

    def close(self) -> None:
        """Stop a run still in progress, then release every fd and mapping."""
        if self._threads:
            self.stop(Outcome(OutcomeKind.INTERRUPTED, "machine closed"))
            self.wait()
        self._closer.close()

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- devices -------------------------------------------------------------------------

    def devices(self) -> dict[str, Any]:
        """The device models by board name: what a snapshot saves besides the backend's state.

        A device with parts that keep state of their own (``state_parts()``: the PCI
        host's functions) lists each as "name/part" too; resetting the device resets them.
        """
        devices = dict(self._devices)
        for name, device in self._devices.items():
            parts = getattr(device, "state_parts", None)
            if parts is not None:
                devices.update({f"{name}/{part}": model for part, model in parts().items()})
        return devices

    def device(self, name: str, kind: type[D]) -> D:
        device = self._devices[name]
        if not isinstance(device, kind):
            raise TypeError(f"device {name!r} is a {type(device).__name__}, not {kind.__name__}")
        return device

    def device_lock(self, name: str) -> threading.Lock:
        """The lock every caller holds around a call into device ``name``."""
        return self._device_locks[name]

    def __getattr__(self, name: str) -> Any:
        """Devices by their board name (``machine.serial``, ``machine.cmos``), untyped;
        ``device(name, Type)`` gives a typed one."""
        devices = self.__dict__.get("_devices")
        if devices is not None and name in devices:
            return devices[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # -- memory ----------------------------------------------------------------------------

    def _map_ram(self) -> int | None:
        """Register RAM with the backend; return the slot of the board's logged window.

        The window (the VGA text screen on a PC) is a slot of its own, over
        the same host mapping, that logs dirty pages, so that a display can
        ask whether the guest wrote it (``screen_dirty``).  None if RAM lacks it.
        """
        window = self.board.logged_window
        logged_slot = None
        slot = 0
        for region in self.memory:
            bounds = [region.gpa, region.end]
            if window and region.gpa <= window[0] and window[1] <= region.end:
                bounds[1:1] = window
            for start, end in itertools.pairwise(bounds):
                if start == end:
                    continue
                logged = window is not None and (start, end) == window
                self.vm.map_memory(
                    slot, start, region.mapping, start - region.gpa, end - start, logged
                )
                if logged:
                    logged_slot = slot
                slot += 1
        return logged_slot

    def screen_dirty(self) -> bool:
        """Whether the guest wrote to the logged window (VGA text) since the last call.

        Asks the backend's dirty log, which this call also clears; True when
        there is no logged window to ask about.
        """
        window = self.board.logged_window
        if self.logged_slot is None or window is None:
            return True
        return any(self.vm.dirty_pages(self.logged_slot, (window[1] - window[0]) // PAGE_SIZE))

    def _flush_page(self, gpa: int) -> None:
        """pc-testdev's flush: re-create the host mapping of a RAM page (content kept).

        A guest-given address outside RAM is ignored, as QEMU ignores it.
        """
        self.memory.remap_page(gpa)

    def irq_line(self, irq: int) -> IrqCallback:
        """An interrupt callback for a device wired to ``irq`` (a no-op without irqchip)."""
        if not self.has_irqchip:
            return no_irq
        vm = self.vm
        return lambda level: vm.irq_line(irq, level)

    @property
    def acpi_rsdp(self) -> int:
        """Where the ACPI RSDP is (0: no ACPI tables, as without the irqchip)."""
        return self.board.acpi_rsdp if self.has_irqchip else 0

    @property
    def is_running(self) -> bool:
        return bool(self._threads)

    # -- snapshots -----------------------------------------------------------------------

    def snapshot(self, directory: str | Path) -> None:
        """Save the complete state of this stopped machine to ``directory``."""
        from kvmpy.snapshot import take_snapshot  # json, hashlib: not for every run

        take_snapshot(self).save(directory)

    @classmethod
    def restore(cls, source: str | Path | Snapshot, **options: Any) -> Machine:
        """A new machine in the state of a snapshot (a directory, or one already loaded).

        Loading once and restoring the same ``Snapshot`` many times gives each
        caller its own fresh copy.  ``options`` are further Machine arguments
        (``serial_output``, ``strict``...); RAM, vCPUs and irqchip come from
        the snapshot.
        """
        from kvmpy.snapshot import Snapshot, apply_snapshot

        state = source if isinstance(source, Snapshot) else Snapshot.load(source)
        config = state.config
        with state.open_memory() as memory_file:
            # RAM maps the snapshot's memory file copy-on-write: no copying.
            machine = cls(
                mem_size=config["mem_size"],
                cpus=config["cpus"],
                topology=config.get("topology") and CpuTopology(*config["topology"]),
                irqchip=config["irqchip"],
                cmdline=config["cmdline"],
                memory_file=memory_file,
                **options,
            )
        try:
            apply_snapshot(state, machine)
        except BaseException:
            machine.close()
            raise
        return machine

    # -- loading -------------------------------------------------------------------------

    def boot(
        self,
        image: str | Path,
        *,
        image_format: str | None = None,
        mode: str | None = None,
        load_addr: int | None = None,
        entry: int | None = None,
        modules: Sequence[tuple[str, str]] = (),
        initrd: str | Path | None = None,
        host_decompress: bool = True,
    ) -> CpuSetup:
        """Load a kernel or program as ``kvmpy run`` does, and point vCPU 0 at it.

        The format is detected unless given (bzImage, multiboot, PVH, ELF, flat);
        a flat image runs in real mode at 0x7c00 unless ``mode`` and ``load_addr``
        say otherwise.  The kernel command line is the machine's ``cmdline``;
        ``initrd`` is an initial RAM disk for a bzImage, PVH or multiboot kernel.
        ``host_decompress`` False lets a bzImage decompress itself, as under QEMU
        (slower where the host emulates CPL0; keeps KASLR).
        """
        plan = load_image(
            image,
            ram=[(region.gpa, region.size) for region in self.memory],
            image_format=image_format,
            load_addr=default_load_addr(mode or "real") if load_addr is None else load_addr,
            entry=entry,
            cmdline=self.cmdline,
            modules=list(modules),
            initrd=initrd,
            rsdp=self.acpi_rsdp,
            host_decompress=host_decompress,
        )
        return self.load(plan, mode=mode)

    def reserved_ranges(self) -> list[tuple[int, int, str]]:
        """(start, end, what): where no image may load (firmware tables, boot data)."""
        return self.board.reserved_ranges()

    def load(self, plan: LoadPlan, mode: str | None = None) -> CpuSetup:
        """Place ``plan`` in RAM and point the bootstrap vCPU at its entry in ``mode``."""
        self._capture_power_on()
        self.loaded_plan = plan
        setup = setup_mode(mode or plan.mode or "real", self.vcpu.get_sregs(), plan.entry)
        check_plan(plan, self.memory, setup.reserved())
        self._check_firmware_overlap(plan)
        context = FirmwareContext(
            len(self.vcpus),
            self.arch.cpu_signature,
            self.has_irqchip,
            low_ram=self.memory.regions[0].size,
        )
        firmware = [
            (table.address, table.build(context))
            for table in self.board.firmware
            if self.has_irqchip or not table.needs_irqchip
        ]
        for gpa, data in [*firmware, *setup.memory]:
            self.memory.write(gpa, data)
        for segment in plan.segments:
            self.memory.write(segment.gpa, segment.data)
            self.memory.zero(segment.gpa + len(segment.data), segment.memsz - len(segment.data))
        self.vcpu.set_sregs(setup.sregs)
        if setup.sregs.cr0 & CR0_PG and not self.vcpu.get_sregs().cr0 & CR0_PG:
            # PVM accepts KVM_SET_SREGS but drops CR0.PG outside long mode.
            raise BackendError(
                "KVM_SET_SREGS",
                errno.EOPNOTSUPP,
                f"this host's KVM ({', '.join(kvm_modules()) or 'unknown'}) ignored CR0.PG: "
                f"it cannot run guests in {setup.mode} mode",
            )
        self.vcpu.set_regs(replace(setup.regs, **plan.registers))
        return setup

    def _check_firmware_overlap(self, plan: LoadPlan) -> None:
        """Refuse a segment over a firmware table or another reserved range, naming both."""
        for segment in plan.segments:
            for start, end, what in self.reserved_ranges():
                if segment.gpa < end and start < segment.end:
                    raise LoaderError(
                        f"{plan.source}: segment {segment.gpa:#x}-{segment.end - 1:#x} overlaps "
                        f"the {what} at {start:#x}-{end - 1:#x}"
                    )

    # -- reset in place --------------------------------------------------------------------

    def _capture_power_on(self) -> None:
        """Remember the backend's power-on state, once, before the guest first runs."""
        if self._power_on is None:
            self._power_on = {
                "vm": self.vm.save_state(),
                "vcpus": [vcpu.save_state() for vcpu in self.vcpus],
            }

    def reset(self) -> None:
        """Reset the stopped machine in place, as a PC's reset line does.

        Devices return to their power-on state, every vCPU (registers, LAPIC,
        MSRs, FPU) and the irqchip and PIT to theirs, and RAM is cleared by
        discarding its pages.  Nothing the guest could see survives; load an
        image again before running.
        """
        if self._threads:
            raise RuntimeError("stop the machine before resetting it")
        self._capture_power_on()
        assert self._power_on is not None
        for name, device in self._devices.items():
            with self._device_locks[name]:
                device.reset()
        for vcpu, state in zip(self.vcpus, self._power_on["vcpus"], strict=True):
            vcpu.load_state(state)
        self.vm.load_interrupt_state(self._power_on["vm"])
        for region in self.memory:
            self.memory.zero(region.gpa, region.size)
        self._outcome = None

    # -- output ----------------------------------------------------------------------------

    def hold_output(self) -> None:
        """Keep serial output from ``serial_output`` until ``release_output`` (a live screen)."""
        with self.console_changed:
            if self._held_output is None:
                self._held_output = bytearray()

    def add_console_listener(self, listener: Callable[[bytes], None]) -> None:
        """Call ``listener(data)`` with every piece of serial output (from a vCPU thread)."""
        with self.console_changed:
            self._console_listeners = [*self._console_listeners, listener]

    def remove_console_listener(self, listener: Callable[[bytes], None]) -> None:
        with self.console_changed:
            self._console_listeners = [f for f in self._console_listeners if f != listener]

    def release_output(self) -> None:
        """Pass on what was held, and let later output through again."""
        with self.console_changed:
            held, self._held_output = self._held_output, None
        if held and self.serial_output is not None:
            self.serial_output(bytes(held))

    # -- running ---------------------------------------------------------------------------

    def run(self, timeout: float | None = None) -> Outcome:
        """Run every vCPU until the guest stops, ``timeout`` seconds pass, or Ctrl-C."""
        try:
            self.start()
        except KeyboardInterrupt as exc:  # Ctrl-C while the threads were starting
            self.stop(_interrupted_by(exc))
        while True:
            try:
                return self.wait(timeout)
            except KeyboardInterrupt as exc:  # Ctrl-C between start and wait, or joining
                self.stop(_interrupted_by(exc))

    def start(self) -> None:
        """Start the vCPU threads and return at once; ``wait`` collects the outcome."""
        if self._threads:
            raise RuntimeError("the machine is already running")
        self._capture_power_on()
        self._stopping.clear()
        self._vcpus_stop.clear()
        self._suspended = False
        self._outcome = None
        self._thread_error = None
        context = LoopContext(self.ports, self.mmio, self.arch, self._vcpus_stop, self.has_irqchip)
        # Clear every kick before starting any thread: a vCPU that stops the
        # run at once kicks the others, and that kick must not be lost.
        for vcpu in self.vcpus:
            vcpu.clear_kick()
        for vcpu in self.vcpus:
            thread = threading.Thread(
                target=self._vcpu_thread,
                args=(vcpu, context),
                name=f"kvmpy-vcpu{vcpu.index}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)
        if self.has_irqchip:
            timers = threading.Thread(target=self._timer_thread, name="kvmpy-timers", daemon=True)
            timers.start()
            self._threads.append(timers)

    @property
    def stopped(self) -> bool:
        """True once the run has ended (or is ending), whatever the reason."""
        return self._stopping.is_set()

    @property
    def outcome(self) -> Outcome | None:
        """How the run ended (the first ``stop``), once it is ending; None while it runs."""
        with self._lock:
            return self._outcome if self._stopping.is_set() else None

    def wait(self, timeout: float | None = None) -> Outcome:
        """Wait for the run started by ``start`` to end; stop it after ``timeout`` seconds."""
        try:
            if not self._stopping.wait(timeout):
                self.stop(Outcome(OutcomeKind.TIMEOUT, f"timeout: no guest exit after {timeout} s"))
        except KeyboardInterrupt as exc:
            self.stop(_interrupted_by(exc))
        finally:
            for thread in self._threads:
                thread.join()
            self._threads.clear()
        if self._thread_error is not None:
            raise self._thread_error
        outcome = self._outcome
        assert outcome is not None
        return self.with_report(outcome)

    def with_report(self, outcome: Outcome) -> Outcome:
        """``outcome`` with its crash report, for the kinds that get one (vCPUs stopped)."""
        if outcome.kind not in REPORTED_KINDS or outcome.report is not None:
            return outcome
        from kvmpy.debug.crash import crash_report  # capstone: only when something died

        index = outcome.vcpu if outcome.vcpu is not None else 0
        vcpu = self.vcpus[index] if 0 <= index < len(self.vcpus) else self.vcpu
        if outcome.kind in (OutcomeKind.TIMEOUT, OutcomeKind.INTERRUPTED):
            report = crash_report(vcpu, self.memory, outcome.kind.value)
            return replace(outcome, report=report)
        report = crash_report(vcpu, self.memory, outcome.message, outcome.detail, outcome.code)
        return replace(outcome, report=report, message=report.summary())

    def stop(self, outcome: Outcome) -> None:
        """End the run with ``outcome`` (the first stop wins).  Safe from any thread."""
        with self._lock:
            if self._outcome is None:
                self._outcome = outcome
            self._stopping.set()
            self._vcpus_stop.set()
        for vcpu in self.vcpus:
            vcpu.kick()
        with self._sleep:  # parked vCPUs (S3) leave too
            self._sleep.notify_all()
        self._wake_console_waiters()

    def request_reset(self) -> None:
        """A device asked for a platform reset (port 0x92, the i8042's 0xFE)."""
        self.stop(Outcome(OutcomeKind.RESET, "guest reset"))

    def request_power_off(self) -> None:
        """The guest entered ACPI S5 (soft-off)."""
        self.stop(Outcome(OutcomeKind.SHUTDOWN, "guest powered off"))

    def _wake_console_waiters(self) -> None:
        with self.console_changed:
            self.console_changed.notify_all()

    def _vcpu_thread(self, vcpu: Vcpu, context: LoopContext) -> None:
        vcpu.thread_ident = threading.get_ident()
        try:
            while True:
                observer = self.observer
                # A tracer or debugger must see every exit; counting ones do in the backend.
                vcpu.answer_exits(self.exit_windows and (observer is None or observer.fast))
                outcome = run_vcpu(vcpu, context, observer)
                if outcome is not None:
                    self.stop(outcome)
                    break
                if not self._park_while_suspended(vcpu):
                    break
        except BaseException as exc:  # handed to the main thread by run()
            with self._lock:
                self._thread_error = self._thread_error or exc
            self.stop(Outcome(OutcomeKind.HOST_ERROR, f"vCPU {vcpu.index} thread failed: {exc}"))
        finally:
            vcpu.thread_ident = None

    def _timer_thread(self) -> None:
        """Raise the devices' timed interrupts on time: device models have no clocks.

        Every device with ``poll()`` (the RTC on a PC) is asked, under its
        lock, to raise what is due and say when it next needs a look; the
        thread sleeps until the earliest of those, or a while when none has
        anything enabled (the guest may enable one at any time).
        """
        timed = [
            (device.poll, self._device_locks[name])
            for name, device in self._devices.items()
            if callable(getattr(device, "poll", None))
        ]
        while timed and not self._stopping.is_set():
            delay = TIMER_IDLE_POLL
            for poll, lock in timed:
                with lock:
                    due = poll()
                if due is not None:
                    delay = min(delay, max(due - time.time(), 0.0))
            self._poll_wake()
            self._stopping.wait(delay)

    # -- ACPI S3: suspend to RAM ----------------------------------------------------------
    #
    # The guest writes SLP_TYP 1 with SLP_EN: every vCPU thread leaves its run
    # loop and parks (RAM, devices and the timer thread keep going, so the RTC
    # ticks).  The timer thread asks the board whether a wake event arrived;
    # on one, the interrupt controllers and every vCPU return to their
    # power-on state, the boot CPU is pointed where the board says (the FACS
    # waking vector), the others wait for INIT/SIPI, and the threads go on.

    @property
    def suspended(self) -> bool:
        """True while the guest sleeps in S3."""
        return self._suspended

    def _request_suspend(self) -> None:
        """The guest entered S3 (from a vCPU thread, under the PM device's lock)."""
        if self.board.wake is None or self.board.resume_setup is None or not self.has_irqchip:
            return  # nothing could wake it: ignored, as a request for an unknown state
        with self._sleep:
            if self._stopping.is_set() or self._suspended:
                return
            self._suspended = True
            self._parked = 0
            self._vcpus_stop.set()
        for vcpu in self.vcpus:
            vcpu.kick()

    def _park_while_suspended(self, vcpu: Vcpu) -> bool:
        """The vCPU's loop returned without an outcome: park it if the guest sleeps.

        True when the machine woke (the vCPU was set up to resume), False when
        the run is over.
        """
        with self._sleep:
            if self._stopping.is_set() or not self._suspended:
                return False
            resumes = self._resumes
            self._parked += 1
            while self._resumes == resumes and not self._stopping.is_set():
                self._sleep.wait()
            if self._stopping.is_set():
                return False
        self._resume_vcpu(vcpu)
        vcpu.clear_kick()
        return not self._stopping.is_set()

    def _poll_wake(self) -> None:
        """From the timer thread: wake a sleeping guest if the board sees a wake event."""
        wake = self.board.wake
        with self._sleep:
            asleep = self._suspended and self._parked == len(self.vcpus)
        if not asleep or wake is None or not wake(self.locked):
            return
        with self._sleep:
            if self._stopping.is_set() or not self._suspended:
                return
            assert self._power_on is not None
            # S3 powers the interrupt controllers off.
            self.vm.load_interrupt_state(self._power_on["vm"])
            self._suspended = False
            self._parked = 0
            self._vcpus_stop.clear()
            self._resumes += 1
            self._sleep.notify_all()

    def _resume_vcpu(self, vcpu: Vcpu) -> None:
        """Power-on state; the boot CPU then starts where the board's resume_setup says."""
        assert self._power_on is not None and self.board.resume_setup is not None
        vcpu.load_state(self._power_on["vcpus"][vcpu.index])
        if vcpu is self.vcpu:
            setup = self.board.resume_setup(self.memory, vcpu.get_sregs())
            for gpa, data in setup.memory:  # firmware's own area: its GDT, page tables
                self.memory.write(gpa, data)
            vcpu.set_sregs(setup.sregs)
            vcpu.set_regs(setup.regs)

    def _guest_exit(self, value: int) -> None:
        status = debug_exit_status(value)
        self.stop(
            Outcome(
                OutcomeKind.EXIT, f"guest exit code {value:#x} (status {status})", exit_code=value
            )
        )

    def _serial_out(self, data: bytes) -> None:
        with self.console_changed:
            self.console.append(data)
            self.console_changed.notify_all()
            listeners = self._console_listeners
            for listener in listeners:
                listener(data)
            if self._held_output is not None:
                self._held_output += data
                return
        if self.serial_output is not None:
            self.serial_output(data)

    @contextlib.contextmanager
    def locked(self, name: str) -> Iterator[Any]:
        """``with machine.locked("serial") as serial:`` for host threads calling a device."""
        with self._device_locks[name]:
            yield self._devices[name]
