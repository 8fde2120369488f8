"""A KVM virtual machine file descriptor."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Sequence

from ..errors import StateError
from ..native import ffi, lib
from . import ioctls
from .convert import check_present, check_size, new_struct, to_record
from .fam import IRQ_ROUTING
from .state import ClockData, MemorySlot, VmState
from .vcpu import Vcpu

if TYPE_CHECKING:
    from .dirty_bitmap import DirtyBitmap  # imported where it is used: running a guest needs no dirty log
    from .system import Kvm

# What KVM_SET_GUEST_DEBUG has accepted on x86 since it exists (before KVM_CAP_SET_GUEST_DEBUG2 said so).
_X86_GUEST_DEBUG_FLAGS: int = (
    lib.KVM_GUESTDBG_ENABLE | lib.KVM_GUESTDBG_SINGLESTEP | lib.KVM_GUESTDBG_USE_SW_BP | lib.KVM_GUESTDBG_USE_HW_BP
)
# The in-kernel irqchip's parts, by their VmState field; each one's state fills kvm_irqchip's chip union.
IRQCHIPS = {
    "pic_master": lib.KVM_IRQCHIP_PIC_MASTER,
    "pic_slave": lib.KVM_IRQCHIP_PIC_SLAVE,
    "ioapic": lib.KVM_IRQCHIP_IOAPIC,
}
_CHIP_SIZE = ffi.sizeof(ffi.new("struct kvm_irqchip *").chip)
_PIT_SIZE = ffi.sizeof("struct kvm_pit_state2")


class Vm:
    """A VM created by :meth:`Kvm.create_vm`: memory slots, in-kernel devices, the factory of vCPUs.

    It remembers the memory slots it registered (their size sizes the dirty log) and
    whether it made the in-kernel irqchip and PIT (what :meth:`save_state` can save).
    """

    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.kvm = kvm
        self.fd = fd
        self.in_kernel_irqchip = False
        self.in_kernel_pit = False
        self._slots: dict[int, MemorySlot] = {}

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

    def xsave2_size(self) -> int:
        """``KVM_CAP_XSAVE2``: the bytes of a vCPU's XSAVE area, for ``KVM_GET_XSAVE2`` (0: not offered)."""
        return self.check_extension(lib.KVM_CAP_XSAVE2)

    def manual_dirty_log_protect2(self) -> int:
        """``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2``: the ``KVM_DIRTY_LOG_*`` flags offered (0: not offered)."""
        return self.check_extension(lib.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)

    def set_guest_debug_flags(self) -> int:
        """``KVM_CAP_SET_GUEST_DEBUG2``: the ``KVM_GUESTDBG_*`` flags ``KVM_SET_GUEST_DEBUG`` takes (0: none).

        Older kernels only say ``KVM_CAP_SET_GUEST_DEBUG``: then the flags x86 always had.
        """
        flags = self.check_extension(lib.KVM_CAP_SET_GUEST_DEBUG2)
        if not flags and self.check_extension(lib.KVM_CAP_SET_GUEST_DEBUG):
            return _X86_GUEST_DEBUG_FLAGS
        return flags

    # --- memory ----------------------------------------------------------------------
    def set_user_memory_region(self, slot: int, gpa: int, size: int, host_addr: int, flags: int = 0) -> None:
        """See ``KVM_SET_USER_MEMORY_REGION``: map ``size`` bytes at ``host_addr`` to ``gpa``.

        A size of 0 deletes the slot.  ``flags``: ``KVM_MEM_LOG_DIRTY_PAGES``, ``KVM_MEM_READONLY``.
        """
        region = ffi.new("struct kvm_userspace_memory_region *")
        region.slot = slot
        region.flags = flags
        region.guest_phys_addr = gpa
        region.memory_size = size
        region.userspace_addr = host_addr
        self._ioctl(ioctls.KVM_SET_USER_MEMORY_REGION, region, f"slot {slot} at {gpa:#x}, {size:#x} bytes")
        if size:
            self._slots[slot] = MemorySlot(slot, gpa, size, host_addr, flags)
        else:
            self._slots.pop(slot, None)

    def memory_slots(self) -> list[MemorySlot]:
        """The memory slots registered through this VM, by slot number."""
        return [self._slots[slot] for slot in sorted(self._slots)]

    def _slot(self, slot: int) -> MemorySlot:
        try:
            return self._slots[slot]
        except KeyError:
            raise StateError(f"memory slot {slot} is not registered in this VM") from None

    def set_dirty_logging(self, slot: int, enabled: bool = True) -> None:
        """Start (or stop) logging the guest's writes to memory slot ``slot``.

        The slot is registered again with ``KVM_MEM_LOG_DIRTY_PAGES`` set (or cleared);
        its memory is untouched.
        """
        region = self._slot(slot)
        flags = region.flags | lib.KVM_MEM_LOG_DIRTY_PAGES if enabled else region.flags & ~lib.KVM_MEM_LOG_DIRTY_PAGES
        self.set_user_memory_region(slot, region.gpa, region.size, region.host_addr, flags)

    def get_dirty_log(self, slot: int) -> DirtyBitmap:
        """See ``KVM_GET_DIRTY_LOG``: the pages of ``slot`` the guest wrote since the last call.

        Each call starts the log afresh (KVM write-protects the reported pages again), unless
        manual protection is on (:meth:`enable_manual_dirty_log_protect`): then the pages stay
        reported until :meth:`clear_dirty_log`.  Writes by the host are not logged.
        """
        from .dirty_bitmap import PAGE_SIZE, DirtyBitmap, bitmap_size

        region = self._slot(slot)
        pages = region.size // PAGE_SIZE
        bitmap = ffi.new("char[]", bitmap_size(pages))
        request = ffi.new("struct kvm_dirty_log *")
        request.slot, request.dirty_bitmap = slot, bitmap
        self._ioctl(ioctls.KVM_GET_DIRTY_LOG, request, f"slot {slot}")
        return DirtyBitmap(slot, region.gpa, pages, ffi.buffer(bitmap)[:])

    def enable_manual_dirty_log_protect(self, initially_set: bool = False) -> None:
        """``KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)``: :meth:`get_dirty_log` no longer
        resets the log; :meth:`clear_dirty_log` resets (and write-protects) only the pages asked.

        ``initially_set``: a slot whose logging starts reports every page dirty at first
        (``KVM_DIRTY_LOG_INITIALLY_SET``), sparing KVM the write-protection of the whole slot.
        """
        flags = lib.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | (lib.KVM_DIRTY_LOG_INITIALLY_SET if initially_set else 0)
        self.enable_cap(lib.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, flags)

    def clear_dirty_log(self, dirty: DirtyBitmap) -> None:
        """See ``KVM_CLEAR_DIRTY_LOG``: forget the pages ``dirty`` reports (as :meth:`get_dirty_log`
        gave it) and write-protect them again, so that the next write to one is logged."""
        from .dirty_bitmap import PAGE_SIZE

        region = self._slot(dirty.slot)
        if dirty.pages != region.size // PAGE_SIZE:
            raise StateError(
                f"a dirty bitmap of {dirty.pages} pages does not cover slot {dirty.slot} of {region.size:#x} bytes"
            )
        request = ffi.new("struct kvm_clear_dirty_log *")
        bitmap = ffi.new("char[]", dirty.bitmap)
        request.slot, request.first_page, request.num_pages, request.dirty_bitmap = dirty.slot, 0, dirty.pages, bitmap
        self._ioctl(ioctls.KVM_CLEAR_DIRTY_LOG, request, f"slot {dirty.slot}")

    # --- set-up, in-kernel devices, interrupts ---------------------------------------------
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
        self.in_kernel_irqchip = True

    def create_pit2(self, flags: int = 0) -> None:
        """See ``KVM_CREATE_PIT2``: the in-kernel i8254 PIT (needs the irqchip first)."""
        config = ffi.new("struct kvm_pit_config *")
        config.flags = flags
        self._ioctl(ioctls.KVM_CREATE_PIT2, config)
        self.in_kernel_pit = True

    def irq_line(self, irq: int, level: bool) -> None:
        """See ``KVM_IRQ_LINE``: set the level of global system interrupt ``irq``."""
        request = ffi.new("struct kvm_irq_level *")
        request.irq, request.level = irq, int(level)
        self._ioctl(ioctls.KVM_IRQ_LINE, request, f"GSI {irq}")

    def set_gsi_routing(self, routes: Sequence[tuple[int, int, int]]) -> None:
        """See ``KVM_SET_GSI_ROUTING``: replace the routing with ``(gsi, irqchip, pin)`` entries."""
        self._ioctl(ioctls.KVM_SET_GSI_ROUTING, IRQ_ROUTING.build(routes, _fill_irqchip_route))

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

    # --- in-kernel device state ------------------------------------------------------
    def get_irqchip(self, chip_id: int) -> bytes:
        """See ``KVM_GET_IRQCHIP``: one in-kernel chip (``KVM_IRQCHIP_PIC_MASTER``, ``_PIC_SLAVE``,
        ``_IOAPIC``) as the bytes of ``struct kvm_irqchip``'s ``chip``."""
        request = ffi.new("struct kvm_irqchip *")
        request.chip_id = chip_id
        self._ioctl(ioctls.KVM_GET_IRQCHIP, request, f"chip {chip_id}")
        return bytes(ffi.buffer(ffi.addressof(request, "chip")))

    def set_irqchip(self, chip_id: int, chip: bytes) -> None:
        """See ``KVM_SET_IRQCHIP``; ``chip`` as :meth:`get_irqchip` gave it."""
        check_size(ioctls.KVM_SET_IRQCHIP.name, chip, _CHIP_SIZE)
        request = ffi.new("struct kvm_irqchip *")
        request.chip_id = chip_id
        ffi.memmove(ffi.addressof(request, "chip"), chip, len(chip))
        self._ioctl(ioctls.KVM_SET_IRQCHIP, request, f"chip {chip_id}")

    def get_pit2(self) -> bytes:
        """See ``KVM_GET_PIT2``: the in-kernel PIT's three channels and flags (``struct kvm_pit_state2``)."""
        state = ffi.new("struct kvm_pit_state2 *")
        self._ioctl(ioctls.KVM_GET_PIT2, state)
        return bytes(ffi.buffer(state))

    def set_pit2(self, pit: bytes) -> None:
        """See ``KVM_SET_PIT2``.  KVM restarts each channel's count at this moment (``count_load_time``)."""
        check_size(ioctls.KVM_SET_PIT2.name, pit, _PIT_SIZE)
        self._ioctl(ioctls.KVM_SET_PIT2, ffi.from_buffer(pit))

    def get_clock(self) -> ClockData:
        """See ``KVM_GET_CLOCK``: the VM's kvmclock, in ns."""
        clock = ffi.new("struct kvm_clock_data *")
        self._ioctl(ioctls.KVM_GET_CLOCK, clock)
        return to_record(ClockData, clock)

    def set_clock(self, clock: ClockData) -> None:
        """See ``KVM_SET_CLOCK``.  With ``KVM_CLOCK_REALTIME`` in ``flags``, KVM adds the wall time
        passed since ``clock.realtime``; without, the clock goes on from ``clock.clock``."""
        self._ioctl(ioctls.KVM_SET_CLOCK, new_struct("struct kvm_clock_data", clock))

    # --- the whole state --------------------------------------------------------------
    def save_state(self) -> VmState:
        """The kvmclock and, where this VM has them, the PICs, IOAPIC and PIT (Firecracker's order)."""
        pit = self.get_pit2() if self.in_kernel_pit else None
        clock = self.get_clock()
        chips = {name: self.get_irqchip(chip) for name, chip in IRQCHIPS.items()} if self.in_kernel_irqchip else {}
        return VmState(clock=clock, pit=pit, **chips)

    def restore_state(self, state: VmState) -> None:
        """Make this VM's in-kernel devices and clock what :meth:`save_state` saw; sizes are checked first.

        The kvmclock goes on from the saved value, as if the VM had been paused (no
        ``KVM_CLOCK_REALTIME``: a restore that should count the time in between sets the
        clock itself).  Restore the VM before its vCPUs.

        The interrupt controllers go first, the PIT after them (Firecracker sets the PIT first):
        KVM injects the next PIT tick only once the guest acknowledged the last one, so a tick
        that fired into the controllers before their restore would be wiped by it, never
        acknowledged, and the PIT would never interrupt again.
        """
        self._check_state(state)
        for name, chip in IRQCHIPS.items():
            data = getattr(state, name)
            if data is not None:
                self.set_irqchip(chip, data)
        if state.pit is not None:
            self.set_pit2(state.pit)
        self.set_clock(ClockData(clock=state.clock.clock))

    def _check_state(self, state: VmState) -> None:
        present = {name: self.in_kernel_irqchip for name in IRQCHIPS} | {"pit": self.in_kernel_pit}
        sizes = dict.fromkeys(IRQCHIPS, _CHIP_SIZE) | {"pit": _PIT_SIZE}
        for name, here in present.items():
            saved = getattr(state, name)
            check_present(name, saved, here)
            if saved is not None:
                check_size(f"VM state {name}", saved, sizes[name])

    # --- vCPUs -------------------------------------------------------------------------
    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        """See ``KVM_CREATE_VCPU``: a new vCPU with its ``kvm_run`` area mapped."""
        fd = self._ioctl(ioctls.KVM_CREATE_VCPU, vcpu_id)
        try:
            return Vcpu(
                fd,
                vcpu_id,
                self.kvm.vcpu_mmap_size(),
                xsave_size=self.xsave2_size(),
                in_kernel_lapic=self.in_kernel_irqchip,
            )
        except BaseException:
            os.close(fd)
            raise


def _fill_irqchip_route(entry: Any, route: tuple[int, int, int]) -> None:
    gsi, chip, pin = route
    entry.gsi, entry.type = gsi, lib.KVM_IRQ_ROUTING_IRQCHIP
    entry.u.irqchip.irqchip, entry.u.irqchip.pin = chip, pin
