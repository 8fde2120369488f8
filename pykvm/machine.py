"""The machine: a typed config turned into memory, a vCPU and devices; loading; the run loop.

:class:`Machine` is built by a short recipe of named steps (Firecracker's
``build_microvm_for_boot`` is the model): open KVM, create the VM, map guest RAM,
attach the devices, create the vCPU.  :meth:`Machine.load` applies a loader's boot
plan; :meth:`Machine.run` runs the vCPU until the guest stops, dispatching each exit
that the C fast path did not answer to exactly one device.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Sequence

from . import native
from .boot import load_image
from .boot.plan import BootPlan, LoadRequest, Module
from .config import MachineConfig
from .console import SerialOutput
from .devices.bus import Bus
from .devices.cmos import Cmos
from .devices.debug_exit import DebugExit
from .devices.i8042 import I8042
from .devices.ports import ConstantPort
from .devices.uart import Uart16550
from .errors import ConfigError, GuestMemoryError, ImageError, PykvmError
from .kvm import Kvm, Vcpu
from .kvm.exits import (
    DebugPortExit,
    Exit,
    FailEntryExit,
    HltExit,
    InternalErrorExit,
    Interrupted,
    IoExit,
    MmioExit,
    OtherExit,
    ShutdownExit,
    SystemEventExit,
)
from .kvm.fastpath import FastKind, FastTable, Space
from .memory import GuestMemory
from .native import lib
from .result import ExitReason, RunResult, RunStats, format_registers, status_of
from .x86 import layout
from .x86.cpu import BOOT_MSRS, apply_entry, vcpu_cpuid
from .x86.e820 import build_memory_map, ram_regions
from .x86.entry import CpuMode

log = logging.getLogger(__name__)

# The signal that kicks a vCPU thread out of KVM_RUN (its handler does nothing).
KICK_SIGNAL = signal.SIGRTMIN + 4

COM1_BASE, COM1_SIZE = 0x3F8, 8
DEBUG_EXIT_BASE, DEBUG_EXIT_SIZE = 0xF4, 4
I8042_BASE, I8042_SIZE = 0x60, 5
CMOS_BASE, CMOS_SIZE = 0x70, 2
POST_PORT = 0x80

_EXIT_NAMES = {
    getattr(lib, name): name[len("KVM_EXIT_") :].lower()
    for name in dir(lib)
    if name.startswith("KVM_EXIT_") and not name.startswith("KVM_EXIT_IO_")
}
_SYSTEM_EVENT_SHUTDOWN = 1
_SYSTEM_EVENT_RESET = 2
_EMULATION_SUBERROR = 1
_EMULATION_FLAG_INSN_BYTES = 1


@dataclasses.dataclass
class _Stop:
    reason: ExitReason
    diagnosis: str
    value: int | None = None
    with_registers: bool = False


class Machine:
    """A virtual machine with one vCPU, guest RAM and the legacy PC devices.

    >>> with Machine(memory="64M", capture_serial=True) as vm:     # doctest: +SKIP
    ...     vm.load("guests/build/hello_real.bin")
    ...     result = vm.run(timeout=10)
    >>> result.serial, result.status                               # doctest: +SKIP
    (b'Hello from real mode\\n', 1)
    """

    def __init__(self, config: MachineConfig | None = None, **options: object) -> None:
        config = config or MachineConfig()
        self.config = dataclasses.replace(config, **options) if options else config
        self.config.validate()
        self._closers: list = []
        self._stop: _Stop | None = None
        self._plan: BootPlan | None = None
        self._python_exits: dict[str, int] = {}
        self._python_ns = 0
        self._wall_ns = 0
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # --- building -------------------------------------------------------------------
    def _build(self) -> None:
        native.check(lib.pykvm_install_kick_handler(KICK_SIGNAL), "sigaction")
        self.kvm = self._closing(Kvm(self.config.kvm_path))
        self.vm = self._closing(self.kvm.create_vm())
        ram = self.config.memory_bytes
        self.memory_map = build_memory_map(ram)
        self.memory = self._closing(GuestMemory(ram_regions(ram)))
        self.memory.register(self.vm)
        self.vm.set_tss_addr(layout.KVM_TSS_ADDR)
        self.vm.set_identity_map_addr(layout.KVM_IDENTITY_MAP_ADDR)
        self.pio = Bus("port I/O")
        self.mmio = Bus("MMIO")
        self.fast = FastTable()
        self.serial_output = self._closing(SerialOutput(self.config.serial, self.config.capture_serial))
        self._attach_serial()
        self._attach_debug_exit()
        self._attach_i8042()
        self._attach_cmos()
        self._attach_post_port()
        self.vcpus = [self._create_vcpu(0)]

    def _closing(self, resource):  # type: ignore[no-untyped-def]
        self._closers.append(resource.close)
        return resource

    def _attach_serial(self) -> None:
        transmit = self.fast.add(FastKind.SERIAL_TX, Space.PIO, COM1_BASE, 1, fds=self.serial_output.fds)

        def follow_fast_path(ok: bool) -> None:
            transmit.enabled = ok

        self.serial = Uart16550(self.serial_output.write, on_fast_transmit_change=follow_fast_path)
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

    def _create_vcpu(self, vcpu_id: int) -> Vcpu:
        vcpu = self._closing(self.vm.create_vcpu(vcpu_id))
        vcpu.set_cpuid2(vcpu_cpuid(self.kvm.supported_cpuid(), vcpu_id))
        accepted = vcpu.set_msrs(BOOT_MSRS)
        if accepted != len(BOOT_MSRS):
            msr = list(BOOT_MSRS)[accepted]
            raise PykvmError(f"KVM_SET_MSRS refused MSR {msr:#x}, which the boot state needs")
        if self.kvm.check_extension(lib.KVM_CAP_SYNC_REGS) & lib.KVM_SYNC_X86_REGS:
            vcpu.enable_sync_regs()
        vcpu.attach_fast_table(self.fast)
        return vcpu

    def close(self) -> None:
        """Release the vCPU, the VM, guest memory and /dev/kvm (idempotent)."""
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
        mode: str | CpuMode | None = None,
        load_addr: int | None = None,
        entry: int | None = None,
        user: bool = False,
    ) -> BootPlan:
        """Load a guest image (flat, ELF or multiboot) and set the vCPU to enter it.

        ``user`` enters long-mode code at CPL3 (with IOPL 3, so it may still do port I/O).
        """
        path = Path(path)
        request = LoadRequest(
            memory_map=self.memory_map,
            cmdline=cmdline,
            modules=tuple(Module(Path(m), read_image(Path(m)), str(m)) for m in modules),
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
        self._plan = plan
        return plan

    # --- running --------------------------------------------------------------------
    def run(self, timeout: float | None = None) -> RunResult:
        """Run the guest until it stops (or ``timeout`` seconds pass) and say how it ended."""
        if self._plan is None:
            raise PykvmError("nothing to run: load a guest image first")
        vcpu = self.vcpus[0]
        self._stop = None
        capture_start = self.serial_output.captured_size()
        watchdog = self._start_watchdog(vcpu, timeout)
        started = time.monotonic_ns()
        try:
            while True:
                vcpu.immediate_exit = False  # before checking _stop: see _expire()
                if self._stop is not None:
                    break
                exit = vcpu.run()
                handled = time.monotonic_ns()
                self._handle(vcpu, exit)
                self._python_ns += time.monotonic_ns() - handled
        finally:
            self._wall_ns += time.monotonic_ns() - started
            if watchdog is not None:
                watchdog.cancel()
                watchdog.join()
        return self._result(vcpu, self._stop, self.serial_output.captured(capture_start))

    def _start_watchdog(self, vcpu: Vcpu, timeout: float | None) -> threading.Timer | None:
        if timeout is None:
            return None
        if timeout <= 0:
            raise ConfigError(f"timeout must be positive, not {timeout}")
        timer = threading.Timer(timeout, self._expire, args=(vcpu, threading.get_ident(), timeout))
        timer.daemon = True
        timer.start()
        return timer

    def _expire(self, vcpu: Vcpu, thread: int, timeout: float) -> None:
        # Order matters: the stop request first, then immediate_exit, then the signal.
        # The run loop clears immediate_exit *before* it looks at _stop, so whichever
        # way the two threads interleave, the vCPU cannot re-enter the guest unnoticed.
        self._request_stop(ExitReason.TIMEOUT, f"still running after {timeout:g} s", with_registers=True)
        vcpu.immediate_exit = True
        signal.pthread_kill(thread, KICK_SIGNAL)

    def _request_stop(self, reason: ExitReason, diagnosis: str, value: int | None = None, *, with_registers: bool = False) -> None:
        if self._stop is None:
            self._stop = _Stop(reason, diagnosis, value, with_registers)

    def _handle(self, vcpu: Vcpu, exit: Exit) -> None:
        match exit:
            case IoExit():
                self._dispatch(self.pio, "pio", exit.port, exit.size, exit.count, exit.is_write, exit.data)
            case MmioExit():
                self._dispatch(self.mmio, "mmio", exit.addr, exit.size, 1, exit.is_write, exit.data)
            case DebugPortExit(value=value):
                self._request_stop(ExitReason.DEBUG_EXIT, f"debug exit {value:#x}", value)
            case Interrupted():
                pass  # a stop request (checked by the loop) or a stray signal
            case HltExit(interrupts_enabled=enabled):
                why = "with interrupts enabled, but nothing can interrupt it" if enabled else "with interrupts disabled"
                self._request_stop(ExitReason.HALTED, f"the guest halted {why}")
            case ShutdownExit():
                self._request_stop(ExitReason.SHUTDOWN, "triple fault: the guest shut down", with_registers=True)
            case InternalErrorExit():
                self._request_stop(ExitReason.INTERNAL_ERROR, _describe_internal_error(exit), with_registers=True)
            case FailEntryExit(reason=reason, cpu=cpu):
                diagnosis = f"KVM could not enter the guest: hardware entry failure reason {reason:#x} on host CPU {cpu}"
                self._request_stop(ExitReason.FAIL_ENTRY, diagnosis, with_registers=True)
            case SystemEventExit(type=kind):
                self._system_event(kind)
            case OtherExit(reason=reason, hardware_reason=hardware):
                name = _EXIT_NAMES.get(reason, str(reason))
                detail = f" (hardware reason {hardware:#x})" if hardware else ""
                self._request_stop(ExitReason.UNHANDLED, f"unhandled exit {name}{detail}", with_registers=True)

    def _dispatch(self, bus: Bus, space: str, addr: int, size: int, count: int, is_write: bool, data: memoryview) -> None:
        key = f"{space} {addr:#06x} {'write' if is_write else 'read'}"
        self._python_exits[key] = self._python_exits.get(key, 0) + 1
        for i in range(0, size * count, size):
            if is_write:
                bus.write(addr, size, int.from_bytes(data[i : i + size], "little"))
            else:
                data[i : i + size] = bus.read(addr, size).to_bytes(size, "little")

    def _system_event(self, kind: int) -> None:
        if kind == _SYSTEM_EVENT_SHUTDOWN:
            self._request_stop(ExitReason.POWEROFF, "the guest powered off")
        elif kind == _SYSTEM_EVENT_RESET:
            self._request_stop(ExitReason.RESET, "the guest reset the machine")
        else:
            self._request_stop(ExitReason.UNHANDLED, f"unhandled system event {kind}", with_registers=True)

    def _result(self, vcpu: Vcpu, stop: _Stop | None, serial: bytes | None) -> RunResult:
        assert stop is not None
        regs = sregs = None
        diagnosis = stop.diagnosis
        if stop.with_registers:
            regs, sregs = vcpu.exit_regs(), vcpu.get_sregs()
            diagnosis = f"{diagnosis} at rip {regs.rip:#x}\n{format_registers(regs, sregs)}"
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
                name = _EXIT_NAMES.get(reason, str(reason))
                by_reason[name] = by_reason.get(name, 0) + count
        by_address = dict(self._python_exits)
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
            python_handler_ns=self._python_ns,
        )


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


def _describe_internal_error(exit: InternalErrorExit) -> str:
    """KVM_EXIT_INTERNAL_ERROR in words; an emulation failure names the instruction bytes."""
    if exit.suberror != _EMULATION_SUBERROR:
        return f"KVM internal error (suberror {exit.suberror}, data {[hex(d) for d in exit.data]})"
    text = "emulation failure: KVM could not emulate the guest's instruction"
    if len(exit.data) >= 3 and exit.data[0] & _EMULATION_FLAG_INSN_BYTES:
        raw = (exit.data[1] | exit.data[2] << 64).to_bytes(16, "little")
        length = min(raw[0], 15)
        text += f" (bytes {raw[1 : 1 + length].hex(' ')})"
    return text
