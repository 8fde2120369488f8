"""Decoded vCPU exits: one small record per kind of ``KVM_EXIT_*`` pykvm handles.

The records of port I/O and MMIO carry a writable view of ``kvm_run``'s data area, whose
first ``size * count`` bytes are the accesses' (valid until the vCPU runs again): a read's
answer is written there before the vCPU runs again.  A write's first access also comes as
an integer, ``value``, which the C run loop decoded.  They are plain slotted classes because one is made per exit (a
frozen dataclass costs twice as much).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class IoExit:
    """``KVM_EXIT_IO``: ``count`` accesses of ``size`` bytes to ``port``, packed in ``data``
    (string I/O makes several); ``value`` is a write's first access (0 for a read)."""

    port: int
    size: int
    count: int
    is_write: bool
    data: Any  # writable bytes from the first access on (a memoryview over kvm_run)
    value: int


@dataclass(slots=True)
class MmioExit:
    """``KVM_EXIT_MMIO``: one access of ``size`` bytes at guest-physical ``addr``, in ``data``;
    ``value`` is a write's bytes as an integer (0 for a read)."""

    addr: int
    size: int
    is_write: bool
    data: Any  # writable bytes from the first access on (a memoryview over kvm_run)
    value: int


@dataclass(slots=True)
class HltExit:
    """``KVM_EXIT_HLT``: the guest executed HLT (only without an in-kernel irqchip)."""

    interrupts_enabled: bool


@dataclass(slots=True)
class ShutdownExit:
    """``KVM_EXIT_SHUTDOWN``: a triple fault (or another shutdown condition)."""


@dataclass(slots=True)
class InternalErrorExit:
    """``KVM_EXIT_INTERNAL_ERROR``: KVM could not emulate an instruction (or another internal error)."""

    suberror: int
    data: tuple[int, ...]


@dataclass(slots=True)
class FailEntryExit:
    """``KVM_EXIT_FAIL_ENTRY``: the hardware refused to enter the guest."""

    reason: int
    cpu: int


@dataclass(slots=True)
class SystemEventExit:
    """``KVM_EXIT_SYSTEM_EVENT``: the guest asked for shutdown, reset or reported a crash."""

    type: int
    data: tuple[int, ...]


@dataclass(slots=True)
class GuestDebugExit:
    """``KVM_EXIT_DEBUG``: a debug event KVM_SET_GUEST_DEBUG asked for (not the debug-exit port).

    ``exception`` is the vector (1: #DB, single step or hardware breakpoint; 3: #BP, int3),
    ``pc`` the guest's linear instruction address (after the step; at the breakpoint),
    ``dr6`` and ``dr7`` the debug registers (DR6 B0-B3: which hardware breakpoint, BS: a step).
    """

    exception: int
    pc: int
    dr6: int
    dr7: int


@dataclass(slots=True)
class DebugPortExit:
    """A debug-exit port was written; answered by the C fast path."""

    value: int


@dataclass(slots=True)
class Interrupted:
    """KVM_RUN returned early because of a signal or ``immediate_exit``."""


@dataclass(slots=True)
class StopRequested:
    """The vCPU's stop flag was set (:meth:`Vcpu.request_stop`): it did not enter the guest."""


@dataclass(slots=True)
class OtherExit:
    """Any other exit reason, reported as is (KVM_EXIT_UNKNOWN carries the hardware reason)."""

    reason: int
    hardware_reason: int = 0


Exit = (
    IoExit | MmioExit | HltExit | ShutdownExit | InternalErrorExit | FailEntryExit
    | SystemEventExit | GuestDebugExit | DebugPortExit | Interrupted | StopRequested | OtherExit
)  # fmt: skip
