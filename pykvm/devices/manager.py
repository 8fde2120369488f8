"""The device manager: a machine's legacy port devices and its virtio-mmio slots.

Every device is attached here with what it declares: where it answers (a port range
or an MMIO window), the C fast-path entry that answers some of its accesses without
Python (if any), and its state (``save_state``/``restore_state``, see
:mod:`pykvm.devices.state`).  The manager owns the two buses, the fast table, the I/O
thread, and the eventfds that connect virtio queues and interrupts to KVM (one
ioeventfd per queue at QueueNotify, one irqfd per device); devices themselves never
see a file descriptor of KVM's (Firecracker's ``device_manager`` is the model).

virtio devices go into 4 KiB windows from :data:`~pykvm.x86.layout.VIRTIO_MMIO_START`,
each with the next of :data:`~pykvm.x86.interrupts.VIRTIO_IRQS`, in the order they are
attached; :meth:`DeviceManager.kernel_device_args` tells Linux where they are.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator, TypeVar

from ..errors import BusError, ConfigError, StateError
from ..kvm.fastpath import FastHandler, FastTable, Space
from ..x86 import layout
from ..x86.interrupts import VIRTIO_IRQS
from .bus import Bus, Device

if TYPE_CHECKING:
    from ..iothread import IoThread
    from ..kvm import Vm
    from ..memory import GuestMemory
    from .virtio.device import VirtioDevice
    from .virtio.mmio import VirtioMmioTransport

_Device = TypeVar("_Device", bound="VirtioDevice")


@dataclasses.dataclass
class AttachedDevice:
    """A device on a bus, and the fast handlers that answer some of its accesses in C."""

    name: str
    space: Space
    base: int
    size: int
    device: Device
    fast: tuple[FastHandler, ...] = ()


@dataclasses.dataclass
class VirtioSlot:
    """Where a virtio device sits: its MMIO window, its interrupt, its queue notifiers."""

    base: int
    gsi: int
    transport: VirtioMmioTransport
    notifiers: dict[int, int] = dataclasses.field(default_factory=dict)  # queue index -> ioeventfd

    @property
    def device(self) -> VirtioDevice:
        return self.transport.device


@dataclasses.dataclass(frozen=True)
class VirtioSlotState:
    """One virtio slot: which device it holds, its transport's registers (a
    :class:`~pykvm.devices.virtio.mmio.TransportState`), the device's own state."""

    device_id: int
    transport: Any
    device: Any


@dataclasses.dataclass(frozen=True)
class DevicesState:
    """Every device's state: the port devices by name, the virtio slots in order."""

    ports: tuple[tuple[str, Any], ...]
    virtio: tuple[VirtioSlotState, ...]


class DeviceManager:
    """The buses, the fast table, the I/O thread, and every device attached to them.

    ``virtio_notify`` is ``"ioeventfd"`` (notifications reach the I/O thread without an exit;
    interrupts leave through irqfds) or ``"sync"`` (QueueNotify is an MMIO exit handled on the
    vCPU thread; interrupts are KVM_IRQ_LINE pulses).
    """

    def __init__(self, vm: Vm, memory: GuestMemory, *, irqchip: bool, virtio_notify: str = "ioeventfd") -> None:
        self._vm = vm
        self._memory = memory
        self._irqchip = irqchip
        self._virtio_notify = virtio_notify
        self.pio = Bus("port I/O")
        self.mmio = Bus("MMIO", _mmio_reserved(memory, irqchip))
        self.fast = FastTable()
        self.devices: dict[str, AttachedDevice] = {}
        self.virtio: list[VirtioSlot] = []
        self._iothread: IoThread | None = None
        self._closers: list[Callable[[], None]] = []

    # --- attaching ---------------------------------------------------------------------------
    def attach(self, name: str, base: int, size: int, device: Device, *, space: Space = Space.PIO,
               fast: tuple[FastHandler, ...] = ()) -> AttachedDevice:  # fmt: skip
        """Put ``device`` on the port-I/O (or MMIO) bus over ``[base, base+size)``, under ``name``."""
        if name in self.devices:
            raise BusError(f"a device named {name!r} is already attached")
        (self.pio if space is Space.PIO else self.mmio).register(base, size, device)
        attached = self.devices[name] = AttachedDevice(name, space, base, size, device, fast)
        return attached

    def irq_line(self, gsi: int) -> Callable[[bool], None] | None:
        """What a level-triggered device calls to set its interrupt line (None without an irqchip)."""
        return functools.partial(self._vm.irq_line, gsi) if self._irqchip else None

    def attach_virtio(self, device: VirtioDevice) -> VirtioSlot:
        """Put ``device`` behind the next virtio-mmio window and IRQ (see :meth:`kernel_device_args`)."""
        from .virtio.mmio import MMIO_SIZE, VirtioMmioTransport

        index = len(self.virtio)
        if not self._irqchip:
            raise ConfigError("virtio devices need the in-kernel irqchip (irqchip=True)")
        if index >= len(VIRTIO_IRQS):
            raise ConfigError(f"at most {len(VIRTIO_IRQS)} virtio devices fit this machine's interrupt lines")
        base = layout.VIRTIO_MMIO_START + index * layout.VIRTIO_MMIO_STRIDE
        gsi = VIRTIO_IRQS[index]
        transport = VirtioMmioTransport(
            device, self._memory, self._interrupt(gsi), on_activate=self._wire_queues, on_reset=self._unwire_queues
        )
        slot = VirtioSlot(base, gsi, transport)
        self.attach(f"virtio{index}-{device.name}", base, MMIO_SIZE, transport, space=Space.MMIO)
        iothread = self._io_thread()
        for fd in device.host_fds():
            iothread.add(fd, functools.partial(device.on_host_readable, fd))
        device.host_fd_interest = functools.partial(self._follow_host_fd, device)
        self.virtio.append(slot)
        return slot

    def _io_thread(self) -> IoThread:
        if self._iothread is None:
            from ..iothread import IoThread

            self._iothread = IoThread()
            self._closers.append(self._iothread.close)
        return self._iothread

    def _follow_host_fd(self, device: VirtioDevice, fd: int, wanted: bool) -> None:
        """A device stops (or resumes) wanting its host input, e.g. a NIC whose guest has no buffers."""
        if wanted:
            self._io_thread().add(fd, functools.partial(device.on_host_readable, fd))
        else:
            self._io_thread().remove(fd)

    def _interrupt(self, gsi: int) -> Callable[[], None]:
        """An edge on ``gsi``: through an irqfd, or (synchronous mode) two KVM_IRQ_LINE calls."""
        if self._virtio_notify == "sync":
            vm = self._vm

            def edge() -> None:
                vm.irq_line(gsi, True)
                vm.irq_line(gsi, False)

            return edge
        fd = self._eventfd()
        self._vm.irqfd(fd, gsi)
        return functools.partial(os.eventfd_write, fd, 1)

    def _eventfd(self) -> int:
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._closers.append(functools.partial(os.close, fd))
        return fd

    def _slot(self, transport: VirtioMmioTransport) -> VirtioSlot:
        return next(slot for slot in self.virtio if slot.transport is transport)

    def _wire_queues(self, transport: VirtioMmioTransport) -> None:
        """DRIVER_OK: each ready queue's QueueNotify write signals an eventfd the I/O thread waits on."""
        from .virtio.mmio import QUEUE_NOTIFY

        if self._virtio_notify == "sync":
            return  # the write exits to the vCPU thread, which processes the queue itself
        slot = self._slot(transport)
        for index, queue in enumerate(transport.queues):
            if queue.ready:
                fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                self._vm.ioeventfd(fd, slot.base + QUEUE_NOTIFY, 4, pio=False, datamatch=index)
                self._io_thread().add(fd, functools.partial(_notified, fd, transport, index))
                slot.notifiers[index] = fd

    def _unwire_queues(self, transport: VirtioMmioTransport) -> None:
        from .virtio.mmio import QUEUE_NOTIFY

        slot = self._slot(transport)
        for index, fd in slot.notifiers.items():
            self._io_thread().remove(fd)
            self._vm.ioeventfd(fd, slot.base + QUEUE_NOTIFY, 4, pio=False, datamatch=index, deassign=True)
            os.close(fd)
        slot.notifiers.clear()

    def virtio_devices(self, kind: type[_Device]) -> list[_Device]:
        """The attached virtio devices of class ``kind``, in slot order."""
        return [slot.device for slot in self.virtio if isinstance(slot.device, kind)]

    def kernel_device_args(self) -> str:
        """The ``virtio_mmio.device=<size>@<addr>:<irq>`` arguments that tell Linux where the devices are."""
        return " ".join(f"virtio_mmio.device=4K@{slot.base:#x}:{slot.gsi}" for slot in self.virtio)

    # --- quiescing and state -----------------------------------------------------------------------
    @contextmanager
    def quiesced(self) -> Iterator[None]:
        """No device changes state inside: the I/O thread ran what was pending and is parked.

        The vCPUs must be paused first (they are what sends notifications).
        """
        if self._iothread is None:
            yield
            return
        self._iothread.quiesce()
        try:
            yield
        finally:
            self._iothread.resume()

    def save_state(self) -> DevicesState:
        """Every device's state (call it with the vCPUs paused, inside :meth:`quiesced`)."""
        ports = tuple(
            (name, attached.device.save_state())
            for name, attached in self.devices.items()
            if attached.space is Space.PIO and hasattr(attached.device, "save_state")
        )
        virtio = tuple(
            VirtioSlotState(slot.device.device_id, slot.transport.save_state(), slot.device.save_state())
            for slot in self.virtio
        )
        return DevicesState(ports, virtio)

    def restore_state(self, state: DevicesState) -> None:
        """Take ``state`` into the devices of a machine built from the same configuration."""
        if not isinstance(state, DevicesState):
            raise StateError(f"expected the devices' state, not {type(state).__name__}")
        ports = dict(state.ports) if isinstance(state.ports, tuple) else None
        expected = {name for name, a in self.devices.items() if a.space is Space.PIO and hasattr(a.device, "save_state")}
        if ports is None or set(ports) != expected:
            raise StateError(f"the saved port devices {sorted(ports or ())} are not this machine's {sorted(expected)}")
        if not isinstance(state.virtio, tuple) or len(state.virtio) != len(self.virtio):
            raise StateError(f"the state has {len(state.virtio)} virtio devices, this machine {len(self.virtio)}")
        for slot, saved in zip(self.virtio, state.virtio):
            if not isinstance(saved, VirtioSlotState) or saved.device_id != slot.device.device_id:
                raise StateError(f"virtio slot at {slot.base:#x}: the saved device is not a {slot.device.name}")
        for name, saved_port in ports.items():
            self.devices[name].device.restore_state(saved_port)  # type: ignore[attr-defined]
        for slot, saved in zip(self.virtio, state.virtio):
            slot.transport.restore_state(saved.transport)
            with slot.device.lock:
                slot.device.restore_state(saved.device)

    def kick_virtio_queues(self) -> None:
        """Process every ready queue of every active device once, as if notified.

        After a restore: a notification the guest sent just before the snapshot, or one whose
        ioeventfd did not exist yet, is not lost (an empty queue makes this a no-op).
        """
        for slot in self.virtio:
            for index, queue in enumerate(slot.transport.queues):
                if queue.ready:
                    slot.transport.notify(index)

    def close(self) -> None:
        """Stop the I/O thread, then close the eventfds (idempotent); the devices' owners close them."""
        if self._iothread is not None:
            self._iothread.close()
        for slot in self.virtio:
            for fd in slot.notifiers.values():
                os.close(fd)
            slot.notifiers.clear()
        while self._closers:
            self._closers.pop()()


def _mmio_reserved(memory: GuestMemory, irqchip: bool) -> list[tuple[int, int, str]]:
    """What an MMIO device may not claim: guest RAM, and the in-kernel interrupt controllers."""
    reserved = [(region.gpa, region.end, "guest RAM") for region in memory.regions]
    if irqchip:
        reserved += [(layout.IOAPIC_ADDR, layout.IOAPIC_ADDR + layout.PAGE_SIZE, "the in-kernel IOAPIC"),
                     (layout.LAPIC_ADDR, layout.LAPIC_ADDR + layout.PAGE_SIZE, "the in-kernel LAPIC")]  # fmt: skip
    return reserved


def _notified(fd: int, transport: VirtioMmioTransport, queue_index: int) -> None:
    os.eventfd_read(fd)
    transport.notify(queue_index)
