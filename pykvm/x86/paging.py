"""Identity-mapping page tables for long-mode entry (pure encoders).

One PML4 entry, one PDPT with four entries, four page directories of 2 MiB pages:
the low 4 GiB (RAM and the MMIO hole) mapped virtual == physical.  Every level is
user-accessible so guest code entered at CPL3 can run on the same tables.  The six
tables are one block of pages (``layout.PAGE_TABLES_SIZE``), in the order PML4,
PDPT, page directories, wherever the loader put the block.
"""

from __future__ import annotations

import functools
import struct

from . import layout

PRESENT = 1 << 0
WRITABLE = 1 << 1
USER = 1 << 2
PAGE_SIZE_BIT = 1 << 7  # in a page directory entry: maps a 2 MiB page
_TABLE = PRESENT | WRITABLE | USER
_ENTRIES = 512


@functools.lru_cache(maxsize=8)
def identity_page_tables(base: int = layout.PML4_START) -> tuple[tuple[int, bytes], ...]:
    """(gpa, bytes) of every table of the block at ``base``, ready to be written into guest memory."""
    pdpt_start = base + layout.PAGE_SIZE
    directories = [base + (2 + i) * layout.PAGE_SIZE for i in range(layout.PD_COUNT)]
    pml4 = struct.pack("<Q", pdpt_start | _TABLE).ljust(layout.PAGE_SIZE, b"\0")
    pdpt = struct.pack(f"<{len(directories)}Q", *(pd | _TABLE for pd in directories)).ljust(layout.PAGE_SIZE, b"\0")
    tables = [(base, pml4), (pdpt_start, pdpt)]
    for index, pd in enumerate(directories):
        first = index * _ENTRIES * layout.HUGE_PAGE_SIZE
        pages = (first + i * layout.HUGE_PAGE_SIZE | _TABLE | PAGE_SIZE_BIT for i in range(_ENTRIES))
        tables.append((pd, struct.pack(f"<{_ENTRIES}Q", *pages)))
    return tuple(tables)
