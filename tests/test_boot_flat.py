"""The flat binary loader: defaults per mode, caller overrides, and the mode's address limits."""

from __future__ import annotations

from pathlib import Path

import pytest

from pykvm.boot import flat
from pykvm.boot.plan import BootTables, CpuMode
from pykvm.errors import ImageError
from pykvm.x86 import gdt, layout
from pykvm.x86.e820 import E820Entry, E820Type
from tests.images import HLT, MEMORY_MAP, request

PATH = Path("guest.bin")
IMAGE = b"\xfa" + HLT * 15
BIG_RAM_MAP = MEMORY_MAP + (E820Entry(layout.MMIO_HOLE_END, layout.GIB, E820Type.RAM),)


def rejected(image: bytes = IMAGE, **fields: object) -> str:
    with pytest.raises(ImageError) as info:
        flat.load(PATH, image, request(**fields))
    assert info.value.path == str(PATH)
    return info.value.reason


def test_real_mode_defaults_to_a_boot_sector_at_0x7c00() -> None:
    plan = flat.load(PATH, IMAGE, request())
    assert plan.format == "flat"
    assert plan.entry.mode == CpuMode.REAL
    assert plan.entry.entry == layout.REAL_MODE_LOAD_ADDR
    assert plan.entry.user is False
    assert dict(plan.entry.regs) == {}
    assert [(w.gpa, w.data) for w in plan.writes] == [(layout.REAL_MODE_LOAD_ADDR, IMAGE)]
    assert (plan.kernel_start, plan.kernel_end) == (layout.REAL_MODE_LOAD_ADDR, layout.REAL_MODE_LOAD_ADDR + 16)


@pytest.mark.parametrize("mode", [CpuMode.PROTECTED, CpuMode.LONG])
def test_protected_and_long_mode_default_to_1_mib(mode: CpuMode) -> None:
    plan = flat.load(PATH, IMAGE, request(mode=mode))
    assert plan.entry.mode == mode
    assert plan.entry.entry == layout.HIMEM_START
    assert plan.writes[0].gpa == layout.HIMEM_START


def test_load_address_and_entry_are_taken_from_the_request() -> None:
    plan = flat.load(PATH, IMAGE, request(mode=CpuMode.LONG, load_addr=0x200000, entry=0x200004))
    assert plan.writes[0].gpa == 0x200000
    assert plan.entry.entry == 0x200004


def test_entry_defaults_to_the_load_address() -> None:
    assert flat.load(PATH, IMAGE, request(load_addr=0x1000)).entry.entry == 0x1000


def test_empty_image() -> None:
    assert rejected(b"") == "the file is empty"


def test_real_mode_image_must_end_below_1_mib() -> None:
    reason = rejected(load_addr=layout.HIMEM_START - 8)
    assert "does not fit below 1 MiB" in reason


def test_real_mode_entry_must_be_below_1_mib() -> None:
    assert "entry point 0x100000 is not below 1 MiB" in rejected(entry=layout.HIMEM_START)


def test_protected_mode_image_must_end_below_4_gib() -> None:
    reason = rejected(mode=CpuMode.PROTECTED, load_addr=layout.MMIO_HOLE_END, memory_map=BIG_RAM_MAP)
    assert "does not fit below 4 GiB" in reason


def test_protected_mode_entry_must_be_below_4_gib() -> None:
    reason = rejected(mode=CpuMode.PROTECTED, entry=layout.MMIO_HOLE_END)
    assert "entry point 0x100000000 is not below 4 GiB" in reason


def test_long_mode_image_may_load_above_4_gib_with_a_low_entry() -> None:
    plan = flat.load(
        PATH,
        IMAGE,
        request(mode=CpuMode.LONG, load_addr=layout.MMIO_HOLE_END, entry=layout.HIMEM_START, memory_map=BIG_RAM_MAP),
    )
    assert plan.writes[0].gpa == layout.MMIO_HOLE_END


def test_long_mode_entry_must_be_identity_mapped() -> None:
    reason = rejected(mode=CpuMode.LONG, load_addr=layout.MMIO_HOLE_END, memory_map=BIG_RAM_MAP)
    assert "end of the VMM's identity map" in reason


def test_image_outside_ram() -> None:
    assert "the flat image [0x4000000, 0x4000010) does not fit in guest RAM" in rejected(
        mode=CpuMode.LONG, load_addr=64 * layout.MIB
    )


def test_real_mode_image_in_the_ebda_loads_there() -> None:
    # The EBDA is reserved in the memory map, but guest memory is there (as on a PC).
    assert flat.load(PATH, IMAGE, request(load_addr=layout.EBDA_START)).writes[0].gpa == layout.EBDA_START


def test_image_past_the_end_of_guest_memory() -> None:
    assert "the flat image [0x3fffff8, 0x4000008) does not fit in guest RAM" in rejected(
        mode=CpuMode.PROTECTED, load_addr=64 * layout.MIB - 8
    )


def test_entry_outside_ram() -> None:
    assert "the entry point [0x4000000, 0x4000001) does not fit in guest RAM" in rejected(
        mode=CpuMode.PROTECTED, entry=64 * layout.MIB
    )


@pytest.mark.parametrize("mode", [CpuMode.PROTECTED, CpuMode.LONG])
def test_boot_structures_move_out_of_the_image_s_way(mode: CpuMode) -> None:
    image = HLT * 0xC000  # over the GDT, page tables, stack and TSS's usual places
    plan = flat.load(PATH, image, request(mode=mode, load_addr=layout.BOOT_GDT_START))
    tables = plan.entry.tables
    structures = [(tables.gdt, gdt.BOOT_GDT_SIZE), (tables.tss, gdt.TSS_SIZE), (tables.stack_pointer - 0xFF0, 0x1000)]
    if mode is CpuMode.LONG:
        structures.append((tables.page_tables, layout.PAGE_TABLES_SIZE))
    for start, size in structures:
        assert start >= layout.BOOT_GDT_START + len(image) or start + size <= layout.BOOT_GDT_START, hex(start)


def test_boot_structures_keep_their_usual_places_when_free() -> None:
    plan = flat.load(PATH, IMAGE, request(mode=CpuMode.LONG))
    assert plan.entry.tables == BootTables()
    assert (plan.entry.tables.gdt, plan.entry.tables.page_tables) == (layout.BOOT_GDT_START, layout.PML4_START)


def test_real_mode_needs_no_boot_structures() -> None:
    assert flat.load(PATH, IMAGE, request(load_addr=layout.BOOT_GDT_START)).writes[0].gpa == layout.BOOT_GDT_START


def test_negative_addresses() -> None:
    assert "the load address -0x10 is negative" in rejected(load_addr=-16)
    assert "the entry point -0x1 is negative" in rejected(entry=-1)
