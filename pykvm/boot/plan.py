"""What a loader produces: the memory writes and the vCPU state that boot a guest.

Loaders are pure: they parse and validate an image and return a
:class:`BootPlan`; the machine applies it.  Nothing here touches KVM.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import ImageError
from ..x86 import layout
from ..x86.e820 import E820Entry, E820Type
from ..x86.entry import CpuMode, EntryState, MemoryWrite

__all__ = [
    "BOOT_AREA", "BootPlan", "CpuMode", "EntryState", "LoadRequest", "MemoryWrite", "Module", "Reserved",
    "check_clear_of", "check_in_ram",
]  # fmt: skip


@dataclass(frozen=True)
class Module:
    """A file handed to a multiboot kernel (or an initrd), with its string."""

    path: Path
    data: bytes
    string: str


@dataclass(frozen=True)
class LoadRequest:
    """Everything a loader is told besides the image itself."""

    memory_map: tuple[E820Entry, ...]
    cmdline: str = ""
    modules: tuple[Module, ...] = ()
    initrd: Module | None = None
    rsdp_addr: int | None = None  # where the ACPI RSDP is, for boot protocols that pass it
    mode: CpuMode | None = None
    load_addr: int | None = None
    entry: int | None = None


@dataclass(frozen=True)
class BootPlan:
    """A loader's result: what to write, and how to enter the guest."""

    format: str
    writes: tuple[MemoryWrite, ...]
    entry: EntryState
    kernel_start: int
    kernel_end: int


def check_in_ram(path: Path, what: str, gpa: int, size: int, memory_map: tuple[E820Entry, ...]) -> None:
    """Raise :class:`ImageError` unless [gpa, gpa+size) lies inside one RAM range of the map."""
    for entry in memory_map:
        if entry.type == E820Type.RAM and entry.addr <= gpa and gpa + size <= entry.end:
            return
    raise ImageError(
        str(path),
        f"{what} [{gpa:#x}, {gpa + size:#x}) does not fit in guest RAM "
        f"(give the machine more memory with -m, or load it elsewhere)",
    )


@dataclass(frozen=True)
class Reserved:
    """A guest-physical range the VMM writes itself, which an image must not overlap."""

    start: int
    end: int
    name: str


# Written by the VMM for protected and long mode entry.
BOOT_AREA = Reserved(
    layout.BOOT_AREA_START,
    layout.BOOT_AREA_END,
    "the VMM's boot structures (GDT, page tables, stack, boot information, TSS)",
)


def check_clear_of(path: Path, what: str, gpa: int, size: int, reserved: tuple[Reserved, ...]) -> None:
    """Raise :class:`ImageError` if [gpa, gpa+size) overlaps one of the ``reserved`` ranges."""
    for area in reserved:
        if gpa < area.end and area.start < gpa + size:
            raise ImageError(
                str(path),
                f"{what} [{gpa:#x}, {gpa + size:#x}) overlaps {area.name} "
                f"at [{area.start:#x}, {area.end:#x}); load it elsewhere",
            )
