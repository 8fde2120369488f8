"""The split virtqueue (virtio 1.2, section 2.7), device side.

The queue knows no device and no transport (rust-vmm's virtio-queue is the
model): the transport sets its driver-written fields, a device pops descriptor
chains and adds used elements.  Guest memory is passed per call.  Everything the
driver wrote is treated as hostile: the ring addresses are checked when the queue
is activated, the available index may not move by more than the queue size, and
chains are walked by C code (``pykvm_chain_walk``) that checks every address and
bounds the walk.  A violation raises :class:`QueueError`; the device then asks for
a reset (DEVICE_NEEDS_RESET) or answers with its error status.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from ...errors import GuestMemoryError, PykvmError
from ...memory import GuestMemory
from ...native import ffi, lib

DESC_SIZE = 16
AVAIL_HEADER = 4  # flags, idx
USED_HEADER = 4
USED_ELEM_SIZE = 8  # id, len
DESC_ALIGN, AVAIL_ALIGN, USED_ALIGN = 16, 2, 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1
MAX_QUEUE_SIZE = 32768

_CHAIN_ERRORS = {
    lib.PYKVM_CHAIN_BAD_HEAD: "head index outside the queue",
    lib.PYKVM_CHAIN_BAD_TABLE: "descriptor table outside guest memory",
    lib.PYKVM_CHAIN_BAD_BUFFER: "buffer outside guest memory",
    lib.PYKVM_CHAIN_TOO_LONG: "chain longer than its table (a loop?)",
    lib.PYKVM_CHAIN_BAD_NEXT: "next index outside the table",
    lib.PYKVM_CHAIN_NESTED_INDIRECT: "indirect descriptor inside an indirect table",
    lib.PYKVM_CHAIN_BAD_INDIRECT: "malformed indirect descriptor",
    lib.PYKVM_CHAIN_TOO_MANY_BUFFERS: "too many buffers",
    lib.PYKVM_CHAIN_TOO_LARGE: "buffer lengths add up past 4 GiB",
    lib.PYKVM_CHAIN_INDIRECT_NOT_NEGOTIATED: "indirect descriptor without VIRTIO_F_INDIRECT_DESC",
}


class QueueError(PykvmError):
    """The driver broke a rule of the split virtqueue."""


@dataclass(frozen=True)
class Buffer:
    """One descriptor's buffer: where it is and whether the device may write it."""

    gpa: int
    len: int
    writable: bool


@dataclass
class DescriptorChain:
    """A popped chain: its head index (to return in the used ring) and its buffers."""

    head: int
    buffers: list[Buffer]

    @property
    def readable(self) -> list[Buffer]:
        return [b for b in self.buffers if not b.writable]

    @property
    def writable(self) -> list[Buffer]:
        return [b for b in self.buffers if b.writable]

    def read_all(self, memory: GuestMemory) -> bytes:
        """The concatenated device-readable buffers."""
        return b"".join(memory.read(b.gpa, b.len) for b in self.readable)

    def write_all(self, memory: GuestMemory, data: bytes) -> int:
        """Fill the device-writable buffers with ``data`` in order; returns the bytes written."""
        done = 0
        for buffer in self.writable:
            if done == len(data):
                break
            part = data[done : done + buffer.len]
            memory.write(buffer.gpa, part)
            done += len(part)
        return done


@dataclass
class SplitQueue:
    """One split virtqueue: the driver-written configuration and the device's indices."""

    max_size: int
    size: int = 0
    ready: bool = False
    desc_table: int = 0
    avail_ring: int = 0
    used_ring: int = 0
    event_idx: bool = False
    indirect: bool = False
    next_avail: int = 0
    next_used: int = 0
    _signalled_used: int | None = field(default=None, repr=False)
    _buffers: object = field(default=None, repr=False)  # C array the chain walk fills

    def __post_init__(self) -> None:
        self.size = self.size or self.max_size

    def reset(self) -> None:
        """Back to the state after a device reset (size back to the maximum)."""
        self.__init__(self.max_size)  # type: ignore[misc]

    def check(self, memory: GuestMemory) -> None:
        """Validate the driver's configuration before use (raises :class:`QueueError`)."""
        if not (0 < self.size <= self.max_size) or self.size & (self.size - 1):
            raise QueueError(f"queue size {self.size} is not a power of two up to {self.max_size}")
        areas = (
            ("descriptor table", self.desc_table, DESC_SIZE * self.size, DESC_ALIGN),
            ("available ring", self.avail_ring, AVAIL_HEADER + 2 * self.size + 2, AVAIL_ALIGN),
            ("used ring", self.used_ring, USED_HEADER + USED_ELEM_SIZE * self.size + 2, USED_ALIGN),
        )
        for name, gpa, length, align in areas:
            if gpa % align:
                raise QueueError(f"{name} at {gpa:#x} is not {align}-byte aligned")
            try:
                memory.locate(gpa, length)
            except GuestMemoryError as err:
                raise QueueError(f"{name} at {gpa:#x} is outside guest memory") from err
        # "A driver MUST NOT create a descriptor chain longer than the Queue Size" (2.7.5.3.1)
        self._buffers = ffi.new("struct pykvm_buffer[]", self.size)

    # --- the available ring ------------------------------------------------------------
    def _avail_idx(self, memory: GuestMemory) -> int:
        return int.from_bytes(memory.view(self.avail_ring + 2, 2), "little")

    def pending(self, memory: GuestMemory) -> int:
        """How many chains the driver made available that the device has not popped."""
        pending = (self._avail_idx(memory) - self.next_avail) & 0xFFFF
        if pending > self.size:
            raise QueueError(f"available index moved by {pending}, more than the queue size {self.size}")
        return pending

    def pop(self, memory: GuestMemory, table: object) -> DescriptorChain | None:
        """The next available chain, or None.  ``table`` is ``memory.native_table()``."""
        if not self.pending(memory):
            return None
        slot = self.avail_ring + AVAIL_HEADER + 2 * (self.next_avail % self.size)
        head = int.from_bytes(memory.view(slot, 2), "little")
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        if self.event_idx:  # avail_event: "notify me when you make the next one available"
            memory.write(self._avail_event_addr(), struct.pack("<H", self.next_avail))
        return DescriptorChain(head, self._walk(table, head))

    def _walk(self, table: object, head: int) -> list[Buffer]:
        """The buffers of the chain at ``head``, walked and checked in C."""
        if self._buffers is None:
            raise QueueError("the queue was used before it was checked")
        out = self._buffers
        count = lib.pykvm_chain_walk(table, self.desc_table, self.size, head, int(self.indirect), out, self.size)
        if count < 0:
            raise QueueError(f"descriptor chain at head {head}: {_CHAIN_ERRORS.get(count, count)}")
        # A zero-length buffer carries nothing and the walk does not check its address, so it
        # is dropped here: handed to a device, memory.view(gpa, 0) would raise for a bad gpa.
        return [Buffer(int(b.gpa), int(b.len), bool(b.writable)) for b in out[0:count] if b.len]

    def _avail_event_addr(self) -> int:
        return self.used_ring + USED_HEADER + USED_ELEM_SIZE * self.size

    # --- the used ring -----------------------------------------------------------------
    def add_used(self, memory: GuestMemory, head: int, length: int) -> None:
        """Return chain ``head`` with ``length`` bytes written by the device."""
        slot = self.used_ring + USED_HEADER + USED_ELEM_SIZE * (self.next_used % self.size)
        memory.write(slot, struct.pack("<II", head, length))
        self.next_used = (self.next_used + 1) & 0xFFFF
        memory.write(self.used_ring + 2, struct.pack("<H", self.next_used))  # after the element (x86: TSO)

    def needs_interrupt(self, memory: GuestMemory) -> bool:
        """Whether the driver wants an interrupt for what was used since the last one."""
        if not self.event_idx:
            flags = int.from_bytes(memory.view(self.avail_ring, 2), "little")
            return not flags & VIRTQ_AVAIL_F_NO_INTERRUPT
        used_event = int.from_bytes(memory.view(self.avail_ring + AVAIL_HEADER + 2 * self.size, 2), "little")
        old, new = self._signalled_used, self.next_used
        self._signalled_used = new
        # As QEMU's virtio_split_should_notify(): always the first time, then vring_need_event().
        return old is None or (new - used_event - 1) & 0xFFFF < (new - old) & 0xFFFF
