"""The state a guest starts in: its memory writes and its first vCPU state.

Loaders (``pykvm.boot``) produce these; :mod:`pykvm.x86.cpu` turns them into registers.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Mapping

from . import layout


class CpuMode(str, enum.Enum):
    """The processor mode a guest is entered in, or runs in."""

    REAL = "real"
    PROTECTED = "protected"
    LONG = "long"

    @classmethod
    def of(cls, cr0: int, efer: int) -> CpuMode:
        """The mode control registers select: CR0.PE off is real mode; EFER.LMA on is long mode."""
        if not cr0 & CR0_PE:
            return cls.REAL
        return cls.LONG if efer & EFER_LMA else cls.PROTECTED


CR0_PE = 1 << 0
EFER_LMA = 1 << 10


@dataclass(frozen=True)
class MemoryWrite:
    """Bytes to place at a guest-physical address before the guest starts."""

    gpa: int
    data: bytes

    @property
    def end(self) -> int:
        return self.gpa + len(self.data)


@dataclass(frozen=True)
class BootTables:
    """Where the VMM writes what protected and long mode entry need: GDT, TSS, page tables, stack.

    Loaders choose these addresses around the image (:mod:`pykvm.boot.placement`); the
    defaults are the preferred places in low memory.  ``page_tables`` is the PML4 of a block
    of ``layout.PAGE_TABLES_SIZE`` bytes, used for long mode only.
    """

    gdt: int = layout.BOOT_GDT_START
    tss: int = layout.BOOT_TSS_START
    page_tables: int = layout.PML4_START
    stack_pointer: int = layout.BOOT_STACK_POINTER


@dataclass(frozen=True)
class EntryState:
    """The vCPU state at the first instruction.

    ``entry`` is the instruction pointer as a linear address (identity mapped in
    long mode; in real mode a physical address below 1 MiB).  ``user`` enters
    long-mode code at CPL3.  ``regs`` sets general registers by their 64-bit
    name (``"rax"``, ``"rbx"``, ``"rsi"``...); the rest start at zero.  ``tables`` says
    where the boot structures go (real mode needs none).  In real mode, ``segment``
    (when set) is the code segment to enter with, ``entry`` then being its offset,
    and ``data_segment`` the value of DS, ES and SS.
    """

    mode: CpuMode
    entry: int
    user: bool = False
    regs: Mapping[str, int] = field(default_factory=dict)
    tables: BootTables = field(default_factory=BootTables)
    segment: int | None = None
    data_segment: int = 0
