"""Unit tests for the fw_cfg device (no /dev/kvm needed)."""

from __future__ import annotations

import pytest

from kvmpy.bus import Bus
from kvmpy.devices.base import Device
from kvmpy.devices.fw_cfg import (
    FW_CFG_ARCH_LOCAL,
    FW_CFG_CMDLINE_ADDR,
    FW_CFG_CMDLINE_DATA,
    FW_CFG_CMDLINE_SIZE,
    FW_CFG_FILE_DIR,
    FW_CFG_FILE_FIRST,
    FW_CFG_ID,
    FW_CFG_INITRD_ADDR,
    FW_CFG_INITRD_DATA,
    FW_CFG_INITRD_SIZE,
    FW_CFG_KERNEL_ADDR,
    FW_CFG_KERNEL_DATA,
    FW_CFG_KERNEL_SIZE,
    FW_CFG_MAX_CPUS,
    FW_CFG_NB_CPUS,
    FW_CFG_PORT,
    FW_CFG_PORTS,
    FW_CFG_RAM_SIZE,
    FW_CFG_SIGNATURE,
    FW_CFG_WRITE_CHANNEL,
    FwCfg,
)

SELECTOR = 0
DATA = 1
MiB = 1024 * 1024


def select(dev: FwCfg, key: int) -> None:
    dev.write(SELECTOR, 2, key)


def read_bytes(dev: FwCfg, count: int) -> bytes:
    return bytes(dev.read(DATA, 1) for _ in range(count))


def read_item(dev: FwCfg, key: int, count: int) -> bytes:
    select(dev, key)
    return read_bytes(dev, count)


def read_int(dev: FwCfg, key: int, size: int) -> int:
    return int.from_bytes(read_item(dev, key, size), "little")


def parse_directory(dev: FwCfg) -> list[tuple[int, int, str]]:
    """(size, selector, name) for each directory entry, as a guest decodes them."""
    select(dev, FW_CFG_FILE_DIR)
    count = int.from_bytes(read_bytes(dev, 4), "big")
    entries = []
    for _ in range(count):
        raw = read_bytes(dev, 64)
        size = int.from_bytes(raw[0:4], "big")
        selector = int.from_bytes(raw[4:6], "big")
        assert raw[6:8] == b"\0\0"
        name = raw[8:].split(b"\0", 1)[0].decode()
        entries.append((size, selector, name))
    return entries


@pytest.fixture
def fw() -> FwCfg:
    return FwCfg(ram_size=128 * MiB, cpus=2)


def test_signature_reads_qemu_byte_by_byte(fw: FwCfg) -> None:
    select(fw, FW_CFG_SIGNATURE)
    assert [fw.read(DATA, 1) for _ in range(4)] == [ord("Q"), ord("E"), ord("M"), ord("U")]


def test_signature_is_selected_at_power_on_and_after_reset(fw: FwCfg) -> None:
    assert read_bytes(fw, 4) == b"QEMU"
    select(fw, FW_CFG_NB_CPUS)
    fw.reset()
    assert read_bytes(fw, 4) == b"QEMU"


def test_id_reports_traditional_interface_only(fw: FwCfg) -> None:
    assert read_item(fw, FW_CFG_ID, 4) == b"\x01\x00\x00\x00"


def test_cpu_counts() -> None:
    fw = FwCfg(ram_size=64 * MiB, cpus=3, max_cpus=8)
    assert read_item(fw, FW_CFG_NB_CPUS, 2) == b"\x03\x00"
    assert read_int(fw, FW_CFG_MAX_CPUS, 2) == 8
    assert read_int(FwCfg(ram_size=0, cpus=5), FW_CFG_MAX_CPUS, 2) == 5


def test_ram_size_is_u64_little_endian() -> None:
    fw = FwCfg(ram_size=6 * 1024 * MiB + 0x1234, cpus=1)
    assert read_item(fw, FW_CFG_RAM_SIZE, 8) == (0x1_8000_1234).to_bytes(8, "little")


def test_reading_past_the_end_returns_zero(fw: FwCfg) -> None:
    select(fw, FW_CFG_SIGNATURE)
    assert read_bytes(fw, 6) == b"QEMU\0\0"
    assert fw.read(DATA, 1) == 0


def test_reselect_restarts_at_the_first_byte(fw: FwCfg) -> None:
    select(fw, FW_CFG_SIGNATURE)
    assert read_bytes(fw, 2) == b"QE"
    select(fw, FW_CFG_SIGNATURE)
    assert read_bytes(fw, 4) == b"QEMU"


def test_unknown_key_reads_zero(fw: FwCfg) -> None:
    select(fw, 0x1F)
    assert read_bytes(fw, 4) == b"\0\0\0\0"


def test_wide_read_returns_bytes_in_item_order(fw: FwCfg) -> None:
    select(fw, FW_CFG_SIGNATURE)
    assert fw.read(DATA, 4) == int.from_bytes(b"QEMU", "little")
    select(fw, FW_CFG_SIGNATURE)
    assert fw.read(DATA, 2) == int.from_bytes(b"QE", "little")
    assert fw.read(DATA, 4) == int.from_bytes(b"MU\0\0", "little")


def test_byte_writes_do_not_select_and_data_writes_are_ignored(fw: FwCfg) -> None:
    select(fw, FW_CFG_NB_CPUS)
    fw.write(SELECTOR, 1, FW_CFG_SIGNATURE)  # a byte write is a data write in QEMU
    fw.write(DATA, 1, 0x55)
    assert read_bytes(fw, 2) == b"\x02\x00"


def test_selector_port_reads_data_like_qemus_combined_region(fw: FwCfg) -> None:
    select(fw, FW_CFG_SIGNATURE)
    assert fw.read(SELECTOR, 1) == ord("Q")
    assert fw.read(DATA, 1) == ord("E")


def test_write_channel_bit_is_ignored_when_selecting(fw: FwCfg) -> None:
    select(fw, FW_CFG_WRITE_CHANNEL | FW_CFG_SIGNATURE)
    assert read_bytes(fw, 4) == b"QEMU"


def test_cmdline_items_include_the_nul() -> None:
    fw = FwCfg(ram_size=64 * MiB, cpus=1, cmdline=b"console=ttyS0 quiet", cmdline_addr=0x20000)
    assert read_int(fw, FW_CFG_CMDLINE_SIZE, 4) == 20
    assert read_item(fw, FW_CFG_CMDLINE_DATA, 21) == b"console=ttyS0 quiet\0\0"
    assert read_int(fw, FW_CFG_CMDLINE_ADDR, 4) == 0x20000


def test_empty_cmdline_is_one_nul() -> None:
    fw = FwCfg(ram_size=64 * MiB, cpus=1, cmdline=b"")
    assert read_int(fw, FW_CFG_CMDLINE_SIZE, 4) == 1
    assert fw.item(FW_CFG_CMDLINE_DATA) == b"\0"


def test_cmdline_with_nul_is_rejected() -> None:
    with pytest.raises(ValueError, match="NUL"):
        FwCfg(ram_size=64 * MiB, cpus=1, cmdline=b"a\0b")


def test_kernel_and_initrd_items() -> None:
    kernel = bytes(range(256)) * 3
    initrd = b"\x1f\x8b" + b"x" * 100
    fw = FwCfg(ram_size=64 * MiB, cpus=1, kernel=kernel, initrd=initrd, kernel_addr=0x100000)
    assert read_int(fw, FW_CFG_KERNEL_SIZE, 4) == 768
    assert read_int(fw, FW_CFG_KERNEL_ADDR, 4) == 0x100000
    assert read_item(fw, FW_CFG_KERNEL_DATA, 768) == kernel
    assert read_int(fw, FW_CFG_INITRD_SIZE, 4) == 102
    assert read_int(fw, FW_CFG_INITRD_ADDR, 4) == 0
    assert read_item(fw, FW_CFG_INITRD_DATA, 102) == initrd


def test_absent_kernel_means_no_kernel_items(fw: FwCfg) -> None:
    assert fw.item(FW_CFG_KERNEL_SIZE) is None
    assert fw.item(FW_CFG_CMDLINE_SIZE) is None
    assert read_int(fw, FW_CFG_KERNEL_SIZE, 4) == 0


def test_empty_directory(fw: FwCfg) -> None:
    assert read_item(fw, FW_CFG_FILE_DIR, 4) == b"\0\0\0\0"
    assert parse_directory(fw) == []


def test_directory_lists_files_sorted_by_name_with_big_endian_fields(fw: FwCfg) -> None:
    table = fw.add_file("etc/table-loader", b"L" * 300)
    boot = fw.add_file("bootorder", b"/pci@i0cf8/disk@0\n")
    e820 = fw.add_file("etc/e820", bytes(20))
    assert (table, boot, e820) == (0x20, 0x21, 0x22)
    assert parse_directory(fw) == [
        (18, 0x21, "bootorder"),
        (20, 0x22, "etc/e820"),
        (300, 0x20, "etc/table-loader"),
    ]
    # The raw count and the first entry's size are big-endian.
    select(fw, FW_CFG_FILE_DIR)
    assert read_bytes(fw, 8) == b"\0\0\0\x03\0\0\0\x12"


def test_file_reads_back_through_its_selector(fw: FwCfg) -> None:
    data = b"hello, fw_cfg\n" * 10
    selector = fw.add_file("opt/kvmpy/greeting", data)
    ((size, listed, name),) = parse_directory(fw)
    assert (size, listed, name) == (len(data), selector, "opt/kvmpy/greeting")
    assert read_item(fw, listed, size + 2) == data + b"\0\0"
    assert fw.item(selector) == data


def test_directory_selected_before_add_file_keeps_its_snapshot(fw: FwCfg) -> None:
    select(fw, FW_CFG_FILE_DIR)
    fw.add_file("a", b"1")
    assert read_bytes(fw, 8) == bytes(8)  # count 0, then past the end
    assert [name for _, _, name in parse_directory(fw)] == ["a"]


def test_file_name_of_55_bytes_is_accepted_and_56_rejected(fw: FwCfg) -> None:
    longest = "n" * 55
    selector = fw.add_file(longest, b"x")
    assert parse_directory(fw) == [(1, selector, longest)]
    with pytest.raises(ValueError, match="longer than 55"):
        fw.add_file("n" * 56, b"x")
    with pytest.raises(ValueError, match="longer than 55"):
        fw.add_file("é" * 28, b"x")  # 56 bytes of UTF-8


@pytest.mark.parametrize("name", ["", "etc/\0nul"])
def test_empty_or_nul_file_names_are_rejected(fw: FwCfg, name: str) -> None:
    with pytest.raises(ValueError, match="invalid"):
        fw.add_file(name, b"")


def test_duplicate_file_name_is_rejected(fw: FwCfg) -> None:
    fw.add_file("etc/e820", b"1")
    with pytest.raises(ValueError, match="duplicate"):
        fw.add_file("etc/e820", b"2")
    assert parse_directory(fw) == [(1, 0x20, "etc/e820")]


def test_add_item_adds_arch_local_items_and_replaces_standard_ones(fw: FwCfg) -> None:
    fw.add_item(FW_CFG_ARCH_LOCAL | 3, b"\x01\x02\x03")
    assert read_item(fw, FW_CFG_ARCH_LOCAL | 3, 3) == b"\x01\x02\x03"
    assert read_int(fw, 3, 8) == 128 * MiB  # the same number without the arch bit differs
    fw.add_item(FW_CFG_NB_CPUS, b"\x07\x00")
    assert read_int(fw, FW_CFG_NB_CPUS, 2) == 7


@pytest.mark.parametrize("key", [FW_CFG_FILE_DIR, FW_CFG_FILE_FIRST, 0x3FFF, 0x4001, 0x10000, -1])
def test_add_item_rejects_directory_file_and_invalid_keys(fw: FwCfg, key: int) -> None:
    with pytest.raises(ValueError):
        fw.add_item(key, b"x")


def test_invalid_cpu_counts_are_rejected() -> None:
    with pytest.raises(ValueError):
        FwCfg(ram_size=MiB, cpus=0)
    with pytest.raises(ValueError):
        FwCfg(ram_size=MiB, cpus=4, max_cpus=2)


def test_mapped_on_a_port_bus() -> None:
    fw = FwCfg(ram_size=MiB, cpus=1)
    device: Device = fw
    bus = Bus("port", 0x10000, strict=True)
    bus.register(FW_CFG_PORT, FW_CFG_PORTS, device, "fw_cfg")
    bus.write(0x510, 2, FW_CFG_NB_CPUS)
    assert bus.read(0x511, 1) == 1
    assert bus.read(0x511, 1) == 0
