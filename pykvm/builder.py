"""The build recipe: a typed config turned into KVM objects, guest memory, devices and vCPUs.

:func:`build` reads top to bottom as Firecracker's ``build_microvm_for_boot`` does:
open KVM, create the VM, map guest RAM (before the irqchip: afterwards every memory
slot waits for an SRCU grace period), create the in-kernel interrupt controllers and
PIT, attach the legacy devices and the firmware, the virtio devices, and create the
vCPUs.  Each step is a small function of its own, so that other machine flavours can
be put together from them.  Nothing here runs the guest.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Callable, Protocol, TypeVar

from . import native
from .config import DiskConfig, MachineConfig
from .console import SerialOutput
from .control import KICK_SIGNAL, Stop
from .devices.acpi_pm import AcpiPm
from .devices.cmos import Cmos
from .devices.debug_exit import DebugExit
from .devices.fw_cfg import FwCfg, standard_items
from .devices.i8042 import I8042
from .devices.manager import DeviceManager
from .devices.ports import ConstantPort
from .devices.uart import LSR, Uart16550
from .errors import ConfigError, PykvmError
from .events import Events
from .host_inputs import HostInputs
from .kvm import Kvm, Vcpu, Vm
from .kvm.fastpath import FastKind, Space
from .kvm.state import CpuidEntry
from .memory import GuestMemory
from .native import lib
from .result import ExitReason
from .sleep import Sleep
from .x86 import layout
from .x86.acpi import AcpiTables, build_acpi_tables
from .x86.cpu import BOOT_MSRS, vcpu_cpuid
from .x86.e820 import E820Entry, build_memory_map, ram_regions
from .x86.interrupts import (
    BIOS_IRQ0_VECTOR, BIOS_IRQ8_VECTOR, COM1_IRQ, PIC_IRQ_BASE_OFFSET, RTC_IRQ, Irqchip, gsi_routes,
)  # fmt: skip
from .x86.mptable import build_mptable

if TYPE_CHECKING:
    from .devices.virtio.balloon import VirtioBalloon
    from .devices.virtio.console import VirtioConsole
    from .disk_overlay import DiskOverlay


class Closable(Protocol):
    """What a machine owns and closes with it (KVM's fds, guest memory, devices...)."""

    def close(self) -> None: ...


Resource = TypeVar("Resource", bound=Closable)


class Closing(Protocol):
    """Registers a resource's close() with its owner and returns the resource."""

    def __call__(self, resource: Resource, /) -> Resource: ...


RequestStop = Callable[[Stop], None]


@dataclasses.dataclass
class MachineParts:
    """What :func:`build` made; the :class:`~pykvm.machine.Machine` owns it."""

    kvm: Kvm
    vm: Vm
    memory_map: tuple[E820Entry, ...]
    memory: GuestMemory
    devices: DeviceManager
    serial_output: SerialOutput
    serial: Uart16550
    fw_cfg: FwCfg
    acpi: AcpiTables | None
    virtio_console: VirtioConsole | None
    balloon: VirtioBalloon | None
    vcpus: list[Vcpu]
    host_inputs: HostInputs
    sleep: Sleep | None  # ACPI S3, on a machine with ACPI
    disk_overlays: dict[int, DiskOverlay]  # the throw-away disks' overlays, by the disk's index


def build(
    config: MachineConfig, kvm: Kvm | None, request_stop: RequestStop, closing: Closing, *,
    suspend: Callable[[], None], memory_backing: int | None = None, log_dirty: bool = False,
    events: Events | None = None, host_inputs: HostInputs | None = None, lock_disks: bool = True,
) -> MachineParts:  # fmt: skip
    """Build a machine from ``config``; ``kvm`` is a shared /dev/kvm (else one is opened).

    Devices call ``request_stop`` to end a run, and ``suspend`` when the guest enters ACPI S3
    (both inside an exit, on the vCPU's thread).

    ``memory_backing`` is a file whose bytes become guest RAM, copy-on-write (a snapshot's);
    ``log_dirty`` has KVM log the guest's writes to RAM from the start; devices announce what
    the host should hear of (a balloon's size) on ``events``; ``host_inputs`` answers the
    devices' questions to the host (by default, the host does; the machine closes it);
    ``lock_disks=False`` leaves the disk images unlocked (see :class:`~pykvm.devices.virtio.blk.VirtioBlock`).
    """
    events = events or Events()
    inputs = closing(host_inputs if host_inputs is not None else HostInputs())
    native.check(lib.pykvm_install_kick_handler(KICK_SIGNAL), "sigaction")
    kvm = kvm or closing(Kvm(config.kvm_path))
    check_cpus(kvm, config.cpus)
    vm = closing(create_vm(kvm))
    memory_map = build_memory_map(config.memory_bytes)
    memory = closing(create_memory(vm, config.memory_bytes, config.share_pages, memory_backing, log_dirty))
    if config.irqchip:
        create_interrupt_controllers(vm, config.pit)
    devices = closing(DeviceManager(vm, memory, irqchip=config.irqchip, virtio_notify=config.virtio_notify))
    serial_output = closing(SerialOutput(config.serial, config.capture_serial))
    serial = attach_serial(devices, serial_output)
    attach_debug_exit(devices, request_stop, *config.debug_exit)
    attach_i8042(devices, request_stop)
    cmos = attach_cmos(devices, config.memory_bytes, inputs)
    attach_post_port(devices)
    if config.pc_testdev:
        attach_pc_testdev(devices, vm if config.irqchip else None)
    acpi = build_acpi_tables(config.cpus) if config.irqchip else None
    if acpi is not None and memory_backing is None:  # a snapshot's RAM holds them: writing would copy its pages
        write_firmware_tables(memory, acpi, config.cpus)
    power = attach_acpi_pm(devices, request_stop, suspend, inputs) if acpi is not None else None
    fw_cfg = attach_fw_cfg(devices, config, memory_map, acpi)
    overlays = make_disk_overlays(config.disks, closing)
    virtio_console, balloon = attach_virtio_devices(devices, config, serial_output, memory_map, closing, inputs, events,
                                                    lock_disks, overlays)  # fmt: skip
    supported = kvm.supported_cpuid()
    vcpus = [closing(create_vcpu(kvm, vm, i, supported, devices)) for i in range(config.cpus)]
    serial_output.watch_stop(vcpus[0].stop_flag)  # every stop request sets it: a slow output gives way
    receivers = {"serial": serial.receive} | ({"console": virtio_console.receive} if virtio_console else {})
    inputs.connect(vcpus[0], receivers)
    sleep = Sleep(power, cmos, vcpus, memory, acpi.tables["FACS"], events) if acpi and power else None
    return MachineParts(kvm, vm, memory_map, memory, devices, serial_output, serial, fw_cfg, acpi,
                        virtio_console, balloon, vcpus, inputs, sleep, overlays)  # fmt: skip


def check_cpus(kvm: Kvm, cpus: int) -> None:
    limit = kvm.check_extension(lib.KVM_CAP_MAX_VCPUS) or kvm.check_extension(lib.KVM_CAP_NR_VCPUS)
    if cpus > limit:
        raise ConfigError(f"{cpus} vCPUs asked for, but this host's KVM allows at most {limit}")


def create_vm(kvm: Kvm) -> Vm:
    vm = kvm.create_vm()
    try:
        vm.set_tss_addr(layout.KVM_TSS_ADDR)
        vm.set_identity_map_addr(layout.KVM_IDENTITY_MAP_ADDR)
    except BaseException:
        vm.close()
        raise
    return vm


def create_memory(
    vm: Vm, ram_size: int, share_pages: bool, backing: int | None = None, log_dirty: bool = False
) -> GuestMemory:
    """Guest RAM as KVM slots; register it before the irqchip (afterwards each slot waits ~7 ms,
    which is also why dirty logging, when wanted from the start, is asked for here)."""
    memory = GuestMemory(ram_regions(ram_size), backing)
    try:
        memory.register(vm, flags=lib.KVM_MEM_LOG_DIRTY_PAGES if log_dirty else 0)
        if share_pages:
            memory.merge(True)  # KSM may merge identical guest pages (while /sys/kernel/mm/ksm/run is 1)
    except BaseException:
        memory.close()
        raise
    return memory


def create_interrupt_controllers(vm: Vm, pit: bool = True) -> None:
    """The in-kernel PIC, IOAPIC and LAPICs, QEMU's GSI routing, and (``pit``) the in-kernel PIT.

    The PICs deliver at the vectors a PC BIOS leaves them on (SeaBIOS's ``pic_reset``: 0x08 for
    IRQ 0-7, 0x70 for IRQ 8-15), as guests written for QEMU, which always runs a BIOS, expect
    of a PIC they did not program themselves.
    """
    vm.create_irqchip()
    vm.set_gsi_routing(gsi_routes())
    for chip, base in ((Irqchip.PIC_MASTER, BIOS_IRQ0_VECTOR), (Irqchip.PIC_SLAVE, BIOS_IRQ8_VECTOR)):
        state = bytearray(vm.get_irqchip(chip))
        state[PIC_IRQ_BASE_OFFSET] = base
        vm.set_irqchip(chip, bytes(state))
    if pit:
        vm.create_pit2(lib.KVM_PIT_SPEAKER_DUMMY)


def attach_serial(devices: DeviceManager, output: SerialOutput) -> Uart16550:
    """COM1; C answers its transmit register while a THR write only means "send this byte", and
    its line status register while reading it changes nothing (the UART says when)."""
    transmit = devices.fast.add(FastKind.SERIAL_TX, Space.PIO, layout.COM1_PORT, 1, serial=output.sink)
    line_status = devices.fast.add(FastKind.BYTE_REGISTER, Space.PIO, layout.COM1_PORT + LSR, 1)

    def follow_transmit(ok: bool) -> None:
        transmit.enabled = ok

    def follow_line_status(value: int | None) -> None:
        if value is not None:
            line_status.value = value  # before enabling: the C loop never reads a stale value
        line_status.enabled = value is not None

    device = Uart16550(output.write, irq=devices.irq_line(COM1_IRQ), on_fast_transmit_change=follow_transmit,
                       on_fast_line_status_change=follow_line_status)  # fmt: skip
    follow_line_status(device.fast_line_status)
    devices.attach("serial", layout.COM1_PORT, layout.COM1_PORTS, device, fast=(transmit, line_status))
    return device


def attach_debug_exit(devices: DeviceManager, request_stop: RequestStop, base: int, size: int) -> None:
    """QEMU's isa-debug-exit over ``size`` ports from ``base`` (0xf4, 4 by default)."""
    fast = devices.fast.add(FastKind.DEBUG_EXIT, Space.PIO, base, size)
    device = DebugExit(lambda value: request_stop(Stop(ExitReason.DEBUG_EXIT, f"debug exit {value:#x}", value)))
    devices.attach("debug-exit", base, size, device, fast=(fast,))


def attach_pc_testdev(devices: DeviceManager, vm: Vm | None) -> None:
    """QEMU's pc-testdev (pykvm/devices/testdev.py): its ports, interrupt lines and iomem window."""
    from .devices import testdev

    iomem = testdev.PcTestdevMemory()
    ports = testdev.PcTestdevPorts(iomem)
    lines = testdev.PcTestdevIrqLines(vm.irq_line if vm is not None else None)
    devices.attach("pc-testdev", testdev.REGISTER_PORT, ports.SIZE, ports)
    devices.attach("pc-testdev-irq", testdev.IRQ_LINE_PORT, lines.SIZE, lines)
    devices.attach("pc-testdev-iomem", testdev.IOMEM_ADDR, iomem.SIZE, iomem, space=Space.MMIO)


def attach_i8042(devices: DeviceManager, request_stop: RequestStop) -> None:
    device = I8042(lambda: request_stop(Stop(ExitReason.RESET, "the guest reset the machine (i8042)")))
    devices.attach("i8042", layout.I8042_PORT, layout.I8042_PORTS, device)


def attach_cmos(devices: DeviceManager, ram_size: int, inputs: HostInputs) -> Cmos:
    cmos = Cmos(ram_size, clock=inputs.wall_clock_ns, irq=devices.irq_line(RTC_IRQ))
    devices.attach("cmos", layout.CMOS_PORT, layout.CMOS_PORTS, cmos)
    return cmos


def attach_post_port(devices: DeviceManager) -> None:
    fast = devices.fast.add(FastKind.CONSTANT, Space.PIO, layout.POST_PORT, 1, value=0xFF)
    devices.attach("post", layout.POST_PORT, 1, ConstantPort(0xFF), fast=(fast,))


def write_firmware_tables(memory: GuestMemory, acpi: AcpiTables, cpus: int) -> None:
    """The ACPI tables and the MP table that describe the machine, where guests scan for them."""
    memory.write(acpi.base, acpi.blob)
    memory.write(layout.MPTABLE_START, build_mptable(cpus))


def attach_acpi_pm(
    devices: DeviceManager, request_stop: RequestStop, suspend: Callable[[], None], inputs: HostInputs
) -> AcpiPm:
    power = AcpiPm(lambda: request_stop(Stop(ExitReason.POWEROFF, "the guest powered off (ACPI S5)")), suspend,
                   clock=inputs.monotonic_ns)  # fmt: skip
    devices.attach("acpi-pm", layout.ACPI_PM_PORT, layout.ACPI_PM_PORTS, power)
    return power


def attach_fw_cfg(
    devices: DeviceManager, config: MachineConfig, memory_map: tuple[E820Entry, ...], acpi: AcpiTables | None
) -> FwCfg:
    fw_cfg = FwCfg()
    standard_items(fw_cfg, cpus=config.cpus, max_cpus=config.cpus, ram_size=config.memory_bytes, cmdline="",
                   memory_map=memory_map, acpi=acpi)  # fmt: skip
    devices.attach("fw-cfg", layout.FW_CFG_PORT, layout.FW_CFG_PORTS, fw_cfg)
    return fw_cfg


def make_disk_overlays(disks: tuple[DiskConfig, ...], closing: Closing) -> dict[int, DiskOverlay]:
    """A throw-away overlay (:mod:`pykvm.disk_overlay`) of each image the guest writes without
    writing the image, by the disk's index."""
    if not any(disk.throwaway for disk in disks):
        return {}
    from .disk_overlay import DiskOverlay

    return {index: closing(DiskOverlay(disk.path)) for index, disk in enumerate(disks) if disk.throwaway}


def attach_virtio_devices(
    devices: DeviceManager,
    config: MachineConfig,
    serial_output: SerialOutput,
    memory_map: tuple[E820Entry, ...],
    closing: Closing,
    inputs: HostInputs,
    events: Events,
    lock_disks: bool = True,
    disk_overlays: dict[int, DiskOverlay] | None = None,
) -> tuple[VirtioConsole | None, VirtioBalloon | None]:
    """The configured virtio devices, in a fixed order: console, disks, rng, net, balloon.

    A throw-away disk reads and writes its overlay from ``disk_overlays`` (by the disk's index).
    Each device's module is imported when a machine has that device.
    """
    overlays = disk_overlays or {}
    console = balloon = None
    if config.console == "virtio":
        from .devices.virtio.console import VirtioConsole

        console = VirtioConsole(serial_output.write)
        devices.attach_virtio(console)
    watched = type(inputs).disk_read is not HostInputs.disk_read  # else the host's data need not be seen: C reads
    for index, disk in enumerate(config.disks):
        from .devices.virtio.blk import VirtioBlock

        on_read = functools.partial(inputs.disk_read, index) if watched else None
        overlay_fd = overlays[index].device_fd() if index in overlays else None
        devices.attach_virtio(closing(VirtioBlock(disk.path, read_only=disk.read_only, on_read=on_read, lock=lock_disks,
                                                  fd=overlay_fd)))  # fmt: skip
    if config.rng:
        from .devices.virtio.rng import VirtioRng

        devices.attach_virtio(VirtioRng(source=inputs.random_bytes))
    if config.net is not None:
        from .devices.virtio.net import VirtioNet

        devices.attach_virtio(closing(VirtioNet.open(config.net.tap)))
    if config.balloon:
        from .devices.virtio.balloon import VirtioBalloon

        balloon = VirtioBalloon(memory_map, deflate_on_oom=config.deflate_on_oom,
                                free_page_reporting=config.free_page_reporting, ram_size=config.memory_bytes,
                                on_change=lambda **sizes: events.emit("balloon", **sizes))  # fmt: skip
        devices.attach_virtio(balloon)
    return console, balloon


def create_vcpu(kvm: Kvm, vm: Vm, vcpu_id: int, supported_cpuid: list[CpuidEntry], devices: DeviceManager) -> Vcpu:
    """A vCPU with its CPUID and boot MSRs, registers synced into ``kvm_run`` where KVM can, and
    the machine's fast table."""
    vcpu = vm.create_vcpu(vcpu_id)
    try:
        vcpu.set_cpuid2(vcpu_cpuid(supported_cpuid, vcpu_id))
        accepted = vcpu.set_msrs(BOOT_MSRS)
        if accepted != len(BOOT_MSRS):
            msr = list(BOOT_MSRS)[accepted]
            raise PykvmError(f"KVM_SET_MSRS refused MSR {msr:#x}, which the boot state needs")
        if kvm.check_extension(lib.KVM_CAP_SYNC_REGS) & lib.KVM_SYNC_X86_REGS:
            vcpu.enable_sync_regs()
        vcpu.attach_fast_table(devices.fast)
    except BaseException:
        vcpu.close()
        raise
    return vcpu
