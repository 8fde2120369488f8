; bench_mmio.asm - exit round-trip benchmark guest: `count` x 4-byte store to [target].
;
; Entered in 64-bit long mode at CPL0 (or CPL3) at 0x100000, with the low 4 GiB identity-mapped.
; `target` must be a guest-physical address with no memory slot (the MMIO hole, e.g.
; 0xd0000000), so that every store is an MMIO exit. The VMM patches the parameter block:
;   offset  8: count  (qword) - number of stores (0 means none)
;   offset 16: target (qword) - the address stored to
; Ends with `mov al, 0; out 0xf4, al` (debug-exit port).
bits 64
org 0x100000

params:
    jmp short start
    times 8 - ($ - params) db 0
count:  dq 20000
target: dq 0xd0000000

start:
    mov rcx, [rel count]
    mov rbx, [rel target]
    xor eax, eax
    test rcx, rcx
    jz done
.loop:
    mov [rbx], eax
    dec rcx
    jnz .loop
done:
    mov al, 0
    out 0xf4, al
    jmp done
