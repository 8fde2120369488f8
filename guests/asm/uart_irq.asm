; uart_irq.asm - Multiboot v1 ELF32 kernel (uart_irq.elf), entered in 32-bit protected mode.
; Proves: UART receive by interrupt through the APIC path: the ACPI MADT found by scanning for the RSDP
; (local APIC and IOAPIC addresses, IRQ 4's GSI and flags from its interrupt source override if any),
; both 8259 PICs remapped to 0x20/0x28 and fully masked, the local APIC software-enabled (SVR bit 8,
; spurious vector 0xff), every IOAPIC redirection entry masked, then IRQ 4's entry -> vector 0x24, fixed,
; physical destination = the BSP's APIC ID (from its LAPIC ID register), edge/active high unless the MADT
; says otherwise; the 16550A's IER = 1 (received data available) and MCR = OUT2|RTS|DTR (0x0b).
; Prints "uart irq ready\n", then idles in `sti; hlt`.  Each interrupt reads every byte available (while
; LSR.DR), echoes it unchanged, and sends the local APIC an EOI.  On byte 0x04 (EOT, not echoed) it prints
;   "\nuart irq done <count>\n"     count = bytes echoed, decimal
;   "interrupts: <n>\n"             interrupts taken, including the last one (n >= 1)
; and exits with value count & 0xff (pykvm status ((count & 0xff) << 1) | 1).  Input "hi\x04" prints
; "uart irq ready\nhi\nuart irq done 2\ninterrupts: <n>\n", status 5.
; No usable ACPI: "acpi: no RSDP" / "acpi: no MADT" / "acpi: no IOAPIC", exit value 3.  An unexpected
; exception or interrupt: "fault <vector> at <eip>" / "unexpected interrupt <vector>", exit value 0x7f.

bits 32
global _start
section .text

%include "lib/serial.inc"
%include "lib/pc.inc"

UART_VECTOR     equ 0x24
EOT             equ 0x04

MULTIBOOT_HEADER

_start:
        mov esp, stack_top
        call pc_init
        call acpi_init
        jc .no_acpi
        mov ax, 0xffff                  ; PICs: remapped away from the exception vectors, all masked
        call pic_init
        mov eax, PIC1_VECTOR + 7        ; their spurious IRQ 7 / 15, should one still come: ignore
        mov edx, pc_isr_iret
        call idt_set_gate
        mov eax, PIC2_VECTOR + 7
        call idt_set_gate
        mov eax, UART_VECTOR
        mov edx, uart_isr
        call idt_set_gate
        call lapic_enable
        call lapic_id
        mov edx, eax                    ; destination: this CPU
        call ioapic_mask_all
        mov ecx, COM1_IRQ
        call madt_isa_irq               ; ECX = pin, EAX = polarity/trigger bits
        or eax, UART_VECTOR
        call ioapic_set_entry           ; before IER: an edge raised by a byte already waiting is not lost
        mov dx, COM1_IER
        mov al, IER_RDA
        out dx, al
        mov dx, COM1_MCR
        mov al, MCR_DTR_RTS_OUT2
        out dx, al
        PRINT msg_ready
.idle:  sti
        hlt
        jmp .idle

.no_acpi:
        call serial_puts
        EXIT 3

uart_isr:
        pushad
        inc dword [interrupts]
.next:  mov dx, COM1_LSR
        in al, dx
        test al, LSR_DR
        jz .eoi
        mov dx, COM1_DATA
        in al, dx
        cmp al, EOT
        je .done
        call serial_putc
        inc dword [count]
        jmp .next
.eoi:   call lapic_eoi
        popad
        jmp isr_return                  ; IRET, which KVM's emulator cannot do in protected mode
.done:  PRINT msg_done
        mov eax, [count]
        call serial_dec
        NEWLINE
        PRINT msg_interrupts
        mov eax, [interrupts]
        call serial_dec
        NEWLINE
        mov ebx, [count]
        EXIT bl

%include "lib/serial_code.inc"
%include "lib/pc_code.inc"
%include "lib/acpi_code.inc"

msg_ready:      db "uart irq ready", 10, 0
msg_done:       db 10, "uart irq done ", 0
msg_interrupts: db "interrupts: ", 0

section .bss align=16
BSS_ALIGN 4
count:          resd 1
interrupts:     resd 1
BSS_ALIGN 16
                resb 4096
stack_top:
