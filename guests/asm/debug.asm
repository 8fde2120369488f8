; debug.asm - the guest the debugger's tests drive with gdb: one source, assembled for three modes,
; each with its symbols (`file` in gdb):
;   debug_real.elf, debug_real.bin  16-bit real mode at 0x7c00 (-DREAL); the .bin is the ELF's image,
;                                   which pykvm runs (a flat binary), the .elf only gives gdb the symbols
;   debug_multiboot.elf             a Multiboot v1 ELF32 kernel, 32-bit protected mode (-DMULTIBOOT)
;   debug_long.elf                  ELF64, 64-bit long mode at CPL0 (-DLONG)
; Data for a debugger to read and change (dwords):
;   counter  0, incremented 5 times by count_loop
;   answer   21
; At `counted`, after the loop, it loads answer into EAX, adds counter at `loaded`, prints
; "answer <decimal>\n" and exits with the sum's low byte: "answer 26", value 26 → status 53, unless a
; debugger changed things.

%ifdef REAL
bits 16
%elifdef MULTIBOOT
bits 32
%else
bits 64
default rel
%endif
global _start
section .text

%include "lib/serial.inc"
%ifdef MULTIBOOT
%include "lib/pc.inc"
MULTIBOOT_HEADER
%endif

_start:
%ifdef MULTIBOOT
        mov esp, stack_top              ; the multiboot spec leaves ESP undefined
%endif
        mov ecx, 5
count_loop:
        inc dword [counter]
        dec ecx
        jnz count_loop
counted:
        mov eax, [answer]
loaded:
        add eax, [counter]
        PRINT msg_answer
        call serial_dec
        NEWLINE
        EXIT al

%include "lib/serial_code.inc"

msg_answer:     db "answer ", 0
align 4
counter:        dd 0
answer:         dd 21

%ifdef MULTIBOOT
section .bss align=16
                resb 4096
stack_top:
%endif
