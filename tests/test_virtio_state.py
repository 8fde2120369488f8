"""The virtio devices' state contract: saved, rebuilt into a fresh device, and continuing alike.

Each test drives a device through the driver harness into a state with something in
flight, saves the transport's and the device's state, builds a fresh device on a copy
of guest memory, restores, and checks that the state reads back identical and that the
next request is answered exactly as the original device answers it.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
from pathlib import Path
from typing import Callable, Iterator

import pytest

from pykvm.devices.virtio import mmio
from pykvm.devices.virtio.balloon import F_STATS_VQ, BalloonState, VirtioBalloon
from pykvm.devices.virtio.blk import VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VirtioBlock
from pykvm.devices.virtio.console import RECEIVEQ, VirtioConsole
from pykvm.devices.virtio.device import VirtioDevice
from pykvm.devices.virtio.mmio import VirtioMmioTransport
from pykvm.devices.virtio.rng import VirtioRng
from pykvm.errors import StateError
from pykvm.memory import GuestMemory
from pykvm.x86.e820 import build_memory_map
from virtio_driver import Driver, InterruptLine, connect

MIB = 1 << 20
RAM = 64 * MIB


@pytest.fixture
def memories() -> Iterator[tuple[GuestMemory, GuestMemory]]:
    with GuestMemory([(0, RAM)]) as first, GuestMemory([(0, RAM)]) as second:
        yield first, second


class Counting:
    """A deterministic entropy source whose position can be copied with the device's."""

    def __init__(self, start: int = 0) -> None:
        self.next = start

    def __call__(self, count: int) -> bytes:
        data = bytes((self.next + i) % 251 for i in range(count))
        self.next += count
        return data


def rebuild(driver: Driver, device: VirtioDevice, memory: GuestMemory) -> Driver:
    """Save ``driver``'s device, copy guest memory, restore into ``device``: a second driver
    that continues where the first one is."""
    transport_state = driver.transport.save_state()
    device_state = driver.transport.device.save_state()
    memory.write(0, driver.memory.read(0, RAM))
    transport = VirtioMmioTransport(device, memory, InterruptLine())
    transport.restore_state(transport_state)
    device.restore_state(device_state)
    assert transport.save_state() == transport_state and device.save_state() == device_state
    twin = copy.copy(driver)
    twin.transport, twin.memory, twin.irq = transport, memory, transport._interrupt  # type: ignore[assignment]
    twin.queues = copy.deepcopy(driver.queues)
    return twin


def same_next_request(first: Driver, second: Driver, queue: int, readable: list[bytes], writable: list[int]) -> tuple:
    answers = []
    for driver in (first, second):
        before = driver.interrupts
        answers.append((*driver.request(queue, readable, writable), driver.interrupts - before))
    assert answers[0] == answers[1]
    return answers[0]


def test_rng_continues_with_its_queue_positions(memories) -> None:
    first_memory, second_memory = memories
    driver = connect(VirtioRng(Counting()), first_memory)
    driver.negotiate()
    for _ in range(5):
        driver.request(0, [], [16])
    twin = rebuild(driver, VirtioRng(Counting(80)), second_memory)
    assert driver.transport.queues[0].next_avail == twin.transport.queues[0].next_avail == 5
    length, data, interrupts = same_next_request(driver, twin, 0, [], [8])
    assert length == 8 and data == bytes(range(80, 88))


def test_console_keeps_host_input_the_driver_has_not_taken(memories) -> None:
    first_memory, second_memory = memories
    first_output: list[bytes] = []
    console = VirtioConsole(first_output.append)
    driver = connect(console, first_memory)
    driver.negotiate()
    console.receive(b"typed before the snapshot")
    assert console.pending_input == 25  # no receive buffer posted yet
    second = VirtioConsole([].append)
    twin = rebuild(driver, second, second_memory)
    assert second.pending_input == 25
    length, data, _ = same_next_request(driver, twin, RECEIVEQ, [], [64])
    assert data[:length] == b"typed before the snapshot"


@pytest.mark.parametrize("fast_path", [True, False], ids=["C", "Python"])  # who serves IN and OUT
def test_blk_continues_on_a_copy_of_its_image(memories, tmp_path: Path, fast_path: bool) -> None:
    first_memory, second_memory = memories
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(range(256)) * 64)  # 32 sectors
    disk = VirtioBlock(image, fast_path=fast_path)
    driver = connect(disk, first_memory)
    driver.negotiate()
    header = VIRTIO_BLK_T_OUT.to_bytes(4, "little") + bytes(4) + (3).to_bytes(8, "little")
    driver.request(0, [header, b"\x5a" * 512], [1])
    shutil.copy(image, tmp_path / "copy.img")
    copy_disk = VirtioBlock(tmp_path / "copy.img", fast_path=fast_path)
    try:
        twin = rebuild(driver, copy_disk, second_memory)
        read = VIRTIO_BLK_T_IN.to_bytes(4, "little") + bytes(4) + (3).to_bytes(8, "little")
        length, data, _ = same_next_request(driver, twin, 0, [read], [512, 1])
        assert length == 513 and data == b"\x5a" * 512 + b"\x00"
    finally:
        disk.close()
        copy_disk.close()


def balloon_driver(memory: GuestMemory) -> tuple[VirtioBalloon, Driver]:
    device = VirtioBalloon(build_memory_map(RAM), ram_size=RAM)
    driver = connect(device, memory, buffer_area=(0x40000, 0x40000))
    driver.negotiate(mmio.VIRTIO_F_VERSION_1 | 1 << F_STATS_VQ)
    return device, driver


def inflate(driver: Driver, pfns: range) -> None:
    driver.request(0, [b"".join(pfn.to_bytes(4, "little") for pfn in pfns)], [])


def test_balloon_keeps_its_target_actual_pages_and_the_statistics_buffer_it_holds(memories) -> None:
    first_memory, second_memory = memories
    device, driver = balloon_driver(first_memory)
    device.target = "8M"
    inflate(driver, range(0x1000, 0x1100))
    driver.write_config(4, 0x100)  # actual
    stats_head = driver.post(2, [(5).to_bytes(2, "little") + (RAM).to_bytes(8, "little")], [])
    driver.notify(2)
    second, _ = balloon_driver(second_memory)
    twin = rebuild(driver, second, second_memory)
    assert (second.target, second.actual, second.held_pages()) == (8 * MIB, MIB, 0x100)
    assert second.guest_stats() == device.guest_stats() == {"memtot": RAM}
    assert device.request_stats() and second.request_stats()  # both return the held buffer
    assert driver.used(2) == twin.used(2) == [(stats_head, 0)]
    same_next_request(driver, twin, 1, [b"".join(pfn.to_bytes(4, "little") for pfn in range(0x1000, 0x1010))], [])
    assert device.held_pages() == second.held_pages() == 0xF0


def test_a_state_with_other_queues_or_foreign_features_is_refused_before_anything_changes(memories) -> None:
    first_memory, second_memory = memories
    driver = connect(VirtioRng(), first_memory)
    driver.negotiate()
    state = driver.transport.save_state()
    fresh = VirtioMmioTransport(VirtioRng(), second_memory, InterruptLine())
    untouched = fresh.save_state()
    bad_states: list[tuple[Callable, str]] = [
        (lambda s: dataclasses.replace(s, queues=s.queues * 2), "2 queues"),
        (lambda s: dataclasses.replace(s, driver_features=s.driver_features | 1 << 40), "never offered"),
        (lambda s: dataclasses.replace(s, status=-1), "status"),
    ]
    for bend, message in bad_states:
        with pytest.raises(StateError, match=message):
            fresh.restore_state(bend(state))
        assert fresh.save_state() == untouched


def test_a_ready_queue_whose_rings_are_outside_memory_is_refused(memories) -> None:
    first_memory, second_memory = memories
    driver = connect(VirtioRng(), first_memory)
    driver.negotiate()
    state = driver.transport.save_state()
    queue = dataclasses.replace(state.queues[0], used_ring=RAM + 0x1000)
    fresh = VirtioMmioTransport(VirtioRng(), second_memory, InterruptLine())
    with pytest.raises(StateError, match="outside guest memory"):
        fresh.restore_state(dataclasses.replace(state, queues=(queue,)))
    with pytest.raises(StateError, match="next_avail"):
        fresh.restore_state(dataclasses.replace(state, queues=(dataclasses.replace(state.queues[0], next_avail=1 << 16),)))


def test_a_balloon_state_that_does_not_fit_is_refused(memories) -> None:
    first_memory, second_memory = memories
    device, driver = balloon_driver(first_memory)
    state = device.save_state()
    second, _ = balloon_driver(second_memory)
    with pytest.raises(StateError, match="held"):
        second.restore_state(dataclasses.replace(state, held=b"\xff" * 3))
    with pytest.raises(StateError, match="guest_stats"):
        second.restore_state(dataclasses.replace(state, guest_stats=((1, -5),)))
    with pytest.raises(StateError, match="stats_chain"):
        second.restore_state(dataclasses.replace(state, stats_chain=(9999, ())))
    with pytest.raises(StateError, match="BalloonState"):
        second.restore_state(None)
    assert second.save_state() == BalloonState(0, 0, bytes(len(state.held)), (), None)
