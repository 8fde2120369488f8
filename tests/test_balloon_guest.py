"""guests/asm/balloon.asm on /dev/kvm: a guest's balloon driver follows the host's target and the
pykvm process's RSS (psutil) falls by at least 90 % of what it inflates; deflating gives it back.

From the library (``vm.balloon.target``) and from another process through the control socket
(``pykvm run ... --control PATH`` + ``pykvm ctl PATH balloon 64M``).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import psutil
import pytest

from pykvm.control_socket import request
from pykvm.machine import Machine
from pykvm.result import RunResult
from pykvm.x86.layout import MIB

from conftest import guest

pytestmark = pytest.mark.kvm

RAM = 128 * MIB
POOL = 126 * MIB  # the guest's pool: from 2 MiB (past its image) to the end of RAM
INFLATE = 64 * MIB


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


class Running:
    """A balloon guest running on a thread of its own."""

    def __init__(self, vm: Machine, timeout: float = 120) -> None:
        self.vm = vm
        self.result: RunResult | None = None
        self.thread = threading.Thread(target=self._run, args=(timeout,), name="balloon-guest")
        self.thread.start()

    def _run(self, timeout: float) -> None:
        self.result = self.vm.run(timeout=timeout)

    def quit(self) -> RunResult:
        self.vm.serial.receive(b"q\n")
        self.thread.join(60)
        assert self.result is not None, "the guest did not stop"
        return self.result


@pytest.fixture
def start_guest(machine_factory) -> Callable[..., Running]:  # type: ignore[no-untyped-def]
    started: list[Running] = []

    def start(cmdline: str = "ws=16", memory: int = RAM, **config: object) -> Running:
        vm = machine_factory(memory=memory, balloon=True, **config)
        vm.load(guest("balloon.bin"), mode="long", cmdline=cmdline)
        running = Running(vm)
        started.append(running)
        wait_for(lambda: "memtot" in vm.balloon.guest_stats(), 30, "the guest's first statistics")
        return running

    yield start
    for running in started:
        if running.thread.is_alive():
            running.vm.serial.receive(b"q\n")
            running.thread.join(60)


def rss() -> int:
    return psutil.Process().memory_info().rss


def test_the_guest_inflates_to_the_target_and_rss_falls_by_90_percent_then_deflating_gives_it_back(start_guest) -> None:
    running = start_guest("ws=16")
    vm = running.vm
    assert vm.balloon.negotiated["stats"]
    before, guest_before = rss(), vm.memory.resident()["rss"]
    vm.balloon.target = INFLATE
    assert vm.balloon.wait_actual(INFLATE, 30), vm.balloon.actual
    after, guest_after = rss(), vm.memory.resident()["rss"]
    assert before - after >= 0.9 * INFLATE, f"RSS {before / MIB:.1f} -> {after / MIB:.1f} MiB"
    assert guest_before - guest_after >= 0.9 * INFLATE
    assert vm.balloon.counters()["held_bytes"] == INFLATE

    assert vm.balloon.refresh_stats(5)
    stats = vm.balloon.guest_stats()
    assert stats["memtot"] == RAM - INFLATE
    assert stats["memtot"] - stats["avail"] == 18 * MIB  # the 2 MiB below the pool + the 16 MiB working set

    vm.balloon.target = 0
    assert vm.balloon.wait_actual(0, 30)
    assert vm.balloon.counters()["deflated_bytes"] == INFLATE and vm.balloon.counters()["held_bytes"] == 0
    deflated = rss()
    vm.serial.receive(b"w124\n")  # the guest uses its memory again, the deflated pages included
    wait_for(lambda: rss() - deflated >= 0.9 * 62 * MIB, 30, "the RSS to grow back")

    result = running.quit()
    assert result.status == 1, result.diagnosis
    serial = result.serial.decode()
    assert serial.startswith("balloon: ram 128 MiB, pool 126 MiB, stats on, working set 16 MiB, touched 126 MiB\n")
    assert "balloon: 16384 pages (64 MiB)\nballoon: 0 pages (0 MiB)\nballoon: working set 124 MiB\n" in serial
    assert serial.endswith("balloon: bye\n")


def test_a_target_beyond_the_guests_pool_fills_it_and_says_so(start_guest) -> None:
    running = start_guest("ws=8 touch=32")
    vm = running.vm
    vm.balloon.target = "127M"
    assert vm.balloon.wait_actual(POOL, 30), vm.balloon.actual
    result = running.quit()
    assert f"balloon: full at {POOL // 4096} pages\n" in result.serial.decode()


def test_the_statistics_follow_the_working_set(start_guest) -> None:
    running = start_guest("ws=16")
    vm = running.vm
    first = vm.balloon.guest_stats()
    assert first == {"memfree": 0, "memtot": RAM, "avail": POOL - 16 * MIB, "caches": POOL - 16 * MIB}
    vm.serial.receive(b"w48\n")
    wait_for(lambda: vm.balloon.refresh_stats(1) and vm.balloon.guest_stats()["avail"] == POOL - 48 * MIB, 30,
             "the statistics of the new working set")  # fmt: skip
    assert vm.balloon.stats_generation >= 2
    running.quit()


def test_without_a_balloon_the_guest_says_no_device(run_guest) -> None:
    result = run_guest(guest("balloon.bin"), mode="long", timeout=60)
    assert result.status == 5 and result.serial == b"balloon: no device\n"


def test_pykvm_ctl_from_another_process_makes_the_running_guest_give_back_memory(tmp_path: Path) -> None:
    """The balloon driven from another process through the control socket: pykvm's RSS falls by what
    the guest gives back, and the balloon deflates again."""
    sock = tmp_path / "vm.sock"
    run = subprocess.Popen(
        [sys.executable, "-m", "pykvm", "run", str(guest("balloon.bin")), "--mode", "long", "-m", "128M",
         "--balloon", "--control", str(sock), "--cmdline", "ws=16", "--timeout", "120"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip

    def ctl(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pykvm", "ctl", str(sock), *args], capture_output=True, text=True,
                              timeout=120)  # fmt: skip

    try:
        wait_for(lambda: sock.exists() and request(str(sock), {"cmd": "stats", "timeout": 0.2}).get("stats"), 60,
                 "the guest's statistics on the control socket")  # fmt: skip
        process = psutil.Process(run.pid)
        before = process.memory_info().rss
        out = ctl("balloon", "64M", "--wait", "60")
        assert out.returncode == 0 and out.stdout == "balloon: target 64.0 MiB, actual 64.0 MiB\n", out.stderr
        after = process.memory_info().rss
        assert before - after >= 0.9 * INFLATE, f"RSS of pykvm run {before / MIB:.1f} -> {after / MIB:.1f} MiB"
        info = ctl("info")
        assert info.returncode == 0 and "balloon target 64.0 MiB actual 64.0 MiB" in info.stdout
        stats = ctl("stats")
        assert stats.returncode == 0 and "guest: total 64.0 MiB" in stats.stdout
        assert ctl("balloon", "0", "--wait", "60").stdout == "balloon: target 0.0 MiB, actual 0.0 MiB\n"
        out_stdout, out_stderr = run.communicate(b"q\n", timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 1, out_stderr
    assert b"balloon: 16384 pages (64 MiB)\nballoon: 0 pages (0 MiB)\nballoon: bye\n" in out_stdout
    assert not sock.exists()


def test_pykvm_run_balloon_options_fail_in_one_line() -> None:
    out = subprocess.run([sys.executable, "-m", "pykvm", "run", str(guest("balloon.bin")), "--mode", "long", "--balloon",
                          "--no-irqchip"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 2 and out.stderr == "pykvm: error: the balloon is a virtio device: it needs the in-kernel irqchip\n"


def test_pykvm_run_share_pages_runs_a_guest() -> None:
    out = subprocess.run([sys.executable, "-m", "pykvm", "run", str(guest("hello_long.bin")), "--mode", "long",
                          "--share-pages"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 1 and out.stdout == "Hello from long mode\n"
