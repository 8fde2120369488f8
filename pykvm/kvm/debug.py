"""What ``KVM_SET_GUEST_DEBUG`` asks of KVM, as a plain record (no C).

:class:`GuestDebug` says whether to single-step, to take software breakpoints (int3)
and which hardware breakpoints to arm; :meth:`GuestDebug.debugreg` encodes the last
into the eight debug-register values KVM takes (DR0-DR3 the addresses, DR7 the enable,
kind and length bits, as the Intel SDM vol. 3, 18.2.4 lays them out).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ..errors import StateError

HARDWARE_BREAKPOINTS = 4  # DR0-DR3
DB_VECTOR, BP_VECTOR = 1, 3  # #DB (steps, debug registers) and #BP (int3)
DR6_BREAKPOINT_HIT = 0xF  # DR6 B0-B3: which of DR0-DR3 matched
DR6_SINGLE_STEP = 1 << 14  # DR6 BS
_DR7_EXACT = 0x600  # GE (exact data breakpoints) and bit 10, which always reads as 1
_DR7_LENGTH = {1: 0b00, 2: 0b01, 8: 0b10, 4: 0b11}
_ADDRESS_LIMIT = 1 << 64


class BreakpointKind(enum.IntEnum):
    """The access a hardware breakpoint matches: DR7's R/W field."""

    EXECUTE = 0b00
    WRITE = 0b01
    ACCESS = 0b11  # a read or a write


@dataclass(frozen=True)
class HardwareBreakpoint:
    """One debug register: ``length`` bytes at guest-virtual ``addr`` (aligned to ``length``)."""

    addr: int
    kind: BreakpointKind = BreakpointKind.EXECUTE
    length: int = 1

    def __post_init__(self) -> None:
        if self.length not in _DR7_LENGTH:
            raise StateError(f"a hardware breakpoint covers 1, 2, 4 or 8 bytes, not {self.length}")
        if self.kind is BreakpointKind.EXECUTE and self.length != 1:
            raise StateError("an execute breakpoint has length 1")
        if not 0 <= self.addr < _ADDRESS_LIMIT or self.addr % self.length:
            raise StateError(f"breakpoint address {self.addr:#x} is not a {self.length}-byte aligned 64-bit address")

    def dr7_bits(self, index: int) -> int:
        """This breakpoint's bits in DR7 when it sits in DR``index``: global enable, kind, length."""
        return 1 << (2 * index + 1) | self.kind << (16 + 4 * index) | _DR7_LENGTH[self.length] << (18 + 4 * index)


@dataclass(frozen=True)
class GuestDebug:
    """Guest debugging for one vCPU; ``enable=False`` turns it off (and the rest is ignored).

    ``block_irq`` keeps interrupts from being delivered while single-stepping, so that a step
    executes the next instruction rather than entering an interrupt handler
    (``KVM_GUESTDBG_BLOCKIRQ``, where ``Vm.set_guest_debug_flags()`` offers it).  ``inject``
    gives the guest a #DB (:data:`DB_VECTOR`) or #BP (:data:`BP_VECTOR`) it raised but the
    debugger does not own (``KVM_GUESTDBG_INJECT_DB`` / ``_INJECT_BP``), once.
    """

    enable: bool = True
    single_step: bool = False
    software_breakpoints: bool = False
    hardware_breakpoints: tuple[HardwareBreakpoint, ...] = ()
    block_irq: bool = False
    inject: int | None = None

    def __post_init__(self) -> None:
        if len(self.hardware_breakpoints) > HARDWARE_BREAKPOINTS:
            raise StateError(
                f"{len(self.hardware_breakpoints)} hardware breakpoints asked for; x86 has {HARDWARE_BREAKPOINTS}"
            )
        if self.inject not in (None, DB_VECTOR, BP_VECTOR):
            raise StateError(f"KVM_SET_GUEST_DEBUG injects #DB (1) or #BP (3), not vector {self.inject}")

    def dr7(self) -> int:
        """DR7 arming every hardware breakpoint (0 without any)."""
        bits = [bp.dr7_bits(i) for i, bp in enumerate(self.hardware_breakpoints)]
        return _DR7_EXACT | sum(bits) if bits else 0

    def debugreg(self) -> tuple[int, ...]:
        """The eight values of ``struct kvm_guest_debug_arch``: DR0-DR3, DR4-DR6 (0), DR7."""
        addresses = [bp.addr for bp in self.hardware_breakpoints]
        return (*addresses, *[0] * (7 - len(addresses)), self.dr7())
