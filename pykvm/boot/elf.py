"""ELF kernels: ELF32 (i386) entered in protected mode, ELF64 (x86-64) in long mode.

As linux-loader's ELF loader does, the ELF header and the program headers are
read and every field that is used is checked before anything is placed.  Each
``PT_LOAD`` segment becomes one write at its physical address: its file bytes,
then zeros up to ``p_memsz``.

:func:`parse` is shared with the multiboot loader, which boots ELF kernels too.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import ImageError
from .flat import LONG_MODE_ENTRY_LIMIT, PROTECTED_MODE_ADDRESS_LIMIT, reject_overrides
from .placement import Placement
from .plan import BootPlan, CpuMode, EntryState, LoadRequest, MemoryWrite, check_in_ram

FORMAT = "elf"

# e_ident (System V ABI, "ELF Identification").
ELF_MAGIC = b"\x7fELF"
EI_NIDENT = 16
EI_CLASS = 4
EI_DATA = 5
ELFCLASS32 = 1
ELFCLASS64 = 2
ELFDATA2LSB = 1
ELFDATA2MSB = 2

# e_type.
ET_REL = 1
ET_EXEC = 2
ET_DYN = 3
ET_CORE = 4
ET_NAMES = {ET_REL: "ET_REL", ET_EXEC: "ET_EXEC", ET_DYN: "ET_DYN", ET_CORE: "ET_CORE"}

# e_machine.
EM_386 = 3
EM_X86_64 = 62
MACHINE_NAMES = {
    2: "SPARC",
    EM_386: "i386",
    8: "MIPS",
    15: "PA-RISC",
    20: "PowerPC",
    21: "PowerPC64",
    22: "IBM S/390",
    40: "ARM",
    43: "SPARC V9",
    50: "IA-64",
    EM_X86_64: "x86-64",
    183: "AArch64",
    243: "RISC-V",
    258: "LoongArch",
    0x9026: "Alpha",
}

# p_type.
PT_LOAD = 1
PT_INTERP = 3

HEADER_FIELDS = (
    "ident", "type", "machine", "version", "entry", "phoff", "shoff",
    "flags", "ehsize", "phentsize", "phnum", "shentsize", "shnum", "shstrndx",
)  # fmt: skip
PHDR32_FIELDS = ("type", "offset", "vaddr", "paddr", "filesz", "memsz", "flags", "align")
PHDR64_FIELDS = ("type", "flags", "offset", "vaddr", "paddr", "filesz", "memsz", "align")


@dataclass(frozen=True)
class ElfClass:
    """What differs between ELF32 and ELF64 for an x86 kernel."""

    name: str
    header: struct.Struct
    phdr: struct.Struct
    phdr_fields: tuple[str, ...]
    machine: int
    mode: CpuMode
    entry_limit: int


ELF32 = ElfClass(
    "ELF32",
    struct.Struct("<16sHHIIIIIHHHHHH"),
    struct.Struct("<IIIIIIII"),
    PHDR32_FIELDS,
    EM_386,
    CpuMode.PROTECTED,
    PROTECTED_MODE_ADDRESS_LIMIT,
)
ELF64 = ElfClass(
    "ELF64",
    struct.Struct("<16sHHIQQQIHHHHHH"),
    struct.Struct("<IIQQQQQQ"),
    PHDR64_FIELDS,
    EM_X86_64,
    CpuMode.LONG,
    LONG_MODE_ENTRY_LIMIT,
)
CLASSES = {ELFCLASS32: ELF32, ELFCLASS64: ELF64}


@dataclass(frozen=True)
class ProgramHeader:
    """One program header, with its index in the table (for error messages)."""

    index: int
    type: int
    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int

    @property
    def name(self) -> str:
        return f"ELF program header {self.index} (PT_LOAD)"

    @property
    def end(self) -> int:
        """End of the segment in guest-physical memory."""
        return self.paddr + self.memsz


@dataclass(frozen=True)
class ElfImage:
    """A parsed and checked ELF executable: its class, entry and loadable segments."""

    elf_class: ElfClass
    entry: int
    segments: tuple[ProgramHeader, ...]

    @property
    def start(self) -> int:
        return min(segment.paddr for segment in self.segments)

    @property
    def end(self) -> int:
        return max(segment.end for segment in self.segments)


def is_elf(image: bytes) -> bool:
    """Whether ``image`` starts with the ELF magic."""
    return image[: len(ELF_MAGIC)] == ELF_MAGIC


def machine_name(machine: int) -> str:
    """A readable name for an ``e_machine`` value."""
    return MACHINE_NAMES.get(machine, f"machine {machine:#x}")


def _check_ident(path: Path, image: bytes) -> ElfClass:
    if not is_elf(image):
        magic = image[: len(ELF_MAGIC)]
        raise ImageError(str(path), f"is not an ELF file (bad magic {magic!r}, expected {ELF_MAGIC!r})")
    if len(image) < EI_NIDENT:
        raise ImageError(str(path), f"the ELF identification (e_ident) is cut short at {len(image)} bytes")
    elf_class = CLASSES.get(image[EI_CLASS])
    if elf_class is None:
        raise ImageError(str(path), f"ELF class (EI_CLASS) {image[EI_CLASS]} is neither ELFCLASS32 nor ELFCLASS64")
    if image[EI_DATA] == ELFDATA2MSB:
        raise ImageError(str(path), "is a big-endian ELF (EI_DATA ELFDATA2MSB); x86 kernels are little-endian")
    if image[EI_DATA] != ELFDATA2LSB:
        raise ImageError(str(path), f"ELF data encoding (EI_DATA) {image[EI_DATA]} is invalid")
    return elf_class


def _read_header(path: Path, image: bytes, elf_class: ElfClass) -> dict[str, int]:
    if len(image) < elf_class.header.size:
        raise ImageError(
            str(path),
            f"the {elf_class.name} header is cut short: the file has {len(image)} bytes, "
            f"the header needs {elf_class.header.size}",
        )
    return dict(zip(HEADER_FIELDS, elf_class.header.unpack_from(image)))


def _check_machine(path: Path, machine: int, elf_class: ElfClass) -> None:
    if machine == elf_class.machine:
        return
    if machine in (EM_386, EM_X86_64):
        raise ImageError(
            str(path),
            f"e_machine {machine_name(machine)} does not match the class {elf_class.name} "
            f"(x86 kernels are ELF32 i386 or ELF64 x86-64)",
        )
    raise ImageError(str(path), f"is an ELF for {machine_name(machine)} (e_machine {machine}), not x86")


def _check_type_known(path: Path, e_type: int) -> None:
    if e_type == ET_REL:
        raise ImageError(str(path), "is not an executable (e_type ET_REL: an object file); link it into an ET_EXEC")
    if e_type not in (ET_EXEC, ET_DYN):
        name = ET_NAMES.get(e_type, str(e_type))
        raise ImageError(str(path), f"is not an executable (e_type {name}); pykvm loads ET_EXEC kernels")


def _read_program_headers(
    path: Path, image: bytes, header: dict[str, int], elf_class: ElfClass
) -> tuple[ProgramHeader, ...]:
    phoff, phnum, phentsize = header["phoff"], header["phnum"], header["phentsize"]
    if phnum and phentsize != elf_class.phdr.size:
        raise ImageError(
            str(path),
            f"e_phentsize {phentsize} is not the {elf_class.name} program header size {elf_class.phdr.size}",
        )
    if phoff + phnum * phentsize > len(image):
        raise ImageError(
            str(path),
            f"the ELF program header table (e_phoff {phoff:#x} + {phnum} x {phentsize} bytes) "
            f"extends past the end of the file ({len(image):#x} bytes)",
        )
    return tuple(_program_header(image, elf_class, index, phoff + index * phentsize) for index in range(phnum))


def _program_header(image: bytes, elf_class: ElfClass, index: int, offset: int) -> ProgramHeader:
    fields = dict(zip(elf_class.phdr_fields, elf_class.phdr.unpack_from(image, offset)))
    del fields["flags"], fields["align"]
    return ProgramHeader(index=index, **fields)


def _check_executable(path: Path, e_type: int, headers: tuple[ProgramHeader, ...]) -> None:
    if any(header.type == PT_INTERP for header in headers):
        raise ImageError(
            str(path), "is a dynamically linked program, not a kernel (it has a PT_INTERP program header)"
        )
    if e_type == ET_DYN:
        raise ImageError(
            str(path),
            "is not an executable (e_type ET_DYN: a shared object or position-independent program); "
            "pykvm loads ET_EXEC kernels",
        )


def _check_segment_in_file(path: Path, image: bytes, segment: ProgramHeader) -> None:
    if segment.filesz > segment.memsz:
        raise ImageError(
            str(path),
            f"{segment.name} has p_filesz {segment.filesz:#x} larger than p_memsz {segment.memsz:#x}",
        )
    if segment.offset + segment.filesz > len(image):
        raise ImageError(
            str(path),
            f"{segment.name} extends past the end of the file "
            f"(offset {segment.offset:#x} + {segment.filesz:#x} > {len(image):#x} bytes)",
        )


def _loadable_segments(path: Path, image: bytes, headers: tuple[ProgramHeader, ...]) -> tuple[ProgramHeader, ...]:
    loads = tuple(header for header in headers if header.type == PT_LOAD)
    for segment in loads:
        _check_segment_in_file(path, image, segment)
    segments = tuple(segment for segment in loads if segment.memsz)
    if not segments:
        raise ImageError(str(path), "has nothing to load (no PT_LOAD program header with a non-zero p_memsz)")
    return segments


def _check_no_overlap(path: Path, segments: tuple[ProgramHeader, ...]) -> None:
    ordered = sorted(segments, key=lambda segment: segment.paddr)
    for lower, upper in zip(ordered, ordered[1:]):
        if upper.paddr < lower.end:
            raise ImageError(
                str(path),
                f"{lower.name} [{lower.paddr:#x}, {lower.end:#x}) and {upper.name} "
                f"[{upper.paddr:#x}, {upper.end:#x}) overlap in physical memory (p_paddr)",
            )


def parse(path: Path, image: bytes) -> ElfImage:
    """Read and check an x86 ELF executable's headers; no memory placement is checked here."""
    elf_class = _check_ident(path, image)
    header = _read_header(path, image, elf_class)
    _check_machine(path, header["machine"], elf_class)
    _check_type_known(path, header["type"])
    headers = _read_program_headers(path, image, header, elf_class)
    _check_executable(path, header["type"], headers)
    segments = _loadable_segments(path, image, headers)
    _check_no_overlap(path, segments)
    return ElfImage(elf_class=elf_class, entry=header["entry"], segments=segments)


def place_segments(path: Path, elf: ElfImage, request: LoadRequest) -> Placement:
    """Check that every segment lies in guest memory and start a placement around them.

    A segment may load anywhere in guest memory, reserved ranges of the memory map
    included, as QEMU loads it; the VMM's own structures then go where the segments
    leave room.
    """
    placement = Placement(path, request.memory_map)
    for segment in elf.segments:
        check_in_ram(path, segment.name, segment.paddr, segment.memsz, request)
        placement.occupy(segment.name, segment.paddr, segment.memsz)
    return placement


def entry_point(path: Path, elf: ElfImage) -> int:
    """The physical entry address: ``e_entry``, translated if it is a virtual address of a segment."""
    for segment in elf.segments:
        if segment.vaddr != segment.paddr and segment.vaddr <= elf.entry < segment.vaddr + segment.memsz:
            return elf.entry - segment.vaddr + segment.paddr
    for segment in elf.segments:
        if segment.paddr <= elf.entry < segment.end:
            return elf.entry
    raise ImageError(str(path), f"the entry point e_entry {elf.entry:#x} is not inside any PT_LOAD segment")


def check_entry_limit(path: Path, elf: ElfImage, entry: int) -> None:
    """Check that the entry is reachable in the mode the class is entered in."""
    if entry >= elf.elf_class.entry_limit:
        raise ImageError(
            str(path),
            f"the entry point {entry:#x} is not below {elf.elf_class.entry_limit:#x}, "
            f"which {elf.elf_class.mode.value} mode entry requires",
        )


def segment_writes(image: bytes, elf: ElfImage) -> tuple[MemoryWrite, ...]:
    """One write per segment: its file bytes, zero-filled up to ``p_memsz``."""
    return tuple(
        MemoryWrite(segment.paddr, image[segment.offset : segment.offset + segment.filesz].ljust(segment.memsz, b"\0"))
        for segment in elf.segments
    )


def _check_mode(path: Path, elf: ElfImage, mode: CpuMode | None) -> None:
    if mode is not None and mode != elf.elf_class.mode:
        raise ImageError(
            str(path),
            f"is an {elf.elf_class.name} kernel, entered in {elf.elf_class.mode.value} mode, "
            f"but {mode.value} mode was requested",
        )


def load(path: Path, image: bytes, request: LoadRequest) -> BootPlan:
    """Load every ``PT_LOAD`` segment at its ``p_paddr`` and enter at ``e_entry``."""
    elf = parse(path, image)
    _check_mode(path, elf, request.mode)
    reject_overrides(path, request, "an ELF image")
    placement = place_segments(path, elf, request)
    entry = entry_point(path, elf)
    check_entry_limit(path, elf, entry)
    return BootPlan(
        format=FORMAT,
        writes=segment_writes(image, elf),
        entry=EntryState(mode=elf.elf_class.mode, entry=entry, tables=placement.boot_tables(elf.elf_class.mode)[0]),
        kernel_start=elf.start,
        kernel_end=elf.end,
    )

