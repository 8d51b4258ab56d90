"""Unit tests for the per-vCPU CPUID adjustments (kvmpy.x86.cpuid)."""

from __future__ import annotations

import pytest

from kvmpy import records
from kvmpy.x86.cpuid import LEAF1_ECX_HYPERVISOR, CpuidEntry, vcpu_cpuid, vendor

# "GenuineIntel" in EBX, EDX, ECX order.
INTEL_LEAF0 = CpuidEntry(0, eax=0x1F, ebx=0x756E_6547, edx=0x4965_6E69, ecx=0x6C65_746E)
AMD_LEAF0 = CpuidEntry(0, eax=0x10, ebx=0x6874_7541, edx=0x6974_6E65, ecx=0x444D_4163)


def supported() -> list[CpuidEntry]:
    """A small KVM_GET_SUPPORTED_CPUID-like table."""
    return [
        INTEL_LEAF0,
        # Leaf 1: stepping info in EAX; EBX = APIC ID 0x7f | 16 logical | CLFLUSH 8 | brand 1.
        CpuidEntry(1, eax=0x000906EA, ebx=0x7F10_0801, ecx=0x7FFA_FBFF, edx=0xBFEB_FBFF),
        CpuidEntry(4, index=0, flags=1, eax=0x1C00_4121, ebx=0x01C0_003F),
        CpuidEntry(7, index=0, flags=1, ebx=0x029C_6FBF),
        CpuidEntry(0xB, index=0, flags=1, eax=1, ebx=2, ecx=0x100, edx=0x55),
        CpuidEntry(0xB, index=1, flags=1, eax=4, ebx=16, ecx=0x201, edx=0x55),
        CpuidEntry(0x1F, index=0, flags=1, eax=1, ebx=2, ecx=0x100, edx=0x66),
        CpuidEntry(0x4000_0000, eax=0x4000_0001, ebx=0x4B4D_564B),
        CpuidEntry(0x8000_0001, ecx=0x121, edx=0x2C10_0800),
    ]


def by_key(table: list[CpuidEntry]) -> dict[tuple[int, int], CpuidEntry]:
    return {(e.function, e.index): e for e in table}


@pytest.mark.parametrize("apic_id", [0, 1, 3, 0x7F, 0xFF])
def test_leaf1_gets_the_apic_id(apic_id: int) -> None:
    leaf1 = by_key(vcpu_cpuid(supported(), apic_id))[(1, 0)]
    assert leaf1.ebx >> 24 == apic_id
    # The other EBX fields (brand index, CLFLUSH size, logical count) stay.
    assert leaf1.ebx & 0x00FF_FFFF == 0x10_0801
    assert leaf1.eax == 0x000906EA
    assert leaf1.edx == 0xBFEB_FBFF


def test_leaf1_apic_id_is_eight_bits() -> None:
    leaf1 = by_key(vcpu_cpuid(supported(), 0x1_23))[(1, 0)]
    assert leaf1.ebx == 0x2310_0801


def test_hypervisor_bit_is_set() -> None:
    assert LEAF1_ECX_HYPERVISOR == 1 << 31
    leaf1 = by_key(vcpu_cpuid(supported(), 0))[(1, 0)]
    assert leaf1.ecx == 0x7FFA_FBFF | 1 << 31 == 0xFFFA_FBFF
    # Already set: stays set, nothing else changes.
    table = [CpuidEntry(1, ecx=0x8000_0001)]
    assert vcpu_cpuid(table, 0)[0].ecx == 0x8000_0001


@pytest.mark.parametrize("apic_id", [0, 2, 0xFF, 0x1_23])
def test_x2apic_leaves_get_the_full_apic_id(apic_id: int) -> None:
    table = by_key(vcpu_cpuid(supported(), apic_id))
    for key in [(0xB, 0), (0xB, 1), (0x1F, 0)]:
        entry = table[key]
        assert entry.edx == apic_id, key
        original = by_key(supported())[key]
        assert records.replace(entry, edx=original.edx) == original


def test_other_entries_are_untouched() -> None:
    before = supported()
    after = vcpu_cpuid(before, 5)
    assert len(after) == len(before)
    assert [(e.function, e.index) for e in after] == [(e.function, e.index) for e in before]
    changed = {(1, 0), (0xB, 0), (0xB, 1), (0x1F, 0)}
    for old, new in zip(before, after, strict=True):
        if (old.function, old.index) not in changed:
            assert new == old
            assert new is old


def test_input_is_not_mutated() -> None:
    table = supported()
    snapshot = list(table)
    result = vcpu_cpuid(table, 9)
    assert table == supported()
    assert all(a is b for a, b in zip(table, snapshot, strict=True))
    assert result is not table
    assert table[1].ebx == 0x7F10_0801
    assert table[1].ecx & LEAF1_ECX_HYPERVISOR == 0
    assert table[4].edx == 0x55


def test_entries_are_frozen() -> None:
    entry = CpuidEntry(1)
    with pytest.raises(records.FrozenRecordError):
        entry.ebx = 1  # type: ignore[misc]


def test_empty_table() -> None:
    assert vcpu_cpuid([], 1) == []


def test_per_vcpu_tables_differ_only_in_apic_ids() -> None:
    t0, t1 = vcpu_cpuid(supported(), 0), vcpu_cpuid(supported(), 1)
    differing = [(a.function, a.index) for a, b in zip(t0, t1, strict=True) if a != b]
    assert differing == [(1, 0), (0xB, 0), (0xB, 1), (0x1F, 0)]


def test_vendor() -> None:
    assert vendor(supported()) == "GenuineIntel"
    assert vendor([AMD_LEAF0]) == "AuthenticAMD"
    # Leaf 0 need not come first.
    assert vendor([CpuidEntry(1), CpuidEntry(7), AMD_LEAF0]) == "AuthenticAMD"


def test_vendor_unknown_without_leaf0() -> None:
    assert vendor([]) == "unknown"
    assert vendor([CpuidEntry(1), CpuidEntry(0x8000_0000)]) == "unknown"


def test_vendor_replaces_non_ascii() -> None:
    weird = CpuidEntry(0, ebx=0x4141_41FF, edx=0x4242_4242, ecx=0x4343_4343)
    assert vendor([weird]) == "\ufffdAAABBBBCCCC"


def test_an_empty_brand_string_is_filled_in() -> None:
    table = [*supported(), CpuidEntry(0x8000_0000, eax=0x8000_0001)]
    table += [CpuidEntry(leaf) for leaf in (0x8000_0002, 0x8000_0003, 0x8000_0004)]
    result = by_key(vcpu_cpuid(table, 0, brand="Test CPU @ 1.00GHz"))
    raw = b"".join(
        r.to_bytes(4, "little")
        for leaf in (0x8000_0002, 0x8000_0003, 0x8000_0004)
        for r in (result[(leaf, 0)].eax, result[(leaf, 0)].ebx, result[(leaf, 0)].ecx,
                  result[(leaf, 0)].edx)
    )  # fmt: skip
    assert raw == b"Test CPU @ 1.00GHz".ljust(48, b"\0")
    assert len([e for e in vcpu_cpuid(table, 0) if e.function == 0x8000_0002]) == 1


def test_the_brand_leaves_are_added_and_announced_when_missing() -> None:
    table = [*supported(), CpuidEntry(0x8000_0000, eax=0x8000_0001)]
    result = by_key(vcpu_cpuid(table, 0, brand="x" * 60))
    assert result[(0x8000_0000, 0)].eax == 0x8000_0004
    assert result[(0x8000_0004, 0)].edx >> 24 == 0  # at most 47 characters and a NUL


def test_a_brand_string_from_kvm_is_kept() -> None:
    table = [*supported(), CpuidEntry(0x8000_0000, eax=0x8000_0004)]
    table.append(CpuidEntry(0x8000_0002, eax=0x41414141))
    result = by_key(vcpu_cpuid(table, 0, brand="other"))
    assert result[(0x8000_0002, 0)].eax == 0x41414141
    # Without any extended leaves nothing is added.
    assert not any(e.function >= 0x8000_0000 for e in vcpu_cpuid(supported()[:3], 0))
