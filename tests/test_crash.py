"""Crash-report formatting and KVM internal-error decoding, without /dev/kvm."""

from __future__ import annotations

from typing import Any

import capstone

from kvmpy.backends.kvm._kvm import ffi, lib
from kvmpy.backends.kvm.ioctls import Vcpu as KvmVcpu
from kvmpy.debug.crash import CrashReport
from kvmpy.debug.guestview import capstone_mode, code_address, disassemble
from kvmpy.x86.modes import long_mode, protected_mode, real_mode
from kvmpy.x86.registers import Regs, Sregs


class FakeVcpu:
    """Just the decoded exit struct, which is all describe_exit reads."""

    def __init__(self) -> None:
        self.exit: Any = ffi.new("struct kvmshim_exit *")
        self.exit.reason = lib.KVM_EXIT_INTERNAL_ERROR


def test_emulation_failure_yields_the_instruction_bytes() -> None:
    vcpu = FakeVcpu()
    vcpu.exit.suberror = lib.KVM_INTERNAL_ERROR_EMULATION
    vcpu.exit.ndata = 3
    vcpu.exit.data[0] = lib.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES
    blob = bytes([2, 0xCD, 0x80]).ljust(16, b"\0")  # insn_size=2, "int $0x80"
    vcpu.exit.data[1] = int.from_bytes(blob[:8], "little")
    vcpu.exit.data[2] = int.from_bytes(blob[8:], "little")
    detail, code = KvmVcpu.describe_exit(vcpu)  # type: ignore[arg-type]
    assert detail == "suberror 1 (instruction emulation failed)"
    assert code == b"\xcd\x80"


def test_other_internal_errors_list_their_data() -> None:
    vcpu = FakeVcpu()
    vcpu.exit.suberror = lib.KVM_INTERNAL_ERROR_DELIVERY_EV
    vcpu.exit.ndata = 2
    vcpu.exit.data[0] = 0x80000B0E
    vcpu.exit.data[1] = 0x31
    detail, code = KvmVcpu.describe_exit(vcpu)  # type: ignore[arg-type]
    assert detail == "suberror 3 (exit while delivering an event) data 0x80000b0e 0x31"
    assert code is None


def test_code_address_and_capstone_mode_follow_the_cpu_mode() -> None:
    real = real_mode(Sregs(), 0x10010).sregs
    assert code_address(real, 0x10) == 0x10010
    assert capstone_mode(real) == capstone.CS_MODE_16
    assert capstone_mode(protected_mode(Sregs(), 0x100000).sregs) == capstone.CS_MODE_32
    long = long_mode(Sregs(), 0x100000).sregs
    assert capstone_mode(long) == capstone.CS_MODE_64
    assert code_address(long, 0xFFFF_FFFF_8000_0000) == 0xFFFF_FFFF_8000_0000


def test_disassemble_decodes_each_instruction() -> None:
    code = bytes.fromhex("48c7c0341200000f0b")  # mov rax, 0x1234; ud2
    assert disassemble(code, 0x1000, capstone.CS_MODE_64) == [
        (0x1000, 7, "mov rax, 0x1234"),
        (0x1007, 2, "ud2"),
    ]


def test_report_marks_the_faulting_instruction() -> None:
    report = CrashReport(
        reason="triple fault (KVM_EXIT_SHUTDOWN)",
        regs=Regs(rax=0x1234, rip=0x100007),
        sregs=long_mode(Sregs(), 0x100000).sregs,
        mode="long",
        code_address=0x100007,
        instructions=[(0x100007, 2, "ud2"), (0x100009, 2, "add byte ptr [rax], al")],
    )
    text = report.format().splitlines()
    assert text[0] == "vCPU 0: triple fault (KVM_EXIT_SHUTDOWN) at RIP=0x100007 (long mode)"
    assert "RAX=0000000000001234" in text[1]
    assert "  => 0x100007: ud2" in text
    assert "     0x100009: add byte ptr [rax], al" in text
