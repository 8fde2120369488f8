"""What a loader produces: the memory writes and the vCPU state that boot a guest.

Loaders are pure: they parse and validate an image and return a
:class:`BootPlan`; the machine applies it.  Nothing here touches KVM.

Command lines and module strings are bytes, as the boot protocols define them
(NUL-terminated, each protocol with its size limit).  A ``str`` is turned into
bytes in one place, :func:`to_bytes`, the way the operating system encodes
command-line arguments, so a non-UTF-8 argument reaches the guest byte for byte.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ImageError
from ..x86.e820 import E820Entry, E820Type
from ..x86.entry import BootTables, CpuMode, EntryState, MemoryWrite

__all__ = [
    "BootPlan", "BootTables", "CpuMode", "EntryState", "LoadRequest", "MemoryWrite", "Module",
    "check_in_ram", "nul_terminated", "to_bytes",
]  # fmt: skip

NUL = b"\0"


def to_bytes(text: str | bytes) -> bytes:
    """A command line or module string as the guest gets it.

    Bytes stay as they are; a ``str`` is encoded as the operating system encodes
    command-line arguments (:func:`os.fsencode`), so the bytes of an argument that
    was not valid UTF-8, which Python keeps as surrogate escapes, come back unchanged.
    """
    return text if isinstance(text, bytes) else os.fsencode(text)


def nul_terminated(path: Path, what: str, data: bytes, max_length: int, why: str) -> bytes:
    """``data`` with its terminating NUL; refused if it holds a NUL or is longer than ``max_length`` bytes.

    ``why`` names the limit (the protocol field or reservation that sets it).
    """
    if NUL in data:
        raise ImageError(str(path), f"{what} contains a NUL character at byte {data.index(NUL)}")
    if len(data) > max_length:
        raise ImageError(str(path), f"{what} is {len(data)} bytes, more than {max_length} ({why})")
    return data + NUL


@dataclass(frozen=True)
class Module:
    """A file handed to a multiboot kernel (or an initrd), with its string (bytes, or a str, see :func:`to_bytes`)."""

    path: Path
    data: bytes
    string: str | bytes


@dataclass(frozen=True)
class LoadRequest:
    """Everything a loader is told besides the image itself.

    ``memory_map`` is the map the guest is given; ``ram`` the (gpa, size) ranges backed by
    memory (the machine's memory slots), where an image may load even if the map calls
    the range reserved (the EBDA, the BIOS area); empty, it is the map's RAM ranges.
    ``cmdline`` is the kernel's arguments (bytes, or a str, see :func:`to_bytes`).
    """

    memory_map: tuple[E820Entry, ...]
    cmdline: str | bytes = b""
    modules: tuple[Module, ...] = ()
    initrd: Module | None = None
    rsdp_addr: int | None = None  # where the ACPI RSDP is, for boot protocols that pass it
    mode: CpuMode | None = None
    load_addr: int | None = None
    entry: int | None = None
    ram: tuple[tuple[int, int], ...] = ()

    @property
    def cmdline_bytes(self) -> bytes:
        return to_bytes(self.cmdline)

    @property
    def ram_ranges(self) -> tuple[tuple[int, int], ...]:
        """(start, end) of each range of guest memory an image may load into."""
        if self.ram:
            return tuple((gpa, gpa + size) for gpa, size in self.ram)
        return tuple((entry.addr, entry.end) for entry in self.memory_map if entry.type == E820Type.RAM)


@dataclass(frozen=True)
class BootPlan:
    """A loader's result: what to write, and how to enter the guest."""

    format: str
    writes: tuple[MemoryWrite, ...]
    entry: EntryState
    kernel_start: int
    kernel_end: int


def check_in_ram(path: Path, what: str, gpa: int, size: int, request: LoadRequest) -> None:
    """Raise :class:`ImageError` unless [gpa, gpa+size) lies inside one range of guest memory."""
    if gpa >= 0 and any(start <= gpa and gpa + size <= end for start, end in request.ram_ranges):
        return
    raise ImageError(
        str(path),
        f"{what} [{gpa:#x}, {gpa + size:#x}) does not fit in guest RAM "
        f"(give the machine more memory with -m, or load it elsewhere)",
    )
