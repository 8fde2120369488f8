"""Linux bzImage kernels, booted through the x86 boot protocol: 64-bit, 32-bit or 16-bit entry.

The protocol is the kernel's Documentation/arch/x86/boot.rst.  A bzImage is the
real-mode setup (the boot sector and ``setup_sects`` sectors, whose setup header
at 0x1f1 describes the kernel) followed by the protected-mode kernel: a
decompressor carrying the compressed vmlinux.  The setup header is read and
checked first (every field pykvm relies on, before anything is placed, one
:class:`ImageError` per failure, naming the field).  ``syssize`` counts 16-byte
paragraphs rounded up, so the file may hold up to 15 bytes less than
``syssize * 16``; real loaders load what the file holds, as pykvm does.

Three ways in, as boot.rst describes them:

- **64-bit** (the default for a kernel whose xloadflags has XLF_KERNEL_64): like
  rust-vmm's linux-loader and Firecracker, pykvm builds ``struct boot_params``
  (the "zero page": the setup header, then the command line, initrd and e820
  fields) and enters the protected-mode kernel 0x200 past its load address in
  long mode, RSI pointing at the zero page;
- **32-bit** (the default for a kernel without XLF_KERNEL_64, or ``mode=protected``):
  the same zero page, and the kernel entered at its load address in 32-bit
  protected mode with paging off, CS = __BOOT_CS (0x10) and DS = ES = SS =
  __BOOT_DS (0x18) flat, interrupts off, ESI = the zero page and EBP = EDI = EBX = 0;
- **16-bit** (``mode=real``): the setup code itself, loaded at a 0x90000-style
  address X with its heap up to X + 0xe000 and the command line after it, entered
  at (X >> 4) + 0x20 : 0 with DS = ES = SS = X >> 4 and SP = 0xe000, as boot.rst's
  sample boot loader does.  The setup code builds boot_params itself from BIOS
  calls; pykvm provides no BIOS, so this path suits setup code that does not
  need one (the other two are how pykvm boots Linux).

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
needs that range either way.  ``code32_start`` tells the setup code (and
a reader of boot_params) where that is.

The initrd goes page aligned as high as it can: below ``initrd_addr_max + 1``,
below 4 GiB (pykvm never uses the ``ext_*`` high halves, so it does not rely on
XLF_CAN_BE_LOADED_ABOVE_4G), inside one RAM range of the memory map (so below
the MMIO hole) and above the kernel's working area.  QEMU places it the same way.
The zero page, the command line and the VMM's GDT, TSS, stack and page tables go
at their preferred low addresses, or where the kernel leaves room
(:mod:`pykvm.boot.placement`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import ImageError
from ..x86 import layout
from ..x86.e820 import E820Entry, E820Type
from .flat import reject_overrides
from .placement import Claim, Placement, align_up
from .plan import BootPlan, BootTables, CpuMode, EntryState, LoadRequest, MemoryWrite, Module, nul_terminated

FORMAT = "linux"

# The command line a Linux guest gets when none is given: the serial console, reboot through
# the keyboard controller (pykvm's i8042 ends the run), and reboot at once on panic.
DEFAULT_CMDLINE = "console=ttyS0 reboot=k panic=-1"

SECTOR_SIZE = 512
# setup_sects = 0 means 4 (boot.rst: "for backwards compatibility").
DEFAULT_SETUP_SECTS = 4
# syssize counts the protected-mode kernel in 16-byte paragraphs, rounded up.
PARAGRAPH = 16

# The setup header: where it starts in the image and in boot_params (the same offset), where
# the "HdrS" magic is, and the jump instruction whose offset byte gives the header's length.
SETUP_HEADER_START = 0x1F1
HEADER_MAGIC = b"HdrS"
HEADER_MAGIC_OFFSET = 0x202
JUMP_OFFSET_BYTE = 0x201
BOOT_FLAG = 0xAA55

# Boot protocol versions (major << 8 | minor) that matter here.
MIN_VERSION = 0x0206  # cmdline_size
PREF_ADDRESS_VERSION = 0x020A  # pref_address and init_size
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
# real-mode code.  For the 32- and 64-bit entries the setup code does not run: kvmtool's value,
# with CAN_USE_HEAP, as the protocol asks of every loader.
HEAP_END_PTR = 0xFE00
HEAP_END_PTR_GAP = 0x200
# The 16-bit entry (boot.rst's sample loader, protocol >= 2.02 with a kernel loaded high): the
# setup code (at most 0x8000 bytes with its boot sector), its stack and heap up to 0xe000 from
# the start, then the command line; entered at segment + 0x20 (past the boot sector), offset 0.
REAL_MODE_SETUP_MAX = 0x8000
REAL_MODE_HEAP_END = 0xE000
REAL_MODE_CODE_SEGMENT_OFFSET = 0x20
REAL_MODE_ALIGN = layout.PAGE_SIZE

# struct boot_params (arch/x86/include/uapi/asm/bootparam.h): the zero page.
ZERO_PAGE_SIZE = 4 * layout.KIB
BP_ACPI_RSDP_ADDR = 0x070
BP_EXT_RAMDISK_IMAGE = 0x0C0
BP_EXT_RAMDISK_SIZE = 0x0C4
BP_EXT_CMD_LINE_PTR = 0x0C8
BP_E820_ENTRIES = 0x1E8
BP_SETUP_HEADER_END = 0x290  # edd_mbr_sig_buffer follows the header's padding
SETUP_DATA_VERSION = 0x0209  # setup_data joined the header in protocol 2.09
BP_E820_TABLE = 0x2D0
E820_MAX_ENTRIES_ZEROPAGE = 128
E820_ENTRY = struct.Struct("<QQI")

# Setup header fields pykvm writes, at their boot_params offsets.
HDR_VID_MODE = 0x1FA
HDR_TYPE_OF_LOADER = 0x210
HDR_LOADFLAGS = 0x211
HDR_CODE32_START = 0x214
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
    """A setup header field pykvm reads: its offset (in the image and in boot_params), encoding, and
    the protocol version that added it (an older kernel's header ends before it: pykvm takes 0)."""

    offset: int
    encoding: struct.Struct
    since: int = MIN_VERSION

    @property
    def end(self) -> int:
        return self.offset + self.encoding.size


# The fields pykvm reads, by their boot.rst names.
FIELDS = {
    "setup_sects": Field(0x1F1, U8),
    "syssize": Field(0x1F4, U32),
    "boot_flag": Field(0x1FE, U16),
    "version": Field(0x206, U16),
    "loadflags": Field(0x211, U8),
    "initrd_addr_max": Field(0x22C, U32),
    "kernel_alignment": Field(0x230, U32),
    "relocatable_kernel": Field(0x234, U8),
    "xloadflags": Field(0x236, U16, XLOADFLAGS_VERSION),
    "cmdline_size": Field(0x238, U32),
    "pref_address": Field(0x258, U64, PREF_ADDRESS_VERSION),
    "init_size": Field(0x260, U32, PREF_ADDRESS_VERSION),
}


def fields_end(version: int) -> int:
    """How far a setup header of protocol ``version`` reaches at least: the end of the fields it has."""
    return max(field.end for field in FIELDS.values() if field.since <= version)


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
        """Where the protected-mode kernel starts in the file (the size of the real-mode setup)."""
        return (self.setup_sects + 1) * SECTOR_SIZE

    @property
    def has_64bit_entry(self) -> bool:
        return bool(self.xloadflags & XLF_KERNEL_64)

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


def is_bzimage(image: bytes) -> bool:
    """Whether ``image`` carries the boot protocol's "HdrS" magic at 0x202."""
    return image[HEADER_MAGIC_OFFSET : HEADER_MAGIC_OFFSET + len(HEADER_MAGIC)] == HEADER_MAGIC


def _read(image: bytes, name: str, version: int = MIN_VERSION) -> int:
    field = FIELDS[name]
    if field.since > version:
        return 0
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


def _header_end(path: Path, image: bytes, version: int) -> int:
    """The end of the setup header: 0x202 + the jump instruction's offset byte (boot.rst)."""
    end = HEADER_MAGIC_OFFSET + image[JUMP_OFFSET_BYTE]
    if end < fields_end(version):
        raise ImageError(
            str(path),
            f"the setup header ends at {end:#x} (0x202 + the byte at 0x201), before the fields of its "
            f"protocol version end at {fields_end(version):#x}",
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


def _check_loaded_high(path: Path, loadflags: int) -> None:
    if not loadflags & LOADED_HIGH:
        raise ImageError(
            str(path),
            f"loadflags {loadflags:#04x} lacks LOADED_HIGH: the kernel loads at 0x10000 (a zImage), "
            f"which pykvm does not boot",
        )


def _check_sizes(path: Path, image: bytes, header: SetupHeader) -> None:
    kernel_size = len(image) - header.kernel_offset
    if kernel_size <= ENTRY_64_OFFSET:
        raise ImageError(
            str(path),
            f"has no protected-mode kernel past its setup (setup_sects {header.setup_sects}: the kernel would "
            f"start at {header.kernel_offset:#x}, the file has {len(image):#x} bytes)",
        )
    if align_up(kernel_size, PARAGRAPH) < header.syssize * PARAGRAPH:
        raise ImageError(
            str(path),
            f"is cut short: syssize says the protected-mode kernel is {header.syssize} 16-byte paragraphs "
            f"({header.syssize * PARAGRAPH:#x} bytes), the file holds {kernel_size:#x} bytes of it",
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
    header_end = _header_end(path, image, version)
    boot_flag = _read(image, "boot_flag")
    if boot_flag != BOOT_FLAG:
        raise ImageError(str(path), f"boot_flag (at 0x1fe) is {boot_flag:#06x}, not {BOOT_FLAG:#06x}")
    _check_loaded_high(path, _read(image, "loadflags"))
    setup_sects = _read(image, "setup_sects") or DEFAULT_SETUP_SECTS
    header = SetupHeader(
        setup_sects=setup_sects,
        syssize=_read(image, "syssize"),
        version=version,
        loadflags=_read(image, "loadflags"),
        initrd_addr_max=_read(image, "initrd_addr_max"),
        kernel_alignment=_read(image, "kernel_alignment"),
        relocatable_kernel=bool(_read(image, "relocatable_kernel")),
        xloadflags=_read(image, "xloadflags", version),
        cmdline_size=_read(image, "cmdline_size"),
        pref_address=_read(image, "pref_address", version),
        # Before protocol 2.10 a kernel does not say how much room it needs: the file's size is all a loader knows.
        init_size=_read(image, "init_size", version) or len(image) - (setup_sects + 1) * SECTOR_SIZE,
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
        return max(align_up(load_addr, header.kernel_alignment), header.pref_address)
    return header.pref_address or load_addr


def place_kernel(path: Path, header: SetupHeader, kernel_size: int, mode: CpuMode, placement: Placement, memory_map: tuple[E820Entry, ...]) -> KernelPlacement:
    """Where the protected-mode kernel loads, checked against guest RAM, and occupied in ``placement``."""
    load_addr = choose_load_addr(header)
    start = runtime_start(header, load_addr)
    kernel = KernelPlacement(load_addr, kernel_size, start, start + header.init_size)
    if mode is CpuMode.LONG and kernel.end > layout.IDENTITY_MAP_END:
        raise ImageError(
            str(path),
            f"the kernel would occupy up to {kernel.end:#x} (pref_address {header.pref_address:#x}, "
            f"init_size {header.init_size:#x}), beyond the identity map of the 64-bit entry ({layout.IDENTITY_MAP_END:#x})",
        )
    for gpa, size in ((load_addr, kernel_size), (start, header.init_size)):
        if not _in_ram(gpa, size, memory_map):
            needed = align_up(kernel.end, layout.MIB) // layout.MIB
            raise ImageError(
                str(path),
                f"the kernel needs guest RAM up to {kernel.end:#x} while it boots (loaded at {load_addr:#x}, "
                f"it works in init_size {header.init_size:#x} bytes from {start:#x}); "
                f"give the machine at least {needed} MiB with -m",
            )
    placement.occupy(f"the kernel and its working area (init_size from {start:#x})", min(load_addr, start), kernel.end - min(load_addr, start))
    return kernel


def _in_ram(gpa: int, size: int, memory_map: tuple[E820Entry, ...]) -> bool:
    return any(e.type == E820Type.RAM and e.addr <= gpa and gpa + size <= e.end for e in memory_map)


def place_initrd(header: SetupHeader, initrd: Module, kernel: KernelPlacement, placement: Placement) -> int:
    """The initrd's address: as high as allowed (see the module documentation)."""
    limit = min(header.initrd_addr_max + 1, LOW_4G)
    return placement.claim_high(
        f"the initrd {initrd.path}",
        len(initrd.data),
        limit=limit,
        above=align_up(kernel.end, layout.PAGE_SIZE),
        why_limit=f"initrd_addr_max {header.initrd_addr_max:#x}, above the kernel's end" if limit < LOW_4G else "4 GiB, above the kernel's end",
    )


# --- the command line and the zero page ----------------------------------------------------


def encode_cmdline(path: Path, cmdline: bytes, cmdline_size: int) -> bytes:
    """The command line, NUL-terminated, checked against the kernel's ``cmdline_size``."""
    limit = min(cmdline_size, layout.CMDLINE_MAX_SIZE - 1)
    why = f"this kernel's cmdline_size is {cmdline_size}" if limit == cmdline_size else (
        f"pykvm reserves {layout.CMDLINE_MAX_SIZE} bytes for it"
    )
    return nul_terminated(path, "the kernel command line", cmdline, limit, why)


def encode_e820(path: Path, memory_map: tuple[E820Entry, ...]) -> bytes:
    """The memory map as boot_params' e820_table entries (u64 addr, u64 size, u32 type)."""
    if len(memory_map) > E820_MAX_ENTRIES_ZEROPAGE:
        raise ImageError(
            str(path),
            f"the memory map has {len(memory_map)} entries; boot_params holds at most {E820_MAX_ENTRIES_ZEROPAGE}",
        )
    return b"".join(E820_ENTRY.pack(entry.addr, entry.size, int(entry.type)) for entry in memory_map)


@dataclass(frozen=True)
class LoaderFields:
    """The setup header fields a boot loader fills in (boot.rst's "write" and "modify" fields)."""

    cmdline_addr: int
    initrd_addr: int
    initrd_size: int
    code32_start: int
    heap_end_ptr: int = HEAP_END_PTR


def write_loader_fields(header_area: bytearray, header: SetupHeader, fields: LoaderFields) -> None:
    """Fill in the loader's setup header fields, in boot_params or in the setup code's own copy (same offsets)."""
    U8.pack_into(header_area, HDR_TYPE_OF_LOADER, LOADER_UNDEFINED)
    U8.pack_into(header_area, HDR_LOADFLAGS, header.loadflags | CAN_USE_HEAP)
    U16.pack_into(header_area, HDR_HEAP_END_PTR, fields.heap_end_ptr)
    U16.pack_into(header_area, HDR_VID_MODE, VID_MODE_NORMAL)
    U32.pack_into(header_area, HDR_CODE32_START, fields.code32_start)
    U32.pack_into(header_area, HDR_CMD_LINE_PTR, fields.cmdline_addr & U32_MASK)
    U32.pack_into(header_area, HDR_RAMDISK_IMAGE, fields.initrd_addr & U32_MASK)
    U32.pack_into(header_area, HDR_RAMDISK_SIZE, fields.initrd_size & U32_MASK)
    if header.version >= SETUP_DATA_VERSION:
        U64.pack_into(header_area, HDR_SETUP_DATA, 0)


def build_boot_params(
    image: bytes, header: SetupHeader, fields: LoaderFields, *, e820: bytes, e820_entries: int, rsdp_addr: int | None
) -> bytes:
    """The zero page: zeros, the image's setup header, then the fields a boot loader fills in."""
    page = bytearray(ZERO_PAGE_SIZE)
    page[SETUP_HEADER_START : header.header_end] = image[SETUP_HEADER_START : header.header_end]
    write_loader_fields(page, header, fields)
    U32.pack_into(page, BP_EXT_CMD_LINE_PTR, fields.cmdline_addr >> 32)
    U32.pack_into(page, BP_EXT_RAMDISK_IMAGE, fields.initrd_addr >> 32)
    U32.pack_into(page, BP_EXT_RAMDISK_SIZE, fields.initrd_size >> 32)
    U64.pack_into(page, BP_ACPI_RSDP_ADDR, rsdp_addr or 0)
    U8.pack_into(page, BP_E820_ENTRIES, e820_entries)
    page[BP_E820_TABLE : BP_E820_TABLE + len(e820)] = e820
    return bytes(page)


# --- the loader ----------------------------------------------------------------------------


def entry_mode(path: Path, header: SetupHeader, requested: CpuMode | None) -> CpuMode:
    """How to enter the kernel: as requested, else 64-bit if it has that entry point, else 32-bit."""
    if requested is None:
        return CpuMode.LONG if header.has_64bit_entry else CpuMode.PROTECTED
    if requested is CpuMode.LONG and not header.has_64bit_entry:
        raise ImageError(
            str(path),
            f"xloadflags {header.xloadflags:#06x} lacks XLF_KERNEL_64: the kernel has no 64-bit entry point "
            f"(a 32-bit kernel?); enter it in protected mode (its 32-bit entry) or real mode (its setup code)",
        )
    return requested


def _check_request(path: Path, request: LoadRequest) -> None:
    if request.modules:
        raise ImageError(
            str(path),
            f"a Linux kernel takes one initrd (--initrd), not multiboot modules (--module: {len(request.modules)} given)",
        )
    reject_overrides(path, request, "a Linux bzImage")


def _entry(mode: CpuMode, kernel: KernelPlacement, zero_page: int, tables: BootTables) -> EntryState:
    """The 64-bit or 32-bit entry state (see the module documentation)."""
    if mode is CpuMode.LONG:
        # boot.rst asks for CS = __BOOT_CS (0x10) and DS = __BOOT_DS (0x18) at the 32-bit entry.  The
        # 64-bit entry only needs flat segments: startup_64 loads its own GDT before it relies on a
        # selector.  pykvm's long-mode entry uses its own flat GDT (64-bit code 0x08, data 0x18), as
        # Firecracker does.  Interrupts are off (RFLAGS.IF = 0) and the identity map covers 4 GiB:
        # the kernel, its init_size area, the zero page and the command line.
        return EntryState(mode=mode, entry=kernel.load_addr + ENTRY_64_OFFSET, regs={"rsi": zero_page}, tables=tables)
    # pykvm's protected-mode GDT has __BOOT_CS at 0x10 and __BOOT_DS at 0x18, flat; EBP, EDI and
    # EBX start at zero like every register not named here.
    return EntryState(mode=mode, entry=kernel.load_addr, regs={"rsi": zero_page}, tables=tables)


def _load_protected(
    path: Path, image: bytes, header: SetupHeader, request: LoadRequest, mode: CpuMode
) -> BootPlan:
    """The 64-bit or 32-bit boot protocol: the zero page, the command line, the kernel, the initrd."""
    placement = Placement(path, request.memory_map)
    kernel_data = image[header.kernel_offset :]
    kernel = place_kernel(path, header, len(kernel_data), mode, placement, request.memory_map)
    initrd_addr = place_initrd(header, request.initrd, kernel, placement) if request.initrd is not None else 0
    cmdline = encode_cmdline(path, request.cmdline_bytes or DEFAULT_CMDLINE.encode(), header.cmdline_size)
    tables, (zero_page_addr, cmdline_addr) = placement.boot_tables(
        mode,
        Claim("the zero page (boot_params)", ZERO_PAGE_SIZE, layout.ZERO_PAGE_START, align=layout.PAGE_SIZE),
        Claim("the kernel command line", len(cmdline), layout.CMDLINE_START),
    )
    fields = LoaderFields(
        cmdline_addr=cmdline_addr,
        initrd_addr=initrd_addr,
        initrd_size=len(request.initrd.data) if request.initrd is not None else 0,
        code32_start=kernel.load_addr,
    )
    zero_page = build_boot_params(
        image,
        header,
        fields,
        e820=encode_e820(path, request.memory_map),
        e820_entries=len(request.memory_map),
        rsdp_addr=request.rsdp_addr,
    )
    writes = [MemoryWrite(kernel.load_addr, kernel_data)]
    if request.initrd is not None:
        writes.append(MemoryWrite(initrd_addr, request.initrd.data))
    writes += [MemoryWrite(zero_page_addr, zero_page), MemoryWrite(cmdline_addr, cmdline)]
    return BootPlan(
        format=FORMAT,
        writes=tuple(writes),
        entry=_entry(mode, kernel, zero_page_addr, tables),
        kernel_start=kernel.load_addr,
        kernel_end=kernel.end,
    )


def _load_real(path: Path, image: bytes, header: SetupHeader, request: LoadRequest) -> BootPlan:
    """The 16-bit boot protocol: the setup code with its heap and command line, the kernel, the initrd."""
    if header.kernel_offset > REAL_MODE_SETUP_MAX:
        raise ImageError(
            str(path),
            f"the real-mode setup is {header.kernel_offset:#x} bytes (setup_sects {header.setup_sects}), "
            f"more than the {REAL_MODE_SETUP_MAX:#x} the 16-bit entry gives it",
        )
    placement = Placement(path, request.memory_map)
    kernel_data = image[header.kernel_offset :]
    kernel = place_kernel(path, header, len(kernel_data), CpuMode.REAL, placement, request.memory_map)
    initrd_addr = place_initrd(header, request.initrd, kernel, placement) if request.initrd is not None else 0
    cmdline = encode_cmdline(path, request.cmdline_bytes or DEFAULT_CMDLINE.encode(), header.cmdline_size)
    [setup_addr] = placement.claim(
        Claim(
            "the kernel's real-mode setup code, its heap and the command line",
            REAL_MODE_HEAP_END + len(cmdline),
            layout.LINUX_SETUP_START,
            align=REAL_MODE_ALIGN,
            limit=layout.LOW_MEMORY_END,
        )
    )
    setup = bytearray(image[: header.kernel_offset])
    fields = LoaderFields(
        cmdline_addr=setup_addr + REAL_MODE_HEAP_END,
        initrd_addr=initrd_addr,
        initrd_size=len(request.initrd.data) if request.initrd is not None else 0,
        code32_start=kernel.load_addr,
        heap_end_ptr=REAL_MODE_HEAP_END - HEAP_END_PTR_GAP,
    )
    write_loader_fields(setup, header, fields)
    writes = [MemoryWrite(kernel.load_addr, kernel_data), MemoryWrite(setup_addr, bytes(setup))]
    if request.initrd is not None:
        writes.append(MemoryWrite(initrd_addr, request.initrd.data))
    writes.append(MemoryWrite(fields.cmdline_addr, cmdline))
    segment = setup_addr >> 4
    return BootPlan(
        format=FORMAT,
        writes=tuple(writes),
        entry=EntryState(
            mode=CpuMode.REAL,
            entry=setup_addr + REAL_MODE_CODE_SEGMENT_OFFSET * PARAGRAPH,
            segment=segment + REAL_MODE_CODE_SEGMENT_OFFSET,
            data_segment=segment,
            regs={"rsp": REAL_MODE_HEAP_END},
        ),
        kernel_start=kernel.load_addr,
        kernel_end=kernel.end,
    )


def load(path: Path, image: bytes, request: LoadRequest) -> BootPlan:
    """Load a bzImage, its initrd and command line, and enter it through its 64-, 32- or 16-bit entry."""
    header = parse_header(path, image)
    _check_request(path, request)
    mode = entry_mode(path, header, request.mode)
    if mode is CpuMode.REAL:
        return _load_real(path, image, header, request)
    return _load_protected(path, image, header, request, mode)
