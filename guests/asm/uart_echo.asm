; uart_echo.asm - real-mode flat binary (uart_echo.bin, loaded at 0x7c00).
; Proves: UART receive (LSR.DR polling, RBR reads) as well as transmit.
; Prints: "echo ready\n", then echoes every received byte unchanged until it receives 0x04 (EOT, not
; echoed); then prints "\necho done <count>\n" (count = bytes echoed, decimal) and exits with value
; count & 0xff (pykvm status ((count & 0xff) << 1) | 1).

bits 16
org 0x7c00

%include "lib/serial.inc"

EOT             equ 0x04

start:
        PRINT msg_ready
        xor ebx, ebx            ; bytes echoed
.next:  call serial_getc
        cmp al, EOT
        je .done
        call serial_putc
        inc ebx
        jmp .next
.done:  PRINT msg_done
        mov eax, ebx
        call serial_dec
        NEWLINE
        EXIT bl

%include "lib/serial_code.inc"

msg_ready:      db "echo ready", 10, 0
msg_done:       db 10, "echo done ", 0
