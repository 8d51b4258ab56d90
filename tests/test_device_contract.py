"""The device contract (kvmpy/devices/base.py), checked on every device model."""

from __future__ import annotations

import json
import threading
import typing
from typing import Any

import pytest

from kvmpy import records
from kvmpy.devices.base import Device, DeviceStateError, all_ones
from kvmpy.devices.serial import LSR, LSR_BI, RBR
from kvmpy.snapshot import SnapshotError, device_state, restore_device_state
from tests.device_catalog import FACTORIES, build

NAMES = sorted(FACTORIES)


def busy(name: str) -> Any:
    """A device after a burst of guest accesses at every offset."""
    built = build(name)
    device = built.device
    for offset in range(min(built.length, 64)):
        for value in (0x83, 0x01, 0xFF, 0x5A, 0x00, 0xD1, 0xAA):
            device.write(offset, 1, value)
            device.read(offset, 1)
    return device


@pytest.mark.parametrize("name", NAMES)
def test_every_device_has_the_five_methods_and_no_lock(name: str) -> None:
    device: Device = build(name).device
    for method in ("read", "write", "reset", "state", "restore"):
        assert callable(getattr(device, method))
    lock_types = (type(threading.Lock()), type(threading.RLock()), threading.Condition)
    assert not [key for key, value in vars(device).items() if isinstance(value, lock_types)]


@pytest.mark.parametrize("name", NAMES)
def test_state_is_a_frozen_versioned_dataclass(name: str) -> None:
    state: Any = build(name).device.state()
    assert isinstance(type(state).VERSION, int)
    assert records.is_record(state)
    fields = records.fields(state)
    if fields:
        with pytest.raises(records.FrozenRecordError):
            setattr(state, fields[0].name, getattr(state, fields[0].name))


@pytest.mark.parametrize("name", NAMES)
def test_state_round_trips_through_restore_and_json(name: str) -> None:
    device = busy(name)
    state = device.state()
    fresh = build(name).device
    fresh.restore(state)
    assert fresh.state() == state
    other = build(name).device
    restore_device_state(other, json.loads(json.dumps(device_state(device))), name)
    assert other.state() == state


@pytest.mark.parametrize("name", NAMES)
def test_reset_returns_to_the_power_on_state(name: str) -> None:
    # The catalog's clocks all stand at the same time, so the CMOS compares too.
    device = busy(name)
    device.reset()
    assert device.state() == build(name).device.state()


def test_reset_keeps_the_wiring() -> None:
    built = build("serial")
    built.device.reset()
    built.device.write(0, 1, ord("x"))
    assert built.events == [b"x"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size", range(10))
def test_any_size_at_any_offset_never_raises(name: str, size: int) -> None:
    built = build(name)
    device = built.device
    offsets = [*range(min(built.length, 40)), built.length - 1, built.length, -1, 1 << 40]
    for offset in offsets:
        device.write(offset, size, (1 << (8 * size)) - 1 if size else 0)
        assert 0 <= device.read(offset, size) <= all_ones(size)
    if size == 0 or size > 8:
        assert device.ignored_accesses == 2 * len(offsets)


def _bad_values(hint: Any) -> list[object]:
    """Values of the wrong type or out of every device's bounds for a field of type ``hint``."""
    bad: list[object] = ["text", 1.5]
    if hint is int:
        bad += [1 << 80, -(1 << 80), True]
    elif hint is bytes:
        bad += [bytes(100_000), bytearray(4)]
    elif typing.get_origin(hint) is tuple:
        bad += [tuple(range(100_000)), [0]]
    elif hint is bool:
        bad += [1, None]
    return bad


CASES = [
    (name, field.name, bad)
    for name in NAMES
    for field in records.fields(build(name).device.state())
    for bad in _bad_values(typing.get_type_hints(type(build(name).device.state()))[field.name])
]


@pytest.mark.parametrize(("name", "field", "bad"), CASES, ids=lambda value: repr(value)[:20])
def test_restore_rejects_a_bad_field_and_names_it(name: str, field: str, bad: object) -> None:
    device = busy(name)
    before = device.state()
    wrong = records.replace(before, **{field: bad})
    with pytest.raises(DeviceStateError, match=field) as caught:
        device.restore(wrong)
    assert caught.value.field == field
    assert device.state() == before  # nothing was taken


@pytest.mark.parametrize("name", NAMES)
def test_restore_rejects_another_type(name: str) -> None:
    device = build(name).device
    wrongs: list[object] = [
        None,
        {},
        build("testdev" if name != "testdev" else "vga").device.state(),
    ]
    for wrong in wrongs:
        with pytest.raises(DeviceStateError):
            device.restore(wrong)


def test_restore_rejects_wiring_and_unknown_fields_from_json() -> None:
    # Issue 9 item 16: a version-1 snapshot could set _output, locks and limits.
    device = build("serial").device
    saved = device_state(device)
    saved["state"]["_output"] = None
    with pytest.raises(SnapshotError, match="unexpected '_output'"):
        restore_device_state(device, saved, "serial")
    saved = device_state(device)
    saved["version"] = 7
    with pytest.raises(SnapshotError, match="state version 7"):
        restore_device_state(device, saved, "serial")


def test_serial_host_queue_beyond_the_devices_own_limit_is_refused() -> None:
    device = build("serial").device  # host_queue_limit=256
    state = records.replace(device.state(), host=((0x41, 0),) * 257)
    with pytest.raises(DeviceStateError, match="host"):
        device.restore(state)


def test_serial_fifo_beyond_its_capacity_is_refused() -> None:
    device = build("serial").device  # FIFOs off: one byte of receiver
    state = records.replace(device.state(), rx=((0x41, 0),) * 2)
    with pytest.raises(DeviceStateError, match="FIFO holds 1"):
        device.restore(state)


def test_serial_break_is_bounded_by_the_host_queue() -> None:
    # send_break used to append without limit.
    device = build("serial").device
    accepted = sum(device.send_break() for _ in range(1000))
    assert accepted == 256 + 1  # the queue plus the receiver's one byte
    assert device.rx_pending == accepted
    assert device.read(LSR, 1) & LSR_BI
    assert device.read(RBR, 1) == 0


def test_bytes_fields_are_range_checked_too() -> None:
    device = build("vga").device
    state = records.replace(device.state(), dac=bytes([0x40]) * 768)  # 6-bit levels
    with pytest.raises(DeviceStateError, match="dac"):
        device.restore(state)


def test_fw_cfg_offset_past_the_item_is_refused() -> None:
    device = build("fw_cfg").device
    state = records.replace(device.state(), offset=5)  # the signature has 4 bytes
    with pytest.raises(DeviceStateError, match="offset"):
        device.restore(state)


def test_i8042_views_share_the_controllers_state() -> None:
    device = build("i8042").device
    device.command_port.write(0, 1, 0xAA)  # self test: 0x55 waits at 0x60
    assert device.data_port.state() == device.state()
    assert device.data_port.read(0, 1) == 0x55
    assert device.command_port.read(1, 1) == 0xFF  # past the one-port view
    assert device.ignored_accesses == 1
