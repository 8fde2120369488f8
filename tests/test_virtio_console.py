"""virtio-console (virtio 1.2 section 5.3), one port, against a driver in real guest memory."""

from __future__ import annotations

import random
import threading
from typing import Iterator

import pytest

from pykvm.devices.virtio import mmio
from pykvm.devices.virtio.console import (
    RECEIVEQ,
    TRANSMITQ,
    VIRTIO_CONSOLE_F_EMERG_WRITE,
    VIRTIO_CONSOLE_F_MULTIPORT,
    VIRTIO_CONSOLE_F_SIZE,
    VirtioConsole,
)
from pykvm.memory import GuestMemory
from virtio_driver import POISON, VIRTQ_DESC_F_WRITE, Driver, connect

MIB = 1 << 20


class Output:
    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def __call__(self, data: bytes) -> None:
        self.chunks.append(data)

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory([(0, 4 * MIB)]) as mem:
        yield mem


def console(memory: GuestMemory, negotiate: bool = True) -> tuple[Driver, VirtioConsole, Output]:
    output = Output()
    device = VirtioConsole(output)
    driver = connect(device, memory)
    if negotiate:
        driver.negotiate()
    return driver, device, output


def received(driver: Driver) -> list[bytes]:
    """The bytes of each receive buffer the device returned, cut to its used length."""
    return [driver.written(RECEIVEQ, head)[:length] for head, length in driver.used(RECEIVEQ)]


# --- identity and configuration (5.3.1-5.3.4) ---------------------------------------------------------
def test_console_identity_features_and_two_queues(memory: GuestMemory) -> None:
    driver, _, _ = console(memory, negotiate=False)
    assert driver.read_reg(mmio.DEVICE_ID) == 3
    features = driver.device_features()
    assert features & VIRTIO_CONSOLE_F_EMERG_WRITE
    assert not features & (VIRTIO_CONSOLE_F_MULTIPORT | VIRTIO_CONSOLE_F_SIZE)
    driver.negotiate()
    assert len(driver.queues) == 2  # receiveq(port0), transmitq(port0); no control queues


def test_console_configuration_layout(memory: GuestMemory) -> None:
    """5.3.4: cols, rows (valid only with F_SIZE: 0 here), max_nr_ports, emerg_wr."""
    driver, _, _ = console(memory)
    assert [driver.read_config(0, 2), driver.read_config(2, 2)] == [0, 0]
    assert driver.read_config(4, 4) == 1
    assert driver.read_config(8, 4) == 0


def test_emergency_write_outputs_the_low_byte_even_on_an_unconfigured_device(memory: GuestMemory) -> None:
    """5.3.5.1: the device MUST allow a write to emerg_wr, even on an unconfigured device."""
    driver, _, output = console(memory, negotiate=False)
    driver.write_config(8, 0x1234_5648)
    driver.write_config(8, ord("i"))
    assert output.data == b"Hi"


# --- transmit (5.3.6) ----------------------------------------------------------------------------------
def test_transmit_chains_reach_the_output_in_order(memory: GuestMemory) -> None:
    driver, _, output = console(memory)
    heads = [driver.post(TRANSMITQ, [b"hello, ", b"world"], []), driver.post(TRANSMITQ, [b"\n"], [])]
    heads.append(driver.post(TRANSMITQ, [b"in", b"direct"], [], indirect=True))
    driver.notify(TRANSMITQ)
    assert output.data == b"hello, world\nindirect"
    assert driver.used(TRANSMITQ) == [(head, 0) for head in heads]  # the device wrote nothing
    assert driver.interrupts == 1


def test_transmit_of_a_large_buffer_loses_nothing(memory: GuestMemory) -> None:
    driver, _, output = console(memory)
    data = random.Random(1).randbytes(300_000)
    driver.request(TRANSMITQ, [data], [])
    assert output.data == data and max(len(chunk) for chunk in output.chunks) <= 64 * 1024


def test_device_writable_buffer_in_the_transmitq_is_never_written(memory: GuestMemory) -> None:
    """5.3.6.1: the driver MUST NOT put a device-writable buffer in a transmitq."""
    driver, device, output = console(memory)
    assert driver.request(TRANSMITQ, [b"ok"], [4]) == (0, bytes([POISON]) * 4)
    assert output.data == b"ok" and device.stats["transmit_chains_malformed"] == 1


def test_output_errors_are_counted_not_raised(memory: GuestMemory) -> None:
    def broken(data: bytes) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    device = VirtioConsole(broken)
    driver = connect(device, memory)
    driver.negotiate()
    assert driver.request(TRANSMITQ, [b"lost"], []) == (0, b"")
    assert device.stats["output_errors"] == 1


# --- receive (5.3.6) -----------------------------------------------------------------------------------
def test_input_waits_for_receive_buffers_and_is_never_dropped(memory: GuestMemory) -> None:
    driver, device, _ = console(memory, negotiate=False)
    device.receive(b"before the driver")  # not even set up
    driver.negotiate()
    device.receive(b" is ready")
    assert device.pending_input == 26 and driver.used(RECEIVEQ) == []
    driver.post(RECEIVEQ, [], [64])
    driver.notify(RECEIVEQ)
    assert received(driver) == [b"before the driver is ready"]
    assert device.pending_input == 0 and driver.interrupts == 1


def test_receive_fills_buffers_in_order_partly_and_later_ones(memory: GuestMemory) -> None:
    """Used length = bytes written; a buffer may be filled partly; the rest waits for later buffers."""
    driver, device, _ = console(memory)
    for _ in range(3):
        driver.post(RECEIVEQ, [], [4])
    driver.notify(RECEIVEQ)
    device.receive(b"0123456789")
    assert received(driver) == [b"0123", b"4567", b"89"]
    device.receive(b"abcdefgh")  # no buffer left
    assert driver.used(RECEIVEQ) == [] and device.pending_input == 8
    driver.post(RECEIVEQ, [], [2, 3])  # one chain of two buffers
    driver.notify(RECEIVEQ)
    assert received(driver) == [b"abcde"]
    driver.post(RECEIVEQ, [], [100])
    driver.notify(RECEIVEQ)
    assert received(driver) == [b"fgh"]


def test_receive_with_random_pieces_and_buffers_loses_no_byte(memory: GuestMemory) -> None:
    rng = random.Random(5)
    driver, device, _ = console(memory)
    sent = rng.randbytes(20_000)
    got: list[bytes] = []
    position = 0
    while position < len(sent) or device.pending_input:
        if position < len(sent) and rng.random() < 0.5:
            size = rng.randint(1, 700)
            device.receive(sent[position : position + size])
            position += size
        else:
            for _ in range(rng.randint(1, 4)):
                driver.post(RECEIVEQ, [], [rng.randint(1, 300) for _ in range(rng.randint(1, 3))])
            driver.notify(RECEIVEQ)
        got.extend(received(driver))
    assert b"".join(got) == sent


def test_receive_from_another_thread_while_the_driver_posts_buffers(memory: GuestMemory) -> None:
    """receive() takes the transport lock: input from a host thread and queue work interleave safely."""
    driver, device, _ = console(memory)
    pieces = [bytes([i % 256]) * (i % 37 + 1) for i in range(600)]

    def host() -> None:
        for piece in pieces:
            device.receive(piece)

    thread = threading.Thread(target=host)
    thread.start()
    got: list[bytes] = []
    while thread.is_alive() or device.pending_input:
        with driver.transport.lock:  # the driver's own bookkeeping is single-threaded
            if driver.queues[RECEIVEQ].free:
                driver.post(RECEIVEQ, [], [64])
            driver.notify(RECEIVEQ)
            got.extend(received(driver))
    thread.join()
    with driver.transport.lock:
        got.extend(received(driver))
    assert b"".join(got) == b"".join(pieces)


def test_device_readable_buffer_in_the_receiveq_is_never_written(memory: GuestMemory) -> None:
    """5.3.6.1: the driver MUST NOT put a device-readable buffer in a receiveq."""
    driver, device, _ = console(memory)
    device.receive(b"data")
    head = driver.post(RECEIVEQ, [b"read-only"], [8])
    driver.notify(RECEIVEQ)
    assert driver.used(RECEIVEQ) == [(head, 0)]
    assert driver.written(RECEIVEQ, head) == bytes([POISON]) * 8
    assert device.stats["receive_chains_malformed"] == 1 and device.pending_input == 4
    driver.post(RECEIVEQ, [], [8])
    driver.notify(RECEIVEQ)
    assert received(driver) == [b"data"]


def test_reset_keeps_waiting_input(memory: GuestMemory) -> None:
    driver, device, _ = console(memory)
    device.receive(b"kept")
    driver.negotiate()  # reset and set up again
    driver.post(RECEIVEQ, [], [8])
    driver.notify(RECEIVEQ)
    assert received(driver) == [b"kept"]


def test_broken_receive_ring_during_host_input_needs_reset_and_does_not_raise(memory: GuestMemory) -> None:
    driver, device, _ = console(memory)
    driver.write_desc(RECEIVEQ, 0, 3 * MIB + 4 * MIB, 16, VIRTQ_DESC_F_WRITE)  # outside RAM
    driver.publish(RECEIVEQ, 0)
    device.receive(b"x")  # the host thread's call: must not raise
    assert driver.status & mmio.DEVICE_NEEDS_RESET
    assert "buffer outside guest memory" in driver.reset_reasons[0]
    assert device.pending_input == 1  # still not dropped
    driver.negotiate()
    driver.post(RECEIVEQ, [], [4])
    driver.notify(RECEIVEQ)
    assert received(driver) == [b"x"]
