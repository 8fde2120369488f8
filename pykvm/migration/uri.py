"""Where a migration stream goes: ``tcp:HOST:PORT``, ``unix:PATH`` or ``fd:N``.

The source connects (:func:`connect`); the destination listens and takes one connection
(:class:`Listener`).  In ``tcp:HOST:PORT`` an IPv6 host is written in brackets
(``tcp:[::1]:4444``) and an empty host is the loopback address: a destination that other
hosts may reach names the address to listen on (``tcp:0.0.0.0:4444``), knowing that the
stream is not encrypted (see :mod:`pykvm.migration`).  Port 0 lets the kernel pick one;
:attr:`Listener.uri` tells which.  ``fd:N`` is a stream socket the caller opened, connected
or listening (then one connection is accepted on it); it is taken over and closed afterwards.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time

from ..errors import ConfigError, MigrationError
from ..unix_socket import clear_socket_path

FORMS = "tcp:HOST:PORT, unix:PATH or fd:N"


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """A parsed URI: ``kind`` is ``tcp``, ``unix`` or ``fd``; ``address`` what the socket calls take."""

    uri: str
    kind: str
    family: socket.AddressFamily
    address: tuple[str, int] | str  # tcp: (host, port); unix: the path
    fd: int = -1  # fd: the descriptor


def parse(uri: str) -> Endpoint:
    """Read a migration URI; :class:`~pykvm.errors.ConfigError` names what is wrong with a bad one."""
    kind, colon, rest = uri.partition(":")
    if not colon or not rest:
        raise ConfigError(f"migration URI {uri!r}: expected {FORMS}")
    if kind == "unix":
        return Endpoint(uri, kind, socket.AF_UNIX, rest)
    if kind == "fd":
        if not rest.isdigit():
            raise ConfigError(f"migration URI {uri!r}: fd: takes a file descriptor number")
        return Endpoint(uri, kind, socket.AF_UNIX, "", int(rest))
    if kind != "tcp":
        raise ConfigError(f"migration URI {uri!r}: unknown transport {kind!r}; expected {FORMS}")
    host, colon, port = rest.rpartition(":")
    if not colon or not port.isdigit() or int(port) > 0xFFFF:
        raise ConfigError(f"migration URI {uri!r}: the port must be a number from 0 to 65535")
    if host.startswith("[") and host.endswith("]") and len(host) > 2:
        return Endpoint(uri, kind, socket.AF_INET6, (host[1:-1], int(port)))
    if ":" in host or "[" in host or "]" in host:
        raise ConfigError(f"migration URI {uri!r}: write an IPv6 host in brackets, as tcp:[::1]:{port}")
    return Endpoint(uri, kind, socket.AF_INET, (host or "127.0.0.1", int(port)))


def connect(uri: str, timeout: float) -> socket.socket:
    """A stream socket connected to the destination at ``uri``."""
    where = parse(uri)
    if where.kind == "fd":
        sock = _adopt(where)
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            sock.close()
            raise MigrationError(f"{uri}: a listening socket; the source needs a connected one")
        return sock
    sock = socket.socket(where.family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        sock.connect(where.address)
    except OSError as err:
        sock.close()
        reason = "timed out" if isinstance(err, TimeoutError) else err.strerror or str(err)
        raise MigrationError(f"cannot reach the destination {uri}: {reason}") from err
    _tune(sock)
    return sock


class Listener:
    """The destination's end: listens at ``uri`` (from construction on) for one source."""

    def __init__(self, uri: str) -> None:
        where = parse(uri)
        self._path = str(where.address) if where.kind == "unix" else None
        self.uri = uri  #: where it listens (for ``tcp:HOST:0``: with the port the kernel picked)
        if where.kind == "fd":
            self._sock: socket.socket | None = _adopt(where)
            self._listening = bool(self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
            return
        if self._path is not None:
            problem = clear_socket_path(self._path)
            if problem is not None:
                raise MigrationError(f"cannot listen on {uri}: {problem}")
        self._sock, self._listening = _listen(where), True
        if where.kind == "tcp":
            host, port = self._sock.getsockname()[:2]
            self.uri = f"tcp:[{host}]:{port}" if where.family == socket.AF_INET6 else f"tcp:{host}:{port}"

    def accept(self, deadline: float | None) -> socket.socket:
        """The source's connection (the listening socket is closed then: one migration per listener)."""
        listener, self._sock = self._sock, None
        if listener is None:
            raise MigrationError(f"{self.uri}: took its one migration already")
        if not self._listening:
            return listener
        try:
            listener.settimeout(None if deadline is None else max(deadline - time.monotonic(), 0.001))
            sock, _ = listener.accept()
        except TimeoutError as err:
            raise MigrationError(f"no migration arrived on {self.uri} in time") from err
        except OSError as err:
            raise MigrationError(f"waiting for a migration on {self.uri}: {err.strerror or err}") from err
        finally:
            listener.close()
            self.close()
        _tune(sock)
        return sock

    def close(self) -> None:
        """Stop listening (idempotent); a socket file is removed."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._path is not None:
            try:
                os.unlink(self._path)
            except FileNotFoundError:
                pass
            self._path = None

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _listen(where: Endpoint) -> socket.socket:
    sock = socket.socket(where.family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        if where.kind == "tcp":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(where.address)
        if where.kind == "unix":
            os.chmod(str(where.address), 0o600)
        sock.listen(1)
    except OSError as err:
        sock.close()
        raise MigrationError(f"cannot listen for a migration on {where.uri}: {err.strerror or err}") from err
    return sock


def _adopt(where: Endpoint) -> socket.socket:
    try:
        sock = socket.socket(fileno=where.fd)
    except OSError as err:
        raise MigrationError(f"{where.uri}: not an open socket ({err.strerror or err})") from err
    if sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise MigrationError(f"{where.uri}: not a stream socket")
    os.set_inheritable(where.fd, False)
    _tune(sock)
    return sock


def _tune(sock: socket.socket) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


