"""The ``pykvm`` command: a click front end over the library, with no logic of its own."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn

import click

from .boot import FORMATS
from .boot.flat import FORMAT as FLAT_FORMAT
from .boot.plan import BootPlan
from .config import DEFAULT_KVM_PATH, DiskConfig, MachineConfig, NetConfig, SerialConfig, device_options, parse_size
from .console import StdinForwarder
from .errors import PykvmError
from .machine import Machine
from .result import ERROR_STATUS, INTERRUPTED_STATUS, ExitReason, RunResult
from .signals import STOPPER

TOKEN_ENV = "PYKVM_MIGRATION_TOKEN"  # the secret both sides of a migration share, if set
_QUIET_ENDINGS = (ExitReason.DEBUG_EXIT, ExitReason.HALTED, ExitReason.POWEROFF, ExitReason.RESET, ExitReason.SNAPSHOTTED)


# The option types derive from click's integer and float types, not from click.ParamType: click
# 8.4 made ParamType generic (ParamType[int] says what convert gives), which click 8.1 to 8.3
# cannot subscript at run time; IntParamType and FloatParamType carry the value type in both.
class _Address(click.types.IntParamType):
    """An integer in any base Python reads: 1048576, 0x100000, 0o4000000."""

    name = "address"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            number = int(str(value), 0)
        except ValueError:
            self.fail(f"{value!r} is not a number (write it like 0x100000 or 1048576)", param, ctx)
        if number < 0:
            self.fail(f"{value!r} is negative", param, ctx)
        return number


class _Seconds(click.types.FloatParamType):
    """A finite number of seconds: above 0 (``positive``) or from 0, up to ``maximum``."""

    name = "seconds"

    def __init__(self, positive: bool = True, maximum: float | None = None) -> None:
        self.positive = positive
        self.maximum = maximum

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number of seconds", param, ctx)
        if number < 0 or (self.positive and number == 0):
            self.fail(f"{value!r} must be {'more than' if self.positive else 'at least'} 0 seconds", param, ctx)
        if self.maximum is not None and number > self.maximum:
            self.fail(f"{value!r} is more than {self.maximum:g} seconds", param, ctx)
        return number


# QEMU options people type by habit, and what pykvm takes instead.
QEMU_OPTIONS = {
    "-kernel": "the kernel is the argument: pykvm run KERNEL",
    "-append": "pykvm's is --cmdline",
    "-initrd": "pykvm's is --initrd",
    "-smp": "pykvm's is -c/--cpus",
    "-serial": "pykvm's is --serial (stdio, null, file:PATH)",
    "-drive": "pykvm's is --disk PATH[,ro][,snapshot]",
    "-hda": "pykvm's is --disk PATH",
    "-snapshot": "pykvm's is --disk PATH,snapshot",
    "-device": "pykvm's devices are --disk, --rng, --net, --balloon and --console virtio",
    "-netdev": "pykvm's is --net tap[=NAME]",
    "-nographic": "pykvm needs none: the serial port is on stdio already",
    "-display": "pykvm has no display: the serial port is on stdio",
    "-enable-kvm": "pykvm always uses KVM",
    "-accel": "pykvm always uses KVM",
    "-no-reboot": "pykvm needs none: a reset ends the run",
    "-machine": "pykvm has one machine type",
    "-M": "pykvm has one machine type",
    "-cpu": "pykvm gives the guest the host's CPU model",
    "-bios": "pykvm boots kernels directly, without firmware",
    "-chardev": "pykvm's serial port is --serial (stdio, null, file:PATH)",
    "-nodefaults": "pykvm needs none: it makes only the devices asked for",
    "-no-user-config": "pykvm reads no configuration files",
    "-vnc": "pykvm has no display: the serial port is on stdio",
    "-name": "pykvm's machines have no name",
    "-monitor": "pykvm's is --control PATH, used with pykvm ctl PATH",
    "-qmp": "pykvm's is --control PATH, used with pykvm ctl PATH",
    "-s": "pykvm's is --gdb tcp::1234",
    "-S": "pykvm's is --gdb-wait",
    "-gdb": "pykvm's is --gdb",
}


class _RunCommand(click.Command):
    """``pykvm run``, which answers a QEMU option with the pykvm option to use instead."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # Found before click reads them, which would take -cpu as -c with the value "pu" or -machine
        # as -m "achine".  (A value that must be one of these words goes as --option=VALUE.)
        typed = next((arg for arg in args if arg in QEMU_OPTIONS), None)
        if typed is not None:
            raise click.UsageError(
                f"{typed} is a QEMU option; {QEMU_OPTIONS[typed]} (pykvm-qemu takes QEMU's options as they are)", ctx
            )
        return super().parse_args(ctx, list(args))


def _fail(message: object) -> NoReturn:
    click.echo(f"pykvm: error: {message}", err=True)
    sys.exit(ERROR_STATUS)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pykvm-hypervisor")
@click.option("-v", "--verbose", count=True, help="Log more (-v: info, -vv: debug, e.g. unclaimed ports).")
@click.option("--device", default=DEFAULT_KVM_PATH, show_default=True, envvar="PYKVM_DEVICE", help="The KVM device to use.")
@click.pass_context
def main(ctx: click.Context, verbose: int, device: str) -> None:
    """pykvm: run tiny x86 guest kernels on /dev/kvm."""
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="pykvm: %(levelname)s: %(message)s")
    ctx.obj = device


@main.command(cls=_RunCommand)
@click.argument("guest", type=click.Path(path_type=Path, dir_okay=True), required=False)
@click.option("-m", "--memory", default="64M", show_default=True, help="Guest RAM, as QEMU's -m: 64M, 1.5G, size=1G (a bare number is MiB).")
@click.option("-c", "--cpus", default=1, show_default=True, type=click.IntRange(min=1), help="Number of vCPUs.")
@click.option("--no-irqchip", is_flag=True, help="A minimal machine: no PIC/IOAPIC/LAPIC/PIT, no virtio.")
@click.option("--cmdline", default="", help="Kernel command line.")
@click.option("--module", "modules", multiple=True, type=click.Path(path_type=Path), help="A multiboot module (repeatable).")
@click.option("--initrd", type=click.Path(path_type=Path), help="An initial ramdisk (Linux).")
@click.option("--format", "image_format", type=click.Choice(FORMATS), default="auto", show_default=True)
@click.option("--mode", type=click.Choice(["real", "protected", "long"]),
              help="CPU mode of a flat binary [default: real]; a Linux bzImage's entry: long (64-bit), protected (32-bit), real (16-bit setup).")  # fmt: skip
@click.option("--load-addr", type=_Address(), help="Where a flat binary loads [default: 0x7c00 in real mode, else 0x100000].")
@click.option("--entry", type=_Address(), help="Entry point of a flat binary [default: its load address].")
@click.option("--user-mode", is_flag=True, help="Enter long-mode code at CPL3.")
@click.option("--serial", default="stdio", show_default=True, help="Serial output: stdio, null (or none), file:PATH or a path.")
@click.option("--console", type=click.Choice(["serial", "virtio"]), default="serial", show_default=True,
              help="Also give the guest a virtio-console (same output as the serial port).")  # fmt: skip
@click.option("--disk", "disks", multiple=True, metavar="PATH[,ro][,snapshot]",
              help="A raw disk image as virtio-blk (repeatable); ,ro read-only, ,snapshot throw-away: the guest's "
                   "writes go to a temporary copy and never reach the image.")  # fmt: skip
@click.option("--rng", is_flag=True, help="A virtio-rng fed from the host's getrandom().")
@click.option("--net", metavar="tap[=NAME]", help="A virtio-net on a TAP device.")
@click.option("--virtio-notify", type=click.Choice(["ioeventfd", "sync"]), default="ioeventfd", show_default=True,
              help="How queue notifications reach devices: an I/O thread, or synchronous MMIO exits (debugging).")  # fmt: skip
@click.option("--timeout", type=_Seconds(), help="Stop the guest after this many seconds (status 124).")
@click.option("--stats", is_flag=True, help="Print exit counts and where the time went, on stderr.")
@click.option("--balloon", is_flag=True, help="A virtio-balloon (set its size with `pykvm ctl PATH balloon SIZE`).")
@click.option("--share-pages", is_flag=True, help="Let the kernel merge identical guest pages (KSM, MADV_MERGEABLE).")
@click.option("--control", metavar="PATH", help="Serve the control socket (JSON lines, see `pykvm ctl`) at PATH.")
@click.option("--device", "devices", multiple=True, metavar="SPEC",
              help="A QEMU test device: pc-testdev, or isa-debug-exit[,iobase=N][,iosize=N] (moves the debug-exit ports).")  # fmt: skip
@click.option("--gdb", "gdb", metavar="tcp::PORT|tcp:HOST:PORT|unix:PATH",
              help="Serve the guest to gdb (`target remote`) there; tcp::PORT listens on 127.0.0.1 only.")  # fmt: skip
@click.option("--gdb-wait", is_flag=True, help="Hold the guest before its first instruction until gdb continues it.")
@click.option("--restore", type=click.Path(path_type=Path, file_okay=False), metavar="DIR",
              help="Run the machine saved in the snapshot DIR (instead of booting GUEST).")  # fmt: skip
@click.option("--allow-changed-disks", is_flag=True, help="With --restore: use disk images changed since the snapshot.")
@click.option("--incoming", metavar="tcp:HOST:PORT|unix:PATH|fd:N",
              help="Wait there for a guest to arrive by live migration (`pykvm ctl PATH migrate`), then run it; "
                   "--disk and --net name the host's disk images and network for it.")  # fmt: skip
@click.option("--record", type=click.Path(path_type=Path, dir_okay=False), metavar="LOG",
              help="With --restore: log every host input the guest takes, to replay the run.")  # fmt: skip
@click.option("--replay", type=click.Path(path_type=Path, dir_okay=False), metavar="LOG",
              help="With --restore: feed the guest the inputs LOG recorded instead of the host's.")  # fmt: skip
@click.option("--events", metavar="PATH|fd:N", help="Write the machine's lifecycle events there, one JSON object per line.")
@click.pass_obj
def run(device: str, guest: Path | None, memory: str, cpus: int, no_irqchip: bool, cmdline: str, modules: tuple[Path, ...], initrd: Path | None, image_format: str, mode: str | None,
        load_addr: int | None, entry: int | None, user_mode: bool, serial: str, console: str, disks: tuple[str, ...],
        rng: bool, net: str | None, virtio_notify: str, timeout: float | None, stats: bool,
        balloon: bool, share_pages: bool, control: str | None, devices: tuple[str, ...], gdb: str | None,
        gdb_wait: bool, restore: Path | None, allow_changed_disks: bool, incoming: str | None, record: Path | None,
        replay: Path | None, events: str | None) -> None:  # fmt: skip
    """Boot GUEST (flat binary, ELF, multiboot, Linux bzImage or PVH kernel), or run a saved machine
    (--restore DIR); exit with the guest's status.

    \b
    Status: 0 halted/reset; (v << 1) | 1 after the guest wrote v to port 0xf4;
    2 pykvm error; 112 unhandled exit; 114 triple fault; 116 emulation failure;
    118 entry failure; 120 a replay diverged; 124 timeout;
    128 + n stopped by signal n (130 Ctrl-C, 143 SIGTERM).
    """
    if incoming is not None:
        _check_saved_machine_options(guest, "--incoming runs the machine that arrives", allowed=("disks", "net"))
        if restore is not None or record is not None or replay is not None or allow_changed_disks:
            raise click.UsageError("--incoming runs the machine that arrives: --restore, --record, --replay and "
                                   "--allow-changed-disks do not go with it")  # fmt: skip
        from .migration.destination import check_disks  # only --incoming needs it

        try:
            host_disks = [DiskConfig.parse(disk) for disk in disks]
            check_disks(host_disks)  # before it waits, not when the guest arrived
            host = {"kvm_path": device, "serial": serial, "disks": host_disks,
                    "net": NetConfig.parse(net) if net else None, "token": os.environ.get(TOKEN_ENV)}  # fmt: skip
        except PykvmError as err:
            _fail(err)
        session = _Session(functools.partial(_arrival, incoming, host), None, {}, timeout, control, events,
                           guard_first=False)  # fmt: skip
        _finish(session.run(), stats, serial, None)
    if restore is not None:
        _check_saved_machine_options(guest, "--restore runs the machine the snapshot saved")
        restored = functools.partial(Machine.restore, restore, kvm_path=device, serial=serial, allow_changed_disks=allow_changed_disks,
                                     record=record, replay=replay, gdb=gdb, gdb_wait=gdb_wait)  # fmt: skip
        session = _Session(restored, None, {}, timeout, control, events, replaying=replay is not None)
        _finish(session.run(), stats, serial, None)
    if guest is None:
        raise click.UsageError("run needs a GUEST image to boot, or --restore DIR")
    if record is not None or replay is not None or allow_changed_disks:
        raise click.UsageError("--record, --replay and --allow-changed-disks go with --restore DIR")
    try:
        device_fields: dict[str, object] = {}
        for spec in devices:
            device_fields.update(device_options(spec))
        config = MachineConfig(
            memory=memory,
            cpus=cpus,
            irqchip=not no_irqchip,
            serial=serial,
            console=console,
            disks=tuple(DiskConfig.parse(disk) for disk in disks),
            rng=rng,
            net=NetConfig.parse(net) if net else None,
            virtio_notify=virtio_notify,
            kvm_path=device,
            balloon=balloon,
            share_pages=share_pages,
            **device_fields,  # type: ignore[arg-type]
            gdb=gdb,
            gdb_wait=gdb_wait,
        )
        load = {"format": image_format, "cmdline": cmdline, "modules": modules, "initrd": initrd, "mode": mode,
                "load_addr": load_addr, "entry": entry, "user": user_mode}  # fmt: skip
    except PykvmError as err:
        _fail(err)
    session = _Session(functools.partial(Machine, config), guest, load, timeout, control, events)
    _finish(session.run(), stats, serial, session.plan)


# What --restore takes from its snapshot; given with --restore, they are a mistake.
MACHINE_OPTIONS = ("memory", "cpus", "no_irqchip", "cmdline", "modules", "initrd", "image_format", "mode", "load_addr",
                   "entry", "user_mode", "console", "disks", "rng", "net", "balloon", "share_pages", "devices")  # fmt: skip


def _check_saved_machine_options(guest: Path | None, why: str, allowed: tuple[str, ...] = ()) -> None:
    """A machine restored or migrated comes whole: refuse what would build another one."""
    ctx = click.get_current_context()
    given = [name for name in MACHINE_OPTIONS
             if name not in allowed and ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE]  # fmt: skip
    if guest is not None or given:
        what = "a GUEST image" if guest is not None else "--" + given[0].replace("_", "-")
        raise click.UsageError(f"{why}: {what} does not go with it")


def _arrival(uri: str, host: dict[str, Any]) -> Machine:
    """The machine that arrives by live migration at ``uri`` (a signal meanwhile ends pykvm)."""
    from .migration import Incoming  # only --incoming needs it

    with Incoming(uri) as endpoint:
        STOPPER.before_exit(endpoint.close)  # a UNIX socket file goes with the process
        click.echo(f"pykvm: waiting for a migration on {endpoint.uri}", err=True)
        return endpoint.receive(**host)


class _Session:
    """One ``pykvm run``: make the machine, load the guest (unless restored), serve what was asked
    for around it, run it; a stop signal ends the run (:mod:`pykvm.signals`)."""

    def __init__(
        self, make: Callable[[], Machine], guest: Path | None, load: dict[str, Any], timeout: float | None,
        control: str | None, events: str | None, replaying: bool = False, guard_first: bool = True,
    ) -> None:  # fmt: skip
        self._make, self._guest, self._load, self._timeout = make, guest, load, timeout
        self._control, self._events, self._replaying = control, events, replaying
        self._guard_first = guard_first  # False: a signal while the machine is made ends pykvm at once
        self.plan: BootPlan | None = None

    def run(self) -> tuple[RunResult, int]:
        """The run's result and how many bytes the guest sent to its serial port."""
        forwarder = None
        if self._guard_first:
            STOPPER.guard()  # from here on a signal stops the machine, which then cleans up
        try:
            machine = self._make()
            STOPPER.guard()
            with machine as vm, _control_server(self._control, vm), _event_writer(self._events, vm):
                STOPPER.attach(vm.stop)
                if self._guest is not None:
                    self.plan = vm.load(self._guest, **self._load)
                    if self.plan.format == FLAT_FORMAT and self._load["mode"] is None:
                        _note(f"{self._guest} is a flat binary: it starts in {_where(self.plan)} "
                              "(--mode, --load-addr and --entry change that)")  # fmt: skip
                if vm.gdb_server is not None:
                    waiting = "waiting for gdb" if vm.config.gdb_wait else "gdb can attach"
                    click.echo(f"pykvm: {waiting}: target remote {vm.gdb_server.gdb_address}", err=True)
                if SerialConfig.parse(vm.config.serial).kind == "stdio" and not self._replaying:
                    forwarder = StdinForwarder(vm.host_inputs.serial_input)
                    STOPPER.before_exit(forwarder.stop)
                    forwarder.start()
                return vm.run(timeout=self._timeout), vm.serial_output.transmitted
        except PykvmError as err:
            _fail(err)
        except KeyboardInterrupt:  # only where STOPPER does not take the signals (pykvm.cli called in-process)
            click.echo("pykvm: interrupted", err=True)
            sys.exit(INTERRUPTED_STATUS)
        finally:
            if forwarder is not None:
                forwarder.stop()
            STOPPER.release()


def _finish(outcome: tuple[RunResult, int], stats: bool, serial: str, plan: BootPlan | None) -> NoReturn:
    result, transmitted = outcome
    _report(result, stats)
    if not transmitted and plan is not None and SerialConfig.parse(serial).kind != "null":
        _note(f"the guest wrote nothing to the serial port; it was loaded as {FORMAT_NAMES.get(plan.format, plan.format)} and started in {_where(plan)}")
    sys.exit(result.status)


FORMAT_NAMES = {"flat": "a flat binary", "elf": "an ELF kernel", "multiboot": "a multiboot kernel",
                "linux": "a Linux bzImage", "pvh": "a PVH kernel"}  # fmt: skip


def _where(plan: BootPlan) -> str:
    cpl3 = " at CPL3" if plan.entry.user else ""
    return f"{plan.entry.mode.value} mode{cpl3} at {plan.entry.entry:#x}"


def _note(message: str) -> None:
    click.echo(f"pykvm: note: {message}", err=True)


def _control_server(path: str | None, vm: Machine) -> contextlib.AbstractContextManager[object]:
    """The control socket at ``path`` for ``vm`` (answering for a complete machine; closed first)."""
    if path is None:
        return contextlib.nullcontext()
    from .control_socket import ControlServer  # only a machine with --control needs it

    return contextlib.closing(ControlServer(path, vm))


def _event_writer(target: str | None, vm: Machine) -> contextlib.AbstractContextManager[object]:
    """The machine's lifecycle events written to ``target`` (PATH or fd:N) as JSON lines."""
    if target is None:
        return contextlib.nullcontext()
    from .events import JsonLinesWriter

    writer = JsonLinesWriter(target)
    vm.events.listen(writer)
    return contextlib.closing(writer)


def _report(result: RunResult, stats: bool) -> None:
    if result.reason not in _QUIET_ENDINGS:
        click.echo(f"pykvm: {result.reason.value}: {result.diagnosis}", err=True)
    else:
        logging.getLogger("pykvm").info("%s: %s", result.reason.value, result.diagnosis)
    if stats:
        click.echo(result.stats.format(), err=True)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def info(device: str, as_json: bool) -> None:
    """Tell what this host's KVM can do."""
    import json

    from .info import format_info, host_info

    try:
        data = host_info(device)
    except PykvmError as err:
        _fail(err)
    click.echo(json.dumps(data, indent=2) if as_json else format_info(data))


@main.group()
@click.argument("path", type=click.Path(dir_okay=False))
@click.pass_context
def ctl(ctx: click.Context, path: str) -> None:
    """Talk to a running machine's control socket (`pykvm run ... --control PATH`)."""
    ctx.obj = path


def _control(path: str, message: dict[str, Any], as_json: bool, timeout: float) -> None:
    import json

    from .control_socket import format_answer, request as control_request  # only `pykvm ctl` needs it

    try:
        answer = control_request(path, message, timeout=timeout + message.get("wait", 0))
    except PykvmError as err:
        _fail(err)
    if as_json:
        click.echo(json.dumps(answer))
    if not answer.get("ok"):
        if not as_json:
            click.echo(f"pykvm: error: {answer.get('error', 'the machine refused the request')}", err=True)
        sys.exit(ERROR_STATUS)
    if not as_json:
        click.echo(format_answer(message["cmd"], answer))


def _ctl_options(command: Any) -> Any:
    """The options every ``pykvm ctl`` command takes: --json and --timeout."""
    command = click.option("--json", "as_json", is_flag=True, help="Print the raw JSON answer.")(command)
    return click.option("--timeout", type=_Seconds(), default=10, show_default=True,
                        help="Give up when the machine does not answer within this many seconds.")(command)  # fmt: skip


@ctl.command("balloon")
@click.argument("size")
@click.option("--wait", type=_Seconds(positive=False, maximum=600), default=0, help="Wait up to this many seconds for the guest.")
@_ctl_options
@click.pass_obj
def ctl_balloon(path: str, size: str, wait: float, as_json: bool, timeout: float) -> None:
    """Set the balloon to SIZE: take that much memory (32M, 1G) from the guest."""
    _control(path, {"cmd": "balloon", "target": size, "wait": wait}, as_json, timeout)


@ctl.command("stats")
@_ctl_options
@click.pass_obj
def ctl_stats(path: str, as_json: bool, timeout: float) -> None:
    """The guest's balloon statistics and the host's memory."""
    _control(path, {"cmd": "stats"}, as_json, timeout)


@ctl.command("info")
@_ctl_options
@click.pass_obj
def ctl_info(path: str, as_json: bool, timeout: float) -> None:
    """What the machine is: memory, vCPUs, devices, balloon, RSS, page sharing."""
    _control(path, {"cmd": "info"}, as_json, timeout)


@ctl.command("snapshot")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--stop", is_flag=True, help="End the run once the snapshot is written (status 0).")
@_ctl_options
@click.pass_obj
def ctl_snapshot(path: str, directory: str, stop: bool, as_json: bool, timeout: float) -> None:
    """Save the running machine as a snapshot in DIRECTORY (`pykvm run --restore DIRECTORY` runs it)."""
    _control(path, {"cmd": "snapshot", "path": str(Path(directory).resolve()), "stop": stop}, as_json, timeout)


@ctl.command("migrate")
@click.argument("uri")
@click.option("--downtime", type=click.FloatRange(1, 60_000), default=300, show_default=True, metavar="MS",
              help="Pause the guest only once the rest can be sent within this many milliseconds.")  # fmt: skip
@click.option("--migrate-timeout", type=_Seconds(maximum=600), default=600, show_default=True,
              help="Give up (the guest runs on here) after this many seconds.")  # fmt: skip
@click.option("--bandwidth", metavar="SIZE", help="Send at most this much per second (100M, 1G).")
@click.option("--no-auto-converge", is_flag=True, help="Never slow the guest down to make it converge.")
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON answer.")
@click.pass_obj
def ctl_migrate(path: str, uri: str, downtime: float, migrate_timeout: float, bandwidth: str | None,
                no_auto_converge: bool, as_json: bool) -> None:  # fmt: skip
    """Move the guest to the pykvm waiting at URI (`pykvm run --incoming URI`): tcp:HOST:PORT,
    unix:PATH.  PYKVM_MIGRATION_TOKEN, if set, is the secret both sides must share."""
    try:
        speed = parse_size(bandwidth) if bandwidth is not None else None
    except PykvmError as err:
        raise click.BadParameter(str(err), param_hint="--bandwidth") from None
    message = {"cmd": "migrate", "uri": uri, "downtime_ms": downtime, "timeout": migrate_timeout, "bandwidth": speed,
               "auto_converge": not no_auto_converge, "token": os.environ.get(TOKEN_ENV)}  # fmt: skip
    with _progress_shown(path, enabled=not as_json and sys.stderr.isatty()):
        _control(path, message, as_json, migrate_timeout + 30)


@contextlib.contextmanager
def _progress_shown(path: str, enabled: bool) -> Iterator[None]:
    """On a terminal, a line on stderr that tells how the migration goes, until the block ends."""
    if not enabled:
        yield
        return
    from .control_socket import format_progress, request as control_request

    done = threading.Event()

    def show() -> None:
        while not done.wait(0.5):
            try:
                progress = control_request(path, {"cmd": "info"}, timeout=5).get("migration")
            except PykvmError:
                return
            if progress:
                click.echo("\r\033[K" + format_progress(progress), nl=False, err=True)

    thread = threading.Thread(target=show, name="pykvm-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        click.echo("\r\033[K", nl=False, err=True)


@ctl.command("wake")
@_ctl_options
@click.pass_obj
def ctl_wake(path: str, as_json: bool, timeout: float) -> None:
    """Wake a machine its guest suspended to RAM (ACPI S3), as QEMU's system_wakeup."""
    _control(path, {"cmd": "wake"}, as_json, timeout)


@main.group()
def snapshot() -> None:
    """Look at snapshots (`Machine.snapshot`, `pykvm ctl PATH snapshot DIR`)."""


@snapshot.command("info")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def snapshot_info(directory: Path, as_json: bool) -> None:
    """What the snapshot in DIRECTORY holds: the machine, its sizes, where it comes from."""
    import json

    from .snapshot import format_manifest, read_info
    from .snapshot.codec import encode

    try:
        manifest = read_info(directory)
    except PykvmError as err:
        _fail(err)
    click.echo(json.dumps(encode(manifest), indent=1) if as_json else format_manifest(directory, manifest))
