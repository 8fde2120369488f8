; multiboot.asm - Multiboot v1 (spec 0.6.96) kernel, built twice from this source:
;   multiboot.elf         ELF32 linked at 0x100000 (nasm -f elf32 -DELF); header flags 0x00000003
;                         (bit 0 page-align modules, bit 1 memory info), loaded through the ELF headers
;   multiboot_kludge.bin  flat binary for 0x100000; header flags 0x00010003: bit 16, the "a.out kludge",
;                         gives header_addr/load_addr/load_end_addr/bss_end_addr/entry_addr
; Proves: the loader's entry state (EAX magic, EBX -> information structure) and the information it passes.
; It sets up its own stack (the spec leaves ESP undefined) and loads no segment registers.
; Prints, one line each, in this order (each block only if its flag bit in the information is set):
;   "multiboot: magic ok"                   (EAX != 0x2BADB002: "multiboot: bad magic", exit value 1)
;   "cmdline: <string>"                     bit 2
;   "mem_lower: <decimal> KiB"              bit 0
;   "mem_upper: <decimal> KiB"              bit 0
;   "mmap: <n> entries"                     bit 6, then per entry, in order:
;   "mmap <base> <length> <type>"           base and length 16 lowercase hex digits, type decimal
;   "modules: <n>"                          bit 3, then per module, index from 0:
;   "module <index>: <string> <size> bytes" size = mod_end - mod_start, decimal (a NULL string prints "")
;   "loader: <name>"                        bit 9
; then exits with value 0 (pykvm status 1).

bits 32
%ifdef ELF
global _start
section .text
%else
org 0x100000
%endif

%include "lib/serial.inc"

MB_HEADER_MAGIC equ 0x1badb002
MB_BOOT_MAGIC   equ 0x2badb002          ; in EAX at entry
MB_PAGE_ALIGN   equ 1 << 0
MB_MEMORY_INFO  equ 1 << 1
MB_AOUT_KLUDGE  equ 1 << 16
%ifdef ELF
MB_FLAGS        equ MB_PAGE_ALIGN | MB_MEMORY_INFO
%else
MB_FLAGS        equ MB_PAGE_ALIGN | MB_MEMORY_INFO | MB_AOUT_KLUDGE
%endif

; Multiboot information structure: offsets and flag bits
MBI_FLAGS       equ 0
MBI_MEM_LOWER   equ 4
MBI_MEM_UPPER   equ 8
MBI_CMDLINE     equ 16
MBI_MODS_COUNT  equ 20
MBI_MODS_ADDR   equ 24
MBI_MMAP_LENGTH equ 44
MBI_MMAP_ADDR   equ 48
MBI_LOADER_NAME equ 64
MBI_F_MEM       equ 1 << 0
MBI_F_CMDLINE   equ 1 << 2
MBI_F_MODS      equ 1 << 3
MBI_F_MMAP      equ 1 << 6
MBI_F_LOADER    equ 1 << 9
; module entry (16 bytes)
MOD_START       equ 0
MOD_END         equ 4
MOD_STRING      equ 8
MOD_SIZE        equ 16
; memory map entry: "size" is at offset 0 and does not count itself
MMAP_SIZE       equ 0
MMAP_BASE       equ 4
MMAP_LENGTH     equ 12
MMAP_TYPE       equ 20

image_start:
align 4
mb_header:
        dd MB_HEADER_MAGIC
        dd MB_FLAGS
        dd -(MB_HEADER_MAGIC + MB_FLAGS)
%ifndef ELF
        dd mb_header                    ; header_addr
        dd image_start                  ; load_addr: the file is loaded from its first byte
        dd load_end                     ; load_end_addr
        dd bss_end                      ; bss_end_addr
        dd _start                       ; entry_addr
%endif

_start:
        mov esp, stack_top
        cmp eax, MB_BOOT_MAGIC
        jne bad_magic
        PRINT msg_magic_ok
        mov edi, [ebx + MBI_FLAGS]      ; EBX = information structure, EDI = its flags, kept throughout

        test edi, MBI_F_CMDLINE
        jz .no_cmdline
        PRINT msg_cmdline
        mov esi, [ebx + MBI_CMDLINE]
        call puts_or_null
        NEWLINE
.no_cmdline:

        test edi, MBI_F_MEM
        jz .no_mem
        PRINT msg_mem_lower
        mov eax, [ebx + MBI_MEM_LOWER]
        call serial_dec
        PRINT msg_kib
        PRINT msg_mem_upper
        mov eax, [ebx + MBI_MEM_UPPER]
        call serial_dec
        PRINT msg_kib
.no_mem:

        test edi, MBI_F_MMAP
        jz .no_mmap
        call print_mmap
.no_mmap:

        test edi, MBI_F_MODS
        jz .no_mods
        call print_modules
.no_mods:

        test edi, MBI_F_LOADER
        jz .no_loader
        PRINT msg_loader
        mov esi, [ebx + MBI_LOADER_NAME]
        call puts_or_null
        NEWLINE
.no_loader:
        EXIT 0

bad_magic:
        PRINT msg_bad_magic
        EXIT 1

; print_mmap: EBX = information structure.  Counts the entries, then prints them.
print_mmap:
        mov esi, [ebx + MBI_MMAP_ADDR]
        mov edx, esi
        add edx, [ebx + MBI_MMAP_LENGTH] ; end of the map
        xor eax, eax
.count: cmp esi, edx
        jae .counted
        inc eax
        mov ecx, [esi + MMAP_SIZE]
        lea esi, [esi + ecx + 4]
        jmp .count
.counted:
        PRINT msg_mmap_count
        call serial_dec
        PRINT msg_entries
        mov esi, [ebx + MBI_MMAP_ADDR]
        mov cl, 8                       ; 64-bit values are printed as two 8-digit halves
.entry: cmp esi, edx
        jae .done
        PRINT msg_mmap
        mov eax, [esi + MMAP_BASE + 4]
        call serial_hex
        mov eax, [esi + MMAP_BASE]
        call serial_hex
        mov al, ' '
        call serial_putc
        mov eax, [esi + MMAP_LENGTH + 4]
        call serial_hex
        mov eax, [esi + MMAP_LENGTH]
        call serial_hex
        mov al, ' '
        call serial_putc
        mov eax, [esi + MMAP_TYPE]
        call serial_dec
        NEWLINE
        mov eax, [esi + MMAP_SIZE]
        lea esi, [esi + eax + 4]
        jmp .entry
.done:  ret

; print_modules: EBX = information structure.
print_modules:
        PRINT msg_modules
        mov eax, [ebx + MBI_MODS_COUNT]
        call serial_dec
        NEWLINE
        mov edx, [ebx + MBI_MODS_ADDR]  ; current module entry
        xor ebp, ebp                    ; its index
.next:  cmp ebp, [ebx + MBI_MODS_COUNT]
        jae .done
        PRINT msg_module
        mov eax, ebp
        call serial_dec
        PRINT msg_colon
        mov esi, [edx + MOD_STRING]
        call puts_or_null
        mov al, ' '
        call serial_putc
        mov eax, [edx + MOD_END]
        sub eax, [edx + MOD_START]
        call serial_dec
        PRINT msg_bytes
        add edx, MOD_SIZE
        inc ebp
        jmp .next
.done:  ret

; puts_or_null: ESI -> string, or 0 for none (prints nothing).
puts_or_null:
        test esi, esi
        jz .done
        call serial_puts
.done:  ret

%include "lib/serial_code.inc"

msg_magic_ok:   db "multiboot: magic ok", 10, 0
msg_bad_magic:  db "multiboot: bad magic", 10, 0
msg_cmdline:    db "cmdline: ", 0
msg_mem_lower:  db "mem_lower: ", 0
msg_mem_upper:  db "mem_upper: ", 0
msg_kib:        db " KiB", 10, 0
msg_mmap_count: db "mmap: ", 0
msg_entries:    db " entries", 10, 0
msg_mmap:       db "mmap ", 0
msg_modules:    db "modules: ", 0
msg_module:     db "module ", 0
msg_colon:      db ": ", 0
msg_bytes:      db " bytes", 10, 0
msg_loader:     db "loader: ", 0
load_end:

section .bss align=16
                resb 4096
stack_top:
bss_end:
