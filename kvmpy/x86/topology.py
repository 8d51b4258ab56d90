"""CPU topology: QEMU's ``-smp`` option, and the CPUID leaves that describe it.

``-smp 4``, ``-smp 4,sockets=2,cores=2``, ``-smp cpus=8,threads=2``: QEMU's
spelling, with its rules for what is left out (a missing sockets count fills
the rest, cores and threads default to one).  The guest learns the topology
from its APIC IDs and from CPUID: leaf 1 (logical processors per package),
leaf 4 (cores per package, threads per cache), leaves 0xB and 0x1F (the
x2APIC levels), 0x80000008 (AMD's core count) and 0x8000001E (AMD's threads
per core).  Only leaves the host already reports are changed.

APIC IDs are the vCPU numbers, 0 to N-1, as the MP table and the MADT list
them.  They equal QEMU's packed IDs (socket, core and thread fields side by
side, each as wide as its count needs) when no field leaves a gap: threads a
power of two unless there is one core in all, and cores a power of two unless
there is one socket.  kvmpy requires that; ``-smp N`` (N cores) always fits.
"""

from __future__ import annotations

from kvmpy.records import Record, replace
from kvmpy.x86.cpuid import CpuidEntry

# Leaf 0xB/0x1F ECX[15:8]: the level types.
LEVEL_INVALID = 0
LEVEL_SMT = 1
LEVEL_CORE = 2
LEAF1_EDX_HTT = 1 << 28
SMP_KEYS = ("cpus", "maxcpus", "sockets", "dies", "cores", "threads")
MAX_COUNT = 1 << 12  # per level: far beyond the 254 CPUs the firmware tables describe


class CpuTopology(Record):
    """Sockets, cores per socket and threads per core (build it with ``checked_topology``)."""

    sockets: int = 1
    cores: int = 1
    threads: int = 1

    @property
    def cpus(self) -> int:
        return self.sockets * self.cores * self.threads

    @property
    def thread_bits(self) -> int:
        """APIC ID bits that number the threads of a core."""
        return (self.threads - 1).bit_length()

    @property
    def core_bits(self) -> int:
        """APIC ID bits that number the cores of a socket."""
        return (self.cores - 1).bit_length()

    def describe(self) -> str:
        return f"{self.cpus} (sockets={self.sockets},cores={self.cores},threads={self.threads})"


def _smp_number(key: str, text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise ValueError(f"-smp {key}={text}: not a number") from None
    if value < 1:
        raise ValueError(f"-smp {key}={text}: must be at least 1")
    return value


def parse_smp(text: str) -> CpuTopology:
    """QEMU's ``-smp [[cpus=]N][,maxcpus=N][,sockets=N][,dies=1][,cores=N][,threads=N]``."""
    given: dict[str, int] = {}
    for position, item in enumerate(text.split(",")):
        key, equals, value = item.partition("=")
        if not equals:
            if position:
                raise ValueError(
                    f"-smp {text}: {item!r} needs a key (one of {', '.join(SMP_KEYS)})"
                )
            key, value = "cpus", item
        if key not in SMP_KEYS:
            raise ValueError(f"-smp {text}: unknown key {key!r} (one of {', '.join(SMP_KEYS)})")
        if key in given:
            raise ValueError(f"-smp {text}: {key} given twice")
        given[key] = _smp_number(key, value)
    if given.get("dies", 1) != 1:
        raise ValueError(f"-smp dies={given['dies']}: kvmpy's PC has one die per socket")
    # QEMU's rules (its PC since 6.2): missing counts are one, except that the
    # cores, else the sockets, else the threads fill what the CPU count leaves.
    wanted = given.get("maxcpus", given.get("cpus", 0))
    sockets, cores, threads = (given.get(key, 0) for key in ("sockets", "cores", "threads"))
    if not wanted:
        sockets, cores, threads = sockets or 1, cores or 1, threads or 1
    elif not cores:
        sockets, threads = sockets or 1, threads or 1
        cores = max(wanted // (sockets * threads), 1)
    elif not sockets:
        threads = threads or 1
        sockets = max(wanted // (cores * threads), 1)
    elif not threads:
        threads = max(wanted // (sockets * cores), 1)
    topology = CpuTopology(sockets, cores, threads)  # checked below
    maxcpus = given.get("maxcpus", given.get("cpus", topology.cpus))
    cpus = given.get("cpus", maxcpus)
    if topology.cpus != maxcpus:
        raise ValueError(
            f"-smp {text}: sockets ({sockets}) * cores ({cores}) * threads ({threads}) "
            f"= {topology.cpus}, not the {maxcpus} CPUs asked for"
        )
    if cpus != maxcpus:
        raise ValueError(
            f"-smp {text}: kvmpy has no CPU hot-plug, so all {maxcpus} CPUs are present "
            f"(cpus={cpus} must equal maxcpus)"
        )
    return checked_topology(sockets, cores, threads)


def checked_topology(sockets: int, cores: int, threads: int) -> CpuTopology:
    """A topology kvmpy can give a guest (ValueError naming the count it cannot)."""
    for key, value in (("sockets", sockets), ("cores", cores), ("threads", threads)):
        if type(value) is not int or not 1 <= value <= MAX_COUNT:
            raise ValueError(f"-smp {key}={value!r}: not a count from 1 to {MAX_COUNT}")
    # APIC IDs 0 to N-1 are QEMU's packed IDs (socket, core and thread fields)
    # when no field leaves a gap: see the module docstring.
    if sockets * cores > 1 and threads & (threads - 1):
        raise ValueError(
            f"-smp threads={threads}: with more than one core, kvmpy needs a power of two "
            "threads per core (it numbers APIC IDs 0 to N-1, without gaps)"
        )
    if sockets > 1 and cores & (cores - 1):
        raise ValueError(
            f"-smp cores={cores}: with more than one socket, kvmpy needs a power of two "
            "cores per socket (it numbers APIC IDs 0 to N-1, without gaps)"
        )
    return CpuTopology(sockets, cores, threads)


def _leaf4(entry: CpuidEntry, topology: CpuTopology) -> CpuidEntry:
    """Deterministic cache parameters: cores per package, and which threads share the cache."""
    cache_level = (entry.eax >> 5) & 7
    if not entry.eax & 0x1F:  # no cache: the list ends
        return entry
    sharing = topology.threads if cache_level < 3 else topology.cores * topology.threads
    eax = entry.eax & 0x3FFF
    eax |= (min(sharing, 1 << 12) - 1) << 14
    eax |= (min(topology.cores, 1 << 6) - 1) << 26
    return replace(entry, eax=eax)


def _x2apic_level(entry: CpuidEntry, topology: CpuTopology, apic_id: int) -> CpuidEntry:
    """Leaf 0xB or 0x1F, sub-leaf ``entry.index``: the SMT level, the core level, then none."""
    if entry.index == 0:
        shift, count, kind = topology.thread_bits, topology.threads, LEVEL_SMT
    elif entry.index == 1:
        shift = topology.thread_bits + topology.core_bits
        count, kind = topology.cores * topology.threads, LEVEL_CORE
    else:
        return replace(entry, eax=0, ebx=0, ecx=entry.index & 0xFF, edx=apic_id)
    return replace(entry, eax=shift, ebx=count, ecx=(kind << 8) | (entry.index & 0xFF), edx=apic_id)


def apply_topology(
    table: list[CpuidEntry], topology: CpuTopology, apic_id: int
) -> list[CpuidEntry]:
    """``table`` (one vCPU's) telling the guest ``topology`` and this vCPU's ``apic_id``."""
    per_package = topology.cores * topology.threads
    result = []
    for entry in table:
        if entry.function == 1:
            ebx = (entry.ebx & 0xFF00FFFF) | (min(per_package, 0xFF) << 16)
            edx = entry.edx | LEAF1_EDX_HTT if per_package > 1 else entry.edx & ~LEAF1_EDX_HTT
            entry = replace(entry, ebx=ebx, edx=edx)
        elif entry.function == 4:
            entry = _leaf4(entry, topology)
        elif entry.function in (0xB, 0x1F):
            entry = _x2apic_level(entry, topology, apic_id)
        elif entry.function == 0x80000008:
            # ECX: threads per package - 1, and the APIC ID bits that number them.
            bits = topology.thread_bits + topology.core_bits
            ecx = (entry.ecx & ~0xF0FF) | (bits << 12) | (per_package - 1)
            entry = replace(entry, ecx=ecx)
        elif entry.function == 0x8000001E:
            # EAX the extended APIC ID, EBX[15:8] threads per core - 1 and the core ID.
            core = (apic_id >> topology.thread_bits) & ((1 << topology.core_bits) - 1)
            ebx = (entry.ebx & ~0xFFFF) | ((topology.threads - 1) << 8) | core
            ecx = entry.ecx & ~0xFF | (apic_id >> (topology.thread_bits + topology.core_bits))
            entry = replace(entry, eax=apic_id, ebx=ebx, ecx=ecx)
        result.append(entry)
    return result
