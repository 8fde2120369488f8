"""Logging that a guest cannot flood.

A guest decides how often some warnings happen (a driver that breaks the virtio
protocol in a loop, a balloon driver sending bad page numbers).  :class:`RateLimitedLog`
lets the first few through in each period and counts the rest; when a new period
opens it first says how many were left out, so the log is bounded and nothing is
hidden without saying so.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable


class RateLimitedLog:
    """At most ``burst`` messages per ``period`` seconds to ``logger``; the rest are counted."""

    def __init__(
        self, logger: logging.Logger, burst: int, period: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._logger = logger
        self._burst = burst
        self._period = period
        self._clock = clock
        self._lock = threading.Lock()
        self._window_start = -period
        self._in_window = 0
        self.suppressed = 0  # left out in the current window
        self.total_suppressed = 0

    def log(self, level: int, message: str, *args: object) -> bool:
        """Log ``message % args`` at ``level`` unless this period's burst is used up; True if logged."""
        with self._lock:
            now = self._clock()
            if now - self._window_start >= self._period:
                left_out, self.suppressed = self.suppressed, 0
                self._window_start, self._in_window = now, 0
                if left_out:
                    self._logger.log(level, "(%d similar messages were left out in the last %g s)", left_out, self._period)
            if self._in_window >= self._burst:
                self.suppressed += 1
                self.total_suppressed += 1
                return False
            self._in_window += 1
            last = self._in_window == self._burst
        self._logger.log(level, message + (" (further ones are counted, not logged, for a while)" if last else ""), *args)
        return True

    def warning(self, message: str, *args: object) -> bool:
        return self.log(logging.WARNING, message, *args)
