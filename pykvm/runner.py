"""The runner: the threads that run a machine's vCPUs, the stop protocol, and the result.

:meth:`Runner.run` runs every vCPU on its own thread (the bootstrap processor on the
caller's) with a monitor thread beside them for the timeout and the halt probe, until
something ends the run: the guest (debug exit, reset, poweroff, a fault), the timeout,
or :meth:`Runner.stop`.  How a stop reaches a vCPU that sits in KVM_RUN, and how a run
is paused at exit boundaries, is :mod:`pykvm.control`'s; what each exit means is
:mod:`pykvm.dispatch`'s.  The runner turns the stop into a :class:`~pykvm.result.RunResult`.
"""

from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

from .console import SerialOutput
from .control import RunControl, Stop
from .dispatch import ExitDispatcher
from .kvm import Vcpu
from .kvm.exits import StopRequested
from .result import ExitReason, RunResult, RunStats, format_registers, status_of

# How often the monitor thread looks for a guest whose every vCPU halted for good.
HALT_PROBE_INTERVAL = 0.1


class Runner:
    """Runs ``vcpus`` through ``dispatcher``; ``stats`` gives the machine's statistics for a result."""

    def __init__(
        self, vcpus: Sequence[Vcpu], dispatcher: ExitDispatcher, serial_output: SerialOutput,
        stats: Callable[[], RunStats],
    ) -> None:  # fmt: skip
        self._vcpus = list(vcpus)
        self._dispatch = dispatcher
        self._serial_output = serial_output
        self._stats = stats
        self._lock = threading.RLock()  # re-entrant: stop() may run in a signal handler
        self._control: RunControl | None = None
        self._running = False
        self._pending_stop: Stop | None = None  # a stop() that came while no run was going
        self.wall_ns = 0

    @property
    def running(self) -> bool:
        return self._running

    # --- ending and pausing ----------------------------------------------------------------
    def request_stop(self, stop: Stop) -> None:
        """End the current run for ``stop`` (devices call it from a vCPU thread, inside an exit)."""
        control = self._control
        assert control is not None, "devices only act while the guest runs"
        control.request_stop(stop)

    def stop(self, signal_number: int | None = None) -> None:
        """End the current run as :attr:`ExitReason.STOPPED` (see :meth:`Machine.stop`)."""
        name = signal.Signals(signal_number).name if signal_number else None
        stop = Stop(ExitReason.STOPPED, f"stopped by {name}" if name else "stopped", signal_number, with_registers=True)
        with self._lock:
            if self._running and self._control is not None:
                self._control.request_stop(stop)
            else:
                self._pending_stop = stop

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
        capture_start = self._serial_output.captured_size()
        with self._lock:
            self._control, self._running = control, True
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
        for thread in helpers:
            thread.start()
        try:
            self._run_vcpu(self._vcpus[0], control)
        finally:
            control.request_stop(Stop(ExitReason.UNHANDLED, "the run was abandoned"))  # no-op if already stopping
            done.set()
            for thread in helpers:
                thread.join()
            with self._lock:
                self._running = False
            self.wall_ns += time.monotonic_ns() - started
        if errors:
            raise errors[0]
        assert control.stop is not None
        return self._result(control.stop, self._serial_output.captured(capture_start))

    def _run_vcpu(self, vcpu: Vcpu, control: RunControl) -> None:
        control.enter(vcpu)
        handle = self._dispatch.handle
        try:
            while True:
                exit = vcpu.run()
                if isinstance(exit, StopRequested):
                    if not control.park(vcpu):
                        return
                    continue
                handle(vcpu, exit, control)
        finally:
            control.leave(vcpu)

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
                control.request_stop(Stop(ExitReason.TIMEOUT, f"still running after {timeout:g} s", with_registers=True))
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
            serial=serial,
            regs=regs,
            sregs=sregs,
            stats=self._stats(),
        )
