; halt.asm - real-mode flat binary (halt.bin, loaded at 0x7c00).
; Proves: HLT with interrupts disabled ends the VM cleanly (KVM_EXIT_HLT, pykvm status 0).
; Prints: "halting\n".  If execution ever continues after the HLT, exits with value 0x7d (status 0xfb).

bits 16
org 0x7c00

%include "lib/serial.inc"

start:
        PRINT msg_halting
        cli
        hlt
        EXIT 0x7d

%include "lib/serial_code.inc"

msg_halting:    db "halting", 10, 0
