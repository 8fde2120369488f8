"""Snapshots from the command line: ``pykvm ctl PATH snapshot``, ``pykvm run --restore``,
``pykvm snapshot info``, record and replay, lifecycle events, and ``ctl info`` on a running machine."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from command import assert_one_line_error, pykvm
from conftest import guest
from pykvm import Machine

pytestmark = pytest.mark.kvm


class RunningPykvm:
    """``pykvm run ... --control SOCKET`` in the background."""

    def __init__(self, socket: Path, *args: str) -> None:
        self.socket = socket
        self.process = subprocess.Popen([sys.executable, "-m", "pykvm", "run", *args, "--control", str(socket)],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        deadline = time.monotonic() + 60
        while not socket.exists():
            assert self.process.poll() is None and time.monotonic() < deadline, self.process.communicate()
            time.sleep(0.02)

    def ctl(self, *args: str) -> subprocess.CompletedProcess:
        return pykvm("ctl", str(self.socket), *args)

    def finish(self) -> tuple[int, bytes, bytes]:
        out, err = self.process.communicate(timeout=120)
        return self.process.returncode, out, err


def test_a_machine_saved_from_another_process_goes_on_where_it_was_in_a_new_one(tmp_path) -> None:
    running = RunningPykvm(tmp_path / "vm.sock", str(guest("counter.bin")), "--mode", "long", "--timeout", "120")
    time.sleep(0.3)  # let it count a while
    saved = running.ctl("snapshot", str(tmp_path / "snap"))
    assert saved.returncode == 0 and saved.stdout.startswith(b"snapshot: "), saved.stderr
    status, original, _ = running.finish()
    assert status == 1 and original.endswith(b"count 400\ninput 0 sum 0000000000000000\n")
    restored = pykvm("run", "--restore", str(tmp_path / "snap"), "--timeout", "120")
    assert restored.returncode == 1, restored.stderr
    rest = restored.stdout  # what the original printed after the snapshot (which may fall inside a line)
    assert 0 < len(rest) < len(original) and original.endswith(rest)


def test_ctl_snapshot_stop_ends_the_run_once_it_is_saved(tmp_path) -> None:
    running = RunningPykvm(tmp_path / "vm.sock", str(guest("counter.bin")), "--mode", "long", "--timeout", "120")
    assert running.ctl("snapshot", str(tmp_path / "snap"), "--stop").returncode == 0
    status, _, err = running.finish()
    assert status == 0, err
    info = pykvm("snapshot", "info", str(tmp_path / "snap"))
    assert info.returncode == 0 and b"64 MiB RAM, 1 vCPU" in info.stdout and b"sparse" in info.stdout
    manifest = json.loads(pykvm("snapshot", "info", str(tmp_path / "snap"), "--json").stdout)
    assert manifest["format"] == "pykvm-snapshot" and manifest["config"]["cpus"] == 1


def test_ctl_info_shows_the_run_and_each_vcpu(tmp_path) -> None:
    running = RunningPykvm(tmp_path / "vm.sock", str(guest("dirty_rate.bin")), "--timeout", "120")  # runs until stopped
    try:
        answer = running.ctl("info")
        lines = answer.stdout.decode().splitlines()
        assert answer.returncode == 0 and lines[1].startswith("state: running, up ") and "io " in lines[1]
        assert lines[2].startswith("vCPU 0: long mode, CPL 0, rip 0x")  # waiting for a tick in its kernel
        raw = json.loads(running.ctl("info", "--json").stdout)
        assert raw["state"] == "running" and raw["vcpus"][0]["mode"] == "long" and raw["exits"]["io"] > 0
    finally:
        running.process.terminate()
        running.finish()


def test_options_that_make_a_machine_do_not_go_with_restore(tmp_path) -> None:
    with Machine() as machine:
        machine.load(guest("hello_long.elf"))
        machine.snapshot(tmp_path / "snap")
    for args, word in [(["-m", "128M"], "--memory"), ([str(guest("hello_long.elf"))], "a GUEST image"), (["--rng"], "--rng")]:
        process = pykvm("run", "--restore", str(tmp_path / "snap"), *args)
        assert process.returncode == 2 and word.encode() in process.stderr, process.stderr
    assert b"needs a GUEST image" in pykvm("run").stderr
    assert b"go with --restore" in pykvm("run", str(guest("hello_long.elf")), "--record", str(tmp_path / "log")).stderr
    assert_one_line_error(pykvm("run", "--restore", str(tmp_path / "missing")), "no such snapshot")


def test_a_run_recorded_from_a_snapshot_replays_alike_from_the_command_line(tmp_path) -> None:
    with Machine(rng=True) as machine:
        machine.load(guest("replay.bin"), mode="long")
        machine.snapshot(tmp_path / "snap")
    typed = b"hi\x04"  # replay.bin reads input until EOT
    recorded = pykvm("run", "--restore", str(tmp_path / "snap"), "--record", str(tmp_path / "log"), "--timeout", "60",
                     stdin=typed)  # fmt: skip
    assert recorded.returncode == 1 and b"got 68" in recorded.stdout, recorded.stderr
    for _ in range(2):
        replayed = pykvm("run", "--restore", str(tmp_path / "snap"), "--replay", str(tmp_path / "log"), "--timeout", "60")
        assert (replayed.returncode, replayed.stdout) == (1, recorded.stdout), replayed.stderr


def test_lifecycle_events_go_to_a_file_as_json_lines(tmp_path) -> None:
    process = pykvm("run", str(guest("hello_long.elf")), "--events", str(tmp_path / "events.jsonl"))
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [event["event"] for event in events] == ["started", "ended"]
    assert events[1]["status"] == process.returncode == 1 and events[0]["timestamp"] <= events[1]["timestamp"]
    assert_one_line_error(pykvm("run", str(guest("hello_long.elf")), "--events", "fd:x"), "fd:N")
