"""The real Debian kernel on KVM: boot state in guest memory, its early output, and (on VT-x/AMD-V) a full boot.

The guest comes from ``make linux-guest`` (guests/linux/build/); without it these tests
skip, or fail under PYKVM_REQUIRE_LINUX_GUEST=1 (as CI sets).

On a software KVM backend (kvm_pvm) the kernel's CPL0 code is emulated, about 1 µs per
instruction, so a full boot cannot finish here.  What can be shown:

* bzImage: Debian builds without CONFIG_X86_VERBOSE_BOOTUP, so the decompressor prints
  nothing unless it has something to say; with ``nokaslr`` on the command line it says
  "KASLR disabled: 'nokaslr' on cmdline." over the serial port.  That line shows the 64-bit
  entry ran, the decompressor read pykvm's boot_params and command line, and drove pykvm's
  UART.  Decompressing 60 MiB of XZ at emulation speed then takes far longer than a test
  may run, so "Linux version" lies beyond the bound here.
* PVH: the vmlinux needs no decompression, and the kernel's own printk output ("Linux
  version", the e820 map it got from hvm_start_info, the RAMDISK line for module 0)
  appears within seconds; on kvm_pvm the boot later ends at an instruction the emulator
  cannot run (``lock cmpxchg16b`` in the slab allocator), status 116.

On a hardware backend (``pykvm info``: kvm_intel or kvm_amd), both boot to the
initramfs, which prints PYKVM-LINUX-GUEST-OK and powers off: status 0.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path
from typing import Callable

import pytest

from pykvm.info import is_hardware_backend, kvm_backend
from pykvm.machine import Machine
from pykvm.result import ExitReason, RunResult
from pykvm.x86 import layout
from tests.test_boot_linux import linux_guest_file

pytestmark = pytest.mark.kvm

MEMORY = "256M"
CMDLINE = "earlyprintk=serial,ttyS0 console=ttyS0 reboot=k panic=-1"
MARKER = b"PYKVM-LINUX-GUEST-OK"
# The early output each boot path gives, as soon as the kernel runs at all.
BZIMAGE_EARLY = (b"KASLR disabled: 'nokaslr' on cmdline.", b"Decompressing Linux", b"Linux version", b"early console")
# How long the emulated boots may run, and how often they are looked at.
EARLY_OUTPUT_BOUND = 90.0
SLICE = 5.0
FULL_BOOT_TIMEOUT = 120.0

ZP = layout.ZERO_PAGE_START


@pytest.fixture(scope="module")
def bzimage() -> Path:
    return linux_guest_file("bzImage")


@pytest.fixture(scope="module")
def vmlinux() -> Path:
    return linux_guest_file("vmlinux")


@pytest.fixture(scope="module")
def initramfs() -> Path:
    return linux_guest_file("initramfs.cpio.gz")


def u(data: bytes, offset: int, size: int) -> int:
    return int.from_bytes(data[offset : offset + size], "little")


def run_until(vm: Machine, wanted: tuple[bytes, ...], bound: float, *, every: bool = False) -> tuple[RunResult, bytes, float]:
    """Run ``vm`` in slices until ``wanted`` shows on the UART (any, or ``every`` one), the guest stops, or ``bound`` s pass."""
    serial, started = b"", time.monotonic()
    while True:
        result = vm.run(timeout=SLICE)
        serial += result.serial or b""
        seen = [text in serial for text in wanted]
        elapsed = time.monotonic() - started
        if result.reason is not ExitReason.TIMEOUT or (all(seen) if every else any(seen)) or elapsed >= bound:
            return result, serial, elapsed


def report(what: str, result: RunResult, serial: bytes, elapsed: float, lines: int = 12) -> None:
    """Say how far the boot got (pytest -s, or the captured output of a failure, shows it)."""
    where = f" at rip {result.regs.rip:#x}" if result.regs is not None else ""
    print(f"\n{what}: after {elapsed:.1f} s the guest is {result.reason.value}{where} (status {result.status}); "
          f"{len(serial)} bytes of serial output, the last lines:")  # fmt: skip
    for line in serial.decode(errors="replace").splitlines()[-lines:]:
        print(f"    | {line}")
    if result.reason is ExitReason.INTERNAL_ERROR:
        print(f"    {result.diagnosis.splitlines()[0]}")


# --- (a) the boot state, read back from guest memory ------------------------------------------


def test_bzimage_boot_state_in_guest_memory(machine_factory: Callable[..., Machine], bzimage: Path, initramfs: Path) -> None:
    vm = machine_factory(memory=MEMORY)
    plan = vm.load(bzimage, initrd=initramfs, cmdline=CMDLINE)
    image = bzimage.read_bytes()
    page = vm.memory.read(ZP, 4096)
    # The setup header, as the image has it, but for what a boot loader writes.
    header_end = 0x202 + image[0x201]
    written = {0x1FA: 2, 0x210: 1, 0x211: 1, 0x214: 4, 0x218: 4, 0x21C: 4, 0x224: 2, 0x228: 4, 0x250: 8}
    for offset in range(0x1F1, header_end):
        if not any(start <= offset < start + size for start, size in written.items()):
            assert page[offset] == image[offset], f"boot_params byte {offset:#x}"
    assert page[0x202:0x206] == b"HdrS"
    assert page[0x210] == 0xFF  # type_of_loader
    assert page[0x211] & 0x81 == 0x81  # LOADED_HIGH | CAN_USE_HEAP
    assert u(page, 0x214, 4) == plan.kernel_start  # code32_start: where the kernel was loaded
    # The command line.
    cmd_line_ptr = u(page, 0x228, 4)
    assert cmd_line_ptr == layout.CMDLINE_START and u(page, 0xC8, 4) == 0
    assert vm.memory.read(cmd_line_ptr, len(CMDLINE) + 1) == CMDLINE.encode() + b"\0"
    # The initrd: where ramdisk_image says, page aligned, below initrd_addr_max, above the kernel.
    initrd = initramfs.read_bytes()
    ramdisk_image, ramdisk_size = u(page, 0x218, 4), u(page, 0x21C, 4)
    assert ramdisk_size == len(initrd) and u(page, 0xC0, 4) == u(page, 0xC4, 4) == 0
    assert vm.memory.read(ramdisk_image, ramdisk_size) == initrd
    assert ramdisk_image % 4096 == 0
    assert ramdisk_image >= u(page, 0x258, 8) + u(page, 0x260, 4)  # pref_address + init_size
    assert ramdisk_image + ramdisk_size <= u(page, 0x22C, 4) + 1  # initrd_addr_max
    # The e820 map: the machine's memory map, entry by entry.
    assert page[0x1E8] == len(vm.memory_map)
    for index, entry in enumerate(vm.memory_map):
        assert struct.unpack_from("<QQI", page, 0x2D0 + 20 * index) == (entry.addr, entry.size, int(entry.type))
    # The kernel at its load address and the vCPU at its 64-bit entry point.
    kernel_offset = ((image[0x1F1] or 4) + 1) * 512
    assert vm.memory.read(plan.kernel_start, 4096) == image[kernel_offset : kernel_offset + 4096]
    regs, sregs = vm.vcpus[0].get_regs(), vm.vcpus[0].get_sregs()
    assert regs.rip == plan.kernel_start + 0x200 and regs.rsi == ZP
    assert not regs.rflags & (1 << 9)  # interrupts off
    assert sregs.efer & (1 << 10) and sregs.cs.l == 1  # long mode, 64-bit code
    print(f"\nzero page at {ZP:#x}: kernel at {plan.kernel_start:#x}, initrd at {ramdisk_image:#x} "
          f"({ramdisk_size} bytes), {page[0x1E8]} e820 entries, command line at {cmd_line_ptr:#x}")  # fmt: skip


def test_pvh_boot_state_in_guest_memory(machine_factory: Callable[..., Machine], vmlinux: Path, initramfs: Path) -> None:
    vm = machine_factory(memory=MEMORY)
    plan = vm.load(vmlinux, initrd=initramfs, cmdline=CMDLINE)
    assert plan.format == "pvh"
    regs = vm.vcpus[0].get_regs()
    start_info = regs.rbx
    magic, version, flags, nr_modules, modlist, cmdline, rsdp, memmap, entries, _ = struct.unpack(
        "<IIIIQQQQII", vm.memory.read(start_info, 56)
    )
    assert (magic, version, flags, nr_modules) == (0x336EC578, 1, 0, 1)
    assert vm.memory.read(cmdline, len(CMDLINE) + 1) == CMDLINE.encode() + b"\0"
    paddr, size, _, _ = struct.unpack("<QQQQ", vm.memory.read(modlist, 32))
    assert vm.memory.read(paddr, size) == initramfs.read_bytes()
    assert entries == len(vm.memory_map)
    for index, entry in enumerate(vm.memory_map):
        assert struct.unpack("<QQII", vm.memory.read(memmap + 24 * index, 24)) == (entry.addr, entry.size, int(entry.type), 0)
    assert regs.rip == plan.entry.entry
    assert vm.vcpus[0].get_sregs().cr0 & 0x80000001 == 1  # protected mode, paging off


# --- (b) the kernel's own early output, in bounded time ------------------------------------------


def test_bzimage_prints_its_early_output(machine_factory: Callable[..., Machine], bzimage: Path, initramfs: Path) -> None:
    vm = machine_factory(memory=MEMORY)
    vm.load(bzimage, initrd=initramfs, cmdline=f"{CMDLINE} nokaslr")
    result, serial, elapsed = run_until(vm, BZIMAGE_EARLY, EARLY_OUTPUT_BOUND)
    report("bzImage", result, serial, elapsed)
    assert any(text in serial for text in BZIMAGE_EARLY), (
        f"no early output from the kernel within {elapsed:.0f} s ({result.reason.value}: {result.diagnosis})"
    )


def test_pvh_kernel_prints_its_boot_log(machine_factory: Callable[..., Machine], vmlinux: Path, initramfs: Path) -> None:
    vm = machine_factory(memory=MEMORY)
    plan = vm.load(vmlinux, initrd=initramfs, cmdline=CMDLINE)
    modlist = struct.unpack_from("<Q", vm.memory.read(vm.vcpus[0].get_regs().rbx + 16, 8))[0]
    initrd_addr, initrd_size = struct.unpack("<QQ", vm.memory.read(modlist, 16))
    high_ram = next(entry for entry in vm.memory_map if entry.addr == layout.HIMEM_START)
    wanted = (
        b"Linux version",
        f"Command line: {CMDLINE}".encode(),
        # The memory map and the initrd, as the kernel read them from hvm_start_info.
        f"BIOS-e820: [mem {high_ram.addr:#018x}-{high_ram.end - 1:#018x}] usable".encode(),
        f"RAMDISK: [mem {initrd_addr:#010x}-{(initrd_addr + initrd_size - 1) | 0xFFF:#010x}]".encode(),
    )
    result, serial, elapsed = run_until(vm, wanted, EARLY_OUTPUT_BOUND, every=True)
    report(f"PVH (entry {plan.entry.entry:#x})", result, serial, elapsed)
    for text in wanted:
        assert text in serial, f"{text!r} missing from the kernel's output after {elapsed:.0f} s ({result.reason.value})"


# --- (c) the full boot, where KVM runs guest kernels in hardware ----------------------------------


@pytest.mark.parametrize("kind", ["bzImage", "vmlinux"])
def test_full_boot_to_the_initramfs(machine_factory: Callable[..., Machine], kind: str, initramfs: Path) -> None:
    if not is_hardware_backend():
        pytest.skip(
            f"needs VT-x/AMD-V (kvm_intel or kvm_amd); /dev/kvm here is served by {kvm_backend()}, which emulates "
            f"the kernel's CPL0 code too slowly, and not completely enough, to reach user space"
        )
    vm = machine_factory(memory=MEMORY)
    vm.load(linux_guest_file(kind), initrd=initramfs, cmdline="console=ttyS0 reboot=k panic=-1")
    result = vm.run(timeout=FULL_BOOT_TIMEOUT)
    serial = result.serial or b""
    report(kind, result, serial, 0.0)
    assert MARKER in serial
    assert result.status == 0, f"{result.reason.value}: {result.diagnosis}"
