"""What the host offers: the KVM module, the CPU and KVM's capabilities."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kvmpy._kvm import lib
from kvmpy.kvm import Kvm
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

MODULE_DESCRIPTIONS = {
    "kvm_intel": "Intel VT-x",
    "kvm_amd": "AMD-V (SVM)",
    "kvm_pvm": "PVM: software-assisted KVM without VT-x/AMD-V (CPL0 guest code is emulated)",
}


@dataclass
class HostInfo:
    api_version: int
    modules: list[str]
    cpu_vendor: str
    cpu_model: str
    virtualization_flags: list[str]
    vcpu_mmap_size: int
    capabilities: dict[str, int]


def kvm_modules(sys_module: Path = Path("/sys/module")) -> list[str]:
    """The loaded KVM back-end modules (kvm_intel, kvm_amd, kvm_pvm, ...)."""
    try:
        return sorted(p.name for p in sys_module.iterdir() if p.name.startswith("kvm_"))
    except OSError:
        return []


def cpuinfo_fields(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, str]:
    """The first processor's fields from /proc/cpuinfo."""
    fields: dict[str, str] = {}
    try:
        text = cpuinfo.read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        if not line.strip():
            break
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


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
