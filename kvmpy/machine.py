"""A Machine ties the layers together: VM, guest RAM, buses, devices, vCPUs.

with Machine(mem_size=16 << 20) as m:
    m.load(load_flat("guests/out/real_hello.bin", 0x7C00), mode="real")
    outcome = m.run(timeout=5)
    print(m.console.decode(), outcome.status)
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from kvmpy._kvm import lib
from kvmpy.bus import Bus
from kvmpy.debug.crash import crash_report
from kvmpy.devices.acpi_pm import (
    PM1A_CNT_PORT,
    PM1A_CNT_PORTS,
    PM1A_EVT_PORT,
    PM1A_EVT_PORTS,
    AcpiPmControl,
    AcpiPmEvent,
)
from kvmpy.devices.base import IrqCallback, no_irq
from kvmpy.devices.cmos import CMOS_PORT, CMOS_PORTS, Cmos
from kvmpy.devices.debug_exit import DEBUG_EXIT_PORT, DEBUG_EXIT_PORTS, DebugExit, exit_status
from kvmpy.devices.fw_cfg import FW_CFG_PORT, FW_CFG_PORTS, FwCfg
from kvmpy.devices.post import POST_PORT, PostCode
from kvmpy.devices.reset import (
    I8042,
    I8042_COMMAND_PORT,
    I8042_DATA_PORT,
    SYSTEM_CONTROL_PORT_A,
    SystemControlPortA,
)
from kvmpy.devices.serial import Serial16550
from kvmpy.devices.testdev import TESTDEV_BASE, TESTDEV_SIZE, TestDevice
from kvmpy.devices.vga import VGA_PORT_BASE, VGA_PORTS, VGA_TEXT_BASE, VGA_TEXT_WINDOW, Vga
from kvmpy.hostinfo import kvm_modules
from kvmpy.kvm import KVM_PATH, Kvm, KvmError, Vcpu, install_kick_handler
from kvmpy.loaders import LoadPlan, check_plan
from kvmpy.loaders.detect import load_image
from kvmpy.memory import PAGE_SIZE, GuestMemory
from kvmpy.runloop import (
    STATUS_HALT,
    STATUS_INTERRUPTED,
    STATUS_RESET,
    STATUS_TIMEOUT,
    ExitObserver,
    Outcome,
    run_vcpu,
)
from kvmpy.snapshot import Snapshot, apply_snapshot, take_snapshot
from kvmpy.x86.acpi import ACPI_TABLES_ADDR, acpi_tables
from kvmpy.x86.bios import BDA_ADDR, bios_data_area
from kvmpy.x86.cpuid import vcpu_cpuid
from kvmpy.x86.modes import CpuSetup, default_load_addr, setup_mode
from kvmpy.x86.mptable import MP_TABLE_ADDR, mp_tables
from kvmpy.x86.registers import CR0_PG

DEFAULT_MEM_SIZE = 128 << 20  # like QEMU
MIN_MEM_SIZE = 1 << 20
COM1_PORT = 0x3F8
COM1_IRQ = 4
KEYBOARD_IRQ = 1
RTC_IRQ = 8
MOUSE_IRQ = 12
# Three pages for Intel's real-mode TSS and one for its identity map, just
# below the BIOS area at the top of 4 GiB, where QEMU and kvmtool put them.
TSS_ADDR = 0xFFFB_D000
IDENTITY_MAP_ADDR = 0xFFFB_C000
MMIO_ADDRESS_LIMIT = 1 << 52
# How often the RTC thread looks whether the guest enabled an RTC interrupt.
RTC_IDLE_POLL = 0.05


class Machine:
    """A PC-like VM: RAM, vCPUs, the in-kernel irqchip and PIT, and devices.

    Devices, as a kernel written for ``qemu-system-x86_64 -kernel`` expects
    them: a 16550A on COM1 (IRQ 4), QEMU's debug-exit port at 0xf4, fw_cfg at
    0x510, the CMOS/RTC at 0x70, the i8042 at 0x60/0x64 and port 0x92 (both
    can reset the machine), QEMU's ACPI power-off register at 0x604, a
    port-0x80 sink, and kvmpy's test device at 0xFEB00000 (MMIO).  RAM starts
    with a BIOS Data Area and (with the irqchip) Intel MP tables at 0xF0000
    and ACPI tables at 0xE0000, as if firmware had run.  The VGA text screen is the
    RAM at 0xB8000 with the VGA registers at 0x3C0-0x3DF (``vga``); see
    kvmpy.display for showing it.

    With ``irqchip`` (the default, and required for more than one vCPU) KVM
    emulates the LAPICs, IOAPIC, PIC and PIT; vCPUs 1..n-1 then wait in the
    kernel for INIT/SIPI from the guest.  Without it, HLT exits to
    kvmpy, which ends the run.

    Serial output is kept in ``console`` and also passed to ``serial_output``.
    """

    def __init__(
        self,
        *,
        mem_size: int = DEFAULT_MEM_SIZE,
        cpus: int = 1,
        irqchip: bool = True,
        strict: bool = False,
        serial_output: Callable[[bytes], None] | None = None,
        cmdline: str = "",
        kvm_path: str = KVM_PATH,
        memory_file: int | None = None,
    ) -> None:
        if mem_size < MIN_MEM_SIZE:
            raise ValueError(f"guest RAM must be at least 1 MiB, not {mem_size} bytes")
        if cpus < 1:
            raise ValueError(f"need at least one vCPU, not {cpus}")
        if cpus > 1 and not irqchip:
            raise ValueError("more than one vCPU needs the in-kernel irqchip")
        self.console = bytearray()
        self.serial_output = serial_output
        self.cmdline = cmdline
        self.has_irqchip = irqchip
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._outcome: Outcome | None = None
        self._thread_error: BaseException | None = None
        self._threads: list[threading.Thread] = []
        # Set before run() to trace, time or single-step every exit (slower).
        self.observer: ExitObserver | None = None
        # Notified whenever serial output arrives, for callers waiting on it.
        self.console_changed = threading.Condition()

        with ExitStack() as stack:
            self.kvm = stack.enter_context(Kvm(kvm_path))
            max_cpus = self.kvm.check_extension(lib.KVM_CAP_MAX_VCPUS)
            if cpus > max_cpus:
                raise ValueError(f"{cpus} vCPUs asked for, but this host's KVM allows {max_cpus}")
            self.vm = stack.enter_context(self.kvm.create_vm())
            self.vm.set_tss_addr(TSS_ADDR)
            if self.kvm.check_extension(lib.KVM_CAP_SET_IDENTITY_MAP_ADDR):
                self.vm.set_identity_map_addr(IDENTITY_MAP_ADDR)
            if irqchip:
                self.vm.create_irqchip()
                self.vm.create_pit2()
            self.memory = stack.enter_context(GuestMemory.with_ram(mem_size, memory_file))
            self.vga_slot = self._map_ram()
            supported_cpuid = self.kvm.supported_cpuid()
            leaf1 = next((e for e in supported_cpuid if e.function == 1), None)
            self._cpu_signature = (leaf1.eax, leaf1.edx) if leaf1 else (0, 0)
            self.vcpus: list[Vcpu] = []
            for index in range(cpus):
                vcpu = stack.enter_context(self.vm.create_vcpu(index))
                vcpu.set_cpuid(vcpu_cpuid(supported_cpuid, apic_id=index))
                if index and irqchip:
                    # Application processors sleep in the LAPIC until INIT/SIPI.
                    vcpu.set_mp_state(lib.KVM_MP_STATE_UNINITIALIZED)
                self.vcpus.append(vcpu)
            self._closer = stack.pop_all()
        self.vcpu = self.vcpus[0]  # the bootstrap processor

        self.ports = Bus("port", 0x10000, strict=strict)
        self.mmio = Bus("mmio", MMIO_ADDRESS_LIMIT, strict=strict)
        self.serial = Serial16550(output=self._serial_out, irq=self.irq_line(COM1_IRQ))
        self.ports.register(COM1_PORT, 8, self.serial, "COM1")
        self.debug_exit = DebugExit(self._guest_exit)
        self.ports.register(DEBUG_EXIT_PORT, DEBUG_EXIT_PORTS, self.debug_exit, "debug-exit")
        self.post = PostCode()
        self.ports.register(POST_PORT, 1, self.post, "POST")
        self.fw_cfg = FwCfg(
            ram_size=mem_size, cpus=cpus, cmdline=cmdline.encode() if cmdline else None
        )
        self.ports.register(FW_CFG_PORT, FW_CFG_PORTS, self.fw_cfg, "fw_cfg")
        low_ram = self.memory.regions[0].size
        self.cmos = Cmos(
            low_ram=low_ram, high_ram=mem_size - low_ram, cpus=cpus, irq=self.irq_line(RTC_IRQ)
        )
        self.ports.register(CMOS_PORT, CMOS_PORTS, self.cmos, "CMOS/RTC")
        self.i8042 = I8042(
            self.request_reset,
            irq_kbd=self.irq_line(KEYBOARD_IRQ),
            irq_aux=self.irq_line(MOUSE_IRQ),
        )
        self.ports.register(I8042_DATA_PORT, 1, self.i8042.data_port, "i8042 data")
        self.ports.register(I8042_COMMAND_PORT, 1, self.i8042.command_port, "i8042 command")
        self.port92 = SystemControlPortA(self.request_reset)
        self.ports.register(SYSTEM_CONTROL_PORT_A, 1, self.port92, "port 0x92")
        self.acpi_pm = AcpiPmControl(self.request_power_off)
        self.ports.register(PM1A_CNT_PORT, PM1A_CNT_PORTS, self.acpi_pm, "ACPI PM1a_CNT")
        self.acpi_events = AcpiPmEvent()
        self.ports.register(PM1A_EVT_PORT, PM1A_EVT_PORTS, self.acpi_events, "ACPI PM1a_EVT")
        self.testdev = TestDevice()
        self.mmio.register(TESTDEV_BASE, TESTDEV_SIZE, self.testdev, "testdev")
        self.vga = Vga()
        self.ports.register(VGA_PORT_BASE, VGA_PORTS, self.vga, "VGA")

    def close(self) -> None:
        """Stop a run still in progress, then release every fd and mapping."""
        if self._threads:
            self.stop(Outcome("interrupted", STATUS_INTERRUPTED, "machine closed"))
            self.wait()
        self._closer.close()

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- VGA text display ------------------------------------------------------------------

    def _map_ram(self) -> int | None:
        """Register RAM as KVM memory slots; return the VGA text window's slot.

        The window (0xB8000-0xBFFFF) is a slot of its own, over the same host
        mapping, that logs dirty pages, so that a display can ask KVM whether
        the guest wrote the screen (``screen_dirty``).  None if RAM lacks it.
        """
        window = (VGA_TEXT_BASE, VGA_TEXT_BASE + VGA_TEXT_WINDOW)
        vga_slot = None
        slot = 0
        for region in self.memory:
            bounds = [region.gpa, region.end]
            if region.gpa <= window[0] and window[1] <= region.end:
                bounds[1:1] = window
            for start, end in itertools.pairwise(bounds):
                if start == end:
                    continue
                logged = (start, end) == window
                flags = lib.KVM_MEM_LOG_DIRTY_PAGES if logged else 0
                self.vm.set_user_memory_region(
                    slot, start, region.mapping, flags, offset=start - region.gpa, size=end - start
                )
                if logged:
                    vga_slot = slot
                slot += 1
        return vga_slot

    def screen_dirty(self) -> bool:
        """Whether the guest wrote to the VGA text window since the last call.

        Asks KVM's dirty log, which this call also clears; True when there is
        no logged window to ask about.
        """
        if self.vga_slot is None:
            return True
        return any(self.vm.get_dirty_log(self.vga_slot, VGA_TEXT_WINDOW // PAGE_SIZE))

    def irq_line(self, irq: int) -> IrqCallback:
        """An interrupt callback for a device wired to ``irq`` (a no-op without irqchip)."""
        if not self.has_irqchip:
            return no_irq
        vm = self.vm
        return lambda level: vm.irq_line(irq, level)

    def devices(self) -> dict[str, object]:
        """The device models by name: what a snapshot saves besides KVM's state."""
        return {
            "serial": self.serial,
            "post": self.post,
            "fw_cfg": self.fw_cfg,
            "cmos": self.cmos,
            "i8042": self.i8042,
            "port92": self.port92,
            "acpi_pm": self.acpi_pm,
            "acpi_events": self.acpi_events,
            "testdev": self.testdev,
            "vga": self.vga,
        }

    @property
    def acpi_rsdp(self) -> int:
        """Where the ACPI RSDP is (0: no ACPI tables, as without the irqchip)."""
        return ACPI_TABLES_ADDR if self.has_irqchip else 0

    @property
    def is_running(self) -> bool:
        return bool(self._threads)

    # -- snapshots -----------------------------------------------------------------------

    def snapshot(self, directory: str | Path) -> None:
        """Save the complete state of this stopped machine to ``directory``."""
        take_snapshot(self).save(directory)

    @classmethod
    def restore(cls, source: str | Path | Snapshot, **options: Any) -> Machine:
        """A new machine in the state of a snapshot (a directory, or one already loaded).

        Loading once and restoring the same ``Snapshot`` many times gives each
        caller its own fresh copy.  ``options`` are further Machine arguments
        (``serial_output``, ``strict``...); RAM, vCPUs and irqchip come from
        the snapshot.
        """
        state = source if isinstance(source, Snapshot) else Snapshot.load(source)
        config = state.config
        with state.open_memory() as memory_file:
            # RAM maps the snapshot's memory file copy-on-write: no copying.
            machine = cls(
                mem_size=config["mem_size"],
                cpus=config["cpus"],
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
    ) -> CpuSetup:
        """Load a kernel or program as ``kvmpy run`` does, and point vCPU 0 at it.

        The format is detected unless given (multiboot, PVH, ELF, flat); a flat
        image runs in real mode at 0x7c00 unless ``mode`` and ``load_addr`` say
        otherwise.  The kernel command line is the machine's ``cmdline``.
        """
        plan = load_image(
            image,
            ram=[(region.gpa, region.size) for region in self.memory],
            image_format=image_format,
            load_addr=default_load_addr(mode or "real") if load_addr is None else load_addr,
            entry=entry,
            cmdline=self.cmdline,
            modules=list(modules),
            rsdp=self.acpi_rsdp,
        )
        return self.load(plan, mode=mode)

    def load(self, plan: LoadPlan, mode: str | None = None) -> CpuSetup:
        """Place ``plan`` in RAM and point the bootstrap vCPU at its entry in ``mode``."""
        setup = setup_mode(mode or plan.mode or "real", self.vcpu.get_sregs(), plan.entry)
        check_plan(plan, self.memory, setup.reserved())
        firmware = [(BDA_ADDR, bios_data_area((COM1_PORT,)))]
        if self.has_irqchip:
            firmware.append((MP_TABLE_ADDR, mp_tables(len(self.vcpus), *self._cpu_signature)))
            firmware.append((ACPI_TABLES_ADDR, acpi_tables(len(self.vcpus))))
        for gpa, data in [*firmware, *setup.memory]:
            self.memory.write(gpa, data)
        for segment in plan.segments:
            self.memory.write(segment.gpa, segment.data)
            self.memory.zero(segment.gpa + len(segment.data), segment.memsz - len(segment.data))
        self.vcpu.set_sregs(setup.sregs)
        if setup.sregs.cr0 & CR0_PG and not self.vcpu.get_sregs().cr0 & CR0_PG:
            # PVM accepts KVM_SET_SREGS but drops CR0.PG outside long mode.
            raise KvmError(
                "KVM_SET_SREGS",
                errno.EOPNOTSUPP,
                f"this host's KVM ({', '.join(kvm_modules()) or 'unknown'}) ignored CR0.PG: "
                f"it cannot run guests in {setup.mode} mode",
            )
        self.vcpu.set_regs(dataclasses.replace(setup.regs, **plan.registers))
        return setup

    # -- running ---------------------------------------------------------------------------

    def run(self, timeout: float | None = None) -> Outcome:
        """Run every vCPU until the guest stops, ``timeout`` seconds pass, or Ctrl-C."""
        interrupted = Outcome("interrupted", STATUS_INTERRUPTED, "interrupted")
        try:
            self.start()
        except KeyboardInterrupt:  # Ctrl-C while the threads were starting
            self.stop(interrupted)
        while True:
            try:
                return self.wait(timeout)
            except KeyboardInterrupt:  # Ctrl-C between start and wait, or while joining
                self.stop(interrupted)

    def start(self) -> None:
        """Start the vCPU threads and return at once; ``wait`` collects the outcome."""
        if self._threads:
            raise RuntimeError("the machine is already running")
        install_kick_handler()
        self._stopping.clear()
        self._outcome = None
        self._thread_error = None
        # Clear every kick before starting any thread: a vCPU that stops the
        # run at once kicks the others, and that kick must not be lost.
        for vcpu in self.vcpus:
            vcpu.clear_kick()
        for vcpu in self.vcpus:
            thread = threading.Thread(
                target=self._vcpu_thread, args=(vcpu,), name=f"kvmpy-vcpu{vcpu.index}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        if self.has_irqchip:
            rtc = threading.Thread(target=self._rtc_thread, name="kvmpy-rtc", daemon=True)
            rtc.start()
            self._threads.append(rtc)

    @property
    def stopped(self) -> bool:
        """True once the run has ended (or is ending), whatever the reason."""
        return self._stopping.is_set()

    def wait(self, timeout: float | None = None) -> Outcome:
        """Wait for the run started by ``start`` to end; stop it after ``timeout`` seconds."""
        try:
            if not self._stopping.wait(timeout):
                self.stop(
                    Outcome("timeout", STATUS_TIMEOUT, f"timeout: no guest exit after {timeout} s")
                )
        except KeyboardInterrupt:
            self.stop(Outcome("interrupted", STATUS_INTERRUPTED, "interrupted"))
        finally:
            for thread in self._threads:
                thread.join()
            self._threads.clear()
        if self._thread_error is not None:
            raise self._thread_error
        outcome = self._outcome
        assert outcome is not None
        if outcome.reason in ("timeout", "interrupted"):
            report = crash_report(self.vcpu, self.memory, outcome.reason)
            outcome = dataclasses.replace(outcome, report=report)
        return outcome

    def stop(self, outcome: Outcome) -> None:
        """End the run with ``outcome`` (the first stop wins).  Safe from any thread."""
        with self._lock:
            if self._outcome is None:
                self._outcome = outcome
            self._stopping.set()
        for vcpu in self.vcpus:
            vcpu.kick()
        self._wake_console_waiters()

    def request_reset(self) -> None:
        """A device asked for a platform reset (port 0x92, the i8042's 0xFE)."""
        self.stop(Outcome("reset", STATUS_RESET, "guest reset"))

    def request_power_off(self) -> None:
        """The guest entered ACPI S5 (soft-off)."""
        self.stop(Outcome("shutdown", STATUS_HALT, "guest powered off"))

    def _wake_console_waiters(self) -> None:
        with self.console_changed:
            self.console_changed.notify_all()

    def _vcpu_thread(self, vcpu: Vcpu) -> None:
        vcpu.thread_ident = threading.get_ident()
        try:
            outcome = run_vcpu(
                vcpu,
                self.memory,
                self.ports,
                self.mmio,
                self._stopping,
                self.has_irqchip,
                self.observer,
            )
            if outcome is not None:
                self.stop(outcome)
        except BaseException as exc:  # handed to the main thread by run()
            with self._lock:
                self._thread_error = self._thread_error or exc
            self.stop(Outcome("crash", 2, f"vCPU {vcpu.index} thread failed: {exc}"))
        finally:
            vcpu.thread_ident = None

    def _rtc_thread(self) -> None:
        """Raise the RTC's interrupts on time: the CMOS model has no clock of its own.

        It sleeps until the next enabled RTC event, or a while when none is
        enabled (the guest may enable one at any time), until the run ends.
        """
        while not self._stopping.is_set():
            due = self.cmos.poll()
            delay = (
                RTC_IDLE_POLL if due is None else min(max(due - time.time(), 0.0), RTC_IDLE_POLL)
            )
            self._stopping.wait(delay)

    def _guest_exit(self, value: int) -> None:
        status = exit_status(value)
        self.stop(
            Outcome(
                "exit", status, f"guest exit code {value:#x} (status {status})", exit_code=value
            )
        )

    def _serial_out(self, data: bytes) -> None:
        with self.console_changed:
            self.console += data
            self.console_changed.notify_all()
        if self.serial_output is not None:
            self.serial_output(data)
