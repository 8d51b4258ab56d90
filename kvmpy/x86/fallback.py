"""The general fallback of instruction completion: one instruction on the CPU emulator.

What ``kvmpy/x86/complete.py`` cannot finish by hand (SSE and x87
arithmetic: ``movd xmm15, ecx``, ``fld``, ``fimul``, ...) runs here, as
exactly one instruction on a Unicorn CPU (``kvmpy/backends/soft/stepper.py``,
the software backend's emulator; the optional ``soft`` extra).  The vCPU's
state goes over through the backend protocol: registers, special registers
(segments with their hidden parts, CR0/CR3/CR4/EFER, GDT/IDT) and the XSAVE
area (x87 stack and control words, XMM and the upper YMM halves, MXCSR).
Guest RAM is shared, not copied, and the guest's paging applies.  Afterwards
only what changed goes back: the registers, and the XSAVE area only when the
x87 or SSE state changed, with XSTATE_BV marking what is now in use.

Only instructions that touch nothing else are taken: x87, MMX, SSE up to
4.2, AES, PCLMUL, SHA, BMI and ADX, without a lock prefix, not VEX-encoded
(the emulator has no AVX), and with RFLAGS.TF clear.  Anything else, an
access to MMIO or unmapped memory, or an exception whose cause cannot be
known exactly (#UD: is it the guest's or a feature the emulator lacks?)
leaves the crash report as it was.  Exceptions that can be known exactly are
raised into the guest: #DE, #NM, #MF, #XM, #GP(0), #SS(0), and #PF with the
error code kvmpy's own page walk gives for the faulting address.

What the emulator (QEMU 5's TCG) does differently is corrected here or in the
stepper: MXCSR and FSW exception flags, x87 C1 after rounding, 16-byte
alignment checks; or refused: unmasked exceptions, the x87 functions it
computes in double precision, AVX.  Known and left: x87 FOP/FIP/FDP stay as
they were, x87 stack overflow/underflow is not detected, DE for denormal
operands is not tracked, and a memory write that faults on its second page
may have written the first (docs/completion.md).
"""

from __future__ import annotations

import importlib.util
import mmap
import threading
from typing import TYPE_CHECKING, Any

from kvmpy.records import replace
from kvmpy.x86.complete import DE, GP, MF, NM, PF, SS_FAULT, GuestFault
from kvmpy.x86.registers import CR0_EM, CR0_TS, Fpu

if TYPE_CHECKING:
    from kvmpy.memory import GuestMemory
    from kvmpy.x86.complete import _Insn, _State

XM = 19  # SIMD floating-point exception
_TF = 1 << 8
# #PF error code bits kvmpy's walk also works out (present, write, user); the others
# (reserved bit, instruction fetch, protection key) make the fallback refuse.
_PF_WRITE = 2
_PF_CHECKED = 7

# Capstone's instruction groups the fallback runs: instructions on the general,
# x87, MMX and XMM registers and memory only.
_GROUPS = frozenset(
    (
        "fpu", "mmx", "3dnow", "sse1", "sse2", "sse3", "ssse3", "sse41", "sse42", "sse4a",
        "aes", "pclmul", "sha", "adx", "bmi", "bmi2",
    )
)  # fmt: skip
# In those groups, but touching state the stepper does not carry over: the x87's last
# instruction and operand pointers (FIP, FDP, FOP), which the emulator does not keep.
_REFUSED = frozenset(
    ("monitor", "mwait", "monitorx", "mwaitx", "fnstenv", "fldenv", "fnsave", "frstor",
     "fxsave", "fxsave64", "fxrstor", "fxrstor64")
)  # fmt: skip
# Legacy SSE instructions whose 16-byte memory operand need not be aligned (SDM Vol. 1,
# 12.10.4 for the SSE4.2 string compares).
_UNALIGNED = frozenset(
    ("movups", "movupd", "movdqu", "lddqu", "pcmpestri", "pcmpestrm", "pcmpistri", "pcmpistrm")
)
_OP_REG, _OP_MEM = 1, 3  # capstone's X86_OP_REG, X86_OP_MEM
_LEGACY_PREFIXES = frozenset((0x66, 0x67, 0xF2, 0xF3, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65))
# Groups whose instructions the emulator lacks or that touch more than the stepper carries.
_REFUSED_GROUPS = frozenset(
    ("avx", "avx2", "avx512", "fma", "fma4", "f16c", "xop", "novlx", "vlx", "privilege", "int",
     "iret", "call", "ret", "jump", "vm", "sgx")
)  # fmt: skip

# x87 instructions whose C1 says whether the result was rounded up; others set C1
# their own way (fxam, fprem, compares, loads of the environment) or leave it undefined.
_X87_ROUNDING = frozenset(
    (
        "fadd", "faddp", "fiadd", "fsub", "fsubp", "fisub", "fsubr", "fsubrp", "fisubr",
        "fmul", "fmulp", "fimul", "fdiv", "fdivp", "fidiv", "fdivr", "fdivrp", "fidivr",
        "fsqrt", "fscale", "frndint", "fst", "fstp", "fist", "fistp", "fisttp", "fbstp",
        "fld", "fild",
    )
)  # fmt: skip
# What the emulator (QEMU 5's x87) computes through host doubles, losing precision.
_X87_IMPRECISE = frozenset(
    ("f2xm1", "fyl2x", "fyl2xp1", "fptan", "fpatan", "fprem", "fprem1", "fsin", "fcos",
     "fsincos")
)  # fmt: skip
_PE, _C1, _RC_CHOP = 0x20, 0x200, 0xC00

# XSAVE area (standard format) offsets.
_XSTATE_BV = 512
_YMM_COMPONENT = 2


def available() -> bool:
    """Whether the fallback can run here: the CPU emulator (Unicorn) is installed."""
    return importlib.util.find_spec("unicorn") is not None


def eligible(insn: _Insn) -> bool:
    """Whether ``insn`` is one the fallback may run: it touches only registers the
    stepper carries over, and memory."""
    name = insn.mnemonic.removeprefix("rep ").removeprefix("repne ")
    if name in _REFUSED or name in _X87_IMPRECISE or 0xF0 in insn.prefixes or name.startswith("v"):
        return False  # "v": VEX-encoded (AVX, which the emulator lacks) or VMX
    raw = insn.raw
    groups = {str(raw.group_name(group)) for group in raw.groups}
    if groups & _REFUSED_GROUPS:
        return False
    if groups & _GROUPS or name.startswith("f"):
        return True  # every x87 mnemonic starts with "f"
    # Capstone leaves some SSE instructions without a group (cvtsd2si): by the opcode.
    return _simd_opcode(bytes(raw.bytes))


def _simd_opcode(code: bytes) -> bool:
    """Whether ``code`` (one whole instruction) is an x87 (D8-DF) or an MMX/SSE opcode of
    the 0F map (0F 10-17, 28-2F, 50-7F, C2-C6, D0-FF, the 0F 38 and 0F 3A maps)."""
    at = 0
    while at < len(code) and code[at] in _LEGACY_PREFIXES:
        at += 1
    if at < len(code) and 0x40 <= code[at] <= 0x4F:
        at += 1  # REX (in 32-bit code this is inc/dec, and nothing follows it here)
    opcode = code[at : at + 2]
    if len(opcode) >= 1 and 0xD8 <= opcode[0] <= 0xDF:
        return True
    if len(opcode) < 2 or opcode[0] != 0x0F:
        return False
    second = opcode[1]
    return (
        0x10 <= second <= 0x17
        or 0x28 <= second <= 0x2F
        or 0x50 <= second <= 0x7F
        or 0xC2 <= second <= 0xC6
        or second >= 0xD0
        or second in (0x38, 0x3A)
    )


class Fallback:
    """The steppers (one Unicorn CPU per vCPU, made on first use) and what they ran."""

    def __init__(self) -> None:
        self._steppers: dict[int, Any] = {}
        self._ram_key: tuple[tuple[int, int, int], ...] = ()
        self._mappings: list[mmap.mmap] = []
        self._lock = threading.Lock()
        self.unavailable = not available()

    def _stepper(self, index: int, memory: GuestMemory) -> Any:
        """vCPU ``index``'s stepper over ``memory``'s RAM; a new one when RAM was remapped.

        The steppers map the host's mappings by address: they must never run after one
        of those closed, nor over a new mapping that happens to reuse an id."""
        from kvmpy.backends.soft.stepper import StepRefused

        regions = list(memory.regions)
        if not regions or any(region.mapping.closed for region in regions):
            self.close()
            raise StepRefused("guest RAM is closed")
        key = tuple((r.gpa, r.size, id(r.mapping)) for r in regions)
        with self._lock:
            if key != self._ram_key:
                self.close()
                self._ram_key = key
                self._mappings = [region.mapping for region in regions]  # ids stay theirs
            stepper = self._steppers.get(index)
            if stepper is None:
                from kvmpy.backends.soft.stepper import InstructionStepper

                stepper = InstructionStepper([(r.gpa, r.mapping) for r in memory.regions])
                self._steppers[index] = stepper
            return stepper

    def run(self, state: _State, insn: _Insn) -> str | None:
        """Run ``insn`` on the emulator: what was done, None to refuse, or GuestFault."""
        if self.unavailable or not eligible(insn) or state.regs.rflags & _TF:
            return None
        from kvmpy.backends.soft.stepper import StepRefused

        _check_alignment(state, insn)
        vcpu = state.vcpu
        area = vcpu.get_xsave()
        ymm_at = state.xsave_layout.get(_YMM_COMPONENT)
        fpu, ymm_high = _simd_state(area, ymm_at[0] if ymm_at else None)
        x87, sse = _register_files(insn)
        try:
            stepper = self._stepper(vcpu.index, state.memory)
            result = stepper.step(state.code, state.regs, state.sregs, fpu, ymm_high, x87, sse)
            if result.vector is None and insn.mnemonic in _X87_ROUNDING:
                result = self._with_c1(stepper, state, insn, fpu, ymm_high, result)
        except StepRefused:
            return None
        if result.vector is not None:
            fault = _exact_fault(state, result.vector, result.error_code, result.cr2)
            if fault is None:
                return None
            raise fault
        regs = result.regs
        expected = (state.regs.rip + insn.size) & state.ip_mask
        repeated = insn.mnemonic.startswith(("rep ", "repne ")) and regs.rip == state.regs.rip
        if regs.rip != expected and not repeated:
            return None  # not a plain instruction after all: nothing is written back
        changed = _updated_area(area, fpu, ymm_high, result.fpu, result.ymm_high, ymm_at)
        if changed is not None:
            vcpu.set_xsave(changed)
        state.regs = regs
        vcpu.set_regs(regs)
        return "one instruction on the CPU emulator"

    @staticmethod
    def _with_c1(
        stepper: Any, state: _State, insn: _Insn, fpu: Fpu, ymm_high: bytes | None, result: Any
    ) -> Any:
        """C1 as the CPU sets it after an x87 result (the emulator leaves it as it was): 1
        if rounding incremented the significand, else 0.  When the result was inexact, the
        instruction runs again rounding toward zero: a different result means it was."""
        from kvmpy.backends.soft.stepper import StepRefused

        rounded_up = False
        if result.x87_raised & _PE:
            chopped = replace(fpu, fcw=fpu.fcw | _RC_CHOP)
            truncated = stepper.step(
                state.code, state.regs, state.sregs, chopped, ymm_high, sse=False
            )
            truncated_memory = _memory_operands(state, insn)
            again = stepper.step(state.code, state.regs, state.sregs, fpu, ymm_high, sse=False)
            if again.vector is not None or again.fpu != result.fpu:
                raise StepRefused("the instruction did not repeat")
            rounded_up = (truncated.fpu.fpr, truncated_memory) != (
                again.fpu.fpr,
                _memory_operands(state, insn),
            )
        c1 = _C1 if rounded_up else 0
        result.fpu = replace(result.fpu, fsw=(result.fpu.fsw & ~_C1) | c1)
        return result

    def close(self) -> None:
        for stepper in self._steppers.values():
            stepper.close()
        self._steppers.clear()


def _register_files(insn: _Insn) -> tuple[bool, bool]:
    """(x87, SSE): which register files ``insn`` may touch, so that only those cross over.
    An x87 escape (D8-DF) touches no XMM register or MXCSR; an instruction with no MMX
    or x87 register operand touches no x87 state (cvtpi2ps from memory included)."""
    code = bytes(insn.raw.bytes)
    at = 0
    while at < len(code) and code[at] in _LEGACY_PREFIXES:
        at += 1
    if at < len(code) and 0x40 <= code[at] <= 0x4F and at + 1 < len(code):
        at += 1
    if at < len(code) and 0xD8 <= code[at] <= 0xDF:
        return True, False
    registers = [str(insn.raw.reg_name(op.reg)) for op in insn.operands if op.type == _OP_REG]
    mmx = any(reg.startswith(("mm", "st")) for reg in registers)
    return mmx or insn.mnemonic in ("emms", "femms"), True


def _check_alignment(state: _State, insn: _Insn) -> None:
    """#GP(0) for a misaligned 16-byte SSE operand: the CPU checks it, the emulator
    does not.  (CR0.TS or EM come first, with #NM or #UD: the emulator's.)"""
    if state.sregs.cr0 & (CR0_TS | CR0_EM):
        return
    name = insn.mnemonic
    for operand in insn.operands:
        if operand.type != _OP_MEM:
            continue
        aligned = operand.size == 16 and name not in _UNALIGNED
        if aligned and state.address(operand) % 16:
            raise GuestFault(GP, 0)


def _memory_operands(state: _State, insn: _Insn) -> list[bytes]:
    """The bytes of each memory operand now (to compare two runs' stores)."""
    return [
        state.read_bytes(state.address(operand), operand.size)
        for operand in insn.operands
        if operand.type == _OP_MEM and operand.size
    ]


def _simd_state(area: bytes, ymm_offset: int | None) -> tuple[Fpu, bytes | None]:
    """The x87/SSE state and the upper YMM halves an XSAVE area holds; components
    XSTATE_BV marks as not in use are in their initial state, whatever the bytes say."""
    from kvmpy.x86.complete import fpu_from_xsave

    in_use = int.from_bytes(area[_XSTATE_BV : _XSTATE_BV + 8], "little")
    fpu = fpu_from_xsave(area)
    if not in_use & 1:
        fpu.fcw, fpu.fsw, fpu.ftwx, fpu.fpr = 0x37F, 0, 0, bytes(128)
        fpu.last_opcode = fpu.last_ip = fpu.last_dp = 0
    if not in_use & 2:
        fpu.xmm = bytes(256)
    ymm_high = None
    if ymm_offset is not None:
        ymm_high = bytes(area[ymm_offset : ymm_offset + 256]) if in_use & 4 else bytes(256)
    return fpu, ymm_high


def _updated_area(
    area: bytes,
    fpu: Fpu,
    ymm_high: bytes | None,
    new_fpu: Fpu,
    new_ymm_high: bytes | None,
    ymm_at: tuple[int, int, bool] | None,
) -> bytes | None:
    """``area`` with what the instruction changed, XSTATE_BV marking it in use; None: nothing."""
    from kvmpy.x86.complete import xsave_with_fpu

    out = area
    x87_changed = (fpu.fcw, fpu.fsw, fpu.ftwx, fpu.fpr) != (
        new_fpu.fcw,
        new_fpu.fsw,
        new_fpu.ftwx,
        new_fpu.fpr,
    )
    sse_changed = (fpu.xmm, fpu.mxcsr) != (new_fpu.xmm, new_fpu.mxcsr)
    if x87_changed:
        out = xsave_with_fpu(out, new_fpu)  # sets XSTATE_BV's x87 bit
    if sse_changed:
        # XSTATE_BV's SSE bit also for MXCSR alone: Linux's KVM_SET_XSAVE takes MXCSR
        # only with the SSE or AVX bit set.  (XMM are written too: zero if not in use.)
        edit = bytearray(out)
        edit[24:28] = new_fpu.mxcsr.to_bytes(4, "little")
        edit[160:416] = new_fpu.xmm
        edit[_XSTATE_BV] |= 2
        out = bytes(edit)
    if ymm_at is not None and new_ymm_high is not None and new_ymm_high != ymm_high:
        edit = bytearray(out)
        edit[ymm_at[0] : ymm_at[0] + 256] = new_ymm_high
        edit[_XSTATE_BV] |= 4
        out = bytes(edit)
    return None if out is area else out


def _exact_fault(state: _State, vector: int, error_code: int | None, cr2: int) -> GuestFault | None:
    """The exception to raise into the guest for one the emulator raised, when its
    vector and error code are certain; None to refuse."""
    if vector in (DE, NM, MF, XM):
        return GuestFault(vector)
    if vector in (GP, SS_FAULT):
        return GuestFault(vector, 0)  # these instructions load no selector: error code 0
    if vector != PF or error_code is None or error_code & ~_PF_CHECKED:
        return None  # #UD among them: the guest's, or a feature the emulator lacks
    # The emulator's #PF, confirmed by kvmpy's own walk of the same access.
    try:
        state._physical(cr2, write=bool(error_code & _PF_WRITE))
    except GuestFault as fault:
        if fault.vector == PF and fault.error_code == error_code and fault.cr2 == cr2:
            return fault
    return None
