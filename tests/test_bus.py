"""The address bus (ranges to devices) and the constant-read port."""

from __future__ import annotations

import logging

import pytest

from pykvm.devices.bus import Bus
from pykvm.devices.ports import ConstantPort, size_mask
from pykvm.errors import BusError


class Recorder:
    """A device that answers reads with a fixed value and records every access."""

    def __init__(self, value: int = 0) -> None:
        self.value = value
        self.accesses: list[tuple[str, int, int, int | None]] = []

    def read(self, offset: int, size: int) -> int:
        self.accesses.append(("read", offset, size, None))
        return self.value

    def write(self, offset: int, size: int, value: int) -> None:
        self.accesses.append(("write", offset, size, value))


@pytest.fixture
def bus() -> Bus:
    bus = Bus("pio")
    bus.register(0x100, 0x10, Recorder())
    return bus


# --- registration ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base", "length"),
    [(0x100, 0x10), (0xF8, 0x10), (0x108, 0x10), (0x104, 0x4), (0x0, 0x1000), (0x10F, 1), (0xFF, 2)],
)
def test_register_rejects_an_overlapping_range(bus: Bus, base: int, length: int) -> None:
    with pytest.raises(BusError, match="overlaps"):
        bus.register(base, length, Recorder())


def test_register_accepts_ranges_that_touch_at_the_edges(bus: Bus) -> None:
    bus.register(0xF0, 0x10, Recorder())
    bus.register(0x110, 0x10, Recorder())
    assert bus.find(0xFF) is not None and bus.find(0x110) is not None


@pytest.mark.parametrize("length", [0, -1])
def test_register_rejects_an_empty_range(bus: Bus, length: int) -> None:
    with pytest.raises(BusError, match="empty"):
        bus.register(0x200, length, Recorder())


def test_a_rejected_registration_leaves_the_bus_unchanged(bus: Bus) -> None:
    with pytest.raises(BusError):
        bus.register(0x108, 0x10, Recorder())
    assert bus.find(0x110) is None
    assert bus.find(0x10F) is not None


# --- find -----------------------------------------------------------------------------


def test_find_maps_the_first_and_last_address_to_offsets(bus: Bus) -> None:
    first, last = bus.find(0x100), bus.find(0x10F)
    assert first is not None and last is not None
    assert (first[1], last[1]) == (0, 0xF)
    assert first[0] is last[0]


def test_find_returns_none_just_outside_the_range(bus: Bus) -> None:
    assert bus.find(0xFF) is None
    assert bus.find(0x110) is None
    assert bus.find(0) is None


def test_find_picks_the_right_device_between_neighbours(bus: Bus) -> None:
    left, right = Recorder(), Recorder()
    bus.register(0xF0, 0x10, left)
    bus.register(0x110, 0x1, right)
    assert bus.find(0xFF) == (left, 0xF)
    assert bus.find(0x110) == (right, 0)
    assert bus.find(0x111) is None


# --- dispatch --------------------------------------------------------------------------


def test_read_and_write_reach_the_device_with_its_offset() -> None:
    device = Recorder(value=0x1234)
    bus = Bus("pio")
    bus.register(0x3F8, 8, device)
    bus.write(0x3FB, 1, 0x03)
    assert bus.read(0x3FD, 2) == 0x1234
    assert device.accesses == [("write", 3, 1, 0x03), ("read", 5, 2, None)]


def test_device_reads_are_masked_to_the_access_size() -> None:
    bus = Bus("pio")
    bus.register(0x80, 1, Recorder(value=0x1_2345_6789))
    assert [bus.read(0x80, size) for size in (1, 2, 4)] == [0x89, 0x6789, 0x2345_6789]


@pytest.mark.parametrize("size", [1, 2, 4])
def test_unclaimed_reads_are_all_ones_for_each_size_and_counted(bus: Bus, size: int) -> None:
    assert bus.read(0x300, size) == size_mask(size)
    assert bus.read(0x300, size) == size_mask(size)
    assert bus.unclaimed[(0x300, "read")] == 2


def test_unclaimed_writes_are_dropped_counted_and_logged(bus: Bus, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="pykvm.devices.bus"):
        bus.write(0x110, 1, 0xAA)
    assert bus.unclaimed[(0x110, "write")] == 1
    assert "unclaimed 1-byte write at 0x110" in caplog.text


# --- ConstantPort ------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 4])
def test_constant_port_reads_all_ones_by_default(size: int) -> None:
    bus = Bus("pio")
    bus.register(0x80, 1, ConstantPort())
    assert bus.read(0x80, size) == size_mask(size)


def test_constant_port_reads_its_value_masked_at_any_offset() -> None:
    port = ConstantPort(0xA5A5_1234)
    assert [port.read(offset, 2) for offset in range(4)] == [0x1234] * 4
    assert port.read(0, 1) == 0x34
    assert port.read(3, 4) == 0xA5A5_1234


def test_constant_port_ignores_writes_and_counts_them() -> None:
    port = ConstantPort(0x00)
    bus = Bus("pio")
    bus.register(0x80, 1, port)
    bus.write(0x80, 1, 0x2A)  # a POST code
    bus.write(0x80, 2, 0x1_FFFF)
    assert bus.read(0x80, 1) == 0x00
    assert port.stats["writes"] == 2


def test_constant_port_hostile_accesses_never_raise() -> None:
    port = ConstantPort()
    for offset in range(-1, 3):
        for size in (0, 1, 2, 3, 4, 8):
            for value in (0, 0xFF, -1, 1 << 70):
                port.write(offset, size, value)
                assert 0 <= port.read(offset, size) <= size_mask(size)
