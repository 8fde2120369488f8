"""The socket files of the UNIX sockets pykvm listens on (control socket, gdb, migration)."""

from __future__ import annotations

import errno
import os
import socket
import stat


def clear_socket_path(path: str) -> str | None:
    """Make ``path`` free to bind a UNIX socket to: a socket file nobody listens on is removed.

    Returns why ``path`` cannot be used (a live socket, another kind of file), or None.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    if not stat.S_ISSOCK(mode):
        return f"{path} exists and is not a socket"
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
    try:
        probe.connect(path)  # never waits: a full backlog (EAGAIN) also means someone listens
    except OSError as err:
        if err.errno == errno.EAGAIN:
            return "another process listens there"
        if err.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            return err.strerror or str(err)
        try:
            os.unlink(path)  # stale: its server is gone
        except FileNotFoundError:
            pass
        return None
    finally:
        probe.close()
    return "another process listens there"
