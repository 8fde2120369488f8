; dirty_pages.asm - 64-bit long-mode flat binary (dirty_pages.bin), loaded at 0x100000; runs entered at
; CPL0 or at CPL3 (pykvm run --user-mode): it uses no stack and no privileged instruction.
; Proves: KVM's dirty log reports the pages a guest writes.  In rounds, forever: it reads the page list
; the host put at PAGE_LIST (a qword count, then that many guest-physical addresses), writes the byte
; 0xa5 at each address, and writes ROUND_DONE (0x31) to the debug-exit port (pykvm ends the run there
; with status 99; running the machine again starts the next round, after the host has written the next
; list).  It reads nothing else and prints nothing.

bits 64
default rel
org 0x100000

%include "lib/machine.inc"

PAGE_LIST       equ 0x200000
ROUND_DONE      equ 0x31
WRITTEN_BYTE    equ 0xa5

_start:
.round: mov rsi, PAGE_LIST
        lodsq
        mov rcx, rax
        jrcxz .done
.write: lodsq
        mov byte [rax], WRITTEN_BYTE
        loop .write
.done:  mov al, ROUND_DONE
        out EXIT_PORT, al
        jmp .round
