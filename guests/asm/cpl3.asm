; cpl3.asm - long-mode flat binary (cpl3.bin, loaded at 0x100000), entered at CPL0.
; Proves: a guest kernel can build its own GDT, 64-bit TSS (ltr), IDT and user-accessible page tables,
; drop to CPL3 with iretq, run a heavy loop there (native speed on the nested backend), and come back to
; CPL0 through a DPL3 interrupt gate (int3 -> #BP) with a correct interrupt frame.
; Prints: "cpl3 sum=5000000050000000 cs=002b\n" (the sum of 1..100000000 computed at CPL3; the CS saved in
; the #BP frame, 4 lowercase hex digits: user code selector 0x28 | RPL 3) and exits with value 0
; (pykvm status 1).  If the saved CS does not have RPL 3: "cpl3: not from user mode\n", exit value 1
; (status 3).  Any #UD, #DF, #GP or #PF: "fault <vector in decimal>\n", exit value 0x7f (status 0xff).

bits 64
default rel
org 0x100000

%include "lib/serial.inc"

LOAD_ADDR       equ 0x100000
KERNEL_CS       equ 0x08
KERNEL_DS       equ 0x10
USER_DS         equ 0x20 | 3
USER_CS         equ 0x28 | 3
TSS_SEL         equ 0x30
USER_RFLAGS     equ 0x3002          ; IOPL=3, IF=0, bit 1 (reserved, always 1)
LOOP_COUNT      equ 100000000
PAGE_PRESENT_RW_USER equ 0x07
PAGE_HUGE       equ 0x80            ; PD entry maps a 2 MiB page
PD_ENTRIES      equ 512             ; one page directory: the low 1 GiB
CR4_SMEP        equ 1 << 20
CR4_SMAP        equ 1 << 21
GATE_KERNEL     equ 0x8e            ; present, DPL0, 64-bit interrupt gate
GATE_USER       equ 0xee            ; present, DPL3, 64-bit interrupt gate
EXIT_FAULT      equ 0x7f

; Assemble-time physical address of a label in this (single) section, usable in shifts and masks.
%define ABS(label) ((label) - image_start + LOAD_ADDR)

image_start:
        lea rsp, [kernel_stack_top]
        mov rax, cr4                    ; the kernel runs on user pages too: no SMEP/SMAP
        and rax, ~(CR4_SMEP | CR4_SMAP)
        mov cr4, rax

        ; Page tables of our own with the user bit set (the VMM's identity map need not allow CPL3):
        ; PML4[0] -> PDPT[0] -> one PD of 2 MiB pages identity mapping the low 1 GiB.
        lea rdi, [pml4]
        xor eax, eax
        mov ecx, 2 * 512
        rep stosq                       ; clear the PML4 and the PDPT
        lea rax, [pdpt + PAGE_PRESENT_RW_USER]
        mov [pml4], rax
        lea rax, [pd + PAGE_PRESENT_RW_USER]
        mov [pdpt], rax
        lea rdi, [pd]
        mov eax, PAGE_PRESENT_RW_USER | PAGE_HUGE
        mov ecx, PD_ENTRIES
.map:   mov [rdi], rax
        add rax, 0x200000
        add rdi, 8
        dec ecx
        jnz .map
        lea rax, [pml4]
        mov cr3, rax

        lgdt [gdt_ptr]
        push KERNEL_CS                  ; reload CS from the new GDT
        lea rax, [.reloaded]
        push rax
        retfq
.reloaded:
        mov ax, KERNEL_DS
        mov ds, ax
        mov es, ax
        mov ss, ax
        mov fs, ax
        mov gs, ax
        mov ax, TSS_SEL
        ltr ax
        lidt [idt_ptr]

        push USER_DS                    ; SS
        lea rax, [user_stack_top]
        push rax                        ; RSP
        push USER_RFLAGS
        push USER_CS
        lea rax, [user_main]
        push rax                        ; RIP
        iretq

; ---- CPL3 -----------------------------------------------------------------------------------------
user_main:
        xor eax, eax
        mov ecx, LOOP_COUNT
.sum:   add rax, rcx
        dec rcx
        jnz .sum
        int3                            ; to the #BP handler with the sum in RAX
        ud2                             ; not reached: the handler does not return

; ---- CPL0 interrupt handlers ----------------------------------------------------------------------
bp_handler:                             ; frame: [rsp] RIP, [rsp+8] CS, [rsp+16] RFLAGS, ...
        mov rbx, rax
        mov rdx, [rsp + 8]
        mov al, dl
        and al, 3
        cmp al, 3
        jne .not_user
        PRINT msg_sum
        mov rax, rbx
        call serial_dec
        PRINT msg_cs
        mov rax, rdx
        mov cl, 4
        call serial_hex
        NEWLINE
        EXIT 0
.not_user:
        PRINT msg_not_user
        EXIT 1

%macro FAULT_HANDLER 1
fault_%1:
        mov ebx, %1
        jmp fault_common
%endmacro
FAULT_HANDLER 6                         ; #UD
FAULT_HANDLER 8                         ; #DF
FAULT_HANDLER 13                        ; #GP
FAULT_HANDLER 14                        ; #PF

fault_common:                           ; EBX = vector
        PRINT msg_fault
        mov eax, ebx
        call serial_dec
        NEWLINE
        EXIT EXIT_FAULT

%include "lib/serial_code.inc"

; ---- descriptor tables ----------------------------------------------------------------------------
align 8
gdt:
        dq 0                            ; 0x00 null
        dq 0x00af9b000000ffff           ; 0x08 kernel code, 64-bit, DPL0
        dq 0x00cf93000000ffff           ; 0x10 kernel data, DPL0
        dq 0x00cf93000000ffff           ; 0x18 kernel data (the VMM's data selector stays valid)
        dq 0x00cff3000000ffff           ; 0x20 user data, DPL3
        dq 0x00affb000000ffff           ; 0x28 user code, 64-bit, DPL3
        ; 0x30 64-bit TSS descriptor (16 bytes): limit, base 0-15, base 16-23, type 9 present,
        ; limit 16-19 and flags, base 24-31, base 32-63, reserved
        dw tss_end - tss - 1
        dw ABS(tss) & 0xffff
        db (ABS(tss) >> 16) & 0xff
        db 0x89
        db 0
        db (ABS(tss) >> 24) & 0xff
        dd ABS(tss) >> 32
        dd 0
gdt_end:

gdt_ptr:
        dw gdt_end - gdt - 1
        dq gdt

tss:
        dd 0
        dq kernel_stack_top             ; RSP0: the stack for interrupts from CPL3
        dq 0, 0                         ; RSP1, RSP2
        dq 0
        times 7 dq 0                    ; IST1-7
        dq 0
        dw 0
        dw tss_end - tss                ; I/O map base beyond the limit: no I/O bitmap
tss_end:

; IDT entry: handler offset 0-15, selector, IST, type/DPL/present, offset 16-31, offset 32-63, reserved
%macro GATE 2
        dw ABS(%1) & 0xffff
        dw KERNEL_CS
        db 0
        db %2
        dw (ABS(%1) >> 16) & 0xffff
        dd ABS(%1) >> 32
        dd 0
%endmacro
%macro NO_GATE 0
        times 16 db 0
%endmacro

align 16
idt:
        NO_GATE                         ; 0 #DE
        NO_GATE                         ; 1 #DB
        NO_GATE                         ; 2 NMI
        GATE bp_handler, GATE_USER      ; 3 #BP: reachable from CPL3 by int3
        NO_GATE                         ; 4 #OF
        NO_GATE                         ; 5 #BR
        GATE fault_6, GATE_KERNEL       ; 6 #UD
        NO_GATE                         ; 7 #NM
        GATE fault_8, GATE_KERNEL       ; 8 #DF
        NO_GATE                         ; 9
        NO_GATE                         ; 10 #TS
        NO_GATE                         ; 11 #NP
        NO_GATE                         ; 12 #SS
        GATE fault_13, GATE_KERNEL      ; 13 #GP
        GATE fault_14, GATE_KERNEL      ; 14 #PF
idt_end:

idt_ptr:
        dw idt_end - idt - 1
        dq idt

msg_sum:        db "cpl3 sum=", 0
msg_cs:         db " cs=", 0
msg_not_user:   db "cpl3: not from user mode", 10, 0
msg_fault:      db "fault ", 0

; ---- zero-initialised memory after the image ------------------------------------------------------
section .bss align=4096
pml4:           resb 4096
pdpt:           resb 4096
pd:             resb 4096
                resb 4096
kernel_stack_top:
                resb 4096
user_stack_top:
