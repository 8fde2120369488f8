"""Pure x86 encoders: GDT, TSS, identity page tables, entry state, CPUID, the memory map."""

from __future__ import annotations

import struct

import pytest

from pykvm.kvm.state import CpuidEntry, SRegs
from pykvm.x86 import cpu, gdt, layout, paging
from pykvm.x86.e820 import E820Type, build_memory_map, ram_regions
from pykvm.x86.entry import CpuMode, EntryState


def test_gdt_descriptors_decode_to_the_segments_given_to_kvm() -> None:
    table = _entries(gdt.boot_gdt())
    assert table[gdt.CODE64_SELECTOR >> 3] == 0x00AF9B000000FFFF  # as Firecracker's CODE
    assert table[gdt.DATA_SELECTOR >> 3] == 0x00CF93000000FFFF
    assert gdt.CODE64.l == 1 and gdt.CODE64.db == 0 and gdt.CODE64.type == 0xB and gdt.CODE64.dpl == 0
    assert gdt.CODE32.db == 1 and gdt.CODE32.l == 0 and gdt.CODE32.limit == 0xFFFFFFFF
    assert gdt.USER_CODE64.dpl == 3 and gdt.USER_CODE64.selector & 3 == 3
    assert gdt.USER_DATA.dpl == 3 and gdt.USER_DATA.selector == gdt.USER_CODE64.selector - 8  # SYSRET order


def test_tss_descriptor_points_at_the_boot_tss() -> None:
    low, high = _entries(gdt.boot_gdt())[gdt.TSS_SELECTOR >> 3 :]
    base = ((low >> 16) & 0xFFFFFF) | ((low >> 56) << 24) | (high << 32)
    assert base == layout.BOOT_TSS_START
    assert gdt.TSS.base == layout.BOOT_TSS_START and gdt.TSS.type == 0xB and gdt.TSS.s == 0


def test_boot_tss_has_rsp0_and_an_io_bitmap_allowing_every_port() -> None:
    tss = gdt.boot_tss(rsp0=0x8FF0)
    assert struct.unpack_from("<Q", tss, 4)[0] == 0x8FF0
    bitmap_base = struct.unpack_from("<H", tss, 0x66)[0]
    bitmap = tss[bitmap_base:]
    assert len(bitmap) == 0x10000 // 8 + 1 and not any(bitmap[:-1]) and bitmap[-1] == 0xFF
    assert len(tss) == gdt.TSS_LIMIT + 1
    assert layout.BOOT_TSS_START + len(tss) <= layout.BOOT_TSS_END


def _entries(data: bytes) -> tuple[int, ...]:
    return struct.unpack(f"<{len(data) // 8}Q", data)


def test_identity_page_tables_map_the_low_4_gib_with_user_2mib_pages() -> None:
    tables = dict(paging.identity_page_tables())
    pml4 = _entries(tables[layout.PML4_START])
    assert pml4[0] & ~0xFFF == layout.PDPT_START and not any(pml4[1:])
    pdpt = _entries(tables[layout.PDPT_START])
    for gib in range(4):
        directory = pdpt[gib] & ~0xFFF
        entries = _entries(tables[directory])
        for index in (0, 1, 511):
            entry = entries[index]
            assert entry & ~0xFFF == gib * layout.GIB + index * layout.HUGE_PAGE_SIZE
            assert entry & (paging.PRESENT | paging.WRITABLE | paging.USER | paging.PAGE_SIZE_BIT) == 0x87
    assert all(gpa + len(data) <= layout.ZERO_PAGE_START for gpa, data in tables.items())


def test_real_mode_entry_splits_the_address_into_cs_and_ip() -> None:
    entry = EntryState(CpuMode.REAL, 0x17C00)
    sregs = cpu.entry_sregs(entry, SRegs())
    regs = cpu.entry_regs(entry)
    assert sregs.cs.selector == 0x1000 and sregs.cs.base == 0x10000 and regs.rip == 0x7C00
    assert sregs.cr0 & cpu.CR0_PE == 0


def test_protected_mode_entry_is_flat_32_bit_without_paging() -> None:
    sregs = cpu.entry_sregs(EntryState(CpuMode.PROTECTED, 0x100000), SRegs())
    assert sregs.cr0 & cpu.CR0_PE and not sregs.cr0 & cpu.CR0_PG
    assert sregs.cs.selector == gdt.CODE32_SELECTOR and sregs.ds.selector == gdt.DATA_SELECTOR
    assert sregs.efer == 0


@pytest.mark.parametrize("mode", [CpuMode.REAL, CpuMode.PROTECTED])
def test_real_and_protected_entry_turn_off_what_a_long_mode_guest_left_on(mode: CpuMode) -> None:
    long_mode = cpu.entry_sregs(EntryState(CpuMode.LONG, 0x100000), SRegs())
    sregs = cpu.entry_sregs(EntryState(mode, 0x100000), long_mode)
    assert (sregs.efer, sregs.cr4, sregs.cr3) == (0, 0, 0) and not sregs.cr0 & cpu.CR0_PG


def test_long_mode_entry_enables_paging_and_long_mode() -> None:
    sregs = cpu.entry_sregs(EntryState(CpuMode.LONG, 0x100000), SRegs())
    assert sregs.cr0 & cpu.CR0_PG and sregs.cr4 & cpu.CR4_PAE and sregs.cr3 == layout.PML4_START
    assert sregs.efer == cpu.EFER_LME | cpu.EFER_LMA and sregs.cs.l == 1 and sregs.cs.dpl == 0


def test_user_entry_runs_at_cpl3_with_iopl3() -> None:
    entry = EntryState(CpuMode.LONG, 0x100000, user=True)
    sregs = cpu.entry_sregs(entry, SRegs())
    assert sregs.cs.dpl == 3 and sregs.ss.dpl == 3 and sregs.cs.selector & 3 == 3
    assert cpu.entry_regs(entry).rflags & cpu.RFLAGS_IOPL3 == cpu.RFLAGS_IOPL3


def test_entry_registers_come_from_the_plan() -> None:
    regs = cpu.entry_regs(EntryState(CpuMode.PROTECTED, 0x100000, regs={"rax": 0x2BADB002, "rbx": 0x9000}))
    assert (regs.rax, regs.rbx, regs.rip, regs.rsp) == (0x2BADB002, 0x9000, 0x100000, layout.BOOT_STACK_POINTER)
    with pytest.raises(ValueError, match="unknown register"):
        cpu.entry_regs(EntryState(CpuMode.LONG, 0, regs={"eax": 1}))


def test_boot_structures_per_mode() -> None:
    assert cpu.boot_structures(CpuMode.REAL) == []
    assert {w.gpa for w in cpu.boot_structures(CpuMode.PROTECTED)} == {layout.BOOT_GDT_START, layout.BOOT_TSS_START}
    assert layout.PML4_START in {w.gpa for w in cpu.boot_structures(CpuMode.LONG)}


def test_cpuid_sets_the_hypervisor_bit_and_the_apic_id() -> None:
    supported = [CpuidEntry(1, 0, 0, 0, 0x00010800, 0, 0), CpuidEntry(0xB, 0, 1, 0, 0, 0, 0), CpuidEntry(0, 0, 0, 0xD, 1, 2, 3)]
    leaf1, leaf_b, leaf0 = cpu.vcpu_cpuid(supported, vcpu_id=3)
    assert leaf1.ecx >> 31 == 1 and leaf1.ebx >> 24 == 3 and leaf1.ebx & 0xFFFFFF == 0x010800
    assert leaf_b.edx == 3 and leaf0 == supported[2]


def test_memory_map_below_the_hole() -> None:
    entries = build_memory_map(64 * layout.MIB)
    assert [(e.addr, e.end, e.type) for e in entries] == [
        (0, layout.EBDA_START, E820Type.RAM),
        (layout.EBDA_START, layout.LOW_MEMORY_END, E820Type.RESERVED),
        (layout.BIOS_AREA_START, layout.BIOS_AREA_END, E820Type.RESERVED),
        (layout.HIMEM_START, 64 * layout.MIB, E820Type.RAM),
    ]


def test_memory_map_and_ram_regions_around_the_mmio_hole() -> None:
    ram = 5 * layout.GIB
    assert ram_regions(ram) == [(0, layout.MMIO_HOLE_START), (layout.MMIO_HOLE_END, ram - layout.MMIO_HOLE_START)]
    ram_entries = [e for e in build_memory_map(ram) if e.type == E820Type.RAM]
    assert ram_entries[-1].addr == layout.MMIO_HOLE_END and ram_entries[-2].end == layout.MMIO_HOLE_START
    assert sum(e.size for e in ram_entries) == ram - (layout.HIMEM_START - layout.EBDA_START)
