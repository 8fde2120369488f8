; fw_cfg.asm - Multiboot v1 ELF32 kernel (fw_cfg.elf), entered in 32-bit protected mode.
; Proves: QEMU's fw_cfg traditional I/O interface (16-bit selector writes to 0x510, byte reads from 0x511,
; each select rewinding the item): the signature, the feature bits, the CPU count, the RAM size, the
; big-endian file directory, and a file read by its select key (etc/e820, QEMU's memory map).
; Prints:
;   "fw_cfg signature: QEMU"        item 0x0000 (otherwise "fw_cfg signature: bad <its 4 bytes as a
;                                   little-endian dword, 8 hex digits>" and exit value 1)
;   "fw_cfg id: <n>"                item 0x0001, u32 LE, decimal (bit 0: this interface, bit 1: DMA)
;   "cpus: <n>"                     item 0x0005, u16 LE, decimal
;   "ram: <MiB> MiB"                item 0x0003, u64 LE, divided by 2^20, decimal
;   "files: <count>"                item 0x0019: its big-endian count of {u32 BE size, u16 BE select,
;                                   u16 reserved, char name[56]} entries
;   "e820 <addr> <len> <type>"      per 20-byte entry {u64 addr, u64 len, u32 type} (LE) of "etc/e820":
;                                   addr and len 16 lowercase hex digits, type decimal
; then exits with value 0 (pykvm status 1).  No "etc/e820" in the directory: "fw_cfg: no etc/e820", exit
; value 2.  An unexpected exception: "fault <vector> at <eip>", exit value 0x7f.

bits 32
global _start
section .text

%include "lib/serial.inc"
%include "lib/pc.inc"

E820_ENTRY_SIZE equ 20

MULTIBOOT_HEADER

_start:
        mov esp, stack_top
        call pc_init
        mov ax, FW_CFG_SIGNATURE
        call fw_cfg_select
        mov ecx, 4
        call fw_cfg_read_le
        PRINT msg_signature
        cmp eax, 'QEMU'
        jne .bad_signature
        PRINT msg_qemu

        PRINT msg_id
        mov ax, FW_CFG_ID
        call fw_cfg_select
        mov ecx, 4
        call fw_cfg_read_le
        call serial_dec
        NEWLINE

        PRINT msg_cpus
        mov ax, FW_CFG_NB_CPUS
        call fw_cfg_select
        mov ecx, 2
        call fw_cfg_read_le
        call serial_dec
        NEWLINE

        PRINT msg_ram
        mov ax, FW_CFG_RAM_SIZE
        call fw_cfg_select
        mov ecx, 4
        call fw_cfg_read_le
        mov ebx, eax                    ; low dword
        call fw_cfg_read_le             ; high dword
        shrd ebx, eax, 20               ; bytes >> 20 (fits 32 bits below 4 PiB)
        mov eax, ebx
        call serial_dec
        PRINT msg_mib

        mov esi, name_e820
        call fw_cfg_find_file           ; EDX = files, EAX = select, ECX = size, CF = missing
        pushfd
        PRINT msg_files
        xchg eax, edx
        call serial_dec
        NEWLINE
        popfd
        jc .no_e820
        mov eax, edx
        call fw_cfg_select
        mov eax, ecx
        xor edx, edx
        mov ebx, E820_ENTRY_SIZE
        div ebx
        mov ebx, eax                    ; entries
.entry: test ebx, ebx
        jz .done
        PRINT msg_e820
        call print_u64
        mov al, ' '
        call serial_putc
        call print_u64
        mov al, ' '
        call serial_putc
        push ecx
        mov ecx, 4
        call fw_cfg_read_le
        pop ecx
        call serial_dec
        NEWLINE
        dec ebx
        jmp .entry
.done:  EXIT 0

.bad_signature:
        PRINT msg_bad
        mov cl, 8
        call serial_hex
        NEWLINE
        EXIT 1

.no_e820:
        PRINT msg_no_e820
        EXIT 2

; print_u64: the next 8 bytes of the selected item, a little-endian u64, as 16 hex digits.
print_u64:
        push eax
        push ecx
        push edx
        mov ecx, 4
        call fw_cfg_read_le
        mov edx, eax                    ; low dword
        call fw_cfg_read_le             ; high dword
        mov cl, 8
        call serial_hex
        mov eax, edx
        call serial_hex
        pop edx
        pop ecx
        pop eax
        ret

%include "lib/serial_code.inc"
%include "lib/pc_code.inc"
%include "lib/fw_cfg_code.inc"

name_e820:      db "etc/e820", 0
msg_signature:  db "fw_cfg signature: ", 0
msg_qemu:       db "QEMU", 10, 0
msg_bad:        db "bad ", 0
msg_id:         db "fw_cfg id: ", 0
msg_cpus:       db "cpus: ", 0
msg_ram:        db "ram: ", 0
msg_mib:        db " MiB", 10, 0
msg_files:      db "files: ", 0
msg_e820:       db "e820 ", 0
msg_no_e820:    db "fw_cfg: no etc/e820", 10, 0

section .bss align=16
                resb 4096
stack_top:
