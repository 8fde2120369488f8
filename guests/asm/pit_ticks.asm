; pit_ticks.asm - Multiboot v1 ELF32 kernel (pit_ticks.elf), entered in 32-bit protected mode.
; Proves: the legacy interrupt path: the 8259 PICs (remapped with ICW1-4 to vectors 0x20/0x28, all IRQs
; masked but IRQ 0), the 8254 PIT channel 0 in mode 2 at 100 Hz (divisor 11932) raising IRQ 0, delivery
; through the guest's own IDT to a handler for vector 0x20 that counts and sends a non-specific EOI to
; the master PIC, and HLT waking on each tick.  The local APIC is left as the firmware/VMM set it up
; (virtual wire: LINT0 in ExtINT mode, as KVM's and SeaBIOS's reset state).
; Prints, after 50 ticks (0.5 s):
;   "pit: 50 ticks"
;   "rtc seconds elapsed: <n>"      CMOS seconds after minus before, modulo 60 (informational: 0 or 1)
; then exits with value 0 (pykvm status 1).  An unexpected exception: "fault <vector> at <eip>", an
; interrupt on another vector: "unexpected interrupt <vector>"; both exit with value 0x7f.  If the ticks
; never come the guest halts forever (run it with a timeout).

bits 32
global _start
section .text

%include "lib/serial.inc"
%include "lib/pc.inc"

TICKS           equ 50

MULTIBOOT_HEADER

_start:
        mov esp, stack_top
        call pc_init
        mov edx, pit_isr
        call pic_timer_init

        call rtc_seconds
        mov ebp, eax                    ; seconds before
        mov ax, PIT_DIV_100HZ
        call pit_periodic
.wait:  cli
        cmp dword [ticks], TICKS
        jae .done
        sti                             ; the interrupt shadow of STI covers HLT: no tick is missed
        hlt
        jmp .wait
.done:  mov al, 0xff                    ; mask IRQ 0 again (interrupts stay off)
        out PIC1_DATA, al
        mov ebx, [ticks]
        call rtc_seconds
        sub eax, ebp
        jns .elapsed
        add eax, 60
.elapsed:
        PRINT msg_pit
        xchg eax, ebx
        call serial_dec
        PRINT msg_ticks
        PRINT msg_rtc
        mov eax, ebx
        call serial_dec
        NEWLINE
        EXIT 0

pit_isr:
        push eax
        inc dword [ticks]
        mov al, PIC_EOI
        out PIC1_CMD, al
        pop eax
        jmp isr_return                  ; IRET, which KVM's emulator cannot do in protected mode

%include "lib/serial_code.inc"
%include "lib/pc_code.inc"

msg_pit:        db "pit: ", 0
msg_ticks:      db " ticks", 10, 0
msg_rtc:        db "rtc seconds elapsed: ", 0

section .bss align=16
BSS_ALIGN 4
ticks:          resd 1
BSS_ALIGN 16
                resb 4096
stack_top:
