"""The machine side of debugging: :class:`~pykvm.debugger.MachineDebugger` driving real guests.

Each test runs a guest on /dev/kvm on a thread of its own and talks to its debugger as
the gdb server would (``tests/test_debugger_gdb.py`` puts a real gdb in front).  The
guests are ``guests/asm/debug.asm`` in its three modes (symbols read with ``nm``), and
a few others where a test needs what they do.  What this host's KVM cannot do is
tested as :func:`pykvm.info.debug_support` says it behaves here.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import guest

from pykvm import Machine
from pykvm.debugger import MachineDebugger
from pykvm.errors import PykvmError
from pykvm.gdbstub import (
    Action,
    BreakpointKind,
    DebugTargetError,
    Exited,
    Killed,
    Stop,
    StopEvent,
    StopReason,
    UnmappedAddressError,
    UnsupportedError,
)
from pykvm.info import Privilege, debug_support, kvm_backend
from pykvm.kvm.debug import GuestDebug, HardwareBreakpoint
from pykvm.kvm.exits import GuestDebugExit
from pykvm.native import lib
from pykvm.result import ExitReason, RunResult
from vcpu_watchdog import run_watched

pytestmark = pytest.mark.kvm

GUARD = 60.0  # seconds: a hang guard for runs and stops, not a speed limit
SUPPORT = debug_support(kvm_backend())
ANSWER_26 = 53  # debug.asm's status: answer 21 + counter 5, (26 << 1) | 1
INT3 = 0xCC
KVM_FPU_FCW, KVM_FPU_XMM0 = 128, 152  # offsets in struct kvm_fpu (<asm/kvm.h>)


def symbols(image: Path) -> dict[str, int]:
    """The symbols of a guest ELF, by name (``nm``)."""
    listing = subprocess.run(["nm", str(image)], capture_output=True, text=True, check=True).stdout
    return {fields[2]: int(fields[0], 16) for fields in map(str.split, listing.splitlines()) if len(fields) == 3}


class Debugged:
    """A machine with a debugger, its run going on a thread (held before the first instruction)."""

    def __init__(self, machine: Machine, timeout: float = GUARD) -> None:
        self.machine = machine
        self.debugger = MachineDebugger(machine)
        self._results: list[RunResult] = []
        self._thread = threading.Thread(target=lambda: self._results.append(machine.run(timeout=timeout)))
        self._thread.start()

    def result(self) -> RunResult:
        self._thread.join(GUARD)
        assert self._results, "the run did not end"
        return self._results[0]

    def stop(self) -> StopEvent:
        """The next stop (it must come)."""
        event = self.debugger.wait_stop(GUARD)
        assert event is not None, "the guest did not stop"
        return event

    def resume(self, **actions: Action) -> StopEvent:
        """Resume (every vCPU continues, or vCPU n does ``vcpu<n>=action``) and wait for the stop."""
        chosen = {int(name[4:]): action for name, action in actions.items()}
        self.debugger.resume(chosen or {vcpu: Action.CONTINUE for vcpu in self.debugger.vcpu_ids()})
        return self.stop()

    def dword(self, address: int, vcpu: int = 0) -> int:
        return int.from_bytes(self.debugger.read_memory(vcpu, address, 4), "little")

    def end(self) -> None:
        self.machine.stop()
        self._thread.join(GUARD)


@pytest.fixture
def debug(machine_factory: Callable[..., Machine]) -> Iterator[Callable[..., Debugged]]:
    """``debug(image, cpus=1, timeout=GUARD, **load)``: a guest held for its debugger."""
    started: list[Debugged] = []

    def start(image: str, *, cpus: int = 1, timeout: float = GUARD, **load: object) -> Debugged:
        machine = machine_factory(memory="64M", cpus=cpus)
        machine.load(guest(image), **load)  # type: ignore[arg-type]
        started.append(Debugged(machine, timeout))
        return started[-1]

    yield start
    for debugged in started:
        debugged.end()


@pytest.fixture(scope="module")
def labels() -> dict[str, int]:
    """The symbols of debug_long.elf, the guest most tests debug."""
    return symbols(guest("debug_long.elf"))


# --- stopping and running --------------------------------------------------------------------------
def test_the_guest_waits_before_its_first_instruction_until_resumed(debug, labels) -> None:  # type: ignore[no-untyped-def]
    d = debug("debug_long.elf")
    assert d.debugger.wait_stop(0) == Stop(0, StopReason.INTERRUPTED)
    while not d.machine.running:
        time.sleep(0.01)
    assert d.debugger.read_registers(0)["rip"] == labels["_start"]
    d.debugger.write_memory(0, labels["answer"], (100).to_bytes(4, "little"))  # lands before the guest reads it
    assert d.resume() == Exited(211)  # answer 105
    assert d.result().serial == b"answer 105\n"


def test_a_software_breakpoint_stops_the_guest_at_its_address(debug, labels) -> None:  # type: ignore[no-untyped-def]
    d = debug("debug_long.elf")
    d.debugger.insert_breakpoint(BreakpointKind.SOFTWARE, labels["counted"], 1)
    assert d.machine.memory.read(labels["counted"], 1)[0] == INT3
    assert d.resume() == Stop(0, StopReason.SOFTWARE_BREAKPOINT)
    assert d.debugger.read_registers(0)["rip"] == labels["counted"]
    assert d.dword(labels["counter"]) == 5
    assert d.debugger.read_memory(0, labels["counted"], 1)[0] != INT3  # the guest's own byte is shown
    d.debugger.remove_breakpoint(BreakpointKind.SOFTWARE, labels["counted"], 1)
    assert d.resume() == Exited(ANSWER_26)
    assert d.result().reason is ExitReason.DEBUG_EXIT


def test_a_step_executes_one_instruction(debug, labels) -> None:  # type: ignore[no-untyped-def]
    d = debug("debug_long.elf")
    assert d.resume(vcpu0=Action.STEP) == Stop(0, StopReason.STEP)  # mov ecx, 5
    registers = d.debugger.read_registers(0)
    assert (registers["rip"], registers["rcx"]) == (labels["count_loop"], 5)
    assert d.resume(vcpu0=Action.STEP) == Stop(0, StopReason.STEP)  # inc dword [counter]
    assert d.dword(labels["counter"]) == 1


def test_a_hardware_breakpoint_stops_the_guest_before_the_instruction(debug, labels) -> None:  # type: ignore[no-untyped-def]
    d = debug("debug_long.elf")
    d.debugger.insert_breakpoint(BreakpointKind.HARDWARE, labels["counted"], 1)
    assert d.resume() == Stop(0, StopReason.HARDWARE_BREAKPOINT)
    assert d.debugger.read_registers(0)["rip"] == labels["counted"]
    d.debugger.remove_breakpoint(BreakpointKind.HARDWARE, labels["counted"], 1)
    assert d.resume() == Exited(ANSWER_26)


def test_a_breakpoint_is_met_again_after_a_step_over_it(debug, labels) -> None:  # type: ignore[no-untyped-def]
    d = debug("debug_long.elf")
    d.debugger.insert_breakpoint(BreakpointKind.SOFTWARE, labels["count_loop"], 1)
    for count in range(5):  # gdb's way past a breakpoint: remove it, step, put it back, continue
        assert d.resume() == Stop(0, StopReason.SOFTWARE_BREAKPOINT)
        assert d.dword(labels["counter"]) == count
        d.debugger.remove_breakpoint(BreakpointKind.SOFTWARE, labels["count_loop"], 1)
        assert d.resume(vcpu0=Action.STEP) == Stop(0, StopReason.STEP)
        d.debugger.insert_breakpoint(BreakpointKind.SOFTWARE, labels["count_loop"], 1)
    assert d.resume() == Exited(ANSWER_26)


def test_a_step_executes_the_next_instruction_even_with_an_interrupt_pending(debug) -> None:  # type: ignore[no-untyped-def]
    irq = symbols(guest("step_irq.elf"))
    d = debug("step_irq.elf")
    if not d.machine.vm.set_guest_debug_flags() & lib.KVM_GUESTDBG_BLOCKIRQ:
        pytest.skip("this host's KVM does not offer KVM_GUESTDBG_BLOCKIRQ")
    d.debugger.insert_breakpoint(BreakpointKind.SOFTWARE, irq["pending"], 1)  # IRQ 0 is pending there
    assert d.resume() == Stop(0, StopReason.SOFTWARE_BREAKPOINT)
    d.debugger.remove_breakpoint(BreakpointKind.SOFTWARE, irq["pending"], 1)
    rips = []
    for _ in range(4):  # sti; nop (its shadow); nop: where the interrupt would come; nop
        assert d.resume(vcpu0=Action.STEP) == Stop(0, StopReason.STEP)
        rips.append(d.debugger.read_registers(0)["rip"])
    assert rips == [irq["pending"] + 1, irq["shadowed"], irq["shadowed"] + 1, irq["shadowed"] + 2]
    assert d.dword(irq["ticks"]) == 0
    assert d.resume() == Exited(1)  # continuing lets the interrupts in
    assert d.result().serial == b"ticks: 3\n"


def test_without_blocking_interrupts_that_step_would_enter_the_handler(machine_factory) -> None:  # type: ignore[no-untyped-def]
    """What the step above is kept from: the guest really has an interrupt pending there."""
    irq = symbols(guest("step_irq.elf"))
    machine = machine_factory(memory="64M")
    machine.load(guest("step_irq.elf"))
    vcpu = machine.vcpus[0]
    vcpu.set_guest_debug(GuestDebug(hardware_breakpoints=(HardwareBreakpoint(irq["pending"]),)))
    assert isinstance(run_watched(vcpu), GuestDebugExit)
    vcpu.set_guest_debug(GuestDebug(single_step=True))
    pcs = [run_watched(vcpu).pc for _ in range(3)]  # type: ignore[union-attr]
    assert pcs[:2] == [irq["pending"] + 1, irq["shadowed"]]
    assert irq["tick_isr"] <= pcs[2] < irq["tick_isr"] + 16  # in the handler


# --- registers and memory ---------------------------------------------------------------------------
def test_registers_written_while_stopped_are_what_the_guest_computes_with(debug, labels) -> None:  # type: ignore[no-untyped-def]
    d = debug("debug_long.elf")
    d.debugger.insert_breakpoint(BreakpointKind.HARDWARE, labels["loaded"], 1)  # after mov eax, [answer]
    assert d.resume() == Stop(0, StopReason.HARDWARE_BREAKPOINT)
    assert d.debugger.read_registers(0)["rax"] == 21
    d.debugger.write_registers(0, {"rax": 37})
    d.debugger.remove_breakpoint(BreakpointKind.HARDWARE, labels["loaded"], 1)
    assert d.resume() == Exited((42 << 1 | 1) & 0xFF)
    assert d.result().serial == b"answer 42\n"


def test_every_register_written_reads_back(debug) -> None:  # type: ignore[no-untyped-def]
    d = debug("debug_long.elf")
    values = {"r9": 0x1122334455667788, "rflags": 0x246, "fs_base": 0x7F00_0000, "gs_base": 0x7F10_0000,
              "kernel_gs_base": 0xFFFF_8000_0000_1000, "xmm0": 0x0123456789ABCDEF_FEDCBA9876543210,
              "xmm15": 1 << 127, "st0": 0x3FFF_8000_0000_0000_0000, "fctrl": 0x27F, "mxcsr": 0x1FA0,
              "fop": 0x5D9, "fioff": 0x100010, "ftag": 0xFFFC}  # fmt: skip  (ftag: ST(0) valid, the rest empty)
    d.debugger.write_registers(0, values)
    registers = d.debugger.read_registers(0)
    assert {name: registers[name] for name in values} == values
    fpu = d.machine.vcpus[0].get_fpu()  # KVM's other view of the same state agrees (struct kvm_fpu)
    assert int.from_bytes(fpu[KVM_FPU_FCW : KVM_FPU_FCW + 2], "little") == values["fctrl"]
    assert int.from_bytes(fpu[KVM_FPU_XMM0 : KVM_FPU_XMM0 + 16], "little") == values["xmm0"]


def test_a_selector_is_loaded_in_real_mode_and_refused_elsewhere(debug) -> None:  # type: ignore[no-untyped-def]
    real = debug("debug_real.bin", mode="real")
    real.debugger.write_registers(0, {"ds": 0x1234})
    assert real.machine.vcpus[0].get_sregs().ds.base == 0x12340
    long = debug("debug_long.elf")
    with pytest.raises(UnsupportedError, match="cs cannot be set in long mode"):
        long.debugger.write_registers(0, {"cs": 0x3B, "rax": 5})
    assert long.debugger.read_registers(0)["rax"] == 0  # nothing of a refused write is done


def test_memory_is_read_by_virtual_address_up_to_the_first_unmapped_one(debug, labels) -> None:  # type: ignore[no-untyped-def]
    d = debug("debug_long.elf")
    assert d.debugger.read_memory(0, labels["answer"], 4) == (21).to_bytes(4, "little")
    with pytest.raises(UnmappedAddressError) as untranslated:  # the boot page tables map 4 GiB
        d.debugger.read_memory(0, 0x1_0000_0000, 1)
    assert untranslated.value.address == 0x1_0000_0000
    with pytest.raises(UnmappedAddressError) as past_ram:  # mapped, but no RAM there: 64 MiB
        d.debugger.read_memory(0, 0x3FF_F800, 0x1000)
    assert past_ram.value.address == 0x400_0000
    with pytest.raises(UnmappedAddressError):
        d.debugger.write_memory(0, 0x3FF_FFFE, b"abcd")
    assert d.machine.memory.read(0x3FF_FFFE, 2) == b"ab"  # what came before the hole was written


def test_the_guest_can_be_debugged_only_while_it_is_stopped(debug) -> None:  # type: ignore[no-untyped-def]
    d = debug("uart_echo.bin", mode="real")  # polls the UART for input for ever
    d.debugger.resume({0: Action.CONTINUE})
    with pytest.raises(DebugTargetError, match="the guest is running"):
        d.debugger.read_registers(0)
    with pytest.raises(DebugTargetError, match="running already"):
        d.debugger.resume({0: Action.CONTINUE})


# --- interrupting, detaching, ending ----------------------------------------------------------------
def test_an_interrupt_stops_a_running_guest_and_kill_ends_it(debug) -> None:  # type: ignore[no-untyped-def]
    d = debug("uart_echo.bin", mode="real")
    d.debugger.resume({0: Action.CONTINUE})
    d.debugger.interrupt()
    assert d.stop() == Stop(0, StopReason.INTERRUPTED)
    rip = d.debugger.read_registers(0)["rip"]
    assert 0x7C00 <= rip < 0x7E00  # in the guest's polling loop
    d.debugger.kill()
    assert d.debugger.wait_stop(0) == Killed()
    result = d.result()
    assert (result.reason, result.status, result.diagnosis) == (ExitReason.STOPPED, 137, "killed by gdb")


def test_a_timeout_ends_a_run_held_by_the_debugger(debug) -> None:  # type: ignore[no-untyped-def]
    d = debug("debug_long.elf", timeout=0.5)
    assert d.result().reason is ExitReason.TIMEOUT
    assert d.debugger.wait_stop(0) == Killed()


def test_stopping_the_machine_ends_a_run_stopped_at_a_breakpoint(debug, labels) -> None:  # type: ignore[no-untyped-def]
    d = debug("debug_long.elf")
    d.debugger.insert_breakpoint(BreakpointKind.SOFTWARE, labels["counted"], 1)
    assert d.resume() == Stop(0, StopReason.SOFTWARE_BREAKPOINT)
    d.machine.stop()
    assert d.result().reason is ExitReason.STOPPED
    assert d.debugger.wait_stop(0) == Killed()
    d.debugger.resume({0: Action.CONTINUE})  # after the end: nothing happens
    assert d.debugger.wait_stop(0) == Killed()


def test_detach_removes_every_breakpoint_and_the_guest_runs_to_its_end(debug, labels) -> None:  # type: ignore[no-untyped-def]
    d = debug("debug_long.elf")
    original = d.machine.memory.read(labels["count_loop"], 1)
    d.debugger.insert_breakpoint(BreakpointKind.SOFTWARE, labels["count_loop"], 1)
    d.debugger.insert_breakpoint(BreakpointKind.HARDWARE, labels["counted"], 1)
    d.debugger.detach()
    assert d.stop() == Exited(ANSWER_26)
    assert d.machine.memory.read(labels["count_loop"], 1) == original


def test_the_guests_end_removes_its_breakpoints_and_a_new_run_is_a_new_guest(debug, labels) -> None:  # type: ignore[no-untyped-def]
    d = debug("debug_long.elf")
    original = d.machine.memory.read(labels["serial_getc"], 1)  # a routine the guest never calls
    d.debugger.insert_breakpoint(BreakpointKind.SOFTWARE, labels["serial_getc"], 1)
    d.debugger.insert_breakpoint(BreakpointKind.HARDWARE, labels["serial_getc"], 1)
    assert d.resume() == Exited(ANSWER_26)
    d.result()
    assert d.machine.memory.read(labels["serial_getc"], 1) == original
    again = d.machine.run(timeout=GUARD)  # on after its debug exit: cli; hlt, undisturbed and unheld
    assert again.reason is ExitReason.HALTED
    assert d.debugger.wait_stop(0) == Exited(0)


def test_an_emulation_failure_that_is_no_breakpoint_still_ends_the_run(debug) -> None:  # type: ignore[no-untyped-def]
    d = debug("unbacked_jump.bin", mode="long")  # jumps into the MMIO hole: KVM cannot fetch there
    d.debugger.insert_breakpoint(BreakpointKind.SOFTWARE, 0x100000, 1)  # its first instruction
    assert d.resume() == Stop(0, StopReason.SOFTWARE_BREAKPOINT)
    d.debugger.remove_breakpoint(BreakpointKind.SOFTWARE, 0x100000, 1)
    assert d.resume() == Exited(116)
    assert d.result().reason is ExitReason.INTERNAL_ERROR


def test_a_guests_own_int3_stays_the_guests_while_breakpoints_are_set(debug) -> None:  # type: ignore[no-untyped-def]
    d = debug("cpl3.bin", mode="long")  # returns from CPL3 to its kernel with int3
    d.debugger.insert_breakpoint(BreakpointKind.SOFTWARE, 0x300000, 1)  # RAM it never executes
    assert d.resume() == Exited(1)
    assert d.result().serial == b"cpl3 sum=5000000050000000 cs=002b\n"


def test_two_vcpus_stop_together_and_run_on_together(debug) -> None:  # type: ignore[no-untyped-def]
    smp = symbols(guest("smp.elf"))
    d = debug("smp.elf", cpus=2)
    d.debugger.insert_breakpoint(BreakpointKind.SOFTWARE, smp["ap_main"], 1)
    assert d.resume() == Stop(1, StopReason.SOFTWARE_BREAKPOINT)
    bsp = d.debugger.read_registers(0)
    assert d.debugger.read_registers(0) == bsp  # the bootstrap processor is stopped too
    assert d.debugger.read_registers(1)["rip"] == smp["ap_main"]
    d.debugger.remove_breakpoint(BreakpointKind.SOFTWARE, smp["ap_main"], 1)
    assert d.resume(vcpu1=Action.STEP) == Stop(1, StopReason.STEP)  # the AP alone
    assert d.debugger.read_registers(0) == bsp
    assert d.resume() == Exited(1)
    assert d.result().serial.endswith(b"counter: 2000\n")


# --- what this host cannot do ---------------------------------------------------------------------------
@pytest.mark.skipif(Privilege.USER in SUPPORT.single_step, reason="this host single-steps user-mode code")
def test_a_step_in_user_mode_is_refused_where_it_would_go_to_the_guest(debug) -> None:  # type: ignore[no-untyped-def]
    d = debug("debug_long.elf", user=True)
    with pytest.raises(UnsupportedError, match="cannot step vCPU 0: single steps do not stop the guest in user mode"):
        d.debugger.resume({0: Action.STEP})
    assert d.debugger.wait_stop(0) == Stop(0, StopReason.INTERRUPTED)  # still stopped
    assert d.resume() == Exited(ANSWER_26)


@pytest.mark.skipif(Privilege.USER in SUPPORT.software_breakpoints, reason="int3 stops user-mode code on this host")
def test_resuming_user_mode_code_with_software_breakpoints_is_refused_where_the_guest_takes_them(debug, labels) -> None:  # type: ignore[no-untyped-def]
    d = debug("debug_long.elf", user=True)
    d.debugger.insert_breakpoint(BreakpointKind.SOFTWARE, labels["counted"], 1)
    with pytest.raises(UnsupportedError, match="cannot resume vCPU 0 in user mode with software breakpoints set"):
        d.debugger.resume({0: Action.CONTINUE})
    d.debugger.remove_breakpoint(BreakpointKind.SOFTWARE, labels["counted"], 1)
    assert d.resume() == Exited(ANSWER_26)


@pytest.mark.skipif(Privilege.USER not in SUPPORT.single_step, reason="this host cannot single-step user-mode code")
def test_a_step_in_user_mode(debug, labels) -> None:  # type: ignore[no-untyped-def]
    d = debug("debug_long.elf", user=True)
    assert d.resume(vcpu0=Action.STEP) == Stop(0, StopReason.STEP)
    assert d.debugger.read_registers(0)["rip"] == labels["count_loop"]


@pytest.mark.skipif(Privilege.REAL in SUPPORT.software_breakpoints, reason="int3 stops real-mode guests on this host")
def test_software_breakpoints_in_real_mode_are_refused_with_a_pointer_to_hbreak(debug) -> None:  # type: ignore[no-untyped-def]
    real = symbols(guest("debug_real.elf"))
    d = debug("debug_real.bin", mode="real")
    d.debugger.insert_breakpoint(BreakpointKind.SOFTWARE, real["counted"], 1)
    with pytest.raises(UnsupportedError, match="in real mode with software breakpoints set: .* use hbreak"):
        d.debugger.resume({0: Action.CONTINUE})
    d.debugger.remove_breakpoint(BreakpointKind.SOFTWARE, real["counted"], 1)
    d.debugger.insert_breakpoint(BreakpointKind.HARDWARE, real["counted"], 1)
    assert d.resume() == Stop(0, StopReason.HARDWARE_BREAKPOINT)
    assert d.dword(real["counter"]) == 5


@pytest.mark.skipif(Privilege.REAL not in SUPPORT.software_breakpoints, reason="int3 does not stop real-mode guests here")
def test_a_software_breakpoint_in_real_mode(debug) -> None:  # type: ignore[no-untyped-def]
    real = symbols(guest("debug_real.elf"))
    d = debug("debug_real.bin", mode="real")
    d.debugger.insert_breakpoint(BreakpointKind.SOFTWARE, real["counted"], 1)
    assert d.resume() == Stop(0, StopReason.SOFTWARE_BREAKPOINT)


@pytest.mark.skipif(bool(SUPPORT.watchpoints), reason="watchpoints fire on this host")
def test_watchpoints_are_refused_where_they_never_fire(debug, labels) -> None:  # type: ignore[no-untyped-def]
    d = debug("debug_long.elf")
    with pytest.raises(UnsupportedError, match="data watchpoints never fire on .*set can-use-hw-watchpoints 0"):
        d.debugger.insert_breakpoint(BreakpointKind.WRITE_WATCHPOINT, labels["counter"], 4)


@pytest.mark.skipif(
    not SUPPORT.watchpoints,
    reason="measured on the nested kvm_pvm backend: data watchpoints never fire (the guest runs on to its end)",
)
def test_a_write_watchpoint_stops_the_guest_after_the_store(debug, labels) -> None:  # type: ignore[no-untyped-def]
    d = debug("debug_long.elf")
    d.debugger.insert_breakpoint(BreakpointKind.WRITE_WATCHPOINT, labels["counter"], 4)
    assert d.resume() == Stop(0, StopReason.WRITE_WATCHPOINT, labels["counter"])
    assert d.dword(labels["counter"]) == 1


# --- the machine's side ---------------------------------------------------------------------------------
def test_a_machine_has_one_debugger(machine_factory) -> None:  # type: ignore[no-untyped-def]
    machine = machine_factory(memory="16M")
    MachineDebugger(machine)
    with pytest.raises(PykvmError, match="has a debugger already"):
        MachineDebugger(machine)


def test_a_machine_serves_gdb_from_its_config_and_stops_with_its_close(machine_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    socket = tmp_path / "gdb.sock"
    machine = machine_factory(memory="16M", gdb=f"unix:{socket}", gdb_wait=True)
    assert machine.gdb_server is not None and machine.gdb_server.gdb_address == str(socket)
    assert socket.is_socket()
    machine.close()
    assert not socket.exists()
