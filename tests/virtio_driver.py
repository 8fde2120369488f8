"""The guest driver's side of virtio-mmio and the split virtqueue, for tests.

:class:`Driver` plays a virtio 1.2 driver against a device behind a
:class:`~pykvm.devices.virtio.mmio.VirtioMmioTransport`, in real guest memory and
without KVM: it resets the device, negotiates features (3.1.1), lays out the
descriptor table, available and used rings of every queue (2.7), posts chains
(direct or indirect), notifies through QueueNotify, collects used elements and
counts interrupts.  It also writes arbitrary descriptors, ring entries and indices
so that tests can hand the device malformed input, and it mirrors both sides of
VIRTIO_F_EVENT_IDX (``used_event`` written by the driver, ``avail_event`` read back).

The transport is synchronous here: a notification is processed before
:meth:`Driver.notify` returns, so "wait for the interrupt" is "look at
:attr:`Driver.interrupts`".

Also here, for the queue and property tests: :class:`RecordingDevice` (a device
that records the chains it is given), :func:`reference_walk` (the chain-walk rules
of ``pykvm_chain_walk`` written again in Python, to check the C walker against) and
:func:`record_pops` (which records every chain a device pops, as the C walker
returned it).
"""

from __future__ import annotations

import contextlib
import struct
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from pykvm.devices.virtio import mmio
from pykvm.devices.virtio.device import VirtioDevice, VirtioInterrupt
from pykvm.devices.virtio.mmio import VirtioMmioTransport
from pykvm.devices.virtio.queue import DescriptorChain, QueueError, SplitQueue
from pykvm.memory import GuestMemory

PAGE = 4096
VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT = 1, 2, 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1
DESC = struct.Struct("<QIHH")  # addr, len, flags, next
ALL_FEATURES = (1 << 64) - 1
POISON = 0xEE  # fills device-writable buffers when they are posted


def align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """vring_need_event() (2.7.7.2 / 2.7.10): has ``event_idx`` been passed going old -> new?"""
    return (new_idx - event_idx - 1) & 0xFFFF < (new_idx - old_idx) & 0xFFFF


class FeaturesRefused(Exception):
    """The device cleared FEATURES_OK: it does not accept the driver's features."""


class QueueFull(Exception):
    """Not enough free descriptors for the chain."""


class InterruptLine:
    """The transport's ``interrupt`` callable: counts edges."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


@dataclass
class PostedChain:
    """What the driver posted at ``head``: the buffers, and the ring descriptors to free."""

    head: int
    descriptors: list[int]
    buffers: list[tuple[int, int, bool]]  # gpa, len, writable
    indirect_table: int | None = None


@dataclass
class DriverQueue:
    """The driver's view of one queue: where its rings are and its shadow indices."""

    index: int
    size: int
    desc: int
    avail: int
    used: int
    free: list[int] = field(default_factory=list)
    avail_idx: int = 0  # the next avail.idx the driver will publish
    last_used: int = 0  # the used.idx up to which the driver has consumed
    last_kick: int = 0  # avail.idx at the last notification (for EVENT_IDX)
    chains: dict[int, PostedChain] = field(default_factory=dict)

    @property
    def used_event_addr(self) -> int:
        return self.avail + 4 + 2 * self.size

    @property
    def avail_event_addr(self) -> int:
        return self.used + 4 + 8 * self.size

    @property
    def end(self) -> int:
        return self.used + 4 + 8 * self.size + 2


def queue_layout(base: int, size: int) -> tuple[int, int, int, int]:
    """(desc, avail, used, end) for a queue of ``size`` at ``base`` (2.7: alignments 16, 2, 4)."""
    desc = align_up(base, 16)
    avail = desc + 16 * size
    used = align_up(avail + 4 + 2 * size + 2, 4)
    return desc, avail, used, used + 4 + 8 * size + 2


class Driver:
    """A virtio-mmio driver for one device, with its rings at ``ring_area_gpa``.

    Buffers are allocated after the rings (or in ``buffer_area``), first fit with
    wrap-around: a test that posts more than the area holds reuses old space.
    """

    def __init__(
        self,
        transport: VirtioMmioTransport,
        memory: GuestMemory,
        ring_area_gpa: int,
        *,
        irq: InterruptLine | None = None,
        buffer_area: tuple[int, int] | None = None,
    ) -> None:
        self.transport = transport
        self.memory = memory
        self.ring_area = ring_area_gpa
        self.irq = irq
        self._buffer_area = buffer_area
        self.queues: list[DriverQueue] = []
        self.features = 0
        self._alloc_start = self._alloc_end = self._alloc_next = 0
        self.reset_reasons: list[str] = []  # why the device asked for a reset, in order
        ask_for_reset = transport.signal_needs_reset

        def needs_reset(reason: str) -> None:
            self.reset_reasons.append(reason)
            ask_for_reset(reason)

        transport.signal_needs_reset = needs_reset  # type: ignore[method-assign]

    # --- registers ------------------------------------------------------------------
    def read_reg(self, offset: int, size: int = 4) -> int:
        return self.transport.read(offset, size)

    def write_reg(self, offset: int, value: int, size: int = 4) -> None:
        self.transport.write(offset, size, value)

    @property
    def status(self) -> int:
        return self.read_reg(mmio.STATUS)

    def set_status(self, value: int) -> None:
        self.write_reg(mmio.STATUS, value)

    def add_status(self, bits: int) -> None:
        self.set_status(self.status | bits)

    def device_features(self) -> int:
        pages = []
        for sel in (0, 1):
            self.write_reg(mmio.DEVICE_FEATURES_SEL, sel)
            pages.append(self.read_reg(mmio.DEVICE_FEATURES))
        return pages[0] | pages[1] << 32

    def write_driver_features(self, features: int) -> None:
        for sel in (0, 1):
            self.write_reg(mmio.DRIVER_FEATURES_SEL, sel)
            self.write_reg(mmio.DRIVER_FEATURES, (features >> (32 * sel)) & 0xFFFFFFFF)

    def read_config(self, offset: int, size: int) -> int:
        return self.read_reg(mmio.CONFIG + offset, size)

    def write_config(self, offset: int, value: int, size: int = 4) -> None:
        self.write_reg(mmio.CONFIG + offset, value, size)

    @property
    def interrupts(self) -> int:
        if self.irq is None:
            raise RuntimeError("this driver was built without an InterruptLine")
        return self.irq.count

    def interrupt_status(self) -> int:
        return self.read_reg(mmio.INTERRUPT_STATUS)

    def ack(self, bits: int | None = None) -> int:
        """Acknowledge ``bits`` (default: whatever is pending); returns what was pending."""
        pending = self.interrupt_status()
        self.write_reg(mmio.INTERRUPT_ACK, pending if bits is None else bits)
        return pending

    # --- initialisation (3.1.1) ---------------------------------------------------------
    def reset(self) -> None:
        self.set_status(0)

    def negotiate(
        self,
        accept: int = ALL_FEATURES,
        *,
        queue_sizes: dict[int, int] | None = None,
        driver_ok: bool = True,
        max_queues: int | None = None,
    ) -> int:
        """Reset and initialise the device; returns the negotiated features.

        Raises :class:`FeaturesRefused` if the device clears FEATURES_OK.  Every queue the
        device has (QueueNumMax != 0) is set up, with ``queue_sizes[i]`` entries or its maximum.
        """
        self.reset()
        self.set_status(mmio.ACKNOWLEDGE)
        self.add_status(mmio.DRIVER)
        features = self.device_features() & accept
        self.write_driver_features(features)
        self.add_status(mmio.FEATURES_OK)
        if not self.status & mmio.FEATURES_OK:
            raise FeaturesRefused(f"device refused features {features:#x}")
        self.features = features
        self.setup_queues(queue_sizes or {}, max_queues)
        if driver_ok:
            self.add_status(mmio.DRIVER_OK)
        return features

    def setup_queues(self, queue_sizes: dict[int, int], max_queues: int | None = None) -> None:
        self.queues = []
        base = self.ring_area
        index = 0
        while max_queues is None or index < max_queues:
            self.write_reg(mmio.QUEUE_SEL, index)
            maximum = self.read_reg(mmio.QUEUE_NUM_MAX)
            if maximum == 0:
                break
            size = queue_sizes.get(index, maximum)
            desc, avail, used, end = queue_layout(base, size)
            self.memory.write(desc, bytes(end - desc))  # a fresh ring reads as zeros
            queue = DriverQueue(index, size, desc, avail, used, free=list(range(size)))
            self.queues.append(queue)
            self.write_reg(mmio.QUEUE_NUM, size)
            for low, value in ((mmio.QUEUE_DESC_LOW, desc), (mmio.QUEUE_DRIVER_LOW, avail), (mmio.QUEUE_DEVICE_LOW, used)):
                self.write_reg(low, value & 0xFFFFFFFF)
                self.write_reg(low + 4, value >> 32)
            self.write_reg(mmio.QUEUE_READY, 1)
            base = align_up(end, PAGE)
            index += 1
        if self._buffer_area is None:
            region, _ = self.memory.locate(self.ring_area, 1)
            start = align_up(base, PAGE)
            self._buffer_area = (start, region.end - start)
        self._alloc_start = self._alloc_next = self._buffer_area[0]
        self._alloc_end = self._buffer_area[0] + self._buffer_area[1]

    # --- buffers ------------------------------------------------------------------------
    def alloc(self, size: int, align: int = 16) -> int:
        """Guest memory for a buffer (first fit, wrapping around the buffer area)."""
        gpa = align_up(self._alloc_next, align)
        if gpa + size > self._alloc_end:
            gpa = align_up(self._alloc_start, align)
            if gpa + size > self._alloc_end:
                raise MemoryError(f"a {size}-byte buffer does not fit the buffer area")
        self._alloc_next = gpa + size
        return gpa

    def buffer(self, data: bytes) -> int:
        gpa = self.alloc(len(data))
        self.memory.write(gpa, data)
        return gpa

    # --- posting chains (2.7.13) ----------------------------------------------------------
    def post(
        self,
        queue: int,
        readable: list[bytes],
        writable: list[int],
        indirect: bool = False,
        *,
        poison: int = POISON,
    ) -> int:
        """Post one chain: ``readable`` buffers (device-readable, in order) then device-writable
        buffers of the ``writable`` sizes; returns the head.  Descriptors are written first, then
        the available ring entry, then avail.idx."""
        buffers = [(self.buffer(data), len(data), False) for data in readable]
        for size in writable:
            gpa = self.alloc(size)
            self.memory.write(gpa, bytes([poison]) * size)
            buffers.append((gpa, size, True))
        return self.post_buffers(queue, buffers, indirect)

    def post_buffers(self, queue: int, buffers: list[tuple[int, int, bool]], indirect: bool = False) -> int:
        """Post a chain of existing buffers ``(gpa, len, writable)``."""
        if not buffers:
            raise ValueError("a chain has at least one descriptor")
        q = self.queues[queue]
        entries = [(gpa, length, VIRTQ_DESC_F_WRITE if writable else 0) for gpa, length, writable in buffers]
        table = None
        if indirect:
            if not q.free:
                raise QueueFull(f"queue {queue} has no free descriptor")
            table = self.alloc(16 * len(entries), 16)
            for i, (gpa, length, flags) in enumerate(entries):
                more = i + 1 < len(entries)
                self.write_desc_at(table, i, gpa, length, flags | (VIRTQ_DESC_F_NEXT if more else 0), i + 1 if more else 0)
            head = q.free.pop(0)
            self.write_desc(queue, head, table, 16 * len(entries), VIRTQ_DESC_F_INDIRECT)
            used_descriptors = [head]
        else:
            if len(q.free) < len(entries):
                raise QueueFull(f"queue {queue} has {len(q.free)} free descriptors, the chain needs {len(entries)}")
            used_descriptors = [q.free.pop(0) for _ in entries]
            for i, (index, (gpa, length, flags)) in enumerate(zip(used_descriptors, entries)):
                more = i + 1 < len(entries)
                nxt = used_descriptors[i + 1] if more else 0
                self.write_desc(queue, index, gpa, length, flags | (VIRTQ_DESC_F_NEXT if more else 0), nxt)
            head = used_descriptors[0]
        q.chains[head] = PostedChain(head, used_descriptors, list(buffers), table)
        self.publish(queue, head)
        return head

    def publish(self, queue: int, head: int) -> None:
        """Put ``head`` in the next available ring slot, then move avail.idx (2.7.13.2-3)."""
        q = self.queues[queue]
        self.memory.write(q.avail + 4 + 2 * (q.avail_idx % q.size), struct.pack("<H", head & 0xFFFF))
        q.avail_idx = (q.avail_idx + 1) & 0xFFFF
        self.memory.write(q.avail + 2, struct.pack("<H", q.avail_idx))

    # --- raw access, for malformed input ---------------------------------------------------
    def write_desc(self, queue: int, index: int, addr: int, length: int, flags: int = 0, next: int = 0) -> None:
        self.write_desc_at(self.queues[queue].desc, index, addr, length, flags, next)

    def write_desc_at(self, table: int, index: int, addr: int, length: int, flags: int = 0, next: int = 0) -> None:
        self.memory.write(table + 16 * index, DESC.pack(addr, length, flags, next))

    def set_avail_idx(self, queue: int, value: int) -> None:
        q = self.queues[queue]
        q.avail_idx = value & 0xFFFF
        self.memory.write(q.avail + 2, struct.pack("<H", q.avail_idx))

    def set_avail_flags(self, queue: int, flags: int) -> None:
        self.memory.write(self.queues[queue].avail, struct.pack("<H", flags))

    def set_used_event(self, queue: int, value: int) -> None:
        """EVENT_IDX: "interrupt me when used.idx passes ``value``" (2.7.10)."""
        self.memory.write(self.queues[queue].used_event_addr, struct.pack("<H", value & 0xFFFF))

    def avail_event(self, queue: int) -> int:
        """EVENT_IDX: the device's "notify me when avail.idx passes this" (2.7.10)."""
        return struct.unpack("<H", self.memory.read(self.queues[queue].avail_event_addr, 2))[0]

    def used_flags(self, queue: int) -> int:
        return struct.unpack("<H", self.memory.read(self.queues[queue].used, 2))[0]

    def used_idx(self, queue: int) -> int:
        return struct.unpack("<H", self.memory.read(self.queues[queue].used + 2, 2))[0]

    def start_indices_at(self, queue: int, value: int) -> None:
        """Test shortcut: move both sides' indices to ``value`` (as if ``value`` chains had
        gone through), so that 16-bit wrap-around is reached quickly.  Writes avail.idx and
        used.idx in memory, the driver's shadows and the device queue's ``next_avail`` /
        ``next_used``; call it after DRIVER_OK with nothing in flight."""
        q = self.queues[queue]
        value &= 0xFFFF
        q.avail_idx = q.last_used = q.last_kick = value
        self.memory.write(q.avail + 2, struct.pack("<H", value))
        self.memory.write(q.used + 2, struct.pack("<H", value))
        device_queue: SplitQueue = self.transport.queues[queue]
        device_queue.next_avail = device_queue.next_used = value

    # --- notifications and completions -------------------------------------------------------
    def notify(self, queue: int) -> None:
        """QueueNotify (4.2.3.3): processed synchronously by the transport."""
        self.write_reg(mmio.QUEUE_NOTIFY, queue)
        self.queues[queue].last_kick = self.queues[queue].avail_idx if queue < len(self.queues) else 0

    def kick(self, queue: int) -> bool:
        """Notify only if the device asked for it (EVENT_IDX avail_event, or the used ring's
        NO_NOTIFY flag without it), as Linux's virtqueue_kick_prepare(); returns whether it did."""
        q = self.queues[queue]
        if self.features & mmio.VIRTIO_F_RING_EVENT_IDX:
            wanted = need_event(self.avail_event(queue), q.avail_idx, q.last_kick)
        else:
            wanted = not self.used_flags(queue) & VIRTQ_USED_F_NO_NOTIFY
        if wanted:
            self.notify(queue)
        return wanted

    def used(self, queue: int) -> list[tuple[int, int]]:
        """The used elements (head, len) added since the last call; frees their descriptors."""
        q = self.queues[queue]
        new_idx = self.used_idx(queue)
        pending = (new_idx - q.last_used) & 0xFFFF
        if pending > q.size:
            raise AssertionError(f"used.idx moved by {pending}, more than the queue size {q.size}")
        entries = []
        for _ in range(pending):
            slot = q.used + 4 + 8 * (q.last_used % q.size)
            head, length = struct.unpack("<II", self.memory.read(slot, 8))
            entries.append((head, length))
            q.last_used = (q.last_used + 1) & 0xFFFF
            chain = q.chains.get(head)
            if chain is not None:
                q.free.extend(chain.descriptors)
        return entries

    def written(self, queue: int, head: int) -> bytes:
        """The device-writable buffers of the chain last posted at ``head``, concatenated."""
        return b"".join(self.writable_buffers(queue, head))

    def writable_buffers(self, queue: int, head: int) -> list[bytes]:
        chain = self.queues[queue].chains[head]
        return [self.memory.read(gpa, length) for gpa, length, writable in chain.buffers if writable]

    def request(self, queue: int, readable: list[bytes], writable: list[int], indirect: bool = False) -> tuple[int, bytes]:
        """Post one chain, notify, and return (used length, writable bytes) of its completion."""
        head = self.post(queue, readable, writable, indirect)
        self.notify(queue)
        completions = self.used(queue)
        matching = [length for used_head, length in completions if used_head == head]
        if len(matching) != 1:
            raise AssertionError(f"chain {head} was not completed exactly once: {completions}")
        return matching[0], self.written(queue, head)


def connect(device: VirtioDevice, memory: GuestMemory, ring_area_gpa: int = 0x1000, **kwargs: object) -> Driver:
    """A transport in front of ``device`` and a driver for it, with interrupts counted."""
    irq = InterruptLine()
    transport = VirtioMmioTransport(device, memory, irq)
    return Driver(transport, memory, ring_area_gpa, irq=irq, **kwargs)  # type: ignore[arg-type]


# --- a device that records what it is given -----------------------------------------------
class RecordingDevice(VirtioDevice):
    """Pops every available chain, records it, fills up to ``write_limit`` device-writable
    bytes with ``fill`` and completes it with the number of bytes written."""

    name = "recording"
    device_id = 0x7F

    def __init__(self, queue_sizes: tuple[int, ...] = (16,), fill: int = 0xA5, write_limit: int | None = None) -> None:
        super().__init__()
        self.queue_max_sizes = queue_sizes
        self.fill = fill
        self.write_limit = write_limit
        self.chains_seen: list[DescriptorChain] = []
        self.activations = 0

    def activate(self, memory: GuestMemory, queues: Sequence[SplitQueue], interrupt: VirtioInterrupt) -> None:
        super().activate(memory, queues, interrupt)
        self.activations += 1

    def process(self, queue_index: int) -> None:
        completed = 0
        for chain in self.chains(queue_index):
            self.chains_seen.append(chain)
            room = sum(b.len for b in chain.writable)
            if self.write_limit is not None:
                room = min(room, self.write_limit)
            written = chain.write_all(self.memory, bytes([self.fill]) * room)
            self.complete(queue_index, chain, written)
            completed += 1
        if completed:
            self.signal(queue_index)


# --- the chain-walk rules, again, in Python -------------------------------------------------
def _inside(memory: GuestMemory, gpa: int, length: int) -> bool:
    return any(r.gpa <= gpa and gpa + length <= r.end for r in memory.regions)


def reference_walk(
    memory: GuestMemory, desc_table: int, queue_size: int, head: int, indirect_ok: bool, max_out: int
) -> list[tuple[int, int, bool]] | str:
    """The buffers of the chain at ``head`` or the name of the rule it breaks (2.7.5, 2.7.5.3).

    Mirrors ``pykvm_chain_walk``: tables and non-empty buffers must lie inside guest RAM,
    at most ``size`` hops per table, NEXT inside the table, one level of indirection, an
    indirect descriptor without NEXT and with a non-zero length that is a multiple of 16,
    at most ``max_out`` buffers whose lengths add up to less than 2^32."""
    if head >= queue_size:
        return "bad head"
    if not _inside(memory, desc_table, 16 * queue_size):
        return "bad table"
    out: list[tuple[int, int, bool]] = []
    total = 0
    table, entries, index, in_indirect = desc_table, queue_size, head, False
    hops = 0
    while True:
        if hops >= entries:
            return "too long"
        hops += 1
        addr, length, flags, nxt = DESC.unpack(memory.read(table + 16 * index, 16))
        if flags & VIRTQ_DESC_F_INDIRECT:
            if in_indirect:
                return "nested indirect"
            if not indirect_ok:
                return "indirect not negotiated"
            if flags & VIRTQ_DESC_F_NEXT or length == 0 or length % 16:
                return "bad indirect"
            if not _inside(memory, addr, length):
                return "bad table"
            table, entries, index, in_indirect, hops = addr, length // 16, 0, True, 0
            continue
        if length and not _inside(memory, addr, length):
            return "bad buffer"
        if len(out) >= max_out:
            return "too many buffers"
        total += length
        if total > 0xFFFFFFFF:
            return "too large"
        out.append((addr, length, bool(flags & VIRTQ_DESC_F_WRITE)))
        if not flags & VIRTQ_DESC_F_NEXT:
            return out
        if nxt >= entries:
            return "bad next"
        index = nxt


@dataclass
class PopRecord:
    """One pop: the head the device read, the reference walk's verdict, and the C result."""

    head: int | None
    expected: list[tuple[int, int, bool]] | str | None
    got: list[tuple[int, int, bool]] | str | None
    in_c: bool = False  # taken by virtio-blk's C path, not popped


def _next_head(memory: GuestMemory, queue: SplitQueue) -> tuple[int | None, list[tuple[int, int, bool]] | str | None]:
    """The head the device takes next, and what the reference walk says of its chain (None, None
    when nothing is available or the available index is broken)."""
    try:
        if not queue.pending(memory):
            return None, None
    except QueueError:
        return None, None
    head = memory.read_u16(queue.avail_ring + 4 + 2 * (queue.next_avail % queue.size))
    return head, reference_walk(memory, queue.desc_table, queue.size, head, queue.indirect, queue.size)


@contextlib.contextmanager
def record_pops(transport: VirtioMmioTransport) -> Iterator[list[PopRecord]]:
    """Record every chain popped from the transport's queues (walked in C), and what the
    Python reference walk says about the same head at the same moment.

    A virtio-blk device serving plain requests in C (``pykvm_blk_serve``) takes chains without
    popping them: it is made to take one at a time, and each one it took is recorded with the
    reference walk's buffers (those it was given: what it wrote must lie inside them)."""
    records: list[PopRecord] = []
    originals = []
    for queue in transport.queues:
        original = queue.pop

        def pop(memory: GuestMemory, _queue: SplitQueue = queue, _original=original) -> DescriptorChain | None:
            head, expected = _next_head(memory, _queue)
            try:
                chain = _original(memory)
            except QueueError as err:
                records.append(PopRecord(head, expected, f"QueueError: {err}"))
                raise
            if chain is not None:
                records.append(PopRecord(chain.head, expected, [(b.gpa, b.len, b.writable) for b in chain.buffers]))
            return chain

        originals.append((queue, "pop", original))
        queue.pop = pop  # type: ignore[method-assign]
    plain = getattr(transport.device, "_plain", None)  # virtio-blk's requests served in C
    if plain is not None:
        serve = plain.serve

        def serve_one_at_a_time(queue: SplitQueue, limit: int, _serve=serve) -> int:
            served = 0
            while served < limit:
                head, expected = _next_head(transport.memory, queue)
                if not _serve(queue, 1):
                    break
                assert isinstance(expected, list), f"C served the chain at {head}, which the reference walk refuses"
                records.append(PopRecord(head, expected, [b for b in expected if b[1]], in_c=True))
                served += 1
            return served

        originals.append((plain, "serve", serve))
        plain.serve = serve_one_at_a_time
    try:
        yield records
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)
