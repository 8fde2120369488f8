"""The MC146818 RTC and CMOS NVRAM model, driven through ports 0x70/0x71."""

from __future__ import annotations

import calendar
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pykvm.devices.bus import Bus
from pykvm.devices.cmos import (
    CENTURY,
    DATE_OF_MONTH,
    DAY_OF_WEEK,
    HOURS,
    HOURS_PM,
    HOURS_ALARM,
    MINUTES,
    MINUTES_ALARM,
    MONTH,
    NMI_DISABLE,
    REG_A,
    REG_B,
    REG_B_24H,
    REG_B_AIE,
    REG_B_DM,
    REG_C,
    REG_D,
    SECONDS,
    RTC_OFFSET_LIMIT_NS,
    SECONDS_ALARM,
    TIME_REGISTERS,
    YEAR,
    Cmos,
    CmosState,
    memory_size_bytes,
    next_alarm,
)
from pykvm.errors import StateError

INDEX_PORT = 0x70
DATA_PORT = 0x71
MIB = 1 << 20
GIB = 1 << 30
SECOND = 1_000_000_000
REG_B_12H_BCD = 0x00
REG_B_SET = 0x80


def utc(*fields: int) -> int:
    """Nanoseconds since the epoch at the UTC date and time ``fields`` (year, month, day, h, m, s)."""
    return calendar.timegm(fields) * SECOND


# Monday 2026-11-23 06:30:12 UTC.
MORNING = utc(2026, 11, 23, 6, 30, 12)


class Machine:
    def __init__(self, ram_size: int = 64 * MIB, now: int = MORNING) -> None:
        self.now = now
        self.irq: list[bool] = []  # the interrupt line's changes
        self.cmos = Cmos(ram_size, clock=lambda: self.now, irq=self.irq.append)
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
    machine = Machine(now=utc(2026, 11, 23, hour, 0, 0))
    machine.write(REG_B, REG_B_12H_BCD)
    assert machine.read(HOURS) == bcd
    machine.write(REG_B, REG_B_DM)
    assert machine.read(HOURS) == binary


def test_day_of_week_counts_sunday_as_one() -> None:
    sunday = Machine(now=utc(2026, 11, 22, 12, 0, 0))
    saturday = Machine(now=utc(2026, 11, 28, 12, 0, 0))
    assert (sunday.read(DAY_OF_WEEK), saturday.read(DAY_OF_WEEK)) == (1, 7)


def test_time_follows_the_clock_on_every_read(machine: Machine) -> None:
    machine.now = MORNING + 61 * SECOND
    assert (machine.read(MINUTES), machine.read(SECONDS)) == (0x31, 0x13)


def set_clock(machine: Machine, values: dict[int, int]) -> None:
    """Set the RTC as Linux's mc146818_set_time() does: SET, write the registers, clear SET."""
    reg_b = machine.read(REG_B)
    machine.write(REG_B, reg_b | REG_B_SET)
    for index, value in values.items():
        machine.write(index, value)
    machine.write(REG_B, reg_b)


NEW_YEAR_2000 = {CENTURY: 0x20, YEAR: 0x00, MONTH: 0x01, DATE_OF_MONTH: 0x01, HOURS: 0x23, MINUTES: 0x59, SECONDS: 0x58}


def test_the_guest_sets_the_clock_with_the_set_bit_and_it_runs_on(machine: Machine) -> None:
    set_clock(machine, NEW_YEAR_2000)
    assert machine.clock() == (0x20, 0x00, 0x01, 0x01, 0x07, 0x23, 0x59, 0x58)  # a Saturday
    machine.now += 2 * SECOND
    assert machine.clock() == (0x20, 0x00, 0x01, 0x02, 0x01, 0x00, 0x00, 0x00)
    machine.now += 24 * 3600 * SECOND
    assert machine.clock() == (0x20, 0x00, 0x01, 0x03, 0x02, 0x00, 0x00, 0x00)


def test_set_bit_freezes_the_latched_time_registers(machine: Machine) -> None:
    machine.write(REG_B, REG_B_24H | REG_B_SET)
    machine.now += 3600 * SECOND
    assert machine.clock() == (0x20, 0x26, 0x11, 0x23, 0x02, 0x06, 0x30, 0x12)
    machine.write(MINUTES, 0x45)
    assert machine.read(MINUTES) == 0x45
    machine.write(REG_B, REG_B_24H)
    assert machine.clock() == (0x20, 0x26, 0x11, 0x23, 0x02, 0x06, 0x45, 0x12)


def test_a_time_write_without_set_changes_that_field_at_once(machine: Machine) -> None:
    machine.write(HOURS, 0x17)
    assert machine.clock() == (0x20, 0x26, 0x11, 0x23, 0x02, 0x17, 0x30, 0x12)
    machine.write(DAY_OF_WEEK, 0x05)  # the day of the week follows the date, not the write
    assert machine.read(DAY_OF_WEEK) == 0x02


def test_setting_the_clock_keeps_the_phase_of_its_second(machine: Machine) -> None:
    machine.now += 700_000_000  # 06:30:12.7
    set_clock(machine, {SECONDS: 0x40})
    machine.now += 299_999_999
    assert machine.read(SECONDS) == 0x40
    machine.now += 1
    assert machine.read(SECONDS) == 0x41


def test_binary_and_12_hour_times_are_decoded_in_the_mode_they_were_written_in(machine: Machine) -> None:
    machine.write(REG_B, REG_B_DM)  # binary, 12-hour
    set_clock(machine, {CENTURY: 19, YEAR: 99, MONTH: 12, DATE_OF_MONTH: 31, HOURS: HOURS_PM | 11, MINUTES: 59})
    machine.write(REG_B, REG_B_24H)  # BCD, 24-hour
    assert machine.clock()[:7] == (0x19, 0x99, 0x12, 0x31, 0x06, 0x23, 0x59)


@pytest.mark.parametrize(
    "values",
    [{MONTH: 0x13}, {MONTH: 0x00}, {DATE_OF_MONTH: 0x1A}, {MONTH: 0x02, DATE_OF_MONTH: 0x31}, {HOURS: 0x24},
     {SECONDS: 0x60}, {CENTURY: 0x00, YEAR: 0x00}],
)  # fmt: skip
def test_a_date_that_does_not_exist_leaves_the_clock_where_it_was(machine: Machine, values: dict[int, int]) -> None:
    set_clock(machine, values)
    assert machine.clock() == (0x20, 0x26, 0x11, 0x23, 0x02, 0x06, 0x30, 0x12)
    assert machine.cmos.stats["invalid_times"] == 1


def test_12_hour_hours_outside_1_to_12_are_refused(machine: Machine) -> None:
    machine.write(REG_B, REG_B_12H_BCD)
    for hours in (0x00, 0x13, HOURS_PM | 0x00, HOURS_PM | 0x13):
        machine.write(HOURS, hours)
    assert machine.cmos.stats["invalid_times"] == 4
    assert machine.read(HOURS) == 0x06


def test_a_binary_year_past_99_or_a_century_past_9999_is_refused(machine: Machine) -> None:
    machine.write(REG_B, REG_B_24H | REG_B_DM)
    machine.write(YEAR, 100)
    machine.write(CENTURY, 100)
    assert machine.cmos.stats["invalid_times"] == 2
    assert machine.read(YEAR) == 26


def test_alarm_registers_are_stored(machine: Machine) -> None:
    for index, value in ((SECONDS_ALARM, 0x45), (MINUTES_ALARM, 0x59), (HOURS_ALARM, 0xC0)):
        machine.write(index, value)
        assert machine.read(index) == value


# --- status registers -----------------------------------------------------------------


def test_status_a_reads_default_divider_and_stores_all_but_uip(machine: Machine) -> None:
    assert machine.read(REG_A) == 0x26
    machine.write(REG_A, 0xFF)
    assert machine.read(REG_A) == 0x7F


UIP = 0x80
UIP_NS = 244_140  # 8 cycles of 32.768 kHz, rounded down


def test_uip_is_set_in_the_last_244_us_before_each_update(machine: Machine) -> None:
    second_end = MORNING + SECOND
    for now, uip in ((MORNING, 0), (second_end - UIP_NS - 1, 0), (second_end - UIP_NS, UIP), (second_end - 1, UIP),
                     (second_end, 0)):  # fmt: skip
        machine.now = now
        assert machine.read(REG_A) == 0x26 | uip, f"{now - MORNING} ns into the second"


def test_uip_follows_the_guests_clock_and_stays_clear_while_set_stops_it(machine: Machine) -> None:
    machine.now += 300_000_000
    set_clock(machine, {SECONDS: 0x40})  # keeps the phase of the second
    machine.now = MORNING + SECOND - 100_000
    assert machine.read(REG_A) & UIP
    machine.write(REG_B, REG_B_24H | REG_B_SET)
    assert not machine.read(REG_A) & UIP


def test_status_b_defaults_to_24h_bcd_and_is_stored(machine: Machine) -> None:
    assert machine.read(REG_B) == 0x02
    machine.write(REG_B, 0x76)
    assert machine.read(REG_B) == 0x76


def test_status_c_reads_zero_and_d_reads_valid_ram_and_time(machine: Machine) -> None:
    machine.write(REG_C, 0xFF)
    machine.write(REG_D, 0x00)
    assert (machine.read(REG_C), machine.read(REG_D)) == (0x00, 0x80)


# --- the alarm --------------------------------------------------------------------------------

AF, IRQF = 0x20, 0x80
DONT_CARE = 0xC0


def set_alarm(machine: Machine, hours: int, minutes: int, seconds: int, reg_b: int = REG_B_24H | REG_B_AIE) -> None:
    machine.write(REG_B, reg_b)
    for index, value in ((HOURS_ALARM, hours), (MINUTES_ALARM, minutes), (SECONDS_ALARM, seconds)):
        machine.write(index, value)


def test_the_alarm_rings_with_af_irqf_and_irq_8_until_register_c_is_read(machine: Machine) -> None:
    set_alarm(machine, DONT_CARE, DONT_CARE, DONT_CARE)
    machine.cmos.ring_alarm()
    assert machine.irq == [True]
    assert machine.read(REG_C) == IRQF | AF
    assert machine.irq == [True, False]
    assert machine.read(REG_C) == 0  # reading clears the flags


def test_an_alarm_without_aie_sets_af_only(machine: Machine) -> None:
    set_alarm(machine, DONT_CARE, DONT_CARE, DONT_CARE, reg_b=REG_B_24H)
    machine.cmos.ring_alarm()
    assert (machine.read(REG_C), machine.irq) == (AF, [])


@pytest.mark.parametrize(
    ("alarm", "reg_b", "seconds"),
    [
        ((DONT_CARE, DONT_CARE, DONT_CARE), REG_B_24H, 1),  # the next update
        ((DONT_CARE, DONT_CARE, 0x15), REG_B_24H, 3),  # 06:30:15
        ((DONT_CARE, DONT_CARE, 0x12), REG_B_24H, 60),  # now is 06:30:12: the next match is a minute on
        ((DONT_CARE, 0x29, DONT_CARE), REG_B_24H, 3600 - 30 * 60 - 12 + 29 * 60),  # 07:29:00
        ((0x06, 0x30, 0x13), REG_B_24H, 1),
        ((0x06, 0x30, 0x12), REG_B_24H, 24 * 3600),  # tomorrow
        ((0x05, DONT_CARE, DONT_CARE), REG_B_24H, 23 * 3600 - 30 * 60 - 12),  # 05:00:00 tomorrow
        ((0x86, 0x00, 0x00), 0, 12 * 3600 - 30 * 60 - 12),  # 12-hour BCD: 6 PM
        ((6, 31, 0), REG_B_24H | REG_B_DM, 48),  # binary
        ((0xFF, 0xC1, 0xDA), REG_B_24H, 1),  # any byte from 0xc0 is "don't care"
    ],
)  # fmt: skip
def test_the_alarm_delay_is_the_time_until_the_alarm_registers_match(
    machine: Machine, alarm: tuple[int, int, int], reg_b: int, seconds: int
) -> None:
    set_alarm(machine, *alarm, reg_b=reg_b | REG_B_AIE)
    machine.now += 250_000_000  # 06:30:12.25: the alarm comes at the update, on a whole second
    assert machine.cmos.alarm_delay_ns() == seconds * SECOND - 250_000_000


@pytest.mark.parametrize(
    ("alarm", "reg_b"),
    [
        ((DONT_CARE, DONT_CARE, DONT_CARE), REG_B_24H),  # AIE clear
        ((DONT_CARE, DONT_CARE, 0x60), REG_B_24H | REG_B_AIE),  # no 60th second
        ((DONT_CARE, 0x5A, DONT_CARE), REG_B_24H | REG_B_AIE),  # not BCD
        ((0x24, DONT_CARE, DONT_CARE), REG_B_24H | REG_B_AIE),
        ((0x13, DONT_CARE, DONT_CARE), REG_B_AIE),  # 12-hour mode has no hour 13
        ((DONT_CARE, DONT_CARE, DONT_CARE), REG_B_24H | REG_B_AIE | REG_B_SET),  # the clock is stopped
    ],
)  # fmt: skip
def test_an_alarm_that_never_rings_has_no_delay(machine: Machine, alarm: tuple[int, int, int], reg_b: int) -> None:
    set_alarm(machine, *alarm, reg_b=reg_b)
    assert machine.cmos.alarm_delay_ns() is None


def test_the_alarm_follows_the_time_the_guest_set(machine: Machine) -> None:
    set_clock(machine, NEW_YEAR_2000)  # 23:59:58
    set_alarm(machine, 0x00, 0x00, 0x00)
    assert machine.cmos.alarm_delay_ns() == 2 * SECOND


VALUES = st.one_of(st.just(None), st.integers(0, 59))


@given(st.integers(0, 10**10), st.one_of(st.just(None), st.integers(0, 23)), VALUES, VALUES)
def test_next_alarm_is_the_first_matching_second_after_now(now: int, hour: int | None, minute: int | None,
                                                           second: int | None) -> None:  # fmt: skip
    def values(value: int | None, limit: int) -> range | tuple[int, ...]:
        return range(limit) if value is None else (value,)

    due = next_alarm(now, values(hour, 24), values(minute, 60), values(second, 60))
    assert due is not None and now < due <= now + 2 * 24 * 3600
    for moment in (due, *range(now + 1, min(due, now + 3700))):
        h, m, s = time.gmtime(moment)[3:6]
        matches = hour in (None, h) and minute in (None, m) and second in (None, s)
        assert matches == (moment == due), moment


def test_next_alarm_of_no_value_is_none() -> None:
    assert next_alarm(MORNING // SECOND, range(24), (), range(60)) is None


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


# --- state ----------------------------------------------------------------------------------


def test_a_restored_rtc_keeps_the_guests_offset_from_the_host_clock(machine: Machine) -> None:
    set_clock(machine, NEW_YEAR_2000)
    state = machine.cmos.save_state()
    week_later = Machine(now=MORNING + 7 * 24 * 3600 * SECOND)
    week_later.cmos.restore_state(state)
    assert week_later.clock() == (0x20, 0x00, 0x01, 0x08, 0x07, 0x23, 0x59, 0x58)


def test_an_rtc_saved_while_set_is_on_restores_its_written_registers(machine: Machine) -> None:
    machine.write(REG_B, REG_B_24H | REG_B_SET)
    machine.write(HOURS, 0x21)
    restored = Machine(now=MORNING + 3600 * SECOND)
    restored.cmos.restore_state(machine.cmos.save_state())
    assert restored.read(HOURS) == 0x21
    restored.write(REG_B, REG_B_24H)
    assert restored.clock() == (0x20, 0x26, 0x11, 0x23, 0x02, 0x21, 0x30, 0x12)


def test_a_restored_rtc_raises_its_interrupt_again_while_irqf_is_set(machine: Machine) -> None:
    set_alarm(machine, DONT_CARE, DONT_CARE, DONT_CARE)
    machine.cmos.ring_alarm()
    restored = Machine()
    restored.cmos.restore_state(machine.cmos.save_state())
    assert restored.irq == [True]
    assert restored.read(REG_C) == IRQF | AF


def test_restore_refuses_register_c_flags_the_model_never_sets(machine: Machine) -> None:
    state = machine.cmos.save_state()
    ram = bytearray(state.ram)
    ram[REG_C] = 0x10  # UF
    with pytest.raises(StateError, match="CmosState.ram holds register C = 0x10"):
        machine.cmos.restore_state(CmosState(state.index, state.nmi_disabled, bytes(ram), state.rtc_offset_ns))
    assert machine.cmos.save_state() == state


def test_an_rtc_restored_with_the_largest_offset_still_reads(machine: Machine) -> None:
    for offset in (-RTC_OFFSET_LIMIT_NS, RTC_OFFSET_LIMIT_NS):
        machine.cmos.restore_state(CmosState(0, False, bytes(128), offset))
        machine.clock()
