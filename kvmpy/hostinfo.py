"""Facts about the host that need no backend: its KVM modules and its CPU."""

from __future__ import annotations

from pathlib import Path

MODULE_DESCRIPTIONS = {
    "kvm_intel": "Intel VT-x",
    "kvm_amd": "AMD-V (SVM)",
    "kvm_pvm": "PVM: software-assisted KVM without VT-x/AMD-V (CPL0 guest code is emulated)",
}


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
