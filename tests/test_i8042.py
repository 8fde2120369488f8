"""The i8042 model: enough of the PS/2 controller to reset the machine."""

from __future__ import annotations

import logging

import pytest

from pykvm.devices.bus import Bus
from pykvm.devices.i8042 import (
    CMD_KBD_DISABLE,
    CMD_KBD_ENABLE,
    CMD_KBD_TEST,
    CMD_READ_CTR,
    CMD_READ_OUTPUT_PORT,
    CMD_RESET_CPU,
    CMD_SELF_TEST,
    CMD_WRITE_CTR,
    CMD_WRITE_OUTPUT_PORT,
    CTR_DEFAULT,
    CTR_KBD_DISABLE,
    I8042,
    I8042State,
    OUTPUT_PORT_DEFAULT,
    SELF_TEST_PASSED,
    STATUS_OUTPUT_FULL,
    STATUS_SYSTEM_FLAG,
)

DATA = 0x60
COMMAND = STATUS = 0x64


class Machine:
    def __init__(self) -> None:
        self.resets = 0
        self.i8042 = I8042(on_reset=self._reset)
        self.bus = Bus("pio")
        self.bus.register(DATA, I8042.SIZE, self.i8042)

    def _reset(self) -> None:
        self.resets += 1

    def inb(self, port: int) -> int:
        return self.bus.read(port, 1)

    def outb(self, port: int, value: int) -> None:
        self.bus.write(port, 1, value)


@pytest.fixture
def machine() -> Machine:
    return Machine()


def test_command_fe_resets_the_machine(machine: Machine) -> None:
    machine.outb(COMMAND, CMD_RESET_CPU)
    assert machine.resets == 1
    assert machine.i8042.stats["resets"] == 1


@pytest.mark.parametrize(("command", "resets"), [(0xF0, 1), (0xFC, 1), (0xFE, 1), (0xF1, 0), (0xFF, 0)])
def test_pulse_commands_reset_only_when_they_pulse_bit_0(machine: Machine, command: int, resets: int) -> None:
    machine.outb(COMMAND, command)
    assert machine.resets == resets


def test_output_port_write_with_bit_0_clear_resets(machine: Machine) -> None:
    machine.outb(COMMAND, CMD_WRITE_OUTPUT_PORT)
    machine.outb(DATA, 0xFE)
    assert machine.resets == 1


def test_output_port_write_with_bit_0_set_is_stored_without_reset(machine: Machine) -> None:
    machine.outb(COMMAND, CMD_READ_OUTPUT_PORT)
    assert machine.inb(DATA) == OUTPUT_PORT_DEFAULT
    machine.outb(COMMAND, CMD_WRITE_OUTPUT_PORT)
    machine.outb(DATA, 0xDF)
    machine.outb(COMMAND, CMD_READ_OUTPUT_PORT)
    assert machine.inb(DATA) == 0xDF
    assert machine.resets == 0


def test_self_test_puts_0x55_in_the_output_buffer(machine: Machine) -> None:
    assert machine.inb(STATUS) & STATUS_OUTPUT_FULL == 0
    machine.outb(COMMAND, CMD_SELF_TEST)
    assert machine.inb(STATUS) & STATUS_OUTPUT_FULL
    assert machine.inb(DATA) == SELF_TEST_PASSED
    assert machine.inb(STATUS) & STATUS_OUTPUT_FULL == 0


def test_interface_test_reports_no_error(machine: Machine) -> None:
    machine.outb(COMMAND, CMD_KBD_TEST)
    assert machine.inb(STATUS) & STATUS_OUTPUT_FULL
    assert machine.inb(DATA) == 0x00


def test_data_read_with_empty_output_buffer_returns_zero(machine: Machine) -> None:
    machine.outb(COMMAND, CMD_SELF_TEST)
    machine.inb(DATA)
    assert machine.inb(DATA) == 0x00


def test_command_byte_reads_back_what_command_0x60_wrote(machine: Machine) -> None:
    machine.outb(COMMAND, CMD_READ_CTR)
    assert machine.inb(DATA) == CTR_DEFAULT
    machine.outb(COMMAND, CMD_WRITE_CTR)
    machine.outb(DATA, 0x61)
    machine.outb(COMMAND, CMD_READ_CTR)
    assert machine.inb(DATA) == 0x61


def test_status_system_flag_mirrors_command_byte_bit_2(machine: Machine) -> None:
    assert machine.inb(STATUS) & STATUS_SYSTEM_FLAG
    machine.outb(COMMAND, CMD_WRITE_CTR)
    machine.outb(DATA, 0x00)
    assert machine.inb(STATUS) & STATUS_SYSTEM_FLAG == 0


def test_keyboard_disable_and_enable_are_recorded_in_the_command_byte(machine: Machine) -> None:
    machine.outb(COMMAND, CMD_KBD_DISABLE)
    assert machine.i8042.keyboard_enabled is False
    machine.outb(COMMAND, CMD_READ_CTR)
    assert machine.inb(DATA) & CTR_KBD_DISABLE
    machine.outb(COMMAND, CMD_KBD_ENABLE)
    assert machine.i8042.keyboard_enabled is True


def test_unknown_command_is_ignored_with_a_debug_line(machine: Machine, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="pykvm.devices.i8042"):
        machine.outb(COMMAND, 0xC0)
    assert "unknown controller command 0xc0" in caplog.text
    assert machine.i8042.stats["unknown_commands"] == 1
    assert machine.inb(STATUS) & STATUS_OUTPUT_FULL == 0
    assert machine.resets == 0


def test_data_write_without_pending_command_goes_to_the_absent_keyboard(machine: Machine) -> None:
    machine.outb(DATA, 0xFF)
    assert machine.i8042.stats["keyboard_writes"] == 1
    machine.outb(COMMAND, CMD_READ_CTR)
    assert machine.inb(DATA) == CTR_DEFAULT


def test_a_new_command_cancels_a_pending_parameter(machine: Machine) -> None:
    machine.outb(COMMAND, CMD_WRITE_OUTPUT_PORT)
    machine.outb(COMMAND, CMD_SELF_TEST)
    machine.outb(DATA, 0x00)
    assert machine.resets == 0


def test_ports_0x61_to_0x63_are_not_decoded(machine: Machine) -> None:
    for port in (0x61, 0x62, 0x63):
        machine.outb(port, 0x00)
        assert machine.inb(port) == 0xFF
    assert machine.i8042.stats["missed_reads"] == 3
    assert machine.i8042.stats["missed_writes"] == 3


def test_wide_status_read_splits_and_floats_past_the_range(machine: Machine) -> None:
    assert machine.bus.read(STATUS, 2) == 0xFF00 | STATUS_SYSTEM_FLAG
    assert machine.i8042.stats["wide_reads"] == 1


def test_hostile_accesses_never_raise(machine: Machine) -> None:
    for offset in range(-1, I8042.SIZE + 2):
        for size in (0, 1, 2, 3, 4, 8):
            for value in (0, 0x20, 0x60, 0xAA, 0xD1, 0xFE, 0xFF, 0xFFFF, 0xFFFFFFFF, -1):
                machine.i8042.write(offset, size, value)
                assert 0 <= machine.i8042.read(offset, size) <= max((1 << (8 * size)) - 1, 0)


# --- state --------------------------------------------------------------------------------------


def test_a_command_waiting_for_its_data_byte_survives_a_restore(machine: Machine) -> None:
    machine.outb(COMMAND, CMD_READ_CTR)  # a byte waits in the output buffer
    machine.outb(COMMAND, CMD_WRITE_OUTPUT_PORT)
    restored = Machine()
    restored.i8042.restore_state(machine.i8042.save_state())
    assert restored.resets == 0
    assert restored.inb(STATUS) == STATUS_OUTPUT_FULL | STATUS_SYSTEM_FLAG
    assert restored.inb(DATA) == CTR_DEFAULT
    restored.outb(DATA, 0xFE)  # the output port's reset line, low
    assert restored.resets == 1


def test_a_restored_command_byte_keeps_the_keyboard_disabled(machine: Machine) -> None:
    machine.outb(COMMAND, CMD_KBD_DISABLE)
    restored = Machine()
    restored.i8042.restore_state(machine.i8042.save_state())
    assert restored.i8042.keyboard_enabled is False
    assert restored.i8042.save_state() == I8042State(CTR_DEFAULT | CTR_KBD_DISABLE, OUTPUT_PORT_DEFAULT, None, None)
