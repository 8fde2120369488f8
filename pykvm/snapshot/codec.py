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
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import types
import typing
from typing import Any, Iterable, Mapping

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
    return _Decoder({r.__name__: r for r in records}).value(data, cls, cls.__name__)


@functools.cache
def hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def prepare(cls: type, records: Iterable[type] = ()) -> None:
    """Read the type hints of ``cls`` and of every record it may hold now, so that the first
    :func:`encode` or :func:`decode` does not pay for them (a migration does this before it
    pauses the guest: resolving the hints of every state record takes milliseconds)."""
    pending, seen = [cls, *records], set()
    while pending:
        hint = pending.pop()
        if dataclasses.is_dataclass(hint) and hint not in seen:
            seen.add(hint)
            pending.extend(hints(hint).values())  # type: ignore[arg-type]
        else:
            pending.extend(typing.get_args(hint))


def _is_any(hint: Any) -> bool:
    return hint is Any or hint is object


class _Decoder:
    def __init__(self, records: Mapping[str, type]) -> None:
        self._records = records

    def value(self, data: Any, hint: Any, path: str) -> Any:
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if origin in (typing.Union, types.UnionType):
            return self._union(data, args, path)
        if _is_any(hint):
            return self._any(data, path)
        if dataclasses.is_dataclass(hint):
            return self._record(data, hint, path)
        if hint is type(None):
            return self._expect(data, type(None), path)
        if hint is bool:
            return self._expect(data, bool, path)
        if hint is int:
            if isinstance(data, bool):
                raise StateError(f"{path}: expected an integer, not {data!r}")
            return self._expect(data, int, path)
        if hint is str:
            return self._expect(data, str, path)
        if hint is bytes:
            return self._bytes(data, path)
        if origin in (tuple, list):
            return self._sequence(data, origin, args, path)
        if origin is dict:
            return self._dict(data, args, path)
        raise StateError(f"{path}: a {hint!r} cannot be read from a state file")

    def _expect(self, data: Any, kind: type, path: str) -> Any:
        if not isinstance(data, kind) or (kind is int and isinstance(data, bool)):
            raise StateError(f"{path}: expected {kind.__name__}, not {type(data).__name__}")
        return data

    def _bytes(self, data: Any, path: str) -> bytes:
        text = self._expect(data, str, path)
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as err:
            raise StateError(f"{path}: not base64 data ({err})") from err

    def _union(self, data: Any, args: tuple, path: str) -> Any:
        if data is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return self.value(data, arg, path)
            except StateError as err:
                errors.append(str(err))
        raise StateError(errors[0] if len(errors) == 1 else f"{path}: matches none of its types ({'; '.join(errors)})")

    def _record(self, data: Any, cls: type, path: str) -> Any:
        fields = self._expect(data, dict, path)
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = set(fields) - set(names)
        if unknown:
            raise StateError(f"{path}: unknown field {sorted(unknown)[0]!r} in a {cls.__name__}")
        missing = [name for name in names if name not in fields]
        if missing:
            raise StateError(f"{path}: field {missing[0]!r} of {cls.__name__} is missing")
        types_ = hints(cls)
        return cls(**{name: self.value(fields[name], types_[name], f"{path}.{name}") for name in names})

    def _any(self, data: Any, path: str) -> Any:
        if data is None or isinstance(data, _PLAIN):
            return data
        tagged = self._expect(data, dict, path)
        name = tagged.get("record")
        if set(tagged) != {"record", "fields"} or name not in self._records:
            raise StateError(f"{path}: expected one of the records {sorted(self._records)}, not {str(name)[:40]!r}")
        return self._record(tagged["fields"], self._records[name], f"{path}<{name}>")

    def _sequence(self, data: Any, origin: type, args: tuple, path: str) -> Any:
        items = self._expect(data, list, path)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis) and len(items) != len(args):
            raise StateError(f"{path}: expected {len(args)} items, not {len(items)}")
        item_hints = _item_hints(origin[args] if args else origin, len(items))  # type: ignore[index]
        decoded = [self.value(item, item_hint, f"{path}[{i}]") for i, (item, item_hint) in enumerate(zip(items, item_hints))]
        return tuple(decoded) if origin is tuple else decoded

    def _dict(self, data: Any, args: tuple, path: str) -> dict[Any, Any]:
        pairs = self._expect(data, list, path)
        key_hint, value_hint = args
        result = {}
        for i, pair in enumerate(pairs):
            if not isinstance(pair, list) or len(pair) != 2:
                raise StateError(f"{path}[{i}]: expected a [key, value] pair")
            result[self.value(pair[0], key_hint, f"{path}[{i}].key")] = self.value(pair[1], value_hint, f"{path}[{i}].value")
        return result
