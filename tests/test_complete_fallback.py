"""The general fallback (kvmpy/x86/fallback.py): one instruction on the CPU emulator.

A fake vCPU "fails" on an SSE or x87 instruction; the completer hands it to
the Unicorn stepper, which runs it on guest RAM through real page tables
built here.  Checked: results and what is written back (registers, the XSAVE
area and XSTATE_BV, memory), the faults raised into the guest, and the
refusals that keep the crash report.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest

from kvmpy.backends.exits import ExitKind
from kvmpy.memory import GuestMemory
from kvmpy.x86.complete import Completer, fpu_from_xsave, xsave_with_fpu
from kvmpy.x86.registers import CR0_PE, CR0_PG, CR0_TS, EFER_LMA, EFER_LME, Fpu, Segment, Sregs
from tests.fake_backend import FakeVcpu, Step

pytest.importorskip("unicorn", reason="the fallback runs on the CPU emulator (kvmpy[soft])")

RIP = 0x100000
DATA = 0x180000
PML4, PDPT, PD = 0x10000, 0x11000, 0x12000
UNMAPPED = 0x40000000  # past the one PD: not present
CR4_PAE, CR4_OSFXSR = 1 << 5, 1 << 9
ONE = 0x3FFF8000000000000000  # 1.0 as an 80-bit value (exponent 0x3FFF, integer bit)


def long_mode() -> Sregs:
    cs = Segment(selector=0x10, type=0xB, dpl=0, l=1, limit=0xFFFFFFFF, g=1)
    data = Segment(selector=0x18, type=0x3, dpl=0, db=1, limit=0xFFFFFFFF, g=1)
    sregs = Sregs(cs=cs, ds=data, es=data, ss=data, fs=data, gs=data)
    sregs.cr0 = CR0_PE | CR0_PG | 0x20  # NE
    sregs.cr3 = PML4
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | 1 << 10
    sregs.efer = EFER_LME | EFER_LMA
    return sregs


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory.with_ram(4 << 20) as ram:
        # Identity-map the first 2 MiB... and 1 GiB: 2 MiB pages, all writeable.
        ram.write(PML4, struct.pack("<Q", PDPT | 3))
        ram.write(PDPT, struct.pack("<Q", PD | 3))
        ram.write(PD, b"".join(struct.pack("<Q", i << 21 | 0x83) for i in range(2)))
        yield ram


def machine(
    memory: GuestMemory, code: bytes, done: Completer | None = None, **regs: int
) -> tuple[Completer, FakeVcpu]:
    """A completer (new, or ``done``) and a vCPU stopped on ``code``, in long mode."""
    if done is None:
        done = Completer()
        done.memory = memory
    memory.write(RIP, code)
    vcpu = FakeVcpu(0, [Step(ExitKind.INTERNAL_ERROR, code=code)])
    vcpu.run()
    vcpu.sregs = long_mode()
    vcpu.regs.rip = RIP
    vcpu.regs.rflags = 2
    for name, value in regs.items():
        setattr(vcpu.regs, name, value)
    vcpu.pages[UNMAPPED] = None
    return done, vcpu


def xmm(vcpu: FakeVcpu, index: int) -> int:
    return int.from_bytes(fpu_from_xsave(vcpu.xsave).xmm[16 * index : 16 * index + 16], "little")


def xstate_bv(vcpu: FakeVcpu) -> int:
    return vcpu.xsave[512]


def test_movd_xmm15_ecx_the_instruction_that_stopped_debian(memory: GuestMemory) -> None:
    done, vcpu = machine(memory, bytes.fromhex("66440f6ef9"), rcx=0xFFFF_FFFF_1234_5678)
    assert done.complete(vcpu)
    assert xmm(vcpu, 15) == 0x1234_5678
    assert xstate_bv(vcpu) & 2  # SSE now in use, so KVM's XRSTOR loads it
    assert vcpu.regs.rip == RIP + 5
    assert done.counts == {"movd (emulator)": 1}
    assert vcpu.injected == []


def test_x87_fld_from_memory_through_paging_and_the_stack(memory: GuestMemory) -> None:
    memory.write(DATA, struct.pack("<f", 2.5))
    done, vcpu = machine(memory, bytes.fromhex("d90425") + struct.pack("<I", DATA))  # fld [DATA]
    assert done.complete(vcpu)
    fpu = fpu_from_xsave(vcpu.xsave)
    assert (fpu.fsw >> 11) & 7 == 7  # TOP went from 0 to 7
    assert fpu.ftwx == 0x80  # physical register 7 holds ST0
    exponent = int.from_bytes(fpu.fpr[8:10], "little")
    mantissa = int.from_bytes(fpu.fpr[0:8], "little")
    assert (exponent, mantissa) == (0x4000, 0xA000_0000_0000_0000)  # 2.5
    assert xstate_bv(vcpu) & 1
    assert vcpu.regs.rip == RIP + 7


def test_x87_arithmetic_uses_the_stack_it_was_given(memory: GuestMemory) -> None:
    """ST0 = 1.0, ST1 = 1.0 (TOP = 6); faddp gives 2.0 in ST0 with TOP = 7."""
    done, vcpu = machine(memory, bytes.fromhex("dec1"))  # faddp st(1), st
    one = ONE.to_bytes(10, "little") + bytes(6)
    vcpu.xsave = xsave_with_fpu(vcpu.xsave, Fpu(fsw=6 << 11, ftwx=0xC0, fpr=one + one + bytes(96)))
    assert done.complete(vcpu)
    fpu = fpu_from_xsave(vcpu.xsave)
    assert ((fpu.fsw >> 11) & 7, fpu.ftwx) == (7, 0x80)
    assert int.from_bytes(fpu.fpr[0:10], "little") == 0x4000_8000_0000_0000_0000


def test_a_store_writes_guest_ram_in_place(memory: GuestMemory) -> None:
    done, vcpu = machine(memory, bytes.fromhex("660fd60425") + struct.pack("<I", DATA))
    area = bytearray(vcpu.xsave)
    area[160:176] = (0x1122_3344_5566_7788).to_bytes(16, "little")
    area[512] |= 2
    vcpu.xsave = bytes(area)
    assert done.complete(vcpu)  # movq [DATA], xmm0
    assert memory.read(DATA, 8) == (0x1122_3344_5566_7788).to_bytes(8, "little")
    assert vcpu.regs.rip == RIP + 9


def test_sse_not_in_use_reads_as_zero_whatever_the_bytes(memory: GuestMemory) -> None:
    """XSTATE_BV bit 1 clear: XMM is in its initial state, zero, even if stale bytes remain."""
    done, vcpu = machine(memory, bytes.fromhex("660f7ec0"))  # movd eax, xmm0
    area = bytearray(vcpu.xsave)
    area[160:176] = b"\xff" * 16
    vcpu.xsave = bytes(area)
    vcpu.regs.rax = 0x5555
    assert done.complete(vcpu)
    assert vcpu.regs.rax == 0
    assert xstate_bv(vcpu) == 0  # nothing changed, nothing written back


def test_a_not_present_page_is_a_page_fault_with_kvmpys_error_code(memory: GuestMemory) -> None:
    done, vcpu = machine(memory, bytes.fromhex("66480f6e06"), rsi=UNMAPPED + 8)  # movq xmm0, [rsi]
    assert done.complete(vcpu)
    assert vcpu.injected == [("exception", 14, 0)]
    assert vcpu.sregs.cr2 == UNMAPPED + 8
    assert vcpu.regs.rip == RIP  # a fault: RIP stays at the instruction
    done, vcpu = machine(memory, bytes.fromhex("660fd606"), rsi=UNMAPPED)  # movq [rsi], xmm0
    assert done.complete(vcpu)
    assert vcpu.injected == [("exception", 14, 2)]  # a write


def test_cr0_ts_gives_nm_and_a_misaligned_movaps_gp0(memory: GuestMemory) -> None:
    done, vcpu = machine(memory, bytes.fromhex("660f6ec1"))  # movd xmm0, ecx
    vcpu.sregs.cr0 |= CR0_TS
    assert done.complete(vcpu)
    assert vcpu.injected == [("exception", 7, None)]
    done, vcpu = machine(memory, bytes.fromhex("0f2806"), rsi=DATA + 8)  # movaps xmm0, [rsi]
    assert done.complete(vcpu)
    assert vcpu.injected == [("exception", 13, 0)]


def test_sse42_string_compares_take_unaligned_operands(memory: GuestMemory) -> None:
    done, vcpu = machine(memory, bytes.fromhex("660f3a630600"), rsi=DATA + 8)  # pcmpistri
    assert done.complete(vcpu)
    assert vcpu.injected == [] and vcpu.regs.rip == RIP + 6


def test_refused_mmio_system_instructions_and_no_unicorn(memory: GuestMemory) -> None:
    # Memory that is not RAM (the LAPIC's page, mapped by the guest): the crash report stays.
    memory.write(PD + 8 * 8, struct.pack("<Q", 0xFEE00000 & ~0x1FFFFF | 0x83))
    done, vcpu = machine(memory, bytes.fromhex("66480f6e06"), rsi=8 << 21)  # movq xmm0, [rsi]
    assert not done.complete(vcpu)
    assert (vcpu.regs.rip, vcpu.injected) == (RIP, [])
    # Not an x87/SSE instruction: not the fallback's.
    done, vcpu = machine(memory, bytes.fromhex("0f31"))  # rdtsc
    assert not done.complete(vcpu)
    # VEX-encoded (AVX): the emulator lacks it.
    done, vcpu = machine(memory, bytes.fromhex("c5f458c2"))
    assert not done.complete(vcpu)
    # x87 functions the emulator computes in double precision: fsin, fprem.
    for code in ("d9fe", "d9f8"):
        done, vcpu = machine(memory, bytes.fromhex(code))
        assert not done.complete(vcpu)
    # Fallback off, or Unicorn missing: the crash report.
    done, vcpu = machine(memory, bytes.fromhex("66440f6ef9"))
    done.use_fallback = False
    assert not done.complete(vcpu)
    done, vcpu = machine(memory, bytes.fromhex("66440f6ef9"))
    done.fallback.unavailable = True
    assert not done.complete(vcpu)
    assert vcpu.regs.rip == RIP


def test_mxcsr_gets_the_exceptions_the_emulator_keeps_to_itself(memory: GuestMemory) -> None:
    """1.0 / 3.0: inexact, so MXCSR.PE, as the CPU sets it (QEMU 5 does not)."""
    done, vcpu = machine(memory, bytes.fromhex("f30f5ec1"))  # divss xmm0, xmm1
    area = bytearray(vcpu.xsave)
    area[160:164] = struct.pack("<f", 1.0)
    area[176:180] = struct.pack("<f", 3.0)
    area[512] |= 2
    vcpu.xsave = bytes(area)
    assert done.complete(vcpu)
    assert fpu_from_xsave(vcpu.xsave).mxcsr == 0x1F80 | 0x20
    # Unmasked, the CPU raises #XM and leaves XMM0: the emulator cannot, so refuse.
    done, vcpu = machine(memory, bytes.fromhex("f30f5ec1"))
    area[24:28] = (0x1F80 & ~(0x20 << 7)).to_bytes(4, "little")
    vcpu.xsave = bytes(area)
    assert not done.complete(vcpu)


@pytest.mark.parametrize(("value", "result", "c1"), [(2.75, 3, 1), (2.25, 2, 0), (-2.75, -3, 1)])
def test_x87_c1_says_whether_rounding_went_up(
    memory: GuestMemory, value: float, result: int, c1: int
) -> None:
    memory.write(DATA, struct.pack("<d", value))
    load = bytes.fromhex("dd0425") + struct.pack("<I", DATA)  # fld qword [DATA]
    store = bytes.fromhex("db1c25") + struct.pack("<I", DATA + 8)  # fistp dword [DATA + 8]
    done, vcpu = machine(memory, load)
    assert done.complete(vcpu)
    memory.write(RIP, store)
    vcpu.regs.rip = RIP
    vcpu.script.append(Step(ExitKind.INTERNAL_ERROR, code=store))
    vcpu.run()
    fpu = fpu_from_xsave(vcpu.xsave)
    fpu.fsw |= 0x200  # C1 set before: it must end as the rounding says
    vcpu.xsave = xsave_with_fpu(vcpu.xsave, fpu)
    assert done.complete(vcpu)
    assert struct.unpack("<i", memory.read(DATA + 8, 4))[0] == result
    fsw = fpu_from_xsave(vcpu.xsave).fsw
    assert (fsw >> 9 & 1, fsw & 0x20) == (c1, 0x20)


def test_a_fault_leaves_no_exception_behind_in_the_emulator(memory: GuestMemory) -> None:
    """After a #PF the next fault must be a #PF again, not a double fault (the same
    emulator: one is kept per vCPU)."""
    done = None
    for _ in range(2):
        done, vcpu = machine(memory, bytes.fromhex("66480f6e06"), done, rsi=UNMAPPED)
        assert done.complete(vcpu)
        assert vcpu.injected == [("exception", 14, 0)]
    assert done is not None and len(done.fallback._steppers) == 1


def test_one_stepper_per_vcpu_is_kept(memory: GuestMemory) -> None:
    done, vcpu = machine(memory, bytes.fromhex("660f6ec1"))
    assert done.complete(vcpu)
    stepper = done.fallback._steppers[0]
    vcpu.regs.rip = RIP
    assert done.complete(vcpu)
    assert done.fallback._steppers[0] is stepper
    assert done.counts == {"movd (emulator)": 2}
