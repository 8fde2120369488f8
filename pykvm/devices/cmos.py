"""The PC's CMOS: a Motorola MC146818 real-time clock with 128 bytes of NVRAM.

Two ports (PC ports 0x70 and 0x71, registered as one range of length 2):

- offset 0, the index register (write-only; reads float as 0xff).  Bits 0-6
  select a CMOS byte; bit 7 is the PC's NMI mask, recorded in
  :attr:`Cmos.nmi_disabled` and masked off the index.
- offset 1, the data register: the selected byte.

The selected byte, by index (names from the MC146818 datasheet):

- 0x00 seconds, 0x02 minutes, 0x04 hours, 0x06 day of week (1-7, Sunday=1),
  0x07 date of month, 0x08 month, 0x09 year, and 0x32 century (the IBM PC
  convention): the RTC's date and time in UTC, BCD unless register B's DM bit
  (binary mode) is set, 12-hour with the PM flag in bit 7 unless register B's
  24/12 bit is set.  See *Time* below for how they run and are set.
- 0x01, 0x03, 0x05 seconds/minutes/hours alarm: stored, in the mode of the
  time registers; a value from 0xC0 up matches every value ("don't care").
  See *Alarm* below.
- 0x0A register A: UIP (bit 7, update in progress) reads 1 in the last
  244 us of each second of the RTC (8 cycles of its 32.768 kHz time base,
  before the update that would change the time registers), as QEMU's; never
  while SET stops the clock.  A read computes a consistent time at any
  moment; the bit is there for guests that wait for an update, as
  kvm-unit-tests' s3 test does.  The divider and rate bits are stored
  (default 0x26: 32.768 kHz time base, 1.024 kHz rate), and the clock runs
  whatever they say.
- 0x0B register B: stored (default 0x02: 24-hour, BCD).  SET (bit 7) stops
  the time registers for the guest to write (see *Time*).  AIE (bit 5)
  enables the alarm interrupt (see *Alarm*); the periodic and update-ended
  enables (PIE, UIE) have no effect.
- 0x0C register C (interrupt flags): IRQF (bit 7) and AF (bit 5), set when
  the alarm rings; a read returns them and clears them, and lowers IRQ 8.
  0x0D register D reads 0x80 (VRT: valid RAM and time, the battery is good).
  Both are read-only.
- everything else (0x0E-0x7F) is NVRAM: stored and read back.  At
  construction it holds the memory sizes QEMU's PC machine writes there, for
  firmware and guests that look (see :func:`memory_size_bytes`).

Wrong widths are split into byte accesses (see :mod:`pykvm.devices.ports`),
so ``outw`` at offset 0 sets the index and writes the data, as on a PC.

Time.  The RTC shows the host's UTC clock (``clock()``, nanoseconds since the
epoch) plus an offset, 0 at construction.  The guest sets it as on the chip:
with register B's SET bit the time registers stop (setting SET latches the
current time into them) and take the guest's writes; clearing SET starts the
clock from them, in the same phase of its second (as QEMU does).  A time
register written while SET is clear sets the clock at once from the current
time with that byte changed.  The day of the week is computed from the date,
whatever was written.  Registers that name no date (a BCD digit above 9,
month 13, 31 February, year 0) leave the clock where it was, counted in
``stats["invalid_times"]``.  So the offset is only ever what puts the RTC
somewhere in years 1 to 9999.

What a snapshot keeps of the time (:class:`CmosState`) is that offset, not
the time itself: restored later, the RTC reads the host's clock at that moment
plus the guest's offset.  That is what a battery-backed clock does while its
machine is off, and QEMU's default (``-rtc base=utc,clock=host``: after a
migration its base_rtc, last_update and offset are taken against the host
clock again).  Continuing from the saved time instead (QEMU's ``clock=vm``)
would give every restore, and every clone of one snapshot, the snapshot's date
for ever: certificates expire, make and NTP-less guests see a stale clock.  The
clock that does continue from its saved value is the ACPI PM timer (an interval
timer, see :mod:`pykvm.devices.acpi_pm`); on this platform the guest's TSC jumps
forward by the wall time anyway (PLATFORM.md).

Alarm.  The alarm rings at the update that makes the time registers' hours,
minutes and seconds match the alarm registers (each "don't care" matching
anything): it sets AF in register C, and with AIE also IRQF and raises the
interrupt line (``irq(True)``: ISA IRQ 8 on a PC) until register C is read, as
the MC146818 does.  The model keeps no timer of its own: the alarm rings
where the machine waits for it, to wake from ACPI S3 (:mod:`pykvm.sleep`):
:meth:`Cmos.alarm_delay_ns` tells how long until it is due, and
:meth:`Cmos.ring_alarm` rings it.  A running guest that waits for the alarm's
interrupt, or polls AF, waits in vain.  Register C is one of the 128 bytes a
snapshot keeps; a restored device raises the line again if IRQF is set.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import StateError
from ..x86.e820 import ram_regions
from ..x86.layout import KIB, MIB
from .ports import BITS_PER_BYTE, BYTE_MASK, OPEN_BUS_BYTE, ByteRegisterDevice
from .state import check_bytes, check_int, check_record, check_type

log = logging.getLogger(__name__)

# Port offsets.
INDEX_PORT = 0
DATA_PORT = 1
INDEX_MASK = 0x7F
NMI_DISABLE = 0x80
CMOS_RAM_SIZE = 128

# MC146818 time and date registers.
SECONDS = 0x00
SECONDS_ALARM = 0x01
MINUTES = 0x02
MINUTES_ALARM = 0x03
HOURS = 0x04
HOURS_ALARM = 0x05
DAY_OF_WEEK = 0x06
DATE_OF_MONTH = 0x07
MONTH = 0x08
YEAR = 0x09
CENTURY = 0x32  # IBM PC convention, not in the MC146818 itself
TIME_REGISTERS = frozenset({SECONDS, MINUTES, HOURS, DAY_OF_WEEK, DATE_OF_MONTH, MONTH, YEAR, CENTURY})

# Status registers.
REG_A = 0x0A
REG_B = 0x0B
REG_C = 0x0C
REG_D = 0x0D
REG_A_UIP = 0x80  # update in progress
REG_A_DEFAULT = 0x26  # DV = 010 (32.768 kHz), RS = 0110 (1.024 kHz)
REG_B_24H = 0x02  # 24/12: 1 = 24-hour mode
REG_B_DM = 0x04  # data mode: 1 = binary, 0 = BCD
REG_B_AIE = 0x20  # alarm interrupt enable
REG_B_SET = 0x80  # stops the time registers while the guest writes them
REG_B_DEFAULT = REG_B_24H
REG_C_AF = 0x20  # alarm flag
REG_C_IRQF = 0x80  # an enabled flag is set: the interrupt line is raised
REG_C_FLAGS = REG_C_AF | REG_C_IRQF  # the flags this model sets
ALARM_DONT_CARE = 0xC0  # an alarm byte with both top bits set matches every value
REG_D_VRT = 0x80  # valid RAM and time
HOURS_PM = 0x80  # 12-hour mode: set for PM hours
HOURS_PER_HALF_DAY = 12
YEARS_PER_CENTURY = 100
DAYS_PER_WEEK = 7
SECONDS_PER_MINUTE = 60
MINUTES_PER_HOUR = 60
HOURS_PER_DAY = 24
SECONDS_PER_HOUR = SECONDS_PER_MINUTE * MINUTES_PER_HOUR
SECONDS_PER_DAY = SECONDS_PER_HOUR * HOURS_PER_DAY

# NVRAM memory-size bytes, as QEMU's pc_cmos_init() writes them.
BASE_MEMORY_LO, BASE_MEMORY_HI = 0x15, 0x16  # KiB below 1 MiB
EXTENDED_MEMORY_LO, EXTENDED_MEMORY_HI = 0x17, 0x18  # KiB above 1 MiB
EXTENDED_MEMORY_COPY_LO, EXTENDED_MEMORY_COPY_HI = 0x30, 0x31  # the same, again
MEMORY_ABOVE_16M_LO, MEMORY_ABOVE_16M_HI = 0x34, 0x35  # 64 KiB units, 16 MiB..hole
MEMORY_ABOVE_4G = (0x5B, 0x5C, 0x5D)  # 64 KiB units above 4 GiB, 24 bits
BASE_MEMORY_KIB = 640
MEMORY_ABOVE_16M_START = 16 * MIB
MEMORY_UNIT_64K = 64 * KIB
WORD_MAX = 0xFFFF
MEMORY_ABOVE_4G_MAX = 0xFFFFFF  # what three bytes hold (just under 1 TiB)
BCD_DIGIT_BITS = 4
BCD_DIGIT_MASK = 0x0F
DECIMAL_BASE = 10

NS_PER_SECOND = 1_000_000_000
# UIP is set this long before each update: 8 cycles of the 32.768 kHz time base (244 us).
UIP_NS = 8 * NS_PER_SECOND // 32_768
_EPOCH = datetime.datetime(1970, 1, 1)
# How far a restored RTC may be from the host's clock: more than years 1-9999 can put between them.
RTC_OFFSET_LIMIT_NS = 10_000 * 366 * 24 * 3600 * NS_PER_SECOND


@dataclass(frozen=True)
class CmosState:
    """Everything the guest can observe of a :class:`Cmos`."""

    index: int  # the selected byte
    nmi_disabled: bool
    ram: bytes  # all 128 bytes: time registers as last latched or written, alarms, A-D (C: the flags), NVRAM
    rtc_offset_ns: int  # the guest's RTC minus the host's UTC clock (see the module docstring)


def memory_size_bytes(ram_size: int) -> dict[int, int]:
    """The NVRAM bytes (index -> value) describing ``ram_size`` bytes of RAM.

    As QEMU's PC: base memory (KiB, at most 640); extended memory above 1 MiB
    (KiB, capped at 0xffff); memory from 16 MiB up to the MMIO hole (64 KiB
    units, capped at 0xffff); memory above 4 GiB (64 KiB units, capped at
    0xffffff where QEMU would wrap).
    """
    regions = ram_regions(ram_size)
    below_4g = regions[0][1]
    above_4g = sum(size for _, size in regions[1:])
    base = min(below_4g // KIB, BASE_MEMORY_KIB)
    extended = min(max(below_4g - MIB, 0) // KIB, WORD_MAX)
    above_16m = min(max(below_4g - MEMORY_ABOVE_16M_START, 0) // MEMORY_UNIT_64K, WORD_MAX)
    above_4g_units = min(above_4g // MEMORY_UNIT_64K, MEMORY_ABOVE_4G_MAX)
    return {
        **_little_endian((BASE_MEMORY_LO, BASE_MEMORY_HI), base),
        **_little_endian((EXTENDED_MEMORY_LO, EXTENDED_MEMORY_HI), extended),
        **_little_endian((EXTENDED_MEMORY_COPY_LO, EXTENDED_MEMORY_COPY_HI), extended),
        **_little_endian((MEMORY_ABOVE_16M_LO, MEMORY_ABOVE_16M_HI), above_16m),
        **_little_endian(MEMORY_ABOVE_4G, above_4g_units),
    }


def _little_endian(indices: tuple[int, ...], value: int) -> dict[int, int]:
    return {index: (value >> (BITS_PER_BYTE * n)) & BYTE_MASK for n, index in enumerate(indices)}


def next_alarm(now: int, hours: Sequence[int], minutes: Sequence[int], seconds: Sequence[int]) -> int | None:
    """The first second after ``now`` (seconds since the epoch, UTC) whose time of day is one of
    ``hours`` x ``minutes`` x ``seconds`` (each ascending); None if one of them is empty."""
    today = now - now % SECONDS_PER_DAY
    for day in (today, today + SECONDS_PER_DAY):  # every time of day comes within two days
        for hour in hours:
            hour_start = day + hour * SECONDS_PER_HOUR
            if hour_start + SECONDS_PER_HOUR <= now:
                continue
            for minute in minutes:
                minute_start = hour_start + minute * SECONDS_PER_MINUTE
                if minute_start + SECONDS_PER_MINUTE <= now:
                    continue
                for second in seconds:
                    if minute_start + second > now:
                        return minute_start + second
    return None


def _to_bcd(value: int) -> int:
    return ((value // DECIMAL_BASE) << BCD_DIGIT_BITS) | (value % DECIMAL_BASE)


def _from_bcd(byte: int) -> int | None:
    high, low = byte >> BCD_DIGIT_BITS, byte & BCD_DIGIT_MASK
    return high * DECIMAL_BASE + low if high < DECIMAL_BASE and low < DECIMAL_BASE else None


class Cmos(ByteRegisterDevice):
    """MC146818 RTC and CMOS NVRAM behind an index port and a data port."""

    SIZE = 2

    def __init__(
        self, ram_size: int, clock: Callable[[], int] = time.time_ns, irq: Callable[[bool], None] | None = None
    ) -> None:
        super().__init__()
        self._clock = clock
        self._irq = irq
        self._index = 0
        self.nmi_disabled = False
        self._rtc_offset_ns = 0
        self._ram = bytearray(CMOS_RAM_SIZE)
        self._ram[REG_A] = REG_A_DEFAULT
        self._ram[REG_B] = REG_B_DEFAULT
        for index, value in memory_size_bytes(ram_size).items():
            self._ram[index] = value

    # --- state ---------------------------------------------------------------------------

    def save_state(self) -> CmosState:
        """The guest-visible state: index, NMI mask, the 128 bytes and the RTC's offset."""
        return CmosState(self._index, self.nmi_disabled, bytes(self._ram), self._rtc_offset_ns)

    def restore_state(self, state: CmosState) -> None:
        """Take ``state``; raises :class:`StateError`, changing nothing, if a field is invalid."""
        check_record(state, CmosState)
        check_int(state, "index", 0, INDEX_MASK)
        check_type(state, "nmi_disabled", bool)
        flags = check_bytes(state, "ram", CMOS_RAM_SIZE, CMOS_RAM_SIZE)[REG_C]
        if flags & ~REG_C_FLAGS:
            raise StateError(f"CmosState.ram holds register C = {flags:#x}, which sets flags other than AF and IRQF")
        check_int(state, "rtc_offset_ns", -RTC_OFFSET_LIMIT_NS, RTC_OFFSET_LIMIT_NS)
        self._index, self.nmi_disabled = state.index, state.nmi_disabled
        self._ram[:] = state.ram
        self._rtc_offset_ns = state.rtc_offset_ns
        if flags & REG_C_IRQF and self._irq is not None:
            self._irq(True)

    # --- the alarm -----------------------------------------------------------------------

    def alarm_delay_ns(self) -> int | None:
        """Nanoseconds until the alarm rings with its interrupt; None if AIE is clear, SET stops
        the clock, or the alarm registers name no time of day."""
        if not self._ram[REG_B] & REG_B_AIE or self._setting:
            return None
        rtc_ns = self._clock() + self._rtc_offset_ns
        due = next_alarm(
            rtc_ns // NS_PER_SECOND,
            self._alarm_values(HOURS_ALARM, HOURS_PER_DAY, self._decode_hours),
            self._alarm_values(MINUTES_ALARM, MINUTES_PER_HOUR, self._decode),
            self._alarm_values(SECONDS_ALARM, SECONDS_PER_MINUTE, self._decode),
        )
        return None if due is None else due * NS_PER_SECOND - rtc_ns

    def ring_alarm(self) -> None:
        """The alarm is due: AF, and with AIE also IRQF and the interrupt line."""
        self._ram[REG_C] |= REG_C_AF
        if self._ram[REG_B] & REG_B_AIE:
            self._ram[REG_C] |= REG_C_IRQF
            if self._irq is not None:
                self._irq(True)

    def _alarm_values(self, index: int, limit: int, decode: Callable[[int], int | None]) -> Sequence[int]:
        """The values the alarm register ``index`` matches: all, one, or none (a byte that names none)."""
        byte = self._ram[index]
        if byte & ALARM_DONT_CARE == ALARM_DONT_CARE:
            return range(limit)
        value = decode(byte)
        return (value,) if value is not None and value < limit else ()

    # --- the ports -----------------------------------------------------------------------

    def _read_register(self, offset: int) -> int:
        if offset == INDEX_PORT:
            return OPEN_BUS_BYTE
        return self._read_cmos(self._index)

    def _write_register(self, offset: int, byte: int) -> bool:
        if offset == INDEX_PORT:
            self._index = byte & INDEX_MASK
            self.nmi_disabled = bool(byte & NMI_DISABLE)
        else:
            self._write_cmos(self._index, byte)
        return True

    def _read_cmos(self, index: int) -> int:
        if index in TIME_REGISTERS and not self._setting:
            return self._time_registers()[index]
        if index == REG_A:
            return self._ram[REG_A] & ~REG_A_UIP | (REG_A_UIP if self._updating() else 0)
        if index == REG_C:
            return self._read_flags()
        if index == REG_D:
            return REG_D_VRT
        return self._ram[index]

    def _write_cmos(self, index: int, byte: int) -> None:
        if index in TIME_REGISTERS:
            self._write_time(index, byte)
        elif index == REG_B:
            self._write_register_b(byte)
        elif index not in (REG_C, REG_D):
            self._ram[index] = byte

    def _read_flags(self) -> int:
        """Register C: reading it clears the flags and lowers the interrupt line."""
        flags = self._ram[REG_C]
        self._ram[REG_C] = 0
        if flags & REG_C_IRQF and self._irq is not None:
            self._irq(False)
        return flags

    # --- the clock -----------------------------------------------------------------------

    @property
    def _setting(self) -> bool:
        """Register B's SET bit: the time registers hold what the guest latched or wrote."""
        return bool(self._ram[REG_B] & REG_B_SET)

    def _updating(self) -> bool:
        """UIP: the clock runs and its next update is less than :data:`UIP_NS` away."""
        return not self._setting and (self._clock() + self._rtc_offset_ns) % NS_PER_SECOND >= NS_PER_SECOND - UIP_NS

    def _write_register_b(self, byte: int) -> None:
        """Setting SET latches the time; clearing it starts the clock from the time registers.

        Both happen in the mode (BCD or binary, 12 or 24 hours) the registers were written in,
        the one before this write (as QEMU).
        """
        if byte & REG_B_SET and not self._setting:
            self._latch_time()
        elif self._setting and not byte & REG_B_SET:
            self._start_clock()
        self._ram[REG_B] = byte

    def _write_time(self, index: int, byte: int) -> None:
        """Kept while SET is on; otherwise the clock is set at once to the time with this byte changed."""
        if self._setting:
            self._ram[index] = byte
            return
        self._latch_time()
        self._ram[index] = byte
        self._start_clock()

    def _latch_time(self) -> None:
        for index, value in self._time_registers().items():
            self._ram[index] = value

    def _start_clock(self) -> None:
        """Run the clock on from the time registers, in the same phase of its current second."""
        seconds = self._written_time()
        if seconds is None:
            self.stats["invalid_times"] += 1
            log.debug("CMOS: the guest set the RTC to a date that does not exist; the clock keeps its time")
            return
        host = self._clock()
        self._rtc_offset_ns = seconds * NS_PER_SECOND + (host + self._rtc_offset_ns) % NS_PER_SECOND - host

    def _time_registers(self) -> dict[int, int]:
        """The RTC's time now, as the time registers show it in the mode register B selects."""
        now = time.gmtime((self._clock() + self._rtc_offset_ns) // NS_PER_SECOND)
        return {
            SECONDS: self._encode(now.tm_sec),
            MINUTES: self._encode(now.tm_min),
            HOURS: self._encode_hours(now.tm_hour),
            DAY_OF_WEEK: self._encode((now.tm_wday + 1) % DAYS_PER_WEEK + 1),  # tm_wday: Monday=0
            DATE_OF_MONTH: self._encode(now.tm_mday),
            MONTH: self._encode(now.tm_mon),
            YEAR: self._encode(now.tm_year % YEARS_PER_CENTURY),
            CENTURY: self._encode(now.tm_year // YEARS_PER_CENTURY),
        }

    def _written_time(self) -> int | None:
        """The time registers' date and time in seconds since the epoch; None if there is no such date."""
        decoded = [self._decode(self._ram[index]) for index in (CENTURY, YEAR, MONTH, DATE_OF_MONTH, MINUTES, SECONDS)]
        decoded.append(self._decode_hours(self._ram[HOURS]))
        fields = [value for value in decoded if value is not None]
        if len(fields) < len(decoded):
            return None
        century, year, month, day, minute, second, hour = fields
        if year >= YEARS_PER_CENTURY:
            return None
        try:
            moment = datetime.datetime(century * YEARS_PER_CENTURY + year, month, day, hour, minute, second)
        except ValueError:
            return None
        return (moment - _EPOCH) // datetime.timedelta(seconds=1)  # as UTC (calendar.timegm, without its import)

    def _encode_hours(self, hour: int) -> int:
        if self._ram[REG_B] & REG_B_24H:
            return self._encode(hour)
        pm = HOURS_PM if hour >= HOURS_PER_HALF_DAY else 0
        return self._encode(hour % HOURS_PER_HALF_DAY or HOURS_PER_HALF_DAY) | pm

    def _decode_hours(self, byte: int) -> int | None:
        if self._ram[REG_B] & REG_B_24H:
            return self._decode(byte)
        value = self._decode(byte & ~HOURS_PM)
        if value is None or not 1 <= value <= HOURS_PER_HALF_DAY:
            return None
        return value % HOURS_PER_HALF_DAY + (HOURS_PER_HALF_DAY if byte & HOURS_PM else 0)

    def _encode(self, value: int) -> int:
        """``value`` in binary or BCD; a century past 99 (after year 9999) keeps its low byte."""
        return (value if self._ram[REG_B] & REG_B_DM else _to_bcd(value)) & BYTE_MASK

    def _decode(self, byte: int) -> int | None:
        return byte if self._ram[REG_B] & REG_B_DM else _from_bcd(byte)
