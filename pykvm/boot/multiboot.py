"""Multiboot (version 1) kernels, as in the Multiboot Specification 0.6.96.

A multiboot kernel carries a header in its first 8 KiB.  With flag bit 16 (the
"a.out kludge") the header says where the file loads; without it the file is an
ELF and its program headers say so (parsed by :mod:`pykvm.boot.elf`).  The
kernel is entered in 32-bit protected mode with EAX = 0x2BADB002 and EBX
pointing at the boot information: memory sizes, the e820 memory map, the
command line, the modules (placed page-aligned after the kernel) and the boot
loader's name.

The command line a kernel gets starts with the image's name, then the user's
arguments, as boot loaders pass it (GRUB's ``multiboot /boot/k args``, and QEMU's
``-kernel k -append args``, which writes ``"%s %s"`` of the two, so the space is
there even without arguments): kernels that parse it as argv (kvm-unit-tests)
find their first argument in argv[1].  A module's string is passed as given
(QEMU's ``-initrd "file args"`` gives ``"file args"``).

The kernel loads wherever it says, anywhere in guest memory; the boot
information, command line, modules and the VMM's GDT, TSS and stack go where
it leaves room (:mod:`pykvm.boot.placement`).
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
from .plan import BootPlan, CpuMode, EntryState, LoadRequest, MemoryWrite, Module, check_in_ram, nul_terminated, to_bytes

FORMAT = "multiboot"

# The header (spec 3.1.1): magic, flags, checksum, 32-bit aligned in the first 8192 bytes.
HEADER_MAGIC = 0x1BADB002
HEADER_SEARCH_LIMIT = 8192
HEADER_ALIGN = 4
HEADER = struct.Struct("<III")
HEADER_MAGIC_BYTES = struct.pack("<I", HEADER_MAGIC)
U32_MASK = 0xFFFF_FFFF

# Header flags (spec 3.1.2).  Bits 0-15 are requirements, bits 16-31 optional features.
FLAG_PAGE_ALIGN_MODULES = 1 << 0
FLAG_MEMORY_INFO = 1 << 1
FLAG_VIDEO_MODE = 1 << 2
FLAG_ADDRESS_FIELDS = 1 << 16
REQUIRED_FLAGS_MASK = 0xFFFF
# Modules are always page aligned and memory information is always given; a video
# mode request is ignored (no graphics), as the spec allows for that field.
PROVIDED_FLAGS = FLAG_PAGE_ALIGN_MODULES | FLAG_MEMORY_INFO | FLAG_VIDEO_MODE
FLAG_BITS = 16

# The address fields (spec 3.1.3) follow the checksum, at header offsets 12-28.
ADDRESS_FIELDS = struct.Struct("<IIIII")
ADDRESS_FIELDS_END = HEADER.size + ADDRESS_FIELDS.size

# Machine state at entry (spec 3.2).
BOOTLOADER_MAGIC = 0x2BADB002

# The boot information structure (spec 3.3): field offsets, and the flags pykvm sets.
INFO_SIZE = 88
INFO_FLAGS = 0
INFO_MEM_LOWER = 4
INFO_MEM_UPPER = 8
INFO_CMDLINE = 16
INFO_MODS_COUNT = 20
INFO_MODS_ADDR = 24
INFO_MMAP_LENGTH = 44
INFO_MMAP_ADDR = 48
INFO_BOOT_LOADER_NAME = 64
INFO_FLAG_MEMORY = 1 << 0
INFO_FLAG_CMDLINE = 1 << 2
INFO_FLAG_MODS = 1 << 3
INFO_FLAG_MMAP = 1 << 6
INFO_FLAG_BOOT_LOADER_NAME = 1 << 9
INFO_FLAGS_SET = INFO_FLAG_MEMORY | INFO_FLAG_CMDLINE | INFO_FLAG_MODS | INFO_FLAG_MMAP | INFO_FLAG_BOOT_LOADER_NAME
U32 = struct.Struct("<I")
INFO_ALIGN = 4

# A memory map entry: size (of the rest of the entry), base_addr, length, type.
MMAP_ENTRY = struct.Struct("<IQQI")
MMAP_ENTRY_SIZE_FIELD = MMAP_ENTRY.size - U32.size
# A module entry: mod_start, mod_end, string, reserved.
MODULE_ENTRY = struct.Struct("<IIII")
MODULE_ALIGN = layout.PAGE_SIZE
# mem_lower counts conventional memory, at most 640 KiB.
LOWER_MEMORY_LIMIT = layout.LOW_MEMORY_END

BOOT_LOADER_NAME = "pykvm"
NUL = b"\0"
# Between the image's name and the arguments on the command line.
NAME_SEPARATOR = b" "


@dataclass(frozen=True)
class AddressFields:
    """The a.out kludge fields: where the file loads and where it is entered."""

    header_addr: int
    load_addr: int
    load_end_addr: int
    bss_end_addr: int
    entry_addr: int


@dataclass(frozen=True)
class Header:
    """A valid multiboot header: where it is in the file, its flags and address fields."""

    offset: int
    flags: int
    address_fields: AddressFields | None


@dataclass(frozen=True)
class Kernel:
    """The kernel's placement: its writes, entry, the range it occupies, and the memory left around it."""

    writes: tuple[MemoryWrite, ...]
    entry: int
    start: int
    end: int
    placement: Placement


def _header_offsets(image: bytes) -> list[int]:
    """Aligned offsets of the header magic, with room for a header, in the first 8 KiB."""
    search_end = min(len(image), HEADER_SEARCH_LIMIT) - HEADER.size + len(HEADER_MAGIC_BYTES)
    offsets: list[int] = []
    if search_end < len(HEADER_MAGIC_BYTES):
        return offsets
    position = image.find(HEADER_MAGIC_BYTES, 0, search_end)
    while position != -1:
        if position % HEADER_ALIGN == 0:
            offsets.append(position)
        position = image.find(HEADER_MAGIC_BYTES, position + 1, search_end)
    return offsets


def _checksum_sum(image: bytes, offset: int) -> int:
    fields: tuple[int, ...] = HEADER.unpack_from(image, offset)
    return sum(fields) & U32_MASK


def find_header(image: bytes) -> int | None:
    """The file offset of the first valid multiboot header (magic and checksum), if any."""
    for offset in _header_offsets(image):
        if _checksum_sum(image, offset) == 0:
            return offset
    return None


def _missing_header_reason(image: bytes) -> str:
    for offset in _header_offsets(image):
        return (
            f"the multiboot header at offset {offset:#x} has a bad checksum "
            f"(magic + flags + checksum = {_checksum_sum(image, offset):#x} modulo 2^32, must be 0)"
        )
    return (
        f"has no multiboot header (magic {HEADER_MAGIC:#x} at a 4-byte aligned offset "
        f"in the first {HEADER_SEARCH_LIMIT} bytes)"
    )


def _check_flags(path: Path, flags: int) -> None:
    missing = flags & REQUIRED_FLAGS_MASK & ~PROVIDED_FLAGS
    for bit in range(FLAG_BITS):
        if missing & (1 << bit):
            raise ImageError(str(path), f"requires multiboot feature bit {bit}, which pykvm does not provide")


def _read_address_fields(path: Path, image: bytes, offset: int) -> AddressFields:
    end = offset + ADDRESS_FIELDS_END
    if end > min(len(image), HEADER_SEARCH_LIMIT):
        raise ImageError(
            str(path),
            f"the multiboot header at offset {offset:#x} sets flag bit 16, but its address fields "
            f"(header bytes 12-32) are not inside the file's first {min(len(image), HEADER_SEARCH_LIMIT)} bytes",
        )
    return AddressFields(*ADDRESS_FIELDS.unpack_from(image, offset + HEADER.size))


def read_header(path: Path, image: bytes) -> Header:
    """Find and check the multiboot header: checksum, required flags, address fields."""
    offset = find_header(image)
    if offset is None:
        raise ImageError(str(path), _missing_header_reason(image))
    _, flags, _ = HEADER.unpack_from(image, offset)
    _check_flags(path, flags)
    fields = _read_address_fields(path, image, offset) if flags & FLAG_ADDRESS_FIELDS else None
    return Header(offset=offset, flags=flags, address_fields=fields)


def _aout_load_offset(path: Path, header: Header, fields: AddressFields) -> int:
    if fields.load_addr > fields.header_addr:
        raise ImageError(
            str(path),
            f"multiboot load_addr {fields.load_addr:#x} is above header_addr {fields.header_addr:#x} "
            f"(load_addr must be <= header_addr)",
        )
    load_offset = header.offset - (fields.header_addr - fields.load_addr)
    if load_offset < 0:
        raise ImageError(
            str(path),
            f"multiboot header_addr - load_addr ({fields.header_addr - fields.load_addr:#x}) is larger than "
            f"the header's file offset {header.offset:#x}: the load would start before the file",
        )
    return load_offset


def _aout_load_end(path: Path, image: bytes, fields: AddressFields, load_offset: int) -> int:
    if fields.load_end_addr == 0:
        return fields.load_addr + len(image) - load_offset
    if fields.load_end_addr <= fields.load_addr:
        raise ImageError(
            str(path),
            f"multiboot load_end_addr {fields.load_end_addr:#x} is not above load_addr {fields.load_addr:#x}",
        )
    size = fields.load_end_addr - fields.load_addr
    if load_offset + size > len(image):
        raise ImageError(
            str(path),
            f"multiboot load_end_addr {fields.load_end_addr:#x} extends the load past the end of the file "
            f"(offset {load_offset:#x} + {size:#x} > {len(image):#x} bytes)",
        )
    return fields.load_end_addr


def _aout_bss_end(path: Path, fields: AddressFields, load_end: int) -> int:
    if fields.bss_end_addr == 0:
        return load_end
    if fields.bss_end_addr < load_end:
        raise ImageError(
            str(path), f"multiboot bss_end_addr {fields.bss_end_addr:#x} is below the load end {load_end:#x}"
        )
    return fields.bss_end_addr


def _load_aout(path: Path, image: bytes, header: Header, fields: AddressFields, request: LoadRequest) -> Kernel:
    load_offset = _aout_load_offset(path, header, fields)
    load_end = _aout_load_end(path, image, fields, load_offset)
    bss_end = _aout_bss_end(path, fields, load_end)
    if not fields.load_addr <= fields.entry_addr < bss_end:
        raise ImageError(
            str(path),
            f"multiboot entry_addr {fields.entry_addr:#x} is outside the loaded kernel "
            f"[{fields.load_addr:#x}, {bss_end:#x})",
        )
    what = "the multiboot kernel (load_addr to bss_end_addr)"
    check_in_ram(path, what, fields.load_addr, bss_end - fields.load_addr, request)
    placement = Placement(path, request.memory_map)
    placement.occupy(what, fields.load_addr, bss_end - fields.load_addr)
    data = image[load_offset : load_offset + load_end - fields.load_addr].ljust(bss_end - fields.load_addr, NUL)
    return Kernel((MemoryWrite(fields.load_addr, data),), fields.entry_addr, fields.load_addr, bss_end, placement)


def _load_elf(path: Path, image: bytes, request: LoadRequest) -> Kernel:
    from . import elf  # only ELF kernels need it (an a.out-kludge image starts faster without)

    if not elf.is_elf(image):
        raise ImageError(
            str(path),
            "the multiboot header does not set flag bit 16 (address fields), so the kernel must be an ELF, "
            "but the file has no ELF magic",
        )
    image_elf = elf.parse(path, image)
    if image_elf.elf_class is not elf.ELF32:
        raise ImageError(
            str(path),
            "is an ELF64 multiboot kernel; multiboot kernels are 32-bit (ELF32 i386); "
            "boot a 64-bit ELF with --format elf",
        )
    placement = elf.place_segments(path, image_elf, request)
    entry = elf.entry_point(path, image_elf)
    return Kernel(elf.segment_writes(image, image_elf), entry, image_elf.start, image_elf.end, placement)


def encode_cmdline(path: Path, cmdline: bytes) -> bytes:
    """A command line, NUL-terminated, checked against the room pykvm gives it."""
    return nul_terminated(
        path, "the kernel command line", cmdline, layout.CMDLINE_MAX_SIZE - 1, f"pykvm reserves {layout.CMDLINE_MAX_SIZE} bytes for it"
    )


def kernel_command_line(path: Path, arguments: bytes) -> bytes:
    """What a multiboot kernel gets: its image's name, a space, then the arguments (as QEMU passes it)."""
    return to_bytes(str(path)) + NAME_SEPARATOR + arguments


def _encode_string(path: Path, what: str, text: str | bytes) -> bytes:
    return nul_terminated(path, what, to_bytes(text), layout.CMDLINE_MAX_SIZE - 1, "the room for a string")


def place_modules(placement: Placement, modules: tuple[Module, ...], kernel_end: int) -> tuple[int, ...]:
    """The load address of each module: page aligned, one after another, after the kernel if there is room."""
    addresses = []
    gpa = align_up(kernel_end, MODULE_ALIGN)
    for index, module in enumerate(modules):
        what = f"multiboot module {index} ({module.path})"
        [gpa] = placement.claim(Claim(what, len(module.data), preferred=gpa, align=MODULE_ALIGN))
        addresses.append(gpa)
        gpa = align_up(gpa + len(module.data), MODULE_ALIGN)
    return tuple(addresses)


def lower_memory_kib(memory_map: tuple[E820Entry, ...]) -> int:
    """KiB of RAM from address 0 (mem_lower), at most 640."""
    for entry in memory_map:
        if entry.type == E820Type.RAM and entry.addr == 0:
            return min(entry.end, LOWER_MEMORY_LIMIT) // layout.KIB
    return 0


def upper_memory_kib(memory_map: tuple[E820Entry, ...]) -> int:
    """KiB of contiguous RAM from 1 MiB (mem_upper)."""
    end = layout.HIMEM_START
    for entry in sorted((e for e in memory_map if e.type == E820Type.RAM), key=lambda e: e.addr):
        if entry.addr <= end < entry.end:
            end = entry.end
    return min((end - layout.HIMEM_START) // layout.KIB, U32_MASK)


def encode_memory_map(memory_map: tuple[E820Entry, ...]) -> bytes:
    """The memory map as multiboot entries, each led by its size field (20)."""
    return b"".join(MMAP_ENTRY.pack(MMAP_ENTRY_SIZE_FIELD, e.addr, e.size, int(e.type)) for e in memory_map)


class _InfoArea:
    """The boot information area, filled front to back; addresses are guest-physical."""

    def __init__(self, start: int) -> None:
        self.start = start
        self.data = bytearray()

    def put(self, data: bytes) -> int:
        """Append ``data`` (4-byte aligned) and return its guest-physical address."""
        self.data.extend(bytes(align_up(len(self.data), INFO_ALIGN) - len(self.data)))
        gpa = self.start + len(self.data)
        self.data.extend(data)
        return gpa

    def set_u32(self, gpa: int, offset: int, value: int) -> None:
        U32.pack_into(self.data, gpa - self.start + offset, value)


def _put_modules(path: Path, area: _InfoArea, modules: tuple[Module, ...], addresses: tuple[int, ...]) -> int:
    table = area.put(bytes(MODULE_ENTRY.size * len(modules)))
    for index, (module, gpa) in enumerate(zip(modules, addresses)):
        string = area.put(_encode_string(path, f"the string of multiboot module {index}", module.string))
        entry = MODULE_ENTRY.pack(gpa, gpa + len(module.data), string, 0)
        start = table - area.start + index * MODULE_ENTRY.size
        area.data[start : start + MODULE_ENTRY.size] = entry
    return table


def build_info(path: Path, request: LoadRequest, module_addresses: tuple[int, ...], cmdline_addr: int, start: int) -> bytes:
    """The boot information structure at ``start`` and everything it points at, except the command line."""
    area = _InfoArea(start)
    info = area.put(bytes(INFO_SIZE))
    mmap = encode_memory_map(request.memory_map)
    mmap_addr = area.put(mmap)
    name_addr = area.put(BOOT_LOADER_NAME.encode() + NUL)
    mods_addr = _put_modules(path, area, request.modules, module_addresses)
    fields = {
        INFO_FLAGS: INFO_FLAGS_SET,
        INFO_MEM_LOWER: lower_memory_kib(request.memory_map),
        INFO_MEM_UPPER: upper_memory_kib(request.memory_map),
        INFO_CMDLINE: cmdline_addr,
        INFO_MODS_COUNT: len(request.modules),
        INFO_MODS_ADDR: mods_addr,
        INFO_MMAP_LENGTH: len(mmap),
        INFO_MMAP_ADDR: mmap_addr,
        INFO_BOOT_LOADER_NAME: name_addr,
    }
    for offset, value in fields.items():
        area.set_u32(info, offset, value)
    return bytes(area.data)


def _check_mode(path: Path, mode: CpuMode | None) -> None:
    if mode is not None and mode != CpuMode.PROTECTED:
        raise ImageError(
            str(path), f"is a multiboot kernel, entered in protected mode, but {mode.value} mode was requested"
        )


def _load_kernel(path: Path, image: bytes, header: Header, request: LoadRequest) -> Kernel:
    if header.address_fields is not None:
        return _load_aout(path, image, header, header.address_fields, request)
    return _load_elf(path, image, request)


def load(path: Path, image: bytes, request: LoadRequest) -> BootPlan:
    """Load a multiboot kernel, its modules, command line and boot information."""
    header = read_header(path, image)
    _check_mode(path, request.mode)
    reject_overrides(path, request, "a multiboot kernel")
    cmdline = encode_cmdline(path, kernel_command_line(path, request.cmdline_bytes))
    kernel = _load_kernel(path, image, header, request)
    placement = kernel.placement
    addresses = place_modules(placement, request.modules, kernel.end)
    info_size = len(build_info(path, request, addresses, cmdline_addr=0, start=0))
    tables, (cmdline_addr, info_addr) = placement.boot_tables(
        CpuMode.PROTECTED,
        Claim("the kernel command line", len(cmdline), layout.CMDLINE_START),
        Claim("the multiboot information", info_size, layout.MULTIBOOT_INFO_START),
    )
    info = build_info(path, request, addresses, cmdline_addr, start=info_addr)
    module_writes = tuple(MemoryWrite(gpa, module.data) for gpa, module in zip(addresses, request.modules))
    return BootPlan(
        format=FORMAT,
        writes=kernel.writes + module_writes + (MemoryWrite(cmdline_addr, cmdline), MemoryWrite(info_addr, info)),
        entry=EntryState(
            mode=CpuMode.PROTECTED,
            entry=kernel.entry,
            regs={"rax": BOOTLOADER_MAGIC, "rbx": info_addr},
            tables=tables,
        ),
        kernel_start=kernel.start,
        kernel_end=kernel.end,
    )
