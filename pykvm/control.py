"""The stop request of a run, and how it reaches every vCPU thread.

A vCPU thread sits in KVM_RUN for as long as its guest does not exit, so a stop
request (the guest ended, a timeout, another vCPU failed) must get it out: the
request sets every vCPU's stop flag and ``immediate_exit``
(:meth:`~pykvm.kvm.Vcpu.request_stop`), then sends each running thread
:data:`KICK_SIGNAL`, whose handler does nothing but make KVM_RUN return EINTR.  The C
run loop clears ``immediate_exit`` before it reads the flag, so a vCPU cannot enter
the guest again without seeing the request, and one whose thread has not started
yet sees it at its first KVM_RUN.

A run can also be *paused* without ending (for a snapshot, or a debugger looking at the
guest): :meth:`RunControl.pause` holds every vCPU, sets their stop flags and kicks them,
and returns once every vCPU thread is parked at an exit boundary
(:meth:`RunControl.park`); :meth:`RunControl.resume` lets all, or some, go on.  A
debugger, which must not block where it learns of an event, holds with
:meth:`RunControl.hold` and waits with :meth:`RunControl.wait_parked`.  A stop
request always wins over a pause: parked threads wake and leave.  :meth:`RunControl.nap`
keeps every vCPU out of the guest for a while without waiting for it (throttling a guest
that a live migration cannot keep up with): each one sleeps at its next exit boundary.

A machine *sleeps* (ACPI S3) from the guest's S3 write until a wake event:
:meth:`RunControl.suspend` holds every vCPU as a pause does, but apart from it (resuming
a pause does not wake the machine), and :meth:`RunControl.wake`, or the alarm the
:class:`Sleeper` names, ends the sleep.  The wake itself happens on vCPU 0's thread,
once every other vCPU thread is parked and no pause holds vCPU 0: it has the sleeper
reset the machine's processors (:class:`pykvm.sleep.Sleep`), then lets every vCPU go
on.  Meanwhile the parked threads wait on a condition, vCPU 0's with a timeout only
until the alarm: a sleeping machine takes no CPU.

With the in-kernel irqchip, HLT never leaves the kernel, so a guest that halts with
interrupts disabled would sit there for ever, as on hardware.  The run's monitor
thread therefore probes now and then (:meth:`RunControl.probe`): every vCPU is
interrupted once and reports whether it can still run by itself.  When in two probe
rounds in a row none can, the run stops as "halted" (two rounds, because a vCPU may
report "waiting for SIPI" just before another one wakes it and halts).
"""

from __future__ import annotations

import dataclasses
import signal
import threading
import time
from typing import TYPE_CHECKING, Iterable, Protocol, Sequence

from .native import lib
from .result import ExitReason

if TYPE_CHECKING:
    from .kvm import Vcpu

# The signal that kicks a vCPU thread out of KVM_RUN (its handler, installed in C, does nothing).
KICK_SIGNAL = signal.SIGRTMIN + 4
RFLAGS_IF = 1 << 9
# vCPU states from which only another vCPU (INIT/SIPI) or an NMI could wake it.
_WAITING_STATES = (lib.KVM_MP_STATE_UNINITIALIZED, lib.KVM_MP_STATE_INIT_RECEIVED)


@dataclasses.dataclass(frozen=True)
class Stop:
    """Why a run must end; ``with_registers`` asks for the stopping vCPU's registers in the result."""

    reason: ExitReason
    diagnosis: str
    value: int | None = None
    with_registers: bool = False
    vcpu_id: int = 0


class Sleeper(Protocol):
    """What the run of a machine that sleeps (ACPI S3) asks of it (:class:`pykvm.sleep.Sleep`)."""

    @property
    def asleep(self) -> bool:
        """Whether the machine sleeps (a run starts holding every vCPU if so)."""

    def alarm(self) -> float | None:
        """Seconds until a wake event of the machine's own (the RTC alarm); None if only
        :meth:`RunControl.wake` can wake it."""

    def wake(self, by_alarm: bool) -> Stop | None:
        """Wake the machine (its alarm came, or a :meth:`RunControl.wake`), no vCPU running; a stop
        if the run must end instead."""


class RunControl:
    """One run's stop request, the vCPU threads it must reach, pausing, and the halt probe."""

    def __init__(self, vcpus: Sequence[Vcpu]) -> None:
        self._lock = threading.RLock()  # re-entrant: a stop may be requested from a signal handler
        self._changed = threading.Condition(self._lock)
        self._vcpus = list(vcpus)
        self.stop: Stop | None = None
        self._threads: dict[int, int] = {}  # vCPU id -> the thread running it
        self._held: set[int] = set()  # vCPUs that must park at their next exit boundary
        self._parked: set[int] = set()
        self._naps: dict[int, float] = {}  # vCPU id -> seconds to sleep at its next exit boundary
        self._probe_round = 0
        self._halted: dict[int, int] = {}  # vCPU id -> the last probe round it reported halted in
        self._all_halted_since: int | None = None  # first probe round of an all-halted streak
        self._sleeper: Sleeper | None = None  # set while the machine sleeps
        self._alarm_at: float | None = None  # time.monotonic() when the sleeper's alarm wakes it
        self._woken_by_alarm: bool | None = None  # a wake is due: by the alarm, or asked for
        for vcpu in self._vcpus:
            vcpu.clear_stop()

    def request_stop(self, stop: Stop) -> None:
        """Ask every vCPU to stop; the first request wins."""
        with self._lock:  # held while kicking: a registered thread is a live thread
            if self.stop is not None:
                return
            self.stop = stop
            for vcpu in self._vcpus:
                vcpu.request_stop()
            self._kick_threads()
            self._changed.notify_all()  # parked threads leave

    def enter(self, vcpu: Vcpu) -> None:
        """Register the calling thread as the one running ``vcpu``."""
        with self._lock:
            self._threads[vcpu.id] = threading.get_ident()

    def leave(self, vcpu: Vcpu) -> None:
        with self._lock:
            self._threads.pop(vcpu.id, None)
            self._changed.notify_all()

    # --- pausing ------------------------------------------------------------------------------
    def pause(self, timeout: float | None = None) -> bool:
        """Hold every vCPU at its next exit boundary; wait until every vCPU thread but the
        caller's own is parked.  False if the run ended (or ``timeout`` passed) instead."""
        self.hold()
        return self.wait_parked(timeout)

    def hold(self) -> None:
        """Hold every vCPU at its next exit boundary, and return at once (:meth:`wait_parked`
        waits for them).  Called before the run's threads start, it holds every vCPU before
        the guest's first instruction."""
        with self._changed:
            if self.stop is not None:
                return
            self._held = {vcpu.id for vcpu in self._vcpus}
            for vcpu in self._vcpus:
                vcpu.request_stop()
            self._kick_threads()
            self._changed.notify_all()  # napping threads park at once

    def wait_parked(self, timeout: float | None = None) -> bool:
        """Wait until every vCPU thread but the caller's own is parked.  False if the run
        ended (or ``timeout`` passed) first."""
        with self._changed:
            me = threading.get_ident()
            settled = self._changed.wait_for(
                lambda: self.stop is not None
                or all(vcpu_id in self._parked for vcpu_id, thread in self._threads.items() if thread != me),
                timeout,
            )
            return bool(settled) and self.stop is None

    def resume(self, vcpu_ids: Iterable[int] | None = None) -> None:
        """Let every held vCPU (or those of ``vcpu_ids``) run again."""
        with self._changed:
            self._held = set() if vcpu_ids is None else self._held - set(vcpu_ids)
            self._changed.notify_all()

    @property
    def paused(self) -> bool:
        """Whether any vCPU is held."""
        return bool(self._held)

    def nap(self, seconds: float) -> None:
        """Keep every vCPU out of the guest for ``seconds`` from its next exit boundary (returns at once)."""
        with self._changed:
            if self.stop is not None:
                return
            self._naps = {vcpu.id: seconds for vcpu in self._vcpus}
            for vcpu in self._vcpus:
                vcpu.request_stop()
            self._kick_threads()

    def park(self, vcpu: Vcpu) -> bool:
        """On ``vcpu``'s thread, after its stop flag stopped it: sleep out a nap, then wait while it
        is held or the machine sleeps (vCPU 0 wakes it when a wake is due).

        True to run on; False when the run is ending (the thread leaves).
        """
        with self._changed:
            nap = self._naps.pop(vcpu.id, 0.0)
            if nap > 0:
                self._changed.wait_for(lambda: vcpu.id in self._held or self.stop is not None, nap)
            while self.stop is None and (vcpu.id in self._held or self._sleeper is not None):
                if vcpu is self._vcpus[0] and vcpu.id not in self._held and self._wake_due():
                    self._parked.discard(vcpu.id)
                    self._wake_machine(vcpu)
                    continue
                if vcpu.id not in self._parked:
                    self._parked.add(vcpu.id)
                    self._changed.notify_all()
                self._changed.wait(self._alarm_timeout(vcpu))
            self._parked.discard(vcpu.id)
            if self.stop is not None:
                return False
            vcpu.clear_stop()  # under the lock: a stop requested from now on sets it again
            return True

    # --- sleeping ---------------------------------------------------------------------------------
    def suspend(self, sleeper: Sleeper) -> None:
        """The machine sleeps: hold every vCPU until :meth:`wake` or ``sleeper``'s alarm (a device
        calls it inside an exit, or the runner before the run's threads start)."""
        alarm = sleeper.alarm()
        with self._changed:
            if self.stop is not None or self._sleeper is not None:
                return
            self._sleeper, self._woken_by_alarm = sleeper, None
            self._alarm_at = None if alarm is None else time.monotonic() + alarm
            for vcpu in self._vcpus:
                vcpu.request_stop()
            self._kick_threads()

    def wake(self) -> bool:
        """Wake the sleeping machine (vCPU 0 carries it out); False if it does not sleep, or
        the run is ending."""
        with self._changed:
            if self._sleeper is None or self.stop is not None:
                return False
            if self._woken_by_alarm is None:
                self._woken_by_alarm = False
            self._changed.notify_all()
            return True

    @property
    def asleep(self) -> bool:
        """Whether the machine sleeps."""
        return self._sleeper is not None

    def _wake_due(self) -> bool:
        if self._sleeper is None:
            return False
        if self._woken_by_alarm is None and self._alarm_at is not None and time.monotonic() >= self._alarm_at:
            self._woken_by_alarm = True
        return self._woken_by_alarm is not None

    def _alarm_timeout(self, vcpu: Vcpu) -> float | None:
        """How long ``vcpu``'s thread may wait before it must look at the alarm again."""
        if self._alarm_at is None or vcpu is not self._vcpus[0] or vcpu.id in self._held:
            return None
        return max(self._alarm_at - time.monotonic(), 0.0)

    def _wake_machine(self, vcpu: Vcpu) -> None:
        """On vCPU 0's thread: once every other vCPU thread is parked, have the sleeper wake the
        machine (a stop it returns ends the run), then let every vCPU go on.  A pause that comes
        meanwhile holds vCPU 0 first: it parks, and wakes the machine when resumed."""
        self._changed.wait_for(
            lambda: self.stop is not None
            or all(other in self._parked for other in self._threads if other != vcpu.id)
        )
        if self.stop is not None or self._sleeper is None or vcpu.id in self._held:
            return
        sleeper, by_alarm = self._sleeper, bool(self._woken_by_alarm)
        self._sleeper, self._alarm_at, self._woken_by_alarm = None, None, None
        stop = sleeper.wake(by_alarm)
        if stop is not None:
            self.request_stop(stop)
        self._changed.notify_all()

    # --- the halt probe ---------------------------------------------------------------------------
    def probe(self) -> None:
        """Start a halt probe round: interrupt every vCPU so that it reports its state."""
        with self._lock:
            if self._held or self._sleeper is not None:
                return  # a held vCPU does not run, so it cannot report
            self._probe_round += 1
            for vcpu in self._vcpus:
                vcpu.interrupt()
            self._kick_threads()

    def _kick_threads(self) -> None:
        for thread in self._threads.values():
            if thread != threading.get_ident():
                signal.pthread_kill(thread, KICK_SIGNAL)

    def report(self, vcpu: Vcpu) -> None:
        """After an interruption: note whether ``vcpu`` can run by itself, and stop if no vCPU can."""
        halted = _cannot_run_by_itself(vcpu)
        with self._lock:
            this_round = self._probe_round
            if not halted:
                self._halted.pop(vcpu.id, None)
                self._all_halted_since = None
                return
            self._halted[vcpu.id] = this_round
            if not all(self._halted.get(other.id) == this_round for other in self._vcpus):
                return
            if self._all_halted_since is None:
                self._all_halted_since = this_round
            dead = this_round > self._all_halted_since
        if dead:
            self.request_stop(Stop(ExitReason.HALTED, "every vCPU halted with interrupts disabled"))


def _cannot_run_by_itself(vcpu: Vcpu) -> bool:
    state = vcpu.get_mp_state()
    if state == lib.KVM_MP_STATE_HALTED:
        return not vcpu.get_regs().rflags & RFLAGS_IF
    return state in _WAITING_STATES
