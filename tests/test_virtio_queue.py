"""Split virtqueues (virtio 1.2 section 2.7), device side, against a driver in real guest memory.

Each test is named for the rule it checks.  Malformed input must end in
DEVICE_NEEDS_RESET (with a configuration change interrupt) and never in an exception
out of the transport: every notification here goes through ``transport.write``
exactly as a vCPU's MMIO exit or the I/O thread's ioeventfd would.
"""

from __future__ import annotations

import struct
import time
from typing import Iterator

import pytest

from pykvm.devices.virtio import mmio
from pykvm.devices.virtio.rng import MAX_REQUEST, VirtioRng
from pykvm.memory import GuestMemory
from pykvm.native import lib
from virtio_driver import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    Driver,
    RecordingDevice,
    connect,
)

MIB = 1 << 20
NO_INDIRECT = ~mmio.VIRTIO_F_INDIRECT_DESC
NO_EVENT_IDX = ~mmio.VIRTIO_F_RING_EVENT_IDX


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory([(0, 2 * MIB)]) as mem:
        yield mem


def recording(memory: GuestMemory, size: int = 16, accept: int = ~0, **kwargs: object) -> tuple[Driver, RecordingDevice]:
    device = RecordingDevice(queue_sizes=(size,), **kwargs)  # type: ignore[arg-type]
    driver = connect(device, memory)
    driver.negotiate(accept=accept)
    return driver, device


def assert_needs_reset(driver: Driver, device: RecordingDevice | None, reason: str) -> None:
    assert driver.reset_reasons and reason in driver.reset_reasons[0], driver.reset_reasons
    assert driver.status & mmio.DEVICE_NEEDS_RESET
    assert driver.interrupt_status() & mmio.INTERRUPT_CONFIG_CHANGE
    assert driver.transport.stats["needs_reset"] == 1
    if device is not None:
        assert device.chains_seen == []
    assert driver.used(0) == []


def post_raw(driver: Driver, head: int) -> None:
    driver.publish(0, head)
    driver.notify(0)


# --- chains (2.7.5) ------------------------------------------------------------------------------
def test_chain_buffers_follow_next_in_order_with_their_write_flags(memory: GuestMemory) -> None:
    driver, device = recording(memory)
    head = driver.post(0, [b"first", b"second!"], [3, 9])
    driver.notify(0)
    (chain,) = device.chains_seen
    posted = driver.queues[0].chains[head].buffers
    assert [(b.gpa, b.len, b.writable) for b in chain.buffers] == posted
    assert [b.len for b in chain.readable] == [5, 7] and [b.len for b in chain.writable] == [3, 9]
    assert b"".join(memory.read(b.gpa, b.len) for b in chain.readable) == b"firstsecond!"


def test_device_returns_the_head_index_in_the_used_ring(memory: GuestMemory) -> None:
    driver, _ = recording(memory)
    # scatter the chain over descriptors 5 -> 2 -> 9 (the driver may use any free ones)
    gpas = [driver.alloc(8) for _ in range(3)]
    driver.write_desc(0, 5, gpas[0], 8, VIRTQ_DESC_F_NEXT, 2)
    driver.write_desc(0, 2, gpas[1], 8, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 9)
    driver.write_desc(0, 9, gpas[2], 8, VIRTQ_DESC_F_WRITE)
    post_raw(driver, 5)
    assert driver.used(0) == [(5, 16)]


def test_used_length_is_the_number_of_bytes_actually_written(memory: GuestMemory) -> None:
    """2.7.8.1: the device MUST set len to the bytes it wrote (here fewer than offered)."""
    driver, _ = recording(memory, write_limit=10)
    length, data = driver.request(0, [b"in"], [4, 4, 4])
    assert length == 10
    assert data == b"\xa5" * 10 + b"\xee" * 2  # the rest is untouched


def test_chain_as_long_as_the_queue_is_accepted(memory: GuestMemory) -> None:
    driver, device = recording(memory, size=16)
    driver.post(0, [], [1] * 16)
    driver.notify(0)
    assert len(device.chains_seen[0].buffers) == 16 and driver.used(0) == [(0, 16)]


def test_zero_length_buffers_are_skipped_wherever_they_point(memory: GuestMemory) -> None:
    """A zero-length descriptor carries nothing: its address is never used (it may be anything)."""
    driver, device = recording(memory)
    good = driver.alloc(4)
    driver.post_buffers(0, [(1 << 50, 0, True), (good, 4, True), (2 * MIB, 0, True)])
    driver.notify(0)
    assert [(b.gpa, b.len) for b in device.chains_seen[0].buffers] == [(good, 4)]
    assert driver.used(0) == [(0, 4)] and not driver.status & mmio.DEVICE_NEEDS_RESET


# --- indirect descriptors (2.7.5.3) ---------------------------------------------------------------
def test_indirect_chain_when_indirect_desc_is_negotiated(memory: GuestMemory) -> None:
    driver, device = recording(memory)
    assert driver.features & mmio.VIRTIO_F_INDIRECT_DESC
    head = driver.post(0, [b"abc"], [2, 5], indirect=True)
    driver.notify(0)
    assert driver.used(0) == [(head, 7)]
    assert [(b.len, b.writable) for b in device.chains_seen[0].buffers] == [(3, False), (2, True), (5, True)]
    assert len(driver.queues[0].chains[head].descriptors) == 1  # one ring descriptor for the lot


def test_indirect_descriptor_without_the_feature_needs_reset(memory: GuestMemory) -> None:
    """2.7.5.3.1: the driver MUST NOT set INDIRECT unless VIRTIO_F_INDIRECT_DESC was negotiated."""
    driver, device = recording(memory, accept=NO_INDIRECT)
    driver.post(0, [b"x"], [1], indirect=True)
    driver.notify(0)
    assert_needs_reset(driver, device, "without VIRTIO_F_INDIRECT_DESC")


def test_indirect_descriptor_inside_an_indirect_table_needs_reset(memory: GuestMemory) -> None:
    """2.7.5.3.1: the driver MUST NOT set INDIRECT within an indirect table (one table per descriptor)."""
    driver, device = recording(memory)
    inner = driver.alloc(16)
    driver.write_desc_at(inner, 0, driver.alloc(4), 4, VIRTQ_DESC_F_WRITE)
    outer = driver.alloc(32)
    driver.write_desc_at(outer, 0, driver.alloc(4), 4, VIRTQ_DESC_F_NEXT, 1)
    driver.write_desc_at(outer, 1, inner, 16, VIRTQ_DESC_F_INDIRECT)
    driver.write_desc(0, 0, outer, 32, VIRTQ_DESC_F_INDIRECT)
    post_raw(driver, 0)
    assert_needs_reset(driver, device, "indirect descriptor inside an indirect table")


def test_indirect_descriptor_with_next_needs_reset(memory: GuestMemory) -> None:
    """2.7.5.3.1: the driver MUST NOT set both INDIRECT and NEXT."""
    driver, device = recording(memory)
    table = driver.alloc(16)
    driver.write_desc_at(table, 0, driver.alloc(4), 4, VIRTQ_DESC_F_WRITE)
    driver.write_desc(0, 0, table, 16, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, 1)
    driver.write_desc(0, 1, driver.alloc(4), 4, VIRTQ_DESC_F_WRITE)
    post_raw(driver, 0)
    assert_needs_reset(driver, device, "malformed indirect descriptor")


@pytest.mark.parametrize("length", [0, 8, 24, 17])
def test_indirect_table_length_not_a_positive_multiple_of_16_needs_reset(memory: GuestMemory, length: int) -> None:
    """2.7.5.3: an indirect table holds len/16 whole descriptors."""
    driver, device = recording(memory)
    table = driver.alloc(32)
    driver.write_desc_at(table, 0, driver.alloc(4), 4, VIRTQ_DESC_F_WRITE)
    driver.write_desc(0, 0, table, length, VIRTQ_DESC_F_INDIRECT)
    post_raw(driver, 0)
    assert_needs_reset(driver, device, "malformed indirect descriptor")


@pytest.mark.parametrize("where", [2 * MIB - 16, 2 * MIB, 1 << 48], ids=["straddles-end", "past-end", "far"])
def test_indirect_table_outside_memory_needs_reset(memory: GuestMemory, where: int) -> None:
    driver, device = recording(memory)
    driver.write_desc(0, 0, where, 32, VIRTQ_DESC_F_INDIRECT)
    post_raw(driver, 0)
    assert_needs_reset(driver, device, "descriptor table outside guest memory")


def test_indirect_table_longer_than_the_queue_needs_reset(memory: GuestMemory) -> None:
    """2.7.5.3.1 / 2.7.13.1: a chain (indirect ones too) MUST NOT be longer than the Queue Size."""
    driver, device = recording(memory, size=16)
    driver.post(0, [], [1] * 17, indirect=True)
    driver.notify(0)
    assert_needs_reset(driver, device, "too many buffers")


def test_loop_inside_an_indirect_table_needs_reset(memory: GuestMemory) -> None:
    driver, device = recording(memory)
    table = driver.alloc(32)
    driver.write_desc_at(table, 0, driver.alloc(4), 4, VIRTQ_DESC_F_NEXT, 1)
    driver.write_desc_at(table, 1, driver.alloc(4), 4, VIRTQ_DESC_F_NEXT, 0)
    driver.write_desc(0, 0, table, 32, VIRTQ_DESC_F_INDIRECT)
    post_raw(driver, 0)
    assert_needs_reset(driver, device, "longer than its table")


# --- hostile chains (2.7.5.2, 2.7.13.1) --------------------------------------------------------------
def test_descriptor_loop_needs_reset(memory: GuestMemory) -> None:
    """A chain whose NEXT links loop is longer than the queue: refused, the walk ends."""
    driver, device = recording(memory)
    gpa = driver.alloc(8)
    driver.write_desc(0, 0, gpa, 8, VIRTQ_DESC_F_NEXT, 1)
    driver.write_desc(0, 1, gpa, 8, VIRTQ_DESC_F_NEXT, 0)
    post_raw(driver, 0)
    assert_needs_reset(driver, device, "longer than its table")


def test_descriptor_pointing_to_itself_needs_reset(memory: GuestMemory) -> None:
    driver, device = recording(memory)
    driver.write_desc(0, 3, driver.alloc(8), 8, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 3)
    post_raw(driver, 3)
    assert_needs_reset(driver, device, "longer than its table")


def test_next_index_outside_the_table_needs_reset(memory: GuestMemory) -> None:
    driver, device = recording(memory, size=16)
    driver.write_desc(0, 0, driver.alloc(8), 8, VIRTQ_DESC_F_NEXT, 16)
    post_raw(driver, 0)
    assert_needs_reset(driver, device, "next index outside the table")


@pytest.mark.parametrize("head", [16, 0xFFFF])
def test_head_index_at_or_above_the_queue_size_needs_reset(memory: GuestMemory, head: int) -> None:
    driver, device = recording(memory, size=16)
    post_raw(driver, head)
    assert_needs_reset(driver, device, "head index outside the queue")


@pytest.mark.parametrize(
    "addr,length",
    [(2 * MIB, 1), (2 * MIB - 8, 16), (1 << 63, 4096), ((1 << 64) - 8, 16), (2 * MIB - 1, 0xFFFFFFFF)],
    ids=["past-end", "straddles-end", "high", "wraps-64-bits", "huge"],
)
def test_buffer_outside_guest_memory_needs_reset(memory: GuestMemory, addr: int, length: int) -> None:
    driver, device = recording(memory)
    driver.write_desc(0, 0, driver.alloc(4), 4, VIRTQ_DESC_F_NEXT, 1)
    driver.write_desc(0, 1, addr, length, VIRTQ_DESC_F_WRITE)
    post_raw(driver, 0)
    assert_needs_reset(driver, device, "buffer outside guest memory")


def test_buffer_ending_exactly_at_the_end_of_ram_is_accepted(memory: GuestMemory) -> None:
    driver, _ = recording(memory)
    driver.write_desc(0, 0, 2 * MIB - 64, 64, VIRTQ_DESC_F_WRITE)
    post_raw(driver, 0)
    assert driver.used(0) == [(0, 64)]
    assert memory.read(2 * MIB - 64, 64) == b"\xa5" * 64


def test_buffer_lengths_adding_past_4_gib_need_reset() -> None:
    """2.7.5.2: the driver MUST NOT add a chain longer than 2^32 bytes in total."""
    with GuestMemory([(0, 32 * MIB)]) as memory:
        driver, device = recording(memory, size=256)
        # 129 descriptors of 32 MiB - 1 MiB each, all inside RAM, add up past 2^32 - 1
        driver.post_buffers(0, [(MIB, 31 * MIB, False)] * 139, indirect=True)
        driver.notify(0)
        assert_needs_reset(driver, device, "add up past 4 GiB")


def test_avail_idx_moved_by_more_than_the_queue_size_needs_reset(memory: GuestMemory) -> None:
    """2.7.6: the available ring holds at most Queue Size entries the device has not seen."""
    driver, device = recording(memory, size=16)
    driver.write_desc(0, 0, driver.alloc(4), 4, VIRTQ_DESC_F_WRITE)
    driver.set_avail_idx(0, 17)
    driver.notify(0)
    assert_needs_reset(driver, device, "available index moved by 17")


def test_avail_idx_moved_by_exactly_the_queue_size_is_accepted(memory: GuestMemory) -> None:
    driver, device = recording(memory, size=16)
    heads = [driver.post(0, [], [1]) for _ in range(16)]
    driver.notify(0)
    assert [head for head, _ in driver.used(0)] == heads and not driver.status & mmio.DEVICE_NEEDS_RESET


def test_host_never_raises_and_recovers_after_reset(memory: GuestMemory) -> None:
    driver, device = recording(memory)
    post_raw(driver, 99)  # bad head
    post_raw(driver, 98)  # ignored: the device needs a reset
    assert driver.transport.stats["ignored_notifications"] == 1
    driver.negotiate()
    assert driver.request(0, [b"ok"], [2]) == (2, b"\xa5\xa5")


# --- 16-bit indices (2.7.6, 2.7.8) ---------------------------------------------------------------------
def test_indices_wrap_at_16_bits(memory: GuestMemory) -> None:
    """The indices are free-running 16-bit counters; ring slots are index mod Queue Size."""
    driver, _ = recording(memory, size=8)
    driver.start_indices_at(0, 65531)
    seen = []
    for batch in range(3):
        heads = [driver.post(0, [bytes([batch, i])], [i + 1]) for i in range(4)]
        driver.notify(0)
        used = driver.used(0)
        assert [head for head, _ in used] == heads
        assert [length for _, length in used] == [1, 2, 3, 4]
        seen.append(driver.used_idx(0))
    assert seen == [65535, 3, 7]
    assert driver.transport.queues[0].next_avail == 7 and not driver.status & mmio.DEVICE_NEEDS_RESET


def test_indices_wrap_through_65536_real_requests(memory: GuestMemory) -> None:
    """The same wrap reached the honest way: 65540 chains through a 256-entry queue."""
    driver, device = recording(memory, size=256)
    started = time.monotonic()
    total = 0
    while total < 65540:
        count = min(256, 65540 - total)
        for _ in range(count):
            driver.post(0, [], [1])
        driver.notify(0)
        assert len(driver.used(0)) == count
        total += count
    assert driver.used_idx(0) == 65540 % 65536 == 4
    assert driver.transport.queues[0].next_avail == 4 and len(device.chains_seen) == 65540
    assert time.monotonic() - started < 60


# --- notification suppression (2.7.7, 2.7.10) -----------------------------------------------------------
def test_no_interrupt_flag_suppresses_interrupts_without_event_idx(memory: GuestMemory) -> None:
    """2.7.7.2: without EVENT_IDX, flags = VIRTQ_AVAIL_F_NO_INTERRUPT: the device SHOULD NOT interrupt."""
    driver, _ = recording(memory, accept=NO_EVENT_IDX)
    driver.set_avail_flags(0, VIRTQ_AVAIL_F_NO_INTERRUPT)
    driver.request(0, [], [1])
    assert driver.interrupts == 0
    driver.set_avail_flags(0, 0)
    driver.request(0, [], [1])
    assert driver.interrupts == 1  # flags 0: the device MUST interrupt


def test_event_idx_device_ignores_the_no_interrupt_flag(memory: GuestMemory) -> None:
    """2.7.7.2: with EVENT_IDX the device MUST ignore the lower bit of flags."""
    driver, _ = recording(memory)
    driver.set_avail_flags(0, VIRTQ_AVAIL_F_NO_INTERRUPT)
    driver.request(0, [], [1])
    assert driver.interrupts == 1


def test_event_idx_device_interrupts_only_when_used_idx_passes_used_event(memory: GuestMemory) -> None:
    """2.7.7.2 / 2.7.10: with EVENT_IDX, interrupt only when used.idx moves past used_event."""
    driver, _ = recording(memory)
    driver.request(0, [], [1])  # used.idx 0 -> 1: the first interrupt is always sent
    assert driver.interrupts == 1
    driver.set_used_event(0, 3)  # "interrupt me once used ring entry 3 is written", i.e. used.idx 3 -> 4
    for expected in (1, 1, 2):  # used.idx -> 2, 3, 4
        driver.request(0, [], [1])
        assert driver.interrupts == expected
    driver.set_used_event(0, 10)
    driver.request(0, [], [1])  # used.idx -> 5 does not pass 10
    assert driver.interrupts == 2


def test_event_idx_one_interrupt_for_a_batch_that_passes_used_event(memory: GuestMemory) -> None:
    driver, _ = recording(memory)
    driver.set_used_event(0, 1)
    for _ in range(4):
        driver.post(0, [], [1])
    driver.notify(0)  # used.idx 0 -> 4 in one go
    assert driver.interrupts == 1 and len(driver.used(0)) == 4


def test_event_idx_device_publishes_avail_event(memory: GuestMemory) -> None:
    """2.7.10: the device writes avail_event; the driver notifies only when avail.idx passes it."""
    driver, _ = recording(memory)
    assert driver.avail_event(0) == 0
    for _ in range(3):
        driver.post(0, [], [1])
    assert driver.kick(0)  # avail.idx 0 -> 3 passes avail_event 0
    assert driver.avail_event(0) == 3  # "notify me when you add the 4th"
    assert driver.used(0) == [(0, 1), (1, 1), (2, 1)]
    driver.post(0, [], [1])
    assert driver.kick(0)


def test_event_idx_driver_may_skip_notifications_the_device_did_not_ask_for(memory: GuestMemory) -> None:
    driver, _ = recording(memory)
    driver.post(0, [], [1])
    driver.kick(0)
    driver.post(0, [], [1])
    # pretend the device's avail_event was far ahead: the driver does not notify...
    driver.memory.write(driver.queues[0].avail_event_addr, struct.pack("<H", 100))
    assert not driver.kick(0)
    assert driver.used(0) == [(0, 1)]  # ...so the second chain waits
    driver.notify(0)
    assert driver.used(0) == [(1, 1)]


def test_no_interrupt_when_nothing_was_used(memory: GuestMemory) -> None:
    """A notification with nothing available produces no used buffer and no interrupt."""
    driver = connect(VirtioRng(), memory)
    driver.negotiate(accept=NO_EVENT_IDX)
    driver.notify(0)
    assert driver.interrupts == 0 and driver.interrupt_status() == 0


# --- rng as a second device on the same rules -------------------------------------------------------
def test_rng_request_is_bounded_and_used_length_is_what_it_wrote(memory: GuestMemory) -> None:
    driver = connect(VirtioRng(source=lambda n: bytes(range(256)) * (n // 256) + bytes(range(n % 256))), memory)
    driver.negotiate()
    length, data = driver.request(0, [], [MAX_REQUEST, 4096])
    assert length == MAX_REQUEST
    assert data[:256] == bytes(range(256)) and data[MAX_REQUEST:] == b"\xee" * 4096


def test_chain_walk_error_codes_can_never_be_mistaken_for_an_errno() -> None:
    codes = [getattr(lib, name) for name in dir(lib) if name.startswith("PYKVM_CHAIN_")]
    assert len(codes) == 10 and all(code < -4095 for code in codes)  # Linux's MAX_ERRNO is 4095
