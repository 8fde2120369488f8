"""vCPU and VM state on /dev/kvm: every state ioctl round-trips, bad state is refused before any
ioctl, and a guest snapshotted half-way goes on in a brand-new machine as the original does."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import pytest

from conftest import guest
from pykvm import Machine
from pykvm.errors import StateError
from pykvm.kvm import ioctls
from pykvm.kvm.exits import DebugPortExit, IoExit
from pykvm.kvm.state import ClockData, VcpuState
from pykvm.native import ffi, lib
from pykvm.result import ExitReason
from pykvm.x86.cpu import vcpu_cpuid
from vcpu_watchdog import run_watched

pytestmark = pytest.mark.kvm

SNAPSHOT_GUEST = "snapshot.bin"
HALF_WAY = 0x40  # snapshot.asm's debug-exit value at its half-way point
LCG_STEPS = 2 * 2000  # snapshot.asm's ROUNDS before and after the half-way point
MSR_IA32_TSC = 0x10  # the host TSC on this backend, and moving on hardware: never equal twice
VCPU_BLOBS = ["fpu", "xsave", "xcrs", "debugregs", "lapic", "vcpu_events"]


def lcg_after(steps: int, x: int = 0x0123456789ABCDEF) -> int:
    """snapshot.asm's LCG, stepped here to check the guest's own answer."""
    for _ in range(steps):
        x = (x * 6364136223846793005 + 1442695040888963407) % (1 << 64)
    return x


def half_way(machine_factory, **options) -> Machine:
    """A machine whose snapshot.bin guest stopped at its half-way point: PIC, PIT, MSRs, XMM, stack set."""
    machine = machine_factory(memory="64M", **options)
    machine.load(guest(SNAPSHOT_GUEST), mode="long")
    result = machine.run(timeout=60)
    assert (result.reason, result.exit_value) == (ExitReason.DEBUG_EXIT, HALF_WAY), result.diagnosis
    return machine


@pytest.fixture
def paused(machine_factory) -> Machine:
    return half_way(machine_factory)


def forbid_ioctls(monkeypatch) -> None:
    def forbidden(fd, request, arg=0, detail=""):
        raise AssertionError(f"{request.name} was issued")

    monkeypatch.setattr(ioctls, "ioctl", forbidden)


# --- each ioctl ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", VCPU_BLOBS)
def test_a_vcpu_state_blob_round_trips(paused, name) -> None:
    vcpu = paused.vcpus[0]
    before = getattr(vcpu, f"get_{name}")()
    getattr(vcpu, f"set_{name}")(before)
    assert getattr(vcpu, f"get_{name}")() == before


@pytest.mark.parametrize("name", VCPU_BLOBS)
def test_a_vcpu_state_blob_of_the_wrong_size_is_refused_before_any_ioctl(paused, name, monkeypatch) -> None:
    vcpu = paused.vcpus[0]
    blob = getattr(vcpu, f"get_{name}")()
    forbid_ioctls(monkeypatch)
    with pytest.raises(StateError, match=f"{len(blob) - 1} bytes given, this host's KVM uses {len(blob)}"):
        getattr(vcpu, f"set_{name}")(blob[:-1])


@pytest.mark.parametrize(
    "set_blob, size",
    [
        (lambda vm, blob: vm.set_irqchip(lib.KVM_IRQCHIP_IOAPIC, blob), 512),
        (lambda vm, blob: vm.set_pit2(blob), ffi.sizeof("struct kvm_pit_state2")),
    ],
    ids=["irqchip", "pit2"],
)
def test_a_vm_state_blob_of_the_wrong_size_is_refused_before_any_ioctl(paused, set_blob, size, monkeypatch) -> None:
    forbid_ioctls(monkeypatch)
    with pytest.raises(StateError, match=f"{size + 8} bytes given, this host's KVM uses {size}"):
        set_blob(paused.vm, bytes(size + 8))


def test_xsave_uses_the_size_kvm_cap_xsave2_gives(paused) -> None:
    offered = paused.vm.xsave2_size()
    assert len(paused.vcpus[0].get_xsave()) == max(offered, ffi.sizeof("struct kvm_xsave"))


@pytest.mark.parametrize("chip", ["pic_master", "pic_slave", "ioapic"])
def test_an_irqchip_round_trips(paused, chip) -> None:
    chip_id = getattr(lib, f"KVM_IRQCHIP_{chip.upper()}")
    before = paused.vm.get_irqchip(chip_id)
    paused.vm.set_irqchip(chip_id, before)
    assert paused.vm.get_irqchip(chip_id) == before


def test_the_pic_state_shows_what_the_guest_programmed(paused) -> None:
    master = paused.vm.get_irqchip(lib.KVM_IRQCHIP_PIC_MASTER)
    # struct kvm_pic_state: last_irr, irr, imr, isr, priority_add, irq_base, ...
    assert (master[2], master[5]) == (0xFE, 0x20)  # only IRQ 0 unmasked; IRQs 0-7 at vector 0x20


def test_the_pit_round_trips_but_for_the_moment_its_counts_restart(paused) -> None:
    """KVM_SET_PIT2 reloads each channel's count now, so count_load_time is the one field that moves."""
    before = paused.vm.get_pit2()
    paused.vm.set_pit2(before)
    after = paused.vm.get_pit2()

    def without_load_times(blob: bytes) -> bytes:
        pit = ffi.new("struct kvm_pit_state2 *")
        ffi.memmove(pit, blob, len(blob))
        for channel in pit.channels:
            channel.count_load_time = 0
        return ffi.buffer(pit)[:]

    assert without_load_times(after) == without_load_times(before)
    assert ffi.from_buffer("struct kvm_pit_state2 *", before).channels[0].count == 1193  # the guest's 1 kHz


def test_a_pit_tick_during_a_restore_lands_in_the_restored_pic(paused, monkeypatch) -> None:
    """KVM re-injects PIT ticks one at a time: the next only once the guest acknowledged the last.  A tick
    that fires inside a restore must land in the restored PIC, or the PIC's restore wipes it, it is never
    acknowledged and the PIT never interrupts again.  The PIT runs at its fastest (KVM's 200 us floor) and
    each step of the restore takes a millisecond (a busy host's preemption), so that ticks fall inside it;
    the PIC is saved with IRQ 0 neither requested nor in service."""

    def slowly(step: Callable[..., None]) -> Callable[..., None]:
        def slow(*args: object) -> None:
            step(*args)
            time.sleep(0.001)

        return slow

    for name in ("set_pit2", "set_clock", "set_irqchip"):
        monkeypatch.setattr(paused.vm, name, slowly(getattr(paused.vm, name)))
    state = paused.vm.save_state()
    pit = ffi.new("struct kvm_pit_state2 *")
    ffi.memmove(pit, state.pit, len(state.pit))
    pit.channels[0].count = 239  # 1193182 Hz / 239: 200 us
    master = bytearray(state.pic_master)
    master[1] &= ~1  # irr
    master[3] &= ~1  # isr
    state = dataclasses.replace(state, pit=ffi.buffer(pit)[:], pic_master=bytes(master))
    for _ in range(10):
        paused.vm.restore_state(state)
        deadline = time.monotonic() + 5
        while not paused.vm.get_irqchip(lib.KVM_IRQCHIP_PIC_MASTER)[1] & 1:
            assert time.monotonic() < deadline, "the PIT stopped interrupting after a restore"
            time.sleep(0.0005)


def test_the_clock_is_set_to_what_is_given(paused) -> None:
    paused.vm.set_clock(ClockData(clock=5_000_000_000))
    clock = paused.vm.get_clock().clock
    assert 5_000_000_000 <= clock < 5_000_000_000 + 60 * 10**9  # it runs on from there


def test_cpuid2_round_trips_and_keeps_the_leaves_the_machine_set(paused) -> None:
    vcpu = paused.vcpus[0]
    before = vcpu.get_cpuid2()
    vcpu.set_cpuid2(before)
    assert vcpu.get_cpuid2() == before
    given = {(leaf.function, leaf.index): leaf for leaf in vcpu_cpuid(paused.kvm.supported_cpuid(), vcpu.id)}
    assert [leaf for leaf in before if leaf.function == 0] == [given[(0, 0)]]  # the vendor leaf as set


def test_every_readable_msr_round_trips(paused) -> None:
    vcpu = paused.vcpus[0]
    indices = [i for i in vcpu.readable_msrs(paused.kvm.msr_index_list()) if i != MSR_IA32_TSC]
    before = vcpu.get_msrs(indices)
    assert vcpu.set_msrs(before) == len(before)
    assert vcpu.get_msrs(indices) == before


def test_readable_msrs_leaves_out_those_kvm_cannot_read(paused) -> None:
    unknown = 0xDEAD0000  # no such MSR: KVM_GET_MSRS stops there
    indices = [MSR_IA32_TSC, unknown, 0xC0000100]
    assert paused.vcpus[0].readable_msrs(indices) == [MSR_IA32_TSC, 0xC0000100]
    with pytest.raises(StateError, match=f"cannot read MSR {unknown:#x} on vCPU 0"):
        paused.vcpus[0].save_state(indices)


def test_a_guest_address_past_64_bits_is_refused(paused) -> None:
    with pytest.raises(StateError, match="not a 64-bit guest-virtual address"):
        paused.vcpus[0].translate(1 << 64)


# --- the whole state ------------------------------------------------------------------------
def saved(machine: Machine) -> tuple[VcpuState, object, bytes, list[int]]:
    msrs = machine.vcpus[0].readable_msrs(machine.kvm.msr_index_list())
    return machine.vcpus[0].save_state(msrs), machine.vm.save_state(), machine.memory.read(0, machine.memory.size), msrs


def restored(machine_factory, vcpu_state, vm_state, ram: bytes, **options) -> Machine:
    """A brand-new machine made what the saved one was (the image is loaded only because
    Machine.run needs one; memory, VM and vCPU state then replace what it set)."""
    machine = machine_factory(memory="64M", **options)
    machine.load(guest(SNAPSHOT_GUEST), mode="long")
    machine.memory.write(0, ram)
    machine.vm.restore_state(vm_state)
    machine.vcpus[0].restore_state(vcpu_state)
    return machine


def test_a_guest_snapshotted_half_way_goes_on_in_a_new_machine_as_in_the_original(paused, machine_factory) -> None:
    vcpu_state, vm_state, ram, _ = saved(paused)
    original = paused.run(timeout=60)
    clone = restored(machine_factory, vcpu_state, vm_state, ram).run(timeout=60)
    expected = f"snapshot: lcg {lcg_after(LCG_STEPS):016x} sum ".encode()
    assert original.status == 1 and original.serial.startswith(expected), original.diagnosis
    assert (clone.status, clone.serial) == (original.status, original.serial), clone.diagnosis
    assert clone.serial.endswith(b"snapshot: 10 ticks\n")  # the PIT and PIC went on ticking


def test_a_restored_vcpu_saves_the_state_it_was_given(paused, machine_factory) -> None:
    vcpu_state, vm_state, ram, msrs = saved(paused)
    clone = restored(machine_factory, vcpu_state, vm_state, ram)
    again = clone.vcpus[0].save_state(msrs)
    del again.msrs[MSR_IA32_TSC], vcpu_state.msrs[MSR_IA32_TSC]
    assert again == vcpu_state


def test_saving_completes_the_last_exit_first(machine_factory, tmp_path) -> None:
    """An IN's data reaches RAX only at the next KVM_RUN: save_state has KVM finish it, not lose it."""
    image = tmp_path / "in.bin"
    image.write_bytes(bytes.fromhex("e471" "e6f4" "ebfe"))  # in al, 0x71; out 0xf4, al; jmp $
    machine = machine_factory(memory="16M", irqchip=False)
    machine.load(image, mode="long")
    vcpu = machine.vcpus[0]
    exit = run_watched(vcpu)  # the CMOS data port is a Python device: the exit comes back here
    assert isinstance(exit, IoExit) and (exit.port, exit.is_write) == (0x71, False)
    exit.data[0:1] = b"\x5a"
    state = vcpu.save_state([])
    assert (state.regs.rip, state.regs.rax & 0xFF) == (0x100002, 0x5A)
    assert run_watched(vcpu) == DebugPortExit(0x5A)  # and the guest goes on from there


def test_an_application_processor_waiting_for_sipi_round_trips(machine_factory) -> None:
    machine = machine_factory(memory="16M", cpus=2)
    ap = machine.vcpus[1]
    state = ap.save_state(ap.readable_msrs(machine.kvm.msr_index_list()))
    assert state.mp_state == lib.KVM_MP_STATE_UNINITIALIZED
    ap.restore_state(state)
    assert ap.get_mp_state() == lib.KVM_MP_STATE_UNINITIALIZED


def test_a_vm_without_irqchip_saves_only_its_clock(machine_factory) -> None:
    machine = machine_factory(memory="16M", irqchip=False)
    state = machine.vm.save_state()
    assert (state.pic_master, state.pic_slave, state.ioapic, state.pit) == (None, None, None, None)
    machine.vm.restore_state(state)
    assert machine.vcpus[0].save_state([]).lapic is None


def test_state_with_an_irqchip_does_not_restore_into_a_vm_without_one(paused, machine_factory, monkeypatch) -> None:
    vcpu_state, vm_state, _, _ = saved(paused)
    bare = machine_factory(memory="64M", irqchip=False)
    forbid_ioctls(monkeypatch)
    with pytest.raises(StateError, match="the saved state has an in-kernel pic_master and this VM has none"):
        bare.vm.restore_state(vm_state)
    with pytest.raises(StateError, match="the saved state has an in-kernel LAPIC and this VM has none"):
        bare.vcpus[0].restore_state(vcpu_state)


@pytest.mark.parametrize("blob", ["xsave", "xcrs", "debugregs", "lapic", "vcpu_events"])
def test_a_vcpu_state_with_a_wrong_size_blob_changes_nothing(paused, blob, monkeypatch) -> None:
    vcpu_state, _, _, _ = saved(paused)
    broken = dataclasses.replace(vcpu_state, **{blob: getattr(vcpu_state, blob) + b"\0"})
    forbid_ioctls(monkeypatch)
    with pytest.raises(StateError, match=f"vCPU state {blob}: "):
        paused.vcpus[0].restore_state(broken)


@pytest.mark.parametrize("blob", ["pic_master", "pic_slave", "ioapic", "pit"])
def test_a_vm_state_with_a_wrong_size_blob_changes_nothing(paused, blob, monkeypatch) -> None:
    vm_state = paused.vm.save_state()
    broken = dataclasses.replace(vm_state, **{blob: getattr(vm_state, blob)[:-1]})
    forbid_ioctls(monkeypatch)
    with pytest.raises(StateError, match=f"VM state {blob}: "):
        paused.vm.restore_state(broken)
