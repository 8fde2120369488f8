"""Copying the plain records of ``kvm/state.py`` to and from KVM's C structs (cffi),
and checking the state blobs that travel as a struct's raw bytes."""

from __future__ import annotations

import dataclasses
from dataclasses import fields
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import StateError
from ..native import ffi

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

Record = TypeVar("Record", bound="DataclassInstance")


def to_record(cls: type[Record], cstruct: Any) -> Record:
    """Copy a cffi struct into the dataclass ``cls`` (nested dataclasses recurse)."""
    values: dict[str, Any] = {}
    for f in fields(cls):
        member = getattr(cstruct, f.name)
        nested = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        values[f.name] = to_record(nested, member) if isinstance(nested, type) else int(member)
    return cls(**values)


def fill_struct(cstruct: Any, record: DataclassInstance) -> None:
    """Copy the dataclass ``record`` into a cffi struct (nested dataclasses recurse)."""
    for f in fields(record):
        value = getattr(record, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            fill_struct(getattr(cstruct, f.name), value)
        else:
            setattr(cstruct, f.name, value)


def new_struct(ctype: str, record: DataclassInstance) -> Any:
    """A new cffi ``ctype *`` holding ``record``."""
    cstruct = ffi.new(ctype + " *")
    fill_struct(cstruct, record)
    return cstruct


def check_present(part: str, saved: object | None, here: bool) -> None:
    """Refuse a saved state that has an in-kernel ``part`` this VM lacks, or lacks one it has."""
    if (saved is not None) != here:
        has, lacks = ("the saved state", "this VM") if saved is not None else ("this VM", "the saved state")
        raise StateError(f"{has} has an in-kernel {part} and {lacks} has none")


def check_size(what: str, blob: bytes, size: int) -> None:
    """Refuse a state blob whose size is not the kernel struct's, before any ioctl sees it."""
    if len(blob) != size:
        raise StateError(f"{what}: {len(blob)} bytes given, this host's KVM uses {size}")
