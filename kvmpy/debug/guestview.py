"""Reading guest code and data through the vCPU's current address translation."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmpy.memory import PAGE_SIZE, GuestMemory, GuestMemoryError
from kvmpy.x86.registers import CR0_PG, Sregs, cpu_mode

if TYPE_CHECKING:
    from kvmpy.backends.base import Vcpu

LINEAR_LIMIT = 1 << 64  # no linear address reaches this


def code_address(sregs: Sregs, rip: int) -> int:
    """The linear address of CS:RIP (segment bases are ignored in 64-bit mode)."""
    if cpu_mode(sregs) == "long":
        return rip
    return (sregs.cs.base + rip) & 0xFFFFFFFF


def translate(vcpu: Vcpu, sregs: Sregs, linear: int) -> int | None:
    """Guest-physical address of ``linear``, or None if it is not mapped."""
    if not sregs.cr0 & CR0_PG:
        return linear
    result = vcpu.translate(linear)
    return None if result is None else result.physical_address


def read_linear(vcpu: Vcpu, memory: GuestMemory, sregs: Sregs, linear: int, length: int) -> bytes:
    """Up to ``length`` bytes at ``linear``; stops early at an unmapped page or outside RAM."""
    out = bytearray()
    length = min(length, max(LINEAR_LIMIT - linear, 0)) if linear >= 0 else 0
    while len(out) < length:
        address = linear + len(out)
        chunk = min(length - len(out), PAGE_SIZE - (address % PAGE_SIZE))
        gpa = translate(vcpu, sregs, address)
        if gpa is None:
            break
        try:
            out += memory.read(gpa, chunk)
        except GuestMemoryError:
            break
    return bytes(out)


def write_linear(vcpu: Vcpu, memory: GuestMemory, sregs: Sregs, linear: int, data: bytes) -> None:
    """Write all of ``data`` at ``linear`` through the guest's paging, or nothing.

    Raises GuestMemoryError naming the first address that is unmapped or not RAM.
    """
    if not 0 <= linear <= LINEAR_LIMIT - len(data):
        raise GuestMemoryError(f"{linear:#x}+{len(data):#x} is past the address space")
    pieces: list[tuple[int, int, int]] = []  # guest-physical address, offset in data, length
    done = 0
    while done < len(data):
        address = linear + done
        chunk = min(len(data) - done, PAGE_SIZE - address % PAGE_SIZE)
        gpa = translate(vcpu, sregs, address)
        if gpa is None or not memory.contains(gpa, chunk):
            raise GuestMemoryError(f"{address:#x} is not mapped to RAM")
        pieces.append((gpa, done, chunk))
        done += chunk
    for gpa, offset, chunk in pieces:
        memory.write(gpa, data[offset : offset + chunk])


def capstone_mode(sregs: Sregs) -> int:
    import capstone  # here, not at the top: a plain run never disassembles

    mode = cpu_mode(sregs)
    if mode == "long":
        return int(capstone.CS_MODE_64)
    if mode != "real" and sregs.cs.db:
        return int(capstone.CS_MODE_32)
    return int(capstone.CS_MODE_16)


def disassemble(code: bytes, address: int, mode: int, count: int = 0) -> list[tuple[int, int, str]]:
    """(address, length, "mnemonic operands") for each instruction capstone decodes."""
    import capstone

    decoder = capstone.Cs(capstone.CS_ARCH_X86, mode)
    return [
        (insn.address, insn.size, f"{insn.mnemonic} {insn.op_str}".strip())
        for insn in decoder.disasm(code, address, count)
    ]


def disassemble_around(
    vcpu: Vcpu, memory: GuestMemory, sregs: Sregs, linear: int, before: int = 8, after: int = 8
) -> list[tuple[int, int, str]]:
    """About ``before`` instructions leading up to ``linear`` and ``after`` from it.

    x86 cannot be decoded backwards, so try each start in a window before
    ``linear`` and keep the earliest whose instruction stream lands exactly on
    it; when none does, start at ``linear``.  Leading instructions made of
    zero bytes (empty memory before the code) are left out.
    """
    mode = capstone_mode(sregs)
    window = 4 * before
    start = max(linear - window, 0)
    try:
        code = read_linear(vcpu, memory, sregs, start, linear - start + 15 * after)
    except OSError:
        return []
    if len(code) < linear - start:  # the bytes before RIP are unreadable
        code, start = code[linear - start :], linear
    for offset in range(linear - start + 1):
        decoded = disassemble(code[offset:], start + offset, mode)
        addresses = [address for address, _, _ in decoded]
        if linear in addresses:
            index = addresses.index(linear)
            shown = decoded[max(index - before, 0) : index + after]
            while shown[0][0] != linear and not any(
                code[shown[0][0] - start : shown[0][0] - start + shown[0][1]]
            ):
                shown = shown[1:]
            return shown
    return []
