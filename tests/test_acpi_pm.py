"""The ACPI PM1 registers and PM timer, driven through ports 0x600-0x60b as ACPICA drives them."""

from __future__ import annotations

import dataclasses

import pytest

from pykvm.devices.acpi_pm import (
    ACPI_PM_BASE,
    GBL_EN,
    PM1_EN_DEFINED,
    PWRBTN_EN,
    RTC_EN,
    RTC_STS,
    SCI_EN,
    SLP_EN,
    SLP_TYP_SHIFT,
    TMR_EN,
    TMR_STS,
    WAK_STS,
    AcpiPm,
)
from pykvm.devices.bus import Bus
from pykvm.errors import StateError
from pykvm.x86.acpi import build_acpi_tables
from tests.acpi_parse import fadt_field, fadt_gas, table

PM1_STS = ACPI_PM_BASE
PM1_EN = ACPI_PM_BASE + 2
PM1_CNT = ACPI_PM_BASE + 4
PM_TMR = ACPI_PM_BASE + 8
FREQUENCY = 3_579_545
SECOND = 1_000_000_000
EPOCH = 123_456_789_000  # the fake clock's reading at construction
S3 = 1
S5 = 5


class Machine:
    def __init__(self) -> None:
        self.now = EPOCH
        self.poweroffs = 0
        self.suspends = 0
        self.pm = AcpiPm(on_poweroff=self._poweroff, on_suspend=self._suspend, clock=lambda: self.now)
        self.bus = Bus("pio")
        self.bus.register(ACPI_PM_BASE, AcpiPm.SIZE, self.pm)

    def _poweroff(self) -> None:
        self.poweroffs += 1

    def _suspend(self) -> None:
        self.suspends += 1

    def at(self, ticks: int) -> None:
        """Set the clock to the first nanosecond at which the timer has counted ``ticks``."""
        self.now = EPOCH + -(-ticks * SECOND // FREQUENCY)

    def inb(self, port: int) -> int:
        return self.bus.read(port, 1)

    def inw(self, port: int) -> int:
        return self.bus.read(port, 2)

    def inl(self, port: int) -> int:
        return self.bus.read(port, 4)

    def outb(self, port: int, value: int) -> None:
        self.bus.write(port, 1, value)

    def outw(self, port: int, value: int) -> None:
        self.bus.write(port, 2, value)

    def outl(self, port: int, value: int) -> None:
        self.bus.write(port, 4, value)


@pytest.fixture
def machine() -> Machine:
    return Machine()


def sleep_value(sleep_type: int) -> int:
    return sleep_type << SLP_TYP_SHIFT | SLP_EN


# --- PM1_CNT: sleep states ----------------------------------------------------------------------


def test_slp_typ_5_with_slp_en_powers_off(machine: Machine) -> None:
    machine.outw(PM1_CNT, sleep_value(S5) | SCI_EN)  # what ACPICA writes for S5
    assert machine.poweroffs == 1
    assert machine.pm.stats["poweroffs"] == 1


@pytest.mark.parametrize("sleep_type", [0, 2, 3, 4, 6, 7])
def test_other_sleep_types_are_ignored(machine: Machine, sleep_type: int, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="pykvm.devices.acpi_pm"):
        machine.outw(PM1_CNT, sleep_value(sleep_type))
    assert (machine.poweroffs, machine.suspends, machine.pm.sleeping) == (0, 0, False)
    assert machine.pm.stats["ignored_sleeps"] == 1
    assert f"sleep type {sleep_type}" in caplog.text


def test_slp_typ_1_with_slp_en_suspends_until_a_wake(machine: Machine) -> None:
    machine.outw(PM1_CNT, sleep_value(S3) | SCI_EN)  # what ACPICA writes for S3, and kvm-unit-tests' s3
    assert (machine.suspends, machine.pm.sleeping, machine.pm.stats["suspends"]) == (1, True, 1)
    assert machine.inw(PM1_CNT) == S3 << SLP_TYP_SHIFT | SCI_EN
    machine.pm.wake(rtc_alarm=False)
    assert (machine.suspends, machine.pm.sleeping) == (1, False)


def test_a_second_s3_write_before_the_machine_stopped_suspends_once(machine: Machine) -> None:
    machine.outw(PM1_CNT, sleep_value(S3))
    machine.outw(PM1_CNT, sleep_value(S3))  # another vCPU's, in the same instant
    assert (machine.suspends, machine.pm.stats["suspends"]) == (1, 1)


@pytest.mark.parametrize(("rtc_alarm", "status"), [(True, WAK_STS | RTC_STS), (False, WAK_STS)])
def test_a_wake_sets_wak_sts_and_rtc_sts_for_the_alarm(machine: Machine, rtc_alarm: bool, status: int) -> None:
    machine.outw(PM1_CNT, sleep_value(S3))
    machine.pm.wake(rtc_alarm=rtc_alarm)
    assert machine.inw(PM1_STS) == status
    machine.outw(PM1_STS, status)  # write 1 to clear, as OSPM does on resume
    assert machine.inw(PM1_STS) == 0


def test_rtc_en_makes_the_rtc_alarm_a_wake_event(machine: Machine) -> None:
    assert not machine.pm.rtc_wake_enabled
    machine.outw(PM1_EN, RTC_EN)  # what kvm-unit-tests' s3 writes
    assert machine.pm.rtc_wake_enabled
    assert machine.inw(PM1_EN) == RTC_EN
    machine.outw(PM1_EN, 0)
    assert not machine.pm.rtc_wake_enabled


def test_slp_typ_without_slp_en_does_nothing(machine: Machine) -> None:
    machine.outw(PM1_CNT, S5 << SLP_TYP_SHIFT)
    assert machine.poweroffs == 0
    assert machine.inw(PM1_CNT) == S5 << SLP_TYP_SHIFT | SCI_EN  # SLP_TYP is kept, as ACPICA expects


def test_acpica_sequence_type_then_enable_powers_off(machine: Machine) -> None:
    # acpi_hw_legacy_sleep(): write SLP_TYP, then read-modify-write SLP_EN.
    machine.outw(PM1_CNT, machine.inw(PM1_CNT) | S5 << SLP_TYP_SHIFT)
    machine.outw(PM1_CNT, machine.inw(PM1_CNT) | SLP_EN)
    assert machine.poweroffs == 1


def test_byte_write_to_the_high_byte_merges_with_the_low_byte(machine: Machine) -> None:
    machine.outb(PM1_CNT + 1, sleep_value(S5) >> 8)
    assert machine.poweroffs == 1


def test_byte_write_to_the_low_byte_keeps_the_stored_sleep_type(machine: Machine) -> None:
    machine.outw(PM1_CNT, S5 << SLP_TYP_SHIFT)
    machine.outb(PM1_CNT, 0x00)
    assert machine.inw(PM1_CNT) == S5 << SLP_TYP_SHIFT | SCI_EN
    assert machine.poweroffs == 0


def test_sci_en_always_reads_1_and_slp_en_always_reads_0(machine: Machine) -> None:
    assert machine.inw(PM1_CNT) == SCI_EN
    machine.outw(PM1_CNT, 0)
    assert machine.inw(PM1_CNT) & SCI_EN
    machine.outw(PM1_CNT, sleep_value(1))
    assert not machine.inw(PM1_CNT) & SLP_EN


def test_pm1_cnt_byte_reads(machine: Machine) -> None:
    machine.outw(PM1_CNT, 3 << SLP_TYP_SHIFT)
    assert (machine.inb(PM1_CNT), machine.inb(PM1_CNT + 1)) == (SCI_EN, (3 << SLP_TYP_SHIFT) >> 8)


# --- PM1_STS, PM1_EN ----------------------------------------------------------------------------


def test_status_and_enable_start_clear(machine: Machine) -> None:
    assert machine.inl(PM1_STS) == 0


def test_pm1_en_stores_the_defined_bits(machine: Machine) -> None:
    machine.outw(PM1_EN, 0xFFFF)
    assert machine.inw(PM1_EN) == PM1_EN_DEFINED
    machine.outw(PM1_EN, GBL_EN | PWRBTN_EN)
    assert machine.inw(PM1_EN) == GBL_EN | PWRBTN_EN  # ACPICA checks that GBL_EN sticks


def test_pm1_en_byte_writes_change_one_byte(machine: Machine) -> None:
    machine.outw(PM1_EN, TMR_EN | PWRBTN_EN)
    machine.outb(PM1_EN + 1, 0)
    assert machine.inw(PM1_EN) == TMR_EN


def test_tmr_sts_is_set_when_the_timer_top_bit_changes(machine: Machine) -> None:
    machine.at((1 << 31) - 1)
    assert not machine.inw(PM1_STS) & TMR_STS
    machine.at(1 << 31)
    assert machine.inw(PM1_STS) & TMR_STS


def test_pm1_sts_is_write_1_to_clear(machine: Machine) -> None:
    machine.at(1 << 31)
    machine.outw(PM1_STS, 0)
    assert machine.inw(PM1_STS) & TMR_STS  # writing 0 keeps it
    machine.outw(PM1_STS, ~TMR_STS & 0xFFFF)
    assert machine.inw(PM1_STS) & TMR_STS  # writing 1 to the other bits keeps it
    machine.outw(PM1_STS, TMR_STS)
    assert machine.inw(PM1_STS) == 0
    machine.at((1 << 32) - 1)
    assert machine.inw(PM1_STS) == 0  # still in the same half of the period
    machine.at(1 << 32)
    assert machine.inw(PM1_STS) == TMR_STS  # the top bit changed again


def test_dword_write_at_0_clears_status_and_sets_enable(machine: Machine) -> None:
    machine.at(1 << 31)
    machine.outl(PM1_STS, PWRBTN_EN << 16 | TMR_STS)
    assert machine.inl(PM1_STS) == PWRBTN_EN << 16


# --- PM_TMR --------------------------------------------------------------------------------------


def test_timer_starts_at_0(machine: Machine) -> None:
    assert machine.inl(PM_TMR) == 0


@pytest.mark.parametrize(
    ("elapsed_ns", "ticks"),
    [(1_000, 3), (1_000_000, 3_579), (SECOND, FREQUENCY), (10 * SECOND, 10 * FREQUENCY)],
)
def test_timer_counts_at_3_579545_mhz(machine: Machine, elapsed_ns: int, ticks: int) -> None:
    machine.now = EPOCH + elapsed_ns
    assert machine.inl(PM_TMR) == ticks


def test_timer_wraps_at_32_bits(machine: Machine) -> None:
    machine.at((1 << 32) - 1)
    assert machine.inl(PM_TMR) == 0xFFFF_FFFF
    machine.at((1 << 32) + 5)
    assert machine.inl(PM_TMR) == 5


def test_timer_width_agrees_with_the_fadt() -> None:
    raw = table(acpi := build_acpi_tables(1), acpi.tables["FACP"])[1]
    tmr_val_ext = bool(fadt_field(raw, 112, 4) & 1 << 8)
    machine = Machine()
    machine.at(1 << 24)
    assert tmr_val_ext == (machine.inl(PM_TMR) == 1 << 24)


def test_fadt_blocks_fall_inside_the_device() -> None:
    raw = table(acpi := build_acpi_tables(1), acpi.tables["FACP"])[1]
    for x_block in (148, 172, 208):  # X_PM1a_EVT_BLK, X_PM1a_CNT_BLK, X_PM_TMR_BLK
        gas = fadt_gas(raw, x_block)
        assert gas.address >= ACPI_PM_BASE and gas.address + gas.bit_width // 8 <= ACPI_PM_BASE + AcpiPm.SIZE


def test_timer_is_read_only(machine: Machine) -> None:
    machine.at(1000)
    machine.outl(PM_TMR, 0)
    assert machine.inl(PM_TMR) == 1000
    assert machine.pm.stats["timer_writes"] == 1


def test_timer_byte_reads(machine: Machine) -> None:
    machine.at(0x12345678)
    assert [machine.inb(PM_TMR + n) for n in range(4)] == [0x78, 0x56, 0x34, 0x12]
    assert machine.inw(PM_TMR + 2) == 0x1234


def test_clock_going_backwards_reads_0(machine: Machine) -> None:
    machine.now = EPOCH - SECOND
    assert machine.inl(PM_TMR) == 0


# --- decoding ------------------------------------------------------------------------------------


def test_gap_between_control_and_timer_floats(machine: Machine) -> None:
    assert machine.inw(ACPI_PM_BASE + 6) == 0xFFFF
    machine.outw(ACPI_PM_BASE + 6, 0)
    assert machine.pm.stats["missed_reads"] == 2 and machine.pm.stats["missed_writes"] == 2


def test_read_running_past_the_range_floats(machine: Machine) -> None:
    machine.at(0xABCD)
    assert machine.inl(PM_TMR + 2) == 0xFFFF_0000


def test_unaligned_word_spans_two_registers(machine: Machine) -> None:
    machine.outw(PM1_EN, PWRBTN_EN)
    assert machine.inw(PM1_STS + 1) == (PWRBTN_EN & 0xFF) << 8  # PM1_STS high byte, PM1_EN low byte


def test_hostile_accesses_never_raise(machine: Machine) -> None:
    for offset in range(-1, AcpiPm.SIZE + 3):
        for size in (0, 1, 2, 3, 4, 8):
            for value in (0, 0x2000, 0x2400, 0x3400, 0x3401, 0xFFFF, 0xFFFFFFFF, -1, 1 << 70):
                machine.pm.write(offset, size, value)
                assert 0 <= machine.pm.read(offset, size) <= max((1 << (8 * size)) - 1, 0)
    assert machine.poweroffs > 0  # 0x3400 at offset 4 is S5
    assert machine.suspends == 1  # 0x2400 at offset 4 is S3; the device sleeps until woken


# --- state ---------------------------------------------------------------------------------------


def test_a_restored_timer_counts_on_from_its_saved_value_whatever_the_host_clock(machine: Machine) -> None:
    machine.at(1_000_000)
    machine.now += 123  # part of a tick: the phase is kept too
    state = machine.pm.save_state()
    restored = Machine()
    restored.now = 7  # another host, whose monotonic clock reads something else entirely
    restored.pm.restore_state(state)
    assert restored.inl(PM_TMR) == 1_000_000
    for elapsed in (1, 100, SECOND):
        machine.now += elapsed
        restored.now += elapsed
        assert restored.inl(PM_TMR) == machine.inl(PM_TMR)


def test_a_restored_timer_keeps_the_half_period_tmr_sts_was_cleared_in(machine: Machine) -> None:
    machine.at(1 << 31)
    machine.outw(PM1_STS, TMR_STS)
    machine.at((1 << 32) - 1)
    restored = Machine()
    restored.pm.restore_state(machine.pm.save_state())
    assert restored.inw(PM1_STS) == 0
    restored.now += 1_000
    assert restored.inw(PM1_STS) == TMR_STS


def test_a_sleeping_device_restores_asleep_and_wakes(machine: Machine) -> None:
    machine.outw(PM1_EN, RTC_EN)
    machine.outw(PM1_CNT, sleep_value(S3))
    restored = Machine()
    restored.pm.restore_state(machine.pm.save_state())
    assert (restored.pm.sleeping, restored.pm.rtc_wake_enabled, restored.suspends) == (True, True, 0)
    restored.pm.wake(rtc_alarm=True)
    restored_state = restored.pm.save_state()
    assert (restored_state.sleeping, restored_state.sts) == (False, WAK_STS | RTC_STS)
    restored.pm.restore_state(machine.pm.save_state())
    assert restored.pm.sleeping


def test_restore_refuses_a_pm1_cnt_without_sci_en(machine: Machine) -> None:
    state = machine.pm.save_state()
    with pytest.raises(StateError, match=r"AcpiPmState.cnt is 0x0: SCI_EN"):
        machine.pm.restore_state(dataclasses.replace(state, cnt=0))
    assert machine.pm.save_state() == state


def test_restore_refuses_a_tmr_sts_clear_in_a_half_period_the_timer_has_not_reached(machine: Machine) -> None:
    state = dataclasses.replace(machine.pm.save_state(), timer_ns=SECOND, timer_half=1)
    with pytest.raises(StateError, match="AcpiPmState.timer_half is 1, not an integer from 0 to 0"):
        machine.pm.restore_state(state)
