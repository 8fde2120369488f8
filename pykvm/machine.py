"""The machine: a virtual PC built from a typed config, loaded with a guest image, run.

:class:`Machine` is the library's face: it owns what :func:`pykvm.builder.build` makes
from a :class:`~pykvm.config.MachineConfig` (the VM, guest memory, the devices behind
their :class:`~pykvm.devices.manager.DeviceManager`, the vCPUs), applies a loader's boot
plan to the bootstrap processor (:meth:`Machine.load`) and runs the guest through a
:class:`~pykvm.runner.Runner` (:meth:`Machine.run`, :meth:`Machine.stop`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import stat
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence, cast

from .boot import load_image
from .boot.plan import BootPlan, LoadRequest, Module
from .builder import Resource, build
from .config import DiskConfig, MachineConfig, NetConfig
from .control import Stop
from .devices.fw_cfg import set_cmdline
from .dispatch import EXIT_NAMES, ExitDispatcher, address_counts, address_label
from .errors import ConfigError, GuestMemoryError, ImageError, MigrationError, PykvmError
from .events import Events
from .kvm import Kvm, Vcpu
from .kvm.fastpath import Space
from .native import lib
from .result import ExitReason, MachineStatus, RunResult, RunStats, VcpuStatus
from .runner import Runner
from .x86.cpu import apply_entry
from .x86.e820 import ram_regions
from .x86.entry import CpuMode
from .x86.layout import MIB

if TYPE_CHECKING:
    from typing_extensions import Self, Unpack

    from .config import MachineOptions
    from .debugger import MachineDebugger
    from .gdbstub import GdbServer
    from .devices.virtio.device import VirtioDevice
    from .devices.manager import VirtioSlot
    from .host_inputs import HostInputs
    from .migration import Migration, MigrationResult
    from .snapshot import Manifest, ResetPoint

log = logging.getLogger(__name__)

class Machine:
    """A virtual PC: vCPUs, guest RAM, the in-kernel PIC/IOAPIC/LAPIC/PIT and the devices.

    Build it from a :class:`~pykvm.config.MachineConfig` and/or its fields as keyword
    options (``Machine(memory="64M", cpus=2, capture_serial=True)``); ``kvm`` shares an
    open :class:`~pykvm.kvm.Kvm` between machines (the caller closes it; by default each
    machine opens ``config.kvm_path`` itself).  With ``irqchip=False`` the machine is
    minimal: no interrupt controllers, no PIT and no virtio; HLT then ends the run.

    Attributes:
        config: the :class:`~pykvm.config.MachineConfig` it was built from.
        memory: guest RAM (:class:`~pykvm.memory.GuestMemory`): read and write it by
            guest-physical address, bounds-checked.
        vcpus: the :class:`~pykvm.kvm.Vcpu` objects, vCPU 0 the bootstrap processor.
        pio, mmio: the port-I/O and MMIO buses (:class:`~pykvm.devices.bus.Bus`); register
            your own device models on them (``vm.pio.register(0x3e0, 8, device)``).
        devices: the :class:`~pykvm.devices.manager.DeviceManager` (every attached device).
        serial: the COM1 UART (``vm.serial.receive(b"...")`` feeds it input).
        host_inputs: what the devices take from the host (:class:`~pykvm.host_inputs.HostInputs`:
            clocks, random bytes, disk data); ``vm.host_inputs.serial_input(b"...")`` feeds the
            UART as host input, which a recording machine logs.
        balloon: the virtio-balloon, if ``balloon=True``; virtio_console likewise.
        disk_overlays: the throw-away disks' overlays (:class:`~pykvm.disk_overlay.DiskOverlay`),
            by the disk's index in ``config.disks``.
        gdb_server: the :class:`~pykvm.gdbstub.GdbServer` serving the guest to gdb, if
            ``gdb`` names an address (``gdb_server.gdb_address`` is what gdb connects to);
            with ``gdb_wait`` the guest waits before its first instruction until gdb continues it.
        kvm, vm: the /dev/kvm and VM handles (:class:`~pykvm.kvm.Kvm`, :class:`~pykvm.kvm.Vm`).

    >>> with Machine(memory="64M", capture_serial=True) as vm:     # doctest: +SKIP
    ...     vm.load("guests/build/hello_real.bin")
    ...     result = vm.run(timeout=10)
    >>> result.serial, result.status                               # doctest: +SKIP
    (b'Hello from real mode\\n', 1)
    """

    def __init__(
        self, config: MachineConfig | None = None, *, kvm: Kvm | None = None, **options: Unpack[MachineOptions]
    ) -> None:
        config = config or MachineConfig()
        self._construct(dataclasses.replace(config, **options) if options else config, kvm)

    @classmethod
    def restoring(
        cls, config: MachineConfig, kvm: Kvm | None, memory_file: int | None, *, log_dirty: bool = False,
        host_inputs: HostInputs | None = None, lock_disks: bool = True,
    ) -> Machine:  # fmt: skip
        """A machine whose guest RAM is ``memory_file`` (copy-on-write; anonymous when None), with
        KVM logging the guest's writes from the start if ``log_dirty`` and ``host_inputs`` answering
        its devices, for a saved state to be put into (:func:`pykvm.snapshot.restore`, or a
        migration, which locks the disk images itself: ``lock_disks=False``); not ready to run
        until it has."""
        machine = cls.__new__(cls)
        machine._construct(config, kvm, memory_file, log_dirty, host_inputs, lock_disks)
        return machine

    @classmethod
    def restore(
        cls, path: str | Path, *, kvm: Kvm | None = None, kvm_path: str | None = None, serial: str = "none",
        capture_serial: bool = False, allow_changed_disks: bool = False, resettable: bool = False,
        record: str | Path | None = None, replay: str | Path | None = None, gdb: str | None = None,
        gdb_wait: bool = False,
    ) -> Self:  # fmt: skip
        """A machine restored from the snapshot at ``path`` (see :meth:`snapshot`), ready to run.

        Guest RAM is mapped from the snapshot copy-on-write, so restoring costs the same for any
        RAM size and many machines restored from one snapshot share the pages none of them
        changed.  ``serial`` and ``capture_serial`` are as for a new machine; a disk image that
        changed since the snapshot is refused unless ``allow_changed_disks``; ``kvm_path`` names
        the KVM device to use when no ``kvm`` is shared (the snapshot's is not).  ``resettable``
        makes the snapshot the machine's reset point (:meth:`reset`); KVM then logs the guest's
        writes, which costs a little at restore (about 3 ms per GiB of RAM here) and at run.

        ``record`` logs every host input the guest takes from then on to that file, ``replay``
        feeds a log's inputs back instead of the host's (see :mod:`pykvm.replay`; both capture
        the serial output).  ``gdb`` and ``gdb_wait`` serve the restored guest to gdb, as for a
        new machine (not while recording or replaying).
        """
        options: dict[str, Any] = dict(kvm=kvm, kvm_path=kvm_path, serial=serial, allow_changed_disks=allow_changed_disks,
                                       machine_type=cls)  # fmt: skip
        if record is not None and replay is not None:
            raise ConfigError("a machine either records its host inputs or replays them, not both")
        if gdb is not None and (record is not None or replay is not None):
            raise ConfigError("a machine that records or replays its host inputs cannot be served to gdb")
        if record is not None:
            from .replay import restore_recording

            machine = restore_recording(path, record, **options)
        elif replay is not None:
            from .replay import restore_replaying

            machine = restore_replaying(path, replay, **options)
        else:
            from .snapshot import restore

            machine = restore(path, capture_serial=capture_serial, resettable=resettable, gdb=gdb, gdb_wait=gdb_wait,
                              **options)  # fmt: skip
        machine.snapshot_path = Path(path)
        machine.events.emit("restored", path=str(path))
        return cast("Self", machine)  # made as ``cls``: ``machine_type`` above

    def clone(self, *, serial: str = "none", capture_serial: bool = False, resettable: bool = False) -> Self:
        """Another machine restored from this one's last snapshot (taken or restored), sharing the
        KVM device; machines restored from one snapshot share every page none of them changed.
        Options as for :meth:`restore`."""
        if self.snapshot_path is None:
            raise PykvmError("nothing to clone: take a snapshot, or restore one, first")
        return type(self).restore(self.snapshot_path, kvm=self.kvm, serial=serial, capture_serial=capture_serial,
                                  resettable=resettable)  # fmt: skip

    @classmethod
    def incoming(
        cls, uri: str, *, kvm: Kvm | None = None, kvm_path: str | None = None, serial: str = "none",
        capture_serial: bool = False, disks: Sequence[str | Path | DiskConfig] = (), net: NetConfig | None = None,
        token: str | bytes | None = None, timeout: float | None = None,
    ) -> Machine:  # fmt: skip
        """A machine whose guest arrives by live migration on ``uri`` (``tcp:HOST:PORT``,
        ``unix:PATH`` or ``fd:N``; see :meth:`migrate`), ready to run once all of it arrived.

        ``kvm_path``, ``serial`` and ``capture_serial`` are as for :meth:`restore`.  The guest's disk images
        must be among ``disks`` (the same images the source uses) and its network device needs
        ``net``: the stream never chooses host resources by itself.  With ``token`` only a source
        that knows it is accepted.  ``timeout`` bounds the wait and the transfer (seconds).  A
        stream that is broken, truncated or does not fit raises
        :class:`~pykvm.errors.MigrationError` and leaves no machine.
        """
        from .migration import Incoming

        with Incoming(uri) as endpoint:
            return endpoint.receive(kvm=kvm, kvm_path=kvm_path, serial=serial, capture_serial=capture_serial,
                                    disks=disks, net=net, token=token, timeout=timeout)  # fmt: skip

    def _construct(
        self, config: MachineConfig, kvm: Kvm | None, memory_file: int | None = None, log_dirty: bool = False,
        host_inputs: HostInputs | None = None, lock_disks: bool = True,
    ) -> None:
        self.config = config
        self.config.validate()
        self._closers: list[Callable[[], None]] = []
        self._closed = False
        self._ready = False  # a guest is loaded, or a state restored
        self.cmdline = b""
        self._msrs: list[int] | None = None
        self._reset_point: ResetPoint | None = None
        self.snapshot_path: Path | None = None  # the last snapshot taken or restored
        self.events = Events()
        self.migration: Migration | None = None  # the latest migration of this machine's guest
        self._migrated_to: str | None = None
        try:
            parts = build(self.config, kvm, self._request_stop, self._closing, suspend=self._suspend,
                          memory_backing=memory_file, log_dirty=log_dirty, events=self.events,
                          host_inputs=host_inputs, lock_disks=lock_disks)  # fmt: skip
        except BaseException:
            self.close()
            raise
        self.kvm, self.vm, self.memory, self.vcpus = parts.kvm, parts.vm, parts.memory, parts.vcpus
        self.memory_map = parts.memory_map
        self.devices = parts.devices
        self.pio, self.mmio = parts.devices.pio, parts.devices.mmio
        self.serial, self.serial_output = parts.serial, parts.serial_output
        self.fw_cfg, self.acpi = parts.fw_cfg, parts.acpi
        self.virtio_console, self.balloon = parts.virtio_console, parts.balloon
        self.host_inputs = parts.host_inputs
        self.disk_overlays = parts.disk_overlays
        self.dispatch = ExitDispatcher(self.pio, self.mmio, len(self.vcpus))
        self._sleep = parts.sleep
        self._runner = Runner(self.vcpus, self.dispatch, self.serial_output, self.stats, self.events,
                              self.host_inputs.observer, self._sleep)  # fmt: skip
        self.gdb_server: GdbServer | None = None
        if self.config.gdb is not None:
            from .debugger import serve_gdb  # only a machine served to gdb needs it

            try:
                self.gdb_server = self._closing(serve_gdb(self, self.config.gdb, wait=self.config.gdb_wait))
            except BaseException:
                self.close()
                raise

    def _closing(self, resource: Resource) -> Resource:
        self._closers.append(resource.close)
        return resource

    def _request_stop(self, stop: Stop) -> None:
        self._runner.request_stop(stop)

    def _suspend(self) -> None:
        """The guest entered ACPI S3 (on the vCPU thread of its PM1a_CNT write)."""
        self._runner.suspend()
        self.events.emit("suspended")

    def attach_debugger(self, debugger: MachineDebugger) -> None:
        """Give ``debugger`` the first look at guest debug exits and emulation failures, and tell
        it when each run starts and ends (one debugger per machine: see :mod:`pykvm.debugger`)."""
        if self.dispatch.debug_handler is not None:
            raise PykvmError("this machine has a debugger already")
        self.dispatch.debug_handler = debugger.handle_exit
        self._runner.observer = debugger

    def attach_virtio(self, device: VirtioDevice) -> VirtioSlot:
        """Put ``device`` behind the next virtio-mmio window and IRQ (see :meth:`kernel_device_args`)."""
        return self.devices.attach_virtio(device)

    def kernel_device_args(self) -> str:
        """The ``virtio_mmio.device=<size>@<addr>:<irq>`` arguments that tell Linux where the devices are."""
        return self.devices.kernel_device_args()

    def close(self) -> None:
        """Release the vCPUs, the devices, guest memory, the VM and /dev/kvm (idempotent)."""
        self._closed = True
        while self._closers:
            self._closers.pop()()
        if self._reset_point is not None:
            self._reset_point.close()
            self._reset_point = None

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- loading --------------------------------------------------------------------
    def load(
        self,
        image: str | Path | bytes,
        *,
        format: str = "auto",
        cmdline: str | bytes = b"",
        modules: Sequence[str | Path | tuple[str | Path, str | bytes]] = (),
        initrd: str | Path | None = None,
        mode: str | CpuMode | None = None,
        load_addr: int | None = None,
        entry: int | None = None,
        user: bool = False,
    ) -> BootPlan:
        """Load a guest image (flat, ELF, multiboot, Linux bzImage or PVH) and set the bootstrap processor to enter it.

        ``user`` enters long-mode code at CPL3 (with IOPL 3, so it may still do port I/O).
        ``cmdline`` and module strings are bytes, or str (see :func:`pykvm.boot.plan.to_bytes`).
        A module is a file, whose string is its name, or a (file, string) pair.  ``image`` is a
        file, or the image's bytes (named ``image`` in messages and on a multiboot command line).
        """
        if self._closed:
            raise PykvmError("this machine is closed")
        ram = self.config.memory_bytes
        if isinstance(image, (bytes, bytearray, memoryview)):
            path, data = Path("image"), bytes(image)
        else:
            path = Path(image)
            data = read_image(path, ram)
        request = LoadRequest(
            memory_map=self.memory_map,
            ram=tuple(ram_regions(self.config.memory_bytes)),
            cmdline=cmdline,
            modules=tuple(_module(m, ram) for m in modules),
            initrd=Module(Path(initrd), read_image(Path(initrd), ram), str(initrd)) if initrd is not None else None,
            rsdp_addr=self.acpi.base if self.acpi is not None else None,
            mode=CpuMode(mode) if mode is not None else None,
            load_addr=load_addr,
            entry=entry,
        )
        plan = load_image(path, data, request, format)
        entry_state = plan.entry
        if user:
            if entry_state.mode is not CpuMode.LONG:
                raise ConfigError(f"{path}: user mode (CPL3) entry needs a long-mode guest, not {entry_state.mode.value}")
            entry_state = dataclasses.replace(entry_state, user=True)
        try:
            for write in plan.writes:
                self.memory.write(write.gpa, write.data)
        except GuestMemoryError as err:
            raise ImageError(str(path), f"does not fit in guest memory: {err}") from err
        apply_entry(self.vcpus[0], self.memory, entry_state)
        set_cmdline(self.fw_cfg, request.cmdline_bytes)
        self.mark_ready(request.cmdline_bytes)
        return plan

    # --- running --------------------------------------------------------------------
    def run(self, timeout: float | None = None) -> RunResult:
        """Run the guest until it stops (or ``timeout`` seconds pass) and say how it ended."""
        if self._closed:
            raise PykvmError("this machine is closed")
        if self._migrated_to is not None:
            raise PykvmError(f"this machine's guest migrated to {self._migrated_to}; it runs there now")
        if not self._ready:
            raise PykvmError("nothing to run: load a guest image (or restore a snapshot) first")
        if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
            raise ConfigError(f"timeout must be a finite number of seconds above 0, not {timeout}")
        try:
            return self._runner.run(timeout)
        finally:
            self._report_serial_problems()

    def _report_serial_problems(self) -> None:
        """Say once what the serial output could not write (either path: they share one state)."""
        for message in self.serial_output.problems():
            log.warning(message)

    def stop(self, signal_number: int | None = None) -> None:
        """End the current run as :attr:`ExitReason.STOPPED`, from any thread or a signal handler.

        Every vCPU leaves the guest at its next exit boundary (a vCPU spinning in the guest is
        kicked out).  ``signal_number`` names the signal that asked for it: the run's status is
        then 128 + that number, as a shell reports it (130 without one).  Called while no run
        is going, it ends the next run before the guest executes anything.
        """
        self._runner.stop(signal_number)

    @property
    def running(self) -> bool:
        """Whether :meth:`run` is going (on some thread)."""
        return self._runner.running

    def pause(self, timeout: float | None = None) -> bool:
        """Hold every vCPU of the current run at an exit boundary (the run goes on, paused).

        Returns once no vCPU executes guest code: True, or False when no run is going (or it
        ended, or ``timeout`` seconds passed).  :meth:`stop` still ends a paused run.
        """
        paused = self._runner.pause(timeout)
        if paused:
            self.events.emit("paused")
        return paused

    def resume(self) -> None:
        """Let a paused run go on."""
        self._runner.resume()
        self.events.emit("resumed")

    def nap(self, seconds: float) -> None:
        """Keep every vCPU of the current run out of the guest for ``seconds`` from its next exit
        boundary, without waiting for it (a migration throttles a guest this way)."""
        self._runner.nap(seconds)

    # --- live migration -------------------------------------------------------------------------
    def migrate(
        self, uri: str, *, downtime_ms: float = 300, timeout: float = 600, bandwidth: int | None = None,
        token: str | bytes | None = None, auto_converge: bool = True,
    ) -> MigrationResult:  # fmt: skip
        """Move the guest, running or not, to the machine waiting at ``uri`` (:meth:`incoming`).

        Memory is copied while the guest runs, then again what it wrote meanwhile, until the rest
        can be sent within ``downtime_ms``; then the guest is paused, the rest and its state are
        sent, and once the destination accepted it the run here ends as
        :attr:`~pykvm.result.ExitReason.MIGRATED` (status 0) and the disk images are let go.
        ``bandwidth`` limits the stream (bytes/s); ``auto_converge`` throttles a guest that writes
        faster than the link sends; ``timeout`` (seconds) bounds the whole migration; ``token``
        is a secret the destination must share.  Any failure raises
        :class:`~pykvm.errors.MigrationError` and the guest runs on here.  :attr:`migration`
        tells the progress meanwhile (``vm.migration.progress()``).
        """
        from .migration import Migration

        if self._closed:
            raise PykvmError("this machine is closed")
        if not self._ready or self._migrated_to is not None:
            raise PykvmError("nothing to migrate: load a guest image (or restore a snapshot) first")
        if self.migration is not None and self.migration.active:
            raise PykvmError(f"this machine's guest is being migrated to {self.migration.progress().uri} already")
        point = self._reset_point
        self.migration = Migration(
            self, uri, downtime_ms=downtime_ms, timeout=timeout, bandwidth=bandwidth, token=token,
            auto_converge=auto_converge, hand_over=self._hand_over,
            note_written=point.written.extend if point is not None else None,
        )  # fmt: skip
        self.events.emit("migration-started", uri=uri)
        try:
            return self.migration.run()
        except MigrationError as err:
            self.events.emit("migration-failed", uri=uri, error=str(err))
            raise

    def _hand_over(self, result: MigrationResult) -> None:
        """The destination took the guest (this machine's run is paused): the run ends here."""
        self._migrated_to = result.uri
        self.events.emit("migrated", **dataclasses.asdict(result))
        if self.running:
            self._runner.request_stop(Stop(ExitReason.MIGRATED, f"the guest migrated to {result.uri}"))

    # --- ACPI S3 --------------------------------------------------------------------------
    @property
    def suspended(self) -> bool:
        """Whether the guest put the machine to sleep (ACPI S3) and no wake has come yet."""
        return self._sleep is not None and self._sleep.asleep

    def wake(self) -> bool:
        """Wake the machine from ACPI S3, from any thread (QEMU's ``system_wakeup``): its vCPUs
        restart at the guest's waking vector (see :mod:`pykvm.sleep`).  Called between runs, it
        wakes the machine for the next one.  False if the machine is not suspended."""
        return self._runner.wake()

    # --- snapshots ----------------------------------------------------------------------
    def snapshot(self, path: str | Path) -> Manifest:
        """Save the machine (running or not) as a snapshot directory at ``path``; it goes on.

        The snapshot becomes the machine's reset point (see :meth:`reset`).  A directory that
        holds an older snapshot is replaced atomically; anything else there is refused.
        """
        from .snapshot import save

        self._refuse_during_migration("snapshot")
        started = time.monotonic()
        manifest = save(self, path)
        self.snapshot_path = Path(path)
        self.events.emit("snapshot", path=str(path), memory_bytes=manifest.memory_data_bytes,
                         seconds=round(time.monotonic() - started, 6))  # fmt: skip
        return manifest

    def reset(self) -> int:
        """Return the machine to its last snapshot (taken or restored): only the pages written
        since are put back, then the CPU and device state.  Returns the bytes put back.

        A throw-away disk (``DiskConfig(..., snapshot=True)``) is put back as the snapshot saved it
        (a copy of its data); other disk images are not rolled back.
        """
        from .snapshot import reset

        if self._reset_point is None:
            raise PykvmError("nothing to reset to: take a snapshot, or restore one with resettable=True, first")
        self._refuse_during_migration("reset")
        return reset(self, self._reset_point)

    def stop_after_snapshot(self, path: str | Path) -> None:
        """End the current run as saved to the snapshot at ``path`` (status 0)."""
        self._runner.end(Stop(ExitReason.SNAPSHOTTED, f"saved to the snapshot {path}, then stopped"))

    def _refuse_during_migration(self, what: str) -> None:
        """A snapshot or reset would read the dirty log a migration relies on."""
        if self.migration is not None and self.migration.active:
            raise PykvmError(f"cannot {what} while the guest is being migrated; wait for the migration to end")

    def mark_ready(self, cmdline: bytes) -> None:
        """The guest is loaded (or its state restored) with this command line: it may run."""
        self._ready, self.cmdline = True, cmdline

    def saved_msrs(self) -> list[int]:
        """The MSRs a snapshot keeps: those KVM saves that this machine's vCPUs can read."""
        if self._msrs is None:
            self._msrs = self.vcpus[0].readable_msrs(self.kvm.msr_index_list())
        return self._msrs

    @contextlib.contextmanager
    def paused_for_snapshot(self) -> Iterator[None]:
        """Inside, no vCPU runs and no device changes state (a run goes on afterwards)."""
        with self._runner.paused(), self.devices.quiesced():
            yield

    def set_reset_point(self, point: ResetPoint) -> None:
        """Make ``point`` what :meth:`reset` returns to, and start noting what is written from now on."""
        if self._reset_point is not None:
            self._reset_point.close()
        self._reset_point = point
        for slot in self.vm.memory_slots():
            if not slot.flags & lib.KVM_MEM_LOG_DIRTY_PAGES:
                self.vm.set_dirty_logging(slot.slot)
            self.vm.get_dirty_log(slot.slot)  # starts the log afresh
        self.memory.track_host_writes()

    def status(self) -> MachineStatus:
        """Whether the machine runs, since when, its exits, and where each vCPU is (a running
        machine is paused for the moment it takes to read them)."""
        state = self._runner.state()
        with self._runner.paused():
            vcpus = tuple(_vcpu_status(vcpu) for vcpu in self.vcpus)
        started = self._runner.started
        uptime = time.monotonic() - started if started is not None else 0.0
        return MachineStatus(state, uptime, self.stats().exits_by_reason, vcpus)

    def stats(self) -> RunStats:
        """Exit counts and time, since the machine was created."""
        by_reason: dict[str, int] = {}
        for vcpu in self.vcpus:
            for reason, count in vcpu.exit_counts().items():
                name = EXIT_NAMES.get(reason, str(reason))
                by_reason[name] = by_reason.get(name, 0) + count
        by_address = address_counts(self.vcpus)
        for handler in self.devices.fast.handlers:
            space = "pio" if handler.space is Space.PIO else "mmio"
            for kind, count in (("read", handler.reads), ("write", handler.writes)):
                if count:
                    by_address[address_label(space, handler.base, kind) + " in C"] = count
        return RunStats(
            exits_by_reason=by_reason,
            exits_by_address=by_address,
            wall_ns=self._runner.wall_ns,
            guest_ns=sum(v.guest_ns for v in self.vcpus),
            guest_ns_by_vcpu={v.id: v.guest_ns for v in self.vcpus},
            fast_handler_ns=sum(v.fast_ns for v in self.vcpus),
            python_handler_ns=sum(v.python_ns for v in self.vcpus),
        )


def _vcpu_status(vcpu: Vcpu) -> VcpuStatus:
    sregs = vcpu.get_sregs()
    return VcpuStatus(vcpu.id, vcpu.get_regs().rip, CpuMode.of(sregs.cr0, sregs.efer).value, sregs.cs.dpl)


def _module(spec: str | Path | tuple[str | Path, str | bytes], limit: int) -> Module:
    file, string = spec if isinstance(spec, tuple) else (spec, str(spec))
    return Module(Path(file), read_image(Path(file), limit), string)


def read_image(path: Path, limit: int | None = None) -> bytes:
    """The bytes of a guest image or module, or an :class:`ImageError` that says why not.

    Only a regular file is read (a FIFO would wait for a writer, ``/dev/zero`` never ends), and
    only once its size is known to be at most ``limit`` bytes (the guest's RAM, which a larger
    image cannot fit in).
    """
    try:
        _check_image_file(path, os.stat(path), limit)
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as file:  # no wait at a FIFO
            _check_image_file(path, os.fstat(file.fileno()), limit)  # the same file, should it have changed
            data = file.read() if limit is None else file.read(limit + 1)
    except FileNotFoundError as err:
        raise ImageError(str(path), "no such file") from err
    except OSError as err:
        raise ImageError(str(path), f"cannot be read: {err.strerror}") from err
    if limit is not None and len(data) > limit:
        raise ImageError(str(path), f"grew past {limit} bytes while it was read")
    return data


_FILE_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device",
               stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}  # fmt: skip


def _check_image_file(path: Path, info: os.stat_result, limit: int | None) -> None:
    if not stat.S_ISREG(info.st_mode):
        kind = _FILE_KINDS.get(stat.S_IFMT(info.st_mode), "not a regular file")
        raise ImageError(str(path), f"is {kind}, not a guest image file")
    if limit is not None and info.st_size > limit:
        raise ImageError(
            str(path),
            f"is {info.st_size / MIB:.1f} MiB and does not fit in guest RAM ({limit / MIB:.1f} MiB; give more with -m)",
        )
