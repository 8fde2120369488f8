; step_irq.asm - Multiboot v1 ELF32 kernel (step_irq.elf), entered in 32-bit protected mode: a guest
; for the debugger's step tests, where an interrupt is pending when a debugger steps.
; The PIT raises IRQ 0 at 100 Hz through the remapped master PIC (vector 0x20, the only IRQ unmasked).
; With interrupts off, the kernel polls the master PIC's IRR until IRQ 0 is pending, then, at
; `pending`, executes STI: after STI's interrupt shadow (one NOP) the interrupt is delivered.  A step
; at `shadowed` executes that instruction instead, unless the interrupt is let through.  The handler
; counts into `ticks` (a dword).  Once 3 ticks have come it prints "ticks: 3" and exits with value 0
; (pykvm status 1).  An unexpected exception or interrupt: "fault <vector> at <eip>" or "unexpected
; interrupt <vector>", exit value 0x7f.

bits 32
global _start
section .text

%include "lib/serial.inc"
%include "lib/pc.inc"

TICKS           equ 3
OCW3_READ_IRR   equ 0x0a

MULTIBOOT_HEADER

_start:
        mov esp, stack_top
        call pc_init
        mov edx, tick_isr
        call pic_timer_init
        mov ax, PIT_DIV_100HZ
        call pit_periodic
.irr:   mov al, OCW3_READ_IRR           ; wait, interrupts off, until IRQ 0 is pending
        out PIC1_CMD, al
        in al, PIC1_CMD
        test al, 1 << 0
        jz .irr
pending:
        sti
        nop                             ; STI's interrupt shadow
shadowed:
        nop                             ; the pending interrupt comes before this one
        nop
        nop
.wait:  cmp dword [ticks], TICKS
        jb .wait
        cli
        PRINT msg_ticks
        mov eax, [ticks]
        call serial_dec
        NEWLINE
        EXIT 0

tick_isr:
        push eax
        inc dword [ticks]
        mov al, PIC_EOI
        out PIC1_CMD, al
        pop eax
        jmp isr_return                  ; IRET, which KVM's emulator cannot do in protected mode

%include "lib/serial_code.inc"
%include "lib/pc_code.inc"

msg_ticks:      db "ticks: ", 0

section .bss align=16
BSS_ALIGN 4
ticks:          resd 1
BSS_ALIGN 16
                resb 4096
stack_top:
