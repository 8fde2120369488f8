"""The ACPI fixed-hardware registers the FADT points at: PM1a event and control, PM timer.

Registered over ``ACPI_PM_SIZE`` (12) ports from ``ACPI_PM_BASE`` (0x600, QEMU's
PIIX4 PM base), with the layout :mod:`pykvm.x86.acpi` writes into the FADT
(ACPI 6.3 section 4.8.4):

======  =====  =========================================================================
offset  width  register
======  =====  =========================================================================
0       2      PM1_STS (4.8.4.1.1): write 1 to clear.  TMR_STS (bit 0) is set each time
               the timer's top bit changes (section 4.8.3); WAK_STS (bit 15) by a wake
               from S3, with RTC_STS (bit 10) when the RTC alarm was the wake event
2       2      PM1_EN (4.8.4.1.2): the defined enable bits are stored and read back
4       2      PM1_CNT (4.8.4.2.1): SCI_EN (bit 0) always reads 1, for the machine is
               always in ACPI mode (the FADT has no SMI_CMD); BM_RLD and SLP_TYP are
               stored; GBL_RLS and SLP_EN are write-only.  Writing SLP_EN (bit 13) with
               SLP_TYP (bits 10-12) = 5, the DSDT's ``\\_S5_``, calls ``on_poweroff()``;
               with SLP_TYP = 1, its ``\\_S3_``, the device sleeps (see below); other
               sleep types are logged and ignored (``stats["ignored_sleeps"]``)
6       2      nothing: reads 0xff, writes dropped (``stats["missed_*"]``)
8       4      PM_TMR (4.8.4.3): read-only, 3.579545 MHz from ``clock()`` (nanoseconds),
               0 at construction, 32 bits wide as the FADT's TMR_VAL_EXT says
======  =====  =========================================================================

Wrong widths: the registers are byte-addressable, as on PC chipsets.  An access
of 1, 2 or 4 bytes at any offset acts, byte lane by byte lane, on whatever
registers lie under it.  A read returns those bytes of each register's value
(sampled once per access, so a 4-byte timer read is consistent; a timer read
as separate bytes may tear, as on hardware).  A write changes only the bytes it
covers: the register's other bytes keep their value, and its side effects see
the merged value, so a byte write of 0x34 to offset 5 (PM1_CNT's high byte)
requests S5 like a 16-bit write of 0x3401 would.  (QEMU decodes a byte write
to PM1_CNT's high byte the same way since 2023: ``acpi_pm_cnt_write`` in
``hw/acpi/core.c`` merges it with the stored low byte, and ``acpi_pm_cnt_read``
shifts by ``addr * 8``; a byte write to its low byte there zeroes the high one.)
Lanes over no register, or past the range, read 0xff.  Accesses of other sizes
read all ones and are dropped.

``on_poweroff()`` runs on the vCPU thread in the middle of the port write: it
should request that the machine stop, not tear it down.

S3, suspend to RAM (sections 7.4.2.4 and 16.1).  The S3 write marks the device
:attr:`~AcpiPm.sleeping` and calls ``on_suspend()``, on the vCPU thread in the
middle of the write, which must stop every vCPU before it runs another
instruction (:mod:`pykvm.sleep`).  The device sleeps until :meth:`AcpiPm.wake`,
which sets WAK_STS, and RTC_STS when the RTC alarm woke the machine: the wake
events an OS finds in PM1_STS on resume.  The RTC alarm is a wake event only
while PM1_EN's RTC_EN is set (:attr:`~AcpiPm.rtc_wake_enabled`), as on QEMU's
PIIX4, whose RTC wakes the machine only then.

The device raises no SCI: of the status bits it sets, only TMR_STS (which Linux
does not enable) and RTC_STS (set by a wake, and cleared by the OS as it
resumes) have an enable bit.

State (:class:`AcpiPmState`): the three PM1 registers, whether the device
sleeps, and the timer, whose count is kept as the time it has run
(``timer_ns``).  A restored timer continues from that count, whatever the
host's clock says at the restore: it is an interval timer (Linux uses it as a
clocksource and to calibrate), so it must not jump by the time the machine
spent saved, and QEMU's counts the virtual clock, which stops while the VM does
and migrates with it.  Keeping
nanoseconds rather than ticks keeps the timer's phase: the restored timer
ticks at the same moments the saved one would have.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import StateError
from ..x86.acpi import ACPI_PM_BASE as ACPI_PM_BASE  # re-exported: where the machine registers the device
from ..x86.acpi import (
    ACPI_PM_SIZE,
    PM1A_CNT_OFFSET,
    PM1A_EVT_OFFSET,
    PM_TIMER_FREQUENCY,
    PM_TMR_BITS,
    PM_TMR_LEN,
    PM_TMR_OFFSET,
    SLP_TYP_S3,
    SLP_TYP_S5,
)
from .ports import ACCESS_SIZES, BITS_PER_BYTE, BYTE_MASK, OPEN_BUS_BYTE, size_mask
from .state import check_bits, check_int, check_record, check_type

log = logging.getLogger(__name__)

PM1_REGISTER_WIDTH = 2
PM1_STS_OFFSET = PM1A_EVT_OFFSET
PM1_EN_OFFSET = PM1A_EVT_OFFSET + PM1_REGISTER_WIDTH
PM1_CNT_OFFSET = PM1A_CNT_OFFSET

# PM1_STS bits (section 4.8.4.1.1): the ones this model sets.
TMR_STS = 1 << 0
RTC_STS = 1 << 10
WAK_STS = 1 << 15
PM1_STS_STORED = TMR_STS | RTC_STS | WAK_STS
# PM1_EN bits (section 4.8.4.1.2).
TMR_EN = 1 << 0
GBL_EN = 1 << 5
PWRBTN_EN = 1 << 8
SLPBTN_EN = 1 << 9
RTC_EN = 1 << 10
PCIEXP_WAKE_DIS = 1 << 14
PM1_EN_DEFINED = TMR_EN | GBL_EN | PWRBTN_EN | SLPBTN_EN | RTC_EN | PCIEXP_WAKE_DIS
# PM1_CNT bits (section 4.8.4.2.1).
SCI_EN = 1 << 0
BM_RLD = 1 << 1
GBL_RLS = 1 << 2  # write-only: tells firmware the global lock is free
SLP_TYP_SHIFT = 10
SLP_TYP_MASK = 0b111 << SLP_TYP_SHIFT
SLP_EN = 1 << 13  # write-only: enter the sleep state SLP_TYP names
PM1_CNT_STORED = BM_RLD | SLP_TYP_MASK

NS_PER_SECOND = 1_000_000_000
PM_TMR_MASK = size_mask(PM_TMR_LEN) >> (PM_TMR_LEN * BITS_PER_BYTE - PM_TMR_BITS)
PM_TMR_TOP_BIT_SHIFT = PM_TMR_BITS - 1
# The longest a saved timer may have run: what a signed 64-bit count of nanoseconds holds (292 years).
TIMER_NS_LIMIT = (1 << 63) - 1


@dataclass(frozen=True)
class AcpiPmState:
    """Everything the guest can observe of an :class:`AcpiPm`."""

    sts: int  # PM1_STS as stored (TMR_STS, until cleared)
    en: int  # PM1_EN
    cnt: int  # PM1_CNT's stored bits, SCI_EN always among them
    sleeping: bool  # in S3: from the guest's S3 write until a wake
    timer_ns: int  # how long the PM timer has counted: it counts on from here
    timer_half: int  # the timer's half-period (of its top bit) in which TMR_STS was last cleared


@dataclass(frozen=True)
class _Register:
    offset: int
    width: int
    read: Callable[[], int]
    write: Callable[[int, int], None]  # (value, mask of the bits written)


class AcpiPm:
    """PM1a event block, PM1a control block and PM timer, at offsets 0, 4 and 8."""

    #: Length of the port range the device is registered over (0x600-0x60b).
    SIZE = ACPI_PM_SIZE

    def __init__(
        self, on_poweroff: Callable[[], None], on_suspend: Callable[[], None],
        clock: Callable[[], int] = time.monotonic_ns,
    ) -> None:  # fmt: skip
        self.stats: Counter[str] = Counter()
        self._on_poweroff = on_poweroff
        self._on_suspend = on_suspend
        self._clock = clock
        self._epoch = clock()
        self._sts = 0
        self._en = 0
        self._cnt = SCI_EN
        self._sleeping = False
        self._timer_half = 0  # which half-period of the timer TMR_STS was last cleared in
        self._registers = (
            _Register(PM1_STS_OFFSET, PM1_REGISTER_WIDTH, self._read_sts, self._write_sts),
            _Register(PM1_EN_OFFSET, PM1_REGISTER_WIDTH, self._read_en, self._write_en),
            _Register(PM1_CNT_OFFSET, PM1_REGISTER_WIDTH, self._read_cnt, self._write_cnt),
            _Register(PM_TMR_OFFSET, PM_TMR_LEN, self._read_timer, self._write_timer),
        )

    def ticks(self) -> int:
        """PM timer ticks since construction (not wrapped); 0 if the clock went back."""
        return _ticks(self._timer_ns())

    def _timer_ns(self) -> int:
        return max(self._clock() - self._epoch, 0)

    # --- S3 ------------------------------------------------------------------------------------

    @property
    def sleeping(self) -> bool:
        """Whether the machine is in S3: the guest entered it and no wake has come yet."""
        return self._sleeping

    @property
    def rtc_wake_enabled(self) -> bool:
        """Whether the RTC alarm may wake the machine from S3 (PM1_EN's RTC_EN)."""
        return bool(self._en & RTC_EN)

    def wake(self, rtc_alarm: bool) -> None:
        """Leave S3: WAK_STS, and RTC_STS if ``rtc_alarm`` was the wake event, tell the OS why."""
        self._sleeping = False
        self._sts |= WAK_STS | (RTC_STS if rtc_alarm else 0)

    # --- state -----------------------------------------------------------------------------------

    def save_state(self) -> AcpiPmState:
        """The guest-visible state; the timer as the time it has counted."""
        return AcpiPmState(self._sts, self._en, self._cnt, self._sleeping, self._timer_ns(), self._timer_half)

    def restore_state(self, state: AcpiPmState) -> None:
        """Take ``state``: the timer counts on from ``state.timer_ns`` (see the module docstring).

        Raises :class:`StateError`, changing nothing, if a field is invalid.
        """
        check_record(state, AcpiPmState)
        check_bits(state, "sts", PM1_STS_STORED)
        check_bits(state, "en", PM1_EN_DEFINED)
        if not check_bits(state, "cnt", PM1_CNT_STORED | SCI_EN) & SCI_EN:
            raise StateError(f"AcpiPmState.cnt is {state.cnt:#x}: SCI_EN always reads 1 on this machine")
        check_type(state, "sleeping", bool)
        timer_ns = check_int(state, "timer_ns", 0, TIMER_NS_LIMIT)
        check_int(state, "timer_half", 0, _ticks(timer_ns) >> PM_TMR_TOP_BIT_SHIFT)
        self._sts, self._en, self._cnt, self._sleeping = state.sts, state.en, state.cnt, state.sleeping
        self._epoch = self._clock() - timer_ns
        self._timer_half = state.timer_half

    # --- bus interface ---------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        """A ``size``-byte read at ``offset``: each byte lane reads the register under it."""
        if size not in ACCESS_SIZES:
            return self._miss("read", offset, size, size_mask(size))
        values: dict[int, int] = {}  # register offset -> value, sampled once per access
        result = 0
        for lane in range(size):
            register = self._register_at(offset + lane)
            if register is None:
                byte = self._miss("read", offset + lane, 1, OPEN_BUS_BYTE)
            else:
                if register.offset not in values:
                    values[register.offset] = register.read()
                byte = values[register.offset] >> (BITS_PER_BYTE * (offset + lane - register.offset))
            result |= (byte & BYTE_MASK) << (BITS_PER_BYTE * lane)
        return result

    def write(self, offset: int, size: int, value: int) -> None:
        """A ``size``-byte write: each register under it gets the bytes that cover it."""
        if size not in ACCESS_SIZES:
            self._miss("write", offset, size, 0)
            return
        pending: dict[int, tuple[_Register, int, int]] = {}  # offset -> (register, value, mask)
        for lane in range(size):
            register = self._register_at(offset + lane)
            if register is None:
                self._miss("write", offset + lane, 1, 0)
                continue
            shift = BITS_PER_BYTE * (offset + lane - register.offset)
            byte = (value >> (BITS_PER_BYTE * lane)) & BYTE_MASK
            _, bits, mask = pending.get(register.offset, (register, 0, 0))
            pending[register.offset] = (register, bits | byte << shift, mask | BYTE_MASK << shift)
        for register, bits, mask in pending.values():
            register.write(bits, mask)

    def _register_at(self, offset: int) -> _Register | None:
        for register in self._registers:
            if register.offset <= offset < register.offset + register.width:
                return register
        return None

    def _miss(self, kind: str, offset: int, size: int, answer: int) -> int:
        self.stats[f"missed_{kind}s"] += 1
        log.debug("ACPI PM: unanswered %d-byte %s at offset %#x", size, kind, offset)
        return answer

    # --- PM1_STS, PM1_EN ---------------------------------------------------------------------------

    def _read_sts(self) -> int:
        if self.ticks() >> PM_TMR_TOP_BIT_SHIFT != self._timer_half:
            self._sts |= TMR_STS
        return self._sts

    def _write_sts(self, value: int, mask: int) -> None:
        cleared = value & mask
        if cleared & TMR_STS:
            self._timer_half = self.ticks() >> PM_TMR_TOP_BIT_SHIFT
        self._sts &= ~cleared

    def _read_en(self) -> int:
        return self._en

    def _write_en(self, value: int, mask: int) -> None:
        self._en = (self._en & ~mask | value & mask) & PM1_EN_DEFINED

    # --- PM1_CNT -----------------------------------------------------------------------------------

    def _read_cnt(self) -> int:
        return self._cnt

    def _write_cnt(self, value: int, mask: int) -> None:
        merged = self._cnt & ~mask | value & mask
        self._cnt = merged & PM1_CNT_STORED | SCI_EN
        if mask & value & SLP_EN:
            self._sleep((merged & SLP_TYP_MASK) >> SLP_TYP_SHIFT)

    def _sleep(self, sleep_type: int) -> None:
        """SLP_EN was written with SLP_TYP ``sleep_type`` (sections 4.8.3.2 and 16.1)."""
        if sleep_type == SLP_TYP_S5:
            self.stats["poweroffs"] += 1
            log.info("ACPI PM: the guest entered S5 (soft off)")
            self._on_poweroff()
        elif sleep_type == SLP_TYP_S3:
            self._suspend()
        else:
            self.stats["ignored_sleeps"] += 1
            log.info("ACPI PM: ignoring sleep type %d: only S3 (SLP_TYP %d) and S5 (SLP_TYP %d) are supported",
                     sleep_type, SLP_TYP_S3, SLP_TYP_S5)  # fmt: skip

    def _suspend(self) -> None:
        if self._sleeping:  # another vCPU's S3 write, before the first one stopped it
            return
        self._sleeping = True
        self.stats["suspends"] += 1
        log.info("ACPI PM: the guest entered S3 (suspend to RAM)")
        self._on_suspend()

    # --- PM_TMR ------------------------------------------------------------------------------------

    def _read_timer(self) -> int:
        return self.ticks() & PM_TMR_MASK

    def _write_timer(self, value: int, mask: int) -> None:
        self.stats["timer_writes"] += 1
        log.debug("ACPI PM: write %#x to the read-only PM timer ignored", value)


def _ticks(timer_ns: int) -> int:
    """PM timer ticks in ``timer_ns`` nanoseconds (not wrapped)."""
    return timer_ns * PM_TIMER_FREQUENCY // NS_PER_SECOND
