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
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from .boot import load_image
from .boot.plan import BootPlan, LoadRequest, Module
from .builder import build
from .config import MachineConfig
from .control import Stop
from .devices.fw_cfg import set_cmdline
from .dispatch import EXIT_NAMES, ExitDispatcher, address_counts, address_label
from .errors import ConfigError, GuestMemoryError, ImageError, PykvmError
from .events import Events
from .kvm import Kvm, Vcpu
from .kvm.fastpath import Space
from .native import lib
from .result import MachineStatus, RunResult, RunStats, VcpuStatus
from .runner import Runner
from .x86.cpu import apply_entry
from .x86.e820 import ram_regions
from .x86.entry import CpuMode

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .config import MachineOptions
    from .debugger import MachineDebugger
    from .gdbstub import GdbServer
    from .devices.virtio.device import VirtioDevice
    from .devices.manager import VirtioSlot
    from .host_inputs import HostInputs
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
        host_inputs: HostInputs | None = None,
    ) -> Machine:  # fmt: skip
        """A machine whose guest RAM is ``memory_file`` (copy-on-write; anonymous when None), with
        KVM logging the guest's writes from the start if ``log_dirty`` and ``host_inputs`` answering
        its devices, for a saved state to be put into (:func:`pykvm.snapshot.restore`); not ready to
        run until it has."""
        machine = cls.__new__(cls)
        machine._construct(config, kvm, memory_file, log_dirty, host_inputs)
        return machine

    @classmethod
    def restore(
        cls, path: str | Path, *, kvm: Kvm | None = None, serial: str = "none", capture_serial: bool = False,
        allow_changed_disks: bool = False, resettable: bool = False, record: str | Path | None = None,
        replay: str | Path | None = None,
    ) -> Machine:  # fmt: skip
        """A machine restored from the snapshot at ``path`` (see :meth:`snapshot`), ready to run.

        Guest RAM is mapped from the snapshot copy-on-write, so restoring costs the same for any
        RAM size and many machines restored from one snapshot share the pages none of them
        changed.  ``serial`` and ``capture_serial`` are as for a new machine; a disk image that
        changed since the snapshot is refused unless ``allow_changed_disks``.  ``resettable``
        makes the snapshot the machine's reset point (:meth:`reset`); KVM then logs the guest's
        writes, which costs a little at restore (about 3 ms per GiB of RAM here) and at run.

        ``record`` logs every host input the guest takes from then on to that file, ``replay``
        feeds a log's inputs back instead of the host's (see :mod:`pykvm.replay`; both capture
        the serial output).
        """
        options: dict[str, Any] = dict(kvm=kvm, serial=serial, allow_changed_disks=allow_changed_disks)
        if record is not None and replay is not None:
            raise ConfigError("a machine either records its host inputs or replays them, not both")
        if record is not None:
            from .replay import restore_recording

            return restore_recording(path, record, **options)
        if replay is not None:
            from .replay import restore_replaying

            return restore_replaying(path, replay, **options)
        from .snapshot import restore

        return restore(path, capture_serial=capture_serial, resettable=resettable, **options)

    def _construct(
        self, config: MachineConfig, kvm: Kvm | None, memory_file: int | None = None, log_dirty: bool = False,
        host_inputs: HostInputs | None = None,
    ) -> None:
        self.config = config
        self.config.validate()
        self._closers: list[Callable[[], None]] = []
        self._closed = False
        self._ready = False  # a guest is loaded, or a state restored
        self.cmdline = b""
        self._msrs: list[int] | None = None
        self._reset_point: ResetPoint | None = None
        self._serial_error_reported = False
        self.events = Events()
        try:
            parts = build(self.config, kvm, self._request_stop, self._closing, memory_backing=memory_file,
                          log_dirty=log_dirty, events=self.events, host_inputs=host_inputs)  # fmt: skip
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
        self.dispatch = ExitDispatcher(self.pio, self.mmio, len(self.vcpus))
        self._runner = Runner(self.vcpus, self.dispatch, self.serial_output, self.stats, self.events,
                              self.host_inputs.observer)  # fmt: skip
        self.gdb_server: GdbServer | None = None
        if self.config.gdb is not None:
            from .debugger import serve_gdb  # only a machine served to gdb needs it

            try:
                self.gdb_server = self._closing(serve_gdb(self, self.config.gdb, wait=self.config.gdb_wait))
            except BaseException:
                self.close()
                raise

    def _closing(self, resource: Any) -> Any:
        self._closers.append(resource.close)
        return resource

    def _request_stop(self, stop: Stop) -> None:
        self._runner.request_stop(stop)

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

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- loading --------------------------------------------------------------------
    def load(
        self,
        path: str | Path,
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
        A module is a file, whose string is its name, or a (file, string) pair.
        """
        path = Path(path)
        request = LoadRequest(
            memory_map=self.memory_map,
            ram=tuple(ram_regions(self.config.memory_bytes)),
            cmdline=cmdline,
            modules=tuple(_module(m) for m in modules),
            initrd=Module(Path(initrd), read_image(Path(initrd)), str(initrd)) if initrd is not None else None,
            rsdp_addr=self.acpi.base if self.acpi is not None else None,
            mode=CpuMode(mode) if mode is not None else None,
            load_addr=load_addr,
            entry=entry,
        )
        plan = load_image(path, read_image(path), request, format)
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
        if not self._ready:
            raise PykvmError("nothing to run: load a guest image (or restore a snapshot) first")
        if timeout is not None and not timeout > 0:
            raise ConfigError(f"timeout must be positive, not {timeout}")
        try:
            return self._runner.run(timeout)
        finally:
            self._report_fast_serial_error()

    def _report_fast_serial_error(self) -> None:
        """The C path drops a serial output fd that fails; say so once, as the Python path does."""
        error = self.devices.fast.serial_errno
        if error and not self._serial_error_reported:
            self._serial_error_reported = True
            log.warning("serial output failed (%s); no longer writing there", os.strerror(error))

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

    # --- snapshots ----------------------------------------------------------------------
    def snapshot(self, path: str | Path) -> Manifest:
        """Save the machine (running or not) as a snapshot directory at ``path``; it goes on.

        The snapshot becomes the machine's reset point (see :meth:`reset`).  A directory that
        holds an older snapshot is replaced atomically; anything else there is refused.
        """
        from .snapshot import save

        started = time.monotonic()
        manifest = save(self, path)
        self.events.emit("snapshot", path=str(path), memory_bytes=manifest.memory_data_bytes,
                         seconds=round(time.monotonic() - started, 6))  # fmt: skip
        return manifest

    def reset(self) -> int:
        """Return the machine to its last snapshot (taken or restored): only the pages written
        since are put back, then the CPU and device state.  Returns the bytes put back.

        Disk images are not rolled back (use a throw-away overlay for that).
        """
        from .snapshot import reset

        if self._reset_point is None:
            raise PykvmError("nothing to reset to: take a snapshot, or restore one with resettable=True, first")
        return reset(self, self._reset_point)

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


def _module(spec: str | Path | tuple[str | Path, str | bytes]) -> Module:
    file, string = spec if isinstance(spec, tuple) else (spec, str(spec))
    return Module(Path(file), read_image(Path(file)), string)


def read_image(path: Path) -> bytes:
    """The bytes of a guest image or module, or an :class:`ImageError` that says why not."""
    try:
        return path.read_bytes()
    except FileNotFoundError as err:
        raise ImageError(str(path), "no such file") from err
    except IsADirectoryError as err:
        raise ImageError(str(path), "is a directory, not a guest image") from err
    except OSError as err:
        raise ImageError(str(path), f"cannot be read: {err.strerror}") from err
