"""Guests that attack kvmpy through its devices: the run ends cleanly, memory stays bounded.

bench/rss_stress.py runs the same guests for minutes and samples RSS; here a
few seconds check that every access ends in a device or the unhandled
counters, never in an exception, and that what kvmpy keeps is bounded.
"""

from __future__ import annotations

import pytest

from kvmpy.loaders.flat import load_flat
from kvmpy.machine import Machine
from kvmpy.outcome import OutcomeKind
from tests.helpers import guest

pytestmark = pytest.mark.kvm


def test_random_ports_and_split_mmio_end_in_a_clean_timeout() -> None:
    with Machine(mem_size=4 << 20, console_limit=4096) as m:
        m.load(load_flat(guest("stress_io"), 0x100000), mode="long")
        outcome = m.run(timeout=3)
        assert outcome.kind is OutcomeKind.TIMEOUT, outcome.message
        # The guest got through its accesses: unhandled ones were counted...
        assert sum(m.mmio.unhandled.values()) > 0
        # ...in tables bounded by what it can address (ports < 0x1000, 2 MMIO windows).
        assert len(m.ports.unhandled) <= 2 * 0x1000
        assert len(m.mmio.unhandled) <= 2 * 2 * 24
        assert len(m.console) < 2 * 4096


def test_a_chatty_guest_keeps_the_console_bounded() -> None:
    with Machine(mem_size=1 << 20, irqchip=False, console_limit=1024) as m:
        m.load(load_flat(guest("chatty"), 0x7C00), mode="real")
        outcome = m.run(timeout=2)
        assert outcome.kind is OutcomeKind.TIMEOUT
        assert m.console.end > 2048, "the guest should have talked past the limit"
        assert len(m.console) < 2048
        assert m.console.dropped == m.console.end - len(m.console)
