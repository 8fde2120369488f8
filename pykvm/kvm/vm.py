"""A KVM virtual machine file descriptor."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ..native import ffi, lib
from . import ioctls
from .vcpu import Vcpu

if TYPE_CHECKING:
    from .system import Kvm


class Vm:
    """A VM created by :meth:`Kvm.create_vm`: memory slots and the factory of vCPUs."""

    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.kvm = kvm
        self.fd = fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ioctl(self, request: ioctls.Ioctl, arg: object = 0, detail: str = "") -> int:
        return ioctls.ioctl(self.fd, request, arg, detail)

    def check_extension(self, cap: int) -> int:
        """See ``KVM_CHECK_EXTENSION`` on a VM fd (the answer may depend on the VM)."""
        return self._ioctl(ioctls.KVM_CHECK_EXTENSION, cap)

    def set_user_memory_region(self, slot: int, gpa: int, size: int, host_addr: int, flags: int = 0) -> None:
        """See ``KVM_SET_USER_MEMORY_REGION``: map ``size`` bytes at ``host_addr`` to ``gpa``.

        A size of 0 deletes the slot.
        """
        region = ffi.new("struct kvm_userspace_memory_region *")
        region.slot = slot
        region.flags = flags
        region.guest_phys_addr = gpa
        region.memory_size = size
        region.userspace_addr = host_addr
        self._ioctl(ioctls.KVM_SET_USER_MEMORY_REGION, region, f"slot {slot} at {gpa:#x}, {size:#x} bytes")

    def set_tss_addr(self, addr: int) -> None:
        """See ``KVM_SET_TSS_ADDR``: three pages of guest-physical space Intel hosts need for real mode."""
        self._ioctl(ioctls.KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        """See ``KVM_SET_IDENTITY_MAP_ADDR``: one page Intel hosts use for unpaged guests."""
        self._ioctl(ioctls.KVM_SET_IDENTITY_MAP_ADDR, ffi.new("__u64 *", addr))

    def enable_cap(self, cap: int, *args: int) -> None:
        """See ``KVM_ENABLE_CAP`` on a VM fd."""
        request = ffi.new("struct kvm_enable_cap *")
        request.cap = cap
        for i, value in enumerate(args):
            request.args[i] = value
        self._ioctl(ioctls.KVM_ENABLE_CAP, request, f"capability {cap}")

    def create_irqchip(self) -> None:
        """See ``KVM_CREATE_IRQCHIP``: the in-kernel PIC, IOAPIC and (per vCPU) LAPIC.

        Call it before creating vCPUs.
        """
        self._ioctl(ioctls.KVM_CREATE_IRQCHIP)

    def create_pit2(self, flags: int = 0) -> None:
        """See ``KVM_CREATE_PIT2``: the in-kernel i8254 PIT (needs the irqchip first)."""
        config = ffi.new("struct kvm_pit_config *")
        config.flags = flags
        self._ioctl(ioctls.KVM_CREATE_PIT2, config)

    def irq_line(self, irq: int, level: bool) -> None:
        """See ``KVM_IRQ_LINE``: set the level of global system interrupt ``irq``."""
        request = ffi.new("struct kvm_irq_level *")
        request.irq, request.level = irq, int(level)
        self._ioctl(ioctls.KVM_IRQ_LINE, request, f"GSI {irq}")

    def set_gsi_routing(self, routes: list[tuple[int, int, int]]) -> None:
        """See ``KVM_SET_GSI_ROUTING``: replace the routing with ``(gsi, irqchip, pin)`` entries."""
        header = ffi.sizeof("struct kvm_irq_routing")
        buf = ffi.new("char[]", header + len(routes) * ffi.sizeof("struct kvm_irq_routing_entry"))
        routing = ffi.cast("struct kvm_irq_routing *", buf)
        routing.nr = len(routes)
        entries = ffi.cast("struct kvm_irq_routing_entry *", buf + header)
        for entry, (gsi, chip, pin) in zip((entries[i] for i in range(len(routes))), routes):
            entry.gsi, entry.type = gsi, lib.KVM_IRQ_ROUTING_IRQCHIP
            entry.u.irqchip.irqchip, entry.u.irqchip.pin = chip, pin
        self._ioctl(ioctls.KVM_SET_GSI_ROUTING, routing)

    def irqfd(self, fd: int, gsi: int, *, deassign: bool = False) -> None:
        """See ``KVM_IRQFD``: a write to eventfd ``fd`` raises (edge) global interrupt ``gsi``."""
        request = ffi.new("struct kvm_irqfd *")
        request.fd, request.gsi = fd, gsi
        request.flags = lib.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0
        self._ioctl(ioctls.KVM_IRQFD, request, f"GSI {gsi}")

    def ioeventfd(
        self, fd: int, addr: int, length: int, *, pio: bool, datamatch: int | None = None, deassign: bool = False
    ) -> None:
        """See ``KVM_IOEVENTFD``: guest writes to ``addr`` signal eventfd ``fd`` without an exit.

        ``length`` 0 matches any width (MMIO only); ``datamatch`` limits it to one value.
        """
        request = ffi.new("struct kvm_ioeventfd *")
        request.addr, request.len, request.fd = addr, length, fd
        request.flags = (
            (lib.KVM_IOEVENTFD_FLAG_PIO if pio else 0)
            | (lib.KVM_IOEVENTFD_FLAG_DATAMATCH if datamatch is not None else 0)
            | (lib.KVM_IOEVENTFD_FLAG_DEASSIGN if deassign else 0)
        )
        request.datamatch = datamatch or 0
        self._ioctl(ioctls.KVM_IOEVENTFD, request, f"{'port' if pio else 'MMIO'} {addr:#x}")

    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        """See ``KVM_CREATE_VCPU``: a new vCPU with its ``kvm_run`` area mapped."""
        fd = self._ioctl(ioctls.KVM_CREATE_VCPU, vcpu_id)
        try:
            return Vcpu(fd, vcpu_id, self.kvm.vcpu_mmap_size())
        except BaseException:
            os.close(fd)
            raise
