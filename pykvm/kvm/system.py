"""The KVM system file descriptor: ``/dev/kvm``."""

from __future__ import annotations

import errno
import os

from ..config import DEFAULT_KVM_PATH
from ..errors import KvmIoctlError, KvmUnavailableError
from ..native import check, lib
from . import ioctls
from .convert import to_record
from .fam import CPUID2, MSR_LIST
from .state import CpuidEntry
from .vm import Vm

# KVM_GET_SUPPORTED_CPUID fails with E2BIG when the array is too small; it is retried larger.
_CPUID_ENTRIES_START = 128
_CPUID_ENTRIES_MAX = 4096


class Kvm:
    """An open ``/dev/kvm``: capability queries and the factory of VMs.

    >>> with Kvm() as kvm:                                  # doctest: +SKIP
    ...     kvm.api_version()
    12
    """

    def __init__(self, path: str = DEFAULT_KVM_PATH) -> None:
        self.path = path
        self._supported_cpuid: tuple[CpuidEntry, ...] | None = None
        self.fd = _open(path)
        try:
            try:
                version = self.api_version()
            except KvmIoctlError as err:
                raise KvmUnavailableError(path, f"is not a KVM device ({err})") from err
            if version != lib.KVM_API_VERSION:
                raise KvmUnavailableError(path, f"KVM API version {version}, pykvm needs {lib.KVM_API_VERSION}")
        except BaseException:
            os.close(self.fd)
            raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Kvm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ioctl(self, request: ioctls.Ioctl, arg: object = 0) -> int:
        return ioctls.ioctl(self.fd, request, arg)

    def api_version(self) -> int:
        """See the documentation for ``KVM_GET_API_VERSION``."""
        return self._ioctl(ioctls.KVM_GET_API_VERSION)

    def check_extension(self, cap: int) -> int:
        """See ``KVM_CHECK_EXTENSION``: 0 if ``cap`` is absent, else a cap-specific value."""
        return self._ioctl(ioctls.KVM_CHECK_EXTENSION, cap)

    def vcpu_mmap_size(self) -> int:
        """See ``KVM_GET_VCPU_MMAP_SIZE``: the size of each vCPU's shared ``kvm_run`` area."""
        return self._ioctl(ioctls.KVM_GET_VCPU_MMAP_SIZE)

    def supported_cpuid(self) -> list[CpuidEntry]:
        """See ``KVM_GET_SUPPORTED_CPUID``: the CPUID leaves this host's KVM can offer.

        Asked once per ``Kvm``: the answer is a property of the host.
        """
        if self._supported_cpuid is None:
            self._supported_cpuid = self._get_supported_cpuid()
        return list(self._supported_cpuid)

    def _get_supported_cpuid(self) -> tuple[CpuidEntry, ...]:
        cpuid, ret = CPUID2.sized_to_fit(
            lambda cdata: lib.pykvm_ioctl(self.fd, ioctls.KVM_GET_SUPPORTED_CPUID.number, cdata),
            _CPUID_ENTRIES_START,
            _CPUID_ENTRIES_MAX,
        )
        check(ret, ioctls.KVM_GET_SUPPORTED_CPUID.name)
        return tuple(to_record(CpuidEntry, entry) for entry in CPUID2.entries(cpuid))

    def msr_index_list(self) -> list[int]:
        """See ``KVM_GET_MSR_INDEX_LIST``: the MSRs KVM saves and restores.

        Asked twice: with no room, KVM answers E2BIG and the count; then with that room.
        """
        probe = MSR_LIST.new(0)
        ret = lib.pykvm_ioctl(self.fd, ioctls.KVM_GET_MSR_INDEX_LIST.number, probe)
        if ret != -errno.E2BIG:
            check(ret, ioctls.KVM_GET_MSR_INDEX_LIST.name)
        msr_list = MSR_LIST.new(MSR_LIST.count(probe))
        self._ioctl(ioctls.KVM_GET_MSR_INDEX_LIST, msr_list)
        return [int(index) for index in MSR_LIST.entries(msr_list)]

    def create_vm(self) -> Vm:
        """See ``KVM_CREATE_VM``: a new, empty virtual machine."""
        return Vm(self, self._ioctl(ioctls.KVM_CREATE_VM, 0))


def _open(path: str) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError as err:
        raise KvmUnavailableError(
            path,
            "does not exist: this host has no KVM (enable virtualization in the firmware "
            "and load kvm_intel or kvm_amd)",
        ) from err
    except PermissionError as err:
        raise KvmUnavailableError(
            path,
            "permission denied: add your user to the group that owns it "
            "(usually 'sudo usermod -aG kvm $USER', then log in again)",
        ) from err
    except OSError as err:
        raise KvmUnavailableError(path, f"cannot be opened: {err.strerror}") from err
