"""Record and replay: a run from a snapshot, logged and reproduced byte for byte.

The guests take their inputs from the host at moments the test does not control (input sent
from another thread at irregular times); every replay must print what the recorded run printed
and end the same way, and a log that does not match the guest is reported, never followed.
"""

from __future__ import annotations

import base64
import json
import random
import re
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

from conftest import guest
from pykvm import Machine
from pykvm.config import DiskConfig
from pykvm.errors import ConfigError, ReplayError
from pykvm.host_inputs import HostInputs
from pykvm.replay.log import (
    MAX_LINE_BYTES,
    ClockRead,
    DiskRead,
    Entry,
    HostInput,
    LogHeader,
    LogReader,
    LogWriter,
    RandomBytes,
    RunEnd,
    check_log,
)
from pykvm.result import ExitReason, RunResult

MIB = 1 << 20
EOT = b"\x04"
# SHA-256 of virtio_blk.bin's 64 KiB pattern (guests/README.md), which it writes and reads back.
VIRTIO_BLK_PATTERN_SHA256 = "b3a275a845f1d698913621853f15d7daf7b3e2f02acc98018f2305c9a99d46c5"


# --- the log format, without KVM ------------------------------------------------------------------
HEADER = LogHeader("pykvm-replay-log", 1, "0.1.0", "2026-01-01T00:00:00+00:00", "ab" * 32)


def write_log(path: Path, entries: list[Entry]) -> None:
    writer = LogWriter(path, HEADER)
    for entry in entries:
        writer.write(entry.exit, entry.event)
    writer.close()


def test_a_log_reads_back_as_it_was_written(tmp_path) -> None:
    entries = [
        Entry(0, ClockRead("monotonic", 12345)),
        Entry(7, HostInput("serial", b"hi\x00\xff")),
        Entry(7, RandomBytes(bytes(range(16)))),
        Entry(9, RunEnd("debug-exit", 1, 0, "cd" * 32)),
    ]
    write_log(tmp_path / "log", entries)
    reader = LogReader(tmp_path / "log")
    try:
        assert reader.header == HEADER and list(reader.entries()) == entries
    finally:
        reader.close()


def good_lines(tmp_path: Path) -> list[str]:
    write_log(tmp_path / "good", [Entry(3, HostInput("serial", b"x")), Entry(5, RunEnd("halted", 0, None, "0" * 64))])
    return (tmp_path / "good").read_text().splitlines()


def edit_line(index: int, change: Callable[[dict], None]) -> Callable[[list[str]], None]:
    def edit(lines: list[str]) -> None:
        data = json.loads(lines[index])
        change(data)
        lines[index] = json.dumps(data)

    return edit


def set_fields(**fields: object) -> Callable[[dict], None]:
    return lambda data: data["event"]["fields"].update(fields)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda lines: lines.clear(), "empty"),
        (edit_line(0, lambda h: h.update(format="other")), "not a pykvm replay log"),
        (edit_line(0, lambda h: h.update(version=2)), "version 2"),
        (edit_line(0, lambda h: h.update(snapshot_state_sha256="xyz")), "line 1: .*not a SHA-256"),
        (lambda lines: lines.insert(1, "{" * 100), "line 2: not valid JSON"),
        (lambda lines: lines.insert(1, "[" + " " * MAX_LINE_BYTES + "]"), "line 2: longer than"),
        (edit_line(1, lambda e: e.update(exit=-1)), "line 2: Entry.exit is -1"),
        (edit_line(1, lambda e: e.update(exit="3")), "line 2: Entry.exit: expected int"),
        (edit_line(1, lambda e: e["event"].update(record="Machine")), "line 2: .*expected one of the records"),
        (edit_line(1, set_fields(device="disk")), "line 2: HostInput.device is 'disk'"),
        (edit_line(1, set_fields(data="")), "line 2: HostInput.data is 0 bytes"),
        (edit_line(1, set_fields(data="not base64!")), "line 2: .*not base64"),
        (edit_line(1, set_fields(extra=1)), "line 2: .*unknown field 'extra'"),
        (edit_line(2, set_fields(reason="crashed")), "line 3: RunEnd.reason is 'crashed'"),
        (edit_line(2, set_fields(status=256)), "line 3: RunEnd.status is 256"),
        (edit_line(2, lambda e: e.update(exit=2)), "line 3: exit 2 comes after exit 3"),
    ],
    ids=["empty", "format", "version", "header-sha", "json", "long-line", "negative-exit", "exit-type", "record",
         "device", "no-data", "base64", "unknown-field", "reason", "status", "order"],  # fmt: skip
)
def test_a_malformed_log_is_refused_in_one_line_naming_the_line(tmp_path, damage, message) -> None:
    lines = good_lines(tmp_path)
    damage(lines)
    (tmp_path / "log").write_text("".join(line + "\n" for line in lines))
    with pytest.raises(ReplayError, match=message) as caught:
        check_log(tmp_path / "log")
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 400


def test_a_missing_log_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ReplayError, match="cannot read the log: No such file"):
        check_log(tmp_path / "nothing")


# --- the exit counter -----------------------------------------------------------------------------
def test_the_exit_count_includes_the_exits_the_c_fast_path_answered(machine_factory) -> None:
    machine = machine_factory()
    machine.load(guest("hello_long.elf"))
    assert machine.run(timeout=30).serial == b"Hello from long mode\n"
    vcpu = machine.vcpus[0]
    assert vcpu.fast_exits > 0 and vcpu.exit_count == sum(vcpu.exit_counts().values())


def test_exits_from_a_given_count_on_return_to_python_and_are_answered_alike(machine_factory) -> None:
    machine = machine_factory()
    machine.load(guest("hello_long.elf"))
    machine.vcpus[0].send_exits_to_python_from(1)
    result = machine.run(timeout=30)
    assert result.serial == b"Hello from long mode\n" and result.status == 1
    assert machine.vcpus[0].fast_exits == 0 and machine.vcpus[0].exit_count > 0


def test_a_machine_that_does_not_record_installs_no_hook(machine_factory, tmp_path) -> None:
    machine = machine_factory()
    machine.load(guest("hello_long.elf"))
    machine.snapshot(tmp_path / "snap")
    with Machine.restore(tmp_path / "snap", capture_serial=True) as restored:
        for vm in (machine, restored):
            assert type(vm.host_inputs) is HostInputs and vm.host_inputs.observer is None
            assert vm.run(timeout=30).status == 1 and vm.vcpus[0].fast_exits > 0


# --- recording and replaying real guests ------------------------------------------------------------
def send_at_irregular_times(send: Callable[[bytes], None], pieces: list[bytes], seed: int, pause: float) -> threading.Thread:
    """Send the first of ``pieces`` now, the others from another thread, each after a random pause of
    up to ``pause`` seconds."""
    pace = random.Random(seed)
    send(pieces[0])

    def feed() -> None:
        for piece in pieces[1:]:
            time.sleep(pace.uniform(0, pause))
            send(piece)

    thread = threading.Thread(target=feed)
    thread.start()
    return thread


def record(snapshot: Path, log: Path, pieces: list[bytes], *, seed: int = 1, pause: float = 0.05,
           timeout: float = 120, **options: object) -> RunResult:  # fmt: skip
    with Machine.restore(snapshot, record=log, **options) as machine:  # type: ignore[arg-type]
        feeder = send_at_irregular_times(machine.host_inputs.serial_input, pieces, seed, pause)
        try:
            return machine.run(timeout=timeout)
        finally:
            feeder.join()


def replay(snapshot: Path, log: Path, timeout: float = 120, **options: object) -> RunResult:
    with Machine.restore(snapshot, replay=log, **options) as machine:  # type: ignore[arg-type]
        return machine.run(timeout=timeout)


def events(log: Path, kind: type) -> list[Entry]:
    reader = LogReader(log)
    try:
        return [entry for entry in reader.entries() if isinstance(entry.event, kind)]
    finally:
        reader.close()


def snapshot_of(path: Path, image: str, mode: str | None = "long", **config: object) -> Path:
    """A snapshot of a machine with ``image`` loaded, before it ran."""
    with Machine(capture_serial=True, **config) as machine:  # type: ignore[arg-type]
        machine.load(guest(image), mode=mode)
        machine.snapshot(path)
    return path


@pytest.fixture(scope="module")
def replay_guest(kvm_host, tmp_path_factory) -> tuple[Path, Path, RunResult]:
    """replay.bin's snapshot, a log of a run from it with input typed at irregular times, and its result."""
    directory = tmp_path_factory.mktemp("replay")
    snapshot = snapshot_of(directory / "snap", "replay.bin", rng=True)
    pieces = [bytes([byte]) for byte in b"replay me"] + [EOT]
    result = record(snapshot, directory / "log", pieces)
    return snapshot, directory / "log", result


@pytest.mark.kvm
def test_a_run_driven_by_typed_input_rng_and_clocks_replays_byte_for_byte(replay_guest) -> None:
    snapshot, log, recorded = replay_guest
    assert recorded.status == 1, recorded.diagnosis
    lines = recorded.serial.decode().splitlines()
    assert lines[0].startswith("replay: rtc ") and lines[3] == "replay: ready"
    assert [line[:6] for line in lines[4:-1]] == [f"got {byte:02x}" for byte in b"replay me"]
    assert b"".join(entry.event.data for entry in events(log, HostInput)) == b"replay me" + EOT
    assert {entry.event.clock for entry in events(log, ClockRead)} == {"wall", "monotonic"}
    assert [len(entry.event.data) for entry in events(log, RandomBytes)] == [16, 8]
    for _ in range(3):
        replayed = replay(snapshot, log)
        assert (replayed.reason, replayed.status, replayed.serial) == (recorded.reason, 1, recorded.serial)


@pytest.mark.kvm
def test_input_taken_by_interrupt_while_the_guest_waits_in_hlt_replays_byte_for_byte(tmp_path) -> None:
    snapshot = snapshot_of(tmp_path / "snap", "uart_irq.elf", mode=None)
    pieces = [b"in", b"ter", b"r", b"upts", b"!"] + [EOT]
    recorded = record(snapshot, tmp_path / "log", pieces, seed=2, pause=0.1)
    assert recorded.status == (11 << 1) | 1, recorded.diagnosis  # 11 bytes echoed
    assert recorded.serial.startswith(b"uart irq ready\ninterrupts!\nuart irq done 11\ninterrupts: ")
    for _ in range(3):
        replayed = replay(snapshot, tmp_path / "log")
        assert (replayed.status, replayed.serial) == (recorded.status, recorded.serial)


@pytest.mark.kvm
def test_a_run_the_host_stopped_is_replayed_up_to_the_same_exit_and_the_next_run_goes_on(tmp_path) -> None:
    snapshot = snapshot_of(tmp_path / "snap", "replay.bin", rng=True)
    with Machine.restore(snapshot, record=tmp_path / "log") as machine:
        feeder = send_at_irregular_times(machine.host_inputs.serial_input, [b"a", b"b", b"c"], seed=3, pause=0.1)
        first = machine.run(timeout=0.5)  # replay.bin polls for input until EOT
        feeder.join()
        machine.host_inputs.serial_input(EOT)  # waits for the next run
        second = machine.run(timeout=120)
        exits = [machine.vcpus[0].exit_count]
    assert first.reason is ExitReason.TIMEOUT and second.status == 1
    assert (first.serial + second.serial).count(b"\ngot ") == 3
    for _ in range(2):
        with Machine.restore(snapshot, replay=tmp_path / "log") as machine:
            again = machine.run(timeout=120), machine.run(timeout=120)
            exits.append(machine.vcpus[0].exit_count)
        assert [(r.reason, r.status, r.serial) for r in again] == [(r.reason, r.status, r.serial) for r in (first, second)]
    assert len(set(exits)) == 1


@pytest.mark.kvm
def test_virtio_console_input_is_replayed(tmp_path) -> None:
    snapshot = snapshot_of(tmp_path / "snap", "replay.bin", rng=True, console="virtio")
    with Machine.restore(snapshot, record=tmp_path / "log") as machine:
        machine.host_inputs.serial_input(b"x" + EOT)

        def type_on_the_console() -> None:
            while b"console ready" not in (machine.serial_output.captured() or b""):
                time.sleep(0.005)
            time.sleep(0.02)
            machine.host_inputs.console_input(b"from the console")

        typist = threading.Thread(target=type_on_the_console)
        typist.start()
        recorded = machine.run(timeout=120)
        typist.join()
    assert recorded.status == 1 and b"replay: console 16 bytes: from the console\n" in recorded.serial
    assert replay(snapshot, tmp_path / "log").serial == recorded.serial


@pytest.mark.kvm
def test_disk_reads_are_logged_as_hashes_and_checked_on_replay(tmp_path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(MIB))
    snapshot = snapshot_of(tmp_path / "snap", "virtio_blk.bin", disks=(DiskConfig(str(disk)),), console="virtio")
    with Machine.restore(snapshot, record=tmp_path / "log") as machine:
        recorded = machine.run(timeout=120)
    assert recorded.status == 1 and b"read back: OK" in recorded.serial
    (read,) = events(tmp_path / "log", DiskRead)
    assert (read.event.offset, read.event.length, read.event.sha256) == (0, 65536, VIRTIO_BLK_PATTERN_SHA256)
    assert replay(snapshot, tmp_path / "log", allow_changed_disks=True).serial == recorded.serial
    edit_log(tmp_path / "log", lambda entries: entries[first(entries, "DiskRead")]["event"]["fields"].update(sha256="0" * 64))
    diverged = replay(snapshot, tmp_path / "log", allow_changed_disks=True)
    assert diverged.reason is ExitReason.DIVERGED and diverged.status == 120
    assert f"at exit {read.exit} a read of disk 0 (65536 bytes at offset 0) gave other data" in diverged.diagnosis


@pytest.mark.kvm
def test_a_run_on_a_throwaway_disk_replays_from_the_same_saved_disk(tmp_path) -> None:
    """The recorded run writes only its overlay: the replay reads the same data, asks for no
    allow_changed_disks, and the image is as it was."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(MIB))
    snapshot = snapshot_of(tmp_path / "snap", "virtio_blk.bin", disks=(DiskConfig(str(disk), snapshot=True),),
                           console="virtio")  # fmt: skip
    with Machine.restore(snapshot, record=tmp_path / "log") as machine:
        recorded = machine.run(timeout=120)
    assert recorded.status == 1 and b"read back: OK" in recorded.serial
    (read,) = events(tmp_path / "log", DiskRead)
    assert read.event.sha256 == VIRTIO_BLK_PATTERN_SHA256
    assert replay(snapshot, tmp_path / "log").serial == recorded.serial  # the disk's id included
    assert disk.read_bytes() == bytes(MIB)


# --- divergence and refusals ----------------------------------------------------------------------
def edit_log(log: Path, change: Callable[[list[dict]], None]) -> None:
    header, *lines = log.read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    change(entries)
    log.write_text(header + "\n" + "".join(json.dumps(entry) + "\n" for entry in entries))


def first(entries: list[dict], record: str, after: int = -1) -> int:
    return next(i for i, e in enumerate(entries) if e["event"]["record"] == record and e["exit"] > after)


def drop_first_input(entries: list[dict]) -> None:
    del entries[first(entries, "HostInput")]


def change_an_input_byte(entries: list[dict]) -> None:
    entries[first(entries, "HostInput")]["event"]["fields"]["data"] = base64.b64encode(b"?").decode()


def change_the_random_bytes(entries: list[dict]) -> None:
    entries[first(entries, "RandomBytes")]["event"]["fields"]["data"] = base64.b64encode(bytes(16)).decode()


def drop_a_clock_read(entries: list[dict]) -> None:
    del entries[first(entries, "ClockRead", after=0)]


def send_input_to_a_console_the_machine_lacks(entries: list[dict]) -> None:
    entries[first(entries, "HostInput")]["event"]["fields"]["device"] = "console"


def add_input_after_the_end(entries: list[dict]) -> None:
    entries.insert(-1, {"exit": entries[-1]["exit"], "event": {"record": "HostInput", "fields": {"device": "serial", "data": "eA=="}}})


@pytest.mark.kvm
@pytest.mark.parametrize(
    "change, message",
    [
        (drop_first_input, r"the guest reached exit \d+ without the log's monotonic clock read at exit \d+"),
        (change_an_input_byte, r"the replay printed other bytes \(\d+, SHA-256 [0-9a-f]{16}…\) than the recorded run"),
        (change_the_random_bytes, "the replay printed other bytes"),
        (drop_a_clock_read, r"at exit \d+ a device asked for a wall clock read, where the log has the wall clock read at exit \d+"),
        (add_input_after_the_end, r"the run ended at exit \d+ \(debug-exit\) before the log's 1 byte of serial input at exit \d+"),
        (send_input_to_a_console_the_machine_lacks, r"console input at exit \d+ cannot be handed over: this machine has no console"),
    ],
    ids=["input-removed", "byte-changed", "random-changed", "clock-removed", "input-left-over", "no-such-device"],
)
def test_a_changed_log_is_reported_as_divergence_saying_what_and_where(replay_guest, tmp_path, change, message) -> None:
    snapshot, log, _ = replay_guest
    changed = tmp_path / "log"
    changed.write_bytes(log.read_bytes())
    edit_log(changed, change)
    with Machine.restore(snapshot, replay=changed) as machine:
        result = machine.run(timeout=120)
        assert (result.reason, result.status) == (ExitReason.DIVERGED, 120)
        assert result.diagnosis.startswith("replay diverged: ") and re.search(message, result.diagnosis)
        assert machine.run(timeout=120).reason is ExitReason.DIVERGED  # and it stays diverged


@pytest.mark.kvm
def test_a_log_cut_short_replays_what_it_holds(replay_guest, tmp_path) -> None:
    snapshot, log, recorded = replay_guest
    cut = tmp_path / "log"
    cut.write_text("".join(line + "\n" for line in log.read_text().splitlines()[:-1]))  # no end of the run
    assert replay(snapshot, cut).serial == recorded.serial


@pytest.mark.kvm
def test_a_log_from_another_snapshot_is_refused_before_anything_runs(replay_guest, tmp_path) -> None:
    _, log, _ = replay_guest
    other = snapshot_of(tmp_path / "other", "hello_long.bin")
    with pytest.raises(ReplayError, match="recorded from another snapshot than .*other"):
        Machine.restore(other, replay=log)


@pytest.mark.kvm
def test_a_replayed_machine_takes_no_host_input(replay_guest) -> None:
    snapshot, log, _ = replay_guest
    with Machine.restore(snapshot, replay=log) as machine:
        with pytest.raises(ReplayError, match="takes its serial input from the log"):
            machine.host_inputs.serial_input(b"x")


@pytest.mark.kvm
def test_what_cannot_be_recorded_is_refused(tmp_path) -> None:
    with Machine(cpus=2, capture_serial=True) as machine:
        machine.load(guest("smp.elf"))
        machine.snapshot(tmp_path / "smp")
    with pytest.raises(ReplayError, match="2 vCPUs cannot be recorded"):
        Machine.restore(tmp_path / "smp", record=tmp_path / "log")
    assert not (tmp_path / "log").exists()
    snapshot = snapshot_of(tmp_path / "one", "hello_long.bin")
    with pytest.raises(ConfigError, match="records its host inputs or replays them, not both"):
        Machine.restore(snapshot, record=tmp_path / "log", replay=tmp_path / "log")
    with pytest.raises(ReplayError, match="cannot write the log"):
        Machine.restore(snapshot, record=tmp_path / "no-such-directory" / "log")
