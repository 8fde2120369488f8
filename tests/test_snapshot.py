"""Snapshots of real guests: saved while they run, restored into new machines, reset.

A restored machine must go on exactly where the original was: the rest of its output is
the original's output after the moment of the snapshot, byte for byte, with nothing
repeated and nothing missing, and two machines restored from one snapshot do the same.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

from conftest import guest
from pykvm import Machine
from pykvm.config import DiskConfig
from pykvm.errors import PykvmError, SnapshotError
from pykvm.result import RunResult
from pykvm.snapshot import format as snapshot_format

pytestmark = pytest.mark.kvm

MIB = 1 << 20


class Background:
    """``machine.run()`` on a thread."""

    def __init__(self, machine: Machine, timeout: float = 120) -> None:
        self.machine = machine
        self.result: RunResult | None = None
        self._thread = threading.Thread(target=self._run, args=(timeout,))
        self._thread.start()

    def _run(self, timeout: float) -> None:
        self.result = self.machine.run(timeout=timeout)

    def join(self) -> RunResult:
        self._thread.join(180)
        assert self.result is not None, "the run did not end"
        return self.result


def wait_for_output(machine: Machine, text: bytes, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text not in (machine.serial_output.captured() or b""):
        assert time.monotonic() < deadline, f"the guest never printed {text!r}"
        time.sleep(0.002)


def snapshot_while_running(machine: Machine, path: Path, when: bytes) -> int:
    """Pause ``machine`` once it printed ``when``, snapshot it, let it go on; returns how many bytes
    of serial output it had printed at that moment."""
    wait_for_output(machine, when)
    assert machine.pause(timeout=60)
    printed = len(machine.serial_output.captured() or b"")
    machine.snapshot(path)
    machine.resume()
    return printed


def input_sum(data: bytes) -> int:
    """counter.bin's fold of the bytes its UART received: sum * 31 + byte, mod 2^64."""
    total = 0
    for byte in data:
        total = (total * 31 + byte) % (1 << 64)
    return total


def guest_ram_digest(machine: Machine) -> str:
    digest = hashlib.sha256()
    for region in machine.memory.regions:
        digest.update(region.view)
    return digest.hexdigest()


def restore_and_run(path: Path, timeout: float = 120, **options: object) -> RunResult:
    with Machine.restore(path, capture_serial=True, **options) as machine:  # type: ignore[arg-type]
        return machine.run(timeout=timeout)


def test_a_guest_saved_at_its_half_way_exit_finishes_alike_in_every_restored_machine(machine_factory, tmp_path) -> None:
    original = machine_factory()
    original.load(guest("snapshot.bin"), mode="long")
    assert original.run(timeout=60).status == 129  # the half-way exit
    original.snapshot(tmp_path / "snap")
    at_snapshot = guest_ram_digest(original)
    finished = original.run(timeout=60)
    for _ in range(2):
        with Machine.restore(tmp_path / "snap", capture_serial=True) as machine:
            assert guest_ram_digest(machine) == at_snapshot
            restored = machine.run(timeout=60)
        assert restored.status == 1 and restored.serial == finished.serial
    assert finished.serial.startswith(b"snapshot: lcg 523eea3eee92618f sum ")


DIRTY_LIST = 0x200000  # dirty_pages.bin reads a count and the addresses to write here


def write_round(machine: Machine, addresses: list[int]) -> None:
    machine.memory.write_u64(DIRTY_LIST, len(addresses))
    for i, address in enumerate(addresses):
        machine.memory.write_u64(DIRTY_LIST + 8 * (i + 1), address)


def test_machines_restored_from_one_snapshot_end_with_the_same_memory_as_the_original(machine_factory, tmp_path) -> None:
    """Without interrupts, where timing would show in the stack, every byte of RAM must agree."""
    original = machine_factory()
    original.load(guest("dirty_pages.bin"), mode="long")
    write_round(original, [0x300000 + 4096 * i for i in range(8)])
    assert original.run(timeout=60).exit_value == 0x31
    original.snapshot(tmp_path / "snap")
    second_round = [0x400000 + 8192 * i for i in range(16)]
    write_round(original, second_round)
    original.run(timeout=60)
    expected = guest_ram_digest(original)
    for _ in range(2):
        with Machine.restore(tmp_path / "snap") as machine:
            write_round(machine, second_round)
            assert machine.run(timeout=60).exit_value == 0x31
            assert guest_ram_digest(machine) == expected


def test_a_counting_guest_saved_while_it_runs_goes_on_with_no_line_repeated_or_missing(machine_factory, tmp_path) -> None:
    original = machine_factory()
    original.load(guest("counter.bin"), mode="long")
    original.serial.receive(b"typed before")  # taken by the guest's UART interrupt handler
    run = Background(original)
    printed = snapshot_while_running(original, tmp_path / "snap", b"count 150\n")
    finished = run.join()
    assert finished.status == 1 and finished.serial.endswith(b"count 400\ninput 12 sum %016x\n" % input_sum(b"typed before"))
    rest = finished.serial[printed:]
    for _ in range(2):
        restored = restore_and_run(tmp_path / "snap")
        assert restored.status == 1 and restored.serial == rest


@pytest.mark.parametrize("cpus", [2, 4])
def test_an_smp_guest_saved_while_its_vcpus_start_and_count_finishes_alike(machine_factory, tmp_path, cpus) -> None:
    original = machine_factory(cpus=cpus)
    original.load(guest("smp.elf"))
    run = Background(original)
    printed = snapshot_while_running(original, tmp_path / "snap", f"cpu {cpus - 1}\n".encode())
    finished = run.join()
    assert finished.status == 1 and finished.serial.endswith(f"counter: {cpus * 1000}\n".encode())
    restored = restore_and_run(tmp_path / "snap")
    assert restored.status == 1 and restored.serial == finished.serial[printed:]


def test_a_virtio_blk_guest_saved_between_its_requests_finishes_alike(machine_factory, tmp_path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(MIB))
    original = machine_factory(disks=(_disk(disk),), console="virtio")
    original.load(guest("virtio_blk.bin"), mode="long")
    run = Background(original)
    wait_for_output(original, b"capacity")
    assert original.pause(timeout=60)
    printed = len(original.serial_output.captured() or b"")
    original.snapshot(tmp_path / "snap")
    shutil.copy(disk, tmp_path / "disk-at-snapshot.img")
    original.resume()
    finished = run.join()
    assert finished.status == 1 and b"read back: OK" in finished.serial
    original.close()  # it holds the image's write lock
    shutil.copy(tmp_path / "disk-at-snapshot.img", disk)  # the image as it was at the snapshot
    restored = restore_and_run(tmp_path / "snap", allow_changed_disks=True)
    assert restored.status == 1 and restored.serial == finished.serial[printed:]


def _disk(path: Path) -> DiskConfig:
    return DiskConfig(str(path))


def test_reset_puts_back_exactly_what_the_guest_wrote_and_the_run_repeats(machine_factory, tmp_path) -> None:
    original = machine_factory()
    original.load(guest("snapshot.bin"), mode="long")
    original.run(timeout=60)
    original.snapshot(tmp_path / "snap")
    with Machine.restore(tmp_path / "snap", capture_serial=True, resettable=True) as machine:
        at_snapshot = guest_ram_digest(machine)
        first = machine.run(timeout=60)
        assert guest_ram_digest(machine) != at_snapshot
        put_back = machine.reset()
        assert 0 < put_back < MIB and guest_ram_digest(machine) == at_snapshot
        assert machine.run(timeout=60).serial == first.serial


def test_reset_of_the_machine_that_took_the_snapshot_reads_the_pages_back_from_the_file(machine_factory, tmp_path) -> None:
    machine = machine_factory()
    machine.load(guest("snapshot.bin"), mode="long")
    machine.run(timeout=60)
    machine.snapshot(tmp_path / "snap")
    at_snapshot = guest_ram_digest(machine)
    first = machine.run(timeout=60)
    machine.reset()
    assert guest_ram_digest(machine) == at_snapshot
    assert machine.run(timeout=60).serial == first.serial


def test_pages_a_device_wrote_since_the_snapshot_are_put_back_too(machine_factory, tmp_path) -> None:
    machine = machine_factory()
    machine.load(guest("snapshot.bin"), mode="long")
    machine.run(timeout=60)
    machine.snapshot(tmp_path / "snap")
    at_snapshot = guest_ram_digest(machine)
    machine.memory.view(32 * MIB, 4096)[:5] = b"host!"  # as a device writes guest memory
    machine.reset()
    assert guest_ram_digest(machine) == at_snapshot


def test_reset_without_a_reset_point_is_a_clear_error(machine_factory, saved) -> None:
    machine = machine_factory()
    machine.load(guest("hello_long.elf"))
    with pytest.raises(PykvmError, match="take a snapshot"):
        machine.reset()
    with Machine.restore(saved) as restored, pytest.raises(PykvmError, match="resettable=True"):
        restored.reset()


# --- the format: what is refused -------------------------------------------------------------------
@pytest.fixture
def saved(machine_factory, tmp_path) -> Path:
    machine = machine_factory()
    machine.load(guest("snapshot.bin"), mode="long")
    machine.run(timeout=60)
    machine.snapshot(tmp_path / "snap")
    return tmp_path / "snap"


def edit_manifest(path: Path, change: Callable[[dict], None]) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    change(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: (p / "state.json").write_bytes((p / "state.json").read_bytes()[:-10]), "truncated or corrupt"),
        (lambda p: (p / "state.json").write_bytes(b"{" + (p / "state.json").read_bytes()[1:].replace(b"1", b"2", 1)),
         "truncated or corrupt"),
        (lambda p: open(p / "memory.bin", "r+b").truncate(MIB), "truncated"),
        (lambda p: edit_manifest(p, lambda m: m.update(version=99)), "format version 99"),
        (lambda p: edit_manifest(p, lambda m: m.update(format="other")), "not a pykvm snapshot"),
        (lambda p: (p / "manifest.json").write_text("{" * 5000), "not valid JSON"),
        (lambda p: edit_manifest(p, lambda m: m["config"].update(cpus="two")), "config.cpus"),
        (lambda p: edit_manifest(p, lambda m: m.update(cpu_features=[["1.edx", 1 << 10]])), "lacks features the guest saw: 1.edx bit 10"),  # a reserved bit
        (lambda p: (p / "manifest.json").unlink(), "no manifest"),
    ],
    ids=["state-truncated", "state-altered", "memory-truncated", "version", "format", "json", "config", "cpu", "manifest"],
)
def test_a_damaged_or_foreign_snapshot_is_refused_in_one_line_before_any_guest_runs(saved, damage, message) -> None:
    damage(saved)
    with pytest.raises(SnapshotError, match=message) as caught:
        Machine.restore(saved)
    assert "\n" not in str(caught.value)


def test_a_state_naming_a_device_its_machine_lacks_is_refused_in_one_line(saved) -> None:
    """The state file and the manifest's checksum both rewritten: what the file holds is still checked
    (here a balloon's record in a machine without a balloon, and a record name that is not a string)."""
    state = json.loads((saved / "state.json").read_text())
    for name in ("BalloonState", ["UartState"]):
        state["devices"]["ports"][0][1]["record"] = name
        raw = json.dumps(state).encode()
        (saved / "state.json").write_bytes(raw)
        edit_manifest(saved, lambda m: m.update(state_size=len(raw), state_sha256=hashlib.sha256(raw).hexdigest()))
        with pytest.raises(SnapshotError, match="devices.ports.0..1.: expected one of the records") as caught:
            Machine.restore(saved)
        assert "\n" not in str(caught.value)


def test_a_changed_disk_image_is_refused_unless_allowed(machine_factory, tmp_path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(MIB))
    machine = machine_factory(disks=(_disk(disk),))
    machine.load(guest("snapshot.bin"), mode="long")
    machine.snapshot(tmp_path / "snap")
    machine.close()  # it holds the image's write lock
    disk.write_bytes(b"\x01" * MIB)
    with pytest.raises(SnapshotError, match="changed since the snapshot"):
        Machine.restore(tmp_path / "snap")
    Machine.restore(tmp_path / "snap", allow_changed_disks=True).close()


def test_a_snapshot_replaces_an_older_one_but_nothing_else(saved, machine_factory, tmp_path) -> None:
    machine = machine_factory()
    machine.load(guest("hello_long.elf"))
    machine.snapshot(saved)  # an older snapshot: replaced
    assert snapshot_format.read_manifest(saved).cmdline == b""
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep").write_text("mine")
    with pytest.raises(SnapshotError, match="not a pykvm snapshot"):
        machine.snapshot(tmp_path / "other")
    assert (tmp_path / "other" / "keep").read_text() == "mine"


def test_the_memory_file_holds_only_what_the_guest_used(saved) -> None:
    manifest = snapshot_format.read_manifest(saved)
    on_disk = (saved / "memory.bin").stat().st_blocks * 512
    assert manifest.memory_size == 64 * MIB and on_disk < 2 * MIB and manifest.memory_data_bytes <= on_disk


def test_many_machines_restored_from_one_snapshot_share_what_none_of_them_changed(saved) -> None:
    first = Machine.restore(saved, capture_serial=True)
    machines = [first, *(first.clone(capture_serial=True) for _ in range(9))]
    try:
        assert all(machine.kvm is first.kvm and machine.snapshot_path == saved for machine in machines)
        for machine in machines:
            assert machine.run(timeout=60).status == 1
        for machine in machines:
            private = machine.memory.resident()["private_dirty"]
            assert private < 4 * MIB, f"a clone dirtied {private} bytes"
    finally:
        for machine in machines:
            machine.close()


def test_a_restored_machine_is_served_to_gdb_only_when_asked(kvm_host, tmp_path) -> None:
    with Machine(gdb=f"unix:{tmp_path / 'saved.gdb'}") as machine:
        machine.load(guest("hello_long.elf"))
        machine.snapshot(tmp_path / "snap")
    with Machine.restore(tmp_path / "snap") as plain:
        assert plain.gdb_server is None
    with Machine.restore(tmp_path / "snap", gdb=f"unix:{tmp_path / 'restored.gdb'}", capture_serial=True) as served:
        assert served.gdb_server is not None and (tmp_path / "restored.gdb").exists()
        assert served.run(timeout=60).serial == b"Hello from long mode\n"
