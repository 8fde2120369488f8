; dirty_rate.asm - Multiboot v1 kernel as a flat binary (dirty_rate.bin: a.out kludge header, loaded at
; 0x100000), entered in 32-bit protected mode, so that pykvm and `qemu-system-x86_64 -kernel` run the same
; guest.  Needs the 8259 PICs and the PIT (pykvm's in-kernel irqchip; QEMU: microvm,pic=on,pit=on).
; Made for migration tests and benchmarks: it writes memory at a set rate at CPL3 (native speed on every
; host), prints lines paced by the PIT, takes the UART's input, and checks that every page it wrote still
; holds what it wrote last, so that a machine moved anywhere in between must carry its RAM, CPU, PICs, PIT
; and UART exactly for the output to be right.
;
; It switches to long mode itself (PAE page tables, EFER.LME, CR0.PG, a 64-bit code segment), then builds
; its CPL3 kernel (lib/cpl3.inc), turns its local APIC off (IA32_APIC_BASE bit 11: the 8259 then interrupts
; the CPU directly), remaps the PICs, starts the PIT at 1 kHz, enables the UART's received-data interrupt
; and drops to CPL3 with interrupts on.
;
; Parameters: three qwords at PARAMS (0x100020, file offset 0x20), zero unless the host patches the image
; or writes guest memory before the first run:
;   PARAMS + 0    pages to write per second (0: none: an idle guest; 2560 = 10 MiB/s)
;   PARAMS + 8    pages in the area written, from AREA (0x400000) up (0: none); at most 1020 MiB of pages
;   PARAMS + 16   ticks between two printed lines (0: 100)
; At CPL3 it writes the area page by page, in passes: the qword at offset 0 of each page gets the number
; of the pass (1, 2, ...), after checking that the page held the previous pass's (0 before the first), so
; a page the guest finds changed counts as an error.  It writes no more pages than the rate allows for the
; PIT ticks so far, and after a pause (a throttled guest) catches up at most one tick's worth (rounded
; up); with nothing to write it waits
; for the next interrupt (`int3` into a CPL0 handler that does `sti; hlt`).
;
; Prints, from the tick handler, every PARAMS + 16 ticks:
;     line <n decimal>\n
; The UART handler takes every received byte: EOT (0x04) ends the run, any other byte is counted and
; folded into a sum (sum = sum * 31 + byte, mod 2^64), as counter.bin does.  After EOT it checks every page
; of the area once more (those before its position hold the current pass, the others the previous one)
; and prints
;     done lines <n> passes <current pass> pages <pages written> input <bytes> sum <16 hex> errors <e>\n
; then exits with value 0 (pykvm status 1) when no page was ever found changed, else 1 (status 3).
; An unexpected #UD, #DF, #GP or #PF: "fault <vector>\n", exit value 0x7f (status 255).

bits 64                                 ; the includes' register names are the 64-bit code's
org 0x100000

%include "lib/serial.inc"
%include "lib/pc.inc"
%include "lib/cpl3.inc"

MB_AOUT_KLUDGE  equ 1 << 16
MB_FLAGS        equ MB_AOUT_KLUDGE
AREA            equ 0x400000
DEFAULT_LINE_TICKS equ 100
TICKS_PER_SECOND equ 1000
EOT             equ 0x04
USER_RFLAGS_IF  equ USER_RFLAGS | 0x200
CR4_PAE         equ 1 << 5
CR0_PE_PG       equ 0x80000001
MSR_EFER        equ 0xc0000080
EFER_LME        equ 1 << 8
MSR_APIC_BASE   equ 0x1b
APIC_GLOBAL_ENABLE equ 1 << 11
PAGE_PRESENT_RW equ 0x03
WAIT_FOR_IRQ    equ 0                   ; what the CPL3 code asks of the #BP handler, in EAX
FINISH          equ 1

bits 32
image_start:
mb_header:                              ; the multiboot header, with the a.out kludge addresses
        dd MB_HEADER_MAGIC
        dd MB_FLAGS
        dd -(MB_HEADER_MAGIC + MB_FLAGS)
        dd mb_header                    ; header_addr
        dd image_start                  ; load_addr: the file from its first byte
        dd load_end                     ; load_end_addr
        dd bss_end                      ; bss_end_addr
        dd _start                       ; entry_addr
params:
pages_per_second: dq 0
area_pages:     dq 0
line_ticks:     dq 0

; ---- 32-bit protected mode: into long mode -------------------------------------------------------------
_start:
        mov dword [boot_pml4], boot_pdpt + PAGE_PRESENT_RW  ; the low 2 MiB identity mapped, in tables
        mov dword [boot_pdpt], boot_pd + PAGE_PRESENT_RW    ; of its own (CPL3_INIT rebuilds its tables)
        mov dword [boot_pd], PAGE_PRESENT_RW | PAGE_HUGE
        mov eax, cr4
        or eax, CR4_PAE
        mov cr4, eax
        mov eax, boot_pml4
        mov cr3, eax
        mov ecx, MSR_EFER
        rdmsr
        or eax, EFER_LME
        wrmsr
        mov eax, cr0
        or eax, CR0_PE_PG               ; paging with EFER.LME: long mode (compatibility mode until the jump)
        mov cr0, eax
        lgdt [gdt_ptr]                  ; lib/cpl3.inc's GDT: 0x08 is 64-bit kernel code
        jmp KERNEL_CS:long_mode

; ---- 64-bit CPL0: the kernel ------------------------------------------------------------------------------
bits 64
default rel

long_mode:
        CPL3_INIT
        lea rsi, [idt]                  ; lib/cpl3.inc's gates, and the interrupts' after them
        lea rdi, [irq_idt]
        mov ecx, (idt_end - idt) / 8
        rep movsq
        mov rax, [line_ticks]
        test rax, rax
        jnz .lines
        mov eax, DEFAULT_LINE_TICKS
        mov [line_ticks], rax
.lines: mov [line_countdown], rax
        mov ecx, MSR_APIC_BASE          ; the 8259 drives the CPU's INTR directly: the local APIC off, as
        rdmsr                           ; on a PC without one (a reset one may mask the PIC's LINT0)
        and eax, ~APIC_GLOBAL_ENABLE
        wrmsr
        lea rdi, [irq_idt]
        mov dx, KERNEL_CS
        call irq_init
        lidt [irq_idtr]
        push USER_DS                    ; to CPL3, interrupts on
        lea rax, [user_stack_top]
        push rax
        push USER_RFLAGS_IF
        push USER_CS
        lea rax, [user_main]
        push rax
        iretq

; ---- CPL3: the writer ---------------------------------------------------------------------------------------
; RBX = position (page index in the area), R12 = AREA, R13 = area pages, R14 = pages per second,
; R15 = pass, RBP = the pace's count of pages written, R11 = pages written, R10 = the most pages caught up
; on at once (a tick's worth, rounded up), R9 = ticks per second.
user_main:
        mov r12, AREA
        mov r13, [area_pages]
        mov r14, [pages_per_second]
        test r13, r13
        jnz .debt
        xor r14d, r14d                  ; no area: nothing to write
.debt:  mov r9d, TICKS_PER_SECOND
        mov rax, r14
        xor edx, edx
        div r9
        lea r10, [rax + 1]
.start: xor ebx, ebx
        mov r15d, 1
        xor ebp, ebp
        xor r11d, r11d
.loop:  cmp byte [finish], 0
        jne .finish
        mov rax, [ticks]
        imul rax, r14
        xor edx, edx
        div r9                          ; pages allowed so far
        lea rcx, [rbp + r10]
        cmp rax, rcx
        jbe .paced
        mov rbp, rax                    ; far behind (paused): forget all but a tick's worth
        sub rbp, r10
.paced: cmp rbp, rax
        jae .wait
        mov rdi, rbx
        shl rdi, 12
        add rdi, r12
        lea rax, [r15 - 1]
        cmp [rdi], rax
        je .same
        inc qword [errors]
.same:  mov [rdi], r15
        inc rbp
        inc r11
        inc rbx
        cmp rbx, r13
        jb .loop
        xor ebx, ebx
        inc r15
        jmp .loop
.wait:  mov eax, WAIT_FOR_IRQ
        int3
        jmp .loop

.finish:                                ; every page once more: R15 before the position, R15 - 1 from it
        xor ecx, ecx
.check: cmp rcx, r13
        jae .report
        mov rdi, rcx
        shl rdi, 12
        add rdi, r12
        mov rax, r15
        cmp rcx, rbx
        jb .expect
        dec rax
.expect:
        cmp [rdi], rax
        je .good
        inc qword [errors]
.good:  inc rcx
        jmp .check
.report:
        mov [passes], r15
        mov [written], r11
        mov eax, FINISH
        int3
        ud2                             ; not reached: FINISH does not return

; ---- CPL0 interrupt handlers ----------------------------------------------------------------------------
bp_handler:                             ; from CPL3's int3: EAX says what it wants
        cmp eax, FINISH
        je .finish
        sti                             ; the interrupt shadow of STI covers HLT: none is missed
        hlt
        iretq
.finish:
        PRINT msg_done
        mov rax, [lines]
        call serial_dec
        PRINT msg_passes
        mov rax, [passes]
        call serial_dec
        PRINT msg_pages
        mov rax, [written]
        call serial_dec
        PRINT msg_input
        mov rax, [input_bytes]
        call serial_dec
        PRINT msg_sum
        mov rax, [input_sum]
        mov cl, 16
        call serial_hex
        PRINT msg_errors
        mov rax, [errors]
        call serial_dec
        NEWLINE
        cmp qword [errors], 0
        jne .bad
        EXIT 0
.bad:   EXIT 1

tick_isr:
        push rax
        inc qword [ticks]
        dec qword [line_countdown]
        jnz .eoi
        mov rax, [line_ticks]
        mov [line_countdown], rax
        inc qword [lines]
        PRINT msg_line
        mov rax, [lines]
        call serial_dec
        NEWLINE
.eoi:   mov al, PIC_EOI
        out PIC1_CMD, al
        pop rax
        iretq

; Takes every byte waiting in the UART (LSR.DR), then EOI.
uart_isr:
        push rax
        push rdx
.next:  call uart_read
        jc .done
        cmp al, EOT
        je .eot
        call fold_input
        jmp .next
.eot:   mov byte [finish], 1
        jmp .next
.done:  mov al, PIC_EOI
        out PIC1_CMD, al
        pop rdx
        pop rax
        iretq

spurious_isr:
        iretq

        CPL3_FAULT_HANDLERS

%include "lib/serial_code.inc"
%include "lib/long_pc_code.inc"

; ---- data ------------------------------------------------------------------------------------------------
        CPL3_TABLES bp_handler

msg_line:       db "line ", 0
msg_done:       db "done lines ", 0
msg_passes:     db " passes ", 0
msg_pages:      db " pages ", 0
msg_input:      db " input ", 0
msg_sum:        db " sum ", 0
msg_errors:     db " errors ", 0
        CPL3_STRINGS
align 8
ticks:          dq 0
line_countdown: dq 0
lines:          dq 0
input_bytes:    dq 0
input_sum:      dq 0
errors:         dq 0
passes:         dq 0
written:        dq 0
finish:         db 0
irq_idtr:       dw IRQ_IDT_GATES * 16 - 1
                dq irq_idt
load_end:

; ---- zero-initialised memory after the image -------------------------------------------------------------
        CPL3_BSS
boot_pml4:      resb 4096
boot_pdpt:      resb 4096
boot_pd:        resb 4096
irq_idt:        resb IRQ_IDT_GATES * 16
bss_end:
