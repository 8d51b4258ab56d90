"""Value types declared like dataclasses, and cheap to declare.

kvmpy has some seventy small value types (registers, board entries, device
states, exit records).  ``dataclasses.dataclass`` writes and compiles five or
six methods for each class when its module is imported, which cost about a
third of ``kvmpy run``'s start-up.  A :class:`Record` subclass gets the same
behaviour from methods written once, here::

    class IoRange(Record):            # frozen, like @dataclass(frozen=True)
        base: int
        length: int
        label: str = ""

    class Budget(Record, frozen=False):   # like @dataclass
        left: int
        spent: list[int] = field(default_factory=list)

What a subclass gets, as a dataclass would: an ``__init__`` taking the fields
in order (positional or by name, with defaults and ``default_factory``),
``__repr__``, ``__eq__`` over the compared fields, ``__hash__`` when frozen
(unhashable when not), ``__match_args__`` and ``__post_init__``.  A method the
class defines itself wins.  ``fields``, ``replace`` and ``asdict`` work as
their ``dataclasses`` namesakes.  Type checkers see a dataclass
(``typing.dataclass_transform``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

if TYPE_CHECKING:  # typing_extensions ships with every type checker, not at run time
    from typing_extensions import dataclass_transform
elif sys.version_info >= (3, 11):
    from typing import dataclass_transform
else:  # Python 3.10: the decorator only informs type checkers

    def dataclass_transform(**kwargs: Any) -> Callable[[type], type]:
        return lambda cls: cls


RecordT = TypeVar("RecordT", bound="Record")


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


class Field:
    """One field of a record: its name, default and options."""

    __slots__ = ("compare", "default", "default_factory", "init", "metadata", "name", "repr")

    def __init__(
        self,
        default: Any = MISSING,
        default_factory: Callable[[], Any] | Any = MISSING,
        init: bool = True,
        repr: bool = True,
        compare: bool = True,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        if default is not MISSING and default_factory is not MISSING:
            raise ValueError("cannot give both default and default_factory")
        self.name = ""
        self.default = default
        self.default_factory = default_factory
        self.init = init
        self.repr = repr
        self.compare = compare
        self.metadata: dict[str, Any] = dict(metadata or {})

    def __repr__(self) -> str:
        return f"Field(name={self.name!r})"

    def initial(self, owner: str) -> Any:
        """The value the field gets when ``__init__`` is not given one."""
        if self.default_factory is not MISSING:
            return self.default_factory()
        if self.default is MISSING:
            raise TypeError(f"{owner}.__init__() missing required argument: {self.name!r}")
        return self.default


def field(
    *,
    default: Any = MISSING,
    default_factory: Callable[[], Any] | Any = MISSING,
    init: bool = True,
    repr: bool = True,
    compare: bool = True,
    metadata: dict[str, Any] | None = None,
) -> Any:
    """A field with options, as ``dataclasses.field``."""
    return Field(default, default_factory, init, repr, compare, metadata)


class FrozenRecordError(AttributeError):
    """An assignment to a field of a frozen record."""


def _frozen_set(self: object, name: str, value: object) -> None:
    raise FrozenRecordError(f"cannot assign to field {name!r} of a frozen record")


def _frozen_del(self: object, name: str) -> None:
    raise FrozenRecordError(f"cannot delete field {name!r} of a frozen record")


_mutable_set = object.__setattr__
_mutable_del = object.__delattr__


def _is_class_var(annotation: object) -> bool:
    if isinstance(annotation, str):
        return annotation.startswith(("ClassVar", "typing.ClassVar"))
    return annotation is ClassVar or getattr(annotation, "__origin__", None) is ClassVar


@dataclass_transform(frozen_default=True, field_specifiers=(field, Field))
class Record:
    """Base class of a value type; see the module docstring."""

    __record_fields__: ClassVar[tuple[Field, ...]] = ()
    __record_init__: ClassVar[tuple[Field, ...]] = ()
    __record_frozen__: ClassVar[bool] = True
    __match_args__: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, *, frozen: bool = True, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        found = {f.name: f for f in cls.__record_fields__}
        # The class's own annotations only (inherited fields came with the base).
        for name, annotation in cls.__dict__.get("__annotations__", {}).items():  # noqa: RUF063
            if _is_class_var(annotation):
                continue
            value = cls.__dict__.get(name, MISSING)
            spec = value if isinstance(value, Field) else Field(default=value)
            spec.name = name
            found.pop(name, None)  # a redeclared field moves to the end, as in dataclasses
            found[name] = spec
            if isinstance(value, Field):
                if spec.default is MISSING:
                    delattr(cls, name)
                else:
                    setattr(cls, name, spec.default)
        specs = tuple(found.values())
        init = tuple(f for f in specs if f.init)
        seen_default = False
        for spec in init:
            has_default = spec.default is not MISSING or spec.default_factory is not MISSING
            if seen_default and not has_default:
                raise TypeError(f"non-default argument {spec.name!r} follows default argument")
            seen_default = seen_default or has_default
        cls.__record_fields__ = specs
        cls.__record_init__ = init
        cls.__record_frozen__ = frozen
        cls.__match_args__ = tuple(f.name for f in init)  # type: ignore[misc]
        own = cls.__dict__
        if "__eq__" not in own and "__hash__" not in own:
            # As dataclasses: equal frozen records hash alike; mutable ones do not hash.
            cls.__hash__ = Record._record_hash if frozen else None  # type: ignore[assignment]
        if "__setattr__" not in own:
            setter, deleter = (_frozen_set, _frozen_del) if frozen else (_mutable_set, _mutable_del)
            type.__setattr__(cls, "__setattr__", setter)
            type.__setattr__(cls, "__delattr__", deleter)

    if not TYPE_CHECKING:  # type checkers synthesize each record's own __init__

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            cls = type(self)
            init = cls.__record_init__
            if len(args) > len(init):
                raise TypeError(
                    f"{cls.__name__}() takes {len(init)} positional arguments but {len(args)} "
                    "were given"
                )
            put = object.__setattr__
            for spec, value in zip(init, args, strict=False):
                put(self, spec.name, value)
            for spec in init[len(args) :]:
                value = kwargs.pop(spec.name, MISSING)
                put(self, spec.name, spec.initial(cls.__name__) if value is MISSING else value)
            if kwargs:
                name = next(iter(kwargs))
                problem = "multiple values for" if name in cls.__match_args__ else "an unexpected"
                raise TypeError(f"{cls.__name__}() got {problem} keyword argument {name!r}")
            for spec in cls.__record_fields__:
                # As dataclasses: a field __init__ does not take is set from its
                # default, or left for __post_init__ to set.
                if not spec.init and (
                    spec.default is not MISSING or spec.default_factory is not MISSING
                ):
                    put(self, spec.name, spec.initial(cls.__name__))
            post_init = getattr(self, "__post_init__", None)
            if post_init is not None:
                post_init()

    def _compared(self) -> tuple[Any, ...]:
        return tuple(getattr(self, f.name) for f in self.__record_fields__ if f.compare)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._compared() == other._compared()

    def _record_hash(self) -> int:
        return hash(self._compared())

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}" for f in self.__record_fields__ if f.repr
        )
        return f"{type(self).__qualname__}({shown})"


def is_record(obj: object) -> bool:
    """Whether ``obj`` is a record type or an instance of one."""
    cls = obj if isinstance(obj, type) else type(obj)
    return issubclass(cls, Record)


def fields(obj: Record | type[Record]) -> tuple[Field, ...]:
    """The fields of a record or record type, in declaration order."""
    cls = obj if isinstance(obj, type) else type(obj)
    if not issubclass(cls, Record):
        raise TypeError(f"{cls.__name__} is not a record")
    return cls.__record_fields__


def replace(obj: RecordT, /, **changes: Any) -> RecordT:
    """A copy of ``obj`` with ``changes`` (fields set by ``__init__`` only)."""
    cls = type(obj)
    for name in changes:
        spec = next((f for f in cls.__record_fields__ if f.name == name), None)
        if spec is None or not spec.init:
            raise TypeError(f"{cls.__name__}: {name!r} is not a field that __init__ sets")
    values = {f.name: getattr(obj, f.name) for f in cls.__record_init__}
    values.update(changes)
    return cls(**values)


def asdict(obj: Record) -> dict[str, Any]:
    """The record as a dict, recursing into records, lists, tuples and dicts."""
    if not isinstance(obj, Record):
        raise TypeError(f"{type(obj).__name__} is not a record")
    return {f.name: _plain(getattr(obj, f.name)) for f in obj.__record_fields__}


def _plain(value: Any) -> Any:
    if isinstance(value, Record):
        return asdict(value)
    if isinstance(value, list | tuple):
        items = [_plain(item) for item in value]
        return type(value)(items) if not hasattr(value, "_fields") else type(value)(*items)
    if isinstance(value, dict):
        return {_plain(key): _plain(item) for key, item in value.items()}
    return value
