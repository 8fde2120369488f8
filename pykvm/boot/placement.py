"""Placing what the VMM writes beside a guest image, in the RAM the image leaves free.

An image says where its own parts go (ELF segments, a multiboot load address, a
bzImage's preferred address); everything else is the loader's to place: the GDT,
TSS, page tables and stack of protected and long mode entry, the boot information,
the command line, modules and the initrd.  As QEMU and GRUB do, a loader first
*occupies* the ranges the image dictates, then *claims* room for each thing it
writes itself:

- :meth:`Placement.claim` takes each thing's preferred address (``x86/layout.py``
  names one for each boot structure) when that range is free RAM, else the lowest
  free RAM that fits, so an image that loads over the usual low-memory spots (a
  test kernel at 0x8000, say) simply moves the VMM's structures elsewhere.  The
  things claimed together get their free preferred places first, so one that must
  move never takes another's;
- :meth:`Placement.claim_high` takes the highest free RAM below a limit, as an
  initrd is placed.

Claims come only from the RAM ranges of the memory map the guest is given, never
below ``layout.BOOT_STRUCTURES_LOWEST`` (the real-mode interrupt vector table and
BIOS data area).  A true conflict, two parts of the image needing the same memory,
raises an :class:`ImageError` naming both ranges; a thing that fits nowhere raises
one naming its size and where it was looked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import ImageError
from ..x86 import gdt, layout
from ..x86.e820 import E820Entry, E820Type
from ..x86.entry import BootTables, CpuMode

# 32-bit boot protocols hand over 32-bit pointers.
BELOW_4G = 4 * layout.GIB
STRUCTURE_ALIGN = 16
STACK_TOP_GAP = 0x10  # the stack pointer sits this far below the top of its block


def align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def align_down(value: int, alignment: int) -> int:
    return value // alignment * alignment


@dataclass(frozen=True)
class Claim:
    """Something the VMM writes: its name (for error messages), size, preferred place, alignment and limit."""

    name: str
    size: int
    preferred: int | None = None
    align: int = STRUCTURE_ALIGN
    limit: int = BELOW_4G


@dataclass(frozen=True)
class Extent:
    """A guest-physical range something occupies, with what it is (for error messages)."""

    start: int
    end: int
    name: str

    def overlaps(self, start: int, end: int) -> bool:
        return start < self.end and self.start < end


class Placement:
    """The memory a load has handed out so far, and the free RAM left for the next claim."""

    def __init__(self, path: Path, memory_map: tuple[E820Entry, ...]) -> None:
        self.path = path
        self._ram = sorted(
            (max(entry.addr, layout.BOOT_STRUCTURES_LOWEST), entry.end)
            for entry in memory_map
            if entry.type == E820Type.RAM and entry.end > layout.BOOT_STRUCTURES_LOWEST
        )
        self.extents: list[Extent] = []

    def occupy(self, name: str, start: int, size: int) -> None:
        """Record that the image needs ``[start, start+size)``; raise if something already holds part of it."""
        end = start + size
        for extent in self.extents:
            if extent.overlaps(start, end):
                raise ImageError(
                    str(self.path),
                    f"{name} [{start:#x}, {end:#x}) overlaps {extent.name} [{extent.start:#x}, {extent.end:#x})",
                )
        self.extents.append(Extent(start, end, name))

    def is_free(self, start: int, size: int) -> bool:
        """Whether ``[start, start+size)`` is inside one RAM range and nothing holds any of it."""
        end = start + size
        in_ram = any(low <= start and end <= high for low, high in self._ram)
        return in_ram and not any(extent.overlaps(start, end) for extent in self.extents)

    def claim(self, *claims: Claim) -> list[int]:
        """The address of each claim: its preferred place where that is free, else the lowest free RAM below its limit.

        Every claim whose preferred place is free gets it before any other is moved.
        """
        addresses: list[int | None] = [None] * len(claims)
        for index, claim in enumerate(claims):
            preferred = claim.preferred
            if preferred is not None and preferred + claim.size <= claim.limit and self.is_free(preferred, claim.size):
                addresses[index] = self._take(claim.name, preferred, claim.size)
        for index, claim in enumerate(claims):
            if addresses[index] is None:
                addresses[index] = self._take(claim.name, self._lowest_fit_or_fail(claim), claim.size)
        return [address for address in addresses if address is not None]

    def claim_high(
        self, name: str, size: int, *, limit: int, above: int = 0, align: int = layout.PAGE_SIZE, why_limit: str = ""
    ) -> int:
        """Room for ``size`` bytes as high as it fits below ``limit`` and at or above ``above``."""
        if size == 0:
            raise ImageError(str(self.path), f"{name} is empty")
        gpa = self._highest_fit(size, align, limit, above)
        if gpa is None:
            raise ImageError(
                str(self.path),
                f"{name} ({size:#x} bytes) does not fit in guest RAM between {above:#x} and "
                f"{limit:#x}{f' ({why_limit})' if why_limit else ''}; give the machine more memory with -m",
            )
        return self._take(name, gpa, size)

    def boot_tables(self, mode: CpuMode, *others: Claim) -> tuple[BootTables, list[int]]:
        """Claim the GDT, TSS, stack and (long mode) page tables entering ``mode`` needs, with ``others``.

        Returns the tables and the addresses of ``others``.  Real mode needs no tables.
        """
        if mode is CpuMode.REAL:
            return BootTables(), self.claim(*others)
        tables = [
            Claim("the VMM's GDT", gdt.BOOT_GDT_SIZE, layout.BOOT_GDT_START),
            Claim("the VMM's TSS", gdt.TSS_SIZE, layout.BOOT_TSS_START, align=layout.PAGE_SIZE),
            Claim("the VMM's boot stack", layout.BOOT_STACK_SIZE, layout.BOOT_STACK_START),
        ]
        if mode is CpuMode.LONG:
            tables.append(Claim("the VMM's page tables", layout.PAGE_TABLES_SIZE, layout.PML4_START, layout.PAGE_SIZE))
        addresses = self.claim(*tables, *others)
        gdt_addr, tss_addr, stack_addr = addresses[:3]
        page_tables = addresses[3] if mode is CpuMode.LONG else layout.PML4_START
        boot_tables = BootTables(gdt_addr, tss_addr, page_tables, stack_addr + layout.BOOT_STACK_SIZE - STACK_TOP_GAP)
        return boot_tables, addresses[len(tables) :]

    def _take(self, name: str, gpa: int, size: int) -> int:
        self.extents.append(Extent(gpa, gpa + size, name))
        return gpa

    def _lowest_fit_or_fail(self, claim: Claim) -> int:
        gpa = self._lowest_fit(claim.size, claim.align, claim.limit)
        if gpa is None:
            raise ImageError(
                str(self.path),
                f"no room for {claim.name} ({claim.size:#x} bytes) in the guest RAM below {claim.limit:#x} "
                f"that the image leaves free; give the machine more memory with -m",
            )
        return gpa

    def _lowest_fit(self, size: int, align: int, limit: int) -> int | None:
        ordered = sorted(self.extents, key=lambda extent: extent.start)
        for low, high in self._ram:
            candidate = align_up(low, align)
            for extent in ordered:
                if extent.overlaps(candidate, candidate + size):
                    candidate = align_up(extent.end, align)
            if candidate + size <= min(high, limit):
                return candidate
        return None

    def _highest_fit(self, size: int, align: int, limit: int, above: int) -> int | None:
        ordered = sorted(self.extents, key=lambda extent: extent.end, reverse=True)
        for low, high in reversed(self._ram):
            candidate = align_down(min(high, limit) - size, align)
            for extent in ordered:
                if extent.overlaps(candidate, candidate + size):
                    candidate = align_down(extent.start - size, align)
            if candidate >= max(low, above):
                return candidate
        return None
