"""PVH kernels: an ELF that names a 32-bit entry point in a XEN_ELFNOTE_PHYS32_ENTRY note.

PVH is Xen's direct boot ABI for HVM guests (xen/include/public/arch-x86/hvm/start_info.h),
which QEMU, Firecracker and Cloud Hypervisor also use to boot an uncompressed Linux
vmlinux built with CONFIG_PVH.  The ELF's ``PT_LOAD`` segments load at their physical
addresses (parsed and placed by :mod:`pykvm.boot.elf`); a ``PT_NOTE`` segment holds a
note named "Xen" of type 18 whose value is the physical address to enter, in 32-bit
protected mode with paging off, EBX pointing at ``struct hvm_start_info``: the command
line, the modules (the initrd is module 0) and the memory map.

pykvm writes hvm_start_info with the module list, the memory map and the module
strings in one block, preferably where multiboot's information goes
(``layout.MULTIBOOT_INFO_START``), and the command line preferably at
``layout.CMDLINE_START``; both move where the kernel leaves room when it loads there
(:mod:`pykvm.boot.placement`).  Modules go page aligned as high as they fit below
4 GiB, as a bzImage's initrd does.

Detection: an ELF carrying the note is a PVH kernel under ``--format auto``, unless it
also has a multiboot header: multiboot wins, as it does over plain ELF and as QEMU
decides (it tries multiboot before PVH); ``--format pvh`` boots such a kernel through PVH.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..errors import ImageError
from ..x86 import layout
from . import elf
from .flat import PROTECTED_MODE_ADDRESS_LIMIT, reject_overrides
from .linux import DEFAULT_CMDLINE
from .multiboot import encode_cmdline
from .placement import Claim, Placement, align_up
from .plan import BootPlan, CpuMode, EntryState, LoadRequest, MemoryWrite, Module, nul_terminated, to_bytes

FORMAT = "pvh"

# The note (xen/include/public/elfnote.h): name "Xen", type XEN_ELFNOTE_PHYS32_ENTRY, and a
# 32- or 64-bit descriptor (Linux writes a quad, Xen's own kernels a long).
PT_NOTE = 4
XEN_NOTE_NAME = b"Xen"
XEN_ELFNOTE_PHYS32_ENTRY = 18
NOTE_HEADER = struct.Struct("<III")  # namesz, descsz, type
# Names and descriptors are padded to 4 bytes, or to 8 in a segment aligned to 8 (as the GNU
# property notes are); Xen's and Linux's notes use 4.
NOTE_ALIGN = 4
WIDE_NOTE_ALIGN = 8
DESC_SIZES = {4: struct.Struct("<I"), 8: struct.Struct("<Q")}

# struct hvm_start_info, version 1, and what it points at.
START_INFO_MAGIC = 0x336EC578
START_INFO_VERSION = 1
START_INFO = struct.Struct("<IIIIQQQQII")  # magic version flags nr_modules modlist cmdline rsdp memmap entries reserved
MODLIST_ENTRY = struct.Struct("<QQQQ")  # paddr size cmdline_paddr reserved
MEMMAP_ENTRY = struct.Struct("<QQII")  # addr size type reserved
INFO_ALIGN = 8
MODULE_ALIGN = layout.PAGE_SIZE
NUL = b"\0"


@dataclass(frozen=True)
class EntryNote:
    """The XEN_ELFNOTE_PHYS32_ENTRY note: where it is in the file and what it says."""

    offset: int  # of the note header, in the file
    desc_size: int
    desc: bytes

    @property
    def entry(self) -> int | None:
        """The entry address, or ``None`` if the descriptor is neither 4 nor 8 bytes."""
        encoding = DESC_SIZES.get(self.desc_size)
        return None if encoding is None else int(encoding.unpack(self.desc)[0])


def _note_segments(image: bytes) -> Iterator[tuple[int, int, int]]:
    """(file offset, size, note alignment) of each PT_NOTE segment inside the file; nothing for a malformed ELF."""
    if not elf.is_elf(image) or len(image) < elf.EI_NIDENT:
        return
    elf_class = elf.CLASSES.get(image[elf.EI_CLASS])
    if elf_class is None or image[elf.EI_DATA] != elf.ELFDATA2LSB or len(image) < elf_class.header.size:
        return
    header = dict(zip(elf.HEADER_FIELDS, elf_class.header.unpack_from(image)))
    if header["phentsize"] != elf_class.phdr.size:
        return
    for index in range(header["phnum"]):
        offset = header["phoff"] + index * elf_class.phdr.size
        if offset + elf_class.phdr.size > len(image):
            return
        phdr = dict(zip(elf_class.phdr_fields, elf_class.phdr.unpack_from(image, offset)))
        if phdr["type"] == PT_NOTE and phdr["offset"] + phdr["filesz"] <= len(image):
            yield phdr["offset"], phdr["filesz"], WIDE_NOTE_ALIGN if phdr["align"] == WIDE_NOTE_ALIGN else NOTE_ALIGN


def _notes(image: bytes, start: int, size: int, align: int) -> Iterator[tuple[int, bytes, int, bytes]]:
    """(offset, name, type, descriptor) of each note in [start, start+size); stops at a malformed one."""
    position, end = start, start + size
    while position + NOTE_HEADER.size <= end:
        namesz, descsz, note_type = NOTE_HEADER.unpack_from(image, position)
        name_at = position + NOTE_HEADER.size
        desc_at = name_at + align_up(namesz, align)
        next_at = desc_at + align_up(descsz, align)
        if desc_at + descsz > end:
            return
        yield position, image[name_at : name_at + namesz].rstrip(NUL), note_type, image[desc_at : desc_at + descsz]
        position = next_at


def find_entry_note(image: bytes) -> EntryNote | None:
    """The image's XEN_ELFNOTE_PHYS32_ENTRY note, if it is an ELF that has one (never raises)."""
    for start, size, align in _note_segments(image):
        for offset, name, note_type, desc in _notes(image, start, size, align):
            if name == XEN_NOTE_NAME and note_type == XEN_ELFNOTE_PHYS32_ENTRY:
                return EntryNote(offset, len(desc), desc)
    return None


def is_pvh(image: bytes) -> bool:
    """Whether ``image`` is an ELF with a PVH entry note."""
    return find_entry_note(image) is not None


def entry_point(path: Path, image: bytes, kernel: elf.ElfImage) -> int:
    """The PVH entry address, checked: a 4- or 8-byte note, below 4 GiB, inside a loaded segment."""
    note = find_entry_note(image)
    if note is None:
        raise ImageError(
            str(path),
            f'has no XEN_ELFNOTE_PHYS32_ENTRY note (a "Xen" note of type {XEN_ELFNOTE_PHYS32_ENTRY} in a PT_NOTE '
            f"segment), so it is not a PVH kernel; boot a plain ELF with --format elf",
        )
    entry = note.entry
    if entry is None:
        raise ImageError(
            str(path),
            f"the XEN_ELFNOTE_PHYS32_ENTRY note at file offset {note.offset:#x} has a {note.desc_size}-byte "
            f"descriptor; an entry address is 4 or 8 bytes",
        )
    if entry >= PROTECTED_MODE_ADDRESS_LIMIT:
        raise ImageError(
            str(path), f"the PVH entry point {entry:#x} (XEN_ELFNOTE_PHYS32_ENTRY) is not below 4 GiB, as 32-bit entry needs"
        )
    if not any(segment.paddr <= entry < segment.end for segment in kernel.segments):
        raise ImageError(
            str(path),
            f"the PVH entry point {entry:#x} (XEN_ELFNOTE_PHYS32_ENTRY) is not inside any PT_LOAD segment's "
            f"physical range",
        )
    return entry


def place_modules(placement: Placement, modules: tuple[Module, ...], kernel_end: int) -> tuple[int, ...]:
    """Each module's address: page aligned, as high as it fits below 4 GiB, above the kernel."""
    above = align_up(kernel_end, MODULE_ALIGN)
    return tuple(
        placement.claim_high(
            f"PVH module {index} ({module.path})",
            len(module.data),
            limit=PROTECTED_MODE_ADDRESS_LIMIT,
            above=above,
            align=MODULE_ALIGN,
            why_limit="4 GiB, above the kernel's end",
        )
        for index, module in enumerate(modules)
    )


class _InfoArea:
    """The boot information area, filled front to back; addresses are guest-physical."""

    def __init__(self, start: int) -> None:
        self.start = start
        self.data = bytearray()

    def put(self, data: bytes) -> int:
        """Append ``data`` (8-byte aligned) and return its guest-physical address."""
        self.data.extend(bytes(align_up(len(self.data), INFO_ALIGN) - len(self.data)))
        gpa = self.start + len(self.data)
        self.data.extend(data)
        return gpa


def _module_string(path: Path, index: int, module: Module) -> bytes:
    return nul_terminated(
        path, f"the string of PVH module {index}", to_bytes(module.string), layout.CMDLINE_MAX_SIZE - 1, "the room for a string"
    )


def build_start_info(
    path: Path, request: LoadRequest, modules: tuple[Module, ...], addresses: tuple[int, ...], cmdline_addr: int, start: int
) -> bytes:
    """hvm_start_info at ``start``, then the module list, the module strings and the memory map."""
    area = _InfoArea(start)
    info = area.put(bytes(START_INFO.size))
    strings = [area.put(_module_string(path, index, module)) for index, module in enumerate(modules)]
    modlist = b"".join(
        MODLIST_ENTRY.pack(gpa, len(module.data), string, 0) for module, gpa, string in zip(modules, addresses, strings)
    )
    modlist_addr = area.put(modlist) if modules else 0
    memmap = b"".join(MEMMAP_ENTRY.pack(e.addr, e.size, int(e.type), 0) for e in request.memory_map)
    memmap_addr = area.put(memmap)
    START_INFO.pack_into(
        area.data,
        info - area.start,
        START_INFO_MAGIC,
        START_INFO_VERSION,
        0,  # flags: no SIF_* flag applies to an HVM guest
        len(modules),
        modlist_addr,
        cmdline_addr,
        request.rsdp_addr or 0,
        memmap_addr,
        len(request.memory_map),
        0,
    )
    return bytes(area.data)


def _check_mode(path: Path, mode: CpuMode | None) -> None:
    if mode is not None and mode != CpuMode.PROTECTED:
        raise ImageError(str(path), f"is a PVH kernel, entered in protected mode, but {mode.value} mode was requested")


def load(path: Path, image: bytes, request: LoadRequest) -> BootPlan:
    """Load a PVH kernel's segments, its modules (the initrd first), command line and hvm_start_info."""
    kernel = elf.parse(path, image)
    entry = entry_point(path, image, kernel)
    _check_mode(path, request.mode)
    reject_overrides(path, request, "a PVH kernel")
    cmdline = encode_cmdline(path, request.cmdline_bytes or DEFAULT_CMDLINE.encode())
    placement = elf.place_segments(path, kernel, request)
    modules = ((request.initrd,) if request.initrd is not None else ()) + request.modules
    addresses = place_modules(placement, modules, kernel.end)
    info_size = len(build_start_info(path, request, modules, addresses, cmdline_addr=0, start=0))
    tables, (cmdline_addr, info_addr) = placement.boot_tables(
        CpuMode.PROTECTED,
        Claim("the kernel command line", len(cmdline), layout.CMDLINE_START),
        Claim("the PVH start info", info_size, layout.MULTIBOOT_INFO_START, align=INFO_ALIGN),
    )
    info = build_start_info(path, request, modules, addresses, cmdline_addr, start=info_addr)
    return BootPlan(
        format=FORMAT,
        writes=elf.segment_writes(image, kernel)
        + tuple(MemoryWrite(gpa, module.data) for gpa, module in zip(addresses, modules))
        + (MemoryWrite(cmdline_addr, cmdline), MemoryWrite(info_addr, info)),
        # The PVH ABI: 32-bit protected mode, paging off, CS a flat 32-bit code segment (any
        # selector), DS/ES/SS flat data, EBX = hvm_start_info; pykvm's protected-mode entry.
        entry=EntryState(mode=CpuMode.PROTECTED, entry=entry, regs={"rbx": info_addr}, tables=tables),
        kernel_start=kernel.start,
        kernel_end=kernel.end,
    )
