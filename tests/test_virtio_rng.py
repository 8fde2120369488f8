"""virtio-rng (virtio 1.2 section 5.4) through the transport, as the Linux driver uses it."""

from __future__ import annotations

from typing import Iterator

import pytest

from pykvm.devices.virtio import mmio
from pykvm.devices.virtio.rng import MAX_REQUEST, VirtioRng
from pykvm.memory import GuestMemory
from virtio_driver import POISON, connect

MIB = 1 << 20


class CountingSource:
    """A deterministic entropy source: 0, 1, 2, ... (mod 251), and what was asked of it."""

    def __init__(self) -> None:
        self.next = 0
        self.requests: list[int] = []

    def __call__(self, count: int) -> bytes:
        self.requests.append(count)
        data = bytes((self.next + i) % 251 for i in range(count))
        self.next += count
        return data


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory([(0, 2 * MIB)]) as mem:
        yield mem


def test_rng_identity_one_queue_and_only_transport_features(memory: GuestMemory) -> None:
    """5.4: device ID 4, one requestq, no device-specific feature bits, no configuration."""
    driver = connect(VirtioRng(), memory)
    assert driver.read_reg(mmio.DEVICE_ID) == 4
    assert driver.device_features() == (
        mmio.VIRTIO_F_VERSION_1 | mmio.VIRTIO_F_INDIRECT_DESC | mmio.VIRTIO_F_RING_EVENT_IDX
    )
    driver.negotiate()
    assert len(driver.queues) == 1
    assert driver.read_config(0, 4) == 0


def test_rng_fills_every_writable_buffer_from_the_source(memory: GuestMemory) -> None:
    source = CountingSource()
    driver = connect(VirtioRng(source), memory)
    driver.negotiate()
    length, data = driver.request(0, [], [3, 5, 8])
    assert length == 16 and data == bytes(range(16))
    assert source.requests == [16]


def test_rng_default_source_is_getrandom(memory: GuestMemory) -> None:
    driver = connect(VirtioRng(), memory)
    driver.negotiate()
    length, data = driver.request(0, [], [64])
    assert length == 64 and data != bytes([POISON]) * 64


def test_rng_request_is_bounded_to_64_kib(memory: GuestMemory) -> None:
    source = CountingSource()
    driver = connect(VirtioRng(source), memory)
    driver.negotiate()
    length, data = driver.request(0, [], [MAX_REQUEST + 100])
    assert length == MAX_REQUEST and source.requests == [MAX_REQUEST]
    assert data[MAX_REQUEST:] == bytes([POISON]) * 100


def test_rng_chain_without_writable_buffers_is_returned_with_length_zero(memory: GuestMemory) -> None:
    driver = connect(VirtioRng(CountingSource()), memory)
    driver.negotiate()
    assert driver.request(0, [b"not for me"], []) == (0, b"")


def test_rng_several_chains_one_notification_one_interrupt(memory: GuestMemory) -> None:
    driver = connect(VirtioRng(CountingSource()), memory)
    driver.negotiate()
    heads = [driver.post(0, [], [4], indirect=i % 2 == 1) for i in range(6)]
    driver.notify(0)
    assert driver.used(0) == [(head, 4) for head in heads]
    assert driver.interrupts == 1
    assert [driver.written(0, head) for head in heads[:2]] == [bytes(range(4)), bytes(range(4, 8))]
