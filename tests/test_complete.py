"""Instruction completion (kvmpy/x86/complete.py) on the fake backend: no /dev/kvm.

Each test puts a vCPU in a mode, hands the completer the bytes of one
instruction "the backend could not emulate", and checks what the SDM says:
registers, flags, memory, RIP, or the fault delivered to the guest.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest

from kvmpy.backends.base import Translation
from kvmpy.backends.exits import ExitKind
from kvmpy.machine import Machine
from kvmpy.memory import GuestMemory
from kvmpy.outcome import OutcomeKind
from kvmpy.x86 import complete
from kvmpy.x86.complete import AC, CF, OF_FLAG, ZF, Completer, fpu_from_xsave, xsave_with_fpu
from kvmpy.x86.registers import CR0_PE, CR0_PG, EFER_LMA, EFER_LME, Fpu, Segment, Sregs
from tests.fake_backend import FakeBackend, FakeVcpu, Step

RIP = 0x100000
IDT = 0x2000
ALL_ARITH = 0x8D5


def long_mode(cpl: int = 0) -> Sregs:
    cs = Segment(selector=0x10 | cpl, type=0xB, dpl=cpl, l=1, limit=0xFFFFFFFF, g=1)
    data = Segment(selector=0x18 | cpl, type=0x3, dpl=cpl, limit=0xFFFFFFFF, g=1)
    sregs = Sregs(cs=cs, ds=data, es=data, ss=data, fs=data, gs=data)
    sregs.cr0 = CR0_PE | CR0_PG
    sregs.efer = EFER_LME | EFER_LMA
    sregs.idt.base, sregs.idt.limit = IDT, 256 * 16 - 1
    return sregs


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory.with_ram(4 << 20) as ram:
        yield ram


def completer(memory: GuestMemory) -> Completer:
    done = Completer()
    done.memory = memory
    return done


def vcpu_at(code: bytes, sregs: Sregs | None = None, **regs: int) -> FakeVcpu:
    """A vCPU stopped by an emulation failure on ``code`` at RIP."""
    vcpu = FakeVcpu(0, [Step(ExitKind.INTERNAL_ERROR, code=code)])
    vcpu.run()
    vcpu.sregs = sregs or long_mode()
    vcpu.regs.rip = RIP
    for name, value in regs.items():
        setattr(vcpu.regs, name, value)
    return vcpu


def put_fpu(vcpu: FakeVcpu, fpu: Fpu) -> None:
    vcpu.xsave = xsave_with_fpu(vcpu.xsave, fpu)


def fpu_of(vcpu: FakeVcpu) -> Fpu:
    return fpu_from_xsave(vcpu.xsave)


def gate(memory: GuestMemory, vector: int, dpl: int = 0, present: bool = True) -> None:
    access = (0x80 if present else 0) | dpl << 5 | 0x0E
    memory.write(IDT + vector * 16, struct.pack("<HHBBHQ", 0x1234, 0x10, 0, access, 0, 0))


# -- software interrupts -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "vector"), [(b"\xcc", 3), (b"\xcd\x80", 0x80), (b"\xcd\x0d", 13), (b"\xf1", 1)]
)
def test_software_interrupts_advance_rip_and_inject_without_error_code(
    memory: GuestMemory, code: bytes, vector: int
) -> None:
    gate(memory, vector)
    vcpu = vcpu_at(code)
    assert completer(memory).complete(vcpu)
    assert vcpu.regs.rip == RIP + len(code)
    # An external-interrupt event: RIP pushed as it is, no error code even for vector 13.
    assert vcpu.injected == [("interrupt", vector, None)]


def test_int_n_above_the_gate_dpl_is_a_general_protection_fault(memory: GuestMemory) -> None:
    gate(memory, 0x80, dpl=0)
    vcpu = vcpu_at(b"\xcd\x80", long_mode(cpl=3))
    assert completer(memory).complete(vcpu)
    assert vcpu.regs.rip == RIP  # a fault: RIP stays at the int
    assert vcpu.injected == [("exception", 13, 0x80 * 8 + 2)]


def test_int_n_at_the_gate_dpl_goes_through(memory: GuestMemory) -> None:
    gate(memory, 0x80, dpl=3)
    vcpu = vcpu_at(b"\xcd\x80", long_mode(cpl=3))
    assert completer(memory).complete(vcpu)
    assert vcpu.injected == [("interrupt", 0x80, None)]


def test_int1_skips_the_dpl_check(memory: GuestMemory) -> None:
    gate(memory, 1, dpl=0)
    vcpu = vcpu_at(b"\xf1", long_mode(cpl=3))
    assert completer(memory).complete(vcpu)
    assert vcpu.injected == [("interrupt", 1, None)]


def test_not_present_gate_and_vector_past_the_idt_limit(memory: GuestMemory) -> None:
    gate(memory, 0x90, present=False)
    vcpu = vcpu_at(b"\xcd\x90")
    assert completer(memory).complete(vcpu)
    assert vcpu.injected == [("exception", 11, 0x90 * 8 + 2)]
    short = long_mode()
    short.idt.limit = 0x80 * 16 - 1
    vcpu = vcpu_at(b"\xcd\x80", short)
    assert completer(memory).complete(vcpu)
    assert vcpu.injected == [("exception", 13, 0x80 * 8 + 2)]


def test_int3_reads_the_idt_through_paging_and_faults_when_unmapped(memory: GuestMemory) -> None:
    vcpu = vcpu_at(b"\xcc")
    vcpu.pages[IDT] = None
    assert completer(memory).complete(vcpu)
    assert vcpu.injected == [("exception", 14, 0)]  # supervisor read, not present
    assert vcpu.sregs.cr2 == IDT + 3 * 16


# -- flags and registers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "result", "flags"), [(0, 0, ZF), (1, 1, 0), (0xF000000000000100, 5, 0)]
)
def test_popcnt(memory: GuestMemory, value: int, result: int, flags: int) -> None:
    vcpu = vcpu_at(b"\xf3\x48\x0f\xb8\xc3", rbx=value, rflags=0x2 | ALL_ARITH)  # popcnt rax, rbx
    assert completer(memory).complete(vcpu)
    assert vcpu.regs.rax == result
    assert vcpu.regs.rflags & ALL_ARITH == flags
    assert vcpu.regs.rip == RIP + 5


def test_lzcnt_and_tzcnt_keep_of_as_this_cpu_does(memory: GuestMemory) -> None:
    # lzcnt eax, ebx with EBX = 0: 32, CF set; OF kept, SF/AF/PF cleared (undefined in the SDM).
    vcpu = vcpu_at(b"\xf3\x0f\xbd\xc3", rax=(1 << 63) | 7, rbx=0, rflags=0x2 | ALL_ARITH)
    assert completer(memory).complete(vcpu)
    assert vcpu.regs.rax == 32  # a 32-bit write zero-extends
    assert vcpu.regs.rflags & ALL_ARITH == CF | OF_FLAG
    vcpu = vcpu_at(b"\xf3\x48\x0f\xbc\xc3", rbx=0x80, rflags=0x2)  # tzcnt rax, rbx
    assert completer(memory).complete(vcpu)
    assert (vcpu.regs.rax, vcpu.regs.rflags & ALL_ARITH) == (7, 0)


def test_16_bit_destination_merges(memory: GuestMemory) -> None:
    vcpu = vcpu_at(b"\x66\xf3\x0f\xb8\xc3", rax=0xAAAA_BBBB_CCCC_DDDD, rbx=0xFFFF)
    assert completer(memory).complete(vcpu)
    assert vcpu.regs.rax == 0xAAAA_BBBB_CCCC_0010


def test_stac_and_clac_at_cpl0_and_ud_above(memory: GuestMemory) -> None:
    vcpu = vcpu_at(b"\x0f\x01\xcb")
    assert completer(memory).complete(vcpu)
    assert vcpu.regs.rflags & AC and vcpu.regs.rip == RIP + 3
    vcpu = vcpu_at(b"\x0f\x01\xca", rflags=0x2 | AC)
    assert completer(memory).complete(vcpu)
    assert not vcpu.regs.rflags & AC
    vcpu = vcpu_at(b"\x0f\x01\xcb", long_mode(cpl=3))
    assert completer(memory).complete(vcpu)
    assert (vcpu.injected, vcpu.regs.rip) == ([("exception", 6, None)], RIP)


def test_register_form_movbe_is_undefined(memory: GuestMemory) -> None:
    vcpu = vcpu_at(b"\x0f\x38\xf0\xc0")
    assert completer(memory).complete(vcpu)
    assert vcpu.injected == [("exception", 6, None)]


def test_unknown_instructions_and_a_disabled_completer_leave_the_crash(
    memory: GuestMemory,
) -> None:
    assert not completer(memory).complete(vcpu_at(b"\x0f\x0b"))  # ud2: not ours to finish
    off = completer(memory)
    off.enabled = False
    assert not off.complete(vcpu_at(b"\xcc"))


# -- memory ------------------------------------------------------------------------------------


def test_movbe_load_and_store(memory: GuestMemory) -> None:
    memory.write(0x3000, bytes.fromhex("0102030405060708"))
    vcpu = vcpu_at(b"\x48\x0f\x38\xf0\x07", rdi=0x3000)  # movbe rax, [rdi]
    assert completer(memory).complete(vcpu)
    assert vcpu.regs.rax == 0x0102030405060708
    vcpu = vcpu_at(b"\x0f\x38\xf1\x07", rdi=0x3008, rax=0x11223344)  # movbe [rdi], eax
    assert completer(memory).complete(vcpu)
    assert memory.read(0x3008, 4) == bytes.fromhex("11223344")


def test_cmpxchg16b_equal_not_equal_and_misaligned(memory: GuestMemory) -> None:
    memory.write(0x3000, struct.pack("<QQ", 1, 2))
    code = b"\xf0\x48\x0f\xc7\x0f"  # lock cmpxchg16b [rdi]
    vcpu = vcpu_at(code, rdi=0x3000, rax=1, rdx=2, rbx=3, rcx=4)
    assert completer(memory).complete(vcpu)
    assert struct.unpack("<QQ", memory.read(0x3000, 16)) == (3, 4)
    assert vcpu.regs.rflags & ZF
    vcpu = vcpu_at(code, rdi=0x3000, rax=0, rdx=0, rflags=0x2 | ZF)
    assert completer(memory).complete(vcpu)
    assert (vcpu.regs.rax, vcpu.regs.rdx, vcpu.regs.rflags & ZF) == (3, 4, 0)
    vcpu = vcpu_at(code, rdi=0x3008)
    assert completer(memory).complete(vcpu)
    assert (vcpu.injected, vcpu.regs.rip) == ([("exception", 13, 0)], RIP)


def test_cmpxchg8b_faults_on_a_read_only_page_with_cr0_wp(memory: GuestMemory) -> None:
    sregs = long_mode()
    sregs.cr0 |= 1 << 16  # WP
    vcpu = vcpu_at(b"\x0f\xc7\x0f", sregs, rdi=0x5008)  # cmpxchg8b [rdi]
    vcpu.pages[0x5000] = Translation(0x5000, False, False)
    assert completer(memory).complete(vcpu)
    assert vcpu.injected == [("exception", 14, 0b011)]  # present, write, supervisor
    assert vcpu.sregs.cr2 == 0x5008


def test_user_access_to_a_supervisor_page_faults(memory: GuestMemory) -> None:
    vcpu = vcpu_at(b"\x48\x0f\x38\xf0\x07", long_mode(cpl=3), rdi=0x3000)
    assert completer(memory).complete(vcpu)
    assert vcpu.injected == [("exception", 14, 0b101)]  # present, read, user


# -- state ---------------------------------------------------------------------------------------


def test_xgetbv_xsetbv(memory: GuestMemory) -> None:
    sregs = long_mode()
    sregs.cr4 |= 1 << 18  # OSXSAVE
    vcpu = vcpu_at(b"\x0f\x01\xd1", sregs, rax=3, rcx=0)  # xsetbv
    assert completer(memory).complete(vcpu)
    assert vcpu.xcr0 == 3
    vcpu = vcpu_at(b"\x0f\x01\xd0", sregs, rcx=0, rax=-1 & (2**64 - 1))  # xgetbv
    vcpu.xcr0 = 3
    assert completer(memory).complete(vcpu)
    assert (vcpu.regs.rax, vcpu.regs.rdx) == (3, 0)
    vcpu = vcpu_at(b"\x0f\x01\xd1", sregs, rax=2, rcx=0)  # x87 bit clear: #GP(0)
    assert completer(memory).complete(vcpu)
    assert vcpu.injected == [("exception", 13, 0)]
    vcpu = vcpu_at(b"\x0f\x01\xd0")  # CR4.OSXSAVE clear: #UD
    assert completer(memory).complete(vcpu)
    assert vcpu.injected == [("exception", 6, None)]


def test_fwait_raises_pending_x87_exceptions_and_nm(memory: GuestMemory) -> None:
    vcpu = vcpu_at(b"\x9b")
    assert completer(memory).complete(vcpu)
    assert vcpu.regs.rip == RIP + 1 and not vcpu.injected
    sregs = long_mode()
    sregs.cr0 |= 1 << 5  # NE
    vcpu = vcpu_at(b"\x9b", sregs)
    put_fpu(vcpu, Fpu(fsw=0x8081))
    assert completer(memory).complete(vcpu)
    assert vcpu.injected == [("exception", 16, None)]
    sregs.cr0 |= 0b1010  # MP, TS
    vcpu = vcpu_at(b"\x9b", sregs)
    assert completer(memory).complete(vcpu)
    assert vcpu.injected == [("exception", 7, None)]


def test_x87_constants_follow_the_rounding_control(memory: GuestMemory) -> None:
    vcpu = vcpu_at(b"\xd9\xeb")  # fldpi
    put_fpu(vcpu, Fpu(fcw=0x37F))
    assert completer(memory).complete(vcpu)
    assert fpu_of(vcpu).fpr[:10] == bytes.fromhex("35c26821a2da0fc90040")
    assert (fpu_of(vcpu).fsw >> 11) & 7 == 7 and fpu_of(vcpu).ftwx == 0x80
    assert vcpu.xsave[512] & 1  # x87 in use, or the CPU's XRSTOR would load its initial state
    vcpu = vcpu_at(b"\xd9\xeb")
    put_fpu(vcpu, Fpu(fcw=0xF7F))  # round toward zero
    assert completer(memory).complete(vcpu)
    assert fpu_of(vcpu).fpr[:2] == b"\x34\xc2"


def test_fstp_m80_pops_and_underflow_stores_the_indefinite(memory: GuestMemory) -> None:
    vcpu = vcpu_at(b"\xd9\xe8")  # fld1
    assert completer(memory).complete(vcpu)
    area = vcpu.xsave
    vcpu = vcpu_at(b"\xdb\x3f", rdi=0x3000)  # fstp tbyte [rdi]
    vcpu.xsave = area
    assert completer(memory).complete(vcpu)
    assert memory.read(0x3000, 10) == bytes.fromhex("0000000000000080ff3f")
    assert (fpu_of(vcpu).fsw >> 11) & 7 == 0 and fpu_of(vcpu).ftwx == 0
    vcpu = vcpu_at(b"\xdb\x3f", rdi=0x3000)  # empty stack, IM masked
    assert completer(memory).complete(vcpu)
    assert memory.read(0x3000, 10) == bytes.fromhex("00000000000000c0ffff")
    assert fpu_of(vcpu).fsw & 0x41 == 0x41  # IE, SF


# -- through the run loop ---------------------------------------------------------------------


def test_the_run_loop_completes_and_goes_on_or_crashes_when_disabled() -> None:
    steps = [Step(ExitKind.INTERNAL_ERROR, code=b"\x0f\x01\xcb"), Step(ExitKind.HLT)]
    with Machine(mem_size=1 << 20, irqchip=False, backend=FakeBackend(steps)) as m:
        vcpu = m.vm.vcpus[0]  # type: ignore[attr-defined]
        vcpu.sregs = long_mode()
        outcome = m.run(timeout=5)
        assert outcome.kind is OutcomeKind.HALT
        assert m.arch.completer.counts == {"stac": 1}
        assert vcpu.regs.rflags & AC
    steps = [Step(ExitKind.INTERNAL_ERROR, code=b"\x0f\x01\xcb"), Step(ExitKind.HLT)]
    with Machine(mem_size=1 << 20, irqchip=False, backend=FakeBackend(steps)) as m:
        m.vm.vcpus[0].sregs = long_mode()  # type: ignore[attr-defined]
        m.arch.completer.enabled = False
        assert m.run(timeout=5).kind is OutcomeKind.CRASH


def protected_mode() -> Sregs:
    code = Segment(selector=0x08, type=0xB, dpl=0, db=1, limit=0xFFFFFFFF, g=1)
    data = Segment(selector=0x10, type=0x3, dpl=0, db=1, limit=0xFFFFFFFF, g=1)
    sregs = Sregs(cs=code, ds=data, es=data, ss=data, fs=data, gs=data)
    sregs.cr0 = CR0_PE
    sregs.gdt.base, sregs.gdt.limit = 0x1000, 5 * 8 - 1
    return sregs


def test_iret32_same_level_and_a_bad_code_selector(memory: GuestMemory) -> None:
    memory.write(0x1000, struct.pack("<5Q", 0, 0x00CF9A000000FFFF, 0x00CF92000000FFFF, 0, 0))
    memory.write(0x7000, struct.pack("<3I", 0x123456, 0x08, 0x0ED7))
    vcpu = vcpu_at(b"\xcf", protected_mode(), rsp=0x7000)
    assert completer(memory).complete(vcpu)
    assert (vcpu.regs.rip, vcpu.regs.rsp, vcpu.regs.rflags) == (0x123456, 0x700C, 0x0ED7)
    assert memory.read(0x1000 + 8 + 5, 1) == b"\x9b"  # the accessed bit, set on load
    memory.write(0x7000, struct.pack("<3I", 0x123456, 0x10, 0x2))  # a data segment as CS
    vcpu = vcpu_at(b"\xcf", protected_mode(), rsp=0x7000)
    assert completer(memory).complete(vcpu)
    assert (vcpu.injected, vcpu.regs.rip) == ([("exception", 13, 0x10)], RIP)
    vcpu = vcpu_at(b"\xcf", protected_mode(), rsp=0x7000, rflags=0x4002)  # NT: a task return
    assert not completer(memory).complete(vcpu)


def test_into_and_int_n_in_protected_mode_use_8_byte_gates(memory: GuestMemory) -> None:
    sregs = protected_mode()
    sregs.idt.base, sregs.idt.limit = IDT, 256 * 8 - 1
    for vector in (4, 0x80):  # 32-bit interrupt gates (type 0xE), present, DPL 0
        memory.write(IDT + vector * 8, struct.pack("<HHBBH", 0x1000, 0x08, 0, 0x8E, 0))
    vcpu = vcpu_at(b"\xce", sregs, rflags=0x2)  # into, OF clear: nothing but RIP
    assert completer(memory).complete(vcpu)
    assert (vcpu.injected, vcpu.regs.rip) == ([], RIP + 1)
    vcpu = vcpu_at(b"\xce", sregs, rflags=0x2 | OF_FLAG)
    assert completer(memory).complete(vcpu)
    assert (vcpu.injected, vcpu.regs.rip) == ([("interrupt", 4, None)], RIP + 1)
    vcpu = vcpu_at(b"\xcd\x80", sregs)
    assert completer(memory).complete(vcpu)
    assert vcpu.injected == [("interrupt", 0x80, None)]


def test_into_is_undefined_in_64_bit_mode(memory: GuestMemory) -> None:
    vcpu = vcpu_at(b"\xce")
    assert completer(memory).complete(vcpu)
    assert vcpu.injected == [("exception", 6, None)]


def test_a_lock_prefix_where_the_cpu_takes_none_is_undefined(memory: GuestMemory) -> None:
    vcpu = vcpu_at(b"\xf0\xf3\x48\x0f\xb8\x06", rsi=0x3000)  # lock popcnt rax, [rsi]
    assert completer(memory).complete(vcpu)
    assert (vcpu.injected, vcpu.regs.rip) == ([("exception", 6, None)], RIP)


def test_virtual_8086_mode_is_left_to_the_report(memory: GuestMemory) -> None:
    assert not completer(memory).complete(vcpu_at(b"\xcc", protected_mode(), rflags=0x20002))


def xsave_sregs() -> Sregs:
    sregs = long_mode()
    sregs.cr4 |= 1 << 18  # OSXSAVE
    return sregs


def test_xsave_writes_what_rfbm_selects_and_merges_xstate_bv(memory: GuestMemory) -> None:
    kvm = bytearray(4096)
    kvm[160:176] = bytes(range(16))  # XMM0
    kvm[32:42] = bytes.fromhex("0000000000000080ff3f")  # ST0 = 1.0
    kvm[512] = 0b11
    memory.write(0x4000 + 512, (1 << 5).to_bytes(8, "little"))  # a bit RFBM does not select
    vcpu = vcpu_at(b"\x48\x0f\xae\x27", xsave_sregs(), rdi=0x4000, rax=3, rdx=0)  # xsave64 [rdi]
    vcpu.xcr0, vcpu.xsave = 3, bytes(kvm)
    assert completer(memory).complete(vcpu)
    assert memory.read(0x4000 + 160, 16) == bytes(range(16))
    assert memory.read(0x4000 + 32, 10) == bytes.fromhex("0000000000000080ff3f")
    assert int.from_bytes(memory.read(0x4000 + 512, 8), "little") == (1 << 5) | 0b11
    assert vcpu.regs.rip == RIP + 4


def test_xrstor_loads_or_initialises_each_component(memory: GuestMemory) -> None:
    area = bytearray(576)
    area[160:176] = b"\xaa" * 16
    area[24:28] = (0x1F80).to_bytes(4, "little")
    area[512] = 0b10  # SSE from memory, x87 to its initial state
    memory.write(0x4000, bytes(area))
    vcpu = vcpu_at(b"\x48\x0f\xae\x2f", xsave_sregs(), rdi=0x4000, rax=3, rdx=0)  # xrstor64
    vcpu.xcr0 = 3
    old = bytearray(4096)
    old[0:2] = b"\x12\x34"  # an x87 control word that must go back to 0x37F
    old[32:42] = b"\x01" * 10
    vcpu.xsave = bytes(old)
    assert completer(memory).complete(vcpu)
    assert vcpu.xsave[160:176] == b"\xaa" * 16
    assert vcpu.xsave[0:2] == b"\x7f\x03" and vcpu.xsave[32:42] == bytes(10)
    assert vcpu.xsave[512] == 0b10


@pytest.mark.parametrize(
    ("address", "header_bv", "why"), [(0x4008, 1, "misaligned"), (0x4000, 1 << 2, "not in XCR0")]
)
def test_xrstor_general_protection(
    memory: GuestMemory, address: int, header_bv: int, why: str
) -> None:
    memory.write(0x4000 + 512, header_bv.to_bytes(8, "little"))
    vcpu = vcpu_at(b"\x48\x0f\xae\x2f", xsave_sregs(), rdi=address, rax=3, rdx=0)
    vcpu.xcr0 = 3
    assert completer(memory).complete(vcpu), why
    assert vcpu.injected == [("exception", 13, 0)]


def test_xrstor_compacted_packs_extended_components_from_576(memory: GuestMemory) -> None:
    # Component 5 (standard offset 832) sits at 576 when XCOMP_BV leaves out component 2.
    done = Completer({2: (576, 256, False), 5: (832, 64, False)})
    done.memory = memory
    area = bytearray(640)
    area[24:28] = (0x1F80).to_bytes(4, "little")
    area[576:640] = b"\x55" * 64
    bv, comp = 0b100011, (1 << 63) | 0b100011
    area[512:528] = bv.to_bytes(8, "little") + comp.to_bytes(8, "little")
    memory.write(0x4000, bytes(area))
    vcpu = vcpu_at(b"\x48\x0f\xae\x2f", xsave_sregs(), rdi=0x4000, rax=0b100111, rdx=0)
    vcpu.xcr0 = 0b100111
    old = bytearray(vcpu.xsave)
    old[576:832] = b"\x11" * 256  # AVX state: selected, absent from the area, so initial
    vcpu.xsave = bytes(old)
    assert done.complete(vcpu)
    assert vcpu.xsave[832:896] == b"\x55" * 64
    assert vcpu.xsave[576:832] == bytes(256)
    assert vcpu.xsave[512] == 0b100011


def test_ldmxcsr_marks_sse_in_use_and_refuses_reserved_bits(memory: GuestMemory) -> None:
    sregs = long_mode()
    sregs.cr4 |= 1 << 9  # OSFXSR
    memory.write(0x3000, (0x1FA0).to_bytes(4, "little") + (1 << 20).to_bytes(4, "little"))
    vcpu = vcpu_at(b"\x0f\xae\x17", sregs, rdi=0x3000)  # ldmxcsr [rdi]
    assert completer(memory).complete(vcpu)
    assert vcpu.xsave[24:28] == (0x1FA0).to_bytes(4, "little") and vcpu.xsave[512] & 2
    vcpu = vcpu_at(b"\x0f\xae\x1f", sregs, rdi=0x3010, rax=0)  # stmxcsr [rdi]
    vcpu.xsave = bytes(vcpu.xsave[:24]) + (0x1F80).to_bytes(4, "little") + vcpu.xsave[28:]
    assert completer(memory).complete(vcpu)
    assert memory.read(0x3010, 4) == (0x1F80).to_bytes(4, "little")
    vcpu = vcpu_at(b"\x0f\xae\x17", sregs, rdi=0x3004)  # bit 20: reserved
    vcpu.xsave = bytes(vcpu.xsave[:28]) + (0xFFFF).to_bytes(4, "little") + vcpu.xsave[32:]
    assert completer(memory).complete(vcpu)
    assert vcpu.injected == [("exception", 13, 0)]
    vcpu = vcpu_at(b"\x0f\xae\x17", long_mode(), rdi=0x3000)  # CR4.OSFXSR clear: #UD
    assert completer(memory).complete(vcpu)
    assert vcpu.injected == [("exception", 6, None)]


# -- xsaves / xrstors: xsavec / compacted xrstor at CPL0, without supervisor state -----------


def test_xsaves_is_compacted_and_xrstors_refuses_the_standard_form(memory: GuestMemory) -> None:
    kvm = bytearray(4096)
    kvm[160:176] = bytes(range(16))
    kvm[24:28] = (0x1F80).to_bytes(4, "little")
    kvm[512] = 0b10
    vcpu = vcpu_at(b"\x48\x0f\xc7\x2f", xsave_sregs(), rdi=0x4000, rax=3, rdx=0)  # xsaves64
    vcpu.xcr0, vcpu.xsave = 3, bytes(kvm)
    assert completer(memory).complete(vcpu)
    header = memory.read(0x4000 + 512, 16)
    assert int.from_bytes(header[:8], "little") == 0b10  # x87 in its initial state: left out
    assert int.from_bytes(header[8:], "little") == (1 << 63) | 3
    assert memory.read(0x4000 + 160, 16) == bytes(range(16))
    # xrstors of that compacted image loads it back.
    vcpu = vcpu_at(b"\x48\x0f\xc7\x1f", xsave_sregs(), rdi=0x4000, rax=3, rdx=0)  # xrstors64
    vcpu.xcr0 = 3
    assert completer(memory).complete(vcpu)
    assert vcpu.xsave[160:176] == bytes(range(16)) and vcpu.injected == []
    # The standard form (XCOMP_BV 0) is #GP(0) for xrstors, as is CPL 3.
    memory.write(0x4000 + 520, bytes(8))
    vcpu = vcpu_at(b"\x48\x0f\xc7\x1f", xsave_sregs(), rdi=0x4000, rax=3, rdx=0)
    vcpu.xcr0 = 3
    assert completer(memory).complete(vcpu)
    assert vcpu.injected == [("exception", 13, 0)]
    user = xsave_sregs()
    user.cs = Segment(selector=0x2B, type=0xB, dpl=3, l=1, limit=0xFFFFFFFF, g=1)
    vcpu = vcpu_at(b"\x48\x0f\xc7\x2f", user, rdi=0x4000, rax=3, rdx=0)
    vcpu.xcr0 = 3
    assert completer(memory).complete(vcpu)
    assert vcpu.injected == [("exception", 13, 0)]


def test_xsaves_of_supervisor_state_is_left_to_the_report(memory: GuestMemory) -> None:
    """IA32_XSS enables component 11 (CET user): its state is not in KVM's XSAVE area."""
    vcpu = vcpu_at(b"\x48\x0f\xc7\x2f", xsave_sregs(), rdi=0x4000, rax=(1 << 11) | 3, rdx=0)
    vcpu.xcr0, vcpu.msrs[0xDA0] = 3, 1 << 11
    assert not completer(memory).complete(vcpu)
    vcpu = vcpu_at(b"\x48\x0f\xc7\x2f", xsave_sregs(), rdi=0x4000, rax=3, rdx=0)
    vcpu.xcr0, vcpu.msrs[0xDA0] = 3, 1 << 11  # enabled but not asked for: fine
    assert completer(memory).complete(vcpu)


# -- rdpru: capstone cannot decode it; the host CPU answers ------------------------------


def test_rdpru_without_the_feature_is_undefined(
    memory: GuestMemory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(complete, "_host_has_rdpru", lambda: False)
    vcpu = vcpu_at(b"\x0f\x01\xfd", rcx=1)
    done = completer(memory)
    assert done.complete(vcpu)
    assert vcpu.injected == [("exception", 6, None)] and vcpu.regs.rip == RIP
    assert done.counts == {"rdpru": 1}


def test_rdpru_returns_the_host_cpus_counter_and_flags(
    memory: GuestMemory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(complete, "_host_has_rdpru", lambda: True)
    vcpu = vcpu_at(b"\x0f\x01\xfd", rcx=1, rax=-1 & (2**64 - 1), rflags=2 | ZF)
    vcpu.rdpru = lambda ecx: (0x1234_5678_9ABC_DEF0 + ecx, CF)
    assert completer(memory).complete(vcpu)
    assert (vcpu.regs.rax, vcpu.regs.rdx) == (0x9ABC_DEF1, 0x1234_5678)
    assert vcpu.regs.rflags & (CF | ZF) == CF and vcpu.regs.rip == RIP + 3
    # At CPL 3 with CR4.TSD set: #UD.
    user = long_mode(cpl=3)
    user.cr4 |= 1 << 2
    vcpu = vcpu_at(b"\x0f\x01\xfd", user)
    assert completer(memory).complete(vcpu)
    assert vcpu.injected == [("exception", 6, None)]


# -- rdtscp and the protection-key instructions --------------------------------------------

RDTSCP = b"\x0f\x01\xf9"
U64 = (1 << 64) - 1


def test_rdtscp_reads_the_vcpus_tsc_and_tsc_aux(
    memory: GuestMemory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(complete, "_host_flags", lambda: frozenset({"rdtscp"}))
    vcpu = vcpu_at(RDTSCP, rax=U64, rcx=U64, rdx=U64)
    vcpu.msrs[complete.IA32_TSC] = 0x1122_3344_5566_7788
    vcpu.msrs[complete.IA32_TSC_AUX] = 0xFFFF_FFFF_0000_0007  # only the low half is read
    done = completer(memory)
    assert done.complete(vcpu)
    # 32-bit results zero-extend into the 64-bit registers.
    assert (vcpu.regs.rax, vcpu.regs.rdx, vcpu.regs.rcx) == (0x5566_7788, 0x1122_3344, 7)
    assert vcpu.regs.rip == RIP + 3 and done.counts == {"rdtscp": 1}


def test_rdtscp_faults_as_the_cpu_does(
    memory: GuestMemory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(complete, "_host_flags", lambda: frozenset())
    vcpu = vcpu_at(RDTSCP)
    assert completer(memory).complete(vcpu)
    assert vcpu.injected == [("exception", 6, None)] and vcpu.regs.rip == RIP
    monkeypatch.setattr(complete, "_host_flags", lambda: frozenset({"rdtscp"}))
    user = long_mode(cpl=3)
    user.cr4 |= 1 << 2  # CR4.TSD: only CPL0 may read the TSC
    vcpu = vcpu_at(RDTSCP, user)
    vcpu.msrs[complete.IA32_TSC] = 5
    assert completer(memory).complete(vcpu)
    assert vcpu.injected == [("exception", 13, 0)] and vcpu.regs.rip == RIP
    vcpu = vcpu_at(RDTSCP, long_mode(cpl=3))  # without TSD, CPL3 reads it too
    vcpu.msrs[complete.IA32_TSC] = 5
    assert completer(memory).complete(vcpu)
    assert vcpu.regs.rax == 5 and vcpu.regs.rip == RIP + 3


@pytest.mark.parametrize("code", [b"\x0f\x01\xee", b"\x0f\x01\xef"], ids=["rdpkru", "wrpkru"])
def test_protection_key_instructions_without_the_feature_are_undefined(
    memory: GuestMemory, monkeypatch: pytest.MonkeyPatch, code: bytes
) -> None:
    monkeypatch.setattr(complete, "_host_flags", lambda: frozenset({"pku"}))
    vcpu = vcpu_at(code, rcx=0)  # CR4.PKE clear
    assert completer(memory).complete(vcpu)
    assert vcpu.injected == [("exception", 6, None)] and vcpu.regs.rip == RIP
    sregs = long_mode()
    sregs.cr4 |= 1 << 22
    vcpu = vcpu_at(code, sregs, rcx=0)
    assert not completer(memory).complete(vcpu)  # with keys on: left to the report
