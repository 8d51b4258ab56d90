"""The layers keep to themselves: only the KVM backend touches the shim and KVM classes."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from kvmpy.loaders import LoaderError, LoadPlan, LoadSegment
from kvmpy.machine import Machine
from kvmpy.x86.layout import ACPI_TABLES_ADDR, BDA_ADDR, MP_TABLE_ADDR
from tests.fake_backend import FakeBackend

PACKAGE = Path(__file__).resolve().parent.parent / "kvmpy"
KVM_BACKEND = PACKAGE / "backends" / "kvm"
# The one place outside backends/kvm that may name it: the factory that opens it.
FACTORY = PACKAGE / "backends" / "base.py"


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside functions."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def is_kvm_backend(module: str) -> bool:
    return (
        module.startswith("kvmpy.backends.kvm")
        or module in ("kvmpy._kvm", "kvmpy.kvm")
        or module.endswith("._kvm")
    )


def test_nothing_outside_the_kvm_backend_imports_it() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.is_relative_to(KVM_BACKEND) or path == FACTORY:
            continue
        bad = sorted(m for m in imported_modules(path) if is_kvm_backend(m))
        if bad:
            offenders.append(f"{path.relative_to(PACKAGE.parent)}: {', '.join(bad)}")
    assert offenders == []


def test_the_walk_would_see_an_offender(tmp_path: Path) -> None:
    sneaky = tmp_path / "sneaky.py"
    sneaky.write_text("def f():\n    from kvmpy.backends.kvm._kvm import lib\n    return lib\n")
    assert any(is_kvm_backend(m) for m in imported_modules(sneaky))


def test_machine_and_run_loop_know_no_board_constants() -> None:
    for name in ("machine.py", "runloop.py", "bus.py"):
        modules = imported_modules(PACKAGE / name)
        assert "kvmpy.x86.layout" not in modules, name


@pytest.mark.parametrize(
    ("gpa", "what"),
    [
        (ACPI_TABLES_ADDR, "ACPI tables"),
        (MP_TABLE_ADDR + 0x100, "MP tables"),
        (BDA_ADDR, "BIOS Data Area"),
    ],
)
def test_a_segment_over_firmware_tables_is_refused(gpa: int, what: str) -> None:
    plan = LoadPlan("kernel.elf", gpa, [LoadSegment(gpa, b"\x90" * 16, 16)])
    with (
        Machine(mem_size=1 << 20, backend=FakeBackend([])) as m,
        pytest.raises(LoaderError) as info,
    ):
        m.load(plan, mode="protected")
    message = str(info.value)
    assert message.startswith(f"kernel.elf: segment {gpa:#x}-{gpa + 15:#x} overlaps the {what}")
