"""The Linux loaders without KVM: bzImage (boot protocol) and PVH, field by field.

The setup header parser and the boot_params builder are checked against the real
Debian kernel that ``make linux-guest`` fetches (skipped when it is not built,
failed under PYKVM_REQUIRE_LINUX_GUEST=1) and against small synthetic images,
one per rejection.  Offsets are those of Documentation/arch/x86/boot.rst and
arch/x86/include/uapi/asm/bootparam.h, written out here rather than taken from
the loader, so the test checks the loader against the document.
"""

from __future__ import annotations

import gzip
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from pykvm.boot import FORMATS, detect, linux, load_image, pvh
from pykvm.boot.placement import Placement
from pykvm.boot.plan import BootPlan, CpuMode, LoadRequest, Module
from pykvm.errors import ImageError
from pykvm.x86 import layout
from pykvm.x86.e820 import E820Entry, E820Type, build_memory_map
from tests.images import HLT, KERNEL_ADDR, Seg, aout_kernel, assert_writes_disjoint, build_elf, multiboot_header, peek, request

LINUX_BUILD = Path(__file__).resolve().parent.parent / "guests" / "linux" / "build"
REQUIRE_ENV = "PYKVM_REQUIRE_LINUX_GUEST"

MIB = layout.MIB
GIB = layout.GIB
RAM_256M = build_memory_map(256 * MIB)
ZP = layout.ZERO_PAGE_START

# boot.rst: setup header offsets (in the image and in boot_params).
SETUP_SECTS, SYSSIZE, VID_MODE, BOOT_FLAG, JUMP = 0x1F1, 0x1F4, 0x1FA, 0x1FE, 0x200
HEADER, VERSION, KERNEL_VERSION, TYPE_OF_LOADER, LOADFLAGS = 0x202, 0x206, 0x20E, 0x210, 0x211
CODE32_START, RAMDISK_IMAGE, RAMDISK_SIZE, HEAP_END_PTR, CMD_LINE_PTR = 0x214, 0x218, 0x21C, 0x224, 0x228
INITRD_ADDR_MAX = 0x22C
KERNEL_ALIGNMENT, RELOCATABLE_KERNEL, XLOADFLAGS, CMDLINE_SIZE = 0x230, 0x234, 0x236, 0x238
SETUP_DATA, PREF_ADDRESS, INIT_SIZE = 0x250, 0x258, 0x260
# bootparam.h: struct boot_params.
ACPI_RSDP_ADDR, EXT_RAMDISK_IMAGE, EXT_RAMDISK_SIZE, EXT_CMD_LINE_PTR = 0x070, 0x0C0, 0x0C4, 0x0C8
E820_ENTRIES, SENTINEL, E820_TABLE, E820_ENTRY_SIZE = 0x1E8, 0x1EF, 0x2D0, 20
# What the loader writes into the copied setup header (everything else is the image's).
WRITTEN = {
    VID_MODE: 2, TYPE_OF_LOADER: 1, LOADFLAGS: 1, CODE32_START: 4, RAMDISK_IMAGE: 4, RAMDISK_SIZE: 4,
    HEAP_END_PTR: 2, CMD_LINE_PTR: 4, SETUP_DATA: 8,
}  # fmt: skip


def u(data: bytes, offset: int, size: int) -> int:
    return int.from_bytes(data[offset : offset + size], "little")


def zero_page(plan: BootPlan) -> bytes:
    return peek(plan, ZP, 4096)


def initrd(size: int = 0x3000, name: str = "initrd.img") -> Module:
    return Module(Path(name), bytes(range(256)) * (size // 256) + bytes(size % 256), name)


# --- a synthetic bzImage -----------------------------------------------------------------------


def bzimage(*, setup_sects: int = 1, kernel_size: int = 0x1000, jump_offset: int = 0x6A, **fields: int) -> bytes:
    """A small bzImage: the boot sector and ``setup_sects`` sectors, then a protected-mode kernel.

    The setup header says protocol 2.15, LOADED_HIGH, XLF_KERNEL_64, relocatable, pref_address
    16 MiB, init_size 2 MiB; ``fields`` (boot.rst names) override one value at a time.
    """
    values = {
        "setup_sects": setup_sects, "syssize": kernel_size // 16, "boot_flag": 0xAA55, "version": 0x020F,
        "loadflags": 0x01, "initrd_addr_max": 0x7FFFFFFF, "kernel_alignment": 0x200000,
        "relocatable_kernel": 1, "xloadflags": 0x03, "cmdline_size": 0x7FF,
        "pref_address": 0x1000000, "init_size": 0x200000, "kernel_version": 0x100,
    }  # fmt: skip
    values.update(fields)
    offsets = {
        "setup_sects": (SETUP_SECTS, "<B"), "syssize": (SYSSIZE, "<I"), "boot_flag": (BOOT_FLAG, "<H"),
        "version": (VERSION, "<H"), "loadflags": (LOADFLAGS, "<B"), "initrd_addr_max": (INITRD_ADDR_MAX, "<I"),
        "kernel_alignment": (KERNEL_ALIGNMENT, "<I"), "relocatable_kernel": (RELOCATABLE_KERNEL, "<B"),
        "xloadflags": (XLOADFLAGS, "<H"), "cmdline_size": (CMDLINE_SIZE, "<I"),
        "pref_address": (PREF_ADDRESS, "<Q"), "init_size": (INIT_SIZE, "<I"), "kernel_version": (KERNEL_VERSION, "<H"),
    }  # fmt: skip
    setup = bytearray(((setup_sects or 4) + 1) * 512)
    setup[JUMP : JUMP + 2] = bytes([0xEB, jump_offset])
    setup[HEADER : HEADER + 4] = b"HdrS"
    setup[0x300:0x310] = b"pykvm test 1.0\0\0"  # the kernel_version string (0x100 + 0x200)
    for name, value in values.items():
        offset, code = offsets[name]
        struct.pack_into(code, setup, offset, value)
    kernel = bytearray(b"\x90" * kernel_size)
    kernel[0x200] = HLT[0]  # the 64-bit entry point
    return bytes(setup) + bytes(kernel)


def load(image: bytes, **fields: object) -> BootPlan:
    fields.setdefault("memory_map", RAM_256M)
    return linux.load(Path("bzImage"), image, request(**fields))


def load_error(image: bytes, **fields: object) -> str:
    with pytest.raises(ImageError) as info:
        load(image, **fields)
    assert info.value.path == "bzImage"
    return info.value.reason


# --- the real Debian kernel --------------------------------------------------------------------


def linux_guest_file(name: str) -> Path:
    """A file of the built Linux guest; skips (or fails under PYKVM_REQUIRE_LINUX_GUEST=1) without it."""
    path = LINUX_BUILD / name
    if not path.exists():
        message = f"{path} is missing: build the Linux guest with 'make linux-guest'"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but {message}", pytrace=False)
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def debian_bzimage() -> tuple[Path, bytes]:
    path = linux_guest_file("bzImage")
    return path, path.read_bytes()


@pytest.fixture(scope="module")
def debian_initrd() -> Module:
    path = linux_guest_file("initramfs.cpio.gz")
    return Module(path, path.read_bytes(), str(path))


def test_debian_setup_header_field_by_field(debian_bzimage: tuple[Path, bytes]) -> None:
    path, image = debian_bzimage
    header = linux.parse_header(path, image)
    assert image[HEADER : HEADER + 4] == b"HdrS"
    assert u(image, BOOT_FLAG, 2) == 0xAA55
    assert header.version == u(image, VERSION, 2) >= 0x020C
    assert header.setup_sects == (image[SETUP_SECTS] or 4)
    assert header.kernel_offset == (image[SETUP_SECTS] + 1) * 512
    assert header.header_end == 0x202 + image[0x201]
    assert header.loadflags == image[LOADFLAGS] and header.loadflags & 0x01  # LOADED_HIGH
    assert header.xloadflags == u(image, XLOADFLAGS, 2) and header.xloadflags & 0x01  # XLF_KERNEL_64
    assert header.syssize == u(image, SYSSIZE, 4)
    assert header.syssize * 16 <= len(image) - header.kernel_offset
    assert header.initrd_addr_max == u(image, INITRD_ADDR_MAX, 4)
    assert header.kernel_alignment == u(image, KERNEL_ALIGNMENT, 4)
    assert header.kernel_alignment & (header.kernel_alignment - 1) == 0
    assert header.relocatable_kernel is bool(image[RELOCATABLE_KERNEL])
    assert header.cmdline_size == u(image, CMDLINE_SIZE, 4) > 0
    assert header.pref_address == u(image, PREF_ADDRESS, 8)
    assert header.init_size == u(image, INIT_SIZE, 4) >= len(image) - header.kernel_offset
    # boot.rst: kernel_version + 0x200 is the offset of the version string in the file.
    version_string = image[u(image, KERNEL_VERSION, 2) + 0x200 :].split(b"\0", 1)[0].decode()
    version_file = LINUX_BUILD / "VERSION"
    if version_file.exists():
        package = version_file.read_text().split()[0]  # linux-image-6.1.0-56-amd64
        assert version_string.startswith(package.removeprefix("linux-image-") + " ")
    print(f"\n{path}: boot protocol {header.version_text}, kernel {version_string.split()[0]}, "
          f"pref_address {header.pref_address:#x}, init_size {header.init_size:#x}")  # fmt: skip


def test_debian_boot_plan(debian_bzimage: tuple[Path, bytes], debian_initrd: Module) -> None:
    path, image = debian_bzimage
    header = linux.parse_header(path, image)
    cmdline = "earlyprintk=serial,ttyS0 console=ttyS0 reboot=k panic=-1"
    plan = linux.load(path, image, request(memory_map=RAM_256M, cmdline=cmdline, initrd=debian_initrd))
    assert_writes_disjoint(plan)
    load_addr = header.pref_address
    assert plan.format == "linux"
    assert plan.kernel_start == load_addr
    assert peek(plan, load_addr, len(image) - header.kernel_offset) == image[header.kernel_offset :]
    assert plan.entry.mode is CpuMode.LONG
    assert plan.entry.entry == load_addr + 0x200
    assert dict(plan.entry.regs) == {"rsi": ZP}
    page = zero_page(plan)
    assert page[TYPE_OF_LOADER] == 0xFF
    assert page[LOADFLAGS] == image[LOADFLAGS] | 0x80
    assert u(page, CMD_LINE_PTR, 4) == layout.CMDLINE_START
    assert peek(plan, layout.CMDLINE_START, len(cmdline) + 1) == cmdline.encode() + b"\0"
    ramdisk = u(page, RAMDISK_IMAGE, 4)
    assert u(page, RAMDISK_SIZE, 4) == len(debian_initrd.data)
    assert peek(plan, ramdisk, len(debian_initrd.data)) == debian_initrd.data
    assert ramdisk % 4096 == 0
    assert ramdisk >= load_addr + header.init_size
    assert ramdisk + len(debian_initrd.data) <= min(header.initrd_addr_max + 1, 256 * MIB)
    assert 256 * MIB - (ramdisk + len(debian_initrd.data)) < 4096  # as high as it goes
    assert u(page, E820_ENTRIES, 1) == len(RAM_256M)
    # Every header byte is the image's, except the fields a boot loader writes.
    for offset in range(0x1F1, header.header_end):
        if not any(start <= offset < start + size for start, size in WRITTEN.items()):
            assert page[offset] == image[offset], f"boot_params byte {offset:#x} differs from the image"


# --- the setup header: every rejection -------------------------------------------------------


def test_synthetic_image_loads() -> None:
    plan = load(bzimage())
    assert plan.format == "linux"
    assert plan.entry.entry == 0x1000000 + 0x200
    assert peek(plan, 0x1000200, 1) == HLT


def test_bad_magic() -> None:
    image = bytearray(bzimage())
    image[HEADER : HEADER + 4] = b"HdrZ"
    reason = load_error(bytes(image))
    assert "setup header magic" in reason and "b'HdrZ'" in reason and "zImage" in reason


def test_too_short_for_a_header() -> None:
    assert "too short" in load_error(b"MZ" + bytes(0x100))


@pytest.mark.parametrize(("version", "text"), [(0x0205, "2.05"), (0x0200, "2.00")])
def test_old_protocol(version: int, text: str) -> None:
    reason = load_error(bzimage(version=version))
    assert f"boot protocol {text}" in reason and "2.06 or later" in reason


def test_protocol_without_xloadflags_is_entered_at_32_bits() -> None:
    # Protocol 2.10 has no xloadflags, so no 64-bit entry point: the 32-bit one it has.
    plan = load(bzimage(version=0x020A))
    assert plan.entry.mode is CpuMode.PROTECTED and plan.entry.entry == 0x1000000


def test_protocol_2_06_before_pref_address_and_init_size() -> None:
    # Its header ends before pref_address: the kernel loads at 1 MiB and needs what the file holds.
    image = bzimage(version=0x0206, jump_offset=0x3A)
    header = linux.parse_header(Path("bzImage"), image)
    assert (header.pref_address, header.xloadflags, header.init_size) == (0, 0, 0x1000)
    plan = load(image)
    assert plan.kernel_start == layout.HIMEM_START and plan.entry.mode is CpuMode.PROTECTED


def test_without_xlf_kernel_64_the_32_bit_entry_is_the_default() -> None:
    plan = load(bzimage(xloadflags=0x02))
    zero_page_addr = plan.entry.regs["rsi"]
    assert plan.entry.mode is CpuMode.PROTECTED
    assert plan.entry.entry == 0x1000000  # the start of the protected-mode kernel, as loaded
    assert dict(plan.entry.regs) == {"rsi": zero_page_addr}  # EBP, EDI and EBX start at zero
    page = peek(plan, zero_page_addr, 4096)
    assert u(page, CODE32_START, 4) == 0x1000000 and page[0x202:0x206] == b"HdrS"


def test_no_xlf_kernel_64_refuses_a_long_mode_request() -> None:
    reason = load_error(bzimage(xloadflags=0x02), mode=CpuMode.LONG)
    assert "xloadflags 0x0002 lacks XLF_KERNEL_64" in reason and "protected mode" in reason


def test_no_loaded_high() -> None:
    assert "loadflags 0x00 lacks LOADED_HIGH" in load_error(bzimage(loadflags=0))


def test_bad_boot_flag() -> None:
    assert "boot_flag (at 0x1fe) is 0x1234" in load_error(bzimage(boot_flag=0x1234))


def test_header_too_short_for_its_fields() -> None:
    assert "the setup header ends at 0x262" in load_error(bzimage(jump_offset=0x60))


def test_header_longer_than_boot_params_allows() -> None:
    assert "past its room in boot_params" in load_error(bzimage(jump_offset=0x90))


def test_setup_sects_zero_means_four() -> None:
    image = bzimage(setup_sects=0)
    header = linux.parse_header(Path("bzImage"), image)
    assert header.setup_sects == 4 and header.kernel_offset == 5 * 512
    assert peek(load(image), 0x1000200, 1) == HLT


def test_no_kernel_after_the_setup() -> None:
    image = bzimage()[: 2 * 512 + 0x100]
    assert "has no protected-mode kernel past its setup" in load_error(image)


def test_truncated_kernel() -> None:
    image = bzimage()[:-0x100]
    assert "is cut short: syssize says the protected-mode kernel is 256 16-byte paragraphs" in load_error(image)


@pytest.mark.parametrize("missing", [1, 15])
def test_a_short_last_paragraph_is_normal(missing: int) -> None:
    # syssize rounds the kernel's size up to 16 bytes: the file may end up to 15 bytes before syssize * 16.
    image = bzimage(kernel_size=0x1000, syssize=0x100)[:-missing]
    plan = load(image)
    assert plan.writes[0].data == image[2 * 512 :]


def test_sixteen_bytes_short_is_cut_short() -> None:
    assert "is cut short" in load_error(bzimage(kernel_size=0x1000, syssize=0x100)[:-16])


def test_init_size_smaller_than_the_kernel() -> None:
    assert "init_size 0x800 is smaller than the protected-mode kernel" in load_error(bzimage(init_size=0x800))


def test_kernel_alignment_not_a_power_of_two() -> None:
    assert "kernel_alignment 0x300000 is not a power of two" in load_error(bzimage(kernel_alignment=0x300000))


def test_cmdline_size_zero() -> None:
    assert "cmdline_size is 0" in load_error(bzimage(cmdline_size=0))


# --- the request: every rejection ---------------------------------------------------------------


def test_cmdline_too_long_for_the_kernel() -> None:
    reason = load_error(bzimage(cmdline_size=16), cmdline="x" * 17)
    assert "the kernel command line is 17 bytes, more than 16 (this kernel's cmdline_size is 16)" == reason


def test_cmdline_at_the_limit() -> None:
    plan = load(bzimage(cmdline_size=16), cmdline="x" * 16)
    assert peek(plan, layout.CMDLINE_START, 17) == b"x" * 16 + b"\0"


def test_cmdline_with_a_nul() -> None:
    assert "contains a NUL" in load_error(bzimage(), cmdline="a\0b")


def test_modules_are_refused() -> None:
    reason = load_error(bzimage(), modules=(initrd(),))
    assert "takes one initrd (--initrd), not multiboot modules (--module" in reason


@pytest.mark.parametrize("field", ["load_addr", "entry"])
def test_overrides_are_refused(field: str) -> None:
    assert "applies to flat binaries only" in load_error(bzimage(), **{field: 0x200000})


def test_protected_mode_request_uses_the_32_bit_entry() -> None:
    plan = load(bzimage(), mode=CpuMode.PROTECTED)
    assert plan.entry.mode is CpuMode.PROTECTED and plan.entry.entry == 0x1000000
    assert plan.entry.regs["rsi"] == ZP


def test_long_mode_request_is_fine() -> None:
    assert load(bzimage(), mode=CpuMode.LONG).entry.mode is CpuMode.LONG


def test_not_enough_ram_for_init_size() -> None:
    reason = load_error(bzimage(init_size=0x4000000), memory_map=build_memory_map(64 * MIB))
    assert "the kernel needs guest RAM up to 0x5000000" in reason and "at least 80 MiB with -m" in reason


def test_initrd_that_cannot_fit() -> None:
    image = bzimage(init_size=60 * MIB)
    reason = load_error(image, memory_map=build_memory_map(80 * MIB), initrd=initrd(5 * MIB))
    assert reason.startswith("the initrd initrd.img (0x500000 bytes) does not fit in guest RAM between 0x4c00000 and")
    assert "give the machine more memory with -m" in reason


def test_initrd_under_a_low_initrd_addr_max_that_leaves_no_room() -> None:
    reason = load_error(bzimage(initrd_addr_max=0x1100000), initrd=initrd())
    assert "(initrd_addr_max 0x1100000, above the kernel's end)" in reason


def test_empty_initrd() -> None:
    assert "the initrd empty is empty" in load_error(bzimage(), initrd=Module(Path("empty"), b"", "empty"))


# --- boot_params, field by field -------------------------------------------------------------


def test_boot_params_fields() -> None:
    image = bzimage()
    module = initrd()
    plan = load(image, cmdline="console=ttyS0 root=/dev/ram0", initrd=module)
    page = zero_page(plan)
    assert len(page) == 4096
    assert page[TYPE_OF_LOADER] == 0xFF
    assert page[LOADFLAGS] == 0x01 | 0x80  # LOADED_HIGH, CAN_USE_HEAP
    assert u(page, HEAP_END_PTR, 2) == 0xFE00
    assert u(page, VID_MODE, 2) == 0xFFFF
    assert u(page, CMD_LINE_PTR, 4) == layout.CMDLINE_START
    assert peek(plan, layout.CMDLINE_START, 29) == b"console=ttyS0 root=/dev/ram0\0"
    assert u(page, RAMDISK_SIZE, 4) == len(module.data)
    assert peek(plan, u(page, RAMDISK_IMAGE, 4), len(module.data)) == module.data
    assert u(page, EXT_RAMDISK_IMAGE, 4) == u(page, EXT_RAMDISK_SIZE, 4) == u(page, EXT_CMD_LINE_PTR, 4) == 0
    assert u(page, SETUP_DATA, 8) == 0
    assert u(page, ACPI_RSDP_ADDR, 8) == 0
    assert page[SENTINEL] == 0
    assert page[:0x1F1] == bytes(0x1E8) + bytes([len(RAM_256M)]) + bytes(8)
    assert_writes_disjoint(plan)


def test_boot_params_copies_the_setup_header() -> None:
    image = bytearray(bzimage())
    image[0x1F1 + 1 : 0x26C] = bytes((i * 7 + 3) & 0xFF for i in range(0x26C - 0x1F2))
    struct.pack_into("<B", image, SETUP_SECTS, 1)
    for offset, code, value in (
        (BOOT_FLAG, "<H", 0xAA55), (JUMP, "<BB", (0xEB, 0x6A)), (HEADER, "<4s", b"HdrS"), (VERSION, "<H", 0x020F),
        (LOADFLAGS, "<B", 0x01), (KERNEL_ALIGNMENT, "<I", 0x200000), (XLOADFLAGS, "<H", 0x03),
        (CMDLINE_SIZE, "<I", 0x7FF), (PREF_ADDRESS, "<Q", 0x1000000), (INIT_SIZE, "<I", 0x200000),
        (SYSSIZE, "<I", 0x100), (INITRD_ADDR_MAX, "<I", 0x7FFFFFFF),
    ):  # fmt: skip
        struct.pack_into(code, image, offset, *(value if isinstance(value, tuple) else (value,)))
    page = zero_page(load(bytes(image)))
    for offset in range(0x1F1, 0x26C):
        if not any(start <= offset < start + size for start, size in WRITTEN.items()):
            assert page[offset] == image[offset], f"byte {offset:#x}"
    assert page[0x26C:0x290] == bytes(0x24)  # past the header's end: not copied


def test_e820_table_is_the_memory_map() -> None:
    memory_map = build_memory_map(5 * GIB)
    page = zero_page(load(bzimage(), memory_map=memory_map))
    assert page[E820_ENTRIES] == len(memory_map) == 5
    for index, entry in enumerate(memory_map):
        raw = page[E820_TABLE + index * E820_ENTRY_SIZE : E820_TABLE + (index + 1) * E820_ENTRY_SIZE]
        assert struct.unpack("<QQI", raw) == (entry.addr, entry.size, int(entry.type))
    end = E820_TABLE + len(memory_map) * E820_ENTRY_SIZE
    assert page[end:] == bytes(4096 - end)


def test_too_many_e820_entries() -> None:
    memory_map = (E820Entry(0, 0x9FC00, E820Type.RAM), E820Entry(MIB, 255 * MIB, E820Type.RAM)) + tuple(
        E820Entry(256 * MIB + index * 0x2000, 0x1000, E820Type.RESERVED) for index in range(127)
    )
    assert "the memory map has 129 entries; boot_params holds at most 128" in load_error(bzimage(), memory_map=memory_map)


def test_rsdp_address_is_passed() -> None:
    assert u(zero_page(load(bzimage(), rsdp_addr=0xE0000)), ACPI_RSDP_ADDR, 8) == 0xE0000


def test_default_cmdline_when_none_is_given() -> None:
    plan = load(bzimage())
    text = linux.DEFAULT_CMDLINE.encode() + b"\0"
    assert linux.DEFAULT_CMDLINE == "console=ttyS0 reboot=k panic=-1"
    assert peek(plan, layout.CMDLINE_START, len(text)) == text


def test_a_given_cmdline_is_used_as_is() -> None:
    plan = load(bzimage(), cmdline="quiet")
    assert peek(plan, layout.CMDLINE_START, 6) == b"quiet\0"


def test_no_initrd_means_zero_ramdisk_fields() -> None:
    page = zero_page(load(bzimage()))
    assert u(page, RAMDISK_IMAGE, 4) == u(page, RAMDISK_SIZE, 4) == 0


# --- where things go -------------------------------------------------------------------------------


def test_loads_at_pref_address() -> None:
    plan = load(bzimage(pref_address=0x2000000))
    assert plan.kernel_start == 0x2000000 and plan.entry.entry == 0x2000200
    assert plan.kernel_end == 0x2000000 + 0x200000


def test_pref_address_below_1_mib_loads_at_1_mib() -> None:
    plan = load(bzimage(pref_address=0x10000, relocatable_kernel=1, kernel_alignment=0x1000))
    assert plan.kernel_start == layout.HIMEM_START and plan.entry.entry == layout.HIMEM_START + 0x200


def test_relocatable_kernel_runs_from_its_aligned_load_address() -> None:
    header = linux.parse_header(Path("k"), bzimage(pref_address=0))
    assert linux.runtime_start(header, layout.HIMEM_START) == 0x200000  # align_up(1 MiB, 2 MiB)


def test_non_relocatable_kernel_runs_at_pref_address() -> None:
    header = linux.parse_header(Path("k"), bzimage(relocatable_kernel=0, pref_address=0x1000000))
    assert linux.runtime_start(header, layout.HIMEM_START) == 0x1000000
    assert load(bzimage(relocatable_kernel=0)).kernel_start == 0x1000000


def test_initrd_goes_to_the_top_of_ram() -> None:
    module = initrd(0x2800)  # not a page multiple: the start is still page aligned
    page = zero_page(load(bzimage(), initrd=module))
    top = 256 * MIB
    assert u(page, RAMDISK_IMAGE, 4) == (top - 0x2800) // 4096 * 4096


def test_initrd_stays_below_initrd_addr_max() -> None:
    page = zero_page(load(bzimage(initrd_addr_max=0x07FFFFFF), initrd=initrd()))
    assert u(page, RAMDISK_IMAGE, 4) + 0x3000 <= 0x08000000
    assert u(page, RAMDISK_IMAGE, 4) == 0x08000000 - 0x3000


def test_initrd_stays_below_the_mmio_hole() -> None:
    page = zero_page(load(bzimage(initrd_addr_max=0xFFFFFFFF), memory_map=build_memory_map(8 * GIB), initrd=initrd()))
    assert u(page, RAMDISK_IMAGE, 4) == layout.MMIO_HOLE_START - 0x3000
    assert u(page, EXT_RAMDISK_IMAGE, 4) == 0


def test_initrd_placement_skips_a_range_that_is_too_small() -> None:
    memory_map = (
        E820Entry(0, 0x9FC00, E820Type.RAM),
        E820Entry(MIB, 63 * MIB, E820Type.RAM),
        E820Entry(64 * MIB, 4 * MIB, E820Type.RESERVED),
        E820Entry(68 * MIB, 0x2000, E820Type.RAM),
    )
    gpa = Placement(Path("k"), memory_map).claim_high("x", 0x3000, limit=4 * GIB, above=0x1200000)
    assert gpa == 64 * MIB - 0x3000


def test_initrd_placement_stays_above_the_kernel() -> None:
    with pytest.raises(ImageError, match="between 0x3fff000 and 0x100000000"):
        Placement(Path("k"), build_memory_map(64 * MIB)).claim_high("x", 0x2000, limit=4 * GIB, above=0x3FFF000)


# --- PVH ------------------------------------------------------------------------------------------

PVH_ENTRY = KERNEL_ADDR + 0x10


def xen_note(note_type: int, desc: bytes, name: bytes = b"Xen\0") -> bytes:
    pad = lambda data: data + bytes(-len(data) % 4)  # noqa: E731
    return struct.pack("<III", len(name), len(desc), note_type) + pad(name) + pad(desc)


def pvh_elf(entry: int = PVH_ENTRY, *, desc: bytes | None = None, bits: int = 64, extra: bytes = b"") -> bytes:
    """An ELF with a text segment and a PT_NOTE segment whose second note is the PVH entry."""
    desc = struct.pack("<Q" if bits == 64 else "<I", entry) if desc is None else desc
    notes = xen_note(6, b"linux\0") + xen_note(18, desc) + extra
    return build_elf(
        [Seg(KERNEL_ADDR, HLT * 0x40), Seg(KERNEL_ADDR + 0x1000, notes, type=pvh.PT_NOTE)],
        entry=KERNEL_ADDR,
        bits=bits,
    )


def pvh_load(image: bytes, **fields: object) -> BootPlan:
    return pvh.load(Path("vmlinux"), image, request(**fields))


def pvh_error(image: bytes, **fields: object) -> str:
    with pytest.raises(ImageError) as info:
        pvh_load(image, **fields)
    return info.value.reason


@pytest.mark.parametrize("bits", [32, 64])
def test_pvh_note_is_found(bits: int) -> None:
    note = pvh.find_entry_note(pvh_elf(bits=bits))
    assert note is not None and note.entry == PVH_ENTRY and note.desc_size == bits // 8


def test_pvh_start_info() -> None:
    module = initrd()
    plan = pvh_load(pvh_elf(), cmdline="console=ttyS0", initrd=module, rsdp_addr=0xE0000)
    assert plan.format == "pvh"
    assert plan.entry.mode is CpuMode.PROTECTED and plan.entry.entry == PVH_ENTRY
    info_addr = plan.entry.regs["rbx"]
    assert info_addr == layout.MULTIBOOT_INFO_START
    fields = struct.unpack("<IIIIQQQQII", peek(plan, info_addr, 56))
    magic, version, flags, nr_modules, modlist, cmdline, rsdp, memmap, entries, reserved = fields
    assert (magic, version, flags, nr_modules, rsdp, reserved) == (0x336EC578, 1, 0, 1, 0xE0000, 0)
    assert cmdline == layout.CMDLINE_START and peek(plan, cmdline, 14) == b"console=ttyS0\0"
    paddr, size, string, mod_reserved = struct.unpack("<QQQQ", peek(plan, modlist, 32))
    assert size == len(module.data) and peek(plan, paddr, size) == module.data and mod_reserved == 0
    assert paddr % 4096 == 0 and paddr + size <= 64 * MIB and paddr >= plan.kernel_end
    assert peek(plan, string, len(module.string) + 1) == module.string.encode() + b"\0"
    assert entries == len(request().memory_map)
    for index, entry in enumerate(request().memory_map):
        assert struct.unpack("<QQII", peek(plan, memmap + 24 * index, 24)) == (entry.addr, entry.size, int(entry.type), 0)
    info = next(write for write in plan.writes if write.gpa == info_addr)
    for address in (modlist, memmap + 24 * entries - 1, string):
        assert info_addr <= address < info.end
    assert_writes_disjoint(plan)


def test_pvh_without_modules_or_rsdp() -> None:
    plan = pvh_load(pvh_elf())
    _, _, _, nr_modules, modlist, _, rsdp, _, _, _ = struct.unpack("<IIIIQQQQII", peek(plan, layout.MULTIBOOT_INFO_START, 56))
    assert (nr_modules, modlist, rsdp) == (0, 0, 0)
    text = linux.DEFAULT_CMDLINE.encode() + b"\0"
    assert peek(plan, layout.CMDLINE_START, len(text)) == text


def test_pvh_initrd_then_modules() -> None:
    module = Module(Path("extra"), b"\x55" * 0x1800, "extra arg")
    plan = pvh_load(pvh_elf(), initrd=initrd(), modules=(module,))
    nr_modules, modlist = struct.unpack("<IQ", peek(plan, layout.MULTIBOOT_INFO_START + 12, 12))
    assert nr_modules == 2
    first, second = (struct.unpack("<QQQQ", peek(plan, modlist + 32 * i, 32)) for i in range(2))
    assert first[1] == 0x3000 and second[1] == 0x1800
    assert second[0] + second[1] <= first[0]  # placed below the initrd
    assert peek(plan, second[2], 10) == b"extra arg\0"


def test_pvh_kernel_segments_are_loaded() -> None:
    plan = pvh_load(pvh_elf())
    assert peek(plan, KERNEL_ADDR, 0x40) == HLT * 0x40


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (pvh_elf(desc=b"\x10\0\x10"), "has a 3-byte descriptor"),
        (pvh_elf(entry=0x1_0000_0000), "is not below 4 GiB"),
        (pvh_elf(entry=0x200000), "is not inside any PT_LOAD segment"),
        (build_elf([Seg(KERNEL_ADDR, HLT)], entry=KERNEL_ADDR), "has no XEN_ELFNOTE_PHYS32_ENTRY note"),
    ],
)
def test_pvh_rejections(image: bytes, message: str) -> None:
    assert message in pvh_error(image)


def test_pvh_refuses_long_mode_and_overrides() -> None:
    assert "entered in protected mode, but long mode" in pvh_error(pvh_elf(), mode=CpuMode.LONG)
    assert "applies to flat binaries only" in pvh_error(pvh_elf(), load_addr=0x100000)


def test_pvh_module_that_cannot_fit() -> None:
    reason = pvh_error(pvh_elf(), initrd=initrd(64 * MIB))
    assert "PVH module 0 (initrd.img) (0x4000000 bytes) does not fit in guest RAM" in reason


def test_malformed_notes_are_not_pvh() -> None:
    # A note whose descriptor runs past the segment: detection gives up quietly.
    broken = build_elf([Seg(KERNEL_ADDR, HLT), Seg(0x200000, struct.pack("<III", 4, 0x1000, 18) + b"Xen\0", type=4)], entry=KERNEL_ADDR)
    assert pvh.find_entry_note(broken) is None
    assert detect(Path("k"), broken) == "elf"
    assert pvh.find_entry_note(b"\x7fELF") is None


def test_other_xen_notes_are_not_the_entry() -> None:
    image = build_elf([Seg(KERNEL_ADDR, HLT), Seg(0x200000, xen_note(17, b"\1\0\0\0") + xen_note(18, b"\0" * 8, b"Xem\0"), type=4)], entry=KERNEL_ADDR)
    assert pvh.find_entry_note(image) is None


@pytest.fixture(scope="module")
def debian_vmlinux() -> tuple[Path, bytes]:
    path = linux_guest_file("vmlinux")
    return path, path.read_bytes()


def test_debian_vmlinux_is_pvh(debian_vmlinux: tuple[Path, bytes], debian_initrd: Module) -> None:
    path, image = debian_vmlinux
    assert detect(path, image) == "pvh"
    plan = load_image(path, image, request(memory_map=RAM_256M, initrd=debian_initrd))
    note = pvh.find_entry_note(image)
    assert note is not None and plan.entry.entry == note.entry
    assert plan.entry.mode is CpuMode.PROTECTED
    text = plan.writes[0]
    assert text.gpa <= plan.entry.entry < text.end  # pvh_start_xen is in the kernel text
    if shutil.which("readelf"):
        notes = subprocess.run(["readelf", "-nW", str(path)], capture_output=True, text=True, check=True).stdout
        line = next(line for line in notes.splitlines() if "(0x00000012)" in line)
        assert int.from_bytes(bytes.fromhex(line.split("description data:")[1].replace(" ", "")), "little") == note.entry
    assert_writes_disjoint(plan)


# --- detection and dispatch ----------------------------------------------------------------------


def test_formats_include_linux_and_pvh() -> None:
    assert FORMATS == ("auto", "flat", "elf", "multiboot", "linux", "pvh")


def test_bzimage_is_detected_as_linux() -> None:
    assert detect(Path("vmlinuz.bin"), bzimage()) == "linux"
    assert load_image(Path("bzImage"), bzimage(), request(memory_map=RAM_256M)).format == "linux"


def test_elf_with_the_pvh_note_is_pvh() -> None:
    assert detect(Path("vmlinux"), pvh_elf()) == "pvh"
    assert load_image(Path("vmlinux"), pvh_elf(), request()).format == "pvh"


def test_elf_with_the_pvh_note_forced_as_elf() -> None:
    assert load_image(Path("vmlinux"), pvh_elf(), request(), "elf").format == "elf"


def test_multiboot_wins_over_the_pvh_note() -> None:
    notes = xen_note(18, struct.pack("<I", KERNEL_ADDR + 12))
    image = build_elf(
        [Seg(KERNEL_ADDR, multiboot_header() + HLT * 16), Seg(KERNEL_ADDR + 0x1000, notes, type=pvh.PT_NOTE)],
        entry=KERNEL_ADDR + 12,
        bits=32,
    )
    assert detect(Path("kernel"), image) == "multiboot"
    assert load_image(Path("kernel"), image, request(), "pvh").format == "pvh"


@pytest.mark.parametrize(
    ("image", "kind"),
    [(build_elf([Seg(KERNEL_ADDR, HLT)], entry=KERNEL_ADDR), "elf"), (aout_kernel(), "multiboot"), (HLT * 16, "flat")],
)
def test_initrd_for_a_format_that_cannot_take_one(image: bytes, kind: str) -> None:
    with pytest.raises(ImageError) as info:
        load_image(Path("guest.bin"), image, request(initrd=initrd()))
    assert f"is for Linux kernels (a bzImage or a PVH vmlinux), and this is a {kind} image" in info.value.reason
    assert ("--module" in info.value.reason) == (kind == "multiboot")


def test_forced_linux_on_an_elf() -> None:
    with pytest.raises(ImageError, match="is not a Linux bzImage"):
        load_image(Path("k"), pvh_elf() + bytes(0x400), request(), "linux")


def test_request_helper_is_a_load_request() -> None:
    assert isinstance(request(), LoadRequest)


# --- the initramfs make linux-guest builds -----------------------------------------------------


def newc_members(archive: bytes) -> dict[str, tuple[int, bytes]]:
    """name -> (mode, data) of a newc cpio archive, read as the kernel's buffer-format.rst says."""
    members, position = {}, 0
    while True:
        header = archive[position : position + 110]
        assert header[:6] == b"070701", f"bad newc magic at {position:#x}"
        fields = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name_end = position + 110 + namesize
        name = archive[position + 110 : name_end - 1].decode()
        data_start = (name_end + 3) // 4 * 4
        if name == "TRAILER!!!":
            return members
        members[name] = (mode, archive[data_start : data_start + size])
        position = (data_start + size + 3) // 4 * 4


def test_initramfs_holds_busybox_and_an_init_that_prints_the_marker() -> None:
    members = newc_members(gzip.decompress(linux_guest_file("initramfs.cpio.gz").read_bytes()))
    assert set(members) >= {".", "bin", "bin/busybox", "bin/sh", "dev", "dev/console", "proc", "sys", "init"}
    init_mode, init = members["init"]
    assert init_mode == 0o100755 and init.startswith(b"#!/bin/sh\n")
    assert b"echo PYKVM-LINUX-GUEST-OK" in init and b"poweroff -f" in init
    assert members["bin/sh"] == (0o120777, b"busybox")
    assert members["bin/busybox"][1][:4] == b"\x7fELF"
    assert members["dev/console"][0] == 0o020600


# --- the 16-bit entry ------------------------------------------------------------------------------


def test_real_mode_entry_runs_the_setup_at_0x90000() -> None:
    image = bzimage()
    plan = load(image, mode=CpuMode.REAL, cmdline="console=ttyS0")
    entry = plan.entry
    assert entry.mode is CpuMode.REAL
    assert (entry.segment, entry.data_segment, entry.entry) == (0x9020, 0x9000, 0x90200)  # CS = seg + 0x20, IP 0
    assert dict(entry.regs) == {"rsp": 0xE000}
    setup = peek(plan, 0x90000, 2 * 512)
    assert u(setup, CMD_LINE_PTR, 4) == 0x9E000 and u(setup, HEAP_END_PTR, 2) == 0xE000 - 0x200
    assert setup[TYPE_OF_LOADER] == 0xFF and setup[LOADFLAGS] == 0x81
    assert u(setup, CODE32_START, 4) == plan.kernel_start == 0x1000000
    assert setup[0x202:0x206] == b"HdrS" and setup[:0x1F1] == image[:0x1F1]
    assert peek(plan, 0x9E000, 14) == b"console=ttyS0\0"
    assert peek(plan, 0x1000000, 0x1000) == image[2 * 512 :]
    assert_writes_disjoint(plan)


def test_real_mode_entry_with_a_long_command_line_moves_the_setup_lower() -> None:
    # At 0x90000 the command line (from 0x9e000) would run into the EBDA at 0x9fc00.
    plan = load(bzimage(cmdline_size=0x2000), mode=CpuMode.REAL, cmdline="x" * 0x1C00)
    setup = plan.entry.data_segment << 4
    assert setup != 0x90000 and setup + 0xE000 + 0x1C01 <= layout.EBDA_START
    assert u(peek(plan, setup, 1024), CMD_LINE_PTR, 4) == setup + 0xE000


def test_real_mode_entry_refuses_a_setup_larger_than_32_kib() -> None:
    reason = load_error(bzimage(setup_sects=64, kernel_size=0x1000), mode=CpuMode.REAL)
    assert "the real-mode setup is 0x8200 bytes (setup_sects 64), more than the 0x8000" in reason


def test_command_line_bytes_reach_the_kernel_unchanged() -> None:
    plan = load(bzimage(), cmdline=b"root=/dev/\xe9")
    assert peek(plan, layout.CMDLINE_START, 12) == b"root=/dev/\xe9\0"
