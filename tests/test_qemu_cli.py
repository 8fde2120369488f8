"""pykvm-qemu: QEMU's command line translated to pykvm, its probes, its errors and its exit statuses.

The translation is checked option by option without KVM (:func:`pykvm.qemu_cli.parse`); the
console script itself runs as a harness runs it, through subprocess: the probes, one-line
errors, and guests booted with every accepted option.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import guest
from pykvm.config import DiskConfig
from pykvm.errors import ConfigError
from pykvm.qemu_cli import Invocation, Probe, _load_arguments, parse, qemu_status
from pykvm.result import ExitReason, RunResult, status_of
from tests.test_boot_linux import bzimage

SCRIPT = Path(sys.executable).parent / "pykvm-qemu"


def qemu(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    command = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "pykvm.qemu_cli"]
    return subprocess.run([*command, *args], input=stdin, capture_output=True, timeout=120, env=dict(os.environ))


def refused(*argv: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse(list(argv))
    return str(info.value)


def probe(*argv: str) -> str:
    with pytest.raises(Probe) as info:
        parse(list(argv))
    return info.value.text


# --- translation, option by option ----------------------------------------------------------------


def test_kernel_append_initrd() -> None:
    invocation = parse(["-kernel", "k.elf", "-append", "a b", "-initrd", "m1 x,m2"])
    assert (invocation.kernel, invocation.append, invocation.initrd) == ("k.elf", "a b", "m1 x,m2")


def test_memory_is_handed_to_the_size_parser() -> None:
    assert parse(["-m", "256M"]).config["memory"] == "256M"
    assert parse(["-m", "1.5G"]).config["memory"] == "1.5G"  # QEMU's forms: read by pykvm.config.parse_size


@pytest.mark.parametrize("value", ["3", "cpus=3", "3,maxcpus=3"])
def test_smp(value: str) -> None:
    assert parse(["-smp", value]).config["cpus"] == 3


def test_smp_hotplug_is_refused() -> None:
    assert "maxcpus must equal cpus" in refused("-smp", "2,maxcpus=4")
    assert "-smp 2,sockets=2" in refused("-smp", "2,sockets=2")


def test_accelerator_options() -> None:
    for argv in (["-enable-kvm"], ["--enable-kvm"], ["-accel", "kvm"], ["-machine", "accel=kvm"], ["-M", "pc,accel=kvm"]):
        assert parse(argv).warnings == []
    assert "pykvm runs on KVM only" in refused("-accel", "tcg")
    assert "accel=kvm" in refused("-machine", "accel=tcg")


@pytest.mark.parametrize("machine", ["q35", "pc-q35-7.2", "microvm"])
def test_other_machine_types_run_as_pykvm_s_pc_with_a_warning(machine: str) -> None:
    invocation = parse(["-machine", machine])
    assert len(invocation.warnings) == 1 and machine in invocation.warnings[0]


def test_pc_machines_need_no_warning() -> None:
    assert parse(["-M", "pc-i440fx-7.2"]).warnings == [] and parse(["-machine", "pc"]).warnings == []


def test_machine_properties() -> None:
    assert parse(["-machine", "pit=off"]).config["pit"] is False
    assert parse(["-machine", "kernel-irqchip=on"]).config == {}
    assert "kernel-irqchip=on only" in refused("-M", "q35,kernel-irqchip=split")
    assert "'vmport=off'" in refused("-machine", "pc,vmport=off")
    assert "no machine 'isapc'" in refused("-M", "isapc")


def test_cpu_models_are_accepted_with_a_note() -> None:
    assert parse(["-cpu", "host"]).warnings == [] and parse(["-cpu", "max"]).warnings == []
    [note] = parse(["-cpu", "qemu64,+x2apic,+tsc-deadline"]).warnings
    assert note.startswith("-cpu qemu64,+x2apic,+tsc-deadline: pykvm gives the guest the CPUID KVM supports")


@pytest.mark.parametrize("flag", ["-nodefaults", "-no-reboot", "--no-reboot"])
def test_flags_that_change_nothing(flag: str) -> None:
    assert parse([flag]) == Invocation()


def test_display_options() -> None:
    assert parse(["-display", "none", "-vnc", "none", "-name", "guest"]) == Invocation()
    assert "only -display none" in refused("-display", "gtk")
    assert "only -vnc none" in refused("-vnc", ":1")


@pytest.mark.parametrize(
    ("argv", "target"),
    [
        (["-serial", "stdio"], "stdio"),
        (["-serial", "null"], "none"),
        (["-serial", "none"], "none"),
        (["-serial", "file:/tmp/out"], "/tmp/out"),
        (["-nographic"], "stdio"),
        (["-chardev", "file,id=c,path=/tmp/x", "-serial", "chardev:c"], "/tmp/x"),
        (["-chardev", "stdio,id=c", "-device", "isa-serial,chardev=c"], "stdio"),
        (["-device", "isa-serial"], "none"),
    ],
)
def test_serial(argv: list[str], target: str) -> None:
    assert parse(argv).config["serial"] == target


def test_serial_errors() -> None:
    assert "one serial port" in refused("-serial", "stdio", "-serial", "null")
    assert "stdio, null, none or file:PATH" in refused("-serial", "pty")
    assert "no -chardev with id=c" in refused("-serial", "chardev:c")
    assert "chardevs are stdio, null and file" in refused("-chardev", "socket,id=c,path=/tmp/s")


def test_test_devices() -> None:
    config = parse(["-device", "pc-testdev", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x4"]).config
    assert config == {"pc_testdev": True, "debug_exit": (0xF4, 4)}
    [note] = parse(["-device", "pci-testdev"]).warnings
    assert "no PCI bus" in note


def test_virtio_devices_and_drives() -> None:
    invocation = parse(["-drive", "file=a.img,if=virtio,format=raw", "-drive", "file=b.img,if=none,id=d1,readonly=on",
                        "-device", "virtio-blk-device,drive=d1", "-device", "virtio-rng-device"])  # fmt: skip
    assert invocation.config["disks"] == (DiskConfig("a.img"), DiskConfig("b.img", read_only=True))
    assert invocation.config["rng"] is True
    assert "raw images" in refused("-drive", "file=a.qcow2,format=qcow2")
    assert "drive=ID of an earlier -drive" in refused("-device", "virtio-blk-device,drive=nope")
    assert "if=virtio" in refused("-drive", "file=a.img,if=ide")


def test_snapshot_makes_every_drive_throwaway_as_qemus_does() -> None:
    drives = ["-drive", "file=a.img,if=virtio,snapshot=off", "-drive", "file=b.img,if=none,id=d1,readonly=on",
              "-device", "virtio-blk-device,drive=d1"]  # fmt: skip
    assert parse(drives).config["disks"] == (DiskConfig("a.img"), DiskConfig("b.img", read_only=True))
    assert parse(["-snapshot", *drives]).config["disks"] == (
        DiskConfig("a.img", snapshot=True), DiskConfig("b.img", read_only=True, snapshot=True),
    )  # fmt: skip
    assert parse(drives + ["-snapshot"]).config == parse(["-snapshot", *drives]).config
    assert parse(["-drive", "file=c.img,snapshot=on"]).config["disks"] == (DiskConfig("c.img", snapshot=True),)
    assert "snapshot is on or off, not 'maybe'" in refused("-drive", "file=a.img,snapshot=maybe")
    assert "readonly is on or off, not 'sure'" in refused("-drive", "file=a.img,readonly=sure")


def test_pit_global() -> None:
    [note] = parse(["-global", "kvm-pit.lost_tick_policy=discard"]).warnings
    assert "re-injects lost ticks" in note
    assert parse(["-global", "kvm-pit.lost_tick_policy=delay"]).warnings == []
    assert "-global isa-fdc.driveA=x" in refused("-global", "isa-fdc.driveA=x")


def test_gdb_options_serve_the_guest_to_gdb() -> None:
    assert parse(["-s"]).config == {"gdb": "tcp::1234"}
    assert parse(["-s", "-S"]).config == {"gdb": "tcp::1234", "gdb_wait": True}
    assert parse(["-gdb", "unix:/tmp/g.sock,server=on,wait=off"]).config == {"gdb": "unix:/tmp/g.sock"}
    assert parse(["-gdb", "tcp:127.0.0.1:5000", "-S"]).config == {"gdb": "tcp:127.0.0.1:5000", "gdb_wait": True}
    assert "no monitor to continue the guest" in refused("-S")
    assert "tcp::PORT, tcp:HOST:PORT or unix:PATH" in refused("-gdb", "stdio")


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["-device", "intel-iommu,intremap=on"], "-device intel-iommu,intremap=on: pykvm has no device 'intel-iommu'"),
        (["-monitor", "stdio"], "-monitor: pykvm-qemu does not understand this option"),
        (["-kernel"], "-kernel: requires an argument"),
        (["kernel.elf"], "kernel.elf: a bare argument"),
    ],
)
def test_anything_else_is_one_error_naming_the_option(argv: list[str], named: str) -> None:
    assert refused(*argv).startswith(named)


def test_probes() -> None:
    assert probe("--help").startswith("QEMU emulator version 7.2.0 (pykvm-qemu")
    assert probe("-h").splitlines()[0] == probe("-version").splitlines()[0]
    devices = probe("-device", "?")
    assert 'name "pc-testdev", bus ISA' in devices and 'name "isa-debug-exit", bus ISA' in devices
    assert "pci-testdev" not in devices  # harnesses add -device pci-testdev only if it is listed
    assert probe("-device", "help") == devices
    assert probe("-machine", "?").startswith("Supported machines are:\npc ")
    assert "host" in probe("-cpu", "help")


def test_exit_statuses_follow_qemu() -> None:
    def status(reason: ExitReason, value: int | None = None) -> int:
        return qemu_status(RunResult(reason=reason, status=status_of(reason, value), diagnosis="", exit_value=value))

    assert status(ExitReason.DEBUG_EXIT, 0) == 1 and status(ExitReason.DEBUG_EXIT, 0x10) == 0x21
    assert status(ExitReason.TRIPLE_FAULT) == status(ExitReason.POWEROFF) == status(ExitReason.RESET) == 0
    assert status(ExitReason.INTERNAL_ERROR) == 116  # never 1, which would read as a debug-exit pass
    assert status(ExitReason.STOPPED, 15) == 143


# --- the console script -----------------------------------------------------------------------------


def test_script_help_names_qemu_compatibility() -> None:
    process = qemu("--help")
    assert process.returncode == 0 and process.stdout.startswith(b"QEMU emulator version 7.2.0 (pykvm-qemu")


def test_script_probe_into_a_closed_pipe_is_quiet() -> None:
    process = subprocess.run(f"'{SCRIPT}' -h | head -1", shell=True, capture_output=True, timeout=60)
    assert process.stdout.startswith(b"QEMU emulator version") and process.stderr == b""


def test_script_unknown_option_is_one_line_and_status_2() -> None:
    process = qemu("-kernel", "x", "-bogus")
    assert process.returncode == 2
    assert process.stderr == b"pykvm-qemu: -bogus: pykvm-qemu does not understand this option (see -h)\n"


def test_script_missing_kernel_reads_as_qemu_s_message() -> None:
    # kvm-unit-tests runs each test's command with this file name first and looks for this message.
    process = qemu("-kernel", "_NO_FILE_4Uhere_", "-smp", "1", "-display", "none")
    assert process.returncode == 2
    assert process.stderr == b"pykvm-qemu: could not load kernel '_NO_FILE_4Uhere_': No such file or directory\n"


def test_script_without_a_kernel() -> None:
    process = qemu("-m", "64M")
    assert process.returncode == 2 and b"no -kernel given" in process.stderr


@pytest.mark.kvm
def test_script_boots_a_multiboot_kernel_with_modules_memory_cpus_and_devices(tmp_path: Path) -> None:
    first, second = tmp_path / "first.txt", tmp_path / "second.bin"
    first.write_bytes(b"12345")
    second.write_bytes(bytes(100))
    kernel = str(guest("multiboot.elf"))
    process = qemu(
        "-enable-kvm", "-nodefaults", "--no-reboot", "-display", "none", "-vnc", "none", "-name", "t",
        "-M", "pc,accel=kvm", "-cpu", "host", "-m", "96M", "-smp", "cpus=2",
        "-serial", "stdio", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x4", "-device", "pc-testdev",
        "-global", "kvm-pit.lost_tick_policy=delay",
        "-kernel", kernel, "-append", "a  b", "-initrd", f"{first} arg1,{second}",
    )  # fmt: skip
    out = process.stdout.decode()
    assert process.returncode == 1, process.stderr  # the guest's debug exit with 0
    assert f"cmdline: {kernel} a  b\n" in out and f"mem_upper: {95 * 1024} KiB" in out
    assert f"module 0: {first} arg1 5 bytes\n" in out and f"module 1: {second} 100 bytes\n" in out
    assert process.stderr == b""


@pytest.mark.kvm
def test_script_serial_to_a_file_and_a_warning_on_stderr(tmp_path: Path) -> None:
    output = tmp_path / "serial.txt"
    process = qemu("-kernel", str(guest("hello_protected.elf")), "-chardev", f"file,id=log,path={output}",
                   "-device", "isa-serial,chardev=log", "-cpu", "qemu64", "-machine", "pit=off")  # fmt: skip
    assert process.returncode == 1 and process.stdout == b""
    assert output.read_bytes() == b"Hello from protected mode\n"
    assert process.stderr.decode().startswith("pykvm-qemu: warning: -cpu qemu64: ")


@pytest.mark.kvm
def test_script_virtio_disk_and_nographic(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4096))
    process = qemu("-kernel", str(guest("hello_protected.elf")), "-nographic", "-drive", f"file={disk},if=virtio,format=raw")
    assert process.returncode == 1 and process.stdout == b"Hello from protected mode\n"


@pytest.mark.kvm
def test_script_runs_a_guest_whose_drives_are_throwaway_with_snapshot(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"keep" * 1024)
    process = qemu("-kernel", str(guest("hello_protected.elf")), "-nographic", "-snapshot",
                   "-drive", f"file={disk},if=virtio,format=raw")  # fmt: skip
    assert process.returncode == 1 and process.stdout == b"Hello from protected mode\n"
    assert disk.read_bytes() == b"keep" * 1024


@pytest.mark.kvm
def test_script_exits_with_the_debug_exit_status() -> None:
    process = qemu("-kernel", str(guest("exit_code.bin")), "-serial", "stdio")
    assert (process.returncode, process.stdout) == ((42 << 1) | 1, b"exit 42\n")


def test_initrd_is_the_modules_of_a_multiboot_kernel_and_the_initrd_of_linux(tmp_path: Path) -> None:
    linux = tmp_path / "bzImage"
    linux.write_bytes(bzimage())
    invocation = parse(["-initrd", "a.img x=1,b,,c.img"])
    assert _load_arguments(invocation, guest("multiboot.elf"))["modules"] == (("a.img", "a.img x=1"), ("b,c.img", "b,c.img"))
    assert _load_arguments(invocation, linux)["initrd"] == "a.img x=1,b,,c.img"
