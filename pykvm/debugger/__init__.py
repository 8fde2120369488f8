"""Debugging a machine's guest with gdb: the machine side of the gdb server's debug interface.

>>> vm = Machine(gdb="tcp::1234", gdb_wait=True)        # doctest: +SKIP
>>> vm.gdb_server.gdb_address                            # doctest: +SKIP
'127.0.0.1:1234'

:mod:`.target` is the :class:`~pykvm.gdbstub.DebugTarget` of a
:class:`~pykvm.machine.Machine` (stopping, resuming, breakpoints), :mod:`.registers`
its registers by name, :mod:`.memory` guest memory by virtual address, and
:mod:`.breakpoints` the debug registers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..gdbstub import GdbServer
from .target import MachineDebugger

if TYPE_CHECKING:
    from ..machine import Machine

__all__ = ["MachineDebugger", "serve_gdb"]


def serve_gdb(machine: Machine, address: str, *, wait: bool = False) -> GdbServer:
    """Serve ``machine`` to gdb at ``address`` (``tcp::PORT``, ``tcp:HOST:PORT``, ``unix:PATH``).

    With ``wait`` the vCPUs are held before the guest's first instruction until gdb
    continues them (QEMU's ``-S``); otherwise the guest runs until gdb connects.  Close
    the server (the machine does, for its own) before the machine.
    """
    return GdbServer(MachineDebugger(machine), address, hold=wait)
