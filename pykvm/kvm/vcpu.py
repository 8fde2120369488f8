"""A KVM vCPU file descriptor with its mmap'd ``kvm_run`` area and its C run loop."""

from __future__ import annotations

import errno
import mmap
import os
import struct
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from ..errors import StateError
from ..native import check, ffi, lib
from . import ioctls
from .convert import check_present, check_size, fill_struct, new_struct, to_record
from .exits import (
    DebugPortExit,
    Exit,
    FailEntryExit,
    GuestDebugExit,
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
from .fam import CPUID2, MSRS
from .fastpath import FastTable
from .state import CpuidEntry, Regs, SRegs, Translation, VcpuState

if TYPE_CHECKING:
    from .debug import GuestDebug  # imported where it is used: running a guest needs no debugging records

_EXIT_IO, _EXIT_MMIO = lib.KVM_EXIT_IO, lib.KVM_EXIT_MMIO
_loop_run = lib.pykvm_loop_run
# answer(is_mmio, address, size, count, is_write, data, value): see Vcpu.run.
AccessHandler = Callable[[bool, int, int, int, bool, Any, int], None]
# struct pykvm_exit: reason, is_write, address, size, count, value, data_offset (_native.c checks the layout).
_EXIT_RECORD = struct.Struct("=IIQIIQQ")
_STOP_EXIT, _STOP_INTERRUPTED = lib.PYKVM_STOP_EXIT, lib.PYKVM_STOP_INTERRUPTED
_STOP_REQUESTED, _STOP_DEBUG_EXIT = lib.PYKVM_STOP_REQUESTED, lib.PYKVM_STOP_DEBUG_EXIT
# KVM_GET_MSRS and KVM_SET_MSRS take fewer than 256 MSRs per call (MAX_IO_MSRS), else E2BIG.
MSRS_PER_IOCTL = 255
# Restored after every other MSR: writing it makes KVM compare it with IA32_TSC to arm the
# LAPIC timer, so the TSC must already hold its saved value (Firecracker's DEFERRED_MSRS).
MSR_IA32_TSC_DEADLINE = 0x6E0
# KVM_GET_CPUID2 fails with E2BIG when the array is too small; KVM allows 256 entries.
_CPUID_ENTRIES_START, _CPUID_ENTRIES_MAX = 64, 256


class Vcpu:
    """A vCPU created by :meth:`Vm.create_vcpu`.

    :meth:`run` enters the guest through the C loop (``pykvm_loop_run``) and returns
    the first exit that needs Python, decoded.  :meth:`save_state` and
    :meth:`restore_state` carry everything KVM holds for the vCPU.

    ``xsave_size`` is the size of its XSAVE area: from ``KVM_CAP_XSAVE2`` where KVM offers it
    (then read with ``KVM_GET_XSAVE2``), else ``struct kvm_xsave``'s.  ``in_kernel_lapic``
    says whether the VM made an in-kernel irqchip, which gives each vCPU a LAPIC.
    """

    def __init__(
        self, fd: int, vcpu_id: int, mmap_size: int, *, xsave_size: int = 0, in_kernel_lapic: bool = False
    ) -> None:
        self.fd = fd
        self.id = vcpu_id
        self.xsave_size = max(xsave_size, ffi.sizeof("struct kvm_xsave"))
        self._xsave2 = xsave_size > 0
        self.in_kernel_lapic = in_kernel_lapic
        self._cpuid: tuple[CpuidEntry, ...] = ()  # the leaves last given (KVM_SET_CPUID2)
        self._mmap = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._run_buffer = ffi.from_buffer(self._mmap)
        self.kvm_run = ffi.cast("struct kvm_run *", self._run_buffer)
        self._loop = ffi.new("struct pykvm_loop *")
        self._loop.vcpu_fd = fd
        self._loop.run = self.kvm_run
        # The exit record the C loop fills, and views of kvm_run from where an exit's data lies
        # (KVM uses one offset for port I/O and one for MMIO; cached, as every exit needs one).
        self._exit_record = ffi.buffer(ffi.addressof(self._loop, "exit"))
        self._run_bytes = memoryview(ffi.buffer(self.kvm_run, mmap_size))
        self._data_views: dict[int, memoryview] = {}
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

    def _ioctl(self, request: ioctls.Ioctl, arg: object, detail: str = "") -> int:
        return ioctls.ioctl(self.fd, request, arg, detail)

    def _get_blob(self, request: ioctls.Ioctl, size: int) -> bytes:
        buffer = ffi.new("char[]", size)
        self._ioctl(request, buffer)
        return bytes(ffi.buffer(buffer))

    def _set_blob(self, request: ioctls.Ioctl, data: bytes, size: int) -> None:
        check_size(request.name, data, size)
        self._ioctl(request, ffi.from_buffer(data))

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

    def set_cpuid2(self, entries: Sequence[CpuidEntry]) -> None:
        """See ``KVM_SET_CPUID2``."""
        self._ioctl(ioctls.KVM_SET_CPUID2, CPUID2.build(entries, fill_struct))
        self._cpuid = tuple(entries)

    def get_cpuid2(self) -> list[CpuidEntry]:
        """See ``KVM_GET_CPUID2``: the CPUID leaves this vCPU was given."""
        cpuid, ret = CPUID2.sized_to_fit(
            lambda cdata: lib.pykvm_ioctl(self.fd, ioctls.KVM_GET_CPUID2.number, cdata),
            _CPUID_ENTRIES_START,
            _CPUID_ENTRIES_MAX,
        )
        check(ret, ioctls.KVM_GET_CPUID2.name)
        return [to_record(CpuidEntry, entry) for entry in CPUID2.entries(cpuid)]

    # --- the rest of the CPU: FPU/XSAVE, XCRs, debug registers, LAPIC, events, MP state, MSRs
    def get_fpu(self) -> bytes:
        """See ``KVM_GET_FPU``: x87 and SSE state (``struct kvm_fpu``), a subset of :meth:`get_xsave`'s."""
        return self._get_blob(ioctls.KVM_GET_FPU, ffi.sizeof("struct kvm_fpu"))

    def set_fpu(self, fpu: bytes) -> None:
        """See ``KVM_SET_FPU``; ``fpu`` as :meth:`get_fpu` gave it."""
        self._set_blob(ioctls.KVM_SET_FPU, fpu, ffi.sizeof("struct kvm_fpu"))

    def get_xsave(self) -> bytes:
        """See ``KVM_GET_XSAVE2`` (``KVM_GET_XSAVE`` where KVM lacks it): FPU, SSE, AVX... in XSAVE layout."""
        return self._get_blob(ioctls.KVM_GET_XSAVE2 if self._xsave2 else ioctls.KVM_GET_XSAVE, self.xsave_size)

    def set_xsave(self, xsave: bytes) -> None:
        """See ``KVM_SET_XSAVE`` (which reads :attr:`xsave_size` bytes); ``xsave`` as :meth:`get_xsave` gave it."""
        self._set_blob(ioctls.KVM_SET_XSAVE, xsave, self.xsave_size)

    def get_xcrs(self) -> bytes:
        """See ``KVM_GET_XCRS``: the extended control registers (XCR0) as ``struct kvm_xcrs``."""
        return self._get_blob(ioctls.KVM_GET_XCRS, ffi.sizeof("struct kvm_xcrs"))

    def set_xcrs(self, xcrs: bytes) -> None:
        """See ``KVM_SET_XCRS``."""
        self._set_blob(ioctls.KVM_SET_XCRS, xcrs, ffi.sizeof("struct kvm_xcrs"))

    def get_debugregs(self) -> bytes:
        """See ``KVM_GET_DEBUGREGS``: the guest's DR0-DR3, DR6 and DR7 as ``struct kvm_debugregs``."""
        return self._get_blob(ioctls.KVM_GET_DEBUGREGS, ffi.sizeof("struct kvm_debugregs"))

    def set_debugregs(self, debugregs: bytes) -> None:
        """See ``KVM_SET_DEBUGREGS``."""
        self._set_blob(ioctls.KVM_SET_DEBUGREGS, debugregs, ffi.sizeof("struct kvm_debugregs"))

    def get_lapic(self) -> bytes:
        """See ``KVM_GET_LAPIC``: the in-kernel local APIC's register page (needs the irqchip)."""
        return self._get_blob(ioctls.KVM_GET_LAPIC, ffi.sizeof("struct kvm_lapic_state"))

    def set_lapic(self, lapic: bytes) -> None:
        """See ``KVM_SET_LAPIC``."""
        self._set_blob(ioctls.KVM_SET_LAPIC, lapic, ffi.sizeof("struct kvm_lapic_state"))

    def get_vcpu_events(self) -> bytes:
        """See ``KVM_GET_VCPU_EVENTS``: pending or injected exceptions, interrupts, NMIs, SMIs."""
        return self._get_blob(ioctls.KVM_GET_VCPU_EVENTS, ffi.sizeof("struct kvm_vcpu_events"))

    def set_vcpu_events(self, events: bytes) -> None:
        """See ``KVM_SET_VCPU_EVENTS``."""
        self._set_blob(ioctls.KVM_SET_VCPU_EVENTS, events, ffi.sizeof("struct kvm_vcpu_events"))

    def get_mp_state(self) -> int:
        """See ``KVM_GET_MP_STATE``: ``KVM_MP_STATE_RUNNABLE``, ``_HALTED``, ``_UNINITIALIZED``..."""
        state = ffi.new("struct kvm_mp_state *")
        self._ioctl(ioctls.KVM_GET_MP_STATE, state)
        return int(state.mp_state)

    def set_mp_state(self, mp_state: int) -> None:
        """See ``KVM_SET_MP_STATE``."""
        self._ioctl(ioctls.KVM_SET_MP_STATE, ffi.new("struct kvm_mp_state *", [mp_state]))

    def get_msrs(self, indices: Sequence[int]) -> dict[int, int]:
        """See ``KVM_GET_MSRS``: the values KVM read, in order; it stops at the first MSR it cannot read."""
        msrs = MSRS.build(indices, _set_msr_index)
        done = self._ioctl(ioctls.KVM_GET_MSRS, msrs)
        return {int(entry.index): int(entry.data) for entry in MSRS.entries(msrs)[:done]}

    def set_msrs(self, values: Mapping[int, int]) -> int:
        """See ``KVM_SET_MSRS``: returns how many (from the start) KVM accepted."""
        return self._ioctl(ioctls.KVM_SET_MSRS, MSRS.build(values.items(), _set_msr_entry))

    def readable_msrs(self, indices: Sequence[int]) -> list[int]:
        """The MSRs of ``indices`` that ``KVM_GET_MSRS`` can read on this vCPU, in order.

        ``KVM_GET_MSR_INDEX_LIST`` may name MSRs a vCPU cannot read (PMU MSRs when its CPUID
        has no PMU, for one); each one stops KVM_GET_MSRS, so it is found and left out.
        """
        readable: list[int] = []
        rest = list(indices)
        while rest:
            chunk = rest[:MSRS_PER_IOCTL]
            done = len(self.get_msrs(chunk))
            readable += chunk[:done]
            skip = 1 if done < len(chunk) else 0  # the MSR KVM could not read
            rest = rest[done + skip :]
        return readable

    # --- debugging --------------------------------------------------------------------
    def set_guest_debug(self, debug: GuestDebug) -> None:
        """See ``KVM_SET_GUEST_DEBUG``: single-step, software and hardware breakpoints, and
        re-injecting a guest's own #DB or #BP.

        Each event then ends :meth:`run` with a :class:`GuestDebugExit`;
        ``GuestDebug(enable=False)`` turns debugging off again.
        """
        from .debug import BP_VECTOR, DB_VECTOR

        inject = {DB_VECTOR: lib.KVM_GUESTDBG_INJECT_DB, BP_VECTOR: lib.KVM_GUESTDBG_INJECT_BP}
        request = ffi.new("struct kvm_guest_debug *")
        if debug.enable:
            request.control = (
                lib.KVM_GUESTDBG_ENABLE
                | (lib.KVM_GUESTDBG_SINGLESTEP if debug.single_step else 0)
                | (lib.KVM_GUESTDBG_USE_SW_BP if debug.software_breakpoints else 0)
                | (lib.KVM_GUESTDBG_USE_HW_BP if debug.hardware_breakpoints else 0)
                | (lib.KVM_GUESTDBG_BLOCKIRQ if debug.block_irq else 0)
                | (inject[debug.inject] if debug.inject is not None else 0)
            )
            request.arch.debugreg = list(debug.debugreg())
        self._ioctl(ioctls.KVM_SET_GUEST_DEBUG, request)

    def translate(self, gva: int) -> Translation:
        """See ``KVM_TRANSLATE``: where the vCPU's current page tables map guest-virtual ``gva``."""
        if not 0 <= gva < 1 << 64:
            raise StateError(f"{gva:#x} is not a 64-bit guest-virtual address")
        request = ffi.new("struct kvm_translation *")
        request.linear_address = gva
        self._ioctl(ioctls.KVM_TRANSLATE, request, f"address {gva:#x}")
        return to_record(Translation, request)

    # --- the whole state --------------------------------------------------------------
    def complete_pending_exit(self) -> None:
        """Let KVM finish the instruction of the last exit, without running the guest further.

        After a port-I/O, MMIO or MSR exit the instruction completes only at the next KVM_RUN
        (an IN's data goes into RAX then), and that pending part is in no state KVM gives out.
        KVM_RUN with ``immediate_exit`` set completes it and returns EINTR before entering the
        guest, as the KVM API documentation prescribes before saving state.
        """
        self.kvm_run.immediate_exit = 1
        try:
            ret = lib.pykvm_ioctl_value(self.fd, ioctls.KVM_RUN.number, 0)
        finally:
            self.kvm_run.immediate_exit = 0
        if ret != -errno.EINTR:
            check(ret, ioctls.KVM_RUN.name)
            raise StateError(f"finishing vCPU {self.id}'s last exit made another exit: handle it before saving")

    def save_state(self, msr_indices: Sequence[int]) -> VcpuState:
        """Everything KVM holds for this vCPU; the vCPU (and, for the events, every vCPU of the VM)
        must be out of :meth:`run`, its last exit answered.

        The last exit's instruction is completed first (:meth:`complete_pending_exit`).
        ``msr_indices`` are the MSRs to keep, usually :meth:`readable_msrs` of
        ``Kvm.msr_index_list()``, found once per VM.  The order is Firecracker's: the MP state
        first, because reading it lets the LAPIC deliver a pending INIT or SIPI to the vCPU,
        which changes the rest; the events last, as the other reads may change what is pending.
        """
        self.complete_pending_exit()
        mp_state = self.get_mp_state()
        regs, sregs = self.get_regs(), self.get_sregs()
        xsave, xcrs, debugregs = self.get_xsave(), self.get_xcrs(), self.get_debugregs()
        lapic = self.get_lapic() if self.in_kernel_lapic else None
        cpuid = self.get_cpuid2()
        msrs = self._save_msrs(msr_indices)
        return VcpuState(mp_state, regs, sregs, xsave, xcrs, debugregs, lapic, cpuid, msrs, self.get_vcpu_events())

    def restore_state(self, state: VcpuState) -> None:
        """Make this vCPU (new, or stopped) what :meth:`save_state` saw; every size is checked first.

        The order is Firecracker's, for its reasons: CPUID first (KVM checks other state
        against it); the MP state; SET_SREGS before SET_LAPIC (it restores the APIC base);
        SET_LAPIC before SET_MSRS (the TSC deadline needs the LAPIC set up), with the TSC
        deadline after the TSC; SET_VCPU_EVENTS last, because SET_REGS clears pending
        exceptions and the events bring them back.  An exit this vCPU had not completed is
        completed first, so that it cannot land on the restored state.
        """
        self._check_state(state)
        self.complete_pending_exit()
        if tuple(state.cpuid) != self._cpuid:  # a reset gives the CPUID the vCPU has already
            self.set_cpuid2(state.cpuid)
        self.set_mp_state(state.mp_state)
        self.set_regs(state.regs)
        self.set_sregs(state.sregs)
        self.set_xsave(state.xsave)
        self.set_xcrs(state.xcrs)
        self.set_debugregs(state.debugregs)
        if state.lapic is not None:
            self.set_lapic(state.lapic)
        self._restore_msrs(state.msrs)
        self.set_vcpu_events(state.vcpu_events)

    def _check_state(self, state: VcpuState) -> None:
        check_present("LAPIC", state.lapic, self.in_kernel_lapic)
        sizes = {
            "xsave": self.xsave_size,
            "xcrs": ffi.sizeof("struct kvm_xcrs"),
            "debugregs": ffi.sizeof("struct kvm_debugregs"),
            "lapic": ffi.sizeof("struct kvm_lapic_state"),
            "vcpu_events": ffi.sizeof("struct kvm_vcpu_events"),
        }
        for name, size in sizes.items():
            blob = getattr(state, name)
            if blob is not None:
                check_size(f"vCPU state {name}", blob, size)

    def _save_msrs(self, indices: Sequence[int]) -> dict[int, int]:
        values: dict[int, int] = {}
        for start in range(0, len(indices), MSRS_PER_IOCTL):
            chunk = indices[start : start + MSRS_PER_IOCTL]
            read = self.get_msrs(chunk)
            if len(read) < len(chunk):
                raise StateError(
                    f"KVM_GET_MSRS cannot read MSR {chunk[len(read)]:#x} on vCPU {self.id} "
                    "(save only the readable_msrs())"
                )
            values.update(read)
        return values

    def _restore_msrs(self, values: Mapping[int, int]) -> None:
        items = [(index, value) for index, value in values.items() if index != MSR_IA32_TSC_DEADLINE]
        chunks = [dict(items[i : i + MSRS_PER_IOCTL]) for i in range(0, len(items), MSRS_PER_IOCTL)]
        if MSR_IA32_TSC_DEADLINE in values:
            chunks.append({MSR_IA32_TSC_DEADLINE: values[MSR_IA32_TSC_DEADLINE]})
        for chunk in chunks:
            accepted = self.set_msrs(chunk)
            if accepted < len(chunk):
                refused = list(chunk)[accepted]
                raise StateError(f"KVM_SET_MSRS refused MSR {refused:#x} of the saved state on vCPU {self.id}")

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

    def run(self, answer: AccessHandler | None = None) -> Exit:
        """Run until an exit Python must see; returns it decoded.

        With ``answer``, port-I/O and MMIO exits are not returned: each is passed to
        ``answer(is_mmio, address, size, count, is_write, data, value)`` (the fields of
        :class:`IoExit`, but ``data`` is ``kvm_run``'s data area from the first access on:
        the accesses are its first ``size * count`` bytes), which answers a read in ``data``,
        and the vCPU runs on; the first other exit is returned.  Those two kinds are read from
        the C loop's record in one unpack, the rarer ones from ``kvm_run`` (:meth:`_decode`).
        """
        loop, record, views = self._loop, self._exit_record, self._data_views
        while True:
            stop = _loop_run(loop)
            if stop != _STOP_EXIT:
                return self._stopped(stop)
            reason, is_write, address, size, count, value, offset = _EXIT_RECORD.unpack_from(record)
            if reason != _EXIT_IO and reason != _EXIT_MMIO:
                return self._decode(reason)
            data = views.get(offset)
            if data is None:
                data = views[offset] = self._run_bytes[offset:]
            if answer is not None:
                answer(reason == _EXIT_MMIO, address, size, count, is_write != 0, data, value)
            elif reason == _EXIT_IO:
                return IoExit(address, size, count, is_write != 0, data[: size * count], value)
            else:
                return MmioExit(address, size, is_write != 0, data[:size], value)

    def _stopped(self, stop: int) -> Exit:
        if stop == _STOP_INTERRUPTED:
            return Interrupted()
        if stop == _STOP_REQUESTED:
            return StopRequested()
        if stop == _STOP_DEBUG_EXIT:
            return DebugPortExit(int(self._loop.debug_exit_value))
        check(stop, ioctls.KVM_RUN.name)
        raise AssertionError(f"pykvm_loop_run returned {stop}")

    def _decode(self, reason: int) -> Exit:
        """An exit other than port I/O or MMIO, from ``kvm_run``."""
        run = self.kvm_run
        if reason == lib.KVM_EXIT_HLT:
            return HltExit(bool(run.if_flag))
        if reason == lib.KVM_EXIT_SHUTDOWN:
            return ShutdownExit()
        if reason == lib.KVM_EXIT_INTERNAL_ERROR:
            count = min(run.internal.ndata, 16)
            return InternalErrorExit(run.internal.suberror, tuple(run.internal.data[0:count]))
        if reason == lib.KVM_EXIT_FAIL_ENTRY:
            return FailEntryExit(run.fail_entry.hardware_entry_failure_reason, run.fail_entry.cpu)
        if reason == lib.KVM_EXIT_DEBUG:
            debug = run.debug.arch
            return GuestDebugExit(debug.exception, debug.pc, debug.dr6, debug.dr7)
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

    def accesses_by_address(self) -> tuple[dict[tuple[bool, int, bool], int], int]:
        """The port-I/O and MMIO exits this vCPU returned to Python, by ``(is_mmio, address,
        is_write)`` for the first ``PYKVM_ADDRESSES_KEPT`` addresses, and how many went to others."""
        loop, counts = self._loop, {}
        for entry in loop.addresses[0 : loop.addresses_kept]:
            key = int(entry.key)
            counts[(bool(key & 2), key >> 2, bool(key & 1))] = int(entry.count)
        return counts, int(loop.other_addresses)

    @property
    def python_ns(self) -> int:
        """Nanoseconds from each exit returned to Python until the next :meth:`run`: decoding and
        answering it (the time a stopped or paused vCPU waits is not counted)."""
        return int(self._loop.python_ns)

    @property
    def fast_exits(self) -> int:
        return int(self._loop.fast_exits)

    @property
    def exit_count(self) -> int:
        """Exits KVM_RUN returned since this vCPU was created, those the C fast path answered
        included; a KVM_RUN that a signal or ``immediate_exit`` interrupted is not one.

        A single vCPU's exits follow its program order, so the count names a point of its
        execution (what :mod:`pykvm.replay` stamps host inputs with).
        """
        return int(self._loop.exit_count)

    def send_exits_to_python_from(self, count: int | None) -> None:
        """From exit number ``count`` on (see :attr:`exit_count`), :meth:`run` returns every exit,
        even one a fast handler would answer; ``None`` lets the fast path answer what it covers.

        A replay uses it to see the guest at an exact exit.
        """
        if count is not None and not 0 < count < 1 << 64:
            raise StateError(f"exit number {count} is not a positive 64-bit count")
        self._loop.python_from = count or 0


def _set_msr_index(entry: Any, index: int) -> None:
    entry.index = index


def _set_msr_entry(entry: Any, item: tuple[int, int]) -> None:
    entry.index, entry.data = item
