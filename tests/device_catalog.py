"""Every device model, built the way a test wants it: for the contract and fuzz tests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvmpy.devices.acpi_pm import (
    PM1A_CNT_PORTS,
    PM1A_EVT_PORTS,
    PM_TIMER_PORTS,
    AcpiPmControl,
    AcpiPmEvent,
    AcpiPmTimer,
)
from kvmpy.devices.cmos import CMOS_PORTS, Cmos
from kvmpy.devices.debug_exit import DEBUG_EXIT_PORTS, DebugExit
from kvmpy.devices.debugcon import DEBUGCON_PORTS, DebugCon
from kvmpy.devices.fw_cfg import FW_CFG_PORTS, FwCfg
from kvmpy.devices.pc_testdev import PORT_BLOCK, PcTestDevice
from kvmpy.devices.pci import (
    CONFIG_DATA_PORTS,
    PciAddress,
    PciHost,
    i440fx_host_bridge,
    piix3_isa_bridge,
)
from kvmpy.devices.post import POST_PORTS, PostCode
from kvmpy.devices.reset import I8042, I8042_SPAN, SystemControlPortA
from kvmpy.devices.serial import NUM_PORTS, Serial16550
from kvmpy.devices.testdev import TESTDEV_SIZE, TestDevice
from kvmpy.devices.vga import VGA_PORTS, Vga

MiB = 1 << 20


class FakeClock:
    """A host clock that only moves when a test moves it."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.25

    def __call__(self) -> float:
        return self.now


@dataclass
class Built:
    device: Any
    length: int  # bytes of address space the device decodes from offset 0
    events: list[object]  # what its callbacks saw (interrupts, exits, resets)
    clock: FakeClock


def _serial(events: list[object], clock: FakeClock) -> Any:
    return Serial16550(output=events.append, irq=events.append, host_queue_limit=256)


def _cmos(events: list[object], clock: FakeClock) -> Any:
    return Cmos(low_ram=64 * MiB, clock=clock, irq=events.append)


def _fw_cfg(events: list[object], clock: FakeClock) -> Any:
    fw = FwCfg(ram_size=64 * MiB, cpus=2, cmdline=b"console=ttyS0")
    fw.add_file("etc/test", b"hello")
    return fw


def _i8042(events: list[object], clock: FakeClock) -> Any:
    return I8042(lambda: events.append("reset"), irq_kbd=events.append, irq_aux=events.append)


def _pc_testdev(events: list[object], clock: FakeClock) -> Any:
    return PcTestDevice(lambda line: lambda level: events.append((line, level)), events.append)


def _pci(events: list[object], clock: FakeClock) -> Any:
    functions = {PciAddress(0, 0, 0): i440fx_host_bridge(), PciAddress(0, 1, 0): piix3_isa_bridge()}
    return PciHost(functions, lambda: events.append("reset"))


# name -> (factory, length): the same names the machine gives its devices.
FACTORIES: dict[str, tuple[Callable[[list[object], FakeClock], Any], int]] = {
    "serial": (_serial, NUM_PORTS),
    "post": (lambda events, clock: PostCode(), POST_PORTS),
    "debug_exit": (lambda events, clock: DebugExit(events.append), DEBUG_EXIT_PORTS),
    "debugcon": (lambda events, clock: DebugCon(events.append), DEBUGCON_PORTS),
    "fw_cfg": (_fw_cfg, FW_CFG_PORTS),
    "cmos": (_cmos, CMOS_PORTS),
    "i8042": (_i8042, I8042_SPAN),
    "port92": (lambda events, clock: SystemControlPortA(lambda: events.append("reset")), 1),
    "acpi_pm": (lambda events, clock: AcpiPmControl(lambda: events.append("off")), PM1A_CNT_PORTS),
    "acpi_events": (lambda events, clock: AcpiPmEvent(), PM1A_EVT_PORTS),
    "acpi_timer": (lambda events, clock: AcpiPmTimer(), PM_TIMER_PORTS),
    "pc_testdev": (_pc_testdev, PORT_BLOCK),
    "pci": (_pci, CONFIG_DATA_PORTS),
    "testdev": (lambda events, clock: TestDevice(), TESTDEV_SIZE),
    "vga": (lambda events, clock: Vga(), VGA_PORTS),
}


def build(name: str) -> Built:
    factory, length = FACTORIES[name]
    events: list[object] = []
    clock = FakeClock()
    return Built(factory(events, clock), length, events, clock)
