"""Opening a disk image and locking it while a machine has it open, as QEMU does, so two VMs cannot
corrupt it.

A writable disk takes an exclusive lock on the whole image, a read-only one a shared lock: any
number of machines may read an image, one may write it, and never both at once.  A throw-away
disk (:mod:`pykvm.disk_overlay`) reads the image, so it takes a shared lock too.  The locks
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
import stat
import struct
from pathlib import Path

from .errors import ConfigError

log = logging.getLogger(__name__)

# struct flock (x86-64): l_type, l_whence, l_start, l_len, l_pid (0 for OFD locks), padding.
_FLOCK = struct.Struct("hhqqi4x")
_LOCK_NAMES = {fcntl.F_RDLCK: "READ", fcntl.F_WRLCK: "WRITE"}


def open_image(path: str | Path, read_only: bool, lock: bool = True) -> int:
    """The disk image at ``path`` open read-only or read-write, and locked unless ``lock`` is False.

    Raises :class:`~pykvm.errors.ConfigError` naming the image if it cannot be opened or locked,
    or is not a regular file or block device (it is opened without waiting, so a FIFO is refused
    rather than waited on).
    """
    flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags)
    except FileNotFoundError as err:
        raise ConfigError(f"{path}: no such disk image") from err
    except IsADirectoryError as err:
        raise ConfigError(f"{path}: is a directory, not a disk image") from err
    except PermissionError as err:
        hint = "" if read_only else " (use PATH,ro for a read-only disk)"
        raise ConfigError(f"{path}: permission denied{hint}") from err
    except OSError as err:
        hint = " (use PATH,ro for a read-only disk)" if err.errno == errno.EROFS else ""
        raise ConfigError(f"{path}: cannot open the disk image: {err.strerror}{hint}") from err
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):  # O_RDONLY opens a directory without complaint
            raise ConfigError(f"{path}: is a directory, not a disk image")
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise ConfigError(f"{path}: not a regular file or block device")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return lock_image(fd, path, read_only) if lock else fd


def lock_image(fd: int, path: str | Path, read_only: bool) -> int:
    """Lock the image open at ``fd`` (shared if ``read_only``, else exclusive) and return ``fd``;
    ``fd`` is closed if it cannot be locked (see :func:`take_lock`)."""
    try:
        take_lock(fd, path, read_only)
    except ConfigError:
        os.close(fd)
        raise
    return fd


def take_lock(fd: int, path: str | Path, read_only: bool) -> None:
    """Lock the image open at ``fd``, shared if ``read_only``, else exclusive.

    Raises :class:`~pykvm.errors.ConfigError` naming the image, and the process that holds
    it where /proc tells, if another open description holds a conflicting lock.  A
    filesystem without locks gets a warning, and no lock.
    """
    wanted = fcntl.F_RDLCK if read_only else fcntl.F_WRLCK
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(wanted, os.SEEK_SET, 0, 0, 0))
        return
    except OSError as err:
        if err.errno not in (errno.EAGAIN, errno.EACCES):
            log.warning("%s: cannot lock the disk image (%s); other programs may write it meanwhile", path, err.strerror)
            return
    held = _conflicting_lock(fd, wanted)
    holder = _holder(os.fstat(fd), held)
    if held == fcntl.F_WRLCK:
        raise ConfigError(f"{path}: the disk image is in use, writable, by {holder}; it cannot be opened until that ends")
    raise ConfigError(
        f"{path}: the disk image is in use by {holder}; a writable disk needs it alone "
        "(machines can share an image read-only, PATH,ro, or each with a throw-away copy, PATH,snapshot)"
    )


def release_lock(fd: int) -> None:
    """Let go of the lock on the image open at ``fd`` (it stays open)."""
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, 0, 0, 0))
    except OSError as err:
        log.warning("cannot unlock a disk image (%s)", err.strerror)


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
