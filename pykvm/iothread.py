"""The I/O thread: waits on file descriptors and runs their handlers off the vCPU threads.

Queue notifications (one ioeventfd per virtqueue) and host-side input (a TAP, a
console) become readable descriptors here; the handler of each runs on this one
thread.  A handler that fails is logged and counted, and the loop goes on: one
broken device must not silence the others.

:meth:`IoThread.quiesce` parks the thread for a moment in which device state must not
change (a snapshot): it first runs every handler whose descriptor is already readable,
so that no notification the guest sent before the pause is left unprocessed, then waits
until :meth:`IoThread.resume`.
"""

from __future__ import annotations

import logging
import os
import selectors
import threading
from collections import Counter
from typing import Callable

log = logging.getLogger(__name__)

# How many rounds of ready handlers quiesce() runs before it parks; each round handles every
# descriptor that is readable, and a device that keeps itself busy must not delay a snapshot.
DRAIN_ROUNDS = 16


class IoThread:
    """One thread, one epoll set, one handler per descriptor."""

    def __init__(self, name: str = "pykvm-io") -> None:
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._selector.register(self._wake, selectors.EVENT_READ, None)
        self._running = True
        self._state = threading.Condition()
        self._pause_wanted = False
        self._parked = False
        self.stats: Counter[str] = Counter()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def add(self, fd: int, handler: Callable[[], None]) -> None:
        """Call ``handler`` (on this thread) whenever ``fd`` is readable."""
        with self._lock:
            self._selector.register(fd, selectors.EVENT_READ, handler)

    def remove(self, fd: int) -> None:
        with self._lock:
            if fd in self._selector.get_map():
                self._selector.unregister(fd)

    def quiesce(self) -> None:
        """Run what is pending, then park the thread until :meth:`resume` (from another thread)."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("the I/O thread cannot quiesce itself")
        with self._state:
            self._pause_wanted = True
            os.eventfd_write(self._wake, 1)
            self._state.wait_for(lambda: self._parked or not self._running)

    def resume(self) -> None:
        with self._state:
            self._pause_wanted = False
            self._state.notify_all()

    def close(self) -> None:
        """Stop the thread and wait for it (idempotent)."""
        if not self._running:
            return
        with self._state:
            self._running = False
            self._state.notify_all()
        os.eventfd_write(self._wake, 1)
        if self._thread is not threading.current_thread():
            self._thread.join()
        self._selector.close()
        os.close(self._wake)

    def _loop(self) -> None:
        while self._running:
            self._handle(self._selector.select())
            if self._pause_wanted:
                self._park()

    def _handle(self, events: list[tuple[selectors.SelectorKey, int]]) -> None:
        for key, _ in events:
            if key.data is None:
                try:
                    os.eventfd_read(self._wake)
                except BlockingIOError:
                    pass
                continue
            try:
                key.data()
            except Exception as err:  # a device bug must not stop every other device
                self.stats["handler_errors"] += 1
                log.error("I/O handler for fd %d failed: %s", key.fd, err, exc_info=log.isEnabledFor(logging.DEBUG))

    def _park(self) -> None:
        for _ in range(DRAIN_ROUNDS):
            ready = [event for event in self._selector.select(timeout=0) if event[0].data is not None]
            if not ready:
                break
            self._handle(ready)
        with self._state:
            self._parked = True
            self._state.notify_all()
            self._state.wait_for(lambda: not self._pause_wanted or not self._running)
            self._parked = False
