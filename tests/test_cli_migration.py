"""Live migration from the command line: ``pykvm run --incoming URI`` waits for a guest,
``pykvm ctl PATH migrate URI`` sends it; ``pykvm ctl PATH wake`` wakes a suspended machine."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from command import assert_one_line_error, pykvm
from conftest import guest
from test_cli_snapshot import RunningPykvm

pytestmark = pytest.mark.kvm


class Destination:
    """``pykvm run --incoming unix:PATH`` in the background, once it listens."""

    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.socket = tmp_path / "incoming.sock"
        self.process = subprocess.Popen([sys.executable, "-m", "pykvm", "run", "--incoming", f"unix:{self.socket}", *args],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        deadline = time.monotonic() + 60
        while not self.socket.exists():
            assert self.process.poll() is None and time.monotonic() < deadline, self.process.communicate()
            time.sleep(0.02)

    def finish(self) -> tuple[int, bytes, bytes]:
        out, err = self.process.communicate(timeout=120)
        return self.process.returncode, out, err


def lines(output: bytes) -> list[int]:
    """The numbers of dirty_rate.bin's ``line N`` lines."""
    return [int(line.split()[1]) for line in output.decode().splitlines() if line.startswith("line ")]


def test_a_guest_moves_to_the_waiting_process_and_counts_on_there(tmp_path) -> None:
    destination = Destination(tmp_path, "--timeout", "3", "--events", str(tmp_path / "arrived.jsonl"))
    source = RunningPykvm(tmp_path / "vm.sock", str(guest("dirty_rate.bin")), "--timeout", "120",
                          "--events", str(tmp_path / "left.jsonl"))  # fmt: skip
    time.sleep(0.5)  # a few lines printed here
    moved = source.ctl("migrate", f"unix:{destination.socket}")
    assert moved.returncode == 0 and moved.stdout.startswith(b"migrated to unix:"), moved.stderr
    status, before, err = source.finish()
    assert status == 0 and b"pykvm: migrated: the guest migrated to unix:" in err
    status, after, err = destination.finish()
    assert status == 124 and b"waiting for a migration on unix:" in err  # the guest ran on until --timeout
    counted = lines(before) + lines(after)
    assert lines(after) and counted == list(range(1, len(counted) + 1))  # no line lost, none repeated
    left = [json.loads(line)["event"] for line in (tmp_path / "left.jsonl").read_text().splitlines()]
    arrived = [json.loads(line)["event"] for line in (tmp_path / "arrived.jsonl").read_text().splitlines()]
    assert left[:2] == ["started", "migration-started"] and left[-2:] == ["migrated", "ended"]
    assert set(left[2:-2]) == {"migration-progress"}  # each round and phase
    assert arrived[:2] == ["migration-received", "started"]


def test_a_migration_with_nobody_waiting_fails_in_one_line_and_the_guest_runs_on(tmp_path) -> None:
    source = RunningPykvm(tmp_path / "vm.sock", str(guest("dirty_rate.bin")), "--timeout", "120")
    try:
        failed = source.ctl("migrate", f"unix:{tmp_path / 'nobody.sock'}")
        assert_one_line_error(failed, "migration to unix:", "the guest runs on here")
        info = json.loads(source.ctl("info", "--json").stdout)
        assert info["state"] == "running" and info["migration"]["phase"] == "failed"
    finally:
        source.process.terminate()
        status, _, err = source.finish()
    assert status == 143 and err.decode().count("migration to unix:") == 1  # reported on the source's side too


def test_options_that_make_a_machine_do_not_go_with_incoming(tmp_path) -> None:
    uri = f"unix:{tmp_path / 'm.sock'}"
    for args, word in [(["-m", "128M"], "--memory"), ([str(guest("hello_long.elf"))], "a GUEST image"),
                       (["--restore", str(tmp_path)], "--restore")]:  # fmt: skip
        process = pykvm("run", "--incoming", uri, *args)
        assert process.returncode == 2 and word.encode() in process.stderr, process.stderr


def test_incoming_refuses_a_throwaway_disk_in_one_line(tmp_path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4096))
    process = pykvm("run", "--incoming", f"unix:{tmp_path / 'm.sock'}", "--disk", f"{image},snapshot")
    assert_one_line_error(process, f"the disk {image} is throw-away (,snapshot)")


def test_ctl_wake_wakes_a_suspended_guest_and_refuses_a_running_one(tmp_path) -> None:
    running = RunningPykvm(tmp_path / "vm.sock", str(guest("s3.elf")), "--timeout", "120")
    deadline = time.monotonic() + 60
    while json.loads(running.ctl("info", "--json").stdout)["state"] != "suspended":
        assert time.monotonic() < deadline, "the guest never suspended"
        time.sleep(0.05)
    assert running.ctl("wake").stdout == b"woken\n"
    status, out, _ = running.finish()
    assert status == 1 and out.endswith(b"s3: resumed\n") and b"wak=1 rtc=0" in out
    other = RunningPykvm(tmp_path / "other.sock", str(guest("dirty_rate.bin")), "--timeout", "120")
    try:
        assert_one_line_error(other.ctl("wake"), "not suspended")
    finally:
        other.process.terminate()
        other.finish()
