"""Instruction completion: finish in kvmpy what the backend could not emulate.

Some KVMs (PVM, see docs/completion.md) run CPL0 guest code through an
instruction emulator that gives up on instructions a CPU runs fine: int3,
int $n, popcnt, cmpxchg16b, clac/stac, xgetbv, fwait and more.  The vCPU
then stops with an internal error that carries the instruction's bytes.
``Completer.complete`` decodes them, and when it knows the instruction it
does exactly what the Intel SDM says (results, flags, faults), advances RIP
and lets the guest go on.  What is too complex to write by hand (SSE and x87
arithmetic) runs as one instruction on the CPU emulator (``kvmpy/x86/fallback.py``).
Whatever else it does not know stays a crash report.

Faults are raised into the guest, as the CPU would: #PF with CR2 for an
unmapped or forbidden page, #GP, #UD, #NM, #MF.  Software interrupts go
through the guest's IDT by injection (``Vcpu.inject_interrupt``) after the
gate's DPL check done here.  cmpxchg8b/16b run as the host CPU's own locked
instruction on guest RAM (``Vcpu.compare_exchange``), so they are atomic
against every vCPU.
"""

from __future__ import annotations

import functools
import struct
import threading
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kvmpy.backends.base import BackendError
from kvmpy.hostinfo import cpuinfo_fields
from kvmpy.memory import PAGE_SIZE, GuestMemoryError
from kvmpy.records import Record
from kvmpy.x86.registers import (
    CR0_EM,
    CR0_MP,
    CR0_NE,
    CR0_PG,
    CR0_TS,
    CR0_WP,
    CR4_OSFXSR,
    Fpu,
    Regs,
    Segment,
    Sregs,
    cpu_mode,
)

if TYPE_CHECKING:
    from kvmpy.backends.base import Vcpu
    from kvmpy.memory import GuestMemory
    from kvmpy.x86.cpuid import CpuidEntry
    from kvmpy.x86.fallback import Fallback

# Exception vectors (SDM Vol. 3A, 6.3.1).
DE, DB, BP, OF, UD, NM, GP, NP, SS_FAULT, PF, MF = 0, 1, 3, 4, 6, 7, 13, 11, 12, 14, 16

# RFLAGS bits.
CF, PF_FLAG, AF, ZF, SF, OF_FLAG, AC = 1, 1 << 2, 1 << 4, 1 << 6, 1 << 7, 1 << 11, 1 << 18
ARITH_FLAGS = CF | PF_FLAG | AF | ZF | SF | OF_FLAG

CR4_SMAP = 1 << 21
CR4_OSXSAVE = 1 << 18

# #PF error code bits.
PF_PRESENT, PF_WRITE, PF_USER = 1, 2, 4

# Of what completes, only these take a lock prefix; on anything else it is #UD.
_LOCKABLE = frozenset(("cmpxchg8b", "cmpxchg16b"))
_DECODE_CACHE_SIZE = 4096  # decoded instructions kept, by (mode, RIP, bytes)
_LEGACY_PREFIXES = frozenset((0x66, 0x67, 0xF0, 0xF2, 0xF3, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65))

# For a cmpxchg8b split across pages: such completions are atomic against each
# other (not against code KVM runs meanwhile); all others use the host's own
# locked instruction (Vcpu.compare_exchange).
_MEMORY_LOCK = threading.Lock()


class GuestFault(Exception):
    """The instruction faults: deliver ``vector`` to the guest with RIP unchanged."""

    def __init__(self, vector: int, error_code: int | None = None, cr2: int | None = None) -> None:
        super().__init__(vector, error_code, cr2)
        self.vector = vector
        self.error_code = error_code
        self.cr2 = cr2


# General-purpose register names as capstone spells them: (kvm_regs field, bit shift, bits).
_GPRS: dict[str, tuple[str, int, int]] = {}
for _full, _names in {
    "rax": ("eax", "ax", "al", "ah"),
    "rbx": ("ebx", "bx", "bl", "bh"),
    "rcx": ("ecx", "cx", "cl", "ch"),
    "rdx": ("edx", "dx", "dl", "dh"),
    "rsi": ("esi", "si", "sil", ""),
    "rdi": ("edi", "di", "dil", ""),
    "rsp": ("esp", "sp", "spl", ""),
    "rbp": ("ebp", "bp", "bpl", ""),
}.items():
    _GPRS[_full] = (_full, 0, 64)
    _GPRS[_names[0]] = (_full, 0, 32)
    _GPRS[_names[1]] = (_full, 0, 16)
    _GPRS[_names[2]] = (_full, 0, 8)
    if _names[3]:
        _GPRS[_names[3]] = (_full, 8, 8)
for _n in range(8, 16):
    _GPRS[f"r{_n}"] = (f"r{_n}", 0, 64)
    _GPRS[f"r{_n}d"] = (f"r{_n}", 0, 32)
    _GPRS[f"r{_n}w"] = (f"r{_n}", 0, 16)
    _GPRS[f"r{_n}b"] = (f"r{_n}", 0, 8)

# x87 constants as 80-bit values (sign+exponent, significand) rounded to nearest,
# and the rounding control values (down = 1, up = 2, chop = 3) that give one less or more.
_X87_CONSTANTS: dict[str, tuple[int, int, tuple[int, ...], int]] = {
    "fldz": (0x0000, 0, (), 0),
    "fld1": (0x3FFF, 0x8000000000000000, (), 0),
    "fldpi": (0x4000, 0xC90FDAA22168C235, (1, 3), -1),
    "fldl2e": (0x3FFF, 0xB8AA3B295C17F0BC, (1, 3), -1),
    "fldl2t": (0x4000, 0xD49A784BCD1B8AFE, (2,), +1),
    "fldlg2": (0x3FFD, 0x9A209A84FBCFF799, (1, 3), -1),
    "fldln2": (0x3FFE, 0xB17217F7D1CF79AC, (1, 3), -1),
}
_X87_INDEFINITE = (0xFFFF, 0xC000000000000000)


class _Insn(Record, frozen=False):
    mnemonic: str
    size: int
    operands: list[Any]
    prefixes: list[int]
    raw: Any  # the capstone instruction


def _decoder(bits: int) -> Any:
    import capstone

    mode = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}[bits]
    decoder = capstone.Cs(capstone.CS_ARCH_X86, mode)
    decoder.detail = True
    return decoder


class Completer:
    """Finishes instructions the backend gave up on; counts and reports each one."""

    def __init__(self, xsave_layout: dict[int, tuple[int, int, bool]] | None = None) -> None:
        self.enabled = True
        self.memory: GuestMemory | None = None
        # XSAVE component -> (offset, size, aligned when compacted), from CPUID leaf 0xD.
        self.xsave_layout = xsave_layout or {}
        self.counts: Counter[str] = Counter()
        # Called with (vCPU index, RIP, "mnemonic operands", what was done) after each one.
        self.on_complete: Callable[[int, int, str, str], None] | None = None
        self._lock = threading.Lock()
        self._decoders: dict[int, Any] = {}
        self._decoded: dict[tuple[int, int, bytes], _Insn] = {}
        # Off: instructions too complex to finish by hand stay crash reports.
        self.use_fallback = True
        self._fallback: Fallback | None = None

    def complete(self, vcpu: Vcpu) -> bool:
        """True if the failed instruction was completed (or faulted into the guest)."""
        if not self.enabled or self.memory is None:
            return False
        code = vcpu.failed_instruction()
        if not code:
            return False
        regs = vcpu.get_regs()
        sregs = vcpu.get_sregs()
        mode = cpu_mode(sregs)
        if mode == "real" or regs.rflags & _VM:
            return False  # not seen failing in real or virtual-8086 mode; leave it to the report
        bits = 64 if mode == "long" else (32 if sregs.cs.db else 16)
        at = regs.rip
        state = _State(vcpu, self.memory, regs, sregs, bits)
        state.code = code
        state.xsave_layout = self.xsave_layout
        insn = self._decode(code, bits, regs.rip)
        if insn is None:
            if not _undefined_encoding(code, bits):
                return False
            name, text = "(undefined)", code.hex(" ")
        else:
            name = insn.mnemonic.removeprefix("lock ").removeprefix("rep ")
            text = f"{insn.mnemonic} {insn.raw.op_str}".strip()
            if name not in _HANDLERS and not self._fallback_takes(insn):
                return False
        state.insn = insn
        try:
            if insn is None or (0xF0 in insn.prefixes and name not in _LOCKABLE):
                raise GuestFault(UD)
            handler = _HANDLERS.get(name)
            done = handler(state, insn) if handler is not None else None
            if done is None:
                # Too complex to finish by hand: one instruction on the CPU emulator.
                done = self._run_fallback(state, insn)
                if done is None:
                    return False
                name += " (emulator)"
        except GuestFault as fault:
            state.deliver(fault)
            done = f"#{_VECTOR_NAMES.get(fault.vector, str(fault.vector))}"
        except GuestMemoryError:
            return False  # MMIO or outside RAM: not something to finish here
        with self._lock:
            self.counts[name] += 1
        if self.on_complete is not None:
            self.on_complete(vcpu.index, at, text, done)
        return True

    @property
    def fallback(self) -> Fallback:
        """The general fallback (kvmpy/x86/fallback.py), made on first use."""
        if self._fallback is None:
            from kvmpy.x86.fallback import Fallback

            self._fallback = Fallback()
        return self._fallback

    def _fallback_takes(self, insn: _Insn) -> bool:
        from kvmpy.x86.fallback import eligible

        return self.use_fallback and eligible(insn)

    def _run_fallback(self, state: _State, insn: _Insn) -> str | None:
        if not self.use_fallback:
            return None
        return self.fallback.run(state, insn)

    def _decode(self, code: bytes, bits: int, rip: int) -> _Insn | None:
        """Decode one instruction; the same bytes at the same RIP (a loop) decode once."""
        key = (bits, rip, code)
        cached = self._decoded.get(key)
        if cached is not None:
            return cached
        with self._lock:  # one capstone handle per mode, shared by the vCPU threads
            return self._decode_new(key, code, bits, rip)

    def _decode_new(
        self, key: tuple[int, int, bytes], code: bytes, bits: int, rip: int
    ) -> _Insn | None:
        decoder = self._decoders.get(bits)
        if decoder is None:
            decoder = self._decoders[bits] = _decoder(bits)
        insn: _Insn | None = None
        for raw in decoder.disasm(code, rip, 1):
            insn = _Insn(raw.mnemonic, raw.size, list(raw.operands), _prefixes(code), raw)
            break
        else:
            insn = _decode_unknown_to_capstone(code, rip)
            if insn is None:
                return None
        if len(self._decoded) >= _DECODE_CACHE_SIZE:
            self._decoded.clear()
        self._decoded[key] = insn
        return insn


_VECTOR_NAMES = {DE: "DE", DB: "DB", BP: "BP", OF: "OF", UD: "UD", NM: "NM", NP: "NP"}
_VECTOR_NAMES.update({SS_FAULT: "SS", GP: "GP", PF: "PF", MF: "MF"})


class _Undecoded(Record, frozen=False):
    """What kvmpy's code reads of a capstone instruction, for one capstone cannot decode."""

    mnemonic: str
    address: int
    size: int
    bytes: bytes
    op_str: str = ""
    groups: tuple[int, ...] = ()

    def group_name(self, group: int) -> str:
        return ""


# Encodings capstone 5 does not know: (bytes after the legacy prefixes, mnemonic).
_UNKNOWN_TO_CAPSTONE = ((b"\x0f\x01\xfd", "rdpru"),)


def _decode_unknown_to_capstone(code: bytes, rip: int) -> _Insn | None:
    prefixes = _prefixes(code)
    rest = code[len(prefixes) :]
    for encoding, mnemonic in _UNKNOWN_TO_CAPSTONE:
        if rest.startswith(encoding):
            size = len(prefixes) + len(encoding)
            raw = _Undecoded(mnemonic, rip, size, code[:size])
            return _Insn(mnemonic, size, [], prefixes, raw)
    return None


def _prefixes(code: bytes) -> list[int]:
    """The legacy prefix bytes an instruction starts with (capstone's list misses some)."""
    found = []
    for byte in code:
        if byte not in _LEGACY_PREFIXES:
            break
        found.append(byte)
    return found


def _undefined_encoding(code: bytes, bits: int) -> bool:
    """Encodings capstone rejects that a CPU answers with #UD (register-form movbe, 64-bit into)."""
    at = 0
    while at < len(code) and code[at] in _LEGACY_PREFIXES:
        at += 1
    if bits == 64 and at < len(code) and 0x40 <= code[at] <= 0x4F:
        at += 1
    rest = code[at:]
    if bits == 64 and rest[:1] == b"\xce":
        return True  # into is invalid in 64-bit mode
    return rest[:3] in (b"\x0f\x38\xf0", b"\x0f\x38\xf1") and len(rest) > 3 and rest[3] >= 0xC0


class _State:
    """One completion's view of the vCPU: registers, modes, and checked guest memory."""

    def __init__(self, vcpu: Vcpu, memory: GuestMemory, regs: Regs, sregs: Sregs, bits: int):
        self.vcpu = vcpu
        self.memory = memory
        self.regs = regs
        self.sregs = sregs
        self.bits = bits
        self.cpl = sregs.cs.selector & 3
        self.insn: _Insn | None = None
        self.code = b""  # the instruction bytes the backend reported
        self.xsave_layout: dict[int, tuple[int, int, bool]] = {}

    # -- finishing ------------------------------------------------------------------

    def advance(self) -> None:
        """Step RIP past the instruction and write the registers back."""
        assert self.insn is not None
        self.regs.rip = (self.regs.rip + self.insn.size) & self.ip_mask
        self.vcpu.set_regs(self.regs)

    @property
    def ip_mask(self) -> int:
        return (1 << 64) - 1 if self.bits == 64 else (1 << self.bits) - 1

    def deliver(self, fault: GuestFault) -> None:
        """A fault: RIP stays at the instruction; CR2 first for a page fault."""
        if fault.cr2 is not None:
            sregs = self.vcpu.get_sregs()
            sregs.cr2 = fault.cr2
            self.vcpu.set_sregs(sregs)
        self.vcpu.inject_exception(fault.vector, fault.error_code)

    # -- registers ------------------------------------------------------------------

    def read_reg(self, name: str) -> int:
        field, shift, width = _GPRS[name]
        return int(getattr(self.regs, field) >> shift) & ((1 << width) - 1)

    def write_reg(self, name: str, value: int) -> None:
        """Write as the CPU does: 32-bit writes zero-extend, 8/16-bit ones merge."""
        field, shift, width = _GPRS[name]
        mask = (1 << width) - 1
        if width == 32 or width == 64:
            setattr(self.regs, field, value & mask)
        else:
            old = getattr(self.regs, field)
            setattr(self.regs, field, (old & ~(mask << shift)) | ((value & mask) << shift))

    def set_flags(self, changed: int, set_bits: int) -> None:
        self.regs.rflags = (self.regs.rflags & ~changed) | (set_bits & changed)

    # -- memory operands -------------------------------------------------------------

    def address(self, operand: Any, size: int | None = None) -> int:
        """The linear address of a memory operand (segment base + effective address),
        checked for ``size`` bytes (the operand's size unless given)."""
        assert self.insn is not None
        size = int(operand.size) if size is None else size
        raw = self.insn.raw
        mem = operand.mem
        address_bits = self.bits
        if 0x67 in self.insn.prefixes:
            address_bits = 32 if self.bits == 64 else 48 - self.bits
        base_name = str(raw.reg_name(mem.base)) if mem.base else ""
        if base_name in ("rip", "eip"):
            base = raw.address + raw.size
        else:
            base = self.read_reg(base_name) if base_name else 0
        index = self.read_reg(str(raw.reg_name(mem.index))) * mem.scale if mem.index else 0
        effective = int(base + index + mem.disp) & ((1 << address_bits) - 1)
        segment = str(raw.reg_name(mem.segment)) if mem.segment else ""
        if not segment:
            segment = "ss" if base_name in ("rsp", "esp", "sp", "rbp", "ebp", "bp") else "ds"
        if self.bits == 64:
            linear = effective
            if segment in ("fs", "gs"):
                linear = int(getattr(self.sregs, segment).base + effective) & ((1 << 64) - 1)
            if not _canonical(linear) or not _canonical(linear + size - 1):
                raise GuestFault(SS_FAULT if segment == "ss" else GP, 0)
            return linear
        descriptor: Segment = getattr(self.sregs, segment)
        if effective + size - 1 > descriptor.limit:
            raise GuestFault(SS_FAULT if segment == "ss" else GP, 0)
        return (descriptor.base + effective) & 0xFFFFFFFF

    def _physical(self, linear: int, write: bool, implicit_supervisor: bool = False) -> int:
        """Translate with the CPU's permission checks, or raise the #PF it would take."""
        if not self.sregs.cr0 & CR0_PG:
            return linear
        user = self.cpl == 3 and not implicit_supervisor
        error = (PF_WRITE if write else 0) | (PF_USER if user else 0)
        found = self.vcpu.translate(linear)
        if found is None:
            raise GuestFault(PF, error, cr2=linear)
        if user and not found.usermode:
            raise GuestFault(PF, error | PF_PRESENT, cr2=linear)
        if write and not found.writeable and (user or self.sregs.cr0 & CR0_WP):
            raise GuestFault(PF, error | PF_PRESENT, cr2=linear)
        if (
            not user
            and found.usermode
            and self.sregs.cr4 & CR4_SMAP
            and (implicit_supervisor or not self.regs.rflags & AC)
        ):
            raise GuestFault(PF, error | PF_PRESENT, cr2=linear)
        return found.physical_address

    def _pieces(
        self, linear: int, size: int, write: bool, implicit: bool = False
    ) -> list[tuple[int, int]]:
        """(guest-physical address, length) per page touched; every page checked first."""
        pieces = []
        done = 0
        while done < size:
            at = linear + done
            length = min(size - done, PAGE_SIZE - at % PAGE_SIZE)
            pieces.append((self._physical(at, write, implicit), length))
            done += length
        return pieces

    def read(self, linear: int, size: int, implicit: bool = False) -> int:
        return self.load(self._pieces(linear, size, False, implicit))

    def check_write(self, linear: int, size: int) -> list[tuple[int, int]]:
        return self._pieces(linear, size, True)

    def store(self, pieces: list[tuple[int, int]], value: int) -> None:
        data = value.to_bytes(sum(n for _, n in pieces), "little")
        at = 0
        for gpa, n in pieces:
            self.memory.write(gpa, data[at : at + n])
            at += n

    def load(self, pieces: list[tuple[int, int]]) -> int:
        return int.from_bytes(b"".join(self.memory.read(gpa, n) for gpa, n in pieces), "little")

    def read_bytes(self, linear: int, size: int) -> bytes:
        return b"".join(self.memory.read(gpa, n) for gpa, n in self._pieces(linear, size, False))

    def write_bytes(self, linear: int, data: bytes) -> None:
        """Write ``data`` at ``linear``; every page is checked before any byte is written."""
        pieces = self.check_write(linear, len(data))
        at = 0
        for gpa, n in pieces:
            self.memory.write(gpa, data[at : at + n])
            at += n

    def operand_value(self, operand: Any) -> int:
        """A register or memory source operand's value."""
        assert self.insn is not None
        if operand.type == _OP_REG:
            return self.read_reg(str(self.insn.raw.reg_name(operand.reg)))
        return self.read(self.address(operand), int(operand.size))

    def reg_name(self, operand: Any) -> str:
        assert self.insn is not None
        return str(self.insn.raw.reg_name(operand.reg))


_OP_REG, _OP_IMM, _OP_MEM = 1, 2, 3  # capstone's X86_OP_* values


# -- software interrupts (SDM Vol. 2A "INT n/INTO/INT3/INT1", Vol. 3A 6.12) --------------


def _software_interrupt(state: _State, vector: int, check_dpl: bool = True) -> str:
    """Check the IDT gate as INT n does, then have the backend deliver through it."""
    sregs = state.sregs
    entry_size = 16 if sregs.efer & (1 << 10) else 8
    error = vector * 8 + 2  # IDT bit set, EXT clear
    offset = vector * entry_size
    if offset + entry_size - 1 > sregs.idt.limit:
        raise GuestFault(GP, error)
    gate = state.read(sregs.idt.base + offset, 8, implicit=True)
    access = (gate >> 40) & 0xFF
    gate_type = access & 0x1F
    valid = (0x0E, 0x0F) if entry_size == 16 else (0x05, 0x06, 0x07, 0x0E, 0x0F)
    if gate_type not in valid:
        raise GuestFault(GP, error)
    if check_dpl and state.cpl > (access >> 5) & 3:
        raise GuestFault(GP, error)
    if not access & 0x80:
        raise GuestFault(NP, error)
    state.advance()
    state.vcpu.inject_interrupt(vector)
    return f"vector {vector} through the IDT"


def _int(state: _State, insn: _Insn) -> str:
    return _software_interrupt(state, insn.operands[0].imm & 0xFF)


def _int3(state: _State, insn: _Insn) -> str:
    return _software_interrupt(state, BP)


def _int1(state: _State, insn: _Insn) -> str:
    return _software_interrupt(state, DB, check_dpl=False)


def _into(state: _State, insn: _Insn) -> str:
    if not state.regs.rflags & OF_FLAG:
        state.advance()
        return "OF clear: no interrupt"
    return _software_interrupt(state, OF)


# -- flags and pure-register instructions -----------------------------------------------


def _bit_count(state: _State, insn: _Insn) -> str:
    """popcnt, lzcnt, tzcnt: destination register, register or memory source."""
    destination, source = insn.operands
    width = source.size * 8
    value = state.operand_value(source) & ((1 << width) - 1)
    if insn.mnemonic == "popcnt":
        result = bin(value).count("1")
        flags = ZF if value == 0 else 0
    else:
        if insn.mnemonic == "lzcnt":
            result = width - value.bit_length()
        else:
            result = (value & -value).bit_length() - 1 if value else width
        flags = (CF if value == 0 else 0) | (ZF if result == 0 else 0)
    state.write_reg(state.reg_name(destination), result)
    # popcnt clears OF, SF, AF, PF.  For lzcnt/tzcnt the SDM leaves them undefined; the
    # AMD family 0x1a CPU these hosts run keeps OF and clears the rest, and so does this.
    changed = ARITH_FLAGS if insn.mnemonic == "popcnt" else ARITH_FLAGS & ~OF_FLAG
    state.set_flags(changed, flags)
    state.advance()
    return f"= {result}"


def _movbe(state: _State, insn: _Insn) -> str:
    destination, source = insn.operands
    size = destination.size
    if destination.type == _OP_REG:
        value = state.read(state.address(source), size)
        swapped = int.from_bytes(value.to_bytes(size, "little"), "big")
        state.write_reg(state.reg_name(destination), swapped)
    else:
        value = state.read_reg(state.reg_name(source))
        swapped = int.from_bytes(value.to_bytes(size, "little"), "big")
        state.store(state.check_write(state.address(destination), size), swapped)
    state.advance()
    return f"{swapped:#x}"


def _clac_stac(state: _State, insn: _Insn) -> str:
    if state.cpl > 0 or 0xF0 in insn.prefixes:
        raise GuestFault(UD)
    state.set_flags(AC, AC if insn.mnemonic == "stac" else 0)
    state.advance()
    return "AC=" + ("1" if insn.mnemonic == "stac" else "0")


# -- memory instructions -----------------------------------------------------------------


def _cmpxchg8b_16b(state: _State, insn: _Insn) -> str:
    (operand,) = insn.operands
    size = 16 if insn.mnemonic.endswith("16b") else 8
    half = size * 4
    wide = "r" if size == 16 else "e"
    linear = state.address(operand)
    if size == 16 and linear % 16:
        raise GuestFault(GP, 0)
    expected = state.read_reg(wide + "dx") << half | state.read_reg(wide + "ax")
    replacement = state.read_reg(wide + "cx") << half | state.read_reg(wide + "bx")
    pieces = state.check_write(linear, size)  # the CPU checks for a write either way
    if len(pieces) == 1:
        # The host CPU's own locked instruction on guest RAM: atomic against every vCPU.
        view = state.memory.view(pieces[0][0], size)
        equal, current = state.vcpu.compare_exchange(view, expected, replacement)
    else:
        # A cmpxchg8b split across two pages: atomic only against other completions.
        with _MEMORY_LOCK:
            current = state.load(pieces)
            equal = current == expected
            # Without a match the CPU still writes: it stores back what it read.
            state.store(pieces, replacement if equal else current)
    if not equal:
        state.write_reg(wide + "ax", current & ((1 << half) - 1))
        state.write_reg(wide + "dx", current >> half)
    state.set_flags(ZF, ZF if equal else 0)
    state.advance()
    return "exchanged" if equal else "not equal"


def _cache_line(state: _State, insn: _Insn) -> str:
    """clwb, clflushopt, clflush: guest RAM is coherent host memory, so nothing to write back.

    The CPU still translates the address (as a read) and faults where it would.
    """
    state.read(state.address(insn.operands[0]), 1)
    state.advance()
    return "no-op (coherent memory)"


def _invpcid(state: _State, insn: _Insn) -> str:
    if state.cpl > 0:
        raise GuestFault(GP, 0)
    kind_reg, descriptor = insn.operands
    kind = state.read_reg(state.reg_name(kind_reg))
    linear = state.address(descriptor)
    value = state.read(linear, 16)
    pcid, address = value & 0xFFF, value >> 64
    if kind > 3 or value >> 12 & ((1 << 52) - 1):
        raise GuestFault(GP, 0)
    if kind == 0 and state.bits == 64 and not _canonical(address):
        raise GuestFault(GP, 0)
    if kind in (0, 1) and pcid and not state.sregs.cr4 & (1 << 17):
        raise GuestFault(GP, 0)
    # Rewriting the special registers makes KVM drop its cached translations.
    state.vcpu.set_sregs(state.vcpu.get_sregs())
    state.advance()
    return f"type {kind}: KVM's TLB flushed"


def _canonical(address: int) -> bool:
    top = (address & ((1 << 64) - 1)) >> 47
    return top in (0, (1 << 17) - 1)


# -- rdpru (AMD APM Vol. 3): a performance counter read, as the host CPU answers it -------

_CR4_TSD = 1 << 2


@functools.cache
def _host_flags() -> frozenset[str]:
    """The host CPU's feature flags, as its kernel reports them.  On a host whose guests
    see the host's CPUID (PVM), these are what the guest was told it has."""
    return frozenset(cpuinfo_fields().get("flags", "").split())


def _host_has_rdpru() -> bool:
    """Whether the host CPU offers rdpru, as a guest running at CPL3, natively, finds it;
    without it the CPU answers #UD."""
    return "rdpru" in _host_flags()


def _rdpru(state: _State, insn: _Insn) -> str | None:
    """The CPU's answer: #UD without RDPRU or at CPL > 0 with CR4.TSD; else the host
    CPU's own rdpru (MPERF for ECX 0, APERF for 1), results and flags."""
    if not _host_has_rdpru() or (state.cpl and state.sregs.cr4 & _CR4_TSD):
        raise GuestFault(UD)
    try:
        value, flags = state.vcpu.host_rdpru(state.read_reg("ecx"))
    except BackendError:
        return None
    state.write_reg("eax", value & 0xFFFFFFFF)
    state.write_reg("edx", value >> 32)
    state.set_flags(ARITH_FLAGS, flags)
    state.advance()
    return f"ECX={state.read_reg('ecx')}"


# -- the TSC and protection keys ----------------------------------------------------------

IA32_TSC = 0x10
IA32_TSC_AUX = 0xC000_0103
_CR4_PKE = 1 << 22


def _rdtscp(state: _State, insn: _Insn) -> str | None:
    """EDX:EAX the vCPU's TSC, ECX its IA32_TSC_AUX (both from KVM); #UD where the host
    CPU, whose CPUID the guest sees, has no rdtscp; #GP(0) at CPL > 0 with CR4.TSD."""
    if "rdtscp" not in _host_flags():
        raise GuestFault(UD)
    if state.cpl and state.sregs.cr4 & _CR4_TSD:
        raise GuestFault(GP, 0)
    msrs = state.vcpu.get_msrs((IA32_TSC, IA32_TSC_AUX))
    if IA32_TSC not in msrs:
        return None
    tsc, aux = msrs[IA32_TSC], msrs.get(IA32_TSC_AUX, 0) & 0xFFFFFFFF
    state.write_reg("eax", tsc & 0xFFFFFFFF)
    state.write_reg("edx", tsc >> 32 & 0xFFFFFFFF)
    state.write_reg("ecx", aux)
    state.advance()
    return f"TSC={tsc:#x} TSC_AUX={aux:#x}"


def _pkru(state: _State, insn: _Insn) -> str | None:
    """rdpkru, wrpkru: #UD without protection keys (the host CPU's, or CR4.PKE off), as
    the CPU answers; with them, left to the report (KVM's XSAVE area would hold PKRU)."""
    if "pku" not in _host_flags() or not state.sregs.cr4 & _CR4_PKE:
        raise GuestFault(UD)
    return None


# -- state instructions ------------------------------------------------------------------


def _xgetbv(state: _State, insn: _Insn) -> str:
    if not state.sregs.cr4 & CR4_OSXSAVE:
        raise GuestFault(UD)
    index = state.read_reg("ecx")
    xcr0 = state.vcpu.get_xcr(0)
    if xcr0 is None or index not in (0, 1):
        raise GuestFault(GP, 0)
    # XINUSE (index 1) is reported conservatively: every enabled component in use.
    value = xcr0
    state.write_reg("eax", value & 0xFFFFFFFF)
    state.write_reg("edx", value >> 32)
    state.advance()
    return f"XCR{index}={value:#x}"


def _xsetbv(state: _State, insn: _Insn) -> str:
    if not state.sregs.cr4 & CR4_OSXSAVE:
        raise GuestFault(UD)
    if state.cpl > 0 or state.read_reg("ecx") != 0:
        raise GuestFault(GP, 0)
    value = state.read_reg("edx") << 32 | state.read_reg("eax")
    try:
        state.vcpu.set_xcr(0, value)
    except OSError:  # KVM refuses what the CPU would refuse: a #GP
        raise GuestFault(GP, 0) from None
    state.advance()
    return f"XCR0={value:#x}"


def _fwait(state: _State, insn: _Insn) -> str:
    cr0 = state.sregs.cr0
    if cr0 & CR0_MP and cr0 & CR0_TS:
        raise GuestFault(NM)
    fpu = _get_x87(state.vcpu)
    if fpu.fsw & 0x80 and cr0 & CR0_NE:  # ES: an unmasked x87 exception is pending
        raise GuestFault(MF)
    state.advance()
    return "no pending x87 exception"


# The x87/SSE part of the standard XSAVE area (the FXSAVE layout): FCW, FSW, abridged
# FTW, FOP, FIP, FDP, MXCSR (MXCSR_MASK not kept), then ST0-ST7 at 32, XMM0-15 at 160.
_LEGACY = struct.Struct("<HHBxHQQI")


def fpu_from_xsave(area: bytes) -> Fpu:
    fcw, fsw, ftwx, fop, fip, fdp, mxcsr = _LEGACY.unpack_from(area, 0)
    return Fpu(fcw, fsw, ftwx, fop, fip, fdp, mxcsr, bytes(area[32:160]), bytes(area[160:416]))


def xsave_with_fpu(area: bytes, fpu: Fpu) -> bytes:
    """``area`` with the x87 state of ``fpu``, and XSTATE_BV saying x87 is in use."""
    out = bytearray(area)
    _LEGACY.pack_into(
        out, 0, fpu.fcw, fpu.fsw, fpu.ftwx, fpu.last_opcode, fpu.last_ip, fpu.last_dp, fpu.mxcsr
    )
    out[32:160] = fpu.fpr
    out[512] |= 1
    return bytes(out)


def _get_x87(vcpu: Vcpu) -> Fpu:
    return fpu_from_xsave(vcpu.get_xsave())


def _set_x87(vcpu: Vcpu, fpu: Fpu) -> None:
    # Through the XSAVE area, not KVM_SET_FPU: that one leaves XSTATE_BV's x87 bit as it
    # was, and with the bit clear the CPU's XRSTOR loads the x87 initial state instead.
    vcpu.set_xsave(xsave_with_fpu(vcpu.get_xsave(), fpu))


def _x87_available(state: _State) -> None:
    if state.sregs.cr0 & (CR0_EM | CR0_TS):
        raise GuestFault(NM)


def _fninit(state: _State, insn: _Insn) -> str:
    _x87_available(state)
    fpu = _get_x87(state.vcpu)
    # TOP becomes 0; the registers keep their contents (what a later fldenv may mark valid).
    fpu.fpr = x87_registers_for_top(fpu.fpr, (fpu.fsw >> 11) & 7, 0)
    fpu.fcw, fpu.fsw, fpu.ftwx = 0x37F, 0, 0
    fpu.last_opcode = fpu.last_ip = fpu.last_dp = 0
    _set_x87(state.vcpu, fpu)
    state.advance()
    return "x87 reset"


def _fld_constant(state: _State, insn: _Insn) -> str:
    """fldz, fld1, fldpi...: push a constant onto the x87 stack (SDM Vol. 1, 8.3.3)."""
    _x87_available(state)
    fpu = _get_x87(state.vcpu)
    exponent, significand, rounding, adjust = _X87_CONSTANTS[insn.mnemonic]
    if (fpu.fcw >> 10) & 3 in rounding:
        significand += adjust
    top = (fpu.fsw >> 11) & 7
    new_top = (top - 1) & 7
    fsw = fpu.fsw & ~(0x0200)  # C1 = 0 unless the stack overflows
    if fpu.ftwx & (1 << new_top):  # stack overflow: IE and SF, C1 = 1
        fsw |= 0x0041 | 0x0200
        if not fpu.fcw & 1:  # unmasked: the exception is pending, the stack unchanged
            fpu.fsw = fsw | 0x8080
            _set_x87(state.vcpu, fpu)
            state.advance()
            return "stack overflow (unmasked)"
        exponent, significand = _X87_INDEFINITE
    value = significand.to_bytes(8, "little") + exponent.to_bytes(2, "little") + bytes(6)
    fpu.fpr = value + fpu.fpr[:112]
    fpu.ftwx |= 1 << new_top
    fpu.fsw = (fsw & ~0x3800) | new_top << 11
    assert state.insn is not None
    code = state.insn.raw.bytes
    fpu.last_opcode = ((code[-2] & 7) << 8) | code[-1]
    fpu.last_ip = state.regs.rip
    _set_x87(state.vcpu, fpu)
    state.advance()
    return f"ST0={exponent:04x}:{significand:016x}"


def _fnstsw(state: _State, insn: _Insn) -> str:
    _x87_available(state)
    (operand,) = insn.operands
    status = _get_x87(state.vcpu).fsw & 0xFFFF
    if operand.type == _OP_REG:
        state.write_reg("ax", status)
    else:
        state.store(state.check_write(state.address(operand), 2), status)
    state.advance()
    return f"FSW={status:#06x}"


def _fnstcw(state: _State, insn: _Insn) -> str:
    _x87_available(state)
    control = _get_x87(state.vcpu).fcw & 0xFFFF
    state.store(state.check_write(state.address(insn.operands[0]), 2), control)
    state.advance()
    return f"FCW={control:#06x}"


def _fldcw(state: _State, insn: _Insn) -> str:
    _x87_available(state)
    control = x87_control_word(state.read(state.address(insn.operands[0]), 2))
    fpu = _get_x87(state.vcpu)
    fpu.fcw = control
    # ES and B follow whether any pending exception is now unmasked.
    fpu.fsw = x87_status_word(fpu.fsw, control)
    _set_x87(state.vcpu, fpu)
    state.advance()
    return f"FCW={control:#06x}"


def _fstp(state: _State, insn: _Insn) -> str | None:
    """fstp m80 (fstpt): store ST0 unchanged and pop; other forms convert, so not here."""
    (operand,) = insn.operands
    if operand.type != _OP_MEM or operand.size != 10:
        return None
    _x87_available(state)
    fpu = _get_x87(state.vcpu)
    top = (fpu.fsw >> 11) & 7
    value = fpu.fpr[:10]
    fsw = fpu.fsw & ~0x0200
    if not fpu.ftwx & (1 << top):  # stack underflow: IE and SF, C1 = 0
        fsw |= 0x0041
        if not fpu.fcw & 1:
            fpu.fsw = fsw | 0x8080
            _set_x87(state.vcpu, fpu)
            state.advance()
            return "stack underflow (unmasked)"
        exponent, significand = _X87_INDEFINITE
        value = significand.to_bytes(8, "little") + exponent.to_bytes(2, "little")
    state.store(state.check_write(state.address(operand), 10), int.from_bytes(value, "little"))
    fpu.fpr = fpu.fpr[16:] + bytes(16)
    fpu.ftwx &= ~(1 << top)
    fpu.fsw = (fsw & ~0x3800) | ((top + 1) & 7) << 11
    _set_x87(state.vcpu, fpu)
    state.advance()
    return "stored ST0 and popped"


# -- the x87 environment and state: fnstenv, fldenv, fnsave, frstor (SDM Vol. 1, 8.1.10) --
#
# The wait forms (fstenv, fsave) are `wait` followed by these: the backend stops on the
# wait first, which _fwait completes (#NM, #MF for a pending unmasked exception).
# Real-address and virtual-8086 layouts are not done: completion leaves those modes to
# the report (Completer.complete).
#
# FCS and FDS: KVM keeps the x87 state in the 64-bit XSAVE format, which has no place
# for them, and the CPU that loads it (XRSTOR64) sets both to 0 (measured on this AMD
# host); so 0 is what the CPU itself stores right after KVM restored the state, and
# what fldenv/frstor load of them is lost, as it is on every KVM state switch.

_X87_ENVIRONMENT_32 = struct.Struct("<HHHHHHIHHIHH")  # 28 bytes, reserved halves 0xFFFF
_X87_ENVIRONMENT_16 = struct.Struct("<7H")  # 14 bytes
_X87_REGISTER = 10  # an 80-bit register in the save image
_FCW_KEPT, _FCW_SET = 0x1F3F, 0x0040  # the FPU keeps these bits of FCW; bit 6 reads as 1
_FSW_ES_B = 0x8080  # error summary and busy: set while an unmasked exception is pending
_FOP_BITS = 0x7FF
_TAG_VALID, _TAG_ZERO, _TAG_SPECIAL, _TAG_EMPTY = 0, 1, 2, 3


def x87_control_word(value: int) -> int:
    """FCW as the FPU keeps a loaded value (fldcw, fldenv; measured on this host's CPU)."""
    return (value & _FCW_KEPT) | _FCW_SET


def x87_status_word(fsw: int, fcw: int) -> int:
    """FSW with ES and B saying whether an exception flag is set and unmasked."""
    pending = fsw & 0x3F & ~fcw
    return (fsw & ~_FSW_ES_B & 0xFFFF) | (_FSW_ES_B if pending else 0)


def x87_tag(register: bytes) -> int:
    """The 2-bit tag of a non-empty 80-bit register, from its contents (SDM Vol. 1,
    Table 10-3): valid, zero, or special (NaN, infinity, denormal, unnormal)."""
    significand = int.from_bytes(register[:8], "little")
    exponent = int.from_bytes(register[8:10], "little") & 0x7FFF
    if exponent == 0x7FFF:
        return _TAG_SPECIAL
    if exponent == 0:
        return _TAG_ZERO if significand == 0 else _TAG_SPECIAL
    return _TAG_VALID if significand >> 63 else _TAG_SPECIAL


def x87_tag_word(ftwx: int, fsw: int, fpr: bytes) -> int:
    """The full tag word of physical registers R0-R7 from the abridged one (FXSAVE's:
    a bit per register, set when not empty) and the registers (``fpr`` in ST(i) order)."""
    top = (fsw >> 11) & 7
    tags = 0
    for physical in range(8):
        tag = _TAG_EMPTY
        if ftwx >> physical & 1:
            st = (physical - top) & 7
            tag = x87_tag(fpr[16 * st : 16 * st + _X87_REGISTER])
        tags |= tag << (2 * physical)
    return tags


def x87_abridged_tags(tag_word: int) -> int:
    """FXSAVE's abridged tag byte: what the FPU keeps of a loaded tag word (empty or not)."""
    return sum(1 << p for p in range(8) if (tag_word >> (2 * p)) & 3 != _TAG_EMPTY)


def x87_registers_for_top(fpr: bytes, old_top: int, new_top: int) -> bytes:
    """The XSAVE area's ST0-ST7 (16 bytes each) after TOP changes from ``old_top`` to
    ``new_top``: the physical registers keep their contents, so their ST(i) numbers move."""
    shift = (new_top - old_top) & 7
    return fpr[16 * shift :] + fpr[: 16 * shift]


def _x87_area(vcpu: Vcpu) -> bytearray:
    """KVM's XSAVE area; with XSTATE_BV's x87 bit clear, the x87 part in its initial state
    (what the CPU's XRSTOR would load), whatever stale bytes it holds."""
    area = bytearray(vcpu.get_xsave())
    if not area[_XSAVE_HEADER] & 1:
        area[0:24] = _X87_INIT
        area[32:160] = bytes(128)
    return area


def _environment_operand(state: _State, insn: _Insn, registers: bool) -> tuple[int, bool, int]:
    """(linear address, 16-bit layout, size) of the environment or save image operand.

    The operand size picks the layout: 16 bits in a 16-bit code segment, 32 elsewhere
    (64-bit mode too, whatever REX.W says), the other one with a 0x66 prefix."""
    sixteen = (state.bits == 16) != (0x66 in insn.prefixes)
    size = (_X87_ENVIRONMENT_16 if sixteen else _X87_ENVIRONMENT_32).size
    if registers:
        size += 8 * _X87_REGISTER
    return state.address(insn.operands[0], size), sixteen, size


def _environment(area: bytes | bytearray, sixteen: bool) -> bytes:
    """The protected-mode environment image of the x87 state in ``area``."""
    fcw, fsw, ftwx, fop, fip, fdp = struct.unpack_from("<HHBxHQQ", area, 0)
    tags = x87_tag_word(ftwx, fsw, bytes(area[32:160]))
    if sixteen:  # no opcode in this layout
        return _X87_ENVIRONMENT_16.pack(fcw, fsw, tags, fip & 0xFFFF, 0, fdp & 0xFFFF, 0)
    return _X87_ENVIRONMENT_32.pack(
        fcw, 0xFFFF, fsw, 0xFFFF, tags, 0xFFFF,
        fip & 0xFFFFFFFF, 0, fop & _FOP_BITS, fdp & 0xFFFFFFFF, 0, 0xFFFF,
    )  # fmt: skip


def _load_environment(area: bytearray, image: bytes, sixteen: bool) -> None:
    """Load an environment image into ``area``: FCW as the FPU keeps it, FSW with ES and B
    following the pending unmasked exceptions, the tag word abridged (the tags are
    computed again from the registers when stored), FOP, FIP and FDP (FCS, FDS: see above)."""
    if sixteen:
        fcw, fsw, tags, fip, _, fdp, _ = _X87_ENVIRONMENT_16.unpack_from(image)
        fop = 0  # the 16-bit layout has no opcode; the CPU clears it (measured)
    else:
        fcw, _, fsw, _, tags, _, fip, _, fop, fdp, _, _ = _X87_ENVIRONMENT_32.unpack_from(image)
    fcw = x87_control_word(fcw)
    old_top = (area[2] | area[3] << 8) >> 11 & 7
    area[32:160] = x87_registers_for_top(bytes(area[32:160]), old_top, fsw >> 11 & 7)
    struct.pack_into(
        "<HHBxHQQ", area, 0, fcw, x87_status_word(fsw, fcw), x87_abridged_tags(tags),
        fop & _FOP_BITS, fip, fdp,
    )  # fmt: skip
    area[_XSAVE_HEADER] |= 1


def _fnstenv(state: _State, insn: _Insn) -> str:
    """Store the environment, then mask every x87 exception (nothing unmasked is pending
    any more, so ES and B clear too, as the CPU does)."""
    _x87_available(state)
    linear, sixteen, size = _environment_operand(state, insn, registers=False)
    area = _x87_area(state.vcpu)
    state.write_bytes(linear, _environment(area, sixteen))
    fcw, fsw = struct.unpack_from("<HH", area, 0)
    struct.pack_into("<HH", area, 0, fcw | 0x3F, x87_status_word(fsw, fcw | 0x3F))
    area[_XSAVE_HEADER] |= 1
    state.vcpu.set_xsave(bytes(area))
    state.advance()
    return f"{size}-byte environment stored, exceptions masked"


def _fnsave(state: _State, insn: _Insn) -> str:
    """Store the environment and ST0-ST7, then initialise the FPU as fninit does."""
    _x87_available(state)
    linear, sixteen, size = _environment_operand(state, insn, registers=True)
    area = _x87_area(state.vcpu)
    registers = b"".join(area[32 + 16 * st : 32 + 16 * st + _X87_REGISTER] for st in range(8))
    state.write_bytes(linear, _environment(area, sixteen) + registers)
    old_top = (area[2] | area[3] << 8) >> 11 & 7
    area[32:160] = x87_registers_for_top(bytes(area[32:160]), old_top, 0)
    area[0:24] = _X87_INIT  # FCW 0x37F; FSW (TOP), tags, FOP, FIP, FDP 0
    area[_XSAVE_HEADER] |= 1
    state.vcpu.set_xsave(bytes(area))
    state.advance()
    return f"{size}-byte state stored, FPU initialised"


def _fldenv_frstor(state: _State, insn: _Insn) -> str:
    """Load the environment and, for frstor, ST0-ST7 after it."""
    _x87_available(state)
    registers = insn.mnemonic == "frstor"
    linear, sixteen, size = _environment_operand(state, insn, registers=registers)
    image = state.read_bytes(linear, size)
    area = _x87_area(state.vcpu)
    _load_environment(area, image, sixteen)
    if registers:
        at = size - 8 * _X87_REGISTER
        for st in range(8):
            register = image[at + _X87_REGISTER * st : at + _X87_REGISTER * (st + 1)]
            area[32 + 16 * st : 48 + 16 * st] = register + bytes(16 - _X87_REGISTER)
    state.vcpu.set_xsave(bytes(area))
    state.advance()
    return _loaded(area)


def _loaded(area: bytearray) -> str:
    fcw, fsw, ftwx = struct.unpack_from("<HHB", area, 0)
    return f"FCW={fcw:#06x} FSW={fsw:#06x} tags={ftwx:#04x}"


# -- a 32-bit iret (SDM Vol. 2A "IRET/IRETD", protected mode) ------------------------------

# RFLAGS bits iret loads at any CPL: CF PF AF ZF SF TF DF OF NT RF AC ID.
_IRET_FLAGS = 0x254DD5
_IF, _IOPL, _NT, _VM = 1 << 9, 3 << 12, 1 << 14, 1 << 17


def _segment_for(state: _State, selector: int) -> tuple[Segment, int, int]:
    """The GDT descriptor for ``selector``: (segment cache, access byte, descriptor address).

    Raises #GP(selector) for a selector past the GDT limit; LDT selectors are not handled.
    """
    gdt = state.sregs.gdt
    index = selector & ~7
    if selector & 4:
        raise _NotHandled("an LDT selector")
    if index + 7 > gdt.limit:
        raise GuestFault(GP, selector & ~3)
    at = gdt.base + index
    descriptor = state.read(at, 8, implicit=True)
    access = (descriptor >> 40) & 0xFF
    flags = (descriptor >> 52) & 0xF
    limit = (descriptor & 0xFFFF) | ((descriptor >> 48) & 0xF) << 16
    segment = Segment(
        base=((descriptor >> 16) & 0xFFFFFF) | ((descriptor >> 56) & 0xFF) << 24,
        limit=(limit << 12) | 0xFFF if flags & 8 else limit,
        selector=selector,
        type=access & 0xF,
        present=access >> 7,
        dpl=(access >> 5) & 3,
        s=(access >> 4) & 1,
        avl=flags & 1,
        l=(flags >> 1) & 1,
        db=(flags >> 2) & 1,
        g=flags >> 3,
    )
    return segment, access, at


# -- lar, lsl, verr, verw (SDM Vol. 2A/2B): what a selector's descriptor allows --------

_EFER_LMA = 1 << 10
# System descriptor types each may report, outside and inside IA-32e mode.
_LAR_TYPES = (frozenset((1, 2, 3, 4, 5, 9, 0xB, 0xC)), frozenset((2, 9, 0xB, 0xC)))
_LSL_TYPES = (frozenset((1, 2, 3, 9, 0xB)), frozenset((2, 9, 0xB)))


def _visible_descriptor(state: _State, selector: int, wide: bool) -> tuple[int, int] | None:
    """The descriptor ``selector`` names, and with ``wide`` the next 8 bytes (IA-32e
    system descriptors are 16 bytes), or None where the CPU finds none: a null
    selector, no LDT, or past the table's limit.  A page fault reading it is the guest's."""
    index = selector & ~7
    if selector & 4:
        ldt = state.sregs.ldt
        if ldt.unusable or not ldt.present:
            return None
        base, limit = ldt.base, ldt.limit
    else:
        if index == 0:
            return None
        base, limit = state.sregs.gdt.base, state.sregs.gdt.limit
    if index + (15 if wide else 7) > limit:
        return None
    low = state.read(base + index, 8, implicit=True)
    return low, state.read(base + index + 8, 8, implicit=True) if wide else 0


def _descriptor_check(state: _State, insn: _Insn) -> str:
    """ZF: whether the selector's descriptor is visible at this CPL and RPL and of a kind
    the instruction accepts; lar and lsl then load its access rights or limit.  (In
    real-address and virtual-8086 mode, where the CPU answers #UD, completion as a
    whole stands aside.)"""
    name = insn.mnemonic
    selector = state.operand_value(insn.operands[-1]) & 0xFFFF
    ia32e = bool(state.sregs.efer & _EFER_LMA)
    first = _visible_descriptor(state, selector, wide=False)
    result: int | None = None
    if first is not None:
        access = first[0] >> 40 & 0xFF
        system, kind, dpl = not access & 0x10, access & 0xF, access >> 5 & 3
        conforming_code = not system and kind & 0xC == 0xC
        visible = conforming_code or (dpl >= state.cpl and dpl >= selector & 3)
        descriptor = first[0]
        if name in ("lar", "lsl"):
            types = (_LAR_TYPES if name == "lar" else _LSL_TYPES)[ia32e]
            accepted = not system or kind in types
            if system and ia32e and accepted:
                # The upper half of a 16-byte descriptor must have type 0.
                wide = _visible_descriptor(state, selector, wide=True)
                accepted = wide is not None and not wide[1] >> 40 & 0x1F
            if accepted and visible:
                if name == "lar":
                    result = descriptor >> 32 & 0x00FFFF00
                else:
                    limit = descriptor & 0xFFFF | (descriptor >> 48 & 0xF) << 16
                    result = limit << 12 | 0xFFF if descriptor >> 55 & 1 else limit
        else:
            readable = not kind & 8 or bool(kind & 2)  # data, or code with R
            writable = not kind & 8 and bool(kind & 2)  # data with W
            allowed = readable if name == "verr" else writable
            result = 1 if not system and allowed and visible else None
    if result is not None and name in ("lar", "lsl"):
        destination = insn.operands[0]
        width = destination.size * 8
        state.write_reg(state.reg_name(destination), result & ((1 << width) - 1))
    state.set_flags(ZF, ZF if result is not None else 0)
    state.advance()
    return f"selector {selector:#x}: " + ("ZF=1" if result is not None else "ZF=0")


class _NotHandled(Exception):
    """A case completion leaves to the crash report (task returns, LDTs, virtual-8086)."""


def _iretd(state: _State, insn: _Insn) -> str | None:
    if state.bits != 32 or state.sregs.efer & (1 << 10):
        return None  # iretq works on this host; 16-bit and compatibility mode are not done here
    try:
        return _protected_iret(state)
    except _NotHandled:
        return None


def _protected_iret(state: _State) -> str:
    regs, sregs = state.regs, state.sregs
    if regs.rflags & _NT:
        raise _NotHandled("a task return")
    ss = sregs.ss
    stack_mask = 0xFFFFFFFF if ss.db else 0xFFFF
    esp = regs.rsp & stack_mask

    def pop(offset: int) -> int:
        return state.read(ss.base + ((esp + offset) & stack_mask), 4)

    new_eip, new_cs, new_flags = pop(0), pop(4) & 0xFFFF, pop(8)
    if new_flags & _VM and state.cpl == 0:
        raise _NotHandled("a return to virtual-8086 mode")
    if new_cs & ~3 == 0:
        raise GuestFault(GP, 0)
    code, access, at = _segment_for(state, new_cs)
    rpl = new_cs & 3
    conforming = code.type & 4
    if not code.s or not code.type & 8 or rpl < state.cpl:
        raise GuestFault(GP, new_cs & ~3)
    if (conforming and code.dpl > rpl) or (not conforming and code.dpl != rpl):
        raise GuestFault(GP, new_cs & ~3)
    if not code.present:
        raise GuestFault(NP, new_cs & ~3)
    if new_eip > code.limit:
        raise GuestFault(GP, 0)
    new_esp = (esp + 12) & stack_mask
    new_ss = None
    if rpl > state.cpl:  # to an outer level: SS:ESP come off the stack too
        new_esp, new_ss_selector = pop(12), pop(16) & 0xFFFF
        if new_ss_selector & ~3 == 0:
            raise GuestFault(GP, 0)
        new_ss, ss_access, ss_at = _segment_for(state, new_ss_selector)
        if (
            new_ss_selector & 3 != rpl
            or new_ss.dpl != rpl
            or not new_ss.s
            or new_ss.type & 8
            or not new_ss.type & 2
        ):
            raise GuestFault(GP, new_ss_selector & ~3)
        if not new_ss.present:
            raise GuestFault(SS_FAULT, new_ss_selector & ~3)
        _mark_accessed(state, ss_access, ss_at)
    _mark_accessed(state, access, at)
    # RFLAGS: IOPL only at CPL0, IF only where CPL <= IOPL; VM, VIF, VIP stay (CPL0 aside).
    changed = _IRET_FLAGS
    if state.cpl <= (regs.rflags & _IOPL) >> 12:
        changed |= _IF
    if state.cpl == 0:
        changed |= _IOPL | (3 << 19)
    regs.rflags = (regs.rflags & ~changed) | (new_flags & changed) | 2
    regs.rip = new_eip
    sregs.cs = code
    if new_ss is None:
        regs.rsp = (regs.rsp & ~stack_mask) | new_esp
    else:
        regs.rsp = new_esp
        sregs.ss = new_ss
        # Data segments the new, outer level may not use become null.
        for name in ("ds", "es", "fs", "gs"):
            segment: Segment = getattr(sregs, name)
            data_or_plain_code = not segment.type & 8 or not segment.type & 4
            if segment.dpl < rpl and data_or_plain_code:
                setattr(sregs, name, Segment(selector=0, present=0, unusable=1))
    state.vcpu.set_sregs(sregs)
    state.vcpu.set_regs(regs)
    return f"to {new_cs:#x}:{new_eip:#x}" + (" (outer level)" if new_ss is not None else "")


def _mark_accessed(state: _State, access: int, at: int) -> None:
    """The CPU sets a descriptor's accessed bit when it loads it."""
    if not access & 1:
        pieces = state._pieces(at + 5, 1, True, implicit=True)
        state.store(pieces, access | 1)


def _sse_available(state: _State) -> None:
    if state.sregs.cr0 & CR0_EM or not state.sregs.cr4 & CR4_OSFXSR:
        raise GuestFault(UD)
    if state.sregs.cr0 & CR0_TS:
        raise GuestFault(NM)


def _ldmxcsr(state: _State, insn: _Insn) -> str:
    """ldmxcsr m32: into the XSAVE area, with SSE marked in use so KVM keeps MXCSR."""
    _sse_available(state)
    value = state.read(state.address(insn.operands[0]), 4)
    area = bytearray(state.vcpu.get_xsave())
    mask = int.from_bytes(area[28:32], "little") or 0xFFBF
    if value & ~mask:
        raise GuestFault(GP, 0)
    area[24:28] = value.to_bytes(4, "little")
    area[_XSAVE_HEADER] |= 2
    state.vcpu.set_xsave(bytes(area))
    state.advance()
    return f"MXCSR={value:#x}"


# -- SHA extensions (SDM Vol. 2, SHA1RNDS4 ... SHA256MSG2): the host's SHA, the guest sees ---

_M32 = 0xFFFFFFFF
_SHA1_CONSTANTS = (0x5A827999, 0x6ED9EBA1, 0x8F1BBCDC, 0xCA62C1D6)


def _sha1_function(function: int, b: int, c: int, d: int) -> int:
    """SHA-1's f for imm8[1:0]: choose, parity, majority, parity."""
    if function == 0:
        return (b & c) ^ (~b & d)
    if function == 2:
        return (b & c) ^ (b & d) ^ (c & d)
    return b ^ c ^ d


def _rol(value: int, count: int) -> int:
    return (value << count | value >> (32 - count)) & _M32


def _ror(value: int, count: int) -> int:
    return (value >> count | value << (32 - count)) & _M32


def _dwords(value: int) -> list[int]:
    """The four dwords of a 128-bit value, highest first (the SDM's [127:96] ... [31:0])."""
    return [value >> shift & _M32 for shift in (96, 64, 32, 0)]


def _join(*dwords: int) -> int:
    """Four dwords, highest first, as one 128-bit value."""
    return sum((word & _M32) << shift for word, shift in zip(dwords, (96, 64, 32, 0), strict=True))


def _sha1rnds4(state1: int, state2: int, function: int) -> int:
    k = _SHA1_CONSTANTS[function]
    a, b, c, d = _dwords(state1)
    words = _dwords(state2)  # W0+E, W1, W2, W3
    e = 0
    for word in words:
        t = (_sha1_function(function, b, c, d) + _rol(a, 5) + word + e + k) & _M32
        a, b, c, d, e = t, a, _rol(b, 30), c, d
    return _join(a, b, c, d)


def _sha256_big_sigma0(x: int) -> int:
    return _ror(x, 2) ^ _ror(x, 13) ^ _ror(x, 22)


def _sha256_big_sigma1(x: int) -> int:
    return _ror(x, 6) ^ _ror(x, 11) ^ _ror(x, 25)


def _sha256_sigma0(x: int) -> int:
    return _ror(x, 7) ^ _ror(x, 18) ^ x >> 3


def _sha256_sigma1(x: int) -> int:
    return _ror(x, 17) ^ _ror(x, 19) ^ x >> 10


def _sha256rnds2(cdgh: int, abef: int, wk: int) -> int:
    a, b, e, f = _dwords(abef)
    c, d, g, h = _dwords(cdgh)
    for word in (wk & _M32, wk >> 32 & _M32):
        choose = (e & f) ^ (~e & g)
        majority = (a & b) ^ (a & c) ^ (b & c)
        t1 = (choose + _sha256_big_sigma1(e) + word + h) & _M32
        a, b, c, d, e, f, g, h = (
            (t1 + majority + _sha256_big_sigma0(a)) & _M32,
            a,
            b,
            c,
            (t1 + d) & _M32,
            e,
            f,
            g,
        )
    return _join(a, b, e, f)


def _sha_message(name: str, first: int, second: int) -> int:
    """sha1nexte, sha1msg1, sha1msg2, sha256msg1, sha256msg2 on (destination, source)."""
    w = _dwords(first)
    v = _dwords(second)
    if name == "sha1nexte":
        return _join((v[0] + _rol(w[0], 30)) & _M32, v[1], v[2], v[3])
    if name == "sha1msg1":
        return _join(w[2] ^ w[0], w[3] ^ w[1], v[0] ^ w[2], v[1] ^ w[3])
    if name == "sha1msg2":
        w16 = _rol(w[0] ^ v[1], 1)
        w17 = _rol(w[1] ^ v[2], 1)
        w18 = _rol(w[2] ^ v[3], 1)
        w19 = _rol(w[3] ^ w16, 1)
        return _join(w16, w17, w18, w19)
    if name == "sha256msg1":
        previous = [v[3], *w]  # W4, W3, W2, W1: each dword's successor
        return _join(*((w[i] + _sha256_sigma0(previous[i])) & _M32 for i in range(4)))
    # sha256msg2: W16..W19 from the destination's W0..W3 (low first) and W14, W15.
    w16 = (w[3] + _sha256_sigma1(v[1])) & _M32
    w17 = (w[2] + _sha256_sigma1(v[0])) & _M32
    w18 = (w[1] + _sha256_sigma1(w16)) & _M32
    w19 = (w[0] + _sha256_sigma1(w17)) & _M32
    return _join(w19, w18, w17, w16)


_XMM_AREA = 160  # XMM0 in the XSAVE area's legacy region
_SHA_MNEMONICS = (
    "sha1rnds4", "sha1nexte", "sha1msg1", "sha1msg2", "sha256rnds2", "sha256msg1", "sha256msg2",
)  # fmt: skip


def _sha(state: _State, insn: _Insn) -> str:
    """The SHA extensions' rounds and message steps, on the XMM registers in KVM's XSAVE
    area (legacy SSE encodings: a memory source must be 16-byte aligned)."""
    if "sha_ni" not in _host_flags():
        raise GuestFault(UD)
    _sse_available(state)
    destination, source = insn.operands[0], insn.operands[1]
    area = bytearray(state.vcpu.get_xsave())
    if not area[_XSAVE_HEADER] & 2:  # SSE state not in use: the registers are all zero
        area[_XMM_AREA : _XMM_AREA + 256] = bytes(256)

    def xmm(index: int) -> int:
        at = _XMM_AREA + 16 * index
        return int.from_bytes(area[at : at + 16], "little")

    target = int(state.reg_name(destination).removeprefix("xmm"))
    if source.type == _OP_REG:
        second = xmm(int(state.reg_name(source).removeprefix("xmm")))
    else:
        linear = state.address(source, 16)
        if linear % 16:
            raise GuestFault(GP, 0)
        second = state.read(linear, 16)
    name = insn.mnemonic
    if name == "sha1rnds4":
        result = _sha1rnds4(xmm(target), second, int(insn.operands[2].imm) & 3)
    elif name == "sha256rnds2":
        result = _sha256rnds2(xmm(target), second, xmm(0) & ((1 << 64) - 1))
    else:
        result = _sha_message(name, xmm(target), second)
    at = _XMM_AREA + 16 * target
    area[at : at + 16] = result.to_bytes(16, "little")
    area[_XSAVE_HEADER] |= 2
    state.vcpu.set_xsave(bytes(area))
    state.advance()
    return f"xmm{target}={result:#034x}"


def _stmxcsr(state: _State, insn: _Insn) -> str:
    _sse_available(state)
    value = int.from_bytes(state.vcpu.get_xsave()[24:28], "little")
    state.store(state.check_write(state.address(insn.operands[0]), 4), value)
    state.advance()
    return f"MXCSR={value:#x}"


# -- xsave, xsavec and xrstor (SDM Vol. 1, 13.7-13.9) ----------------------------------------

_XSAVE_HEADER = 512
_XSAVE_LEGACY_END = 576  # the legacy area and the header
_COMPACTED = 1 << 63  # XCOMP_BV bit 63: the area is in the compacted format
_X87_INIT = bytes.fromhex("7f03") + bytes(22)  # FCW 0x37F, the rest of bytes 0-23 zero


_MSR_XSS = 0xDA0  # IA32_XSS: the supervisor components xsaves/xrstors handle


def _supervisor(insn: _Insn) -> bool:
    return insn.mnemonic.startswith(("xsaves", "xrstors"))


def _xsave_checks(state: _State, insn: _Insn) -> tuple[int, int, int]:
    """(linear address, RFBM, enabled components) after the faults common to the xsave
    and xrstor family.  xsaves/xrstors: CPL0 only, and XCR0 | IA32_XSS enabled; kvmpy
    leaves them to the report when they would touch supervisor state, which KVM's
    XSAVE area does not hold."""
    if not state.sregs.cr4 & CR4_OSXSAVE:
        raise GuestFault(UD)
    if state.sregs.cr0 & CR0_TS:
        raise GuestFault(NM)
    supervisor = _supervisor(insn)
    if supervisor and state.cpl:
        raise GuestFault(GP, 0)
    linear = state.address(insn.operands[0])
    if linear % 64:
        raise GuestFault(GP, 0)
    xcr0 = state.vcpu.get_xcr(0)
    if xcr0 is None:
        raise _NotHandled("no XCR0")
    xss = state.vcpu.get_msrs([_MSR_XSS]).get(_MSR_XSS, 0) if supervisor else 0
    rfbm = (xcr0 | xss) & (state.read_reg("edx") << 32 | state.read_reg("eax"))
    if rfbm & xss:
        raise _NotHandled("supervisor state components")
    return linear, rfbm, xcr0 | xss


def _xsave_pieces(
    state: _State, rfbm: int, compacted_bv: int | None
) -> list[tuple[int, int, int, int]]:
    """(component, offset in KVM's standard area, size, offset in the guest's area).

    The guest's offsets are the standard ones, or with ``compacted_bv`` (XCOMP_BV) the
    compacted ones: extended components packed from byte 576 in order, each that asks
    for it aligned to 64 bytes.  MXCSR (component "-1", bytes 24-31) goes with SSE or AVX.
    """
    pieces = []
    if rfbm & 1:
        pieces += [(0, 0, 24, 0), (0, 32, 128, 32)]  # x87: control and status, ST0-ST7
    if rfbm & 6:
        pieces.append((-1, 24, 8, 24))  # MXCSR and MXCSR_MASK
    if rfbm & 2:
        pieces.append((1, 160, 256, 160))  # XMM0-XMM15
    packed = _XSAVE_LEGACY_END
    for component in range(2, 63):
        selected = rfbm >> component & 1
        listed = compacted_bv is not None and compacted_bv >> component & 1
        if not selected and not listed:
            continue
        if component not in state.xsave_layout:
            raise _NotHandled(f"XSAVE component {component} has no known layout")
        offset, size, aligned = state.xsave_layout[component]
        at = offset
        if compacted_bv is not None:
            if not listed:
                continue  # selected but not in the area: the initial state
            packed = (packed + 63) // 64 * 64 if aligned else packed
            at, packed = packed, packed + size
        if selected:
            pieces.append((component, offset, size, at))
    return pieces


def _xsave(state: _State, insn: _Insn) -> str | None:
    """xsave, xsaveopt (which may save more than it must), xsavec and xsaves (compacted,
    user components only): KVM's state to memory."""
    compacted = insn.mnemonic.startswith(("xsavec", "xsaves"))
    try:
        linear, rfbm, _ = _xsave_checks(state, insn)
        pieces = _xsave_pieces(state, rfbm, rfbm | _COMPACTED if compacted else None)
    except _NotHandled:
        return None
    kvm = state.vcpu.get_xsave()
    in_use = int.from_bytes(kvm[_XSAVE_HEADER : _XSAVE_HEADER + 8], "little")
    end = max([_XSAVE_LEGACY_END, *(at + size for _, _, size, at in pieces)])
    state.check_write(linear, end)  # fault before writing anything
    for component, offset, size, at in pieces:
        # xsavec leaves out components in their initial state (XSTATE_BV says which).
        if not compacted or component < 0 or in_use >> component & 1:
            state.write_bytes(linear + at, kvm[offset : offset + size])
    if compacted:
        header = (in_use & rfbm).to_bytes(8, "little") + (rfbm | _COMPACTED).to_bytes(8, "little")
        state.write_bytes(linear + _XSAVE_HEADER, header + bytes(48))
    else:
        # XSTATE_BV: the bits RFBM selects say which components are in use; others stay.
        old = int.from_bytes(state.read_bytes(linear + _XSAVE_HEADER, 8), "little")
        header_bv = (old & ~rfbm) | (in_use & rfbm)
        state.write_bytes(linear + _XSAVE_HEADER, header_bv.to_bytes(8, "little"))
    state.advance()
    return f"RFBM={rfbm:#x}" + (" compacted" if compacted else "")


def _xrstor(state: _State, insn: _Insn) -> str | None:
    """xrstor, standard or compacted: guest memory (or the initial state) into KVM's state."""
    try:
        linear, rfbm, xcr0 = _xsave_checks(state, insn)
    except _NotHandled:
        return None
    header = state.read_bytes(linear + _XSAVE_HEADER, 64)
    xstate_bv = int.from_bytes(header[:8], "little")
    xcomp_bv = int.from_bytes(header[8:16], "little")
    compacted = bool(xcomp_bv & _COMPACTED)
    # What the CPU refuses with #GP: components not enabled, a header with reserved
    # bytes set, and in the compacted form XSTATE_BV naming what XCOMP_BV does not.
    if xstate_bv & ~xcr0 or any(header[16:]):
        raise GuestFault(GP, 0)
    if compacted and (xcomp_bv & ~_COMPACTED & ~xcr0 or xstate_bv & ~xcomp_bv):
        raise GuestFault(GP, 0)
    if not compacted and (xcomp_bv or _supervisor(insn)):
        raise GuestFault(GP, 0)  # xrstors takes only the compacted form
    try:
        pieces = _xsave_pieces(state, rfbm, xcomp_bv if compacted else None)
    except _NotHandled:
        return None
    kvm = bytearray(state.vcpu.get_xsave())
    end = max([_XSAVE_LEGACY_END, *(at + size for _, _, size, at in pieces)])
    image = state.read_bytes(linear, end)
    if rfbm & 6:
        mxcsr = int.from_bytes(image[24:28], "little")
        mask = int.from_bytes(kvm[28:32], "little") or 0xFFBF
        if mxcsr & ~mask:
            raise GuestFault(GP, 0)
    for component in range(2, 63):  # selected, but absent from a compacted area
        if rfbm >> component & 1 and not any(c == component for c, _, _, _ in pieces):
            offset, size, _ = state.xsave_layout[component]
            kvm[offset : offset + size] = bytes(size)
    for component, offset, size, at in pieces:
        if component < 0:
            kvm[24:28] = image[24:28]  # MXCSR loads whatever XSTATE_BV says
        elif xstate_bv >> component & 1:
            kvm[offset : offset + size] = image[at : at + size]
        elif offset == 0:
            kvm[0:24] = _X87_INIT
        else:
            kvm[offset : offset + size] = bytes(size)
    in_use = int.from_bytes(kvm[_XSAVE_HEADER : _XSAVE_HEADER + 8], "little")
    in_use = (in_use & ~rfbm) | (xstate_bv & rfbm)
    kvm[_XSAVE_HEADER : _XSAVE_HEADER + 8] = in_use.to_bytes(8, "little")
    state.vcpu.set_xsave(bytes(kvm))
    state.advance()
    form = " compacted" if compacted else ""
    return f"RFBM={rfbm:#x} XSTATE_BV={xstate_bv:#x}{form}"


_HANDLERS: dict[str, Callable[[_State, _Insn], str | None]] = {
    "int": _int,
    "int3": _int3,
    "int1": _int1,
    "into": _into,
    "popcnt": _bit_count,
    "lzcnt": _bit_count,
    "tzcnt": _bit_count,
    "movbe": _movbe,
    "clac": _clac_stac,
    "stac": _clac_stac,
    "cmpxchg8b": _cmpxchg8b_16b,
    "cmpxchg16b": _cmpxchg8b_16b,
    "clwb": _cache_line,
    "clflushopt": _cache_line,
    "clflush": _cache_line,
    "invpcid": _invpcid,
    "rdpru": _rdpru,
    "rdtscp": _rdtscp,
    "rdpkru": _pkru,
    "wrpkru": _pkru,
    "xgetbv": _xgetbv,
    "xsetbv": _xsetbv,
    "wait": _fwait,
    "fninit": _fninit,
    "iretd": _iretd,
    "lar": _descriptor_check,
    **dict.fromkeys(_SHA_MNEMONICS, _sha),
    "lsl": _descriptor_check,
    "verr": _descriptor_check,
    "verw": _descriptor_check,
    "xsave": _xsave,
    "xsave64": _xsave,
    "xsaveopt": _xsave,
    "xsaveopt64": _xsave,
    "xsavec": _xsave,
    "xsavec64": _xsave,
    "xrstor": _xrstor,
    "ldmxcsr": _ldmxcsr,
    "stmxcsr": _stmxcsr,
    "xrstor64": _xrstor,
    "xsaves": _xsave,
    "xsaves64": _xsave,
    "xrstors": _xrstor,
    "xrstors64": _xrstor,
    "fnstsw": _fnstsw,
    "fnstcw": _fnstcw,
    "fldcw": _fldcw,
    "fnstenv": _fnstenv,
    "fldenv": _fldenv_frstor,
    "fnsave": _fnsave,
    "frstor": _fldenv_frstor,
    "fstp": _fstp,
    **dict.fromkeys(_X87_CONSTANTS, _fld_constant),
}

COMPLETED_MNEMONICS = tuple(sorted(_HANDLERS))


def describe_completion() -> str:
    """What ``kvmpy info`` says about completion and its fallback (Unicorn not imported)."""
    from kvmpy.x86.fallback import available

    if available():
        fallback = (
            "active (what is too complex to finish by hand, such as SSE and x87 "
            "arithmetic, runs one instruction at a time on the Unicorn CPU emulator)"
        )
    else:
        fallback = "off (the CPU emulator is not installed: pip install 'kvmpy[soft]')"
    return (
        "instruction completion: on (instructions KVM cannot emulate are finished by kvmpy, "
        "one exit each; --no-complete turns it off)\n"
        f"completion fallback: {fallback}"
    )


def xsave_layout(cpuid: list[CpuidEntry]) -> dict[int, tuple[int, int, bool]]:
    """Extended XSAVE components -> (standard offset, size, aligned in the compacted form),
    from CPUID leaf 0xD."""
    return {
        entry.index: (entry.ebx, entry.eax, bool(entry.ecx & 2))
        for entry in cpuid
        if entry.function == 0xD and 2 <= entry.index < 63 and entry.eax
    }
