; triple_fault.asm - long-mode flat binary (triple_fault.bin, loaded at 0x100000).
; Proves: an exception with no usable IDT escalates #UD -> #GP (vector beyond the IDT limit) -> #DF ->
; triple fault, which KVM reports as KVM_EXIT_SHUTDOWN.
; Prints: "faulting\n", then ends in KVM_EXIT_SHUTDOWN (no exit value).

bits 64
default rel
org 0x100000

%include "lib/serial.inc"

start:
        PRINT msg_faulting
        lidt [empty_idt]
        ud2
        EXIT 0x7c               ; not reached: a triple fault cannot return here

%include "lib/serial_code.inc"

empty_idt:      dw 0            ; limit 0: no vector fits
                dq 0            ; base
msg_faulting:   db "faulting", 10, 0
