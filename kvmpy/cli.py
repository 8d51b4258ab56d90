"""The ``kvmpy`` command line.

    kvmpy run IMAGE [--mode real|protected|paged32|long] [--mem SIZE]
                    [--load-addr ADDR] [--entry ADDR] [--timeout S] [--strict] [-v]
    kvmpy info

``run`` streams the guest's serial output to stdout, feeds stdin to the guest's
serial port, and exits with the guest's status: ``(code << 1) | 1`` for a
debug-exit write (as QEMU), 0 when the guest halts or powers off, 4 when it
crashes (with a report on stderr), 6 on a guest reset, 124 on timeout, 130 on
Ctrl-C and 2 for bad input or an unusable /dev/kvm.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import termios
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TextIO

from kvmpy.backends.base import KVM_PATH, BackendError, open_backend
from kvmpy.bus import BusError
from kvmpy.debug.gdbstub import attach_gdb
from kvmpy.debug.step import SingleStepper
from kvmpy.debug.trace import (
    TRACE_KINDS,
    CompositeObserver,
    ExitStats,
    ExitTracer,
    parse_trace_kinds,
)
from kvmpy.devices.serial import Serial16550
from kvmpy.display import DISPLAY_MODES, open_display
from kvmpy.loaders import LoaderError
from kvmpy.loaders.detect import FORMATS
from kvmpy.loaders.multiboot import parse_module
from kvmpy.machine import DEFAULT_MEM_SIZE, Machine
from kvmpy.memory import GuestMemoryError, parse_size
from kvmpy.outcome import STATUS_ERROR, STATUS_INTERRUPTED, Outcome, OutcomeKind
from kvmpy.runloop import ExitObserver
from kvmpy.snapshot import SnapshotError
from kvmpy.x86.modes import MODES


def _address(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an address: {text!r} (try 0x7c00)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"address must not be negative: {text!r}")
    return value


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a count: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


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
    if value <= 0:
        raise argparse.ArgumentTypeError(f"timeout must be positive: {text!r}")
    return value


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    """Options that `run` and `restore` share: how long, what to watch, what to save."""
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
    debug = parser.add_argument_group("watching the guest")
    debug.add_argument(
        "--trace",
        nargs="?",
        const="",
        type=_trace_kinds,
        metavar="KINDS",
        help=f"log every exit with its instruction (KINDS: {','.join(TRACE_KINDS)}; default all)",
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvmpy", description="A KVM micro-hypervisor in Python.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run a guest image", description="Run a guest image.")
    run.add_argument("image", help="a multiboot kernel, an ELF executable or a flat binary")
    run.add_argument(
        "--format", choices=FORMATS, help="the image format (default: detect multiboot, ELF, flat)"
    )
    run.add_argument(
        "--mode",
        choices=MODES,
        help="CPU mode at entry (default: what the format needs; real for flat images)",
    )
    run.add_argument(
        "--mem",
        type=_size,
        default=DEFAULT_MEM_SIZE,
        metavar="SIZE",
        help="guest RAM (default: 128M)",
    )
    run.add_argument("--cpus", type=_count, default=1, metavar="N", help="vCPUs (default: 1)")
    run.add_argument("--append", default="", metavar="ARGS", help="the kernel command line")
    run.add_argument(
        "--module",
        action="append",
        default=[],
        metavar="FILE[,ARGS]",
        help="a multiboot boot module (repeatable)",
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
        help="no in-kernel LAPIC/IOAPIC/PIC/PIT: HLT exits to kvmpy and ends the run",
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
    )
    restore.add_argument("directory", help="the snapshot directory")
    _add_run_options(restore)

    info = commands.add_parser(
        "info", help="describe the host's KVM", description="Describe the host's KVM."
    )
    info.add_argument("--kvm", default=KVM_PATH, metavar="PATH", help=argparse.SUPPRESS)
    return parser


def _write_stdout(data: bytes) -> None:
    os.write(sys.stdout.fileno(), data)


@contextlib.contextmanager
def _terminal_input() -> Iterator[None]:
    """Turn off line buffering and echo on a terminal stdin (Ctrl-C still stops kvmpy)."""
    if not sys.stdin.isatty():
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


class _StdinPump:
    """Feeds stdin to the current machine's UART until EOF (survives reboots)."""

    def __init__(self) -> None:
        self.serial: Serial16550 | None = None
        # The serial device's lock: stdin is a host thread calling into it.
        self.lock: threading.Lock | None = None

    def start(self) -> None:
        if sys.stdin is not None and not sys.stdin.closed:
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
            while data:
                serial, lock = self.serial, self.lock
                accepted = 0
                if serial is not None and lock is not None:
                    with lock:
                        accepted = serial.feed(data)
                data = data[accepted:]
                if data:
                    time.sleep(0.01)  # the UART's queue is full: let the guest read


def _report(outcome: Outcome, machine: Machine, verbose: bool) -> None:
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
            f"vCPU {index} {rip:#x} completed: {text} ({done})", file=trace, flush=True
        )
    if args.trace is not None:
        observers.append(ExitTracer(m.memory, trace, args.trace))
    if args.stats:
        stats = ExitStats(m.ports, m.mmio)
        observers.append(stats)
    if args.step:
        stepper = SingleStepper(
            m.memory, trace, m.stop, max_steps=args.max_steps, has_irqchip=m.has_irqchip
        )
        observers.append(stepper)
    elif args.max_steps is not None:
        raise ValueError("--max-steps needs --step")
    if observers:
        m.observer = observers[0] if len(observers) == 1 else CompositeObserver(observers)
    return stats


def _run(
    m: Machine, args: argparse.Namespace, stdin: _StdinPump, trace: TextIO, deadline: float | None
) -> Outcome:
    """Run a loaded machine with the shared options: what to watch, when to stop, what to save."""
    stats = _attach_observers(m, args, trace)
    stub = None
    if args.gdb is not None:
        if args.step:
            raise ValueError("--step and --gdb both single-step the guest: choose one")
        stub = attach_gdb(m, args.gdb, wait=args.gdb_wait)
    elif args.gdb_wait:
        raise ValueError("--gdb-wait needs --gdb")
    if stdin.serial is None:
        stdin.start()
    stdin.lock = m.device_lock("serial")
    stdin.serial = m.serial
    timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
    session = open_display(m, args.display, args.screenshot)
    session.start()
    try:
        outcome = m.run(timeout=timeout)
    finally:
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
        m.snapshot(args.snapshot_at_exit)
        print(f"kvmpy: snapshot saved to {args.snapshot_at_exit}", file=sys.stderr)
    return outcome


def _deadline(args: argparse.Namespace) -> float | None:
    return None if args.timeout is None else time.monotonic() + args.timeout


def cmd_run(args: argparse.Namespace) -> int:
    modules = [parse_module(text) for text in args.module]
    deadline = _deadline(args)
    stdin = _StdinPump()
    with (
        _trace_output(args.trace_file) as trace,
        _terminal_input(),
        Machine(
            mem_size=args.mem,
            cpus=args.cpus,
            irqchip=args.irqchip,
            strict=args.strict,
            serial_output=_write_stdout,
            cmdline=args.append,
            kvm_path=args.kvm,
        ) as m,
    ):
        while True:
            m.boot(
                args.image,
                image_format=args.format,
                mode=args.mode,
                load_addr=args.load_addr,
                entry=args.entry,
                modules=modules,
            )
            outcome = _run(m, args, stdin, trace, deadline)
            rebooting = args.reboot and outcome.kind in (
                OutcomeKind.RESET,
                OutcomeKind.TRIPLE_FAULT,
            )
            if not rebooting:
                _report(outcome, m, args.verbose)
                return outcome.status
            print("kvmpy: guest reset: restarting", file=sys.stderr)
            m.reset()  # in place: devices, vCPUs, irqchip and RAM to power-on state


def cmd_restore(args: argparse.Namespace) -> int:
    deadline = _deadline(args)
    with (
        _trace_output(args.trace_file) as trace,
        _terminal_input(),
        Machine.restore(args.directory, serial_output=_write_stdout, kvm_path=args.kvm) as m,
    ):
        outcome = _run(m, args, _StdinPump(), trace, deadline)
        _report(outcome, m, args.verbose)
        return outcome.status


def cmd_info(args: argparse.Namespace) -> int:
    backend = open_backend("kvm", path=args.kvm)
    try:
        print(backend.describe())
        print(
            "instruction completion: on (instructions KVM cannot emulate are finished by "
            "kvmpy, one exit each; --no-complete turns it off)"
        )
    finally:
        backend.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "restore":
            return cmd_restore(args)
        return cmd_info(args)
    except (BackendError, LoaderError, GuestMemoryError, BusError, SnapshotError, ValueError) as e:
        exc = e
        print(f"kvmpy: error: {exc}", file=sys.stderr)
        return STATUS_ERROR
    except KeyboardInterrupt:  # Ctrl-C outside a run (a run reports it itself)
        print("kvmpy: interrupted", file=sys.stderr)
        return STATUS_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
