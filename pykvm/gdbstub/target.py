"""The debug interface: what the gdb server needs of a machine, and nothing more.

A machine that wants to be debugged implements :class:`DebugTarget`; the server
(:mod:`pykvm.gdbstub.server`) talks to it and to nothing else of the machine.

The target is either **stopped** (every vCPU out of the guest: its registers and
memory can be read and written) or **running** (each vCPU doing what its last
:meth:`~DebugTarget.resume` action told it).  It starts stopped, before the guest's
first instruction, as ``Stop(first vCPU, StopReason.INTERRUPTED)``: the server
resumes it at once, or holds it there until gdb continues.  It stops again when
something happens to one vCPU (a breakpoint, a finished step, an interrupt request,
the end of the guest); it then stops *every* vCPU before it reports the event (gdb's
all-stop model), so nothing changes while gdb looks.

Concurrency: the server calls every method from its one thread, one call at a time.
Reading and writing registers and memory, and inserting or removing breakpoints,
happen only while the target is stopped.  A target that runs its vCPUs on threads
keeps the stop event under a lock or condition of its own.

Addresses are guest *virtual* (linear) addresses, translated through the page
tables of the vCPU named; in real mode that is the linear address ``segment * 16 +
offset``, as QEMU's gdb stub does.  Register values are unsigned integers.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping, Sequence
from typing import Protocol, Union

from ..errors import PykvmError

#: The register names a target reads and writes.  Values are the registers' full
#: architectural width whatever the mode (``rax`` is 64 bits in 32-bit mode too).
#: A target may leave out those it cannot read (gdb shows them as unavailable).
REGISTER_NAMES = (
    # general registers, instruction pointer and flags (struct kvm_regs)
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
    "rip", "rflags",
    # segment selectors, and the bases gdb shows (fs/gs and the swapgs MSR)
    "cs", "ss", "ds", "es", "fs", "gs",
    "fs_base", "gs_base", "kernel_gs_base",
    # control registers and EFER (cr8 is the task-priority register)
    "cr0", "cr2", "cr3", "cr4", "cr8", "efer",
    # x87: st0-st7 are the 80-bit stack registers counted from the top (ST(i)), then the
    # control word, status word, full tag word (2 bits per register), last instruction's
    # segment and offset, last operand's segment and offset, and opcode, as gdb names them
    "st0", "st1", "st2", "st3", "st4", "st5", "st6", "st7",
    "fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop",
    # SSE
    "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7",
    "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15",
    "mxcsr",
)  # fmt: skip


class DebugTargetError(PykvmError):
    """A debug request the target cannot carry out (gdb gets an error reply)."""


class UnmappedAddressError(DebugTargetError):
    """A guest virtual address has no mapping (or none that reaches guest RAM)."""

    def __init__(self, address: int) -> None:
        super().__init__(f"guest virtual address {address:#x} is not mapped")
        self.address = address


class UnsupportedError(DebugTargetError):
    """The target cannot do this: a breakpoint kind, length or count, a step, a register write."""


class CpuMode(enum.Enum):
    """The mode a vCPU runs in; it decides the register layout gdb is given."""

    REAL = "real mode"
    PROTECTED = "protected mode"
    LONG = "long mode"


class BreakpointKind(enum.IntEnum):
    """A breakpoint or watchpoint, numbered as gdb's ``Z`` packets number them."""

    SOFTWARE = 0
    HARDWARE = 1
    WRITE_WATCHPOINT = 2
    READ_WATCHPOINT = 3
    ACCESS_WATCHPOINT = 4


class Action(enum.Enum):
    """What a vCPU does when the target is resumed."""

    CONTINUE = "continue"
    STEP = "step"


class StopReason(enum.Enum):
    """Why a vCPU stopped."""

    #: Stopped at the debugger's request (an interrupt, or held before the first instruction).
    INTERRUPTED = "interrupted"
    #: About to execute a software breakpoint; its ``rip`` is the breakpoint's address.
    SOFTWARE_BREAKPOINT = "software breakpoint"
    #: About to execute an instruction at a hardware breakpoint's address.
    HARDWARE_BREAKPOINT = "hardware breakpoint"
    #: Just accessed memory a watchpoint of the matching kind covers.
    WRITE_WATCHPOINT = "write watchpoint"
    READ_WATCHPOINT = "read watchpoint"
    ACCESS_WATCHPOINT = "access watchpoint"
    #: Executed the one instruction it was asked to step.
    STEP = "step"


WATCHPOINT_REASONS = frozenset({StopReason.WRITE_WATCHPOINT, StopReason.READ_WATCHPOINT, StopReason.ACCESS_WATCHPOINT})


@dataclasses.dataclass(frozen=True)
class Stop:
    """Every vCPU is stopped because of what happened to ``vcpu``.

    ``address`` is the data address that triggered a watchpoint (and only then given).
    """

    vcpu: int
    reason: StopReason
    address: int | None = None

    def __post_init__(self) -> None:
        if (self.address is not None) != (self.reason in WATCHPOINT_REASONS):
            raise ValueError(f"a {self.reason.value} stop {'needs' if self.address is None else 'has no'} address")


@dataclasses.dataclass(frozen=True)
class Exited:
    """The guest ended by itself with ``status`` (0-255, the machine's exit status)."""

    status: int


@dataclasses.dataclass(frozen=True)
class Killed:
    """The guest was ended from outside (:meth:`DebugTarget.kill`, or its machine was stopped)."""


StopEvent = Union[Stop, Exited, Killed]


class DebugTarget(Protocol):
    """A machine as the gdb server sees it (see the module doc for states and threads)."""

    def vcpu_ids(self) -> Sequence[int]:
        """The vCPU ids, in order; fixed for the machine's life."""

    def cpu_mode(self, vcpu: int) -> CpuMode:
        """The mode ``vcpu`` is in now (stopped)."""

    def read_registers(self, vcpu: int) -> Mapping[str, int]:
        """``vcpu``'s registers by the names of :data:`REGISTER_NAMES` (those it can read)."""

    def write_registers(self, vcpu: int, values: Mapping[str, int]) -> None:
        """Set some of ``vcpu``'s registers; raises :class:`UnsupportedError` for one it cannot set."""

    def read_memory(self, vcpu: int, address: int, length: int) -> bytes:
        """``length`` bytes at a virtual address, as ``vcpu`` sees it.

        The guest's own bytes: a software breakpoint the target planted does not show.
        Raises :class:`UnmappedAddressError` naming the first address that is not mapped.
        """

    def write_memory(self, vcpu: int, address: int, data: bytes) -> None:
        """Write ``data`` at a virtual address, as ``vcpu`` sees it.

        Raises :class:`UnmappedAddressError` naming the first address that is not mapped
        (the bytes before it may have been written, as a faulting ``rep movsb`` leaves them).
        """

    def insert_breakpoint(self, kind: BreakpointKind, address: int, length: int) -> None:
        """Insert a breakpoint (``length`` 1) or a watchpoint over ``length`` bytes, on every vCPU.

        Inserting one that exists already is not an error.  Raises :class:`UnsupportedError`
        for a kind, length, alignment or number of breakpoints the target cannot give, and
        :class:`UnmappedAddressError` for a software breakpoint where nothing is mapped.
        """

    def remove_breakpoint(self, kind: BreakpointKind, address: int, length: int) -> None:
        """Remove a breakpoint inserted with the same arguments (no error if there is none)."""

    def resume(self, actions: Mapping[int, Action]) -> None:
        """Run: each vCPU named does its action, the others stay stopped (``vCont``'s rule).

        Returns once the target counts as running: :meth:`wait_stop` reports only a newer
        event.  Raises :class:`UnsupportedError` for an action the target cannot do (the
        target is then still stopped).  After the guest ended it does nothing.
        """

    def wait_stop(self, timeout: float) -> StopEvent | None:
        """Wait up to ``timeout`` seconds for the target to stop; return why, or None.

        While the target is stopped, returns at once the event that stopped it, again and
        again (after the guest ended: :class:`Exited` or :class:`Killed`, for ever).
        """

    def interrupt(self) -> None:
        """Stop every vCPU (gdb's Ctrl-C); :meth:`wait_stop` then reports a
        :data:`StopReason.INTERRUPTED` stop, or whichever event came first.

        Returns at once; does nothing while the target is stopped.
        """

    def detach(self) -> None:
        """Remove every breakpoint and watchpoint, and let the guest run on (all vCPUs continue)."""

    def kill(self) -> None:
        """End the guest; :meth:`wait_stop` reports :class:`Killed` from then on."""
