"""The virtio-mmio transport, version 2 (virtio 1.2, section 4.2).

The transport owns the register file: magic and version, feature pages, the status
state machine (including FAILED, DEVICE_NEEDS_RESET and reset by writing 0), queue
selection and configuration, the interrupt status and its acknowledgement, and the
configuration generation.  A device (:class:`~pykvm.devices.virtio.device.VirtioDevice`)
offers its id, features, configuration bytes and queue sizes, and is activated when
the driver sets DRIVER_OK.  Queue fields may only change while the driver is setting
the device up (FEATURES_OK set, DRIVER_OK not) and the queue is not ready, as
rust-vmm's virtio-device requires.  Accesses the spec forbids are ignored, counted in
``stats`` and logged at debug level; nothing a driver writes raises.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import Callable

from ...memory import GuestMemory
from .device import VirtioDevice
from .queue import QueueError, SplitQueue

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


class VirtioMmioTransport:
    """The virtio-mmio register file in front of one device; registered on the MMIO bus.

    ``interrupt`` raises the device's interrupt line (an edge, e.g. an irqfd write);
    ``on_activate`` / ``on_reset`` let the machine wire and unwire queue notifications.
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
        self.lock = threading.RLock()  # register accesses (vCPU) and queue work (I/O thread)
        self.stats: Counter[str] = Counter()
        self.queues = [SplitQueue(size) for size in device.queue_max_sizes]
        self.config_generation = 0
        self._reset_state()
        device.bind(self)

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
                    self.needs_reset(f"cannot activate: {err}")
                    return
        self.device.activate(self.driver_features)
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
                self.needs_reset(str(err))

    # --- from the device ---------------------------------------------------------------
    def used(self, queue_index: int) -> None:
        """The device put buffers in the used ring: interrupt, unless the driver suppressed it."""
        if self.queues[queue_index].needs_interrupt(self.memory):
            self.interrupt_status |= INTERRUPT_USED_BUFFER
            self.stats["interrupts"] += 1
            self._interrupt()

    def config_changed(self) -> None:
        """The device's configuration changed: new generation, configuration change interrupt."""
        self.config_generation = (self.config_generation + 1) & _WORD
        self.interrupt_status |= INTERRUPT_CONFIG_CHANGE
        if self.status & DRIVER_OK:
            self._interrupt()

    def needs_reset(self, reason: str) -> None:
        """The driver broke the protocol: DEVICE_NEEDS_RESET, and tell it (2.1.2)."""
        log.warning("virtio %s: %s; the device needs a reset", self.device.name, reason)
        self.stats["needs_reset"] += 1
        self.status |= DEVICE_NEEDS_RESET
        self.device.reset()
        self.config_changed()
