"""A gdb remote serial protocol server, so that a stock gdb can debug a guest.

>>> server = GdbServer(target, "tcp::1234", hold=True)     # doctest: +SKIP
>>> # in another shell: gdb -ex 'target remote :1234'

``target`` is anything that implements :class:`DebugTarget` (:mod:`.target` describes the
contract); :mod:`.server` serves it, :mod:`.session` answers gdb's packets,
:mod:`.registers` describes the registers and :mod:`.packets` frames the bytes.
"""

from .server import GdbServer, GdbServerError, parse_address
from .target import (
    REGISTER_NAMES,
    Action,
    BreakpointKind,
    CpuMode,
    DebugTarget,
    DebugTargetError,
    Exited,
    Killed,
    Stop,
    StopEvent,
    StopReason,
    UnmappedAddressError,
    UnsupportedError,
)

__all__ = [
    "GdbServer", "GdbServerError", "parse_address",
    "REGISTER_NAMES", "Action", "BreakpointKind", "CpuMode", "DebugTarget", "DebugTargetError",
    "Exited", "Killed", "Stop", "StopEvent", "StopReason", "UnmappedAddressError", "UnsupportedError",
]  # fmt: skip
