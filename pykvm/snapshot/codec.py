"""State records to and from JSON, checked field by field on the way back.

Every state record (a device's, a vCPU's, the VM's) is a dataclass of plain data; this
module turns one into JSON-able values and back.  The way back reads untrusted input (a
snapshot file someone else wrote, a migration stream), so it is driven by the records'
type hints and checks every value against them: a missing or unknown field, a string
where an int belongs, a list where a tuple of three belongs, all raise
:class:`~pykvm.errors.StateError` naming the path to the value (``vcpus[1].regs.rip``).
What the values mean (ranges, lengths) is checked afterwards by each record's owner.

Encoding: ``bytes`` as base64 text, tuples and lists as lists, ``dict[int, int]`` as a
list of ``[key, value]`` pairs, a field typed ``Any`` (a device's own record, whose type
depends on the device) as ``{"record": NAME, "fields": {...}}`` where NAME must be one of
the records the caller names (never an arbitrary class).

Each type is read by a decoder made once from its hints and kept (a restore decodes a
few hundred values, and walking the hints for each of them cost more than the restore's
ioctls).  The path in an error is put together only when there is an error: each
decoder on the way back out adds its part.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import types
import typing
from typing import Any, Callable, Iterable, Mapping

from ..errors import StateError

_PLAIN = (int, str, bool)


def encode(value: Any) -> Any:
    """``value`` (a record, or plain data) as JSON-able values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _encode_field(getattr(value, f.name), hints(type(value))[f.name]) for f in dataclasses.fields(value)}
    return _encode_field(value, type(value))


def _encode_field(value: Any, hint: Any) -> Any:
    hint = _narrow(hint, value)
    if value is None or isinstance(value, _PLAIN):
        return value
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if dataclasses.is_dataclass(value):
        fields = encode(value)
        return {"record": type(value).__name__, "fields": fields} if _is_any(hint) else fields
    if isinstance(value, dict):
        key_hint, value_hint = typing.get_args(hint) or (Any, Any)
        return [[_encode_field(k, key_hint), _encode_field(v, value_hint)] for k, v in value.items()]
    if isinstance(value, (tuple, list)):
        return [_encode_field(item, item_hint) for item, item_hint in zip(value, _item_hints(hint, len(value)))]
    raise TypeError(f"cannot encode {type(value).__name__} in a state record")


def _narrow(hint: Any, value: Any) -> Any:
    """Of a union hint, the member that ``value`` is an instance of (else the hint as is)."""
    if typing.get_origin(hint) not in (typing.Union, types.UnionType):
        return hint
    for arg in typing.get_args(hint):
        kind = typing.get_origin(arg) or arg
        if arg is not type(None) and isinstance(kind, type) and isinstance(value, kind):
            return arg
    return Any


def _item_hints(hint: Any, count: int) -> list[Any]:
    """The hint of each of ``count`` items of a ``tuple[...]`` or ``list[...]`` hint."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is list or len(args) == 2 and args[1] is Ellipsis:
        return [args[0]] * count
    return list(args) if len(args) == count else [Any] * count


def decode(data: Any, cls: type, records: Iterable[type] = ()) -> Any:
    """The ``cls`` record ``data`` describes; ``records`` are the classes an ``Any`` field may hold."""
    try:
        return _decoder(cls)(data, {r.__name__: r for r in records})
    except _Invalid as err:
        raise StateError(err.render(cls.__name__)) from None


@functools.cache
def hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def prepare(cls: type, records: Iterable[type] = ()) -> None:
    """Make the decoders of ``cls`` and of every record it may hold now (reading their type
    hints, which :func:`encode` uses too), so that the first :func:`encode` or :func:`decode`
    does not pay for them: a migration does this before it pauses the guest."""
    for record in (cls, *records):
        _decoder(record)


def _is_any(hint: Any) -> bool:
    return hint is Any or hint is object


# --- decoders -------------------------------------------------------------------------------------------
Records = Mapping[str, type]  # the classes an ``Any`` field may hold, by name
Decoder = Callable[[Any, Records], Any]


class _Invalid(Exception):
    """A value that does not fit its hint; ``parts`` is the path to it from where it is caught,
    innermost first, and ``alternatives`` what each member of a union said."""

    def __init__(self, message: str, alternatives: tuple[_Invalid, ...] = ()) -> None:
        self.message, self.alternatives = message, alternatives
        self.parts: list[str] = []

    def within(self, part: str) -> _Invalid:
        self.parts.append(part)
        return self

    def render(self, prefix: str) -> str:
        path = prefix + "".join(reversed(self.parts))
        if self.alternatives:
            return f"{path}: matches none of its types ({'; '.join(alt.render(path) for alt in self.alternatives)})"
        return f"{path}: {self.message}"


def _mismatch(data: Any, kind: type) -> _Invalid:
    return _Invalid(f"expected {kind.__name__}, not {type(data).__name__}")


@functools.cache
def _decoder(hint: Any) -> Decoder:
    """The decoder of values of type ``hint``, made once."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return _union_decoder(args)
    if _is_any(hint):
        return _any
    if dataclasses.is_dataclass(hint):
        return _record_decoder(hint)  # type: ignore[arg-type]
    if hint in _SCALARS:
        return _SCALARS[hint]
    if origin in (tuple, list):
        return _sequence_decoder(origin, args)
    if origin is dict:
        return _dict_decoder(*args)

    def unreadable(data: Any, records: Records) -> Any:
        raise _Invalid(f"a {hint!r} cannot be read from a state file")

    return unreadable


def _int(data: Any, records: Records) -> int:
    if type(data) is int:
        return data
    if isinstance(data, bool):
        raise _Invalid(f"expected an integer, not {data!r}")
    if not isinstance(data, int):
        raise _mismatch(data, int)
    return data


def _str(data: Any, records: Records) -> str:
    if not isinstance(data, str):
        raise _mismatch(data, str)
    return data


def _bool(data: Any, records: Records) -> bool:
    if not isinstance(data, bool):
        raise _mismatch(data, bool)
    return data


def _none(data: Any, records: Records) -> None:
    if data is not None:
        raise _mismatch(data, type(None))


def _bytes(data: Any, records: Records) -> bytes:
    try:
        return base64.b64decode(_str(data, records), validate=True)
    except (binascii.Error, ValueError) as err:
        raise _Invalid(f"not base64 data ({err})") from None


_SCALARS: dict[Any, Decoder] = {int: _int, str: _str, bool: _bool, type(None): _none, bytes: _bytes}


def _union_decoder(args: tuple[Any, ...]) -> Decoder:
    members = [_decoder(arg) for arg in args if arg is not type(None)]
    optional = type(None) in args

    def union(data: Any, records: Records) -> Any:
        if data is None and optional:
            return None
        errors = []
        for member in members:
            try:
                return member(data, records)
            except _Invalid as err:
                errors.append(err)
        if len(errors) == 1:
            raise errors[0]
        raise _Invalid("", tuple(errors))

    return union


def _record_decoder(cls: type) -> Decoder:
    types_ = hints(cls)
    names = tuple(f.name for f in dataclasses.fields(cls))
    fields = tuple((name, _decoder(types_[name]), f".{name}") for name in names)
    known = frozenset(names)

    def record(data: Any, records: Records) -> Any:
        if not isinstance(data, dict):
            raise _mismatch(data, dict)
        if data.keys() != known:
            unknown = sorted(set(data) - known)
            if unknown:
                raise _Invalid(f"unknown field {unknown[0]!r} in a {cls.__name__}")
            missing = next(name for name in names if name not in data)
            raise _Invalid(f"field {missing!r} of {cls.__name__} is missing")
        values = {}
        for name, decode_field, part in fields:
            try:
                values[name] = decode_field(data[name], records)
            except _Invalid as err:
                raise err.within(part) from None
        return cls(**values)

    return record


def _any(data: Any, records: Records) -> Any:
    if data is None or isinstance(data, _PLAIN):
        return data
    if not isinstance(data, dict):
        raise _mismatch(data, dict)
    name = data.get("record")
    if data.keys() != {"record", "fields"} or not isinstance(name, str) or name not in records:
        raise _Invalid(f"expected one of the records {sorted(records)}, not {str(name)[:40]!r}")
    try:
        return _decoder(records[name])(data["fields"], records)
    except _Invalid as err:
        raise err.within(f"<{name}>") from None


def _sequence_decoder(origin: type, args: tuple[Any, ...]) -> Decoder:
    homogeneous = origin is list or not args or (len(args) == 2 and args[1] is Ellipsis)
    item = _decoder(args[0] if args else Any)
    positions = None if homogeneous else tuple(_decoder(arg) for arg in args)

    def sequence(data: Any, records: Records) -> Any:
        if not isinstance(data, list):
            raise _mismatch(data, list)
        if positions is not None and len(data) != len(positions):
            raise _Invalid(f"expected {len(positions)} items, not {len(data)}")
        decoders = positions or (item,) * len(data)
        decoded = []
        for i, (value, decode_item) in enumerate(zip(data, decoders)):
            try:
                decoded.append(decode_item(value, records))
            except _Invalid as err:
                raise err.within(f"[{i}]") from None
        return tuple(decoded) if origin is tuple else decoded

    return sequence


def _dict_decoder(key_hint: Any, value_hint: Any) -> Decoder:
    key, value = _decoder(key_hint), _decoder(value_hint)

    def mapping(data: Any, records: Records) -> dict[Any, Any]:
        if not isinstance(data, list):
            raise _mismatch(data, list)
        result = {}
        for i, pair in enumerate(data):
            if not isinstance(pair, list) or len(pair) != 2:
                raise _Invalid("expected a [key, value] pair").within(f"[{i}]")
            try:
                k = key(pair[0], records)
            except _Invalid as err:
                raise err.within(f"[{i}].key") from None
            try:
                result[k] = value(pair[1], records)
            except _Invalid as err:
                raise err.within(f"[{i}].value") from None
        return result

    return mapping
