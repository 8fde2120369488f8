"""Auto-converge: a guest that writes memory faster than the link sends it is slowed down.

The throttle keeps every vCPU out of the guest for a share of each :data:`PERIOD` (the vCPU
threads sleep at their next exit boundary; see :meth:`pykvm.control.RunControl.nap`), so
the guest writes memory (and does everything else) that much slower.  As in QEMU, the share
starts at 20% and grows by 10 points each time the migration finds it still too fast, up to
99%.  A CPL3 guest that never exits is kicked out of the guest for its nap, as for a pause.
"""

from __future__ import annotations

import threading
from typing import Callable

PERIOD = 0.02  # seconds
INITIAL_SHARE = 0.2
STEP = 0.1
MAX_SHARE = 0.99


class Throttle:
    """Calls ``nap(seconds)`` every :data:`PERIOD` on a thread of its own while the share is above 0."""

    def __init__(self, nap: Callable[[float], None]) -> None:
        self._nap = nap
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self.share = 0.0

    def increase(self) -> None:
        """Throttle harder (the first time: start throttling)."""
        self.share = INITIAL_SHARE if not self.share else min(round(self.share + STEP, 2), MAX_SHARE)
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="pykvm-throttle", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop throttling and wait for the thread (idempotent); a nap under way runs out by itself."""
        self._stopped.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        while not self._stopped.is_set():
            self._nap(self.share * PERIOD)
            self._stopped.wait(PERIOD)
