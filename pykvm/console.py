"""The host side of the serial console: where guest output goes and where input comes from."""

from __future__ import annotations

import logging
import os
import sys
import termios
import threading
from typing import Callable

from .errors import ConfigError

log = logging.getLogger(__name__)


class SerialOutput:
    """The file descriptors transmitted bytes are written to.

    ``target`` is ``"stdio"``, ``"none"`` or a file path; ``capture`` adds an
    in-memory file whose contents :meth:`captured` returns.  The C fast path
    writes to the same descriptors (:attr:`fds`), so output order is kept.
    """

    def __init__(self, target: str = "none", capture: bool = False) -> None:
        self.fds: list[int] = []
        self._owned: list[int] = []
        self._capture_fd = -1
        if target == "stdio":
            sys.stdout.flush()
            self.fds.append(sys.stdout.fileno())
        elif target != "none":
            try:
                self._own(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644))
            except OSError as err:
                raise ConfigError(f"cannot open serial output file {target}: {err.strerror}") from err
        if capture:
            self._capture_fd = self._own(os.memfd_create("pykvm-serial", os.MFD_CLOEXEC))

    def _own(self, fd: int) -> int:
        self.fds.append(fd)
        self._owned.append(fd)
        return fd

    def write(self, data: bytes) -> None:
        """Write ``data`` to every descriptor; one that fails is dropped with a log line."""
        for fd in list(self.fds):
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            except OSError as err:
                log.warning("serial output to fd %d failed (%s); no longer writing there", fd, err.strerror)
                self.fds.remove(fd)

    def captured_size(self) -> int:
        return os.fstat(self._capture_fd).st_size if self._capture_fd >= 0 else 0

    def captured(self, start: int = 0) -> bytes | None:
        """What was captured from offset ``start`` on (None when not capturing)."""
        if self._capture_fd < 0:
            return None
        size = self.captured_size()
        return os.pread(self._capture_fd, size - start, start) if size > start else b""

    def close(self) -> None:
        for fd in self._owned:
            os.close(fd)
        self._owned.clear()
        self.fds.clear()
        self._capture_fd = -1


class StdinForwarder:
    """Forwards host input to a receiver (the UART) from a daemon thread.

    On a terminal, line buffering and echo are switched off while it runs (the
    guest echoes), and restored by :meth:`stop`; Ctrl-C still interrupts.
    """

    def __init__(self, receive: Callable[[bytes], None], fd: int | None = None) -> None:
        self._receive = receive
        self._fd = sys.stdin.fileno() if fd is None else fd
        self._saved: list | None = None

    def start(self) -> None:
        if os.isatty(self._fd):
            self._saved = termios.tcgetattr(self._fd)
            raw = termios.tcgetattr(self._fd)
            raw[3] &= ~(termios.ICANON | termios.ECHO)
            termios.tcsetattr(self._fd, termios.TCSANOW, raw)
        threading.Thread(target=self._pump, name="pykvm-stdin", daemon=True).start()

    def _pump(self) -> None:
        while True:
            try:
                data = os.read(self._fd, 4096)
            except OSError:
                return
            if not data:
                return
            self._receive(data)

    def stop(self) -> None:
        if self._saved is not None:
            termios.tcsetattr(self._fd, termios.TCSANOW, self._saved)
            self._saved = None
