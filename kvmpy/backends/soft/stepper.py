"""One instruction at a time on the Unicorn CPU: instruction completion's general fallback.

Where KVM gives up on an instruction too complex to finish by hand (SSE and
x87 arithmetic), ``kvmpy/x86/fallback.py`` hands the vCPU's state to an
``InstructionStepper``, which runs exactly one instruction in the emulator
and hands the state back.  Guest RAM is the host's own mapping, mapped into
Unicorn once (``mem_map_ptr``), so memory operands read and write guest RAM
in place, through the guest's own page tables (Unicorn's MMU walks them with
the CR0/CR3/CR4/EFER given).  Nothing but RAM is mapped: an access to MMIO
or to unmapped memory stops the emulator with an error, and the caller
refuses the instruction.

Creating a Unicorn instance takes milliseconds, so callers keep one stepper
per vCPU.  A stepper is not thread-safe.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import struct
from typing import Any

from unicorn import UC_ARCH_X86, UC_HOOK_INTR, UC_MODE_64, UC_PROT_ALL, Uc, UcError
from unicorn import x86_const as x86

from kvmpy.backends.soft.cpu import (
    _CR,
    _ENV,
    MSR_EFER,
    _check_layout,
    _CpuState,
    _reset_to_real_mode,
)
from kvmpy.hostinfo import cpuinfo_fields
from kvmpy.records import Record, replace
from kvmpy.x86.registers import CR0_PG, EFER_LMA, GPR_NAMES, SEGMENT_NAMES, Fpu, Regs, Sregs

_GPRS = {name: getattr(x86, f"UC_X86_REG_{name.upper()}") for name in GPR_NAMES}
_XMM = [getattr(x86, f"UC_X86_REG_XMM{i}") for i in range(16)]
_YMM = [getattr(x86, f"UC_X86_REG_YMM{i}") for i in range(16)]
_FP = [getattr(x86, f"UC_X86_REG_FP{i}") for i in range(8)]
_X87_CONTROL = [x86.UC_X86_REG_FPSW, x86.UC_X86_REG_FPTAG, x86.UC_X86_REG_FPCW]
_EMPTY_TAG = 3  # a full x87 tag word's "empty" (Unicorn keeps only empty or not)
_CODE_CACHE_SIZE = 4096  # addresses remembered before translated code is dropped


# Fields of QEMU's CPU state (Unicorn 2.1) the register API does not reach, as
# offsets in ``_CpuState`` data: the last exception's error code, and the
# softfloat exception flags of the x87 and of SSE (QEMU 5 computes them but
# does not put them in FSW and MXCSR).  Each is checked by a probe before use.
_ERROR_CODE = 5424 - _ENV
_X87_FLAGS = 818 - _ENV
_SSE_FLAGS = 850 - _ENV
# softfloat's flags -> the x87/SSE exception bits: invalid -> IE, divide by zero
# -> ZE, overflow -> OE, underflow -> UE, inexact -> PE, a flushed denormal
# result -> UE and PE.  (softfloat's "input denormal" means DAZ flushed an input,
# where the CPU sets no DE; DE for denormal operands is not tracked: see fallback.py.)
_SOFTFLOAT_TO_X86 = ((1, 0x01), (4, 0x04), (8, 0x08), (16, 0x10), (32, 0x20), (128, 0x30))


class _HiddenFields(Record):
    error_code: int | None
    float_flags: bool  # _X87_FLAGS and _SSE_FLAGS hold softfloat's flags


def _env_read(cpu: _CpuState, offset: int, size: int) -> bytes | None:
    """``size`` bytes of the CPU state at ``offset``; None if outside the context."""
    context = cpu.context
    if offset < _CR or _ENV + offset + size > context.size:
        return None
    cpu.uc.context_update(context)
    return ctypes.string_at(cpu.address + _ENV + offset, size)


def _env_write(cpu: _CpuState, changes: dict[int, bytes]) -> None:
    """Write ``changes`` (offset: bytes) into the CPU state at once."""
    cpu.uc.context_update(cpu.context)
    for offset, data in changes.items():
        ctypes.memmove(cpu.address + _ENV + offset, data, len(data))
    cpu.uc.context_restore(cpu.context)


@functools.cache
def _hidden_fields() -> _HiddenFields:
    """Probe where the hidden fields are: a write to a not-present page in long mode
    must leave error code 2 (W); divps 1/3 and 1/0 must leave inexact and divide by
    zero in SSE's flags; fld1, fldz, fdivp must leave divide by zero in the x87's."""
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, 0x200000)
    pml4, pdpt, pd = 0x1000, 0x2000, 0x3000
    uc.mem_write(pml4, struct.pack("<Q", pdpt | 3))
    uc.mem_write(pdpt, struct.pack("<Q", pd | 3))
    uc.mem_write(pd, struct.pack("<Q", 0x83))  # the first 2 MiB only
    # divps xmm0, xmm1; fld1; fldz; fdivp; mov byte [rax], 0
    uc.mem_write(0x4000, bytes.fromhex("0f5ec1d9e8d9eedef9c60000"))
    uc.reg_write(x86.UC_X86_REG_CR3, pml4)
    uc.reg_write(x86.UC_X86_REG_CR4, 0x620)
    uc.reg_write(x86.UC_X86_REG_CR0, 0x8000_0011)
    uc.reg_write(x86.UC_X86_REG_RAX, 0x200000)
    uc.reg_write(x86.UC_X86_REG_MXCSR, 0x1F80)
    uc.reg_write(x86.UC_X86_REG_FPCW, 0x37F)
    uc.reg_write(x86.UC_X86_REG_XMM0, 0x3F80_0000_3F80_0000)  # 1.0, 1.0, 0, 0
    uc.reg_write(x86.UC_X86_REG_XMM1, 0x0000_0000_4040_0000)  # 3.0, 0, 0, 0
    uc.hook_add(UC_HOOK_INTR, lambda emulator, vector, _: emulator.emu_stop())
    cpu = _CpuState(uc)
    try:
        uc.emu_start(0x4000, 0, count=5)
    except UcError:
        return _HiddenFields(None, False)
    error_code = _env_read(cpu, _ERROR_CODE, 4)
    x87, sse = _env_read(cpu, _X87_FLAGS, 1), _env_read(cpu, _SSE_FLAGS, 1)
    cr2 = uc.reg_read(x86.UC_X86_REG_CR2)
    error_ok = error_code is not None and (struct.unpack("<I", error_code)[0], cr2) == (2, 0x200000)
    # SSE: 1/3 inexact, 1/0 divide by zero, 0/0 (the upper lanes) invalid.
    flags_ok = x87 is not None and sse is not None and x87[0] & 4 and sse[0] == 0x25
    return _HiddenFields(_ERROR_CODE if error_ok else None, bool(flags_ok))


def _x86_flags(softfloat: int) -> int:
    return sum(x86_bits for bit, x86_bits in _SOFTFLOAT_TO_X86 if softfloat & bit) & 0x3F


def _host_address(mapping: mmap.mmap) -> int:
    """Where ``mapping`` starts in this process, without keeping a buffer export alive."""
    view = ctypes.c_char.from_buffer(mapping)
    address = ctypes.addressof(view)
    del view  # a live export would stop GuestMemory from closing the map
    return address


class StepResult(Record, frozen=False):
    """What one instruction did: the new state, or the exception it raised instead.

    ``vector`` is None when the instruction completed; then ``regs``, ``fpu``
    and ``ymm_high`` hold the state after it.  With a vector the state is the
    one before the instruction (nothing to write back) and ``cr2`` is what a
    page fault left there.
    """

    regs: Regs
    fpu: Fpu
    ymm_high: bytes | None
    vector: int | None = None
    cr2: int = 0
    # The exception's error code as the emulator computed it (None: not known).
    error_code: int | None = None
    # The x87 exceptions (FSW bits 0-5) this instruction raised, masked all.
    x87_raised: int = 0


class StepRefused(Exception):
    """The emulator could not run the instruction (unmapped or MMIO memory, an emulator error)."""


@functools.cache
def _emulated_model() -> int | None:
    """The Unicorn CPU model closest to the host's vendor, or None for Unicorn's default.

    The stepper runs instructions a guest chose after reading the host's CPUID (PVM
    shows guests the host's), so the emulated CPU must accept what the host has:
    Unicorn's default model lacks ADX, for one.
    """
    models = {"AuthenticAMD": "UC_CPU_X86_EPYC_ROME", "GenuineIntel": "UC_CPU_X86_ICELAKE_SERVER"}
    name = models.get(cpuinfo_fields().get("vendor_id", ""))
    model: int | None = getattr(x86, name, None) if name else None
    return model


class InstructionStepper:
    """A Unicorn CPU over guest RAM that runs single instructions on a given state."""

    def __init__(self, ram: list[tuple[int, mmap.mmap]]) -> None:
        """``ram``: (guest-physical address, the host's mapping) of each RAM region."""
        self.uc = Uc(UC_ARCH_X86, UC_MODE_64)
        model = _emulated_model()
        if model is not None:  # before anything else: Unicorn builds the CPU on first use
            self.uc.ctl_set_cpu_model(model)
        _check_layout(self.uc)
        # No end address: Unicorn would look it up through the guest's page tables.
        self.uc.ctl_exits_enabled(True)
        self.uc.ctl_set_exits([])
        _reset_to_real_mode(self.uc)
        for gpa, mapping in ram:
            self.uc.mem_map_ptr(gpa, len(mapping), UC_PROT_ALL, _host_address(mapping))
        self._cpu = _CpuState(self.uc)
        # A CPU with no exception in flight: after one, the next would become a #DF.
        self._clean = self.uc.context_save()
        self._hidden = _hidden_fields()
        self._vector: int | None = None
        # RIP -> the instruction bytes last run there, while translated code is kept.
        self._code_at: dict[int, bytes] = {}
        self._control: tuple[int, int, int] | None = None  # (CR0, CR4, EFER) loaded last
        self.uc.hook_add(UC_HOOK_INTR, self._on_exception)

    def _on_exception(self, uc: Uc, vector: int, _: object) -> None:
        self._vector = vector
        uc.emu_stop()

    def step(
        self,
        code: bytes,
        regs: Regs,
        sregs: Sregs,
        fpu: Fpu,
        ymm_high: bytes | None,
        x87: bool = True,
        sse: bool = True,
    ) -> StepResult:
        """Run the instruction at ``regs.rip``, whose bytes are ``code`` (as the guest's
        memory holds them now); raises StepRefused when it cannot.

        ``x87``/``sse``: whether the instruction may touch the x87 (and MMX) registers
        or the XMM registers and MXCSR; only those go over and come back."""
        uc = self.uc
        if not self._hidden.float_flags:
            raise StepRefused("this Unicorn's floating-point flags are not where kvmpy looks")
        try:
            self._load_control(sregs, regs.rflags)
            self._load_registers(regs, fpu, ymm_high, x87, sse)
            # Translated code is kept while the bytes it came from stay the same: every
            # block Unicorn holds starts at an address in _code_at, from the bytes there.
            known = self._code_at.get(regs.rip)
            if known != code:
                if known is not None or len(self._code_at) >= _CODE_CACHE_SIZE:
                    uc.ctl_flush_tb()
                    self._code_at.clear()
                self._code_at[regs.rip] = code
            _env_write(self._cpu, {_X87_FLAGS: b"\0", _SSE_FLAGS: b"\0"})
            self._vector = None
            uc.emu_start(regs.rip, 0, count=1)
        except UcError as exc:
            raise StepRefused(str(exc)) from None
        if self._vector is not None:
            cr2 = int(uc.reg_read(x86.UC_X86_REG_CR2))
            error_code = self._error_code()
            uc.context_restore(self._clean)
            self._control = None
            return StepResult(regs, fpu, ymm_high, self._vector, cr2, error_code)
        return self._read_state(fpu, ymm_high, x87, sse)

    def _error_code(self) -> int | None:
        if self._hidden.error_code is None:
            return None
        data = _env_read(self._cpu, self._hidden.error_code, 4)
        return None if data is None else int(struct.unpack("<I", data)[0])

    # -- loading -------------------------------------------------------------------------

    def _load_control(self, sregs: Sregs, rflags: int) -> None:
        """Control registers as SoftVcpu.set_sregs loads them, then the segment caches.

        CR3 is written every time: that also empties Unicorn's TLB, since the guest
        may have changed its page tables since the last step.
        """
        uc = self.uc
        control = (sregs.cr0, sregs.cr4, sregs.efer)
        if control != self._control:
            uc.reg_write(x86.UC_X86_REG_CR0, uc.reg_read(x86.UC_X86_REG_CR0) & ~CR0_PG)
            uc.reg_write(x86.UC_X86_REG_CR4, sregs.cr4)
            uc.msr_write(MSR_EFER, sregs.efer & ~EFER_LMA)
            uc.reg_write(x86.UC_X86_REG_CR3, sregs.cr3)
            uc.reg_write(x86.UC_X86_REG_CR0, sregs.cr0)
            if bool(uc.msr_read(MSR_EFER) & EFER_LMA) != bool(sregs.efer & EFER_LMA):
                self._control = None
                raise StepRefused("EFER.LMA does not follow from CR0, CR4 and EFER")
            if uc.reg_read(x86.UC_X86_REG_CR4) != sregs.cr4:
                self._control = None
                raise StepRefused(
                    f"the emulated CPU lacks a CR4 feature ({sregs.cr4:#x} became "
                    f"{uc.reg_read(x86.UC_X86_REG_CR4):#x})"
                )
            self._control = control
        else:
            uc.reg_write(x86.UC_X86_REG_CR3, sregs.cr3)
        uc.reg_write(x86.UC_X86_REG_CR2, sregs.cr2)
        uc.reg_write(x86.UC_X86_REG_GDTR, (0, sregs.gdt.base, sregs.gdt.limit, 0))
        uc.reg_write(x86.UC_X86_REG_IDTR, (0, sregs.idt.base, sregs.idt.limit, 0))
        self._cpu.load({name: getattr(sregs, name) for name in SEGMENT_NAMES}, sregs.cr0, rflags)

    def _load_registers(
        self, regs: Regs, fpu: Fpu, ymm_high: bytes | None, x87: bool, sse: bool
    ) -> None:
        values: list[tuple[int, Any]] = [(reg, getattr(regs, name)) for name, reg in _GPRS.items()]
        values += [(x86.UC_X86_REG_RFLAGS, regs.rflags), (x86.UC_X86_REG_RIP, regs.rip)]
        if x87:
            # Unicorn's FP0-FP7 are the physical registers, ST(i) is R[(TOP + i) % 8];
            # its tag word has two bits per physical register, of which it keeps "empty".
            top = (fpu.fsw >> 11) & 7
            tags = 0
            for i in range(8):
                physical = (top + i) & 7
                raw = int.from_bytes(fpu.fpr[16 * i : 16 * i + 10], "little")
                values.append((_FP[physical], (raw & ((1 << 64) - 1), raw >> 64)))
                if not fpu.ftwx >> physical & 1:
                    tags |= _EMPTY_TAG << (2 * physical)
            values += list(zip(_X87_CONTROL, (fpu.fsw, tags, fpu.fcw), strict=True))
        if sse:
            values.append((x86.UC_X86_REG_MXCSR, fpu.mxcsr))
            for i in range(16):
                low = int.from_bytes(fpu.xmm[16 * i : 16 * i + 16], "little")
                if ymm_high is None:
                    values.append((_XMM[i], low))
                else:
                    high = int.from_bytes(ymm_high[16 * i : 16 * i + 16], "little")
                    values.append((_YMM[i], high << 128 | low))
        self.uc.reg_write_batch(values)

    # -- reading back --------------------------------------------------------------------

    def _read_state(self, before: Fpu, ymm_high: bytes | None, x87: bool, sse: bool) -> StepResult:
        """The state after the instruction, with the exceptions it raised in FSW and
        MXCSR.  FOP/FIP/FDP stay as they were (the emulator does not keep them)."""
        wanted = [*_GPRS.values(), x86.UC_X86_REG_RIP, x86.UC_X86_REG_RFLAGS]
        if x87:
            wanted += [*_FP, *_X87_CONTROL]
        if sse:
            wanted += [x86.UC_X86_REG_MXCSR, *(_XMM if ymm_high is None else _YMM)]
        values = iter(self.uc.reg_read_batch(wanted))
        gprs = {name: int(next(values)) for name in _GPRS}
        regs = Regs(**gprs, rip=int(next(values)), rflags=int(next(values)))
        # The exceptions the instruction raised, which QEMU 5 leaves in softfloat's status.
        flags = _env_read(self._cpu, _X87_FLAGS, _SSE_FLAGS - _X87_FLAGS + 1) or bytes(33)
        x87_raised, sse_raised = _x86_flags(flags[0]), _x86_flags(flags[-1])
        fpu = before
        if x87:
            physical_registers = [next(values) for _ in range(8)]
            fsw, tags, fcw = (int(next(values)) for _ in range(3))
            if x87_raised & ~fcw:
                # Unmasked, the CPU stores another result and signals #MF; the emulator not.
                raise StepRefused("an unmasked x87 exception")
            top = (fsw >> 11) & 7
            fpr = bytearray(128)
            ftwx = 0
            for physical, (mantissa, exponent) in enumerate(physical_registers):
                i = (physical - top) & 7
                raw = int(mantissa) | int(exponent) << 64
                fpr[16 * i : 16 * i + 10] = raw.to_bytes(10, "little")
                if (tags >> (2 * physical)) & 3 != _EMPTY_TAG:
                    ftwx |= 1 << physical
            fpu = replace(fpu, fcw=fcw, fsw=fsw | x87_raised, ftwx=ftwx, fpr=bytes(fpr))
        if sse:
            mxcsr = int(next(values))
            if sse_raised & ~(mxcsr >> 7):
                # Unmasked, the CPU leaves the destination and raises #XM; the emulator not.
                raise StepRefused("an unmasked SIMD exception")
            vectors = [int(next(values)) for _ in range(16)]
            xmm = b"".join((v & ((1 << 128) - 1)).to_bytes(16, "little") for v in vectors)
            if ymm_high is not None:
                ymm_high = b"".join((v >> 128).to_bytes(16, "little") for v in vectors)
            fpu = replace(fpu, mxcsr=mxcsr | sse_raised, xmm=xmm)
        return StepResult(regs, fpu, ymm_high, x87_raised=x87_raised if x87 else 0)

    def close(self) -> None:
        """Unmap guest RAM: the stepper must not outlive the mappings it was given."""
        for start, end, _ in list(self.uc.mem_regions()):
            self.uc.mem_unmap(start, end - start + 1)
