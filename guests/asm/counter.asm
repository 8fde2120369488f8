; counter.asm - 64-bit long-mode flat binary (counter.bin), loaded at 0x100000, entered at CPL0.
; Needs the in-kernel PIC and PIT (a machine with irqchip=True).
; Made for snapshot, restore and migration tests: it counts and prints, paced by the PIT, while it takes
; the UART's receive interrupts, so that a machine saved at any moment and restored must carry its
; registers, memory, PIC, PIT and UART exactly for the rest of the output to be right.
;
; PIT channel 0 at 1 kHz (IRQ 0, vector 0x20) and COM1's received-data interrupt (IRQ 4, vector 0x24)
; through the remapped PICs.  For n = 1 .. COUNT it waits for TICKS_PER_LINE ticks, then prints
;     count <n decimal>\n
; The UART handler takes every byte the host sends: it counts them and folds them into a sum
; (sum = sum * 31 + byte, mod 2^64).  After the last count it prints
;     input <bytes decimal> sum <16 hex digits>\n
; and exits with value 0 (status 1).  Every line is the same on every run whatever the timing: only the
; pace depends on the ticks.  Without its PIT state after a restore it waits for ever (use a timeout).

bits 64
default rel
org 0x100000

%include "lib/serial.inc"
%include "lib/pc.inc"

COUNT           equ 400
TICKS_PER_LINE  equ 2

_start:
        mov dx, cs
        lea rdi, [idt]
        call irq_init
        lidt [idtr]

        mov r13d, 1                     ; n
.line:  mov ecx, TICKS_PER_LINE
        call wait_ticks
        PRINT msg_count
        mov eax, r13d
        call serial_dec
        NEWLINE
        inc r13d
        cmp r13d, COUNT
        jbe .line

        cli                             ; the totals, then the end
        PRINT msg_input
        mov rax, [input_bytes]
        call serial_dec
        PRINT msg_sum
        mov rax, [input_sum]
        mov cl, 16
        call serial_hex
        NEWLINE
        EXIT 0

; Waits (sti; hlt) until ecx more PIT ticks came; returns with interrupts disabled.
wait_ticks:
        cli
        mov rbp, [ticks]
        add rbp, rcx
.wait:  cmp [ticks], rbp
        jae .done
        sti                             ; the interrupt shadow of STI covers HLT: no tick is missed
        hlt
        cli
        jmp .wait
.done:  ret

tick_isr:
        push rax
        inc qword [ticks]
        mov al, PIC_EOI
        out PIC1_CMD, al
        pop rax
        iretq

; Takes every byte waiting in the UART (LSR.DR), then EOI.
uart_isr:
        push rax
        push rdx
.next:  call uart_read
        jc .done
        call fold_input
        jmp .next
.done:  mov al, PIC_EOI
        out PIC1_CMD, al
        pop rdx
        pop rax
        iretq

spurious_isr:
        iretq

%include "lib/serial_code.inc"
%include "lib/long_pc_code.inc"

msg_count:      db "count ", 0
msg_input:      db "input ", 0
msg_sum:        db " sum ", 0
align 8
ticks:          dq 0
input_bytes:    dq 0
input_sum:      dq 0
idtr:           dw IRQ_IDT_GATES * 16 - 1
                dq idt
align 16
idt:            times IRQ_IDT_GATES * 16 db 0
