; unbacked_jump.asm - long-mode flat binary (unbacked_jump.bin, loaded at 0x100000).
; Proves: an instruction fetch from guest-physical memory with no RAM behind it (0xd0000000, inside the
; MMIO hole, identity mapped by the VMM's page tables) ends the VM with KVM_EXIT_INTERNAL_ERROR.
; Prints: "jumping\n", then ends in KVM_EXIT_INTERNAL_ERROR (no exit value).

bits 64
default rel
org 0x100000

%include "lib/serial.inc"

UNBACKED_ADDR   equ 0xd0000000

start:
        PRINT msg_jumping
        mov eax, UNBACKED_ADDR
        jmp rax

%include "lib/serial_code.inc"

msg_jumping:    db "jumping", 10, 0
