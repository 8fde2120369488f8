"""A machine's lifecycle events, for whoever listens (Cloud Hypervisor's event monitor is the model).

A :class:`~pykvm.machine.Machine` announces what happens to it on ``machine.events``:
``started`` and ``ended`` (a run, with its reason and status), ``paused`` and ``resumed``,
``suspended`` and ``woken`` (ACPI S3: the guest suspended the machine; a wake, with its ``reason``,
``rtc`` or ``host``, and the FACS waking ``vector``),
``snapshot`` (written: path, bytes, seconds) and ``restored`` (path), ``balloon`` (the target or
the guest's ``actual`` changed), ``migration-started``, ``migration-progress`` (at each round
and at the stop-and-copy: the :class:`~pykvm.migration.MigrationProgress`), then ``migrated`` (the
:class:`~pykvm.migration.MigrationResult`'s figures) or ``migration-failed`` (the ``error``); on the destination, ``migration-received``.  :meth:`Events.listen`
adds a callback; :class:`JsonLinesWriter` is the listener behind ``pykvm run --events``,
one JSON object per line::

    {"timestamp": 1765043000.123456, "event": "ended", "reason": "debug-exit", "status": 1}

A listener that fails is logged once and dropped: an event never stops the machine.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import ConfigError

log = logging.getLogger(__name__)

BACKLOG = 16  # events kept for the first listener


@dataclass(frozen=True)
class Event:
    """Something that happened to a machine, when (seconds since the epoch), and its details."""

    name: str
    properties: dict[str, Any] = field(default_factory=dict)
    timestamp: float = field(default_factory=time.time)

    def to_json(self) -> str:
        import json  # only for a listener that writes JSON lines: `pykvm run` starts without it

        return json.dumps({"timestamp": round(self.timestamp, 6), "event": self.name, **self.properties})


Listener = Callable[[Event], object]  # what it returns is ignored


class Events:
    """The events of one machine: listeners are called on the thread the event happens on.

    The events that happen before anyone listens (the machine was restored, or arrived by
    migration) are kept, up to :data:`BACKLOG`, and given to the first listener.
    """

    def __init__(self) -> None:
        self._listeners: list[Listener] = []
        self._backlog: list[Event] | None = []  # None once someone listened
        self._lock = threading.Lock()

    def listen(self, listener: Listener) -> None:
        with self._lock:
            self._listeners.append(listener)
            backlog, self._backlog = self._backlog or [], None
        for event in backlog:
            self._deliver(listener, event)

    def emit(self, name: str, **properties: Any) -> None:
        if not self._listeners and self._backlog is None:
            return
        event = Event(name, properties)
        with self._lock:
            if self._backlog is not None and len(self._backlog) < BACKLOG:
                self._backlog.append(event)
            listeners = list(self._listeners)
        for listener in listeners:
            self._deliver(listener, event)

    def _deliver(self, listener: Listener, event: Event) -> None:
        try:
            listener(event)
        except Exception as err:  # a listener's failure must not stop the machine
            log.warning("event listener %r failed (%s); it gets no more events", listener, err)
            with self._lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)


class JsonLinesWriter:
    """Writes each event as a JSON line to ``target``: a file path (created or truncated) or ``fd:N``."""

    def __init__(self, target: str) -> None:
        self._owned = not target.startswith("fd:")
        try:
            if self._owned:
                self._fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            else:
                self._fd = int(target[3:])
                os.fstat(self._fd)
        except ValueError as err:
            raise ConfigError(f"cannot read the event target {target!r}: write it as PATH or fd:N") from err
        except OSError as err:
            raise ConfigError(f"cannot write events to {target}: {err.strerror}") from err
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        data = (event.to_json() + "\n").encode()
        with self._lock:
            while data:
                data = data[os.write(self._fd, data) :]

    def close(self) -> None:
        if self._owned and self._fd >= 0:
            os.close(self._fd)
        self._fd = -1
