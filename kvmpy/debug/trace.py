"""Watching exits: a one-line-per-exit tracer and perf-kvm-style exit statistics.

Both are ``ExitObserver``s: set ``machine.observer`` (or combine several with
``CompositeObserver``) and the vCPUs run the observed loop.  With no observer
the run loop's fast path is untouched, so tracing off costs nothing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, TextIO

from kvmpy.backends.exits import ANSWERED_IN_BACKEND, EXIT_NAMES, ExitKind
from kvmpy.bus import Bus
from kvmpy.debug.guestview import capstone_mode, code_address, disassemble, read_linear
from kvmpy.records import Record
from kvmpy.runloop import ExitCounter, ExitObserver
from kvmpy.x86.registers import Sregs, cpu_mode

if TYPE_CHECKING:
    from kvmpy.backends.base import Vcpu
    from kvmpy.memory import GuestMemory

# What --trace=KINDS can select.
# "emulated": instructions kvmpy completed for the backend (kvmpy/x86/complete.py).
TRACE_KINDS = ("io", "mmio", "hlt", "debug", "other", "emulated")
_STRING_IO_MNEMONICS = frozenset(("insb", "insw", "insd", "outsb", "outsw", "outsd"))
_MAX_INSN = 15


def exit_kind(reason: int) -> str:
    """The --trace filter an exit reason belongs to."""
    if reason in (ExitKind.PORT_OUT, ExitKind.PORT_IN, ExitKind.PORT_STRING):
        return "io"
    if reason == ExitKind.MMIO:
        return "mmio"
    if reason == ExitKind.HLT:
        return "hlt"
    if reason == ExitKind.DEBUG:
        return "debug"
    return "other"


def exit_name(reason: int, mmio_is_write: bool | None = None) -> str:
    """A short name: IO_OUT, IO_IN, IO_STRING, MMIO_READ, MMIO_WRITE, HLT, ..."""
    if reason == ExitKind.PORT_OUT:
        return "IO_OUT"
    if reason == ExitKind.PORT_IN:
        return "IO_IN"
    if reason == ExitKind.PORT_STRING:
        return "IO_STRING"
    if reason == ExitKind.MMIO and mmio_is_write is not None:
        return "MMIO_WRITE" if mmio_is_write else "MMIO_READ"
    try:
        return EXIT_NAMES[ExitKind(reason)]
    except ValueError:
        return str(reason)


def parse_trace_kinds(text: str | None) -> set[str]:
    """``None`` or "" means everything; else a comma-separated subset of TRACE_KINDS."""
    if not text:
        return set(TRACE_KINDS)
    kinds = {kind.strip() for kind in text.split(",") if kind.strip()}
    unknown = kinds - set(TRACE_KINDS)
    if unknown:
        raise ValueError(
            f"unknown trace kind {', '.join(sorted(unknown))} "
            f"(choose from {', '.join(TRACE_KINDS)})"
        )
    return kinds


def format_address(sregs: Sregs, rip: int) -> str:
    """CS:IP in real mode, a linear address otherwise."""
    if cpu_mode(sregs) == "real":
        return f"{sregs.cs.selector:04x}:{rip & 0xFFFF:04x}"
    return f"{code_address(sregs, rip):#x}"


def exiting_instruction(
    vcpu: Vcpu, memory: GuestMemory, sregs: Sregs, rip: int, reason: int
) -> tuple[int, str]:
    """The instruction behind an exit, as (linear address, text).

    KVM has already moved RIP past a completed OUT, HLT or MMIO write when it
    exits, but not past an IN or an MMIO read, which finish on the next
    KVM_RUN.  So look for the instruction that ends at RIP first for the
    former, and at RIP first for the latter, keeping the first that fits.
    """
    mode = capstone_mode(sregs)
    here = code_address(sregs, rip)
    start = max(here - _MAX_INSN, 0)
    try:
        code = read_linear(vcpu, memory, sregs, start, here - start + _MAX_INSN)
    except OSError:
        return here, "(code unreadable)"
    decoded = disassemble(code[here - start :], here, mode, 1)
    at_rip = (here, decoded[0][2]) if decoded else (here, "(undecodable)")
    fits, before_rip = _exit_signature(vcpu, reason)
    if fits is None:
        return at_rip
    ending_at_rip = None
    for back in range(1, here - start + 1):
        candidate = disassemble(code[here - start - back :], here - back, mode, 1)
        if candidate and candidate[0][1] == back and fits(candidate[0][2]):
            ending_at_rip = (here - back, candidate[0][2])
            break
    matches_at_rip = at_rip if decoded and fits(at_rip[1]) else None
    order = (ending_at_rip, matches_at_rip) if before_rip else (matches_at_rip, ending_at_rip)
    return next((found for found in order if found is not None), at_rip)


def _exit_signature(vcpu: Vcpu, reason: int) -> tuple[Callable[[str], bool] | None, bool]:
    """What the exiting instruction looks like, and whether RIP is already past it."""
    if reason == ExitKind.PORT_OUT:
        return (lambda text: _mnemonic(text) == "out"), True
    if reason == ExitKind.PORT_IN:
        return (lambda text: _mnemonic(text) == "in"), False
    if reason == ExitKind.PORT_STRING:
        return (lambda text: _mnemonic(text) in _STRING_IO_MNEMONICS), False
    if reason == ExitKind.HLT:
        return (lambda text: _mnemonic(text) == "hlt"), True
    if reason == ExitKind.MMIO:
        return (lambda text: "[" in text), bool(vcpu.exit.mmio_is_write)
    return None, False


def _mnemonic(text: str) -> str:
    """The operation of a disassembled instruction, prefixes such as rep dropped."""
    words = text.split()
    while len(words) > 1 and words[0] in ("rep", "repe", "repne", "lock"):
        words = words[1:]
    return words[0] if words else ""


class CompositeObserver(ExitObserver):
    """Several observers, called in order (for example a tracer and statistics)."""

    def __init__(self, observers: Iterable[ExitObserver]) -> None:
        self.observers = list(observers)

    def on_start(self, vcpu: Vcpu) -> None:
        for observer in self.observers:
            observer.on_start(vcpu)

    def on_stop(self, vcpu: Vcpu) -> None:
        for observer in self.observers:
            observer.on_stop(vcpu)

    def on_exit(self, vcpu: Vcpu, reason: int, run_ns: int, handle_ns: int) -> None:
        for observer in self.observers:
            observer.on_exit(vcpu, reason, run_ns, handle_ns)

    def on_debug(self, vcpu: Vcpu) -> bool:
        return any(observer.on_debug(vcpu) for observer in self.observers)

    def on_interrupt(self, vcpu: Vcpu) -> None:
        for observer in self.observers:
            observer.on_interrupt(vcpu)


class ExitTracer(ExitObserver):
    """Writes one line per exit of the selected kinds to ``output``.

    [vcpu0] IO_OUT     real      0000:7c06  out dx, al  port=0x3f8 size=1 data=0x41
    """

    def __init__(self, memory: GuestMemory, output: TextIO, kinds: Iterable[str] = TRACE_KINDS):
        self.memory = memory
        self.output = output
        self.kinds = set(kinds)
        self._lock = threading.Lock()

    def on_exit(self, vcpu: Vcpu, reason: int, run_ns: int, handle_ns: int) -> None:
        if exit_kind(reason) not in self.kinds:
            return
        line = self.describe(vcpu, reason)
        with self._lock:
            self.output.write(line + "\n")
            self.output.flush()

    def describe(self, vcpu: Vcpu, reason: int) -> str:
        regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
        address, text = exiting_instruction(vcpu, self.memory, sregs, regs.rip, reason)
        where = format_address(
            sregs, address - sregs.cs.base if cpu_mode(sregs) == "real" else address
        )
        name = exit_name(reason, bool(vcpu.exit.mmio_is_write))
        if reason == ExitKind.OTHER:
            name = vcpu.exit_name().removeprefix("KVM_EXIT_")
        line = f"[vcpu{vcpu.index}] {name:<10} {cpu_mode(sregs):<9} {where:<11} {text}"
        return line + self._data(vcpu, reason)

    def _data(self, vcpu: Vcpu, reason: int) -> str:
        e = vcpu.exit
        if reason in (ExitKind.PORT_OUT, ExitKind.PORT_IN):
            # For IN, the handler has already put the answer in the kvm_run page.
            value = int.from_bytes(
                vcpu.io_buffer[e.data_offset : e.data_offset + e.io_size], "little"
            )
            return f"  port={e.io_port:#x} size={e.io_size} data={value:#x}"
        if reason == ExitKind.PORT_STRING:
            return f"  port={e.io_port:#x} size={e.io_size} count={e.io_count}"
        if reason == ExitKind.MMIO:
            value = int.from_bytes(
                vcpu.io_buffer[e.data_offset : e.data_offset + e.mmio_len], "little"
            )
            return f"  addr={e.mmio_addr:#x} size={e.mmio_len} data={value:#x}"
        return ""


class StatsRow(Record, frozen=False):
    count: int = 0
    run_ns: int = 0
    handle_ns: int = 0


class ExitStats(ExitCounter):
    """Exit statistics in the spirit of ``perf kvm stat``: counts and times per
    exit reason and per port or MMIO page, with the device that owns it."""

    def __init__(self, ports: Bus, mmio: Bus) -> None:
        super().__init__()
        self.ports = ports
        self.mmio = mmio
        self.started = time.perf_counter()

    def rows(self) -> list[tuple[str, str, StatsRow]]:
        """(exit name, device or address, totals), merged over vCPUs, busiest first."""
        merged: dict[tuple[str, str], StatsRow] = {}
        for table in self.tables.values():
            for key, (count, run_ns, handle_ns) in table.items():
                reason, where = key >> 40, key & ((1 << 40) - 1)
                name = exit_name(reason)
                if key != self.OVERFLOW_KEY and key & ANSWERED_IN_BACKEND:
                    reason &= ~(ANSWERED_IN_BACKEND >> 40)
                    name = exit_name(reason) + "*"
                total = merged.setdefault((name, self._where(reason, where)), StatsRow())
                total.count += count
                total.run_ns += run_ns
                total.handle_ns += handle_ns
        ordered = sorted(merged.items(), key=lambda item: -(item[1].run_ns + item[1].handle_ns))
        return [(name, where, row) for (name, where), row in ordered]

    def _where(self, reason: int, where: int) -> str:
        if reason in (ExitKind.PORT_OUT, ExitKind.PORT_IN):
            mapping = self.ports.find(where)
            return f"{where:#x} {mapping.name if mapping else '(none)'}"
        if reason == ExitKind.MMIO:
            mapping = self.mmio.find(where << 12)
            return f"{where << 12:#x} {mapping.name if mapping else '(none)'}"
        return ""

    def format(self) -> str:
        rows = self.rows()
        wall = time.perf_counter() - self.started
        total_ns = sum(row.run_ns + row.handle_ns for _, _, row in rows) or 1
        exits = sum(row.count for _, _, row in rows)
        lines = [
            f"kvmpy exit statistics: {exits} exits on {len(self.tables)} vCPU(s) in {wall:.3f} s",
            f"{'exit':<14}{'port/address':<22}{'count':>9}"
            f"{'KVM_RUN total':>15}{'mean':>12}{'handler total':>15}{'mean':>12}{'share':>8}",
        ]
        for name, where, row in rows:
            count = max(row.count, 1)
            lines.append(
                f"{name:<14}{where:<22}{row.count:>9}"
                f"{_ms(row.run_ns):>15}{_us(row.run_ns / count):>12}"
                f"{_ms(row.handle_ns):>15}{_us(row.handle_ns / count):>12}"
                f"{100 * (row.run_ns + row.handle_ns) / total_ns:>7.1f}%"
            )
        if any(name.endswith("*") for name, _, _ in rows):
            lines.append("* answered in the KVM shim without Python (exit windows)")
        return "\n".join(lines)


def _ms(ns: float) -> str:
    return f"{ns / 1e6:.3f} ms"


def _us(ns: float) -> str:
    return f"{ns / 1e3:.2f} us"
