"""The hardware breakpoints and watchpoints a debugger has set: x86's four debug registers.

A watchpoint over a range that is not one naturally aligned 1, 2, 4 or 8 bytes takes one
register per aligned piece; a request that needs more registers than are free is
refused, and so is a read-only watchpoint, which x86 cannot give.
"""

from __future__ import annotations

import dataclasses

from ..gdbstub import BreakpointKind, StopReason, UnsupportedError
from ..kvm.debug import DR6_BREAKPOINT_HIT, HARDWARE_BREAKPOINTS, HardwareBreakpoint
from ..kvm.debug import BreakpointKind as DebugRegisterKind

_REGISTER_KINDS = {
    BreakpointKind.HARDWARE: DebugRegisterKind.EXECUTE,
    BreakpointKind.WRITE_WATCHPOINT: DebugRegisterKind.WRITE,
    BreakpointKind.ACCESS_WATCHPOINT: DebugRegisterKind.ACCESS,
}
_STOP_REASONS = {
    BreakpointKind.HARDWARE: StopReason.HARDWARE_BREAKPOINT,
    BreakpointKind.WRITE_WATCHPOINT: StopReason.WRITE_WATCHPOINT,
    BreakpointKind.ACCESS_WATCHPOINT: StopReason.ACCESS_WATCHPOINT,
}
_PIECE_SIZES = (8, 4, 2, 1)


@dataclasses.dataclass(frozen=True)
class Watch:
    """One hardware breakpoint or watchpoint as gdb asked for it, and the debug registers it takes."""

    kind: BreakpointKind
    address: int
    length: int
    pieces: tuple[HardwareBreakpoint, ...]


class DebugRegisters:
    """The hardware breakpoints and watchpoints, in debug-register order."""

    def __init__(self) -> None:
        self._watches: list[Watch] = []

    def insert(self, kind: BreakpointKind, address: int, length: int) -> None:
        if kind is BreakpointKind.READ_WATCHPOINT:
            raise UnsupportedError("x86 debug registers cannot watch reads alone: use awatch (reads and writes)")
        if self._find(kind, address, length) is not None:
            return
        if kind is BreakpointKind.HARDWARE and length != 1:
            raise UnsupportedError(f"an x86 hardware breakpoint stops at one instruction address (length 1, not {length})")
        if length > HARDWARE_BREAKPOINTS * _PIECE_SIZES[0]:
            raise UnsupportedError(f"{length} bytes are more than x86's debug registers can watch at once")
        register_kind = _REGISTER_KINDS[kind]
        pieces = tuple(HardwareBreakpoint(start, register_kind, size) for start, size in _aligned(address, length))
        used = sum(len(watch.pieces) for watch in self._watches)
        if used + len(pieces) > HARDWARE_BREAKPOINTS:
            raise UnsupportedError(
                f"x86 has {HARDWARE_BREAKPOINTS} debug registers, {used} of them in use, and this needs {len(pieces)}: "
                "delete a hardware breakpoint or watchpoint first"
            )
        self._watches.append(Watch(kind, address, length, pieces))

    def remove(self, kind: BreakpointKind, address: int, length: int) -> None:
        watch = self._find(kind, address, length)
        if watch is not None:
            self._watches.remove(watch)

    def clear(self) -> None:
        self._watches.clear()

    def registers(self) -> tuple[HardwareBreakpoint, ...]:
        """What DR0-DR3 hold, in order (for :class:`~pykvm.kvm.debug.GuestDebug`)."""
        return tuple(piece for watch in self._watches for piece in watch.pieces)

    def hit(self, dr6: int) -> tuple[StopReason, int | None] | None:
        """Why DR6 says the vCPU stopped: the stop reason and, for a watchpoint, its address."""
        index = 0
        for watch in self._watches:
            for _ in watch.pieces:
                if dr6 & DR6_BREAKPOINT_HIT & 1 << index:
                    reason = _STOP_REASONS[watch.kind]
                    return reason, None if reason is StopReason.HARDWARE_BREAKPOINT else watch.address
                index += 1
        return None

    def _find(self, kind: BreakpointKind, address: int, length: int) -> Watch | None:
        return next((w for w in self._watches if (w.kind, w.address, w.length) == (kind, address, length)), None)


def _aligned(address: int, length: int) -> list[tuple[int, int]]:
    """``[address, address + length)`` as naturally aligned pieces of 8, 4, 2 or 1 bytes."""
    pieces = []
    end = address + length
    while address < end:
        size = next(size for size in _PIECE_SIZES if address % size == 0 and address + size <= end)
        pieces.append((address, size))
        address += size
    return pieces
