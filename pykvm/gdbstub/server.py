"""The gdb server: serves one gdb at a time a :class:`DebugTarget`, from a thread of its own.

Where it listens (the forms of QEMU's ``-gdb``, read by :func:`parse_address`):

``tcp::PORT``
    127.0.0.1, port PORT (0: a free port, see :attr:`GdbServer.address`).  Unlike QEMU,
    which listens on every interface here, only this host: whoever connects owns the guest.
``tcp:HOST:PORT``
    HOST a name, an IPv4 address or an ``[IPv6]`` address (``tcp:0.0.0.0:1234`` for all).
``unix:PATH``
    a UNIX socket, mode 0600, removed on close; a stale socket file already there is
    replaced, one another process still listens on is refused, any other file is an error.

When gdb connects, the server stops the target (gdb's all-stop model wants it stopped
while it looks) and answers its packets (:mod:`pykvm.gdbstub.session`).  While the guest
runs, the server waits for the target's stop event and watches the connection for gdb's
Ctrl-C.  A second gdb is turned away while one is served.  When gdb goes away without
detaching, the guest stays as it is, breakpoints included, as with QEMU and gdbserver:
the next gdb finds it there.

``GdbServer(target, address, hold=True)`` holds the guest before its first instruction
until gdb continues it (QEMU's ``-S``); otherwise the server lets it run at once.
:meth:`GdbServer.close` stops serving promptly whatever gdb or the guest are doing (a
stop or the guest's end that came just before still goes to a gdb waiting for it); it
leaves the target as it is, for the machine that owns it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import selectors
import socket
import threading
from typing import Any

from ..errors import ConfigError, PykvmError
from ..unix_socket import clear_socket_path
from .packets import Control, Packet, PacketReader, frame
from .session import E_MALFORMED, PACKET_SIZE, Session
from .target import Action, DebugTarget, StopEvent

log = logging.getLogger(__name__)

#: How long the server waits for a stop before it looks at the connection again (so a
#: Ctrl-C or a close waits at most this long).
POLL_INTERVAL = 0.05
#: How long :meth:`GdbServer.close` lets the connection tell gdb how the guest stopped or
#: ended before it cuts the connection (a gdb that reads nothing holds it no longer).
CLOSE_GRACE = 2.0
_ADDRESS_FORMS = "tcp::PORT, tcp:HOST:PORT or unix:PATH"


class GdbServerError(PykvmError):
    """The gdb server cannot listen where it was asked to."""


@dataclasses.dataclass(frozen=True)
class ListenAddress:
    """Where to listen: a socket family and its address (``(host, port)`` or a path)."""

    family: socket.AddressFamily
    sockaddr: Any


def parse_address(spec: str) -> ListenAddress:
    """Read ``tcp::PORT``, ``tcp:HOST:PORT`` or ``unix:PATH``; :class:`ConfigError` otherwise."""
    kind, colon, rest = spec.partition(":")
    if kind == "unix" and colon and rest:
        return ListenAddress(socket.AF_UNIX, rest)
    if kind != "tcp" or not colon:
        raise ConfigError(f"gdb address {spec!r}: expected {_ADDRESS_FORMS}")
    host, colon, port = rest.rpartition(":")
    if not colon or not port.isdigit() or int(port) > 0xFFFF:
        raise ConfigError(f"gdb address {spec!r}: the port must be a number from 0 to 65535")
    if host.startswith("[") and host.endswith("]") and len(host) > 2:
        return ListenAddress(socket.AF_INET6, (host[1:-1], int(port)))
    if ":" in host or "[" in host or "]" in host:
        raise ConfigError(f"gdb address {spec!r}: write an IPv6 host in brackets, as tcp:[::1]:{port}")
    return ListenAddress(socket.AF_INET, (host or "127.0.0.1", int(port)))


class GdbServer:
    """Serves the gdb remote protocol for ``target`` at ``address`` (see the module doc)."""

    def __init__(self, target: DebugTarget, address: str, *, hold: bool = False) -> None:
        self.target = target
        self._where = parse_address(address)
        self._listener = _listen(self._where, address)
        #: Where the server listens, in the form :func:`parse_address` reads (with the real port).
        self.address = _describe(self._listener)
        self._lock = threading.Lock()
        self._closing = False
        self._connection: socket.socket | None = None
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            if not hold:
                target.resume({vcpu: Action.CONTINUE for vcpu in target.vcpu_ids()})
        except BaseException:
            self._release()
            raise
        self._thread = threading.Thread(target=self._serve_forever, name="pykvm-gdb", daemon=True)
        self._thread.start()

    @property
    def gdb_address(self) -> str:
        """What to give gdb's ``target remote``: ``HOST:PORT``, or the socket's path."""
        return self.address.partition(":")[2]

    def close(self) -> None:
        """Stop serving: end the connection, stop listening (idempotent; the target is left as it is)."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            os.write(self._wake_w, b"x")
        self._thread.join(CLOSE_GRACE)  # the guest's end, if it just came, still reaches gdb
        with self._lock:
            if self._connection is not None:
                _shutdown(self._connection)
        self._thread.join()
        self._release()

    def __enter__(self) -> GdbServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _release(self) -> None:
        self._listener.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        if self._where.family == socket.AF_UNIX:
            try:
                os.unlink(self._where.sockaddr)
            except FileNotFoundError:
                pass

    # --- the server's thread -----------------------------------------------------------------
    def _serve_forever(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._listener, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while not self._closing:
                selector.select()
                sock = self._accept()
                if sock is not None:
                    self._serve(sock)

    def _accept(self) -> socket.socket | None:
        try:
            sock, peer = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as err:
            log.warning("gdb server %s: accept failed: %s", self.address, err)
            return None
        sock.setblocking(True)
        with self._lock:
            if self._closing:
                sock.close()
                return None
            self._connection = sock
        log.info("gdb server %s: gdb connected from %s", self.address, peer or "a local socket")
        return sock

    def _serve(self, sock: socket.socket) -> None:
        try:
            _Connection(self, sock).serve()
        except OSError as err:  # gdb went away, or close() shut the socket
            log.info("gdb server %s: connection ended: %s", self.address, err)
        except Exception:  # a bug, or a failing target: this connection ends, the server goes on
            log.exception("gdb server %s: connection failed", self.address)
        finally:
            with self._lock:
                self._connection = None
            sock.close()

    def _turn_away(self) -> None:
        """Accept and close a second gdb's connection while one is served."""
        try:
            sock, _ = self._listener.accept()
        except OSError:
            return
        log.warning("gdb server %s: turned away a second gdb (one is connected)", self.address)
        sock.close()


class _Connection:
    """One gdb connection: bytes in, packets and acks out, and the wait while the guest runs."""

    def __init__(self, server: GdbServer, sock: socket.socket) -> None:
        self.server = server
        self.target = server.target
        self.sock = sock
        self.reader = PacketReader(PACKET_SIZE)
        self.session: Session | None = None
        self._last_sent = b""  # sent again when gdb answers with a NAK
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # one small packet at a time

    def serve(self) -> None:
        stop = self._stop_target()
        if stop is None:
            return
        self.session = session = Session(self.target, stop)
        with selectors.DefaultSelector() as selector:
            selector.register(self.sock, selectors.EVENT_READ)
            selector.register(self.server._wake_r, selectors.EVENT_READ)
            selector.register(self.server._listener, selectors.EVENT_READ)
            while not session.finished and not self.server._closing:
                timeout = None
                if session.running:
                    event = self.target.wait_stop(POLL_INTERVAL)
                    if event is not None:
                        self._send(session.stopped(event))
                        continue
                    timeout = 0
                ready = {key.fileobj for key, _ in selector.select(timeout)}
                if self.sock in ready and not self._read():
                    return
                if self.server._listener in ready:
                    try:  # read what is there first: a gdb that has left makes room for the next one
                        while self._read(socket.MSG_DONTWAIT):
                            pass
                    except BlockingIOError:
                        self.server._turn_away()
                    else:
                        return
            if session.running:  # closing: a stop or end that came meanwhile is gdb's last word
                event = self.target.wait_stop(0)
                if event is not None:
                    self._send(session.stopped(event))

    def _read(self, flags: int = 0) -> bool:
        """Receive and handle what gdb sent; False once it has gone or said goodbye (D, k)."""
        assert self.session is not None
        data = self.sock.recv(65536, flags)
        if not data:
            log.info("gdb server %s: gdb disconnected", self.server.address)
            return False
        self._receive(data)
        return not self.session.finished

    def _stop_target(self) -> StopEvent | None:
        """Stop the guest for gdb to look at; None if the server closes first."""
        self.target.interrupt()
        while not self.server._closing:
            event = self.target.wait_stop(POLL_INTERVAL)
            if event is not None:
                return event
        return None

    def _receive(self, data: bytes) -> None:
        assert self.session is not None
        for item in self.reader.feed(data):
            if isinstance(item, Packet):
                self._ack(b"+")
                reply = self.session.handle(item.data)
                for line in self.session.take_console_output():
                    self._send(b"O" + line.encode().hex().encode())
                if reply is not None:
                    self._send(reply)
                if self.session.finished:
                    return
            elif item is Control.INTERRUPT:
                if self.session.running:
                    self.target.interrupt()
            elif item is Control.NAK:
                if self._last_sent and not self.session.no_ack:
                    self.sock.sendall(self._last_sent)
            elif item is Control.CORRUPT:
                self._ack(b"-")
            elif item is Control.OVERSIZED:
                log.debug("gdb server %s: dropped a packet over %d bytes", self.server.address, PACKET_SIZE)
                self._ack(b"+")
                self._send(E_MALFORMED)

    def _ack(self, answer: bytes) -> None:
        assert self.session is not None
        if not self.session.no_ack:
            self.sock.sendall(answer)

    def _send(self, reply: bytes) -> None:
        self._last_sent = frame(reply)
        self.sock.sendall(self._last_sent)


def _listen(where: ListenAddress, spec: str) -> socket.socket:
    if where.family == socket.AF_UNIX:
        problem = clear_socket_path(where.sockaddr)
        if problem is not None:
            raise GdbServerError(f"gdb server: cannot listen on {spec}: {problem}")
    sock = socket.socket(where.family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        if where.family != socket.AF_UNIX:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(where.sockaddr)
        if where.family == socket.AF_UNIX:
            os.chmod(where.sockaddr, 0o600)
        sock.listen(1)
        sock.setblocking(False)
    except OSError as err:
        sock.close()
        raise GdbServerError(f"gdb server: cannot listen on {spec}: {err.strerror or err}") from err
    return sock


def _describe(listener: socket.socket) -> str:
    if listener.family == socket.AF_UNIX:
        return f"unix:{listener.getsockname()}"
    host, port = listener.getsockname()[:2]
    return f"tcp:[{host}]:{port}" if listener.family == socket.AF_INET6 else f"tcp:{host}:{port}"


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
