"""The one module that touches the compiled C fast path (``pykvm._native``).

C returns 0 or a non-negative result on success and ``-errno`` on failure;
:func:`check` turns a failure into :class:`~pykvm.errors.KvmIoctlError`.
"""

from __future__ import annotations

import os

from .errors import KvmIoctlError, PykvmError

try:
    from ._native import ffi, lib
except ImportError as err:  # pragma: no cover - a broken install
    raise PykvmError(
        f"pykvm's C extension is not built ({err}); reinstall with 'pip install .' "
        "(it needs a C compiler and the Linux kernel headers)"
    ) from err

__all__ = ["ffi", "lib", "check", "fallocate"]


def check(ret: int, name: str, detail: str = "") -> int:
    """Return ``ret`` if it is not negative, else raise the error naming ``name``."""
    if ret < 0:
        raise KvmIoctlError(name, -ret, detail)
    return ret


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode (``lib.FALLOC_FL_*``), which Python's os module lacks; raises OSError."""
    ret = lib.pykvm_fallocate(fd, mode, offset, length)
    if ret < 0:
        raise OSError(-ret, os.strerror(-ret))
