"""Decoded vCPU exits: one small record per kind of ``KVM_EXIT_*`` pykvm handles.

The records of port I/O and MMIO carry a writable view of their bytes in ``kvm_run``
(valid until the vCPU runs again): a read's answer is written there before the vCPU runs
again.  A write's first access also comes as an integer, ``value``, which the C run loop
decoded.

They are plain slotted classes, each with its own ``__init__``, equal when their fields
are: one is made per exit, and a dataclass would cost every ``pykvm run`` about 0.3 ms
per class at import (its methods are compiled from source when the class is made).
"""

from __future__ import annotations

from typing import Any


class _Record:
    """Value equality and a repr from ``__slots__``; each record's ``match`` positions are its
    slots, written out in the class body so that a type checker knows them too."""

    __slots__: tuple[str, ...] = ()
    __hash__ = None  # type: ignore[assignment]  # mutable and compared by value, as a dataclass

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in self.__slots__)

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__name__}({fields})"


class IoExit(_Record):
    """``KVM_EXIT_IO``: ``count`` accesses of ``size`` bytes to ``port``, packed in ``data``
    (string I/O makes several); ``value`` is a write's first access (0 for a read)."""

    __slots__ = __match_args__ = ("port", "size", "count", "is_write", "data", "value")

    def __init__(self, port: int, size: int, count: int, is_write: bool, data: Any, value: int) -> None:
        self.port, self.size, self.count, self.is_write, self.data, self.value = port, size, count, is_write, data, value


class MmioExit(_Record):
    """``KVM_EXIT_MMIO``: one access of ``size`` bytes at guest-physical ``addr``, in ``data``;
    ``value`` is a write's bytes as an integer (0 for a read)."""

    __slots__ = __match_args__ = ("addr", "size", "is_write", "data", "value")

    def __init__(self, addr: int, size: int, is_write: bool, data: Any, value: int) -> None:
        self.addr, self.size, self.is_write, self.data, self.value = addr, size, is_write, data, value


class HltExit(_Record):
    """``KVM_EXIT_HLT``: the guest executed HLT (only without an in-kernel irqchip)."""

    __slots__ = __match_args__ = ("interrupts_enabled",)

    def __init__(self, interrupts_enabled: bool) -> None:
        self.interrupts_enabled = interrupts_enabled


class ShutdownExit(_Record):
    """``KVM_EXIT_SHUTDOWN``: a triple fault (or another shutdown condition)."""

    __slots__ = __match_args__ = ()


class InternalErrorExit(_Record):
    """``KVM_EXIT_INTERNAL_ERROR``: KVM could not emulate an instruction (or another internal error)."""

    __slots__ = __match_args__ = ("suberror", "data")

    def __init__(self, suberror: int, data: tuple[int, ...]) -> None:
        self.suberror, self.data = suberror, data


class FailEntryExit(_Record):
    """``KVM_EXIT_FAIL_ENTRY``: the hardware refused to enter the guest."""

    __slots__ = __match_args__ = ("reason", "cpu")

    def __init__(self, reason: int, cpu: int) -> None:
        self.reason, self.cpu = reason, cpu


class SystemEventExit(_Record):
    """``KVM_EXIT_SYSTEM_EVENT``: the guest asked for shutdown, reset or reported a crash."""

    __slots__ = __match_args__ = ("type", "data")

    def __init__(self, type: int, data: tuple[int, ...]) -> None:
        self.type, self.data = type, data


class GuestDebugExit(_Record):
    """``KVM_EXIT_DEBUG``: a debug event KVM_SET_GUEST_DEBUG asked for (not the debug-exit port).

    ``exception`` is the vector (1: #DB, single step or hardware breakpoint; 3: #BP, int3),
    ``pc`` the guest's linear instruction address (after the step; at the breakpoint),
    ``dr6`` and ``dr7`` the debug registers (DR6 B0-B3: which hardware breakpoint, BS: a step).
    """

    __slots__ = __match_args__ = ("exception", "pc", "dr6", "dr7")

    def __init__(self, exception: int, pc: int, dr6: int, dr7: int) -> None:
        self.exception, self.pc, self.dr6, self.dr7 = exception, pc, dr6, dr7


class DebugPortExit(_Record):
    """A debug-exit port was written; answered by the C fast path."""

    __slots__ = __match_args__ = ("value",)

    def __init__(self, value: int) -> None:
        self.value = value


class Interrupted(_Record):
    """KVM_RUN returned early because of a signal or ``immediate_exit``."""

    __slots__ = __match_args__ = ()


class StopRequested(_Record):
    """The vCPU's stop flag was set (:meth:`Vcpu.request_stop`): it did not enter the guest."""

    __slots__ = __match_args__ = ()


class OtherExit(_Record):
    """Any other exit reason, reported as is (KVM_EXIT_UNKNOWN carries the hardware reason)."""

    __slots__ = __match_args__ = ("reason", "hardware_reason")

    def __init__(self, reason: int, hardware_reason: int = 0) -> None:
        self.reason, self.hardware_reason = reason, hardware_reason


Exit = (
    IoExit | MmioExit | HltExit | ShutdownExit | InternalErrorExit | FailEntryExit
    | SystemEventExit | GuestDebugExit | DebugPortExit | Interrupted | StopRequested | OtherExit
)  # fmt: skip
