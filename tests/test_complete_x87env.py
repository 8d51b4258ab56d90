"""fnstenv, fldenv, fnsave and frstor completed by hand (kvmpy/x86/complete.py), on the
fake backend: the SDM's layouts (Vol. 1, 8.1.10), the tag word computed from the
registers, what the FPU keeps of a loaded environment (measured on this host's CPU),
and the faults.  guests/x87env64.S checks the same against the CPU itself."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest

from kvmpy.backends.base import Translation
from kvmpy.memory import GuestMemory
from kvmpy.x86.complete import (
    x87_abridged_tags,
    x87_control_word,
    x87_registers_for_top,
    x87_status_word,
    x87_tag,
    x87_tag_word,
)
from kvmpy.x86.registers import CR0_EM, CR0_TS, Segment, Sregs
from tests.fake_backend import FakeVcpu
from tests.test_complete import RIP, completer, long_mode, protected_mode, vcpu_at

AT = 0x3000
ONE = struct.pack("<QH", 1 << 63, 0x3FFF)
ZERO = bytes(10)
NAN = struct.pack("<QH", 3 << 62, 0x7FFF)
MINUS_INFINITY = struct.pack("<QH", 1 << 63, 0xFFFF)
DENORMAL = struct.pack("<QH", 1, 0)
UNNORMAL = struct.pack("<QH", 1 << 62, 0x4000)
PSEUDO_DENORMAL = struct.pack("<QH", 1 << 63, 0x8000)
PI = struct.pack("<QH", 0xC90FDAA22168C235, 0x4000)
# ST0-ST7 with TOP = 3 (ST(i) is physical register R(i+3)); ST7 (R2) is empty.
REGISTERS = [ONE, ZERO, NAN, MINUS_INFINITY, DENORMAL, UNNORMAL, PSEUDO_DENORMAL, PI]
# The tags by content, R0 up: special, special, empty, valid, zero, special x3.
TAGS = 0xA93A


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory.with_ram(4 << 20) as ram:
        yield ram


def with_x87(vcpu: FakeVcpu, fcw: int = 0x37B, fsw: int = 0x1804, ftwx: int = 0xFB) -> None:
    """KVM's area: TOP 3, ZE set (unmasked: FCW 0x37B), the registers above, pointers
    with bits past what the 32-bit layout holds, x87 in use."""
    area = bytearray(vcpu.xsave)
    struct.pack_into("<HHBxHQQ", area, 0, fcw, fsw, ftwx, 0xF9D9, 0x7_1234_5678, 0x8_9ABC_DEF0)
    for st, register in enumerate(REGISTERS):
        area[32 + 16 * st : 48 + 16 * st] = register + bytes(6)
    area[512] |= 1
    vcpu.xsave = bytes(area)


def x87_words(vcpu: FakeVcpu) -> tuple[int, int, int, int, int, int]:
    """(FCW, FSW, abridged tags, FOP, FIP, FDP) of the vCPU's area."""
    fcw, fsw, ftwx, fop, fip, fdp = struct.unpack_from("<HHBxHQQ", vcpu.xsave, 0)
    return fcw, fsw, ftwx, fop, fip, fdp


def st(vcpu: FakeVcpu, index: int) -> bytes:
    return vcpu.xsave[32 + 16 * index : 42 + 16 * index]


ENVIRONMENT_28 = struct.pack(
    "<HHHHHHIHHIHH", 0x37B, 0xFFFF, 0x9884, 0xFFFF, TAGS, 0xFFFF,
    0x1234_5678, 0, 0x1D9, 0x9ABC_DEF0, 0, 0xFFFF,
)  # fmt: skip
ENVIRONMENT_14 = struct.pack("<7H", 0x37B, 0x9884, TAGS, 0x5678, 0, 0xDEF0, 0)


# -- the tag word ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("register", "tag"),
    [
        (ONE, 0), (ZERO, 1), (NAN, 2), (MINUS_INFINITY, 2), (DENORMAL, 2), (UNNORMAL, 2),
        (PSEUDO_DENORMAL, 2), (struct.pack("<QH", 0, 0x8000), 1),  # -0 is zero
    ],
)  # fmt: skip
def test_tag_by_content(register: bytes, tag: int) -> None:
    assert x87_tag(register) == tag


def test_full_and_abridged_tag_words() -> None:
    fpr = b"".join(register + bytes(6) for register in REGISTERS)
    assert x87_tag_word(0xFB, 3 << 11, fpr) == TAGS
    assert x87_tag_word(0, 0, fpr) == 0xFFFF  # all empty, whatever the contents
    assert x87_abridged_tags(TAGS) == 0xFB
    assert x87_abridged_tags(0x0030) == 0xFB  # only "empty" survives a load


def test_control_and_status_words_as_the_fpu_keeps_them() -> None:
    # Measured on this host's CPU (fldenv, then fnstcw/fnstsw).
    assert [x87_control_word(v) for v in (0x0000, 0xFFFF, 0x1F3F, 0xE0C0)] == [
        0x40, 0x1F7F, 0x1F7F, 0x40,
    ]  # fmt: skip
    assert x87_status_word(0x8081, 0x37F) == 0x0001
    assert x87_status_word(0x0001, 0x37E) == 0x8081
    assert x87_status_word(0x0040, 0x37E) == 0x0040  # SF alone sets no ES
    assert x87_status_word(0x7FFF, 0x37F) == 0x7F7F


def test_a_new_top_keeps_the_physical_registers() -> None:
    fpr = b"".join(bytes([i]) * 16 for i in range(8))  # ST(i) holds i; TOP 3
    rotated = x87_registers_for_top(fpr, 3, 0)  # ST(j) is now R(j): R3 held ST0
    assert rotated[16 * 3 : 16 * 4] == bytes([0]) * 16
    assert x87_registers_for_top(rotated, 0, 3) == fpr


# -- fnstenv and fnsave ------------------------------------------------------------------


def test_fnstenv_stores_28_bytes_then_masks_every_exception(memory: GuestMemory) -> None:
    memory.write(AT, b"\xaa" * 32)
    vcpu = vcpu_at(b"\xd9\x37", rdi=AT)  # fnstenv [rdi]
    with_x87(vcpu, fsw=0x9884)
    done = completer(memory)
    assert done.complete(vcpu)
    assert memory.read(AT, 32) == ENVIRONMENT_28 + b"\xaa" * 4
    fcw, fsw, ftwx, *_ = x87_words(vcpu)
    assert (fcw, fsw, ftwx) == (0x37F, 0x1804, 0xFB)  # ZE kept, ES and B clear
    assert vcpu.regs.rip == RIP + 2 and done.counts == {"fnstenv": 1}


@pytest.mark.parametrize("code", [b"\x66\xd9\x37", b"\x48\xd9\x37"])
def test_the_operand_size_picks_the_layout_and_rex_w_does_not(
    memory: GuestMemory, code: bytes
) -> None:
    memory.write(AT, b"\xaa" * 32)
    vcpu = vcpu_at(code, rdi=AT)
    with_x87(vcpu, fsw=0x9884)
    assert completer(memory).complete(vcpu)
    if code[0] == 0x66:  # 14 bytes, 16-bit offsets, no opcode
        assert memory.read(AT, 16) == ENVIRONMENT_14 + b"\xaa" * 2
    else:
        assert memory.read(AT, 28) == ENVIRONMENT_28


def test_a_16_bit_code_segment_defaults_to_14_bytes(memory: GuestMemory) -> None:
    sregs = protected_mode()
    sregs.cs = Segment(selector=0x08, type=0xB, db=0, limit=0xFFFF)
    vcpu = vcpu_at(b"\xd9\x35", sregs, rdi=AT)  # fnstenv [di]
    with_x87(vcpu, fsw=0x9884)
    assert completer(memory).complete(vcpu)
    assert memory.read(AT, 14) == ENVIRONMENT_14 and memory.read(AT + 14, 2) == bytes(2)
    vcpu = vcpu_at(b"\x66\xd9\x35", sregs, rdi=AT)  # and 0x66 gives 28
    with_x87(vcpu, fsw=0x9884)
    assert completer(memory).complete(vcpu)
    assert memory.read(AT, 28) == ENVIRONMENT_28


def test_fnsave_stores_st0_to_st7_then_initialises(memory: GuestMemory) -> None:
    vcpu = vcpu_at(b"\xdd\x37", rdi=AT)  # fnsave [rdi]
    with_x87(vcpu, fsw=0x9884)
    assert completer(memory).complete(vcpu)
    assert memory.read(AT, 108) == ENVIRONMENT_28 + b"".join(REGISTERS)
    assert x87_words(vcpu) == (0x37F, 0, 0, 0, 0, 0)
    # TOP is 0 now: ST(i) is R(i), and R3 still holds what was ST0.
    assert st(vcpu, 3) == ONE and st(vcpu, 0) == UNNORMAL
    assert vcpu.xsave[24:28] == (0x1F80).to_bytes(4, "little")  # MXCSR untouched


def test_x87_not_in_use_is_its_initial_state(memory: GuestMemory) -> None:
    vcpu = vcpu_at(b"\xdd\x37", rdi=AT)
    area = bytearray(vcpu.xsave)
    area[0:2] = b"\x12\x34"  # stale bytes, XSTATE_BV's x87 bit clear
    vcpu.xsave = bytes(area)
    assert completer(memory).complete(vcpu)
    assert memory.read(AT, 14) == struct.pack(
        "<HHHHHHH", 0x37F, 0xFFFF, 0, 0xFFFF, 0xFFFF, 0xFFFF, 0
    )
    assert vcpu.xsave[512] & 1


# -- frstor and fldenv -------------------------------------------------------------------


def test_frstor_loads_the_image_as_the_fpu_keeps_it(memory: GuestMemory) -> None:
    image = struct.pack(
        "<HHHHHHIHHIHH", 0xFFBF, 0xFFFF, 0x1804, 0xFFFF, 0x0030, 0xFFFF,
        0x1234_5678, 0x0ABC, 0xF9D9, 0x9ABC_DEF0, 0x0DEF, 0xFFFF,
    )  # fmt: skip
    memory.write(AT, image + b"".join(REGISTERS))
    vcpu = vcpu_at(b"\xdd\x27", rdi=AT)  # frstor [rdi]
    assert completer(memory).complete(vcpu)
    # FCW: reserved bits dropped, bit 6 set; all masked, so no ES; FOP 11 bits.
    assert x87_words(vcpu) == (0x1F7F, 0x1804, 0xFB, 0x1D9, 0x1234_5678, 0x9ABC_DEF0)
    assert [st(vcpu, i) for i in range(8)] == REGISTERS
    assert vcpu.xsave[512] & 1


def test_fldenv_16_bit_clears_the_opcode_and_keeps_the_registers(memory: GuestMemory) -> None:
    memory.write(AT, struct.pack("<7H", 0x37B, 0x2004, 0x0000, 0x5678, 0x0ABC, 0xDEF0, 0x0DEF))
    vcpu = vcpu_at(b"\x66\xd9\x27", rdi=AT)  # fldenv [rdi], 16-bit
    with_x87(vcpu)
    assert completer(memory).complete(vcpu)
    # ZE unmasked: ES and B.  TOP 4: ST(i) moved down by one, R3 is ST7 now.
    assert x87_words(vcpu) == (0x37B, 0xA084, 0xFF, 0, 0x5678, 0xDEF0)
    assert st(vcpu, 7) == ONE and st(vcpu, 0) == ZERO
    assert vcpu.regs.rip == RIP + 3


# -- faults ------------------------------------------------------------------------------


@pytest.mark.parametrize("cr0", [CR0_TS, CR0_EM])
@pytest.mark.parametrize("code", [b"\xd9\x37", b"\xd9\x27", b"\xdd\x37", b"\xdd\x27"])
def test_cr0_em_or_ts_is_a_device_not_available_fault(
    memory: GuestMemory, code: bytes, cr0: int
) -> None:
    sregs = long_mode()
    sregs.cr0 |= cr0
    vcpu = vcpu_at(code, sregs, rdi=AT)
    assert completer(memory).complete(vcpu)
    assert (vcpu.injected, vcpu.regs.rip) == ([("exception", 7, None)], RIP)


def test_a_store_across_a_missing_page_faults_before_writing(memory: GuestMemory) -> None:
    vcpu = vcpu_at(b"\xdd\x37", rdi=0x4FC0)  # fnsave: 64 bytes, then page 0x5000
    vcpu.pages[0x5000] = None
    with_x87(vcpu)
    before = vcpu.xsave
    assert completer(memory).complete(vcpu)
    assert vcpu.injected == [("exception", 14, 0b010)] and vcpu.sregs.cr2 == 0x5000
    assert memory.read(0x4FC0, 64) == bytes(64) and vcpu.xsave == before  # not initialised
    vcpu = vcpu_at(b"\xdd\x27", rdi=0x4FC0)  # frstor: a read fault, nothing loaded
    vcpu.pages[0x5000] = None
    with_x87(vcpu)
    before = vcpu.xsave
    assert completer(memory).complete(vcpu)
    assert vcpu.injected == [("exception", 14, 0)] and vcpu.xsave == before


def test_a_read_only_page_with_cr0_wp(memory: GuestMemory) -> None:
    sregs = long_mode()
    sregs.cr0 |= 1 << 16
    vcpu = vcpu_at(b"\xd9\x37", sregs, rdi=0x5000)
    vcpu.pages[0x5000] = Translation(0x5000, False, False)
    assert completer(memory).complete(vcpu)
    assert vcpu.injected == [("exception", 14, 0b011)]


def test_the_segment_limit_covers_the_whole_image(memory: GuestMemory) -> None:
    sregs: Sregs = protected_mode()
    sregs.ds = Segment(selector=0x10, type=0x3, db=1, limit=0x3FFF)
    vcpu = vcpu_at(b"\xdd\x37", sregs, rdi=0x4000 - 100)  # 108 bytes: past the limit
    assert completer(memory).complete(vcpu)
    assert vcpu.injected == [("exception", 13, 0)]
    vcpu = vcpu_at(b"\xdd\x37", sregs, rdi=0x4000 - 108)  # just fits
    assert completer(memory).complete(vcpu)
    assert vcpu.injected == []
    vcpu = vcpu_at(b"\xd9\x37", rdi=0x7FFF_FFFF_FFF0)  # 64-bit: past the canonical end
    assert completer(memory).complete(vcpu)
    assert vcpu.injected == [("exception", 13, 0)]


def test_the_wait_forms_wait_first(memory: GuestMemory) -> None:
    """fstenv is `wait` + fnstenv: the backend stops on the wait, which raises #MF for a
    pending unmasked exception (CR0.NE); the fn form itself never does."""
    sregs = long_mode()
    sregs.cr0 |= 1 << 5  # NE
    vcpu = vcpu_at(b"\x9b\xd9\x37", sregs, rdi=AT)
    with_x87(vcpu, fsw=0x9884)
    done = completer(memory)
    assert done.complete(vcpu)
    assert (vcpu.injected, vcpu.regs.rip) == ([("exception", 16, None)], RIP)
    vcpu = vcpu_at(b"\xd9\x37", sregs, rdi=AT)
    with_x87(vcpu, fsw=0x9884)
    assert done.complete(vcpu)
    assert vcpu.injected == [] and memory.read(AT + 4, 2) == b"\x84\x98"  # ES stored
    assert done.counts == {"wait": 1, "fnstenv": 1}
