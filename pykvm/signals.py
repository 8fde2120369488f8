"""SIGINT, SIGTERM and SIGHUP for the ``pykvm`` command: end the run as ``--timeout`` does.

The signals are blocked in every thread and taken by one thread with ``sigwait()``, so they
reach the machine whatever the main thread is doing (inside KVM_RUN, waiting for a slow
serial output, importing).  While nothing needs cleaning up, a signal ends the process at once
with status 128 + its number; once a machine is being built (it may own a control socket
file), the signal stops it instead: the vCPUs leave the guest, the registers and ``--stats``
are printed, everything is closed, and the status is again 128 + the signal.  A second signal
ends the process at once (after restoring the terminal).

This module imports nothing of pykvm, so that it can be installed before the rest loads.
"""

from __future__ import annotations

import os
import signal
import threading

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    Stop = Callable[[int], None]

STOP_SIGNALS = frozenset((signal.SIGINT, signal.SIGTERM, signal.SIGHUP))


class SignalStop:
    """Where the stop signals go: the process (nothing to clean up), or the machine."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._installed = False
        self._guarding = False  # resources exist: a first signal stops the machine, not the process
        self._stop: Stop | None = None
        self._received: int | None = None
        self._before_exit: list[Callable[[], None]] = []

    @property
    def installed(self) -> bool:
        return self._installed

    def install(self) -> None:
        """Block the stop signals in this thread and every thread it starts; take them on one thread."""
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        threading.Thread(target=self._take_signals, name="pykvm-signals", daemon=True).start()
        self._installed = True

    def guard(self) -> None:
        """From now on resources exist: a first signal is kept for :meth:`attach` instead of exiting."""
        with self._lock:
            self._guarding = True

    def attach(self, stop: Stop) -> None:
        """Send the stop signals to ``stop`` (a machine's :meth:`~pykvm.machine.Machine.stop`),
        including one that came while the machine was being built."""
        with self._lock:
            self._stop, received = stop, self._received
        if received is not None:
            stop(received)

    def release(self) -> None:
        """The machine is closed: a signal ends the process at once again."""
        with self._lock:
            self._guarding, self._stop = False, None

    def before_exit(self, action: Callable[[], None]) -> None:
        """Run ``action`` (e.g. restore the terminal) before the process ends without cleanup."""
        self._before_exit.append(action)

    def _take_signals(self) -> None:
        while True:
            self._handle(signal.sigwait(STOP_SIGNALS))

    def _handle(self, signal_number: int) -> None:
        with self._lock:
            first = self._received is None
            if first:
                self._received = signal_number
            guarding, stop = self._guarding, self._stop
        if first and guarding:
            if stop is not None:
                stop(signal_number)
            return
        for action in self._before_exit:
            action()
        os.write(2, f"pykvm: interrupted by {signal.Signals(signal_number).name}\n".encode())
        os._exit(128 + signal_number)


STOPPER = SignalStop()
