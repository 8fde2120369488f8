; exit_code.asm - real-mode flat binary (exit_code.bin, loaded at 0x7c00).
; Proves: the value written to the debug-exit port reaches pykvm's exit status ((42 << 1) | 1 = 85).
; Prints: "exit 42\n".  Exits with value 42 (pykvm status 85).

bits 16
org 0x7c00

%include "lib/serial.inc"

start:
        PRINT msg_exit
        EXIT 42

%include "lib/serial_code.inc"

msg_exit:       db "exit 42", 10, 0
