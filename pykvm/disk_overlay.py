"""Throw-away disks: a copy of a disk image that the guest writes instead of the image (QEMU's ``-snapshot``).

A :class:`DiskOverlay` is an unlinked temporary file (``O_TMPFILE``), made in the image's
directory when it can be (a reflink needs both on one file system), else in
:func:`tempfile.gettempdir`, and filled from the image as cheaply as the file system allows
(:func:`copy_image`): a reflink (``FICLONE``, on btrfs and XFS), which copies no data, the
blocks staying shared until either side writes them; else a sparse copy of the image's data
extents only (``SEEK_DATA``/``SEEK_HOLE``, each extent with ``copy_file_range``, or read and
written where that cannot copy), so that an image holding a few MiB in a sparse 1 GiB file costs
a few MiB.  Without reflinks the copy takes time in proportion to the image's data (QEMU's qcow2
overlay costs nothing up front; pykvm has no image format to keep one in).  A block device is all
data, and its overlay always goes to the temporary directory.

While the overlay lives, the image is held open read-only with a shared lock
(:mod:`pykvm.disk_lock`): no pykvm machine can write it meanwhile, an image a writer has is
refused here, and any number of read-only and throw-away users share it.  The overlay's data
goes away with its last descriptor, however the process ends; nothing is ever written to the
image.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import tempfile
from pathlib import Path
from typing import Iterator

from ioctl_opt import IOC, IOC_WRITE

from .disk_lock import open_image
from .errors import ConfigError

FICLONE = IOC(IOC_WRITE, 0x94, 9, 4)  # <linux/fs.h>: _IOW(0x94, 9, int)
COPY_CHUNK = 1 << 20  # bytes per read and write where the kernel cannot copy by itself
# What a file system says when it cannot reflink or copy_file_range these two files: do it by hand.
_CANNOT_CLONE = (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EPERM)
_CANNOT_COPY_RANGE = (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOSYS)
# Where O_TMPFILE cannot make a file in a directory: try the next place.
_NO_TMPFILE_HERE = (errno.EOPNOTSUPP, errno.EISDIR, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT)


class DiskOverlay:
    """A throw-away, writable copy of the disk image at ``path``, locked shared while it lives.

    ``fd`` is the copy (read-write); give a device :meth:`device_fd`.  ``size`` is the image's size
    in bytes, ``data_bytes`` what the copy took from it (its data extents), ``directory`` where it
    lives.  Raises :class:`~pykvm.errors.ConfigError` naming the image if it cannot be opened,
    locked or copied.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self.source_fd = open_image(self.path, read_only=True)
        self.fd = -1
        try:
            self.size = os.lseek(self.source_fd, 0, os.SEEK_END)
            self.fd, self.directory = _temporary_file(self.path, stat.S_ISREG(os.fstat(self.source_fd).st_mode))
            self.data_bytes = self._copy_from(self.source_fd, "fill")
        except BaseException:
            self.close()
            raise

    def device_fd(self) -> int:
        """A descriptor of the copy for a device to own (it closes it; the copy lives on here)."""
        return os.dup(self.fd)

    def save(self, target: int) -> int:
        """Copy the overlay as it is now into the empty file ``target`` (sparse, or a reflink);
        returns the bytes of data copied."""
        return copy_image(self.fd, target, self.size)

    def refill(self, source: int) -> None:
        """Make the overlay hold what the file ``source`` holds (a saved copy of it), as a guest
        returned to that copy expects; the devices' descriptors see it at once."""
        size = os.lseek(source, 0, os.SEEK_END)
        if size != self.size:
            raise ConfigError(f"{self.path}: a copy of {size} bytes cannot replace its overlay of {self.size}")
        self.data_bytes = self._copy_from(source, "put back")

    def _copy_from(self, source: int, what: str) -> int:
        try:
            return copy_image(source, self.fd, self.size)
        except OSError as err:
            raise ConfigError(
                f"{self.path}: cannot {what} its throw-away overlay in {self.directory}: {err.strerror or err}"
            ) from err

    def close(self) -> None:
        """Drop the overlay (its data is gone) and let go of the image."""
        for fd in (self.fd, self.source_fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.source_fd = -1


def _temporary_file(image: str, beside: bool) -> tuple[int, str]:
    """An unlinked file, in the image's directory if ``beside`` and it can be made there, else in
    the temporary directory (always for a block device: its directory, /dev, is no place for data)."""
    places = (str(Path(image).resolve().parent), tempfile.gettempdir()) if beside else (tempfile.gettempdir(),)
    directories = dict.fromkeys(places)
    reasons = []
    for directory in directories:
        try:
            return os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600), directory
        except OSError as err:
            if err.errno not in _NO_TMPFILE_HERE:
                reason = f"{image}: cannot make its throw-away overlay in {directory}: {err.strerror}"
                raise ConfigError(reason) from err
            reasons.append(f"{directory}: {err.strerror}")
    raise ConfigError(f"{image}: cannot make its throw-away overlay anywhere ({'; '.join(reasons)})")


def copy_image(source: int, target: int, size: int) -> int:
    """Make the file ``target`` a copy of ``source``, which is ``size`` bytes long: a reflink where
    the file system can make one, else a sparse copy (its holes stay holes).  Returns the bytes of
    data the copy holds (what is not holes).  Raises OSError."""
    os.ftruncate(target, 0)
    try:
        fcntl.ioctl(target, FICLONE, source)
        return sum(length for _, length in data_extents(target, size))
    except OSError as err:
        if err.errno not in _CANNOT_CLONE:
            raise
    os.ftruncate(target, size)
    copied = 0
    in_kernel = True
    for offset, length in data_extents(source, size):
        in_kernel = in_kernel and _copy_in_kernel(source, target, offset, length)
        if not in_kernel:
            _read_write(source, target, offset, length)
        copied += length
    return copied


def data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of each run of data (not a hole) in the first ``size`` bytes of ``fd``."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        except OSError as err:
            if err.errno == errno.ENXIO:  # no data after offset
                return
            if err.errno != errno.EINVAL:  # EINVAL: no SEEK_DATA here, so all of it is data
                raise
            start, end = offset, size
        if start >= size:
            return
        yield start, end - start
        offset = end


def _copy_in_kernel(source: int, target: int, offset: int, length: int) -> bool:
    """Copy ``length`` bytes at ``offset`` with ``copy_file_range``; False, with nothing copied,
    where the kernel cannot copy between these two files."""
    done = 0
    while done < length:
        try:
            moved = os.copy_file_range(source, target, length - done, offset + done, offset + done)
        except OSError as err:
            if err.errno in _CANNOT_COPY_RANGE and not done:
                return False
            raise
        if moved == 0:
            raise OSError(errno.EIO, f"the image ended at byte {offset + done} while it was copied")
        done += moved
    return True


def _read_write(source: int, target: int, offset: int, length: int) -> None:
    """Copy ``length`` bytes at ``offset`` through a buffer of at most :data:`COPY_CHUNK` bytes."""
    buffer = memoryview(bytearray(min(length, COPY_CHUNK)))
    done = 0
    while done < length:
        count = os.preadv(source, [buffer[: min(len(buffer), length - done)]], offset + done)
        if count == 0:
            raise OSError(errno.EIO, f"the image ended at byte {offset + done} while it was copied")
        written = 0
        while written < count:
            written += os.pwrite(target, buffer[written:count], offset + done + written)
        done += count
