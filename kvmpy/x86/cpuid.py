"""CPUID entries as plain data, and the per-vCPU adjustments KVM leaves to us.

KVM_GET_SUPPORTED_CPUID says what the host can virtualise; userspace passes a
(possibly edited) copy to each vCPU with KVM_SET_CPUID2.  The APIC ID fields
must differ per vCPU, which KVM does not fill in for us.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# Leaf 1 ECX bit 31: "running under a hypervisor", as every VMM reports it.
LEAF1_ECX_HYPERVISOR = 1 << 31


@dataclass(frozen=True)
class CpuidEntry:
    """One ``struct kvm_cpuid_entry2``."""

    function: int
    index: int = 0
    flags: int = 0
    eax: int = 0
    ebx: int = 0
    ecx: int = 0
    edx: int = 0


def vcpu_cpuid(supported: list[CpuidEntry], apic_id: int) -> list[CpuidEntry]:
    """Return the CPUID table for the vCPU with ``apic_id``.

    Sets the initial APIC ID in leaf 1 (EBX[31:24]) and the x2APIC ID in
    leaves 0xB and 0x1F (EDX), and the hypervisor bit.
    """
    table = []
    for entry in supported:
        if entry.function == 1:
            entry = dataclasses.replace(
                entry,
                ebx=(entry.ebx & 0x00FFFFFF) | ((apic_id & 0xFF) << 24),
                ecx=entry.ecx | LEAF1_ECX_HYPERVISOR,
            )
        elif entry.function in (0xB, 0x1F):
            entry = dataclasses.replace(entry, edx=apic_id)
        table.append(entry)
    return table


def vendor(supported: list[CpuidEntry]) -> str:
    """The vendor string from leaf 0 (for example "GenuineIntel")."""
    for entry in supported:
        if entry.function == 0:
            raw = b"".join(r.to_bytes(4, "little") for r in (entry.ebx, entry.edx, entry.ecx))
            return raw.decode("ascii", "replace")
    return "unknown"
