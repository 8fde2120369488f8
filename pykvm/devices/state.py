"""The device state contract: plain-data records a device gives and is rebuilt from.

A device with guest-visible state has a frozen dataclass ``<Device>State`` whose fields are
plain data (``int``, ``bool``, ``str``, ``bytes``, ``None``, tuples of these, nested records),
and two methods: ``save_state()`` returns one, and ``restore_state(state)``, called on a device
freshly built with the same configuration, takes it back.  A state may come from an untrusted
place (a migration stream), so ``restore_state`` checks every field before it changes
anything, and raises :class:`~pykvm.errors.StateError` naming the record and the field.
"""

from __future__ import annotations

from typing import Any, Protocol, TypeVar

from ..errors import StateError

S = TypeVar("S")


class Stateful(Protocol[S]):
    """What the snapshot code needs of a device."""

    def save_state(self) -> S: ...

    def restore_state(self, state: S) -> None: ...


def check_int(record: Any, name: str, low: int, high: int) -> int:
    """``record.name`` if it is an int in ``[low, high]``, else :class:`StateError`."""
    value = getattr(record, name)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise StateError(f"{type(record).__name__}.{name} is {value!r}, not an integer from {low} to {high}")
    return value


def check_bytes(record: Any, name: str, max_length: int) -> bytes:
    """``record.name`` if it is bytes of at most ``max_length``, else :class:`StateError`."""
    value = getattr(record, name)
    if not isinstance(value, bytes) or len(value) > max_length:
        shown = f"{len(value)} bytes" if isinstance(value, bytes) else repr(value)[:40]
        raise StateError(f"{type(record).__name__}.{name} is {shown}, not bytes of at most {max_length}")
    return value


def check_type(record: Any, name: str, kind: type | tuple[type, ...]) -> Any:
    """``record.name`` if it is an instance of ``kind``, else :class:`StateError`."""
    value = getattr(record, name)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise StateError(f"{type(record).__name__}.{name} is {value!r:.40}, not {getattr(kind, '__name__', kind)}")
    return value
