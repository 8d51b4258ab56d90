"""The contract every device model keeps, and the helpers that enforce it.

A device is a single-threaded state machine.  It takes no lock of its own:
whoever calls into it (the bus on a vCPU thread, and every host thread such as
the RTC timer, stdin, the display or gdb) holds one lock per device around
the call, so that two calls into the same device never overlap.  The host-side
entry points a device has besides the :class:`Device` methods are listed in
its class docstring under "Host entry points"; they need the same lock.

A device's guest-visible state is an immutable record (kvmpy.records) apart from its
private fields and its wiring (interrupt callbacks, outputs, host limits),
as rust-vmm's vm-superio does with ``SerialState``.  ``state()`` returns it
and ``restore()`` validates every field (type, range, length against the
device's own bounds) before changing anything, raising
:class:`DeviceStateError` naming the device and the field otherwise.

Guest accesses never raise: every device accepts any size from 1 to
:data:`MAX_ACCESS_SIZE` at any offset of its range.  An access a device
cannot take (a size or offset it does not decode) reads all ones and its
write is dropped; each such access is counted in ``ignored_accesses``.

A range that is plain memory to the guest (a scratch register, a RAM
window behind MMIO) may say so: the object mapped there has a
``window_memory`` bytearray at least as long as the range.  A backend may
then answer the range's accesses itself, without calling ``read`` or
``write`` and without the device's lock (``kvmpy.backends.exits.ExitWindow``
gives the rules), so those methods must give exactly the same answers,
count nothing, and the bytearray must only ever be changed in place.
"""

from __future__ import annotations

import functools
import types
import typing
from collections.abc import Callable
from typing import Any, ClassVar, Protocol, TypeVar

from kvmpy.records import Record, field, fields

# Set an interrupt line high (True) or low (False).  The machine connects it to
# KVM_IRQ_LINE; tests connect it to a list.
IrqCallback = Callable[[bool], None]

MAX_ACCESS_SIZE = 8  # the widest MMIO access KVM reports (and an x86 mov can make)
U8 = 0xFF
U16 = 0xFFFF
U32 = 0xFFFF_FFFF
U64 = 0xFFFF_FFFF_FFFF_FFFF


def no_irq(level: bool) -> None:
    """Interrupt callback for a device wired to nothing."""


class DeviceState(Protocol):
    """What every device's state record has: a format version."""

    VERSION: ClassVar[int]


StateT = TypeVar("StateT", bound=DeviceState)


class Device(Protocol):
    """A port-I/O or MMIO device.

    ``offset`` is relative to the base of the range the device is mapped at,
    ``size`` is the access width in bytes (1 to 8; port I/O uses 1, 2 or 4)
    and values are little-endian integers of that width.  See the module
    docstring for the threading and state rules.
    """

    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...

    def reset(self) -> None:
        """Return to the power-on state, keeping the wiring (callbacks, outputs)."""

    def state(self) -> Any:
        """The guest-visible state, as the device's frozen, versioned record."""

    def restore(self, state: Any) -> None:
        """Take ``state`` (validated first; DeviceStateError if it is not acceptable)."""


class DeviceStateError(ValueError):
    """A device state that is of the wrong kind, or out of the device's bounds."""

    def __init__(self, device: str, field: str, problem: str) -> None:
        super().__init__(f"{device} state: {field}: {problem}")
        self.device = device
        self.field = field


def all_ones(size: int) -> int:
    """What a read of ``size`` bytes returns when nothing decodes it."""
    return (1 << (8 * min(max(size, 0), MAX_ACCESS_SIZE))) - 1


def access_fits(offset: int, size: int, length: int) -> bool:
    """Whether an access of ``size`` at ``offset`` starts inside a range of ``length`` bytes."""
    return 1 <= size <= MAX_ACCESS_SIZE and 0 <= offset < length


def bounded(
    low: int,
    high: int,
    *,
    length: int | None = None,
    max_length: int | None = None,
    mask: int | None = None,
) -> Any:
    """A state field whose integers (at any depth) lie in ``low..high``.

    ``length`` fixes the number of items of a tuple or bytes field,
    ``max_length`` caps it, and ``mask`` names the only bits an integer may set.
    """
    return field(
        metadata={
            "low": low,
            "high": high,
            "length": length,
            "max_length": max_length,
            "mask": mask,
        }
    )


def boolean() -> Any:
    """A state field holding a bool (declared like the others, so that none has a default)."""
    return field()


def flags(mask: int) -> Any:
    """A state field holding a set of the bits in ``mask``."""
    return bounded(0, mask, mask=mask)


@functools.cache
def state_field_types(cls: type) -> dict[str, Any]:
    """The declared type of every field of state record ``cls`` (resolved once)."""
    return typing.get_type_hints(cls)


def _type_problem(value: object, hint: Any) -> str | None:
    """Why ``value`` is not of type ``hint`` (None when it is)."""
    origin = typing.get_origin(hint)
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "not an integer"
    if hint is bool:
        return None if isinstance(value, bool) else "not a boolean"
    if hint is bytes:
        return None if isinstance(value, bytes) else "not bytes"
    if origin in (typing.Union, types.UnionType):
        problems = [_type_problem(value, option) for option in typing.get_args(hint)]
        return None if None in problems else "; ".join(p for p in problems if p)
    if hint is type(None):
        return None if value is None else "not None"
    if origin is tuple:
        if not isinstance(value, tuple):
            return "not a tuple"
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            items = [args[0]] * len(value)
        elif len(args) != len(value):
            return f"{len(value)} items, not {len(args)}"
        else:
            items = list(args)
        for index, (item, item_hint) in enumerate(zip(value, items, strict=True)):
            problem = _type_problem(item, item_hint)
            if problem:
                return f"item {index}: {problem}"
        return None
    raise TypeError(f"state field type {hint!r} is not supported")


def _integers(value: object) -> list[int]:
    if isinstance(value, bytes):
        return [min(value), max(value)] if value else []  # the extremes are enough
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, tuple):
        return [number for item in value for number in _integers(item)]
    return []


def check_state(device: str, state: object, cls: type[StateT]) -> StateT:
    """``state`` if it is a ``cls`` whose fields all have their declared types and bounds."""
    if type(state) is not cls:
        raise DeviceStateError(device, "state", f"a {type(state).__name__}, not a {cls.__name__}")
    hints = state_field_types(cls)
    for spec in fields(cls):  # type: ignore[arg-type]
        value = getattr(state, spec.name)
        problem = _type_problem(value, hints[spec.name])
        if problem:
            raise DeviceStateError(device, spec.name, problem)
        meta = spec.metadata
        if isinstance(value, tuple | bytes):
            if meta.get("length") is not None and len(value) != meta["length"]:
                raise DeviceStateError(
                    device, spec.name, f"{len(value)} items, not {meta['length']}"
                )
            if meta.get("max_length") is not None and len(value) > meta["max_length"]:
                raise DeviceStateError(
                    device, spec.name, f"{len(value)} items, more than {meta['max_length']}"
                )
        if "low" in meta:
            for number in _integers(value):
                if not meta["low"] <= number <= meta["high"]:
                    raise DeviceStateError(
                        device,
                        spec.name,
                        f"{number:#x} is outside {meta['low']:#x}..{meta['high']:#x}",
                    )
                if meta.get("mask") is not None and number & ~meta["mask"]:
                    raise DeviceStateError(
                        device, spec.name, f"{number:#x} has bits outside {meta['mask']:#x}"
                    )
    return state


class NoState(Record):
    """The state of a device that keeps nothing the guest can see."""

    VERSION: ClassVar[int] = 1


class Stateless:
    """Mix-in for devices with no state: reset does nothing, the state is empty."""

    def reset(self) -> None:
        """Nothing to reset."""

    def state(self) -> NoState:
        return NoState()

    def restore(self, state: NoState) -> None:
        check_state(type(self).__name__, state, NoState)
