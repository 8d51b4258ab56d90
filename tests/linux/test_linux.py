"""Real kernels, booted as users bring them: the slow target (`make test-linux`).

The images come from guests/linux/build.sh (`make linux-guests`), which
fetches Debian's packages and builds a tiny 6.1 kernel: a tiny Linux as
bzImage and as PVH with a BusyBox initramfs, Debian's stock cloud kernel,
and memtest86+ (the tiny kernel with ACPI and PCI is test_acpi_pci.py's).
They are not part of `make test`: booting them takes minutes on a PVM host,
where the kernels' CPL0 code is emulated.

On a PVM host (kvm_pvm) some instructions cannot run at CPL0; the tiny
kernels are told so on their command line (noxsave clearcpuid=smap,popcnt)
and built without their int3 self-test.  memtest86+ runs unpatched: kvmpy
completes what PVM cannot run (docs/completion.md).  Where a host
limitation ends a boot, the test expects it and says so; it does not hide it.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from kvmpy.loaders import bzimage
from kvmpy.loaders.multiboot import memory_map
from kvmpy.pytest_plugin import MachineFactory
from tests.helpers import ROOT, host_kvm_module

IMAGES = ROOT / "guests" / "linux" / "cache" / "out"
ON_PVM = Path("/sys/module/kvm_pvm").exists()
ON_HARDWARE_KVM = any(Path(f"/sys/module/{m}").exists() for m in ("kvm_intel", "kvm_amd"))
# What a PVM host cannot run at CPL0, said to the kernel (see docs/linux.md).
PVM_WORKAROUNDS = "noxsave clearcpuid=smap,popcnt"
TINY_CMDLINE = f"console=ttyS0 {PVM_WORKAROUNDS} panic=-1 reboot=k"
CLOUD_CMDLINE = f"earlyprintk=serial console=ttyS0 {PVM_WORKAROUNDS} reboot=k"
# Nothing said about the host: what completion makes unnecessary.
CLOUD_STOCK_CMDLINE = "earlyprintk=serial console=ttyS0 reboot=k"
MEM = 128 << 20
RUN_INIT = b"Run /init as init process"
# Generous: CPL0 is emulated on PVM and the two cores are shared.
BOOT_TIMEOUT = 300.0


def image(name: str) -> Path:
    """A built image; fails (not skips) when missing."""
    path = IMAGES / name
    if not path.exists():
        pytest.fail(f"{path} is missing: run `make linux-guests`", pytrace=False)
    return path


def timed(label: str, started: float) -> None:
    print(f"{label}: {time.monotonic() - started:.1f} s")


@pytest.mark.parametrize("kind", ["bzimage", "bzimage-self-decompressing", "pvh"])
def test_tiny_linux_runs_init_from_the_initramfs(
    kvm_machine: MachineFactory, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel = image("tiny-pvh.elf" if kind == "pvh" else "tiny-bzImage")
    if kind == "bzimage-self-decompressing":
        # The kernel's own decompressor, as without host decompression (docs/linux.md).
        monkeypatch.setattr(bzimage, "host_decompressed_kernel", lambda *_: None)
    started = time.monotonic()
    m = kvm_machine(
        kernel,
        mem=MEM,
        append=TINY_CMDLINE,
        initrd=image("initramfs.cpio"),
        timeout=BOOT_TIMEOUT,
    )
    m.start()
    m.serial.expect(b"Linux version 6.1")
    timed(f"tiny {kind}: Linux version", started)
    m.serial.expect(b"Command line: " + TINY_CMDLINE.encode())
    m.serial.expect(b"Unpacking initramfs")
    m.serial.expect(RUN_INIT)
    timed(f"tiny {kind}: {RUN_INIT.decode()}", started)
    m.stop()


def test_debian_cloud_kernel_shows_version_e820_and_command_line(
    kvm_machine: MachineFactory,
) -> None:
    started = time.monotonic()
    m = kvm_machine(image("cloud-vmlinuz"), mem=MEM, append=CLOUD_CMDLINE, timeout=BOOT_TIMEOUT)
    # The host's own behaviour, as QEMU meets it: no instruction completion
    # (docs/completion.md reports how much further the kernel gets with it).
    m.machine.arch.completer.enabled = False
    m.start()
    m.serial.expect(b"Linux version 6.1")
    timed("cloud bzImage: Linux version", started)
    m.serial.expect(b"Command line: " + CLOUD_CMDLINE.encode())
    # The e820 map the kernel prints is the one kvmpy built, entry for entry.
    for base, size, kind in memory_map([(0, MEM)]):
        label = "usable" if kind == 1 else "reserved"
        line = f"BIOS-e820: [mem {base:#018x}-{base + size - 1:#018x}] {label}"
        m.serial.expect(line.encode())
    if not ON_PVM:
        m.serial.expect(b"Kernel command line: " + CLOUD_CMDLINE.encode())
        m.stop()
        return
    # PVM cannot run the slab allocator's lock cmpxchg16b at CPL0: a host
    # limitation, where QEMU on this host stops too.  Expect it, report it.
    result = m.wait()
    timed("cloud bzImage: stopped by the host", started)
    assert result.reason == "crash", result.message
    assert result.report is not None
    assert "cmpxchg16b" in result.report.format()
    print("expected on PVM: the stock kernel stops on cmpxchg16b (KVM internal error)")


def test_debian_cloud_kernel_with_completion_runs_past_the_slab_allocator(
    kvm_machine: MachineFactory,
) -> None:
    """The same kernel, as shipped, with completion on: past the slab allocator's
    cmpxchg16b where QEMU stops, through the FPU set-up (xrstor/xsavec by hand) to the
    secondary CPU.  (How much further it gets in long runs: docs/completion.md.)"""
    started = time.monotonic()
    m = kvm_machine(
        image("cloud-vmlinuz"), mem=MEM, cpus=2, append=CLOUD_STOCK_CMDLINE, timeout=900
    )
    m.start()
    m.serial.expect(b"Linux version 6.1")
    timed("cloud (completion on): Linux version", started)
    m.serial.expect(b"SLUB: HWalign")
    timed("cloud (completion on): SLUB", started)
    m.serial.expect(b"x86/fpu: Enabled xstate features")
    m.serial.expect(b"smp: Brought up 1 node, 2 CPUs")
    timed("cloud (completion on): smp: Brought up", started)
    counts = dict(m.machine.arch.completer.counts)
    m.stop()
    if ON_PVM:
        print(f"completed on PVM: {counts}")
        assert counts.get("cmpxchg16b", 0) >= 1, counts


def test_memtest86plus_unpatched_reaches_its_tests_on_serial_and_vga(
    kvm_machine: MachineFactory,
) -> None:
    """memtest86+ 6.10 as Debian ships it.  On PVM its fwait and the x87 code of its
    CPU-temperature read cannot run at CPL0: kvmpy completes fwait, fldz and fldcw by
    hand and runs fld, fimul, faddp and fistp on the CPU emulator (the fallback).

    The screen shows each test as it starts.  The serial console gets the whole
    screen when the run starts, then only from memtest's once-a-second tick, and only
    on even seconds of run time.  Where the host emulates CPL0 (PVM), one tick of the
    address tests can be minutes away, so the serial copy of the first test line
    depends on the second the first tick lands on: the test line is checked on the
    screen, the serial console for the run's start.
    """
    started = time.monotonic()
    m = kvm_machine(image("memtest86+x64.bin"), mem=MEM, append="console=ttyS0", timeout=120)
    m.start()
    m.serial.expect(b"Memtest86+ v6")
    timed("memtest86+: header on serial", started)
    m.serial.expect(re.compile(rb"Status: Testing"))
    timed("memtest86+: the run's start on serial", started)
    # A test after the first on the screen: memtest finished one and went on.
    match = m.screen.expect(re.compile(r"#([1-9]\d*) +\[([A-Za-z][^\]]*)\]"))
    timed(f"memtest86+: test {match.group(1)} {match.group(2)!r} on the screen", started)
    screen = m.screen.text()
    counts = dict(m.machine.arch.completer.counts)
    m.stop()
    assert "Memtest86+ v6" in screen
    assert "Status: Testing" in screen, screen
    if ON_PVM:
        print(f"completed on PVM: {counts}")
        assert counts.get("wait", 0) >= 1 and counts.get("fld (emulator)", 0) >= 1, counts


@pytest.mark.skipif(
    not ON_HARDWARE_KVM,
    reason=f"needs hardware KVM (kvm_intel/kvm_amd); this host has "
    f"{host_kvm_module() or 'no KVM'}, where ring-3 syscall does not reach the guest "
    f"kernel and the stock kernel stops on cmpxchg16b, so no Linux userspace runs",
)
def test_debian_kernel_runs_a_busybox_shell(kvm_machine: MachineFactory) -> None:
    m = kvm_machine(
        image("cloud-vmlinuz"),
        mem=MEM,
        append="console=ttyS0 reboot=k panic=-1",
        initrd=image("initramfs.cpio"),
        timeout=BOOT_TIMEOUT,
    )
    m.start()
    m.serial.expect(b"kvmpy-initramfs: shell ready")
    m.serial.send("echo $((6*7))\n")
    m.serial.expect(re.compile(rb"^42\r?$", re.M))
    m.serial.send("poweroff -f\n")
    result = m.wait()
    assert result.reason == "shutdown", result.message
