"""What a machine takes from its host while it runs: clocks, random bytes, disk data, console input.

A guest sees the host through a few devices: the CMOS RTC shows the host's UTC clock, the
ACPI PM timer counts the host's monotonic clock, virtio-rng hands out the host's random
bytes, virtio-blk reads an image file, and the UART and the virtio console take what the
host types.  :func:`pykvm.builder.build` gives those devices the methods of one
:class:`HostInputs` object instead of letting each reach for the host itself; the devices
never learn who answers.  This class answers from the host; :mod:`pykvm.replay`'s recorder
and replayer are subclasses that log every answer, or give logged answers back.

Host input for the guest (:meth:`HostInputs.serial_input`, :meth:`HostInputs.console_input`)
goes to the device at once here; a recorder holds it until the vCPU is between two exits,
so that the moment it arrived can be named.  A subclass that must see each run sets
:attr:`HostInputs.observer` (see :class:`pykvm.runner.RunObserver`); a machine whose
inputs come from the host has none, and its runs pay nothing for it.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

from .errors import PykvmError

if TYPE_CHECKING:
    from .kvm import Vcpu
    from .runner import RunObserver

Receive = Callable[[bytes], None]


class HostInputs:
    """The host's clocks, random bytes, disk data and console input, as a machine's devices get them."""

    #: Watches every run of the machine (None: nothing does).
    observer: RunObserver | None = None

    def __init__(self) -> None:
        self._receivers: dict[str, Receive] = {}

    def connect(self, vcpu: Vcpu, receivers: Mapping[str, Receive]) -> None:
        """The machine is built: ``vcpu`` is its bootstrap processor, ``receivers`` take host input
        for the guest by device name (``"serial"``, and ``"console"`` with a virtio console)."""
        self._receivers = dict(receivers)

    def close(self) -> None:
        """Release what the inputs hold (nothing, from the host)."""

    # --- what devices ask for --------------------------------------------------------------------
    def wall_clock_ns(self) -> int:
        """UTC, in nanoseconds since the epoch (the CMOS RTC's time)."""
        return time.time_ns()

    def monotonic_ns(self) -> int:
        """A monotonic clock in nanoseconds (the ACPI PM timer's)."""
        return time.monotonic_ns()

    def random_bytes(self, size: int) -> bytes:
        """``size`` random bytes (virtio-rng's)."""
        return os.getrandom(size)

    def disk_read(self, disk: int, offset: int, data: Sequence[memoryview]) -> None:
        """Disk ``disk`` (its index among the machine's disks) read ``data`` from byte ``offset``,
        before the guest is told: nothing to do here."""

    # --- what the host sends -----------------------------------------------------------------------
    def serial_input(self, data: bytes) -> None:
        """Host input for the guest's UART (any thread)."""
        self.send("serial", data)

    def console_input(self, data: bytes) -> None:
        """Host input for the guest's virtio console (any thread)."""
        self.send("console", data)

    def send(self, device: str, data: bytes) -> None:
        """Host input for ``device``: handed over at once (a recorder holds it for a while)."""
        self.receiver(device)(data)

    def receiver(self, device: str) -> Receive:
        """What takes host input for ``device``; a :class:`PykvmError` if the machine has no such device."""
        receive = self._receivers.get(device)
        if receive is None:
            raise PykvmError(f"this machine has no {device} to take host input")
        return receive
