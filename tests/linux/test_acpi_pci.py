"""Real Linux reads kvmpy's ACPI tables and finds its PCI host bridge (`make test-linux`).

The tiny kernel built with ACPI and PCI (guests/linux/acpi.config, image
``tiny-acpi-bzImage``) boots once, to ``Run /init``; each test then checks one
part of the platform in the kernel's log: the tables it found, the PM timer,
the MADT, the ACPI interpreter and sleep states, the PCI root bridge with the
windows of the DSDT's ``_CRS`` and QEMU's two functions, and that Linux has
nothing to say against any of it.  The expected values come from kvmpy's own
board (``kvmpy/x86/pc.py``, ``kvmpy/x86/acpi.py``), so a change there that
Linux would see differently fails here.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pytest

from kvmpy.devices.acpi_pm import PM_TIMER_PORT
from kvmpy.devices.pci import (
    CLASS_HOST_BRIDGE,
    CLASS_ISA_BRIDGE,
    CONFIG_ADDRESS_PORT,
    I440FX_DEVICE,
    INTEL_VENDOR,
    PIIX3_ISA_DEVICE,
)
from kvmpy.pytest_plugin import MachineFactory, new_machine
from kvmpy.x86.acpi import OEM_ID, OEM_TABLE_ID
from kvmpy.x86.layout import (
    ACPI_TABLES_ADDR,
    COM1_IRQ,
    COM1_PORT,
    COM2_IRQ,
    COM2_PORT,
    IOAPIC_ADDR,
    SCI_IRQ,
    TIMER_IOAPIC_PIN,
    TIMER_IRQ,
)
from kvmpy.x86.pc import ISA_DEVICES, pci_windows
from tests.helpers import host_kvm_module
from tests.linux.test_linux import (
    BOOT_TIMEOUT,
    MEM,
    ON_HARDWARE_KVM,
    RUN_INIT,
    TINY_CMDLINE,
    image,
    timed,
)

# Every test here boots a kernel: skipped without KVM, failed with KVMPY_REQUIRE_KVM=1.
pytestmark = pytest.mark.kvm

KERNEL = "tiny-acpi-bzImage"
# Checksums too: Linux does not verify them early unless told.
ACPI_CMDLINE = f"{TINY_CMDLINE} acpi_force_table_verification"
# What Linux says against firmware, ACPI or the PCI bus it was given.
COMPLAINTS = re.compile(
    r"ACPI (BIOS )?(Error|Warning)|\bAE_[A-Z_]+|\[Firmware (Bug|Warn|Info)\]|FW_BUG"
    r"|checksum error|[Ii]ncorrect checksum"
    r"|^(ACPI|acpi|pnp|PCI|pci|pci_bus)\b.*([Ff]ail|conflict|collision|can't|invalid)"
)
# Such lines that are not about kvmpy's tables or bridge, and why.
NOT_ABOUT_THE_PLATFORM = {
    "[Firmware Bug]: TSC doesn't count with P0 frequency!": "the host CPU's P-state MSRs",
    "ACPI: Failed to create genetlink family for ACPI event": "the tiny kernel has no CONFIG_NET",
}
# The lines printed for the record (pytest -s): the platform as Linux saw it.
PLATFORM_LINES = re.compile(r"^(ACPI|acpi|PCI|pci|pci_bus|pnp|clocksource: (acpi_pm|Switched))\b")


@pytest.fixture(scope="module")
def acpi_log(request: pytest.FixtureRequest) -> Iterator[str]:
    """The kernel's log of one boot, from power-on to ``Run /init``."""
    machine = new_machine(
        request.node,
        image(KERNEL),
        mem=MEM,
        append=ACPI_CMDLINE,
        initrd=image("initramfs.cpio"),
        timeout=BOOT_TIMEOUT,
    )
    try:
        started = time.monotonic()
        machine.start()
        for marker in (
            b"Linux version 6.1",
            b"ACPI: Interpreter enabled",
            b"PCI host bridge to bus 0000:00",
            RUN_INIT,
        ):
            machine.serial.expect(marker)
            timed(f"tiny-acpi bzImage: {marker.decode()}", started)
        log = machine.serial.output.decode(errors="replace").replace("\r\n", "\n")
    finally:
        machine.close()
    print("\n".join(line for line in log.splitlines() if PLATFORM_LINES.match(line)))
    yield log


def lines_matching(log: str, pattern: str) -> list[str]:
    return [line for line in log.splitlines() if re.search(pattern, line)]


def assert_in_log(log: str, *expected: str) -> None:
    missing = [line for line in expected if line not in log]
    assert not missing, "not in the kernel's log:\n" + "\n".join(missing)


def test_linux_finds_every_acpi_table_where_kvmpy_put_them(acpi_log: str) -> None:
    oem = OEM_ID.decode()
    assert_in_log(acpi_log, f"ACPI: RSDP 0x{ACPI_TABLES_ADDR:016X} 000014 (v00 {oem})")
    header = re.escape(f"(v01 {oem} {OEM_TABLE_ID.decode()} 00000001 KVMP 00000001)")
    for signature in ("RSDT", "FACP", "DSDT", "APIC"):
        found = lines_matching(acpi_log, rf"^ACPI: {signature} 0x[0-9A-F]{{16}} [0-9A-F]{{6}} ")
        assert len(found) == 1 and re.search(header, found[0]), f"{signature}: {found}"
    facs = lines_matching(acpi_log, r"^ACPI: FACS 0x[0-9A-F]{16} 000040$")
    assert len(facs) == 1, lines_matching(acpi_log, "FACS")


def test_linux_uses_the_pm_timer_at_port_0x608(acpi_log: str) -> None:
    assert_in_log(
        acpi_log,
        f"ACPI: PM-Timer IO Port: {PM_TIMER_PORT:#x}",
        # 24 bits wide (TMR_VAL_EXT clear); registered only after Linux checked
        # its rate against the PIT.
        "clocksource: acpi_pm: mask: 0xffffff max_cycles: 0xffffff",
    )


def test_linux_takes_the_interrupt_set_up_from_the_madt(acpi_log: str) -> None:
    assert_in_log(
        acpi_log,
        "ACPI: Using ACPI (MADT) for SMP configuration information",
        f"IOAPIC[0]: apic_id 1, version 17, address {IOAPIC_ADDR:#x}, GSI 0-23",
        f"ACPI: INT_SRC_OVR (bus 0 bus_irq {TIMER_IRQ} global_irq {TIMER_IOAPIC_PIN} dfl dfl)",
        f"ACPI: INT_SRC_OVR (bus 0 bus_irq {SCI_IRQ} global_irq {SCI_IRQ} high level)",
        "ACPI: LAPIC_NMI (acpi_id[0xff] dfl dfl lint[0x1])",
    )


def test_linux_runs_the_dsdt_and_reads_its_sleep_states(acpi_log: str) -> None:
    assert_in_log(
        acpi_log,
        "ACPI: 1 ACPI AML tables successfully acquired and loaded",
        "ACPI: Interpreter enabled",
        # \_S3 and \_S5 evaluated: the sleep states Linux may enter.
        "ACPI: PM: (supports S0 S3 S5)",
        "ACPI: Using IOAPIC for interrupt routing",
    )


def test_linux_finds_the_pci_host_bridge_its_windows_and_qemus_functions(acpi_log: str) -> None:
    windows = pci_windows(MEM)
    (io_start, io_end), (memory_start, memory_end) = windows.io, windows.memory
    assert_in_log(
        acpi_log,
        "PCI: Using configuration type 1 for base access",
        "PCI: Using host bridge windows from ACPI",
        "ACPI: PCI Root Bridge [PCI0] (domain 0000 [bus 00-ff])",
        "PCI host bridge to bus 0000:00",
        # The root bus resources are the DSDT's _CRS, one line each.
        f"pci_bus 0000:00: root bus resource [io  0x0000-{CONFIG_ADDRESS_PORT - 1:#06x} window]",
        f"pci_bus 0000:00: root bus resource [io  {io_start:#06x}-{io_end - 1:#06x} window]",
        f"pci_bus 0000:00: root bus resource [mem {memory_start:#010x}-{memory_end - 1:#010x} "
        "window]",
        "pci_bus 0000:00: root bus resource [bus 00-ff]",
        f"pci 0000:00:00.0: [{INTEL_VENDOR:04x}:{I440FX_DEVICE:04x}] type 00 "
        f"class {CLASS_HOST_BRIDGE:#08x}",
        f"pci 0000:00:01.0: [{INTEL_VENDOR:04x}:{PIIX3_ISA_DEVICE:04x}] type 00 "
        f"class {CLASS_ISA_BRIDGE:#08x}",
        "PCI: Using ACPI for IRQ routing",
        RUN_INIT.decode(),
    )
    # Nothing else answers on bus 0.
    functions = lines_matching(acpi_log, r"^pci 0000:00:[0-9a-f]{2}\.\d: \[[0-9a-f:]{9}\]")
    assert len(functions) == 2, functions


def test_linux_has_no_complaint_about_the_tables_or_the_bridge(acpi_log: str) -> None:
    complaints = [
        line
        for line in acpi_log.splitlines()
        if COMPLAINTS.search(line) and line.strip() not in NOT_ABOUT_THE_PLATFORM
    ]
    assert not complaints, "Linux complains:\n" + "\n".join(complaints)


@pytest.mark.skipif(
    not ON_HARDWARE_KVM,
    reason=f"needs hardware KVM (kvm_intel/kvm_amd); this host has "
    f"{host_kvm_module() or 'no KVM'}, where ring-3 syscall does not reach the guest "
    f"kernel, so the initramfs shell never runs",
)
def test_poweroff_from_the_shell_goes_through_acpi_s5(kvm_machine: MachineFactory) -> None:
    """BusyBox's ``poweroff -f``: Linux writes \\_S5's sleep type and SLP_EN to PM1a_CNT.
    Without ACPI it would only halt, and the run would not end as a shutdown."""
    m = kvm_machine(
        image(KERNEL),
        mem=MEM,
        append=TINY_CMDLINE,
        initrd=image("initramfs.cpio"),
        timeout=BOOT_TIMEOUT,
    )
    m.start()
    m.serial.expect(b"kvmpy-initramfs: shell ready")
    m.serial.send("poweroff -f\n")
    result = m.wait()
    assert result.reason == "shutdown", result.message


def test_linux_binds_the_isa_devices_the_dsdt_lists_through_pnp(acpi_log: str) -> None:
    # kvmpy.x86.pc.ISA_DEVICES: keyboard controller, RTC, COM1 and COM2, as on QEMU.
    assert_in_log(acpi_log, f"pnp: PnP ACPI: found {len(ISA_DEVICES)} devices")
    # The 8250 driver takes both UARTs from their PnP entries (00:NN), IRQs included.
    for port, irq, tty in ((COM1_PORT, COM1_IRQ, "ttyS0"), (COM2_PORT, COM2_IRQ, "ttyS1")):
        found = lines_matching(
            acpi_log, rf"^00:0\d: {tty} at I/O {port:#x} \(irq = {irq}, base_baud = 115200\)"
        )
        assert len(found) == 1, lines_matching(acpi_log, tty)
