"""The state codec: records to JSON and back, every value checked on the way back.

A state file or a migration stream is untrusted input: whatever it holds, decoding gives the
record back or raises one StateError naming the path to the first value that does not fit,
never another exception.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pykvm.errors import StateError
from pykvm.snapshot.codec import decode, encode


@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: int


@dataclasses.dataclass(frozen=True)
class Label:
    text: str


@dataclasses.dataclass(frozen=True)
class Everything:
    number: int
    flag: bool
    name: str
    blob: bytes
    maybe: int | None
    either: int | str
    points: tuple[Point, ...]
    pair: tuple[int, str]
    names: list[str]
    table: dict[int, int]
    device: Any


SAMPLE = Everything(
    number=-7, flag=True, name="uart", blob=b"\x00\xffdata", maybe=None, either="text",
    points=(Point(1, 2), Point(3, 4)), pair=(5, "five"), names=["a", "b"], table={0x10: 1, 0x174: 2**64 - 1},
    device=Label("com1"),
)  # fmt: skip
RECORDS = (Point, Label)


def sample_json() -> Any:
    return json.loads(json.dumps(encode(SAMPLE)))


def test_a_record_comes_back_equal_through_json() -> None:
    assert decode(sample_json(), Everything, RECORDS) == SAMPLE


def test_decoding_twice_gives_equal_records() -> None:
    data = sample_json()
    assert decode(data, Everything, RECORDS) == decode(data, Everything, RECORDS)


def change(path: tuple, value: Any) -> Any:
    data = sample_json()
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    return data


def drop(key: str) -> Any:
    data = sample_json()
    del data[key]
    return data


@pytest.mark.parametrize(
    "data, message",
    [
        (change(("number",), "7"), "Everything.number: expected int, not str"),
        (change(("number",), True), "Everything.number: expected an integer, not True"),
        (change(("flag",), 1), "Everything.flag: expected bool, not int"),
        (change(("blob",), "not base64!"), "Everything.blob: not base64 data"),
        (change(("maybe",), "x"), "Everything.maybe: expected int, not str"),
        (change(("either",), 1.5), "Everything.either: matches none of its types (Everything.either: expected int, "
                                   "not float; Everything.either: expected str, not float)"),
        (change(("points", 1, "y"), None), "Everything.points[1].y: expected int, not NoneType"),
        (change(("points", 1), [3, 4]), "Everything.points[1]: expected dict, not list"),
        (change(("pair",), [5]), "Everything.pair: expected 2 items, not 1"),
        (change(("pair", 1), 5), "Everything.pair[1]: expected str, not int"),
        (change(("names",), "ab"), "Everything.names: expected list, not str"),
        (change(("table", 1), [1]), "Everything.table[1]: expected a [key, value] pair"),
        (change(("table", 1, 0), "16"), "Everything.table[1].key: expected int, not str"),
        (change(("table", 0, 1), []), "Everything.table[0].value: expected int, not list"),
        (change(("device", "record"), "Machine"), "Everything.device: expected one of the records ['Label', "
                                                  "'Point'], not 'Machine'"),
        (change(("device", "record"), ["Label"]), "Everything.device: expected one of the records"),
        (change(("device", "record"), {"a": 1}), "Everything.device: expected one of the records"),
        (change(("device", "fields", "text"), 3), "Everything.device<Label>.text: expected str, not int"),
        (change(("device",), {"record": "Label"}), "Everything.device: expected one of the records"),
        (change(("points", 0, "z"), 1), "Everything.points[0]: unknown field 'z' in a Point"),
        (drop("name"), "Everything: field 'name' of Everything is missing"),
        ([], "Everything: expected dict, not list"),
    ],
    ids=["str-for-int", "bool-for-int", "int-for-bool", "base64", "optional", "union", "nested-field",
         "record-as-list", "tuple-length", "tuple-item", "list", "pair", "pair-key", "pair-value", "foreign-record",
         "unhashable-record-name", "dict-record-name", "any-field", "any-shape", "unknown-field", "missing-field",
         "top"],  # fmt: skip
)
def test_a_value_that_does_not_fit_is_refused_naming_its_path(data: Any, message: str) -> None:
    with pytest.raises(StateError) as caught:
        decode(data, Everything, RECORDS)
    assert str(caught.value).startswith(message)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += paths(item, (*prefix, index))
    return found


SAMPLE_PATHS = paths(sample_json())[1:]


@settings(max_examples=300, deadline=None)
@given(where=st.sampled_from(SAMPLE_PATHS), junk=JSON)
def test_whatever_a_state_file_holds_decoding_gives_a_record_or_a_state_error(where: tuple, junk: Any) -> None:
    data = change(where, junk)
    try:
        decoded = decode(data, Everything, RECORDS)
    except StateError as err:
        assert "\n" not in str(err)
    else:
        assert isinstance(decoded, Everything)
