"""Locking a disk image while a machine has it open, as QEMU does, so two VMs cannot corrupt it.

A writable disk takes an exclusive lock on the whole image, a read-only one a shared lock: any
number of machines may read an image, one may write it, and never both at once.  The locks
are open file description locks (``F_OFD_SETLK``): they belong to the descriptor, not to the
process, so two machines in one process exclude each other too, and they go away when the
descriptor is closed, however the process ends.  Only cooperating programs see them (QEMU
checks its own byte ranges inside the whole-file lock, so it refuses an image pykvm writes).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
from pathlib import Path

from .errors import ConfigError

log = logging.getLogger(__name__)

# struct flock (x86-64): l_type, l_whence, l_start, l_len, l_pid (0 for OFD locks), padding.
_FLOCK = struct.Struct("hhqqi4x")
_LOCK_NAMES = {fcntl.F_RDLCK: "READ", fcntl.F_WRLCK: "WRITE"}


def lock_image(fd: int, path: str | Path, read_only: bool) -> int:
    """Lock the image open at ``fd`` (shared if ``read_only``, else exclusive) and return ``fd``.

    Raises :class:`~pykvm.errors.ConfigError` naming the image, and the process that holds
    it where /proc tells, if another open description holds a conflicting lock; ``fd`` is then
    closed.  A filesystem without locks gets a warning, and no lock.
    """
    wanted = fcntl.F_RDLCK if read_only else fcntl.F_WRLCK
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(wanted, os.SEEK_SET, 0, 0, 0))
        return fd
    except OSError as err:
        if err.errno not in (errno.EAGAIN, errno.EACCES):
            log.warning("%s: cannot lock the disk image (%s); other programs may write it meanwhile", path, err.strerror)
            return fd
        held = _conflicting_lock(fd, wanted)
        holder = _holder(os.fstat(fd), held)
        os.close(fd)
    if held == fcntl.F_WRLCK:
        raise ConfigError(f"{path}: the disk image is in use, writable, by {holder}; it cannot be opened until that ends")
    raise ConfigError(
        f"{path}: the disk image is in use by {holder}; a writable disk needs it alone "
        "(machines can share an image read-only: PATH,ro)"
    )


def _conflicting_lock(fd: int, wanted: int) -> int:
    """The type of a lock that keeps ``wanted`` from ``fd`` (F_WRLCK if it cannot be told)."""
    try:
        answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _FLOCK.pack(wanted, os.SEEK_SET, 0, 0, 0))
    except OSError:
        return fcntl.F_WRLCK
    held = _FLOCK.unpack(answer)[0]
    return held if held in _LOCK_NAMES else fcntl.F_WRLCK


def _holder(image: os.stat_result, held: int) -> str:
    """Who holds a ``held`` lock on ``image``: "pid N (command)" from /proc, or "another process"."""
    key = f"{os.major(image.st_dev):02x}:{os.minor(image.st_dev):02x}:{image.st_ino} "
    lock_line = f"OFDLCK ADVISORY  {_LOCK_NAMES[held]} "
    for pid in (entry for entry in os.listdir("/proc") if entry.isdigit()):
        try:
            for fd in os.listdir(f"/proc/{pid}/fdinfo"):
                info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
                if any(lock_line in line and key in line for line in info.splitlines() if line.startswith("lock:")):
                    return f"pid {pid} ({_command(pid)})"
        except OSError:  # gone, or not ours to look at
            continue
    return "another process"


def _command(pid: str) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    except OSError:
        return "?"
    return os.fsdecode(b" ".join(argv))[:120]
