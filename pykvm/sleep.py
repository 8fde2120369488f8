"""ACPI S3 for a machine: suspend to RAM, wait for a wake event, resume at the waking vector.

The guest writes SLP_TYP 1 (the DSDT's ``\\_S3_``) with SLP_EN to PM1a_CNT
(:mod:`pykvm.devices.acpi_pm`): the machine stops executing before the next instruction,
every vCPU held out of the guest while the run goes on (:meth:`pykvm.runner.Runner.suspend`,
:meth:`pykvm.control.RunControl.suspend`), and announces ``suspended``.  RAM and the devices
keep their state, the in-kernel interrupt controllers too.  It sleeps until a wake event:

- the RTC alarm, when the guest made it one: RTC_EN in PM1_EN and AIE in CMOS register B (as
  QEMU's PIIX4 and MC146818 want both); it comes when the RTC's time reaches the alarm
  registers (:meth:`pykvm.devices.cmos.Cmos.alarm_delay_ns`, taken when the sleep begins);
- :meth:`pykvm.machine.Machine.wake`, from any thread (QEMU's ``system_wakeup``).

The wake (:meth:`Sleep.wake`, every vCPU out of the guest) rings the alarm if it was the wake
event (AF and IRQF in register C, IRQ 8 raised), sets WAK_STS (and RTC_STS) in PM1_STS, and
resets every vCPU as SeaBIOS's resume path leaves them (:mod:`pykvm.x86.wake`): vCPU 0 in real
mode at the waking vector the guest wrote into the FACS, the others waiting for a SIPI.  The
machine announces ``woken`` (with the reason, ``rtc`` or ``host``, and the vector) and runs on.
A guest that left the waking vector 0 is rebooted by SeaBIOS; pykvm, which has no firmware to
reboot into, ends the run as a reset.

A sleeping machine takes no CPU: its vCPU threads wait on a condition, vCPU 0's until the alarm
at most.  It sleeps across runs (a run that ends by a timeout or a stop leaves it asleep, and the
next run starts asleep) and across snapshots (the PM device's state says it sleeps); the alarm
is then looked for again from the time the next run starts.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Sequence

from .control import Stop
from .native import lib
from .result import ExitReason
from .x86.acpi import FACS_WAKING_VECTOR_OFFSET
from .x86.wake import RESET_DEBUGREGS, reset_lapic, waking_regs, waking_sregs

if TYPE_CHECKING:
    from .devices.acpi_pm import AcpiPm
    from .devices.cmos import Cmos
    from .events import Events
    from .kvm import Vcpu
    from .memory import GuestMemory

log = logging.getLogger(__name__)

NS_PER_SECOND = 1_000_000_000


class Sleep:
    """The S3 state of a machine with ACPI: its PM device, its RTC, its vCPUs, and the FACS at ``facs``."""

    def __init__(
        self, pm: AcpiPm, cmos: Cmos, vcpus: Sequence[Vcpu], memory: GuestMemory, facs: int, events: Events
    ) -> None:
        self._pm = pm
        self._cmos = cmos
        self._vcpus = list(vcpus)
        self._memory = memory
        self._facs = facs
        self._events = events

    @property
    def asleep(self) -> bool:
        """Whether the machine is in S3."""
        return self._pm.sleeping

    def alarm(self) -> float | None:
        """Seconds until the RTC alarm wakes the machine; None if it is not a wake event."""
        if not self._pm.rtc_wake_enabled:
            return None
        delay = self._cmos.alarm_delay_ns()
        return None if delay is None else delay / NS_PER_SECOND

    def wake(self, by_alarm: bool) -> Stop | None:
        """Leave S3, woken by the RTC alarm or (not ``by_alarm``) the host, no vCPU running (see
        the module docstring); a stop if the run must end instead."""
        vector = self._memory.read_u32(self._facs + FACS_WAKING_VECTOR_OFFSET)
        if by_alarm:
            self._cmos.ring_alarm()
        self._pm.wake(rtc_alarm=by_alarm)
        reason = "rtc" if by_alarm else "host"
        log.info("ACPI S3: woken by the %s; the waking vector is %#x", reason, vector)
        self._events.emit("woken", reason=reason, vector=vector)
        if not vector:
            return Stop(ExitReason.RESET, "woken from S3 with no waking vector in the FACS: the machine resets")
        for vcpu in self._vcpus:
            _wake_vcpu(vcpu, vector, bsp=vcpu is self._vcpus[0])
        return None


def _wake_vcpu(vcpu: Vcpu, vector: int, bsp: bool) -> None:
    """Reset ``vcpu`` for the waking vector: the BSP runs from it, another waits for a SIPI."""
    vcpu.complete_pending_exit()  # the S3 write's own, which would otherwise land on the new state
    vcpu.set_mp_state(lib.KVM_MP_STATE_RUNNABLE if bsp else lib.KVM_MP_STATE_INIT_RECEIVED)
    vcpu.set_regs(waking_regs(vector))
    vcpu.set_sregs(waking_sregs(vector, bsp))  # before the LAPIC: it sets the APIC base
    vcpu.set_debugregs(RESET_DEBUGREGS)
    if vcpu.in_kernel_lapic:
        vcpu.set_lapic(reset_lapic(vcpu.get_lapic(), vcpu.id, bsp))
