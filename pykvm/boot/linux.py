"""Linux bzImage kernels, booted through the x86 boot protocol's 64-bit entry point.

The protocol is the kernel's Documentation/arch/x86/boot.rst.  A bzImage is the
real-mode setup (the boot sector and ``setup_sects`` sectors, whose setup header
at 0x1f1 describes the kernel) followed by the protected-mode kernel: a
decompressor carrying the compressed vmlinux.  Like rust-vmm's linux-loader and
Firecracker, pykvm never runs the 16-bit setup code: it reads and checks the
setup header (every field it relies on, before anything is placed, one
:class:`ImageError` per failure, naming the field), loads the protected-mode
kernel, builds ``struct boot_params`` (the "zero page": the setup header, then
the command line, initrd and e820 map fields) and enters the kernel's 64-bit
entry point, 0x200 past the load address, in long mode with RSI pointing at
the zero page ("64-bit BOOT PROTOCOL" in boot.rst).

Where the kernel loads: at ``pref_address`` (LOAD_PHYSICAL_ADDR, 16 MiB for
distribution kernels) when it is above 1 MiB, else at 1 MiB.  Firecracker and
QEMU load at 1 MiB, which works, but the decompressor's first step then is to
move itself up: it runs from ``max(align_up(load address, kernel_alignment),
LOAD_PHYSICAL_ADDR)`` (arch/x86/boot/compressed/head_64.S) and needs
``init_size`` bytes from there.  Loading at ``pref_address`` is what boot.rst
asks of a relocating loader ("should attempt to load at this address if
possible"), is ``kernel_alignment``-aligned where 1 MiB is not, and makes the
loaded image and the kernel's working area one range,
``[pref_address, pref_address + init_size)``, which is what is checked
against guest RAM.  Loading lower would not save any memory: the kernel
needs that range either way.

The initrd goes page aligned as high as it can: below ``initrd_addr_max + 1``,
below 4 GiB (pykvm never uses the ``ext_*`` high halves, so it does not rely on
XLF_CAN_BE_LOADED_ABOVE_4G), inside one RAM range of the memory map (so below
the MMIO hole) and above the kernel's working area.  QEMU places it the same way.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import ImageError
from ..x86 import layout
from ..x86.e820 import E820Entry, E820Type
from .flat import reject_overrides
from .plan import BOOT_AREA, BootPlan, CpuMode, EntryState, LoadRequest, MemoryWrite, Module, Reserved, check_clear_of, check_in_ram

FORMAT = "linux"

# The command line a Linux guest gets when none is given: the serial console, reboot through
# the keyboard controller (pykvm's i8042 ends the run), and reboot at once on panic.
DEFAULT_CMDLINE = "console=ttyS0 reboot=k panic=-1"

SECTOR_SIZE = 512
# setup_sects = 0 means 4 (boot.rst: "for backwards compatibility").
DEFAULT_SETUP_SECTS = 4

# The setup header: where it starts in the image and in boot_params (the same offset), where
# the "HdrS" magic is, and the jump instruction whose offset byte gives the header's length.
SETUP_HEADER_START = 0x1F1
HEADER_MAGIC = b"HdrS"
HEADER_MAGIC_OFFSET = 0x202
JUMP_OFFSET_BYTE = 0x201
BOOT_FLAG = 0xAA55

# Boot protocol versions (major << 8 | minor) that matter here.
MIN_VERSION = 0x0206  # cmdline_size
XLOADFLAGS_VERSION = 0x020C  # xloadflags, and so the 64-bit entry point

# loadflags.
LOADED_HIGH = 1 << 0
CAN_USE_HEAP = 1 << 7
# xloadflags.
XLF_KERNEL_64 = 1 << 0
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1  # not needed: pykvm places everything below 4 GiB
# The 64-bit entry point is this far past the start of the protected-mode kernel.
ENTRY_64_OFFSET = 0x200

# type_of_loader 0xff: "undefined", for a boot loader without an assigned ID (as Firecracker).
LOADER_UNDEFINED = 0xFF
# vid_mode 0xffff: "normal" (80x25).  The 64-bit entry skips the video setup anyway.
VID_MODE_NORMAL = 0xFFFF
# heap_end_ptr: where the 16-bit setup code's heap ends, minus 0x200, from the start of the
# real-mode code.  pykvm does not run that code; kvmtool's value, with CAN_USE_HEAP, as the
# protocol asks of every loader.
HEAP_END_PTR = 0xFE00

# struct boot_params (arch/x86/include/uapi/asm/bootparam.h): the zero page.
ZERO_PAGE_SIZE = 4 * layout.KIB
BP_ACPI_RSDP_ADDR = 0x070
BP_EXT_RAMDISK_IMAGE = 0x0C0
BP_EXT_RAMDISK_SIZE = 0x0C4
BP_EXT_CMD_LINE_PTR = 0x0C8
BP_E820_ENTRIES = 0x1E8
BP_SETUP_HEADER_END = 0x290  # edd_mbr_sig_buffer follows the header's padding
BP_E820_TABLE = 0x2D0
E820_MAX_ENTRIES_ZEROPAGE = 128
E820_ENTRY = struct.Struct("<QQI")

# Setup header fields pykvm writes, at their boot_params offsets.
HDR_VID_MODE = 0x1FA
HDR_TYPE_OF_LOADER = 0x210
HDR_LOADFLAGS = 0x211
HDR_RAMDISK_IMAGE = 0x218
HDR_RAMDISK_SIZE = 0x21C
HDR_HEAP_END_PTR = 0x224
HDR_CMD_LINE_PTR = 0x228
HDR_SETUP_DATA = 0x250

U8, U16, U32, U64 = (struct.Struct(f"<{code}") for code in "BHIQ")
U32_MASK = 0xFFFF_FFFF
# ramdisk_image and cmd_line_ptr are 32-bit; pykvm keeps what they point at below 4 GiB.
LOW_4G = 4 * layout.GIB


@dataclass(frozen=True)
class Field:
    """A setup header field pykvm reads: its offset (in the image and in boot_params) and encoding."""

    offset: int
    encoding: struct.Struct


# The fields pykvm reads, by their boot.rst names.  All exist from protocol 2.12 (xloadflags) on,
# which the 64-bit entry point needs.
FIELDS = {
    "setup_sects": Field(0x1F1, U8),
    "syssize": Field(0x1F4, U32),
    "boot_flag": Field(0x1FE, U16),
    "version": Field(0x206, U16),
    "loadflags": Field(0x211, U8),
    "initrd_addr_max": Field(0x22C, U32),
    "kernel_alignment": Field(0x230, U32),
    "relocatable_kernel": Field(0x234, U8),
    "xloadflags": Field(0x236, U16),
    "cmdline_size": Field(0x238, U32),
    "pref_address": Field(0x258, U64),
    "init_size": Field(0x260, U32),
}
# The header must reach at least this far for every field above to be in it.
FIELDS_END = max(field.offset + field.encoding.size for field in FIELDS.values())


@dataclass(frozen=True)
class SetupHeader:
    """The checked setup header of a bzImage: what pykvm needs to load and enter it."""

    setup_sects: int
    syssize: int
    version: int
    loadflags: int
    initrd_addr_max: int
    kernel_alignment: int
    relocatable_kernel: bool
    xloadflags: int
    cmdline_size: int
    pref_address: int
    init_size: int
    header_end: int  # the end of the setup header, as an image (and boot_params) offset

    @property
    def kernel_offset(self) -> int:
        """Where the protected-mode kernel starts in the file."""
        return (self.setup_sects + 1) * SECTOR_SIZE

    @property
    def version_text(self) -> str:
        return format_version(self.version)


@dataclass(frozen=True)
class KernelPlacement:
    """Where the protected-mode kernel loads and the range it uses until it reads the memory map."""

    load_addr: int
    size: int  # the bytes loaded
    runtime_start: int
    runtime_end: int  # runtime_start + init_size

    @property
    def end(self) -> int:
        """The end of everything the kernel occupies while it boots."""
        return max(self.load_addr + self.size, self.runtime_end)


def format_version(version: int) -> str:
    """A boot protocol version as boot.rst writes it (0x020f -> "2.15")."""
    return f"{version >> 8}.{version & 0xFF:02d}"


def _align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def _align_down(value: int, alignment: int) -> int:
    return value // alignment * alignment


def is_bzimage(image: bytes) -> bool:
    """Whether ``image`` carries the boot protocol's "HdrS" magic at 0x202."""
    return image[HEADER_MAGIC_OFFSET : HEADER_MAGIC_OFFSET + len(HEADER_MAGIC)] == HEADER_MAGIC


def _read(image: bytes, name: str) -> int:
    field = FIELDS[name]
    (value,) = field.encoding.unpack_from(image, field.offset)
    return int(value)


# --- the setup header --------------------------------------------------------------------


def _check_magic(path: Path, image: bytes) -> None:
    if len(image) < HEADER_MAGIC_OFFSET + len(HEADER_MAGIC):
        raise ImageError(str(path), f"is too short ({len(image)} bytes) to hold a Linux setup header")
    if not is_bzimage(image):
        found = image[HEADER_MAGIC_OFFSET : HEADER_MAGIC_OFFSET + len(HEADER_MAGIC)]
        raise ImageError(
            str(path),
            f"is not a Linux bzImage: the setup header magic (header, at 0x202) is {found!r}, not {HEADER_MAGIC!r} "
            f"(a kernel without it is an old zImage, which pykvm does not boot)",
        )


def _check_version(path: Path, image: bytes) -> int:
    if len(image) < FIELDS["version"].offset + FIELDS["version"].encoding.size:
        raise ImageError(str(path), "the setup header is cut short before its version field")
    version = _read(image, "version")
    if version < MIN_VERSION:
        raise ImageError(
            str(path),
            f"uses boot protocol {format_version(version)} (version {version:#06x}); "
            f"pykvm needs {format_version(MIN_VERSION)} or later",
        )
    return version


def _header_end(path: Path, image: bytes) -> int:
    """The end of the setup header: 0x202 + the jump instruction's offset byte (boot.rst)."""
    end = HEADER_MAGIC_OFFSET + image[JUMP_OFFSET_BYTE]
    if end < FIELDS_END:
        raise ImageError(
            str(path),
            f"the setup header ends at {end:#x} (0x202 + the byte at 0x201), before the fields of its "
            f"protocol version end at {FIELDS_END:#x}",
        )
    if end > BP_SETUP_HEADER_END:
        raise ImageError(
            str(path),
            f"the setup header ends at {end:#x} (0x202 + the byte at 0x201), past its room in boot_params "
            f"(up to {BP_SETUP_HEADER_END:#x})",
        )
    if end > len(image):
        raise ImageError(str(path), f"the setup header (up to {end:#x}) is cut short at {len(image):#x} bytes")
    return end


def _check_64bit_entry(path: Path, version: int) -> None:
    if version < XLOADFLAGS_VERSION:
        raise ImageError(
            str(path),
            f"uses boot protocol {format_version(version)}, which has no xloadflags (added in "
            f"{format_version(XLOADFLAGS_VERSION)}) and so no 64-bit entry point, which is how pykvm enters Linux",
        )


def _check_flags(path: Path, loadflags: int, xloadflags: int) -> None:
    if not loadflags & LOADED_HIGH:
        raise ImageError(
            str(path),
            f"loadflags {loadflags:#04x} lacks LOADED_HIGH: the kernel loads at 0x10000 (a zImage), "
            f"which pykvm does not boot",
        )
    if not xloadflags & XLF_KERNEL_64:
        raise ImageError(
            str(path),
            f"xloadflags {xloadflags:#06x} lacks XLF_KERNEL_64: the kernel has no 64-bit entry point "
            f"(a 32-bit kernel?), which is how pykvm enters Linux",
        )


def _check_sizes(path: Path, image: bytes, header: SetupHeader) -> None:
    kernel_size = len(image) - header.kernel_offset
    if kernel_size <= ENTRY_64_OFFSET:
        raise ImageError(
            str(path),
            f"has no protected-mode kernel past its setup (setup_sects {header.setup_sects}: the kernel would "
            f"start at {header.kernel_offset:#x}, the file has {len(image):#x} bytes)",
        )
    if header.syssize * 16 > kernel_size:
        raise ImageError(
            str(path),
            f"is cut short: syssize says the protected-mode kernel is {header.syssize * 16:#x} bytes, "
            f"the file holds {kernel_size:#x} of it",
        )
    if header.init_size < kernel_size:
        raise ImageError(
            str(path),
            f"init_size {header.init_size:#x} is smaller than the protected-mode kernel ({kernel_size:#x} bytes)",
        )


def _check_alignment(path: Path, header: SetupHeader) -> None:
    alignment = header.kernel_alignment
    if header.relocatable_kernel and (alignment == 0 or alignment & (alignment - 1)):
        raise ImageError(str(path), f"kernel_alignment {alignment:#x} is not a power of two")


def _check_cmdline_size(path: Path, cmdline_size: int) -> None:
    if cmdline_size == 0:
        raise ImageError(str(path), "cmdline_size is 0: the kernel takes no command line")


def parse_header(path: Path, image: bytes) -> SetupHeader:
    """Read and check a bzImage's setup header (nothing about guest memory is checked here)."""
    _check_magic(path, image)
    version = _check_version(path, image)
    _check_64bit_entry(path, version)
    header_end = _header_end(path, image)
    boot_flag = _read(image, "boot_flag")
    if boot_flag != BOOT_FLAG:
        raise ImageError(str(path), f"boot_flag (at 0x1fe) is {boot_flag:#06x}, not {BOOT_FLAG:#06x}")
    _check_flags(path, _read(image, "loadflags"), _read(image, "xloadflags"))
    header = SetupHeader(
        setup_sects=_read(image, "setup_sects") or DEFAULT_SETUP_SECTS,
        syssize=_read(image, "syssize"),
        version=version,
        loadflags=_read(image, "loadflags"),
        initrd_addr_max=_read(image, "initrd_addr_max"),
        kernel_alignment=_read(image, "kernel_alignment"),
        relocatable_kernel=bool(_read(image, "relocatable_kernel")),
        xloadflags=_read(image, "xloadflags"),
        cmdline_size=_read(image, "cmdline_size"),
        pref_address=_read(image, "pref_address"),
        init_size=_read(image, "init_size"),
        header_end=header_end,
    )
    _check_sizes(path, image, header)
    _check_alignment(path, header)
    _check_cmdline_size(path, header.cmdline_size)
    return header


# --- placement -----------------------------------------------------------------------------


def choose_load_addr(header: SetupHeader) -> int:
    """``pref_address`` when it is above 1 MiB, else 1 MiB (see the module documentation)."""
    return header.pref_address if header.pref_address > layout.HIMEM_START else layout.HIMEM_START


def runtime_start(header: SetupHeader, load_addr: int) -> int:
    """Where the kernel runs from while it decompresses itself.

    boot.rst: ``align_up(load address, kernel_alignment)`` for a relocatable kernel,
    else ``pref_address``; the decompressor also never goes below LOAD_PHYSICAL_ADDR,
    which is ``pref_address`` (head_64.S).
    """
    if header.relocatable_kernel:
        return max(_align_up(load_addr, header.kernel_alignment), header.pref_address)
    return header.pref_address or load_addr


def place_kernel(
    path: Path, header: SetupHeader, kernel_size: int, memory_map: tuple[E820Entry, ...], reserved: tuple[Reserved, ...]
) -> KernelPlacement:
    """Where the protected-mode kernel loads, checked against guest RAM and the ``reserved`` ranges."""
    load_addr = choose_load_addr(header)
    start = runtime_start(header, load_addr)
    placement = KernelPlacement(load_addr, kernel_size, start, start + header.init_size)
    if placement.end > layout.IDENTITY_MAP_END:
        raise ImageError(
            str(path),
            f"the kernel would occupy up to {placement.end:#x} (pref_address {header.pref_address:#x}, "
            f"init_size {header.init_size:#x}), beyond the identity map of the 64-bit entry ({layout.IDENTITY_MAP_END:#x})",
        )
    for gpa, size in ((load_addr, kernel_size), (start, header.init_size)):
        if not _in_ram(gpa, size, memory_map):
            needed = _align_up(placement.end, layout.MIB) // layout.MIB
            raise ImageError(
                str(path),
                f"the kernel needs guest RAM up to {placement.end:#x} while it boots (loaded at {load_addr:#x}, "
                f"it works in init_size {header.init_size:#x} bytes from {start:#x}); "
                f"give the machine at least {needed} MiB with -m",
            )
    check_clear_of(path, "the protected-mode kernel", load_addr, kernel_size, reserved)
    check_clear_of(path, f"the kernel's working area (init_size from {start:#x})", start, header.init_size, reserved)
    return placement


def _in_ram(gpa: int, size: int, memory_map: tuple[E820Entry, ...]) -> bool:
    return any(e.type == E820Type.RAM and e.addr <= gpa and gpa + size <= e.end for e in memory_map)


def place_high(
    path: Path, what: str, size: int, *, limit: int, above: int, memory_map: tuple[E820Entry, ...], why_limit: str
) -> int:
    """The highest page-aligned address for ``size`` bytes inside one RAM range, below ``limit`` and above ``above``.

    Shared with the PVH loader, which places its initrd module the same way.
    """
    if size == 0:
        raise ImageError(str(path), f"{what} is empty")
    ram = sorted((entry for entry in memory_map if entry.type == E820Type.RAM), key=lambda entry: entry.addr)
    for entry in reversed(ram):
        top = min(entry.end, limit)
        if top < size:
            continue
        gpa = _align_down(top - size, layout.PAGE_SIZE)
        if gpa >= max(entry.addr, above):
            return gpa
    raise ImageError(
        str(path),
        f"{what} ({size:#x} bytes) does not fit in guest RAM between the kernel's end {above:#x} and "
        f"{limit:#x} ({why_limit}); give the machine more memory with -m",
    )


def place_initrd(path: Path, header: SetupHeader, initrd: Module, kernel: KernelPlacement, memory_map: tuple[E820Entry, ...]) -> int:
    """The initrd's address: as high as allowed (see the module documentation)."""
    limit = min(header.initrd_addr_max + 1, LOW_4G)
    return place_high(
        path,
        f"the initrd {initrd.path}",
        len(initrd.data),
        limit=limit,
        above=_align_up(kernel.end, layout.PAGE_SIZE),
        memory_map=memory_map,
        why_limit=f"initrd_addr_max {header.initrd_addr_max:#x}" if limit < LOW_4G else "4 GiB",
    )


# --- the command line and the zero page ----------------------------------------------------


def encode_cmdline(path: Path, cmdline: str, cmdline_size: int) -> bytes:
    """The command line, NUL-terminated, checked against the kernel's ``cmdline_size``."""
    data = cmdline.encode()
    if b"\0" in data:
        raise ImageError(str(path), "the kernel command line contains a NUL character")
    limit = min(cmdline_size, layout.CMDLINE_MAX_SIZE - 1)
    if len(data) > limit:
        where = f"this kernel's cmdline_size is {cmdline_size}" if limit == cmdline_size else (
            f"pykvm reserves {layout.CMDLINE_MAX_SIZE} bytes for it"
        )
        raise ImageError(str(path), f"the kernel command line is {len(data)} bytes, more than {limit} ({where})")
    return data + b"\0"


def encode_e820(path: Path, memory_map: tuple[E820Entry, ...]) -> bytes:
    """The memory map as boot_params' e820_table entries (u64 addr, u64 size, u32 type)."""
    if len(memory_map) > E820_MAX_ENTRIES_ZEROPAGE:
        raise ImageError(
            str(path),
            f"the memory map has {len(memory_map)} entries; boot_params holds at most {E820_MAX_ENTRIES_ZEROPAGE}",
        )
    return b"".join(E820_ENTRY.pack(entry.addr, entry.size, int(entry.type)) for entry in memory_map)


def build_boot_params(
    image: bytes,
    header: SetupHeader,
    *,
    cmdline_addr: int,
    initrd_addr: int,
    initrd_size: int,
    e820: bytes,
    e820_entries: int,
    rsdp_addr: int | None,
) -> bytes:
    """The zero page: zeros, the image's setup header, then the fields a boot loader fills in."""
    page = bytearray(ZERO_PAGE_SIZE)
    page[SETUP_HEADER_START : header.header_end] = image[SETUP_HEADER_START : header.header_end]
    U8.pack_into(page, HDR_TYPE_OF_LOADER, LOADER_UNDEFINED)
    U8.pack_into(page, HDR_LOADFLAGS, header.loadflags | CAN_USE_HEAP)
    U16.pack_into(page, HDR_HEAP_END_PTR, HEAP_END_PTR)
    U16.pack_into(page, HDR_VID_MODE, VID_MODE_NORMAL)
    U32.pack_into(page, HDR_CMD_LINE_PTR, cmdline_addr & U32_MASK)
    U32.pack_into(page, HDR_RAMDISK_IMAGE, initrd_addr & U32_MASK)
    U32.pack_into(page, HDR_RAMDISK_SIZE, initrd_size & U32_MASK)
    U64.pack_into(page, HDR_SETUP_DATA, 0)
    U32.pack_into(page, BP_EXT_CMD_LINE_PTR, cmdline_addr >> 32)
    U32.pack_into(page, BP_EXT_RAMDISK_IMAGE, initrd_addr >> 32)
    U32.pack_into(page, BP_EXT_RAMDISK_SIZE, initrd_size >> 32)
    U64.pack_into(page, BP_ACPI_RSDP_ADDR, rsdp_addr or 0)
    U8.pack_into(page, BP_E820_ENTRIES, e820_entries)
    page[BP_E820_TABLE : BP_E820_TABLE + len(e820)] = e820
    return bytes(page)


# --- the loader ----------------------------------------------------------------------------


def _check_request(path: Path, request: LoadRequest) -> None:
    if request.modules:
        raise ImageError(
            str(path),
            f"a Linux kernel takes one initrd (--initrd), not multiboot modules (--module: {len(request.modules)} given)",
        )
    reject_overrides(path, request, "a Linux bzImage")
    if request.mode is not None and request.mode != CpuMode.LONG:
        raise ImageError(
            str(path),
            f"is a Linux bzImage, entered at its 64-bit entry point in long mode, but {request.mode.value} mode was requested",
        )


def load(path: Path, image: bytes, request: LoadRequest) -> BootPlan:
    """Load a bzImage, its initrd and command line, and enter its 64-bit entry point."""
    header = parse_header(path, image)
    _check_request(path, request)
    cmdline = encode_cmdline(path, request.cmdline or DEFAULT_CMDLINE, header.cmdline_size)
    check_in_ram(path, "the kernel command line", layout.CMDLINE_START, len(cmdline), request.memory_map)
    check_in_ram(path, "the zero page (boot_params)", layout.ZERO_PAGE_START, ZERO_PAGE_SIZE, request.memory_map)
    reserved = (
        BOOT_AREA,
        Reserved(layout.CMDLINE_START, layout.CMDLINE_START + len(cmdline), "the kernel command line"),
    )
    kernel_data = image[header.kernel_offset :]
    kernel = place_kernel(path, header, len(kernel_data), request.memory_map, reserved)
    writes = [MemoryWrite(kernel.load_addr, kernel_data)]
    initrd_addr = initrd_size = 0
    if request.initrd is not None:
        initrd_addr = place_initrd(path, header, request.initrd, kernel, request.memory_map)
        initrd_size = len(request.initrd.data)
        writes.append(MemoryWrite(initrd_addr, request.initrd.data))
    e820 = encode_e820(path, request.memory_map)
    zero_page = build_boot_params(
        image,
        header,
        cmdline_addr=layout.CMDLINE_START,
        initrd_addr=initrd_addr,
        initrd_size=initrd_size,
        e820=e820,
        e820_entries=len(request.memory_map),
        rsdp_addr=request.rsdp_addr,
    )
    writes += [MemoryWrite(layout.ZERO_PAGE_START, zero_page), MemoryWrite(layout.CMDLINE_START, cmdline)]
    # boot.rst asks for CS = __BOOT_CS (0x10) and DS = __BOOT_DS (0x18) at the 32-bit entry.  The
    # 64-bit entry only needs flat segments: startup_64 loads its own GDT before it relies on a
    # selector.  pykvm's long-mode entry uses its own flat GDT (64-bit code 0x08, data 0x18), as
    # Firecracker does.  Interrupts are off (RFLAGS.IF = 0) and the identity map covers 4 GiB:
    # the kernel, its init_size area, the zero page and the command line.
    return BootPlan(
        format=FORMAT,
        writes=tuple(writes),
        entry=EntryState(
            mode=CpuMode.LONG,
            entry=kernel.load_addr + ENTRY_64_OFFSET,
            regs={"rsi": layout.ZERO_PAGE_START},
        ),
        kernel_start=kernel.load_addr,
        kernel_end=kernel.end,
    )
