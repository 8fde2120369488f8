"""Logging a guest cannot flood: a burst per period, the rest counted and then said."""

from __future__ import annotations

import logging

import pytest

from pykvm.devices.virtio import mmio
from pykvm.devices.virtio.rng import VirtioRng
from pykvm.logs import RateLimitedLog
from pykvm.memory import GuestMemory
from virtio_driver import connect


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_per_period_then_a_count_of_what_was_left_out(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    limited = RateLimitedLog(logging.getLogger("test"), 3, 60.0, clock)
    with caplog.at_level(logging.WARNING):
        logged = [limited.warning("message %d", i) for i in range(10)]
        clock.now = 61.0
        limited.warning("after the period")
    assert logged == [True] * 3 + [False] * 7 and limited.total_suppressed == 7
    texts = [record.getMessage() for record in caplog.records]
    assert texts[:2] == ["message 0", "message 1"] and texts[2].startswith("message 2 (further ones are counted")
    assert texts[3:] == ["(7 similar messages were left out in the last 60 s)", "after the period"]


def test_a_driver_failing_activation_in_a_loop_logs_a_few_lines_not_thousands(caplog: pytest.LogCaptureFixture) -> None:
    with GuestMemory([(0, 2 << 20)]) as memory, caplog.at_level(logging.WARNING):
        driver = connect(VirtioRng(), memory)
        for _ in range(2000):
            driver.negotiate(driver_ok=False)
            driver.write_reg(mmio.QUEUE_SEL, 0)
            driver.write_reg(mmio.QUEUE_READY, 0)
            driver.write_reg(mmio.QUEUE_NUM, 3)  # not a power of two: DRIVER_OK must refuse it
            driver.write_reg(mmio.QUEUE_READY, 1)
            driver.add_status(mmio.DRIVER_OK)
        assert driver.transport.stats["needs_reset"] == 2000
    assert len(caplog.records) <= mmio.LOUD_RESETS
