"""The control socket: a machine answers small JSON requests on a UNIX stream socket.

``pykvm run GUEST --control PATH`` (``ControlServer(PATH, machine)`` in a program) serves
PATH from a thread until it is closed; ``pykvm ctl PATH ...`` is the client
(:func:`request`).  The socket file is created mode 0600 (there is no moment when it is
not) and removed on close, if it is still the one this server created; a stale one (nobody
listening) is replaced, a live one is an error.  At most :data:`MAX_CONNECTIONS` are served at
once (a thread each); more wait in the listen backlog until a slot comes free.  Out of file
descriptors, the server waits a moment and tries again; it never spins.

Protocol (version 1): JSON lines.  The client sends one JSON object per line, UTF-8,
newline-terminated; the server answers each with one JSON object on one line, in order, on
the same connection (a connection may carry any number of requests).  Every answer has
``"ok"``: ``true`` and the command's fields, or ``false`` and ``"error"`` (a sentence).  A
malformed request (not JSON, not an object, no or unknown ``cmd``, bad arguments, a line over
64 KiB) gets an error answer; it never stops the server.  Sizes are bytes (integers).

``{"cmd": "info"}``
    ``pid``, ``memory`` (guest RAM), ``cpus``, ``devices`` (virtio device names),
    ``rss`` (the pykvm process), ``guest_resident`` (guest RAM resident on the host),
    ``share_pages`` (and ``ksm``, :func:`~pykvm.memory_policy.ksm_status`, when it is on),
    ``balloon``: null or ``{"target", "actual", "features"}``; ``state`` (``created``,
    ``running``, ``paused``, ``stopped``), ``uptime`` (seconds since the first run began),
    ``exits`` (by reason), ``vcpus``: ``[{"id", "rip", "mode", "cpl"}]`` (:meth:`Machine.status`);
    ``migration``: null, or where the latest migration stands
    (:class:`~pykvm.migration.MigrationProgress`: ``phase``, ``round``, ``bytes_sent``,
    ``dirty_rate``, ``bandwidth``, ``expected_downtime_ms``, ``throttle``...).
``{"cmd": "snapshot", "path": DIR}``
    Save the machine as a snapshot directory at ``DIR`` (it runs on; with ``"stop": true`` the
    run then ends, status 0).  Answer: ``path``, ``memory_bytes`` (RAM the memory file holds),
    ``seconds``.
``{"cmd": "migrate", "uri": "tcp:HOST:PORT"}``
    Move the guest by live migration to the machine waiting at the URI (``pykvm run
    --incoming``); optional ``downtime_ms`` (300), ``timeout`` (seconds, 600), ``bandwidth``
    (bytes/s), ``auto_converge`` (true), ``token``.  Answered when it ends: the
    :class:`~pykvm.migration.MigrationResult`'s fields (``total_ms``, ``downtime_ms``,
    ``rounds``, ``bytes_sent``...), after which the run ends; or an error, the guest running on.
``{"cmd": "wake"}``
    Wake a machine the guest suspended (ACPI S3); an error if it is not suspended.
``{"cmd": "balloon", "target": "32M"}``
    Set the balloon's size (a size string as for ``-m``, or bytes); with ``"wait": seconds``
    wait until the driver's ``actual`` reaches it.  Answer: ``target``, ``actual``, and
    ``reached`` when waiting.
``{"cmd": "stats"}``
    ``stats`` (the guest's latest balloon statistics by name, bytes), ``fresh`` (whether the
    guest answered a request for new ones within ``"timeout"`` seconds, default 1; send
    ``"refresh": false`` not to ask), ``stats_age`` (seconds, or null), ``target``,
    ``actual``, ``counters`` (inflated/deflated/reported bytes, bad PFNs and buffers),
    ``rss`` and ``guest_resident``.

Example::

    $ pykvm ctl /tmp/vm.sock balloon 32M --wait 10
    balloon: target 32.0 MiB, actual 32.0 MiB
    $ echo '{"cmd": "stats"}' | socat - UNIX-CONNECT:/tmp/vm.sock
    {"ok": true, "stats": {"memfree": ..., "memtot": ...}, ...}
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import selectors
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

import psutil

from .config import parse_size
from .errors import MigrationError, PykvmError
from .memory_policy import ksm_status
from .unix_socket import clear_socket_path
from .x86.layout import MIB

if TYPE_CHECKING:
    from .devices.virtio.balloon import VirtioBalloon
    from .machine import Machine

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
MAX_LINE = 64 * 1024
IDLE_TIMEOUT = 300.0  # a connection that sends nothing for this long is closed
MAX_WAIT = 600.0  # the longest a request may ask the server to wait
MAX_CONNECTIONS = 64  # served at once, one thread each
ACCEPT_RETRY = 0.5  # seconds to wait before accepting again after running out of descriptors
CONNECT_RETRY = 0.01  # seconds between the client's attempts while the server's backlog is full
ANSWER_GRACE = 1.0  # seconds close() waits for requests under way to send their answers


class ControlError(PykvmError):
    """The control socket could not be served or reached, or it answered with an error."""


class RequestError(Exception):
    """A request the server answers with ``ok: false`` (the message is the answer's ``error``)."""


# --- the server ------------------------------------------------------------------------------------
class ControlServer:
    """Serves the control protocol for ``machine`` at ``path`` (see the module doc) from a thread."""

    def __init__(self, path: str, machine: Machine) -> None:
        if not 0 < len(os.fsencode(path)) < 108:
            raise ControlError(f"control socket path {path!r} must be 1 to 107 bytes (a UNIX socket address)")
        self.path = path
        self.machine = machine
        self._process = psutil.Process()
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._answered = threading.Condition(self._lock)
        self._answering = 0  # requests being handled: close() lets them answer first
        self._commands: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "info": self._info,
            "balloon": self._balloon,
            "stats": self._stats,
            "snapshot": self._snapshot,
            "migrate": self._migrate,
            "wake": self._wake_machine,
        }
        problem = clear_socket_path(path)
        if problem is not None:
            raise ControlError(f"cannot serve the control socket {path}: {problem}")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            os.fchmod(self._listener.fileno(), 0o600)  # Linux creates the file with the socket's mode
            self._listener.bind(path)
            self._inode = _inode(os.lstat(path))
            os.chmod(path, 0o600)  # only narrows it further, should the umask have allowed less
            self._listener.listen(socket.SOMAXCONN)
        except OSError as err:
            self._listener.close()
            raise ControlError(f"cannot serve the control socket {path}: {err.strerror}") from err
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._closed = False
        self._accept_failing = False
        self._thread = threading.Thread(target=self._accept_loop, name="pykvm-control", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving, close every connection and remove the socket file if it is still ours (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._wake()
        self._thread.join()
        with self._lock:
            self._answered.wait_for(lambda: self._answering == 0, ANSWER_GRACE)
            for conn in list(self._connections):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._listener.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
        self._remove_own_socket()

    def _remove_own_socket(self) -> None:
        """Unlink the path only if it is still the socket this server bound (not a file put there since)."""
        try:
            if _inode(os.lstat(self.path)) == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _wake(self) -> None:
        """Make the accept loop look again (closing, or a connection slot came free)."""
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:  # the pipe is full of wake-ups already
            pass

    def _accept_loop(self) -> None:
        """Accept while a connection slot is free; out of descriptors, wait a moment (never spin)."""
        retry_at = 0.0
        with selectors.DefaultSelector() as selector:
            selector.register(self._wake_r, selectors.EVENT_READ)
            while not self._closed:
                with self._lock:
                    room = len(self._connections) < MAX_CONNECTIONS
                pause = max(retry_at - time.monotonic(), 0.0)
                accepting = room and not pause
                listening = self._listener in selector.get_map()
                if accepting and not listening:
                    selector.register(self._listener, selectors.EVENT_READ)
                elif listening and not accepting:
                    selector.unregister(self._listener)
                for key, _ in selector.select(pause or None):
                    if key.fileobj is self._listener:
                        retry_at = 0.0 if self._accept_one() else time.monotonic() + ACCEPT_RETRY
                    else:
                        os.read(self._wake_r, 4096)

    def _accept_one(self) -> bool:
        """Accept and serve one connection; False when the process is out of descriptors or memory."""
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return True
        except OSError as err:
            if not self._accept_failing:
                log.warning("control socket %s: cannot accept (%s); trying again every %g s",
                            self.path, err.strerror, ACCEPT_RETRY)  # fmt: skip
            self._accept_failing = True
            return False
        self._accept_failing = False
        conn.settimeout(IDLE_TIMEOUT)
        with self._lock:
            self._connections.add(conn)
        try:
            threading.Thread(target=self._serve, args=(conn,), name="pykvm-control-conn", daemon=True).start()
        except RuntimeError:  # no thread to be had: say so rather than leave the client waiting
            self._forget(conn, _encode({"ok": False, "error": "the machine cannot start another thread now"}))
        return True

    def _forget(self, conn: socket.socket, last_words: bytes = b"") -> None:
        """Close a connection, free its slot and let the accept loop know."""
        with self._lock:
            self._connections.discard(conn)
            if last_words:
                try:
                    conn.setblocking(False)
                    conn.send(last_words)
                except OSError:
                    pass
            conn.close()
            if not self._closed:
                self._wake()

    def _serve(self, conn: socket.socket) -> None:
        buffered = b""
        try:
            while not self._closed:
                newline = buffered.find(b"\n")
                if (newline if newline >= 0 else len(buffered)) > MAX_LINE:
                    conn.sendall(_encode({"ok": False, "error": f"request longer than {MAX_LINE} bytes"}))
                    return
                if newline < 0:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffered += data
                    continue
                line, buffered = buffered[:newline], buffered[newline + 1 :]
                if line.strip():
                    self._answer(conn, line)
        except OSError as err:  # the client went away, or timed out
            log.debug("control socket %s: connection ended: %s", self.path, err)
        finally:
            self._forget(conn)

    def _answer(self, conn: socket.socket, line: bytes) -> None:
        """Handle one request and send its answer, which :meth:`close` waits for (a request may
        end the run, and with it the server)."""
        with self._lock:
            self._answering += 1
        try:
            conn.sendall(_encode(self.handle_line(line)))
        finally:
            with self._lock:
                self._answering -= 1
                self._answered.notify_all()

    # --- requests ----------------------------------------------------------------------------
    def handle_line(self, line: bytes) -> dict[str, Any]:
        """The answer to one request line (never raises)."""
        try:
            request = json.loads(line)
        except (ValueError, UnicodeDecodeError) as err:
            return {"ok": False, "error": f"malformed request, not JSON: {err}"}
        except RecursionError:
            return {"ok": False, "error": "malformed request: JSON nested too deeply"}
        return self.handle(request)

    def handle(self, request: object) -> dict[str, Any]:
        """The answer to one decoded request (never raises)."""
        try:
            if not isinstance(request, dict):
                raise RequestError("a request is a JSON object, like {\"cmd\": \"info\"}")
            cmd = request.get("cmd")
            command = self._commands.get(cmd) if isinstance(cmd, str) else None
            if command is None:
                known = ", ".join(sorted(self._commands))
                what = f"unknown command {cmd!r}" if cmd is not None else "no 'cmd'"
                raise RequestError(f"{what} (known: {known})")
            return {"ok": True, **command(request)}
        except (RequestError, PykvmError) as err:
            return {"ok": False, "error": str(err)}
        except Exception as err:  # a bug here must not take the server (or the guest) down
            log.exception("control socket %s: request %r failed", self.path, request)
            return {"ok": False, "error": f"internal error: {type(err).__name__}: {err}"}

    def _balloon_device(self) -> VirtioBalloon:
        balloon = self.machine.balloon
        if balloon is None:
            raise RequestError("this machine has no balloon (start it with --balloon)")
        return balloon

    def _host_memory(self) -> dict[str, int]:
        return {"rss": self._process.memory_info().rss, "guest_resident": self.machine.memory.resident()["rss"]}

    def _info(self, request: dict[str, Any]) -> dict[str, Any]:
        config = self.machine.config
        balloon = getattr(self.machine, "balloon", None)
        answer: dict[str, Any] = {
            "protocol": PROTOCOL_VERSION,
            "pid": os.getpid(),
            "memory": self.machine.memory.size,
            "cpus": config.cpus,
            "devices": [slot.device.name for slot in self.machine.devices.virtio],
            **self._host_memory(),
            "share_pages": bool(config.share_pages),
            "balloon": None,
        }
        if config.share_pages:
            answer["ksm"] = ksm_status()
        if balloon is not None:
            answer["balloon"] = {"target": balloon.target, "actual": balloon.actual, "features": balloon.negotiated}
        status = self.machine.status()
        answer.update(state=status.state, uptime=round(status.uptime, 3), exits=status.exits_by_reason,
                      vcpus=[dataclasses.asdict(vcpu) for vcpu in status.vcpus])  # fmt: skip
        migration = self.machine.migration
        answer["migration"] = None if migration is None else dataclasses.asdict(migration.progress())
        return answer

    def _snapshot(self, request: dict[str, Any]) -> dict[str, Any]:
        path = request.get("path")
        if not isinstance(path, str) or not path:
            raise RequestError("snapshot needs a 'path': the directory to write it to")
        started = time.monotonic()
        manifest = self.machine.snapshot(path)
        if request.get("stop") is True:
            self.machine.stop_after_snapshot(path)
        return {"path": path, "memory_bytes": manifest.memory_data_bytes, "seconds": round(time.monotonic() - started, 3)}

    def _migrate(self, request: dict[str, Any]) -> dict[str, Any]:
        uri = request.get("uri")
        if not isinstance(uri, str) or not uri:
            raise RequestError("migrate needs a 'uri': where the destination waits (tcp:HOST:PORT, unix:PATH)")
        downtime = _number(request, "downtime_ms", 300.0, 1.0, 60_000.0)
        bandwidth = request.get("bandwidth")
        if bandwidth is not None and (isinstance(bandwidth, bool) or not isinstance(bandwidth, int) or bandwidth <= 0):
            raise RequestError(f"bandwidth must be a number of bytes per second above 0, not {bandwidth!r}")
        token = request.get("token")
        if token is not None and not isinstance(token, str):
            raise RequestError("token must be a string")
        try:
            result = self.machine.migrate(uri, downtime_ms=downtime, timeout=_seconds(request, "timeout", MAX_WAIT),
                                          bandwidth=bandwidth, token=token,
                                          auto_converge=request.get("auto_converge", True) is not False)  # fmt: skip
        except MigrationError as err:
            log.warning("%s", err)  # the one-line report on the source's side
            raise
        return dataclasses.asdict(result)

    def _wake_machine(self, request: dict[str, Any]) -> dict[str, Any]:
        if not self.machine.wake():
            raise RequestError("the machine is not suspended")
        return {}

    def _balloon(self, request: dict[str, Any]) -> dict[str, Any]:
        balloon = self._balloon_device()
        if "target" not in request:
            raise RequestError("balloon needs a 'target' (a size like \"32M\", or bytes)")
        target = request["target"]
        if isinstance(target, bool) or not isinstance(target, (str, int)):
            raise RequestError(f"target must be a size string or a number of bytes, not {target!r}")
        target = balloon.set_target(parse_size(target))
        answer: dict[str, Any] = {"target": target}
        wait = _seconds(request, "wait", 0.0)
        if wait:
            answer["reached"] = balloon.wait_actual(target, wait)
        answer["actual"] = balloon.actual
        return answer

    def _stats(self, request: dict[str, Any]) -> dict[str, Any]:
        balloon = self._balloon_device()
        fresh = False
        if request.get("refresh", True):
            fresh = balloon.refresh_stats(_seconds(request, "timeout", 1.0))
        updated = balloon.stats_updated_at
        return {
            "stats": balloon.guest_stats(),
            "fresh": fresh,
            "stats_age": None if updated is None else round(time.monotonic() - updated, 3),
            "target": balloon.target,
            "actual": balloon.actual,
            "counters": balloon.counters(),
            **self._host_memory(),
        }


def _number(request: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = request.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise RequestError(f"{name} must be a number from {low:g} to {high:g}, not {value!r}")
    return float(value)


def _seconds(request: dict[str, Any], name: str, default: float) -> float:
    value = request.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_WAIT:
        raise RequestError(f"{name} must be a number of seconds from 0 to {MAX_WAIT:g}, not {value!r}")
    return float(value)


def _encode(answer: dict[str, Any]) -> bytes:
    return json.dumps(answer, separators=(", ", ": ")).encode() + b"\n"


def _inode(info: os.stat_result) -> tuple[int, int]:
    return info.st_dev, info.st_ino


# --- the client ------------------------------------------------------------------------------------
def request(path: str, message: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """Send one request to the control socket at ``path`` and return its answer.

    Raises :class:`ControlError` if nobody answers within ``timeout`` seconds (an ``ok: false``
    answer is returned as is).  A server whose backlog is full is tried again until then.
    """
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout)
        try:
            _connect(sock, path, deadline)
            sock.sendall(_encode(message))
            answer = b""
            while not answer.endswith(b"\n"):
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                data = sock.recv(65536)
                if not data:
                    raise ControlError(f"control socket {path}: the server closed the connection without answering")
                answer += data
        except socket.timeout as err:
            raise ControlError(f"control socket {path}: no answer within {timeout:g} s (is the machine stopped?)") from err
        except OSError as err:
            hint = " (is the machine running with --control?)" if err.errno in (errno.ENOENT, errno.ECONNREFUSED) else ""
            raise ControlError(f"control socket {path}: {err.strerror}{hint}") from err
    try:
        decoded = json.loads(answer)
    except (ValueError, RecursionError) as err:
        raise ControlError(f"control socket {path}: the answer is not JSON: {err}") from err
    if not isinstance(decoded, dict):
        raise ControlError(f"control socket {path}: the answer is not a JSON object")
    return decoded


def _connect(sock: socket.socket, path: str, deadline: float) -> None:
    """Connect, trying again while the server's backlog is full (EAGAIN), until ``deadline``."""
    while True:
        try:
            sock.connect(path)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise socket.timeout from None
            time.sleep(CONNECT_RETRY)


def _mib(value: object) -> str:
    return f"{value / MIB:.1f} MiB" if isinstance(value, (int, float)) else "?"


def format_progress(progress: dict[str, Any]) -> str:
    """One line on a migration under way (or its end), from ``info``'s ``migration``."""
    line = f"migration to {progress.get('uri')}: {progress.get('phase')}"
    if progress.get("phase") in ("pre-copy", "stop-and-copy"):
        line += (f", round {progress.get('round')}, {_mib(progress.get('bytes_sent'))} sent, "
                 f"dirty {_mib(progress.get('dirty_rate'))}/s, bandwidth {_mib(progress.get('bandwidth'))}/s, "
                 f"expected downtime {progress.get('expected_downtime_ms', 0):.0f} ms")  # fmt: skip
        if progress.get("throttle"):
            line += f", throttled {progress['throttle']:.0%}"
    return line


def format_answer(cmd: str, answer: dict[str, Any]) -> str:
    """Human output for a successful answer to ``cmd`` (one line; ``info`` adds the run and each vCPU)."""
    if cmd == "balloon":
        line = f"balloon: target {_mib(answer.get('target'))}, actual {_mib(answer.get('actual'))}"
        if answer.get("reached") is False:
            line += " (not reached yet)"
        return line
    host = f"host: RSS {_mib(answer.get('rss'))} (guest RAM resident {_mib(answer.get('guest_resident'))})"
    if cmd == "stats":
        stats = answer.get("stats") or {}
        names = (("memtot", "total"), ("memfree", "free"), ("avail", "available"), ("caches", "caches"))
        guest = ", ".join(f"{label} {_mib(stats[key])}" for key, label in names if key in stats) or "no statistics yet"
        age = answer.get("stats_age")
        when = "" if answer.get("fresh") or age is None else f" ({age:.1f} s old)"
        return (f"balloon: target {_mib(answer.get('target'))}, actual {_mib(answer.get('actual'))}; "
                f"guest: {guest}{when}; {host}")  # fmt: skip
    if cmd == "info":
        cpus = answer.get("cpus")
        parts = [f"pid {answer.get('pid')}: {_mib(answer.get('memory'))} RAM, {cpus} vCPU{'s' if cpus != 1 else ''}"]
        balloon = answer.get("balloon")
        parts.append("no balloon" if not balloon else
                     f"balloon target {_mib(balloon.get('target'))} actual {_mib(balloon.get('actual'))}")  # fmt: skip
        parts.append(host)
        ksm = answer.get("ksm") or {}
        sharing = "page sharing off" if not answer.get("share_pages") else (
            f"page sharing on (KSM {'running' if ksm.get('run') == 1 else 'not running'}, "
            f"saved {_mib(ksm.get('saved_bytes', 0))} host-wide)")  # fmt: skip
        parts.append(sharing)
        lines = [", ".join(parts)]
        if "state" in answer:
            exits = ", ".join(f"{name} {count}" for name, count in sorted((answer.get("exits") or {}).items()))
            lines.append(f"state: {answer['state']}, up {answer.get('uptime', 0):.1f} s; exits: {exits or 'none'}")
            lines += [f"vCPU {v.get('id')}: {v.get('mode')} mode, CPL {v.get('cpl')}, rip {v.get('rip', 0):#x}"
                      for v in answer.get("vcpus") or []]  # fmt: skip
        migration = answer.get("migration")
        if migration:
            lines.append(format_progress(migration))
        return "\n".join(lines)
    if cmd == "migrate":
        return (f"migrated to {answer.get('uri')}: {answer.get('total_ms', 0):.0f} ms in all, downtime "
                f"{answer.get('downtime_ms', 0):.1f} ms, {answer.get('rounds')} rounds, {_mib(answer.get('bytes_sent'))} sent "
                f"({answer.get('data_pages')} pages of data, {answer.get('zero_pages')} of zeros)")  # fmt: skip
    if cmd == "wake":
        return "woken"
    if cmd == "snapshot":
        return f"snapshot: {answer.get('path')}: {_mib(answer.get('memory_bytes'))} of RAM in {answer.get('seconds')} s"
    return json.dumps(answer)
