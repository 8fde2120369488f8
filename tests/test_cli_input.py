"""``pykvm run`` given what a careless user types: a clear error at once, or what QEMU does with it.

Every case runs the command in a subprocess, as a user would.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from command import assert_one_line_error, pykvm
from conftest import guest

pytestmark = pytest.mark.kvm

# Address space for `pykvm run` children here: reading an endless file until MemoryError would
# hit it (and fail the test) instead of taking the host's memory.
ADDRESS_SPACE_LIMIT = 4 << 30


def limited_pykvm(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, ADDRESS_SPACE_LIMIT))

    return subprocess.run([sys.executable, "-m", "pykvm", *args], capture_output=True, timeout=timeout, preexec_fn=limit)


# --- images that are not files, or cannot fit ----------------------------------------------------
def test_dev_zero_as_the_image_is_refused_without_reading_it() -> None:
    assert_one_line_error(limited_pykvm("run", "/dev/zero", "--format", "flat"), "/dev/zero", "character device")


def test_dev_zero_as_a_module_is_refused_without_reading_it() -> None:
    process = limited_pykvm("run", str(guest("multiboot.elf")), "--module", "/dev/zero")
    assert_one_line_error(process, "/dev/zero", "character device")


@pytest.mark.parametrize("option", ["image", "--initrd", "--module"])
def test_a_fifo_is_refused_instead_of_waiting_for_a_writer(tmp_path: Path, option: str) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    args = ["run", str(fifo), "--format", "flat"] if option == "image" else ["run", str(guest("multiboot.elf")), option, str(fifo)]
    assert_one_line_error(pykvm(*args), str(fifo), "is a FIFO, not a guest image file")


def test_a_directory_is_refused(tmp_path: Path) -> None:
    assert_one_line_error(pykvm("run", str(tmp_path), "--format", "flat"), str(tmp_path), "is a directory")


def test_an_image_larger_than_ram_is_refused_before_it_is_read(tmp_path: Path) -> None:
    sparse = tmp_path / "sparse.img"
    with open(sparse, "wb") as file:
        file.truncate(4 << 30)  # 4 GiB that take no disk; reading them would take 4 GiB of RAM
    process = limited_pykvm("run", str(sparse), "-m", "64M")
    assert_one_line_error(process, str(sparse), "4096.0 MiB", "does not fit in guest RAM (64.0 MiB", "-m")


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0", "-1", "soon"])
def test_a_timeout_must_be_a_finite_positive_number(value: str) -> None:
    process = pykvm("run", str(guest("hello_real.bin")), "--timeout", value)
    assert process.returncode == 2 and b"Invalid value for '--timeout'" in process.stderr and b"Traceback" not in process.stderr


def test_ctl_balloon_wait_must_be_finite() -> None:
    process = pykvm("ctl", "/nonexistent.sock", "balloon", "1M", "--wait", "nan")
    assert process.returncode == 2 and b"Invalid value for '--wait'" in process.stderr


# --- the command line is bytes ------------------------------------------------------------------
def test_a_non_utf8_cmdline_reaches_the_guest_byte_for_byte() -> None:
    cmdline = b"caf\xe9 \xff end"  # Latin-1, and a byte no encoding gives meaning to
    image = str(guest("multiboot.elf"))
    process = pykvm("run", image, "--cmdline", os.fsdecode(cmdline))
    assert b"Traceback" not in process.stderr and b"internal error" not in process.stderr, process.stderr
    assert b"cmdline: " + os.fsencode(image) + b" " + cmdline + b"\n" in process.stdout  # argv[0] is the image


def test_a_non_utf8_path_in_an_error_is_one_line(tmp_path: Path) -> None:
    missing = os.fsdecode(os.fsencode(str(tmp_path)) + b"/\xff\xfe.bin")
    assert_one_line_error(pykvm("run", missing), "no such file")


# --- QEMU habits ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, hint",
    [
        (["-kernel", "bzImage"], "-kernel is a QEMU option; the kernel is the argument: pykvm run KERNEL"),
        (["GUEST", "-append", "console=ttyS0"], "-append is a QEMU option; pykvm's is --cmdline"),
        (["GUEST", "-smp", "2"], "-smp is a QEMU option; pykvm's is -c/--cpus"),
        (["GUEST", "-serial", "stdio"], "-serial is a QEMU option; pykvm's is --serial"),
        (["GUEST", "-initrd", "rootfs.cpio"], "-initrd is a QEMU option; pykvm's is --initrd"),
        (["GUEST", "-nographic"], "-nographic is a QEMU option; pykvm needs none"),
        (["GUEST", "-enable-kvm"], "-enable-kvm is a QEMU option; pykvm always uses KVM"),
        (["GUEST", "-cpu", "host"], "-cpu is a QEMU option; pykvm gives the guest the host's CPU model"),
        (["GUEST", "-machine", "pc"], "-machine is a QEMU option; pykvm has one machine type"),
        (["GUEST", "-machine"], "-machine is a QEMU option; pykvm has one machine type"),
        (["GUEST", "-chardev", "stdio,id=s0"], "-chardev is a QEMU option; pykvm's serial port is --serial"),
        (["GUEST", "-s", "-S"], "-s is a QEMU option; pykvm's is --gdb tcp::1234"),
    ],
)
def test_qemu_options_get_a_hint_naming_the_pykvm_option(args: list[str], hint: str) -> None:
    process = pykvm("run", *[str(guest("hello_real.bin")) if a == "GUEST" else a for a in args])
    stderr = process.stderr.decode()
    assert process.returncode == 2 and f"Error: {hint}" in stderr and "pykvm-qemu" in stderr, stderr
    assert "No such option" not in stderr


def test_a_value_spelt_like_a_qemu_option_goes_with_an_equals_sign() -> None:
    process = pykvm("run", str(guest("hello_real.bin")), "--cmdline=-kernel", "--timeout", "10")
    assert process.returncode == 1 and b"QEMU option" not in process.stderr, process.stderr


def test_an_unknown_option_that_is_not_qemus_keeps_clicks_message() -> None:
    process = pykvm("run", str(guest("hello_real.bin")), "--frobnicate")
    assert process.returncode == 2 and b"No such option '--frobnicate'" in process.stderr


@pytest.mark.parametrize("memory, mem_upper", [("1.5G", 1536 * 1024 - 1024), ("size=64M", 63 * 1024), ("65536k", 63 * 1024)])
def test_memory_sizes_as_qemu_takes_them(memory: str, mem_upper: int) -> None:
    process = pykvm("run", str(guest("multiboot.elf")), "-m", memory)
    assert f"mem_upper: {mem_upper} KiB".encode() in process.stdout, process.stderr


def test_qemu_memory_keys_pykvm_does_not_have() -> None:
    process = pykvm("run", str(guest("hello_real.bin")), "-m", "1G,slots=2,maxmem=4G")
    assert_one_line_error(process, "only size= is understood")


@pytest.mark.parametrize("serial", ["null", "none"])
def test_serial_null_discards_the_output_and_creates_no_file(tmp_path: Path, serial: str) -> None:
    process = subprocess.run([sys.executable, "-m", "pykvm", "run", str(guest("hello_protected.elf")), "--serial", serial],
                             capture_output=True, timeout=120, cwd=tmp_path)  # fmt: skip
    assert process.returncode == 1 and process.stdout == b"" and process.stderr == b""
    assert list(tmp_path.iterdir()) == []


def test_serial_file_prefix_and_plain_path(tmp_path: Path) -> None:
    for target, written in (("file:null", tmp_path / "null"), (str(tmp_path / "out.log"), tmp_path / "out.log")):
        process = subprocess.run([sys.executable, "-m", "pykvm", "run", str(guest("hello_protected.elf")), "--serial", target],
                                 capture_output=True, timeout=120, cwd=tmp_path)  # fmt: skip
        assert process.returncode == 1 and written.read_bytes() == b"Hello from protected mode\n"


def test_serial_backends_pykvm_does_not_offer_are_one_line_errors() -> None:
    assert_one_line_error(pykvm("run", str(guest("hello_real.bin")), "--serial", "pty"), "'pty' is not one pykvm offers")


def test_a_serial_fifo_nobody_reads_is_an_error_not_a_hang(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert_one_line_error(pykvm("run", str(guest("hello_real.bin")), "--serial", str(fifo)), "a FIFO nobody reads")
