"""Random guest access sequences (and host calls) for every device: nothing raises,
reads fit their size, and the state stays inside the device's own bounds."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from kvmpy.devices.base import all_ones
from kvmpy.snapshot import device_state, restore_device_state
from tests.device_catalog import FACTORIES, build
from tests.fuzzing import budget

NAMES = sorted(FACTORIES)


@st.composite
def operations(draw: st.DrawFn, length: int) -> list[tuple[Any, ...]]:
    offset = st.one_of(
        st.integers(0, min(length, 64) - 1),
        st.integers(0, length - 1),
        st.integers(-2, length + 2),
    )
    size = st.one_of(st.sampled_from([1, 2, 4]), st.integers(0, 9))
    access = st.tuples(
        st.sampled_from(["read", "write"]), offset, size, st.integers(0, (1 << 64) - 1)
    )
    host = st.tuples(
        st.sampled_from(["feed", "break", "poll", "tick", "reset", "snapshot"]),
        st.binary(max_size=40),
    )
    return draw(st.lists(st.one_of(access, access, access, host), max_size=200))


def run(name: str, ops: list[tuple[Any, ...]]) -> None:
    built = build(name)
    device = built.device
    for op in ops:
        kind = op[0]
        if kind in ("read", "write"):
            _, offset, size, value = op
            if kind == "read":
                result = device.read(offset, size)
                assert 0 <= result <= all_ones(size), (name, offset, size, result)
            else:
                device.write(offset, size, value & all_ones(size))
        elif kind == "feed" and name == "serial":
            assert 0 <= device.feed(op[1]) <= len(op[1])
        elif kind == "break" and name == "serial":
            device.send_break()
        elif kind == "poll" and name == "cmos":
            due = device.poll()
            assert due is None or due >= built.clock.now - 1
        elif kind == "tick":
            built.clock.now += len(op[1]) / 7
        elif kind == "reset":
            device.reset()
        elif kind == "snapshot":
            # The state is always one a fresh device accepts, through JSON too.
            copy = build(name).device
            restore_device_state(copy, json.loads(json.dumps(device_state(device))), name)
            assert copy.state() == device.state()
    # Bounded: the state (every queue and buffer in it) is valid for a fresh device.
    build(name).device.restore(device.state())


@budget()
@given(data=st.data())
def test_random_access_sequences(data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(NAMES))
    run(name, data.draw(operations(FACTORIES[name][1])))


# Cases that found bugs, kept as explicit regression tests.
def test_corpus_testdev_page_crossing_split() -> None:
    run("testdev", [("read", 0xFFD, 3, 0), ("read", 0xFFD, 5, 0), ("write", 0xFFE, 7, 1 << 55)])


def test_corpus_serial_break_flood_and_out_of_range_offset() -> None:
    # send_break grew the host queue without bound; offset 8 raised ValueError.
    run("serial", [("break", b"")] * 400 + [("read", 8, 1, 0), ("write", -1, 1, 0)])


def test_corpus_testdev_doorbell_flood() -> None:
    run("testdev", [("write", 0xC, 4, 7)] * 3000 + [("snapshot", b"")])


def test_corpus_cmos_century_0_moves_the_clock_before_year_1970() -> None:
    # A 16-bit write sets index 0x37 (the century alias) to 0: year 0 becomes
    # year 1, an offset of -2**65 ns that the state's bounds refused.
    run("cmos", [("read", 0, 1, 0), ("write", 0, 2, 0x0037), ("snapshot", b"")])
