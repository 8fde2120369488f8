"""The migration stream without KVM: URIs, the records, and a receiver that hostile input cannot hurt.

The receiver (:func:`pykvm.migration.destination.receive_records`) is fed streams made by the
source's own writer, then damaged ones and random ones (hypothesis): it must put exactly the
sent pages into guest memory, and for anything else raise one :class:`MigrationError` whose
message is one line, touch nothing outside guest RAM (which is small here, so that random
addresses hit its edges) and never allocate by a size the stream chose.
"""

from __future__ import annotations

import io
import os
import socket
import struct
import tracemalloc
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pykvm.errors import ConfigError, MigrationError
from pykvm.kvm.dirty_bitmap import DirtyBitmap, bitmap_size
from pykvm.memory import GuestMemory
from pykvm.migration.destination import receive_records, state_bound
from pykvm.migration.dirty import Dirty, page_runs
from pykvm.migration.pages import PageSender
from pykvm.migration.uri import Listener, connect, parse
from pykvm.migration.wire import PAGE_SIZE, RECORD, RECORD_PAGES, Kind, StreamReader, StreamWriter, check_proof, proof

MIB = 1 << 20
RAM = 2 * MIB
STATE = b'{"a machine state": true}'
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Collect:
    """A channel that keeps what the writer sends."""

    peer = "the test"

    def __init__(self) -> None:
        self.data = bytearray()

    def send(self, *parts: bytes) -> None:
        for part in parts:
            self.data += part


def write_stream(pages: dict[int, bytes], zeros: list[tuple[int, int]] = (), state: bytes = STATE) -> bytes:
    """A stream as the source writes it: the pages (address -> data), the zero runs, the state, the end."""
    channel = Collect()
    writer = StreamWriter(channel, None)  # type: ignore[arg-type]
    for gpa, data in pages.items():
        writer.pages(gpa, data)
    for gpa, count in zeros:
        writer.zero(gpa, count)
    writer.state(state)
    writer.end()
    return bytes(channel.data)


def receive(stream: bytes, memory: GuestMemory, max_state: int = 4096) -> bytes:
    return receive_records(StreamReader(io.BytesIO(stream).readinto, "the source"), memory, max_state)


@pytest.fixture
def memory():
    with GuestMemory([(0, RAM)]) as mem:
        yield mem


def page(byte: int, count: int = 1) -> bytes:
    return bytes([byte]) * PAGE_SIZE * count


def test_a_stream_puts_exactly_its_pages_into_guest_memory_and_hands_back_the_state(memory) -> None:
    memory.write(0x5000, page(0x77))  # a page the stream says is zero now
    stream = write_stream({0x1000: page(0xAB), 0x10000: page(0xCD, 3)}, zeros=[(0x5000, 1)])
    assert receive(stream, memory) == STATE
    assert memory.read(0x1000, PAGE_SIZE) == page(0xAB)
    assert memory.read(0x10000, 3 * PAGE_SIZE) == page(0xCD, 3)
    assert memory.read(0x5000, PAGE_SIZE) == bytes(PAGE_SIZE)
    assert memory.read(0x2000, 0xE000) == bytes(0xE000)


def record(kind: int, count: int, address: int, payload: bytes = b"") -> bytes:
    return RECORD.pack(kind, count, address) + payload


def ended(body: bytes) -> bytes:
    """``body`` followed by a correct end record."""
    return body + RECORD.pack(Kind.END, zlib.crc32(body), len(body))


@pytest.mark.parametrize(
    "stream, message",
    [
        (ended(record(Kind.PAGES, 1, 0x1001, page(1))), "not on a page boundary"),
        (ended(record(Kind.PAGES, 1, RAM, page(1))), "outside guest RAM"),
        (ended(record(Kind.PAGES, 2, RAM - PAGE_SIZE, page(1, 2))), "outside guest RAM"),
        (ended(record(Kind.PAGES, 1, 2**64 - PAGE_SIZE, page(1))), "outside guest RAM"),
        (ended(record(Kind.PAGES, 0, 0x1000)), "0 pages"),
        (ended(record(Kind.PAGES, RECORD_PAGES + 1, 0)), f"{RECORD_PAGES + 1} pages"),
        (ended(record(Kind.ZERO, 0, 0x1000)), "no pages"),
        (ended(record(Kind.ZERO, 2**32 - 1, 0)), "outside guest RAM"),
        (ended(record(9, 0, 0)), "unknown kind 9"),
        (ended(record(Kind.STATE, 2, 0, b"{}") + record(Kind.STATE, 2, 0, b"{}")), "a second machine state"),
        (ended(record(Kind.STATE, 4097, 0)), r"4097 bytes \(at most 4096\)"),
        (ended(b""), "without the machine's state"),
        (record(Kind.STATE, 2, 0, b"{}") + RECORD.pack(Kind.END, 0, 18), "damaged"),
        (write_stream({0x1000: page(1)})[:-1], "ended the stream early"),
        (b"", "ended the stream early"),
    ],
    ids=["unaligned", "past-ram", "straddling", "wrapping", "no-pages", "too-many-pages", "no-zero-pages",
         "huge-zero-run", "unknown-kind", "two-states", "state-too-large", "no-state", "bad-crc", "truncated",
         "empty"],  # fmt: skip
)
def test_a_bad_record_is_refused_in_one_line(memory, stream, message) -> None:
    with pytest.raises(MigrationError, match=message) as caught:
        receive(stream, memory)
    assert "\n" not in str(caught.value)


def test_any_changed_byte_or_missing_tail_of_a_real_stream_is_caught(memory) -> None:
    stream = write_stream({0x1000: page(0xAB), 0x3000: page(0x01, 2)}, zeros=[(0x8000, 4)])
    for offset in range(0, len(stream), 97):
        damaged = bytearray(stream)
        damaged[offset] ^= 0x40
        with pytest.raises(MigrationError):
            receive(bytes(damaged), memory)
    for length in range(0, len(stream), 101):
        with pytest.raises(MigrationError, match="ended the stream early"):
            receive(stream[:length], memory)


def test_a_claimed_size_costs_only_what_really_arrives(memory) -> None:
    """A state record claiming 60 MiB (within the bound) that sends 100 bytes allocates ~nothing."""
    stream = record(Kind.STATE, 60 * MIB, 0, b"x" * 100)
    tracemalloc.start()
    try:
        with pytest.raises(MigrationError, match="ended the stream early"):
            receive(stream, memory, max_state=64 * MIB)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MIB


def test_the_state_bound_grows_with_the_vcpus_but_stays_bounded() -> None:
    assert state_bound(1) < state_bound(64) <= 64 * MIB
    assert state_bound(10**9) == 64 * MIB


@SETTINGS
@given(st.binary(max_size=4096))
def test_random_bytes_never_crash_the_receiver(data) -> None:
    with GuestMemory([(0, RAM)]) as memory:
        with pytest.raises(MigrationError):
            receive(data, memory)


RECORDS = st.one_of(
    st.tuples(st.sampled_from([Kind.PAGES, Kind.ZERO, Kind.STATE, Kind.END, 0, 5, 255]),
              st.one_of(st.integers(0, 4), st.integers(0, 2**32 - 1)),
              st.one_of(st.integers(0, RAM // PAGE_SIZE + 2).map(lambda p: p * PAGE_SIZE), st.integers(0, 2**64 - 1)),
              st.binary(max_size=64)),
)  # fmt: skip


@SETTINGS
@given(st.lists(RECORDS, max_size=8), st.booleans())
def test_streams_of_random_records_only_write_where_pages_were_sent(records, end) -> None:
    """Every byte that changed lies in a PAGES record's pages that were inside guest RAM."""
    canary = bytes([0x5A]) * RAM
    body = b"".join(record(kind, count, address, payload) for kind, count, address, payload in records)
    stream = ended(body) if end else body
    allowed = set()
    for kind, count, address, _ in records:
        if kind == Kind.PAGES and 1 <= count <= RECORD_PAGES and address % PAGE_SIZE == 0:
            allowed.update(range(address, min(address + count * PAGE_SIZE, RAM)))
    with GuestMemory([(0, RAM)]) as memory:
        memory.write(0, canary)
        try:
            receive(stream, memory)
        except MigrationError as err:
            assert "\n" not in str(err)
        after = memory.read(0, RAM)
    changed = [i for i in range(0, RAM, 512) if after[i : i + 512] != canary[i : i + 512]]
    for start in changed:
        for i in range(start, start + 512):
            assert after[i] == canary[i] or i in allowed or _zeroed(records, i), f"byte {i:#x} changed"


def _zeroed(records, offset: int) -> bool:
    """Whether a ZERO record of ``records`` covers ``offset`` (it may discard such a page)."""
    return any(
        kind == Kind.ZERO and address <= offset < address + count * PAGE_SIZE and address + count * PAGE_SIZE <= RAM
        for kind, count, address, _ in records
    )


@SETTINGS
@given(st.data())
def test_a_real_stream_with_random_damage_is_refused(data) -> None:
    stream = bytearray(write_stream({0x1000: page(0xAB), 0x7000: page(0x33, 2)}, zeros=[(0x20000, 8)]))
    for _ in range(data.draw(st.integers(1, 4))):
        offset = data.draw(st.integers(0, len(stream) - 1))
        stream[offset] = data.draw(st.integers(0, 255).filter(lambda b: b != stream[offset]))
    with GuestMemory([(0, RAM)]) as memory:
        with pytest.raises(MigrationError):
            receive(bytes(stream), memory)


# --- the source's side: guest memory into records ----------------------------------------------------
def send_all(memory: GuestMemory) -> tuple[bytes, PageSender]:
    channel = Collect()
    sender = PageSender(StreamWriter(channel, None), memory)  # type: ignore[arg-type]
    sender.send_all()
    sender.writer.state(STATE)
    sender.writer.end()
    return bytes(channel.data), sender


def test_all_of_guest_memory_arrives_alike_with_zero_and_untouched_pages_sent_as_flags(memory) -> None:
    memory.write(0x3000, page(0x11))
    memory.write(0x10000 + 17, b"not a page of zeros")
    memory.write(RAM - PAGE_SIZE, page(0xEE))
    memory.write(0x20000, page(0))  # touched, but zeros
    stream, sender = send_all(memory)
    assert sender.data_pages == 3 and sender.zero_pages == RAM // PAGE_SIZE - 3
    assert len(stream) < 3 * PAGE_SIZE + 4096  # the zero pages cost a few records, not their bytes
    with GuestMemory([(0, RAM)]) as copy:
        copy.write(0x20000, page(0x99))  # stale data where the source has zeros
        receive(stream, copy)
        assert copy.read(0, RAM) == memory.read(0, RAM)


def test_memory_mapped_from_a_file_is_read_where_untouched(tmp_path) -> None:
    """Over a snapshot's memory file a page the guest never touched holds the file's data."""
    image = tmp_path / "memory.bin"
    image.write_bytes(bytes(PAGE_SIZE) + page(0x42, 3) + bytes(RAM - 4 * PAGE_SIZE))
    fd = os.open(image, os.O_RDONLY)
    try:
        with GuestMemory([(0, RAM)], backing=fd) as memory:
            stream, sender = send_all(memory)
            assert sender.data_pages == 3
            with GuestMemory([(0, RAM)]) as copy:
                receive(stream, copy)
                assert copy.read(0, RAM) == memory.read(0, RAM)
    finally:
        os.close(fd)


# --- handshake proofs, dirty-log helpers -----------------------------------------------------------
def test_a_proof_needs_the_token_the_role_and_the_nonce() -> None:
    nonce = os.urandom(32)
    given = proof(b"secret", b"source", nonce)
    assert check_proof(b"secret", b"source", nonce, given)
    assert not check_proof(b"other", b"source", nonce, given)
    assert not check_proof(b"secret", b"destination", nonce, given)
    assert not check_proof(b"secret", b"source", os.urandom(32), given)
    assert check_proof(None, b"source", nonce, bytes(32))  # no token: nothing to prove


def test_dirty_pages_of_both_logs_merge_into_runs() -> None:
    bits = bytearray(bitmap_size(128))
    bits[0] = 0b0000_0110  # pages 1 and 2
    bits[2] = 0b0000_0001  # page 16
    dirty = Dirty([DirtyBitmap(0, 0x100000, 128, bytes(bits))], {3, 40})
    assert dirty.pages() == 5
    assert dirty.runs() == [(0x3000, PAGE_SIZE), (0x28000, PAGE_SIZE), (0x101000, 2 * PAGE_SIZE), (0x110000, PAGE_SIZE)]
    later = Dirty([DirtyBitmap(0, 0x100000, 128, bytes([0b1000] + [0] * 15))], {41})
    merged = dirty.merge(later)
    assert merged.pages() == 7 and merged.host_pages == {3, 40, 41}
    assert page_runs([5, 3, 4, 9]) == [(0x3000, 3 * PAGE_SIZE), (0x9000, PAGE_SIZE)]


# --- URIs -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "uri, kind, address",
    [("tcp:127.0.0.1:4444", "tcp", ("127.0.0.1", 4444)), ("tcp::4444", "tcp", ("127.0.0.1", 4444)),
     ("tcp:[::1]:0", "tcp", ("::1", 0)), ("unix:/tmp/x.sock", "unix", "/tmp/x.sock")],
)  # fmt: skip
def test_uris_are_read(uri, kind, address) -> None:
    where = parse(uri)
    assert (where.kind, where.address) == (kind, address)
    assert parse("fd:7").fd == 7


@pytest.mark.parametrize(
    "uri, message",
    [("tcp:host", "port"), ("tcp:host:99999", "port"), ("tcp:::1:4", "IPv6 host in brackets"), ("fd:x", "fd:"),
     ("udp:1:2", "unknown transport"), ("nothing", "expected"), ("unix:", "expected")],
)  # fmt: skip
def test_a_bad_uri_is_a_one_line_config_error(uri, message) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        parse(uri)
    assert "\n" not in str(caught.value)


def test_a_listener_on_port_0_tells_its_port_and_takes_one_connection(tmp_path) -> None:
    with Listener("tcp:127.0.0.1:0") as listener:
        port = int(listener.uri.rsplit(":", 1)[1])
        assert port > 0
        client = connect(listener.uri, 5)
        server = listener.accept(None)
        client.sendall(b"hi")
        assert server.recv(2) == b"hi"
        client.close(), server.close()
        with pytest.raises(MigrationError, match="one migration"):
            listener.accept(None)


def test_a_unix_listener_removes_its_socket_and_refuses_a_live_one(tmp_path) -> None:
    path = tmp_path / "mig.sock"
    with Listener(f"unix:{path}"):
        assert path.is_socket() and path.stat().st_mode & 0o777 == 0o600
        with pytest.raises(MigrationError, match="another process listens there"):
            Listener(f"unix:{path}")
    assert not path.exists()
    path.write_text("not a socket")
    with pytest.raises(MigrationError, match="not a socket"):
        Listener(f"unix:{path}")


def test_fd_uris_take_over_a_connected_socket_pair() -> None:
    source_end, destination_end = socket.socketpair()
    with Listener(f"fd:{destination_end.detach()}") as listener:
        connected = connect(f"fd:{source_end.detach()}", 5)
        accepted = listener.accept(None)
        connected.sendall(struct.pack("<I", 7))
        assert accepted.recv(4) == struct.pack("<I", 7)
        connected.close(), accepted.close()


def test_no_destination_is_a_clear_error() -> None:
    with Listener("tcp:127.0.0.1:0") as listener:
        uri = listener.uri
    with pytest.raises(MigrationError, match="cannot reach the destination"):
        connect(uri, 5)
