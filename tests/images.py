"""Small guest images built in memory for the loader tests: ELF32/ELF64 and multiboot.

Each builder produces a valid image by default; keyword arguments bend one field
at a time so a test can show that exactly that field is rejected.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from pykvm.boot import elf, multiboot
from pykvm.boot.plan import BootPlan, LoadRequest
from pykvm.x86 import layout
from pykvm.x86.e820 import build_memory_map, ram_regions

RAM_SIZE = 64 * layout.MIB
MEMORY_MAP = build_memory_map(RAM_SIZE)
RAM = tuple(ram_regions(RAM_SIZE))
KERNEL_ADDR = layout.HIMEM_START
HLT = b"\xf4"
DATA_ALIGN = 16


def request(**fields: object) -> LoadRequest:
    """A load request for a 64 MiB machine, with ``fields`` overriding the defaults.

    A custom ``memory_map`` comes without the machine's memory slots (``ram``), unless given too.
    """
    if "memory_map" in fields:
        fields.setdefault("ram", ())
    return LoadRequest(memory_map=fields.pop("memory_map", MEMORY_MAP), ram=fields.pop("ram", RAM), **fields)  # type: ignore[arg-type]


def peek(plan: BootPlan, gpa: int, size: int) -> bytes:
    """The bytes ``plan`` writes at [gpa, gpa+size), which one write must cover."""
    for write in plan.writes:
        if write.gpa <= gpa and gpa + size <= write.end:
            return write.data[gpa - write.gpa : gpa - write.gpa + size]
    raise AssertionError(f"no write covers [{gpa:#x}, {gpa + size:#x})")


def peek_u32(plan: BootPlan, gpa: int) -> int:
    return int.from_bytes(peek(plan, gpa, 4), "little")


def peek_string(plan: BootPlan, gpa: int) -> bytes:
    """The NUL-terminated string at ``gpa`` (without its NUL)."""
    for write in plan.writes:
        if write.gpa <= gpa < write.end:
            data = write.data[gpa - write.gpa :]
            assert b"\0" in data, f"string at {gpa:#x} is not NUL-terminated"
            return data[: data.index(b"\0")]
    raise AssertionError(f"no write covers {gpa:#x}")


def assert_writes_disjoint(plan: BootPlan) -> None:
    ordered = sorted(plan.writes, key=lambda write: write.gpa)
    for lower, upper in zip(ordered, ordered[1:]):
        assert lower.end <= upper.gpa, f"writes at {lower.gpa:#x} and {upper.gpa:#x} overlap"


# --- ELF -------------------------------------------------------------------------------


@dataclass
class Seg:
    """A program header to build; ``data`` is its file contents."""

    paddr: int
    data: bytes = b""
    memsz: int | None = None
    vaddr: int | None = None
    type: int = elf.PT_LOAD
    offset: int | None = None
    filesz: int | None = None


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def _elf_class(image: bytes) -> elf.ElfClass:
    return elf.ELF32 if image[elf.EI_CLASS] == elf.ELFCLASS32 else elf.ELF64


def build_elf(
    segments: list[Seg],
    entry: int,
    *,
    bits: int = 32,
    e_type: int = elf.ET_EXEC,
    machine: int | None = None,
) -> bytes:
    """An x86 ELF executable: header, one program header per ``Seg``, then the segments' data."""
    elf_class = elf.ELF32 if bits == 32 else elf.ELF64
    offset = _align(elf_class.header.size + len(segments) * elf_class.phdr.size, DATA_ALIGN)
    phdrs, body = b"", b""
    for seg in segments:
        fields = {
            "type": seg.type,
            "offset": offset + len(body) if seg.offset is None else seg.offset,
            "vaddr": seg.paddr if seg.vaddr is None else seg.vaddr,
            "paddr": seg.paddr,
            "filesz": len(seg.data) if seg.filesz is None else seg.filesz,
            "memsz": len(seg.data) if seg.memsz is None else seg.memsz,
            "flags": 0,
            "align": DATA_ALIGN,
        }
        phdrs += elf_class.phdr.pack(*(fields[name] for name in elf_class.phdr_fields))
        body += seg.data.ljust(_align(len(seg.data), DATA_ALIGN), b"\0")
    ident = bytes([*elf.ELF_MAGIC, elf.ELFCLASS32 if bits == 32 else elf.ELFCLASS64, elf.ELFDATA2LSB, 1])
    header = {
        "ident": ident.ljust(elf.EI_NIDENT, b"\0"),
        "type": e_type,
        "machine": elf_class.machine if machine is None else machine,
        "version": 1,
        "entry": entry,
        "phoff": elf_class.header.size,
        "shoff": 0,
        "flags": 0,
        "ehsize": elf_class.header.size,
        "phentsize": elf_class.phdr.size,
        "phnum": len(segments),
        "shentsize": 0,
        "shnum": 0,
        "shstrndx": 0,
    }
    head = elf_class.header.pack(*(header[name] for name in elf.HEADER_FIELDS)) + phdrs
    return head.ljust(offset, b"\0") + body


def patch_header(image: bytes, field: str, value: int) -> bytes:
    """``image`` with one ELF header field (named as in ``elf.HEADER_FIELDS``) replaced."""
    elf_class = _elf_class(image)
    header = dict(zip(elf.HEADER_FIELDS, elf_class.header.unpack_from(image)))
    header[field] = value
    return elf_class.header.pack(*(header[name] for name in elf.HEADER_FIELDS)) + image[elf_class.header.size :]


def patch_phdr(image: bytes, index: int, field: str, value: int) -> bytes:
    """``image`` with one field of program header ``index`` replaced."""
    elf_class = _elf_class(image)
    offset = elf_class.header.size + index * elf_class.phdr.size
    phdr = dict(zip(elf_class.phdr_fields, elf_class.phdr.unpack_from(image, offset)))
    phdr[field] = value
    packed = elf_class.phdr.pack(*(phdr[name] for name in elf_class.phdr_fields))
    return image[:offset] + packed + image[offset + elf_class.phdr.size :]


def patch_byte(image: bytes, offset: int, value: int) -> bytes:
    return image[:offset] + bytes([value]) + image[offset + 1 :]


# --- multiboot -------------------------------------------------------------------------


def multiboot_header(
    flags: int = 0, fields: multiboot.AddressFields | None = None, checksum: int | None = None
) -> bytes:
    """A multiboot header; with ``fields``, the a.out kludge address fields follow."""
    if checksum is None:
        checksum = -(multiboot.HEADER_MAGIC + flags) & multiboot.U32_MASK
    header = multiboot.HEADER.pack(multiboot.HEADER_MAGIC, flags, checksum)
    if fields is not None:
        header += multiboot.ADDRESS_FIELDS.pack(
            fields.header_addr, fields.load_addr, fields.load_end_addr, fields.bss_end_addr, fields.entry_addr
        )
    return header


def aout_kernel(
    *,
    load_addr: int = KERNEL_ADDR,
    header_offset: int = 0,
    body: bytes = HLT * 16,
    bss_size: int = 0x1000,
    flags: int = multiboot.FLAG_ADDRESS_FIELDS,
    **overrides: int,
) -> bytes:
    """A flat multiboot kernel using the a.out kludge: header, then ``body``, then a bss."""
    size = header_offset + multiboot.ADDRESS_FIELDS_END + len(body)
    fields = {
        "header_addr": load_addr + header_offset,
        "load_addr": load_addr,
        "load_end_addr": load_addr + size,
        "bss_end_addr": load_addr + size + bss_size,
        "entry_addr": load_addr + header_offset + multiboot.ADDRESS_FIELDS_END,
    }
    fields.update(overrides)
    return bytes(header_offset) + multiboot_header(flags, multiboot.AddressFields(**fields)) + body


def multiboot_elf(*, bits: int = 32, flags: int = 0, bss_size: int = 0x2000) -> bytes:
    """An ELF multiboot kernel: the header opens its first segment (text), then a bss."""
    text = multiboot_header(flags) + HLT * 4
    return build_elf(
        [Seg(KERNEL_ADDR, text), Seg(KERNEL_ADDR + layout.PAGE_SIZE, b"", memsz=bss_size)],
        entry=KERNEL_ADDR + len(multiboot_header(flags)),
        bits=bits,
    )


# --- real tools ------------------------------------------------------------------------


def run_tools(*commands: list[str], cwd: Path) -> None:
    """Run build commands, skipping the test when a tool is missing."""
    for command in commands:
        if shutil.which(command[0]) is None:
            pytest.skip(f"{command[0]} is not installed")
    for command in commands:
        subprocess.run(command, cwd=cwd, check=True, capture_output=True)
