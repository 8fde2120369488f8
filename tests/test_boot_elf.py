"""The ELF loader: ELF32 in protected mode, ELF64 in long mode, and every malformed header rejected."""

from __future__ import annotations

from pathlib import Path

import pytest

from pykvm.boot import elf
from pykvm.boot.plan import CpuMode
from pykvm.errors import ImageError
from pykvm.x86 import layout
from pykvm.x86.e820 import E820Entry, E820Type
from tests.images import (
    HLT,
    KERNEL_ADDR,
    MEMORY_MAP,
    Seg,
    assert_writes_disjoint,
    build_elf,
    patch_byte,
    patch_header,
    patch_phdr,
    peek,
    request,
    run_tools,
)

PATH = Path("kernel.elf")
TEXT = HLT * 0x20
DATA = b"data" * 8
BSS_SIZE = 0x3000
DATA_ADDR = KERNEL_ADDR + 0x2000
HIGHER_HALF = 0xFFFF_FFFF_8000_0000
EM_ARM = 40


def two_segments(bits: int = 32, **kwargs: object) -> bytes:
    """Text at 1 MiB, then data followed by a bss."""
    return build_elf(
        [Seg(KERNEL_ADDR, TEXT), Seg(DATA_ADDR, DATA, memsz=len(DATA) + BSS_SIZE)],
        entry=KERNEL_ADDR,
        bits=bits,
        **kwargs,  # type: ignore[arg-type]
    )


def rejected(image: bytes, **fields: object) -> str:
    with pytest.raises(ImageError) as info:
        elf.load(PATH, image, request(**fields))
    assert info.value.path == str(PATH)
    return info.value.reason


# --- valid images ---------------------------------------------------------------------


def test_elf32_enters_protected_mode_at_e_entry() -> None:
    plan = elf.load(PATH, two_segments(), request())
    assert plan.format == "elf"
    assert plan.entry.mode == CpuMode.PROTECTED
    assert plan.entry.entry == KERNEL_ADDR
    assert plan.entry.user is False
    assert dict(plan.entry.regs) == {}


def test_each_segment_is_one_write_of_file_bytes_then_zeros() -> None:
    plan = elf.load(PATH, two_segments(), request())
    assert [(w.gpa, len(w.data)) for w in plan.writes] == [
        (KERNEL_ADDR, len(TEXT)),
        (DATA_ADDR, len(DATA) + BSS_SIZE),
    ]
    assert peek(plan, KERNEL_ADDR, len(TEXT)) == TEXT
    assert peek(plan, DATA_ADDR, len(DATA)) == DATA
    assert peek(plan, DATA_ADDR + len(DATA), BSS_SIZE) == bytes(BSS_SIZE)
    assert_writes_disjoint(plan)


def test_kernel_start_and_end_span_all_segments() -> None:
    plan = elf.load(PATH, two_segments(), request())
    assert plan.kernel_start == KERNEL_ADDR
    assert plan.kernel_end == DATA_ADDR + len(DATA) + BSS_SIZE


def test_elf64_enters_long_mode() -> None:
    plan = elf.load(PATH, two_segments(bits=64), request())
    assert plan.entry.mode == CpuMode.LONG
    assert plan.entry.entry == KERNEL_ADDR
    assert peek(plan, DATA_ADDR, len(DATA)) == DATA


def test_elf64_virtual_entry_is_translated_to_physical() -> None:
    image = build_elf([Seg(KERNEL_ADDR, TEXT, vaddr=HIGHER_HALF)], entry=HIGHER_HALF + 0x10, bits=64)
    plan = elf.load(PATH, image, request())
    assert plan.entry.entry == KERNEL_ADDR + 0x10
    assert plan.writes[0].gpa == KERNEL_ADDR


def test_pure_bss_segment_is_all_zeros() -> None:
    image = build_elf([Seg(KERNEL_ADDR, TEXT), Seg(DATA_ADDR, b"", memsz=BSS_SIZE)], entry=KERNEL_ADDR)
    plan = elf.load(PATH, image, request())
    assert plan.writes[1].data == bytes(BSS_SIZE)


def test_empty_pt_load_is_skipped() -> None:
    image = build_elf([Seg(KERNEL_ADDR, TEXT), Seg(0, b"")], entry=KERNEL_ADDR)
    assert len(elf.load(PATH, image, request()).writes) == 1


def test_matching_mode_request_is_accepted() -> None:
    assert elf.load(PATH, two_segments(bits=64), request(mode=CpuMode.LONG)).entry.mode == CpuMode.LONG


def test_parse_reports_class_and_segments() -> None:
    parsed = elf.parse(PATH, two_segments())
    assert parsed.elf_class is elf.ELF32
    assert [segment.index for segment in parsed.segments] == [0, 1]


# --- identification -------------------------------------------------------------------


def test_bad_magic() -> None:
    assert "bad magic" in rejected(b"MZ" + bytes(100))


def test_truncated_ident() -> None:
    assert "e_ident" in rejected(elf.ELF_MAGIC + b"\x01")


def test_bad_class() -> None:
    assert "EI_CLASS" in rejected(patch_byte(two_segments(), elf.EI_CLASS, 3))


def test_big_endian() -> None:
    assert "big-endian" in rejected(patch_byte(two_segments(), elf.EI_DATA, elf.ELFDATA2MSB))


def test_bad_data_encoding() -> None:
    assert "EI_DATA" in rejected(patch_byte(two_segments(), elf.EI_DATA, 0))


def test_truncated_header() -> None:
    assert "ELF64 header is cut short" in rejected(two_segments(bits=64)[:40])


def test_wrong_machine() -> None:
    assert "is an ELF for ARM (e_machine 40), not x86" in rejected(two_segments(machine=EM_ARM))


def test_unknown_machine_is_named_by_number() -> None:
    assert "machine 0x1234" in rejected(two_segments(machine=0x1234))


def test_elf32_for_x86_64_is_rejected() -> None:
    reason = rejected(two_segments(machine=elf.EM_X86_64))
    assert "e_machine x86-64 does not match the class ELF32" in reason


# --- type -----------------------------------------------------------------------------


def test_relocatable_object() -> None:
    assert "is not an executable (e_type ET_REL" in rejected(two_segments(e_type=elf.ET_REL))


def test_position_independent_without_interpreter() -> None:
    assert "is not an executable (e_type ET_DYN" in rejected(two_segments(e_type=elf.ET_DYN))


def test_dynamically_linked_program() -> None:
    image = build_elf(
        [Seg(0, b"/lib/ld.so\0", type=elf.PT_INTERP), Seg(KERNEL_ADDR, TEXT)],
        entry=KERNEL_ADDR,
        e_type=elf.ET_DYN,
    )
    assert "is a dynamically linked program, not a kernel" in rejected(image)


def test_core_file() -> None:
    assert "e_type ET_CORE" in rejected(two_segments(e_type=elf.ET_CORE))


# --- program headers ------------------------------------------------------------------


def test_program_header_table_past_end_of_file() -> None:
    image = patch_header(two_segments(), "phoff", 0x10000)
    assert "program header table (e_phoff 0x10000 + 2 x 32 bytes) extends past the end" in rejected(image)


def test_program_header_count_past_end_of_file() -> None:
    assert "program header table" in rejected(patch_header(two_segments(), "phnum", 500))


def test_wrong_program_header_size() -> None:
    image = patch_header(two_segments(bits=64), "phentsize", 32)
    assert "e_phentsize 32 is not the ELF64 program header size 56" in rejected(image)


def test_filesz_larger_than_memsz() -> None:
    image = patch_phdr(two_segments(), 1, "memsz", 4)
    assert "ELF program header 1 (PT_LOAD) has p_filesz 0x20 larger than p_memsz 0x4" in rejected(image)


def test_segment_data_past_end_of_file() -> None:
    image = two_segments()
    patched = patch_phdr(image, 1, "memsz", 0x10000)
    patched = patch_phdr(patched, 1, "filesz", 0x8000)
    reason = rejected(patched)
    assert "ELF program header 1 (PT_LOAD) extends past the end of the file" in reason
    assert f"+ 0x8000 > {len(image):#x} bytes" in reason


def test_no_pt_load() -> None:
    image = build_elf([Seg(0, b"x", type=elf.PT_INTERP + 1)], entry=KERNEL_ADDR)
    assert "no PT_LOAD" in rejected(image)


def test_no_program_headers() -> None:
    assert "no PT_LOAD" in rejected(build_elf([], entry=KERNEL_ADDR))


def test_overlapping_segments() -> None:
    image = build_elf([Seg(KERNEL_ADDR, TEXT), Seg(KERNEL_ADDR + 0x10, DATA)], entry=KERNEL_ADDR)
    reason = rejected(image)
    assert "ELF program header 0 (PT_LOAD)" in reason
    assert "ELF program header 1 (PT_LOAD)" in reason
    assert "overlap" in reason


# --- placement ------------------------------------------------------------------------


def test_segment_outside_ram() -> None:
    image = build_elf([Seg(0x1000_0000, TEXT)], entry=0x1000_0000)
    assert "ELF program header 0 (PT_LOAD) [0x10000000, 0x10000020) does not fit in guest RAM" in rejected(image)


def test_segment_in_the_bios_area_loads_there() -> None:
    # Reserved in the memory map, but guest memory: QEMU loads such segments, and so does pykvm.
    plan = elf.load(PATH, build_elf([Seg(0xF0000, TEXT)], entry=0xF0000), request())
    assert plan.writes[0].gpa == 0xF0000


def test_segment_over_the_usual_boot_structures_moves_them() -> None:
    image = build_elf([Seg(0x8000, TEXT, memsz=0x6000)], entry=0x8000)
    tables = elf.load(PATH, image, request()).entry.tables
    assert tables.gdt == layout.BOOT_GDT_START  # free: kept
    assert not 0x8000 <= tables.tss < 0xE000 and not 0x8000 < tables.stack_pointer <= 0xE000


def test_segment_below_the_boot_structures_is_allowed() -> None:
    image = build_elf([Seg(0x100, HLT * 0x10)], entry=0x100)
    assert elf.load(PATH, image, request()).entry.entry == 0x100


def test_entry_outside_every_segment() -> None:
    image = build_elf([Seg(KERNEL_ADDR, TEXT)], entry=KERNEL_ADDR + 0x1000)
    assert "entry point e_entry 0x101000 is not inside any PT_LOAD segment" in rejected(image)


def test_entry_in_bss_is_inside_the_segment() -> None:
    image = build_elf([Seg(KERNEL_ADDR, TEXT, memsz=0x1000)], entry=KERNEL_ADDR + 0x800)
    assert elf.load(PATH, image, request()).entry.entry == KERNEL_ADDR + 0x800


def test_elf64_entry_above_identity_map() -> None:
    high = layout.IDENTITY_MAP_END
    image = build_elf([Seg(high, TEXT)], entry=high, bits=64)
    memory_map = MEMORY_MAP + (E820Entry(high, layout.MIB, E820Type.RAM),)
    assert "is not below 0x100000000" in rejected(image, memory_map=memory_map)


# --- request --------------------------------------------------------------------------


def test_mode_must_agree_with_class() -> None:
    reason = rejected(two_segments(bits=64), mode=CpuMode.PROTECTED)
    assert "is an ELF64 kernel, entered in long mode, but protected mode was requested" in reason
    assert "ELF32 kernel" in rejected(two_segments(), mode=CpuMode.REAL)


def test_load_address_override_is_refused() -> None:
    assert "load address applies to flat binaries only" in rejected(two_segments(), load_addr=0x200000)


def test_entry_override_is_refused() -> None:
    assert "entry point applies to flat binaries only" in rejected(two_segments(), entry=KERNEL_ADDR)


# --- real files -----------------------------------------------------------------------

QEMU_DIR = Path("/usr/share/qemu")


def test_bin_true_is_a_dynamically_linked_program() -> None:
    path = Path("/bin/true")
    if not path.exists():
        pytest.skip("/bin/true is absent")
    with pytest.raises(ImageError) as info:
        elf.parse(path, path.read_bytes())
    assert "is a dynamically linked program, not a kernel" in info.value.reason


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("opensbi-riscv64-generic-fw_dynamic.elf", "is an ELF for RISC-V"),
        ("hppa-firmware.img", "big-endian"),
        ("s390-ccw.img", "big-endian"),
        ("palcode-clipper", "is an ELF for Alpha"),
    ],
)
def test_foreign_firmware_elfs_are_rejected(name: str, reason: str) -> None:
    path = QEMU_DIR / name
    if not path.exists():
        pytest.skip(f"{path} is absent")
    with pytest.raises(ImageError) as info:
        elf.load(path, path.read_bytes(), request())
    assert reason in info.value.reason


def test_static_elf64_built_by_gcc(tmp_path: Path) -> None:
    source = tmp_path / "start.c"
    source.write_text("void _start(void) { for (;;) __asm__ volatile (\"hlt\"); }\n")
    run_tools(
        ["gcc", "-O1", "-static", "-nostdlib", "-no-pie", "-fno-pic", "-o", "kernel", "start.c"],
        cwd=tmp_path,
    )
    image = (tmp_path / "kernel").read_bytes()
    plan = elf.load(tmp_path / "kernel", image, request())
    parsed = elf.parse(tmp_path / "kernel", image)
    assert plan.entry.mode == CpuMode.LONG
    assert plan.entry.entry == parsed.entry
    assert any(w.gpa <= parsed.entry < w.end for w in plan.writes)
    assert_writes_disjoint(plan)


def test_static_pie_built_by_gcc_is_not_an_executable(tmp_path: Path) -> None:
    source = tmp_path / "start.c"
    source.write_text("void _start(void) { for (;;) __asm__ volatile (\"hlt\"); }\n")
    run_tools(["gcc", "-static-pie", "-nostdlib", "-fpie", "-o", "kernel", "start.c"], cwd=tmp_path)
    with pytest.raises(ImageError) as info:
        elf.load(tmp_path / "kernel", (tmp_path / "kernel").read_bytes(), request())
    assert "is not an executable (e_type ET_DYN" in info.value.reason


def test_object_file_built_by_gcc_is_relocatable(tmp_path: Path) -> None:
    (tmp_path / "start.c").write_text("int x;\n")
    run_tools(["gcc", "-c", "-o", "start.o", "start.c"], cwd=tmp_path)
    with pytest.raises(ImageError) as info:
        elf.load(tmp_path / "start.o", (tmp_path / "start.o").read_bytes(), request())
    assert "ET_REL" in info.value.reason
