"""kvmpy.records: value types that behave as dataclasses do."""

from __future__ import annotations

import copy
import pickle
from typing import ClassVar

import pytest

from kvmpy import records
from kvmpy.records import Record, field


class Point(Record):
    VERSION: ClassVar[int] = 3
    x: int
    y: int = 7
    tags: list[str] = field(default_factory=list)
    note: str = field(default="", compare=False, repr=False)


class Counter(Record, frozen=False):
    count: int = 0


class Derived(Record):
    parts: tuple[int, ...]
    total: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "total", sum(self.parts))


class Outer(Record):
    inner: Point
    points: tuple[Point, ...] = ()
    table: dict[str, Point] = field(default_factory=dict)


def test_init_takes_fields_in_order_with_defaults() -> None:
    point = Point(1)
    assert (point.x, point.y, point.tags, point.note) == (1, 7, [], "")
    assert Point(1, 2).y == 2
    assert Point(x=1, y=3, note="n").note == "n"
    assert Point(1).tags is not Point(1).tags  # a fresh list each time
    assert Point.VERSION == 3
    assert [spec.name for spec in records.fields(Point)] == ["x", "y", "tags", "note"]
    assert Point.__match_args__ == ("x", "y", "tags", "note")


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Point(), "missing required argument: 'x'"),  # type: ignore[call-arg]
        (lambda: Point(1, 2, [], "", 5), "takes 4 positional arguments but 5 were given"),  # type: ignore[call-arg]
        (lambda: Point(1, z=2), "an unexpected keyword argument 'z'"),  # type: ignore[call-arg]
        (lambda: Point(1, x=2), "multiple values for keyword argument 'x'"),  # type: ignore[misc]
    ],
)
def test_bad_arguments_are_refused_as_python_would(build: object, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        build()  # type: ignore[operator]


def test_frozen_records_refuse_writes_and_hash_by_value() -> None:
    point = Point(1)
    with pytest.raises(records.FrozenRecordError):
        point.x = 2  # type: ignore[misc]
    with pytest.raises(records.FrozenRecordError):
        del point.x
    assert isinstance(records.FrozenRecordError("x"), AttributeError)
    assert hash(Derived((1, 2))) == hash(Derived((1, 2)))
    assert {Derived((1,)), Derived((1,))} == {Derived((1,))}
    with pytest.raises(TypeError, match="unhashable type: 'list'"):
        hash(point)  # its tags are a list, as with a dataclass


def test_mutable_records_take_writes_and_do_not_hash() -> None:
    counter = Counter()
    counter.count += 1
    assert counter == Counter(1)
    with pytest.raises(TypeError):
        hash(counter)


def test_equality_compares_the_compared_fields_of_the_same_type() -> None:
    assert Point(1, note="a") == Point(1, note="b")  # note is compare=False
    assert Point(1) != Point(2)
    assert Point(1) != Counter(1)
    assert Point(1).__eq__("x") is NotImplemented


def test_repr_names_the_shown_fields() -> None:
    assert repr(Point(1, note="hidden")) == "Point(x=1, y=7, tags=[])"


def test_post_init_and_fields_init_does_not_take() -> None:
    assert Derived((1, 2, 3)).total == 6
    with pytest.raises(TypeError):
        records.replace(Derived((1,)), total=5)
    assert records.replace(Derived((1,)), parts=(4, 5)).total == 9


def test_replace_copies_with_changes() -> None:
    point = Point(1, tags=["a"])
    moved = records.replace(point, y=9)
    assert moved == Point(1, 9, ["a"]) and point.y == 7
    with pytest.raises(TypeError, match="'z' is not a field"):
        records.replace(point, z=1)


def test_asdict_recurses_into_records_and_containers() -> None:
    outer = Outer(Point(1), (Point(2),), {"k": Point(3)})
    assert records.asdict(outer) == {
        "inner": {"x": 1, "y": 7, "tags": [], "note": ""},
        "points": ({"x": 2, "y": 7, "tags": [], "note": ""},),
        "table": {"k": {"x": 3, "y": 7, "tags": [], "note": ""}},
    }
    with pytest.raises(TypeError):
        records.asdict(object())  # type: ignore[arg-type]


def test_a_field_without_default_after_one_with_is_refused() -> None:
    with pytest.raises(TypeError, match="non-default argument 'b' follows default argument"):

        class Bad(Record):
            a: int = 0
            b: int  # type: ignore[misc]


def test_a_class_keeps_the_methods_it_defines() -> None:
    class Loose(Record):
        value: int

        def __eq__(self, other: object) -> bool:
            return True

        __hash__ = None  # type: ignore[assignment]

    assert Loose(1) == Loose(2)
    assert records.is_record(Loose) and records.is_record(Loose(1)) and not records.is_record(1)
    with pytest.raises(TypeError):
        records.fields(int)  # type: ignore[arg-type]


def test_copies_and_pickles_keep_value_and_frozenness() -> None:
    point = Point(1, 2, ["a"], "n")
    for twin in (copy.copy(point), copy.deepcopy(point), pickle.loads(pickle.dumps(point))):
        assert twin == point and twin.note == "n"
        with pytest.raises(records.FrozenRecordError):
            twin.x = 5  # type: ignore[misc]
    assert copy.deepcopy(point).tags is not point.tags
