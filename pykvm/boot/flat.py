"""Flat binaries: the whole file copied to one address and entered there.

A flat binary says nothing about itself, so the caller chooses the mode, the
load address and the entry point (``LoadRequest``); the defaults are those of a
BIOS boot sector in real mode and of a kernel at 1 MiB otherwise.

This module also holds the checks every loader shares: an image must not be
empty, and must not come with overrides that only a flat binary can honour.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ImageError
from ..x86 import layout
from .placement import Placement
from .plan import BootPlan, CpuMode, EntryState, LoadRequest, MemoryWrite, check_in_ram

FORMAT = "flat"

# Real mode reaches the first MiB (segment << 4 + offset, without the A20 wrap-around).
REAL_MODE_ADDRESS_LIMIT = layout.MIB
# Protected mode without paging addresses 4 GiB.
PROTECTED_MODE_ADDRESS_LIMIT = 4 * layout.GIB
# Long mode code starts in the VMM's identity map.
LONG_MODE_ENTRY_LIMIT = layout.IDENTITY_MAP_END

ENTRY_SIZE = 1


def reject_overrides(path: Path, request: LoadRequest, kind: str) -> None:
    """Refuse a load address or entry point for an image that states its own."""
    if request.load_addr is not None:
        raise ImageError(str(path), f"a load address applies to flat binaries only; {kind} says where it loads")
    if request.entry is not None:
        raise ImageError(str(path), f"an entry point applies to flat binaries only; {kind} states its own")


def check_not_empty(path: Path, image: bytes) -> None:
    """Raise :class:`ImageError` for an empty image."""
    if not image:
        raise ImageError(str(path), "the file is empty")


def default_load_addr(mode: CpuMode) -> int:
    """Where a flat binary loads when the caller does not say: 0x7c00 in real mode, else 1 MiB."""
    return layout.REAL_MODE_LOAD_ADDR if mode == CpuMode.REAL else layout.HIMEM_START


def _check_not_negative(path: Path, what: str, value: int) -> None:
    if value < 0:
        raise ImageError(str(path), f"{what} {value:#x} is negative")


def _check_real_mode(path: Path, load_addr: int, size: int, entry: int) -> None:
    if load_addr + size > REAL_MODE_ADDRESS_LIMIT:
        raise ImageError(
            str(path),
            f"the flat image [{load_addr:#x}, {load_addr + size:#x}) does not fit below 1 MiB, "
            f"which is all real mode can address; choose another --mode or load address",
        )
    if entry >= REAL_MODE_ADDRESS_LIMIT:
        raise ImageError(str(path), f"the entry point {entry:#x} is not below 1 MiB, which real mode requires")


def _check_protected_mode(path: Path, load_addr: int, size: int, entry: int) -> None:
    if load_addr + size > PROTECTED_MODE_ADDRESS_LIMIT:
        raise ImageError(
            str(path),
            f"the flat image [{load_addr:#x}, {load_addr + size:#x}) does not fit below 4 GiB, "
            f"which is all protected mode can address",
        )
    if entry >= PROTECTED_MODE_ADDRESS_LIMIT:
        raise ImageError(str(path), f"the entry point {entry:#x} is not below 4 GiB, which protected mode requires")


def _check_long_mode(path: Path, entry: int) -> None:
    if entry >= LONG_MODE_ENTRY_LIMIT:
        raise ImageError(
            str(path),
            f"the entry point {entry:#x} is not below {LONG_MODE_ENTRY_LIMIT:#x}, "
            f"the end of the VMM's identity map for long mode",
        )


def _check_mode_limits(path: Path, mode: CpuMode, load_addr: int, size: int, entry: int) -> None:
    if mode == CpuMode.REAL:
        _check_real_mode(path, load_addr, size, entry)
    elif mode == CpuMode.PROTECTED:
        _check_protected_mode(path, load_addr, size, entry)
    else:
        _check_long_mode(path, entry)


def load(path: Path, image: bytes, request: LoadRequest) -> BootPlan:
    """Copy ``image`` to the requested (or default) address and enter it there."""
    check_not_empty(path, image)
    mode = request.mode or CpuMode.REAL
    load_addr = default_load_addr(mode) if request.load_addr is None else request.load_addr
    entry = load_addr if request.entry is None else request.entry
    _check_not_negative(path, "the load address", load_addr)
    _check_not_negative(path, "the entry point", entry)
    _check_mode_limits(path, mode, load_addr, len(image), entry)
    check_in_ram(path, "the flat image", load_addr, len(image), request)
    check_in_ram(path, "the entry point", entry, ENTRY_SIZE, request)
    placement = Placement(path, request.memory_map)
    placement.occupy("the flat image", load_addr, len(image))
    return BootPlan(
        format=FORMAT,
        writes=(MemoryWrite(load_addr, image),),
        entry=EntryState(mode=mode, entry=entry, tables=placement.boot_tables(mode)[0]),
        kernel_start=load_addr,
        kernel_end=load_addr + len(image),
    )
