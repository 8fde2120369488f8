"""The PC's CMOS: a Motorola MC146818 real-time clock with 128 bytes of NVRAM.

Two ports (PC ports 0x70 and 0x71, registered as one range of length 2):

- offset 0, the index register (write-only; reads float as 0xff).  Bits 0-6
  select a CMOS byte; bit 7 is the PC's NMI mask, recorded in
  :attr:`Cmos.nmi_disabled` and masked off the index.
- offset 1, the data register: the selected byte.

The selected byte, by index (names from the MC146818 datasheet):

- 0x00 seconds, 0x02 minutes, 0x04 hours, 0x06 day of week (1-7, Sunday=1),
  0x07 date of month, 0x08 month, 0x09 year, and 0x32 century (the IBM PC
  convention) are computed from ``clock()`` in UTC on every read: BCD unless
  register B's DM bit (binary mode) is set; 12-hour with the PM flag in bit 7
  unless register B's 24/12 bit is set.  Writes to them are ignored and
  counted in ``stats["ignored_time_writes"]``: the guest cannot set the host's
  clock, so the RTC always shows the host's time.
- 0x01, 0x03, 0x05 seconds/minutes/hours alarm: stored.
- 0x0A register A: UIP (bit 7, update in progress) always reads 0, since a
  read computes a consistent time; the divider and rate bits are stored
  (default 0x26: 32.768 kHz time base, 1.024 kHz rate).
- 0x0B register B: stored (default 0x02: 24-hour, BCD).  Its interrupt
  enables (PIE, AIE, UIE) have no effect: this model raises no interrupts.
- 0x0C register C (interrupt flags) reads 0; 0x0D register D reads 0x80
  (VRT: valid RAM and time, the battery is good).  Both are read-only.
- everything else (0x0E-0x7F) is NVRAM: stored and read back.  At
  construction it holds the memory sizes QEMU's PC machine writes there, for
  firmware and guests that look (see :func:`memory_size_bytes`).

Wrong widths are split into byte accesses (see :mod:`pykvm.devices.ports`),
so ``outw`` at offset 0 sets the index and writes the data, as on a PC.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from ..x86.e820 import ram_regions
from ..x86.layout import KIB, MIB
from .ports import BITS_PER_BYTE, BYTE_MASK, OPEN_BUS_BYTE, ByteRegisterDevice

log = logging.getLogger(__name__)

# Port offsets.
INDEX_PORT = 0
DATA_PORT = 1
INDEX_MASK = 0x7F
NMI_DISABLE = 0x80
CMOS_SIZE = 128

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
REG_B_DEFAULT = REG_B_24H
REG_D_VRT = 0x80  # valid RAM and time
HOURS_PM = 0x80  # 12-hour mode: set for PM hours
HOURS_PER_HALF_DAY = 12
YEARS_PER_CENTURY = 100
DAYS_PER_WEEK = 7

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
DECIMAL_BASE = 10


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


def _to_bcd(value: int) -> int:
    return ((value // DECIMAL_BASE) << BCD_DIGIT_BITS) | (value % DECIMAL_BASE)


class Cmos(ByteRegisterDevice):
    """MC146818 RTC and CMOS NVRAM behind an index port and a data port."""

    SIZE = 2

    def __init__(self, ram_size: int, clock: Callable[[], float] = time.time) -> None:
        super().__init__()
        self._clock = clock
        self._index = 0
        self.nmi_disabled = False
        self._ram = bytearray(CMOS_SIZE)
        self._ram[REG_A] = REG_A_DEFAULT
        self._ram[REG_B] = REG_B_DEFAULT
        for index, value in memory_size_bytes(ram_size).items():
            self._ram[index] = value

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
        if index in TIME_REGISTERS:
            return self._read_time(index)
        if index == REG_A:
            return self._ram[REG_A] & ~REG_A_UIP
        if index == REG_C:
            return 0
        if index == REG_D:
            return REG_D_VRT
        return self._ram[index]

    def _write_cmos(self, index: int, byte: int) -> None:
        if index in TIME_REGISTERS:
            self.stats["ignored_time_writes"] += 1
            log.debug("CMOS: guest write %#x to time register %#x ignored", byte, index)
        elif index not in (REG_C, REG_D):
            self._ram[index] = byte

    def _read_time(self, index: int) -> int:
        """A time register, from the clock in UTC, in the mode register B selects."""
        now = time.gmtime(self._clock())
        if index == HOURS:
            return self._encode_hours(now.tm_hour)
        values = {
            SECONDS: now.tm_sec,
            MINUTES: now.tm_min,
            DAY_OF_WEEK: (now.tm_wday + 1) % DAYS_PER_WEEK + 1,  # tm_wday: Monday=0
            DATE_OF_MONTH: now.tm_mday,
            MONTH: now.tm_mon,
            YEAR: now.tm_year % YEARS_PER_CENTURY,
            CENTURY: now.tm_year // YEARS_PER_CENTURY,
        }
        return self._encode(values[index])

    def _encode_hours(self, hour: int) -> int:
        if self._ram[REG_B] & REG_B_24H:
            return self._encode(hour)
        pm = HOURS_PM if hour >= HOURS_PER_HALF_DAY else 0
        return self._encode(hour % HOURS_PER_HALF_DAY or HOURS_PER_HALF_DAY) | pm

    def _encode(self, value: int) -> int:
        return value if self._ram[REG_B] & REG_B_DM else _to_bcd(value)
