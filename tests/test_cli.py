"""The pykvm command: guest output and status, --stats, info, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from command import assert_one_line_error, pykvm
from conftest import guest
from pykvm.info import GUESTS, UNKNOWN_GUESTS, kvm_backend

pytestmark = pytest.mark.kvm


def test_run_prints_the_guest_serial_output_and_exits_with_its_status() -> None:
    process = pykvm("run", str(guest("hello_real.bin")), "--mode", "real")
    assert process.stdout == b"Hello from real mode\n"
    assert process.returncode == 1 and process.stderr == b""


def test_a_flat_binary_without_a_mode_gets_one_note_saying_where_it_starts() -> None:
    image = guest("hello_real.bin")
    process = pykvm("run", str(image))
    assert process.stdout == b"Hello from real mode\n" and process.returncode == 1
    assert process.stderr.decode() == (
        f"pykvm: note: {image} is a flat binary: it starts in real mode at 0x7c00 "
        "(--mode, --load-addr and --entry change that)\n"
    )


def test_a_run_without_output_says_what_pykvm_assumed() -> None:
    # Long-mode code run as a boot sector: it prints nothing (the newcomer's first surprise).
    process = pykvm("run", str(guest("hello_long.bin")), "--timeout", "30")
    notes = process.stderr.decode().splitlines()
    assert process.stdout == b"" and notes[0].startswith("pykvm: note: ") and "real mode at 0x7c00" in notes[0]
    assert notes[-1] == (
        "pykvm: note: the guest wrote nothing to the serial port; "
        "it was loaded as a flat binary and started in real mode at 0x7c00"
    )
    explicit = pykvm("run", str(guest("hello_long.bin")), "--mode", "long")
    assert explicit.stdout == b"Hello from long mode\n" and explicit.stderr == b""


def test_no_note_when_the_output_is_discarded_on_purpose() -> None:
    process = pykvm("run", str(guest("hello_protected.elf")), "--serial", "null")
    assert process.stdout == b"" and process.stderr == b"" and process.returncode == 1


def test_run_exit_status_of_debug_exit_value_42() -> None:
    assert pykvm("run", str(guest("exit_code.bin"))).returncode == 85


def test_run_multiboot_with_cmdline_and_module(tmp_path: Path) -> None:
    module = tmp_path / "initrd.img"
    module.write_bytes(b"x" * 100)
    process = pykvm("run", str(guest("multiboot.elf")), "-m", "32M", "--cmdline", "a b c", "--module", str(module))
    out = process.stdout.decode()
    assert f"cmdline: {guest('multiboot.elf')} a b c\n" in out and f"mem_upper: {31 * 1024} KiB" in out and f"module 0: {module} 100 bytes" in out


def test_run_flat_options_mode_load_address_and_entry(tmp_path: Path) -> None:
    copy = tmp_path / "hello.raw"
    shutil.copy(guest("hello_long.bin"), copy)
    process = pykvm("run", str(copy), "--format", "flat", "--mode", "long", "--load-addr", "0x100000", "--entry", "0x100000")
    assert process.stdout == b"Hello from long mode\n" and process.returncode == 1


def test_run_user_mode_enters_at_cpl3() -> None:
    process = pykvm("run", str(guest("hello_long.bin")), "--mode", "long", "--user-mode")
    assert process.stdout == b"Hello from long mode\n" and process.returncode == 1


def test_serial_to_a_file_and_to_nothing(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    process = pykvm("run", str(guest("hello_protected.elf")), "--serial", str(log))
    assert process.stdout == b"" and log.read_bytes() == b"Hello from protected mode\n"
    assert pykvm("run", str(guest("hello_protected.elf")), "--serial", "none").stdout == b""


def test_serial_input_comes_from_stdin() -> None:
    process = pykvm("run", str(guest("uart_echo.bin")), stdin=b"abc\x04")
    assert process.stdout == b"echo ready\nabc\necho done 3\n" and process.returncode == 7


def test_stats_show_exits_by_reason_and_port() -> None:
    process = pykvm("run", str(guest("hello_real.bin")), "--mode", "real", "--stats")
    stderr = process.stderr.decode()
    assert stderr.startswith("exits: ") and "in guest" in stderr and "in Python handlers" in stderr
    assert "pio 0x03f8 write (COM1 THR/RBR) in C" in stderr and "pio 0x03fd read" in stderr


def test_a_triple_fault_is_reported_with_registers_and_its_status() -> None:
    process = pykvm("run", str(guest("triple_fault.bin")), "--mode", "long")
    assert process.returncode == 114
    assert process.stderr.decode().startswith("pykvm: triple-fault: ") and b"rip=" in process.stderr


def test_timeout_stops_a_guest_that_never_exits(tmp_path: Path) -> None:
    spin = tmp_path / "spin.bin"
    spin.write_bytes(b"\xeb\xfe")  # jmp $
    process = pykvm("run", str(spin), "--timeout", "1")
    assert process.returncode == 124 and b"timeout" in process.stderr


def test_info_reports_api_backend_and_capabilities() -> None:
    process = pykvm("info", "--json")
    data = json.loads(process.stdout)
    assert data["api_version"] == 12 and data["backend"] in ("kvm_intel", "kvm_amd", "kvm_pvm")
    assert data["capabilities"]["user_memory"] == 1 and data["limits"]["max_vcpus"] >= 1
    text = pykvm("info").stdout.decode()
    assert "backend:" in text and data["backend"] in text


def test_info_says_what_guests_this_backend_can_run() -> None:
    backend = kvm_backend()
    lines = pykvm("info").stdout.decode().splitlines()
    assert f"guests:       {GUESTS.get(backend or '', UNKNOWN_GUESTS)}" in lines
    assert json.loads(pykvm("info", "--json").stdout)["guests"] == GUESTS.get(backend or "", UNKNOWN_GUESTS)
    assert "a full Linux boot is not possible" in GUESTS["kvm_pvm"]
    assert "full speed" in GUESTS["kvm_intel"] and "full speed" in GUESTS["kvm_amd"]


def test_missing_file() -> None:
    assert_one_line_error(pykvm("run", "/nonexistent/kernel.bin"), "/nonexistent/kernel.bin", "no such file")


def test_not_a_kernel(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("just some notes\n")
    assert_one_line_error(pykvm("run", str(text)), "cannot tell what kind of image", "--format flat")
    assert_one_line_error(pykvm("run", "/bin/true"), "dynamically linked program, not a kernel")


def test_truncated_elf(tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.elf"
    truncated.write_bytes(guest("hello_long.elf").read_bytes()[:100])
    assert_one_line_error(pykvm("run", str(truncated)), str(truncated), "ELF")


def test_empty_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.bin"
    empty.touch()
    assert_one_line_error(pykvm("run", str(empty)), "empty")


def test_more_memory_than_the_host_has() -> None:
    assert_one_line_error(pykvm("run", "-m", "100T", str(guest("hello_real.bin"))), "more than this host", "-m")


def test_unreadable_memory_size() -> None:
    assert_one_line_error(pykvm("run", "-m", "lots", str(guest("hello_real.bin"))), "64M")


def test_user_mode_needs_long_mode() -> None:
    assert_one_line_error(pykvm("run", "--user-mode", str(guest("hello_real.bin"))), "CPL3", "long-mode")


def test_no_kvm_device(tmp_path: Path) -> None:
    missing = str(tmp_path / "kvm")
    assert_one_line_error(pykvm("--device", missing, "run", str(guest("hello_real.bin"))), missing, "does not exist")
    assert_one_line_error(pykvm("info", env={"PYKVM_DEVICE": missing}), "does not exist")


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root (mknod) and setpriv (to drop capabilities)"
)
def test_no_permission_to_open_the_kvm_device(tmp_path: Path) -> None:
    device = tmp_path / "kvm"
    os.mknod(device, stat.S_IFCHR, os.stat("/dev/kvm").st_rdev)  # the real device, mode 000
    without_capabilities = ["setpriv", "--inh-caps=-all", "--bounding-set=-all"]
    process = pykvm("--device", str(device), "info", user_cmd=without_capabilities)
    assert_one_line_error(process, "permission denied", "group that owns it")
