"""The replay log: JSON lines, a header and then one event per line, each at an exit index.

Line 1 is the :class:`LogHeader`: the format and its version, the pykvm that wrote it, when,
and the SHA-256 of the state file of the snapshot the recorded machine was restored from
(its manifest's ``state_sha256``), which names that snapshot.  Every other line is an
:class:`Entry`, ``{"exit": N, "event": {"record": KIND, "fields": {...}}}`` in the encoding of
:mod:`pykvm.snapshot.codec` (bytes as base64), where N counts vCPU 0's exits since the
restore and KIND is one of:

``HostInput``   bytes the host sent to a device (``serial``, ``console``), handed to it after
                exit N was answered and before the guest ran on (0: before the first exit)
``ClockRead``   a clock (``wall``: the RTC's UTC; ``monotonic``: the PM timer's) a device read
                while it answered exit N (0: while the machine was restored)
``RandomBytes`` bytes virtio-rng took from the host while it answered exit N
``DiskRead``    a complete read of a disk (its index, the byte offset and length) while
                exit N was answered, with the SHA-256 of the data, not the data
``RunEnd``      a run of the machine ended after exit N: its reason, status and debug-exit
                value, and the SHA-256 of everything the guest printed during it

Exit indices never decrease from one line to the next.  A log is read like any untrusted
file: every line is at most :data:`MAX_LINE_BYTES`, is JSON of exactly these shapes and
types (checked by the codec), and every value is in range (checked here); the first line
that is not makes a :class:`~pykvm.errors.ReplayError` naming the file and the line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, BinaryIO, Iterator, NoReturn, Sequence

from ..devices.state import check_bytes, check_choice, check_int
from ..errors import ReplayError, StateError
from ..result import ExitReason
from ..snapshot.codec import decode, encode
from ..x86.interrupts import VIRTIO_IRQS

FORMAT_NAME = "pykvm-replay-log"
FORMAT_VERSION = 1
# The largest line: a 64 KiB event's data in base64, with room to spare.
MAX_LINE_BYTES = 256 << 10
# Data one event carries at most (virtio-rng hands out 64 KiB per request; host input is split).
MAX_EVENT_DATA = 64 << 10
INPUT_DEVICES = ("serial", "console")
CLOCKS = ("wall", "monotonic")
MAX_EXIT = (1 << 64) - 1
MAX_NS = (1 << 63) - 1
MAX_DISKS = len(VIRTIO_IRQS)  # a machine has at most one virtio device per interrupt line
MAX_DISK_BYTES = 1 << 62
EXIT_STATUS_MAX = 255
EXIT_VALUE_MAX = (1 << 32) - 1
SHA256_HEX = 64


@dataclasses.dataclass(frozen=True)
class LogHeader:
    """What the log is, and the snapshot its run started from."""

    format: str
    version: int
    pykvm_version: str
    created: str  # ISO 8601, UTC
    snapshot_state_sha256: str


@dataclasses.dataclass(frozen=True)
class HostInput:
    device: str
    data: bytes


@dataclasses.dataclass(frozen=True)
class ClockRead:
    clock: str
    ns: int


@dataclasses.dataclass(frozen=True)
class RandomBytes:
    data: bytes


@dataclasses.dataclass(frozen=True)
class DiskRead:
    disk: int
    offset: int
    length: int
    sha256: str


@dataclasses.dataclass(frozen=True)
class RunEnd:
    reason: str  # an ExitReason's value
    status: int
    exit_value: int | None
    output_sha256: str


Event = HostInput | ClockRead | RandomBytes | DiskRead | RunEnd
EVENTS = (HostInput, ClockRead, RandomBytes, DiskRead, RunEnd)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One event, at exit ``exit``."""

    exit: int
    event: Any


def describe(entry: Entry | None) -> str:
    """An entry in words, for a divergence report."""
    if entry is None:
        return "end of the log"
    event = entry.event
    what = {
        HostInput: lambda e: f"{_bytes(len(e.data))} of {e.device} input",
        ClockRead: lambda e: f"{e.clock} clock read",
        RandomBytes: lambda e: f"request for {_bytes(len(e.data))} of random data",
        DiskRead: lambda e: f"read of disk {e.disk} ({_bytes(e.length)} at offset {e.offset})",
        RunEnd: lambda e: f"end of a run ({e.reason}, status {e.status})",
    }[type(event)](event)
    return f"{what} at exit {entry.exit}"


def _bytes(count: int) -> str:
    return "1 byte" if count == 1 else f"{count} bytes"


def sha256_of(pieces: Sequence[memoryview | bytes]) -> str:
    digest = hashlib.sha256()
    for piece in pieces:
        digest.update(piece)
    return digest.hexdigest()


# --- writing ----------------------------------------------------------------------------------------
class LogWriter:
    """Writes a log at ``path`` (replacing a file there): the header at once, then entries."""

    def __init__(self, path: str | Path, header: LogHeader) -> None:
        self.path = Path(path)
        try:
            self._file: BinaryIO | None = open(self.path, "wb")
        except OSError as err:
            raise ReplayError(f"{self.path}: cannot write the log: {err.strerror}") from err
        self._write(encode(header))

    def write(self, exit: int, event: Event) -> None:
        self._write(encode(Entry(exit, event)))

    def _write(self, data: Any) -> None:
        if self._file is None:
            raise ReplayError(f"{self.path}: the log is closed")
        try:
            self._file.write(json.dumps(data, separators=(",", ":")).encode() + b"\n")
        except OSError as err:
            raise ReplayError(f"{self.path}: cannot write the log: {err.strerror}") from err

    def flush(self) -> None:
        if self._file is not None:
            try:
                self._file.flush()
            except OSError as err:
                raise ReplayError(f"{self.path}: cannot write the log: {err.strerror}") from err

    def close(self) -> None:
        if self._file is not None:
            try:
                self.flush()
            finally:
                self._file.close()
                self._file = None


# --- reading ----------------------------------------------------------------------------------------
class LogReader:
    """Reads the log at ``path``: :attr:`header` at once, then :meth:`entries`, each checked."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._file: BinaryIO = open(self.path, "rb")
        except OSError as err:
            raise ReplayError(f"{self.path}: cannot read the log: {err.strerror}") from err
        self._line = 0
        try:
            self.header = self._header()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._file.close()

    def _header(self) -> LogHeader:
        data = self._next_json()
        if data is None:
            raise ReplayError(f"{self.path}: empty: not a pykvm replay log")
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise ReplayError(f"{self.path}: not a pykvm replay log (its first line names no {FORMAT_NAME!r} format)")
        if data.get("version") != FORMAT_VERSION:
            raise ReplayError(f"{self.path}: replay log version {data.get('version')!r}; "
                              f"this pykvm reads version {FORMAT_VERSION}")  # fmt: skip
        header = self._decode(data, LogHeader)
        self._check(lambda: _check_sha256(header, "snapshot_state_sha256"))
        return header  # type: ignore[no-any-return]

    def entries(self) -> Iterator[Entry]:
        """The entries after the header, in order, each checked as it is read."""
        last_exit = 0
        while (data := self._next_json()) is not None:
            entry: Entry = self._decode(data, Entry, EVENTS)
            self._check(lambda: check_entry(entry))
            if entry.exit < last_exit:
                self._fail(f"exit {entry.exit} comes after exit {last_exit}: the entries are out of order")
            last_exit = entry.exit
            yield entry

    def _next_json(self) -> Any:
        try:
            raw = self._file.readline(MAX_LINE_BYTES + 1)
        except OSError as err:
            raise ReplayError(f"{self.path}: cannot read the log: {err.strerror}") from err
        if not raw:
            return None
        self._line += 1
        if len(raw) > MAX_LINE_BYTES:
            self._fail(f"longer than {MAX_LINE_BYTES} bytes")
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as err:
            self._fail(f"not valid JSON ({str(err)[:80]})")

    def _decode(self, data: Any, cls: type, records: tuple[type, ...] = ()) -> Any:
        return self._check(lambda: decode(data, cls, records))

    def _check(self, check: Any) -> Any:
        try:
            return check()
        except StateError as err:
            self._fail(str(err))

    def _fail(self, why: str) -> NoReturn:
        raise ReplayError(f"{self.path}, line {self._line}: {why}")


def check_entry(entry: Entry) -> None:
    """Every value of ``entry`` in range; raises :class:`StateError` naming the first that is not."""
    check_int(entry, "exit", 0, MAX_EXIT)
    event = entry.event
    if isinstance(event, HostInput):
        check_choice(event, "device", INPUT_DEVICES)
        check_bytes(event, "data", MAX_EVENT_DATA, 1)
    elif isinstance(event, ClockRead):
        check_choice(event, "clock", CLOCKS)
        check_int(event, "ns", -MAX_NS - 1, MAX_NS)
    elif isinstance(event, RandomBytes):
        check_bytes(event, "data", MAX_EVENT_DATA)
    elif isinstance(event, DiskRead):
        check_int(event, "disk", 0, MAX_DISKS - 1)
        check_int(event, "offset", 0, MAX_DISK_BYTES)
        check_int(event, "length", 0, MAX_DISK_BYTES)
        _check_sha256(event, "sha256")
    elif isinstance(event, RunEnd):
        check_choice(event, "reason", tuple(reason.value for reason in ExitReason))
        check_int(event, "status", 0, EXIT_STATUS_MAX)
        if event.exit_value is not None:
            check_int(event, "exit_value", 0, EXIT_VALUE_MAX)
        _check_sha256(event, "output_sha256")
    else:
        raise StateError(f"Entry.event: expected one of {[e.__name__ for e in EVENTS]}, not {type(event).__name__}")


def _check_sha256(record: Any, name: str) -> None:
    value = getattr(record, name)
    if len(value) != SHA256_HEX or value.strip("0123456789abcdef"):
        raise StateError(f"{type(record).__name__}.{name} is {value[:80]!r}, not a SHA-256 in 64 hex digits")


def check_log(path: str | Path) -> LogHeader:
    """The header of the log at ``path``, after checking every line of it."""
    reader = LogReader(path)
    try:
        for _ in reader.entries():
            pass
        return reader.header
    finally:
        reader.close()
