"""Hypothesis budgets: short in the normal suite, long under ``make fuzz`` (KVMPY_FUZZ=1).

``KVMPY_FUZZ_EXAMPLES`` sets the long budget's examples per test (default 20,000).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

LONG = bool(os.environ.get("KVMPY_FUZZ"))
EXAMPLES = int(os.environ.get("KVMPY_FUZZ_EXAMPLES", "20000")) if LONG else 150


def budget(examples: int = EXAMPLES) -> settings:
    """Settings for one fuzz test; ``examples`` scales down for expensive ones."""
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        derandomize=not LONG,  # the normal suite stays repeatable
        database=None,
    )
