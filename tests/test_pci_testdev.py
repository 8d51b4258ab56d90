"""QEMU's pci-testdev, and the BARs kvmpy places as firmware would.

The device's behaviour follows QEMU's hw/misc/pci-testdev.c; the guest test
does what kvm-unit-tests' PCI test library does: find 1b36:0005 by scanning
bus 0, take its I/O BAR as firmware left it, select a test, read its header,
write the test value to its offset and read the count back.
"""

from __future__ import annotations

import struct
import subprocess
import sys

import pytest

from kvmpy.devices.pci import (
    COMMAND,
    COMMAND_IO,
    COMMAND_MEMORY,
    NO_WINDOWS,
    PciAddress,
    PciHost,
    PciWindows,
)
from kvmpy.devices.pci_testdev import (
    DATA_ANY,
    DATA_MATCH,
    IO_BAR,
    MEMORY_BAR,
    PCI_TESTDEV_DEVICE,
    REDHAT_VENDOR,
    PciTestDevice,
    PciTestDeviceState,
)
from kvmpy.loaders.flat import load_flat
from kvmpy.machine import Machine
from kvmpy.x86.pc import PC, with_pci_testdev
from tests.helpers import ROOT, Assembler

TESTDEV = PciAddress(0, 2, 0)


def header(device: PciTestDevice, bar: int = MEMORY_BAR) -> tuple[int, int, int, int, int, bytes]:
    """(test, width, offset, data, count, name) as the guest reads them through ``bar``."""
    raw = bytes(device.read_bar(bar, at, 1) for at in range(48))
    test, width, offset, data, count = struct.unpack_from("<BBxxIBxxxI", raw)
    return test, width, offset, data, count, raw[16:].split(b"\0")[0]


def test_identity_and_bars_as_qemu_has_them() -> None:
    device = PciTestDevice()
    assert (device.vendor, device.read_config(0x02, 2)) == (REDHAT_VENDOR, PCI_TESTDEV_DEVICE)
    assert device.read_config(0x08, 4) == 0x00FF_0000  # class 00, subclass ff, revision 0
    assert device.read_config(0x2C, 4) == 0x1100_1AF4  # QEMU's subsystem IDs
    assert device.interrupt_pin == 0
    assert [(bar.size, bar.io) for bar in device.bars] == [(4096, False), (256, True)]


@pytest.mark.parametrize(
    ("bar", "number", "test", "offset", "data", "name"),
    [
        (MEMORY_BAR, 0, 0, 2048, DATA_MATCH, b"mmio-no-eventfd"),
        (MEMORY_BAR, 1, 1, 2049, DATA_ANY, b"mmio-wildcard-eventfd"),
        (MEMORY_BAR, 2, 2, 2050, DATA_MATCH, b"mmio-datamatch-eventfd"),
        (IO_BAR, 0, 3, 131, DATA_MATCH, b"portio-no-eventfd"),
        (IO_BAR, 1, 4, 132, DATA_ANY, b"portio-wildcard-eventfd"),
        (IO_BAR, 2, 5, 133, DATA_MATCH, b"portio-datamatch-eventfd"),
    ],
)
def test_selecting_a_test_shows_its_header(
    bar: int, number: int, test: int, offset: int, data: int, name: bytes
) -> None:
    device = PciTestDevice()
    assert header(device) == (0, 0, 0, 0, 0, b"")  # nothing selected: zeros
    device.write_bar(bar, 0, 1, number)
    # Either BAR shows the selected test.
    for through in (MEMORY_BAR, IO_BAR):
        assert header(device, through) == (test, 1, offset, data, 0, name)
    # Past the header (its NUL included), zeros.
    size = 16 + len(name) + 1
    assert device.read_bar(bar, size - 1, 1) == 0 and device.read_bar(bar, size + 5, 1) == 0


def test_writes_at_the_offset_count_when_the_data_matches() -> None:
    device = PciTestDevice()
    device.write_bar(MEMORY_BAR, 0, 1, 2)  # mmio-datamatch-eventfd: offset 2050, data 0xfa
    for _ in range(16):
        device.write_bar(MEMORY_BAR, 2050, 1, DATA_MATCH)
    device.write_bar(MEMORY_BAR, 2050, 1, 0x12)  # another value: not counted
    device.write_bar(MEMORY_BAR, 2051, 1, DATA_MATCH)  # elsewhere: not counted
    assert header(device)[4] == 16
    assert device.read_bar(MEMORY_BAR, 12, 4) == 16  # the count, read as a dword
    # A wider write acts as byte writes: only its first byte lands on the offset.
    device.write_bar(MEMORY_BAR, 2050, 4, 0x0000_00FA)
    assert header(device)[4] == 17
    # Selecting again zeroes the count; a number of 3 or more selects nothing.
    device.write_bar(MEMORY_BAR, 0, 1, 2)
    assert header(device)[4] == 0
    device.write_bar(MEMORY_BAR, 0, 1, 3)
    assert header(device) == (0, 0, 0, 0, 0, b"")
    device.write_bar(MEMORY_BAR, 2050, 1, DATA_MATCH)  # nothing selected: dropped


def test_the_wildcard_test_counts_any_value() -> None:
    device = PciTestDevice()
    device.write_bar(IO_BAR, 0, 1, 1)  # portio-wildcard-eventfd, offset 132
    for value in (0, 0x55, 0xFF):
        device.write_bar(IO_BAR, 132, 1, value)
    assert header(device, IO_BAR)[4] == 3


def test_state_reset_and_restore() -> None:
    device = PciTestDevice()
    device.write_bar(IO_BAR, 0, 1, 0)
    device.write_bar(IO_BAR, 131, 1, DATA_MATCH)
    saved = device.state()
    assert saved == PciTestDeviceState(3, (0, 0, 0, 1, 0, 0))
    device.reset()
    assert device.state() == PciTestDeviceState(-1, (0,) * 6)
    device.restore(saved)
    assert header(device)[0] == 3 and header(device)[4] == 1
    for hostile in (PciTestDeviceState(6, (0,) * 6), PciTestDeviceState(0, (0,) * 5)):
        with pytest.raises(ValueError, match="pci-testdev"):
            device.restore(hostile)
    assert device.state() == saved  # a refused state changes nothing


# -- BARs placed as firmware would ---------------------------------------------------------

WINDOWS = PciWindows(io=(0x0D00, 0x10000), memory=(0x0800_0000, 0xFEB0_0000))


def test_firmware_bars_are_placed_aligned_and_decoding() -> None:
    host = PciHost(
        {TESTDEV: PciTestDevice(), PciAddress(0, 3, 0): PciTestDevice()},
        lambda: None,
        WINDOWS,
        firmware_bars=True,
    )
    first, second = host.functions[TESTDEV], host.functions[PciAddress(0, 3, 0)]
    assert (first.bar_address(0), first.bar_address(1)) == (0x0800_0000, 0x0D00)
    assert (second.bar_address(0), second.bar_address(1)) == (0x0800_1000, 0x0E00)
    assert first.read_config(COMMAND, 2) & (COMMAND_IO | COMMAND_MEMORY) == 3
    # Power-on state: a reset puts them back where firmware did.
    first.place_bar(0, 0x0900_0000)
    host.reset()
    assert first.bar_address(0) == 0x0800_0000
    # No room in the windows: the BAR stays at 0 and does not decode.
    none = PciHost({TESTDEV: PciTestDevice()}, lambda: None, NO_WINDOWS, firmware_bars=True)
    assert none.functions[TESTDEV].bar_address(0) == 0
    assert none.functions[TESTDEV].read_config(COMMAND, 2) == 0
    # Without firmware_bars nothing is placed (the guest programs them).
    plain = PciHost({TESTDEV: PciTestDevice()}, lambda: None, WINDOWS)
    assert plain.functions[TESTDEV].bar_address(0) == 0


def test_the_pc_with_pci_testdev_maps_its_bars_at_power_on() -> None:
    board = with_pci_testdev(PC)
    assert with_pci_testdev(board).entry("pci") is board.entry("pci")
    with Machine(mem_size=16 << 20, board=board) as m:
        pci = m.devices()["pci"]
        assert isinstance(pci.functions[TESTDEV], PciTestDevice)
        assert pci.mapped_bars() == {(TESTDEV, 0): 16 << 20, (TESTDEV, 1): 0x0D00}
        # The MMIO BAR through the machine's bus: select mmio-no-eventfd, count a write.
        m.mmio.write(16 << 20, 1, 0)
        m.mmio.write((16 << 20) + 2048, 1, DATA_MATCH)
        assert m.mmio.read((16 << 20) + 12, 4) == 1
        assert m.mmio.read((16 << 20) + 16, 4) == int.from_bytes(b"mmio", "little")
    with Machine(mem_size=16 << 20) as m:
        assert TESTDEV not in m.devices()["pci"].functions  # not on QEMU's PC by default


# A real-mode guest doing what kvm-unit-tests' PCI library does with the I/O BAR:
# find 1b36:0005 on bus 0, read BAR1, select portio-no-eventfd, check its name's
# first letter, write the test value 16 times at the offset, exit with the count.
FIND_AND_COUNT = """
    xor %ecx, %ecx
1:  mov %ecx, %eax
    shl $11, %eax
    or $0x80000000, %eax
    mov $0xcf8, %dx
    out %eax, %dx
    mov $0xcfc, %dx
    in %dx, %eax
    cmp $0x00051b36, %eax
    je 2f
    inc %ecx
    cmp $32, %ecx
    jb 1b
    mov $0x7e, %al
    out %al, $0xf4
2:  mov %ecx, %eax
    shl $11, %eax
    or $0x80000014, %eax
    mov $0xcf8, %dx
    out %eax, %dx
    mov $0xcfc, %dx
    in %dx, %eax
    and $0xfffc, %eax
    mov %ax, %bx
    mov %bx, %dx
    xor %al, %al
    out %al, %dx
    lea 16(%bx), %dx
    in %dx, %al
    cmp $'p', %al
    je 3f
    mov $0x7d, %al
    out %al, $0xf4
3:  lea 4(%bx), %dx
    in %dx, %ax
    add %ax, %bx
    mov %bx, %dx
    mov $16, %cx
4:  mov $0xfa, %al
    out %al, %dx
    loop 4b
    sub $131, %bx
    lea 12(%bx), %dx
    in %dx, %al
    out %al, $0xf4
"""


@pytest.mark.kvm
def test_a_guest_finds_the_device_and_counts_its_writes(assemble: Assembler) -> None:
    image = assemble(FIND_AND_COUNT)
    with Machine(mem_size=16 << 20, board=with_pci_testdev(PC)) as m:
        m.load(load_flat(image, 0x7C00), mode="real")
        assert m.run(timeout=30).exit_code == 16
    done = subprocess.run(
        [sys.executable, "-m", "kvmpy", "run", "--device", "pci-testdev", str(image)],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert (done.returncode, done.stderr) == ((16 << 1) | 1, "")
    absent = subprocess.run(
        [sys.executable, "-m", "kvmpy", "run", str(image)],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert absent.returncode == (0x7E << 1) | 1  # not found: QEMU's PC without -device


def test_the_device_and_its_bars_survive_a_snapshot() -> None:
    from kvmpy.snapshot import take_snapshot

    board = with_pci_testdev(PC)
    with Machine(mem_size=16 << 20, board=board) as m:
        m.ports.write(0x0D00, 1, 2)  # portio-datamatch-eventfd: offset 133
        m.ports.write(0x0D00 + 133, 1, DATA_MATCH)
        saved = take_snapshot(m)
    with Machine.restore(saved, board=board) as restored:
        pci = restored.devices()["pci"]
        assert pci.mapped_bars() == {(TESTDEV, 0): 16 << 20, (TESTDEV, 1): 0x0D00}
        assert restored.ports.read(0x0D00 + 12, 4) == 1
        assert restored.ports.read(0x0D00, 1) == 5
    with pytest.raises(ValueError, match=r"extra \['pci/00:02.0'\]"):
        Machine.restore(saved)
