; bench_pio.asm - exit round-trip benchmark guest: `count` x `out dx, al` to port `target`.
;
; Entered in 64-bit long mode at CPL0 (or CPL3 with IOPL=3) at 0x100000, with the low 4 GiB
; identity-mapped. The VMM patches the parameter block before loading:
;   offset  8: count  (qword) - number of OUTs (0 means none)
;   offset 16: target (qword) - the port written (low 16 bits used)
; Ends with `mov al, 0; out 0xf4, al` (debug-exit port). A VMM that resumes after that exit
; gets the same exit again.
bits 64
org 0x100000

params:
    jmp short start
    times 8 - ($ - params) db 0
count:  dq 20000
target: dq 0x80

start:
    mov rcx, [rel count]
    mov rdx, [rel target]
    xor eax, eax
    test rcx, rcx
    jz done
.loop:
    out dx, al
    dec rcx
    jnz .loop
done:
    mov al, 0
    out 0xf4, al
    jmp done
