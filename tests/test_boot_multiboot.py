"""The multiboot v1 loader: a.out kludge and ELF kernels, modules, and the boot information read back."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from pykvm.boot import elf, multiboot
from pykvm.boot.plan import CpuMode, Module
from pykvm.errors import ImageError
from pykvm.x86 import layout
from pykvm.x86.e820 import E820Entry, E820Type
from tests.images import (
    HLT,
    KERNEL_ADDR,
    MEMORY_MAP,
    RAM_SIZE,
    Seg,
    aout_kernel,
    assert_writes_disjoint,
    build_elf,
    multiboot_elf,
    multiboot_header,
    peek,
    peek_string,
    peek_u32,
    request,
    run_tools,
)

PATH = Path("kernel.mb")
INFO = layout.MULTIBOOT_INFO_START
AOUT = multiboot.FLAG_ADDRESS_FIELDS
MMAP_ENTRY = struct.Struct("<IQQI")
MODULE_ENTRY = struct.Struct("<IIII")
MODULES = (
    Module(Path("initrd.img"), b"I" * 5000, "initrd.img root=ram"),
    Module(Path("empty"), b"", ""),
    Module(Path("config"), b"C" * 10, "config"),
)


def rejected(image: bytes, **fields: object) -> str:
    with pytest.raises(ImageError) as info:
        multiboot.load(PATH, image, request(**fields))
    assert info.value.path == str(PATH)
    return info.value.reason


def info_u32(plan: object, offset: int) -> int:
    return peek_u32(plan, INFO + offset)  # type: ignore[arg-type]


# --- a.out kludge ---------------------------------------------------------------------


def test_aout_kernel_loads_at_load_addr_with_bss() -> None:
    image = aout_kernel(bss_size=0x1000)
    plan = multiboot.load(PATH, image, request())
    assert plan.format == "multiboot"
    assert plan.writes[0].gpa == KERNEL_ADDR
    assert plan.writes[0].data == image + bytes(0x1000)
    assert (plan.kernel_start, plan.kernel_end) == (KERNEL_ADDR, KERNEL_ADDR + len(image) + 0x1000)
    assert_writes_disjoint(plan)


def test_entry_is_protected_mode_with_the_boot_registers() -> None:
    plan = multiboot.load(PATH, aout_kernel(), request())
    assert plan.entry.mode == CpuMode.PROTECTED
    assert plan.entry.entry == KERNEL_ADDR + multiboot.ADDRESS_FIELDS_END
    assert dict(plan.entry.regs) == {"rax": 0x2BADB002, "rbx": INFO}
    assert plan.entry.user is False


def test_aout_header_later_in_the_file_maps_the_load_offset() -> None:
    image = aout_kernel(header_offset=0x40, load_addr=0x200000)
    plan = multiboot.load(PATH, image, request())
    assert plan.writes[0].gpa == 0x200000
    assert plan.writes[0].data[: len(image)] == image


def test_aout_load_may_start_after_the_file_start() -> None:
    # header_addr == load_addr with the header at offset 0x20: the first 0x20 bytes are not loaded.
    image = aout_kernel(header_offset=0x20, header_addr=KERNEL_ADDR, entry_addr=KERNEL_ADDR,
                        load_end_addr=0, bss_end_addr=0)  # fmt: skip
    plan = multiboot.load(PATH, image, request())
    assert plan.writes[0].data == image[0x20:]


def test_load_end_zero_loads_to_the_end_of_the_file() -> None:
    image = aout_kernel(load_end_addr=0, bss_end_addr=0)
    plan = multiboot.load(PATH, image, request())
    assert plan.writes[0].data == image
    assert plan.kernel_end == KERNEL_ADDR + len(image)


def test_load_end_shorter_than_the_file() -> None:
    image = aout_kernel(load_end_addr=KERNEL_ADDR + 0x28, bss_end_addr=0)
    assert multiboot.load(PATH, image, request()).writes[0].data == image[:0x28]


def test_load_addr_above_header_addr() -> None:
    reason = rejected(aout_kernel(load_addr=KERNEL_ADDR, header_addr=KERNEL_ADDR - 4))
    assert "multiboot load_addr 0x100000 is above header_addr 0xffffc" in reason


def test_load_would_start_before_the_file() -> None:
    reason = rejected(aout_kernel(header_addr=KERNEL_ADDR + 0x100))
    assert "header_addr - load_addr (0x100) is larger than the header's file offset 0x0" in reason


def test_load_end_not_above_load_addr() -> None:
    assert "load_end_addr 0x100000 is not above load_addr 0x100000" in rejected(aout_kernel(load_end_addr=KERNEL_ADDR))


def test_load_past_the_end_of_the_file() -> None:
    image = aout_kernel(load_end_addr=KERNEL_ADDR + 0x1000)
    reason = rejected(image)
    assert "load_end_addr 0x101000 extends the load past the end of the file" in reason
    assert f"(offset 0x0 + 0x1000 > {len(image):#x} bytes)" in reason


def test_bss_end_below_load_end() -> None:
    image = aout_kernel(bss_end_addr=KERNEL_ADDR + 4)
    assert "bss_end_addr 0x100004 is below the load end" in rejected(image)


def test_entry_outside_the_kernel() -> None:
    image = aout_kernel(bss_size=0x1000, entry_addr=KERNEL_ADDR + 0x2000)
    assert "multiboot entry_addr 0x102000 is outside the loaded kernel [0x100000, 0x101030)" in rejected(image)


def test_entry_below_load_addr() -> None:
    assert "entry_addr 0xfffff is outside" in rejected(aout_kernel(entry_addr=KERNEL_ADDR - 1))


def test_entry_in_the_bss_is_allowed() -> None:
    image = aout_kernel(bss_size=0x1000)
    plan = multiboot.load(PATH, aout_kernel(bss_size=0x1000, entry_addr=KERNEL_ADDR + len(image) + 8), request())
    assert plan.entry.entry == KERNEL_ADDR + len(image) + 8


def test_aout_kernel_outside_ram() -> None:
    assert "does not fit in guest RAM" in rejected(aout_kernel(load_addr=RAM_SIZE))


def test_aout_kernel_at_0x8000_moves_the_boot_information_out_of_its_way() -> None:
    image = aout_kernel(load_addr=0x8000, bss_size=0x4000)  # over the usual stack, information and TSS
    plan = multiboot.load(PATH, image, request(cmdline="x"))
    kernel = range(0x8000, plan.kernel_end)
    info = plan.entry.regs["rbx"]
    assert info not in kernel and plan.entry.tables.tss not in kernel and plan.entry.tables.stack_pointer not in kernel
    assert peek_string(plan, peek_u32(plan, info + 16)) == b"kernel.mb x"
    assert plan.entry.tables.gdt == layout.BOOT_GDT_START  # still free: kept
    assert_writes_disjoint(plan)


def test_aout_kernel_over_the_usual_command_line_place_moves_the_command_line() -> None:
    plan = multiboot.load(PATH, aout_kernel(load_addr=layout.CMDLINE_START - 0x10), request(cmdline="console=ttyS0"))
    cmdline = peek_u32(plan, plan.entry.regs["rbx"] + 16)
    assert not plan.kernel_start <= cmdline < plan.kernel_end
    assert peek_string(plan, cmdline) == b"kernel.mb console=ttyS0"
    assert_writes_disjoint(plan)


def test_address_fields_cut_short_by_the_end_of_the_file() -> None:
    image = multiboot_header(AOUT) + b"\0" * 8
    assert "address fields (header bytes 12-32)" in rejected(image)


# --- header ---------------------------------------------------------------------------


def test_no_header() -> None:
    assert "has no multiboot header" in rejected(HLT * 64)


def test_bad_checksum() -> None:
    image = multiboot_header(AOUT, checksum=1) + HLT * 64
    assert "multiboot header at offset 0x0 has a bad checksum" in rejected(image)


def test_header_beyond_8_kib_is_not_found() -> None:
    image = bytes(multiboot.HEADER_SEARCH_LIMIT) + aout_kernel()
    assert "has no multiboot header" in rejected(image)


def test_header_must_be_aligned() -> None:
    assert "has no multiboot header" in rejected(b"\0\0" + aout_kernel())


def test_header_at_the_last_place_in_8_kib_is_found() -> None:
    offset = multiboot.HEADER_SEARCH_LIMIT - multiboot.HEADER.size
    image = bytes(offset) + multiboot_header(0)
    assert multiboot.find_header(image) == offset
    assert multiboot.find_header(bytes(offset + 4) + multiboot_header(0)) is None


def test_tiny_file_has_no_header() -> None:
    assert multiboot.find_header(b"\x02") is None


@pytest.mark.parametrize("bit", [3, 5, 15])
def test_unknown_required_feature_bit(bit: int) -> None:
    image = aout_kernel(flags=AOUT | 1 << bit)
    assert f"requires multiboot feature bit {bit}, which pykvm does not provide" in rejected(image)


def test_page_align_memory_info_and_video_bits_are_accepted() -> None:
    flags = AOUT | multiboot.FLAG_PAGE_ALIGN_MODULES | multiboot.FLAG_MEMORY_INFO | multiboot.FLAG_VIDEO_MODE
    assert multiboot.load(PATH, aout_kernel(flags=flags), request()).entry.mode == CpuMode.PROTECTED


def test_unknown_optional_bits_are_ignored() -> None:
    assert multiboot.load(PATH, aout_kernel(flags=AOUT | 1 << 20), request()).format == "multiboot"


def test_mode_must_be_protected() -> None:
    assert "but long mode was requested" in rejected(aout_kernel(), mode=CpuMode.LONG)
    assert multiboot.load(PATH, aout_kernel(), request(mode=CpuMode.PROTECTED)).format == "multiboot"


def test_overrides_are_refused() -> None:
    assert "load address applies to flat binaries only" in rejected(aout_kernel(), load_addr=0x200000)
    assert "entry point applies to flat binaries only" in rejected(aout_kernel(), entry=KERNEL_ADDR)


# --- ELF kernels ----------------------------------------------------------------------


def test_elf_kernel_loads_its_segments() -> None:
    image = multiboot_elf(bss_size=0x2000)
    plan = multiboot.load(PATH, image, request())
    header_size = multiboot.HEADER.size
    assert plan.entry.entry == KERNEL_ADDR + header_size
    assert peek(plan, KERNEL_ADDR + header_size, 4) == HLT * 4
    assert peek(plan, KERNEL_ADDR + layout.PAGE_SIZE, 0x2000) == bytes(0x2000)
    assert (plan.kernel_start, plan.kernel_end) == (KERNEL_ADDR, KERNEL_ADDR + layout.PAGE_SIZE + 0x2000)
    assert dict(plan.entry.regs) == {"rax": 0x2BADB002, "rbx": INFO}


def test_elf64_multiboot_kernel_is_rejected() -> None:
    assert "is an ELF64 multiboot kernel; multiboot kernels are 32-bit" in rejected(multiboot_elf(bits=64))


def test_header_without_address_fields_needs_an_elf() -> None:
    assert "so the kernel must be an ELF" in rejected(multiboot_header(0) + HLT * 64)


def test_malformed_elf_is_reported_by_the_elf_parser() -> None:
    image = build_elf([Seg(KERNEL_ADDR, multiboot_header(0) + HLT, memsz=4)], entry=KERNEL_ADDR)
    assert "p_filesz 0xd larger than p_memsz 0x4" in rejected(image)


def test_elf_kernel_over_the_usual_command_line_place_moves_the_command_line() -> None:
    image = build_elf([Seg(layout.CMDLINE_START, multiboot_header(0) + HLT)], entry=layout.CMDLINE_START)
    plan = multiboot.load(PATH, image, request(cmdline="a"))
    cmdline = peek_u32(plan, plan.entry.regs["rbx"] + 16)
    assert cmdline != layout.CMDLINE_START and peek_string(plan, cmdline) == b"kernel.mb a"


def test_elf_segments_overlapping_each_other_name_both_ranges() -> None:
    image = build_elf([Seg(KERNEL_ADDR, multiboot_header(0) + HLT, memsz=0x100), Seg(KERNEL_ADDR + 0x80, HLT)], entry=KERNEL_ADDR)
    reason = rejected(image)
    assert "ELF program header 0 (PT_LOAD) [0x100000, 0x100100)" in reason
    assert "ELF program header 1 (PT_LOAD) [0x100080, 0x100081)" in reason


def elf_with_address_fields(load_addr: int) -> tuple[bytes, int]:
    """An ELF whose multiboot header sets bit 16 with fields that load the whole file at ``load_addr``."""

    def build(offset: int) -> bytes:
        fields = multiboot.AddressFields(load_addr + offset, load_addr, 0, 0, load_addr + offset)
        return build_elf([Seg(KERNEL_ADDR, multiboot_header(AOUT, fields) + HLT)], entry=KERNEL_ADDR)

    offset = multiboot.find_header(build(0))
    assert offset is not None
    return build(offset), offset


def test_address_fields_win_over_elf_program_headers() -> None:
    image, offset = elf_with_address_fields(0x200000)
    plan = multiboot.load(PATH, image, request())
    assert plan.writes[0].gpa == 0x200000
    assert plan.writes[0].data == image
    assert plan.entry.entry == 0x200000 + offset


# --- boot information -----------------------------------------------------------------


def test_info_flags() -> None:
    plan = multiboot.load(PATH, aout_kernel(), request())
    expected = 1 << 0 | 1 << 2 | 1 << 3 | 1 << 6 | 1 << 9
    assert info_u32(plan, 0) == expected


def test_memory_sizes() -> None:
    plan = multiboot.load(PATH, aout_kernel(), request())
    assert info_u32(plan, 4) == 639
    assert info_u32(plan, 8) == 64 * 1024 - 1024


def test_memory_sizes_are_capped_and_stop_at_holes() -> None:
    memory_map = (
        E820Entry(0, layout.MIB, E820Type.RAM),
        E820Entry(layout.MIB, layout.MIB, E820Type.RAM),
        E820Entry(2 * layout.MIB, layout.MIB, E820Type.RAM),
        E820Entry(4 * layout.MIB, layout.MIB, E820Type.RAM),
    )
    plan = multiboot.load(PATH, aout_kernel(), request(memory_map=memory_map))
    assert info_u32(plan, 4) == 640
    assert info_u32(plan, 8) == 2 * 1024


def test_cmdline_is_the_image_name_then_the_arguments() -> None:
    # As QEMU's -kernel k -append args and GRUB's `multiboot k args`: argv[0] is the image.
    plan = multiboot.load(PATH, aout_kernel(), request(cmdline="console=ttyS0 quiet"))
    assert info_u32(plan, 16) == layout.CMDLINE_START
    assert peek(plan, layout.CMDLINE_START, 30) == b"kernel.mb console=ttyS0 quiet\0"


def test_cmdline_names_the_image_as_given() -> None:
    plan = multiboot.load(Path("x86/vmexit.flat"), aout_kernel(), request(cmdline="cpuid"))
    assert peek_string(plan, info_u32(plan, 16)) == b"x86/vmexit.flat cpuid"


def test_without_arguments_the_name_and_a_space_remain() -> None:
    # QEMU writes "%s %s" of the kernel's name and the (empty) arguments.
    plan = multiboot.load(PATH, aout_kernel(), request())
    assert peek(plan, info_u32(plan, 16), 11) == b"kernel.mb \0"


def test_cmdline_is_passed_byte_for_byte() -> None:
    plan = multiboot.load(PATH, aout_kernel(), request(cmdline=b"caf\xe9 \xff"))
    assert peek_string(plan, info_u32(plan, 16)) == b"kernel.mb caf\xe9 \xff"


def test_a_surrogate_escaped_str_cmdline_gets_its_original_bytes() -> None:
    # What click hands over for a non-UTF-8 argument.
    plan = multiboot.load(PATH, aout_kernel(), request(cmdline=b"\xff\xfe".decode("utf-8", "surrogateescape")))
    assert peek_string(plan, info_u32(plan, 16)) == b"kernel.mb \xff\xfe"


def test_cmdline_at_the_size_limit() -> None:
    cmdline = "x" * (layout.CMDLINE_MAX_SIZE - 1 - len("kernel.mb "))
    plan = multiboot.load(PATH, aout_kernel(), request(cmdline=cmdline))
    assert peek_string(plan, layout.CMDLINE_START) == b"kernel.mb " + cmdline.encode()


def test_cmdline_too_long() -> None:
    reason = rejected(aout_kernel(), cmdline="x" * (layout.CMDLINE_MAX_SIZE - len("kernel.mb ")))
    assert f"command line is {layout.CMDLINE_MAX_SIZE} bytes, more than {layout.CMDLINE_MAX_SIZE - 1}" in reason


def test_cmdline_with_nul() -> None:
    assert "command line contains a NUL character" in rejected(aout_kernel(), cmdline="a\0b")


def test_memory_map_entries_equal_the_request() -> None:
    plan = multiboot.load(PATH, aout_kernel(), request())
    length, addr = info_u32(plan, 44), info_u32(plan, 48)
    assert length == MMAP_ENTRY.size * len(MEMORY_MAP)
    entries = [MMAP_ENTRY.unpack(peek(plan, addr + i, MMAP_ENTRY.size)) for i in range(0, length, MMAP_ENTRY.size)]
    assert entries == [(20, e.addr, e.size, int(e.type)) for e in MEMORY_MAP]


def test_boot_loader_name() -> None:
    plan = multiboot.load(PATH, aout_kernel(), request())
    assert peek_string(plan, info_u32(plan, 64)) == b"pykvm"


def test_info_and_what_it_points_at_are_one_block() -> None:
    plan = multiboot.load(PATH, aout_kernel(), request(modules=MODULES))
    info = next(w for w in plan.writes if w.gpa == INFO)
    for offset in (24, 48, 64):
        assert INFO <= info_u32(plan, offset) < info.end


def test_no_modules() -> None:
    plan = multiboot.load(PATH, aout_kernel(), request())
    assert info_u32(plan, 20) == 0


def test_modules_are_page_aligned_after_the_kernel() -> None:
    image = aout_kernel(bss_size=0x1000)
    plan = multiboot.load(PATH, image, request(modules=MODULES))
    assert info_u32(plan, 20) == len(MODULES)
    table = info_u32(plan, 24)
    entries = [MODULE_ENTRY.unpack(peek(plan, table + i * 16, 16)) for i in range(len(MODULES))]
    first = (KERNEL_ADDR + len(image) + 0x1000 + layout.PAGE_SIZE - 1) // layout.PAGE_SIZE * layout.PAGE_SIZE
    assert [(start, end) for start, end, _, _ in entries] == [
        (first, first + 5000),
        (first + 2 * layout.PAGE_SIZE, first + 2 * layout.PAGE_SIZE),
        (first + 2 * layout.PAGE_SIZE, first + 2 * layout.PAGE_SIZE + 10),
    ]
    assert [peek_string(plan, string) for _, _, string, _ in entries] == [b"initrd.img root=ram", b"", b"config"]
    assert all(reserved == 0 for *_, reserved in entries)
    assert peek(plan, first, 5000) == MODULES[0].data
    assert peek(plan, entries[2][0], 10) == MODULES[2].data
    assert plan.kernel_end == KERNEL_ADDR + len(image) + 0x1000
    assert_writes_disjoint(plan)


def test_module_that_does_not_fit_in_ram() -> None:
    big = Module(Path("big"), bytes(RAM_SIZE), "big")
    reason = rejected(aout_kernel(), modules=(big,))
    assert "no room for multiboot module 0 (big) (0x4000000 bytes)" in reason and "with -m" in reason


def test_module_over_the_usual_command_line_place_moves_the_command_line() -> None:
    module = Module(Path("m"), bytes(0x20000), "m")
    plan = multiboot.load(PATH, aout_kernel(load_addr=0x10000), request(modules=(module,)))
    start = info_u32(plan, 24)
    module_start = peek_u32(plan, start)
    cmdline = info_u32(plan, 16)
    assert not module_start <= cmdline < module_start + 0x20000
    assert_writes_disjoint(plan)


def test_many_modules_and_long_strings_grow_the_information_block() -> None:
    modules = tuple(Module(Path(f"m{i}"), b"", f"module {i} " + "x" * 100) for i in range(200))
    plan = multiboot.load(PATH, aout_kernel(), request(modules=modules))
    info = plan.entry.regs["rbx"]
    table = peek_u32(plan, info + 24)
    assert peek_u32(plan, info + 20) == 200
    assert peek_string(plan, peek_u32(plan, table + 199 * 16 + 8)) == b"module 199 " + b"x" * 100
    assert_writes_disjoint(plan)


def test_module_string_with_nul() -> None:
    reason = rejected(aout_kernel(), modules=(Module(Path("m"), b"", "a\0"),))
    assert "the string of multiboot module 0 contains a NUL character" in reason


# --- real files -----------------------------------------------------------------------

GRUB_DIRS = (Path("/usr/lib/grub/i386-pc"), Path("/boot/grub/i386-pc"))
MULTIBOOT_ASM = """\
bits 32
section .multiboot
align 4
dd 0x1BADB002
dd 0x00000003
dd -(0x1BADB002 + 0x00000003)
section .text
global _start
_start:
    mov esp, stack_top
    cmp eax, 0x2BADB002
    hlt
section .bss
resb 8192
stack_top:
"""
LINKER_SCRIPT = """\
ENTRY(_start)
SECTIONS {
    . = 1M;
    .text : { *(.multiboot) *(.text) }
    .bss : { *(.bss) }
}
"""


def test_kernel_built_with_nasm_and_ld(tmp_path: Path) -> None:
    (tmp_path / "kernel.asm").write_text(MULTIBOOT_ASM)
    (tmp_path / "kernel.ld").write_text(LINKER_SCRIPT)
    run_tools(
        ["nasm", "-f", "elf32", "kernel.asm", "-o", "kernel.o"],
        ["ld", "-m", "elf_i386", "-T", "kernel.ld", "-o", "kernel.elf", "kernel.o"],
        cwd=tmp_path,
    )
    image = (tmp_path / "kernel.elf").read_bytes()
    plan = multiboot.load(tmp_path / "kernel.elf", image, request(cmdline="hello", modules=MODULES[:1]))
    assert plan.entry.mode == CpuMode.PROTECTED
    assert plan.entry.entry == elf.parse(tmp_path / "kernel.elf", image).entry
    assert peek(plan, plan.entry.entry, 1) == b"\xbc"  # mov esp, imm32
    assert peek(plan, KERNEL_ADDR, 4) == struct.pack("<I", multiboot.HEADER_MAGIC)
    assert plan.kernel_end >= KERNEL_ADDR + 8192
    assert_writes_disjoint(plan)


def test_grub_multiboot_files() -> None:
    found = [d for d in GRUB_DIRS if d.is_dir()]
    if not found:
        pytest.skip("no GRUB i386-pc directory on this machine")
    modules = sorted(found[0].glob("*.mod"))[:5]
    if not modules:
        pytest.skip(f"no GRUB modules in {found[0]}")
    for path in modules:
        with pytest.raises(ImageError) as info:
            multiboot.load(path, path.read_bytes(), request())
        assert "multiboot header" in info.value.reason or "ET_REL" in info.value.reason
