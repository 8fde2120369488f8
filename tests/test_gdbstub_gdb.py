"""A real gdb (``gdb -batch``) debugging the fake target through the gdb server.

These show that the protocol is the one gdb speaks: connecting and reading the target
description, registers, memory, breakpoints, watchpoints, steps, threads, Ctrl-C,
detach and kill, in x86-64 and i386 layouts, over TCP and a UNIX socket.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fake_debug_target import CODE, DATA, HLT, INC_RAX, NOP, STORE_AL, FakeTarget, jmp
from gdb_batch import interrupt_gdb, needs_gdb, run_gdb

from pykvm.gdbstub import Action, BreakpointKind, CpuMode, GdbServer, Killed, UnsupportedError

pytestmark = needs_gdb

LOOP = NOP + INC_RAX + jmp(-6)  # 0x400000: nop; 0x400001: inc rax; 0x400004: jmp 0x400000


@pytest.fixture
def debug() -> Iterator:  # type: ignore[type-arg]
    """``debug(program, ...)``: a fake target held behind a gdb server."""
    made: list[tuple[FakeTarget, GdbServer]] = []

    def start(program: bytes = LOOP, address: str = "tcp::0", **options) -> tuple[FakeTarget, GdbServer]:  # type: ignore[no-untyped-def]
        target = FakeTarget(program, **options)
        made.append((target, GdbServer(target, address, hold=True)))
        return made[-1]

    yield start
    for target, server in made:
        server.close()
        target.close()


def test_gdb_connects_and_reads_the_registers_of_a_long_mode_guest(debug) -> None:  # type: ignore[no-untyped-def]
    target, server = debug()
    target.regs[0].update(rax=0x1122334455667788, cr3=0x9000, fs_base=0x7FFF0000)
    output = run_gdb(server.gdb_address, "show architecture", "info registers rip", "p/x $rax", "p/x $cr3", "p/x $fs_base",
                     "p $eflags", "p $xmm1.uint128")  # fmt: skip
    assert '(currently "i386:x86-64")' in output
    assert "rip            0x400000            0x400000" in output
    assert "$1 = 0x1122334455667788" in output and "$2 = 0x9000" in output and "$3 = 0x7fff0000" in output
    assert "$4 = [ IF ]" in output and "$5 = 0" in output


def test_gdb_reads_and_writes_memory(debug) -> None:  # type: ignore[no-untyped-def]
    target, server = debug()
    output = run_gdb(server.gdb_address, "x/4xb 0x400000", f"set {{int}}{DATA:#x} = 0x11223344", f"x/4xb {DATA:#x}",
                     "x/2xb 0x10")  # fmt: skip
    assert "0x400000:\t0x90\t0x48\t0xff\t0xc0" in output
    assert f"{DATA:#x}:\t0x44\t0x33\t0x22\t0x11" in output
    assert "Cannot access memory at address 0x10" in output
    assert target.memory[DATA - CODE : DATA - CODE + 4] == bytes.fromhex("44332211")


def test_gdb_continues_to_a_breakpoint_and_steps(debug) -> None:  # type: ignore[no-untyped-def]
    target, server = debug()
    output = run_gdb(server.gdb_address, "break *0x400004", "continue", "info registers rax", "stepi", "info registers rip",
                     "stepi", "stepi", "info registers rax")  # fmt: skip
    assert "Breakpoint 1 at 0x400004" in output
    assert "Breakpoint 1, 0x0000000000400004 in ?? ()" in output
    assert "rax            0x1                 1" in output
    assert "rip            0x400000            0x400000" in output
    assert "rax            0x2                 2" in output
    assert target.detached and target.breakpoints == set()  # gdb -batch detaches at the end


def test_gdb_sees_every_vcpu_as_a_thread(debug) -> None:  # type: ignore[no-untyped-def]
    target, server = debug(vcpus=2, starts=[CODE, CODE + 1])
    output = run_gdb(server.gdb_address, "info threads", "thread 2", "info registers rip", "set $rdx = 7",
                     "set scheduler-locking step", "stepi", "info registers rip")  # fmt: skip
    assert "Thread 1 (vCPU 0, long mode)" in output and "Thread 2 (vCPU 1, long mode)" in output
    assert "[Switching to thread 2 (Thread 2)]" in output
    assert "rip            0x400001            0x400001" in output
    assert "rip            0x400004            0x400004" in output
    assert target.regs[1]["rdx"] == 7 and target.regs[0]["rdx"] == 0
    assert target.resumes[0] == {1: Action.STEP}  # vCont;s:2: the other thread stays stopped


def test_gdb_stops_on_a_watchpoint(debug) -> None:  # type: ignore[no-untyped-def]
    target, server = debug(NOP + STORE_AL + jmp(-5))
    target.regs[0].update(rbx=DATA, rax=5)
    output = run_gdb(server.gdb_address, f"watch *(char *){DATA:#x}", "continue", "info registers rip")
    assert f"Hardware watchpoint 1: *(char *){DATA:#x}" in output
    assert "Old value = 0 '\\000'\nNew value = 5 '\\005'" in output
    assert "rip            0x400003            0x400003" in output
    assert (BreakpointKind.WRITE_WATCHPOINT, DATA, 1) not in target.breakpoints


def test_gdb_shows_why_the_target_refused_to_resume(debug) -> None:  # type: ignore[no-untyped-def]
    target, server = debug()

    def refuse(actions: object) -> None:
        raise UnsupportedError("cannot step vCPU 0: single steps do not stop the guest here")

    target.resume = refuse
    output = run_gdb(server.gdb_address, "stepi", "info registers rip")
    assert "cannot step vCPU 0: single steps do not stop the guest here\n" in output
    assert "rip            0x400000            0x400000" in output  # nothing ran


def test_gdb_interrupts_a_running_guest_with_ctrl_c(debug) -> None:  # type: ignore[no-untyped-def]
    target, server = debug(jmp(-2))
    output = interrupt_gdb(server.gdb_address, lambda: target.running, "info registers rip")
    assert "received signal SIGINT, Interrupt." in output
    assert "rip            0x400000            0x400000" in output


def test_gdb_debugs_a_protected_mode_guest_as_i386(debug) -> None:  # type: ignore[no-untyped-def]
    target, server = debug(NOP + INC_RAX + HLT, mode=CpuMode.PROTECTED)  # detached, it ends at hlt
    target.regs[0]["rax"] = 0xFFFFFFFF_00000041
    output = run_gdb(server.gdb_address, "show architecture", "info registers eip eax", "stepi", "stepi", "info registers eax",
                     "set $eax = 0x99")  # fmt: skip
    assert '(currently "i386")' in output
    assert "eip            0x400000            0x400000" in output
    assert "eax            0x41                65" in output
    assert "eax            0x42                66" in output
    assert target.regs[0]["rax"] == 0xFFFFFFFF_00000099


def test_gdb_debugs_a_real_mode_guest_with_the_i386_registers(debug) -> None:  # type: ignore[no-untyped-def]
    _, server = debug(NOP + jmp(-3), mode=CpuMode.REAL)
    output = run_gdb(server.gdb_address, "show architecture", "info registers eip", "set architecture i8086", "x/2i $pc")
    assert '(currently "i386")' in output and "eip            0x400000            0x400000" in output
    assert "=> 0x400000:\tnop" in output and "0x400001:\tjmp    0x400000" in output


def test_gdb_over_a_unix_socket(debug, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _, server = debug(address=f"unix:{tmp_path / 'gdb.sock'}")
    assert "rip            0x400000            0x400000" in run_gdb(server.gdb_address, "info registers rip")


def test_gdb_detaches_and_the_guest_runs_on(debug) -> None:  # type: ignore[no-untyped-def]
    target, server = debug()
    output = run_gdb(server.gdb_address, "break *0x400004", "detach")
    assert "[Inferior 1 (Remote target) detached]" in output
    assert target.detached and target.breakpoints == set() and target.running


def test_gdb_kills_the_guest(debug) -> None:  # type: ignore[no-untyped-def]
    target, server = debug()
    output = run_gdb(server.gdb_address, "kill")
    assert "[Inferior 1 (Remote target) killed]" in output
    assert isinstance(target.wait_stop(0), Killed)
