"""The bounded console log: absolute offsets across drops, and clear overruns."""

from __future__ import annotations

import re

import pytest

from kvmpy.console import ConsoleLog, ConsoleOverrun


def test_the_log_keeps_the_newest_bytes_and_counts_the_rest() -> None:
    log = ConsoleLog(limit=10)
    for i in range(100):
        log.append(bytes([0x30 + i % 10]))
    assert log.end == 100
    assert 10 <= len(log) < 20
    assert log.dropped == 100 - len(log)
    assert bytes(log).endswith(b"0123456789")


def test_search_uses_absolute_positions_across_drops() -> None:
    log = ConsoleLog(limit=8)
    log.append(b"aaaaaaaaaaaaaaaa")  # 16 bytes: the oldest 8 are dropped
    log.append(b"MARK")
    found = log.search(re.compile(b"MARK"), 16)
    assert found is not None
    match, start = found
    assert start == 16 and match.group() == b"MARK"
    assert log.since(18) == b"RK"


def test_a_reader_that_fell_behind_gets_a_clear_error() -> None:
    log = ConsoleLog(limit=4)
    log.append(b"0123456789")
    with pytest.raises(ConsoleOverrun, match="no longer holds byte 0"):
        log.search(re.compile(b"0"), 0)
    with pytest.raises(ValueError):
        ConsoleLog(limit=0)
