; bench_idle.asm - the idle guest of the consolidation benchmark (bench_idle.bin; bench/bench_density.py).
; A multiboot kernel (flag bit 16, the a.out kludge: loaded at 0x100000 as it is), so that pykvm and QEMU
; (-kernel) boot the same file; entered in 32-bit protected mode.  It loads a GDT and an IDT whose 256 gates
; all lead to one handler (EOI to both 8259s and the LAPIC, then back), writes one byte into every 4 KiB
; page of `touch` MiB from 4 MiB up (a guest that has used some memory: the same bytes in every guest),
; prints "bench_idle: ready\n" on COM1 and then idles: `hlt` with interrupts enabled, for ever.  Under an
; in-kernel irqchip the halted vCPU waits in the kernel and costs the VMM nothing until an interrupt.
;
; Parameter block (file offset 32; the benchmark patches a copy):
;   32  touch   dword  MiB to touch from 4 MiB up (at most 56: the end of 64 MiB of RAM)
; Interrupt return: `iret` in 32-bit protected mode cannot be emulated on the nested kvm_pvm backend
; (PLATFORM.md), so the handler restores EFLAGS with popfd and returns with `ret 8`.

bits 32
org 0x100000

%include "lib/multiboot_aout.inc"
%include "lib/serial.inc"

TOUCH_BASE      equ 4 << 20
TOUCH_MAX_MIB   equ 56
PAGE            equ 4096
CODE_SEL        equ 0x08
DATA_SEL        equ 0x10
GATE_INTERRUPT  equ 0x8e                ; present, DPL0, 32-bit interrupt gate
PIC1_CMD        equ 0x20
PIC2_CMD        equ 0xa0
PIC_EOI         equ 0x20
LAPIC_EOI       equ 0xfee000b0

        MULTIBOOT_AOUT_HEADER start

p_touch:        dd 0                    ; 32

start:
        mov esp, stack_top
        lgdt [gdt_ptr]
        jmp CODE_SEL:.flat
.flat:  mov ax, DATA_SEL
        mov ds, ax
        mov es, ax
        mov ss, ax

        mov edi, idt                    ; 256 gates, every one to `interrupt`
        mov ecx, 256
.gate:  mov eax, interrupt
        mov [edi], ax
        mov word [edi + 2], CODE_SEL
        mov byte [edi + 4], 0
        mov byte [edi + 5], GATE_INTERRUPT
        shr eax, 16
        mov [edi + 6], ax
        add edi, 8
        dec ecx
        jnz .gate
        lidt [idt_ptr]

        mov ecx, [p_touch]
        cmp ecx, TOUCH_MAX_MIB
        jbe .touch_ok
        mov ecx, TOUCH_MAX_MIB
.touch_ok:
        shl ecx, 20 - 12                ; pages
        mov edi, TOUCH_BASE
        jecxz .touched
.touch: mov byte [edi], 1
        add edi, PAGE
        dec ecx
        jnz .touch
.touched:
        PRINT msg_ready
        sti
.idle:  hlt
        jmp .idle

interrupt:
        push eax
        mov al, PIC_EOI
        out PIC2_CMD, al
        out PIC1_CMD, al
        mov dword [LAPIC_EOI], 0
        pop eax
        push dword [esp + 8]            ; the interrupted EFLAGS (above EIP and CS)
        popfd
        ret 8                           ; EIP, then drop CS and EFLAGS

%include "lib/serial_code.inc"

align 8
gdt:
        dq 0
        dq 0x00cf9b000000ffff           ; 0x08 code, 32-bit, flat
        dq 0x00cf93000000ffff           ; 0x10 data, flat
gdt_end:
gdt_ptr:
        dw gdt_end - gdt - 1
        dd gdt
idt_ptr:
        dw 256 * 8 - 1
        dd idt

msg_ready:      db "bench_idle: ready", 10, 0
load_end:

section .bss align=16
idt:            resb 256 * 8
                resb 4096
stack_top:
bss_end:
