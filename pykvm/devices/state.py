"""The device state contract: plain-data records a device gives and is rebuilt from.

A device with guest-visible state has a frozen dataclass ``<Device>State`` whose fields are
plain data (``int``, ``bool``, ``str``, ``bytes``, ``None``, tuples of these, nested records),
and two methods: ``save_state()`` returns one, and ``restore_state(state)``, called on a device
freshly built with the same configuration, takes it back.  A state may come from an untrusted
place (a migration stream), so ``restore_state`` checks every field before it changes
anything, and raises :class:`~pykvm.errors.StateError` naming the record and the field.
After a restore the device tells its wiring what it must know again (an interrupt level, a
fast-path condition), as it would have told it when the state was reached.

What a record leaves out: counters (``stats``), which describe the host's view of the run,
and configuration, which the machine rebuilds (a device may carry a digest of it to check
that the rebuilt device is the one the guest saw).  Devices without guest-visible state
(the debug-exit port, a constant port) have no record.

The checks below take the record and a field name, so that every error names both.
"""

from __future__ import annotations

import reprlib
from typing import Any, Protocol, TypeVar, runtime_checkable

from ..errors import StateError

S = TypeVar("S")

# How much of a bad value an error message shows (a hostile state may hold huge values).
SHOWN_CHARS = 40
_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = _SHORT.maxlong = SHOWN_CHARS


@runtime_checkable
class Stateful(Protocol[S]):
    """What the snapshot code needs of a device."""

    def save_state(self) -> S: ...

    def restore_state(self, state: S) -> None: ...


def check_record(state: object, kind: type[S]) -> S:
    """``state`` if it is a ``kind`` record, else :class:`StateError`."""
    if type(state) is not kind:
        raise StateError(f"a {kind.__name__} was expected, not {type(state).__name__}")
    return state


def check_int(record: Any, name: str, low: int, high: int) -> int:
    """``record.name`` if it is an int in ``[low, high]``, else :class:`StateError`."""
    value = getattr(record, name)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise StateError(f"{_field(record, name)} is {_shown(value)}, not an integer from {low} to {high}")
    return value


def check_bits(record: Any, name: str, allowed: int) -> int:
    """``record.name`` if it is an int with no bits set outside ``allowed``, else :class:`StateError`."""
    value = check_int(record, name, 0, allowed)
    if value & ~allowed:
        raise StateError(f"{_field(record, name)} is {value:#x}, which sets bits outside {allowed:#x}")
    return value


def check_bytes(record: Any, name: str, max_length: int, min_length: int = 0) -> bytes:
    """``record.name`` if it is bytes of ``min_length`` to ``max_length``, else :class:`StateError`."""
    value = getattr(record, name)
    if not isinstance(value, bytes) or not min_length <= len(value) <= max_length:
        shown = f"{len(value)} bytes" if isinstance(value, bytes) else _shown(value)
        wanted = f"{max_length}" if min_length == max_length else f"{min_length} to {max_length}"
        raise StateError(f"{_field(record, name)} is {shown}, not bytes of length {wanted}")
    return value


def check_type(record: Any, name: str, kind: type | tuple[type, ...]) -> Any:
    """``record.name`` if it is an instance of ``kind``, else :class:`StateError`."""
    value = getattr(record, name)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise StateError(f"{_field(record, name)} is {_shown(value)}, not {getattr(kind, '__name__', kind)}")
    return value


def check_indices(record: Any, name: str, length: int) -> tuple[int, ...]:
    """``record.name`` if it is a tuple of ascending ints in ``[0, length)``, else :class:`StateError`."""
    value = check_type(record, name, tuple)
    previous = -1
    for index in value:
        if isinstance(index, bool) or not isinstance(index, int) or not previous < index < length:
            raise StateError(f"{_field(record, name)} is {_shown(value)}, not ascending indices below {length}")
        previous = index
    return tuple(value)


def check_choice(record: Any, name: str, choices: tuple[object, ...]) -> Any:
    """``record.name`` if it is one of ``choices`` (of the same type: True is not 1), else :class:`StateError`."""
    value = getattr(record, name)
    if not any(type(value) is type(choice) and value == choice for choice in choices):
        raise StateError(f"{_field(record, name)} is {_shown(value)}, not one of {_shown(choices)}")
    return value


def _field(record: Any, name: str) -> str:
    return f"{type(record).__name__}.{name}"


def _shown(value: object) -> str:
    try:
        return _SHORT.repr(value)
    except ValueError:  # an int too long for repr()
        return f"{type(value).__name__} too large to show"

