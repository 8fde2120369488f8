"""Property tests (hypothesis): random and malformed rings never hurt the host.

Guest memory is small (2 MiB) so random addresses hit its edges, and is filled with a
canary pattern before the device runs.  For every example:

- the device never raises out of the transport (every notification goes through
  ``transport.write`` as a vCPU's MMIO exit would);
- every byte that changed lies in the used ring or in a device-writable buffer of a
  chain the device popped (as the C walker returned it): nothing else is touched;
- the C walker agrees with :func:`virtio_driver.reference_walk` on every chain, and a
  chain it refuses ends in DEVICE_NEEDS_RESET;
- completed chains have a sensible used length (rng: what it wrote; blk: data + status
  and a valid status byte), or the device asked for a reset.

virtio-blk is also checked against a model of the disk: random request sequences
(valid and not) must give the model's status, data and image contents.
"""

from __future__ import annotations

import atexit
import os
import struct
import tempfile
from typing import Iterable

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from pykvm.devices.virtio import mmio
from pykvm.devices.virtio.blk import (
    MAX_REQUEST_BYTES,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    VirtioBlock,
)
from pykvm.devices.virtio.console import VirtioConsole
from pykvm.devices.virtio.rng import MAX_REQUEST, VirtioRng
from pykvm.memory import GuestMemory
from virtio_driver import DESC, PopRecord, connect, record_pops

MEM = 2 << 20
CANARY = bytes([0xC3, 0x3C, 0x5A, 0xA5]) * (MEM // 4)
RING_AREA = 0x1000
INDIRECT_TABLE = 0x10000  # where generated indirect tables go
HEADERS = 0x11000  # prepared virtio-blk request headers
BUFFERS = 0x12000
FILL = 0xFF  # what the rng writes: not in the canary, so every write shows
IMAGE_SECTORS = 64
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# virtio-blk request headers the random rings may point at (written by _headers).
BLK_HEADER_REQUESTS = [(VIRTIO_BLK_T_IN, 0), (VIRTIO_BLK_T_OUT, 1), (VIRTIO_BLK_T_GET_ID, 0),
                       (VIRTIO_BLK_T_IN, IMAGE_SECTORS - 1), (VIRTIO_BLK_T_FLUSH, 0)]  # fmt: skip
BLK_HEADERS = [HEADERS + 16 * i for i in range(len(BLK_HEADER_REQUESTS))]

_C_MESSAGES = {
    "bad head": "head index outside the queue",
    "bad table": "descriptor table outside guest memory",
    "bad buffer": "buffer outside guest memory",
    "too long": "chain longer than its table",
    "bad next": "next index outside the table",
    "nested indirect": "indirect descriptor inside an indirect table",
    "bad indirect": "malformed indirect descriptor",
    "too many buffers": "too many buffers",
    "too large": "buffer lengths add up past 4 GiB",
    "indirect not negotiated": "indirect descriptor without VIRTIO_F_INDIRECT_DESC",
}

_memory: GuestMemory | None = None
_image_dir = tempfile.TemporaryDirectory(prefix="pykvm-virtio-")
atexit.register(_image_dir.cleanup)


def fresh_memory() -> GuestMemory:
    """The shared 2 MiB guest memory, refilled with the canary."""
    global _memory
    if _memory is None:
        _memory = GuestMemory([(0, MEM)])
    _memory.write(0, CANARY)
    return _memory


def fresh_image(name: str = "disk.img") -> str:
    path = os.path.join(_image_dir.name, name)
    with open(path, "wb") as f:
        f.write(bytes(i % 253 for i in range(IMAGE_SECTORS * 512)))
    return path


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# --- checking one run -------------------------------------------------------------------------------
def changed_ranges(before: bytes, after: bytes, page: int = 4096) -> Iterable[tuple[int, int]]:
    """(start, end) of every run of bytes that differ."""
    start = None
    for base in range(0, len(before), page):
        if before[base : base + page] == after[base : base + page]:
            if start is not None:
                yield start, base
                start = None
            continue
        for i in range(base, min(base + page, len(before))):
            if before[i] != after[i]:
                if start is None:
                    start = i
            elif start is not None:
                yield start, i
                start = None
    if start is not None:
        yield start, len(before)


def allowed_writes(driver, records: list[PopRecord]) -> list[tuple[int, int]]:  # type: ignore[no-untyped-def]
    areas = [(q.used, q.end) for q in driver.queues]  # the used rings, with avail_event
    for record in records:
        if isinstance(record.got, list):
            areas.extend((gpa, gpa + length) for gpa, length, writable in record.got if writable)
    return areas


def check_run(driver, before: bytes, records: list[PopRecord]) -> None:  # type: ignore[no-untyped-def]
    after = driver.memory.read(0, MEM)
    areas = allowed_writes(driver, records)
    for start, end in changed_ranges(before, after):
        position = start
        while position < end:  # every changed byte must be covered by some allowed area
            covering = [a_end for a_start, a_end in areas if a_start <= position < a_end]
            assert covering, f"the device wrote at {position:#x}, outside every buffer it was given"
            position = max(covering)
    refused = False
    for record in records:
        if isinstance(record.expected, list):
            assert record.got == [b for b in record.expected if b[1]], record
        elif isinstance(record.expected, str):
            assert isinstance(record.got, str) and _C_MESSAGES[record.expected] in record.got, record
            refused = True
        else:
            assert isinstance(record.got, str) and "available index moved" in record.got, record
            refused = True
    completed = sum(isinstance(r.got, list) for r in records)
    event(f"chains completed: {min(completed, 3)}{'+' if completed > 3 else ''}")
    event("device needs reset" if refused else "no reset")
    for record in records:
        if isinstance(record.expected, str):
            event(f"refused: {record.expected}")
    if refused:
        assert driver.status & mmio.DEVICE_NEEDS_RESET
        assert driver.interrupt_status() & mmio.INTERRUPT_CONFIG_CHANGE


# --- strategies --------------------------------------------------------------------------------------
QUEUE_SIZES = st.sampled_from([1, 2, 4, 8, 16])
FEATURE_CHOICES = st.sampled_from([
    ~0,
    ~mmio.VIRTIO_F_INDIRECT_DESC,
    ~mmio.VIRTIO_F_RING_EVENT_IDX,
    ~(mmio.VIRTIO_F_INDIRECT_DESC | mmio.VIRTIO_F_RING_EVENT_IDX),
])  # fmt: skip
INSIDE = st.integers(BUFFERS, MEM - 8192)  # plausible buffers, comfortably inside RAM
ADDRESSES = st.one_of(
    INSIDE, INSIDE, INSIDE,
    st.integers(MEM - 64, MEM + 64),  # around the end of RAM
    st.sampled_from([0, RING_AREA, INDIRECT_TABLE, HEADERS, HEADERS + 16, HEADERS + 32, HEADERS + 48]),
    st.sampled_from([2**32 - 1, 2**63, 2**64 - 16]),
    st.integers(0, 2**64 - 1),
)  # fmt: skip
LENGTHS = st.one_of(
    st.integers(0, 64), st.integers(1, 64), st.integers(0, 8192), st.integers(1, 8192),
    st.sampled_from([0, 1, 16, 512, 4096, MEM, 2**31, 2**32 - 1]),
    st.integers(0, 2**32 - 1),
)  # fmt: skip
FLAGS = st.one_of(st.sampled_from([0, 1, 2, 3]), st.sampled_from([0, 1, 2, 3]), st.integers(0, 7), st.integers(0, 0xFFFF))


def _index(size: int) -> st.SearchStrategy[int]:
    """Mostly inside the table, sometimes just past it."""
    inside = st.integers(0, size - 1)
    return st.one_of(inside, inside, inside, st.integers(0, size + 1))


def descriptor(size: int, header: bool = False) -> st.SearchStrategy[tuple[int, int, int, int]]:
    """A descriptor: mostly plausible (so chains get through and the device writes), else hostile;
    with ``header``, also virtio-blk request headers (prepared by :func:`_headers`) that go on."""
    # NEXT on a third of them: in a small table, following random NEXT links soon loops
    flags = st.sampled_from([0, 2, 0, 2, 1, 3])
    plausible = st.tuples(INSIDE, st.integers(1, 4096), flags, st.integers(0, size - 1))
    to_indirect_table = st.tuples(st.just(INDIRECT_TABLE), st.sampled_from([16, 32, 64, 128]), st.just(4), st.just(0))
    hostile = st.tuples(ADDRESSES, LENGTHS, FLAGS, _index(size))
    choices = [plausible, plausible, plausible, plausible, to_indirect_table, hostile]
    if header:  # a request header that goes on, data in whole sectors (or with the status byte), a status byte
        index = st.integers(0, size - 1)
        choices += [
            st.tuples(st.sampled_from(BLK_HEADERS), st.just(16), st.just(1), index),
            st.tuples(INSIDE, st.sampled_from([512, 1024, 4096, 513, 4097]), st.sampled_from([1, 3, 2]), index),
            st.tuples(INSIDE, st.just(1), st.just(2), index),
        ] * 2
    return st.one_of(*choices)


@st.composite
def random_ring(draw, headers: bool = False):  # type: ignore[no-untyped-def]
    """A random descriptor table, a random indirect table and an available ring."""
    size = draw(QUEUE_SIZES)
    table = draw(st.lists(descriptor(size, headers), min_size=size, max_size=size))
    indirect = draw(st.lists(descriptor(8, headers), min_size=8, max_size=8))
    fits = st.lists(_index(size), min_size=1, max_size=size)
    heads = draw(st.one_of(fits, fits, fits, st.lists(_index(size), max_size=size + 1)))
    avail_idx = draw(st.one_of(st.just(len(heads)), st.just(len(heads)), st.just(len(heads)), st.integers(0, 0xFFFF)))
    return size, table, indirect, heads, avail_idx, draw(FEATURE_CHOICES)


def run_random_ring(device, ring, prepare=None):  # type: ignore[no-untyped-def]
    """Put the random ring in front of ``device`` and notify every queue; returns the driver."""
    size, table, indirect, heads, avail_idx, accept = ring
    memory = fresh_memory()
    driver = connect(device, memory, RING_AREA, buffer_area=(BUFFERS, MEM - BUFFERS))
    driver.negotiate(accept=accept, queue_sizes={i: size for i in range(len(device.queue_max_sizes))})
    for i, entry in enumerate(indirect):
        driver.write_desc_at(INDIRECT_TABLE, i, *entry)
    if prepare is not None:
        prepare(memory)
    for queue in range(len(driver.queues)):
        for i, entry in enumerate(table):
            driver.write_desc(queue, i, *entry)
        for head in heads:
            driver.publish(queue, head)
        driver.set_avail_idx(queue, avail_idx)
    before = memory.read(0, MEM)
    with record_pops(driver.transport) as records:
        for queue in range(len(driver.queues)):
            driver.notify(queue)  # must not raise, whatever the ring holds
    check_run(driver, before, records)
    return driver, records


# --- rng ------------------------------------------------------------------------------------------------
@SETTINGS
@given(random_ring())
def test_rng_random_rings_never_hurt_the_host(ring) -> None:  # type: ignore[no-untyped-def]
    driver, records = run_random_ring(VirtioRng(lambda n: bytes([FILL]) * n), ring)
    completed = [r for r in records if isinstance(r.got, list)]
    if any(gpa < INDIRECT_TABLE and gpa + size > RING_AREA for r in completed for gpa, size, writable in r.got
           if writable):  # fmt: skip
        event("a buffer over the rings themselves: the device wrote there, as the guest asked")
        return
    lengths = {r.head: sum(b[1] for b in r.got if b[2]) for r in completed}
    for head, length in driver.used(0):
        assert length == min(lengths[head], MAX_REQUEST)


@st.composite
def driver_chains(draw):  # type: ignore[no-untyped-def]
    """Chains the driver builds properly, some then broken in one place."""
    chains = draw(st.lists(
        st.tuples(
            st.lists(st.integers(1, 300), max_size=3),  # readable sizes
            st.lists(st.integers(0, 70_000), max_size=3),  # writable sizes
            st.booleans(),  # indirect
        ).filter(lambda c: c[0] or c[1]),
        min_size=1, max_size=6,
    ))  # fmt: skip
    breakage = draw(st.one_of(st.none(), st.tuples(st.integers(0, 5), descriptor(16))))
    return chains, breakage, draw(FEATURE_CHOICES)


@SETTINGS
@given(driver_chains())
def test_rng_driver_built_chains_with_one_broken_descriptor(case) -> None:  # type: ignore[no-untyped-def]
    chains, breakage, accept = case
    memory = fresh_memory()
    driver = connect(VirtioRng(lambda n: bytes([FILL]) * n), memory, RING_AREA, buffer_area=(BUFFERS, MEM - BUFFERS))
    driver.negotiate(accept=accept, queue_sizes={0: 16})
    heads = []
    for readable, writable, indirect in chains:
        indirect = indirect and bool(accept & mmio.VIRTIO_F_INDIRECT_DESC)
        assume(len(driver.queues[0].free) >= (1 if indirect else len(readable) + len(writable)))
        heads.append(driver.post(0, [bytes(n) for n in readable], writable, indirect))
    if breakage is not None:
        index, entry = breakage
        driver.write_desc(0, index, *entry)
    before = memory.read(0, MEM)
    with record_pops(driver.transport) as records:
        driver.notify(0)
    check_run(driver, before, records)
    if breakage is None:
        assert [head for head, _ in driver.used(0)] == heads


# --- console -------------------------------------------------------------------------------------------
@SETTINGS
@given(random_ring(), st.binary(max_size=3000))
def test_console_random_rings_never_hurt_the_host(ring, host_input: bytes) -> None:  # type: ignore[no-untyped-def]
    output: list[bytes] = []
    device = VirtioConsole(output.append)
    driver, records = run_random_ring(device, ring)
    before = driver.memory.read(0, MEM)
    with record_pops(driver.transport) as more:
        device.receive(host_input)  # the host-input path, on the same hostile rings
    check_run(driver, before, more)
    delivered = sum(length for head, length in driver.used(0))
    assert delivered + device.pending_input >= len(host_input)  # nothing dropped


# --- blk: random rings ------------------------------------------------------------------------------------
def _headers(memory: GuestMemory) -> None:
    for gpa, (kind, sector) in zip(BLK_HEADERS, BLK_HEADER_REQUESTS):
        memory.write(gpa, struct.pack("<IIQ", kind, 0, sector))


# Both ways of serving IN, OUT and FLUSH: in C (pykvm_blk_serve), and in Python (the reference).
BLK_PATHS = pytest.mark.parametrize("fast_path", [True, False], ids=["C", "Python"])


@BLK_PATHS
@SETTINGS
@given(ring=random_ring(headers=True), read_only=st.booleans())
def test_blk_random_rings_never_hurt_the_host(ring, read_only, fast_path) -> None:  # type: ignore[no-untyped-def]
    path = fresh_image()
    device = VirtioBlock(path, read_only=read_only, fast_path=fast_path)
    try:
        driver, records = run_random_ring(device, ring, prepare=_headers)
        in_c = sum(record.in_c for record in records)
        event(f"chains served in C: {min(in_c, 3)}{'+' if in_c > 3 else ''}")
        popped = {r.head: r.got for r in records if isinstance(r.got, list)}
        for head, length in driver.used(0):
            buffers = popped[head]
            writable = sum(b[1] for b in buffers if b[2])
            if length:  # a status byte was written: it is the last byte of the last buffer
                gpa, size, is_writable = buffers[-1]
                assert is_writable and 1 <= length <= writable
                assert driver.memory.read(gpa + size - 1, 1)[0] in (VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP)
            else:
                assert not buffers or not buffers[-1][2]
        assert os.path.getsize(path) == IMAGE_SECTORS * 512
        if read_only:
            assert _read(path) == bytes(i % 253 for i in range(IMAGE_SECTORS * 512))
    finally:
        device.close()


# --- blk: request sequences against a model of the disk ----------------------------------------------------------
SECTOR_CHOICES = st.one_of(st.integers(0, IMAGE_SECTORS + 2), st.sampled_from([2**32, 2**63, 2**64 - 1]))


@st.composite
def blk_request(draw):  # type: ignore[no-untyped-def]
    kind = draw(st.sampled_from([
        VIRTIO_BLK_T_IN, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH,
        VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES, 2, 0xFFFFFFFF,
    ]))  # fmt: skip
    sector = draw(SECTOR_CHOICES)
    length = draw(st.one_of(st.integers(0, 8).map(lambda n: n * 512), st.integers(0, 5000)))
    segment = (draw(SECTOR_CHOICES), draw(st.integers(0, 16)), draw(st.sampled_from([0, 0, 1, 2])))
    pieces = draw(st.integers(1, 3))  # how many descriptors the data is cut into
    merge = draw(st.booleans())  # header and data / data and status share descriptors
    indirect = draw(st.booleans())
    seed = draw(st.integers(0, 255))
    return kind, sector, length, segment, pieces, merge, indirect, seed


def _cut(data: bytes, pieces: int) -> list[bytes]:
    step = max(1, -(-len(data) // pieces))
    return [data[i : i + step] for i in range(0, len(data), step)] or []


def model(disk: bytearray, unknown: bytearray, read_only: bool, serial: bytes, req) -> tuple[int, bytes]:  # type: ignore[no-untyped-def]
    """The expected (status, data read) of ``req``; updates the model disk."""
    kind, sector, length, (seg_sector, seg_count, seg_flags), *_ = req
    capacity = len(disk) // 512
    in_range = sector <= capacity and length // 512 <= capacity - sector
    if kind == VIRTIO_BLK_T_IN:
        if length % 512 or length > MAX_REQUEST_BYTES or not in_range:
            return VIRTIO_BLK_S_IOERR, b""
        return VIRTIO_BLK_S_OK, bytes(disk[sector * 512 : sector * 512 + length])
    if kind == VIRTIO_BLK_T_OUT:
        if read_only or length % 512 or not in_range:
            return VIRTIO_BLK_S_IOERR, b""
        disk[sector * 512 : sector * 512 + length] = _pattern(req)
        unknown[sector * 512 : sector * 512 + length] = bytes(length)
        return VIRTIO_BLK_S_OK, b""
    if kind == VIRTIO_BLK_T_FLUSH:
        return VIRTIO_BLK_S_OK, b""
    if kind == VIRTIO_BLK_T_GET_ID:
        return VIRTIO_BLK_S_OK, serial[: min(20, length)]
    if kind in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
        zero = kind == VIRTIO_BLK_T_WRITE_ZEROES
        if read_only:
            return VIRTIO_BLK_S_UNSUPP, b""  # not offered, so not negotiated
        if seg_flags & ~1 or (not zero and seg_flags):
            return VIRTIO_BLK_S_UNSUPP, b""
        if seg_sector > capacity or seg_count > capacity - seg_sector:
            return VIRTIO_BLK_S_IOERR, b""
        start, end = seg_sector * 512, (seg_sector + seg_count) * 512
        if zero:
            disk[start:end] = bytes(end - start)
            unknown[start:end] = bytes(end - start)
        else:
            unknown[start:end] = b"\x01" * (end - start)  # 5.2.6.1: nothing may be assumed after a discard
        return VIRTIO_BLK_S_OK, b""
    return VIRTIO_BLK_S_UNSUPP, b""


def _pattern(req) -> bytes:  # type: ignore[no-untyped-def]
    seed, length = req[7], req[2]
    return bytes((seed + i * 13) % 256 for i in range(length))


def post_blk(driver, req) -> int:  # type: ignore[no-untyped-def]
    kind, sector, length, segment, pieces, merge, indirect, _ = req
    head_bytes = struct.pack("<IIQ", kind, 0, sector)
    if kind in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
        out, in_len = struct.pack("<QII", *segment), 0
    elif kind == VIRTIO_BLK_T_OUT:
        out, in_len = _pattern(req), 0
    elif kind == VIRTIO_BLK_T_FLUSH:
        out, in_len = b"", 0
    else:
        out, in_len = b"", length
    readable = [head_bytes + out] if merge else [head_bytes, *_cut(out, pieces)]
    writable = [in_len + 1] if merge else [*(len(p) for p in _cut(bytes(in_len), pieces)), 1]
    return driver.post(0, readable, writable, indirect)


@BLK_PATHS
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests=st.lists(blk_request(), min_size=1, max_size=12), read_only=st.booleans())
def test_blk_request_sequences_match_a_model_of_the_disk(requests, read_only, fast_path) -> None:  # type: ignore[no-untyped-def]
    path = fresh_image("model.img")
    disk = bytearray(_read(path))
    unknown = bytearray(len(disk))  # 1 where a discard left the contents undefined
    device = VirtioBlock(path, read_only=read_only, fast_path=fast_path)
    try:
        memory = fresh_memory()
        driver = connect(device, memory, RING_AREA, buffer_area=(BUFFERS, MEM - BUFFERS))
        driver.negotiate()
        assert bool(driver.features & VIRTIO_BLK_F_RO) == read_only
        for req in requests:
            head = post_blk(driver, req)
            before = memory.read(0, MEM)
            with record_pops(driver.transport) as records:
                driver.notify(0)
            check_run(driver, before, records)
            ((used_head, used_length),) = driver.used(0)
            written = driver.written(0, head)
            status, data = model(disk, unknown, read_only, device.serial, req)
            event(f"request type {req[0]}: status {status}")
            assert (used_head, written[-1]) == (head, status), req
            assert used_length == len(data) + 1, req
            if req[0] == VIRTIO_BLK_T_IN:  # bytes a discard left undefined may read as anything
                start = req[1] * 512
                defined = [u == 0 for u in unknown[start : start + len(data)]]
                assert all(w == d or not k for w, d, k in zip(written, data, defined)), req
            else:
                assert written[: len(data)] == data, req
        assert not driver.status & mmio.DEVICE_NEEDS_RESET
        actual = _read(path)
        assert all(a == b or u for a, b, u in zip(actual, disk, unknown))
    finally:
        device.close()


@BLK_PATHS
@SETTINGS
@given(requests=st.lists(blk_request(), min_size=1, max_size=5), breakage=st.one_of(st.none(), st.tuples(
    st.integers(0, 15), descriptor(16, header=True))), accept=FEATURE_CHOICES)  # fmt: skip
def test_blk_driver_built_requests_with_one_broken_descriptor(requests, breakage, accept, fast_path) -> None:  # type: ignore[no-untyped-def]
    """Requests as a driver builds them, each layout of 2.6.4, then one descriptor overwritten."""
    path = fresh_image()
    device = VirtioBlock(path, fast_path=fast_path)
    try:
        memory = fresh_memory()
        driver = connect(device, memory, RING_AREA, buffer_area=(BUFFERS, MEM - BUFFERS))
        driver.negotiate(accept=accept, queue_sizes={0: 16})
        heads = []
        for req in requests:
            indirect = req[6] and bool(accept & mmio.VIRTIO_F_INDIRECT_DESC)
            assume(len(driver.queues[0].free) >= (1 if indirect else 8))
            heads.append(post_blk(driver, req[:6] + (indirect,) + req[7:]))
        if breakage is not None:
            driver.write_desc(0, *breakage[:1], *breakage[1])
        before = memory.read(0, MEM)
        with record_pops(driver.transport) as records:
            driver.notify(0)
        check_run(driver, before, records)
        in_c = sum(record.in_c for record in records)
        event(f"requests served in C: {min(in_c, 3)}{'+' if in_c > 3 else ''}")
        if breakage is None:
            assert [head for head, _ in driver.used(0)] == heads
        assert os.path.getsize(path) == IMAGE_SECTORS * 512
    finally:
        device.close()


def test_descriptor_struct_matches_the_spec() -> None:
    """struct virtq_desc (2.7.5): le64 addr, le32 len, le16 flags, le16 next."""
    assert DESC.size == 16 and DESC.pack(1, 2, 3, 4) == bytes([1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 3, 0, 4, 0])
