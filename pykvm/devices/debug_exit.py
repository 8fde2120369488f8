"""QEMU's ``isa-debug-exit`` device: a port a guest writes to end the VM with a status.

As QEMU's ``hw/misc/debugexit.c``: a write of any size (1, 2 or 4 bytes) at
any offset of the range ends the VM, and the QEMU process exits with
``(value << 1) | 1``, where ``value`` is the value of the access (masked to
its size).  Reads return 0.  Test kernels written for QEMU's
``-device isa-debug-exit,iobase=0xf4,iosize=4`` run unchanged.

The device only reports the value to ``on_exit(value)``, on the vCPU thread
in the middle of the port write; the machine decides how to stop, and
:func:`exit_status` is the one place the status rule lives.

The device is stateless: a read always returns 0 and a write ends the run, so
nothing the guest did before changes what it does next, and it has no state
record (see :mod:`pykvm.devices.state`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from .ports import size_mask

# QEMU's iobase and iosize as pykvm's PC uses them.
DEBUG_EXIT_PORT = 0xF4
DEBUG_EXIT_SIZE = 4
# The low 8 bits of a status are what a parent process sees (POSIX exit()).
PROCESS_STATUS_MASK = 0xFF


def exit_status(value: int) -> int:
    """The status a QEMU process exits with after the guest wrote ``value``.

    QEMU exits with ``(value << 1) | 1``; the operating system keeps its low
    8 bits, which this returns, so the status is always odd: writing 0 gives 1,
    writing 0x10 gives 33.
    """
    return ((value << 1) | 1) & PROCESS_STATUS_MASK


class DebugExit:
    """The isa-debug-exit port range: writes end the VM, reads return 0."""

    SIZE = DEBUG_EXIT_SIZE

    def __init__(self, on_exit: Callable[[int], None]) -> None:
        self._on_exit = on_exit
        self.stats: Counter[str] = Counter()

    def read(self, offset: int, size: int) -> int:
        """Reads return 0, as QEMU's ``debug_exit_read``."""
        self.stats["reads"] += 1
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        """Report the written value, masked to the access size, to ``on_exit``."""
        self.stats["exits"] += 1
        self._on_exit(value & size_mask(size))
