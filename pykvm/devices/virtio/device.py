"""What every virtio device shares: identity, features, configuration space, activation.

A device subclass sets :attr:`name`, :attr:`device_id`, :attr:`features` (its own
feature bits; the transport adds VERSION_1, INDIRECT_DESC and EVENT_IDX) and
:attr:`queue_max_sizes`, returns its configuration space from :meth:`config_bytes`,
and implements :meth:`process` (a queue was notified).

The transport decodes the driver's registers; the device never reaches back into it.
When the driver sets DRIVER_OK the transport hands the device what it works with, as
Firecracker and rust-vmm do: :meth:`VirtioDevice.activate` gets the guest memory, the
queues the driver configured and a :class:`VirtioInterrupt` to signal the driver
through.  A device reset (:meth:`VirtioDevice.reset`) takes them away again.

Guest mistakes are logged and counted in :attr:`stats`; a broken ring raises
:class:`~pykvm.devices.virtio.queue.QueueError`, which the transport (or the device, on
a host-side path) turns into DEVICE_NEEDS_RESET.

Locking: :attr:`VirtioDevice.lock` serialises everything that touches the device's
state: the transport's register accesses (vCPU threads), queue processing (the I/O
thread) and host-side calls (a console's input, a balloon's target).
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Callable, Iterator, Protocol, Sequence

from ...errors import StateError
from ...memory import GuestMemory
from .queue import DescriptorChain, QueueError, SplitQueue


class VirtioInterrupt(Protocol):
    """How an active device tells its driver something (the transport implements it)."""

    def signal_used(self, queue_index: int) -> None:
        """Buffers were used on ``queue_index``: the used-buffer interrupt."""

    def signal_config(self) -> None:
        """The device configuration changed: the configuration-change interrupt."""

    def signal_needs_reset(self, reason: str) -> None:
        """The driver broke the protocol: DEVICE_NEEDS_RESET, and tell the driver."""


class VirtioDevice:
    """Base class of the virtio device models."""

    name = "virtio"
    device_id = 0
    features = 0
    queue_max_sizes: tuple[int, ...] = ()

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.driver_features = 0
        self.stats: Counter[str] = Counter()
        self._memory: GuestMemory | None = None  # while active
        self.queues: Sequence[SplitQueue] = ()
        self.interrupt: VirtioInterrupt | None = None
        # Set by the device manager: call it with (fd, False) to stop being told that a host fd
        # is readable (no guest buffers to put the input in), and (fd, True) to resume.
        self.host_fd_interest: Callable[[int, bool], None] | None = None

    @property
    def active(self) -> bool:
        """Between DRIVER_OK and the next reset."""
        return self.interrupt is not None

    @property
    def memory(self) -> GuestMemory:
        """The guest memory the device works on while it is active."""
        assert self._memory is not None, f"virtio {self.name}: guest memory used while the device is not active"
        return self._memory

    # --- configuration space -----------------------------------------------------------
    def config_bytes(self) -> bytes:
        """The device-specific configuration space, little-endian (4.2.2, offset 0x100)."""
        return b""

    def read_config(self, offset: int, size: int) -> int:
        config = self.config_bytes()
        if offset < 0 or offset + size > len(config):
            self.stats["config_reads_outside"] += 1
            return 0
        return int.from_bytes(config[offset : offset + size], "little")

    def write_config(self, offset: int, size: int, value: int) -> None:
        """Configuration writes; read-only by default (counted, then ignored)."""
        self.stats["config_writes_ignored"] += 1

    # --- lifecycle -----------------------------------------------------------------------
    def acknowledge(self, driver_features: int) -> None:
        """The driver set FEATURES_OK with these features (a subset of the offered ones)."""
        self.driver_features = driver_features

    def activate(self, memory: GuestMemory, queues: Sequence[SplitQueue], interrupt: VirtioInterrupt) -> None:
        """DRIVER_OK: the device works on ``memory`` and ``queues`` (every queue, indexed as the
        driver numbers them; the ready ones are checked) and signals through ``interrupt``."""
        self._memory, self.queues, self.interrupt = memory, queues, interrupt

    def reset(self) -> None:
        """The driver reset the device (or it needs one): drop any in-flight state."""
        self.driver_features = 0
        self._memory, self.queues, self.interrupt = None, (), None

    def process(self, queue_index: int) -> None:
        """Queue ``queue_index`` was notified: consume what is available."""
        raise NotImplementedError

    def host_fds(self) -> list[int]:
        """Host descriptors whose readability the I/O thread reports to :meth:`on_host_readable`."""
        return []

    def on_host_readable(self, fd: int) -> None:
        """Host input is waiting on ``fd`` (called on the I/O thread)."""

    # --- state -----------------------------------------------------------------------------
    # A device whose own state outlives a request (a balloon's target, a console's pending
    # input) overrides these; the features and queues are the transport's state.
    def save_state(self) -> object | None:
        """The device's own state as plain data (see :mod:`pykvm.devices.state`); None if it has none."""
        return None

    def restore_state(self, state: object | None) -> None:
        """Take back what :meth:`save_state` gave, after the transport restored its own state."""
        if state is not None:
            raise StateError(f"virtio {self.name} keeps no state, but the saved state has {type(state).__name__}")

    # --- helpers for subclasses ----------------------------------------------------------
    def chains(self, queue_index: int) -> Iterator[DescriptorChain]:
        """Pop available chains until the queue is empty (raises QueueError on a bad ring)."""
        queue, memory = self.queues[queue_index], self.memory
        while (chain := queue.pop(memory)) is not None:
            yield chain

    def complete(self, queue_index: int, chain: DescriptorChain, written: int) -> None:
        """Return ``chain`` with ``written`` bytes written (the interrupt comes from :meth:`signal`)."""
        self.queues[queue_index].add_used(self.memory, chain.head, written)

    def signal(self, queue_index: int) -> None:
        """Interrupt the driver for what this queue used, if it wants one."""
        if self.interrupt is not None and self.queues[queue_index].needs_interrupt(self.memory):
            self.interrupt.signal_used(queue_index)

    def config_changed(self) -> None:
        """Tell an active driver that the configuration changed (an inactive one reads it anew)."""
        if self.interrupt is not None:
            self.interrupt.signal_config()

    def broken(self, err: QueueError) -> None:
        """A host-side path found the driver's ring broken: DEVICE_NEEDS_RESET."""
        if self.interrupt is not None:
            self.interrupt.signal_needs_reset(str(err))
