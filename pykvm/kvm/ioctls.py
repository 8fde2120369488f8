"""KVM ioctl request numbers, computed with ioctl-opt from the struct sizes cffi reports.

Each request is an :class:`Ioctl`, which carries its name so that a failure can say
which ioctl failed.  ``tests/test_kvm_ioctls.py`` checks every number against
``<linux/kvm.h>``.
"""

from __future__ import annotations

from typing import NamedTuple

from ioctl_opt import IOC, IOC_NONE, IOC_READ, IOC_WRITE

from ..native import check, ffi, lib

KVMIO = 0xAE


class Ioctl(NamedTuple):
    name: str
    number: int


def ioctl(fd: int, request: Ioctl, arg: object = 0, detail: str = "") -> int:
    """Issue ``request`` on ``fd`` with an integer or a cffi pointer argument.

    Returns the ioctl's non-negative result; a failure raises
    :class:`~pykvm.errors.KvmIoctlError` naming the ioctl, the errno and ``detail``.
    """
    if isinstance(arg, int):
        return check(lib.pykvm_ioctl_value(fd, request.number, arg), request.name, detail)
    return check(lib.pykvm_ioctl(fd, request.number, arg), request.name, detail)


def _io(name: str, nr: int) -> Ioctl:
    return Ioctl(name, IOC(IOC_NONE, KVMIO, nr, 0))


def _ior(name: str, nr: int, ctype: str) -> Ioctl:
    return Ioctl(name, IOC(IOC_READ, KVMIO, nr, ffi.sizeof(ctype)))


def _iow(name: str, nr: int, ctype: str) -> Ioctl:
    return Ioctl(name, IOC(IOC_WRITE, KVMIO, nr, ffi.sizeof(ctype)))


def _iowr(name: str, nr: int, ctype: str) -> Ioctl:
    return Ioctl(name, IOC(IOC_READ | IOC_WRITE, KVMIO, nr, ffi.sizeof(ctype)))


# system ioctls
KVM_GET_API_VERSION = _io("KVM_GET_API_VERSION", 0x00)
KVM_CREATE_VM = _io("KVM_CREATE_VM", 0x01)
KVM_GET_MSR_INDEX_LIST = _iowr("KVM_GET_MSR_INDEX_LIST", 0x02, "struct kvm_msr_list")
KVM_CHECK_EXTENSION = _io("KVM_CHECK_EXTENSION", 0x03)
KVM_GET_VCPU_MMAP_SIZE = _io("KVM_GET_VCPU_MMAP_SIZE", 0x04)
KVM_GET_SUPPORTED_CPUID = _iowr("KVM_GET_SUPPORTED_CPUID", 0x05, "struct kvm_cpuid2")
# VM ioctls
KVM_CREATE_VCPU = _io("KVM_CREATE_VCPU", 0x41)
KVM_GET_DIRTY_LOG = _iow("KVM_GET_DIRTY_LOG", 0x42, "struct kvm_dirty_log")
KVM_SET_USER_MEMORY_REGION = _iow("KVM_SET_USER_MEMORY_REGION", 0x46, "struct kvm_userspace_memory_region")
KVM_SET_TSS_ADDR = _io("KVM_SET_TSS_ADDR", 0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow("KVM_SET_IDENTITY_MAP_ADDR", 0x48, "__u64")
KVM_CREATE_IRQCHIP = _io("KVM_CREATE_IRQCHIP", 0x60)
KVM_IRQ_LINE = _iow("KVM_IRQ_LINE", 0x61, "struct kvm_irq_level")
KVM_GET_IRQCHIP = _iowr("KVM_GET_IRQCHIP", 0x62, "struct kvm_irqchip")
KVM_SET_IRQCHIP = _ior("KVM_SET_IRQCHIP", 0x63, "struct kvm_irqchip")  # _IOR in <linux/kvm.h>, as it always was
KVM_SET_GSI_ROUTING = _iow("KVM_SET_GSI_ROUTING", 0x6A, "struct kvm_irq_routing")
KVM_CREATE_PIT2 = _iow("KVM_CREATE_PIT2", 0x77, "struct kvm_pit_config")
KVM_IRQFD = _iow("KVM_IRQFD", 0x76, "struct kvm_irqfd")
KVM_IOEVENTFD = _iow("KVM_IOEVENTFD", 0x79, "struct kvm_ioeventfd")
KVM_SET_CLOCK = _iow("KVM_SET_CLOCK", 0x7B, "struct kvm_clock_data")
KVM_GET_CLOCK = _ior("KVM_GET_CLOCK", 0x7C, "struct kvm_clock_data")
KVM_GET_PIT2 = _ior("KVM_GET_PIT2", 0x9F, "struct kvm_pit_state2")
KVM_SET_PIT2 = _iow("KVM_SET_PIT2", 0xA0, "struct kvm_pit_state2")
KVM_ENABLE_CAP = _iow("KVM_ENABLE_CAP", 0xA3, "struct kvm_enable_cap")
KVM_CLEAR_DIRTY_LOG = _iowr("KVM_CLEAR_DIRTY_LOG", 0xC0, "struct kvm_clear_dirty_log")
# vCPU ioctls
KVM_RUN = _io("KVM_RUN", 0x80)
KVM_GET_REGS = _ior("KVM_GET_REGS", 0x81, "struct kvm_regs")
KVM_SET_REGS = _iow("KVM_SET_REGS", 0x82, "struct kvm_regs")
KVM_GET_SREGS = _ior("KVM_GET_SREGS", 0x83, "struct kvm_sregs")
KVM_SET_SREGS = _iow("KVM_SET_SREGS", 0x84, "struct kvm_sregs")
KVM_TRANSLATE = _iowr("KVM_TRANSLATE", 0x85, "struct kvm_translation")
KVM_GET_MSRS = _iowr("KVM_GET_MSRS", 0x88, "struct kvm_msrs")
KVM_SET_MSRS = _iow("KVM_SET_MSRS", 0x89, "struct kvm_msrs")
KVM_GET_FPU = _ior("KVM_GET_FPU", 0x8C, "struct kvm_fpu")
KVM_SET_FPU = _iow("KVM_SET_FPU", 0x8D, "struct kvm_fpu")
KVM_GET_LAPIC = _ior("KVM_GET_LAPIC", 0x8E, "struct kvm_lapic_state")
KVM_SET_LAPIC = _iow("KVM_SET_LAPIC", 0x8F, "struct kvm_lapic_state")
KVM_SET_CPUID2 = _iow("KVM_SET_CPUID2", 0x90, "struct kvm_cpuid2")
KVM_GET_CPUID2 = _iowr("KVM_GET_CPUID2", 0x91, "struct kvm_cpuid2")
KVM_GET_MP_STATE = _ior("KVM_GET_MP_STATE", 0x98, "struct kvm_mp_state")
KVM_SET_MP_STATE = _iow("KVM_SET_MP_STATE", 0x99, "struct kvm_mp_state")
KVM_SET_GUEST_DEBUG = _iow("KVM_SET_GUEST_DEBUG", 0x9B, "struct kvm_guest_debug")
KVM_GET_VCPU_EVENTS = _ior("KVM_GET_VCPU_EVENTS", 0x9F, "struct kvm_vcpu_events")
KVM_SET_VCPU_EVENTS = _iow("KVM_SET_VCPU_EVENTS", 0xA0, "struct kvm_vcpu_events")
KVM_GET_DEBUGREGS = _ior("KVM_GET_DEBUGREGS", 0xA1, "struct kvm_debugregs")
KVM_SET_DEBUGREGS = _iow("KVM_SET_DEBUGREGS", 0xA2, "struct kvm_debugregs")
KVM_GET_XSAVE = _ior("KVM_GET_XSAVE", 0xA4, "struct kvm_xsave")
KVM_SET_XSAVE = _iow("KVM_SET_XSAVE", 0xA5, "struct kvm_xsave")
KVM_GET_XCRS = _ior("KVM_GET_XCRS", 0xA6, "struct kvm_xcrs")
KVM_SET_XCRS = _iow("KVM_SET_XCRS", 0xA7, "struct kvm_xcrs")
KVM_GET_XSAVE2 = _ior("KVM_GET_XSAVE2", 0xCF, "struct kvm_xsave")

ALL = tuple(value for value in dict(globals()).values() if isinstance(value, Ioctl))
