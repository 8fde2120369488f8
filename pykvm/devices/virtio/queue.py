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

from dataclasses import dataclass, field
from typing import Any

from ...errors import GuestMemoryError, PykvmError, StateError
from ..state import check_int
from ...memory import GuestMemory
from ...native import ffi, lib

DESC_SIZE = 16
AVAIL_HEADER = 4  # flags, idx
USED_HEADER = 4
USED_ELEM_SIZE = 8  # id, len
DESC_ALIGN, AVAIL_ALIGN, USED_ALIGN = 16, 2, 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

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


@dataclass(frozen=True)
class QueueState:
    """A split queue as plain data: the driver's configuration and the device's positions."""

    size: int
    ready: bool
    desc_table: int
    avail_ring: int
    used_ring: int
    event_idx: bool
    indirect: bool
    next_avail: int
    next_used: int
    signalled_used: int | None


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
    _buffers: Any = field(default=None, repr=False)  # C array the chain walk fills

    def __post_init__(self) -> None:
        self.size = self.size or self.max_size

    def reset(self) -> None:
        """Back to the state after a device reset (size back to the maximum)."""
        self.size, self.ready = self.max_size, False
        self.desc_table = self.avail_ring = self.used_ring = 0
        self.event_idx = self.indirect = False
        self.next_avail = self.next_used = 0
        self._signalled_used = None
        self._buffers = None

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
    def pending(self, memory: GuestMemory) -> int:
        """How many chains the driver made available that the device has not popped."""
        pending = (memory.read_u16(self.avail_ring + 2) - self.next_avail) & 0xFFFF
        if pending > self.size:
            raise QueueError(f"available index moved by {pending}, more than the queue size {self.size}")
        return pending

    def pop(self, memory: GuestMemory) -> DescriptorChain | None:
        """The next available chain, or None."""
        if not self.pending(memory):
            return None
        head = memory.read_u16(self.avail_ring + AVAIL_HEADER + 2 * (self.next_avail % self.size))
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        if self.event_idx:  # avail_event: "notify me when you make the next one available"
            memory.write_u16(self._avail_event_addr(), self.next_avail)
        return DescriptorChain(head, self._walk(memory, head))

    def _walk(self, memory: GuestMemory, head: int) -> list[Buffer]:
        """The buffers of the chain at ``head``, walked and checked in C."""
        if self._buffers is None:
            raise QueueError("the queue was used before it was checked")
        out = self._buffers
        count = lib.pykvm_chain_walk(memory.table, self.desc_table, self.size, head, int(self.indirect), out, self.size)
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
        memory.write_u32(slot, head)
        memory.write_u32(slot + 4, length)
        self.next_used = (self.next_used + 1) & 0xFFFF
        memory.write_u16(self.used_ring + 2, self.next_used)  # after the element (x86: TSO)

    def needs_interrupt(self, memory: GuestMemory) -> bool:
        """Whether the driver wants an interrupt for what was used since the last one."""
        if not self.event_idx:
            return not memory.read_u16(self.avail_ring) & VIRTQ_AVAIL_F_NO_INTERRUPT
        used_event = memory.read_u16(self.avail_ring + AVAIL_HEADER + 2 * self.size)
        old, new = self._signalled_used, self.next_used
        self._signalled_used = new
        # As QEMU's virtio_split_should_notify(): always the first time, then vring_need_event().
        return old is None or (new - used_event - 1) & 0xFFFF < (new - old) & 0xFFFF

    # --- state ---------------------------------------------------------------------------
    def save_state(self) -> QueueState:
        return QueueState(
            self.size, self.ready, self.desc_table, self.avail_ring, self.used_ring, self.event_idx,
            self.indirect, self.next_avail, self.next_used, self._signalled_used,
        )  # fmt: skip

    def restore_state(self, state: QueueState, memory: GuestMemory) -> None:
        """Take ``state`` (checked as the driver's own writes are: a ready queue must check out)."""
        for name in ("size", "desc_table", "avail_ring", "used_ring"):
            check_int(state, name, 0, (1 << 64) - 1)
        for name in ("next_avail", "next_used"):
            check_int(state, name, 0, 0xFFFF)
        if state.signalled_used is not None:
            check_int(state, "signalled_used", 0, 0xFFFF)
        self.reset()
        self.size, self.ready = state.size, bool(state.ready)
        self.desc_table, self.avail_ring, self.used_ring = state.desc_table, state.avail_ring, state.used_ring
        self.event_idx, self.indirect = bool(state.event_idx), bool(state.indirect)
        self.next_avail, self.next_used, self._signalled_used = state.next_avail, state.next_used, state.signalled_used
        if self.ready:
            try:
                self.check(memory)
            except QueueError as err:
                raise StateError(f"virtqueue state: {err}") from err
