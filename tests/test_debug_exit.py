"""QEMU's isa-debug-exit device and its process-status rule."""

from __future__ import annotations

import pytest

from pykvm.devices.bus import Bus
from pykvm.devices.debug_exit import DEBUG_EXIT_PORT, DebugExit, exit_status


class Machine:
    def __init__(self) -> None:
        self.exits: list[int] = []
        self.device = DebugExit(self.exits.append)
        self.bus = Bus("pio")
        self.bus.register(DEBUG_EXIT_PORT, DebugExit.SIZE, self.device)


@pytest.mark.parametrize(("size", "reported"), [(1, 0x78), (2, 0x5678), (4, 0x12345678)])
def test_write_reports_the_value_masked_to_the_access_size(size: int, reported: int) -> None:
    machine = Machine()
    machine.bus.write(DEBUG_EXIT_PORT, size, 0x12345678)
    assert machine.exits == [reported]


def test_write_at_any_offset_reports_the_value() -> None:
    machine = Machine()
    for offset in range(DebugExit.SIZE):
        machine.bus.write(DEBUG_EXIT_PORT + offset, 1, offset)
    assert machine.exits == [0, 1, 2, 3]
    assert machine.device.stats["exits"] == 4


@pytest.mark.parametrize("size", [1, 2, 4])
def test_reads_return_zero_and_do_not_exit(size: int) -> None:
    machine = Machine()
    assert machine.bus.read(DEBUG_EXIT_PORT, size) == 0
    assert machine.exits == []


@pytest.mark.parametrize(("value", "status"), [(0, 1), (1, 3), (0x10, 33), (0x7F, 255)])
def test_exit_status_is_value_shifted_left_or_one(value: int, status: int) -> None:
    assert exit_status(value) == status


@pytest.mark.parametrize(("value", "status"), [(0x80, 1), (0x81, 3), (0xFFFF, 255), (0xFFFFFFFF, 255)])
def test_exit_status_keeps_the_low_8_bits_a_process_status_has(value: int, status: int) -> None:
    assert exit_status(value) == status


@pytest.mark.parametrize("size", [1, 2, 4])
def test_status_of_a_written_value_for_each_access_size(size: int) -> None:
    machine = Machine()
    machine.bus.write(DEBUG_EXIT_PORT, size, 0x21)  # a test kernel's "failure 0x21"
    assert [exit_status(value) for value in machine.exits] == [0x43]


def test_hostile_accesses_never_raise() -> None:
    machine = Machine()
    for offset in range(-1, DebugExit.SIZE + 2):
        for size in (0, 1, 2, 3, 4, 8):
            for value in (0, 0xFF, 0xFFFFFFFF, -1, 1 << 70):
                machine.device.write(offset, size, value)
                assert machine.device.read(offset, size) == 0
    assert all(0 <= value < 1 << 64 for value in machine.exits)
