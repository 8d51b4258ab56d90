"""The PC board, declared once: what a kernel written for QEMU's ``-kernel`` finds.

``Machine`` builds everything from ``PC``: RAM in the PC layout, one bus slot,
lock, reset and snapshot entry per device, the firmware tables firmware
would leave behind, and the ranges no image may load into.  Adding a device
is adding one ``DeviceEntry`` to ``DEVICES``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

from kvmpy import records
from kvmpy.backends.base import InterruptController, IrqRoute
from kvmpy.board import Board, DeviceEntry, FirmwareContext, FirmwareTable, IoRange, Wiring
from kvmpy.devices.absent import LINUX_PROBED_PORTS, AbsentPorts
from kvmpy.devices.acpi_pm import (
    PM1A_CNT_PORT,
    PM1A_CNT_PORTS,
    PM1A_EVT_PORT,
    PM1A_EVT_PORTS,
    PM_TIMER_PORT,
    PM_TIMER_PORTS,
    PWRBTN_STS,
    RTC_STS,
    WAK_STS,
    AcpiPmControl,
    AcpiPmEvent,
    AcpiPmTimer,
)
from kvmpy.devices.cmos import CMOS_PORT, CMOS_PORTS, Cmos
from kvmpy.devices.debug_exit import DEBUG_EXIT_PORT, DEBUG_EXIT_PORTS, DebugExit
from kvmpy.devices.debugcon import DEBUGCON_PORT, DEBUGCON_PORTS, DebugCon
from kvmpy.devices.fw_cfg import FW_CFG_PORT, FW_CFG_PORTS, FwCfg
from kvmpy.devices.pc_testdev import (
    FLUSH_PORT,
    IOMEM_BASE,
    IOMEM_SIZE,
    IRQ_LINES,
    IRQ_PORT_BASE,
    PORT_BLOCK,
    SCRATCH_BYTE_PORT,
    SCRATCH_PORT,
    PcTestDevice,
)
from kvmpy.devices.pci import (
    CONFIG_ADDRESS_PORT,
    CONFIG_DATA_PORT,
    CONFIG_DATA_PORTS,
    RESET_CONTROL_PORT,
    PciAddress,
    PciFunction,
    PciHost,
    PciWindows,
    i440fx_host_bridge,
    pci_interrupt_gsi,
    piix3_isa_bridge,
)
from kvmpy.devices.pci_testdev import PciTestDevice
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
from kvmpy.memory import pc_ram_layout
from kvmpy.records import Record
from kvmpy.x86.acpi import (
    FACS_64BIT_WAKE_SUPPORTED,
    FACS_FIRMWARE_WAKING_VECTOR,
    FACS_FLAGS,
    FACS_OFFSET,
    FACS_OSPM_FLAGS,
    FACS_VERSION_OFFSET,
    FACS_X_FIRMWARE_WAKING_VECTOR,
    OSPM_64BIT_WAKE,
    IsaDevice,
    acpi_tables,
)
from kvmpy.x86.bios import bios_data_area
from kvmpy.x86.layout import (
    ACPI_TABLES_ADDR,
    ACPI_TABLES_SIZE,
    BDA_ADDR,
    BDA_SIZE,
    CASCADE_IRQ,
    COM1_IRQ,
    COM1_PORT,
    COM2_IRQ,
    COM2_PORT,
    HYPERVISOR_SCRATCH_ADDR,
    IOAPIC_PINS,
    KEYBOARD_IRQ,
    MOUSE_IRQ,
    MP_TABLE_ADDR,
    MP_TABLE_SIZE,
    RTC_IRQ,
    SCI_IRQ,
    TIMER_IOAPIC_PIN,
    TIMER_IRQ,
)
from kvmpy.x86.modes import (
    GDT_ADDR,
    CpuSetup,
    long_mode,
    long_mode_page_tables,
    protected_mode,
    real_mode_vector,
)
from kvmpy.x86.mptable import mp_tables
from kvmpy.x86.registers import DTable, Sregs


class PciSlot(Record):
    """A PCI function on bus 0: where, and how to build it."""

    address: PciAddress
    build: Callable[[Wiring], PciFunction]
    interrupt_pin: int = 0  # 1-4: INTA-INTD, routed to IOAPIC pin pci_interrupt_gsi()


# Adding a PCI function is adding one line here.
PCI_FUNCTIONS = (
    PciSlot(PciAddress(0, 0, 0), lambda w: i440fx_host_bridge()),
    PciSlot(PciAddress(0, 1, 0), lambda w: piix3_isa_bridge()),
)

# What the host bridge forwards to bus 0, as QEMU's PC: I/O from 0xd00 (ISA
# devices own what is below), memory from the end of low RAM up to kvmpy's
# testdev page, below the IOAPIC, the LAPIC and the firmware at the top.
PCI_IO_WINDOW = (0x0D00, 0x1_0000)
PCI_MEMORY_END = TESTDEV_BASE


def pci_windows(low_ram: int) -> PciWindows:
    return PciWindows(io=PCI_IO_WINDOW, memory=(low_ram, PCI_MEMORY_END))


def _pci_host(slots: tuple[PciSlot, ...], wiring: Wiring, firmware_bars: bool) -> PciHost:
    functions = {}
    for slot in slots:
        function = slot.build(wiring)
        if slot.interrupt_pin:
            gsi = pci_interrupt_gsi(slot.address.device, slot.interrupt_pin)
            function.connect_interrupt(slot.interrupt_pin, gsi, wiring.irq(gsi))
        functions[slot.address] = function
    return PciHost(
        functions,
        wiring.request_reset,
        pci_windows(wiring.low_ram),
        firmware_bars=firmware_bars,
    )


def pci_entry(
    slots: tuple[PciSlot, ...] = PCI_FUNCTIONS, *, firmware_bars: bool = True
) -> DeviceEntry:
    """The PCI host bridge with ``slots`` on bus 0 (the board's entry "pci").

    ``firmware_bars``: their BARs placed and decoding at power-on, as SeaBIOS
    leaves QEMU's PC (kvmpy boots kernels without firmware, so it does this part).
    """
    return DeviceEntry(
        "pci",
        lambda w: _pci_host(slots, w, firmware_bars),
        ports=(
            IoRange(CONFIG_ADDRESS_PORT, 1, "PCI CONFIG_ADDRESS", part="address_port"),
            IoRange(RESET_CONTROL_PORT, 1, "PIIX reset control", part="reset_port"),
            IoRange(CONFIG_ADDRESS_PORT + 2, 2, "PCI CONFIG_ADDRESS", part="address_tail_port"),
            IoRange(CONFIG_DATA_PORT, CONFIG_DATA_PORTS, "PCI CONFIG_DATA", part="data_port"),
        ),
        attach=lambda host, spaces: host.attach(spaces),
    )


def debug_exit_entries(ranges: Sequence[tuple[int, int]]) -> tuple[DeviceEntry, ...]:
    """isa-debug-exit devices at ``ranges`` ((iobase, iosize) each), as QEMU's
    ``-device isa-debug-exit,iobase=B,iosize=S`` places them: debug_exit, debug_exit2...
    (The port bus refuses a range outside its space when the machine maps them.)"""

    def build(ports: int) -> Callable[[Wiring], DebugExit]:
        return lambda w: DebugExit(w.guest_exit, ports)

    entries = []
    for index, (base, size) in enumerate(ranges):
        name = "debug_exit" if index == 0 else f"debug_exit{index + 1}"
        entries.append(DeviceEntry(name, build(size), ports=(IoRange(base, size, "debug-exit"),)))
    return tuple(entries)


# QEMU's -device pci-testdev, at 00:02.0 (where QEMU puts it with -nodefaults).
PCI_TESTDEV_SLOT = PciSlot(PciAddress(0, 2, 0), lambda w: PciTestDevice())
_PCI_WITH_TESTDEV = pci_entry((*PCI_FUNCTIONS, PCI_TESTDEV_SLOT))


def with_pci_testdev(board: Board) -> Board:
    """``board`` with QEMU's pci-testdev on its PCI bus (its BARs placed as firmware would)."""
    devices = tuple(_PCI_WITH_TESTDEV if e.name == "pci" else e for e in board.devices)
    return records.replace(board, devices=devices)


# QEMU's -debugcon: not on the board unless asked for, as on QEMU's PC.
DEBUGCON = DeviceEntry(
    "debugcon", lambda w: DebugCon(), ports=(IoRange(DEBUGCON_PORT, DEBUGCON_PORTS, "debugcon"),)
)


def with_debugcon(board: Board) -> Board:
    """``board`` with QEMU's isa-debugcon at port 0xe9 (its output is set by the front end).

    pc-testdev's byte-wide twin of its scratch register (0xe8-0xeb) covers 0xe9 too;
    on QEMU the two would overlap, here the twin gives way (the scratch register
    itself stays at 0xe0).
    """
    if any(entry.name == DEBUGCON.name for entry in board.devices):
        return board
    devices = [
        records.replace(entry, ports=tuple(r for r in entry.ports if r.part != "byte_port"))
        if entry.name == "pc_testdev"
        else entry
        for entry in board.devices
    ]
    return records.replace(board, devices=(*devices, DEBUGCON))


def with_debug_exits(board: Board, ranges: Sequence[tuple[int, int]]) -> Board:
    """``board`` with its debug-exit devices replaced by ones at ``ranges`` (none: none)."""
    devices = [entry for entry in board.devices if not entry.name.startswith("debug_exit")]
    at = next(
        (i for i, e in enumerate(board.devices) if e.name.startswith("debug_exit")), len(devices)
    )
    devices[at:at] = debug_exit_entries(ranges)
    return records.replace(board, devices=tuple(devices))


DEVICES = (
    DeviceEntry(
        "serial",
        lambda w: Serial16550(output=w.serial_output, irq=w.irq(COM1_IRQ)),
        ports=(IoRange(COM1_PORT, 8, "COM1"),),
    ),
    # COM2: its output goes where the front end points it (Serial16550.set_output).
    DeviceEntry(
        "serial2",
        lambda w: Serial16550(irq=w.irq(COM2_IRQ)),
        ports=(IoRange(COM2_PORT, 8, "COM2"),),
    ),
    *debug_exit_entries([(DEBUG_EXIT_PORT, DEBUG_EXIT_PORTS)]),
    DeviceEntry("post", lambda w: PostCode(), ports=(IoRange(POST_PORT, 1, "POST"),)),
    DeviceEntry(
        "fw_cfg",
        lambda w: FwCfg(
            ram_size=w.ram_size, cpus=w.cpus, cmdline=w.cmdline.encode() if w.cmdline else None
        ),
        ports=(IoRange(FW_CFG_PORT, FW_CFG_PORTS, "fw_cfg"),),
    ),
    DeviceEntry(
        "cmos",
        lambda w: Cmos(
            low_ram=w.low_ram,
            high_ram=w.ram_size - w.low_ram,
            cpus=w.cpus,
            irq=w.irq(RTC_IRQ),
        ),
        ports=(IoRange(CMOS_PORT, CMOS_PORTS, "CMOS/RTC"),),
    ),
    DeviceEntry(
        "i8042",
        lambda w: I8042(w.request_reset, irq_kbd=w.irq(KEYBOARD_IRQ), irq_aux=w.irq(MOUSE_IRQ)),
        ports=(
            IoRange(I8042_DATA_PORT, 1, "i8042 data", part="data_port"),
            IoRange(I8042_COMMAND_PORT, 1, "i8042 command", part="command_port"),
        ),
    ),
    DeviceEntry(
        "port92",
        lambda w: SystemControlPortA(w.request_reset),
        ports=(IoRange(SYSTEM_CONTROL_PORT_A, 1, "port 0x92"),),
    ),
    DeviceEntry(
        "acpi_pm",
        lambda w: AcpiPmControl(w.request_power_off, w.request_suspend),
        ports=(IoRange(PM1A_CNT_PORT, PM1A_CNT_PORTS, "ACPI PM1a_CNT"),),
    ),
    DeviceEntry(
        "acpi_events",
        lambda w: AcpiPmEvent(irq=w.irq(SCI_IRQ)),
        ports=(IoRange(PM1A_EVT_PORT, PM1A_EVT_PORTS, "ACPI PM1a_EVT"),),
    ),
    DeviceEntry(
        "acpi_timer",
        lambda w: AcpiPmTimer(),
        ports=(IoRange(PM_TIMER_PORT, PM_TIMER_PORTS, "ACPI PM timer"),),
    ),
    pci_entry(),
    DeviceEntry(
        "pc_testdev",
        lambda w: PcTestDevice(w.irq, w.flush_page),
        ports=(
            IoRange(SCRATCH_PORT, PORT_BLOCK, "pc-testdev scratch", part="scratch_port"),
            IoRange(FLUSH_PORT, PORT_BLOCK, "pc-testdev flush", part="flush_port"),
            IoRange(SCRATCH_BYTE_PORT, PORT_BLOCK, "pc-testdev scratch (bytes)", part="byte_port"),
            IoRange(IRQ_PORT_BASE, IRQ_LINES, "pc-testdev IRQ lines", part="irq_port"),
        ),
        mmio=(IoRange(IOMEM_BASE, IOMEM_SIZE, "pc-testdev iomem", part="iomem"),),
    ),
    DeviceEntry(
        "testdev", lambda w: TestDevice(), mmio=(IoRange(TESTDEV_BASE, TESTDEV_SIZE, "testdev"),)
    ),
    DeviceEntry("vga", lambda w: Vga(), ports=(IoRange(VGA_PORT_BASE, VGA_PORTS, "VGA"),)),
    # What Linux probes for at boot and must find missing: reads all ones.
    DeviceEntry(
        "absent",
        lambda w: AbsentPorts(),
        ports=tuple(IoRange(port, count, name) for port, count, name in LINUX_PROBED_PORTS),
    ),
)


def _pci_interrupts() -> list[tuple[int, int, int]]:
    """(device, pin, GSI) of every PCI function with an interrupt pin, for the MP table."""
    return [
        (slot.address.device, slot.interrupt_pin, pci_interrupt_gsi(slot.address.device, pin))
        for slot in PCI_FUNCTIONS
        if (pin := slot.interrupt_pin)
    ]


def _mp_tables(context: FirmwareContext) -> bytes:
    return mp_tables(
        context.cpus, *context.cpu_signature, pci_interrupts=_pci_interrupts(), irq0_on_pin2=True
    )


# What the DSDT lists behind the ISA bridge: the board's legacy devices, with QEMU's
# PnP IDs, so that Linux binds its PnP drivers (and reserves their ports) as on QEMU.
ISA_DEVICES = (
    IsaDevice(b"KBD_", "PNP0303", ((I8042_DATA_PORT, 1), (I8042_COMMAND_PORT, 1)), (KEYBOARD_IRQ,)),
    IsaDevice(b"RTC_", "PNP0B00", ((CMOS_PORT, CMOS_PORTS),), (RTC_IRQ,)),
    IsaDevice(b"COM1", "PNP0501", ((COM1_PORT, 8),), (COM1_IRQ,), uid=1),
    IsaDevice(b"COM2", "PNP0501", ((COM2_PORT, 8),), (COM2_IRQ,), uid=2),
)

FIRMWARE = (
    FirmwareTable(
        "BIOS Data Area", BDA_ADDR, BDA_SIZE, lambda c: bios_data_area((COM1_PORT, COM2_PORT))
    ),
    FirmwareTable("MP tables", MP_TABLE_ADDR, MP_TABLE_SIZE, _mp_tables, needs_irqchip=True),
    FirmwareTable(
        "ACPI tables",
        ACPI_TABLES_ADDR,
        ACPI_TABLES_SIZE,
        lambda c: acpi_tables(
            c.cpus,
            irq0_on_pin2=True,
            pci_windows=pci_windows(c.low_ram),
            pci_gsi=pci_interrupt_gsi,
            isa_devices=ISA_DEVICES,
        ),
        needs_irqchip=True,
    ),
)

# -- ACPI S3: what wakes the PC, and where it resumes ------------------------------------


def _wake(locked: Callable[[str], AbstractContextManager[Any]]) -> bool:
    """While asleep: an RTC alarm (with AIE) sets RTC_STS and wakes if RTC_EN; the
    power button always wakes.  Waking sets WAK_STS, as QEMU's PIIX4 PM does."""
    with locked("cmos") as cmos:
        alarm = cmos.alarm_wakes()
    with locked("acpi_events") as events:
        if alarm:
            events.raise_status(RTC_STS)
        status = events.status
        wake = bool(status & PWRBTN_STS or status & events.enable & RTC_STS)
        if wake:
            events.raise_status(WAK_STS)
    return wake


def press_power_button(machine: Any) -> None:
    """Press the ACPI power button: PWRBTN_STS (and the SCI if enabled); wakes a sleeper."""
    with machine.locked("acpi_events") as events:
        events.raise_status(PWRBTN_STS)


# Where firmware keeps what a resume in 32- or 64-bit mode needs: a GDT and the
# page tables of the identity map, in the ACPI area past the tables (memory the
# memory maps do not give the guest), written afresh on every resume.
RESUME_GDT_ADDR = ACPI_TABLES_ADDR + 0x8000
RESUME_PAGE_TABLES_ADDR = ACPI_TABLES_ADDR + 0x9000  # 6 pages: PML4, PDPT, 4 PDs


def _in_firmware_area(setup: CpuSetup) -> CpuSetup:
    """``setup`` (protected or long mode) with its GDT and page tables moved to firmware's."""
    gdt = dict(setup.memory)[GDT_ADDR]
    sregs = records.replace(setup.sregs, gdt=DTable(RESUME_GDT_ADDR, setup.sregs.gdt.limit))
    memory = [(RESUME_GDT_ADDR, gdt)]
    if setup.mode == "long":
        sregs = records.replace(sregs, cr3=RESUME_PAGE_TABLES_ADDR)
        memory.append((RESUME_PAGE_TABLES_ADDR, long_mode_page_tables(RESUME_PAGE_TABLES_ADDR)))
    # The waking code sets up its own stack.
    return CpuSetup(setup.mode, records.replace(setup.regs, rsp=0), sregs, memory)


def _resume_setup(memory: Any, reset_sregs: Sregs) -> CpuSetup:
    """Where and how the guest said to resume, in the FACS (ACPI 6.5, 5.2.10).

    x_firmware_waking_vector, when the FACS is version 1 or later and the guest
    set it (below 4 GiB): 64-bit mode there if the guest set 64BIT_WAKE_F in
    the OSPM flags and the FACS (version 2 on) says 64BIT_WAKE_SUPPORTED_F;
    else 32-bit flat protected mode, paging off.  Otherwise real mode at
    firmware_waking_vector (CS = vector >> 4).  Long mode runs on an identity
    map of the low 4 GiB; both get a flat GDT; interrupts are off.
    """
    facs = ACPI_TABLES_ADDR + FACS_OFFSET
    version = memory.read_u8(facs + FACS_VERSION_OFFSET)
    x_vector = memory.read_u64(facs + FACS_X_FIRMWARE_WAKING_VECTOR)
    if version >= 1 and 0 < x_vector < 1 << 32:
        wake64 = (
            version >= 2
            and memory.read_u32(facs + FACS_FLAGS) & FACS_64BIT_WAKE_SUPPORTED
            and memory.read_u32(facs + FACS_OSPM_FLAGS) & OSPM_64BIT_WAKE
        )
        build = long_mode if wake64 else protected_mode
        return _in_firmware_area(build(reset_sregs, x_vector))
    vector = memory.read_u32(facs + FACS_FIRMWARE_WAKING_VECTOR) & 0xFFFFF
    return real_mode_vector(reset_sregs, vector)


def _irq_routes() -> tuple[IrqRoute, ...]:
    """QEMU's PC routing: ISA IRQs to both PICs and the IOAPIC, IRQ 0 (the PIT) to pin 2.

    The MP table and the MADT say so too (their interrupt source overrides).
    GSI 2 is the PICs' cascade and drives nothing.
    """
    routes = [
        IrqRoute(gsi, InterruptController.PIC_MASTER, gsi) for gsi in range(8) if gsi != CASCADE_IRQ
    ]
    routes += [IrqRoute(gsi, InterruptController.PIC_SLAVE, gsi - 8) for gsi in range(8, 16)]
    routes.append(IrqRoute(TIMER_IRQ, InterruptController.IOAPIC, TIMER_IOAPIC_PIN))
    routes += [
        IrqRoute(gsi, InterruptController.IOAPIC, gsi)
        for gsi in range(IOAPIC_PINS)
        if gsi not in (TIMER_IRQ, CASCADE_IRQ)
    ]
    return tuple(routes)


PC = Board(
    name="pc",
    ram_layout=pc_ram_layout,
    devices=DEVICES,
    firmware=FIRMWARE,
    scratch_base=HYPERVISOR_SCRATCH_ADDR,
    logged_window=(VGA_TEXT_BASE, VGA_TEXT_BASE + VGA_TEXT_WINDOW),
    acpi_rsdp=ACPI_TABLES_ADDR,
    irq_routes=_irq_routes(),
    wake=_wake,
    resume_setup=_resume_setup,
)

__all__ = [
    "PC",
    "Wiring",
    "debug_exit_entries",
    "press_power_button",
    "with_debug_exits",
    "with_debugcon",
]
