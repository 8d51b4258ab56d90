"""The ``assemble`` fixture.

KVM gating (the ``kvm`` marker, ``KVMPY_REQUIRE_KVM=1``) comes from kvmpy's
pytest plugin (kvmpy/pytest_plugin.py), which pytest loads through the
``pytest11`` entry point of the installed package.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import Assembler, assembler


@pytest.fixture
def assemble(tmp_path: Path) -> Assembler:
    """assemble(source, mode="real"|"long") -> Path of a flat binary."""
    return assembler(tmp_path)
