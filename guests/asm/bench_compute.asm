; bench_compute.asm - CPU-bound benchmark guest: `count` iterations of a register-only
; add/xor/rotate mix, then `out 0xf4, al` with al = low byte of the result.
;
; Meant to be entered at CPL3 (CS=0x2b, SS/DS/ES=0x23, RFLAGS.IOPL=3) in 64-bit long mode at
; 0x100000, so it runs natively even on a software KVM backend; the OUT is legal because
; IOPL=3. The loop touches no memory. The VMM patches the parameter block:
;   offset  8: count  (qword) - iterations (0 means none)
;   offset 16: target (qword) - unused (kept so every bench guest has the same block)
;
; The result is rax ^ rbx ^ rdx after the loop, left in rax (full 64 bits, for a VMM that
; reads registers) and sent as its low byte on port 0xf4.
;
; The loop body must stay instruction-for-instruction identical to the host copy in
; bench/rawkvm.c (COMPUTE_LOOP_ASM), which is the "native" figure it is compared with.
bits 64
org 0x100000

params:
    jmp short start
    times 8 - ($ - params) db 0
count:  dq 20000
target: dq 0

start:
    mov rcx, [rel count]
    mov rax, 0x0123456789abcdef
    mov rbx, 0x0fedcba987654321
    mov rdx, 0x9e3779b97f4a7c15
    test rcx, rcx
    jz .done
    align 16
.loop:
    add rax, rbx
    xor rdx, rax
    rol rdx, 13
    add rbx, rdx
    xor rax, rcx
    ror rbx, 7
    dec rcx
    jnz .loop
.done:
    xor rax, rbx
    xor rax, rdx
.exit:
    out 0xf4, al
    jmp .exit
