"""The exceptions pykvm raises.

Every error pykvm raises on purpose derives from :class:`PykvmError`, and its
``str()`` is one line that says what is wrong and, where there is one, what to
do about it.  Errors coming from the operating system are translated once, at
the place they happen, and chained with ``raise ... from err``.
"""

from __future__ import annotations

import errno as errno_module
import os


class PykvmError(Exception):
    """Root of every error pykvm raises on purpose."""


class KvmUnavailableError(PykvmError):
    """``/dev/kvm`` cannot be used: missing, not permitted, or a wrong API version."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class KvmIoctlError(PykvmError):
    """A KVM ioctl failed; carries the ioctl's name and the errno."""

    def __init__(self, ioctl: str, errno: int, detail: str = "") -> None:
        text = f"{ioctl} failed: {os.strerror(errno)} ({errno_module.errorcode.get(errno, errno)})"
        super().__init__(f"{text}: {detail}" if detail else text)
        self.ioctl = ioctl
        self.errno = errno


class GuestMemoryError(PykvmError):
    """An access to guest-physical memory outside the guest's RAM."""

    def __init__(self, gpa: int, length: int, detail: str = "not backed by guest RAM") -> None:
        super().__init__(f"guest memory [{gpa:#x}, {gpa + length:#x}) is {detail}")
        self.gpa = gpa
        self.length = length


class ConfigError(PykvmError):
    """A machine configuration value is invalid (bad size, conflicting options, ...)."""


class ImageError(PykvmError):
    """A guest image cannot be loaded: missing, unreadable or malformed."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class BusError(PykvmError):
    """A device was registered over an address range that is already taken, reserved or empty."""


class DeviceError(PykvmError):
    """A device model broke its contract with the bus (e.g. a read that returned no value)."""


class StateError(PykvmError):
    """A saved device, vCPU or machine state that cannot be restored, or KVM state that cannot be
    given or taken as asked: a field missing, of the wrong type or out of range, a blob of the
    wrong size, an irqchip the VM lacks, an MSR KVM refuses, an unknown memory slot."""


class SnapshotError(PykvmError):
    """A snapshot cannot be written or read: a missing, truncated or corrupt file, another format
    version, or a host or disk that does not match what the snapshot's guest saw."""


class ReplayError(PykvmError):
    """A record or replay of host inputs cannot start: a log that is missing, malformed or
    recorded from another snapshot, or a machine whose inputs cannot be replayed."""


class MigrationError(PykvmError):
    """A live migration failed: the destination is gone, refused the guest or timed out, the
    stream is broken or not pykvm's, or the guest's memory never converged.  On the source
    the guest goes on running; on the destination no guest is left."""
