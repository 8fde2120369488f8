; snapshot.asm - 64-bit long-mode flat binary (snapshot.bin), loaded at 0x100000, entered at CPL0.
; Needs the in-kernel PIC and PIT (a machine with irqchip=True).
; Proves: a snapshot taken half-way and restored into another VM goes on as the original does.  Its
; result depends on what the VM holds at the half-way point:
;   registers   the LCG state (RBX) and its constants (R14, R15), the checksum (R12)
;   memory      a table of 64 qwords the LCG xors into
;   stack       every 16th LCG value pushed before the half-way point, popped after it
;   XMM1        16 bytes loaded before (the XSAVE area), read after
;   MSRs        FS_BASE and KERNEL_GS_BASE written before, read after (KERNEL_GS_BASE through SWAPGS)
;   PIC, PIT    remapped PICs (IRQ 0 only, vector 0x20) and PIT channel 0 at 1 kHz, programmed before;
;               after the work the guest waits for 10 more ticks
; Runs ROUNDS LCG steps (x = x * 6364136223846793005 + 1442695040888963407 mod 2^64, from
; 0x0123456789abcdef), prints "snapshot: half way", writes HALF_WAY (0x40) to the debug-exit port
; (pykvm ends the run there with status 129; running the machine again goes on), runs ROUNDS more
; steps, then prints
;   "snapshot: lcg <16 hex digits> sum <16 hex digits>"
;   "snapshot: 10 ticks"
; and exits with value 0 (status 1).  An exception (no IDT gate but 0x20 and 0x27) ends in a triple
; fault; if the ticks never come the guest halts forever (run it with a timeout).

bits 64
default rel
org 0x100000

%include "lib/serial.inc"
%include "lib/pc.inc"

ROUNDS          equ 2000                ; LCG steps before, and again after, the half-way point
PUSH_EVERY      equ 16                  ; push every 16th LCG value
HALF_WAY        equ 0x40                ; debug-exit value at the half-way point
TICKS_AFTER     equ 10                  ; PIT ticks to wait for after the work
PIT_DIV_1KHZ    equ 1193                ; PIT_HZ / 1000
TICK_VECTOR     equ PIC1_VECTOR + 0     ; IRQ 0
PIC_SPURIOUS_VECTOR equ PIC1_VECTOR + 7 ; IRQ 7: the master PIC's spurious interrupt
IDT_GATES       equ PIC_SPURIOUS_VECTOR + 1
GATE_INTERRUPT  equ 0x8e00              ; present, DPL 0, 64-bit interrupt gate
MSR_FS_BASE     equ 0xc0000100
MSR_GS_BASE     equ 0xc0000101
MSR_KERNEL_GS_BASE equ 0xc0000102
FS_BASE_VALUE   equ 0x0000123456789000
KERNEL_GS_VALUE equ 0x00000fedcba98000
LCG_SEED        equ 0x0123456789abcdef
LCG_MULTIPLIER  equ 6364136223846793005
LCG_INCREMENT   equ 1442695040888963407

_start:
        mov dx, cs
        lea rdi, [idt + TICK_VECTOR * 16]
        lea rax, [tick_isr]
        call set_gate
        lea rdi, [idt + PIC_SPURIOUS_VECTOR * 16]
        lea rax, [spurious_isr]
        call set_gate
        lidt [idtr]
        call pic_init
        call pit_1khz

        mov ecx, MSR_FS_BASE
        mov eax, FS_BASE_VALUE & 0xffffffff
        mov edx, FS_BASE_VALUE >> 32
        wrmsr
        mov ecx, MSR_KERNEL_GS_BASE
        mov eax, KERNEL_GS_VALUE & 0xffffffff
        mov edx, KERNEL_GS_VALUE >> 32
        wrmsr
        movdqu xmm1, [xmm_seed]
        mov rbx, LCG_SEED
        mov r14, LCG_MULTIPLIER
        mov r15, LCG_INCREMENT
        xor r12, r12
        sti

        mov ecx, ROUNDS
.before:
        call lcg_step
        test ecx, PUSH_EVERY - 1
        jnz .no_push
        push rbx
.no_push:
        loop .before
        PRINT msg_half
        mov al, HALF_WAY
        out EXIT_PORT, al               ; the host takes its snapshot here

        mov ecx, ROUNDS
.after: call lcg_step
        loop .after
        mov ecx, ROUNDS / PUSH_EVERY
.pop:   pop rax
        xor r12, rax
        rol r12, 3
        loop .pop
        lea rsi, [table]
        mov ecx, 64
.table: lodsq
        add r12, rax
        rol r12, 5
        loop .table
        mov ecx, MSR_FS_BASE
        call read_msr
        xor r12, rax
        swapgs                          ; GS_BASE <- KERNEL_GS_BASE
        mov ecx, MSR_GS_BASE
        call read_msr
        xor r12, rax
        rol r12, 11
        movdqu [xmm_out], xmm1
        xor r12, [xmm_out]
        add r12, [xmm_out + 8]

        cli
        mov rbp, [ticks]
        add rbp, TICKS_AFTER
.wait:  cmp [ticks], rbp
        jae .done
        sti                             ; the interrupt shadow of STI covers HLT: no tick is missed
        hlt
        cli
        jmp .wait
.done:  PRINT msg_lcg
        mov rax, rbx
        mov cl, 16
        call serial_hex
        PRINT msg_sum
        mov rax, r12
        call serial_hex
        NEWLINE
        PRINT msg_ticks
        EXIT 0

; rbx = rbx * r14 + r15; the table entry rbx selects gets the new value xored in; r12 follows it.
lcg_step:
        imul rbx, r14
        add rbx, r15
        mov rax, rbx
        shr rax, 58                     ; the top 6 bits: a table index
        lea rdx, [table]
        xor [rdx + rax * 8], rbx
        add r12, rbx
        rol r12, 7
        ret

; rax = the MSR ecx names (rdx clobbered)
read_msr:
        rdmsr
        shl rdx, 32
        or rax, rdx
        ret

; An interrupt gate at rdi for the handler at rax, code selector dx (rax clobbered).
set_gate:
        mov [rdi], ax
        mov [rdi + 2], dx
        mov word [rdi + 4], GATE_INTERRUPT
        shr rax, 16
        mov [rdi + 6], ax
        shr rax, 16
        mov [rdi + 8], eax
        mov dword [rdi + 12], 0
        ret

; The PICs remapped to PIC1_VECTOR / PIC2_VECTOR, every IRQ masked but IRQ 0.
pic_init:
        mov al, 0x11                    ; ICW1: edge triggered, cascade, ICW4 follows
        out PIC1_CMD, al
        out PIC2_CMD, al
        mov al, PIC1_VECTOR             ; ICW2: vector base
        out PIC1_DATA, al
        mov al, PIC2_VECTOR
        out PIC2_DATA, al
        mov al, 1 << 2                  ; ICW3: the slave is on the master's IRQ 2 ...
        out PIC1_DATA, al
        mov al, 2                       ; ... and knows its cascade identity
        out PIC2_DATA, al
        mov al, 0x01                    ; ICW4: 8086 mode, normal EOI
        out PIC1_DATA, al
        out PIC2_DATA, al
        mov al, 0xff & ~(1 << 0)        ; OCW1: only IRQ 0
        out PIC1_DATA, al
        mov al, 0xff
        out PIC2_DATA, al
        ret

pit_1khz:
        mov al, PIT_CH0_MODE2
        out PIT_CMD, al
        mov al, PIT_DIV_1KHZ & 0xff     ; low byte, then high byte
        out PIT_CH0, al
        mov al, PIT_DIV_1KHZ >> 8
        out PIT_CH0, al
        ret

tick_isr:
        push rax
        inc qword [ticks]
        mov al, PIC_EOI
        out PIC1_CMD, al
        pop rax
        iretq

spurious_isr:
        iretq

%include "lib/serial_code.inc"

msg_half:       db "snapshot: half way", 10, 0
msg_lcg:        db "snapshot: lcg ", 0
msg_sum:        db " sum ", 0
msg_ticks:      db "snapshot: 10 ticks", 10, 0
align 16
xmm_seed:       dq 0x0f1e2d3c4b5a6978, 0x8796a5b4c3d2e1f0
xmm_out:        dq 0, 0
ticks:          dq 0
idtr:           dw IDT_GATES * 16 - 1
                dq idt
align 16
table:          times 64 dq 0
idt:            times IDT_GATES * 16 db 0
