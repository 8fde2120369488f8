"""What ``pykvm info`` says of guest debugging on this host is what this host's KVM does.

:func:`pykvm.info.debug_support` keeps, per backend, where each debug event reaches the
VMM (and so the debugger).  Here each claim is measured: a few instructions in real
mode, protected mode, long mode at CPL0 and at CPL3, run exit by exit with one event
armed, and the first exit tells whether the event came back to pykvm (a
``KVM_EXIT_DEBUG`` at the right address, or for an int3 the emulation failure at it
that pykvm claims) or went to the guest, which then ends by itself (its interrupt table
writes a debug exit, or, with none, it triple-faults) or runs on to its own end.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from pykvm import Machine
from pykvm.info import Privilege, debug_support, kvm_backend
from pykvm.kvm.debug import BP_VECTOR, DB_VECTOR, DR6_SINGLE_STEP, BreakpointKind, GuestDebug, HardwareBreakpoint
from pykvm.kvm.exits import DebugPortExit, Exit, GuestDebugExit, InternalErrorExit, ShutdownExit
from vcpu_watchdog import run_watched

pytestmark = pytest.mark.kvm

SUPPORT = debug_support(kvm_backend())
INT3 = 0xCC
DR6_B0 = 1 << 0


@dataclass(frozen=True)
class Probe:
    """Code that starts with a nop (a step ends at ``target``), runs ``target``, stores to
    ``data`` (the next instruction at ``after_store``) and writes the debug-exit port."""

    mode: str
    user: bool
    code: bytes
    data: int
    data_size: int
    after_store: int
    load: int = 0x100000

    @property
    def target(self) -> int:
        return self.load + 1


REAL_BP_HANDLER = 0x7C0C  # where the real-mode probe's #BP vector points: it writes debug exit 0x33
PROBES = {
    Privilege.REAL: Probe(
        "real", False,
        bytes.fromhex(
            "90"  # 7c00  nop
            "b80100"  # 7c01  mov ax, 1                 <- target
            "a30020"  # 7c04  mov [0x2000], ax
            "90"  # 7c07  nop
            "e6f4"  # 7c08  out 0xf4, al              (debug exit 1)
            "ebfe"  # 7c0a  jmp $
            "b033e6f4ebfe"  # 7c0c  #BP handler: mov al, 0x33; out 0xf4, al; jmp $
        ),
        data=0x2000, data_size=2, after_store=0x7C07, load=0x7C00,
    ),
    Privilege.KERNEL: Probe(
        "protected", False, bytes.fromhex("90" "b801000000" "a300002000" "90" "e6f4" "ebfe"),
        data=0x200000, data_size=4, after_store=0x10000B,
    ),
    Privilege.USER: Probe(
        "long", True, bytes.fromhex("90" "48c7c001000000" "4889042500002000" "90" "e6f4" "ebfe"),
        data=0x200000, data_size=8, after_store=0x100010,
    ),
}  # fmt: skip
LONG_KERNEL = Probe("long", False, **{k: v for k, v in vars(PROBES[Privilege.USER]).items() if k not in ("mode", "user")})
EVENTS = ("single_step", "hardware_breakpoints", "watchpoints", "software_breakpoints")


def first_exit(machine: Machine, probe: Probe, event: str) -> Exit:
    """Arm ``event`` on the probe's vCPU and run it to its first exit."""
    vcpu = machine.vcpus[0]
    if event == "software_breakpoints":
        machine.memory.write(probe.target, bytes([INT3]))
        vcpu.set_guest_debug(GuestDebug(software_breakpoints=True))
    elif event == "single_step":
        vcpu.set_guest_debug(GuestDebug(single_step=True))
    elif event == "hardware_breakpoints":
        vcpu.set_guest_debug(GuestDebug(hardware_breakpoints=(HardwareBreakpoint(probe.target),)))
    else:
        watch = HardwareBreakpoint(probe.data, BreakpointKind.WRITE, probe.data_size)
        vcpu.set_guest_debug(GuestDebug(hardware_breakpoints=(watch,)))
    return run_watched(vcpu)


def reached_the_vmm(machine: Machine, probe: Probe, event: str, exit: Exit) -> bool:
    if event == "software_breakpoints":
        if isinstance(exit, InternalErrorExit):  # what pykvm claims on kvm_pvm: the failure sits at the int3
            vcpu = machine.vcpus[0]
            return vcpu.get_sregs().cs.base + vcpu.get_regs().rip == probe.target
        return isinstance(exit, GuestDebugExit) and (exit.exception, exit.pc) == (BP_VECTOR, probe.target)
    if not isinstance(exit, GuestDebugExit) or exit.exception != DB_VECTOR:
        return False
    expected = {"single_step": (probe.target, DR6_SINGLE_STEP), "hardware_breakpoints": (probe.target, DR6_B0),
                "watchpoints": (probe.after_store, DR6_B0)}[event]  # fmt: skip
    return exit.pc == expected[0] and bool(exit.dr6 & expected[1])


@pytest.mark.parametrize("event", EVENTS)
@pytest.mark.parametrize(
    "place, probe",
    [(Privilege.REAL, PROBES[Privilege.REAL]), (Privilege.KERNEL, PROBES[Privilege.KERNEL]),
     (Privilege.KERNEL, LONG_KERNEL), (Privilege.USER, PROBES[Privilege.USER])],
    ids=["real", "protected-cpl0", "long-cpl0", "long-cpl3"],
)  # fmt: skip
def test_pykvm_info_says_where_each_debug_event_reaches_the_vmm(machine_factory, tmp_path: Path, place, probe,
                                                                event) -> None:  # type: ignore[no-untyped-def]  # fmt: skip
    image = tmp_path / "probe.bin"
    image.write_bytes(probe.code)
    machine = machine_factory(memory="16M", irqchip=False)
    machine.load(image, mode=probe.mode, load_addr=probe.load, user=probe.user)
    machine.memory.write(BP_VECTOR * 4, REAL_BP_HANDLER.to_bytes(4, "little"))  # the real-mode IVT's #BP entry
    exit = first_exit(machine, probe, event)
    claimed = place in getattr(SUPPORT, event)
    assert reached_the_vmm(machine, probe, event, exit) == claimed, f"{event} in {place.value}: {exit}"
    if not claimed:  # the guest had it: it ran on to its end, its #BP handler ended it, or it triple-faulted
        assert exit in (DebugPortExit(1), DebugPortExit(0x33), ShutdownExit()), exit
