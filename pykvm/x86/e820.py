"""The guest's physical memory map (e820 style), built once per machine.

The same map feeds the memory slots, the multiboot information, and later
fw_cfg and the Linux boot parameters, so every consumer agrees on it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from . import layout


class E820Type(enum.IntEnum):
    """Address range types, as in the ACPI specification's E820 table."""

    RAM = 1
    RESERVED = 2
    ACPI = 3
    NVS = 4


@dataclass(frozen=True)
class E820Entry:
    """One range of the memory map."""

    addr: int
    size: int
    type: E820Type

    @property
    def end(self) -> int:
        return self.addr + self.size


def ram_regions(ram_size: int) -> list[tuple[int, int]]:
    """The (gpa, size) ranges that back ``ram_size`` bytes of RAM around the MMIO hole."""
    below_hole = min(ram_size, layout.MMIO_HOLE_START)
    regions = [(0, below_hole)]
    if ram_size > below_hole:
        regions.append((layout.MMIO_HOLE_END, ram_size - below_hole))
    return regions


def build_memory_map(ram_size: int) -> tuple[E820Entry, ...]:
    """The e820 map of a machine with ``ram_size`` bytes of RAM (at least 1 MiB).

    Conventional memory ends at the EBDA; the EBDA and the BIOS area are
    reserved (the VGA window between them is neither RAM nor reserved, as on a PC);
    RAM resumes at 1 MiB up to the MMIO hole and continues above 4 GiB.
    """
    entries = [
        E820Entry(0, layout.EBDA_START, E820Type.RAM),
        E820Entry(layout.EBDA_START, layout.LOW_MEMORY_END - layout.EBDA_START, E820Type.RESERVED),
        E820Entry(layout.BIOS_AREA_START, layout.BIOS_AREA_END - layout.BIOS_AREA_START, E820Type.RESERVED),
    ]
    for gpa, size in ram_regions(ram_size):
        start = max(gpa, layout.HIMEM_START)
        if gpa + size > start:
            entries.append(E820Entry(start, gpa + size - start, E820Type.RAM))
    return tuple(entries)
