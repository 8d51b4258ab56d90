"""``kvmpy-qemu``: kvmpy behind ``qemu-system-x86_64``'s command line.

Harnesses written for QEMU call it as they call QEMU: kvm-unit-tests' run
scripts with ``QEMU=kvmpy-qemu``, a test kernel's ``make run``, a CI job.
Each QEMU option kvmpy's PC can honour becomes the ``kvmpy run`` option that
does the same; an option for hardware the PC lacks (a disk, a NIC, q35,
pci-testdev) is refused by name, so a test never passes on a machine other
than the one it asked for.  Options that only tune what QEMU does around the
guest (``-name``, ``-rtc``, ``-global``...) are ignored with a warning on
stderr: harnesses treat warnings as harmless, and other stderr output as a
failure of the VMM.

What QEMU does that a harness relies on, kvmpy does too: the guest's serial
port on stdout, ``isa-debug-exit`` ending the process with status
``(value << 1) | 1``, a guest reset restarting the guest unless
``-no-reboot``.  ``-h`` starts with QEMU's version line (the QEMU release
whose command line this follows), which harnesses parse.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
from collections.abc import Callable, Sequence

import kvmpy
from kvmpy.devices.debug_exit import QEMU_DEFAULT_PORT, QEMU_DEFAULT_PORTS
from kvmpy.x86.topology import parse_smp

# The QEMU release whose command line (and -device help format) this follows:
# Debian 12's.
QEMU_VERSION = "7.2.0"
VERSION_LINE = f"QEMU emulator version {QEMU_VERSION} (kvmpy {kvmpy.__version__})"

# What -device help lists: the devices of kvmpy's PC a command line may name.
DEVICES = (
    ("isa-debug-exit", "ISA", "QEMU's debug exit port: a write ends the VM"),
    ("pc-testdev", "ISA", "QEMU's PC test device (always present on kvmpy's PC)"),
    ("pci-testdev", "PCI", "PCI Test Device"),
)

HELP = f"""{VERSION_LINE}
usage: kvmpy-qemu [options]

kvmpy's PC behind qemu-system-x86_64's command line.  The options it takes:

-kernel IMAGE     the kernel: bzImage, multiboot (kvm-unit-tests' .flat), PVH, ELF
-append ARGS      the kernel command line
-initrd FILE      an initrd (Linux), or multiboot modules ("FILE ARGS,FILE")
-m [size=]SIZE    guest RAM (a bare number is MiB)
-smp [cpus=]N[,sockets=S][,cores=C][,threads=T][,maxcpus=N]
-enable-kvm, -accel kvm|tcg, -machine [pc][,accel=kvm|tcg][,kernel_irqchip=on|off]
-cpu host|max     the guest sees the host's CPU (other models: a warning)
-device pc-testdev, -device pci-testdev
-device isa-debug-exit[,iobase=PORT][,iosize=N]   (QEMU's default: 0x501, 2 ports)
-device help      the devices -device can name
-serial stdio|mon:stdio|file:PATH|pty|unix:PATH,server|tcp:HOST:PORT,server|null|none
-debugcon stdio|file:PATH|null   port 0xe9's console
-qmp unix:PATH,server|tcp:HOST:PORT,server, or -chardev socket,id=ID,path=PATH,server=on
                  with -mon chardev=ID,mode=control
-S, -s, -gdb tcp::PORT
-no-reboot        a guest reset ends the run (without it, the guest restarts)
-nodefaults, -nographic, -display none|curses, -vnc none, -monitor none,
-no-user-config, -name NAME: accepted
-rtc, -global, -boot, -d, -D, -overcommit, -msg: ignored, with a warning

Everything else (disks, NICs, other machines and devices) is refused by name.
"""


class QemuCommandLine:
    """A QEMU command line, read into the ``kvmpy run`` arguments that do the same."""

    def __init__(self) -> None:
        self.run_args: list[str] = []
        self.image: str | None = None
        self.debug_exits: list[tuple[int, int]] = []
        self.added_devices: set[str] = set()  # devices kvmpy's PC has only when asked
        self.reboot = True
        self.accel: str | None = None
        self.irqchip = True
        self.warnings: list[str] = []
        self.show: str | None = None  # "help", "version" or "devices": print, do not run
        # -chardev sockets by id, for -mon chardev=ID,mode=control.
        self._chardevs: dict[str, str] = {}

    # -- reading ------------------------------------------------------------------------

    def read(self, argv: Sequence[str]) -> None:
        """Read ``argv`` (without the program name); raises ValueError on what kvmpy lacks."""
        at = 0
        while at < len(argv):
            word = argv[at]
            at += 1
            if not word.startswith("-") or word == "-":
                raise ValueError(
                    f"{word}: a disk image; kvmpy boots -kernel images and has no disks"
                )
            name = word.lstrip("-")
            option = _OPTIONS.get(name)
            if option is None:
                lacking = next((why for names, why in _LACKING if name in names), None)
                if lacking is not None:
                    raise ValueError(f"{word}: {lacking}")
                raise ValueError(f"{word}: not an option kvmpy-qemu knows (kvmpy-qemu -h)")
            takes_value, handle = option
            if takes_value:
                if at >= len(argv):
                    raise ValueError(f"{word} needs a value")
                handle(self, argv[at])
                at += 1
            else:
                handle(self, "")
            if self.show is not None:
                return

    def kvmpy_run_args(self) -> list[str]:
        """The ``kvmpy run`` argument list."""
        if self.image is None:
            raise ValueError("no -kernel: kvmpy has no firmware to boot a disk from")
        args = ["--quiet", *self.run_args]  # QEMU says nothing when a guest ends normally
        for base, count in self.debug_exits:
            args += ["--debug-exit", f"{base:#x},{count}"]
        if self.reboot:
            args.append("--reboot")
        if self.accel is not None:
            args += ["--accel", self.accel]
        if not self.irqchip:
            args.append("--no-irqchip")
        return [*args, "--", self.image]

    # -- the options --------------------------------------------------------------------

    def _kernel(self, value: str) -> None:
        self.image = value

    def _memory(self, value: str) -> None:
        size = ""
        for position, item in enumerate(value.split(",")):
            key, equals, number = item.partition("=")
            if not equals and position == 0:
                key, number = "size", item
            if key == "size":
                size = number
            elif key in ("slots", "maxmem"):
                self.warnings.append(f"-m {value}: {key}: kvmpy has no memory hotplug; ignored")
            else:
                raise ValueError(f"-m {value}: unknown key {key!r}")
        if not size:
            raise ValueError(f"-m {value}: no size")
        self.run_args += ["--mem", size + "M" if size.isdigit() else size]

    def _smp(self, value: str) -> None:
        parse_smp(value)  # the same rules kvmpy run applies, with QEMU's option in the error
        self.run_args += ["--cpus", value]

    def _cpu(self, value: str) -> None:
        model, _, flags = value.partition(",")
        if model not in ("host", "max") or flags:
            self.warnings.append(
                f"-cpu {value}: the guest sees the host's CPU model and features "
                "(kvmpy sets no CPU model)"
            )

    def _accel(self, value: str) -> None:
        kind, _, props = value.partition(",")
        self._set_accel(kind, f"-accel {value}")
        if props:
            self.warnings.append(f"-accel {value}: properties {props!r} ignored")

    def _set_accel(self, kinds: str, where: str) -> None:
        choices = kinds.split(":")
        known = {"kvm": "kvm", "tcg": "soft"}
        unknown = [kind for kind in choices if kind not in known]
        if unknown:
            raise ValueError(f"{where}: accelerator {unknown[0]!r}: kvmpy has kvm and tcg (soft)")
        self.accel = "auto" if len(set(choices)) > 1 else known[choices[0]]

    def _enable_kvm(self, value: str) -> None:
        self.accel = "kvm"

    def _machine(self, value: str) -> None:
        for position, item in enumerate(value.split(",")):
            key, equals, setting = item.partition("=")
            if not equals:
                if position or key == "help":
                    raise ValueError(f"-machine {value}: {item!r}: kvmpy has one machine, pc")
                key, setting = "type", item
            if key == "type":
                if not (setting == "pc" or setting.startswith("pc-i440fx")):
                    raise ValueError(
                        f"-machine {value}: kvmpy's machine is QEMU's pc (i440FX), not {setting!r}"
                    )
            elif key == "accel":
                self._set_accel(setting, f"-machine {value}")
            elif key == "kernel_irqchip":
                if setting in ("off", "false", "no"):
                    self.irqchip = False
                elif setting == "split":
                    self.warnings.append(
                        f"-machine {value}: kernel_irqchip=split: kvmpy keeps the whole irqchip "
                        "in the kernel"
                    )
            else:
                self.warnings.append(f"-machine {value}: {key} ignored")

    def _device(self, value: str) -> None:
        driver, _, props = value.partition(",")
        if driver in ("help", "?"):
            self.show = "devices"
            return
        if driver in ("pc-testdev", "pci-testdev"):
            if props:
                raise ValueError(f"-device {value}: {driver} takes no properties")
            if driver == "pci-testdev" and driver not in self.added_devices:
                self.added_devices.add(driver)
                self.run_args += ["--device", driver]
            return  # pc-testdev: kvmpy's PC always has it
        if driver != "isa-debug-exit":
            names = ", ".join(name for name, _, _ in DEVICES)
            raise ValueError(f"-device {driver}: kvmpy's PC has no such device (it has {names})")
        base, count = QEMU_DEFAULT_PORT, QEMU_DEFAULT_PORTS
        for prop in filter(None, props.split(",")):
            key, _, number = prop.partition("=")
            if key not in ("iobase", "iosize"):
                raise ValueError(f"-device {value}: isa-debug-exit has iobase and iosize only")
            try:
                parsed = int(number, 0)
            except ValueError:
                raise ValueError(f"-device {value}: {prop!r} is not KEY=NUMBER") from None
            if key == "iobase":
                base = parsed
            else:
                count = parsed
        self.debug_exits.append((base, count))

    def _chardev(self, value: str) -> None:
        backend, _, rest = value.partition(",")
        props = dict(item.partition("=")[::2] for item in rest.split(",") if item)
        if backend != "socket" or "id" not in props or "path" not in props:
            raise ValueError(
                f"-chardev {value}: kvmpy takes -chardev socket,id=ID,path=PATH,server=on "
                "for -mon's QMP only"
            )
        self._chardevs[props["id"]] = props["path"]

    def _mon(self, value: str) -> None:
        props = dict(item.partition("=")[::2] for item in value.split(",") if item)
        path = self._chardevs.get(props.get("chardev", ""))
        if path is None or props.get("mode") != "control":
            raise ValueError(
                f"-mon {value}: kvmpy has a QMP monitor only: -mon chardev=ID,mode=control "
                "after -chardev socket,id=ID,path=PATH,server=on"
            )
        self.run_args += ["--qmp", f"unix:{path},server"]

    def _monitor(self, value: str) -> None:
        if value != "none":
            raise ValueError(f"-monitor {value}: kvmpy has no human monitor (use -qmp)")

    def _display(self, value: str) -> None:
        kind = value.partition(",")[0]
        if kind == "curses":
            self.run_args += ["--display", "term"]
        elif kind != "none":
            raise ValueError(f"-display {value}: kvmpy shows the screen as none or curses only")

    def _vnc(self, value: str) -> None:
        if value != "none":
            raise ValueError(f"-vnc {value}: kvmpy has no VNC server")

    def _no_reboot(self, value: str) -> None:
        self.reboot = False

    def _accepted(self, value: str) -> None:
        """What only QEMU's defaults or its own process need: nothing to do on kvmpy."""

    def _help(self, value: str) -> None:
        self.show = "help"

    def _version(self, value: str) -> None:
        self.show = "version"


def _passing(*kvmpy_args: str) -> Callable[[QemuCommandLine, str], None]:
    def handle(line: QemuCommandLine, value: str) -> None:
        line.run_args += [*kvmpy_args, value] if value else list(kvmpy_args)

    return handle


def _ignored(option: str) -> Callable[[QemuCommandLine, str], None]:
    def handle(line: QemuCommandLine, value: str) -> None:
        line.warnings.append(f"-{option} {value}: ignored by kvmpy".rstrip())

    return handle


# name: (takes a value, handler)
_OPTIONS: dict[str, tuple[bool, Callable[[QemuCommandLine, str], None]]] = {
    "kernel": (True, QemuCommandLine._kernel),
    "append": (True, _passing("--append")),
    "initrd": (True, _passing("--initrd")),
    "m": (True, QemuCommandLine._memory),
    "smp": (True, QemuCommandLine._smp),
    "cpu": (True, QemuCommandLine._cpu),
    "enable-kvm": (False, QemuCommandLine._enable_kvm),
    "accel": (True, QemuCommandLine._accel),
    "machine": (True, QemuCommandLine._machine),
    "M": (True, QemuCommandLine._machine),
    "device": (True, QemuCommandLine._device),
    "serial": (True, _passing("--serial")),
    "debugcon": (True, _passing("--debugcon")),
    "qmp": (True, _passing("--qmp")),
    "chardev": (True, QemuCommandLine._chardev),
    "mon": (True, QemuCommandLine._mon),
    "monitor": (True, QemuCommandLine._monitor),
    "display": (True, QemuCommandLine._display),
    "vnc": (True, QemuCommandLine._vnc),
    "nographic": (False, QemuCommandLine._accepted),
    "nodefaults": (False, QemuCommandLine._accepted),
    "no-user-config": (False, QemuCommandLine._accepted),
    "name": (True, QemuCommandLine._accepted),
    "no-reboot": (False, QemuCommandLine._no_reboot),
    "S": (False, _passing("-S")),
    "s": (False, _passing("-s")),
    "gdb": (True, _passing("--gdb")),
    "rtc": (True, _ignored("rtc")),
    "global": (True, _ignored("global")),
    "boot": (True, _ignored("boot")),
    "d": (True, _ignored("d")),
    "D": (True, _ignored("D")),
    "overcommit": (True, _ignored("overcommit")),
    "msg": (True, _ignored("msg")),
    "h": (False, QemuCommandLine._help),
    "help": (False, QemuCommandLine._help),
    "version": (False, QemuCommandLine._version),
}


# QEMU options for what kvmpy's PC does not have, and what to say.
_LACKING = (
    (("hda", "hdb", "hdc", "hdd", "drive", "cdrom", "blockdev", "fda", "sd", "pflash"),
     "kvmpy's PC has no disks: it boots -kernel images"),
    (("bios", "L"), "kvmpy has no firmware: it boots -kernel images directly"),
    (("net", "netdev", "nic"), "kvmpy's PC has no network card"),
    (("usb", "usbdevice"), "kvmpy's PC has no USB"),
    (("audiodev", "soundhw"), "kvmpy's PC has no sound card"),
    (("incoming",), "kvmpy has no migration (snapshots: kvmpy run --snapshot-at-exit)"),
    (("daemonize", "pidfile", "runas", "chroot"), "kvmpy runs in the foreground only"),
    (("object", "numa", "mem-path", "mem-prealloc"), "kvmpy's RAM takes no backend options"),
)  # fmt: skip


def device_help() -> str:
    """``-device help`` in QEMU's format (harnesses grep it for quoted names)."""
    lines = ["Misc devices:"]
    lines += [f'name "{name}", bus {bus}, desc "{desc}"' for name, bus, desc in DEVICES]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``kvmpy-qemu`` command (and ``kvmpy qemu``); returns the process status."""
    from kvmpy import cli

    line = QemuCommandLine()
    try:
        line.read(sys.argv[1:] if argv is None else argv)
        if line.show is None:
            run_args = line.kvmpy_run_args()
    except ValueError as exc:
        return cli.report_error(str(exc))
    if line.show is not None:
        text = {"help": HELP.rstrip("\n"), "version": VERSION_LINE, "devices": device_help()}
        try:
            print(text[line.show], flush=True)
        except BrokenPipeError:  # "-h | head -1": the reader has what it wanted
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)  # so that the flush at exit has nothing left to fail on
            os.close(null)
        except OSError as exc:
            return cli.report_error(f"cannot write to stdout: {exc.strerror or exc}")
        return 0
    problem = _argparse_problem(cli.build_parser(), ["run", *run_args])
    if problem is not None:
        return cli.report_error(problem)
    for warning in line.warnings:
        print(f"kvmpy: warning: {warning}", file=sys.stderr)
    return cli.main(["run", *run_args])


def _argparse_problem(parser: argparse.ArgumentParser, argv: list[str]) -> str | None:
    """What argparse would refuse in ``argv`` (a value out of range), as one line: a
    QEMU user gets kvmpy's error line, not ``kvmpy run``'s usage text."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            parser.parse_args(argv)
    except SystemExit:
        lines = captured.getvalue().strip().splitlines() or ["bad arguments"]
        return lines[-1].partition(": error: ")[2] or lines[-1]
    return None
