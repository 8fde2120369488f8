"""The host side of the serial console: where guest output goes and where input comes from."""

from __future__ import annotations

import errno
import os
import sys
import termios
import threading
from typing import Any, Callable

from .config import SerialConfig
from .errors import ConfigError
from .native import ffi, lib

# Seconds a descriptor may take no output (a pipe nobody reads, a terminal held with Ctrl-S)
# before the guest's output to it is dropped instead of stopping the guest.
STALL_LIMIT = 5.0


class SerialOutput:
    """Where the guest's serial output goes: the console, a file, and/or an in-memory capture.

    ``target`` is what :meth:`~pykvm.config.SerialConfig.parse` reads (``"stdio"``, ``"null"``,
    ``"none"``, ``"file:PATH"`` or a path); ``capture`` adds an in-memory file whose contents
    :meth:`captured` returns.  Python's devices (:meth:`write`) and the C fast path write through
    the same C function and the same state (:attr:`sink`), so output order is kept and both
    treat a slow or dead reader alike: a stop request always ends a wait; output a descriptor
    does not take for ``stall_limit`` seconds is dropped and counted until it takes bytes again;
    a descriptor whose write fails is given up.  :meth:`problems` says each of these once.
    """

    def __init__(self, target: str | SerialConfig = "none", capture: bool = False,
                 stall_limit: float = STALL_LIMIT) -> None:  # fmt: skip
        spec = target if isinstance(target, SerialConfig) else SerialConfig.parse(target)
        self.sink = ffi.new("struct pykvm_serial_out *")
        self.sink.stall_ns = int(stall_limit * 1e9)
        self._name = "the output"  # the console or file, for messages (the capture never stalls)
        self._owned: list[int] = []
        self._capture_fd = -1
        self._stop_flag = ffi.NULL
        self._said = {"error": 0, "dropped": 0, "stalls": 0}
        fds = []
        if spec.kind == "stdio":
            sys.stdout.flush()
            fds.append(sys.stdout.fileno())
            self._name = "stdout"
        elif spec.path is not None:  # a file
            fds.append(self._own(_open_output(spec.path)))
            self._name = spec.path
        if capture:
            self._capture_fd = self._own(os.memfd_create("pykvm-serial", os.MFD_CLOEXEC))
            fds.append(self._capture_fd)
        for index in range(lib.PYKVM_SERIAL_FDS):
            self.sink.fds[index] = fds[index] if index < len(fds) else -1

    def _own(self, fd: int) -> int:
        self._owned.append(fd)
        return fd

    @property
    def fds(self) -> list[int]:
        """The descriptors still written to."""
        return [fd for fd in self.sink.fds if fd >= 0]

    def watch_stop(self, flag: object) -> None:
        """Give up waiting for a slow descriptor once the C ``uint32_t *`` ``flag`` is set
        (a vCPU's stop flag: :attr:`~pykvm.kvm.Vcpu.stop_flag`)."""
        self._stop_flag = flag

    def write(self, data: bytes) -> None:
        """Write ``data`` to every descriptor (see the class doc for one that does not take it)."""
        lib.pykvm_serial_write(self.sink, self._stop_flag, data, len(data))

    @property
    def transmitted(self) -> int:
        """Bytes the guest has sent, written or not."""
        return int(self.sink.transmitted)

    @property
    def dropped(self) -> int:
        """Bytes a descriptor did not take (it stalled, or a stop request ended the wait)."""
        return int(self.sink.dropped)

    def problems(self) -> list[str]:
        """What went wrong with the output since the last call, each problem said once."""
        messages = []
        error, dropped, stalls = int(self.sink.error), self.dropped, int(self.sink.stalls)
        if error and error != self._said["error"]:
            messages.append(f"serial output failed ({os.strerror(error)}); no longer writing there")
        if dropped > self._said["dropped"]:
            why = (f"{self._name} took nothing for {self.sink.stall_ns / 1e9:g} s" if stalls > self._said["stalls"]
                   else f"the run was stopped while {self._name} took nothing")  # fmt: skip
            messages.append(f"serial output: {dropped - self._said['dropped']} bytes dropped ({why})")
        self._said = {"error": error, "dropped": dropped, "stalls": stalls}
        return messages

    def captured_size(self) -> int:
        return os.fstat(self._capture_fd).st_size if self._capture_fd >= 0 else 0

    def captured(self, start: int = 0) -> bytes | None:
        """What was captured from offset ``start`` on (None when not capturing)."""
        if self._capture_fd < 0:
            return None
        size = self.captured_size()
        return os.pread(self._capture_fd, size - start, start) if size > start else b""

    def close(self) -> None:
        for index in range(lib.PYKVM_SERIAL_FDS):
            self.sink.fds[index] = -1
        for fd in self._owned:
            os.close(fd)
        self._owned.clear()
        self._capture_fd = -1


def _open_output(path: str) -> int:
    """Open a serial output file; a FIFO nobody reads is an error, not a hang (O_NONBLOCK)."""
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
    except OSError as err:
        reason = "it is a FIFO nobody reads" if err.errno == errno.ENXIO else err.strerror
        raise ConfigError(f"cannot open serial output file {path}: {reason}") from err


class StdinForwarder:
    """Forwards host input to a receiver (the UART) from a daemon thread.

    On a terminal, line buffering and echo are switched off while it runs (the guest echoes),
    and restored by :meth:`stop`; Ctrl-C still interrupts.  A process in the background of its
    terminal (``pykvm run ... &``) leaves the terminal alone: changing its settings or reading
    from it would stop the process (SIGTTOU, SIGTTIN), so the guest gets no input there.
    """

    def __init__(self, receive: Callable[[bytes], None], fd: int | None = None) -> None:
        self._receive = receive
        self._fd = sys.stdin.fileno() if fd is None else fd
        self._saved: list[Any] | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        if os.isatty(self._fd):
            if not _in_foreground(self._fd):
                return
            with self._lock:
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
        """Give the terminal its settings back (from any thread; idempotent)."""
        with self._lock:
            if self._saved is not None:
                termios.tcsetattr(self._fd, termios.TCSANOW, self._saved)
                self._saved = None


def _in_foreground(tty: int) -> bool:
    """Whether this process may use the terminal ``tty``: it is in its foreground process group,
    or ``tty`` is not its controlling terminal (job control does not apply then)."""
    try:
        return os.tcgetpgrp(tty) == os.getpgrp()
    except OSError:
        return True
