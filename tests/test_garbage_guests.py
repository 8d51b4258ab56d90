"""Guests that run garbage: every run ends in an Outcome, never a host exception."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from kvmpy.loaders.flat import load_flat
from kvmpy.machine import Machine

pytestmark = pytest.mark.kvm

ENDINGS = {"exit", "halt", "shutdown", "reset", "triple-fault", "crash", "timeout"}


@pytest.mark.parametrize("mode", ["real", "long"])
@pytest.mark.parametrize("seed", range(6))
def test_random_code_ends_cleanly(mode: str, seed: int, tmp_path: Path) -> None:
    image = tmp_path / "garbage.bin"
    image.write_bytes(random.Random(f"{mode}{seed}").randbytes(4096))
    with Machine(mem_size=16 << 20, strict=seed == 2) as m:
        m.load(load_flat(image, 0x7C00 if mode == "real" else 0x100000), mode=mode)
        outcome = m.run(timeout=1)
    assert outcome.reason in ENDINGS, outcome
    assert outcome.message
    if outcome.report is not None:
        assert outcome.report.format().startswith("vCPU 0: ")
