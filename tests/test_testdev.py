"""QEMU's pc-testdev (pykvm/devices/testdev.py), and the debug-exit ports where -device puts them.

The device models are checked access by access against QEMU's hw/misc/pc-testdev.c; a guest
then uses every part through the machine: the register and its byte-wise alias, the iomem
window, and an interrupt line read back from the PIC's IRR.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from pykvm.config import MachineConfig, device_options
from pykvm.devices.testdev import IOMEM_SIZE, PcTestdevIrqLines, PcTestdevMemory, PcTestdevPorts, PcTestdevState
from pykvm.errors import BusError, ConfigError, StateError
from pykvm.machine import Machine
from tests.images import run_tools

# --- the register at 0xe0 and its byte-wise alias at 0xe8 ------------------------------------------


def test_register_keeps_a_32_bit_value() -> None:
    ports = PcTestdevPorts(PcTestdevMemory())
    ports.write(0, 4, 0x12345678)
    assert ports.read(0, 4) == 0x12345678
    assert [ports.read(offset, 1) for offset in range(4)] == [0x78, 0x56, 0x34, 0x12]
    assert ports.read(2, 2) == 0x1234


def test_a_narrow_write_changes_only_its_bytes() -> None:
    ports = PcTestdevPorts(PcTestdevMemory())
    ports.write(0, 4, 0x12345678)
    ports.write(1, 1, 0xAB)
    ports.write(2, 2, 0xCDEF)
    assert ports.read(0, 4) == 0xCDEFAB78


def test_an_access_past_the_register_keeps_to_its_32_bits() -> None:
    # QEMU: mask = (u32)-1 >> (32 - bits) << start_bit, in 32 bits: the bytes past offset 3 fall off.
    ports = PcTestdevPorts(PcTestdevMemory())
    ports.write(3, 2, 0xBBAA)
    assert ports.read(0, 4) == 0xAA000000
    assert ports.read(3, 4) == 0xAA


def test_the_byte_wise_alias_is_the_same_register() -> None:
    ports = PcTestdevPorts(PcTestdevMemory())
    ports.write(8, 4, 0x11223344)
    assert ports.read(0, 4) == 0x11223344
    assert ports.read(10, 2) == 0x1122
    ports.write(11, 2, 0x6655)  # bytes at register offsets 3 and 0 (the alias wraps per byte, as QEMU splits it)
    assert ports.read(0, 4) == 0x55223366


def test_flush_port_takes_4_byte_writes() -> None:
    ports = PcTestdevPorts(PcTestdevMemory())
    ports.write(4, 4, 0x1000)
    ports.write(4, 1, 0)
    assert ports.stats["flushes"] == 1 and ports.stats["missed_writes"] == 1
    assert ports.read(4, 4) == 0xFFFFFFFF and ports.read(0, 4) == 0


# --- interrupt lines at 0x2000 ---------------------------------------------------------------------


def test_a_byte_sets_one_line() -> None:
    calls: list[tuple[int, bool]] = []
    lines = PcTestdevIrqLines(lambda line, level: calls.append((line, level)))
    lines.write(11, 1, 1)
    lines.write(11, 1, 0)
    lines.write(23, 1, 7)
    assert calls == [(11, True), (11, False), (23, True)]


def test_a_wide_write_sets_a_line_per_byte() -> None:
    # The realmode test's `outl %eax, (0x200b)` with EAX = 1: line 11 high, lines 12-14 low.
    calls: list[tuple[int, bool]] = []
    PcTestdevIrqLines(lambda line, level: calls.append((line, level))).write(11, 4, 1)
    assert calls == [(11, True), (12, False), (13, False), (14, False)]


def test_bytes_past_the_last_line_are_dropped() -> None:
    calls: list[tuple[int, bool]] = []
    lines = PcTestdevIrqLines(lambda line, level: calls.append((line, level)))
    lines.write(22, 4, 0x01010101)
    assert calls == [(22, True), (23, True)] and lines.stats["missed_writes"] == 2


def test_lines_without_interrupt_controllers_are_counted() -> None:
    lines = PcTestdevIrqLines(None)
    lines.write(3, 1, 1)
    assert lines.stats["no_irqchip"] == 1 and lines.read(0, 1) == 0xFF


# --- iomem -------------------------------------------------------------------------------------------


def test_iomem_reads_what_was_written() -> None:
    memory = PcTestdevMemory()
    memory.write(0x100, 8, 0x1122334455667788)
    assert memory.read(0x100, 8) == 0x1122334455667788
    assert memory.read(0x102, 2) == 0x5566 and memory.read(0x107, 1) == 0x11
    assert memory.read(0, 4) == 0


def test_iomem_access_at_its_end_is_bounded() -> None:
    memory = PcTestdevMemory()
    memory.write(IOMEM_SIZE - 2, 4, 0xAABBCCDD)
    assert memory.read(IOMEM_SIZE - 2, 4) == 0xFFFFCCDD
    assert len(memory.data) == IOMEM_SIZE


# --- state ----------------------------------------------------------------------------------------------


def test_the_state_holds_the_register_and_the_iomem_and_a_new_device_answers_alike() -> None:
    ports = PcTestdevPorts(PcTestdevMemory())
    ports.write(0, 4, 0xCAFE0001)
    ports.iomem.write(IOMEM_SIZE - 4, 4, 0x01020304)
    state = ports.save_state()
    restored = PcTestdevPorts(PcTestdevMemory())
    restored.restore_state(state)
    assert restored.save_state() == state and restored.read(8, 4) == 0xCAFE0001
    assert restored.iomem.read(IOMEM_SIZE - 4, 4) == 0x01020304


@pytest.mark.parametrize(
    "state, message",
    [
        (PcTestdevState(1 << 32, bytes(IOMEM_SIZE)), "PcTestdevState.register is 4294967296, not an integer"),
        (PcTestdevState(0, bytes(IOMEM_SIZE - 1)), "PcTestdevState.iomem is 65535 bytes, not bytes of length 65536"),
        (PcTestdevState(0, "no"), "PcTestdevState.iomem is 'no'"),  # type: ignore[arg-type]
        (object(), "a PcTestdevState was expected, not object"),
    ],
)
def test_a_state_that_does_not_fit_is_refused_and_changes_nothing(state: object, message: str) -> None:
    ports = PcTestdevPorts(PcTestdevMemory())
    ports.write(0, 4, 7)
    before = ports.save_state()
    with pytest.raises(StateError, match=message):
        ports.restore_state(state)  # type: ignore[arg-type]
    assert ports.save_state() == before


# --- device options ------------------------------------------------------------------------------------


def test_device_options() -> None:
    assert device_options("pc-testdev") == {"pc_testdev": True}
    assert device_options("isa-debug-exit,iobase=0xf4,iosize=0x4") == {"debug_exit": (0xF4, 4)}
    assert device_options("isa-debug-exit") == {"debug_exit": (0x501, 2)}  # QEMU's defaults


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("edu", "unknown device 'edu'"),
        ("pc-testdev,x=1", "pc-testdev has no properties"),
        ("isa-debug-exit,port=4", "has no property 'port=4'"),
        ("isa-debug-exit,iobase=zz", "iobase='zz' is not a number"),
    ],
)
def test_bad_device_options(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        device_options(spec)


def test_debug_exit_ports_must_fit_the_port_space() -> None:
    with pytest.raises(ConfigError, match="debug-exit ports"):
        MachineConfig(debug_exit=(0xFFFE, 4)).validate()


# --- through the machine ------------------------------------------------------------------------------

TESTDEV_GUEST = """
bits 32
org 0x100000
        mov dx, 0x3f8
        mov eax, 0x12345678
        out 0xe0, eax                    ; the register
        in al, 0xe1
        cmp al, 0x56
        jne bad
        in ax, 0xea                      ; its byte-wise alias
        cmp ax, 0x1234
        jne bad
        mov dword [0xff000000], 0xdeadbeef   ; iomem
        mov ax, [0xff000002]
        cmp ax, 0xdead
        jne bad
        mov al, 0x11                     ; the master PIC: ICW1-4, every line masked
        out 0x20, al
        mov al, 0x20
        out 0x21, al
        mov al, 4
        out 0x21, al
        mov al, 1
        out 0x21, al
        mov al, 0xff
        out 0x21, al
        mov al, 0x0a                     ; OCW3: read the IRR
        out 0x20, al
        in al, 0x20
        test al, 8
        jnz bad
        mov bx, dx
        mov dx, 0x2003                   ; raise line 3
        mov al, 1
        out dx, al
        mov dx, bx
        in al, 0x20
        test al, 8
        jz bad
        mov esi, ok
print:  lodsb
        test al, al
        jz done
        out dx, al
        jmp print
done:   mov al, 0
        out 0xf4, al
bad:    mov al, 1
        out 0xf4, al
ok:     db "pc-testdev ok", 10, 0
"""


@pytest.fixture
def testdev_guest(machine_factory: Callable[..., Machine], tmp_path: Path) -> Machine:
    """A machine with pc-testdev, loaded with TESTDEV_GUEST."""
    (tmp_path / "testdev.asm").write_text(TESTDEV_GUEST)
    run_tools(["nasm", "-f", "bin", "-o", "testdev.bin", "testdev.asm"], cwd=tmp_path)
    vm = machine_factory(pc_testdev=True)
    vm.load(tmp_path / "testdev.bin", mode="protected")
    return vm


@pytest.mark.kvm
def test_guest_uses_every_part_of_pc_testdev(testdev_guest: Machine) -> None:
    vm = testdev_guest
    result = vm.run(timeout=30)
    assert result.serial == b"pc-testdev ok\n" and result.status == 1
    ports, lines, iomem = (vm.devices.devices[name].device for name in ("pc-testdev", "pc-testdev-irq", "pc-testdev-iomem"))
    assert ports.register == 0x12345678 and lines.stats["line_writes"] == 1 and iomem.data[:4] == b"\xef\xbe\xad\xde"


@pytest.mark.kvm
def test_a_snapshot_keeps_the_register_and_the_iomem(testdev_guest: Machine, tmp_path: Path) -> None:
    vm = testdev_guest
    assert vm.run(timeout=30).status == 1
    vm.snapshot(tmp_path / "snap")
    with Machine.restore(tmp_path / "snap") as restored:
        ports = restored.devices.devices["pc-testdev"].device
        assert ports.register == 0x12345678 and restored.mmio.read(0xFF000000, 4) == 0xDEADBEEF


@pytest.mark.kvm
def test_without_the_option_there_is_no_testdev(machine_factory: Callable[..., Machine]) -> None:
    vm = machine_factory()
    assert "pc-testdev" not in vm.devices.devices and vm.pio.find(0xE0) is None and vm.mmio.find(0xFF000000) is None


@pytest.mark.kvm
def test_debug_exit_ports_where_the_config_puts_them(machine_factory: Callable[..., Machine], tmp_path: Path) -> None:
    (tmp_path / "exit.asm").write_text("bits 32\norg 0x100000\nmov dx, 0x501\nmov ax, 0x2a\nout dx, ax\nhlt\n")
    run_tools(["nasm", "-f", "bin", "-o", "exit.bin", "exit.asm"], cwd=tmp_path)
    vm = machine_factory(**device_options("isa-debug-exit"))
    vm.load(tmp_path / "exit.bin", mode="protected")
    result = vm.run(timeout=30)
    assert (result.exit_value, result.status) == (0x2A, 0x55)
    assert vm.pio.find(0xF4) is None


@pytest.mark.kvm
def test_debug_exit_over_another_device_is_refused(machine_factory: Callable[..., Machine]) -> None:
    with pytest.raises(BusError, match="overlaps"):
        machine_factory(debug_exit=(0x3F8, 4))
