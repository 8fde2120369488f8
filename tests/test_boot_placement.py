"""Where the VMM's own boot structures go: preferred places, moving out of an image's way, true conflicts."""

from __future__ import annotations

from pathlib import Path

import pytest

from pykvm.boot.placement import Claim, Placement
from pykvm.boot.plan import CpuMode
from pykvm.errors import ImageError
from pykvm.x86 import gdt, layout
from pykvm.x86.e820 import E820Entry
from tests.images import MEMORY_MAP

PATH = Path("kernel")
MIB = layout.MIB


def placement(memory_map: tuple[E820Entry, ...] = MEMORY_MAP) -> Placement:
    return Placement(PATH, memory_map)


def test_a_free_preferred_place_is_taken() -> None:
    assert placement().claim(Claim("x", 0x100, preferred=0x9000)) == [0x9000]


def test_a_taken_preferred_place_moves_to_the_lowest_free_ram() -> None:
    places = placement()
    places.occupy("the image", 0x500, 0x9000)
    assert places.claim(Claim("x", 0x100, preferred=0x9000)) == [0x9500]


def test_claims_made_together_keep_their_free_preferred_places() -> None:
    # The first claim must move; the lowest free RAM is the second one's preferred place, which it keeps.
    places = placement()
    places.occupy("the image", 0x8000, 0x1000)
    moved, kept = places.claim(Claim("moved", 0x100, preferred=0x8000), Claim("kept", 0x100, preferred=0x500))
    assert kept == 0x500 and moved == 0x600


def test_claims_are_aligned() -> None:
    places = placement()
    places.occupy("the image", 0x500, 0x10)
    assert places.claim(Claim("x", 0x100, align=0x1000)) == [0x1000]


def test_nothing_goes_below_the_bios_data_area() -> None:
    assert placement().claim(Claim("x", 0x10)) == [layout.BOOT_STRUCTURES_LOWEST]


def test_claims_stay_in_ram_ranges_of_the_memory_map() -> None:
    places = placement()
    places.occupy("the image", 0x500, layout.EBDA_START - 0x600)  # leaves 0x100 bytes below the EBDA
    # 0x200 bytes fit neither there nor in the EBDA or BIOS area (reserved): the next RAM is at 1 MiB.
    assert places.claim(Claim("x", 0x200)) == [layout.HIMEM_START]


def test_claim_below_a_limit() -> None:
    places = placement()
    places.occupy("the image", 0x500, layout.EBDA_START - 0x500)
    with pytest.raises(ImageError) as info:
        places.claim(Claim("the setup code", 0x1000, limit=layout.LOW_MEMORY_END))
    assert "no room for the setup code (0x1000 bytes) in the guest RAM below 0xa0000" in info.value.reason


def test_a_claim_that_fits_nowhere_names_its_size() -> None:
    with pytest.raises(ImageError) as info:
        placement().claim(Claim("the multiboot information", 128 * MIB))
    assert info.value.path == str(PATH)
    assert "no room for the multiboot information (0x8000000 bytes)" in info.value.reason
    assert "give the machine more memory with -m" in info.value.reason


def test_two_image_parts_over_each_other_name_both_ranges() -> None:
    places = placement()
    places.occupy("ELF program header 0 (PT_LOAD)", 0x100000, 0x2000)
    with pytest.raises(ImageError) as info:
        places.occupy("ELF program header 1 (PT_LOAD)", 0x101000, 0x2000)
    assert info.value.reason == (
        "ELF program header 1 (PT_LOAD) [0x101000, 0x103000) overlaps ELF program header 0 (PT_LOAD) [0x100000, 0x102000)"
    )


def test_claim_high_takes_the_top_of_ram_below_the_limit() -> None:
    assert placement().claim_high("the initrd", 0x1800, limit=32 * MIB) == 32 * MIB - 0x2000


def test_claim_high_skips_what_is_taken() -> None:
    places = placement()
    places.occupy("a module", 64 * MIB - 0x3000, 0x3000)
    assert places.claim_high("the initrd", 0x1000, limit=4 * layout.GIB) == 64 * MIB - 0x4000


def test_claim_high_stays_above_a_floor() -> None:
    with pytest.raises(ImageError) as info:
        placement().claim_high("the initrd", 0x2000, limit=4 * layout.GIB, above=64 * MIB - 0x1000, why_limit="4 GiB")
    assert "between 0x3fff000 and 0x100000000 (4 GiB)" in info.value.reason


def test_boot_tables_at_their_preferred_places() -> None:
    tables, others = placement().boot_tables(CpuMode.LONG, Claim("cmdline", 0x10, preferred=layout.CMDLINE_START))
    assert (tables.gdt, tables.tss, tables.page_tables) == (layout.BOOT_GDT_START, layout.BOOT_TSS_START, layout.PML4_START)
    assert tables.stack_pointer == layout.BOOT_STACK_POINTER and others == [layout.CMDLINE_START]


def test_boot_tables_move_around_an_image_at_0x8000() -> None:
    places = placement()
    places.occupy("the image", 0x8000, 0x6000)  # the stack's and the TSS's usual places
    tables, _ = places.boot_tables(CpuMode.PROTECTED)
    assert tables.gdt == layout.BOOT_GDT_START
    for start, size in ((tables.tss, gdt.TSS_SIZE), (tables.stack_pointer - 0xFF0, layout.BOOT_STACK_SIZE)):
        assert start + size <= 0x8000 or start >= 0xE000


def test_real_mode_needs_no_boot_tables() -> None:
    places = placement()
    places.boot_tables(CpuMode.REAL)
    assert places.extents == []
