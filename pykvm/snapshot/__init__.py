"""Snapshots: a paused machine saved to a directory, machines restored from one, fast reset.

:func:`save` pauses the machine at an exit boundary (every vCPU parked, the I/O thread
drained and parked, so no virtio request is half done), reads the VM's, every vCPU's
and every device's state, writes guest RAM as a sparse file and the rest as JSON (see
:mod:`pykvm.snapshot.format`), and lets the machine go on.  :func:`restore` builds a
machine from the snapshot's configuration with guest RAM mapped copy-on-write from the
memory file (nothing is read until the guest touches it, so restoring costs the same
for any RAM size), then puts the state back: the VM's in-kernel devices, the vCPUs
(Firecracker's order), the devices.  Everything is checked before the guest runs: the
format version, the state file's checksum, the memory file's size, the CPU features the
guest saw against this host's, each disk image's identity.

A throw-away disk's data is part of the snapshot (its overlay is what the guest sees): it is
saved beside the memory file, and a restored machine gets a throw-away overlay of that copy.

A saved or restored snapshot is also the machine's *reset point*: from then on KVM logs
the pages the guest writes and guest memory notes the pages devices write, so that
:func:`reset` puts back only those pages, then the saved state (the snapshotting
technique of fuzzers such as snapchange): a fresh machine in well under a millisecond
for a test that dirtied little.  Throw-away disks are put back from their saved copies too,
which costs a copy of their data (a reflink where the file system has them).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from ..config import DiskConfig, MachineConfig
from ..devices.acpi_pm import AcpiPmState
from ..devices.cmos import CmosState
from ..devices.fw_cfg import FwCfgState, set_cmdline
from ..devices.i8042 import I8042State
from ..devices.uart import UartState
from ..errors import PykvmError, SnapshotError, StateError
from ..kvm import Kvm
from ..kvm.state import CpuidEntry
from ..memory import GuestMemory
from ..native import ffi, lib
from ..x86.layout import PAGE_SIZE
from ..x86.features import feature_words, missing_features
from . import format
from .codec import encode
from .format import DiskCopy, DiskIdentity, MachineState, Manifest

if TYPE_CHECKING:
    from ..host_inputs import HostInputs
    from ..machine import Machine

__all__ = ["Manifest", "MachineState", "ResetPoint", "read_info", "restore", "save", "reset"]


def state_records(config: MachineConfig) -> tuple[type, ...]:
    """The records the device entries of a machine with ``config`` may hold (no other class is ever
    built from one); a virtio device's module is imported only for a machine that has one."""
    records: list[type] = [UartState, CmosState, I8042State, AcpiPmState, FwCfgState]
    virtio_console = config.console == "virtio"
    if virtio_console or config.disks or config.rng or config.net is not None or config.balloon:
        from ..devices.virtio.mmio import TransportState

        records.append(TransportState)
    if virtio_console:
        from ..devices.virtio.console import ConsoleState

        records.append(ConsoleState)
    if config.balloon:
        from ..devices.virtio.balloon import BalloonState

        records.append(BalloonState)
    if config.pc_testdev:
        from ..devices.testdev import PcTestdevState

        records.append(PcTestdevState)
    return tuple(records)


@dataclasses.dataclass
class ResetPoint:
    """A machine's last snapshot: its state, the memory file that holds its RAM, and the saved
    copies of its throw-away disks (read-only descriptors, by the disk's index)."""

    state: MachineState
    memory_fd: int
    backs_memory: bool  # guest RAM is mapped from memory_fd (a restored machine)
    disk_fds: dict[int, int] = dataclasses.field(default_factory=dict)
    # (gpa, bytes) runs written since, whose dirty log another reader took (a live migration)
    written: list[tuple[int, int]] = dataclasses.field(default_factory=list)

    def open_disk_copies(self, path: Path, manifest: Manifest) -> None:
        """Hold the copies the snapshot at ``path`` saved of its throw-away disks, to put them back."""
        for copy in manifest.disk_copies:
            try:
                self.disk_fds[copy.index] = os.open(format.disk_copy(path, copy), os.O_RDONLY | os.O_CLOEXEC)
            except OSError as err:
                raise SnapshotError(
                    f"{path}: the copy of throw-away disk {copy.index} cannot be opened: {err.strerror}"
                ) from err

    def close(self) -> None:
        for fd in (self.memory_fd, *self.disk_fds.values()):
            if fd >= 0:
                os.close(fd)
        self.memory_fd = -1
        self.disk_fds = {}


# --- saving ---------------------------------------------------------------------------------------
def save(machine: Machine, path: str | Path) -> Manifest:
    """Write ``machine`` (running or not) as a snapshot at ``path``; it goes on afterwards."""
    path = Path(path)
    with machine.paused_for_snapshot():
        state = capture(machine)
        write_disks = {index: overlay.save for index, overlay in machine.disk_overlays.items()}
        manifest = format.write(path, describe(machine, state.vcpus[0].cpuid), format_state(state),
                                lambda fd: write_memory(machine.memory, fd), write_disks)  # fmt: skip
        point = ResetPoint(state, format.open_memory(path, manifest), backs_memory=False)
        try:
            point.open_disk_copies(path, manifest)
        except BaseException:
            point.close()
            raise
        machine.set_reset_point(point)
    return manifest


def capture(machine: Machine) -> MachineState:
    """The state of a paused machine."""
    msrs = machine.saved_msrs()
    return MachineState(
        machine.vm.save_state(),
        tuple(vcpu.save_state(msrs) for vcpu in machine.vcpus),
        machine.devices.save_state(),
    )


def format_state(state: MachineState) -> bytes:
    return json.dumps(encode(state), separators=(",", ":")).encode()


def describe(machine: Machine, cpuid: list[CpuidEntry]) -> Manifest:
    """The manifest of ``machine``, whose vCPUs have ``cpuid``: what a machine must be to take its
    state (the sizes and checksum of the snapshot's files are filled in as they are written)."""
    config = dataclasses.replace(machine.config, memory=machine.config.memory_bytes)
    return Manifest(
        format=format.FORMAT_NAME,
        version=format.FORMAT_VERSION,
        pykvm_version=_pykvm_version(),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        config=config,
        cmdline=machine.cmdline,
        cpu_features=tuple(feature_words(cpuid).items()),
        disks=tuple(_identity(machine, index, disk.path) for index, disk in enumerate(config.disks)),
        disk_copies=tuple(DiskCopy(index, overlay.size, 0) for index, overlay in sorted(machine.disk_overlays.items())),
        state_size=0,
        state_sha256="",
        memory_size=max(region.end for region in machine.memory.regions),
        memory_data_bytes=0,
    )


def _identity(machine: Machine, index: int, path: str) -> DiskIdentity:
    """The image of disk ``index``: a throw-away disk's as its overlay was made from it (the
    overlay holds it open, wherever its name went meanwhile)."""
    overlay = machine.disk_overlays.get(index)
    return DiskIdentity.of(path, os.fstat(overlay.source_fd) if overlay is not None else None)


@functools.cache
def _pykvm_version() -> str:
    from importlib import metadata  # tens of milliseconds to import, and a look through the installed packages

    return metadata.version("pykvm-hypervisor")


def write_memory(memory: GuestMemory, fd: int) -> int:
    """Write guest RAM into the memory file ``fd`` (each byte at its guest-physical address; the
    pages that hold only zeros stay holes); returns the bytes written."""
    pagemap = -1 if memory.file_backed else os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        written = 0
        for region in memory.regions:
            done = lib.pykvm_save_pages(fd, ffi.cast("const uint8_t *", region.host_addr), region.size, region.gpa, pagemap)
            if done < 0:
                raise OSError(-done, os.strerror(-done))
            written += done
        return written
    finally:
        if pagemap >= 0:
            os.close(pagemap)


# --- restoring --------------------------------------------------------------------------------------
def read_info(path: str | Path) -> Manifest:
    """What the snapshot at ``path`` holds (its manifest, checked)."""
    return format.read_manifest(Path(path))


def format_manifest(path: str | Path, manifest: Manifest) -> str:
    """``pykvm snapshot info``: the manifest for humans."""
    config = manifest.config
    devices = [name for name, present in (("virtio-console", config.console == "virtio"), ("virtio-rng", config.rng),
                                          ("virtio-net", config.net is not None), ("virtio-balloon", config.balloon))
               if present] + [f"virtio-blk {disk.path}{_disk_kind(disk)}" for disk in config.disks]  # fmt: skip
    on_disk = (Path(path) / format.MEMORY).stat().st_blocks * 512 if (Path(path) / format.MEMORY).exists() else 0
    mib = 1 << 20
    lines = [
        f"snapshot:   {path} (format {manifest.format} {manifest.version}, pykvm {manifest.pykvm_version}, {manifest.created})",
        f"machine:    {config.memory_bytes / mib:.0f} MiB RAM, {config.cpus} vCPU{'s' if config.cpus != 1 else ''}, "
        f"{'in-kernel irqchip' if config.irqchip else 'no irqchip'}; devices: {', '.join(devices) or 'none'}",
        f"cmdline:    {manifest.cmdline.decode(errors='backslashreplace') or '(none)'}",
        f"memory:     {manifest.memory_data_bytes / mib:.1f} MiB of RAM saved, {on_disk / mib:.1f} MiB on disk "
        f"(the file is {manifest.memory_size / mib:.0f} MiB, sparse)",
        f"state:      {manifest.state_size} bytes, SHA-256 {manifest.state_sha256[:16]}...",
        f"CPU:        {sum(bin(bits).count('1') for _, bits in manifest.cpu_features)} feature bits the guest saw",
    ]
    copies = {copy.index: copy for copy in manifest.disk_copies}
    for index, disk in enumerate(manifest.disks):
        copy = copies.get(index)
        saved = (f"; throw-away, its data saved in {format.disk_copy_name(index)}: {copy.data_bytes / mib:.1f} MiB"
                 if copy is not None else "")  # fmt: skip
        lines.append(f"disk:       {disk.path}, {disk.size} bytes{saved}")
    return "\n".join(lines)


def _disk_kind(disk: DiskConfig) -> str:
    return " (read-only)" if disk.read_only else " (throw-away)" if disk.throwaway else ""


def restore(
    path: str | Path,
    *,
    kvm: Kvm | None = None,
    kvm_path: str | None = None,
    serial: str = "none",
    capture_serial: bool = False,
    allow_changed_disks: bool = False,
    resettable: bool = False,
    virtio_notify: str | None = None,
    host_inputs: HostInputs | None = None,
    machine_type: type[Machine] | None = None,
    gdb: str | None = None,
    gdb_wait: bool = False,
) -> Machine:
    """A machine restored from the snapshot at ``path``, ready to :meth:`~pykvm.Machine.run`.

    ``serial`` and ``capture_serial`` say where this machine's serial output goes, and
    ``virtio_notify`` (if given) how its queue notifications travel: they are the host's
    choice, not the snapshot's.  A disk image that changed since the snapshot is refused
    unless ``allow_changed_disks``.  ``resettable``: the snapshot becomes the machine's reset
    point (KVM logs the guest's writes from the start).  ``host_inputs`` answers the devices'
    questions to the host (see :class:`~pykvm.host_inputs.HostInputs`) from the restore on.
    ``machine_type`` is the class of the machine made (a subclass of :class:`~pykvm.Machine`);
    ``gdb`` and ``gdb_wait`` serve it to gdb as for a new machine (the saved machine's are not kept).
    A throw-away disk becomes a throw-away overlay of the copy the snapshot saved of it, so
    nothing the restored guest writes reaches the snapshot.
    """
    from ..machine import Machine

    path = Path(path)
    manifest = format.read_manifest(path)
    state = format.read_state(path, manifest, state_records(manifest.config))
    if not allow_changed_disks:
        _check_disks(manifest)
    config = dataclasses.replace(manifest.config, disks=_restored_disks(path, manifest), serial=serial,
                                 capture_serial=capture_serial, gdb=gdb, gdb_wait=gdb_wait)  # fmt: skip
    if virtio_notify is not None:
        config = dataclasses.replace(config, virtio_notify=virtio_notify)
    if kvm is None:  # the KVM device is this host's choice (the default, or ``kvm_path``)
        config = dataclasses.replace(config, kvm_path=kvm_path or MachineConfig().kvm_path)
    fd = format.open_memory(path, manifest)
    try:
        machine = (machine_type or Machine).restoring(config, kvm, fd, log_dirty=resettable, host_inputs=host_inputs)
    except BaseException:
        os.close(fd)
        raise
    point = ResetPoint(state, fd, backs_memory=True)  # owns fd from here: the mapping keeps the file
    try:
        check_cpu(machine, dict(manifest.cpu_features))
        apply(machine, manifest.cmdline, state)
        if resettable:
            point.open_disk_copies(path, manifest)
            machine.set_reset_point(point)
        else:
            point.close()
    except BaseException as err:
        machine.close()
        point.close()
        if isinstance(err, StateError):
            raise SnapshotError(f"{path}: cannot be restored: {err}") from err
        raise
    return machine


def _check_disks(manifest: Manifest) -> None:
    """Refuse an image that changed since the snapshot (a throw-away disk's image is not used)."""
    copied = {copy.index for copy in manifest.disk_copies}
    for saved in (disk for index, disk in enumerate(manifest.disks) if index not in copied):
        try:
            now = DiskIdentity.of(saved.path)
        except OSError as err:
            raise SnapshotError(f"the snapshot's disk {saved.path} cannot be found: {err.strerror}") from err
        if now != saved:
            raise SnapshotError(
                f"the disk image {saved.path} changed since the snapshot (size, time or file); "
                "restore with allow_changed_disks (--allow-changed-disks) to use it anyway"
            )


def _restored_disks(path: Path, manifest: Manifest) -> tuple[DiskConfig, ...]:
    """The saved machine's disks, each throw-away one made from the copy the snapshot saved of it."""
    disks = list(manifest.config.disks)
    for copy in manifest.disk_copies:
        disks[copy.index] = dataclasses.replace(disks[copy.index], path=str(format.disk_copy(path, copy)))
    return tuple(disks)


def check_cpu(machine: Machine, seen: dict[str, int]) -> None:
    """Refuse a host whose vCPUs would not get every feature the saved guest saw (what a fresh
    vCPU of this machine reports: where KVM adds host bits of its own, it does so here too)."""
    offered = feature_words(machine.vcpus[0].get_cpuid2())
    missing = missing_features(seen, offered)
    if missing:
        raise SnapshotError(f"this host's CPU (as KVM offers it) lacks features the guest saw: {', '.join(missing)}")


def apply(machine: Machine, cmdline: bytes, state: MachineState) -> None:
    """Put ``state`` into ``machine`` (built from the same configuration, not running)."""
    if len(state.vcpus) != len(machine.vcpus):
        raise StateError(f"the state has {len(state.vcpus)} vCPUs, the machine {len(machine.vcpus)}")
    set_cmdline(machine.fw_cfg, cmdline)
    machine.vm.restore_state(state.vm)
    for vcpu, vcpu_state in zip(machine.vcpus, state.vcpus):
        vcpu.restore_state(vcpu_state)
    machine.devices.restore_state(state.devices)
    machine.devices.kick_virtio_queues()
    machine.mark_ready(cmdline)


# --- reset ------------------------------------------------------------------------------------------
def reset(machine: Machine, point: ResetPoint) -> int:
    """Put back the pages written since ``point`` (by the guest or a device), then its state.

    Returns the bytes of guest memory put back.
    """
    if machine.running:
        raise PykvmError("reset() needs a machine that is not running; stop it first")
    restored = 0
    for gpa, length in _written_since(machine, point):
        if point.backs_memory:
            machine.memory.discard(gpa, length)  # drops the private copies: the file's bytes come back
        else:
            _read_back(machine.memory, point.memory_fd, gpa, length)
        restored += length
    machine.memory.track_host_writes()  # what reset itself wrote is the snapshot's
    for index, fd in point.disk_fds.items():
        machine.disk_overlays[index].refill(fd)
    apply(machine, machine.cmdline, point.state)
    return restored


def _written_since(machine: Machine, point: ResetPoint) -> list[tuple[int, int]]:
    """(gpa, bytes) runs of the pages written since the reset point, merged."""
    runs = [(page * PAGE_SIZE, PAGE_SIZE) for page in machine.memory.track_host_writes()] + point.written
    point.written.clear()
    for slot in machine.vm.memory_slots():
        runs += machine.vm.get_dirty_log(slot.slot).ranges()
    return merge_runs(runs)


def merge_runs(runs: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """(gpa, bytes) runs sorted, with the overlapping and touching ones joined."""
    merged: list[tuple[int, int]] = []
    for gpa, length in sorted(runs):
        if merged and gpa <= merged[-1][0] + merged[-1][1]:
            start, previous = merged[-1]
            merged[-1] = (start, max(previous, gpa + length - start))
        else:
            merged.append((gpa, length))
    return merged


def _read_back(memory: GuestMemory, fd: int, gpa: int, length: int) -> None:
    view = memory.view(gpa, length)
    done = 0
    while done < length:
        moved = os.preadv(fd, [view[done:]], gpa + done)
        if moved <= 0:
            raise SnapshotError(f"the snapshot's memory file ends before {gpa + done:#x}")
        done += moved
