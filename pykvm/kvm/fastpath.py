"""The table of exits the C run loop answers without returning to Python.

One table is shared by every vCPU of a machine.  Each entry covers a port or MMIO
range and is one of four kinds: a constant (reads give ``value``, writes are
ignored), a byte register (1-byte reads give ``value``, which the device model keeps
current; other accesses go to Python), a debug-exit port (a write stops the run with
the written value) or a serial transmit register (1-byte writes go to a serial output,
see :class:`~pykvm.console.SerialOutput`).  Device models switch their entry off while
their state makes the simple answer wrong (e.g. the UART's divisor latch is selected, or a
line error waits to be cleared by the next read of its line status).
"""

from __future__ import annotations

import enum
from typing import Any

from ..errors import PykvmError
from ..native import ffi, lib


class FastKind(enum.IntEnum):
    CONSTANT = lib.PYKVM_FAST_CONSTANT
    DEBUG_EXIT = lib.PYKVM_FAST_DEBUG_EXIT
    SERIAL_TX = lib.PYKVM_FAST_SERIAL_TX
    BYTE_REGISTER = lib.PYKVM_FAST_BYTE_REGISTER


class Space(enum.IntEnum):
    PIO = lib.PYKVM_SPACE_PIO
    MMIO = lib.PYKVM_SPACE_MMIO


class FastHandler:
    """One entry of a :class:`FastTable`."""

    def __init__(self, entry: Any) -> None:
        self._entry = entry

    @property
    def kind(self) -> FastKind:
        return FastKind(self._entry.kind)

    @property
    def space(self) -> Space:
        return Space(self._entry.space)

    @property
    def base(self) -> int:
        return int(self._entry.base)

    @property
    def enabled(self) -> bool:
        return bool(self._entry.enabled)

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._entry.enabled = int(value)

    @property
    def value(self) -> int:
        return int(self._entry.value)

    @value.setter
    def value(self, value: int) -> None:
        """What reads give; a vCPU in the C loop sees the old value or the new one (one store)."""
        self._entry.value = value

    @property
    def reads(self) -> int:
        return int(self._entry.reads)

    @property
    def writes(self) -> int:
        return int(self._entry.writes)


class FastTable:
    """Up to ``PYKVM_FAST_MAX`` fast handlers, in C memory the run loop reads."""

    def __init__(self) -> None:
        self.cdata = ffi.new("struct pykvm_fast_table *")
        self.handlers: list[FastHandler] = []

    def add(
        self, kind: FastKind, space: Space, base: int, length: int, value: int = 0, serial: object = ffi.NULL
    ) -> FastHandler:
        """Add an enabled entry covering ``[base, base+length)``; ``serial`` is a serial
        transmit entry's ``struct pykvm_serial_out *`` (kept alive by its owner)."""
        if len(self.handlers) >= lib.PYKVM_FAST_MAX:
            raise PykvmError(f"no room for another fast handler (at most {lib.PYKVM_FAST_MAX})")
        entry = self.cdata.handlers[len(self.handlers)]
        entry.kind, entry.space, entry.base, entry.length, entry.value = kind, space, base, length, value
        entry.serial = serial
        entry.enabled = 1
        handler = FastHandler(entry)
        self.handlers.append(handler)
        self.cdata.count = len(self.handlers)
        return handler
