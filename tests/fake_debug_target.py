"""A scripted machine for the gdb server's tests: a :class:`~pykvm.gdbstub.DebugTarget` without KVM.

Its vCPUs execute a handful of real x86 instructions (enough for loops, counters, loads,
stores and an end) from a mapped window of guest memory, on a thread of their own as a
machine's vCPUs would run, and stop as the contract says: at breakpoints before the
instruction, at watchpoints after the access, after a step, on an interrupt, all of
them at once.

    90          nop
    48 ff c0    inc rax
    eb XX       jmp short XX
    88 03       mov [rbx], al
    8a 03       mov al, [rbx]
    f4          hlt: the guest ends, its status is al
    anything else kills the guest
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence

from pykvm.gdbstub import (
    REGISTER_NAMES,
    Action,
    BreakpointKind,
    CpuMode,
    Exited,
    Killed,
    Stop,
    StopEvent,
    StopReason,
    UnmappedAddressError,
    UnsupportedError,
)

CODE = 0x400000  # where the mapped window starts and vCPU 0 starts
MAPPED = 0x10000  # its size
DATA = CODE + 0x8000  # where tests keep data

NOP = b"\x90"
INC_RAX = b"\x48\xff\xc0"
STORE_AL = b"\x88\x03"  # mov [rbx], al
LOAD_AL = b"\x8a\x03"  # mov al, [rbx]
HLT = b"\xf4"


def jmp(offset: int) -> bytes:
    """``jmp short`` by ``offset`` from the next instruction (-2: to itself)."""
    return b"\xeb" + (offset & 0xFF).to_bytes(1, "little")


_WATCH_REASONS = {
    BreakpointKind.WRITE_WATCHPOINT: StopReason.WRITE_WATCHPOINT,
    BreakpointKind.READ_WATCHPOINT: StopReason.READ_WATCHPOINT,
    BreakpointKind.ACCESS_WATCHPOINT: StopReason.ACCESS_WATCHPOINT,
}


class FakeTarget:
    """vCPUs running ``program`` at :data:`CODE` (vCPU n starts at ``starts[n]``), stopped at first."""

    def __init__(self, program: bytes, vcpus: int = 1, mode: CpuMode = CpuMode.LONG,
                 starts: Sequence[int] | None = None, unsupported: Sequence[BreakpointKind] = ()) -> None:  # fmt: skip
        self.memory = bytearray(MAPPED)
        self.memory[: len(program)] = program
        self.mode = mode
        self.unsupported = set(unsupported)
        self.regs = [self._initial_registers(start) for start in (starts or [CODE] * vcpus)]
        self.breakpoints: set[tuple[BreakpointKind, int, int]] = set()
        self.resumes: list[dict[int, Action]] = []  # every resume() asked for, for the tests
        self.detached = False
        self._cond = threading.Condition()
        self._event: StopEvent | None = Stop(0, StopReason.INTERRUPTED)  # held before the first instruction
        self._actions: dict[int, Action] = {}
        self._interrupt = False
        self._closed = False
        self._cpu = threading.Thread(target=self._run, name="fake-vcpus", daemon=True)
        self._cpu.start()

    def _initial_registers(self, start: int) -> dict[str, int]:
        regs = {name: 0 for name in REGISTER_NAMES}
        regs.update(rip=start, rflags=0x202, cs=0x10, ss=0x18, ds=0x18, es=0x18, rsp=CODE + MAPPED - 0x100,
                    cr0=0x80000011, cr3=0x1000, cr4=0x20, efer=0x500, fctrl=0x37F, mxcsr=0x1F80)  # fmt: skip
        if self.mode is not CpuMode.LONG:
            regs.update(cr0=0x11, cr4=0, efer=0)
        return regs

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._cpu.join()

    # --- DebugTarget ---------------------------------------------------------------------
    def vcpu_ids(self) -> Sequence[int]:
        return range(len(self.regs))

    def cpu_mode(self, vcpu: int) -> CpuMode:
        return self.mode

    def read_registers(self, vcpu: int) -> Mapping[str, int]:
        self._check_stopped()
        return dict(self.regs[vcpu])

    def write_registers(self, vcpu: int, values: Mapping[str, int]) -> None:
        self._check_stopped()
        if "cs" in values and values["cs"] != self.regs[vcpu]["cs"]:
            raise UnsupportedError("this machine cannot load a code segment")
        self.regs[vcpu].update(values)

    def read_memory(self, vcpu: int, address: int, length: int) -> bytes:
        self._check_stopped()
        offset = self._offset(address, length)
        return bytes(self.memory[offset : offset + length])

    def write_memory(self, vcpu: int, address: int, data: bytes) -> None:
        self._check_stopped()
        offset = self._offset(address, len(data))
        self.memory[offset : offset + len(data)] = data

    def insert_breakpoint(self, kind: BreakpointKind, address: int, length: int) -> None:
        self._check_stopped()
        if kind in self.unsupported:
            raise UnsupportedError(f"no {kind.name.lower()} here")
        if kind is BreakpointKind.SOFTWARE:
            self._offset(address, 1)
        self.breakpoints.add((kind, address, length))

    def remove_breakpoint(self, kind: BreakpointKind, address: int, length: int) -> None:
        self._check_stopped()
        self.breakpoints.discard((kind, address, length))

    def resume(self, actions: Mapping[int, Action]) -> None:
        with self._cond:
            if isinstance(self._event, (Exited, Killed)):
                return
            self.resumes.append(dict(actions))
            self._actions = dict(actions)
            self._event = None
            self._interrupt = False
            self._cond.notify_all()

    def wait_stop(self, timeout: float) -> StopEvent | None:
        with self._cond:
            self._cond.wait_for(lambda: self._event is not None, timeout)
            return self._event

    def interrupt(self) -> None:
        with self._cond:
            if self._event is None:
                self._interrupt = True
                self._cond.notify_all()

    def detach(self) -> None:
        self.detached = True
        self.breakpoints.clear()
        self.resume({vcpu: Action.CONTINUE for vcpu in self.vcpu_ids()})

    def kill(self) -> None:
        with self._cond:
            self._event = Killed()
            self._cond.notify_all()

    # --- the fake CPU --------------------------------------------------------------------
    @property
    def running(self) -> bool:
        with self._cond:
            return self._event is None

    def _check_stopped(self) -> None:
        assert self._event is not None, "the server touched the target while it ran"

    def _offset(self, address: int, length: int) -> int:
        if address < CODE:
            raise UnmappedAddressError(address)
        if address + length > CODE + MAPPED:
            raise UnmappedAddressError(max(address, CODE + MAPPED))
        return address - CODE

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._event is None or self._closed)
                if self._closed:
                    return
                if self._interrupt:
                    self._event = Stop(min(self._actions), StopReason.INTERRUPTED)
                else:
                    for vcpu, action in self._actions.items():
                        event = self._execute(vcpu, action)
                        if event is not None:
                            self._event = event
                            break
                self._cond.notify_all()
            time.sleep(0.0001)  # a spinning guest must not take a whole host CPU from the tests

    def _execute(self, vcpu: int, action: Action) -> StopEvent | None:
        regs = self.regs[vcpu]
        rip = regs["rip"]
        for kind, address, _ in self.breakpoints:
            if address == rip and kind is BreakpointKind.SOFTWARE:
                return Stop(vcpu, StopReason.SOFTWARE_BREAKPOINT)
            if address == rip and kind is BreakpointKind.HARDWARE:
                return Stop(vcpu, StopReason.HARDWARE_BREAKPOINT)
        try:
            code = self.memory[self._offset(rip, 1) : self._offset(rip, 1) + 3]
        except UnmappedAddressError:
            return Killed()
        event = self._instruction(vcpu, regs, bytes(code))
        if event is None and action is Action.STEP:
            return Stop(vcpu, StopReason.STEP)
        return event

    def _instruction(self, vcpu: int, regs: dict[str, int], code: bytes) -> StopEvent | None:
        if code.startswith(NOP):
            regs["rip"] += 1
        elif code.startswith(INC_RAX):
            regs["rax"] = (regs["rax"] + 1) & (1 << 64) - 1
            regs["rip"] += 3
        elif code.startswith(b"\xeb") and len(code) >= 2:
            regs["rip"] += 2 + int.from_bytes(code[1:2], "little", signed=True)
        elif code.startswith(STORE_AL):
            regs["rip"] += 2
            return self._access(vcpu, regs["rbx"], write=True, value=regs["rax"] & 0xFF)
        elif code.startswith(LOAD_AL):
            regs["rip"] += 2
            return self._access(vcpu, regs["rbx"], write=False)
        elif code.startswith(HLT):
            regs["rip"] += 1
            return Exited(regs["rax"] & 0xFF)
        else:
            return Killed()
        return None

    def _access(self, vcpu: int, address: int, write: bool, value: int = 0) -> StopEvent | None:
        try:
            offset = self._offset(address, 1)
        except UnmappedAddressError:
            return Killed()
        if write:
            self.memory[offset] = value
        else:
            self.regs[vcpu]["rax"] = self.regs[vcpu]["rax"] & ~0xFF | self.memory[offset]
        for kind, start, length in self.breakpoints:
            if kind in _WATCH_REASONS and start <= address < start + length:
                wanted = {BreakpointKind.WRITE_WATCHPOINT: write, BreakpointKind.READ_WATCHPOINT: not write}
                if wanted.get(kind, True):
                    return Stop(vcpu, _WATCH_REASONS[kind], address)
        return None
