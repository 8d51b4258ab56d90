"""The ioctl layer against the real /dev/kvm."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from kvmpy import records
from kvmpy.backends.exits import ExitKind
from kvmpy.backends.kvm._kvm import ffi, lib
from kvmpy.backends.kvm.ioctls import Kvm, KvmError
from kvmpy.machine import Machine
from kvmpy.memory import GuestMemory
from kvmpy.x86.cpuid import vcpu_cpuid
from kvmpy.x86.modes import long_mode
from kvmpy.x86.registers import Fpu

pytestmark = pytest.mark.kvm


def test_missing_device_names_the_path_and_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(KvmError) as info:
        Kvm(str(tmp_path / "kvm"))
    assert info.value.errno == errno.ENOENT
    assert str(tmp_path / "kvm") in str(info.value)
    assert "modprobe" in str(info.value)


def test_unpermitted_device_says_how_to_fix_it(tmp_path: Path) -> None:
    # A directory cannot be opened O_RDWR: EISDIR, reported with the path.
    with pytest.raises(KvmError) as info:
        Kvm(str(tmp_path))
    assert info.value.errno == errno.EISDIR
    assert info.value.ioctl == f"open {tmp_path}"


def test_api_version_and_capabilities() -> None:
    with Kvm() as kvm:
        assert kvm.api_version() == 12
        assert kvm.check_extension(lib.KVM_CAP_USER_MEMORY) == 1
        assert kvm.check_extension(lib.KVM_CAP_IMMEDIATE_EXIT) == 1
        assert kvm.vcpu_mmap_size() >= 4096
        assert kvm.fd >= 0
    assert kvm.fd == -1  # closed deterministically


def test_supported_cpuid_has_the_basic_leaves() -> None:
    with Kvm() as kvm:
        functions = {entry.function for entry in kvm.supported_cpuid()}
        assert {0, 1, 0x80000000} <= functions
        assert len(kvm.msr_index_list()) > 10


def test_failed_ioctl_names_the_ioctl() -> None:
    with Kvm() as kvm, kvm.create_vm() as vm:
        backing = GuestMemory.with_ram(1 << 20)
        with backing:
            # Slot memory must be page-aligned: an odd guest address is EINVAL.
            with pytest.raises(KvmError) as info:
                vm.set_user_memory_region(0, 0x123, backing.regions[0].mapping)
            assert info.value.ioctl == "KVM_SET_USER_MEMORY_REGION"
            assert info.value.errno == errno.EINVAL
            assert "KVM_SET_USER_MEMORY_REGION failed" in str(info.value)


def test_register_round_trips() -> None:
    with Kvm() as kvm, kvm.create_vm() as vm, vm.create_vcpu(0) as vcpu:
        vcpu.set_cpuid(vcpu_cpuid(kvm.supported_cpuid(), apic_id=0))
        regs = records.replace(vcpu.get_regs(), rax=0x1122334455667788, r15=7, rip=0x1000)
        vcpu.set_regs(regs)
        assert vcpu.get_regs() == regs

        setup = long_mode(vcpu.get_sregs(), entry=0x100000)
        vcpu.set_sregs(setup.sregs)
        back = vcpu.get_sregs()
        assert back.cs == setup.sregs.cs
        assert back.efer & 0x500 == 0x500
        assert back.cr3 == setup.sregs.cr3

        fpu = records.replace(Fpu(), mxcsr=0x1F80, xmm=bytes(range(256)))
        vcpu.set_fpu(fpu)
        assert vcpu.get_fpu().xmm == fpu.xmm

        vcpu.set_msrs({0x174: 0x10})  # IA32_SYSENTER_CS
        assert vcpu.get_msrs([0x174]) == {0x174: 0x10}


def test_msr_rejection_is_reported() -> None:
    with Kvm() as kvm, kvm.create_vm() as vm, vm.create_vcpu(0) as vcpu:
        with pytest.raises(KvmError) as info:
            vcpu.set_msrs({0xDEADBEEF: 1})
        assert "0xdeadbeef" in str(info.value)


def test_translate_uses_the_guest_page_tables() -> None:
    with Kvm() as kvm, kvm.create_vm() as vm, GuestMemory.with_ram(2 << 20) as memory:
        vm.set_user_memory_region(0, 0, memory.regions[0].mapping)
        with vm.create_vcpu(0) as vcpu:
            vcpu.set_cpuid(vcpu_cpuid(kvm.supported_cpuid(), apic_id=0))
            setup = long_mode(vcpu.get_sregs(), entry=0x100000)
            for gpa, data in setup.memory:
                memory.write(gpa, data)
            vcpu.set_sregs(setup.sregs)
            result = vcpu.translate(0x123456)
            assert result is not None
            assert result.physical_address == 0x123456


def test_exit_struct_comes_from_the_shim() -> None:
    # The flat exit struct is ours; KVM's own layouts come from <linux/kvm.h>.
    assert ffi.sizeof("struct kvm_regs") == 18 * 8
    assert ffi.offsetof("struct kvm_sregs", "cs") == 0
    # The shim returns the generic exit kinds, numbered as kvmpy.backends.exits says.
    for kind in ExitKind:
        assert getattr(lib, f"KVMSHIM_EXIT_{kind.name}") == kind


def _ioapic_irr(machine: Machine) -> int:
    """The IOAPIC's interrupt request register, from KVM's own state of it."""
    state = machine.vm.get_irqchip(lib.KVM_IRQCHIP_IOAPIC)  # type: ignore[attr-defined]
    # struct kvm_irqchip: u32 chip_id, u32 pad, then the chip's state, here
    # struct kvm_ioapic_state: u64 base_address, u32 ioregsel, u32 id, u32 irr.
    chip = 8
    return int.from_bytes(state[chip + 16 : chip + 20], "little")


@pytest.mark.kvm
def test_isa_irq0_reaches_ioapic_pin_2_as_on_qemus_pc() -> None:
    # The redirection entries start masked, so a raised line stays in the IRR.
    with Machine(mem_size=1 << 20) as m:
        m.vm.irq_line(0, True)
        m.vm.irq_line(4, True)
        irr = _ioapic_irr(m)
        assert irr & (1 << 2), f"IRQ 0 should reach pin 2 (IRR {irr:#x})"
        assert not irr & 1, "nothing is wired to pin 0"
        assert irr & (1 << 4), "IRQ 4 (COM1) reaches pin 4"
