"""Every loader, CPU mode, device and exit path, shown by running the real nasm guests.

What each guest prints and how it ends is listed in guests/README.md.
"""

from __future__ import annotations

import datetime
import re

import pytest

from conftest import guest
from pykvm.info import is_hardware_backend
from pykvm.result import ExitReason

pytestmark = pytest.mark.kvm


@pytest.mark.parametrize(
    "image, options, text",
    [
        ("hello_real.bin", {}, b"Hello from real mode\n"),
        ("hello_protected.bin", {"mode": "protected"}, b"Hello from protected mode\n"),
        ("hello_long.bin", {"mode": "long"}, b"Hello from long mode\n"),
        ("hello_protected.elf", {}, b"Hello from protected mode\n"),
        ("hello_long.elf", {}, b"Hello from long mode\n"),
        ("hello_long.bin", {"mode": "long", "user": True}, b"Hello from long mode\n"),
    ],
    ids=["real-flat", "protected-flat", "long-flat", "protected-elf32", "long-elf64", "long-flat-cpl3"],
)
def test_hello_in_every_mode_and_format(run_guest, image, options, text) -> None:
    result = run_guest(guest(image), **options)
    assert result.serial == text
    assert (result.reason, result.exit_value, result.status) == (ExitReason.DEBUG_EXIT, 0, 1)


def test_debug_exit_value_becomes_the_status(run_guest) -> None:
    result = run_guest(guest("exit_code.bin"))
    assert result.serial == b"exit 42\n"
    assert (result.exit_value, result.status) == (42, 85)


def test_multiboot_kernel_sees_cmdline_memory_map_modules_and_loader(run_guest, tmp_path) -> None:
    first, second = tmp_path / "first.txt", tmp_path / "second.bin"
    first.write_bytes(b"first module")
    second.write_bytes(bytes(5000))
    result = run_guest(guest("multiboot.elf"), memory="128M", cmdline="console=ttyS0 hello", modules=[first, second])
    lines = result.serial.decode().splitlines()
    assert lines[0] == "multiboot: magic ok"
    assert f"cmdline: {guest('multiboot.elf')} console=ttyS0 hello" in lines  # argv[0] is the image
    assert "mem_lower: 639 KiB" in lines and f"mem_upper: {128 * 1024 - 1024} KiB" in lines
    assert "mmap 0000000000100000 0000000007f00000 1" in lines
    assert "modules: 2" in lines
    assert f"module 0: {first} 12 bytes" in lines and f"module 1: {second} 5000 bytes" in lines
    assert lines[-1] == "loader: pykvm"
    assert result.status == 1


def test_multiboot_aout_kludge_image(run_guest) -> None:
    result = run_guest(guest("multiboot_kludge.bin"), cmdline="kludge")
    assert f"multiboot: magic ok\ncmdline: {guest('multiboot_kludge.bin')} kludge\n".encode() in result.serial
    assert result.exit_value == 0


def test_cpl3_loop_returns_to_cpl0_through_int3(run_guest) -> None:
    result = run_guest(guest("cpl3.bin"), mode="long")
    expected = sum(range(1, 100_000_001))
    match = re.fullmatch(rb"cpl3 sum=(\d+) cs=([0-9a-f]{4})\n", result.serial)
    assert match, result.serial
    assert int(match.group(1)) == expected and int(match.group(2), 16) & 3 == 3
    assert result.exit_value == 0


def test_uart_echoes_what_the_host_sends(machine_factory) -> None:
    machine = machine_factory()
    machine.load(guest("uart_echo.bin"))
    machine.serial.receive(b"hello, pykvm\x04")
    result = machine.run(timeout=30)
    assert result.serial == b"echo ready\nhello, pykvm\necho done 12\n"
    assert result.exit_value == 12


def test_cmos_rtc_gives_the_host_time_port_0x80_is_ignored_and_i8042_resets(machine_factory) -> None:
    machine = machine_factory()
    machine.load(guest("devices.bin"))
    result = machine.run(timeout=30)
    lines = result.serial.decode().splitlines()
    guest_time = datetime.datetime.strptime(lines[0], "rtc: %Y-%m-%d %H:%M:%S").replace(tzinfo=datetime.timezone.utc)
    assert abs((datetime.datetime.now(datetime.timezone.utc) - guest_time).total_seconds()) < 120
    assert lines[1:] == ["unclaimed: ffff", "resetting"]
    assert (result.reason, result.status) == (ExitReason.RESET, 0)
    assert machine.pio.unclaimed[(0x3E0, "read")] == 1
    assert result.stats.exits_by_address["pio 0x0080 write (POST) in C"] == 1


def test_hlt_with_interrupts_disabled_ends_cleanly(run_guest) -> None:
    result = run_guest(guest("halt.bin"))
    assert result.serial == b"halting\n"
    assert (result.reason, result.status) == (ExitReason.HALTED, 0)
    assert "interrupts disabled" in result.diagnosis


def test_triple_fault_is_diagnosed_with_registers(run_guest) -> None:
    result = run_guest(guest("triple_fault.bin"), mode="long")
    assert result.serial == b"faulting\n"
    assert (result.reason, result.status) == (ExitReason.TRIPLE_FAULT, 114)
    assert "triple fault" in result.diagnosis and "rip=" in result.diagnosis
    assert result.regs is not None and result.sregs is not None and result.sregs.cs.l == 1


def test_fetching_from_unbacked_memory_is_an_emulation_failure(run_guest) -> None:
    result = run_guest(guest("unbacked_jump.bin"), mode="long")
    assert result.serial == b"jumping\n"
    assert (result.reason, result.status) == (ExitReason.INTERNAL_ERROR, 116)
    assert result.regs.rip == 0xD0000000 and "at rip 0xd0000000" in result.diagnosis


def test_an_instruction_the_host_cannot_emulate(run_guest) -> None:
    result = run_guest(guest("bad_insn.bin"), mode="long")
    if is_hardware_backend():  # VT-x/AMD-V run popcnt natively
        assert result.serial == b"popcnt next\npopcnt ok\n" and result.exit_value == 0x10
    else:
        assert result.serial == b"popcnt next\n"
        assert (result.reason, result.status) == (ExitReason.INTERNAL_ERROR, 116)
        assert "bytes f3 48 0f b8" in result.diagnosis  # popcnt rax, rbx


def test_fast_path_and_python_path_print_the_same_bytes(machine_factory) -> None:
    outputs = []
    for fast in (True, False):
        machine = machine_factory()
        machine.load(guest("hello_long.elf"))
        for handler in machine.devices.fast.handlers:
            handler.enabled = handler.enabled and fast
        result = machine.run(timeout=30)
        outputs.append((result.serial, result.status))
        python_writes = result.stats.exits_by_address.get("pio 0x03f8 write (COM1 THR/RBR)", 0)
        assert (python_writes == 0) == fast
    assert outputs[0] == outputs[1] == (b"Hello from long mode\n", 1)


def test_line_status_reads_answered_in_c_and_in_python_give_the_same_echo(machine_factory) -> None:
    """uart_echo polls LSR for data, then for room to transmit: C answers those reads while the
    UART model says reading LSR changes nothing; with every exit sent to Python the model does."""
    runs = []
    for fast in (True, False):
        machine = machine_factory()
        machine.load(guest("uart_echo.bin"))
        if not fast:
            machine.vcpus[0].send_exits_to_python_from(1)
        machine.serial.receive(b"hello\x00\xff, pykvm\x04")
        result = machine.run(timeout=60)
        lsr_in_c = result.stats.exits_by_address.get("pio 0x03fd read (COM1 LSR) in C", 0)
        lsr_in_python = result.stats.exits_by_address.get("pio 0x03fd read (COM1 LSR)", 0)
        assert (lsr_in_c > 0, lsr_in_python > 0) == (fast, not fast)
        runs.append((result.serial, result.exit_value))
    assert runs[0] == runs[1] == (b"echo ready\nhello\x00\xff, pykvm\necho done 14\n", 14)


def test_stats_count_exits_by_reason_and_port(run_guest) -> None:
    result = run_guest(guest("hello_real.bin"))
    stats = result.stats
    assert stats.exits_by_reason["io"] == sum(stats.exits_by_address.values())
    assert stats.exits_by_address["pio 0x03f8 write (COM1 THR/RBR) in C"] == len(b"Hello from real mode\n")
    assert stats.exits_by_address["pio 0x00f4 write (debug exit) in C"] == 1
    assert 0 < stats.guest_ns <= stats.wall_ns
    assert "exits:" in stats.format() and "pio 0x03fd read" in stats.format()
