"""The ``kvmpy`` command line.

    kvmpy run IMAGE [--mode real|protected|paged32|long] [--mem SIZE]
                    [--load-addr ADDR] [--entry ADDR] [--timeout S] [--strict] [-v]
    kvmpy info

``run`` streams the guest's serial output to stdout, feeds stdin to the guest's
serial port, and exits with the guest's status: ``(code << 1) | 1`` for a
debug-exit write (as QEMU), 0 when the guest halts or powers off, 4 when it
crashes (with a report on stderr), 6 on a guest reset, 124 on timeout, 130 on
Ctrl-C, 143 on SIGTERM (which also stops the run cleanly: --snapshot-at-exit
still saves), and 2 for bad input, an unusable /dev/kvm, or a stdout that
cannot take the guest's output (closed, a pipe whose reader left, a full disk).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import termios
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import kvmpy
from kvmpy._process import (
    STATUS_TERMINATED,
    Terminated,
    fill_closed_std_fds,
    terminated,
)
from kvmpy.backends.base import BACKENDS, KVM_PATH, Backend, BackendError, open_backend
from kvmpy.board import Board
from kvmpy.bus import BusError
from kvmpy.debug.trace import (
    TRACE_KINDS,
    CompositeObserver,
    ExitStats,
    ExitTracer,
    parse_trace_kinds,
)
from kvmpy.devices.debug_exit import DEBUG_EXIT_PORTS
from kvmpy.devices.debugcon import DebugCon
from kvmpy.devices.serial import Serial16550
from kvmpy.display import DISPLAY_MODES, open_display
from kvmpy.loaders import LoaderError
from kvmpy.loaders.detect import FORMATS
from kvmpy.loaders.multiboot import parse_module
from kvmpy.machine import DEFAULT_MEM_SIZE, Machine
from kvmpy.memory import MAX_RAM_SIZE, GuestMemoryError, parse_size
from kvmpy.outcome import STATUS_ERROR, STATUS_INTERRUPTED, Outcome, OutcomeKind
from kvmpy.runloop import ExitObserver
from kvmpy.serialio import GuestInput, SerialPorts
from kvmpy.x86.modes import IDENTITY_MAP_SIZE, MODES, CpuSetup
from kvmpy.x86.pc import PC, with_debug_exits, with_debugcon, with_pci_testdev
from kvmpy.x86.topology import CpuTopology, parse_smp

if TYPE_CHECKING:
    from kvmpy.control import RunControl

# The longest --timeout: a year.  Longer waits overflow the timers below, and
# a run without --timeout has no limit at all.
MAX_TIMEOUT = 365 * 24 * 3600.0
# Where each CPU mode can start: real mode below 1 MiB, the others in the 4 GiB
# that 32-bit addresses (and long mode's identity map) reach.
ENTRY_LIMITS = {
    "real": 1 << 20,
    "protected": 1 << 32,
    "paged32": 1 << 32,
    "long": IDENTITY_MAP_SIZE,
}


class _OutputError(Exception):
    """Stdout failed while the guest wrote to it."""


# The CLI streams serial output to stdout as it comes; the machine's copy is
# only a recent tail, so a guest that talks for days costs no more memory.
CLI_CONSOLE_LIMIT = 256 << 10


def _address(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an address: {text!r} (try 0x7c00)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"address must not be negative: {text!r}")
    if value >= 1 << 64:
        raise argparse.ArgumentTypeError(f"address is wider than 64 bits: {text!r}")
    return value


def _port_range(text: str) -> tuple[int, int]:
    """PORT[,COUNT] (COUNT defaults to 4): where an isa-debug-exit device goes."""
    base_text, _, count_text = text.partition(",")
    try:
        base = int(base_text, 0)
        count = int(count_text, 0) if count_text else DEBUG_EXIT_PORTS
    except ValueError:
        raise argparse.ArgumentTypeError(f"not PORT[,COUNT]: {text!r} (try 0xf4,4)") from None
    if not 1 <= count <= 0x10000 or not 0 <= base <= 0x10000 - count:
        raise argparse.ArgumentTypeError(f"ports {text!r} are outside the 64 KiB port space")
    return base, count


def _ram_size(text: str) -> int:
    try:
        size = parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if size > MAX_RAM_SIZE:
        raise argparse.ArgumentTypeError(
            f"{text!r} is more guest RAM than the {MAX_RAM_SIZE >> 30}G kvmpy allows"
        )
    return size


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a count: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def _smp(text: str) -> CpuTopology:
    try:
        return parse_smp(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _trace_kinds(text: str) -> set[str]:
    try:
        return parse_trace_kinds(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if math.isnan(value):
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"timeout must be positive: {text!r}")
    if value > MAX_TIMEOUT:  # inf too
        raise argparse.ArgumentTypeError(
            f"timeout {text!r} is more than a year ({MAX_TIMEOUT:.0f} s); leave it out for no limit"
        )
    return value


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    """Options that `run` and `restore` share: how long, what to watch, what to save."""
    parser.add_argument(
        "--device",
        action="append",
        choices=OPTIONAL_DEVICES,
        help="add a device the PC leaves out by default: pci-testdev (QEMU's PCI test "
        "device, 1b36:0005, at 00:02.0); restore: as the snapshot's machine had it",
    )
    parser.add_argument(
        "--debugcon",
        metavar="SPEC",
        help="QEMU's -debugcon: port 0xe9's bytes to stdio, file:PATH or null "
        "(without it, no device answers port 0xe9, as on QEMU)",
    )
    parser.add_argument(
        "--debug-exit",
        action="append",
        type=_port_range,
        metavar="PORT[,COUNT]",
        help="put isa-debug-exit at PORT (COUNT ports, default 4) instead of 0xf4; "
        "repeatable, as QEMU's -device isa-debug-exit,iobase=PORT,iosize=COUNT "
        "(restore: as the snapshot's machine had them)",
    )
    parser.add_argument(
        "--timeout", type=_seconds, metavar="S", help="stop the guest after S seconds"
    )
    parser.add_argument(
        "--snapshot-at-exit",
        metavar="DIR",
        help="when the run ends (also by --timeout), save the machine to DIR",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="say how the guest ended, always"
    )
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="nothing on stderr when the run ends normally (debug exit, power-off, reset, "
        "QMP quit), as QEMU: for harnesses that read any stderr output as a failure",
    )
    debug = parser.add_argument_group("watching the guest")
    debug.add_argument(
        "--trace",
        nargs="?",
        const="",
        type=_trace_kinds,
        metavar="=KINDS",
        help=(
            "log every exit with its instruction; --trace=KINDS (with '=') for some: "
            f"{','.join(TRACE_KINDS)}"
        ),
    )
    debug.add_argument("--trace-file", metavar="FILE", help="write the trace to FILE, not stderr")
    debug.add_argument(
        "--stats", action="store_true", help="print exit statistics (count, time) at the end"
    )
    debug.add_argument(
        "--no-complete",
        action="store_true",
        help="do not complete instructions the host's KVM cannot emulate (see its raw behaviour)",
    )
    debug.add_argument(
        "--no-exit-windows",
        action="store_true",
        help="send every exit through Python's run loop (by default the KVM shim answers "
        "plain-memory ranges and unclaimed addresses itself)",
    )
    debug.add_argument(
        "--step", action="store_true", help="single-step vCPU 0, printing every instruction"
    )
    debug.add_argument(
        "--max-steps", type=_count, metavar="N", help="with --step: stop after N instructions"
    )
    debug.add_argument(
        "--gdb",
        metavar="tcp::PORT",
        help="let gdb connect on PORT (localhost; tcp:HOST:PORT for another address)",
    )
    debug.add_argument(
        "--gdb-wait",
        action="store_true",
        help="with --gdb: hold the guest before its first instruction until gdb continues it",
    )
    parser.add_argument(
        "--serial",
        action="append",
        metavar="SPEC",
        help=(
            "COM1's host side, then COM2's (repeat): stdio (default), mon:stdio (raw terminal, "
            "C-a h for help), file:PATH, pty, unix:PATH,server, tcp:HOST:PORT,server, null; "
            "stdio,raw passes escape sequences to a terminal"
        ),
    )
    control = parser.add_argument_group("controlling the guest")
    control.add_argument(
        "--qmp",
        metavar="unix:PATH|tcp:HOST:PORT",
        help="QMP control socket, as QEMU's -qmp (add ,server to wait for a client)",
    )
    control.add_argument(
        "-S",
        dest="start_paused",
        action="store_true",
        help="start paused, until gdb continues or QMP sends cont",
    )
    control.add_argument(
        "-s",
        dest="gdb",
        action="store_const",
        const="tcp::1234",
        help="the same as --gdb tcp::1234",
    )
    screen = parser.add_argument_group("the screen")
    screen.add_argument(
        "--display",
        choices=DISPLAY_MODES,
        help="show the guest's VGA text screen live: term = in this terminal",
    )
    screen.add_argument(
        "--screenshot",
        type=Path,
        metavar="FILE.png",
        help="write the guest's final VGA text screen as a 720x400 PNG",
    )
    parser.add_argument("--kvm", default=KVM_PATH, metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument(
        "--accel",
        choices=BACKENDS,
        default="kvm",
        help="who runs the guest: kvm, soft (the CPU emulator) or auto (KVM if it opens)",
    )


def _open_accel(args: argparse.Namespace) -> Backend:
    """The backend --accel names; with -v, say which one runs the guest.

    Option mistakes come first: they must not wait for (or hide behind) a backend.
    """
    if args.max_steps is not None and not args.step:
        raise ValueError("--max-steps needs --step")
    backend = open_backend(args.accel, path=args.kvm)
    if args.verbose:
        print(f"kvmpy: accelerator: {backend.name}", file=sys.stderr)
    return backend


def _terminal_columns() -> int:
    """The width help is wrapped to, found as ``shutil.get_terminal_size`` finds it."""
    try:
        return int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        pass
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
    except (AttributeError, ValueError, OSError):
        return 80


class _Formatter(argparse.HelpFormatter):
    """argparse's help formatter, given its width: left to itself it imports
    shutil (with bz2, lzma and zlib) while the parser is built, 2 ms of every run."""

    def __init__(
        self,
        prog: str,
        indent_increment: int = 2,
        max_help_position: int = 24,
        width: int | None = None,
    ) -> None:
        width = _terminal_columns() - 2 if width is None else width
        super().__init__(prog, indent_increment, max_help_position, width)


class _Parser(argparse.ArgumentParser):
    """Takes --trace's kinds only as --trace=KINDS, so `--trace IMAGE` keeps its image;
    ``run`` needs an image, positional or -kernel's."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        words = list(sys.argv[1:] if args is None else args)
        if "--" in words:
            end = words.index("--")
            words[:end] = ["--trace=" if word == "--trace" else word for word in words[:end]]
        else:
            words = ["--trace=" if word == "--trace" else word for word in words]
        parsed, rest = super().parse_known_args(words, namespace)
        if getattr(parsed, "command", None) == "run" and parsed.image is parsed.kernel is None:
            self.error("the following arguments are required: image (or -kernel IMAGE)")
        return parsed, rest


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="kvmpy", description="A KVM micro-hypervisor in Python.", formatter_class=_Formatter
    )
    parser.add_argument("--version", action="version", version=f"kvmpy {kvmpy.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="run a guest image",
        description="Run a guest image.",
        formatter_class=_Formatter,
    )
    run.add_argument(
        "image",
        nargs="?",
        help="a Linux bzImage, a multiboot or PVH kernel, an ELF executable, or a flat binary",
    )
    run.add_argument(
        "--format",
        choices=FORMATS,
        help="the image format (default: detect bzImage, multiboot, PVH, ELF; a headerless "
        "file is flat only when its name ends in .bin)",
    )
    run.add_argument(
        "--mode",
        choices=MODES,
        help="CPU mode at entry (default: what the format needs; real for flat images)",
    )
    run.add_argument(
        "--mem",
        "-m",
        type=_ram_size,
        default=DEFAULT_MEM_SIZE,
        metavar="SIZE",
        help="guest RAM (default: 128M)",
    )
    run.add_argument(
        "--cpus",
        "-smp",
        dest="topology",
        type=_smp,
        default=CpuTopology(),
        metavar="N[,sockets=S,cores=C,threads=T]",
        help="vCPUs, and the topology CPUID describes, as QEMU's -smp (default: 1; "
        "N alone is one socket of N cores)",
    )
    run.add_argument(
        "--append", "-append", default="", metavar="ARGS", help="the kernel command line"
    )
    qemu = run.add_argument_group("QEMU's spellings")
    qemu.add_argument("-kernel", metavar="IMAGE", help="the image, as QEMU's -kernel")
    run.add_argument(
        "--module",
        action="append",
        default=[],
        metavar="FILE[,ARGS]",
        help="a multiboot boot module (repeatable)",
    )
    run.add_argument(
        "--initrd",
        "-initrd",
        metavar="FILE",
        help="an initial RAM disk for a Linux kernel (bzImage or PVH); for a multiboot "
        'kernel, modules as QEMU\'s -initrd "FILE ARGS,FILE" gives them',
    )
    run.add_argument(
        "--decompress",
        choices=("host", "guest"),
        default="host",
        help="who unpacks a 64-bit bzImage's compressed kernel: kvmpy, which starts it "
        "at its link address without KASLR (default), or the kernel's own decompressor, "
        "as under QEMU (slow where the host emulates CPL0, as PVM does)",
    )
    run.add_argument(
        "--load-addr",
        type=_address,
        metavar="ADDR",
        help="where to load a flat image (default: 0x7c00 in real mode, else 0x100000)",
    )
    run.add_argument(
        "--entry", type=_address, metavar="ADDR", help="flat image entry (default: load address)"
    )
    run.add_argument("--reboot", action="store_true", help="restart the guest when it resets")
    run.add_argument(
        "--no-irqchip",
        dest="irqchip",
        action="store_false",
        default=None,
        help="no in-kernel LAPIC/IOAPIC/PIC/PIT: HLT exits to kvmpy and ends the run "
        "(the default with --accel soft)",
    )
    run.add_argument(
        "--strict",
        action="store_true",
        help="stop with an error on I/O to a port or address nobody handles",
    )
    _add_run_options(run)

    restore = commands.add_parser(
        "restore",
        help="resume a guest from a snapshot",
        description="Resume a guest saved with --snapshot-at-exit (or Machine.snapshot).",
        formatter_class=_Formatter,
    )
    restore.add_argument("directory", help="the snapshot directory")
    _add_run_options(restore)

    info = commands.add_parser(
        "info",
        help="describe the host's KVM",
        description="Describe the host's KVM.",
        formatter_class=_Formatter,
    )
    info.add_argument("--kvm", metavar="PATH", help=argparse.SUPPRESS)
    # Listed for help only: main() hands "qemu" and what follows to kvmpy.qemu_front.
    commands.add_parser(
        "qemu",
        help="run a guest from a qemu-system-x86_64 command line (also: kvmpy-qemu)",
        add_help=False,
    )
    return parser


class _GuestOutput:
    """Writes the guest's serial output to stdout (fd 1).

    Python ignores SIGPIPE, so a pipe whose reader left gives EPIPE here
    rather than killing kvmpy before it can report and save a snapshot.

    A write that fails (a closed pipe, a full disk) stops the run and is
    reported once the run is over: a guest that "passed" while its output was
    lost must not look like success.
    """

    def __init__(self) -> None:
        self.machine: Machine | None = None
        self.error: OSError | None = None

    def __call__(self, data: bytes) -> None:
        if self.error is not None:
            return  # the run is stopping; drop what comes meanwhile
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(1, view) :]
        except OSError as exc:
            self.error = exc
            if self.machine is not None:
                self.machine.stop(Outcome(OutcomeKind.HOST_ERROR, "stdout failed"))

    def check(self) -> None:
        if self.error is not None:
            raise _OutputError(
                f"cannot write the guest's output to stdout: {self.error.strerror or self.error}"
            )


@contextlib.contextmanager
def _terminal_input() -> Iterator[None]:
    """Turn off line buffering and echo on a terminal stdin (Ctrl-C still stops kvmpy)."""
    if sys.stdin is None or not sys.stdin.isatty():
        yield
        return
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    raw = termios.tcgetattr(fd)
    raw[3] &= ~(termios.ICANON | termios.ECHO)
    raw[6][termios.VMIN] = 1
    raw[6][termios.VTIME] = 0
    termios.tcsetattr(fd, termios.TCSANOW, raw)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


class _StdinPump(GuestInput):
    """Feeds stdin to the current machine's UART until EOF (survives reboots)."""

    def __init__(self) -> None:
        super().__init__()
        self.enabled = True  # False when stdin is not COM1's (--serial)

    def start(self) -> None:
        if self.enabled and sys.stdin is not None and not sys.stdin.closed:
            threading.Thread(target=self._pump, name="kvmpy-stdin", daemon=True).start()

    def _pump(self) -> None:
        try:
            fd = sys.stdin.fileno()
        except (OSError, ValueError):
            return
        while True:
            try:
                data = os.read(fd, 4096)
            except OSError:
                return
            if not data:
                return
            self.feed(data)  # waits while the UART's queue is full


# How a run may end without anything said on stderr under --quiet (STOPPED: QMP's
# quit, the console's C-a x).
_NORMAL_ENDS = frozenset(
    (OutcomeKind.EXIT, OutcomeKind.SHUTDOWN, OutcomeKind.RESET, OutcomeKind.STOPPED)
)


def _report(outcome: Outcome, machine: Machine, verbose: bool, quiet: bool = False) -> None:
    report = outcome.report
    if quiet and not verbose and report is None and outcome.kind in _NORMAL_ENDS:
        return
    if terminated() and outcome.kind is OutcomeKind.INTERRUPTED:
        # SIGTERM: one line, unless asked for more.
        where = report.summary() if report is not None else outcome.message
        print(f"kvmpy: terminated (SIGTERM): {where}", file=sys.stderr)
        if not verbose:
            return
    elif report is not None and outcome.kind is OutcomeKind.INTERRUPTED and not verbose:
        # Ctrl-C or gdb's kill: one line; the registers only with -v.
        where = f" at RIP={report.regs.rip:#x} ({report.mode} mode)" if report.regs else ""
        print(f"kvmpy: vCPU {report.vcpu}: {outcome.message}{where}", file=sys.stderr)
        return
    if outcome.report is not None:
        print(f"kvmpy: {outcome.report.format()}", file=sys.stderr)
    elif outcome.kind is not OutcomeKind.EXIT or verbose:
        print(f"kvmpy: {outcome.message}", file=sys.stderr)
    if verbose:
        for bus in (machine.ports, machine.mmio):
            for (kind, address), count in sorted(bus.unhandled.items()):
                print(
                    f"kvmpy: unhandled {bus.name} {kind} at {address:#x}: {count}x", file=sys.stderr
                )


@contextlib.contextmanager
def _trace_output(path: str | None) -> Iterator[TextIO]:
    if path is None:
        yield sys.stderr
        return
    try:
        output = open(path, "w")  # noqa: SIM115 - closed below, after the whole run
    except OSError as exc:
        raise ValueError(f"cannot write the trace to {path}: {exc.strerror}") from None
    with output:
        yield output


def _attach_observers(m: Machine, args: argparse.Namespace, trace: TextIO) -> ExitStats | None:
    """Set up --trace, --stats and --step on ``m``; return the statistics, if asked for."""
    observers: list[ExitObserver] = []
    stats = None
    completer = m.arch.completer
    completer.enabled = not args.no_complete
    if args.trace is not None and "emulated" in args.trace:
        completer.on_complete = lambda index, rip, text, done: print(
            f"[vcpu{index}] COMPLETED  {rip:#x}  {text}  ({done})", file=trace, flush=True
        )
    if args.trace is not None and args.trace - {"emulated"}:  # emulated alone: no exit tracer
        observers.append(ExitTracer(m.memory, trace, args.trace))
    if args.stats:
        stats = ExitStats(m.ports, m.mmio)
        observers.append(stats)
    if args.step:
        from kvmpy.debug.step import SingleStepper

        stepper = SingleStepper(
            m.memory, trace, m.stop, max_steps=args.max_steps, has_irqchip=m.has_irqchip
        )
        observers.append(stepper)
    elif args.max_steps is not None:
        raise ValueError("--max-steps needs --step")
    if observers:
        m.observer = observers[0] if len(observers) == 1 else CompositeObserver(observers)
    return stats


@contextlib.contextmanager
def _serial(args: argparse.Namespace, output: _GuestOutput) -> Iterator[SerialPorts]:
    """--serial: the host side of COM1 and COM2 (stdio by default), closed on every way out."""
    ports = SerialPorts(args.serial, output, getattr(args, "debugcon", None))
    try:
        with _terminal_input() if ports.plain_stdin else contextlib.nullcontext():
            yield ports
    finally:
        ports.close()  # mon:stdio restores the terminal here


@contextlib.contextmanager
def _control(
    m: Machine, args: argparse.Namespace, ports: SerialPorts
) -> Iterator[RunControl | None]:
    """--qmp, -S and mon:stdio's monitor: a RunControl (None when nothing controls the
    run) and its QMP server; the serial ports are wired to the machine here."""
    if args.qmp is None and not ports.monitor:
        if args.start_paused and args.gdb is None:
            raise ValueError("-S needs --qmp or --gdb (-s): nothing could continue the guest")
        _attach_serial(m, ports, None)
        yield None
        return
    from kvmpy.control import RunControl
    from kvmpy.qmp import attach_qmp

    control = RunControl(m, start_paused=args.start_paused, reboot=getattr(args, "reboot", False))
    servers = []

    def listen() -> None:  # when the guest is loaded, before it first runs
        server = attach_qmp(m, control, args.qmp)
        servers.append(server)
        if server.address.wait:
            where = server.address.describe()
            print(f"kvmpy: waiting for a QMP client on {where}", file=sys.stderr)
            server.wait_for_client()

    if args.qmp is not None:
        control.before_first_run.append(listen)
    _attach_serial(m, ports, control)
    try:
        yield control
    finally:
        for server in servers:
            server.close()


def _attach_serial(m: Machine, ports: SerialPorts, control: RunControl | None) -> None:
    """COM2's output and both ports' input; mon:stdio's quit key and monitor commands."""
    serials = []
    for name in ("serial", "serial2"):
        device = m.device(name, Serial16550)
        serials.append((device, m.device_lock(name), device.set_output))
    if ports.debugcon is not None:
        m.device("debugcon", DebugCon).set_output(ports.debugcon.write)
    quit_outcome = Outcome(OutcomeKind.STOPPED, "quit from the console (C-a x)")

    def quit_run() -> None:
        if control is None:
            m.stop(quit_outcome)
            return
        from kvmpy.control import ControlError

        with contextlib.suppress(ControlError):  # the run is ending anyway
            control.end(quit_outcome)

    monitor = None
    if control is not None and ports.monitor:
        from kvmpy.qmp import MachineCommands, monitor_command

        commands = MachineCommands(m, control)

        def monitor(line: str) -> str:
            return monitor_command(commands, line)

    ports.attach(serials, quit_run, monitor)


def _run(
    m: Machine,
    args: argparse.Namespace,
    stdin: _StdinPump,
    trace: TextIO,
    deadline: float | None,
    control: RunControl | None = None,
) -> Outcome:
    """Run a loaded machine with the shared options: what to watch, when to stop, what to save."""
    m.observer = None  # a reboot runs again with fresh observers, not the last run's
    stats = _attach_observers(m, args, trace)
    stub = None
    if args.gdb is not None:
        if args.step:
            raise ValueError("--step and --gdb both single-step the guest: choose one")
        from kvmpy.debug.gdbstub import attach_gdb  # sockets, the protocol: only for --gdb

        wait = args.gdb_wait or (args.start_paused and control is None)
        stub = attach_gdb(m, args.gdb, wait=wait)
    elif args.gdb_wait:
        raise ValueError("--gdb-wait needs --gdb")
    if stdin.serial is None:
        stdin.start()
    stdin.lock = m.device_lock("serial")
    stdin.serial = m.serial
    timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
    # No display asked for: no session, and the screen modules stay unloaded.
    wants_display = args.display not in (None, "none") or args.screenshot is not None
    session = open_display(m, args.display, args.screenshot) if wants_display else None
    if session is not None:
        session.start()
    try:
        outcome = m.run(timeout=timeout) if control is None else control.run(timeout)
    finally:
        if session is not None:
            session.finish()  # before any report, so it does not land on the live screen
        if stub is not None:
            stub.close()
    if stats is not None:
        print(stats.format(), file=sys.stderr)
        counts = m.arch.completer.counts
        if counts:
            listed = ", ".join(f"{name} {count}" for name, count in counts.most_common())
            print(f"completed instructions: {listed}", file=sys.stderr)
    if args.snapshot_at_exit:
        from kvmpy.snapshot import SnapshotError  # loaded only when a snapshot is taken

        try:
            m.snapshot(args.snapshot_at_exit)
        except SnapshotError:
            # Say how the run ended before the error line, so its status is not lost.
            print(f"kvmpy: the run ended: {outcome.message}", file=sys.stderr)
            raise
        print(f"kvmpy: snapshot saved to {args.snapshot_at_exit}", file=sys.stderr)
    return outcome


def _deadline(args: argparse.Namespace) -> float | None:
    return None if args.timeout is None else time.monotonic() + args.timeout


def _qemu_spellings(args: argparse.Namespace) -> None:
    """-kernel IMAGE for the positional image (-initrd goes to the loader, which knows
    whether the kernel takes one initrd or, multiboot, a list of modules)."""
    if args.kernel is not None:
        if args.image is not None:
            raise ValueError(f"two images: {args.image} and -kernel {args.kernel}")
        args.image = args.kernel
    if args.image is None:
        raise ValueError("no image to run: kvmpy run IMAGE (or -kernel IMAGE)")


def _check_outputs(args: argparse.Namespace) -> None:
    """Refuse an unwritable --screenshot or --snapshot-at-exit before the guest runs.

    Permissions alone do not say (root ignores them), so this tries: it
    creates the screenshot file (removed again) and the snapshot directory.
    """
    if args.screenshot is not None:
        path = Path(args.screenshot)
        existed = path.exists()
        try:
            with open(path, "ab"):
                pass
        except OSError as exc:
            raise ValueError(f"cannot write the screenshot to {path}: {exc.strerror}") from None
        if not existed:
            path.unlink()
    if args.snapshot_at_exit is not None:
        import tempfile  # here: it loads shutil, bz2, lzma and random (start-up time)

        directory = Path(args.snapshot_at_exit)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=directory):
                pass
        except OSError as exc:
            raise ValueError(f"cannot write the snapshot to {directory}: {exc.strerror}") from None


def _describe_boot(args: argparse.Namespace, m: Machine, setup: CpuSetup) -> None:
    """-v: one line on what was detected and where it starts."""
    from kvmpy.debug.guestview import code_address
    from kvmpy.loaders.detect import detect_format

    image_format = args.format or detect_format(args.image)
    plan = m.loaded_plan
    assert plan is not None  # boot() has loaded it
    # The image itself, not the boot data a loader adds (the multiboot information).
    image = [
        segment.gpa
        for segment in plan.segments
        if not any(start <= segment.gpa < end for start, end in plan.reserved)
    ]
    low = min(image, default=plan.entry)
    entry = code_address(setup.sregs, setup.regs.rip)
    detail = f"; {plan.detail}" if plan.detail else ""
    print(
        f"kvmpy: {args.image}: {image_format} image, {setup.mode} mode, "
        f"loaded at {low:#x}, entry {entry:#x}{detail}",
        file=sys.stderr,
    )


def _hint(args: argparse.Namespace, m: Machine, outcome: Outcome) -> None:
    """A flat image that crashed before it printed anything may be 32- or 64-bit code."""
    from kvmpy.loaders.detect import detect_format

    crashed = outcome.kind in (OutcomeKind.CRASH, OutcomeKind.TRIPLE_FAULT)
    if not crashed or args.mode is not None or m.console:
        return
    if (args.format or detect_format(args.image)) == "flat":
        print(
            "kvmpy: hint: a flat image starts in 16-bit real mode at 0x7c00; "
            "for 32- or 64-bit code give --mode protected or --mode long",
            file=sys.stderr,
        )


def _check_addresses(args: argparse.Namespace) -> None:
    """--entry and --load-addr must be addresses the CPU mode can start at or reach."""
    if args.mode is None:
        return  # the image's format decides the mode; check_plan checks the entry
    limit = ENTRY_LIMITS[args.mode]
    for option, value in (("--entry", args.entry), ("--load-addr", args.load_addr)):
        if value is not None and value >= limit:
            raise ValueError(
                f"{option} {value:#x} is out of reach in {args.mode} mode (below {limit:#x})"
            )


def _result(outcome: Outcome, m: Machine, args: argparse.Namespace, output: _GuestOutput) -> int:
    """Report how the run ended and give the process status."""
    output.check()
    _report(outcome, m, args.verbose, args.quiet)
    if terminated() and outcome.kind is OutcomeKind.INTERRUPTED:
        return STATUS_TERMINATED
    return outcome.status


# What --device may add to the PC.
OPTIONAL_DEVICES = ("pci-testdev",)


def _board(args: argparse.Namespace) -> Board:
    """The PC, with what the command line moves or adds (--debug-exit, --debugcon, --device)."""
    board = PC if args.debug_exit is None else with_debug_exits(PC, args.debug_exit)
    if "pci-testdev" in (args.device or ()):
        board = with_pci_testdev(board)
    return board if args.debugcon is None else with_debugcon(board)


def cmd_run(args: argparse.Namespace) -> int:
    _qemu_spellings(args)
    _check_addresses(args)
    _check_outputs(args)
    modules = [parse_module(text) for text in args.module]
    deadline = _deadline(args)
    stdin = _StdinPump()
    output = _GuestOutput()
    with (
        contextlib.closing(_open_accel(args)) as backend,
        _trace_output(args.trace_file) as trace,
        _serial(args, output) as ports,
        Machine(
            mem_size=args.mem,
            topology=args.topology,
            irqchip=args.irqchip,
            strict=args.strict,
            serial_output=ports.com1_output,
            cmdline=args.append,
            backend=backend,
            console_limit=CLI_CONSOLE_LIMIT,
            exit_windows=not args.no_exit_windows,
            board=_board(args),
        ) as m,
        _control(m, args, ports) as control,
    ):
        output.machine = m
        stdin.enabled = ports.plain_stdin
        described = False
        while True:
            setup = m.boot(
                args.image,
                image_format=args.format,
                mode=args.mode,
                load_addr=args.load_addr,
                entry=args.entry,
                modules=modules,
                initrd=args.initrd,
                host_decompress=args.decompress == "host",
            )
            if args.verbose and not described:
                _describe_boot(args, m, setup)
                described = True
            outcome = _run(m, args, stdin, trace, deadline, control)
            rebooting = args.reboot and outcome.kind in (
                OutcomeKind.RESET,
                OutcomeKind.TRIPLE_FAULT,
            )
            rebooting = rebooting or (control is not None and control.take_reset_request())
            if not rebooting or output.error is not None:
                status = _result(outcome, m, args, output)
                _hint(args, m, outcome)  # after the report, as its last line
                return status
            if not args.quiet:
                print("kvmpy: guest reset: restarting", file=sys.stderr)
            m.reset()  # in place: devices, vCPUs, irqchip and RAM to power-on state


def cmd_restore(args: argparse.Namespace) -> int:
    _check_outputs(args)
    deadline = _deadline(args)
    output = _GuestOutput()
    with (
        contextlib.closing(_open_accel(args)) as backend,
        _trace_output(args.trace_file) as trace,
        _serial(args, output) as ports,
        Machine.restore(
            args.directory,
            board=_board(args),
            serial_output=ports.com1_output,
            backend=backend,
            console_limit=CLI_CONSOLE_LIMIT,
            exit_windows=not args.no_exit_windows,
        ) as m,
        _control(m, args, ports) as control,
    ):
        output.machine = m
        stdin = _StdinPump()
        stdin.enabled = ports.plain_stdin
        outcome = _run(m, args, stdin, trace, deadline, control)
        return _result(outcome, m, args, output)


def cmd_info(args: argparse.Namespace) -> int:
    """Describe every backend: KVM and the CPU emulator (or why one cannot run here).

    A KVM device named with --kvm must open: that is what was asked about.
    """
    sections = []
    opened = 0
    for name in ("kvm", "soft"):
        try:
            backend = open_backend(name, path=args.kvm or KVM_PATH)
        except BackendError as exc:
            if name == "kvm" and args.kvm is not None:
                raise
            sections.append(f"{name}: unavailable: {exc}")
            continue
        try:
            text = backend.describe()
            if name == "kvm":
                from kvmpy.x86.complete import describe_completion

                text += "\n" + describe_completion()
                text += (
                    "\nexit windows: on (the shim answers plain-memory ranges and unclaimed "
                    "addresses without Python; --no-exit-windows turns them off)"
                )
            sections.append(text)
            opened += 1
        finally:
            backend.close()
    _print_stdout("\n\n".join(sections))
    return 0 if opened else STATUS_ERROR


def report_error(message: str) -> int:
    """Print the one ``kvmpy: error:`` line; return the error status."""
    with contextlib.suppress(OSError, ValueError):  # a broken stderr: the status still says it
        print(f"kvmpy: error: {message}", file=sys.stderr, flush=True)
    return STATUS_ERROR


def _stdout_failed(exc: OSError) -> _OutputError:
    """The error to report for a failed stdout, which is replaced by /dev/null so that the
    flush at interpreter exit has nothing left to fail on."""
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.close(null)
    return _OutputError(f"cannot write to stdout: {exc.strerror or exc}")


def _print_stdout(text: str) -> None:
    try:
        print(text)
        sys.stdout.flush()
    except OSError as exc:
        raise _stdout_failed(exc) from None


def main(argv: Sequence[str] | None = None) -> int:
    """The ``kvmpy`` command; returns the process status (see the module docstring)."""
    try:
        closed = fill_closed_std_fds()  # done by entry() already; here for callers of main()
        arguments = sys.argv[1:] if argv is None else list(argv)
        if arguments[:1] == ["qemu"]:  # QEMU's options, which argparse cannot take as they are
            from kvmpy.qemu_front import main as qemu_main

            return qemu_main(arguments[1:])
        args = build_parser().parse_args(arguments)
        if 1 in closed:
            return report_error("stdout is closed (use >/dev/null to discard the guest's output)")
        if args.command == "run":
            status = cmd_run(args)
        elif args.command == "restore":
            status = cmd_restore(args)
        else:
            status = cmd_info(args)
        return status
    # A SnapshotError is a ValueError (kvmpy.snapshot loads only when a snapshot is used).
    except (
        BackendError,
        LoaderError,
        GuestMemoryError,
        BusError,
        ValueError,
        _OutputError,
    ) as exc:
        return report_error(str(exc))
    except Terminated:  # SIGTERM outside a run (a run reports it itself)
        print("kvmpy: terminated", file=sys.stderr)
        return STATUS_TERMINATED
    except KeyboardInterrupt:  # Ctrl-C outside a run (a run reports it itself)
        print("kvmpy: interrupted", file=sys.stderr)
        return STATUS_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
