"""Images built the way real loaders see them, booted on /dev/kvm.

Each guest is a few lines of nasm (assembled here, skipped without nasm or ld), wrapped
in the container a real tool or kernel build would give it: a multiboot kernel that parses
its command line as argv, an ELF from a plain ``ld -Ttext=0x100000`` (whose first PT_LOAD
holds only the ELF headers, below 1 MiB), a kernel loaded at 0x8000 over the usual places of
the VMM's boot structures, a segment in the BIOS area, and tiny Linux bzImages entered through
their 64-bit (with a short last paragraph), 32-bit and 16-bit entry points.  Each guest checks
its entry state itself, prints what it found on COM1 and leaves through the debug-exit port.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from conftest import guest
from pykvm.boot import elf
from pykvm.boot.plan import CpuMode
from pykvm.machine import Machine
from pykvm.result import RunResult
from tests.images import Seg, build_elf, run_tools
from tests.test_boot_linux import bzimage

pytestmark = pytest.mark.kvm

# Shared by every guest below: DX stays 0x3f8; puts prints the NUL-terminated string at [sDI].
PUTS = """
puts:   mov al, [{di}]
        inc {di}
        test al, al
        jz .done
        out dx, al
        jmp puts
.done:  ret
"""
EXIT_OK = "mov al, 0\n        out 0xf4, al\n        hlt"


def assemble(tmp_path: Path, name: str, source: str, bits: int) -> bytes:
    """A flat binary of ``source`` (nasm -f bin), with the puts routine at its ``%PUTS`` line or at the end."""
    puts = PUTS.format(di={16: "di", 32: "edi", 64: "rdi"}[bits])
    text = source.replace("%PUTS", puts) if "%PUTS" in source else f"{source}\n{puts}"
    (tmp_path / f"{name}.asm").write_text(f"bits {bits}\n{text}")
    run_tools(["nasm", "-f", "bin", "-o", f"{name}.bin", f"{name}.asm"], cwd=tmp_path)
    return (tmp_path / f"{name}.bin").read_bytes()


def boot(machine_factory: Callable[..., Machine], path: Path, **load: object) -> RunResult:
    vm = machine_factory(memory="64M")
    vm.load(path, **load)
    return vm.run(timeout=30)


# --- multiboot ------------------------------------------------------------------------------------

ARGV_KERNEL = """
org 0x100000
header: dd 0x1BADB002, 0x00010000, -(0x1BADB002 + 0x00010000)
        dd header, header, load_end, bss_end, start
start:  mov esp, stack_top
        mov dx, 0x3f8
        mov esi, [ebx + 16]             ; the command line, split at spaces as kvm-unit-tests does
.skip:  lodsb
        cmp al, ' '
        je .skip
        test al, al
        jz .end
        mov edi, prefix
        push eax
        call puts
        pop eax
.word:  out dx, al
        lodsb
        cmp al, ' '
        je .next
        test al, al
        jnz .word
.next:  mov ah, al
        mov al, 10
        out dx, al
        test ah, ah
        jnz .skip
.end:   """ + EXIT_OK + """
prefix: db "argv: ", 0
%PUTS
load_end:
        times 1024 db 0
stack_top:
bss_end:
"""


def test_multiboot_kernel_finds_its_name_in_argv_0(machine_factory: Callable[..., Machine], tmp_path: Path) -> None:
    kernel = tmp_path / "argv.bin"
    kernel.write_bytes(assemble(tmp_path, "argv", ARGV_KERNEL, 32))
    result = boot(machine_factory, kernel, format="multiboot", cmdline="cpuid  -v")
    assert result.serial == f"argv: {kernel}\nargv: cpuid\nargv: -v\n".encode()
    assert result.status == 1


LOW_KERNEL = """
org 0x8000
header: dd 0x1BADB002, 0x00010000, -(0x1BADB002 + 0x00010000)
        dd header, header, load_end, bss_end, start
start:  mov esp, stack_top
        mov dx, 0x3f8
        cmp ebx, header                 ; the information must be outside the kernel
        jb .outside
        cmp ebx, bss_end
        jb .inside
.outside:
        mov edi, [ebx + 16]
        call puts
        mov al, 10
        out dx, al
        """ + EXIT_OK + """
.inside:
        mov edi, bad
        call puts
        mov al, 1
        out 0xf4, al
bad:    db "information inside the kernel", 10, 0
%PUTS
load_end:
        times 0x5000 db 0                ; a bss over the usual stack, information and TSS places
stack_top:
bss_end:
"""


def test_kernel_loaded_at_0x8000_over_the_usual_boot_structures(machine_factory: Callable[..., Machine], tmp_path: Path) -> None:
    kernel = tmp_path / "low.bin"
    kernel.write_bytes(assemble(tmp_path, "low", LOW_KERNEL, 32))
    result = boot(machine_factory, kernel, format="multiboot", cmdline="at 0x8000")
    assert result.serial == f"{kernel} at 0x8000\n".encode() and result.status == 1


# --- ELF --------------------------------------------------------------------------------------------

LD_KERNEL = """
global _start
section .text
_start: mov dx, 0x3f8
        mov edi, message
        call puts
        """ + EXIT_OK + """
section .data
message: db "linked with ld -Ttext=0x100000", 10, 0
section .text
"""


def test_elf_from_plain_ld_with_a_headers_only_segment_below_1_mib(machine_factory: Callable[..., Machine], tmp_path: Path) -> None:
    (tmp_path / "k.asm").write_text(f"bits 32\n{LD_KERNEL}\n{PUTS.format(di='edi')}")
    run_tools(
        ["nasm", "-f", "elf32", "-o", "k.o", "k.asm"],
        ["ld", "-m", "elf_i386", "-Ttext=0x100000", "-o", "k.elf", "k.o"],
        cwd=tmp_path,
    )
    path = tmp_path / "k.elf"
    first = elf.parse(path, path.read_bytes()).segments[0]
    if first.paddr >= 0x100000 or first.offset != 0:
        pytest.skip(f"this ld puts no headers-only PT_LOAD below 1 MiB (first at {first.paddr:#x})")
    result = boot(machine_factory, path)
    assert result.serial == b"linked with ld -Ttext=0x100000\n" and result.status == 1


BIOS_AREA_CODE = """
org 0xF0000
        mov dx, 0x3f8
        mov edi, message
        call puts
        """ + EXIT_OK + """
message: db "running at 0xf0000", 10, 0
"""


def test_elf_segment_in_the_bios_area(machine_factory: Callable[..., Machine], tmp_path: Path) -> None:
    # Over the MP table's place: the segment wins, as QEMU lets it.
    code = assemble(tmp_path, "bios", BIOS_AREA_CODE, 32)
    path = tmp_path / "bios.elf"
    path.write_bytes(build_elf([Seg(0xF0000, code)], entry=0xF0000))
    result = boot(machine_factory, path)
    assert result.serial == b"running at 0xf0000\n" and result.status == 1


# --- Linux bzImage ----------------------------------------------------------------------------------

SETUP_SIZE = 2 * 512  # bzimage(): the boot sector and one setup sector
LINUX64 = """
org 0x1000200
        mov dx, 0x3f8
        cmp dword [rsi + 0x202], 'HdrS'  ; RSI -> boot_params, the setup header copied in
        jne .bad
        lea rdi, [rel ok]
        call puts
        """ + EXIT_OK + """
.bad:   mov al, 1
        out 0xf4, al
ok:     db "64-bit entry, boot_params at rsi", 10, 0
"""


def test_linux_64_bit_entry_with_a_short_last_paragraph(machine_factory: Callable[..., Machine], tmp_path: Path) -> None:
    code = assemble(tmp_path, "linux64", LINUX64, 64)
    kernel = bytes(0x200) + code
    paragraphs = (len(kernel) + 15) // 16
    kernel = kernel.ljust(paragraphs * 16 - 5, b"\x90")  # the file ends 5 bytes into its last paragraph
    image = bzimage(kernel_size=len(kernel), syssize=paragraphs)[:SETUP_SIZE] + kernel
    path = tmp_path / "bzImage"
    path.write_bytes(image)
    result = boot(machine_factory, path)
    assert result.serial == b"64-bit entry, boot_params at rsi\n" and result.status == 1


LINUX32 = """
org 0x1000000
        mov dx, 0x3f8
        mov eax, cs
        cmp eax, 0x10                    ; __BOOT_CS
        jne .bad
        mov eax, ds
        cmp eax, 0x18                    ; __BOOT_DS, in DS, ES and SS
        jne .bad
        mov eax, ss
        cmp eax, 0x18
        jne .bad
        mov eax, cr0
        test eax, 0x80000000             ; paging off
        jnz .bad
        or ebx, edi                      ; EBX, EDI and EBP zero
        or ebx, ebp
        jnz .bad
        cmp dword [esi + 0x202], 'HdrS'
        jne .bad
        mov edi, ok
        call puts
        """ + EXIT_OK + """
.bad:   mov al, 1
        out 0xf4, al
ok:     db "32-bit entry, flat __BOOT_CS/__BOOT_DS, boot_params at esi", 10, 0
"""


def test_linux_kernel_with_only_a_32_bit_entry(machine_factory: Callable[..., Machine], tmp_path: Path) -> None:
    kernel = assemble(tmp_path, "linux32", LINUX32, 32).ljust(0x400, b"\x90")
    image = bzimage(kernel_size=len(kernel), xloadflags=0)[:SETUP_SIZE] + kernel
    path = tmp_path / "bzImage32"
    path.write_bytes(image)
    result = boot(machine_factory, path)
    assert result.serial == b"32-bit entry, flat __BOOT_CS/__BOOT_DS, boot_params at esi\n"
    assert result.status == 1


LINUX16 = """
org 0x6C                                 ; setup offset 0x26c, where the jump at 0x200 lands, from CS = seg + 0x20
        mov dx, 0x3f8
        mov ax, cs
        sub ax, 0x20
        mov bx, ds
        cmp ax, bx                       ; DS = ES = SS = seg
        jne .bad
        mov bx, ss
        cmp ax, bx
        jne .bad
        cmp sp, 0xE000                   ; SP = the end of the heap
        jne .bad
        mov di, [0x228]                  ; cmd_line_ptr, as the loader wrote it into the header
        sub di, 0xE000                   ; seg * 16 + 0xe000: in this segment, at 0xe000
        movzx eax, ax
        shl eax, 4
        cmp di, ax
        jne .bad
        mov di, 0xE000
        call puts
        mov al, 10
        out dx, al
        """ + EXIT_OK + """
.bad:   mov al, 1
        out 0xf4, al
"""


def test_linux_16_bit_entry_runs_the_setup_code(machine_factory: Callable[..., Machine], tmp_path: Path) -> None:
    image = bytearray(bzimage())
    code = assemble(tmp_path, "linux16", LINUX16, 16)
    image[0x26C : 0x26C + len(code)] = code
    path = tmp_path / "bzImage16"
    path.write_bytes(bytes(image))
    result = boot(machine_factory, path, mode=CpuMode.REAL, cmdline="setup")
    assert result.serial == b"setup\n" and result.status == 1



def test_a_non_utf8_command_line_reaches_the_kernel_byte_for_byte() -> None:
    # click hands pykvm run a surrogate-escaped str for such an argument.
    kernel = guest("multiboot.elf")
    process = subprocess.run(
        [sys.executable, "-m", "pykvm", "run", str(kernel), "--cmdline", b"caf\xe9 \xff"], capture_output=True, timeout=60
    )
    assert process.returncode == 1, process.stderr
    assert f"cmdline: {kernel} ".encode() + b"caf\xe9 \xff\n" in process.stdout
