"""QEMU's -smp spelling, and the CPUID leaves that describe the topology."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from kvmpy.loaders.flat import load_flat
from kvmpy.machine import Machine
from kvmpy.x86.cpuid import CpuidEntry
from kvmpy.x86.topology import CpuTopology, apply_topology, checked_topology, parse_smp
from tests.helpers import Assembler, host_kvm_module


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1", (1, 1, 1)),
        ("4", (1, 4, 1)),  # QEMU's PC since 6.2: cores first
        ("cpus=3", (1, 3, 1)),
        ("4,sockets=2", (2, 2, 1)),
        ("8,threads=2", (1, 4, 2)),
        ("4,cores=2", (2, 2, 1)),
        ("sockets=2,cores=2,threads=2", (2, 2, 2)),
        ("8,sockets=2,cores=2", (2, 2, 2)),
        ("4,maxcpus=4,dies=1", (1, 4, 1)),
        ("3,threads=3", (1, 1, 3)),
        ("6,cores=3,threads=2", (1, 3, 2)),
    ],
)
def test_smp_fills_what_is_left_out_as_qemu_does(text: str, expected: tuple[int, int, int]) -> None:
    topology = parse_smp(text)
    assert (topology.sockets, topology.cores, topology.threads) == expected


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("0", "must be at least 1"),
        ("x", "not a number"),
        ("4,foo=1", "unknown key 'foo'"),
        ("4,2", "needs a key"),
        ("4,cpus=4", "cpus given twice"),
        ("4,maxcpus=8", "no CPU hot-plug"),
        ("4,sockets=3", "= 3, not the 4 CPUs asked for"),
        ("4,dies=2", "one die per socket"),
        ("6,sockets=2,cores=3", "power of two cores per socket"),
        ("6,cores=2,threads=3", "power of two threads per core"),
        ("cpus=99999", "not a count from 1 to"),
    ],
)
def test_smp_refuses_what_kvmpy_cannot_give(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_smp(text)


def test_checked_topology_refuses_non_counts() -> None:
    with pytest.raises(ValueError, match="sockets=True"):
        checked_topology(True, 1, 1)
    assert checked_topology(2, 4, 2) == CpuTopology(2, 4, 2)


def _table() -> list[CpuidEntry]:
    return [
        CpuidEntry(1, eax=0x806F8, ebx=0x00FF0800, edx=1 << 28),
        CpuidEntry(4, 0, eax=0x121 | 0xFC00_0000, flags=1),  # L1 data, host: 64 cores
        CpuidEntry(4, 3, eax=0x163, flags=1),  # L3
        CpuidEntry(4, 4, eax=0, flags=1),  # the end of the list
        CpuidEntry(0xB, 0, eax=1, ebx=2, ecx=0x100, edx=9, flags=1),
        CpuidEntry(0xB, 1, eax=7, ebx=128, ecx=0x201, edx=9, flags=1),
        CpuidEntry(0xB, 2, ecx=2, edx=9, flags=1),
        CpuidEntry(0x80000008, ecx=0x3707F),  # PerfTscSize (bits 16-17) kept
        CpuidEntry(0x8000001E, eax=9, ebx=0x0105, ecx=0x0301),
    ]


def _leaf(table: list[CpuidEntry], function: int, index: int = 0) -> CpuidEntry:
    return next(e for e in table if e.function == function and e.index == index)


def test_leaves_describe_two_sockets_of_two_cores_of_two_threads() -> None:
    topology = CpuTopology(2, 2, 2)
    apic_id = 0b101  # socket 1, core 0, thread 1
    table = apply_topology(_table(), topology, apic_id)
    leaf1 = _leaf(table, 1)
    assert (leaf1.ebx >> 16) & 0xFF == 4 and leaf1.edx & (1 << 28)
    assert leaf1.ebx & 0xFF00FFFF == 0x00000800  # the rest kept (APIC ID is vcpu_cpuid's)
    l1 = _leaf(table, 4, 0)
    assert (l1.eax >> 26) + 1 == 2 and ((l1.eax >> 14) & 0xFFF) + 1 == 2
    assert l1.eax & 0x3FFF == 0x121
    l3 = _leaf(table, 4, 3)
    assert ((l3.eax >> 14) & 0xFFF) + 1 == 4  # the package's four threads share it
    assert _leaf(table, 4, 4).eax == 0
    smt, core, end = (_leaf(table, 0xB, n) for n in range(3))
    assert (smt.eax, smt.ebx, smt.ecx, smt.edx) == (1, 2, 0x100, apic_id)
    assert (core.eax, core.ebx, core.ecx, core.edx) == (2, 4, 0x201, apic_id)
    assert (end.eax, end.ebx, end.ecx, end.edx) == (0, 0, 2, apic_id)
    amd = _leaf(table, 0x80000008)
    assert amd.ecx & 0xFF == 3 and (amd.ecx >> 12) & 0xF == 2 and amd.ecx >> 16 == 3
    ext = _leaf(table, 0x8000001E)
    assert ext.eax == apic_id and (ext.ebx >> 8) & 0xFF == 1 and ext.ebx & 0xFF == 0
    assert ext.ecx & 0xFF == 1  # node: the socket


def test_one_cpu_clears_the_multi_threading_flag() -> None:
    table = apply_topology(_table(), CpuTopology(), 0)
    leaf1 = _leaf(table, 1)
    assert not leaf1.edx & (1 << 28) and (leaf1.ebx >> 16) & 0xFF == 1
    assert _leaf(table, 0xB, 0).ebx == 1 and _leaf(table, 0xB, 1).ebx == 1
    assert _leaf(table, 0x80000008).ecx & 0xFF == 0


def test_three_cores_take_two_apic_id_bits() -> None:
    topology = CpuTopology(1, 3, 1)
    assert (topology.thread_bits, topology.core_bits) == (0, 2)
    core = _leaf(apply_topology(_table(), topology, 2), 0xB, 1)
    assert (core.eax, core.ebx) == (2, 3)


CPUID_PROBE = """
    mov $0xB, %eax
    mov $1, %ecx
    cpuid
    mov %eax, 0x200000
    mov %ebx, 0x200004
    mov $1, %eax
    cpuid
    mov %ebx, 0x200008
    mov %edx, 0x20000c
    mov $0, %al
    out %al, $0xf4
"""


@pytest.mark.kvm
def test_the_guest_reads_the_topology_it_was_given(assemble: Assembler) -> None:
    image = assemble(CPUID_PROBE, "long")
    with Machine(mem_size=4 << 20, topology=parse_smp("4,sockets=1,cores=2,threads=2")) as m:
        assert len(m.vcpus) == 4
        m.load(load_flat(image, 0x100000), mode="long")
        assert m.run(timeout=30).exit_code == 0  # the debug-exit write
        shift, count, leaf1_ebx, leaf1_edx = struct.unpack("<4I", m.memory.read(0x200000, 16))
    if host_kvm_module() == "kvm_pvm":
        pytest.skip("PVM takes KVM_SET_CPUID2 but its guests see the host's CPUID (HOST-KVM.md)")
    if any(e.function == 0xB for e in m.arch.supported_cpuid):
        assert (shift, count) == (2, 4)  # the core level: two bits, four threads
    assert (leaf1_ebx >> 16) & 0xFF == 4 and leaf1_edx & (1 << 28)
    assert leaf1_ebx >> 24 == 0  # the BSP's initial APIC ID


@pytest.mark.kvm
def test_a_snapshot_keeps_the_topology(tmp_path: Path) -> None:
    with Machine(mem_size=4 << 20, topology=CpuTopology(2, 1, 2)) as m:
        m.snapshot(tmp_path / "snap")
    with Machine.restore(tmp_path / "snap") as restored:
        assert restored.topology == CpuTopology(2, 1, 2) and len(restored.vcpus) == 4
