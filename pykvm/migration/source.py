"""The source of a live migration: pre-copy rounds over the dirty log, then stop and copy.

:class:`Migration` connects to the destination and, after the handshake, logs the guest's
writes and sends all of guest RAM while the guest runs (round 0), then in each round only
the pages written since the last look.  After each look it estimates how long sending what is
left would take at the bandwidth the last round reached; once that fits in the downtime
limit it pauses the guest, sends the last pages and the machine's state (vCPUs, the VM's
in-kernel devices, every device, through :mod:`pykvm.snapshot`) and waits for the
destination to accept it.  Then the run here ends as :attr:`~pykvm.result.ExitReason.MIGRATED`
and the disk images are let go (a guest with a throw-away disk, whose data only this process
has, is refused before anything is sent).  Their locks (:mod:`pykvm.disk_lock`) pass with the state, as
QEMU's inactive images do: the source unlocks them once it has flushed them, the destination
locks them before it accepts the guest, and a guest not accepted gets them locked here again.

Once what is left fits in the limit, rounds go on while each still leaves much less than the
one before (as long as a round finds under half of what it sent written again), so the guest
is paused with as little as possible left; the limit itself is QEMU's and Cloud Hypervisor's
300 ms by default.  A guest that writes faster than the link sends is throttled (:mod:`.throttle`, auto-converge)
when two rounds found more than half as much written as they sent, harder each time; and the
whole migration has a time limit.  Anything that goes wrong before the destination accepted
the guest (it is gone, refuses, is too slow, the guest never converges or stops by itself)
raises :class:`~pykvm.errors.MigrationError`, and the guest goes on here as if nothing
happened: unpaused, unthrottled, its dirty logging as it was.  The destination's answer is the
hand-over: should the connection break after the destination accepted the guest but before its
answer arrived, both sides would run it (QEMU's precopy does not even wait for an answer).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Callable, Iterator

from ..errors import ConfigError, MigrationError, PykvmError
from ..snapshot import capture, describe, format_state, state_records
from ..snapshot.codec import encode, prepare
from ..snapshot.format import MachineState
from . import uri as uris
from .dirty import Dirty, DirtyLog, Runs
from .pages import PageSender
from .throttle import Throttle
from .wire import (
    ACCEPTED, ANSWER, GREETING, HELLO, MAGIC, MAX_REASON_BYTES, NONCE_BYTES, PAGE_SIZE, READY, REFUSED, VERSION,
    Channel, StreamWriter, check_magic, check_proof, proof,
)  # fmt: skip

if TYPE_CHECKING:
    from ..devices.virtio.blk import VirtioBlock
    from ..machine import Machine

log = logging.getLogger(__name__)

STREAM_FORMAT = "pykvm-migration"
# Auto-converge: a round found "too much written" when the guest wrote more than this share of
# what the round sent; two such rounds throttle the guest (harder).
DIRTY_RATE_HIGH = 0.5
ROUNDS_TOO_FAST = 2
# Within the downtime limit, another round is sent while it would leave less than this share of
# what the last one sent: the guest is paused with as little as possible left to copy.
STILL_CONVERGING = 0.5
REFUSAL_WAIT = 1.0  # seconds to look for the destination's reason once the stream broke


@dataclasses.dataclass(frozen=True)
class MigrationProgress:
    """Where a migration stands (:meth:`Migration.progress`); rates in bytes/s."""

    uri: str
    phase: str  # "connecting", "pre-copy", "stop-and-copy", "completed" or "failed"
    round: int  # 0: all of RAM; then one per look at the dirty log
    bytes_sent: int
    data_pages: int  # pages sent as data
    zero_pages: int  # pages sent as zeros (a flag, no data)
    dirty_pages: int  # written since the last look, when it was taken
    dirty_rate: float  # how fast the guest wrote pages during the last round
    bandwidth: float  # how fast the last round sent
    expected_downtime_ms: float  # sending the dirty pages at that bandwidth
    throttle: float  # the share of time the vCPUs are kept out of the guest (0 to 0.99)
    elapsed: float  # seconds since the migration started


@dataclasses.dataclass(frozen=True)
class MigrationResult:
    """A migration that completed: the guest runs at the destination now."""

    uri: str
    total_ms: float  # from the call to the destination's acceptance
    downtime_ms: float  # from pausing the guest here to the destination's acceptance
    final_copy_ms: float  # from pausing the guest to the last byte sent (where QEMU's "downtime" ends)
    rounds: int
    bytes_sent: int
    data_pages: int
    zero_pages: int
    max_throttle: float


class Migration:
    """Moves ``machine``'s guest to the destination at ``uri`` (see the module doc).

    ``hand_over(result)`` is called, with the guest paused, once the destination accepted it;
    ``note_written`` hears every run of pages taken from the dirty logs.
    """

    def __init__(
        self,
        machine: Machine,
        uri: str,
        *,
        downtime_ms: float = 300,
        timeout: float = 600,
        bandwidth: int | None = None,
        token: str | bytes | None = None,
        auto_converge: bool = True,
        hand_over: Callable[[MigrationResult], None],
        note_written: Callable[[Runs], None] | None = None,
    ) -> None:
        uris.parse(uri)
        if not downtime_ms > 0:
            raise ConfigError(f"the downtime limit must be positive, not {downtime_ms} ms")
        if not timeout > 0:
            raise ConfigError(f"the migration timeout must be positive, not {timeout} s")
        if bandwidth is not None and not bandwidth > 0:
            raise ConfigError(f"the bandwidth limit must be positive, not {bandwidth} bytes/s")
        self._machine = machine
        self._uri = uri
        self._downtime = downtime_ms / 1000
        self._timeout = timeout
        self._bandwidth_limit = bandwidth
        self._token = token.encode() if isinstance(token, str) else token
        self._auto_converge = auto_converge
        self._hand_over = hand_over
        self._note_written = note_written
        self._lock = threading.Lock()
        self._progress = MigrationProgress(uri, "connecting", 0, 0, 0, 0, 0, 0.0, 0.0, 0.0, 0.0, 0.0)
        self._started = time.monotonic()
        self._throttle = Throttle(machine.nap)
        self._rounds = 0  # pre-copy rounds done
        self._sender: PageSender | None = None
        self._disks: list[VirtioBlock] = []

    @property
    def active(self) -> bool:
        return self._progress.phase not in ("completed", "failed")

    def progress(self) -> MigrationProgress:
        """Where the migration stands (callable from any thread): the counters as they are now, the
        rates and estimates of the last look at the dirty log."""
        with self._lock:
            progress = dataclasses.replace(self._progress, elapsed=time.monotonic() - self._started)
        sender = self._sender
        if sender is not None:
            progress = dataclasses.replace(
                progress, bytes_sent=sender.writer.count, data_pages=sender.data_pages, zero_pages=sender.zero_pages
            )
        return progress

    def _update(self, **fields: object) -> None:
        with self._lock:
            before = self._progress
            self._progress = dataclasses.replace(before, **fields)  # type: ignore[arg-type]
        now = self._progress
        if now.phase in ("pre-copy", "stop-and-copy") and (now.round, now.phase) != (before.round, before.phase):
            self._machine.events.emit("migration-progress", **dataclasses.asdict(self.progress()))

    # --- the whole migration ------------------------------------------------------------------------
    def run(self) -> MigrationResult:
        """Migrate; returns once the destination accepted the guest, or raises MigrationError."""
        self._started = time.monotonic()
        deadline = self._started + self._timeout
        try:
            _check_disks_can_move(self._machine)
            channel = Channel(uris.connect(self._uri, self._timeout), deadline, f"the destination {self._uri}")
            try:
                self._handshake(channel)
                return self._migrate(channel)
            except MigrationError as err:
                raise _refusal(channel) or err
            finally:
                channel.close()
        except (PykvmError, OSError) as err:
            reason = str(err) if isinstance(err, MigrationError) else f"{type(err).__name__}: {err}"
            raise MigrationError(f"migration to {self._uri} failed: {reason}; the guest runs on here") from err
        finally:
            if self._progress.phase != "completed":
                self._update(phase="failed")

    def _handshake(self, channel: Channel) -> None:
        magic, version, their_nonce = GREETING.unpack(channel.receive(GREETING.size))
        check_magic(magic, version, channel.peer)
        manifest = dataclasses.replace(
            describe(self._machine, self._machine.vcpus[0].get_cpuid2()), format=STREAM_FORMAT, version=VERSION
        )
        header = json.dumps(encode(manifest), separators=(",", ":")).encode()
        nonce = os.urandom(NONCE_BYTES)
        channel.send(HELLO.pack(MAGIC, VERSION, nonce, proof(self._token, b"source", their_nonce), len(header)), header)
        status, their_proof, reason = _answer(channel)
        if status != READY:
            raise MigrationError(f"the destination refused the guest: {reason}")
        if not check_proof(self._token, b"destination", nonce, their_proof):
            raise MigrationError("the destination could not prove that it knows the token")

    def _migrate(self, channel: Channel) -> MigrationResult:
        machine = self._machine
        was_running = machine.running
        self._disks = _disks(machine)
        prepare(MachineState, state_records(machine.config))  # now, not while the guest is paused
        writer = StreamWriter(channel, self._bandwidth_limit)
        sender = self._sender = PageSender(writer, machine.memory)
        log = DirtyLog(machine, self._note_written)
        try:
            with machine.paused_for_snapshot():
                log.start()
            dirty = self._precopy(log, sender, writer, was_running)
            self._throttle.stop()
            return self._stop_and_copy(channel, log, sender, writer, dirty, was_running)
        finally:
            self._throttle.stop()
            with machine.paused_for_snapshot():
                log.stop()

    # --- pre-copy ------------------------------------------------------------------------------------
    def _precopy(self, log: DirtyLog, sender: PageSender, writer: StreamWriter, was_running: bool) -> Dirty:
        """Round 0, then round after round until what is left fits in the downtime: returns it."""
        self._update(phase="pre-copy")
        bandwidth = 0.0
        too_fast = 0
        send_round: Callable[[], None] = sender.send_all
        for round_number in itertools.count():
            began, sent_before = time.monotonic(), writer.count
            send_round()
            sent = writer.count - sent_before
            if sent:
                bandwidth = sent / max(time.monotonic() - began, 1e-6)
            self._check_running(was_running)
            with self._machine.paused_for_snapshot():
                dirty = log.take()
            pages = dirty.pages()
            written = pages * PAGE_SIZE
            expected = written / bandwidth if bandwidth else (0.0 if not written else float("inf"))
            self._update(
                round=round_number, dirty_pages=pages, dirty_rate=written / max(time.monotonic() - began, 1e-6),
                bandwidth=bandwidth, expected_downtime_ms=expected * 1000, throttle=self._throttle.share,
            )  # fmt: skip
            if expected <= self._downtime and not (written and sent and written < STILL_CONVERGING * sent):
                self._rounds = round_number + 1
                return dirty
            if time.monotonic() - self._started > self._timeout:
                raise MigrationError(
                    f"the guest's memory did not converge within {self._timeout:g} s "
                    f"({written >> 20} MiB left after {round_number + 1} rounds at "
                    f"{bandwidth / (1 << 20):.1f} MiB/s, {self._throttle.share:.0%} throttled)"
                )
            if self._auto_converge and sent and written > DIRTY_RATE_HIGH * sent:
                too_fast += 1
                if too_fast >= ROUNDS_TOO_FAST:
                    self._throttle.increase()
                    too_fast = 0
            send_round = functools.partial(_send_dirty, log, sender, dirty)
        raise AssertionError("not reached")

    def _check_running(self, was_running: bool) -> None:
        if was_running and not self._machine.running:
            raise MigrationError("the guest's run ended by itself during the migration")

    # --- stop and copy --------------------------------------------------------------------------------
    def _stop_and_copy(
        self, channel: Channel, log: DirtyLog, sender: PageSender, writer: StreamWriter, dirty: Dirty,
        was_running: bool,
    ) -> MigrationResult:  # fmt: skip
        machine = self._machine
        self._update(phase="stop-and-copy")
        with machine.paused_for_snapshot():
            self._check_running(was_running)
            paused = time.monotonic()
            _send_dirty(log, sender, dirty.merge(log.take()))
            for disk in self._disks:
                _flush(disk.fd)
            with _disks_let_go(self._disks):
                writer.state(format_state(capture(machine)))
                writer.end()
                all_sent = time.monotonic()
                status, _, reason = _answer(channel)
                if status != ACCEPTED:
                    raise MigrationError(f"the destination refused the guest: {reason}")
            accepted = time.monotonic()
            result = MigrationResult(
                self._uri, (accepted - self._started) * 1000, (accepted - paused) * 1000, (all_sent - paused) * 1000,
                self._rounds + 1, writer.count, sender.data_pages, sender.zero_pages, self._throttle.share,
            )  # fmt: skip
            self._hand_over(result)
        for disk in self._disks:
            disk.close()  # the destination has the images now, and their locks
        self._update(phase="completed")
        return result


def _send_dirty(log: DirtyLog, sender: PageSender, dirty: Dirty) -> None:
    for runs in log.windows(dirty):
        sender.send(runs)


def _refusal(channel: Channel) -> MigrationError | None:
    """The destination's reason, if it refused the guest and closed the stream (after a failed send)."""
    channel.deadline = time.monotonic() + REFUSAL_WAIT
    try:
        status, _, reason = _answer(channel)
    except MigrationError:
        return None
    return MigrationError(f"the destination refused the guest: {reason}") if status == REFUSED else None


def _answer(channel: Channel) -> tuple[int, bytes, str]:
    """The destination's answer: (status, proof, reason)."""
    status, their_proof, length = ANSWER.unpack(channel.receive(ANSWER.size))
    reason = channel.receive(min(length, MAX_REASON_BYTES)).decode(errors="replace")
    return status, their_proof, reason or "no reason given"


def _check_disks_can_move(machine: Machine) -> None:
    """A throw-away disk's data lives only in this process, where the destination cannot open it."""
    throwaway = [disk.path for disk in machine.config.disks if disk.throwaway]
    if throwaway:
        raise MigrationError(
            f"the guest's disk {throwaway[0]} is a throw-away overlay (,snapshot) whose data only this process has; "
            "a guest with one cannot migrate"
        )


def _disks(machine: Machine) -> list[VirtioBlock]:
    from ..devices.virtio.blk import VirtioBlock

    return machine.devices.virtio_devices(VirtioBlock)


@contextlib.contextmanager
def _disks_let_go(disks: list[VirtioBlock]) -> Iterator[None]:
    """Inside, the disk images are unlocked, for the destination to lock them before it accepts
    the guest (QEMU's inactive images); if it does not accept it, they are locked here again."""
    for disk in disks:
        disk.unlock_image()
    try:
        yield
    except BaseException:
        for disk in disks:
            try:
                disk.lock_image()
            except PykvmError as err:  # another process took it meanwhile: say so, the guest runs on
                log.warning("%s", err)
        raise


def _flush(fd: int) -> None:
    """Everything written to a disk image reaches it before the destination reads it."""
    try:
        os.fsync(fd)
    except OSError as err:
        raise MigrationError(f"cannot flush a disk image: {err.strerror}") from err
