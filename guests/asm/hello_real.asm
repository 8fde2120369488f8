; hello_real.asm - real-mode flat binary (hello_real.bin, loaded at 0x7c00).
; Proves: 16-bit real-mode entry (CS=DS=SS=0, IP=0x7c00), port I/O to the UART, the debug-exit port.
; Prints: "Hello from real mode\n".  Exits with value 0 (pykvm status 1).

bits 16
org 0x7c00

%include "lib/serial.inc"

start:
        PRINT msg_hello
        EXIT 0

%include "lib/serial_code.inc"

msg_hello:      db "Hello from real mode", 10, 0
