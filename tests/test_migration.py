"""Live migration of real guests between two machines over loopback TCP, UNIX sockets and fds.

A migrated guest must go on at the destination exactly where it was: across the source's and
the destination's output every line appears once and the count goes on; a guest that writes
memory finds every page holding what it wrote last (dirty_rate.bin checks each page itself);
UART input taken before and after adds up.  A migration that fails, wherever it fails, leaves
the guest running at the source as if nothing happened, and no guest at the destination.

Slow links are made by the source's own rate limit (``bandwidth``), never by the machine's
speed; a guest's writing rate is paced by its PIT.  Margins are wide (the guest writes at
least three times faster, or sixteen times slower, than the link sends).
"""

from __future__ import annotations

import array
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from conftest import guest
from pykvm import Machine
from pykvm.config import DiskConfig
from pykvm.devices.virtio.blk import VirtioBlock
from pykvm.errors import ConfigError, MigrationError, PykvmError
from pykvm.migration import Incoming, MigrationProgress
from pykvm.migration.wire import ANSWER, GREETING, HELLO, MAGIC, RECORD, VERSION, Kind, answer
from pykvm.native import lib
from pykvm.result import ExitReason, RunResult
from test_snapshot import Background, guest_ram_digest, input_sum, wait_for_output

pytestmark = pytest.mark.kvm

MIB = 1 << 20
PARAMS = 0x100020  # dirty_rate.bin: pages per second, area pages, ticks per line
EOT = b"\x04"


def dirty_rate(machine_factory: Callable[..., Machine], rate: int = 0, area: int = 0, **config: Any) -> Machine:
    """A machine running nothing yet, loaded with dirty_rate.bin writing ``rate`` pages (4 KiB) per
    second over ``area`` pages, printing a line every 20 ms."""
    machine = machine_factory(**config)
    machine.load(guest("dirty_rate.bin"))
    for offset, value in enumerate((rate, area, 20)):
        machine.memory.write_u64(PARAMS + 8 * offset, value)
    return machine


class Destination:
    """``Incoming(uri).receive(...)`` on a thread."""

    def __init__(self, uri: str, **options: Any) -> None:
        self.incoming = Incoming(uri)
        self.uri = self.incoming.uri
        self.machine: Machine | None = None
        self.error: BaseException | None = None
        options.setdefault("capture_serial", True)
        options.setdefault("timeout", 120)
        self._thread = threading.Thread(target=self._receive, args=(options,))
        self._thread.start()

    def _receive(self, options: dict[str, Any]) -> None:
        try:
            self.machine = self.incoming.receive(**options)
        except BaseException as err:  # noqa: BLE001 - the test looks at it
            self.error = err

    def join(self) -> Machine:
        self._thread.join(180)
        if self.error is not None:
            raise self.error
        assert self.machine is not None
        return self.machine

    def close(self) -> None:
        self.incoming.close()
        self._thread.join(180)
        if self.machine is not None:
            stop(self.machine)
            self.machine.close()


def stop(machine: Machine) -> None:
    """End ``machine``'s run, if one is going, and wait until it has ended (before closing it)."""
    machine.stop()
    deadline = time.monotonic() + 60
    while machine.running and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.fixture
def destinations():
    made: list[Destination] = []

    def make(uri: str, **options: Any) -> Destination:
        made.append(Destination(uri, **options))
        return made[-1]

    yield make
    for destination in made:
        destination.close()


@pytest.fixture
def machine_factory(machine_factory):
    """The plugin's factory, whose machines' runs are ended before the machines are closed."""
    made: list[Machine] = []

    def make(**config: Any) -> Machine:
        made.append(machine_factory(**config))
        return made[-1]

    yield make
    for machine in made:
        stop(machine)


def last_line_number(output: bytes) -> int:
    return int(re.findall(rb"line (\d+)\n", output)[-1])


def finish(machine: Machine, run: Background, text: bytes = b"") -> RunResult:
    """Let a dirty_rate guest print two more lines, then send ``text`` and EOT: it checks its pages and ends."""
    printed = (machine.serial_output.captured() or b"").count(b"\n")
    deadline = time.monotonic() + 60
    while (machine.serial_output.captured() or b"").count(b"\n") < printed + 2:
        assert time.monotonic() < deadline, "the guest prints no more lines"
        time.sleep(0.005)
    machine.serial.receive(text + EOT)
    return run.join()


def assert_every_line_once(output: bytes, input_text: bytes = b"") -> re.Match[bytes]:
    """The lines count up from 1 with none repeated or missing, and the guest's own checks passed."""
    lines = output.decode().splitlines()
    numbers = [int(line.split()[1]) for line in lines[:-1]]
    assert lines[:-1] == [f"line {n}" for n in range(1, len(numbers) + 1)], "a line repeated, missing or garbled"
    done = re.fullmatch(
        rb"done lines (\d+) passes (\d+) pages (\d+) input (\d+) sum ([0-9a-f]{16}) errors 0", lines[-1].encode()
    )
    assert done is not None, lines[-1]
    assert int(done[1]) == len(numbers) and int(done[4]) == len(input_text)
    assert done[5] == b"%016x" % input_sum(input_text)
    return done


def migrate(source: Machine, destination: Destination, **options: Any) -> tuple[Any, RunResult, Machine]:
    """Migrate ``source``'s running guest; returns the result, the source's run, the destination's machine."""
    run = Background(source)
    wait_for_output(source, b"line 3\n")
    source.serial.receive(b"before")
    result = source.migrate(destination.uri, **options)
    return result, run.join(), destination.join()


# --- guests that move -------------------------------------------------------------------------------
@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_a_counting_guest_moves_and_every_line_appears_once_across_both(machine_factory, destinations, tmp_path,
                                                                         transport) -> None:  # fmt: skip
    uri = "tcp:127.0.0.1:0" if transport == "tcp" else f"unix:{tmp_path}/migration.sock"
    source = dirty_rate(machine_factory)
    result, ended, moved = migrate(source, destinations(uri))
    assert ended.reason is ExitReason.MIGRATED and ended.status == 0 and "migrated to" in ended.diagnosis
    finished = finish(moved, Background(moved), b"after")
    assert finished.status == 1
    assert_every_line_once(ended.serial + finished.serial, b"beforeafter")
    assert last_line_number(finished.serial) > last_line_number(ended.serial) >= 3  # the count went on
    assert result.rounds >= 2 and result.zero_pages > 0 and result.bytes_sent > 0
    assert 0 < result.downtime_ms < result.total_ms and result.max_throttle == 0
    assert source.migration.progress().phase == "completed"
    with pytest.raises(PykvmError, match="migrated to"):
        source.run()


def test_a_guest_writing_slower_than_the_link_converges_unthrottled(machine_factory, destinations, tmp_path) -> None:
    source = dirty_rate(machine_factory, rate=1024, area=2048)  # 4 MiB/s over 8 MiB; the link: 64 MiB/s
    result, ended, moved = migrate(source, destinations(f"unix:{tmp_path}/m.sock"), bandwidth=64 * MIB)
    assert result.max_throttle == 0 and result.data_pages > 0
    finished = finish(moved, Background(moved))
    assert_every_line_once(ended.serial + finished.serial, b"before")  # and at the end every page checked out


def test_a_guest_writing_faster_than_the_link_is_throttled_until_it_converges(machine_factory, destinations,
                                                                              tmp_path) -> None:  # fmt: skip
    source = dirty_rate(machine_factory, rate=6144, area=512)  # 24 MiB/s over 2 MiB; the link: 8 MiB/s
    seen: list[MigrationProgress] = []
    watching = threading.Event()

    def watch() -> None:
        while not watching.wait(0.02):
            if source.migration is not None:
                seen.append(source.migration.progress())

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result, ended, moved = migrate(source, destinations(f"unix:{tmp_path}/m.sock"), bandwidth=8 * MIB,
                                       downtime_ms=50)  # fmt: skip
    finally:
        watching.set()
        watcher.join()
    seen.append(source.migration.progress())
    assert result.max_throttle > 0 and result.rounds > 2
    assert any(p.phase == "pre-copy" and p.throttle > 0 and p.dirty_rate > 0 and p.bandwidth > 0 for p in seen)
    sent = [p.bytes_sent for p in seen]
    assert sent == sorted(sent) and sent[-1] == result.bytes_sent
    finished = finish(moved, Background(moved))
    done = assert_every_line_once(ended.serial + finished.serial, b"before")
    assert int(done[2]) > 2  # several passes over the area, every page checked each time


def test_a_guest_that_never_converges_times_out_and_runs_on_at_the_source(machine_factory, destinations,
                                                                          tmp_path) -> None:  # fmt: skip
    source = dirty_rate(machine_factory, rate=6144, area=512)
    destination = destinations(f"unix:{tmp_path}/m.sock")
    run = Background(source)
    wait_for_output(source, b"line 3\n")
    with pytest.raises(MigrationError, match=r"did not converge within 3 s|timed out") as caught:
        source.migrate(destination.uri, bandwidth=8 * MIB, downtime_ms=50, auto_converge=False, timeout=3)
    assert "the guest runs on here" in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(MigrationError):
        destination.join()
    assert source.running and source.migration.progress().phase == "failed"
    assert not any(slot.flags & lib.KVM_MEM_LOG_DIRTY_PAGES for slot in source.vm.memory_slots())
    finished = finish(source, run)
    assert finished.status == 1
    assert_every_line_once(finished.serial)


def test_a_machine_with_a_reset_point_still_resets_exactly_after_a_failed_migration(machine_factory, destinations,
                                                                                     tmp_path) -> None:  # fmt: skip
    """The pages a migration took from the dirty log are still put back by reset()."""
    source = dirty_rate(machine_factory, rate=6144, area=512)
    run = Background(source)
    wait_for_output(source, b"line 3\n")
    source.snapshot(tmp_path / "snap")
    with Machine.restore(tmp_path / "snap") as restored:
        at_snapshot = guest_ram_digest(restored)
    with pytest.raises(MigrationError):
        source.migrate(destinations(f"unix:{tmp_path}/m.sock").uri, bandwidth=8 * MIB, downtime_ms=50,
                       auto_converge=False, timeout=2)  # fmt: skip
    source.stop()
    run.join()
    source.reset()
    assert guest_ram_digest(source) == at_snapshot


def test_an_smp_guest_moves_while_its_vcpus_start_and_count(machine_factory, destinations) -> None:
    """Paused as its BSP starts the AP (INIT, SIPI), so that the migration does not race the guest's end."""
    source = machine_factory(cpus=2)
    source.load(guest("smp.elf"))
    run = Background(source)
    wait_for_output(source, b"cpu 1\n")
    assert source.pause(timeout=60)
    destination = destinations("tcp:127.0.0.1:0")
    source.migrate(destination.uri)
    ended = run.join()
    assert ended.reason is ExitReason.MIGRATED
    finished = destination.join().run(timeout=120)
    assert finished.status == 1
    lines = (ended.serial + finished.serial).decode().splitlines()
    assert sorted(lines) == sorted(["cpus: 2", "cpu 0", "cpu 1", "ap 1 up", "ticks: 10", "counter: 2000"])


SECTORS_PER_REQUEST = 128  # 64 KiB requests
BLK_PARAMS = 0x100020  # bench_blk_user.bin's: count, size, depth, mode; then checksum, done
MASK64 = (1 << 64) - 1
QWORDS_PER_REQUEST = SECTORS_PER_REQUEST * 512 // 8
BLK_REPORT = re.compile(
    rb"bench_blk_user: done (\d+) checksum ([0-9a-f]{16}) cycles \d+ capacity (\d+) window [0-9a-f]{8}\n"
)


def write_pattern(i: int) -> bytes:
    """What bench_blk_user.bin writes in request i (mode 1): little-endian qwords (i << 32) | j."""
    return array.array("Q", range(i << 32, (i << 32) + QWORDS_PER_REQUEST)).tobytes()


def rol64(value: int, shift: int) -> int:
    return ((value << shift) | (value >> (64 - shift))) & MASK64 if shift else value


def test_a_guest_with_virtio_blk_io_in_flight_moves_and_its_requests_all_land_once(machine_factory, destinations,
                                                                                   tmp_path) -> None:  # fmt: skip
    """bench_blk_user.bin keeps eight 64 KiB writes in flight; its vCPU is paused mid-sequence, the
    requests it notified possibly still being served by the I/O thread while memory is copied."""
    count, chunks = 1000, 64  # requests, and the 64 KiB chunks of the disk they go round
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(chunks * SECTORS_PER_REQUEST * 512))
    source = machine_factory(disks=(DiskConfig(str(image)),))
    source.load(guest("bench_blk_user.bin"))
    for offset, value in enumerate((count, SECTORS_PER_REQUEST * 512, 8, 1)):  # count, size, depth, mode 1 (write)
        source.memory.write_u64(BLK_PARAMS + 8 * offset, value)
    run = Background(source)
    deadline = time.monotonic() + 60
    while source.memory.read_u64(BLK_PARAMS + 40) < 20:  # requests done
        assert time.monotonic() < deadline, "the guest's requests do not complete"
        time.sleep(0.001)
    assert source.pause(timeout=60)
    destination = destinations(f"unix:{tmp_path}/m.sock", disks=[image])
    source.migrate(destination.uri)
    ended = run.join()
    assert ended.reason is ExitReason.MIGRATED
    disk = next(slot.device for slot in source.devices.virtio if slot.device.name == "blk")
    assert disk.fd == -1  # let go at the source
    finished = destination.join().run(timeout=120)
    checksum = sum(rol64(sum(array.array("Q", write_pattern(i))) & MASK64, i % 64) for i in range(count)) & MASK64
    assert finished.status == 1, finished.serial
    report = BLK_REPORT.fullmatch(ended.serial + finished.serial)
    assert report is not None, ended.serial + finished.serial
    assert (int(report[1]), int(report[2], 16), int(report[3])) == (count, checksum, chunks * SECTORS_PER_REQUEST)
    data = image.read_bytes()
    last = range(count - chunks, count)  # the last request to write each chunk
    assert all(data[(i % chunks) * 65536 : (i % chunks + 1) * 65536] == write_pattern(i) for i in last)


def test_a_ballooned_guest_moves_with_its_balloon_and_deflates_at_the_destination(machine_factory, destinations,
                                                                                   tmp_path) -> None:  # fmt: skip
    """The balloon's state and queues go on; the 64 MiB the guest gave back travel as zero pages, not data."""
    source = machine_factory(memory=128 * MIB, balloon=True)
    source.load(guest("balloon.bin"), mode="long", cmdline="ws=16")
    run = Background(source)
    wait_for_output(source, b"touched")
    source.balloon.target = 64 * MIB
    assert source.balloon.wait_actual(64 * MIB, 60)
    destination = destinations(f"unix:{tmp_path}/m.sock")
    result = source.migrate(destination.uri)
    ended = run.join()
    assert ended.reason is ExitReason.MIGRATED and result.zero_pages >= 64 * MIB // 4096
    moved = destination.join()
    assert moved.balloon.actual == 64 * MIB and moved.balloon.target == 64 * MIB
    moved_run = Background(moved)
    moved.balloon.target = 0
    assert moved.balloon.wait_actual(0, 60)
    moved.serial.receive(b"q\n")
    finished = moved_run.join()
    assert finished.status == 1
    output = (ended.serial + finished.serial).decode()
    assert output.count("balloon: 16384 pages (64 MiB)\n") == 1 and output.count("balloon: 0 pages (0 MiB)\n") == 1
    assert output.endswith("balloon: bye\n")


# --- failures leave the guest at the source -------------------------------------------------------------
def test_the_destination_killed_mid_stream_leaves_the_guest_running_at_the_source(machine_factory, tmp_path) -> None:
    source = dirty_rate(machine_factory, rate=4096, area=4096)  # 16 MiB of data to send at 4 MiB/s
    path = tmp_path / "m.sock"
    destination = subprocess.Popen(
        [sys.executable, "-c", f"from pykvm import Machine; Machine.incoming({f'unix:{path}'!r}, timeout=120)"]
    )
    try:
        run = Background(source)
        wait_for_output(source, b"line 3\n")
        while not path.exists():
            assert destination.poll() is None, "the destination died before it listened"
            time.sleep(0.01)
        errors: list[BaseException] = []

        def send() -> None:
            try:
                source.migrate(f"unix:{path}", bandwidth=4 * MIB)
            except BaseException as err:  # noqa: BLE001 - the test looks at it
                errors.append(err)

        sender = threading.Thread(target=send)
        sender.start()
        while source.migration is None or source.migration.progress().bytes_sent < MIB:
            time.sleep(0.005)
        destination.kill()
        sender.join(60)
    finally:
        destination.kill()
        destination.wait()
    assert len(errors) == 1 and isinstance(errors[0], MigrationError), errors
    assert "is gone" in str(errors[0]) or "ended the stream" in str(errors[0])
    assert source.running
    assert_every_line_once(finish(source, run, b"after").serial, b"after")


def test_destinations_that_are_absent_refuse_or_do_not_fit_leave_the_guest_running(machine_factory, destinations,
                                                                                    tmp_path) -> None:  # fmt: skip
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(MIB))
    other = tmp_path / "other.img"
    other.write_bytes(bytes(2 * MIB))
    source = dirty_rate(machine_factory, rate=1024, area=256, disks=(DiskConfig(str(image)),))
    run = Background(source)
    wait_for_output(source, b"line 3\n")
    with socket.socket(socket.AF_INET) as unused:
        unused.bind(("127.0.0.1", 0))
        nobody = f"tcp:127.0.0.1:{unused.getsockname()[1]}"
    attempts = [
        (nobody, {}, {}, "cannot reach the destination"),
        (f"unix:{tmp_path}/1.sock", {}, {}, "the guest uses the disk image .*disk.img: name it among"),
        (f"unix:{tmp_path}/2.sock", {"disks": [other]}, {}, "uses the disk image"),
        (f"unix:{tmp_path}/3.sock", {"disks": [image], "token": "right"}, {"token": "wrong"},
         "could not prove that it knows the token"),
        (f"unix:{tmp_path}/4.sock", {"disks": [image]}, {"token": "mine"}, "the destination could not prove"),
    ]  # fmt: skip
    for uri, at_destination, at_source, message in attempts:
        destination = destinations(uri, **at_destination) if uri != nobody else None
        with pytest.raises(MigrationError, match=message) as caught:
            source.migrate(destination.uri if destination else uri, **at_source)
        assert "the guest runs on here" in str(caught.value) and "\n" not in str(caught.value)
        if destination is not None:
            with pytest.raises(MigrationError):
                destination.join()
        assert source.running
    finished = finish(source, run, b"after")
    assert_every_line_once(finished.serial, b"after")


# --- a stream recorded from a real source, replayed whole and damaged ---------------------------------
def record_stream(source: Machine, tmp_path: Path) -> tuple[bytes, bytes]:
    """Play the destination for ``source``'s migration: returns its hello (with the header) and its
    records, then refuses the guest (so that it runs on)."""
    path = tmp_path / "recorder.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(1)
    errors: list[BaseException] = []
    sender = threading.Thread(target=lambda: _catch(errors, source.migrate, f"unix:{path}"))
    sender.start()
    connection, _ = listener.accept()
    with connection, listener:
        connection.sendall(GREETING.pack(MAGIC, VERSION, bytes(32)))
        hello = _exactly(connection, HELLO.size)
        hello += _exactly(connection, HELLO.unpack(hello)[4])
        connection.sendall(answer(0))
        records = b""
        while True:
            header = _exactly(connection, RECORD.size)
            kind, count, _ = RECORD.unpack(header)
            records += header
            if kind == Kind.END:
                break
            records += _exactly(connection, {Kind.PAGES: count * 4096, Kind.STATE: count}.get(kind, 0))
        connection.sendall(answer(2, reason="recorded, not taken"))
    sender.join(60)
    assert len(errors) == 1 and "recorded, not taken" in str(errors[0])
    return hello, records


def _catch(errors: list[BaseException], call: Callable[..., Any], *args: Any) -> None:
    try:
        call(*args)
    except BaseException as err:  # noqa: BLE001 - the test looks at it
        errors.append(err)


def _exactly(connection: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = connection.recv(size - len(data))
        assert chunk, "the stream ended early"
        data += chunk
    return data


def replay(hello: bytes, records: bytes, **options: Any) -> tuple[Machine | None, BaseException | None, bytes]:
    """Play the source with a recorded stream into a real destination through a socket pair (fd:N).
    Returns the destination's machine or error, and the reason it gave the source."""
    ours, theirs = socket.socketpair()
    destination = Destination(f"fd:{theirs.detach()}", **options)
    reason = b""
    with ours:
        try:
            _exactly(ours, GREETING.size)
            ours.sendall(hello)
            status, _, length = ANSWER.unpack(_exactly(ours, ANSWER.size))
            reason = _exactly(ours, length)
            if status == 0:
                ours.sendall(records)
                ours.shutdown(socket.SHUT_WR)  # the end of what the source sends
                status, _, length = ANSWER.unpack(_exactly(ours, ANSWER.size))
                reason = _exactly(ours, length)
        except (AssertionError, OSError):
            pass  # the destination hung up
    destination._thread.join(120)
    return destination.machine, destination.error, reason


def flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x10]) + data[offset + 1 :]


def edit_header(hello: bytes, change: Callable[[bytes], bytes]) -> bytes:
    magic, version, nonce, proof, _ = HELLO.unpack(hello[: HELLO.size])
    header = change(hello[HELLO.size :])
    return HELLO.pack(magic, version, nonce, proof, len(header)) + header


def state_offset(records: bytes) -> int:
    """Where the STATE record's JSON starts in ``records``."""
    offset = 0
    while True:
        kind, count, _ = RECORD.unpack(records[offset : offset + RECORD.size])
        offset += RECORD.size
        if kind == Kind.STATE:
            return offset
        offset += count * 4096 if kind == Kind.PAGES else 0


def test_a_recorded_stream_replays_into_a_working_guest_and_any_damage_leaves_none(machine_factory, tmp_path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(MIB))
    source = dirty_rate(machine_factory, rate=1024, area=64, disks=(DiskConfig(str(image)),))
    run = Background(source)
    wait_for_output(source, b"line 3\n")
    hello, records = record_stream(source, tmp_path)
    assert source.running  # refused: it runs on, its disk image locked again
    with pytest.raises(ConfigError, match="in use, writable"):
        VirtioBlock(image)
    source.stop()
    run.join()
    source.close()  # it locked its disk image again: the replayed guest takes the lock next

    machine, error, _ = replay(hello, records, disks=[image])
    assert error is None and machine is not None
    with machine:
        finished = finish(machine, Background(machine))
    assert finished.status == 1
    lines = finished.serial.decode().splitlines()
    first = int(lines[0].split()[1])
    assert first > 3 and lines[:-1] == [f"line {n}" for n in range(first, first + len(lines) - 1)]
    assert lines[-1].endswith(" errors 0")

    damages = {
        "a page byte": (hello, flip(records, RECORD.size + 100), "damaged"),
        "a state byte": (hello, flip(records, state_offset(records) + 10), "damaged"),
        "the end": (hello, flip(records, len(records) - 1), "damaged"),
        "truncated": (hello, records[: len(records) // 2], "ended the stream early"),
        "the header": (edit_header(hello, lambda h: h[:-5] + b"xxxxx"), records, "not valid JSON"),
        "the config": (edit_header(hello, lambda h: h.replace(b'"cpus":1', b'"cpus":"1"')), records, "config.cpus"),
        "the memory": (edit_header(hello, lambda h: h.replace(b'"memory":67108864', b'"memory":1099511627776')),
                       records, "more than this host's"),
        "the magic": (b"X" + hello[1:], records, "does not speak pykvm's migration protocol"),
        "the disk": (edit_header(hello, lambda h: h.replace(b'"size":1048576', b'"size":1048577')), records,
                     "has 1048576 bytes here and 1048577 on the source: not the same image"),
        "a throw-away disk": (edit_header(hello, lambda h: h.replace(b'"snapshot":false', b'"snapshot":true')), records,
                              "has a throw-away disk, whose data cannot come in the stream"),
    }  # fmt: skip
    threads = threading.active_count()
    fds = len(os.listdir("/proc/self/fd"))
    for name, (damaged_hello, damaged_records, message) in damages.items():
        machine, error, reason = replay(damaged_hello, damaged_records, disks=[image])
        assert machine is None, name
        assert isinstance(error, MigrationError) and re.search(message, str(error)), (name, error)
        assert "\n" not in str(error)
        if name != "the magic":
            assert re.search(message, reason.decode()), (name, reason)  # the source hears why
    assert threading.active_count() == threads and len(os.listdir("/proc/self/fd")) == fds  # nothing left behind
