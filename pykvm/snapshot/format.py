"""The snapshot format: a directory with a manifest, a state file and a memory file.

``manifest.json``
    What the snapshot is (:class:`Manifest`): the format and its version, the pykvm that
    wrote it, the machine's configuration and kernel command line, the CPU features the
    guest saw, the identity of each disk image, and the size and SHA-256 of the state file
    and the size of the memory file.  Read first; everything else is checked against it.
``state.json``
    The machine's state (:class:`MachineState`: the VM's, every vCPU's, every device's),
    as :mod:`pykvm.snapshot.codec` writes records.
``memory.bin``
    Guest RAM, each byte at its guest-physical address; pages that were never touched or
    hold only zeros are holes (a sparse file), so it costs what the guest used.  It is
    mapped copy-on-write on restore and never read as a whole, so its contents are not
    checksummed (its size is checked).
``disk-N.img``
    The data of the machine's disk N if it is a throw-away one (``DiskConfig.snapshot``): what
    its guest saw, its own writes included, copied from its overlay as a sparse file (or a
    reflink).  A restored machine gets a throw-away overlay of this copy, so it never writes the
    snapshot.  Like the memory file it is not checksummed (checking it would read all of it);
    its size is checked.  Other disks are not part of the snapshot: their identity is recorded,
    and a restore refuses an image that changed since.

Format version 2 added the throw-away disks (``DiskConfig.snapshot`` and the manifest's
``disk_copies``); a version 1 snapshot, which cannot have any, is read as one without them.

A snapshot is written into a temporary directory beside its destination, every file
and the directory are synced, and the directory is renamed into place: a reader sees a
whole snapshot or none.  An older snapshot at the destination is replaced the same way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping

from ..config import MachineConfig
from ..devices.manager import DevicesState
from ..errors import SnapshotError, StateError
from ..kvm.state import VcpuState, VmState
from .codec import decode, encode

FORMAT_NAME = "pykvm-snapshot"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, FORMAT_VERSION)
MANIFEST, STATE, MEMORY = "manifest.json", "state.json", "memory.bin"
# The state of a machine is a few KiB per vCPU and device: a larger file is not one of ours.
MAX_STATE_BYTES = 64 << 20
MAX_MANIFEST_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class DiskIdentity:
    """A disk image as it was when the snapshot was taken: a restore refuses a changed one."""

    path: str
    size: int
    mtime_ns: int
    inode: int
    device: int

    @classmethod
    def of(cls, path: str, info: os.stat_result | None = None) -> DiskIdentity:
        """The image at ``path`` as it is now, or as ``info`` (its ``fstat``) saw it."""
        info = info if info is not None else os.stat(path)
        return cls(str(Path(path).resolve()), info.st_size, info.st_mtime_ns, info.st_ino, info.st_dev)


@dataclasses.dataclass(frozen=True)
class DiskCopy:
    """The data of throw-away disk ``index`` (of the machine's disks), saved in :func:`disk_copy_name`."""

    index: int
    size: int
    data_bytes: int  # bytes of data the file holds (not holes)


def disk_copy_name(index: int) -> str:
    return f"disk-{index}.img"


@dataclasses.dataclass(frozen=True)
class MachineState:
    """Everything a paused machine holds besides its RAM."""

    vm: VmState
    vcpus: tuple[VcpuState, ...]
    devices: DevicesState


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What a snapshot holds, and what a machine must be to take it back."""

    format: str
    version: int
    pykvm_version: str
    created: str  # ISO 8601, UTC
    config: MachineConfig
    cmdline: bytes  # as the guest got it
    cpu_features: tuple[tuple[str, int], ...]  # (feature word, the bits the guest saw)
    disks: tuple[DiskIdentity, ...]  # each disk's image (a throw-away disk's: the one it was made from)
    disk_copies: tuple[DiskCopy, ...]  # the throw-away disks' data, saved in the snapshot
    state_size: int
    state_sha256: str
    memory_size: int
    memory_data_bytes: int  # bytes of RAM the memory file holds (not holes)


def write(
    path: Path, manifest: Manifest, state: bytes, write_memory: Callable[[int], int],
    write_disks: Mapping[int, Callable[[int], int]] = MappingProxyType({}),
) -> Manifest:  # fmt: skip
    """Write a snapshot directory at ``path`` atomically; ``write_memory(fd)`` fills the memory
    file and returns the bytes it wrote, ``write_disks[i](fd)`` likewise the copy of the manifest's
    throw-away disk ``i``.  Returns the manifest as written."""
    import shutil  # with tempfile, a few milliseconds to import: only writing needs them
    import tempfile

    path = Path(path)
    parent = path.resolve().parent
    if path.exists() and not (path / MANIFEST).is_file():
        raise SnapshotError(f"{path}: exists and is not a pykvm snapshot; choose another place")
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=parent))
    except OSError as err:
        raise SnapshotError(f"cannot write a snapshot in {parent}: {err.strerror}") from err
    try:
        data_bytes = _write_file(staging / MEMORY, manifest.memory_size, write_memory)
        copies: list[DiskCopy] = []
        for copy in manifest.disk_copies:
            written = _write_file(staging / disk_copy_name(copy.index), copy.size, write_disks[copy.index])
            copies.append(dataclasses.replace(copy, data_bytes=written))
        manifest = dataclasses.replace(
            manifest, state_size=len(state), state_sha256=hashlib.sha256(state).hexdigest(),
            memory_data_bytes=data_bytes, disk_copies=tuple(copies),
        )  # fmt: skip
        _write_synced(staging / STATE, state)
        _write_synced(staging / MANIFEST, json.dumps(encode(manifest), indent=1).encode() + b"\n")
        _sync_directory(staging)
        _move_into_place(staging, path)
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        raise SnapshotError(f"cannot write the snapshot {path}: {err.strerror or err}") from err
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _write_file(path: Path, size: int, fill: Callable[[int], int]) -> int:
    """A new file of ``size`` bytes filled by ``fill(fd)`` (which returns the bytes it wrote), synced."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
        written = fill(fd)
        os.fsync(fd)
    finally:
        os.close(fd)
    return written


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "xb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def _sync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _move_into_place(staging: Path, path: Path) -> None:
    """Rename ``staging`` to ``path``; an older snapshot there is renamed aside first, then removed."""
    import shutil
    import tempfile

    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.resolve().parent))
        os.rename(path, old / "snapshot")
    os.rename(staging, path)
    _sync_directory(path.resolve().parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_manifest(path: Path) -> Manifest:
    """The manifest of the snapshot at ``path``, checked: format, version, fields."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        what = "no such snapshot" if not path.exists() else "not a pykvm snapshot (no manifest.json)"
        raise SnapshotError(f"{path}: {what}")
    raw = _read_bounded(path / MANIFEST, MAX_MANIFEST_BYTES)
    data = _parse_json(path / MANIFEST, raw)
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise SnapshotError(f"{path}: not a pykvm snapshot (its manifest names no {FORMAT_NAME!r} format)")
    version = data.get("version")
    if version not in READABLE_VERSIONS:
        raise SnapshotError(
            f"{path}: snapshot format version {version!r}; this pykvm reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )
    try:
        manifest: Manifest = decode(_from_version_1(data) if version == 1 else data, Manifest)
        check_disk_copies(manifest)
    except StateError as err:
        raise SnapshotError(f"{path}: the manifest is malformed: {err}") from err
    return manifest


def _from_version_1(data: dict[str, Any]) -> dict[str, Any]:
    """A version 1 manifest in version 2's fields: it had no throw-away disks, so no disk copies."""
    config = data.get("config")
    if isinstance(config, dict) and isinstance(config.get("disks"), list):
        disks = [{"snapshot": False, **disk} if isinstance(disk, dict) else disk for disk in config["disks"]]
        data = {**data, "config": {**config, "disks": disks}}
    return {**data, "disk_copies": []}


def check_disk_copies(manifest: Manifest) -> None:
    """One copy for each throw-away disk of the configuration and none for another, in order of the
    disks, each of a size that can be a file's; and one image identity for each disk."""
    disks = manifest.config.disks
    if len(manifest.disks) != len(disks):
        raise StateError(f"{len(manifest.disks)} disk images for {len(disks)} disks")
    throwaway = [index for index, disk in enumerate(disks) if disk.throwaway]
    if [copy.index for copy in manifest.disk_copies] != throwaway:
        raise StateError(f"disk copies for the disks {[copy.index for copy in manifest.disk_copies]}, "
                         f"but the throw-away disks are {throwaway}")  # fmt: skip
    for copy in manifest.disk_copies:
        if not 0 <= copy.data_bytes <= copy.size < 1 << 63:
            raise StateError(f"disk copy {copy.index}: {copy.data_bytes} bytes of data in {copy.size}")


def disk_copy(path: Path, copy: DiskCopy) -> Path:
    """Where the snapshot at ``path`` keeps the data of a throw-away disk, after checking its size."""
    copy_path = Path(path).resolve() / disk_copy_name(copy.index)
    try:
        size = os.stat(copy_path).st_size
    except OSError as err:
        raise SnapshotError(f"{copy_path}: the copy of a throw-away disk cannot be read: {err.strerror}") from err
    if size != copy.size:
        raise SnapshotError(f"{copy_path}: {size} bytes, the manifest says {copy.size} (a truncated snapshot)")
    return copy_path


def read_state(path: Path, manifest: Manifest, records: tuple[type, ...]) -> MachineState:
    """The machine state of the snapshot at ``path``, after checking its size and checksum."""
    state_path = Path(path) / STATE
    raw = _read_bounded(state_path, MAX_STATE_BYTES)
    if len(raw) != manifest.state_size or hashlib.sha256(raw).hexdigest() != manifest.state_sha256:
        raise SnapshotError(
            f"{state_path}: {len(raw)} bytes that do not match the manifest's size and checksum "
            "(a truncated or corrupt snapshot)"
        )
    try:
        return decode(_parse_json(state_path, raw), MachineState, records)  # type: ignore[no-any-return]
    except StateError as err:
        raise SnapshotError(f"{state_path}: {err}") from err


def open_memory(path: Path, manifest: Manifest) -> int:
    """A read-only descriptor of the memory file, after checking its size."""
    memory_path = Path(path) / MEMORY
    try:
        fd = os.open(memory_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        raise SnapshotError(f"{memory_path}: cannot be opened: {err.strerror}") from err
    size = os.fstat(fd).st_size
    if size != manifest.memory_size:
        os.close(fd)
        raise SnapshotError(f"{memory_path}: {size} bytes, the manifest says {manifest.memory_size} (a truncated snapshot)")
    return fd


def _read_bounded(path: Path, limit: int) -> bytes:
    try:
        with open(path, "rb") as file:
            data = file.read(limit + 1)
    except OSError as err:
        raise SnapshotError(f"{path}: cannot be read: {err.strerror}") from err
    if len(data) > limit:
        raise SnapshotError(f"{path}: larger than {limit} bytes: not a pykvm snapshot file")
    return data


def _parse_json(path: Path, raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as err:
        raise SnapshotError(f"{path}: not valid JSON ({str(err)[:80]}): a corrupt snapshot") from err
