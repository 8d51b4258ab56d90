"""Completion cost: one instruction kvmpy completes against one port-I/O exit.

Each case is a 64-bit CPL0 guest that runs one instruction N times in a
`dec %ecx; jnz` loop and then writes the debug-exit port; the baseline runs
the same loop with no instruction in it.  The time per iteration less the
baseline's is the cost of the instruction, exit included.  On a host whose
KVM cannot emulate the instruction (PVM), that is an internal-error exit plus
kvmpy's decode and completion; `out` is an ordinary exit to the Python loop.
The "(fallback)" cases are SSE and x87 arithmetic, which kvmpy runs one
instruction at a time on the CPU emulator (kvmpy/x86/fallback.py); an inexact
x87 result costs two more emulator runs (C1 says which way it was rounded).

    python bench/completion.py [--count N] [--rounds R]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kvmpy.loaders.flat import load_flat
from kvmpy.machine import Machine

ROOT = Path(__file__).resolve().parent.parent

SOURCE = """
    .code64
    .globl _start
_start:
    lea handler(%rip), %rax
    lea idt + 3 * 16(%rip), %rdi
    mov %ax, (%rdi)
    movw $0x10, 2(%rdi)
    movw $0x8e00, 4(%rdi)
    shr $16, %rax
    mov %ax, 6(%rdi)
    lidt idtr(%rip)
    mov %cr4, %rax
    bts $18, %rax
    mov %rax, %cr4
    lea cell(%rip), %rsi
    SETUP
    mov $COUNT, %r8d
1:  BODY
    dec %r8d
    jnz 1b
    xor %eax, %eax
    out %al, $0xf4
    hlt
handler:
    iretq
    .data
    .align 16
cell: .quad 0, 0
factor: .float 1.0000001
idtr: .word 256 * 16 - 1
    .quad idt
    .align 16
idt: .space 256 * 16
"""

# name: (set-up before the loop, the instruction in it)
CASES = {
    "baseline (empty loop)": ("", ""),
    "out to port 0x80 (port-I/O exit)": ("", "out %al, $0x80"),
    "stac": ("", "stac"),
    "popcnt": ("", "popcnt %rbx, %rax"),
    "xgetbv": ("", "xor %ecx, %ecx; xgetbv"),
    "lock cmpxchg16b": ("", "lock cmpxchg16b (%rsi)"),
    "int3 (+ iretq)": ("", "int3"),
    "movd %ecx, %xmm15 (fallback)": ("", "movd %ecx, %xmm15"),
    "addps (fallback)": ("", "addps %xmm1, %xmm0"),
    "fmul exact (fallback)": ("fninit; fld1; fld1", "fmul %st(1), %st"),
    "fmul inexact (fallback, 3 runs)": ("fninit; flds factor(%rip); fld1", "fmul %st(1), %st"),
}


def build(setup: str, body: str, count: int, workdir: Path, name: str) -> Path:
    src, obj, binary = (workdir / f"{name}{suffix}" for suffix in (".S", ".o", ".bin"))
    text = SOURCE.replace("SETUP", setup).replace("BODY", body).replace("COUNT", str(count))
    src.write_text(text)
    subprocess.run(["as", "--64", "-o", str(obj), str(src)], check=True)
    script = ROOT / "guests" / "long.ld"
    subprocess.run(
        ["ld", "-m", "elf_x86_64", "-T", str(script), "-o", str(binary), str(obj)], check=True
    )
    return binary


def run_once(image: Path) -> tuple[float, int]:
    """Seconds for the whole run (set-up excluded), and how many instructions were completed."""
    with Machine(mem_size=4 << 20, irqchip=False) as machine:
        machine.load(load_flat(image, 0x100000), mode="long")
        start = time.perf_counter()
        outcome = machine.run(timeout=600)
        elapsed = time.perf_counter() - start
        if outcome.exit_code != 0:
            sys.exit(f"bench guest {image.name} failed: {outcome.message}")
        return elapsed, sum(machine.arch.completer.counts.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, tuple[float, int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        images = {
            name: build(setup, body, args.count, Path(tmp), f"case{i}")
            for i, (name, (setup, body)) in enumerate(CASES.items())
        }
        times: dict[str, list[float]] = {name: [] for name in CASES}
        completed: dict[str, int] = {}
        for _ in range(args.rounds):  # interleaved, so drift hits every case alike
            for name, image in images.items():
                elapsed, count = run_once(image)
                times[name].append(elapsed)
                completed[name] = count
        for name in CASES:
            results[name] = (statistics.median(times[name]), completed[name])
    baseline = results["baseline (empty loop)"][0] / args.count
    port = results["out to port 0x80 (port-I/O exit)"][0] / args.count - baseline
    print(f"{args.count} iterations per case, median of {args.rounds} rounds")
    print(f"{'case':34} {'us/iteration':>12} {'cost us':>9} {'vs port I/O':>11}  completed")
    # (completed counts the set-up's few completions too)
    for name, (elapsed, count) in results.items():
        per = elapsed / args.count
        cost = per - baseline
        ratio = f"{cost / port:10.2f}x" if name != "baseline (empty loop)" else ""
        print(f"{name:34} {per * 1e6:12.2f} {cost * 1e6:9.2f} {ratio:>11}  {count}")


if __name__ == "__main__":
    main()
