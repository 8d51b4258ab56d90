"""What the host's KVM offers: its module, the CPU and KVM's capabilities (``kvmpy info``)."""

from __future__ import annotations

from kvmpy.backends.kvm._kvm import lib
from kvmpy.backends.kvm.ioctls import Kvm
from kvmpy.hostinfo import MODULE_DESCRIPTIONS, cpuinfo_fields, kvm_modules
from kvmpy.records import Record
from kvmpy.x86.cpuid import vendor

# Capabilities worth showing, in the order shown.
KEY_CAPABILITIES = (
    "USER_MEMORY", "SET_TSS_ADDR", "SET_IDENTITY_MAP_ADDR", "EXT_CPUID", "IRQCHIP", "PIT2",
    "HLT", "MP_STATE", "IMMEDIATE_EXIT", "SET_GUEST_DEBUG", "X86_ROBUST_SINGLESTEP",
    "XSAVE", "XCRS", "DEBUGREGS", "TSC_DEADLINE_TIMER", "INTERNAL_ERROR_DATA",
    "ADJUST_CLOCK", "READONLY_MEM", "NR_VCPUS", "MAX_VCPUS", "NR_MEMSLOTS",
)  # fmt: skip
# Capabilities whose value is a count rather than yes/no.
COUNT_CAPABILITIES = {"NR_VCPUS", "MAX_VCPUS", "NR_MEMSLOTS"}


class HostInfo(Record, frozen=False):
    api_version: int
    modules: list[str]
    cpu_vendor: str
    cpu_model: str
    virtualization_flags: list[str]
    vcpu_mmap_size: int
    capabilities: dict[str, int]


def gather(kvm: Kvm) -> HostInfo:
    cpu = cpuinfo_fields()
    flags = set(cpu.get("flags", "").split())
    return HostInfo(
        api_version=kvm.api_version(),
        modules=kvm_modules(),
        cpu_vendor=cpu.get("vendor_id") or vendor(kvm.supported_cpuid()),
        cpu_model=cpu.get("model name", "unknown"),
        virtualization_flags=sorted(flags & {"vmx", "svm", "hypervisor"}),
        vcpu_mmap_size=kvm.vcpu_mmap_size(),
        capabilities={
            name: kvm.check_extension(getattr(lib, f"KVM_CAP_{name}")) for name in KEY_CAPABILITIES
        },
    )


def format_info(info: HostInfo) -> str:
    modules = ", ".join(
        f"{m} ({MODULE_DESCRIPTIONS[m]})" if m in MODULE_DESCRIPTIONS else m for m in info.modules
    )
    lines = [
        f"KVM API version:   {info.api_version}",
        f"KVM module:        {modules or 'none found in /sys/module'}",
        f"CPU:               {info.cpu_vendor}, {info.cpu_model}",
        f"CPU flags:         {' '.join(info.virtualization_flags) or 'no vmx/svm'}",
        f"vCPU mmap size:    {info.vcpu_mmap_size} bytes",
        "Capabilities:",
    ]
    for name, value in info.capabilities.items():
        shown = str(value) if name in COUNT_CAPABILITIES else ("yes" if value else "no")
        lines.append(f"  {name:<24} {shown}")
    return "\n".join(lines)
