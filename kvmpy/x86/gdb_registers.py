"""x86 registers as gdb sees them: the two register layouts and their marshalling.

``AMD64`` (``i386:x86-64``) serves long and compatibility mode; ``I386``
(``i386``) serves 32- and 16-bit code.  ``read_registers`` and
``write_registers`` move a vCPU's state to and from gdb's register names;
they run in the vCPU's own thread.  The x87 tag word is converted between
FXSAVE's abridged form (one bit per register) and gdb's full form (two).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from kvmpy.debug.gdbproto import E_INVAL, Feature, Register, RegisterLayout, TargetError
from kvmpy.x86.registers import EFER_LMA, Regs, Sregs, cpu_mode

if TYPE_CHECKING:
    from kvmpy.debug.coreapi import Fpu, Vcpu

# -- the layouts -----------------------------------------------------------------------

_EFLAGS_TYPE = """\
    <flags id="x86_eflags" size="4">
      <field name="CF" start="0" end="0"/>
      <field name="" start="1" end="1"/>
      <field name="PF" start="2" end="2"/>
      <field name="AF" start="4" end="4"/>
      <field name="ZF" start="6" end="6"/>
      <field name="SF" start="7" end="7"/>
      <field name="TF" start="8" end="8"/>
      <field name="IF" start="9" end="9"/>
      <field name="DF" start="10" end="10"/>
      <field name="OF" start="11" end="11"/>
      <field name="IOPL" start="12" end="13"/>
      <field name="NT" start="14" end="14"/>
      <field name="RF" start="16" end="16"/>
      <field name="VM" start="17" end="17"/>
      <field name="AC" start="18" end="18"/>
      <field name="VIF" start="19" end="19"/>
      <field name="VIP" start="20" end="20"/>
      <field name="ID" start="21" end="21"/>
    </flags>"""

_SSE_TYPES = """\
    <vector id="v4f" type="ieee_single" count="4"/>
    <vector id="v2d" type="ieee_double" count="2"/>
    <vector id="v16i8" type="int8" count="16"/>
    <vector id="v8i16" type="int16" count="8"/>
    <vector id="v4i32" type="int32" count="4"/>
    <vector id="v2i64" type="int64" count="2"/>
    <union id="vec128">
      <field name="v4_float" type="v4f"/>
      <field name="v2_double" type="v2d"/>
      <field name="v16_int8" type="v16i8"/>
      <field name="v8_int16" type="v8i16"/>
      <field name="v4_int32" type="v4i32"/>
      <field name="v2_int64" type="v2i64"/>
      <field name="uint128" type="uint128"/>
    </union>
    <flags id="x86_mxcsr" size="4">
      <field name="IE" start="0" end="0"/>
      <field name="DE" start="1" end="1"/>
      <field name="ZE" start="2" end="2"/>
      <field name="OE" start="3" end="3"/>
      <field name="UE" start="4" end="4"/>
      <field name="PE" start="5" end="5"/>
      <field name="DAZ" start="6" end="6"/>
      <field name="IM" start="7" end="7"/>
      <field name="DM" start="8" end="8"/>
      <field name="ZM" start="9" end="9"/>
      <field name="OM" start="10" end="10"/>
      <field name="UM" start="11" end="11"/>
      <field name="PM" start="12" end="12"/>
      <field name="FZ" start="15" end="15"/>
    </flags>"""

SEGMENT_REGISTERS = ("cs", "ss", "ds", "es", "fs", "gs")
X87_CONTROL = ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop")
AMD64_GPRS = (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
)  # fmt: skip
# The i386 order is the instruction encoding's, not amd64's.
I386_GPRS = ("eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi")


def _core(gprs: tuple[str, ...], pc: str, bits: int) -> Feature:
    def gpr(name: str) -> Register:
        kind = "data_ptr" if name[1:] in ("sp", "bp") else f"int{bits}"
        return Register(name, bits, kind, "general")

    regs = [gpr(name) for name in gprs]
    regs.append(Register(pc, bits, "code_ptr", "general"))
    regs.append(Register("eflags", 32, "x86_eflags", "general"))
    regs += [Register(name, 32, "int32", "general") for name in SEGMENT_REGISTERS]
    regs += [Register(f"st{i}", 80, "i387_ext", "float") for i in range(8)]
    regs += [Register(name, 32, "int", "float") for name in X87_CONTROL]
    return Feature("org.gnu.gdb.i386.core", tuple(regs), _EFLAGS_TYPE)


def _sse(count: int) -> Feature:
    regs = [Register(f"xmm{i}", 128, "vec128", "vector") for i in range(count)]
    regs.append(Register("mxcsr", 32, "x86_mxcsr", "vector"))
    return Feature("org.gnu.gdb.i386.sse", tuple(regs), _SSE_TYPES)


def _segments() -> Feature:
    return Feature(
        "org.gnu.gdb.i386.segments",
        (Register("fs_base", 64, "int", "system"), Register("gs_base", 64, "int", "system")),
    )


def _system(names: Iterable[str]) -> Feature:
    # Not a gdb standard feature: gdb shows its registers ($cr3, info registers cr0).
    return Feature(
        "org.kvmpy.x86.system", tuple(Register(name, 64, "int", "system") for name in names)
    )


AMD64 = RegisterLayout(
    "i386:x86-64",
    (
        _core(AMD64_GPRS, "rip", 64),
        _sse(16),
        _segments(),
        _system(("cr0", "cr2", "cr3", "cr4", "cr8", "efer")),
    ),
    pc="rip",
)
# No org.gnu.gdb.i386.segments here: gdb 13 fails an internal assertion on a
# 32-bit description that has it.
I386 = RegisterLayout(
    "i386",
    (
        _core(I386_GPRS, "eip", 32),
        _sse(8),
        _system(("cr0", "cr2", "cr3", "cr4", "efer")),
    ),
    pc="eip",
)


def layout_for(sregs: Sregs) -> RegisterLayout:
    """AMD64 when EFER.LMA is set (64-bit or compatibility mode), else I386."""
    return AMD64 if sregs.efer & EFER_LMA else I386


# -- linear addresses ------------------------------------------------------------------

LOW32 = 0xFFFF_FFFF


def mask_linear(sregs: Sregs, address: int) -> int:
    """Outside long mode a linear address has 32 bits."""
    return address if sregs.efer & EFER_LMA else address & LOW32


def mask_linear_for(layout: RegisterLayout, address: int) -> int:
    return address if layout is AMD64 else address & LOW32


# -- the x87 tag word ----------------------------------------------------------------------


def full_tag_word(fpu: Fpu) -> int:
    """gdb's ftag (2 bits per register) from FXSAVE's abridged tag byte."""
    top = (fpu.fsw >> 11) & 7
    tag = 0
    for physical in range(8):
        stack = (physical - top) & 7
        if not fpu.ftwx & (1 << physical):
            value = 3  # empty
        else:
            raw = int.from_bytes(fpu.fpr[stack * 16 : stack * 16 + 10], "little")
            exponent = (raw >> 64) & 0x7FFF
            integer_bit = (raw >> 63) & 1
            if exponent == 0x7FFF:
                value = 2  # special
            elif exponent == 0:
                value = 1 if raw & ((1 << 64) - 1) == 0 else 2  # zero, or denormal
            else:
                value = 0 if integer_bit else 2
        tag |= value << (2 * physical)
    return tag


def abridged_tag(full: int) -> int:
    return sum(1 << i for i in range(8) if (full >> (2 * i)) & 3 != 3)


# -- a vCPU's registers by gdb name (run in the vCPU's thread) ---------------------------

_I386_TO_AMD64 = dict(
    zip(I386_GPRS, ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi"), strict=True)
)
_I386_TO_AMD64["eip"] = "rip"
_FPU_SCALARS = ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop", "mxcsr")
_SYSTEM = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer")


def read_registers(vcpu: Vcpu) -> dict[str, int]:
    """Every register of both layouts, by gdb name."""
    regs, sregs, fpu = vcpu.get_regs(), vcpu.get_sregs(), vcpu.get_fpu()
    values = {name: getattr(regs, name) for name in (*AMD64_GPRS, "rip")}
    for short, name in _I386_TO_AMD64.items():
        values[short] = values[name] & LOW32
    values["eflags"] = regs.rflags & LOW32
    for name in SEGMENT_REGISTERS:
        values[name] = getattr(sregs, name).selector
    for i in range(8):
        values[f"st{i}"] = int.from_bytes(fpu.fpr[16 * i : 16 * i + 10], "little")
    for i in range(16):
        values[f"xmm{i}"] = int.from_bytes(fpu.xmm[16 * i : 16 * i + 16], "little")
    values.update(
        fctrl=fpu.fcw,
        fstat=fpu.fsw,
        ftag=full_tag_word(fpu),
        fiseg=fpu.last_ip >> 32,
        fioff=fpu.last_ip & LOW32,
        foseg=fpu.last_dp >> 32,
        fooff=fpu.last_dp & LOW32,
        fop=fpu.last_opcode & 0x7FF,
        mxcsr=fpu.mxcsr,
        fs_base=sregs.fs.base,
        gs_base=sregs.gs.base,
    )
    for name in _SYSTEM:
        values[name] = getattr(sregs, name)
    return values


def merge32(old: int, value: int) -> int:
    """``old`` with its low 32 bits replaced by ``value``'s (a 32-bit register write)."""
    return (old & ~LOW32) | (value & LOW32)


def write_registers(vcpu: Vcpu, values: dict[str, int]) -> None:
    """Set the registers named in ``values``; each state block is read and written once."""
    regs: Regs | None = None
    sregs: Sregs | None = None
    fpu: Fpu | None = None
    for name, value in values.items():
        if name in AMD64_GPRS or name == "rip" or name in _I386_TO_AMD64 or name == "eflags":
            regs = regs or vcpu.get_regs()
            if name == "eflags":
                regs.rflags = merge32(regs.rflags, value)
            elif name in _I386_TO_AMD64:
                full = _I386_TO_AMD64[name]
                setattr(regs, full, merge32(getattr(regs, full), value))
            else:
                setattr(regs, name, value)
        elif name in SEGMENT_REGISTERS or name in ("fs_base", "gs_base") or name in _SYSTEM:
            sregs = sregs or vcpu.get_sregs()
            set_system(sregs, name, value)
        elif name.startswith(("st", "xmm")) or name in _FPU_SCALARS:
            fpu = fpu or vcpu.get_fpu()
            set_fpu(fpu, name, value)
        else:
            raise TargetError(f"no register {name}", E_INVAL)
    if regs is not None:
        vcpu.set_regs(regs)
    if sregs is not None:
        vcpu.set_sregs(sregs)
    if fpu is not None:
        vcpu.set_fpu(fpu)


def set_system(sregs: Sregs, name: str, value: int) -> None:
    """A segment selector, a segment base or a control register, by gdb name."""
    if name in ("fs_base", "gs_base"):
        getattr(sregs, name[:2]).base = value
    elif name in _SYSTEM:
        setattr(sregs, name, value)
    else:
        segment = getattr(sregs, name)
        value &= 0xFFFF
        if segment.selector == value:
            return
        if cpu_mode(sregs) != "real":
            raise TargetError(
                f"cannot load {name} outside real mode (its descriptor would not change)", E_INVAL
            )
        segment.selector = value
        segment.base = value << 4


def set_fpu(fpu: Fpu, name: str, value: int) -> None:
    """An x87 or SSE register, by gdb name, in FXSAVE form."""
    if name.startswith("st") and name[2:].isdigit():
        i = int(name[2:])
        fpr = bytearray(fpu.fpr)
        fpr[16 * i : 16 * i + 10] = value.to_bytes(10, "little")
        fpu.fpr = bytes(fpr)
    elif name.startswith("xmm"):
        i = int(name[3:])
        xmm = bytearray(fpu.xmm)
        xmm[16 * i : 16 * i + 16] = value.to_bytes(16, "little")
        fpu.xmm = bytes(xmm)
    elif name == "fctrl":
        fpu.fcw = value & 0xFFFF
    elif name == "fstat":
        fpu.fsw = value & 0xFFFF
    elif name == "ftag":
        fpu.ftwx = abridged_tag(value)
    elif name == "fioff":
        fpu.last_ip = merge32(fpu.last_ip, value)
    elif name == "fiseg":
        fpu.last_ip = (fpu.last_ip & LOW32) | (value & LOW32) << 32
    elif name == "fooff":
        fpu.last_dp = merge32(fpu.last_dp, value)
    elif name == "foseg":
        fpu.last_dp = (fpu.last_dp & LOW32) | (value & LOW32) << 32
    elif name == "fop":
        fpu.last_opcode = value & 0x7FF
    elif name == "mxcsr":
        fpu.mxcsr = value & LOW32
