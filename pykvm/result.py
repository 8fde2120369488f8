"""How a run ended: the reason, the process status it maps to, and what was measured."""

from __future__ import annotations

import enum
import signal
from dataclasses import dataclass, field

from .devices.debug_exit import exit_status
from .kvm.state import Regs, SRegs


class ExitReason(str, enum.Enum):
    """Why the guest stopped.  :data:`STATUS` maps each to the process status pykvm exits with."""

    HALTED = "halted"  # HLT with nothing left to wake the vCPU
    POWEROFF = "poweroff"  # the guest asked KVM for a shutdown system event
    RESET = "reset"  # i8042 reset or a KVM reset system event
    DEBUG_EXIT = "debug-exit"  # a write to the debug-exit port: status (v << 1) | 1
    TRIPLE_FAULT = "triple-fault"  # KVM_EXIT_SHUTDOWN
    INTERNAL_ERROR = "emulation-failure"  # KVM_EXIT_INTERNAL_ERROR
    FAIL_ENTRY = "entry-failure"  # KVM_EXIT_FAIL_ENTRY
    UNHANDLED = "unhandled-exit"  # an exit reason pykvm does not handle
    TIMEOUT = "timeout"  # run(timeout=...) expired
    STOPPED = "stopped"  # Machine.stop(): the user or a signal ended the run
    SNAPSHOTTED = "snapshotted"  # saved to a snapshot, then stopped (``pykvm ctl PATH snapshot DIR --stop``)
    DIVERGED = "replay-divergence"  # a replayed run left its log (pykvm.replay): what and where is said
    MIGRATED = "migrated"  # Machine.migrate(): the guest runs on in another process


# Process statuses.  Debug-exit statuses are always odd, so every other status is even.
STATUS = {
    ExitReason.HALTED: 0,
    ExitReason.POWEROFF: 0,
    ExitReason.RESET: 0,
    ExitReason.SNAPSHOTTED: 0,
    ExitReason.MIGRATED: 0,
    ExitReason.UNHANDLED: 112,
    ExitReason.TRIPLE_FAULT: 114,
    ExitReason.INTERNAL_ERROR: 116,
    ExitReason.FAIL_ENTRY: 118,
    ExitReason.DIVERGED: 120,
    ExitReason.TIMEOUT: 124,
}
ERROR_STATUS = 2  # pykvm could not start the guest: bad image, options, no /dev/kvm
INTERRUPTED_STATUS = 130  # the user pressed Ctrl-C (128 + SIGINT)


def status_of(reason: ExitReason, exit_value: int | None = None) -> int:
    """The process status of a run that ended for ``reason``.

    A stopped run's ``exit_value`` is the signal that stopped it: 128 + its number, as a shell
    reports a process a signal ended (130 when no signal is named, as for Ctrl-C).
    """
    if reason is ExitReason.DEBUG_EXIT:
        return exit_status(exit_value or 0)
    if reason is ExitReason.STOPPED:
        return 128 + (exit_value or signal.SIGINT)
    return STATUS[reason]


@dataclass
class RunStats:
    """Exits by reason and by address, and where the time went."""

    exits_by_reason: dict[str, int] = field(default_factory=dict)
    exits_by_address: dict[str, int] = field(default_factory=dict)
    wall_ns: int = 0
    guest_ns: int = 0  # summed over the vCPUs (it exceeds wall time when several run at once)
    fast_handler_ns: int = 0
    python_handler_ns: int = 0
    guest_ns_by_vcpu: dict[int, int] = field(default_factory=dict)

    def format(self) -> str:
        """A short table for humans (``pykvm run --stats``)."""
        total = sum(self.exits_by_reason.values())
        in_guest = f"in guest {self.guest_ns / 1e9:.3f} s"
        if len(self.guest_ns_by_vcpu) > 1:
            each = ", ".join(f"vCPU {i} {ns / 1e9:.3f} s" for i, ns in sorted(self.guest_ns_by_vcpu.items()))
            in_guest = f"in guest {self.guest_ns / 1e9:.3f} s of vCPU time ({each})"
        lines = [
            f"exits: {total} in {self.wall_ns / 1e9:.3f} s wall; {in_guest}, "
            f"in C handlers {self.fast_handler_ns / 1e9:.3f} s, in Python handlers {self.python_handler_ns / 1e9:.3f} s"
        ]
        lines += [f"  {name:<36} {count:>10}" for name, count in sorted(self.exits_by_reason.items())]
        if self.exits_by_address:
            lines.append("by port / address:")
            lines += [f"  {name:<36} {count:>10}" for name, count in sorted(self.exits_by_address.items())]
        return "\n".join(lines)


@dataclass
class RunResult:
    """The outcome of :meth:`Machine.run`."""

    reason: ExitReason
    status: int
    diagnosis: str
    exit_value: int | None = None
    serial: bytes = b""  # what the guest sent to its serial port during the run (with capture_serial)
    regs: Regs | None = None
    sregs: SRegs | None = None
    stats: RunStats = field(default_factory=RunStats)


@dataclass(frozen=True)
class VcpuStatus:
    """Where one vCPU is: its instruction pointer, mode and privilege level."""

    id: int
    rip: int
    mode: str  # "real", "protected" or "long"
    cpl: int


@dataclass(frozen=True)
class MachineStatus:
    """What :meth:`Machine.status` reports (``pykvm ctl PATH info`` shows it)."""

    state: str  # "created" (never run), "running", "paused" or "stopped" (between runs)
    uptime: float  # seconds since the first run started (0 before it)
    exits_by_reason: dict[str, int]
    vcpus: tuple[VcpuStatus, ...]


def format_registers(regs: Regs, sregs: SRegs) -> str:
    """A register dump, as a few lines of ``name=value``."""
    names = list(vars(regs))
    rows = [
        "  " + " ".join(f"{name}={getattr(regs, name):016x}" for name in names[i : i + 4])
        for i in range(0, len(names), 4)
    ]
    rows.append(
        f"  cs={sregs.cs.selector:04x} (base {sregs.cs.base:#x}, dpl {sregs.cs.dpl}, l {sregs.cs.l}) "
        f"ss={sregs.ss.selector:04x} cr0={sregs.cr0:08x} cr2={sregs.cr2:x} cr3={sregs.cr3:x} "
        f"cr4={sregs.cr4:x} efer={sregs.efer:x}"
    )
    return "\n".join(rows)
