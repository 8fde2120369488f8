"""The I/O thread: handlers run off the vCPU threads, a failing one does not stop the others,
and quiescing leaves nothing pending and nothing running."""

from __future__ import annotations

import os
import threading
import time
from typing import Iterator

import pytest

from pykvm.iothread import IoThread


@pytest.fixture
def iothread() -> Iterator[IoThread]:
    thread = IoThread()
    yield thread
    thread.close()


def eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def wait_until(condition, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def test_a_readable_descriptor_runs_its_handler_on_the_io_thread(iothread: IoThread) -> None:
    fd, seen = eventfd(), []
    iothread.add(fd, lambda: seen.append((os.eventfd_read(fd), threading.current_thread().name)))
    os.eventfd_write(fd, 3)
    assert wait_until(lambda: seen) and seen == [(3, "pykvm-io")]
    os.close(fd)


def test_a_failing_handler_is_counted_and_the_others_still_run(iothread: IoThread) -> None:
    bad, good, seen = eventfd(), eventfd(), []

    def broken() -> None:
        os.eventfd_read(bad)
        raise RuntimeError("device bug")

    iothread.add(bad, broken)
    iothread.add(good, lambda: seen.append(os.eventfd_read(good)))
    os.eventfd_write(bad, 1)
    os.eventfd_write(good, 1)
    assert wait_until(lambda: seen and iothread.stats["handler_errors"] == 1)
    os.close(bad)
    os.close(good)


def test_quiesce_runs_what_is_pending_then_nothing_runs_until_resume(iothread: IoThread) -> None:
    fd, seen = eventfd(), []
    iothread.add(fd, lambda: seen.append(os.eventfd_read(fd)))
    os.eventfd_write(fd, 1)
    iothread.quiesce()
    assert seen == [1]  # the notification sent before the pause was handled
    os.eventfd_write(fd, 1)
    time.sleep(0.2)
    assert seen == [1]  # parked: nothing runs
    iothread.resume()
    assert wait_until(lambda: seen == [1, 1])
    os.close(fd)


def test_a_removed_descriptor_is_no_longer_watched(iothread: IoThread) -> None:
    fd, seen = eventfd(), []
    iothread.add(fd, lambda: seen.append(os.eventfd_read(fd)))
    iothread.remove(fd)
    iothread.remove(fd)  # harmless
    os.eventfd_write(fd, 1)
    iothread.quiesce()
    iothread.resume()
    assert seen == []
    os.close(fd)


def test_close_stops_the_thread_even_while_it_is_parked() -> None:
    thread = IoThread()
    thread.quiesce()
    thread.close()
    thread.close()
    assert not any(t.name == "pykvm-io" and t.is_alive() for t in threading.enumerate() if t is not threading.current_thread())


def test_the_io_thread_cannot_quiesce_itself(iothread: IoThread) -> None:
    fd, errors = eventfd(), []

    def handler() -> None:
        os.eventfd_read(fd)
        try:
            iothread.quiesce()
        except RuntimeError as err:
            errors.append(str(err))

    iothread.add(fd, handler)
    os.eventfd_write(fd, 1)
    assert wait_until(lambda: errors) and "cannot quiesce itself" in errors[0]
    os.close(fd)
