"""--trace and --stats: one line per exit, and the exit statistics table."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kvmpy import records
from kvmpy.debug.trace import ExitStats, ExitTracer, parse_trace_kinds
from kvmpy.loaders.flat import load_flat
from kvmpy.machine import Machine
from tests.helpers import ROOT, Assembler, guest

pytestmark = pytest.mark.kvm


def traced(image: Path, mode: str, kinds: str = "", **machine: object) -> tuple[list[str], Machine]:
    out = io.StringIO()
    m = Machine(mem_size=16 << 20, **machine)  # type: ignore[arg-type]
    m.observer = ExitTracer(m.memory, out, parse_trace_kinds(kinds))
    m.load(load_flat(image, 0x7C00 if mode == "real" else 0x100000), mode=mode)
    m.run(timeout=30)
    return out.getvalue().splitlines(), m


def test_port_io_lines_name_the_instruction_and_the_data(assemble: Assembler) -> None:
    image = assemble("mov $0x3f8, %dx\nmov $0x41, %al\nout %al, %dx\nin %dx, %al\nout %al, $0xf4")
    lines, m = traced(image, "real", "io")
    m.close()
    assert lines == [
        "[vcpu0] IO_OUT     real      0000:7c05   out dx, al  port=0x3f8 size=1 data=0x41",
        "[vcpu0] IO_IN      real      0000:7c06   in al, dx  port=0x3f8 size=1 data=0x0",
        "[vcpu0] IO_OUT     real      0000:7c07   out 0xf4, al  port=0xf4 size=1 data=0x0",
    ]


def test_mmio_lines_in_long_mode(assemble: Assembler) -> None:
    source = """
        movabs $0xfeb00000, %rbx
        movl $0xcafef00d, 4(%rbx)
        mov (%rbx), %eax
        out %al, $0xf4
    """
    lines, m = traced(assemble(source, "long"), "long", "mmio")
    m.close()
    assert len(lines) == 2
    assert re.fullmatch(
        r"\[vcpu0\] MMIO_WRITE long      0x10000a    mov dword ptr \[rbx \+ 4\], 0xcafef00d"
        r"  addr=0xfeb00004 size=4 data=0xcafef00d",
        lines[0],
    ), lines[0]
    assert lines[1].endswith("mov eax, dword ptr [rbx]  addr=0xfeb00000 size=4 data=0x504d564b")


def test_hlt_line_and_filters(assemble: Assembler) -> None:
    lines, m = traced(
        assemble("mov $1, %al\nout %al, $0x80\ncli\nhlt"), "real", "hlt", irqchip=False
    )
    m.close()
    assert len(lines) == 1
    assert lines[0].startswith("[vcpu0] HLT        real      0000:7c05   hlt")


def test_unknown_trace_kind_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown trace kind bogus"):
        parse_trace_kinds("io,bogus")


def test_stats_count_exits_per_port() -> None:
    m = Machine(mem_size=1 << 20, irqchip=False)
    stats = ExitStats(m.ports, m.mmio)
    m.observer = stats
    m.load(load_flat(guest("pio_loop"), 0x7C00), mode="real")
    m.vcpu.set_regs(records.replace(m.vcpu.get_regs(), rcx=500))
    assert m.run(timeout=60).exit_code == 0
    m.close()
    rows = {(name, where): row for name, where, row in stats.rows()}
    assert rows[("IO_OUT", "0x80 POST")].count == 500
    assert rows[("IO_OUT", "0xf4 debug-exit")].count == 1
    post = rows[("IO_OUT", "0x80 POST")]
    assert post.run_ns > 0 and post.handle_ns > 0
    text = stats.format()
    assert text.startswith("kvmpy exit statistics: 501 exits on 1 vCPU(s)")
    assert re.search(r"IO_OUT\s+0x80 POST\s+500\s+[\d.]+ ms\s+[\d.]+ us", text)


def test_cli_trace_file_and_stats(tmp_path: Path) -> None:
    trace = tmp_path / "trace.txt"
    result = subprocess.run(
        [sys.executable, "-m", "kvmpy", "run", str(guest("real_hello")), "--trace=io",
         "--trace-file", str(trace), "--stats"],
        capture_output=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stdout.startswith(b"Hello from real mode!")
    lines = trace.read_text().splitlines()
    assert lines[0].startswith("[vcpu0] IO_OUT")
    assert all(" port=0x" in line for line in lines)
    assert b"kvmpy exit statistics:" in result.stderr
    assert b"COM1" in result.stderr


def test_cli_rejects_a_bad_trace_kind() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kvmpy", "run", "x.bin", "--trace=nope"],
        capture_output=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 2
    assert b"unknown trace kind nope" in result.stderr
