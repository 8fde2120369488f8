"""A :class:`~pykvm.machine.Machine` as the gdb server's :class:`~pykvm.gdbstub.DebugTarget`.

:class:`MachineDebugger` follows the machine's runs (a
:class:`~pykvm.runner.RunObserver`) and sees its guest debug exits and emulation failures
first (the dispatcher's ``debug_handler``).  Stopping is all-stop, in two halves:

* whoever learns of an event (the vCPU thread that hit a breakpoint or finished a step,
  or the server's thread for gdb's Ctrl-C) notes it as *pending* and holds every vCPU
  (:meth:`RunControl.hold <pykvm.control.RunControl.hold>`), without waiting;
* :meth:`MachineDebugger.wait_stop`, on the server's thread, waits until every vCPU
  thread is parked (:meth:`RunControl.wait_parked <pykvm.control.RunControl.wait_parked>`)
  and only then reports the event.  Nothing of the guest changes while gdb looks.

Only the first event is reported; a vCPU that meets another one meanwhile parks with the
rest, and meets its breakpoint again when it runs on.  Before a run starts the target is
stopped before the first instruction; if it is still stopped when the run starts, every
vCPU is held before it executes anything (QEMU's ``-S``).  The end of the run is
:class:`~pykvm.gdbstub.Exited` with the machine's exit status, or
:class:`~pykvm.gdbstub.Killed` when something outside the guest ended it (``kill``,
``--timeout``, Ctrl-C): a stop request always wins over the debugger.  The end removes
every breakpoint and turns guest debugging off; a later run of the machine is a new
guest, which runs until a gdb stops it.

Breakpoints, and what this host can do (:func:`pykvm.info.debug_support`):

* software breakpoints are int3 bytes planted in guest memory.  Where KVM reports an int3
  as ``KVM_EXIT_DEBUG`` (VT-x, AMD-V) the debugger sets ``KVM_GUESTDBG_USE_SW_BP`` and
  hands a guest's own int3 back to it; on kvm_pvm an int3 at CPL0 ends in an emulation
  failure at its address, which the debugger claims when the int3 is one it planted.
  Where int3s cannot stop the guest (kvm_pvm: real mode, where the guest takes the int3
  itself, and user mode) resuming a vCPU there with software breakpoints set is refused,
  with a message that points to ``hbreak``;
* hardware breakpoints and watchpoints use the four debug registers
  (``KVM_GUESTDBG_USE_HW_BP``); a guest's own #DB is handed back to it.  Watchpoints are
  refused where they never fire;
* a step is ``KVM_GUESTDBG_SINGLESTEP``, with ``KVM_GUESTDBG_BLOCKIRQ`` where KVM offers
  it, so that a step executes the next instruction and not an interrupt handler (QEMU's
  default).  Stepping is refused where a step would be given to the guest instead.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from ..control import RunControl
from ..errors import KvmIoctlError
from ..control import Stop as RunStop
from ..gdbstub import (
    Action,
    BreakpointKind,
    CpuMode,
    DebugTargetError,
    Exited,
    Killed,
    Stop,
    StopEvent,
    StopReason,
    UnsupportedError,
)
from ..info import Privilege, debug_support, kvm_backend
from ..kvm import Vcpu
from ..kvm.debug import BP_VECTOR, DB_VECTOR, DR6_SINGLE_STEP, GuestDebug
from ..kvm.exits import GuestDebugExit, InternalErrorExit
from ..native import lib
from ..result import ExitReason, status_of
from ..runner import RunObserver
from . import registers
from .breakpoints import DebugRegisters
from .memory import DebugMemory

if TYPE_CHECKING:
    from ..machine import Machine

log = logging.getLogger(__name__)

#: Run endings that came from outside the guest: gdb is told the guest was killed.
ENDED_FROM_OUTSIDE = (ExitReason.STOPPED, ExitReason.TIMEOUT)
_WAITING_FOR_SIPI = (lib.KVM_MP_STATE_UNINITIALIZED, lib.KVM_MP_STATE_INIT_RECEIVED)


class MachineDebugger(RunObserver):
    """The debug interface of ``machine``, for :class:`~pykvm.gdbstub.GdbServer` (module doc).

    What it refuses follows what guest debugging this host can do
    (:func:`~pykvm.info.debug_support` of the backend serving ``/dev/kvm``).
    """

    def __init__(self, machine: Machine) -> None:
        backend = kvm_backend()
        self._support = debug_support(backend)
        self._host = f"this host's KVM ({backend})" if backend else "this host's KVM"
        self._machine = machine
        self._vcpus = {vcpu.id: vcpu for vcpu in machine.vcpus}
        self._block_irq = bool(machine.vm.set_guest_debug_flags() & lib.KVM_GUESTDBG_BLOCKIRQ)
        self._memory = DebugMemory(machine.memory)
        self._software: dict[int, int] = {}  # int3 breakpoints: virtual address -> guest-physical
        self._hardware = DebugRegisters()
        self._lock = threading.Condition()
        self._event: StopEvent | None = Stop(machine.vcpus[0].id, StopReason.INTERRUPTED)  # None: running
        self._pending: Stop | None = None  # found, waiting for every vCPU to park
        self._actions: dict[int, Action] = {}
        self._control: RunControl | None = None  # the current run's
        machine.attach_debugger(self)

    # --- the machine's side: runs and exits ----------------------------------------------------
    def run_started(self, control: RunControl) -> None:
        with self._lock:
            if isinstance(self._event, (Exited, Killed)):  # the machine runs again: a new guest life
                self._event, self._actions = None, {vcpu: Action.CONTINUE for vcpu in self._vcpus}
            self._control = control
            if self._event is not None or self._pending is not None or len(self._actions) < len(self._vcpus):
                control.hold()
            if self._event is None and self._pending is None:
                control.resume(self._actions)

    def run_stopped(self, stop: RunStop) -> None:
        """The guest's life is over: its breakpoints go (gdb, told so, removes none) and so does
        debugging, so that a later run of the machine starts as a new guest."""
        with self._lock:
            self._control, self._pending = None, None
            if not isinstance(self._event, Killed):
                ended = stop.reason in ENDED_FROM_OUTSIDE
                self._event = Killed() if ended else Exited(status_of(stop.reason, stop.value))
            self._forget_breakpoints()
            for vcpu in self._vcpus.values():
                try:
                    vcpu.set_guest_debug(GuestDebug(enable=False))
                except KvmIoctlError as err:  # the run's own outcome matters more: say so and go on
                    log.warning("could not turn guest debugging off on vCPU %d: %s", vcpu.id, err)
            self._lock.notify_all()

    def handle_exit(self, vcpu: Vcpu, exit: GuestDebugExit | InternalErrorExit, control: RunControl) -> bool:
        """On ``vcpu``'s thread: True if the exit is the debugger's event (a breakpoint it set, a
        step it asked for), or a guest's own debug exception the debugger gave back to it."""
        if isinstance(exit, GuestDebugExit) and exit.exception not in (DB_VECTOR, BP_VECTOR):
            return False  # x86 reports no other: the run ends as an unhandled debug exit
        if isinstance(exit, InternalErrorExit):
            if not self._at_planted_int3(vcpu):
                return False  # a real emulation failure: the run ends
            self._found(Stop(vcpu.id, StopReason.SOFTWARE_BREAKPOINT), control)
            return True
        stop = self._debug_stop(vcpu, exit)
        if stop is not None:
            self._found(stop, control)
            return True
        with self._lock:
            stepping = self._actions.get(vcpu.id) is Action.STEP
        try:
            vcpu.set_guest_debug(self._guest_debug(stepping, inject=exit.exception))
        except KvmIoctlError:
            return False  # KVM cannot give it back (another exception is pending): the run ends, as without one
        return True

    def _debug_stop(self, vcpu: Vcpu, exit: GuestDebugExit) -> Stop | None:
        """The stop a ``KVM_EXIT_DEBUG`` means, or None if the guest raised it for itself."""
        if exit.exception == BP_VECTOR:
            return Stop(vcpu.id, StopReason.SOFTWARE_BREAKPOINT) if self._at_planted_int3(vcpu) else None
        with self._lock:
            stepping = self._actions.get(vcpu.id) is Action.STEP
            hit = self._hardware.hit(exit.dr6)
        if stepping and exit.dr6 & DR6_SINGLE_STEP:
            return Stop(vcpu.id, StopReason.STEP)
        return None if hit is None else Stop(vcpu.id, *hit)

    def _at_planted_int3(self, vcpu: Vcpu) -> bool:
        try:
            return self._memory.is_planted(self._memory.physical(vcpu, registers.linear_rip(vcpu)))
        except DebugTargetError:
            return False

    def _found(self, stop: Stop, control: RunControl) -> None:
        """Note the first event of this run and hold every vCPU (:meth:`wait_stop` reports it)."""
        with self._lock:
            if self._event is None and self._pending is None and control is self._control:
                self._pending = stop
                control.hold()
                self._lock.notify_all()

    # --- DebugTarget: state ----------------------------------------------------------------------
    def vcpu_ids(self) -> Sequence[int]:
        return list(self._vcpus)

    def cpu_mode(self, vcpu: int) -> CpuMode:
        return registers.cpu_mode(self._vcpus[vcpu].get_sregs())

    def read_registers(self, vcpu: int) -> Mapping[str, int]:
        return registers.read_registers(self._stopped_vcpu(vcpu))

    def write_registers(self, vcpu: int, values: Mapping[str, int]) -> None:
        registers.write_registers(self._stopped_vcpu(vcpu), values)

    def read_memory(self, vcpu: int, address: int, length: int) -> bytes:
        return self._memory.read(self._stopped_vcpu(vcpu), address, length)

    def write_memory(self, vcpu: int, address: int, data: bytes) -> None:
        self._memory.write(self._stopped_vcpu(vcpu), address, data)

    def _stopped_vcpu(self, vcpu: int) -> Vcpu:
        if self._event is None:
            raise DebugTargetError("the guest is running: stop it first")
        return self._vcpus[vcpu]

    # --- DebugTarget: breakpoints ------------------------------------------------------------------
    def insert_breakpoint(self, kind: BreakpointKind, address: int, length: int) -> None:
        with self._lock:
            if kind is BreakpointKind.SOFTWARE:
                if not self._where(kind):
                    raise UnsupportedError(self._never_fire(kind))
                if address not in self._software:
                    gpa = self._memory.physical(self._stopped_vcpu(self._current_vcpu()), address)
                    self._memory.plant(gpa)
                    self._software[address] = gpa
                return
            if not self._where(kind):
                raise UnsupportedError(self._never_fire(kind))
            self._hardware.insert(kind, address, length)

    def remove_breakpoint(self, kind: BreakpointKind, address: int, length: int) -> None:
        with self._lock:
            if kind is not BreakpointKind.SOFTWARE:
                self._hardware.remove(kind, address, length)
                return
            gpa = self._software.pop(address, None)
            if gpa is not None and gpa not in self._software.values():
                self._memory.unplant(gpa)

    def _where(self, kind: BreakpointKind) -> frozenset[Privilege]:
        """Where breakpoints of ``kind`` stop the guest on this host."""
        if kind is BreakpointKind.SOFTWARE:
            return self._support.software_breakpoints
        if kind is BreakpointKind.HARDWARE:
            return self._support.hardware_breakpoints
        return self._support.watchpoints

    def _never_fire(self, kind: BreakpointKind) -> str:
        if kind is BreakpointKind.SOFTWARE:
            return f"an int3 never stops the guest on {self._host}: use hbreak"
        if kind is BreakpointKind.HARDWARE:
            return f"hardware breakpoints never stop the guest on {self._host}"
        return (f"data watchpoints never fire on {self._host}: `set can-use-hw-watchpoints 0` "
                "makes gdb watch by single-stepping instead")  # fmt: skip

    def _current_vcpu(self) -> int:
        return self._event.vcpu if isinstance(self._event, Stop) else min(self._vcpus)

    # --- DebugTarget: running ------------------------------------------------------------------
    def resume(self, actions: Mapping[int, Action]) -> None:
        with self._lock:
            if isinstance(self._event, (Exited, Killed)):
                return
            if self._event is None:
                raise DebugTargetError("the guest is running already")
            for vcpu_id, action in actions.items():
                self._check_can_resume(self._vcpus[vcpu_id], action)
            try:
                for vcpu in self._vcpus.values():
                    vcpu.set_guest_debug(self._guest_debug(actions.get(vcpu.id) is Action.STEP))
            except KvmIoctlError as err:
                raise DebugTargetError(f"KVM refused the breakpoints and steps asked for: {err}") from err
            self._event, self._actions = None, dict(actions)
            if self._control is not None:
                self._control.resume(actions)

    def _check_can_resume(self, vcpu: Vcpu, action: Action) -> None:
        """Refuse what this host cannot do where ``vcpu`` is (an AP waiting for its SIPI runs nothing)."""
        if vcpu.get_mp_state() in _WAITING_FOR_SIPI:
            return
        where = registers.privilege(vcpu.get_sregs())
        if action is Action.STEP and where not in self._support.single_step:
            raise UnsupportedError(
                f"cannot step vCPU {vcpu.id}: single steps do not stop the guest in {where.value} on {self._host}"
            )
        if self._software and where not in self._support.software_breakpoints:
            hardware = [place.value for place in Privilege if place in self._support.hardware_breakpoints]
            hint = f"delete them and use hbreak (it works in {' and '.join(hardware)})" if hardware else "delete them"
            raise UnsupportedError(
                f"cannot resume vCPU {vcpu.id} in {where.value} with software breakpoints set: "
                f"on {self._host} an int3 does not stop the guest there; {hint}"
            )

    def _guest_debug(self, stepping: bool, inject: int | None = None) -> GuestDebug:
        """What KVM must report for one vCPU: its step, and every breakpoint (nothing: debugging off)."""
        hardware = self._hardware.registers()
        return GuestDebug(
            enable=bool(stepping or self._software or hardware or inject),
            single_step=stepping,
            software_breakpoints=bool(self._software),
            hardware_breakpoints=hardware,
            block_irq=stepping and self._block_irq,
            inject=inject,
        )

    def wait_stop(self, timeout: float) -> StopEvent | None:
        deadline = time.monotonic() + timeout
        with self._lock:
            self._lock.wait_for(lambda: self._event is not None or self._pending is not None, timeout)
            if self._event is not None or self._pending is None:
                return self._event
            control = self._control
        if control is not None and not control.wait_parked(max(0.0, deadline - time.monotonic())):
            return self._event  # not yet (or the run is ending: its end comes next)
        with self._lock:
            if self._event is None and self._pending is not None and self._control is control:
                self._event, self._pending = self._pending, None
                self._lock.notify_all()
            return self._event

    def interrupt(self) -> None:
        with self._lock:
            if self._event is not None or self._pending is not None:
                return
            stop = Stop(min(self._actions or self._vcpus), StopReason.INTERRUPTED)
            if self._control is None:  # no run is going: nothing executes
                self._event = stop
            else:
                self._pending = stop
                self._control.hold()
            self._lock.notify_all()

    def detach(self) -> None:
        with self._lock:
            if isinstance(self._event, (Exited, Killed)):
                return
            self._forget_breakpoints()
        self.resume({vcpu: Action.CONTINUE for vcpu in self._vcpus})

    def _forget_breakpoints(self) -> None:
        for gpa in set(self._software.values()):
            self._memory.unplant(gpa)
        self._software.clear()
        self._hardware.clear()

    def kill(self) -> None:
        with self._lock:
            if isinstance(self._event, (Exited, Killed)):
                return
            self._event, self._pending = Killed(), None
            control = self._control
            self._lock.notify_all()
        if control is not None:
            control.request_stop(RunStop(ExitReason.STOPPED, "killed by gdb", signal.SIGKILL))
        else:
            self._machine.stop(signal.SIGKILL)  # the next run ends before the guest executes anything
