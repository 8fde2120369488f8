"""The machine: a typed config turned into memory, vCPUs and devices; loading; running.

:class:`Machine` is built by a short recipe of named steps (Firecracker's
``build_microvm_for_boot`` is the model): open KVM, create the VM and its
in-kernel interrupt controllers and PIT, map guest RAM, attach the devices,
create the vCPUs.  :meth:`Machine.load` applies a loader's boot plan to the
bootstrap processor; :meth:`Machine.run` runs every vCPU on its own thread (the
bootstrap processor on the caller's) until the guest stops.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import signal
import stat
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from . import native
from .boot import load_image
from .boot.plan import BootPlan, LoadRequest, Module
from .config import MachineConfig
from .console import SerialOutput
from .control import KICK_SIGNAL, RunControl, Stop
from .devices.bus import Bus
from .devices.acpi_pm import AcpiPm
from .devices.cmos import Cmos
from .devices.debug_exit import DebugExit
from .devices.fw_cfg import FW_CFG_IO_BASE, FwCfg, set_cmdline, standard_items
from .devices.i8042 import I8042
from .devices.ports import ConstantPort
from .devices.uart import Uart16550
from .dispatch import EXIT_NAMES, ExitDispatcher
from .errors import ConfigError, GuestMemoryError, ImageError, PykvmError
from .kvm import Kvm, Vcpu
from .kvm.exits import StopRequested
from .kvm.fastpath import FastKind, FastTable, Space
from .memory import GuestMemory
from .native import lib
from .result import ExitReason, RunResult, RunStats, format_registers, status_of
from .x86 import layout
from .x86.acpi import ACPI_PM_BASE, build_acpi_tables
from .x86.cpu import BOOT_MSRS, apply_entry, vcpu_cpuid
from .x86.e820 import build_memory_map, ram_regions
from .x86.entry import CpuMode
from .x86.mptable import build_mptable
from .x86.interrupts import COM1_IRQ, VIRTIO_IRQS, gsi_routes

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # optional parts, imported where a machine first needs them (pykvm run's start-up)
    from .control_socket import ControlServer
    from .devices.virtio.balloon import VirtioBalloon
    from .devices.virtio.console import VirtioConsole
    from .devices.virtio.device import VirtioDevice
    from .devices.virtio.mmio import VirtioMmioTransport
    from .iothread import IoThread

COM1_BASE, COM1_SIZE = 0x3F8, 8
DEBUG_EXIT_BASE, DEBUG_EXIT_SIZE = 0xF4, 4
I8042_BASE, I8042_SIZE = 0x60, 5
CMOS_BASE, CMOS_SIZE = 0x70, 2
POST_PORT = 0x80
# How often the monitor thread looks for a guest whose every vCPU halted for good.
HALT_PROBE_INTERVAL = 0.1


@dataclasses.dataclass
class VirtioSlot:
    """Where a virtio device sits: its MMIO window, its interrupt, its queue notifiers."""

    base: int
    gsi: int
    notify_addr: int  # the QueueNotify register, where the queues' ioeventfds listen
    transport: VirtioMmioTransport = dataclasses.field(init=False)
    notifiers: dict[int, int] = dataclasses.field(default_factory=dict)  # queue index -> ioeventfd


class Machine:
    """A virtual PC: vCPUs, guest RAM, the in-kernel PIC/IOAPIC/LAPIC/PIT and the legacy devices.

    With ``irqchip=False`` the machine is minimal: no interrupt controllers, no PIT and
    no virtio; HLT then leaves the kernel and ends the run at once.

    >>> with Machine(memory="64M", capture_serial=True) as vm:     # doctest: +SKIP
    ...     vm.load("guests/build/hello_real.bin")
    ...     result = vm.run(timeout=10)
    >>> result.serial, result.status                               # doctest: +SKIP
    (b'Hello from real mode\\n', 1)
    """

    def __init__(self, config: MachineConfig | None = None, *, kvm: Kvm | None = None, **options: object) -> None:
        """Build the machine from ``config`` (and/or keyword options of :class:`MachineConfig`).

        ``kvm`` shares an open :class:`~pykvm.kvm.Kvm` between machines (the caller closes
        it); by default each machine opens ``config.kvm_path`` itself.
        """
        config = config or MachineConfig()
        self.config = dataclasses.replace(config, **options) if options else config
        self.config.validate()
        self._closers: list[Callable[[], None]] = []
        self._shared_kvm = kvm
        self._control: RunControl | None = None  # the current (or last) run's
        self._running = False
        self._stop_lock = threading.RLock()  # re-entrant: stop() may run in a signal handler
        self._pending_stop: Stop | None = None  # a stop() that came while no run was going
        self._plan: BootPlan | None = None
        self._wall_ns = 0
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # --- building -------------------------------------------------------------------
    def _build(self) -> None:
        native.check(lib.pykvm_install_kick_handler(KICK_SIGNAL), "sigaction")
        self.kvm = self._shared_kvm or self._closing(Kvm(self.config.kvm_path))
        self._check_cpus()
        self.vm = self._closing(self.kvm.create_vm())
        self.vm.set_tss_addr(layout.KVM_TSS_ADDR)
        self.vm.set_identity_map_addr(layout.KVM_IDENTITY_MAP_ADDR)
        ram = self.config.memory_bytes
        self.memory_map = build_memory_map(ram)
        self.memory = self._closing(GuestMemory(ram_regions(ram)))
        self.memory.register(self.vm)  # before the irqchip: afterwards each slot waits for an SRCU grace period
        if self.config.share_pages:
            self.memory.merge(True)  # KSM may merge identical guest pages (while /sys/kernel/mm/ksm/run is 1)
        if self.config.irqchip:
            self._create_interrupt_controllers()
        self.pio = Bus("port I/O")
        self.mmio = Bus("MMIO")
        self.dispatch = ExitDispatcher(self.pio, self.mmio)
        self.fast = FastTable()
        self.serial_output = self._closing(SerialOutput(self.config.serial, self.config.capture_serial))
        self._attach_serial()
        self._attach_debug_exit()
        self._attach_i8042()
        self._attach_cmos()
        self._attach_post_port()
        self._attach_firmware()
        self.virtio: list[VirtioSlot] = []
        self._iothread: IoThread | None = None
        self._attach_virtio_devices()
        supported_cpuid = self.kvm.supported_cpuid()
        self.vcpus = [self._create_vcpu(i, supported_cpuid) for i in range(self.config.cpus)]
        self.serial_output.watch_stop(self.vcpus[0].stop_flag)  # every stop request sets it
        self.control_server: ControlServer | None = None
        if self.config.control is not None:  # last: it answers for a complete machine, and closes first
            from .control_socket import ControlServer

            self.control_server = self._closing(ControlServer(self.config.control, self))

    def _closing(self, resource):  # type: ignore[no-untyped-def]
        self._closers.append(resource.close)
        return resource

    def _check_cpus(self) -> None:
        limit = self.kvm.check_extension(lib.KVM_CAP_MAX_VCPUS) or self.kvm.check_extension(lib.KVM_CAP_NR_VCPUS)
        if self.config.cpus > limit:
            raise ConfigError(f"{self.config.cpus} vCPUs asked for, but this host's KVM allows at most {limit}")

    def _create_interrupt_controllers(self) -> None:
        self.vm.create_irqchip()
        self.vm.set_gsi_routing(gsi_routes())
        self.vm.create_pit2(lib.KVM_PIT_SPEAKER_DUMMY)

    def _request_stop(self, reason: ExitReason, diagnosis: str, value: int | None = None) -> None:
        """What devices call to end the run (from a vCPU thread, inside an exit)."""
        assert self._control is not None, "devices only act while the guest runs"
        self._control.request_stop(Stop(reason, diagnosis, value))

    def _attach_serial(self) -> None:
        transmit = self.fast.add(FastKind.SERIAL_TX, Space.PIO, COM1_BASE, 1, serial=self.serial_output.sink)

        def follow_fast_path(ok: bool) -> None:
            transmit.enabled = ok

        self.serial = Uart16550(
            self.serial_output.write,
            irq=functools.partial(self.vm.irq_line, COM1_IRQ) if self.config.irqchip else None,
            on_fast_transmit_change=follow_fast_path,
        )
        self.pio.register(COM1_BASE, COM1_SIZE, self.serial)

    def _attach_debug_exit(self) -> None:
        self.fast.add(FastKind.DEBUG_EXIT, Space.PIO, DEBUG_EXIT_BASE, DEBUG_EXIT_SIZE)
        device = DebugExit(lambda value: self._request_stop(ExitReason.DEBUG_EXIT, f"debug exit {value:#x}", value))
        self.pio.register(DEBUG_EXIT_BASE, DEBUG_EXIT_SIZE, device)

    def _attach_i8042(self) -> None:
        device = I8042(lambda: self._request_stop(ExitReason.RESET, "the guest reset the machine (i8042)"))
        self.pio.register(I8042_BASE, I8042_SIZE, device)

    def _attach_cmos(self) -> None:
        self.pio.register(CMOS_BASE, CMOS_SIZE, Cmos(self.config.memory_bytes))

    def _attach_post_port(self) -> None:
        self.fast.add(FastKind.CONSTANT, Space.PIO, POST_PORT, 1, value=0xFF)
        self.pio.register(POST_PORT, 1, ConstantPort(0xFF))

    def _attach_virtio_devices(self) -> None:
        """The configured virtio devices, in a fixed order: console, disks, rng, net, balloon.

        Each device's module is imported when a machine has that device.
        """
        self.virtio_console: VirtioConsole | None = None
        self.balloon: VirtioBalloon | None = None
        if self.config.console == "virtio":
            from .devices.virtio.console import VirtioConsole

            self.virtio_console = VirtioConsole(self.serial_output.write)
            self.attach_virtio(self.virtio_console)
        for disk in self.config.disks:
            from .devices.virtio.blk import VirtioBlock

            device = VirtioBlock(disk.path, read_only=disk.read_only)
            self._closers.append(device.close)
            self.attach_virtio(device)
        if self.config.rng:
            from .devices.virtio.rng import VirtioRng

            self.attach_virtio(VirtioRng())
        if self.config.net is not None:
            from .devices.virtio.net import VirtioNet

            net = VirtioNet.open(self.config.net.tap)
            self._closers.append(net.close)
            self.attach_virtio(net)
        if self.config.balloon:
            from .devices.virtio.balloon import VirtioBalloon

            self.balloon = VirtioBalloon(self.memory_map, deflate_on_oom=self.config.deflate_on_oom,
                                         free_page_reporting=self.config.free_page_reporting)  # fmt: skip
            self.attach_virtio(self.balloon)

    def attach_virtio(self, device: VirtioDevice) -> VirtioSlot:
        """Put ``device`` behind the next virtio-mmio window and IRQ (see :meth:`kernel_device_args`)."""
        from .devices.virtio.mmio import MMIO_SIZE, QUEUE_NOTIFY, VirtioMmioTransport
        from .iothread import IoThread

        index = len(self.virtio)
        if not self.config.irqchip:
            raise ConfigError("virtio devices need the in-kernel irqchip (irqchip=True)")
        if index >= len(VIRTIO_IRQS):
            raise ConfigError(f"at most {len(VIRTIO_IRQS)} virtio devices fit this machine's interrupt lines")
        base = layout.VIRTIO_MMIO_START + index * layout.VIRTIO_MMIO_STRIDE
        slot = VirtioSlot(base, VIRTIO_IRQS[index], base + QUEUE_NOTIFY)
        slot.transport = VirtioMmioTransport(
            device,
            self.memory,
            self._interrupt(slot.gsi),
            on_activate=functools.partial(self._wire_queues, slot),
            on_reset=functools.partial(self._unwire_queues, slot),
        )
        self.mmio.register(slot.base, MMIO_SIZE, slot.transport)
        if self._iothread is None:
            self._iothread = self._closing(IoThread())
        for fd in device.host_fds():
            self._iothread.add(fd, functools.partial(device.on_host_readable, fd))
        device.host_fd_interest = functools.partial(self._follow_host_fd, device)
        self.virtio.append(slot)
        return slot

    def _follow_host_fd(self, device: VirtioDevice, fd: int, wanted: bool) -> None:
        """A device stops (or resumes) wanting its host input, e.g. a NIC whose guest has no buffers."""
        assert self._iothread is not None
        if wanted:
            self._iothread.add(fd, functools.partial(device.on_host_readable, fd))
        else:
            self._iothread.remove(fd)

    def _interrupt(self, gsi: int) -> Callable[[], None]:
        """An edge on ``gsi``: through an irqfd, or (synchronous mode) two KVM_IRQ_LINE calls."""
        if self.config.virtio_notify == "sync":
            return lambda: (self.vm.irq_line(gsi, True), self.vm.irq_line(gsi, False))
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._closers.append(functools.partial(os.close, fd))
        self.vm.irqfd(fd, gsi)
        return functools.partial(os.eventfd_write, fd, 1)

    def _wire_queues(self, slot: VirtioSlot, transport: VirtioMmioTransport) -> None:
        """DRIVER_OK: each ready queue's QueueNotify write signals an eventfd the I/O thread waits on."""
        if self.config.virtio_notify == "sync":
            return  # the write exits to the vCPU thread, which processes the queue itself
        assert self._iothread is not None  # made with the first virtio device
        for index, queue in enumerate(transport.queues):
            if queue.ready:
                fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                self.vm.ioeventfd(fd, slot.notify_addr, 4, pio=False, datamatch=index)
                self._iothread.add(fd, functools.partial(_notified, fd, transport, index))
                slot.notifiers[index] = fd

    def _unwire_queues(self, slot: VirtioSlot, transport: VirtioMmioTransport) -> None:
        assert self._iothread is not None or not slot.notifiers
        for index, fd in slot.notifiers.items():
            self._iothread.remove(fd)
            self.vm.ioeventfd(fd, slot.notify_addr, 4, pio=False, datamatch=index, deassign=True)
            os.close(fd)
        slot.notifiers.clear()

    def kernel_device_args(self) -> str:
        """The ``virtio_mmio.device=<size>@<addr>:<irq>`` arguments that tell Linux where the devices are."""
        return " ".join(f"virtio_mmio.device=4K@{slot.base:#x}:{slot.gsi}" for slot in self.virtio)

    def _attach_firmware(self) -> None:
        """fw_cfg; with the irqchip, the ACPI tables and MP table that describe it, and the ACPI PM block."""
        acpi = None
        if self.config.irqchip:
            acpi = build_acpi_tables(self.config.cpus)
            self.memory.write(acpi.base, acpi.blob)
            self.memory.write(layout.MPTABLE_START, build_mptable(self.config.cpus))
            power = AcpiPm(lambda: self._request_stop(ExitReason.POWEROFF, "the guest powered off (ACPI S5)"))
            self.pio.register(ACPI_PM_BASE, AcpiPm.SIZE, power)
        self.acpi = acpi
        self.fw_cfg = FwCfg()
        standard_items(
            self.fw_cfg,
            cpus=self.config.cpus,
            max_cpus=self.config.cpus,
            ram_size=self.config.memory_bytes,
            cmdline="",
            memory_map=self.memory_map,
            acpi=acpi,
        )
        self.pio.register(FW_CFG_IO_BASE, FwCfg.SIZE, self.fw_cfg)

    def _create_vcpu(self, vcpu_id: int, supported_cpuid: list) -> Vcpu:
        vcpu = self._closing(self.vm.create_vcpu(vcpu_id))
        vcpu.set_cpuid2(vcpu_cpuid(supported_cpuid, vcpu_id))
        accepted = vcpu.set_msrs(BOOT_MSRS)
        if accepted != len(BOOT_MSRS):
            msr = list(BOOT_MSRS)[accepted]
            raise PykvmError(f"KVM_SET_MSRS refused MSR {msr:#x}, which the boot state needs")
        if self.kvm.check_extension(lib.KVM_CAP_SYNC_REGS) & lib.KVM_SYNC_X86_REGS:
            vcpu.enable_sync_regs()
        vcpu.attach_fast_table(self.fast)
        return vcpu

    def close(self) -> None:
        """Release the vCPUs, the VM, guest memory and /dev/kvm (idempotent)."""
        while self._closers:
            self._closers.pop()()

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
        cmdline: str = "",
        modules: Sequence[str | Path] = (),
        initrd: str | Path | None = None,
        mode: str | CpuMode | None = None,
        load_addr: int | None = None,
        entry: int | None = None,
        user: bool = False,
    ) -> BootPlan:
        """Load a guest image (flat, ELF, multiboot, Linux bzImage or PVH) and set the bootstrap processor to enter it.

        ``user`` enters long-mode code at CPL3 (with IOPL 3, so it may still do port I/O).
        """
        path = Path(path)
        ram = self.config.memory_bytes  # no image larger than RAM can load: read none
        request = LoadRequest(
            memory_map=self.memory_map,
            cmdline=cmdline,
            modules=tuple(Module(Path(m), read_image(Path(m), ram), str(m)) for m in modules),
            initrd=Module(Path(initrd), read_image(Path(initrd), ram), str(initrd)) if initrd is not None else None,
            rsdp_addr=self.acpi.base if self.acpi is not None else None,
            mode=CpuMode(mode) if mode is not None else None,
            load_addr=load_addr,
            entry=entry,
        )
        plan = load_image(path, read_image(path, ram), request, format)
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
        set_cmdline(self.fw_cfg, cmdline)
        self._plan = plan
        return plan

    # --- running --------------------------------------------------------------------
    def run(self, timeout: float | None = None) -> RunResult:
        """Run the guest until it stops (or ``timeout`` seconds pass) and say how it ended."""
        if self._plan is None:
            raise PykvmError("nothing to run: load a guest image first")
        if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
            raise ConfigError(f"timeout must be a finite number of seconds above 0, not {timeout}")
        control = RunControl(self.vcpus)
        with self._stop_lock:
            self._control, self._running = control, True
            if self._pending_stop is not None:
                control.request_stop(self._pending_stop)
                self._pending_stop = None
        capture_start = self.serial_output.captured_size()
        errors: list[BaseException] = []
        done = threading.Event()
        helpers = [threading.Thread(target=self._monitor, args=(control, timeout, done), name="pykvm-monitor")]
        helpers += [
            threading.Thread(target=self._run_ap, args=(vcpu, control, errors), name=f"pykvm-vcpu{vcpu.id}")
            for vcpu in self.vcpus[1:]
        ]
        started = time.monotonic_ns()
        for thread in helpers:
            thread.start()
        try:
            self._run_vcpu(self.vcpus[0], control)
        finally:
            control.request_stop(Stop(ExitReason.UNHANDLED, "the run was abandoned"))  # no-op if already stopping
            done.set()
            for thread in helpers:
                thread.join()
            with self._stop_lock:
                self._running = False
            self._wall_ns += time.monotonic_ns() - started
            self._report_serial_problems()
        if errors:
            raise errors[0]
        assert control.stop is not None
        return self._result(control.stop, self.serial_output.captured(capture_start))

    def stop(self, signal_number: int | None = None) -> None:
        """End the current run as :attr:`ExitReason.STOPPED`, from any thread or a signal handler.

        Every vCPU leaves the guest at its next exit boundary (a vCPU spinning in the guest is
        kicked out).  ``signal_number`` names the signal that asked for it: the run's status is
        then 128 + that number, as a shell reports it (130 without one).  Called while no run
        is going, it ends the next run before the guest executes anything.
        """
        name = signal.Signals(signal_number).name if signal_number else None
        stop = Stop(ExitReason.STOPPED, f"stopped by {name}" if name else "stopped", signal_number, True)
        with self._stop_lock:
            if self._running and self._control is not None:
                self._control.request_stop(stop)
            else:
                self._pending_stop = stop

    def _report_serial_problems(self) -> None:
        """Say once what the serial output could not write (either path: they share one state)."""
        for message in self.serial_output.problems():
            log.warning(message)

    def _run_vcpu(self, vcpu: Vcpu, control: RunControl) -> None:
        control.enter(vcpu)
        handle = self.dispatch.handle
        try:
            while not isinstance(exit := vcpu.run(), StopRequested):
                handle(vcpu, exit, control)
        finally:
            control.leave(vcpu)

    def _run_ap(self, vcpu: Vcpu, control: RunControl, errors: list[BaseException]) -> None:
        try:
            self._run_vcpu(vcpu, control)
        except BaseException as err:  # reported by run() on the caller's thread
            errors.append(err)
            control.request_stop(Stop(ExitReason.UNHANDLED, f"vCPU {vcpu.id} failed: {err}"))

    def _monitor(self, control: RunControl, timeout: float | None, done: threading.Event) -> None:
        """The run's watchdog: the timeout, and the periodic halt probe."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = HALT_PROBE_INTERVAL if deadline is None else min(HALT_PROBE_INTERVAL, deadline - time.monotonic())
            if done.wait(max(wait, 0)):
                return
            if deadline is not None and time.monotonic() >= deadline:
                control.request_stop(Stop(ExitReason.TIMEOUT, f"still running after {timeout:g} s", None, True))
                return
            control.probe()

    def _result(self, stop: Stop, serial: bytes | None) -> RunResult:
        regs = sregs = None
        diagnosis = stop.diagnosis
        if stop.with_registers:
            vcpu = self.vcpus[stop.vcpu_id]
            regs, sregs = vcpu.exit_regs(), vcpu.get_sregs()
            where = f" on vCPU {vcpu.id}" if len(self.vcpus) > 1 else ""
            diagnosis = f"{diagnosis} at rip {regs.rip:#x}{where}\n{format_registers(regs, sregs)}"
        return RunResult(
            reason=stop.reason,
            status=status_of(stop.reason, stop.value),
            diagnosis=diagnosis,
            exit_value=stop.value,
            serial=serial,
            regs=regs,
            sregs=sregs,
            stats=self.stats(),
        )

    def stats(self) -> RunStats:
        """Exit counts and time, since the machine was created."""
        by_reason: dict[str, int] = {}
        for vcpu in self.vcpus:
            for reason, count in vcpu.exit_counts().items():
                name = EXIT_NAMES.get(reason, str(reason))
                by_reason[name] = by_reason.get(name, 0) + count
        by_address = {
            f"{space} {addr:#06x} {'write' if is_write else 'read'}": count
            for (space, addr, is_write), count in self.dispatch.by_address.items()
        }
        for handler in self.fast.handlers:
            space = "pio" if handler.space is Space.PIO else "mmio"
            for kind, count in (("read", handler.reads), ("write", handler.writes)):
                if count:
                    by_address[f"{space} {handler.base:#06x} {kind} (C)"] = count
        return RunStats(
            exits_by_reason=by_reason,
            exits_by_address=by_address,
            wall_ns=self._wall_ns,
            guest_ns=sum(v.guest_ns for v in self.vcpus),
            fast_handler_ns=sum(v.fast_ns for v in self.vcpus),
            python_handler_ns=self.dispatch.handler_ns,
        )


def _notified(fd: int, transport: VirtioMmioTransport, queue_index: int) -> None:
    os.eventfd_read(fd)
    transport.notify(queue_index)


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
            f"is {info.st_size / layout.MIB:.1f} MiB and does not fit in guest RAM ({limit / layout.MIB:.1f} MiB; "
            "give more with -m)",
        )
