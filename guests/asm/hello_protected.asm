; hello_protected.asm - 32-bit protected-mode guest, built twice from this source:
;   hello_protected.bin  flat binary, loaded at 0x100000 (nasm -f bin)
;   hello_protected.elf  ELF32 linked at 0x100000 (nasm -f elf32 -DELF, ld -m elf_i386), entry _start
; Proves: protected-mode entry with flat segments (and the ELF32 loader); uses the VMM's stack (ESP=0x8ff0).
; Prints: "Hello from protected mode\n".  Exits with value 0 (pykvm status 1).

bits 32
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

msg_hello:      db "Hello from protected mode", 10, 0
