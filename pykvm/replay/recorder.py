"""The recorder: the host's inputs, handed to the devices and logged with the exit they came at."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Sequence

from ..result import RunResult
from .log import MAX_EVENT_DATA, ClockRead, DiskRead, Event, HostInput, LogWriter, RandomBytes, RunEnd, sha256_of
from .timeline import ExitTimeline

if TYPE_CHECKING:
    from ..control import RunControl
    from ..kvm import Vcpu


class Recorder(ExitTimeline):
    """Answers the devices from the host, as :class:`~pykvm.host_inputs.HostInputs` does, and
    writes every answer to ``log`` with vCPU 0's exit count.

    Host input (:meth:`send`, from any thread) is held until vCPU 0 is between two exits: the
    recorder makes the vCPU leave the guest (its stop flag, which the C loop reads before every
    KVM_RUN, and the run's kick for a KVM_RUN under way), and :meth:`before_entry` hands the
    input to the device, logged with the count of exits answered so far.  Input that comes
    while no run goes on waits for the next one.
    """

    def __init__(self, log: LogWriter) -> None:
        super().__init__()
        self._log = log
        self._lock = threading.Lock()
        self._pending: list[tuple[str, bytes]] = []

    def close(self) -> None:
        self._log.close()

    # --- what devices ask for ----------------------------------------------------------------------
    def wall_clock_ns(self) -> int:
        ns = super().wall_clock_ns()
        self._write(ClockRead("wall", ns))
        return ns

    def monotonic_ns(self) -> int:
        ns = super().monotonic_ns()
        self._write(ClockRead("monotonic", ns))
        return ns

    def random_bytes(self, size: int) -> bytes:
        data = super().random_bytes(size)
        self._write(RandomBytes(data))
        return data

    def disk_read(self, disk: int, offset: int, data: Sequence[memoryview]) -> None:
        self._write(DiskRead(disk, offset, sum(len(piece) for piece in data), sha256_of(data)))

    # --- what the host sends -----------------------------------------------------------------------
    def send(self, device: str, data: bytes) -> None:
        """Hold ``data`` for ``device`` until vCPU 0 is between two exits."""
        self.receiver(device)  # refuse a device the machine lacks here, on the sender's thread
        if not data:
            return
        with self._lock:
            self._pending.append((device, bytes(data)))
        control, vcpu = self._control, self._vcpu
        if control is not None and vcpu is not None:
            vcpu.request_stop()  # leave the guest at the next exit boundary (park() lets it go on) ...
            control.probe()  # ... or now, if it is inside KVM_RUN (a guest waiting in HLT)

    # --- the runs ---------------------------------------------------------------------------------
    def before_entry(self, vcpu: Vcpu, control: RunControl) -> None:
        """Hand the pending input over, unless the run is ending (the next run's first entry does)."""
        self._control = control
        if control.stop is not None:
            return
        with self._lock:
            pending, self._pending = self._pending, []
        for device, data in pending:
            for start in range(0, len(data), MAX_EVENT_DATA):
                piece = data[start : start + MAX_EVENT_DATA]
                self._write(HostInput(device, piece))
                self.receiver(device)(piece)

    def finish(self, result: RunResult) -> RunResult:
        self._control = None
        self._write(RunEnd(result.reason.value, result.status, result.exit_value, sha256_of([result.serial or b""])))
        self._log.flush()
        return result

    def _write(self, event: Event) -> None:
        with self._lock:
            self._log.write(self.exit_index(), event)
