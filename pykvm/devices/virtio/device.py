"""What every virtio device shares: identity, features, configuration space, queue plumbing.

A device subclass sets :attr:`name`, :attr:`device_id`, :attr:`features` (its own
feature bits; the transport adds VERSION_1, INDIRECT_DESC and EVENT_IDX) and
:attr:`queue_max_sizes`, returns its configuration space from :meth:`config_bytes`,
and implements :meth:`process` (a queue was notified).  Guest mistakes are logged and
counted in :attr:`stats`; a broken ring raises
:class:`~pykvm.devices.virtio.queue.QueueError`, which the transport turns into
DEVICE_NEEDS_RESET.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Callable, Iterator

from ...memory import GuestMemory
from .queue import DescriptorChain, SplitQueue

if TYPE_CHECKING:
    from .mmio import VirtioMmioTransport

BITS_PER_BYTE = 8


class VirtioDevice:
    """Base class of the virtio device models."""

    name = "virtio"
    device_id = 0
    features = 0
    queue_max_sizes: tuple[int, ...] = ()

    def __init__(self) -> None:
        self.transport: VirtioMmioTransport | None = None
        self.driver_features = 0
        self.stats: Counter[str] = Counter()
        self._table: object = None
        # Set by the machine: call it with (fd, False) to stop being told that a host fd is
        # readable (no guest buffers to put the input in), and (fd, True) to resume.
        self.host_fd_interest: Callable[[int, bool], None] | None = None

    def bind(self, transport: VirtioMmioTransport) -> None:
        """Called once by the transport the device sits behind."""
        self.transport = transport
        self._table = transport.memory.native_table()

    @property
    def memory(self) -> GuestMemory:
        assert self.transport is not None
        return self.transport.memory

    def queue(self, index: int) -> SplitQueue:
        assert self.transport is not None
        return self.transport.queues[index]

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
    def activate(self, driver_features: int) -> None:
        """The driver set DRIVER_OK with these features; the ready queues are checked."""
        self.driver_features = driver_features

    def reset(self) -> None:
        """The driver reset the device (or it needs one): drop any in-flight state."""
        self.driver_features = 0

    def process(self, queue_index: int) -> None:
        """Queue ``queue_index`` was notified: consume what is available."""
        raise NotImplementedError

    def host_fds(self) -> list[int]:
        """Host descriptors whose readability the I/O thread reports to :meth:`on_host_readable`."""
        return []

    def on_host_readable(self, fd: int) -> None:
        """Host input is waiting on ``fd`` (called on the I/O thread)."""

    # --- helpers for subclasses ----------------------------------------------------------
    def chains(self, queue_index: int) -> Iterator[DescriptorChain]:
        """Pop available chains until the queue is empty (raises QueueError on a bad ring)."""
        queue = self.queue(queue_index)
        while (chain := queue.pop(self.memory, self._table)) is not None:
            yield chain

    def complete(self, queue_index: int, chain: DescriptorChain, written: int) -> None:
        """Return ``chain`` with ``written`` bytes written (the interrupt comes from :meth:`signal`)."""
        self.queue(queue_index).add_used(self.memory, chain.head, written)

    def signal(self, queue_index: int) -> None:
        """Interrupt the driver for what this queue used, if it wants one."""
        assert self.transport is not None
        self.transport.used(queue_index)
