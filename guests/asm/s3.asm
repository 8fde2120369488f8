; s3.asm - Multiboot v1 ELF32 kernel (s3.elf), entered in 32-bit protected mode.
; Proves: ACPI S3 suspend and resume as an OS does it.  The FADT found through the RSDT/XSDT gives the
; PM1a event and control blocks, the FACS and the DSDT; the DSDT's \_S3_ package gives SLP_TYPa.  The
; guest copies a real-mode wake routine to 0x8000 and writes its entry, 0x8008, into the FACS's
; firmware waking vector; clears WAK_STS; remaps the 8259 PICs to 0x20/0x28, all masked; and, when its
; command line's first argument is "alarm", makes the RTC alarm a wake event (CMOS alarm registers all
; "don't care": the next update; register C read to clear it; AIE in register B; RTC_EN in PM1_EN).
; Then it writes SLP_TYPa << 10 | SLP_EN to PM1a_CNT: the machine must stop before the next instruction.
; On the wake the routine records CS, IP, FLAGS, DS, SS and CR0 as it found them, enters protected mode
; with the kernel's GDT, and the kernel reports what the wake left (what it needs after the wake, it
; keeps in the wake block: QEMU's reset on a wake rewrites an ELF kernel's loaded segments):
;   "s3: _S3_ type <SLP_TYPa decimal>, waking vector <8 hex>"
;   "s3: suspending, waking on the rtc alarm" | "s3: suspending until woken"
;   "s3: woken at <cs 4 hex>:<ip 4 hex>, cr0.pe=<0|1>, if=<0|1>, ds=<4 hex>, ss=<4 hex>"
;   "s3: pm1_sts wak=<0|1> rtc=<0|1>"            WAK_STS and RTC_STS, then cleared (write 1)
;   "s3: rtc c=<2 hex>"                          CMOS register C (AF 0x20 | IRQF 0x80 after the alarm)
;   "s3: irq 8 pending=<0|1>"                    bit 0 of the slave PIC's IRR (OCW3): the RTC's edge
;   "s3: irq 8 delivered"                        alarm only: IRQ 8 unmasked, taken at vector 0x28
;                                                (or "s3: irq 8 not delivered": not within 1000 port-0x80
;                                                reads with interrupts on)
;   "s3: resumed"
; then exits with value 0 (pykvm status 1).  Run past the S3 write: "s3: ran past the suspend", exit
; value 2.  No \_S3_ in the DSDT: "s3: no \_S3_", no FADT: "s3: no FADT", exit value 5.  No usable
; ACPI: "acpi: no RSDP" / "acpi: no MADT" / "acpi: no IOAPIC", exit value 3.  An unexpected exception or
; interrupt: "fault <vector> at <eip>" / "unexpected interrupt <vector>", exit value 0x7f.  Nothing wakes the machine without the alarm but the VMM (pykvm: Machine.wake(); QEMU:
; system_wakeup in the monitor).

bits 32
global _start
section .text

%include "lib/serial.inc"
%include "lib/pc.inc"

WAKE_BLOCK      equ 0x8000              ; below 1 MiB, free under QEMU's and pykvm's loaders
%define WAKE(label) (WAKE_BLOCK + (label) - wake_block)  ; a label of the wake block, where it was copied
WAKE_VECTOR     equ WAKE(wake_entry)
MB_INFO_FLAGS   equ 0                   ; multiboot information structure
MB_INFO_CMDLINE equ 16
MB_FLAG_CMDLINE equ 1 << 2
FADT_FIRMWARE_CTRL equ 36               ; the FACS
FADT_DSDT       equ 40
FADT_PM1A_EVT   equ 56
FADT_PM1A_CNT   equ 64
FACS_WAKING_VECTOR equ 12
PM1_EN          equ 2                   ; offset in the PM1a event block, after PM1_STS
RTC_STS         equ 1 << 10
WAK_STS         equ 1 << 15
RTC_EN          equ 1 << 10
SLP_TYP_SHIFT   equ 10
SLP_TYP_MASK    equ 7 << SLP_TYP_SHIFT
SLP_EN          equ 1 << 13
AML_PACKAGE     equ 0x12
AML_BYTE_PREFIX equ 0x0a
AML_ONE         equ 0x01                ; ZeroOp is 0x00
RTC_SECONDS_ALARM equ 0x01
RTC_MINUTES_ALARM equ 0x03
RTC_HOURS_ALARM equ 0x05
RTC_STATUS_C    equ 0x0c
STATUS_B_AIE    equ 0x20
ALARM_DONT_CARE equ 0xc0
PIC_READ_IRR    equ 0x0a                ; OCW3: the next read of the command port gives the IRR
RTC_VECTOR      equ PIC2_VECTOR + 0     ; IRQ 8
CR0_PE          equ 1
FLAGS_IF        equ 1 << 9
IRQ_POLLS       equ 1000

MULTIBOOT_HEADER

_start:
        mov esp, stack_top
        mov [mb_info], ebx
        call pc_init
        call acpi_init
        jc .no_acpi
        mov eax, 'FACP'
        call acpi_find_table
        jc .no_fadt
        mov eax, [esi + FADT_PM1A_EVT]
        mov [pm1a_evt], eax
        mov eax, [esi + FADT_PM1A_CNT]
        mov [pm1a_cnt], eax
        mov eax, [esi + FADT_FIRMWARE_CTRL]
        mov [facs], eax
        mov esi, [esi + FADT_DSDT]
        call find_s3
        jc .no_s3
        mov [slp_typ], eax
        PRINT msg_s3_type
        call serial_dec
        PRINT msg_vector
        mov eax, WAKE_VECTOR
        mov cl, 8
        call serial_hex
        NEWLINE

        mov ax, 0xffff                  ; PICs remapped, all masked: IRQ 8 stays in the IRR
        call pic_init
        mov esi, wake_block
        mov edi, WAKE_BLOCK
        mov ecx, wake_block_end - wake_block
        rep movsb
        mov eax, [facs]
        mov dword [eax + FACS_WAKING_VECTOR], WAKE_VECTOR
        mov edx, [pm1a_evt]
        mov [WAKE(wake_pm1a_evt)], edx
        mov ax, WAK_STS | RTC_STS       ; write 1 to clear
        out dx, ax
        call wants_alarm
        setc [WAKE(wake_alarm)]
        jnc .no_alarm
        call set_alarm
        PRINT msg_alarm
        jmp .suspend
.no_alarm:
        PRINT msg_until_woken
.suspend:
        mov edx, [pm1a_cnt]
        in ax, dx
        and ax, ~SLP_TYP_MASK
        mov ecx, [slp_typ]
        shl ecx, SLP_TYP_SHIFT
        or ax, cx
        or ax, SLP_EN
        out dx, ax
        mov byte [WAKE(wake_ran_past)], 1  ; S3 stops the machine before this instruction
        PRINT msg_ran_past
        EXIT 2

.no_acpi:
        call serial_puts
        EXIT 3
.no_fadt:
        PRINT msg_no_fadt
        EXIT 5
.no_s3:
        PRINT msg_no_s3
        EXIT 5

; ---- after the wake, in protected mode again ----------------------------------------------------------
resumed:
        mov ax, KDATA
        mov ds, ax
        mov es, ax
        mov fs, ax
        mov gs, ax
        mov ss, ax
        mov esp, stack_top
        call pc_init                    ; the IDTR was reset too
        cmp byte [WAKE(wake_ran_past)], 0
        je .report
        PRINT msg_ran_past
        EXIT 2
.report:
        PRINT msg_woken
        movzx eax, word [WAKE(saved_cs)]
        mov cl, 4
        call serial_hex
        mov al, ':'
        call serial_putc
        movzx eax, word [WAKE(saved_ip)]
        sub eax, wake_ip - wake_entry   ; the IP recorded at wake_ip, back to the entry's
        call serial_hex
        PRINT msg_pe
        mov eax, [WAKE(saved_cr0)]
        and eax, CR0_PE
        call serial_dec
        PRINT msg_if
        xor eax, eax
        test word [WAKE(saved_flags)], FLAGS_IF
        setnz al
        call serial_dec
        PRINT msg_ds
        movzx eax, word [WAKE(saved_ds)]
        call serial_hex
        PRINT msg_ss
        movzx eax, word [WAKE(saved_ss)]
        call serial_hex
        NEWLINE

        PRINT msg_wak
        mov edx, [WAKE(wake_pm1a_evt)]
        in ax, dx
        mov bx, ax
        xor eax, eax
        test bx, WAK_STS
        setnz al
        call serial_dec
        PRINT msg_rtc_sts
        test bx, RTC_STS
        setnz al
        call serial_dec
        NEWLINE
        mov ax, WAK_STS | RTC_STS
        out dx, ax

        PRINT msg_rtc_c
        mov al, RTC_STATUS_C
        out CMOS_INDEX, al
        in al, CMOS_DATA
        movzx eax, al
        mov cl, 2
        call serial_hex
        NEWLINE

        PRINT msg_pending
        mov al, PIC_READ_IRR
        out PIC2_CMD, al
        in al, PIC2_CMD
        and eax, 1                      ; IRQ 8
        call serial_dec
        NEWLINE

        cmp byte [WAKE(wake_alarm)], 0
        je .done
        mov eax, RTC_VECTOR
        mov edx, rtc_isr
        call idt_set_gate
        mov eax, PIC1_VECTOR + 7        ; the PICs' spurious IRQ 7 / 15, should one come: ignore
        mov edx, pc_isr_iret
        call idt_set_gate
        mov eax, PIC2_VECTOR + 7
        call idt_set_gate
        mov al, 0xff & ~(1 << 2)        ; master: the cascade only
        out PIC1_DATA, al
        mov al, 0xff & ~(1 << 0)        ; slave: IRQ 8 only
        out PIC2_DATA, al
        mov ecx, IRQ_POLLS
.poll:  sti
        in al, POST_PORT                ; an exit: the pending interrupt comes at the latest here
        cli
        cmp dword [rtc_irqs], 0
        jne .delivered
        dec ecx
        jnz .poll
        PRINT msg_not_delivered
        jmp .done
.delivered:
        PRINT msg_delivered
.done:  PRINT msg_resumed
        EXIT 0

rtc_isr:
        push eax
        inc dword [rtc_irqs]
        mov al, RTC_STATUS_C            ; acknowledge the RTC
        out CMOS_INDEX, al
        in al, CMOS_DATA
        mov al, PIC_EOI
        out PIC2_CMD, al
        out PIC1_CMD, al
        pop eax
        jmp isr_return                  ; IRET, which KVM's emulator cannot do in protected mode

; find_s3: ESI = the DSDT -> EAX = SLP_TYPa of its \_S3_ package (CF clear), or CF set.
find_s3:
        push ecx
        push edx
        mov ecx, [esi + 4]              ; the table's length
        lea edx, [esi + ecx - 9]        ; the last place a name and its package's first element fit
        add esi, 36                     ; the AML after the header
.scan:  cmp esi, edx
        ja .none
        cmp dword [esi], '_S3_'
        je .found
        inc esi
        jmp .scan
.found: cmp byte [esi + 4], AML_PACKAGE ; PackageOp, PkgLength, NumElements, then SLP_TYPa
        jne .none
        movzx eax, byte [esi + 7]
        cmp al, AML_BYTE_PREFIX
        jne .op
        movzx eax, byte [esi + 8]
        jmp .ok
.op:    cmp al, AML_ONE                 ; ZeroOp or OneOp
        ja .none
.ok:    pop edx
        pop ecx
        clc
        ret
.none:  pop edx
        pop ecx
        stc
        ret

; wants_alarm: CF set when the command line's first argument is "alarm".
wants_alarm:
        push esi
        mov esi, [mb_info]
        test dword [esi + MB_INFO_FLAGS], MB_FLAG_CMDLINE
        jz .no
        mov esi, [esi + MB_INFO_CMDLINE]
.image: lodsb                           ; skip the image's name
        test al, al
        jz .no
        cmp al, ' '
        jne .image
.blank: lodsb
        cmp al, ' '
        je .blank
        cmp dword [esi - 1], 'alar'
        jne .no
        cmp byte [esi + 3], 'm'
        jne .no
        mov al, [esi + 4]
        test al, al
        jz .yes
        cmp al, ' '
        je .yes
.no:    pop esi
        clc
        ret
.yes:   pop esi
        stc
        ret

; set_alarm: the RTC alarm at its next update, as a wake event.
set_alarm:
        push eax
        push edx
        mov al, RTC_STATUS_C            ; clear stale flags
        out CMOS_INDEX, al
        in al, CMOS_DATA
        mov al, RTC_SECONDS_ALARM
        call .dont_care
        mov al, RTC_MINUTES_ALARM
        call .dont_care
        mov al, RTC_HOURS_ALARM
        call .dont_care
        mov al, RTC_STATUS_B
        out CMOS_INDEX, al
        in al, CMOS_DATA
        or al, STATUS_B_AIE
        mov ah, al
        mov al, RTC_STATUS_B
        out CMOS_INDEX, al
        mov al, ah
        out CMOS_DATA, al
        mov edx, [pm1a_evt]
        add edx, PM1_EN
        mov ax, RTC_EN
        out dx, ax
        pop edx
        pop eax
        ret
.dont_care:
        out CMOS_INDEX, al
        mov al, ALARM_DONT_CARE
        out CMOS_DATA, al
        ret

; ---- the wake routine: copied to WAKE_BLOCK, entered in real mode at WAKE_VECTOR ------------------------
; It records what it finds (into its own block, through CS) before it changes anything, on a stack of
; its own, then enters protected mode with the kernel's GDT and jumps to `resumed`.
bits 16
wake_block:
wake_gdtr:
        dw pc_gdt_end - pc_gdt - 1
        dd pc_gdt
        dw 0                            ; the entry is 8 bytes in: the waking vector's low nibble is 8
wake_entry:
        mov [cs:saved_cs - wake_block], cs
        mov [cs:saved_ds - wake_block], ds
        mov [cs:saved_ss - wake_block], ss
        mov ax, cs
        mov ss, ax
        mov sp, wake_stack_top - wake_block
        pushf
        pop word [cs:saved_flags - wake_block]
        call wake_ip
wake_ip:
        pop word [cs:saved_ip - wake_block]
        mov eax, cr0
        mov [cs:saved_cr0 - wake_block], eax
        cli
        o32 lgdt [cs:wake_gdtr - wake_block]
        or al, CR0_PE
        mov cr0, eax
        jmp dword KCODE:resumed
align 4
saved_cr0:      dd 0
saved_cs:       dw 0
saved_ip:       dw 0
saved_flags:    dw 0
saved_ds:       dw 0
saved_ss:       dw 0
; what the kernel keeps for after the wake, here rather than in its own sections: QEMU's reset on a
; wake writes an ELF kernel's loaded segments (.bss included) back as they were loaded
wake_pm1a_evt:  dd 0
wake_alarm:     db 0                    ; 1: the RTC alarm wakes the machine
wake_ran_past:  db 0                    ; 1: an instruction after the S3 write ran
align 4
                times 64 db 0
wake_stack_top:
wake_block_end:
bits 32

%include "lib/serial_code.inc"
%include "lib/pc_code.inc"
%include "lib/acpi_code.inc"

msg_s3_type:    db "s3: _S3_ type ", 0
msg_vector:     db ", waking vector ", 0
msg_alarm:      db "s3: suspending, waking on the rtc alarm", 10, 0
msg_until_woken: db "s3: suspending until woken", 10, 0
msg_ran_past:   db "s3: ran past the suspend", 10, 0
msg_woken:      db "s3: woken at ", 0
msg_pe:         db ", cr0.pe=", 0
msg_if:         db ", if=", 0
msg_ds:         db ", ds=", 0
msg_ss:         db ", ss=", 0
msg_wak:        db "s3: pm1_sts wak=", 0
msg_rtc_sts:    db " rtc=", 0
msg_rtc_c:      db "s3: rtc c=", 0
msg_pending:    db "s3: irq 8 pending=", 0
msg_delivered:  db "s3: irq 8 delivered", 10, 0
msg_not_delivered: db "s3: irq 8 not delivered", 10, 0
msg_resumed:    db "s3: resumed", 10, 0
msg_no_fadt:    db "s3: no FADT", 10, 0
msg_no_s3:      db "s3: no \_S3_", 10, 0

section .bss align=16
BSS_ALIGN 4
mb_info:        resd 1
pm1a_evt:       resd 1
pm1a_cnt:       resd 1
facs:           resd 1
slp_typ:        resd 1
rtc_irqs:       resd 1
BSS_ALIGN 16
                resb 4096
stack_top:
