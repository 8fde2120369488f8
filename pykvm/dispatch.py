"""What the machine does with each exit the C fast path hands back to Python.

Port I/O and MMIO go through a bus to exactly one device (one vCPU at a time:
device models are not required to be thread-safe).  Every other exit either ends
the run, with a reason and a diagnosis, or is ignored (an interrupted KVM_RUN).
A debugger attached as :attr:`ExitDispatcher.debug_handler` sees guest debug exits
and emulation failures first, and keeps those that are its own events (a breakpoint
it planted, a step it asked for).

The C run loop counts the accesses it returns to Python by address, for ``--stats``
(:func:`address_counts`): the first :data:`ADDRESSES_KEPT` addresses of each vCPU one
by one, the rest together (a guest scanning the address space cannot grow the table).
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Sequence

from .control import RunControl, Stop
from .devices.bus import Bus
from .kvm import Vcpu
from .kvm.exits import (
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
    SystemEventExit,
)
from .kvm.vcpu import AccessHandler
from .native import lib
from .result import ExitReason
from .x86.layout import PORT_NAMES

EXIT_NAMES = {
    getattr(lib, name): name[len("KVM_EXIT_") :].lower()
    for name in dir(lib)
    if name.startswith("KVM_EXIT_") and not name.startswith("KVM_EXIT_IO_")
}
ADDRESSES_KEPT = lib.PYKVM_ADDRESSES_KEPT
OTHER_ADDRESSES = "other addresses"
_SYSTEM_EVENT_SHUTDOWN = 1
_SYSTEM_EVENT_RESET = 2
_EMULATION_SUBERROR = 1
_EMULATION_FLAG_INSN_BYTES = 1
#: Looks at a guest debug exit or an emulation failure on its vCPU's thread; True if it
#: was the debugger's own event (then the run goes on under the debugger's control).
DebugExitHandler = Callable[[Vcpu, GuestDebugExit | InternalErrorExit, RunControl], bool]


class ExitDispatcher:
    """Routes exits to the buses and turns the others into stop requests of the run's ``control``.

    ``vcpus`` is how many vCPUs the machine runs: with more than one, device accesses take turns.
    """

    def __init__(self, pio: Bus, mmio: Bus, vcpus: int = 1) -> None:
        self.pio = pio
        self.mmio = mmio
        # Device models need not be thread-safe: the accesses of several vCPUs take turns.
        self._device_lock = threading.Lock()
        self.access: AccessHandler = self._access if vcpus == 1 else self._serialized_access
        self.debug_handler: DebugExitHandler | None = None

    def handle(self, vcpu: Vcpu, exit: Exit, control: RunControl) -> None:
        stop = control.request_stop
        match exit:
            case IoExit():
                self.access(False, exit.port, exit.size, exit.count, exit.is_write, exit.data, exit.value)
            case MmioExit():
                self.access(True, exit.addr, exit.size, 1, exit.is_write, exit.data, exit.value)
            case DebugPortExit(value=value):
                stop(Stop(ExitReason.DEBUG_EXIT, f"debug exit {value:#x}", value, vcpu_id=vcpu.id))
            case Interrupted():
                if control.stop is None:
                    control.report(vcpu)  # a halt probe (or a stray signal)
            case GuestDebugExit() | InternalErrorExit() if self.debug_handler and self.debug_handler(vcpu, exit, control):
                pass
            case HltExit(interrupts_enabled=enabled):
                why = "with interrupts enabled, but nothing can interrupt it" if enabled else "with interrupts disabled"
                stop(Stop(ExitReason.HALTED, f"the guest halted {why}", vcpu_id=vcpu.id))
            case ShutdownExit():
                stop(Stop(ExitReason.TRIPLE_FAULT, "triple fault: the guest shut down", with_registers=True, vcpu_id=vcpu.id))
            case InternalErrorExit():
                stop(Stop(ExitReason.INTERNAL_ERROR, describe_internal_error(exit), with_registers=True, vcpu_id=vcpu.id))
            case FailEntryExit(reason=reason, cpu=cpu):
                why = f"KVM could not enter the guest: hardware entry failure reason {reason:#x} on host CPU {cpu}"
                stop(Stop(ExitReason.FAIL_ENTRY, why, with_registers=True, vcpu_id=vcpu.id))
            case SystemEventExit(type=kind):
                stop(_system_event_stop(kind, vcpu.id))
            case GuestDebugExit(exception=vector, pc=pc):
                why = f"unhandled guest debug exit (exception {vector} at {pc:#x})"
                stop(Stop(ExitReason.UNHANDLED, why, with_registers=True, vcpu_id=vcpu.id))
            case OtherExit(reason=reason, hardware_reason=hardware):
                detail = f" (hardware reason {hardware:#x})" if hardware else ""
                why = f"unhandled exit {EXIT_NAMES.get(reason, str(reason))}{detail}"
                stop(Stop(ExitReason.UNHANDLED, why, with_registers=True, vcpu_id=vcpu.id))

    def _access(self, is_mmio: bool, addr: int, size: int, count: int, is_write: bool, data: Any, value: int) -> None:
        """A port-I/O or MMIO exit, to the device on its bus; a read's answer goes into ``data``.

        :attr:`access` (what :meth:`Vcpu.run` calls for each such exit) on a machine with one
        vCPU: it runs for every exit a device model answers, so it is kept short.
        """
        bus = self.mmio if is_mmio else self.pio
        if count > 1:  # string I/O: one access after the other
            self._string_access(bus, addr, size, count, is_write, data)
        elif is_write:
            bus.write(addr, size, value)
        else:
            data[:size] = bus.read(addr, size).to_bytes(size, "little")

    def _serialized_access(
        self, is_mmio: bool, addr: int, size: int, count: int, is_write: bool, data: Any, value: int
    ) -> None:
        """:meth:`_access`, one vCPU at a time."""
        with self._device_lock:
            self._access(is_mmio, addr, size, count, is_write, data, value)

    @staticmethod
    def _string_access(bus: Bus, addr: int, size: int, count: int, is_write: bool, data: Any) -> None:
        for i in range(0, size * count, size):
            if is_write:
                bus.write(addr, size, int.from_bytes(data[i : i + size], "little"))
            else:
                data[i : i + size] = bus.read(addr, size).to_bytes(size, "little")


def address_counts(vcpus: Sequence[Vcpu]) -> dict[str, int]:
    """The port-I/O and MMIO accesses Python answered, over ``vcpus``, by ``"<space> <address>
    <read|write>"`` (with the port's name where it has a well-known one), those beyond each
    vCPU's first :data:`ADDRESSES_KEPT` addresses under :data:`OTHER_ADDRESSES`."""
    counts: dict[str, int] = {}
    others = 0
    for vcpu in vcpus:
        by_address, other = vcpu.accesses_by_address()
        others += other
        for (is_mmio, addr, is_write), count in by_address.items():
            label = address_label("mmio" if is_mmio else "pio", addr, "write" if is_write else "read")
            counts[label] = counts.get(label, 0) + count
    if others:
        counts[f"({OTHER_ADDRESSES}, beyond the first {ADDRESSES_KEPT})"] = others
    return counts


def address_label(space: str, addr: int, kind: str) -> str:
    """``"pio 0x03fd read (COM1 LSR)"``: how ``--stats`` names an address."""
    name = PORT_NAMES.get(addr) if space == "pio" else None
    return f"{space} {addr:#06x} {kind}" + (f" ({name})" if name else "")


def _system_event_stop(kind: int, vcpu_id: int) -> Stop:
    if kind == _SYSTEM_EVENT_SHUTDOWN:
        return Stop(ExitReason.POWEROFF, "the guest powered off", vcpu_id=vcpu_id)
    if kind == _SYSTEM_EVENT_RESET:
        return Stop(ExitReason.RESET, "the guest reset the machine", vcpu_id=vcpu_id)
    return Stop(ExitReason.UNHANDLED, f"unhandled system event {kind}", with_registers=True, vcpu_id=vcpu_id)


def describe_internal_error(exit: InternalErrorExit) -> str:
    """KVM_EXIT_INTERNAL_ERROR in words; an emulation failure names the instruction bytes."""
    if exit.suberror != _EMULATION_SUBERROR:
        return f"KVM internal error (suberror {exit.suberror}, data {[hex(d) for d in exit.data]})"
    text = "emulation failure: KVM could not emulate the guest's instruction"
    if len(exit.data) >= 3 and exit.data[0] & _EMULATION_FLAG_INSN_BYTES:
        raw = (exit.data[1] | exit.data[2] << 64).to_bytes(16, "little")
        length = min(raw[0], 15)
        text += f" (bytes {raw[1 : 1 + length].hex(' ')})"
    return text
