"""The KVM backend: /dev/kvm through the C shim, behind ``kvmpy.backends.base``.

Only this package imports the shim (``_kvm``) and the ioctl classes.
"""

from __future__ import annotations

from kvmpy.backends.base import KVM_PATH, Capability
from kvmpy.backends.kvm._kvm import lib
from kvmpy.backends.kvm.hostinfo import format_info, gather
from kvmpy.backends.kvm.ioctls import Kvm, KvmError, Vcpu, Vm, install_kick_handler
from kvmpy.x86.cpuid import CpuidEntry

__all__ = ["KVM_PATH", "KvmBackend", "KvmError", "Vcpu", "Vm"]


class KvmBackend:
    """/dev/kvm opened: creates VMs whose vCPUs run under the host kernel's KVM."""

    name = "kvm"

    def __init__(self, path: str = KVM_PATH) -> None:
        self.kvm = Kvm(path)
        self.path = path
        try:
            self.capabilities: frozenset[Capability] = self.kvm.capabilities
            # Guest RAM is sparse: it must not reserve swap for all of itself.
            self.ram_map_flags: int = lib.MAP_NORESERVE
            install_kick_handler()
        except BaseException:
            self.kvm.close()
            raise

    def max_vcpus(self) -> int:
        return self.kvm.check_extension(lib.KVM_CAP_MAX_VCPUS)

    def supported_cpuid(self) -> list[CpuidEntry]:
        return self.kvm.supported_cpuid()

    def create_vm(self, *, irqchip: bool, scratch_base: int) -> Vm:
        """A VM with, if asked, KVM's irqchip and PIT.

        ``scratch_base`` is 4 pages of non-RAM space: three for the real-mode
        TSS and one for the identity map that KVM on Intel needs.
        """
        vm = self.kvm.create_vm()
        try:
            vm.set_tss_addr(scratch_base + 0x1000)
            if self.kvm.check_extension(lib.KVM_CAP_SET_IDENTITY_MAP_ADDR):
                vm.set_identity_map_addr(scratch_base)
            if irqchip:
                vm.create_irqchip()
                vm.create_pit2()
        except BaseException:
            vm.close()
            raise
        return vm

    def msr_index_list(self) -> list[int]:
        return self.kvm.msr_index_list()

    def describe(self) -> str:
        return format_info(gather(self.kvm))

    def close(self) -> None:
        self.kvm.close()

    def __enter__(self) -> KvmBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
