"""Helpers shared by the tests: built guests and small guests assembled on the fly."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from typing import Protocol

import pytest

ROOT = Path(__file__).resolve().parent.parent
GUESTS = ROOT / "guests" / "out"

# GNU as flag, ld emulation and linker script per mode: real mode at 0x7c00, long mode at 1 MiB.
_LINK = {
    "real": ("--32", "elf_i386", ROOT / "guests" / "real.ld", ".code16"),
    "long": ("--64", "elf_x86_64", ROOT / "guests" / "long.ld", ".code64"),
}


class Assembler(Protocol):
    def __call__(self, source: str, mode: str = "real") -> Path: ...


def assembler(workdir: Path) -> Assembler:
    """An Assembler that builds flat binaries in ``workdir`` with GNU as and ld."""
    built: list[Path] = []

    def build(source: str, mode: str = "real") -> Path:
        flag, emulation, script, directive = _LINK[mode]
        stem = workdir / f"guest{len(built)}"
        src, obj, binary = (stem.with_suffix(s) for s in (".S", ".o", ".bin"))
        src.write_text(f"{directive}\n.globl _start\n_start:\n{source}\n")
        subprocess.run(["as", flag, "-o", str(obj), str(src)], check=True)
        subprocess.run(
            ["ld", "-m", emulation, "-T", str(script), "-o", str(binary), str(obj)], check=True
        )
        built.append(binary)
        return binary

    return build


def guest(name: str, suffix: str = ".bin") -> Path:
    """A guest built by `make guests`; fails (not skips) when it is missing."""
    path = GUESTS / f"{name}{suffix}"
    if not path.exists():
        pytest.fail(f"{path} is missing: run `make guests`", pytrace=False)
    return path


def host_kvm_module() -> str:
    """kvm_intel, kvm_amd, kvm_pvm... or '' when none is loaded."""
    names = sorted(p.name for p in Path("/sys/module").glob("kvm_*"))
    return names[0] if names else ""


def take_sigint() -> None:
    """Popen's preexec_fn for a child that is sent SIGINT: a test run started as a
    background job ignores SIGINT, its children inherit that, and Python then never
    sees Ctrl-C.  Restore the default so that the child's Python installs its handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
