"""The destination of a live migration: a machine built from an incoming stream.

:class:`Incoming` listens; :meth:`Incoming.receive` takes one source, checks its handshake,
builds a machine from the guest's configuration (with this host's choices for the serial
output and /dev/kvm, and only the disk images and network device the caller named), writes
the pages as they come into guest RAM, and once the stream ended with the machine's state and
a matching checksum, puts that state into the machine and tells the source it accepted the
guest.  The machine is returned ready to run, or, on any failure, closed: no guest is left,
and :class:`~pykvm.errors.MigrationError` says why (the source hears the reason too).

Everything in the stream is untrusted and checked before use: the header's fields against the
records' type hints (:mod:`pykvm.snapshot.codec`) and by building the machine, every record's
kind, count and address (pages only inside guest RAM, through the one bounds check of
:meth:`~pykvm.memory.GuestMemory.view`), the state's size against a bound derived from the
vCPU count, the state itself field by field.  Nothing is allocated by a size the stream chose:
pages are read straight into guest memory, and a JSON body grows only as its bytes arrive.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ..config import DiskConfig, MachineConfig, NetConfig
from ..errors import GuestMemoryError, MigrationError, PykvmError
from ..memory import GuestMemory
from ..snapshot import apply, check_cpu, state_records
from ..snapshot.codec import decode, prepare
from ..snapshot.format import MAX_STATE_BYTES, MachineState, Manifest
from .source import STREAM_FORMAT
from .uri import Listener
from .wire import (
    ACCEPTED, GREETING, HELLO, MAGIC, MAX_HEADER_BYTES, NONCE_BYTES, PAGE_SIZE, READY, RECORD_PAGES, REFUSED,
    VERSION, Channel, Kind, StreamReader, answer, check_magic, check_proof, proof,
)  # fmt: skip

if TYPE_CHECKING:
    from ..devices.virtio.blk import VirtioBlock
    from ..kvm import Kvm
    from ..machine import Machine

# The machine's state is a few KiB per vCPU and device; a larger one is not a pykvm machine's.
STATE_BASE_BYTES = 1 << 20
STATE_VCPU_BYTES = 64 << 10


def state_bound(cpus: int) -> int:
    """The most bytes a machine state with ``cpus`` vCPUs may take in the stream."""
    return min(STATE_BASE_BYTES + cpus * STATE_VCPU_BYTES, MAX_STATE_BYTES)


class Incoming:
    """Waits at ``uri`` for one migration (listening from construction on: see :attr:`uri`)."""

    def __init__(self, uri: str) -> None:
        self._listener = Listener(uri)
        #: Where it listens, with the port the kernel picked for ``tcp:HOST:0``.
        self.uri = self._listener.uri

    def receive(
        self, *, kvm: Kvm | None = None, kvm_path: str | None = None, serial: str = "none",
        capture_serial: bool = False, disks: Sequence[str | Path | DiskConfig] = (), net: NetConfig | None = None,
        token: str | bytes | None = None, timeout: float | None = None,
    ) -> Machine:  # fmt: skip
        """The migrated machine, ready to run (see :meth:`pykvm.Machine.incoming`)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        check_disks(disks)
        host = _HostChoices(kvm, kvm_path, serial, capture_serial, tuple(disks), net)
        channel = Channel(self._listener.accept(deadline), deadline, "the source")
        try:
            return _receive(channel, host, token.encode() if isinstance(token, str) else token)
        finally:
            channel.close()

    def close(self) -> None:
        self._listener.close()

    def __enter__(self) -> Incoming:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_disks(disks: Sequence[str | Path | DiskConfig]) -> None:
    """Refuse a throw-away disk for a guest to come (before waiting for it): a migrated guest
    writes the image it shares with its source."""
    throwaway = [disk.path for disk in disks if isinstance(disk, DiskConfig) and disk.throwaway]
    if throwaway:
        raise MigrationError(f"the disk {throwaway[0]} is throw-away (,snapshot): a migrated guest writes the "
                             "image it shares with its source")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class _HostChoices:
    """What the destination decides, not the stream."""

    kvm: Kvm | None
    kvm_path: str | None  # the KVM device when no ``kvm`` is shared (the source's is not used)
    serial: str
    capture_serial: bool
    disks: tuple[str | Path | DiskConfig, ...]
    net: NetConfig | None


def _receive(channel: Channel, host: _HostChoices, token: bytes | None) -> Machine:
    nonce = os.urandom(NONCE_BYTES)
    channel.send(GREETING.pack(MAGIC, VERSION, nonce))
    magic, version, their_nonce, their_proof, header_size = HELLO.unpack(channel.receive(HELLO.size))
    check_magic(magic, version, channel.peer)
    if header_size > MAX_HEADER_BYTES:
        raise MigrationError(f"the source's header of {header_size} bytes is larger than {MAX_HEADER_BYTES}")
    header = channel.receive(header_size)
    try:
        if not check_proof(token, b"source", nonce, their_proof):
            raise MigrationError("the source could not prove that it knows the token")
        manifest = read_manifest(header)
        machine = build_machine(manifest, host)
    except PykvmError as err:
        _refuse(channel, err)
        raise _as_migration_error(err) from err
    try:
        channel.send(answer(READY, proof(token, b"destination", their_nonce)))
        records = state_records(manifest.config)
        prepare(MachineState, records)  # now, not while the guest is paused at the source
        reader = StreamReader(channel.read_into, channel.peer)
        state = read_state(receive_records(reader, machine.memory, state_bound(manifest.config.cpus)), records)
        apply(machine, manifest.cmdline, state)
        for disk in _disk_devices(machine):
            disk.lock_image()  # the source let go of them, waiting for this answer
        channel.send(answer(ACCEPTED))
    except BaseException as err:
        machine.close()
        if isinstance(err, PykvmError):
            _refuse(channel, err)
            raise _as_migration_error(err) from err
        raise
    machine.events.emit("migration-received")
    return machine


def _refuse(channel: Channel, err: PykvmError) -> None:
    """Tell the source why (if it still listens)."""
    try:
        channel.send(answer(REFUSED, reason=str(err)))
    except MigrationError:
        pass


def _as_migration_error(err: PykvmError) -> MigrationError:
    return err if isinstance(err, MigrationError) else MigrationError(f"the incoming guest does not fit: {err}")


def read_manifest(header: bytes) -> Manifest:
    """The source's description of the guest, checked field by field."""
    try:
        data = json.loads(header)
    except (ValueError, RecursionError) as err:
        raise MigrationError(f"the source's header is not valid JSON ({str(err)[:80]})") from err
    if not isinstance(data, dict) or data.get("format") != STREAM_FORMAT or data.get("version") != VERSION:
        raise MigrationError(f"the source's header does not describe a {STREAM_FORMAT} version {VERSION} guest")
    manifest: Manifest = decode(data, Manifest)
    if len(manifest.disks) != len(manifest.config.disks):
        raise MigrationError("the source's header names a different number of disks and disk images")
    if manifest.disk_copies or any(disk.throwaway for disk in manifest.config.disks):
        raise MigrationError("the source's guest has a throw-away disk, whose data cannot come in the stream")
    return manifest


def build_machine(manifest: Manifest, host: _HostChoices) -> Machine:
    """A machine for ``manifest``'s guest with ``host``'s choices, checked against this host."""
    from ..machine import Machine

    config = dataclasses.replace(
        manifest.config, serial=host.serial, capture_serial=host.capture_serial, disks=_disks(manifest, host.disks),
        net=_net(manifest.config.net, host.net),
    )
    if host.kvm is None:
        config = dataclasses.replace(config, kvm_path=host.kvm_path or MachineConfig().kvm_path)
    machine = Machine.restoring(config, host.kvm, None, lock_disks=False)
    try:
        check_cpu(machine, dict(manifest.cpu_features))
        memory_size = max(region.end for region in machine.memory.regions)
        if memory_size != manifest.memory_size:
            raise MigrationError(f"guest RAM ends at {memory_size:#x} here, at {manifest.memory_size:#x} on the source")
    except BaseException:
        machine.close()
        raise
    return machine


def _disk_devices(machine: Machine) -> list[VirtioBlock]:
    from ..devices.virtio.blk import VirtioBlock

    return machine.devices.virtio_devices(VirtioBlock)


def _disks(manifest: Manifest, allowed: tuple[str | Path | DiskConfig, ...]) -> tuple[DiskConfig, ...]:
    """The guest's disks, each one the caller named (by the same path), of the source's size."""
    named = {str(Path(d.path if isinstance(d, DiskConfig) else d).resolve()): d for d in allowed}
    disks = []
    for disk, identity in zip(manifest.config.disks, manifest.disks):
        given = named.pop(identity.path, None)
        if given is None:
            raise MigrationError(
                f"the guest uses the disk image {identity.path}: name it among this destination's disks "
                "to let the guest have it"
            )
        if isinstance(given, DiskConfig) and given.read_only != disk.read_only:
            mode = "read-only" if disk.read_only else "writable"
            raise MigrationError(
                f"the guest has the disk image {identity.path} {mode}, this destination gave it otherwise"
            )
        try:
            size = os.stat(identity.path).st_size
        except OSError as err:
            raise MigrationError(
                f"the guest's disk image {identity.path} cannot be opened here: {err.strerror}"
            ) from err
        if size != identity.size:
            raise MigrationError(
                f"the disk image {identity.path} has {size} bytes here and {identity.size} on the source: "
                "not the same image"
            )
        disks.append(DiskConfig(identity.path, disk.read_only))
    if named:
        raise MigrationError(f"the guest has no disk image {sorted(named)[0]}, which this destination was given")
    return tuple(disks)


def _net(guest: NetConfig | None, given: NetConfig | None) -> NetConfig | None:
    if (guest is None) != (given is None):
        what = "a network device: give this destination one" if guest else "no network device, this destination one"
        raise MigrationError(f"the guest has {what}")
    return given


def receive_records(reader: StreamReader, memory: GuestMemory, max_state: int) -> bytes:
    """Read records into ``memory`` up to the end record; returns the machine state's JSON.

    Every record is checked before anything is written: pages only inside guest RAM, counts
    and sizes within their bounds, one state, and the checksum and size of the whole at the end.
    """
    state: bytes | None = None
    while True:
        crc, size = reader.crc, reader.count
        kind, count, address = reader.record()
        if kind == Kind.PAGES:
            if not 1 <= count <= RECORD_PAGES:
                raise MigrationError(f"a page record of {count} pages (1 to {RECORD_PAGES})")
            reader.read_into(memory.view(address, _guest_range(memory, address, count)))
        elif kind == Kind.ZERO:
            if count == 0:
                raise MigrationError("a zero-page record of no pages")
            memory.discard(address, _guest_range(memory, address, count))
        elif kind == Kind.STATE:
            if state is not None:
                raise MigrationError("a second machine state in the stream")
            if count > max_state:
                raise MigrationError(f"a machine state of {count} bytes (at most {max_state})")
            state = reader.read(count)
        elif kind == Kind.END:
            if (count, address) != (crc, size):
                raise MigrationError(
                    f"the stream is damaged: its {size} bytes do not match the checksum the source sent"
                )
            if state is None:
                raise MigrationError("the stream ended without the machine's state")
            return state
        else:
            raise MigrationError(f"a record of unknown kind {kind}")


def _guest_range(memory: GuestMemory, address: int, count: int) -> int:
    """The bytes of ``count`` pages from ``address``, once they are known to lie inside guest RAM."""
    if address % PAGE_SIZE:
        raise MigrationError(f"a page record at {address:#x}, not on a page boundary")
    try:
        memory.locate(address, count * PAGE_SIZE)
    except GuestMemoryError as err:
        raise MigrationError(f"a page record outside guest RAM: {err}") from err
    return count * PAGE_SIZE


def read_state(blob: bytes, records: tuple[type, ...]) -> MachineState:
    """The machine state the stream carried, checked field by field (``records``: the device
    records it may hold, :func:`~pykvm.snapshot.state_records`)."""
    try:
        data = json.loads(blob)
    except (ValueError, RecursionError) as err:
        raise MigrationError(f"the machine state is not valid JSON ({str(err)[:80]})") from err
    state: MachineState = decode(data, MachineState, records)
    return state
