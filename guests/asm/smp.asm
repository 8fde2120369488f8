; smp.asm - Multiboot v1 ELF32 kernel (smp.elf), entered in 32-bit protected mode on the BSP.
; Proves: CPU discovery through ACPI (RSDP found by scanning the EBDA's first KiB and 0xe0000-0xfffff,
; RSDT or XSDT, MADT: enabled local APICs, the IOAPIC, IRQ 0's interrupt source override), starting
; every other listed CPU with INIT, SIPI, SIPI through the local APIC's ICR into a real-mode trampoline
; copied to 0x8000 (SIPI vector 0x08) that enters protected mode, shared memory between CPUs (`lock inc`,
; a spinlock around every printed line, `lock xadd` for the APs' stacks), and the PIT's IRQ 0 routed
; through the IOAPIC pin its override names, as vector 0x30, to the BSP.
; Prints:
;   "cpus: <n>"                     enabled local APICs in the MADT, then one line per CPU, in MADT order:
;   "cpu <apic id>"                 decimal
;   "ap <apic id> up"               from each AP once it has done its 1000 increments (any order)
;   "ticks: 10"                     after 10 PIT interrupts at 100 Hz through the IOAPIC
;   "counter: <total>"              the shared counter: 1000 per CPU, <n> * 1000 expected
; then exits with value 0 if counter == (started APs + 1) * 1000 (= n * 1000), else 1.  The BSP waits for
; the APs while the CMOS seconds change fewer than 5 times (4-5 s): then "smp: timeout: <a> of <s> APs
; up" and exit value 2.  No usable ACPI: "acpi: no RSDP" / "acpi: no MADT" / "acpi: no IOAPIC", exit
; value 3.  An unexpected exception or interrupt: "fault <vector> at <eip>" / "unexpected interrupt
; <vector>", exit value 0x7f.  If the PIT ticks never come the BSP halts forever (use a timeout).

bits 32
global _start
section .text

%include "lib/serial.inc"
%include "lib/pc.inc"

TRAMPOLINE      equ 0x8000              ; below 1 MiB, 4 KiB aligned, free under QEMU's and pykvm's loaders
SIPI_VECTOR     equ TRAMPOLINE >> 12
TIMER_VECTOR    equ 0x30
INCREMENTS      equ 1000
TICKS           equ 10
AP_STACK_SIZE   equ 512
IPI_DELAY       equ 200                 ; port 0x80 reads after INIT and after each SIPI
WAIT_SECONDS    equ 5                   ; RTC second changes the BSP waits for the APs

MULTIBOOT_HEADER

_start:
        mov esp, stack_top
        call pc_init
        call acpi_init
        jc .no_acpi
        PRINT msg_cpus
        mov eax, [madt_cpu_count]
        call serial_dec
        NEWLINE
        xor ebx, ebx
.list:  cmp ebx, [madt_cpu_count]
        jae .listed
        PRINT msg_cpu
        movzx eax, byte [madt_cpu_ids + ebx]
        call serial_dec
        NEWLINE
        inc ebx
        jmp .list
.listed:
        mov ax, 0xffff                  ; PICs: remapped away from the exception vectors, all masked
        call pic_init
        mov eax, PIC1_VECTOR + 7        ; their spurious IRQ 7 / 15, should one still come: ignore
        mov edx, pc_isr_iret
        call idt_set_gate
        mov eax, PIC2_VECTOR + 7
        call idt_set_gate
        call lapic_enable
        call lapic_id
        mov [bsp_id], eax
        call ioapic_mask_all

        mov esi, trampoline
        mov edi, TRAMPOLINE
        mov ecx, trampoline_end - trampoline
        rep movsb
        mov dword [ap_stack_next], ap_stacks + AP_STACK_SIZE
        xor ebx, ebx                    ; MADT index
.start: cmp ebx, [madt_cpu_count]
        jae .started
        movzx edx, byte [madt_cpu_ids + ebx]
        cmp edx, [bsp_id]
        je .next_cpu
        mov ecx, IPI_DELAY
        mov eax, ICR_INIT
        call lapic_send_ipi
        call io_delay
        mov eax, ICR_STARTUP | SIPI_VECTOR
        call lapic_send_ipi
        call io_delay
        call lapic_send_ipi             ; the second SIPI is ignored by a CPU the first one started
        inc dword [aps_started]
.next_cpu:
        inc ebx
        jmp .start
.started:
        mov ecx, INCREMENTS             ; the BSP's share, while the APs do theirs
.inc:   lock inc dword [counter]
        dec ecx
        jnz .inc

        call rtc_seconds
        mov ebp, eax                    ; last seconds value seen
        xor edi, edi                    ; changes seen
.wait:  mov eax, [arrived]
        cmp eax, [aps_started]
        jae .arrived
        pause
        call rtc_seconds                ; port I/O: the spin is paced by exits, not by CPU speed
        cmp eax, ebp
        je .wait
        mov ebp, eax
        inc edi
        cmp edi, WAIT_SECONDS
        jb .wait
        call print_lock
        PRINT msg_timeout
        mov eax, [arrived]
        call serial_dec
        PRINT msg_of
        mov eax, [aps_started]
        call serial_dec
        PRINT msg_aps_up
        call print_unlock
        EXIT 2

.arrived:
        mov eax, TIMER_VECTOR
        mov edx, timer_isr
        call idt_set_gate
        mov ecx, 0                      ; ISA IRQ 0 -> its IOAPIC pin (2 on a PC: override to GSI 2)
        call madt_isa_irq
        mov [timer_pin], ecx
        or eax, TIMER_VECTOR
        mov edx, [bsp_id]
        call ioapic_set_entry
        mov ax, PIT_DIV_100HZ
        call pit_periodic
.tick:  cli
        cmp dword [ticks], TICKS
        jae .ticked
        sti                             ; the interrupt shadow of STI covers HLT: no tick is missed
        hlt
        jmp .tick
.ticked:
        mov ecx, [timer_pin]
        mov eax, REDIR_MASKED
        call ioapic_set_entry

        call print_lock
        PRINT msg_ticks
        mov eax, [ticks]
        call serial_dec
        NEWLINE
        PRINT msg_counter
        mov eax, [counter]
        call serial_dec
        NEWLINE
        call print_unlock
        mov ebx, [aps_started]
        inc ebx
        imul ebx, ebx, INCREMENTS
        cmp [counter], ebx
        jne .wrong
        EXIT 0
.wrong: EXIT 1

.no_acpi:
        call serial_puts
        EXIT 3

timer_isr:
        inc dword [ticks]
        call lapic_eoi
        jmp isr_return                  ; IRET, which KVM's emulator cannot do in protected mode

; ---- the APs ---------------------------------------------------------------------------------------
; trampoline: copied to TRAMPOLINE; a SIPI with vector TRAMPOLINE >> 12 starts the AP here in real mode
; at CS:IP = 0x0800:0000.  It loads the kernel's GDT and jumps to ap_main in protected mode.
bits 16
trampoline:
        cli
        o32 lgdt [cs:tramp_gdtr - trampoline]
        mov eax, cr0
        or al, 1                        ; PE
        mov cr0, eax
        jmp dword KCODE:ap_main
align 4
tramp_gdtr:
        dw pc_gdt_end - pc_gdt - 1
        dd pc_gdt
trampoline_end:
bits 32

ap_main:
        mov ax, KDATA
        mov ds, ax
        mov es, ax
        mov fs, ax
        mov gs, ax
        mov ss, ax
        mov eax, AP_STACK_SIZE
        lock xadd [ap_stack_next], eax  ; EAX = the top of this AP's own stack
        mov esp, eax
        lidt [pc_idtr]
        call lapic_id
        mov ebx, eax
        mov ecx, INCREMENTS
.inc:   lock inc dword [counter]
        dec ecx
        jnz .inc
        call print_lock
        PRINT msg_ap
        mov eax, ebx
        call serial_dec
        PRINT msg_up
        call print_unlock
        lock inc dword [arrived]
.halt:  cli
        hlt
        jmp .halt

; print_lock / print_unlock: the spinlock around each printed line once the APs run.
print_lock:
        push eax
.try:   mov eax, 1
        xchg eax, [print_lock_word]     ; locked by definition
        test eax, eax
        jz .held
.spin:  pause
        cmp dword [print_lock_word], 0
        jne .spin
        jmp .try
.held:  pop eax
        ret

print_unlock:
        mov dword [print_lock_word], 0
        ret

%include "lib/serial_code.inc"
%include "lib/pc_code.inc"
%include "lib/acpi_code.inc"

msg_cpus:       db "cpus: ", 0
msg_cpu:        db "cpu ", 0
msg_ap:         db "ap ", 0
msg_up:         db " up", 10, 0
msg_ticks:      db "ticks: ", 0
msg_counter:    db "counter: ", 0
msg_timeout:    db "smp: timeout: ", 0
msg_of:         db " of ", 0
msg_aps_up:     db " APs up", 10, 0

section .bss align=16
BSS_ALIGN 4
counter:        resd 1
arrived:        resd 1
aps_started:    resd 1
ap_stack_next:  resd 1
print_lock_word: resd 1
bsp_id:         resd 1
ticks:          resd 1
timer_pin:      resd 1
BSS_ALIGN 16
ap_stacks:      resb MAX_CPUS * AP_STACK_SIZE
                resb 4096
stack_top:
