"""KVM gating for tests marked ``kvm``, and the ``assemble`` fixture."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvmpy.kvm import Kvm, KvmError
from tests.helpers import Assembler, assembler


def _kvm_problem() -> str | None:
    try:
        with Kvm():
            return None
    except KvmError as exc:
        return str(exc)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "kvm: the test needs a usable /dev/kvm")


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip KVM tests without /dev/kvm, or fail them when KVMPY_REQUIRE_KVM=1."""
    if item.get_closest_marker("kvm") is None:
        return
    problem = _kvm_problem()
    if problem is None:
        return
    if os.environ.get("KVMPY_REQUIRE_KVM") == "1":
        pytest.fail(f"KVMPY_REQUIRE_KVM=1 but KVM is unusable: {problem}", pytrace=False)
    pytest.skip(f"KVM is unusable: {problem}")


@pytest.fixture
def assemble(tmp_path: Path) -> Assembler:
    """assemble(source, mode="real"|"long") -> Path of a flat binary."""
    return assembler(tmp_path)
