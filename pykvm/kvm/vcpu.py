"""A KVM vCPU file descriptor with its mmap'd ``kvm_run`` area and its C run loop."""

from __future__ import annotations

import mmap
import os
from typing import Mapping

from ..native import check, ffi, lib
from . import ioctls
from .exits import (
    DebugPortExit,
    Exit,
    FailEntryExit,
    HltExit,
    InternalErrorExit,
    Interrupted,
    IoExit,
    MmioExit,
    OtherExit,
    ShutdownExit,
    StopRequested,
    SystemEventExit,
)
from .fastpath import FastTable
from .state import CpuidEntry, Regs, SRegs, new_struct, to_record


_EXIT_IO, _EXIT_MMIO, _IO_OUT = lib.KVM_EXIT_IO, lib.KVM_EXIT_MMIO, lib.KVM_EXIT_IO_OUT
_STOP_EXIT, _STOP_INTERRUPTED = lib.PYKVM_STOP_EXIT, lib.PYKVM_STOP_INTERRUPTED
_STOP_REQUESTED, _STOP_DEBUG_EXIT = lib.PYKVM_STOP_REQUESTED, lib.PYKVM_STOP_DEBUG_EXIT


class Vcpu:
    """A vCPU created by :meth:`Vm.create_vcpu`.

    :meth:`run` enters the guest through the C loop (``pykvm_loop_run``) and returns
    the first exit that needs Python, decoded.
    """

    def __init__(self, fd: int, vcpu_id: int, mmap_size: int) -> None:
        self.fd = fd
        self.id = vcpu_id
        self._mmap = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._run_buffer = ffi.from_buffer(self._mmap)
        self.kvm_run = ffi.cast("struct kvm_run *", self._run_buffer)
        self._loop = ffi.new("struct pykvm_loop *")
        self._loop.vcpu_fd = fd
        self._loop.run = self.kvm_run
        self._table: FastTable | None = None

    def close(self) -> None:
        if self.fd >= 0:
            self._loop.run = ffi.NULL
            ffi.release(self._run_buffer)
            self._mmap.close()
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Vcpu:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ioctl(self, request: ioctls.Ioctl, arg: object) -> int:
        return ioctls.ioctl(self.fd, request, arg)

    # --- registers -------------------------------------------------------------------
    def get_regs(self) -> Regs:
        """See ``KVM_GET_REGS``."""
        regs = ffi.new("struct kvm_regs *")
        self._ioctl(ioctls.KVM_GET_REGS, regs)
        return to_record(Regs, regs)

    def set_regs(self, regs: Regs) -> None:
        """See ``KVM_SET_REGS``."""
        self._ioctl(ioctls.KVM_SET_REGS, new_struct("struct kvm_regs", regs))

    def get_sregs(self) -> SRegs:
        """See ``KVM_GET_SREGS``."""
        sregs = ffi.new("struct kvm_sregs *")
        self._ioctl(ioctls.KVM_GET_SREGS, sregs)
        return to_record(SRegs, sregs)

    def set_sregs(self, sregs: SRegs) -> None:
        """See ``KVM_SET_SREGS``.  (The interrupt bitmap is left empty.)"""
        self._ioctl(ioctls.KVM_SET_SREGS, new_struct("struct kvm_sregs", sregs))

    def enable_sync_regs(self) -> None:
        """Have KVM copy the general registers into ``kvm_run`` on every exit (KVM_CAP_SYNC_REGS)."""
        self.kvm_run.kvm_valid_regs = lib.KVM_SYNC_X86_REGS

    def exit_regs(self) -> Regs:
        """The registers at the last exit: from ``kvm_run`` when synced, else ``KVM_GET_REGS``."""
        if self.kvm_run.kvm_valid_regs & lib.KVM_SYNC_X86_REGS:
            return to_record(Regs, lib.pykvm_sync_regs(self.kvm_run))
        return self.get_regs()

    def set_cpuid2(self, entries: list[CpuidEntry]) -> None:
        """See ``KVM_SET_CPUID2``."""
        header = ffi.sizeof("struct kvm_cpuid2")
        buf = ffi.new("char[]", header + len(entries) * ffi.sizeof("struct kvm_cpuid_entry2"))
        cpuid = ffi.cast("struct kvm_cpuid2 *", buf)
        cpuid.nent = len(entries)
        array = ffi.cast("struct kvm_cpuid_entry2 *", buf + header)
        for i, e in enumerate(entries):
            array[i] = {"function": e.function, "index": e.index, "flags": e.flags,
                        "eax": e.eax, "ebx": e.ebx, "ecx": e.ecx, "edx": e.edx}  # fmt: skip
        self._ioctl(ioctls.KVM_SET_CPUID2, cpuid)

    def get_mp_state(self) -> int:
        """See ``KVM_GET_MP_STATE``: ``KVM_MP_STATE_RUNNABLE``, ``_HALTED``, ``_UNINITIALIZED``..."""
        state = ffi.new("struct kvm_mp_state *")
        self._ioctl(ioctls.KVM_GET_MP_STATE, state)
        return int(state.mp_state)

    def set_mp_state(self, mp_state: int) -> None:
        """See ``KVM_SET_MP_STATE``."""
        self._ioctl(ioctls.KVM_SET_MP_STATE, ffi.new("struct kvm_mp_state *", [mp_state]))

    def _msrs(self, values: Mapping[int, int]) -> tuple[object, object]:
        header = ffi.sizeof("struct kvm_msrs")
        buf = ffi.new("char[]", header + len(values) * ffi.sizeof("struct kvm_msr_entry"))
        msrs = ffi.cast("struct kvm_msrs *", buf)
        msrs.nmsrs = len(values)
        array = ffi.cast("struct kvm_msr_entry *", buf + header)
        for i, (index, data) in enumerate(values.items()):
            array[i].index, array[i].data = index, data
        return buf, array

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        """See ``KVM_GET_MSRS``; raises if KVM could not read them all."""
        buf, array = self._msrs(dict.fromkeys(indices, 0))
        done = self._ioctl(ioctls.KVM_GET_MSRS, ffi.cast("struct kvm_msrs *", buf))
        return {int(array[i].index): int(array[i].data) for i in range(done)}

    def set_msrs(self, values: Mapping[int, int]) -> int:
        """See ``KVM_SET_MSRS``: returns how many (from the start) KVM accepted."""
        buf, _ = self._msrs(values)
        return self._ioctl(ioctls.KVM_SET_MSRS, ffi.cast("struct kvm_msrs *", buf))

    # --- running ---------------------------------------------------------------------
    def attach_fast_table(self, table: FastTable) -> None:
        """Let the C loop answer the exits ``table`` covers (shared by all vCPUs)."""
        self._table = table
        self._loop.table = table.cdata

    def request_stop(self) -> None:
        """Make :meth:`run` return :class:`StopRequested` (from any thread; then kick the vCPU's thread).

        The flag first, then ``immediate_exit``: the C loop clears ``immediate_exit``
        before it reads the flag, so the request is seen whatever the interleaving.
        """
        self._loop.stop = 1
        self.kvm_run.immediate_exit = 1

    def interrupt(self) -> None:
        """Make the current or next KVM_RUN return :class:`Interrupted` (then kick the thread)."""
        self.kvm_run.immediate_exit = 1

    def clear_stop(self) -> None:
        self._loop.stop = 0

    @property
    def stop_flag(self) -> object:
        """The C ``uint32_t *`` that :meth:`request_stop` sets (for C code that waits and must give up)."""
        return ffi.addressof(self._loop, "stop")

    def run(self) -> Exit:
        """Run until an exit Python must see; returns it decoded."""
        stop = lib.pykvm_loop_run(self._loop)
        if stop == _STOP_EXIT:
            return self._decode()
        if stop == _STOP_INTERRUPTED:
            return Interrupted()
        if stop == _STOP_REQUESTED:
            return StopRequested()
        if stop == _STOP_DEBUG_EXIT:
            return DebugPortExit(int(self._loop.debug_exit_value))
        check(stop, ioctls.KVM_RUN.name)
        raise AssertionError(f"pykvm_loop_run returned {stop}")

    def _decode(self) -> Exit:
        run = self.kvm_run
        reason = run.exit_reason
        if reason == _EXIT_IO:
            io = run.io
            size, count = io.size, io.count
            data = ffi.buffer(lib.pykvm_io_data(run), size * count)
            return IoExit(io.port, size, count, io.direction == _IO_OUT, data)
        if reason == _EXIT_MMIO:
            mmio = run.mmio
            size = mmio.len
            return MmioExit(mmio.phys_addr, size, bool(mmio.is_write), ffi.buffer(mmio.data, min(size, 8)))
        if reason == lib.KVM_EXIT_HLT:
            return HltExit(bool(run.if_flag))
        if reason == lib.KVM_EXIT_SHUTDOWN:
            return ShutdownExit()
        if reason == lib.KVM_EXIT_INTERNAL_ERROR:
            count = min(run.internal.ndata, 16)
            return InternalErrorExit(run.internal.suberror, tuple(run.internal.data[0:count]))
        if reason == lib.KVM_EXIT_FAIL_ENTRY:
            return FailEntryExit(run.fail_entry.hardware_entry_failure_reason, run.fail_entry.cpu)
        if reason == lib.KVM_EXIT_SYSTEM_EVENT:
            count = min(run.system_event.ndata, 16)
            return SystemEventExit(run.system_event.type, tuple(run.system_event.data[0:count]))
        if reason == lib.KVM_EXIT_UNKNOWN:
            return OtherExit(reason, run.hw.hardware_exit_reason)
        return OtherExit(reason)

    # --- statistics ------------------------------------------------------------------
    def exit_counts(self) -> dict[int, int]:
        """Exits seen by this vCPU's loop, by ``KVM_EXIT_*`` reason (zero counts left out)."""
        return {reason: int(n) for reason, n in enumerate(self._loop.exits) if n}

    @property
    def guest_ns(self) -> int:
        """Nanoseconds spent inside KVM_RUN."""
        return int(self._loop.guest_ns)

    @property
    def fast_ns(self) -> int:
        """Nanoseconds spent answering exits in the C fast path."""
        return int(self._loop.fast_ns)

    @property
    def fast_exits(self) -> int:
        return int(self._loop.fast_exits)
