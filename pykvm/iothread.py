"""The I/O thread: waits on file descriptors and runs their handlers off the vCPU threads.

Queue notifications (one ioeventfd per virtqueue) and host-side input (a TAP, a
console) become readable descriptors here; the handler of each runs on this one
thread.  A handler that fails is logged and counted, and the loop goes on: one
broken device must not silence the others.
"""

from __future__ import annotations

import logging
import os
import selectors
import threading
from collections import Counter
from typing import Callable

log = logging.getLogger(__name__)


class IoThread:
    """One thread, one epoll set, one handler per descriptor."""

    def __init__(self, name: str = "pykvm-io") -> None:
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._selector.register(self._wake, selectors.EVENT_READ, None)
        self._running = True
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

    def close(self) -> None:
        """Stop the thread and wait for it (idempotent)."""
        if not self._running:
            return
        self._running = False
        os.eventfd_write(self._wake, 1)
        if self._thread is not threading.current_thread():
            self._thread.join()
        self._selector.close()
        os.close(self._wake)

    def _loop(self) -> None:
        while self._running:
            for key, _ in self._selector.select():
                if key.data is None:
                    os.eventfd_read(self._wake)
                    continue
                try:
                    key.data()
                except Exception as err:  # a device bug must not stop every other device
                    self.stats["handler_errors"] += 1
                    log.error("I/O handler for fd %d failed: %s", key.fd, err, exc_info=log.isEnabledFor(logging.DEBUG))
