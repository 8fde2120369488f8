"""``pykvm-qemu``: the subset of ``qemu-system-x86_64``'s command line that test harnesses use, run by pykvm.

Harnesses written for QEMU (kvm-unit-tests' ``run_tests.sh``, CI scripts that boot a test
kernel) run pykvm unchanged with ``QEMU=pykvm-qemu``.  This module only translates: each
option becomes a :class:`~pykvm.config.MachineConfig` field or an argument of
:meth:`~pykvm.machine.Machine.load`; an option pykvm has no counterpart for is one clear
error naming it, never silently dropped.  Options that change nothing pykvm could honour
differently are accepted (``-nodefaults``, ``-display none``, ``-no-reboot``: pykvm never
reboots); a few that pykvm cannot honour as asked are accepted with a one-line warning on
stderr that says what pykvm does instead (a ``-cpu`` model, ``-machine q35``).

pykvm's PC always has its debug-exit ports (0xf4-0xf7 unless ``-device isa-debug-exit``
moves them), where QEMU has them only when asked.

The probes harnesses run answer as QEMU does: ``--help`` and ``-version`` start with
"QEMU emulator version", ``-device help`` lists the devices one ``name "...", bus ...`` line
each, ``-machine help`` and ``-cpu help`` list what is accepted.

The exit status follows QEMU's where QEMU's says something: the debug-exit device gives
``(value << 1) | 1``; a guest that powers off, resets (pykvm never reboots, as with
``-no-reboot``), triple-faults or halts for good gives 0; a signal gives 128 + its number,
after "terminating on signal N" on stderr.  Where QEMU's is ambiguous, pykvm's own statuses
stand: QEMU exits 1 when it cannot start, which a harness cannot tell from a guest's debug
exit with 0 (kvm-unit-tests then decides by whether stderr says "warning"), so a bad option
or a kernel that cannot be loaded gives pykvm's error status 2, and a guest pykvm cannot run
on gives ``pykvm run``'s status for it (116 for an emulation failure, where QEMU would stop
the VM and wait), both with the reason on stderr: a failure never reads as a pass.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable, NoReturn

from .boot import detect
from .boot.multiboot import FORMAT as MULTIBOOT
from .config import DiskConfig, MachineConfig, device_options
from .console import StdinForwarder
from .errors import ConfigError, ImageError, PykvmError
from .machine import Machine
from .result import ERROR_STATUS, ExitReason, RunResult

PROG = "pykvm-qemu"
# The QEMU release whose command line this follows (harnesses parse the number).
QEMU_VERSION = "7.2.0"
QUIT_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
SIGNAL_STATUS_BASE = 128

# Machine types, accelerators and CPU models accepted, and what pykvm gives for each.
MACHINES = {
    "pc": "pykvm's PC: legacy devices, in-kernel PIC/IOAPIC/LAPIC/PIT, ACPI, virtio-mmio (default)",
    "q35": "taken as pykvm's PC (no PCI, no ICH9)",
    "microvm": "taken as pykvm's PC (which, like microvm, has virtio-mmio and no PCI)",
}
MACHINE_ALIASES = {"pc": "pc-i440fx-", "q35": "pc-q35-"}
HOST_LIKE_CPUS = ("host", "max")
ACCELERATORS = ("kvm",)
SERIAL_BACKENDS = {"stdio": "stdio", "null": "none", "none": "none", "mon:stdio": "stdio"}
# -device names and what QEMU's -device help says of each; pci-testdev is accepted but absent.
DEVICES = {
    "isa-debug-exit": "ISA",
    "isa-serial": "ISA",
    "pc-testdev": "ISA",
    "virtio-blk-device": "virtio-bus",
    "virtio-rng-device": "virtio-bus",
    "virtio-balloon-device": "virtio-bus",
}
ABSENT_DEVICES = {"pci-testdev": "pykvm has no PCI bus, so the guest finds no pci-testdev"}
PIT_GLOBAL = "kvm-pit.lost_tick_policy"
# QEMU's spellings of a boolean property.
SWITCH_ON, SWITCH_OFF = ("on", "yes", "true", "y"), ("off", "no", "false", "n")


class QemuOptionError(ConfigError):
    """An option pykvm-qemu cannot translate; says which."""

    def __init__(self, option: str, reason: str) -> None:
        super().__init__(f"{option}: {reason}")


class Probe(Exception):
    """An informational option was given: print ``text`` and exit 0, as QEMU does."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


@dataclass
class Invocation:
    """A translated command line: the machine, the kernel and its arguments, and the notes to print."""

    config: dict[str, object] = field(default_factory=dict)
    kernel: str | None = None
    append: str = ""
    initrd: str | None = None
    drives: dict[str, dict[str, str]] = field(default_factory=dict)  # -drive id -> its properties
    chardevs: dict[str, str] = field(default_factory=dict)  # -chardev id -> pykvm serial target
    disks: list[DiskConfig] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    serial_given: bool = False
    snapshot: bool = False  # -snapshot: every disk is throw-away


def qemu_version() -> str:
    try:
        pykvm_version = version("pykvm-hypervisor")
    except PackageNotFoundError:
        pykvm_version = "unknown"
    return f"QEMU emulator version {QEMU_VERSION} ({PROG}: pykvm {pykvm_version}, a QEMU-compatible command line)"


HELP = f"""{{version}}
usage: {PROG} [options]

pykvm runs the kernel given with -kernel on /dev/kvm; these qemu-system-x86_64 options are understood:

-kernel FILE          the kernel: multiboot, ELF, Linux bzImage or PVH (as pykvm run detects it)
-append ARGS          its command line (a multiboot kernel gets "FILE ARGS", as QEMU passes it)
-initrd FILE[,FILE]   a Linux initrd, or the multiboot modules ("FILE ARGS" each, comma-separated)
-m [size=]SIZE        guest RAM (a bare number is MiB)
-smp [cpus=]N         vCPUs
-cpu MODEL[,FLAGS]    accepted; the guest gets KVM's CPUID of this host (as -cpu host)
-machine TYPE[,accel=kvm][,pit=off][,kernel-irqchip=on], -M TYPE   pc, q35 or microvm: pykvm's PC
-enable-kvm, -accel kvm
-nodefaults, -nographic, -display none, -vnc none, -no-reboot, -name NAME
-serial stdio|null|none|file:PATH|chardev:ID, -chardev stdio|null|file,id=ID[,path=PATH]
-device isa-serial[,chardev=ID], isa-debug-exit[,iobase=N][,iosize=N], pc-testdev,
        virtio-blk-device,drive=ID, virtio-rng-device, virtio-balloon-device
        (pci-testdev: accepted, absent)
-drive file=PATH[,if=virtio|none][,id=ID][,format=raw][,readonly=on][,snapshot=on]
-snapshot             every disk is throw-away: the guest's writes never reach the image
-global kvm-pit.lost_tick_policy=discard|delay
-gdb tcp::PORT|tcp:HOST:PORT|unix:PATH, -s (-gdb tcp::1234), -S (hold the guest until gdb continues it)
-device help, -machine help, -cpu help, -version, -h
"""


# --- parsing -----------------------------------------------------------------------------------


def _properties(option: str, text: str, allowed: tuple[str, ...], first_key: str | None = None) -> dict[str, str]:
    """``key=value`` pairs of a QEMU option value; a bare first item is ``first_key``'s value."""
    values: dict[str, str] = {}
    for index, item in enumerate(text.split(",")):
        key, equals, value = item.partition("=")
        if not equals and index == 0 and first_key is not None:
            key, value = first_key, item
        if key not in allowed or (not equals and key != first_key):
            raise QemuOptionError(f"-{option} {text}", f"pykvm does not understand {item!r} (it takes {', '.join(allowed)})")
        values[key] = value
    return values


def _number(option: str, text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise QemuOptionError(option, f"{text!r} is not a number") from None


class _Parser:
    """Walks the argument list; one method per option, named after it."""

    def __init__(self, invocation: Invocation) -> None:
        self.inv = invocation

    # flags
    def enable_kvm(self) -> None:
        """Always on: pykvm runs on KVM."""

    def nodefaults(self) -> None:
        """pykvm adds no default devices beyond the PC's own."""

    def no_reboot(self) -> None:
        """pykvm never reboots: a reset ends the run."""

    def snapshot(self) -> None:
        """Every -drive gets snapshot=on, as QEMU's -snapshot sets it (whatever the drive said)."""
        self.inv.snapshot = True

    def nographic(self) -> None:
        if not self.inv.serial_given:
            self.inv.config["serial"] = "stdio"

    def s(self) -> None:
        """QEMU's shorthand for ``-gdb tcp::1234``."""
        self.gdb("tcp::1234")

    def S(self) -> None:  # noqa: N802 - QEMU's option name
        """Hold the guest before its first instruction: until gdb continues it (pykvm has no monitor)."""
        self.inv.config["gdb_wait"] = True

    # options with a value
    def kernel(self, value: str) -> None:
        self.inv.kernel = value

    def append(self, value: str) -> None:
        self.inv.append = value

    def initrd(self, value: str) -> None:
        self.inv.initrd = value

    def m(self, value: str) -> None:
        self.inv.config["memory"] = value

    def smp(self, value: str) -> None:
        values = _properties("smp", value, ("cpus", "maxcpus"), first_key="cpus")
        cpus = _number("-smp", values.get("cpus", "1"))
        if _number("-smp", values.get("maxcpus", str(cpus))) != cpus:
            raise QemuOptionError(f"-smp {value}", "pykvm has no CPU hotplug: maxcpus must equal cpus")
        self.inv.config["cpus"] = cpus

    def cpu(self, value: str) -> None:
        if value in ("help", "?"):
            raise Probe("Available CPUs:\nx86 host  KVM's CPUID of this host (what every -cpu model is given)\nx86 max   the same")
        if value.split(",")[0] not in HOST_LIKE_CPUS or "," in value:
            self.inv.warnings.append(
                f"-cpu {value}: pykvm gives the guest the CPUID KVM supports on this host, as -cpu host; "
                f"the model and its feature flags are not applied"
            )

    def machine(self, value: str) -> None:
        if value in ("help", "?"):
            raise Probe("Supported machines are:\n" + "\n".join(f"{name:<20} {text}" for name, text in MACHINES.items()))
        items = value.split(",")
        if "=" not in items[0]:
            self._machine_type(items.pop(0))
        for item in items:
            self._machine_property(value, item)

    M = machine

    def accel(self, value: str) -> None:
        name = value.split(",")[0]
        if name not in ACCELERATORS or "," in value:
            raise QemuOptionError(f"-accel {value}", "pykvm runs on KVM only: -accel kvm")

    def display(self, value: str) -> None:
        if value != "none":
            raise QemuOptionError(f"-display {value}", "pykvm has no display: only -display none")

    def vnc(self, value: str) -> None:
        if value != "none":
            raise QemuOptionError(f"-vnc {value}", "pykvm has no display: only -vnc none")

    def name(self, value: str) -> None:
        """Accepted; pykvm does not name its process."""

    def gdb(self, value: str) -> None:
        spec = value.split(",")[0]  # unix:PATH,server=on,wait=off: pykvm's socket is always a server
        if not spec.startswith(("tcp:", "unix:")):
            raise QemuOptionError(f"-gdb {value}", "pykvm serves gdb on tcp::PORT, tcp:HOST:PORT or unix:PATH")
        self.inv.config["gdb"] = spec

    def serial(self, value: str) -> None:
        if value.startswith("chardev:"):
            self._set_serial(f"-serial {value}", self._chardev_target(f"-serial {value}", value[len("chardev:") :]))
        elif value.startswith("file:"):
            self._set_serial(f"-serial {value}", value[len("file:") :])
        elif value in SERIAL_BACKENDS:
            self._set_serial(f"-serial {value}", SERIAL_BACKENDS[value])
        else:
            raise QemuOptionError(f"-serial {value}", "pykvm's serial port writes to stdio, null, none or file:PATH")

    def chardev(self, value: str) -> None:
        backend, _, rest = value.partition(",")
        values = _properties("chardev", rest, ("id", "path", "signal", "mux", "logfile")) if rest else {}
        if "id" not in values:
            raise QemuOptionError(f"-chardev {value}", "a chardev needs an id=")
        if backend == "file" and "path" in values:
            self.inv.chardevs[values["id"]] = values["path"]
        elif backend in ("stdio", "null"):
            self.inv.chardevs[values["id"]] = SERIAL_BACKENDS[backend]
        else:
            raise QemuOptionError(f"-chardev {value}", "pykvm's chardevs are stdio, null and file,path=PATH")

    def device(self, value: str) -> None:
        if value in ("help", "?"):
            raise Probe("\n".join(f'name "{name}", bus {bus}' for name, bus in sorted(DEVICES.items())))
        name, _, rest = value.partition(",")
        if name in ABSENT_DEVICES:
            self.inv.warnings.append(f"-device {value}: {ABSENT_DEVICES[name]}")
        elif name in ("pc-testdev", "isa-debug-exit"):
            self._device_config(value)
        elif name == "isa-serial":
            chardev = _properties("device", rest, ("chardev",)).get("chardev") if rest else None
            self._set_serial(f"-device {value}", self._chardev_target(f"-device {value}", chardev) if chardev else "none")
        elif name == "virtio-blk-device":
            drive = _properties("device", rest, ("drive",)).get("drive") if rest else None
            if drive is None or drive not in self.inv.drives:
                raise QemuOptionError(f"-device {value}", "give drive=ID of an earlier -drive ...,if=none,id=ID")
            self._add_disk(self.inv.drives[drive])
        elif name in ("virtio-rng-device", "virtio-balloon-device") and not rest:
            self.inv.config["rng" if name == "virtio-rng-device" else "balloon"] = True
        else:
            raise QemuOptionError(f"-device {value}", f"pykvm has no device {name!r} (see -device help)")

    def drive(self, value: str) -> None:
        values = _properties("drive", value, ("file", "if", "id", "format", "readonly", "media", "snapshot"))
        if "file" not in values:
            raise QemuOptionError(f"-drive {value}", "a drive needs file=PATH")
        for switch in ("readonly", "snapshot"):
            if values.get(switch, "off") not in SWITCH_ON + SWITCH_OFF:
                raise QemuOptionError(f"-drive {value}", f"{switch} is on or off, not {values[switch]!r}")
        if values.get("format", "raw") != "raw" or values.get("media", "disk") != "disk":
            raise QemuOptionError(f"-drive {value}", "pykvm's disks are raw images (format=raw, media=disk)")
        interface = values.get("if", "virtio")
        if interface == "none":
            if "id" not in values:
                raise QemuOptionError(f"-drive {value}", "a drive with if=none needs an id=")
            self.inv.drives[values["id"]] = values
        elif interface == "virtio":
            self._add_disk(values)
        else:
            raise QemuOptionError(f"-drive {value}", "pykvm's disks are virtio-blk: if=virtio, or if=none with -device")

    def global_(self, value: str) -> None:
        key, _, policy = value.partition("=")
        if key != PIT_GLOBAL or policy not in ("discard", "delay"):
            raise QemuOptionError(f"-global {value}", f"pykvm takes only -global {PIT_GLOBAL}=discard|delay")
        if policy == "discard":
            self.inv.warnings.append(
                f"-global {value}: pykvm's in-kernel PIT re-injects lost ticks (KVM's default, as lost_tick_policy=delay)"
            )

    # helpers
    def _machine_type(self, name: str) -> None:
        kind = next((machine for machine, prefix in MACHINE_ALIASES.items() if name.startswith(prefix)), name)
        if kind not in MACHINES:
            raise QemuOptionError(f"-machine {name}", f"pykvm has no machine {name!r} (see -machine help)")
        if kind != "pc":
            self.inv.warnings.append(f"-machine {name}: {MACHINES[kind]}")

    def _machine_property(self, value: str, item: str) -> None:
        key, _, setting = item.partition("=")
        if key == "accel" and all(name in ACCELERATORS for name in setting.split(":")):
            return
        if key == "kernel-irqchip" and setting in ("on", "true"):
            return
        if key == "pit" and setting in ("on", "off"):
            self.inv.config["pit"] = setting == "on"
            return
        reasons = {
            "accel": "pykvm runs on KVM only: accel=kvm",
            "kernel-irqchip": "pykvm's PIC, IOAPIC and LAPIC are all in the kernel: kernel-irqchip=on only",
        }
        raise QemuOptionError(f"-machine {value}", reasons.get(key, f"pykvm does not understand {item!r}"))

    def _device_config(self, value: str) -> None:
        self.inv.config.update(device_options(value))

    def _chardev_target(self, option: str, chardev: str) -> str:
        if chardev not in self.inv.chardevs:
            raise QemuOptionError(option, f"no -chardev with id={chardev} was given before it")
        return self.inv.chardevs[chardev]

    def _set_serial(self, option: str, target: str) -> None:
        if self.inv.serial_given:
            raise QemuOptionError(option, "pykvm's PC has one serial port (COM1), already given")
        self.inv.serial_given = True
        self.inv.config["serial"] = target

    def _add_disk(self, values: dict[str, str]) -> None:
        self.inv.disks.append(DiskConfig(values["file"], read_only=values.get("readonly") in SWITCH_ON,
                                         snapshot=values.get("snapshot") in SWITCH_ON))  # fmt: skip


FLAGS = {"enable-kvm", "nodefaults", "no-reboot", "nographic", "snapshot", "s", "S"}
WITH_VALUE = {
    "kernel", "append", "initrd", "m", "smp", "cpu", "machine", "M", "accel", "display", "vnc", "name", "gdb",
    "serial", "chardev", "device", "drive", "global",
}  # fmt: skip


def parse(argv: list[str]) -> Invocation:
    """Translate a ``qemu-system-x86_64`` argument list (raises :class:`Probe` for the informational options)."""
    invocation = Invocation()
    parser = _Parser(invocation)
    arguments = iter(argv)
    for argument in arguments:
        option = argument[2:] if argument.startswith("--") else argument[1:] if argument.startswith("-") else None
        if option in ("h", "help"):
            raise Probe(HELP.format(version=qemu_version()))
        if option == "version":
            raise Probe(f"{qemu_version()}\npykvm is not QEMU: it translates this subset of QEMU's options")
        if option in FLAGS:
            getattr(parser, option.replace("-", "_"))()
        elif option in WITH_VALUE:
            value = next(arguments, None)
            if value is None:
                raise QemuOptionError(argument, "requires an argument")
            getattr(parser, "global_" if option == "global" else option)(value)
        elif option is None:
            raise QemuOptionError(argument, "a bare argument; give the kernel with -kernel FILE")
        else:
            raise QemuOptionError(argument, "pykvm-qemu does not understand this option (see -h)")
    if invocation.disks:
        invocation.config["disks"] = tuple(
            dataclasses.replace(disk, snapshot=True) if invocation.snapshot else disk for disk in invocation.disks
        )
    if invocation.config.get("gdb_wait") and "gdb" not in invocation.config:
        raise QemuOptionError("-S", "pykvm has no monitor to continue the guest: give -s or -gdb too, and continue from gdb")
    return invocation


# --- running ------------------------------------------------------------------------------------


def _load_arguments(invocation: Invocation, kernel: Path) -> dict[str, object]:
    """Machine.load's arguments: -initrd is the modules of a multiboot kernel (comma-separated), else its initrd."""
    arguments: dict[str, object] = {"cmdline": invocation.append}
    if invocation.initrd is None:
        return arguments
    if detect(kernel, kernel.read_bytes()) == MULTIBOOT:
        arguments["modules"] = tuple((spec.split(" ", 1)[0], spec) for spec in _split_modules(invocation.initrd))
    else:
        arguments["initrd"] = invocation.initrd
    return arguments


def _split_modules(text: str) -> list[str]:
    """QEMU's -initrd list: comma-separated, a doubled comma standing for a comma in a name."""
    modules, current, index = [], "", 0
    while index < len(text):
        if text.startswith(",,", index):
            current, index = current + ",", index + 2
        elif text[index] == ",":
            modules.append(current)
            current, index = "", index + 1
        else:
            current, index = current + text[index], index + 1
    return modules + [current]


def _config(invocation: Invocation) -> MachineConfig:
    fields = dict(invocation.config)
    fields.setdefault("serial", "none")
    return MachineConfig(**fields)  # type: ignore[arg-type]


def qemu_status(result: RunResult) -> int:
    """The status pykvm-qemu exits with after a run that ended as ``result`` did (see the module documentation)."""
    if result.reason in (ExitReason.HALTED, ExitReason.POWEROFF, ExitReason.RESET, ExitReason.TRIPLE_FAULT):
        return 0
    return result.status


def _say(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def _fail(message: object) -> NoReturn:
    _say(str(message))
    sys.exit(ERROR_STATUS)


def _print_probe(text: str) -> NoReturn:
    """Print a probe's answer; a reader that stops early (``| head -1``) is no error."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit-time flush is quiet
    sys.exit(0)


def _check_kernel(invocation: Invocation) -> Path:
    if invocation.kernel is None:
        _fail("no -kernel given: pykvm boots a kernel image directly (it has no firmware, disks or network boot)")
    kernel = Path(invocation.kernel)
    try:
        with open(kernel, "rb"):
            pass
    except OSError as err:
        _fail(f"could not load kernel '{invocation.kernel}': {err.strerror}")
    return kernel


def _on_signal(vm: Machine) -> Callable[[int, object], None]:
    def handler(number: int, frame: object) -> None:
        vm.stop(number)

    return handler


def _run(invocation: Invocation, kernel: Path) -> RunResult:
    with Machine(_config(invocation)) as vm:
        vm.load(kernel, **_load_arguments(invocation, kernel))  # type: ignore[arg-type]
        for number in QUIT_SIGNALS:
            signal.signal(number, _on_signal(vm))
        forwarder = StdinForwarder(vm.serial.receive) if vm.config.serial == "stdio" else None
        if forwarder is not None:
            forwarder.start()
        try:
            return vm.run()
        finally:
            if forwarder is not None:
                forwarder.stop()


def _report(result: RunResult) -> None:
    if result.reason is ExitReason.STOPPED and result.exit_value:
        _say(f"terminating on signal {result.exit_value}")
    elif result.reason is ExitReason.TRIPLE_FAULT:
        _say(f"guest triple fault (pykvm does not reboot): {result.diagnosis.splitlines()[0]}")
    elif result.reason not in (ExitReason.DEBUG_EXIT, ExitReason.HALTED, ExitReason.POWEROFF, ExitReason.RESET):
        _say(f"{result.reason.value}: {result.diagnosis}")


def main(argv: list[str] | None = None) -> NoReturn:
    """The ``pykvm-qemu`` console script."""
    try:
        invocation = parse(sys.argv[1:] if argv is None else argv)
    except Probe as probe:
        _print_probe(probe.text)
    except PykvmError as err:
        _fail(err)
    for warning in invocation.warnings:
        _say(f"warning: {warning}")
    kernel = _check_kernel(invocation)
    try:
        result = _run(invocation, kernel)
    except ImageError as err:
        _fail(f"could not load kernel '{invocation.kernel}': {err.reason}" if err.path == str(kernel) else err)
    except PykvmError as err:
        _fail(err)
    _report(result)
    sys.exit(qemu_status(result))


if __name__ == "__main__":
    main()
