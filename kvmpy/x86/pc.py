"""The PC board, declared once: what a kernel written for QEMU's ``-kernel`` finds.

``Machine`` builds everything from ``PC``: RAM in the PC layout, one bus slot,
lock, reset and snapshot entry per device, the firmware tables firmware
would leave behind, and the ranges no image may load into.  Adding a device
is adding one ``DeviceEntry`` to ``DEVICES``.
"""

from __future__ import annotations

from kvmpy.board import Board, DeviceEntry, FirmwareContext, FirmwareTable, IoRange, Wiring
from kvmpy.devices.acpi_pm import (
    PM1A_CNT_PORT,
    PM1A_CNT_PORTS,
    PM1A_EVT_PORT,
    PM1A_EVT_PORTS,
    AcpiPmControl,
    AcpiPmEvent,
)
from kvmpy.devices.cmos import CMOS_PORT, CMOS_PORTS, Cmos
from kvmpy.devices.debug_exit import DEBUG_EXIT_PORT, DEBUG_EXIT_PORTS, DebugExit
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
from kvmpy.memory import pc_ram_layout
from kvmpy.x86.acpi import acpi_tables
from kvmpy.x86.bios import bios_data_area
from kvmpy.x86.layout import (
    ACPI_TABLES_ADDR,
    ACPI_TABLES_SIZE,
    BDA_ADDR,
    BDA_SIZE,
    COM1_IRQ,
    COM1_PORT,
    COM2_IRQ,
    COM2_PORT,
    HYPERVISOR_SCRATCH_ADDR,
    KEYBOARD_IRQ,
    MOUSE_IRQ,
    MP_TABLE_ADDR,
    MP_TABLE_SIZE,
    RTC_IRQ,
)
from kvmpy.x86.mptable import mp_tables

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
    DeviceEntry(
        "debug_exit",
        lambda w: DebugExit(w.guest_exit),
        ports=(IoRange(DEBUG_EXIT_PORT, DEBUG_EXIT_PORTS, "debug-exit"),),
    ),
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
        lambda w: AcpiPmControl(w.request_power_off),
        ports=(IoRange(PM1A_CNT_PORT, PM1A_CNT_PORTS, "ACPI PM1a_CNT"),),
    ),
    DeviceEntry(
        "acpi_events",
        lambda w: AcpiPmEvent(),
        ports=(IoRange(PM1A_EVT_PORT, PM1A_EVT_PORTS, "ACPI PM1a_EVT"),),
    ),
    DeviceEntry(
        "testdev", lambda w: TestDevice(), mmio=(IoRange(TESTDEV_BASE, TESTDEV_SIZE, "testdev"),)
    ),
    DeviceEntry("vga", lambda w: Vga(), ports=(IoRange(VGA_PORT_BASE, VGA_PORTS, "VGA"),)),
)


def _mp_tables(context: FirmwareContext) -> bytes:
    return mp_tables(context.cpus, *context.cpu_signature)


FIRMWARE = (
    FirmwareTable("BIOS Data Area", BDA_ADDR, BDA_SIZE, lambda c: bios_data_area((COM1_PORT,))),
    FirmwareTable("MP tables", MP_TABLE_ADDR, MP_TABLE_SIZE, _mp_tables, needs_irqchip=True),
    FirmwareTable(
        "ACPI tables",
        ACPI_TABLES_ADDR,
        ACPI_TABLES_SIZE,
        lambda c: acpi_tables(c.cpus),
        needs_irqchip=True,
    ),
)

PC = Board(
    name="pc",
    ram_layout=pc_ram_layout,
    devices=DEVICES,
    firmware=FIRMWARE,
    scratch_base=HYPERVISOR_SCRATCH_ADDR,
    logged_window=(VGA_TEXT_BASE, VGA_TEXT_BASE + VGA_TEXT_WINDOW),
    acpi_rsdp=ACPI_TABLES_ADDR,
)

__all__ = ["PC", "Wiring"]
