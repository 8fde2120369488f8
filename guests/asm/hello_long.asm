; hello_long.asm - 64-bit long-mode guest, built twice from this source:
;   hello_long.bin  flat binary, loaded at 0x100000 (nasm -f bin)
;   hello_long.elf  ELF64 linked at 0x100000 (nasm -f elf64 -DELF, ld -m elf_x86_64), entry _start
; Proves: long-mode entry at CPL0 on the VMM's identity map (and the ELF64 loader); uses RSP=0x8ff0.
; Prints: "Hello from long mode\n".  Exits with value 0 (pykvm status 1).

bits 64
default rel
%ifdef ELF
global _start
section .text
%else
org 0x100000
%endif

%include "lib/serial.inc"

_start:
        PRINT msg_hello
        EXIT 0

%include "lib/serial_code.inc"

msg_hello:      db "Hello from long mode", 10, 0
