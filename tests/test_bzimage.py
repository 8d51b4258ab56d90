"""Linux boot protocol (bzImage): the setup header, the zero page, the initrd, the entry."""

from __future__ import annotations

import gzip
import random
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kvmpy.loaders import LoaderError, LoadPlan
from kvmpy.loaders.bzimage import (
    CMDLINE_ADDR,
    E820_ENTRIES,
    E820_TABLE,
    HEAP_END,
    ZERO_PAGE_ADDR,
    kernel_placement,
    load_bzimage,
    parse_setup_header,
)
from kvmpy.loaders.detect import detect_format, load_image
from kvmpy.loaders.multiboot import memory_map

MIB = 1 << 20
RAM_128M = [(0, 128 * MIB)]
E820 = memory_map(RAM_128M)


def make_bzimage(
    payload: bytes = b"\xf4" * 0x1000,
    *,
    setup_sects: int = 1,
    version: int = 0x20F,
    loadflags: int = 0x01,
    relocatable: int = 1,
    kernel_alignment: int = 0x200000,
    xloadflags: int = 0x03,
    cmdline_size: int = 255,
    pref_address: int = 0x1000000,
    init_size: int = 0x400000,
    initrd_addr_max: int = 0x7FFFFFFF,
    header_end: int = 0x268,
) -> bytes:
    """A bzImage: ``setup_sects`` + 1 sectors of setup with a header, then ``payload``."""
    sects = setup_sects or 4
    image = bytearray((sects + 1) * 512)
    image[0x1F1] = setup_sects
    struct.pack_into("<H", image, 0x1FE, 0xAA55)
    image[0x200:0x202] = bytes([0xEB, header_end - 0x202])
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", image, 0x206, version)
    image[0x211] = loadflags
    struct.pack_into("<I", image, 0x214, 0x100000)
    struct.pack_into("<I", image, 0x22C, initrd_addr_max)
    struct.pack_into("<I", image, 0x230, kernel_alignment)
    image[0x234] = relocatable
    struct.pack_into("<H", image, 0x236, xloadflags)
    struct.pack_into("<I", image, 0x238, cmdline_size)
    struct.pack_into("<Q", image, 0x258, pref_address)
    struct.pack_into("<I", image, 0x260, init_size)
    return bytes(image) + payload


def write(tmp_path: Path, data: bytes, name: str = "vmlinuz") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def footprint(image: bytes, e820: list[tuple[int, int, int]] = E820) -> tuple[int, int]:
    """Where the kernel loads, and the end of the init_size bytes it decompresses into."""
    return kernel_placement(parse_setup_header(image), e820, "test")


def zero_page(plan: LoadPlan) -> bytes:
    return next(s.data for s in plan.segments if s.gpa == ZERO_PAGE_ADDR)


def test_detected_by_its_header_whatever_the_name(tmp_path: Path) -> None:
    # memtest86+'s image is memtest86+x64.bin: the header beats the .bin rule.
    assert detect_format(write(tmp_path, make_bzimage(), "memtest86+x64.bin")) == "bzimage"
    assert detect_format(write(tmp_path, make_bzimage(), "vmlinuz")) == "bzimage"


def test_a_64bit_kernel_goes_to_pref_address_and_enters_in_long_mode(tmp_path: Path) -> None:
    payload = bytes(range(256)) * 16
    plan = load_bzimage(write(tmp_path, make_bzimage(payload)), e820=E820, cmdline="quiet")
    assert plan.mode == "long"
    assert plan.entry == 0x1000000 + 0x200
    assert plan.registers == {"rsi": ZERO_PAGE_ADDR}
    kernel = next(s for s in plan.segments if s.gpa == 0x1000000)
    assert kernel.data == payload  # the setup sectors are not loaded
    assert footprint(make_bzimage(payload)) == (0x1000000, 0x1000000 + 0x400000)


def test_a_kernel_without_xlf_kernel_64_enters_in_protected_mode(tmp_path: Path) -> None:
    plan = load_bzimage(write(tmp_path, make_bzimage(xloadflags=0)), e820=E820)
    assert (plan.mode, plan.entry, plan.registers) == ("protected", 0x1000000, {"rsi": 0x7000})
    # Before protocol 2.12 xloadflags does not exist: the 32-bit entry, whatever it holds.
    plan = load_bzimage(write(tmp_path, make_bzimage(version=0x20A)), e820=E820)
    assert plan.mode == "protected"


def test_a_non_relocatable_kernel_loads_at_1_mib(tmp_path: Path) -> None:
    image = make_bzimage(relocatable=0, pref_address=0x100000, kernel_alignment=0x1000)
    plan = load_bzimage(write(tmp_path, image), e820=E820)
    assert plan.entry == 0x100000 + 0x200
    assert footprint(image) == (0x100000, 0x100000 + 0x400000)


def test_without_room_at_pref_address_it_loads_at_1_mib(tmp_path: Path) -> None:
    e820 = memory_map([(0, 16 * MIB)])
    plan = load_bzimage(write(tmp_path, make_bzimage()), e820=e820)
    assert plan.entry == 0x100000 + 0x200
    # It decompresses at 2 MiB, kernel_alignment above the load address.
    assert footprint(make_bzimage(), e820) == (0x100000, 0x200000 + 0x400000)


def test_setup_sects_zero_means_four(tmp_path: Path) -> None:
    payload = b"\x90" * 0x800
    image = make_bzimage(payload, setup_sects=0)
    assert parse_setup_header(image).setup_size == 5 * 512
    plan = load_bzimage(write(tmp_path, image), e820=E820)
    assert next(s for s in plan.segments if s.gpa == 0x1000000).data == payload


def test_zero_page(tmp_path: Path) -> None:
    plan = load_bzimage(
        write(tmp_path, make_bzimage()), e820=E820, cmdline="console=ttyS0", rsdp=0xE0000
    )
    page = zero_page(plan)
    image = make_bzimage()
    # The setup header is copied from the image, then the loader's fields are set.
    assert page[0x202:0x206] == b"HdrS"
    assert page[0x230:0x268] == image[0x230:0x268]
    assert page[0x210] == 0xFF  # type_of_loader: undefined
    assert page[0x211] == 0x01 | 0x80  # LOADED_HIGH from the image, CAN_USE_HEAP
    assert struct.unpack_from("<H", page, 0x224)[0] == HEAP_END
    assert struct.unpack_from("<I", page, 0x228)[0] == CMDLINE_ADDR
    assert struct.unpack_from("<Q", page, 0x070)[0] == 0xE0000  # acpi_rsdp_addr (2.14+)
    assert page[E820_ENTRIES] == len(E820)
    table = [struct.unpack_from("<QQI", page, E820_TABLE + 20 * i) for i in range(len(E820))]
    assert table == sorted(E820)
    cmdline = next(s.data for s in plan.segments if s.gpa == CMDLINE_ADDR)
    assert cmdline == b"console=ttyS0\0"
    assert struct.unpack_from("<II", page, 0x218) == (0, 0)  # no initrd


def test_the_e820_map_comes_from_the_caller(tmp_path: Path) -> None:
    e820 = [(0, 0x9F000, 1), (0x9F000, 0x1000, 2), (0x100000, 63 * MIB, 1), (64 * MIB, MIB, 4)]
    page = zero_page(load_bzimage(write(tmp_path, make_bzimage()), e820=e820))
    assert page[E820_ENTRIES] == 4
    assert struct.unpack_from("<QQI", page, E820_TABLE + 60) == (64 * MIB, MIB, 4)


def test_the_initrd_goes_high_page_aligned_below_initrd_addr_max(tmp_path: Path) -> None:
    initrd = write(tmp_path, b"\x07" * 5000, "initrd.cpio")
    kernel = write(tmp_path, make_bzimage(initrd_addr_max=0x37FFFFF))
    plan = load_bzimage(kernel, e820=E820, initrd=initrd)
    start, size = struct.unpack_from("<II", zero_page(plan), 0x218)
    assert size == 5000
    assert start % 0x1000 == 0
    assert start + size <= 0x3800000
    assert start >= 0x3800000 - 0x2000  # as high as it goes
    assert next(s.data for s in plan.segments if s.gpa == start) == b"\x07" * 5000
    # Without a limit it goes to the top of RAM.
    plan = load_bzimage(write(tmp_path, make_bzimage()), e820=E820, initrd=initrd)
    start, _ = struct.unpack_from("<II", zero_page(plan), 0x218)
    assert start == 128 * MIB - 0x2000


def test_an_initrd_that_does_not_fit_above_the_kernel_is_refused(tmp_path: Path) -> None:
    initrd = write(tmp_path, b"\x07" * (8 * MIB), "initrd.cpio")
    # initrd_addr_max inside the kernel's init_size footprint: no room.
    kernel = write(tmp_path, make_bzimage(initrd_addr_max=0x13FFFFF))
    with pytest.raises(LoaderError, match="no room for the 0x800000-byte initrd"):
        load_bzimage(kernel, e820=E820, initrd=initrd)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"version": 0x205}, "boot protocol version 2.05"),
        ({"loadflags": 0}, "loadflags 0x00 lack LOADED_HIGH"),
        ({"kernel_alignment": 0x3000}, "kernel_alignment 0x3000"),
        ({"kernel_alignment": 0}, "kernel_alignment 0x0"),
        ({"cmdline_size": 0}, "cmdline_size is 0"),
        ({"init_size": 0x10}, "init_size 0x10 is smaller"),
        ({"pref_address": 0x1100000}, "pref_address 0x1100000 is not a multiple"),
        ({"pref_address": 0x1000, "kernel_alignment": 0x1000}, "pref_address 0x1000 with"),
        ({"header_end": 0x2FF}, "jump at 0x200"),
    ],
)
def test_bad_fields_are_named(tmp_path: Path, fields: dict[str, Any], message: str) -> None:
    kernel = write(tmp_path, make_bzimage(**fields))
    with pytest.raises(LoaderError, match=message):
        load_bzimage(kernel, e820=E820)


def test_bad_boot_flag_and_truncated_images(tmp_path: Path) -> None:
    image = bytearray(make_bzimage())
    image[0x1FE] = 0
    with pytest.raises(LoaderError, match="boot_flag is 0xaa00"):
        load_bzimage(write(tmp_path, bytes(image)), e820=E820)
    with pytest.raises(LoaderError, match="setup_sects 1 leaves no protected-mode code"):
        load_bzimage(write(tmp_path, make_bzimage(b"")), e820=E820)
    with pytest.raises(LoaderError, match="too short for a Linux setup header"):
        load_bzimage(write(tmp_path, make_bzimage()[:0x250]), e820=E820)


def test_the_command_line_is_checked_against_cmdline_size(tmp_path: Path) -> None:
    kernel = write(tmp_path, make_bzimage(cmdline_size=10))
    load_bzimage(kernel, e820=E820, cmdline="x" * 10)
    with pytest.raises(LoaderError, match="command line is 11 bytes; the kernel's cmdline_size"):
        load_bzimage(kernel, e820=E820, cmdline="x" * 11)
    with pytest.raises(LoaderError, match="NUL byte"):
        load_bzimage(kernel, e820=E820, cmdline="a\0b")


def test_too_little_ram_for_init_size_is_refused(tmp_path: Path) -> None:
    kernel = write(tmp_path, make_bzimage(init_size=0x3000000))
    with pytest.raises(LoaderError, match="init_size 0x3000000 bytes of RAM"):
        load_bzimage(kernel, e820=memory_map([(0, 32 * MIB)]), cmdline="")


def test_bad_e820_maps_are_refused(tmp_path: Path) -> None:
    kernel = write(tmp_path, make_bzimage())
    with pytest.raises(LoaderError, match="e820 memory map is empty"):
        load_bzimage(kernel, e820=[])
    with pytest.raises(LoaderError, match="overlap"):
        load_bzimage(kernel, e820=[(0, 64 * MIB, 1), (MIB, MIB, 2)])
    with pytest.raises(LoaderError, match="129 entries"):
        load_bzimage(kernel, e820=[(i * 0x1000, 0x1000, 1) for i in range(129)])


def test_load_image_passes_initrd_and_refuses_it_for_flat_images(tmp_path: Path) -> None:
    initrd = write(tmp_path, b"rd", "initrd")
    plan = load_image(
        write(tmp_path, make_bzimage()), ram=RAM_128M, load_addr=0, initrd=initrd, cmdline="a"
    )
    assert struct.unpack_from("<I", zero_page(plan), 0x21C)[0] == 2
    flat = write(tmp_path, b"\xf4", "code.bin")
    with pytest.raises(LoaderError, match="an initrd needs a bzImage, PVH or multiboot kernel"):
        load_image(flat, ram=RAM_128M, load_addr=0x7C00, initrd=initrd)


# -- booting: the CPU state at each entry ---------------------------------------------------

DEBUG_EXIT = 0xF4


def assemble_payload(tmp_path: Path, source: str, bits: int) -> bytes:
    """Position-independent code assembled to raw bytes."""
    src, obj, raw = tmp_path / "p.S", tmp_path / "p.o", tmp_path / "p.raw"
    src.write_text(f".code{bits}\n{source}\n")
    subprocess.run(["as", "--64" if bits == 64 else "--32", "-o", str(obj), str(src)], check=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(obj), str(raw)], check=True)
    return raw.read_bytes()


# Checks what the protocol promises at entry; exits with 0x21 when all hold, 1 otherwise.
CHECK_ZERO_PAGE = """
    cmpb $0xff, 0x210(%esi)        # type_of_loader
    jne 1f
    cmpl $0x53726448, 0x202(%esi)  # "HdrS"
    jne 1f
    movl 0x228(%esi), %ebx         # cmd_line_ptr -> "ok"
    cmpw $0x6b6f, (%{bx})
    jne 1f
    mov %cs, %ax
    cmp $0x10, %ax                 # __BOOT_CS
    jne 1f
    mov %ds, %ax
    cmp $0x18, %ax                 # __BOOT_DS
    jne 1f
    mov $0x21, %al
    jmp 2f
1:  mov $1, %al
2:  out %al, ${port}
    hlt
""".replace("{port}", f"{DEBUG_EXIT:#x}")


@pytest.mark.kvm
def test_64bit_entry_in_long_mode_with_rsi_at_the_zero_page(tmp_path: Path) -> None:
    from kvmpy.machine import Machine

    code = assemble_payload(
        tmp_path,
        "mov %cr0, %rax\nbt $31, %eax\njnc 1f\n"
        + CHECK_ZERO_PAGE.replace("%esi", "%rsi").replace("{bx}", "rbx"),
        64,
    )
    payload = b"\xf4" * 0x200 + code  # the 64-bit entry is at +0x200
    with Machine(mem_size=64 * MIB, cmdline="ok") as m:
        m.boot(write(tmp_path, make_bzimage(payload)))
        outcome = m.run(timeout=20)
    assert outcome.exit_code == 0x21, outcome.message


@pytest.mark.kvm
def test_32bit_entry_in_flat_protected_mode_with_esi_at_the_zero_page(tmp_path: Path) -> None:
    from kvmpy.machine import Machine

    code = assemble_payload(
        tmp_path,
        "mov %cr0, %eax\nbt $31, %eax\njc 1f\n" + CHECK_ZERO_PAGE.replace("{bx}", "ebx"),
        32,
    )
    with Machine(mem_size=64 * MIB, cmdline="ok") as m:
        m.boot(write(tmp_path, make_bzimage(code, xloadflags=0)))
        outcome = m.run(timeout=20)
    assert outcome.exit_code == 0x21, outcome.message


# -- host-side decompression: the payload's vmlinux, placed as its decompressor would ------

KERNEL_VIRT = 0xFFFFFFFF80000000
DATA_ADDR = 0x1200000


def vmlinux(code: bytes, *, text_at: int = 0x1000000, data_at: int = DATA_ADDR) -> bytes:
    """An ELF64 like Linux's vmlinux: PT_LOADs linked high, physical addresses in p_paddr,
    e_entry the physical address of the first byte of text."""
    data = b"data" * 4
    ehdr = (
        b"\x7fELF\x02\x01\x01"
        + bytes(9)
        + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, text_at, 64, 0, 0, 64, 56, 2, 64, 0, 0)
    )
    text_off, data_off = 0x1000, 0x1000 + len(code)
    phdrs = struct.pack(
        "<IIQQQQQQ", 1, 5, text_off, KERNEL_VIRT + text_at, text_at, len(code), len(code), 0x1000
    ) + struct.pack(
        "<IIQQQQQQ", 1, 6, data_off, KERNEL_VIRT + data_at, data_at, len(data), 0x1000, 0x1000
    )
    head = ehdr + phdrs
    return head + bytes(text_off - len(head)) + code + data


def compressed_bzimage(kernel: bytes, **fields: Any) -> bytes:
    """A bzImage whose payload is ``kernel`` gzipped (its own size footer), 0x40 bytes into
    the protected-mode part, behind a stand-in for the decompressor."""
    packed = gzip.compress(kernel, mtime=0)
    image = bytearray(make_bzimage(b"\xf4" * 0x40 + packed, **fields))
    struct.pack_into("<II", image, 0x248, 0x40, len(packed))
    return bytes(image)


def test_a_compressed_kernel_is_decompressed_and_placed_by_its_program_headers(
    tmp_path: Path,
) -> None:
    code = b"\xf4" * 0x300
    image = compressed_bzimage(vmlinux(code), loadflags=0x03)  # with KASLR_FLAG set
    plan = load_bzimage(write(tmp_path, image), e820=E820, cmdline="quiet")
    assert (plan.mode, plan.entry, plan.registers) == ("long", 0x1000000, {"rsi": ZERO_PAGE_ADDR})
    text = next(s for s in plan.segments if s.gpa == 0x1000000)
    data = next(s for s in plan.segments if s.gpa == DATA_ADDR)
    assert (text.data, text.memsz) == (code, len(code))
    assert (data.data, data.memsz) == (b"data" * 4, 0x1000)
    # KASLR_FLAG is the decompressor's note to the kernel: it did not randomise.
    assert zero_page(plan)[0x211] == 0x01 | 0x80


def test_host_decompression_can_be_turned_off(tmp_path: Path) -> None:
    image = compressed_bzimage(vmlinux(b"\xf4"))
    plan = load_bzimage(write(tmp_path, image), e820=E820, host_decompress=False)
    assert plan.entry == 0x1000000 + 0x200
    assert next(s for s in plan.segments if s.gpa == 0x1000000).data == image[1024:]


@pytest.mark.parametrize(
    ("kernel", "fields", "why"),
    [
        (vmlinux(b"\xf4", text_at=0x1200000, data_at=0x1300000), {}, "not at pref_address"),
        (vmlinux(b"\xf4", data_at=0x1400000), {}, "past init_size"),
        (vmlinux(b"\xf4"), {"xloadflags": 0}, "a 32-bit entry only"),
        (b"\x7fELF" + bytes(60), {}, "not a valid ELF"),
    ],
)
def test_a_kernel_the_host_cannot_place_decompresses_itself(
    tmp_path: Path, kernel: bytes, fields: dict[str, Any], why: str
) -> None:
    image = compressed_bzimage(kernel, init_size=0x400000, **fields)
    plan = load_bzimage(write(tmp_path, image), e820=E820)
    assert plan.entry in (0x1000000, 0x1000000 + 0x200), why
    assert next(s for s in plan.segments if s.gpa == 0x1000000).data == image[1024:], why


def test_a_payload_the_host_cannot_decompress_is_left_to_the_kernel(tmp_path: Path) -> None:
    image = bytearray(compressed_bzimage(vmlinux(b"\xf4")))
    pm = 1024
    image[pm + 0x40 : pm + 0x44] = b"\x28\xb5\x2f\xfd"  # zstd's magic
    plan = load_bzimage(write(tmp_path, bytes(image)), e820=E820)
    assert plan.entry == 0x1000000 + 0x200
    struct.pack_into("<I", image, 0x24C, 1 << 30)  # payload_length past the file
    plan = load_bzimage(write(tmp_path, bytes(image)), e820=E820)
    assert plan.entry == 0x1000000 + 0x200


@pytest.mark.kvm
def test_a_host_decompressed_kernel_starts_in_long_mode_with_rsi_at_the_zero_page(
    tmp_path: Path,
) -> None:
    from kvmpy.machine import Machine

    code = assemble_payload(
        tmp_path,
        "mov %cr0, %rax\nbt $31, %eax\njnc 1f\n"
        + CHECK_ZERO_PAGE.replace("%esi", "%rsi").replace("{bx}", "rbx"),
        64,
    )
    with Machine(mem_size=64 * MIB, cmdline="ok") as m:
        m.boot(write(tmp_path, compressed_bzimage(vmlinux(code))))
        assert m.vcpu.get_regs().rip == 0x1000000
        outcome = m.run(timeout=20)
    assert outcome.exit_code == 0x21, outcome.message


def test_run_says_who_decompressed_and_can_leave_it_to_the_kernel(tmp_path: Path) -> None:
    # Text that does not compress: the protected-mode part reaches past its 64-bit entry.
    image = write(
        tmp_path, compressed_bzimage(vmlinux(b"\xf4" + random.Random(1).randbytes(0x400)))
    )
    assert "kernel decompressed by kvmpy" in load_bzimage(image, e820=E820).detail
    verbose = run_cli("-v", "--timeout", "5", image)
    assert (
        f"kvmpy: {image}: bzimage image, long mode, loaded at 0x1000000, entry 0x1000000; "
        "kernel decompressed by kvmpy, at its link address (no KASLR)"
    ) in verbose.stderr
    itself = run_cli("-v", "--decompress", "guest", "--timeout", "5", image)
    assert f"kvmpy: {image}: bzimage image, long mode, loaded at 0x1000000, entry 0x1000200\n" in (
        itself.stderr
    )


# -- detection: a header or an explicit choice, never a guess -----------------------------


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvmpy", "run", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_headerless_file_is_not_run_as_code(tmp_path: Path) -> None:
    image = write(tmp_path, b"\xf4" * 64, "kernel.img")
    with pytest.raises(LoaderError, match="no multiboot header, not ELF, no Linux boot header"):
        detect_format(image)
    result = run_cli(image, "--timeout", "5")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"kvmpy: error: {image}: no multiboot header, not ELF, no Linux boot header: "
        "pass --format flat to run it as raw code"
    )


def test_a_multiboot_magic_with_a_bad_checksum_is_mentioned(tmp_path: Path) -> None:
    image = write(tmp_path, bytes(16) + struct.pack("<III", 0x1BADB002, 0, 0), "kernel")
    with pytest.raises(LoaderError, match="multiboot magic at offset 0x10 has a bad checksum"):
        detect_format(image)


@pytest.mark.kvm
def test_flat_by_name_or_by_choice(tmp_path: Path) -> None:
    assert detect_format(write(tmp_path, b"\xf4", "guest.BIN")) == "flat"
    image = write(tmp_path, b"\xb0\x00\xe6\xf4", "guest.raw")  # mov al, 0; out 0xf4, al
    assert run_cli(image, "--format", "flat", "--timeout", "20").returncode == 1
