"""Guest debugging on /dev/kvm: single-step, breakpoints, KVM_EXIT_DEBUG and KVM_TRANSLATE.

The guest is a few long-mode instructions at 0x100000 (the flat loader's address, on the VMM's
identity map), run exit by exit as kvm-ioctls' tests do.  What the nested kvm_pvm backend cannot
do (measured here; pykvm.info.DEBUG_SUPPORT records it) is tested as real hardware behaves and skipped
elsewhere, with what this backend does instead.
"""

from __future__ import annotations

import pytest

from pykvm import Machine
from pykvm.info import is_hardware_backend
from pykvm.kvm.debug import DR6_SINGLE_STEP, BreakpointKind, GuestDebug, HardwareBreakpoint
from pykvm.kvm.exits import DebugPortExit, GuestDebugExit
from pykvm.native import lib
from pykvm.result import ExitReason
from vcpu_watchdog import run_watched

pytestmark = pytest.mark.kvm

ENTRY = 0x100000
STEPS = bytes.fromhex(
    "48c7c001000000"  # 0x100000  mov rax, 1
    "4883c002"  # 0x100007  add rax, 2
    "48ffc0"  # 0x10000b  inc rax
    "90"  # 0x10000e  nop
    "e6f4"  # 0x10000f  out 0xf4, al    (debug exit, value 4)
    "ebfe"  # 0x100011  jmp $
)
NEXT_PC_AND_RAX = [(0x100007, 1), (0x10000B, 3), (0x10000E, 4), (0x10000F, 4)]
STORE = bytes.fromhex(
    "48c7c001000000"  # 0x100000  mov rax, 1
    "48890425" "00002000"  # 0x100007  mov [0x200000], rax
    "90"  # 0x10000f  nop
    "e6f4"  # 0x100010  out 0xf4, al
    "ebfe"  # 0x100012  jmp $
)  # fmt: skip
INT3 = bytes.fromhex(
    "90"  # 0x100000  nop
    "cc"  # 0x100001  int3
    "e6f4"  # 0x100002  out 0xf4, al
    "ebfe"  # 0x100004  jmp $
)
DB_VECTOR, BP_VECTOR = 1, 3
DR6_B0 = 1 << 0
NOT_ON_THIS_BACKEND = "needs VT-x/AMD-V: on the nested kvm_pvm backend "


def booted(machine_factory, tmp_path, code: bytes, *, user: bool = False) -> Machine:
    image = tmp_path / "code.bin"
    image.write_bytes(code)
    machine = machine_factory(memory="16M", irqchip=False)
    machine.load(image, mode="long", user=user)
    return machine


def test_kvm_offers_the_guest_debug_flags_pykvm_uses(machine_factory) -> None:
    flags = machine_factory(memory="16M", irqchip=False).vm.set_guest_debug_flags()
    wanted = (
        lib.KVM_GUESTDBG_ENABLE | lib.KVM_GUESTDBG_SINGLESTEP | lib.KVM_GUESTDBG_USE_SW_BP | lib.KVM_GUESTDBG_USE_HW_BP
    )
    assert flags & wanted == wanted


def test_single_step_at_cpl0_exits_after_each_instruction_with_the_next_pc(machine_factory, tmp_path) -> None:
    vcpu = booted(machine_factory, tmp_path, STEPS).vcpus[0]
    vcpu.set_guest_debug(GuestDebug(single_step=True))
    for pc, rax in NEXT_PC_AND_RAX:
        exit = run_watched(vcpu)
        assert isinstance(exit, GuestDebugExit) and (exit.exception, exit.pc) == (DB_VECTOR, pc), exit
        assert exit.dr6 & DR6_SINGLE_STEP
        assert vcpu.get_regs().rax == rax
    assert run_watched(vcpu) == DebugPortExit(4)


def test_a_hardware_execute_breakpoint_at_cpl0_stops_before_the_instruction(machine_factory, tmp_path) -> None:
    vcpu = booted(machine_factory, tmp_path, STEPS).vcpus[0]
    vcpu.set_guest_debug(GuestDebug(hardware_breakpoints=(HardwareBreakpoint(0x10000B),)))
    exit = run_watched(vcpu)
    assert isinstance(exit, GuestDebugExit) and (exit.exception, exit.pc) == (DB_VECTOR, 0x10000B), exit
    assert exit.dr6 & DR6_B0
    assert vcpu.get_regs().rax == 3  # the inc has not run
    vcpu.set_guest_debug(GuestDebug(enable=False))
    assert run_watched(vcpu) == DebugPortExit(4)


def test_a_machine_run_stops_at_a_debug_exit_nothing_handles(machine_factory, tmp_path) -> None:
    machine = booted(machine_factory, tmp_path, STEPS)
    machine.vcpus[0].set_guest_debug(GuestDebug(single_step=True))
    result = machine.run(timeout=30)
    assert result.reason is ExitReason.UNHANDLED
    assert "unhandled guest debug exit (exception 1 at 0x100007)" in result.diagnosis


def test_translate_maps_the_identity_mapped_addresses(machine_factory, tmp_path) -> None:
    vcpu = booted(machine_factory, tmp_path, STEPS).vcpus[0]
    for address in (ENTRY, 0x3FFF_F000, 0xFEE0_0000, 0xFFFF_F000):
        translation = vcpu.translate(address)
        assert (translation.valid, translation.physical_address) == (1, address)


def test_translate_reports_an_unmapped_address_as_invalid(machine_factory, tmp_path) -> None:
    vcpu = booted(machine_factory, tmp_path, STEPS).vcpus[0]
    assert vcpu.translate(0x1_0000_1000).valid == 0  # the identity map ends at 4 GiB
    assert vcpu.translate(0xFFFF_8000_0000_0000).valid == 0  # nothing in the upper half


@pytest.mark.skipif(
    not is_hardware_backend(),
    reason=NOT_ON_THIS_BACKEND + "int3 at CPL0 ends in KVM_EXIT_INTERNAL_ERROR with rip at the int3 (measured)",
)
def test_a_software_breakpoint_at_cpl0_exits_at_the_int3(machine_factory, tmp_path) -> None:
    vcpu = booted(machine_factory, tmp_path, INT3).vcpus[0]
    vcpu.set_guest_debug(GuestDebug(software_breakpoints=True))
    exit = run_watched(vcpu)
    assert isinstance(exit, GuestDebugExit) and (exit.exception, exit.pc) == (BP_VECTOR, 0x100001), exit


@pytest.mark.skipif(
    not is_hardware_backend(),
    reason=NOT_ON_THIS_BACKEND + "a CPL3 single step is injected into the guest as #DB (measured: "
    "with no IDT the guest triple-faults) instead of exiting",
)
def test_single_step_at_cpl3_exits_after_each_instruction(machine_factory, tmp_path) -> None:
    vcpu = booted(machine_factory, tmp_path, STEPS, user=True).vcpus[0]
    vcpu.set_guest_debug(GuestDebug(single_step=True))
    for pc, rax in NEXT_PC_AND_RAX:
        exit = run_watched(vcpu)
        assert isinstance(exit, GuestDebugExit) and (exit.exception, exit.pc) == (DB_VECTOR, pc), exit
        assert vcpu.get_regs().rax == rax


@pytest.mark.skipif(
    not is_hardware_backend(),
    reason=NOT_ON_THIS_BACKEND + "a hardware breakpoint never fires at CPL3 (measured: the guest ran on to its exit)",
)
def test_a_hardware_execute_breakpoint_at_cpl3_fires(machine_factory, tmp_path) -> None:
    vcpu = booted(machine_factory, tmp_path, STEPS, user=True).vcpus[0]
    vcpu.set_guest_debug(GuestDebug(hardware_breakpoints=(HardwareBreakpoint(0x10000B),)))
    exit = run_watched(vcpu)
    assert isinstance(exit, GuestDebugExit) and (exit.pc, exit.dr6 & DR6_B0) == (0x10000B, DR6_B0), exit


@pytest.mark.skipif(
    not is_hardware_backend(),
    reason=NOT_ON_THIS_BACKEND
    + "data watchpoints never fire, at CPL0 or CPL3 (measured: the guest ran on to its exit)",
)
@pytest.mark.parametrize("user", [False, True], ids=["cpl0", "cpl3"])
def test_a_write_watchpoint_fires_after_the_store(machine_factory, tmp_path, user) -> None:
    vcpu = booted(machine_factory, tmp_path, STORE, user=user).vcpus[0]
    vcpu.set_guest_debug(GuestDebug(hardware_breakpoints=(HardwareBreakpoint(0x200000, BreakpointKind.WRITE, 8),)))
    exit = run_watched(vcpu)
    assert isinstance(exit, GuestDebugExit) and (exit.exception, exit.pc) == (DB_VECTOR, 0x10000F), exit
    assert exit.dr6 & DR6_B0
