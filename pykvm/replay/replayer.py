"""The replayer: a log's inputs given back at the exits they came at, and divergence found."""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import TYPE_CHECKING, Callable, Sequence, TypeVar

from ..control import Stop
from ..errors import PykvmError, ReplayError
from ..result import ExitReason, RunResult, status_of
from .log import ClockRead, DiskRead, Entry, HostInput, LogReader, RandomBytes, RunEnd, describe, sha256_of
from .timeline import ExitTimeline

if TYPE_CHECKING:
    from ..control import RunControl
    from ..kvm import Vcpu

log = logging.getLogger(__name__)
E = TypeVar("E")
# Endings the host decides (its timeout, a stop or a signal), at whatever exit the guest was.
HOST_ENDINGS = (ExitReason.TIMEOUT, ExitReason.STOPPED)


class Replayer(ExitTimeline):
    """Answers the devices from the log ``reader`` reads, and hands its host input over at its
    exits; the host's clocks, random bytes and input are never read.

    Every question a device asks must be the log's next entry, at the same exit; host input is
    handed over in :meth:`before_entry` when vCPU 0 has answered the exit it came after (the
    vCPU is made to return to Python at that exit even if the C fast path would answer it); a
    run must end where, how and with the output the recorded one did.  The first difference
    is the divergence: the run stops (:attr:`~pykvm.result.ExitReason.DIVERGED`) saying what
    differed at which exit, and every later run of the machine stops at once for it.
    """

    def __init__(self, reader: LogReader) -> None:
        super().__init__()
        self._reader = reader
        self._entries = reader.entries()
        self._lock = threading.RLock()
        self._head: Entry | None = None
        self._divergence: str | None = None
        self._ending = False  # this replayer stopped the run where the recorded one was stopped
        self._python_from: int | None = None
        self._advance()

    def close(self) -> None:
        self._reader.close()

    # --- what devices ask for ----------------------------------------------------------------------
    def wall_clock_ns(self) -> int:
        read = self._take(ClockRead, "a wall clock read", lambda event: event.clock == "wall")
        return read.ns if read is not None else 0

    def monotonic_ns(self) -> int:
        read = self._take(ClockRead, "a monotonic clock read", lambda event: event.clock == "monotonic")
        return read.ns if read is not None else 0

    def random_bytes(self, size: int) -> bytes:
        taken = self._take(RandomBytes, f"{size} random bytes", lambda event: len(event.data) == size)
        return taken.data if taken is not None else bytes(size)

    def disk_read(self, disk: int, offset: int, data: Sequence[memoryview]) -> None:
        length = sum(len(piece) for piece in data)
        what = f"a read of disk {disk} ({length} bytes at offset {offset})"
        read = self._take(DiskRead, what, lambda event: (event.disk, event.offset, event.length) == (disk, offset, length))
        if read is not None and read.sha256 != sha256_of(data):
            self._diverge(f"at exit {self.exit_index()} {what} gave other data than in the recorded run")

    def _take(self, kind: type[E], wanted: str, matches: Callable[[E], bool]) -> E | None:
        """The log's next entry if it is the ``kind`` event asked for now, else a divergence (None)."""
        with self._lock:
            head, now = self._head, self.exit_index()
            if self._divergence is not None:
                return None
            if head is not None and head.exit == now and isinstance(head.event, kind) and matches(head.event):
                self._advance()
                return head.event
            self._diverge(f"at exit {now} a device asked for {wanted}, where the log has the {describe(head)}")
            return None

    # --- what the host sends -----------------------------------------------------------------------
    def send(self, device: str, data: bytes) -> None:
        raise ReplayError(f"a replayed machine takes its {device} input from the log, not from the host")

    # --- the runs ---------------------------------------------------------------------------------
    def before_entry(self, vcpu: Vcpu, control: RunControl) -> None:
        """Hand over the input logged at this exit, stop where the recorded run was stopped, and
        have the vCPU return to Python at the exit of the log's next entry."""
        with self._lock:
            self._control = control
            if control.stop is not None:
                return
            if self._divergence is not None:
                self._stop_diverged()
                return
            now = self.exit_index()
            self._hand_over(now)
            head = self._head
            if head is None or self._divergence is not None:
                self._return_from(vcpu, None)
                return
            end = head.event if isinstance(head.event, RunEnd) else None
            if head.exit < now or (head.exit == now and end is None):
                self._diverge(f"the guest reached exit {now} without the log's {describe(head)}")
            elif end is not None and head.exit == now and ExitReason(end.reason) in HOST_ENDINGS:
                self._ending = True
                why = f"{end.reason} at exit {now}, where the recorded run was stopped"
                control.request_stop(Stop(ExitReason(end.reason), why, end.exit_value, with_registers=True))
            else:
                self._return_from(vcpu, head.exit or None)

    def _return_from(self, vcpu: Vcpu, count: int | None) -> None:
        """Have ``vcpu`` return to Python from exit ``count`` on (set only when it changes)."""
        if count != self._python_from:
            vcpu.send_exits_to_python_from(count)
            self._python_from = count

    def _hand_over(self, now: int) -> None:
        while self._head is not None and self._head.exit == now and isinstance(self._head.event, HostInput):
            event = self._head.event
            self._advance()
            try:
                receive = self.receiver(event.device)
            except PykvmError as err:
                self._diverge(f"the log's {event.device} input at exit {now} cannot be handed over: {err}")
                return
            receive(event.data)

    def finish(self, result: RunResult) -> RunResult:
        """``result``, or a divergence: a run must end as the log's next end does."""
        with self._lock:
            self._control = None
            ending, self._ending = self._ending, False
            if self._divergence is not None:
                return self._diverged(result, self._divergence)
            if result.reason in HOST_ENDINGS and not ending:
                return result  # the replay's own timeout or stop cut it short: the log stays where it was
            now, head = self.exit_index(), self._head
            if head is None:
                log.warning("%s: the log ends before this run did; nothing to compare the run with", self._reader.path)
                return result
            if not isinstance(head.event, RunEnd):
                why = f"the run ended at exit {now} ({result.reason.value}) before the log's {describe(head)}"
                return self._diverged(result, why)
            self._advance()
            return self._compare(result, now, head.exit, head.event)

    def _compare(self, result: RunResult, now: int, recorded_exit: int, end: RunEnd) -> RunResult:
        if (recorded_exit, end.reason, end.status, end.exit_value) != (now, result.reason.value, result.status, result.exit_value):
            why = (f"the recorded run ended at exit {recorded_exit} ({end.reason}, status {end.status}), "
                   f"the replay at exit {now} ({result.reason.value}, status {result.status})")  # fmt: skip
            return self._diverged(result, why)
        output = result.serial or b""
        if sha256_of([output]) != end.output_sha256:
            why = f"the replay printed other bytes ({len(output)}, SHA-256 {sha256_of([output])[:16]}…) than the recorded run (SHA-256 {end.output_sha256[:16]}…)"
            return self._diverged(result, why)
        return result

    # --- divergence --------------------------------------------------------------------------------
    def _advance(self) -> None:
        try:
            self._head = next(self._entries, None)
        except ReplayError as err:  # the log changed after it was checked
            self._head = None
            self._diverge(f"the log cannot be read on: {err}")

    def _diverge(self, why: str) -> None:
        """Note the first divergence, and stop the run going on (else the next one stops at once)."""
        if self._divergence is None:
            self._divergence = why
            log.debug("replay diverged: %s", why)
        if self._control is not None:
            self._stop_diverged()

    def _stop_diverged(self) -> None:
        assert self._control is not None and self._divergence is not None
        self._control.request_stop(Stop(ExitReason.DIVERGED, f"replay diverged: {self._divergence}", with_registers=True))

    def _diverged(self, result: RunResult, why: str) -> RunResult:
        self._divergence = self._divergence or why
        if result.reason is ExitReason.DIVERGED:
            return result
        reason = ExitReason.DIVERGED
        return dataclasses.replace(result, reason=reason, status=status_of(reason), diagnosis=f"replay diverged: {why}",
                                   exit_value=None)  # fmt: skip
