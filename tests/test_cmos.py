"""The MC146818 RTC and CMOS NVRAM model, driven through ports 0x70/0x71."""

from __future__ import annotations

import calendar

import pytest

from pykvm.devices.bus import Bus
from pykvm.devices.cmos import (
    CENTURY,
    DATE_OF_MONTH,
    DAY_OF_WEEK,
    HOURS,
    HOURS_ALARM,
    MINUTES,
    MINUTES_ALARM,
    MONTH,
    NMI_DISABLE,
    REG_A,
    REG_B,
    REG_B_24H,
    REG_B_DM,
    REG_C,
    REG_D,
    SECONDS,
    SECONDS_ALARM,
    TIME_REGISTERS,
    YEAR,
    Cmos,
    memory_size_bytes,
)

INDEX_PORT = 0x70
DATA_PORT = 0x71
MIB = 1 << 20
GIB = 1 << 30
# Monday 2026-11-23 06:30:12 UTC.
MORNING = calendar.timegm((2026, 11, 23, 6, 30, 12))
REG_B_12H_BCD = 0x00


class Machine:
    def __init__(self, ram_size: int = 64 * MIB, now: float = MORNING) -> None:
        self.now = now
        self.cmos = Cmos(ram_size, clock=lambda: self.now)
        self.bus = Bus("pio")
        self.bus.register(INDEX_PORT, Cmos.SIZE, self.cmos)

    def read(self, index: int) -> int:
        self.bus.write(INDEX_PORT, 1, index)
        return self.bus.read(DATA_PORT, 1)

    def write(self, index: int, value: int) -> None:
        self.bus.write(INDEX_PORT, 1, index)
        self.bus.write(DATA_PORT, 1, value)

    def clock(self) -> tuple[int, ...]:
        return tuple(self.read(i) for i in (CENTURY, YEAR, MONTH, DATE_OF_MONTH, DAY_OF_WEEK, HOURS, MINUTES, SECONDS))


@pytest.fixture
def machine() -> Machine:
    return Machine()


# --- time registers ------------------------------------------------------------------


def test_time_reads_bcd_24h_by_default(machine: Machine) -> None:
    assert machine.clock() == (0x20, 0x26, 0x11, 0x23, 0x02, 0x06, 0x30, 0x12)


def test_time_reads_binary_when_dm_set(machine: Machine) -> None:
    machine.write(REG_B, REG_B_24H | REG_B_DM)
    assert machine.clock() == (20, 26, 11, 23, 2, 6, 30, 12)


@pytest.mark.parametrize(
    ("hour", "bcd", "binary"),
    [(0, 0x12, 12), (6, 0x06, 6), (11, 0x11, 11), (12, 0x92, 0x8C), (18, 0x86, 0x86), (23, 0x91, 0x8B)],
)
def test_12h_mode_hours_carry_the_pm_flag_in_bit_7(hour: int, bcd: int, binary: int) -> None:
    machine = Machine(now=calendar.timegm((2026, 11, 23, hour, 0, 0)))
    machine.write(REG_B, REG_B_12H_BCD)
    assert machine.read(HOURS) == bcd
    machine.write(REG_B, REG_B_DM)
    assert machine.read(HOURS) == binary


def test_day_of_week_counts_sunday_as_one() -> None:
    sunday = Machine(now=calendar.timegm((2026, 11, 22, 12, 0, 0)))
    saturday = Machine(now=calendar.timegm((2026, 11, 28, 12, 0, 0)))
    assert (sunday.read(DAY_OF_WEEK), saturday.read(DAY_OF_WEEK)) == (1, 7)


def test_time_follows_the_clock_on_every_read(machine: Machine) -> None:
    machine.now = MORNING + 61
    assert (machine.read(MINUTES), machine.read(SECONDS)) == (0x31, 0x13)


def test_time_writes_are_ignored_and_counted(machine: Machine) -> None:
    for index in sorted(TIME_REGISTERS):
        machine.write(index, 0x00)
    assert machine.clock() == (0x20, 0x26, 0x11, 0x23, 0x02, 0x06, 0x30, 0x12)
    assert machine.cmos.stats["ignored_time_writes"] == len(TIME_REGISTERS)


def test_alarm_registers_are_stored(machine: Machine) -> None:
    for index, value in ((SECONDS_ALARM, 0x45), (MINUTES_ALARM, 0x59), (HOURS_ALARM, 0xC0)):
        machine.write(index, value)
        assert machine.read(index) == value


# --- status registers -----------------------------------------------------------------


def test_status_a_reads_default_divider_and_never_uip(machine: Machine) -> None:
    assert machine.read(REG_A) == 0x26
    machine.write(REG_A, 0xFF)
    assert machine.read(REG_A) == 0x7F


def test_status_b_defaults_to_24h_bcd_and_is_stored(machine: Machine) -> None:
    assert machine.read(REG_B) == 0x02
    machine.write(REG_B, 0x76)
    assert machine.read(REG_B) == 0x76


def test_status_c_reads_zero_and_d_reads_valid_ram_and_time(machine: Machine) -> None:
    machine.write(REG_C, 0xFF)
    machine.write(REG_D, 0x00)
    assert (machine.read(REG_C), machine.read(REG_D)) == (0x00, 0x80)


# --- index port and NVRAM ----------------------------------------------------------------


def test_nvram_round_trips_every_byte() -> None:
    machine = Machine()
    nvram = [i for i in range(0x0E, 0x80) if i not in TIME_REGISTERS]
    for index in nvram:
        machine.write(index, (index * 7) & 0xFF)
    assert [machine.read(index) for index in nvram] == [(index * 7) & 0xFF for index in nvram]


def test_index_bit_7_disables_nmi_and_is_masked_off_the_index(machine: Machine) -> None:
    machine.write(0x40, 0xAB)
    assert machine.read(NMI_DISABLE | 0x40) == 0xAB
    assert machine.cmos.nmi_disabled is True
    machine.read(0x40)
    assert machine.cmos.nmi_disabled is False


def test_index_port_is_write_only_and_reads_open_bus(machine: Machine) -> None:
    machine.bus.write(INDEX_PORT, 1, 0x10)
    assert machine.bus.read(INDEX_PORT, 1) == 0xFF


def test_word_write_to_index_port_sets_index_then_data(machine: Machine) -> None:
    machine.bus.write(INDEX_PORT, 2, 0x5540)  # outw 0x70: al -> 0x70, ah -> 0x71
    assert machine.read(0x40) == 0x55
    assert machine.cmos.stats["wide_writes"] == 1


def test_wide_read_floats_the_index_lane_and_lanes_past_the_range(machine: Machine) -> None:
    machine.write(0x40, 0x55)
    assert machine.bus.read(INDEX_PORT, 4) == 0xFFFF55FF
    assert machine.cmos.stats["missed_reads"] == 2


# --- memory size bytes ---------------------------------------------------------------------


def test_memory_size_bytes_for_64_mib() -> None:
    machine = Machine(ram_size=64 * MIB)
    base = machine.read(0x15) | machine.read(0x16) << 8
    extended = machine.read(0x17) | machine.read(0x18) << 8
    extended_copy = machine.read(0x30) | machine.read(0x31) << 8
    above_16m = machine.read(0x34) | machine.read(0x35) << 8
    above_4g = machine.read(0x5B) | machine.read(0x5C) << 8 | machine.read(0x5D) << 16
    assert (base, extended, extended_copy, above_16m, above_4g) == (640, 63 * 1024, 63 * 1024, 48 * 16, 0)


def test_memory_size_bytes_for_5_gib_cap_and_count_ram_above_4_gib() -> None:
    machine = Machine(ram_size=5 * GIB)
    extended = machine.read(0x17) | machine.read(0x18) << 8
    above_16m = machine.read(0x34) | machine.read(0x35) << 8
    above_4g = machine.read(0x5B) | machine.read(0x5C) << 8 | machine.read(0x5D) << 16
    assert extended == 0xFFFF
    assert above_16m == (3 * GIB - 16 * MIB) // (64 * 1024)
    assert above_4g == 2 * GIB // (64 * 1024)


def test_memory_size_bytes_below_one_mib() -> None:
    values = memory_size_bytes(512 * 1024)
    assert (values[0x15] | values[0x16] << 8) == 512
    assert all(values[i] == 0 for i in (0x17, 0x18, 0x30, 0x31, 0x34, 0x35, 0x5B, 0x5C, 0x5D))


# --- hostile input ------------------------------------------------------------------------


def test_hostile_accesses_never_raise(machine: Machine) -> None:
    for index in range(0x100):
        for size in (0, 1, 2, 3, 4, 8):
            for value in (0, 0x7F, 0x80, 0xFF, 0xFFFF, 0xFFFFFFFF, -1):
                machine.cmos.write(0, 1, index)
                for offset in range(-1, Cmos.SIZE + 2):
                    machine.cmos.write(offset, size, value)
                    assert 0 <= machine.cmos.read(offset, size) <= max((1 << (8 * size)) - 1, 0)
    for index in range(0x100):
        machine.read(index)  # every register, in every mode the loop left behind
