"""QEMU's spellings on the command line, and the first-contact checks before a run."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kvmpy.cli import _check_outputs, _qemu_spellings, build_parser, main
from kvmpy.loaders.detect import initrd_modules
from kvmpy.x86.pc import PC, with_debug_exits
from kvmpy.x86.topology import CpuTopology
from tests.helpers import ROOT, Assembler, guest, take_sigint

MiB = 1 << 20


def _run_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["run", *argv])


def test_qemu_spellings_parse_as_the_long_options() -> None:
    args = _run_args("-m", "64", "-smp", "2", "-append", "console=ttyS0", "-s", "-S", "k.elf")
    assert (args.mem, args.topology.cpus, args.append) == (64 * MiB, 2, "console=ttyS0")
    assert _run_args("-smp", "4,sockets=2", "k").topology == CpuTopology(2, 2, 1)
    assert _run_args("--cpus", "3", "k").topology == CpuTopology(1, 3, 1)
    assert (args.gdb, args.start_paused, args.image) == ("tcp::1234", True, "k.elf")
    assert _run_args("--mem", "4096B", "k").mem == 4096
    assert _run_args("--qmp", "unix:/tmp/q,server", "k").qmp == "unix:/tmp/q,server"


def test_kernel_and_initrd() -> None:
    args = _run_args("-kernel", "k.elf", "-initrd", "a.bin one two,b.bin")
    _qemu_spellings(args)
    assert args.image == "k.elf"
    # The loader decides: one initrd for Linux, QEMU's module list for multiboot.
    assert args.initrd == "a.bin one two,b.bin"
    assert initrd_modules(args.initrd) == [("a.bin", "one two"), ("b.bin", "")]
    assert _run_args("--initrd", "rd.cpio", "k").initrd == "rd.cpio"
    with pytest.raises(ValueError, match="two images"):
        _qemu_spellings(_run_args("x", "-kernel", "y"))


def test_trace_takes_kinds_only_after_an_equals_sign() -> None:
    args = _run_args("--trace", "image.bin")
    assert args.image == "image.bin"
    assert args.trace == {"io", "mmio", "hlt", "debug", "other", "emulated"}
    assert _run_args("--trace=io,hlt", "image.bin").trace == {"io", "hlt"}
    everything = {"io", "mmio", "hlt", "debug", "other", "emulated"}
    assert _run_args("image.bin", "--trace").trace == everything


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == "kvmpy 0.1.0"


def test_output_paths_are_checked_before_the_run(tmp_path: Path) -> None:
    bad_png = tmp_path / "missing" / "x.png"
    with pytest.raises(ValueError, match="cannot write the screenshot"):
        _check_outputs(_run_args("--screenshot", str(bad_png), "i.bin"))
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="cannot write the snapshot"):
        _check_outputs(_run_args("--snapshot-at-exit", str(blocker / "snap"), "i.bin"))
    good_png, good_dir = tmp_path / "ok.png", tmp_path / "a" / "snap"
    _check_outputs(
        _run_args("--screenshot", str(good_png), "--snapshot-at-exit", str(good_dir), "i.bin")
    )
    assert not good_png.exists()  # the probe leaves nothing behind
    assert good_dir.is_dir() and not any(good_dir.iterdir())


def test_debug_exit_option_places_the_device() -> None:
    assert _run_args("k").debug_exit is None
    args = _run_args("--debug-exit", "0x501,2", "--debug-exit", "0xf4", "k")
    assert args.debug_exit == [(0x501, 2), (0xF4, 4)]
    board = with_debug_exits(PC, args.debug_exit)
    placed = [(e.name, e.ports[0].base, e.ports[0].length) for e in board.devices if e.ports]
    assert [p for p in placed if p[0].startswith("debug_exit")] == [
        ("debug_exit", 0x501, 2),
        ("debug_exit2", 0xF4, 4),
    ]
    assert [p[0] for p in placed][:4] == ["serial", "serial2", "debug_exit", "debug_exit2"]
    assert not any(e.name.startswith("debug") for e in with_debug_exits(PC, []).devices)
    for bad in ("0x10000", "0xffff,2", "x", "0xf4,0", "-1"):
        with pytest.raises(SystemExit):
            _run_args("--debug-exit", bad, "k")


def _kvmpy(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvmpy", *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
    )


@pytest.mark.kvm
def test_debug_exit_at_another_port(assemble: Assembler) -> None:
    image = assemble("mov $0x2a, %al\nmov $0x501, %dx\nout %al, %dx\nhlt")
    assert _kvmpy("run", "--debug-exit", "0x501,2", str(image)).returncode == 0x55
    clash = _kvmpy("run", "--debug-exit", "0x3f8", str(image))
    assert (clash.returncode, clash.stderr) == (
        2,
        "kvmpy: error: debug-exit: port range 0x3f8-0x3fb overlaps COM1 at 0x3f8-0x3ff\n",
    )


# Say "hi" on port 0xe9 if it reads back 0xe9 (debugcon is there), exit 0; else exit 7.
DEBUGCON_GUEST = """
    mov $0xe9, %dx
    in %dx, %al
    cmp $0xe9, %al
    jne 1f
    mov $'h', %al
    out %al, %dx
    mov $'i', %al
    out %al, %dx
    mov $0, %al
    out %al, $0xf4
1:  mov $7, %al
    out %al, $0xf4
"""


@pytest.mark.kvm
def test_debugcon_prints_port_0xe9(assemble: Assembler, tmp_path: Path) -> None:
    image = str(assemble(DEBUGCON_GUEST))
    shown = _kvmpy("run", "--debugcon", "stdio", image)
    assert (shown.returncode, shown.stdout, shown.stderr) == (1, "hi", "")
    log = tmp_path / "debugcon.log"
    to_file = _kvmpy("run", "--debugcon", f"file:{log}", "--serial", "null", image)
    assert (to_file.returncode, to_file.stdout, log.read_text()) == (1, "", "hi")
    assert _kvmpy("run", image).returncode == 15  # no debugcon: 0xe9 does not read back
    bad = _kvmpy("run", "--debugcon", "tcp:localhost:4444,server", image)
    assert (bad.returncode, bad.stderr) == (
        2,
        "kvmpy: error: bad --debugcon 'tcp:localhost:4444,server': it is output only: "
        "stdio, file:PATH or null\n",
    )


@pytest.mark.kvm
def test_debugcon_across_a_snapshot(assemble: Assembler, tmp_path: Path) -> None:
    """ "A" on 0xe9, wait for a key on COM1, "B" on 0xe9: saved while waiting, then
    restored with the run's --debugcon (and refused without it)."""
    image = assemble(
        "mov $0xe9, %dx\nmov $'A', %al\nout %al, %dx\nmov $0x3fd, %dx\n"
        "1: in %dx, %al\ntest $1, %al\njz 1b\n"
        "mov $0xe9, %dx\nmov $'B', %al\nout %al, %dx\nmov $0, %al\nout %al, $0xf4"
    )
    snapshot = tmp_path / "snap"
    first = _kvmpy(
        "run", "--debugcon", "stdio", "--timeout", "1", "--snapshot-at-exit", str(snapshot),
        str(image),
    )  # fmt: skip
    assert (first.returncode, first.stdout) == (124, "A")
    refused = _kvmpy("restore", str(snapshot))
    assert refused.returncode == 2
    assert "extra ['debugcon'] (kvmpy restore needs the --device, --debugcon" in refused.stderr
    restored = subprocess.run(
        [sys.executable, "-m", "kvmpy", "restore", "--debugcon", "stdio", str(snapshot)],
        input="x", capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert (restored.returncode, restored.stdout) == (1, "B")


@pytest.mark.kvm
def test_verbose_says_what_was_detected() -> None:
    result = _kvmpy("run", "-v", "-kernel", str(guest("multiboot_hello", ".elf")))
    assert result.returncode == 1
    detected = [line for line in result.stderr.splitlines() if " image, " in line]
    assert detected == [
        f"kvmpy: {guest('multiboot_hello', '.elf')}: multiboot image, protected mode, "
        "loaded at 0x100000, entry 0x10000c"
    ], result.stderr


@pytest.mark.kvm
def test_a_flat_image_that_dies_at_once_gets_a_mode_hint(assemble: Assembler) -> None:
    # fwait at CPL0 ends a PVM guest at once (an emulation failure); on VT-x the
    # ud2 after it runs into the empty IVT, and the run times out.
    image = assemble("fwait\nud2")
    result = _kvmpy("run", "--timeout", "20", str(image))
    assert result.returncode in (4, 124)
    if result.returncode == 4:
        assert "hint: a flat image starts in 16-bit real mode" in result.stderr
        assert result.stderr.rstrip().endswith("--mode protected or --mode long")
    with_mode = _kvmpy("run", "--mode", "long", str(guest("long_hello")))
    assert with_mode.returncode == 1 and "hint" not in with_mode.stderr
    printed = _kvmpy("run", str(guest("real_hello")))
    assert "hint" not in printed.stderr


@pytest.mark.kvm
def test_ctrl_c_prints_one_line(assemble: Assembler) -> None:
    image = assemble("mov $0x3f8, %dx\nmov $'S', %al\nout %al, %dx\n1: jmp 1b")
    for verbose in ((), ("-v",)):
        process = subprocess.Popen(
            [sys.executable, "-m", "kvmpy", "run", str(image), *verbose],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
            preexec_fn=take_sigint,
        )
        assert process.stdout is not None
        assert process.stdout.read(1) == b"S"
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
        assert process.returncode == 130
        lines = stderr.decode().splitlines()
        if verbose:
            assert len(lines) > 10 and "RAX=" in stderr.decode()  # the full report
        else:
            assert len(lines) == 1, lines
            assert lines[0].startswith("kvmpy: vCPU 0: interrupted at RIP=0x7c")


@pytest.mark.kvm
def test_start_paused_needs_something_to_continue_it() -> None:
    result = _kvmpy("run", "-S", str(guest("real_hello")))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "kvmpy: error: -S needs --qmp or --gdb (-s): nothing could continue the guest"
    )
