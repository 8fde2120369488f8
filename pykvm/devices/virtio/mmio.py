"""The virtio-mmio transport, version 2 (virtio 1.2, section 4.2).

The transport owns the register file: magic and version, feature pages, the status
state machine (including FAILED, DEVICE_NEEDS_RESET and reset by writing 0), queue
selection and configuration, the interrupt status and its acknowledgement, and the
configuration generation.  A device (:class:`~pykvm.devices.virtio.device.VirtioDevice`)
offers its id, features, configuration bytes and queue sizes; it is told the accepted
features at FEATURES_OK and activated at DRIVER_OK with the guest memory, the queues
and the transport itself as its :class:`~pykvm.devices.virtio.device.VirtioInterrupt`.
Queue fields may only change while the driver is setting the device up (FEATURES_OK
set, DRIVER_OK not) and the queue is not ready, as rust-vmm's virtio-device requires.
Accesses the spec forbids are ignored, counted in ``stats`` and logged at debug level;
nothing a driver writes raises.  A driver that keeps breaking the protocol is logged a
few times, then counted (:data:`LOUD_RESETS`).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from ...errors import StateError
from ...logs import RateLimitedLog
from ...memory import GuestMemory
from ..state import check_int, check_record
from .device import VirtioDevice
from .queue import QueueError, QueueState, SplitQueue

log = logging.getLogger(__name__)

MMIO_SIZE = 0x1000
MAGIC_VALUE = 0x74726976  # "virt"
VERSION = 2
VENDOR_ID = 0x4D56_4B50  # "PKVM"

# Register offsets (4.2.2).
MAGIC, VERSION_REG, DEVICE_ID, VENDOR = 0x000, 0x004, 0x008, 0x00C
DEVICE_FEATURES, DEVICE_FEATURES_SEL = 0x010, 0x014
DRIVER_FEATURES, DRIVER_FEATURES_SEL = 0x020, 0x024
QUEUE_SEL, QUEUE_NUM_MAX, QUEUE_NUM, QUEUE_READY, QUEUE_NOTIFY = 0x030, 0x034, 0x038, 0x044, 0x050
INTERRUPT_STATUS, INTERRUPT_ACK, STATUS = 0x060, 0x064, 0x070
QUEUE_DESC_LOW, QUEUE_DESC_HIGH = 0x080, 0x084
QUEUE_DRIVER_LOW, QUEUE_DRIVER_HIGH = 0x090, 0x094
QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH = 0x0A0, 0x0A4
CONFIG_GENERATION = 0x0FC
CONFIG = 0x100

# Device status bits (2.1).
ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK = 1, 2, 4, 8
DEVICE_NEEDS_RESET, FAILED = 64, 128
# Interrupt status bits (4.2.2).
INTERRUPT_USED_BUFFER, INTERRUPT_CONFIG_CHANGE = 1, 2
# Feature bits the transport and the split queue provide (6).
VIRTIO_F_INDIRECT_DESC = 1 << 28
VIRTIO_F_RING_EVENT_IDX = 1 << 29
VIRTIO_F_VERSION_1 = 1 << 32

_QUEUE_ADDRESS_FIELDS = {
    QUEUE_DESC_LOW: ("desc_table", 0),
    QUEUE_DESC_HIGH: ("desc_table", 32),
    QUEUE_DRIVER_LOW: ("avail_ring", 0),
    QUEUE_DRIVER_HIGH: ("avail_ring", 32),
    QUEUE_DEVICE_LOW: ("used_ring", 0),
    QUEUE_DEVICE_HIGH: ("used_ring", 32),
}
_WORD = 0xFFFFFFFF
# How many "needs a reset" warnings a device logs per minute; the rest are counted.
LOUD_RESETS = 5


@dataclass(frozen=True)
class TransportState:
    """The register file as plain data (the queues with it; the device keeps its own state)."""

    status: int
    device_features_sel: int
    driver_features_sel: int
    driver_features: int
    queue_sel: int
    interrupt_status: int
    config_generation: int
    queues: tuple[QueueState, ...]


class VirtioMmioTransport:
    """The virtio-mmio register file in front of one device; registered on the MMIO bus.

    ``interrupt`` raises the device's interrupt line (an edge, e.g. an irqfd write);
    ``on_activate`` / ``on_reset`` let the device manager wire and unwire queue notifications.
    """

    def __init__(
        self,
        device: VirtioDevice,
        memory: GuestMemory,
        interrupt: Callable[[], None],
        on_activate: Callable[[VirtioMmioTransport], None] | None = None,
        on_reset: Callable[[VirtioMmioTransport], None] | None = None,
    ) -> None:
        self.device = device
        self.memory = memory
        self._interrupt = interrupt
        self._on_activate = on_activate
        self._on_reset = on_reset
        self.lock = device.lock  # register accesses (vCPU) and queue work (I/O thread)
        self.stats: Counter[str] = Counter()
        self.queues = [SplitQueue(size) for size in device.queue_max_sizes]
        self.config_generation = 0
        self._reset_log = RateLimitedLog(log, LOUD_RESETS, 60.0)
        self._reset_state()

    def _reset_state(self) -> None:
        self.status = 0
        self.interrupt_status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        for queue in self.queues:
            queue.reset()

    @property
    def offered_features(self) -> int:
        return self.device.features | VIRTIO_F_VERSION_1 | VIRTIO_F_INDIRECT_DESC | VIRTIO_F_RING_EVENT_IDX

    @property
    def active(self) -> bool:
        return bool(self.status & DRIVER_OK) and not self.status & (FAILED | DEVICE_NEEDS_RESET)

    # --- the bus interface -------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        with self.lock:
            if offset >= CONFIG:
                return self.device.read_config(offset - CONFIG, size)
            if size != 4 or offset % 4:
                return self._ignored("read", offset, size)
            return self._read_register(offset)

    def write(self, offset: int, size: int, value: int) -> None:
        with self.lock:
            if offset >= CONFIG:
                self.device.write_config(offset - CONFIG, size, value)
            elif size != 4 or offset % 4:
                self._ignored("write", offset, size)
            else:
                self._write_register(offset, value)

    def _ignored(self, kind: str, offset: int, size: int) -> int:
        self.stats[f"ignored_{kind}s"] += 1
        log.debug("virtio-mmio %s: ignored %d-byte %s at offset %#x", self.device.name, size, kind, offset)
        return 0

    def _device_features_page(self) -> int:
        if self.device_features_sel > 1:
            return 0
        return (self.offered_features >> (32 * self.device_features_sel)) & _WORD

    def _queue_num_max(self) -> int:
        queue = self._selected_queue()
        return queue.max_size if queue else 0

    def _queue_ready(self) -> int:
        queue = self._selected_queue()
        return int(queue.ready) if queue else 0

    _READERS: dict[int, Callable[[VirtioMmioTransport], int]] = {
        MAGIC: lambda t: MAGIC_VALUE,
        VERSION_REG: lambda t: VERSION,
        DEVICE_ID: lambda t: t.device.device_id,
        VENDOR: lambda t: VENDOR_ID,
        DEVICE_FEATURES: _device_features_page,
        QUEUE_NUM_MAX: _queue_num_max,
        QUEUE_READY: _queue_ready,
        INTERRUPT_STATUS: lambda t: t.interrupt_status,
        STATUS: lambda t: t.status,
        CONFIG_GENERATION: lambda t: t.config_generation,
    }

    def _read_register(self, offset: int) -> int:
        reader = self._READERS.get(offset)
        return reader(self) if reader else self._ignored("read", offset, 4)

    def _write_register(self, offset: int, value: int) -> None:
        if offset == DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == DRIVER_FEATURES:
            self._write_driver_features(value)
        elif offset == DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == QUEUE_SEL:
            self.queue_sel = value
        elif offset in (QUEUE_NUM, QUEUE_READY) or offset in _QUEUE_ADDRESS_FIELDS:
            self._write_queue_register(offset, value)
        elif offset == QUEUE_NOTIFY:
            self.notify(value)
        elif offset == INTERRUPT_ACK:
            self.interrupt_status &= ~value
        elif offset == STATUS:
            self._write_status(value)
        else:
            self._ignored("write", offset, 4)

    # --- features and status -----------------------------------------------------------
    def _write_driver_features(self, value: int) -> None:
        if self.status & FEATURES_OK or not self.status & DRIVER or self.driver_features_sel > 1:
            self._ignored("write", DRIVER_FEATURES, 4)
            return
        shift = 32 * self.driver_features_sel
        self.driver_features = (self.driver_features & ~(_WORD << shift)) | (value << shift)

    def _write_status(self, value: int) -> None:
        if value == 0:
            self.reset()
            return
        if value & ~self.status & FEATURES_OK and not self._features_acceptable():
            value &= ~FEATURES_OK  # the driver reads it back and sees the refusal (3.1.1)
        became = value & ~self.status
        self.status = value | (self.status & DEVICE_NEEDS_RESET)  # only a reset clears it (2.1.2)
        if became & FEATURES_OK and value & FEATURES_OK:
            self.device.acknowledge(self.driver_features)
        if became & DRIVER_OK and not value & FAILED:
            self._activate()

    def _features_acceptable(self) -> bool:
        unknown = self.driver_features & ~self.offered_features
        return not unknown and bool(self.driver_features & VIRTIO_F_VERSION_1)

    def _activate(self) -> None:
        for queue in self.queues:
            queue.event_idx = bool(self.driver_features & VIRTIO_F_RING_EVENT_IDX)
            queue.indirect = bool(self.driver_features & VIRTIO_F_INDIRECT_DESC)
            if queue.ready:
                try:
                    queue.check(self.memory)
                except QueueError as err:
                    self.signal_needs_reset(f"cannot activate: {err}")
                    return
        self._start_device()

    def _start_device(self) -> None:
        self.device.activate(self.memory, self.queues, self)
        if self._on_activate is not None:
            self._on_activate(self)

    def reset(self) -> None:
        """Device reset (status 0): the device stops, every register returns to its initial value."""
        was_active = self.status & DRIVER_OK
        self.device.reset()
        self._reset_state()
        if was_active and self._on_reset is not None:
            self._on_reset(self)

    # --- queues --------------------------------------------------------------------------
    def _selected_queue(self) -> SplitQueue | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def _write_queue_register(self, offset: int, value: int) -> None:
        queue = self._selected_queue()
        setting_up = self.status & FEATURES_OK and not self.status & (DRIVER_OK | FAILED)
        if queue is None or not setting_up or (queue.ready and offset != QUEUE_READY):
            self._ignored("write", offset, 4)
            return
        if offset == QUEUE_NUM:
            queue.size = value
        elif offset == QUEUE_READY:
            queue.ready = value == 1
        else:
            name, shift = _QUEUE_ADDRESS_FIELDS[offset]
            current = getattr(queue, name)
            setattr(queue, name, (current & ~(_WORD << shift)) | (value << shift))

    def notify(self, queue_index: int) -> None:
        """The driver notified ``queue_index`` (QueueNotify write, or its ioeventfd fired)."""
        with self.lock:
            if not self.active or queue_index >= len(self.queues) or not self.queues[queue_index].ready:
                self.stats["ignored_notifications"] += 1
                return
            self.stats["notifications"] += 1
            try:
                self.device.process(queue_index)
            except QueueError as err:
                self.signal_needs_reset(str(err))

    # --- from the device (VirtioInterrupt) -------------------------------------------
    def signal_used(self, queue_index: int) -> None:
        """The device used buffers the driver wants an interrupt for."""
        self.interrupt_status |= INTERRUPT_USED_BUFFER
        self.stats["interrupts"] += 1
        self._interrupt()

    def signal_config(self) -> None:
        """The device's configuration changed: new generation, configuration change interrupt."""
        self.config_generation = (self.config_generation + 1) & _WORD
        self.interrupt_status |= INTERRUPT_CONFIG_CHANGE
        if self.status & DRIVER_OK:
            self._interrupt()

    def signal_needs_reset(self, reason: str) -> None:
        """The driver broke the protocol: DEVICE_NEEDS_RESET, and tell it (2.1.2)."""
        self._reset_log.warning("virtio %s: %s; the device needs a reset", self.device.name, reason)
        self.stats["needs_reset"] += 1
        self.status |= DEVICE_NEEDS_RESET
        self.device.reset()
        self.signal_config()

    # --- state ---------------------------------------------------------------------------
    def save_state(self) -> TransportState:
        with self.lock:
            return TransportState(
                self.status, self.device_features_sel, self.driver_features_sel, self.driver_features,
                self.queue_sel, self.interrupt_status, self.config_generation,
                tuple(queue.save_state() for queue in self.queues),
            )  # fmt: skip

    def restore_state(self, state: TransportState) -> None:
        """Take ``state`` into a transport fresh from its device manager; an active device is
        activated again (its queues checked as at DRIVER_OK, its notifications wired)."""
        check_record(state, TransportState)
        for name in ("status", "device_features_sel", "driver_features_sel", "queue_sel",
                     "interrupt_status", "config_generation"):  # fmt: skip
            check_int(state, name, 0, _WORD)
        check_int(state, "driver_features", 0, (1 << 64) - 1)
        if not isinstance(state.queues, tuple) or len(state.queues) != len(self.queues):
            raise StateError(f"virtio {self.device.name}: the state has {len(state.queues)} queues, "
                             f"the device {len(self.queues)}")  # fmt: skip
        if state.driver_features & ~self.offered_features:
            raise StateError(f"virtio {self.device.name}: the state's driver features "
                             f"{state.driver_features:#x} were never offered by this device")  # fmt: skip
        with self.lock:
            self.reset()
            for queue, queue_state in zip(self.queues, state.queues):
                queue.restore_state(queue_state, self.memory)
            self.status, self.driver_features = state.status, state.driver_features
            self.device_features_sel, self.driver_features_sel = state.device_features_sel, state.driver_features_sel
            self.queue_sel, self.interrupt_status = state.queue_sel, state.interrupt_status
            self.config_generation = state.config_generation
            if self.status & FEATURES_OK:
                self.device.acknowledge(self.driver_features)
            if self.active:
                self._start_device()
