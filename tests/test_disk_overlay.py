"""Throw-away disks (``--disk PATH,snapshot``): the guest writes a copy of the image, never the image.

The image's bytes are compared (SHA-256) before and after every run that could have written it;
the overlay's cost is read from its own descriptor (``st_blocks``); snapshots of a machine with a
throw-away disk carry its data, and restored machines write neither the image nor the snapshot.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Callable

import pytest

from command import assert_one_line_error, pykvm
from conftest import guest
from pykvm import Machine
from pykvm.config import DiskConfig
from pykvm.devices.virtio.blk import VirtioBlock
from pykvm.disk_overlay import FICLONE, DiskOverlay, copy_image, data_extents
from pykvm.errors import ConfigError, MigrationError, SnapshotError
from pykvm.result import RunResult
from pykvm.snapshot import format as snapshot_format
from pykvm.snapshot import format_manifest
from test_virtio_guest import PATTERN_BYTES, guest_pattern

MIB = 1 << 20
PAUSED = 0x40  # virtio_blk_pause.bin's debug-exit value between its write and its read
READ_BACK_OK = b"virtio-blk: wrote 65536 bytes, flushed, read back: OK\n"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(MIB), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as file:
        return os.pread(file.fileno(), length, offset)


def directory_digest(path: Path) -> dict[str, str]:
    """Every file of a snapshot directory by name, with its SHA-256 (the sparse files' holes read as zeros)."""
    return {entry.name: sha256(entry) for entry in sorted(path.iterdir())}


def sparse_image(path: Path, size: int, data: dict[int, bytes]) -> Path:
    """A file of ``size`` bytes holding ``data`` at each offset and holes elsewhere."""
    with open(path, "wb") as file:
        file.truncate(size)
        for offset, chunk in data.items():
            file.seek(offset)
            file.write(chunk)
    return path


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A 1 MiB image, all a hole (virtio_blk.bin writes its 64 KiB pattern at sector 0)."""
    return sparse_image(tmp_path / "disk.img", MIB, {})


def throwaway(path: Path) -> DiskConfig:
    return DiskConfig(str(path), snapshot=True)


# --- the overlay, without a guest -------------------------------------------------------------------
def test_a_sparse_image_costs_the_overlay_what_its_data_costs(tmp_path: Path) -> None:
    data = {4 * MIB: os.urandom(3 * MIB), 700 * MIB: b"end of the data".ljust(MIB, b".")}
    path = sparse_image(tmp_path / "big.img", 1 << 30, data)
    overlay = DiskOverlay(path)
    try:
        assert (overlay.size, overlay.data_bytes) == (1 << 30, 4 * MIB)
        allocated = os.fstat(overlay.fd).st_blocks * 512
        assert 4 * MIB <= allocated <= 4 * MIB + 64 * 1024, allocated  # the data, not the 1 GiB
        assert list(data_extents(overlay.fd, overlay.size)) == [(4 * MIB, 3 * MIB), (700 * MIB, MIB)]
        for offset, chunk in data.items():
            assert os.pread(overlay.fd, len(chunk), offset) == chunk
        assert os.pread(overlay.fd, 4096, 100 * MIB) == bytes(4096)
    finally:
        overlay.close()


def test_writes_to_the_overlay_never_reach_the_image_and_end_with_it(tmp_path: Path) -> None:
    path = sparse_image(tmp_path / "disk.img", 8 * MIB, {0: b"original"})
    before = sha256(path)
    overlay = DiskOverlay(path)
    device_fd = overlay.device_fd()
    try:
        os.pwrite(device_fd, b"written!", 0)
        os.pwrite(device_fd, b"in a hole", 5 * MIB)
        assert os.pread(overlay.fd, 8, 0) == b"written!"  # the device's descriptor is the overlay's file
        assert sha256(path) == before
        assert overlay.directory == str(tmp_path)  # beside the image, where a reflink could share its blocks
        assert not [entry for entry in tmp_path.iterdir() if entry.name != "disk.img"]  # unlinked
    finally:
        os.close(device_fd)
        overlay.close()
    assert sha256(path) == before


def test_the_overlay_goes_to_the_temporary_directory_where_the_images_directory_takes_no_file(tmp_path: Path) -> None:
    directory = tmp_path / "images"
    directory.mkdir()
    path = sparse_image(directory / "disk.img", MIB, {0: b"data"})
    immutable = shutil.which("chattr") and not subprocess.run(["chattr", "+i", str(directory)], capture_output=True).returncode
    if not immutable:
        pytest.skip("cannot make a directory immutable here (chattr +i needs root and a file system that has it)")
    try:
        overlay = DiskOverlay(path)
        try:
            assert overlay.directory == tempfile.gettempdir()
            assert os.pread(overlay.fd, 4, 0) == b"data"
        finally:
            overlay.close()
    finally:
        subprocess.run(["chattr", "-i", str(directory)], check=True)


def test_a_reflink_copies_no_data_where_the_file_system_has_them(tmp_path: Path) -> None:
    """Runs in ``$PYKVM_REFLINK_DIR`` (a directory on btrfs or XFS, say), else in the test's own
    directory, and only where FICLONE works there."""
    directory = Path(os.environ.get("PYKVM_REFLINK_DIR") or tmp_path)
    with tempfile.TemporaryDirectory(dir=directory) as place:
        path = sparse_image(Path(place) / "disk.img", 1 << 30, {8 * MIB: os.urandom(32 * MIB)})
        with open(path, "rb") as source, open(Path(place) / "probe", "wb") as probe:
            try:
                fcntl.ioctl(probe.fileno(), FICLONE, source.fileno())
            except OSError as err:
                pytest.skip(f"{directory} cannot reflink ({err.strerror}): set PYKVM_REFLINK_DIR to a btrfs or XFS one")
        os.sync()
        free_before = _free_bytes(directory)
        overlay = DiskOverlay(path)
        try:
            assert overlay.data_bytes == 32 * MIB
            assert os.pread(overlay.fd, 32 * MIB, 8 * MIB) == read(path, 8 * MIB, 32 * MIB)
            os.sync()
            assert free_before - _free_bytes(directory) < MIB  # the blocks are shared, not copied
            os.pwrite(overlay.fd, b"mine", 8 * MIB)
            assert read(path, 8 * MIB, 4) != b"mine"
        finally:
            overlay.close()


def _free_bytes(directory: Path) -> int:
    info = os.statvfs(directory)
    return info.f_bfree * info.f_frsize


def test_saving_and_putting_back_keep_holes_and_data(tmp_path: Path) -> None:
    path = sparse_image(tmp_path / "disk.img", 64 * MIB, {MIB: b"a" * 8192})
    overlay = DiskOverlay(path)
    saved = os.open(tmp_path / "saved.img", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwrite(overlay.fd, b"b" * 4096, 32 * MIB)
        assert overlay.save(saved) == 8192 + 4096
        assert os.fstat(saved).st_size == 64 * MIB and os.fstat(saved).st_blocks * 512 <= 64 * 1024
        os.pwrite(overlay.fd, b"c" * 4096, 0)
        os.pwrite(overlay.fd, b"c" * 4096, 32 * MIB)
        overlay.refill(saved)
        assert os.pread(overlay.fd, 4096, 0) == bytes(4096)
        assert os.pread(overlay.fd, 4096, 32 * MIB) == b"b" * 4096
        assert os.pread(overlay.fd, 8192, MIB) == b"a" * 8192
    finally:
        os.close(saved)
        overlay.close()


def test_a_copy_between_file_systems_reads_and_writes_and_keeps_the_holes(tmp_path: Path) -> None:
    """From tmpfs to tmp_path's file system neither a reflink nor copy_file_range can copy: the data
    extents are read and written, and the holes stay holes."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another file system than the test's directory")
    with tempfile.TemporaryDirectory(dir=shm) as other:
        source = sparse_image(Path(other) / "disk.img", 16 * MIB, {MIB: os.urandom(3 * MIB), 12 * MIB: b"tail"})
        source_fd = os.open(source, os.O_RDONLY)
        target_fd = os.open(tmp_path / "copy.img", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            with pytest.raises(OSError) as cross:
                os.copy_file_range(source_fd, target_fd, 4096, 0, 0)
            if cross.value.errno != errno.EXDEV:
                pytest.skip(f"copy_file_range between these file systems fails with {cross.value}, not EXDEV")
            assert copy_image(source_fd, target_fd, 16 * MIB) == 3 * MIB + 4096
            assert (tmp_path / "copy.img").read_bytes() == source.read_bytes()
            assert os.fstat(target_fd).st_blocks * 512 <= 3 * MIB + 64 * 1024
        finally:
            os.close(source_fd)
            os.close(target_fd)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, "no such disk image"),
        (lambda p: p.mkdir(), "is a directory, not a disk image"),
        (lambda p: os.mkfifo(p), "not a regular file or block device"),  # refused, not waited on
    ],
    ids=["missing", "directory", "fifo"],
)
def test_an_image_that_cannot_be_one_is_refused_in_one_line(tmp_path: Path, make: Callable[[Path], object],
                                                            message: str) -> None:
    path = tmp_path / "disk.img"
    make(path)
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(ConfigError, match=message) as refused:
        DiskOverlay(path)
    assert str(refused.value).startswith(str(path)) and "\n" not in str(refused.value)
    assert len(os.listdir("/proc/self/fd")) == before


# --- locks ------------------------------------------------------------------------------------------------
def test_throwaway_users_share_the_image_with_readers_and_keep_writers_out(image: Path) -> None:
    overlays = [DiskOverlay(image) for _ in range(3)]
    reader = VirtioBlock(image, read_only=True)
    try:
        with pytest.raises(ConfigError, match="a writable disk needs it alone .*PATH,snapshot"):
            VirtioBlock(image)
    finally:
        reader.close()
        for overlay in overlays:
            overlay.close()
    VirtioBlock(image).close()  # the shared locks went with the overlays


def test_a_throwaway_user_is_refused_while_a_writer_has_the_image(image: Path) -> None:
    writer = VirtioBlock(image)
    try:
        with pytest.raises(ConfigError, match=f"{image}: the disk image is in use, writable, by pid {os.getpid()}"):
            DiskOverlay(image)
    finally:
        writer.close()


# --- a guest ---------------------------------------------------------------------------------------------
def run_virtio_blk(machine: Machine, image: str = "virtio_blk.bin") -> RunResult:
    machine.load(guest(image), mode="long")
    return machine.run(timeout=120)


@pytest.mark.kvm
def test_the_guest_reads_back_what_it_wrote_and_the_image_stays_as_it_was(machine_factory, image: Path) -> None:
    before = sha256(image)
    machine = machine_factory(console="virtio", disks=(throwaway(image),))
    result = run_virtio_blk(machine)
    assert result.serial.count(READ_BACK_OK) == 2 and (result.exit_value, result.status) == (0, 1)
    assert os.pread(machine.disk_overlays[0].fd, PATTERN_BYTES, 0) == guest_pattern()  # the overlay took the write
    assert sha256(image) == before
    machine.close()
    assert sha256(image) == before


@pytest.mark.kvm
def test_two_machines_write_one_image_at_once_each_in_its_own_overlay(machine_factory, image: Path) -> None:
    before = sha256(image)
    machines = [machine_factory(console="virtio", disks=(throwaway(image),)) for _ in range(2)]
    results: list[RunResult] = []
    threads = [threading.Thread(target=lambda m=machine: results.append(run_virtio_blk(m))) for machine in machines]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert len(results) == 2
    for result in results:
        assert result.serial.count(READ_BACK_OK) == 2 and result.status == 1
    assert sha256(image) == before


@pytest.mark.kvm
def test_a_writer_and_a_throwaway_machine_exclude_each_other(machine_factory, image: Path) -> None:
    first = machine_factory(disks=(throwaway(image),))
    with pytest.raises(ConfigError, match="a writable disk needs it alone"):
        machine_factory(disks=(DiskConfig(str(image)),))
    first.close()
    machine_factory(disks=(DiskConfig(str(image)),))
    with pytest.raises(ConfigError, match="in use, writable"):
        machine_factory(disks=(throwaway(image),))


@pytest.mark.kvm
def test_read_only_and_snapshot_together_is_a_read_only_disk(machine_factory, image: Path) -> None:
    machine = machine_factory(console="virtio", disks=(DiskConfig(str(image), read_only=True, snapshot=True),))
    result = run_virtio_blk(machine)
    assert b"virtio-blk: write failed, status 1\n" in result.serial and result.exit_value == 3
    assert machine.disk_overlays == {}


# --- the command line -------------------------------------------------------------------------------------
@pytest.mark.kvm
def test_pykvm_run_with_a_throwaway_disk(image: Path) -> None:
    before = sha256(image)
    process = pykvm("run", str(guest("virtio_blk.bin")), "--mode", "long", "--console", "virtio",
                    "--disk", f"{image},snapshot", "--timeout", "120")  # fmt: skip
    assert process.returncode == 1, process.stderr
    assert process.stdout.count(READ_BACK_OK) == 2
    assert sha256(image) == before


@pytest.mark.parametrize(
    "spec, message",
    [
        ("{image},snapshot,bogus", "write it as PATH, PATH,ro or PATH,snapshot"),
        ("{image},snapshot,snapshot", "write it as PATH, PATH,ro or PATH,snapshot"),
        ("{image},ro,rw,snapshot", "write it as PATH, PATH,ro or PATH,snapshot"),
        (",snapshot", "write it as PATH, PATH,ro or PATH,snapshot"),
        ("{image}.missing,snapshot", "no such disk image"),
    ],
    ids=["unknown", "twice", "ro-and-rw", "no-path", "missing"],
)
def test_pykvm_run_refuses_a_bad_throwaway_disk_in_one_line(image: Path, spec: str, message: str) -> None:
    process = pykvm("run", str(guest("hello_real.bin")), "--disk", spec.format(image=image))
    assert_one_line_error(process, message)


# --- snapshots --------------------------------------------------------------------------------------------
@pytest.fixture
def paused_snapshot(machine_factory, image: Path, tmp_path: Path) -> tuple[Path, RunResult]:
    """A snapshot of virtio_blk_pause.bin on a throw-away disk, taken between its write (flushed) and its
    read, and the rest of the original machine's run after it."""
    original = machine_factory(console="virtio", disks=(throwaway(image),))
    paused = run_virtio_blk(original, "virtio_blk_pause.bin")
    assert (paused.reason.value, paused.exit_value) == ("debug-exit", PAUSED), paused.serial
    original.snapshot(tmp_path / "snap")
    finished = original.run(timeout=120)
    assert finished.serial.count(READ_BACK_OK) == 2 and finished.status == 1
    return tmp_path / "snap", finished


@pytest.mark.kvm
def test_a_snapshot_keeps_what_the_guest_wrote_and_each_restored_guest_reads_it_back(
    paused_snapshot: tuple[Path, RunResult], image: Path
) -> None:
    snapshot, finished = paused_snapshot
    before = sha256(image)
    manifest = snapshot_format.read_manifest(snapshot)
    (copy,) = manifest.disk_copies
    assert (copy.index, copy.size, copy.data_bytes) == (0, MIB, PATTERN_BYTES)
    assert f"disk:       {image}, 1048576 bytes; throw-away, its data saved in disk-0.img: 0.1 MiB" in (
        format_manifest(snapshot, manifest).splitlines()
    )
    saved = snapshot / "disk-0.img"
    assert read(saved, 0, PATTERN_BYTES) == guest_pattern()
    assert os.stat(saved).st_blocks * 512 <= PATTERN_BYTES + 4096  # sparse: the data only
    at_snapshot = directory_digest(snapshot)
    runs = []
    for _ in range(2):
        with Machine.restore(snapshot, capture_serial=True) as machine:
            runs.append(machine.run(timeout=120))
    assert runs[0].serial == runs[1].serial and runs[0].status == runs[1].status == 1
    assert runs[0].serial.count(READ_BACK_OK) == 2  # the pattern came from the snapshot's copy
    assert runs[0].serial.splitlines()[:2] == finished.serial.splitlines()[:2]
    assert directory_digest(snapshot) == at_snapshot  # a restored machine never writes its snapshot
    assert sha256(image) == before


@pytest.mark.kvm
def test_a_restored_throwaway_disk_needs_no_image_and_refuses_a_truncated_copy(
    paused_snapshot: tuple[Path, RunResult], image: Path
) -> None:
    snapshot, _ = paused_snapshot
    image.unlink()  # the image the overlay was made from is not needed any more
    with Machine.restore(snapshot, capture_serial=True) as machine:
        assert machine.run(timeout=120).serial.count(READ_BACK_OK) == 2
    os.truncate(snapshot / "disk-0.img", MIB // 2)
    with pytest.raises(SnapshotError, match="disk-0.img: 524288 bytes, the manifest says 1048576") as refused:
        Machine.restore(snapshot)
    assert "\n" not in str(refused.value)


@pytest.mark.kvm
def test_reset_puts_the_throwaway_disk_back_as_the_snapshot_saved_it(machine_factory, image, tmp_path) -> None:
    machine = machine_factory(console="virtio", disks=(throwaway(image),))
    machine.load(guest("virtio_blk.bin"), mode="long")
    machine.snapshot(tmp_path / "snap")  # before the guest wrote anything
    overlay = machine.disk_overlays[0]
    assert machine.run(timeout=120).status == 1
    assert os.pread(overlay.fd, PATTERN_BYTES, 0) == guest_pattern()
    machine.reset()
    assert os.pread(overlay.fd, PATTERN_BYTES, 0) == bytes(PATTERN_BYTES)
    assert machine.run(timeout=120).serial.count(READ_BACK_OK) == 2  # and the guest runs as the first time


@pytest.mark.kvm
def test_a_version_1_snapshot_is_read_as_one_without_throwaway_disks(machine_factory, image, tmp_path) -> None:
    machine = machine_factory(disks=(DiskConfig(str(image)),))
    machine.load(guest("hello_long.elf"))
    machine.snapshot(tmp_path / "snap")
    machine.close()
    manifest_path = tmp_path / "snap" / "manifest.json"
    data = json.loads(manifest_path.read_text())
    del data["disk_copies"]
    for disk in data["config"]["disks"]:
        del disk["snapshot"]
    manifest_path.write_text(json.dumps({**data, "version": 1}))
    manifest = snapshot_format.read_manifest(tmp_path / "snap")
    assert manifest.version == 1 and manifest.disk_copies == ()
    assert manifest.config.disks == (DiskConfig(str(image)),)
    with Machine.restore(tmp_path / "snap", capture_serial=True) as restored:
        assert restored.run(timeout=60).serial == b"Hello from long mode\n"


@pytest.mark.kvm
def test_a_manifest_whose_disk_copies_do_not_fit_its_disks_is_refused(paused_snapshot: tuple[Path, RunResult]) -> None:
    snapshot, _ = paused_snapshot
    manifest_path = snapshot / "manifest.json"
    data = json.loads(manifest_path.read_text())
    data["config"]["disks"][0]["snapshot"] = False
    manifest_path.write_text(json.dumps(data))
    with pytest.raises(SnapshotError, match=r"disk copies for the disks \[0\], but the throw-away disks are \[\]"):
        Machine.restore(snapshot)


# --- migration ----------------------------------------------------------------------------------------------
@pytest.mark.kvm
def test_a_guest_with_a_throwaway_disk_is_not_migrated_and_nothing_is_sent(machine_factory, image, tmp_path) -> None:
    machine = machine_factory(disks=(throwaway(image),), capture_serial=True)
    machine.load(guest("hello_long.elf"))
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "m.sock"))
    listener.listen()
    listener.setblocking(False)
    try:
        refusal = "throw-away overlay .* cannot migrate; the guest runs on here"
        with pytest.raises(MigrationError, match=refusal) as refused:
            machine.migrate(f"unix:{tmp_path}/m.sock", timeout=30)
        assert "\n" not in str(refused.value)
        with pytest.raises(BlockingIOError):
            listener.accept()  # the source never connected
    finally:
        listener.close()
    assert machine.run(timeout=60).serial == b"Hello from long mode\n"  # the guest runs on here


def test_a_destination_refuses_a_throwaway_disk_before_it_waits(image: Path, tmp_path: Path) -> None:
    with pytest.raises(MigrationError, match="is throw-away"):
        Machine.incoming(f"unix:{tmp_path}/m.sock", disks=[throwaway(image)], timeout=30)
