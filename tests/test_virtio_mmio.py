"""The virtio-mmio transport, version 2 (virtio 1.2 section 4.2), driven as a driver would.

Each test is named for the rule it checks; section numbers are the spec's.
"""

from __future__ import annotations

from typing import Iterator

import pytest

from pykvm.devices.virtio import mmio
from pykvm.devices.virtio.blk import VirtioBlock
from pykvm.devices.virtio.mmio import VirtioMmioTransport
from pykvm.devices.virtio.rng import VirtioRng
from pykvm.memory import GuestMemory
from virtio_driver import (
    FeaturesRefused,
    InterruptLine,
    RecordingDevice,
    connect,
    queue_layout,
)

MIB = 1 << 20


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory([(0, 2 * MIB)]) as mem:
        yield mem


def setting_up(driver, features: int | None = None) -> None:  # type: ignore[no-untyped-def]
    """Reset, ACKNOWLEDGE, DRIVER, features written, FEATURES_OK: the queue setup state."""
    driver.reset()
    driver.set_status(mmio.ACKNOWLEDGE | mmio.DRIVER)
    driver.write_driver_features(mmio.VIRTIO_F_VERSION_1 if features is None else features)
    driver.add_status(mmio.FEATURES_OK)


# --- identification (4.2.2) --------------------------------------------------------------------
def test_magic_version_device_id_and_vendor_registers(memory: GuestMemory) -> None:
    driver = connect(VirtioRng(), memory)
    assert driver.read_reg(mmio.MAGIC) == 0x74726976  # "virt"
    assert driver.read_reg(mmio.VERSION_REG) == 2  # modern (non-legacy) virtio-mmio
    assert driver.read_reg(mmio.DEVICE_ID) == 4
    assert driver.read_reg(mmio.VENDOR) == mmio.VENDOR_ID


def test_version_1_is_bit_32_in_the_high_feature_page_and_pages_past_1_read_zero(memory: GuestMemory) -> None:
    driver = connect(VirtioRng(), memory)
    driver.write_reg(mmio.DEVICE_FEATURES_SEL, 1)
    assert driver.read_reg(mmio.DEVICE_FEATURES) & 1  # VIRTIO_F_VERSION_1 = bit 32
    driver.write_reg(mmio.DEVICE_FEATURES_SEL, 0)
    low = driver.read_reg(mmio.DEVICE_FEATURES)
    assert low & (1 << 28) and low & (1 << 29)  # INDIRECT_DESC, RING_EVENT_IDX
    driver.write_reg(mmio.DEVICE_FEATURES_SEL, 2)
    assert driver.read_reg(mmio.DEVICE_FEATURES) == 0


# --- feature negotiation (3.1.1, 6.1) ------------------------------------------------------------
def test_features_ok_refused_without_version_1(memory: GuestMemory) -> None:
    """6.1: a device that is not legacy MUST refuse FEATURES_OK when VERSION_1 is not accepted."""
    driver = connect(VirtioRng(), memory)
    with pytest.raises(FeaturesRefused):
        driver.negotiate(accept=~mmio.VIRTIO_F_VERSION_1)
    assert not driver.status & mmio.FEATURES_OK
    assert driver.status == mmio.ACKNOWLEDGE | mmio.DRIVER


def test_features_ok_refused_with_feature_bits_the_device_did_not_offer(memory: GuestMemory) -> None:
    """3.1.1: the driver MUST NOT accept a feature the device did not offer; the device refuses."""
    driver = connect(VirtioRng(), memory)
    setting_up(driver, mmio.VIRTIO_F_VERSION_1 | 1 << 7)
    assert not driver.status & mmio.FEATURES_OK


def test_features_ok_kept_for_a_subset_of_the_offered_features(memory: GuestMemory) -> None:
    driver = connect(VirtioRng(), memory)
    features = driver.negotiate(accept=mmio.VIRTIO_F_VERSION_1)
    assert features == mmio.VIRTIO_F_VERSION_1
    assert driver.status == mmio.ACKNOWLEDGE | mmio.DRIVER | mmio.FEATURES_OK | mmio.DRIVER_OK
    assert driver.transport.driver_features == mmio.VIRTIO_F_VERSION_1


def test_driver_features_ignored_before_driver_and_after_features_ok(memory: GuestMemory) -> None:
    driver = connect(VirtioRng(), memory)
    driver.reset()
    driver.set_status(mmio.ACKNOWLEDGE)
    driver.write_driver_features(mmio.VIRTIO_F_VERSION_1)  # DRIVER not set yet
    assert driver.transport.driver_features == 0
    driver.add_status(mmio.DRIVER)
    driver.write_driver_features(mmio.VIRTIO_F_VERSION_1)
    driver.add_status(mmio.FEATURES_OK)
    driver.write_driver_features(mmio.VIRTIO_F_VERSION_1 | mmio.VIRTIO_F_INDIRECT_DESC)  # too late
    assert driver.transport.driver_features == mmio.VIRTIO_F_VERSION_1


# --- the status state machine (2.1, 3.1.1) -------------------------------------------------------
def test_failed_status_never_activates_the_device_and_notifications_are_ignored(memory: GuestMemory) -> None:
    device = RecordingDevice()
    driver = connect(device, memory)
    driver.negotiate(driver_ok=False)
    driver.add_status(mmio.FAILED)
    driver.add_status(mmio.DRIVER_OK)  # DRIVER_OK after FAILED: still not live
    assert device.activations == 0 and not driver.transport.active
    driver.post(0, [b"x"], [4])
    driver.notify(0)
    assert device.chains_seen == [] and driver.used(0) == []
    assert driver.transport.stats["ignored_notifications"] == 1


def test_driver_ok_activates_the_device_once(memory: GuestMemory) -> None:
    device = RecordingDevice()
    driver = connect(device, memory)
    driver.negotiate()
    driver.add_status(mmio.DRIVER_OK)  # written again: no second activation
    assert device.activations == 1 and device.driver_features == driver.features


def test_notifications_before_driver_ok_are_ignored(memory: GuestMemory) -> None:
    """2.1.2: the device MUST NOT consume buffers before DRIVER_OK."""
    device = RecordingDevice()
    driver = connect(device, memory)
    driver.negotiate(driver_ok=False)
    driver.post(0, [b"early"], [])
    driver.notify(0)
    assert device.chains_seen == []
    driver.add_status(mmio.DRIVER_OK)
    driver.notify(0)
    assert len(device.chains_seen) == 1 and driver.used(0) == [(0, 0)]


def test_reset_by_writing_zero_returns_every_register_to_its_initial_value(memory: GuestMemory) -> None:
    """4.2.2 / 2.4: writing 0 to Status resets the device; queues become unready."""
    device = RecordingDevice(queue_sizes=(16, 8))
    driver = connect(device, memory)
    initial = {offset: driver.read_reg(offset) for offset in (mmio.STATUS, mmio.INTERRUPT_STATUS, mmio.QUEUE_READY)}
    driver.negotiate(queue_sizes={0: 8, 1: 4})
    driver.request(0, [b"ab"], [4])
    driver.write_reg(mmio.DEVICE_FEATURES_SEL, 1)
    driver.write_reg(mmio.QUEUE_SEL, 1)
    assert driver.interrupt_status() == mmio.INTERRUPT_USED_BUFFER
    driver.reset()
    transport = driver.transport
    assert {offset: driver.read_reg(offset) for offset in initial} == initial == {
        mmio.STATUS: 0, mmio.INTERRUPT_STATUS: 0, mmio.QUEUE_READY: 0,
    }  # fmt: skip
    assert transport.driver_features == 0 and transport.device_features_sel == 0
    assert transport.driver_features_sel == 0 and transport.queue_sel == 0
    for queue, maximum in zip(transport.queues, (16, 8)):
        assert not queue.ready
        assert (queue.size, queue.desc_table, queue.avail_ring, queue.used_ring) == (maximum, 0, 0, 0)
        assert (queue.next_avail, queue.next_used) == (0, 0)
    assert device.driver_features == 0
    driver.write_reg(mmio.QUEUE_SEL, 1)
    assert driver.read_reg(mmio.QUEUE_NUM_MAX) == 8 and driver.read_reg(mmio.QUEUE_READY) == 0


def test_the_device_works_again_after_a_reset(memory: GuestMemory) -> None:
    device = RecordingDevice()
    driver = connect(device, memory)
    driver.negotiate()
    driver.request(0, [b"one"], [2])
    driver.negotiate()  # resets first
    assert driver.request(0, [b"two"], [3]) == (3, b"\xa5" * 3)


# --- queue configuration (4.2.3.2) ---------------------------------------------------------------
def _queue_writes(driver, index: int = 0) -> None:  # type: ignore[no-untyped-def]
    driver.write_reg(mmio.QUEUE_SEL, index)
    driver.write_reg(mmio.QUEUE_NUM, 4)
    for low in (mmio.QUEUE_DESC_LOW, mmio.QUEUE_DRIVER_LOW, mmio.QUEUE_DEVICE_LOW):
        driver.write_reg(low, 0x1230)
        driver.write_reg(low + 4, 0x7)
    driver.write_reg(mmio.QUEUE_READY, 1)


def _queue_state(transport: VirtioMmioTransport, index: int = 0) -> tuple:
    q = transport.queues[index]
    return (q.size, q.desc_table, q.avail_ring, q.used_ring, q.ready)


def test_queue_registers_ignored_before_features_ok(memory: GuestMemory) -> None:
    driver = connect(RecordingDevice(), memory)
    driver.set_status(mmio.ACKNOWLEDGE | mmio.DRIVER)
    before = _queue_state(driver.transport)
    _queue_writes(driver)
    assert _queue_state(driver.transport) == before == (16, 0, 0, 0, False)
    assert driver.transport.stats["ignored_writes"] == 8


def test_queue_registers_ignored_after_driver_ok(memory: GuestMemory) -> None:
    driver = connect(RecordingDevice(queue_sizes=(16, 16)), memory)
    driver.negotiate(max_queues=1)  # queue 1 left unconfigured
    before = _queue_state(driver.transport, 1)
    _queue_writes(driver, 1)
    assert _queue_state(driver.transport, 1) == before


def test_queue_registers_ignored_after_failed(memory: GuestMemory) -> None:
    driver = connect(RecordingDevice(), memory)
    setting_up(driver)
    driver.add_status(mmio.FAILED)
    before = _queue_state(driver.transport)
    _queue_writes(driver)
    assert _queue_state(driver.transport) == before


def test_queue_registers_ignored_while_the_queue_is_ready(memory: GuestMemory) -> None:
    driver = connect(RecordingDevice(), memory)
    setting_up(driver)
    driver.write_reg(mmio.QUEUE_SEL, 0)
    driver.write_reg(mmio.QUEUE_NUM, 8)
    driver.write_reg(mmio.QUEUE_READY, 1)
    driver.write_reg(mmio.QUEUE_NUM, 4)
    driver.write_reg(mmio.QUEUE_DESC_LOW, 0x4000)
    assert _queue_state(driver.transport) == (8, 0, 0, 0, True)
    driver.write_reg(mmio.QUEUE_READY, 0)  # QueueReady itself may be cleared
    driver.write_reg(mmio.QUEUE_NUM, 4)
    assert _queue_state(driver.transport) == (4, 0, 0, 0, False)


def test_queue_num_max_is_zero_for_a_queue_that_does_not_exist(memory: GuestMemory) -> None:
    """4.2.3.2: QueueNumMax 0 means the queue is not available."""
    driver = connect(RecordingDevice(queue_sizes=(16, 8)), memory)
    setting_up(driver)
    for index, expected in ((0, 16), (1, 8), (2, 0), (0xFFFFFFFF, 0)):
        driver.write_reg(mmio.QUEUE_SEL, index)
        assert driver.read_reg(mmio.QUEUE_NUM_MAX) == expected
        assert driver.read_reg(mmio.QUEUE_READY) == 0
    driver.write_reg(mmio.QUEUE_SEL, 2)
    driver.write_reg(mmio.QUEUE_NUM, 4)  # ignored, does not raise
    driver.write_reg(mmio.QUEUE_READY, 1)
    assert driver.transport.stats["ignored_writes"] == 2


def test_queue_addresses_use_both_32_bit_halves() -> None:
    with GuestMemory([(0, 2 * MIB), (1 << 32, 2 * MIB)]) as memory:
        device = RecordingDevice()
        driver = connect(device, memory, ring_area_gpa=(1 << 32) + 0x1000)
        driver.negotiate()
        desc, avail, used, _ = queue_layout((1 << 32) + 0x1000, 16)
        queue = driver.transport.queues[0]
        assert (queue.desc_table, queue.avail_ring, queue.used_ring) == (desc, avail, used)
        assert driver.request(0, [b"high"], [8]) == (8, b"\xa5" * 8)


# --- rings checked at DRIVER_OK (2.7, 2.1.2) -----------------------------------------------------------
def _driver_ok_with(memory: GuestMemory, **fields: int) -> tuple:
    device = RecordingDevice()
    irq = InterruptLine()
    transport = VirtioMmioTransport(device, memory, irq)
    transport.write(mmio.STATUS, 4, mmio.ACKNOWLEDGE | mmio.DRIVER)
    transport.write(mmio.DRIVER_FEATURES_SEL, 4, 1)
    transport.write(mmio.DRIVER_FEATURES, 4, 1)
    transport.write(mmio.STATUS, 4, mmio.ACKNOWLEDGE | mmio.DRIVER | mmio.FEATURES_OK)
    layout = dict(zip(("desc", "avail", "used"), queue_layout(0x1000, 16)))
    layout.update(fields)
    transport.write(mmio.QUEUE_NUM, 4, layout.get("size", 16))
    for register, name in ((mmio.QUEUE_DESC_LOW, "desc"), (mmio.QUEUE_DRIVER_LOW, "avail"), (mmio.QUEUE_DEVICE_LOW, "used")):
        transport.write(register, 4, layout[name] & 0xFFFFFFFF)
        transport.write(register + 4, 4, layout[name] >> 32)
    transport.write(mmio.QUEUE_READY, 4, 1)
    transport.write(mmio.STATUS, 4, mmio.ACKNOWLEDGE | mmio.DRIVER | mmio.FEATURES_OK | mmio.DRIVER_OK)
    return transport, device, irq


@pytest.mark.parametrize(
    "fields",
    [
        {"desc": 2 * MIB},  # just past the end of RAM
        {"desc": 2 * MIB - 16 * 8},  # starts inside RAM, ends outside
        {"avail": 1 << 40},
        {"used": 2 * MIB - 8},
        {"used": (1 << 64) - 8},
    ],
    ids=["desc-outside", "desc-straddles-end", "avail-outside", "used-straddles-end", "used-wraps"],
)
def test_rings_outside_memory_at_driver_ok_need_reset(memory: GuestMemory, fields: dict) -> None:
    transport, device, irq = _driver_ok_with(memory, **fields)
    assert transport.status & mmio.DEVICE_NEEDS_RESET
    assert device.activations == 0
    # 2.1.2: with DRIVER_OK set, DEVICE_NEEDS_RESET comes with a configuration change notification
    assert transport.interrupt_status & mmio.INTERRUPT_CONFIG_CHANGE and irq.count == 1


@pytest.mark.parametrize(
    "fields",
    [{"desc": 0x1008}, {"avail": 0x1101}, {"used": 0x1202}],
    ids=["desc-not-16-aligned", "avail-not-2-aligned", "used-not-4-aligned"],
)
def test_misaligned_rings_at_driver_ok_need_reset(memory: GuestMemory, fields: dict) -> None:
    """2.7: descriptor table 16-byte, available ring 2-byte, used ring 4-byte aligned."""
    transport, device, _ = _driver_ok_with(memory, **fields)
    assert transport.status & mmio.DEVICE_NEEDS_RESET and device.activations == 0


@pytest.mark.parametrize("size", [0, 12, 32], ids=["zero", "not-a-power-of-two", "above-queue-num-max"])
def test_bad_queue_size_at_driver_ok_needs_reset(memory: GuestMemory, size: int) -> None:
    """2.7: Queue Size is a power of 2 (and at most QueueNumMax, 4.2.3.2)."""
    transport, device, _ = _driver_ok_with(memory, size=size)
    assert transport.status & mmio.DEVICE_NEEDS_RESET and device.activations == 0


def test_device_needs_reset_stays_set_until_the_driver_resets(memory: GuestMemory) -> None:
    """2.1.1: the driver MUST NOT clear a status bit; the device keeps DEVICE_NEEDS_RESET until reset."""
    transport, device, _ = _driver_ok_with(memory, desc=2 * MIB)
    assert transport.status & mmio.DEVICE_NEEDS_RESET
    transport.write(mmio.STATUS, 4, mmio.ACKNOWLEDGE | mmio.DRIVER | mmio.FEATURES_OK | mmio.DRIVER_OK)
    assert transport.status & mmio.DEVICE_NEEDS_RESET and not transport.active
    transport.notify(0)
    assert transport.stats["ignored_notifications"] == 1 and device.chains_seen == []
    transport.write(mmio.STATUS, 4, 0)
    assert transport.status == 0


# --- interrupts (4.2.2) -----------------------------------------------------------------------
def test_interrupt_status_reports_used_buffers_until_acknowledged(memory: GuestMemory) -> None:
    driver = connect(RecordingDevice(), memory)
    driver.negotiate()
    assert driver.interrupt_status() == 0
    driver.request(0, [b"a"], [1])
    assert driver.interrupts == 1
    assert driver.interrupt_status() == mmio.INTERRUPT_USED_BUFFER
    driver.write_reg(mmio.INTERRUPT_ACK, mmio.INTERRUPT_CONFIG_CHANGE)  # acks only the bits written
    assert driver.interrupt_status() == mmio.INTERRUPT_USED_BUFFER
    assert driver.ack() == mmio.INTERRUPT_USED_BUFFER
    assert driver.interrupt_status() == 0


def test_configuration_change_bumps_the_generation_and_interrupts(memory: GuestMemory) -> None:
    """4.2.2 ConfigGeneration / 2.5.1: a configuration change gives a new generation."""
    driver = connect(RecordingDevice(), memory)
    driver.negotiate()
    before = driver.read_reg(mmio.CONFIG_GENERATION)
    assert driver.read_reg(mmio.CONFIG_GENERATION) == before  # stable while nothing changes
    driver.transport.signal_config()
    assert driver.read_reg(mmio.CONFIG_GENERATION) != before
    assert driver.interrupt_status() == mmio.INTERRUPT_CONFIG_CHANGE and driver.interrupts == 1


# --- access widths (4.2.2.2) -----------------------------------------------------------------------
@pytest.mark.parametrize("size", [1, 2])
def test_narrow_register_accesses_are_ignored(memory: GuestMemory, size: int) -> None:
    """4.2.2.2: the driver MUST use only 32-bit wide accesses for the control registers."""
    driver = connect(RecordingDevice(), memory)
    assert driver.read_reg(mmio.MAGIC, size) == 0
    driver.write_reg(mmio.STATUS, mmio.ACKNOWLEDGE, size)
    assert driver.status == 0
    assert driver.transport.stats["ignored_reads"] == 1 and driver.transport.stats["ignored_writes"] == 1


def test_misaligned_and_unknown_registers_are_ignored(memory: GuestMemory) -> None:
    driver = connect(RecordingDevice(), memory)
    assert driver.read_reg(mmio.STATUS + 2) == 0
    assert driver.read_reg(0x0C8) == 0
    driver.write_reg(mmio.STATUS + 1, mmio.ACKNOWLEDGE)
    driver.write_reg(0x0C8, 1)
    driver.write_reg(mmio.MAGIC, 0)  # read-only
    assert driver.status == 0 and driver.read_reg(mmio.MAGIC) == 0x74726976


def test_configuration_space_allows_byte_accesses(tmp_path) -> None:  # type: ignore[no-untyped-def]
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(0x12345 * 512))
    with GuestMemory([(0, 2 * MIB)]) as memory:
        driver = connect(VirtioBlock(image), memory)
        assert driver.read_config(0, 8) == 0x12345
        assert [driver.read_config(i, 1) for i in range(4)] == [0x45, 0x23, 0x01, 0]
        assert driver.read_config(0, 2) == 0x2345
        assert driver.read_config(4096, 4) == 0  # past the configuration: 0, no exception
