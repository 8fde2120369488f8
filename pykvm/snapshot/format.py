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
from typing import Any, Callable

from ..config import MachineConfig
from ..devices.manager import DevicesState
from ..errors import SnapshotError, StateError
from ..kvm.state import VcpuState, VmState
from .codec import decode, encode

FORMAT_NAME = "pykvm-snapshot"
FORMAT_VERSION = 1
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
    def of(cls, path: str) -> DiskIdentity:
        info = os.stat(path)
        return cls(str(Path(path).resolve()), info.st_size, info.st_mtime_ns, info.st_ino, info.st_dev)


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
    disks: tuple[DiskIdentity, ...]
    state_size: int
    state_sha256: str
    memory_size: int
    memory_data_bytes: int  # bytes of RAM the memory file holds (not holes)


def write(path: Path, manifest: Manifest, state: bytes, write_memory: Callable[[int], int]) -> Manifest:
    """Write a snapshot directory at ``path`` atomically; ``write_memory(fd)`` fills the memory
    file and returns the bytes it wrote.  Returns the manifest as written."""
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
        fd = os.open(staging / MEMORY, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, manifest.memory_size)
            data_bytes = write_memory(fd)
            os.fsync(fd)
        finally:
            os.close(fd)
        manifest = dataclasses.replace(
            manifest, state_size=len(state), state_sha256=hashlib.sha256(state).hexdigest(), memory_data_bytes=data_bytes
        )
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
    if data.get("version") != FORMAT_VERSION:
        raise SnapshotError(
            f"{path}: snapshot format version {data.get('version')!r}; this pykvm reads version {FORMAT_VERSION}"
        )
    try:
        return decode(data, Manifest)  # type: ignore[no-any-return]
    except StateError as err:
        raise SnapshotError(f"{path}: the manifest is malformed: {err}") from err


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
