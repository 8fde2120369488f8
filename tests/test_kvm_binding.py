"""The /dev/kvm binding: ioctl numbers, capability queries, errors that name the ioctl."""

from __future__ import annotations

import errno

import pytest

from pykvm.errors import KvmIoctlError, KvmUnavailableError
from pykvm.kvm import Kvm, ioctls
from pykvm.native import lib

pytestmark = pytest.mark.kvm


def test_ioctl_numbers_computed_with_ioctl_opt_equal_linux_kvm_h() -> None:
    for request in ioctls.ALL:
        assert request.number == getattr(lib, request.name), request.name


def test_every_ioctl_used_is_listed() -> None:
    assert {"KVM_RUN", "KVM_CREATE_VM", "KVM_SET_USER_MEMORY_REGION", "KVM_SET_CPUID2"} <= {r.name for r in ioctls.ALL}


def test_api_version_is_12_and_capabilities_answer() -> None:
    with Kvm() as kvm:
        assert kvm.api_version() == 12
        assert kvm.check_extension(lib.KVM_CAP_USER_MEMORY) == 1
        assert kvm.check_extension(lib.KVM_CAP_NR_MEMSLOTS) > 0
        assert kvm.vcpu_mmap_size() >= 4096


def test_supported_cpuid_and_msr_list_are_read() -> None:
    with Kvm() as kvm:
        leaves = kvm.supported_cpuid()
        assert any(leaf.function == 0 for leaf in leaves)
        assert any(leaf.function == 1 for leaf in leaves)
        assert 0xC0000080 in kvm.msr_index_list() or len(kvm.msr_index_list()) > 0


def test_failing_ioctl_names_the_ioctl_and_errno() -> None:
    with Kvm() as kvm, kvm.create_vm() as vm:
        with pytest.raises(KvmIoctlError) as info:
            vm.set_user_memory_region(0, 0x123, 4096, 0x1000)  # unaligned guest address
    assert info.value.ioctl == "KVM_SET_USER_MEMORY_REGION"
    assert info.value.errno == errno.EINVAL
    assert "KVM_SET_USER_MEMORY_REGION failed" in str(info.value) and "EINVAL" in str(info.value)


def test_creating_a_vcpu_with_an_impossible_id_names_create_vcpu() -> None:
    with Kvm() as kvm, kvm.create_vm() as vm:
        with pytest.raises(KvmIoctlError) as info:
            vm.create_vcpu(1 << 30)
    assert info.value.ioctl == "KVM_CREATE_VCPU"


def test_missing_device_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(KvmUnavailableError, match="does not exist"):
        Kvm(str(tmp_path / "kvm"))


def test_a_device_that_is_not_kvm_is_a_clear_error() -> None:
    with pytest.raises(KvmUnavailableError, match="is not a KVM device"):
        Kvm("/dev/null")


def test_registers_round_trip_through_set_and_get() -> None:
    with Kvm() as kvm, kvm.create_vm() as vm, vm.create_vcpu(0) as vcpu:
        regs = vcpu.get_regs()
        regs.rax, regs.r15, regs.rip = 0x1122334455667788, 42, 0x7C00
        vcpu.set_regs(regs)
        assert vcpu.get_regs() == regs
        sregs = vcpu.get_sregs()
        sregs.cs.base, sregs.cs.selector = 0x10000, 0x1000
        vcpu.set_sregs(sregs)
        assert vcpu.get_sregs().cs.selector == 0x1000


def test_the_irqchip_ids_of_the_pure_interrupt_wiring_are_kvms() -> None:
    from pykvm.x86.interrupts import Irqchip

    assert (Irqchip.PIC_MASTER, Irqchip.PIC_SLAVE, Irqchip.IOAPIC) == (
        lib.KVM_IRQCHIP_PIC_MASTER, lib.KVM_IRQCHIP_PIC_SLAVE, lib.KVM_IRQCHIP_IOAPIC,
    )  # fmt: skip
