"""CPUID entries as plain data, and the per-vCPU adjustments KVM leaves to us.

KVM_GET_SUPPORTED_CPUID says what the host can virtualise; userspace passes a
(possibly edited) copy to each vCPU with KVM_SET_CPUID2.  The APIC ID fields
must differ per vCPU, which KVM does not fill in for us.
"""

from __future__ import annotations

import functools
from pathlib import Path

from kvmpy.records import Record, replace

# Leaf 1 ECX bit 31: "running under a hypervisor", as every VMM reports it.
LEAF1_ECX_HYPERVISOR = 1 << 31
# The processor brand string: 48 bytes in leaves 0x80000002-0x80000004.
BRAND_LEAVES = (0x80000002, 0x80000003, 0x80000004)
BRAND_SIZE = 48
EXTENDED_MAX_LEAF = 0x80000000
DEFAULT_BRAND = "kvmpy virtual CPU"


class CpuidEntry(Record):
    """One ``struct kvm_cpuid_entry2``."""

    function: int
    index: int = 0
    flags: int = 0
    eax: int = 0
    ebx: int = 0
    ecx: int = 0
    edx: int = 0


@functools.cache
def host_brand() -> str:
    """The host CPU's brand string (what QEMU's -cpu host passes on), or kvmpy's own."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return DEFAULT_BRAND


def brand_entries(brand: str) -> list[CpuidEntry]:
    """Leaves 0x80000002-0x80000004 spelling ``brand`` (ASCII, NUL-padded to 48 bytes)."""
    raw = brand.encode("ascii", "replace")[: BRAND_SIZE - 1].ljust(BRAND_SIZE, b"\0")
    entries = []
    for n, function in enumerate(BRAND_LEAVES):
        chunk = raw[16 * n : 16 * n + 16]
        regs = [int.from_bytes(chunk[i : i + 4], "little") for i in range(0, 16, 4)]
        entries.append(CpuidEntry(function, eax=regs[0], ebx=regs[1], ecx=regs[2], edx=regs[3]))
    return entries


def _with_brand(table: list[CpuidEntry], brand: str) -> list[CpuidEntry]:
    """``table`` with the brand leaves filled in where KVM left them empty."""
    if not any(entry.function == EXTENDED_MAX_LEAF for entry in table):
        return table  # no extended leaves at all: a guest would not look
    if any(
        entry.eax or entry.ebx or entry.ecx or entry.edx
        for entry in table
        if entry.function in BRAND_LEAVES
    ):
        return table  # KVM already says something: keep it
    result = [
        replace(entry, eax=max(entry.eax, BRAND_LEAVES[-1]))
        if entry.function == EXTENDED_MAX_LEAF
        else entry
        for entry in table
        if entry.function not in BRAND_LEAVES
    ]
    return result + brand_entries(brand)


def vcpu_cpuid(
    supported: list[CpuidEntry], apic_id: int, brand: str | None = None
) -> list[CpuidEntry]:
    """Return the CPUID table for the vCPU with ``apic_id``.

    Sets the initial APIC ID in leaf 1 (EBX[31:24]) and the x2APIC ID in
    leaves 0xB and 0x1F (EDX), and the hypervisor bit.  KVM leaves the
    brand string (0x80000002-4) empty; it gets ``brand``, by default the
    host's, as QEMU's -cpu host gives it (Linux prints it, memtest86+ shows it).
    """
    supported = _with_brand(supported, host_brand() if brand is None else brand)
    table = []
    for entry in supported:
        if entry.function == 1:
            entry = replace(
                entry,
                ebx=(entry.ebx & 0x00FFFFFF) | ((apic_id & 0xFF) << 24),
                ecx=entry.ecx | LEAF1_ECX_HYPERVISOR,
            )
        elif entry.function in (0xB, 0x1F):
            entry = replace(entry, edx=apic_id)
        table.append(entry)
    return table


def vendor(supported: list[CpuidEntry]) -> str:
    """The vendor string from leaf 0 (for example "GenuineIntel")."""
    for entry in supported:
        if entry.function == 0:
            raw = b"".join(r.to_bytes(4, "little") for r in (entry.ebx, entry.edx, entry.ecx))
            return raw.decode("ascii", "replace")
    return "unknown"
