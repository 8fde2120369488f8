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
%include "lib/cpl3.inc"                 ; the kernel: page tables, GDT, TSS, IDT, fault handlers

LOOP_COUNT      equ 100000000

image_start:
        CPL3_INIT
        CPL3_ENTER user_main, user_stack_top

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

        CPL3_FAULT_HANDLERS

%include "lib/serial_code.inc"

; ---- descriptor tables ----------------------------------------------------------------------------
        CPL3_TABLES bp_handler

msg_sum:        db "cpl3 sum=", 0
msg_cs:         db " cs=", 0
msg_not_user:   db "cpl3: not from user mode", 10, 0
        CPL3_STRINGS

; ---- zero-initialised memory after the image ------------------------------------------------------
        CPL3_BSS
