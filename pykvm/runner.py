"""The runner: the threads that run a machine's vCPUs, the stop protocol, and the result.

:meth:`Runner.run` runs every vCPU on its own thread (the bootstrap processor on the
caller's) with a monitor thread beside them for the timeout and the halt probe, until
something ends the run: the guest (debug exit, reset, poweroff, a fault), the timeout,
or :meth:`Runner.stop`.  How a stop reaches a vCPU that sits in KVM_RUN, and how a run
is paused at exit boundaries, is :mod:`pykvm.control`'s; what each exit means is
:mod:`pykvm.dispatch`'s.  The runner turns the stop into a :class:`~pykvm.result.RunResult`.
A machine that sleeps (ACPI S3, its :class:`~pykvm.control.Sleeper`) sleeps across runs: a run
starts with every vCPU held until the machine wakes, and :meth:`Runner.wake` wakes it between runs too.
A :class:`RunObserver` (a debugger, a recorder or replayer) follows the runs: it learns of
each run's control before any vCPU runs, may look at vCPU 0 before each of its entries into
the guest, learns how the run stopped, and may amend the result.
"""

from __future__ import annotations

import functools
import signal
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

from .console import SerialOutput
from .control import RunControl, Sleeper, Stop
from .dispatch import ExitDispatcher
from .events import Events
from .kvm import Vcpu
from .kvm.exits import Exit, StopRequested
from .result import ExitReason, RunResult, RunStats, format_registers, status_of

# How often the monitor thread looks for a guest whose every vCPU halted for good.
HALT_PROBE_INTERVAL = 0.1


class RunObserver:
    """Follows the runs of a machine (:attr:`Runner.observer`); each method does nothing unless
    a subclass says otherwise, and :meth:`before_entry` costs nothing unless one does."""

    def run_started(self, control: RunControl) -> None:
        """A run begins; no vCPU has executed anything yet (``control.hold()`` keeps them so)."""

    def before_entry(self, vcpu: Vcpu, control: RunControl) -> None:
        """vCPU 0 is about to enter the guest: every exit it made has been answered (also after an
        interrupted KVM_RUN, a pause, and at the start of a run)."""

    def run_stopped(self, stop: Stop) -> None:
        """The run is over (every vCPU thread has left) because of ``stop``."""

    def finish(self, result: RunResult) -> RunResult:
        """The result the run ended with; returns the result to report."""
        return result


class Runner:
    """Runs ``vcpus`` through ``dispatcher``; ``stats`` gives the machine's statistics for a result.

    :attr:`observer` (one at most) follows the runs; without one, the vCPU threads run the loop
    of :meth:`Vcpu.run` and dispatch alone.
    """

    def __init__(
        self, vcpus: Sequence[Vcpu], dispatcher: ExitDispatcher, serial_output: SerialOutput,
        stats: Callable[[], RunStats], events: Events, observer: RunObserver | None = None,
        sleeper: Sleeper | None = None,
    ) -> None:  # fmt: skip
        self._events = events
        self._vcpus = list(vcpus)
        self._dispatch = dispatcher
        self._serial_output = serial_output
        self._stats = stats
        self._lock = threading.RLock()  # re-entrant: stop() may run in a signal handler
        self._control: RunControl | None = None
        self._running = False
        self._pending_stop: Stop | None = None  # a stop() that came while no run was going
        self.wall_ns = 0
        self.started: float | None = None  # time.monotonic() when the first run began
        self.observer = observer
        self._sleeper = sleeper

    @property
    def running(self) -> bool:
        return self._running

    def state(self) -> str:
        """``"created"`` (never run), ``"running"``, ``"paused"``, ``"suspended"`` (ACPI S3) or
        ``"stopped"`` (between runs)."""
        with self._lock:
            if self._running and self._control is not None:
                if self._control.paused:
                    return "paused"
                return "suspended" if self._control.asleep else "running"
            return "stopped" if self.started is not None else "created"


    # --- ending and pausing ----------------------------------------------------------------
    def request_stop(self, stop: Stop) -> None:
        """End the current run for ``stop`` (devices call it from a vCPU thread, inside an exit)."""
        control = self._control
        assert control is not None, "devices only act while the guest runs"
        control.request_stop(stop)

    def stop(self, signal_number: int | None = None) -> None:
        """End the current run as :attr:`ExitReason.STOPPED` (see :meth:`Machine.stop`)."""
        name = signal.Signals(signal_number).name if signal_number else None
        self.end(Stop(ExitReason.STOPPED, f"stopped by {name}" if name else "stopped", signal_number, with_registers=True))

    def end(self, stop: Stop) -> None:
        """End the current run for ``stop``, from any thread or a signal handler; while no run is
        going, the next one ends before the guest executes anything."""
        with self._lock:
            if self._running and self._control is not None:
                self._control.request_stop(stop)
            else:
                self._pending_stop = stop

    def suspend(self) -> None:
        """The guest put the machine to sleep (a device calls it from a vCPU thread, inside an exit):
        hold every vCPU until it wakes."""
        control = self._control
        assert control is not None and self._sleeper is not None, "only a machine that can sleep suspends"
        control.suspend(self._sleeper)

    def wake(self) -> bool:
        """Wake the sleeping machine: the run's vCPU 0 does, or this thread between runs (a wake
        that ends in a stop then ends the next run).  False if it does not sleep."""
        with self._lock:
            if self._running and self._control is not None:
                return self._control.wake()
            if self._sleeper is None or not self._sleeper.asleep:
                return False
            stop = self._sleeper.wake(by_alarm=False)
            if stop is not None:
                self._pending_stop = stop
            return True

    def pause(self, timeout: float | None = None) -> bool:
        """Park every vCPU of the current run at an exit boundary; False if no run is going
        (or it ended, or ``timeout`` passed first)."""
        with self._lock:
            control = self._control if self._running else None
        return control is not None and control.pause(timeout)

    def resume(self, vcpu_ids: Sequence[int] | None = None) -> None:
        """Let every paused vCPU (or those of ``vcpu_ids``) run on."""
        with self._lock:
            control = self._control if self._running else None
        if control is not None:
            control.resume(vcpu_ids)

    def nap(self, seconds: float) -> None:
        """Keep every vCPU of the current run out of the guest for ``seconds`` (see :meth:`RunControl.nap`)."""
        with self._lock:
            control = self._control if self._running else None
        if control is not None:
            control.nap(seconds)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """No vCPU runs inside (a machine that is not running needs no pausing); a run that was
        paused already stays paused afterwards."""
        with self._lock:
            control = self._control if self._running else None
        if control is not None and control.paused:
            yield
            return
        paused = self.pause()
        try:
            yield
        finally:
            if paused:
                self.resume()

    # --- running ---------------------------------------------------------------------------
    def run(self, timeout: float | None = None) -> RunResult:
        """Run the guest until it stops (or ``timeout`` seconds pass) and say how it ended."""
        control = RunControl(self._vcpus)
        if self.observer is not None:
            self.observer.run_started(control)
        capture_start = self._serial_output.captured_size()
        with self._lock:
            self._control, self._running = control, True
            if self._sleeper is not None and self._sleeper.asleep:
                control.suspend(self._sleeper)
            if self._pending_stop is not None:
                control.request_stop(self._pending_stop)
                self._pending_stop = None
        errors: list[BaseException] = []
        done = threading.Event()
        helpers = [threading.Thread(target=self._monitor, args=(control, timeout, done), name="pykvm-monitor")]
        helpers += [
            threading.Thread(target=self._run_ap, args=(vcpu, control, errors), name=f"pykvm-vcpu{vcpu.id}")
            for vcpu in self._vcpus[1:]
        ]
        started = time.monotonic_ns()
        if self.started is None:
            self.started = time.monotonic()
        self._events.emit("started", vcpus=len(self._vcpus))
        for thread in helpers:
            thread.start()
        try:
            self._run_vcpu(self._vcpus[0], control)
        except KeyboardInterrupt:  # Ctrl-C on the bootstrap processor's thread: the user stopped the run
            control.request_stop(Stop(ExitReason.STOPPED, "interrupted", signal.SIGINT))
            raise
        finally:
            control.request_stop(Stop(ExitReason.UNHANDLED, "the run was abandoned"))  # no-op if already stopping
            done.set()
            for thread in helpers:
                thread.join()
            with self._lock:
                self._running = False
            self.wall_ns += time.monotonic_ns() - started
            if self.observer is not None:
                assert control.stop is not None
                self.observer.run_stopped(control.stop)
        if errors:
            self._events.emit("ended", reason="error", error=str(errors[0]))
            raise errors[0]
        assert control.stop is not None
        result = self._result(control.stop, self._serial_output.captured(capture_start))
        if self.observer is not None:
            result = self.observer.finish(result)
        self._events.emit("ended", reason=result.reason.value, status=result.status, exit_value=result.exit_value)
        return result

    def _run_vcpu(self, vcpu: Vcpu, control: RunControl) -> None:
        control.enter(vcpu)
        handle = self._dispatch.handle
        enter = self._entry(vcpu, control)
        try:
            while True:
                exit = enter()
                if isinstance(exit, StopRequested):
                    if not control.park(vcpu):
                        return
                    continue
                handle(vcpu, exit, control)
        finally:
            control.leave(vcpu)

    def _entry(self, vcpu: Vcpu, control: RunControl) -> Callable[[], Exit]:
        """How ``vcpu``'s thread enters the guest: :meth:`Vcpu.run` answering port I/O and MMIO
        on the way, or, for vCPU 0 under an observer's look, returning every exit to it."""
        observer = self.observer
        if observer is None or vcpu is not self._vcpus[0] or type(observer).before_entry is RunObserver.before_entry:
            return functools.partial(vcpu.run, self._dispatch.access)

        def observed() -> Exit:
            observer.before_entry(vcpu, control)
            return vcpu.run()

        return observed

    def _run_ap(self, vcpu: Vcpu, control: RunControl, errors: list[BaseException]) -> None:
        try:
            self._run_vcpu(vcpu, control)
        except BaseException as err:  # reported by run() on the caller's thread
            errors.append(err)
            control.request_stop(Stop(ExitReason.UNHANDLED, f"vCPU {vcpu.id} failed: {err}"))

    def _monitor(self, control: RunControl, timeout: float | None, done: threading.Event) -> None:
        """The run's watchdog: the timeout, and the periodic halt probe."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = HALT_PROBE_INTERVAL if deadline is None else min(HALT_PROBE_INTERVAL, deadline - time.monotonic())
            if done.wait(max(wait, 0)):
                return
            if deadline is not None and time.monotonic() >= deadline:
                state = "suspended (ACPI S3)" if control.asleep else "running"
                stop = Stop(ExitReason.TIMEOUT, f"still {state} after {timeout:g} s", with_registers=True)
                control.request_stop(stop)
                return
            control.probe()

    def _result(self, stop: Stop, serial: bytes | None) -> RunResult:
        regs = sregs = None
        diagnosis = stop.diagnosis
        if stop.with_registers:
            vcpu = self._vcpus[stop.vcpu_id]
            regs, sregs = vcpu.exit_regs(), vcpu.get_sregs()
            where = f" on vCPU {vcpu.id}" if len(self._vcpus) > 1 else ""
            diagnosis = f"{diagnosis} at rip {regs.rip:#x}{where}\n{format_registers(regs, sregs)}"
        return RunResult(
            reason=stop.reason,
            status=status_of(stop.reason, stop.value),
            diagnosis=diagnosis,
            exit_value=stop.value,
            serial=serial or b"",
            regs=regs,
            sregs=sregs,
            stats=self._stats(),
        )
