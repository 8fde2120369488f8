"""The PC platform: interrupts, timers, SMP, ACPI and fw_cfg, shown by multiboot kernels written for QEMU."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from conftest import guest
from pykvm.devices.fw_cfg import FW_CFG_CMDLINE_DATA, FW_CFG_CMDLINE_SIZE
from pykvm.result import ExitReason

pytestmark = pytest.mark.kvm


def test_pit_ticks_arrive_at_the_programmed_rate(machine_factory) -> None:
    machine = machine_factory()
    machine.load(guest("pit_ticks.elf"))
    started = time.monotonic()
    result = machine.run(timeout=60)
    elapsed = time.monotonic() - started
    assert result.serial.startswith(b"pit: 50 ticks\n") and result.status == 1
    assert elapsed >= 0.45  # 50 ticks at 100 Hz cannot come sooner than 0.5 s (no upper bound: slow hosts)


def test_uart_receive_interrupts_through_the_ioapic(machine_factory) -> None:
    machine = machine_factory()
    machine.load(guest("uart_irq.elf"))
    machine.serial.receive(b"interrupt me\x04")
    result = machine.run(timeout=60)
    lines = result.serial.decode().splitlines()
    assert lines[:3] == ["uart irq ready", "interrupt me", "uart irq done 12"]
    assert re.fullmatch(r"interrupts: [1-9]\d*", lines[3])
    assert result.exit_value == 12


@pytest.mark.parametrize("cpus", [1, 2, 4])
def test_smp_cpus_found_in_acpi_start_by_init_sipi_and_count_together(machine_factory, cpus) -> None:
    machine = machine_factory(cpus=cpus)
    machine.load(guest("smp.elf"))
    result = machine.run(timeout=120)
    lines = result.serial.decode().splitlines()
    assert lines[0] == f"cpus: {cpus}"
    assert lines[1 : 1 + cpus] == [f"cpu {i}" for i in range(cpus)]
    assert sorted(lines[1 + cpus : 2 * cpus]) == [f"ap {i} up" for i in range(1, cpus)]
    assert lines[2 * cpus :] == ["ticks: 10", f"counter: {cpus * 1000}"]
    assert (result.reason, result.status) == (ExitReason.DEBUG_EXIT, 1)


def test_fw_cfg_gives_signature_cpus_ram_and_the_e820_file(machine_factory) -> None:
    machine = machine_factory(memory="96M", cpus=2)
    machine.load(guest("fw_cfg.elf"))
    lines = machine.run(timeout=60).serial.decode().splitlines()
    assert lines[:4] == ["fw_cfg signature: QEMU", "fw_cfg id: 1", "cpus: 2", "ram: 96 MiB"]
    e820 = [line.split()[1:] for line in lines if line.startswith("e820 ")]
    assert e820 == [[f"{e.addr:016x}", f"{e.size:016x}", str(int(e.type))] for e in machine.memory_map]


def test_fw_cfg_carries_the_loaded_kernels_command_line(machine_factory) -> None:
    machine = machine_factory()
    machine.load(guest("multiboot.elf"), cmdline="root=/dev/vda quiet")
    assert machine.fw_cfg.item(FW_CFG_CMDLINE_DATA) == b"root=/dev/vda quiet\0"
    assert int.from_bytes(machine.fw_cfg.item(FW_CFG_CMDLINE_SIZE), "little") == 20


def test_the_acpi_and_mp_tables_are_in_guest_memory_where_guests_scan(machine_factory) -> None:
    machine = machine_factory(cpus=2)
    tables = machine.acpi
    assert machine.memory.read(tables.base, len(tables.blob)) == tables.blob
    assert machine.memory.read(tables.base, 8) == b"RSD PTR "
    assert b"_MP_" in machine.memory.read(0xF0000, 0x1000)


def test_the_cli_runs_the_smp_kernel_unchanged_with_two_cpus() -> None:
    process = subprocess.run(
        [sys.executable, "-m", "pykvm", "run", "-c", "2", str(guest("smp.elf")), "--timeout", "120"],
        capture_output=True,
        timeout=180,
    )
    assert process.returncode == 1, process.stderr
    assert process.stdout.decode().splitlines()[-2:] == ["ticks: 10", "counter: 2000"]


def test_a_minimal_machine_has_no_firmware_tables(machine_factory) -> None:
    machine = machine_factory(irqchip=False)
    assert machine.acpi is None
    assert machine.memory.read(0xE0000, 8) == bytes(8)


def test_acpi_s5_powers_the_machine_off_with_status_0(machine_factory, tmp_path) -> None:
    poweroff = tmp_path / "poweroff.bin"
    # mov dx, 0x604 (PM1a_CNT); mov ax, SLP_TYP 5 << 10 | SLP_EN; out dx, ax; jmp $
    poweroff.write_bytes(bytes.fromhex("ba0406") + bytes.fromhex("b80034") + bytes.fromhex("ef") + b"\xeb\xfe")
    machine = machine_factory()
    machine.load(poweroff)
    result = machine.run(timeout=30)
    assert (result.reason, result.status) == (ExitReason.POWEROFF, 0)
