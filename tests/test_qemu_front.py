"""kvmpy-qemu: QEMU's command line, as harnesses written for QEMU give it.

The command lines here are the shapes kvm-unit-tests' x86 run script and
``make run`` targets of test kernels use; the probes are the ones such a
harness makes before it trusts a binary named by ``QEMU=``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmpy.cli import _report, build_parser
from kvmpy.outcome import Outcome, OutcomeKind
from kvmpy.qemu_front import _OPTIONS, QemuCommandLine, _argparse_problem, device_help, main
from tests.fuzzing import budget as fuzz_budget
from tests.helpers import Assembler, guest

# A kvm-unit-tests x86 run: every option before the kernel and its arguments.
UNIT_TEST_LINE = [
    "-nodefaults",
    "-device", "pc-testdev",
    "-device", "isa-debug-exit,iobase=0xf4,iosize=0x4",
    "-vnc", "none",
    "-serial", "stdio",
    "-machine", "accel=kvm",
    "-kernel", "x86/msr.flat",
    "-smp", "1",
]  # fmt: skip


def translate(*argv: str) -> QemuCommandLine:
    line = QemuCommandLine()
    line.read(argv)
    return line


def kvmpy_qemu(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The installed script when there is one (as a harness calls it), else the module."""
    script = shutil.which("kvmpy-qemu", path=str(Path(sys.executable).parent))
    command = [script] if script else [sys.executable, "-m", "kvmpy", "qemu"]
    return subprocess.run(
        [*command, *argv], capture_output=True, text=True, timeout=timeout, check=False
    )


# -- the translation ---------------------------------------------------------------------


def test_a_kvm_unit_tests_line_becomes_a_kvmpy_run() -> None:
    line = translate(*UNIT_TEST_LINE)
    assert line.warnings == []
    assert line.kvmpy_run_args() == [
        "--quiet",
        "--serial", "stdio",
        "--cpus", "1",
        "--debug-exit", "0xf4,4",
        "--reboot",
        "--accel", "kvm",
        "--", "x86/msr.flat",
    ]  # fmt: skip


def test_isa_debug_exit_defaults_to_qemus_port() -> None:
    assert translate("-device", "isa-debug-exit", "-kernel", "k").debug_exits == [(0x501, 2)]
    two = translate(
        "-device", "isa-debug-exit,iosize=1",
        "-device", "isa-debug-exit,iobase=0x600",
        "-kernel", "k",
    )  # fmt: skip
    assert two.debug_exits == [(0x501, 1), (0x600, 2)]
    # Without one on the command line, kvmpy's PC keeps its own at 0xf4.
    assert "--debug-exit" not in translate("-kernel", "k").kvmpy_run_args()


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        (["-m", "256"], ["--mem", "256M"]),
        (["-m", "1G"], ["--mem", "1G"]),
        (["-m", "size=512M"], ["--mem", "512M"]),
        (["-append", "console=ttyS0 quiet"], ["--append", "console=ttyS0 quiet"]),
        (["-initrd", "env"], ["--initrd", "env"]),
        (["-smp", "cpus=4,sockets=2"], ["--cpus", "cpus=4,sockets=2"]),
        (["-gdb", "tcp::1234", "-S"], ["--gdb", "tcp::1234", "-S"]),
        (["-qmp", "unix:/tmp/q,server,nowait"], ["--qmp", "unix:/tmp/q,server,nowait"]),
        (
            ["-chardev", "socket,id=mon1,path=/tmp/m,server=on,wait=off", "-mon",
             "chardev=mon1,mode=control"],
            ["--qmp", "unix:/tmp/m,server"],
        ),
        (["-display", "curses"], ["--display", "term"]),
        (["-debugcon", "file:dbg.log"], ["--debugcon", "file:dbg.log"]),
        (["-device", "pci-testdev", "-device", "pci-testdev"], ["--device", "pci-testdev"]),
    ],
)  # fmt: skip
def test_options_become_kvmpy_options(option: list[str], expected: list[str]) -> None:
    assert translate(*option, "-kernel", "k").run_args == expected


@pytest.mark.parametrize(
    ("option", "accel", "irqchip"),
    [
        (["-enable-kvm"], "kvm", True),
        (["-accel", "tcg"], "soft", True),
        (["-machine", "pc,accel=kvm:tcg"], "auto", True),
        (["-M", "pc-i440fx-7.2,accel=kvm,kernel_irqchip=off"], "kvm", False),
        ([], None, True),
    ],
)
def test_accelerator_and_irqchip(option: list[str], accel: str | None, irqchip: bool) -> None:
    line = translate(*option, "-kernel", "k")
    assert (line.accel, line.irqchip) == (accel, irqchip)
    assert ("--no-irqchip" in line.kvmpy_run_args()) is not irqchip


def test_no_reboot_is_qemus_switch() -> None:
    assert "--reboot" in translate("-kernel", "k").kvmpy_run_args()
    assert "--reboot" not in translate("-kernel", "k", "-no-reboot").kvmpy_run_args()


def test_what_only_tunes_qemu_is_ignored_with_a_warning() -> None:
    line = translate(
        "-kernel", "k", "-name", "t", "-rtc", "base=utc",
        "-global", "kvm-pit.lost_tick_policy=discard",
        "-cpu", "qemu64,+x2apic", "-cpu", "host", "-machine", "kernel_irqchip=split",
        "-m", "128,slots=2,maxmem=1G", "-nographic", "-no-user-config", "-monitor", "none",
    )  # fmt: skip
    assert len(line.warnings) == 6, line.warnings
    assert all("warning" not in w for w in line.warnings)  # the prefix adds it, once
    assert any(
        w.startswith("-cpu qemu64,+x2apic: the guest sees the host's") for w in line.warnings
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-device", "virtio-blk-pci"], "-device virtio-blk-pci: kvmpy's PC has no such device"),
        (["-device", "pci-testdev,addr=3"], "pci-testdev takes no properties"),
        (["-device", "pc-testdev,foo=1"], "pc-testdev takes no properties"),
        (["-device", "isa-debug-exit,iobase=x"], "'iobase=x' is not KEY=NUMBER"),
        (["-device", "isa-debug-exit,chardev=c"], "isa-debug-exit has iobase and iosize only"),
        (["-machine", "q35"], "kvmpy's machine is QEMU's pc (i440FX), not 'q35'"),
        (["-accel", "hvf"], "accelerator 'hvf'"),
        (["-hda", "disk.img"], "-hda: kvmpy's PC has no disks"),
        (["-netdev", "user,id=n"], "-netdev: kvmpy's PC has no network card"),
        (["-bios", "seabios.bin"], "-bios: kvmpy has no firmware"),
        (["disk.img"], "disk.img: a disk image"),
        (["-frobnicate"], "-frobnicate: not an option kvmpy-qemu knows"),
        (["-kernel"], "-kernel needs a value"),
        (["-vnc", ":1"], "kvmpy has no VNC server"),
        (["-monitor", "stdio"], "kvmpy has no human monitor"),
        (["-mon", "chardev=nope,mode=control"], "kvmpy has a QMP monitor only"),
        (["-m", "size="], "no size"),
    ],
)
def test_what_kvmpy_lacks_is_refused_by_name(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        translate("-kernel", "k", *argv).kvmpy_run_args()


def test_no_kernel_is_an_error() -> None:
    with pytest.raises(ValueError, match="no -kernel"):
        translate("-nodefaults").kvmpy_run_args()


# -- what harnesses probe ---------------------------------------------------------------


def test_help_and_version_start_with_qemus_version_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for option in ("-h", "--help", "-version", "--version"):
        assert main([option]) == 0
        first = capsys.readouterr().out.splitlines()[0]
        # How harnesses read it: the words after "QEMU emulator version".
        words = re.split(r"[ .]", first)
        assert words[:3] == ["QEMU", "emulator", "version"]
        assert (words[3], words[4], words[5]) == ("7", "2", "0"), first
        assert "kvmpy" in first


def test_device_help_names_the_devices_as_qemu_does() -> None:
    text = device_help()
    assert '"pc-testdev"' in text and '"isa-debug-exit"' in text
    assert '"pci-testdev"' in text  # a harness adds -device pci-testdev when it is listed
    for row in text.splitlines()[1:]:
        assert re.fullmatch(r'name "[a-z-]+", bus (ISA|PCI), desc "[^"]+"', row), row


def test_errors_are_one_kvmpy_error_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-device", "virtio-net-pci", "-kernel", "k"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        "kvmpy: error: -device virtio-net-pci: kvmpy's PC has no such device "
        "(it has isa-debug-exit, pc-testdev, pci-testdev)"
    ]


# -- whole runs, as a harness makes them ------------------------------------------------


@pytest.mark.kvm
def test_a_kvm_unit_tests_run_passes_with_status_1_and_a_quiet_stderr() -> None:
    """A multiboot kernel exiting with code 0 through 0xf4: status 1, which harnesses
    read as a pass only when stderr is empty."""
    kernel = guest("multiboot_hello", ".elf")
    line = [a if a != "x86/msr.flat" else str(kernel) for a in UNIT_TEST_LINE]
    done = kvmpy_qemu(*line, "-append", "one two")
    assert (done.returncode, done.stderr) == (1, "")
    assert "command line: " in done.stdout and done.stdout.rstrip().endswith("one two")


@pytest.mark.kvm
def test_the_newer_kvm_unit_tests_line_passes_with_warnings_only() -> None:
    """Newer kvm-unit-tests scripts add --no-reboot, a -global for the PIT, -display none,
    -accel and pci-testdev; a harness reads stderr lines that say "warning" as harmless."""
    done = kvmpy_qemu(
        "--no-reboot", "-nodefaults", "-global", "kvm-pit.lost_tick_policy=discard",
        "-device", "pc-testdev", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x4",
        "-display", "none", "-serial", "stdio", "-device", "pci-testdev", "-accel", "kvm",
        "-kernel", str(guest("multiboot_hello", ".elf")), "-smp", "1", "-append", "x",
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "kvmpy: warning: -global kvm-pit.lost_tick_policy=discard: ignored by kvmpy"
    ]
    assert all("warning" in line.lower() for line in done.stderr.splitlines())


@pytest.mark.kvm
def test_isa_debug_exit_where_qemu_puts_it(assemble: Assembler) -> None:
    # Code 0x2a to QEMU's default port 0x501, then 0x15 to kvmpy's usual 0xf4.
    image = assemble(
        "mov $0x2a, %al\nmov $0x501, %dx\nout %al, %dx\nmov $0x15, %al\nout %al, $0xf4\nhlt"
    )
    assert kvmpy_qemu("-device", "isa-debug-exit", "-kernel", str(image)).returncode == 0x55
    # Without -device isa-debug-exit the write to 0x501 goes nowhere, as under QEMU;
    # kvmpy's PC still has its own at 0xf4.
    assert kvmpy_qemu("-kernel", str(image)).returncode == 0x2B


@pytest.mark.kvm
def test_a_reset_with_no_reboot_ends_the_run_quietly(assemble: Assembler) -> None:
    image = assemble("mov $0xfe, %al\nout %al, $0x64\nhlt")  # the i8042's reset pulse
    done = kvmpy_qemu("-no-reboot", "-kernel", str(image))
    assert (done.returncode, done.stderr) == (6, "")
    loud = subprocess.run(
        [sys.executable, "-m", "kvmpy", "run", str(image)], capture_output=True, text=True
    )
    assert (loud.returncode, loud.stderr.startswith("kvmpy: ")) == (6, True)


@pytest.mark.kvm
def test_warnings_go_to_stderr_and_the_run_goes_on() -> None:
    done = kvmpy_qemu("-cpu", "Haswell", "-kernel", str(guest("multiboot_hello", ".elf")))
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "kvmpy: warning: -cpu Haswell: the guest sees the host's CPU model and features "
        "(kvmpy sets no CPU model)"
    ]


def test_kvmpy_qemu_is_also_a_kvmpy_command() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "kvmpy", "qemu", "-device", "help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert (done.returncode, done.stdout.strip()) == (0, device_help())
    listed = subprocess.run(
        [sys.executable, "-m", "kvmpy", "--help"], capture_output=True, text=True, check=False
    )
    assert re.search(
        r"^\s+qemu\s+run a guest from a qemu-system-x86_64 command line", listed.stdout, re.M
    )


def test_bad_values_are_one_error_line_not_kvmpy_runs_usage(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["-m", "99999999", "-kernel", "k"]) == 2
    assert main(["-smp", "banana", "-kernel", "k"]) == 2
    assert main(["-serial", "bogus", "-kernel", "k"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "kvmpy: error: argument --mem/-m: '99999999M' is more guest RAM than the 1024G "
        "kvmpy allows",
        "kvmpy: error: -smp cpus=banana: not a number",
        "kvmpy: error: bad --serial 'bogus': expected stdio, mon:stdio, file:PATH, pty, "
        "unix:PATH,server, tcp:HOST:PORT,server or null",
    ]


_WORDS = st.sampled_from(
    [*(f"-{name}" for name in _OPTIONS), "-hda", "--kernel", "-", "x", "", "0xf4", "=", ","]
)
_VALUES = st.text(alphabet="abcdefgiklmnoprstuvxyz0123456789=,:.-?/ ", max_size=24)


@fuzz_budget()
@given(st.lists(st.one_of(_WORDS, _VALUES), max_size=12))
def test_any_command_line_is_translated_or_refused(argv: list[str]) -> None:
    """Whatever the words, the front end translates them or raises ValueError (one error
    line); it never fails another way."""
    line = QemuCommandLine()
    try:
        line.read(argv)
        if line.show is None:
            run_args = line.kvmpy_run_args()
            _argparse_problem(build_parser(), ["run", *run_args])
    except ValueError:
        pass


@pytest.mark.parametrize(
    ("kind", "said"),
    [
        (OutcomeKind.EXIT, False),
        (OutcomeKind.SHUTDOWN, False),
        (OutcomeKind.RESET, False),
        (OutcomeKind.STOPPED, False),  # QMP quit
        (OutcomeKind.TIMEOUT, True),
        (OutcomeKind.HALT, True),
        (OutcomeKind.HOST_ERROR, True),
    ],
)
def test_quiet_says_nothing_of_a_normal_end_only(
    kind: OutcomeKind, said: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    no_machine: Any = None  # only -v reads the machine
    _report(Outcome(kind, f"it ended: {kind}"), no_machine, verbose=False, quiet=True)
    assert (capsys.readouterr().err != "") is said
    _report(Outcome(kind, f"it ended: {kind}"), no_machine, verbose=False, quiet=False)
    assert capsys.readouterr().err.startswith("kvmpy: ") or kind is OutcomeKind.EXIT
