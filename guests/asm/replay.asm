; replay.asm - 64-bit long-mode flat binary (replay.bin), loaded at 0x100000, entered at CPL0.
; Needs the in-kernel irqchip and a virtio-rng (pykvm run ... --mode long --rng); uses a virtio console if
; there is one (--console virtio).
; Made for record and replay tests: everything it prints depends on a host input (the RTC's time, the
; ACPI PM timer, virtio-rng's bytes, the UART's input and the exit at which each input byte came), so a
; replay prints the same bytes only if it hands over the same inputs at the same exits.
;
; Prints, in order:
;     replay: rtc <yy>-<mm>-<dd> <hh>:<mm>:<ss>\n     CMOS registers 9, 8, 7, 4, 2, 0 (BCD, as hex)
;     replay: pm timer <8 hex digits>\n               a 32-bit read of the PM timer (port 0x608)
;     replay: random <32 hex digits>\n                16 bytes from virtio-rng, in memory order
;     replay: ready\n
; then, for each byte received on COM1 (polled) until 0x04 (EOT, not echoed):
;     got <byte: 2 hex digits> after <n decimal> polls, pm timer <8 hex digits>\n
; where n counts the LSR reads that found no data since the previous byte (or since "ready"), and
; then, with a virtio console, "replay: console ready\n", and once the console's receiveq filled the one
; 64-byte buffer the guest gave it (with whatever host input came, spinning on the used ring meanwhile):
;     replay: console <n decimal> bytes: <the bytes as text>\n
; and last
;     replay: done <bytes decimal> bytes, sum <16 hex digits>, random <16 hex digits>\n
; with sum = sum * 31 + byte (mod 2^64) over the bytes received on COM1 and 8 more bytes from virtio-rng;
; then it exits with value 0 (status 1).  No virtio-rng: "replay: no rng\n", exit value 2 (status 5); a
; request not answered within VIRTIO_TIMEOUT_TSC TSC ticks: "replay: rng timeout\n" or "replay: console
; timeout\n", exit value 4 (status 9).
;
; The virtio-rng queue is driven from CPL0 with lib/virtio_code.inc's routines, called directly (the VMM's
; identity map covers the virtio-mmio windows); interrupts stay off.

bits 64
default rel
org 0x100000

%include "lib/serial.inc"
%include "lib/virtio.inc"

EOT             equ 0x04
PM_TIMER_PORT   equ 0x608
RANDOM_FIRST    equ 16
RANDOM_LAST     equ 8
CONSOLE_BUF_BYTES equ 64
EXIT_NO_RNG     equ 2
EXIT_TIMEOUT    equ 4

_start:
        PRINT msg_rtc                   ; the RTC: each register is one read of the host's clock
        mov al, 0x09                    ; year
        call cmos_hex
        mov al, '-'
        call serial_putc
        mov al, 0x08                    ; month
        call cmos_hex
        mov al, '-'
        call serial_putc
        mov al, 0x07                    ; day of the month
        call cmos_hex
        mov al, ' '
        call serial_putc
        mov al, 0x04                    ; hours
        call cmos_hex
        mov al, ':'
        call serial_putc
        mov al, 0x02                    ; minutes
        call cmos_hex
        mov al, ':'
        call serial_putc
        mov al, 0x00                    ; seconds
        call cmos_hex
        NEWLINE

        PRINT msg_pm
        call pm_timer_hex
        NEWLINE

        lea rsi, [name_rng]
        lea rdi, [rng_q]
        mov ecx, 1
        mov edx, VIRTIO_ID_RNG
        call virtio_open
        test eax, eax
        jz .rng_up
        PRINT msg_no_rng
        EXIT EXIT_NO_RNG
.rng_up:
        mov ecx, RANDOM_FIRST
        call get_random
        PRINT msg_random
        lea rsi, [random_buf]
        mov ecx, RANDOM_FIRST
.first: mov al, [rsi]
        push rcx
        mov cl, 2
        call serial_hex
        pop rcx
        inc rsi
        dec ecx
        jnz .first
        NEWLINE
        PRINT msg_ready

        xor r12d, r12d                  ; bytes received
        xor r13d, r13d                  ; their sum
        xor r14d, r14d                  ; polls since the last byte
.poll:  mov dx, COM1_LSR
        in al, dx
        test al, LSR_DR
        jnz .byte
        inc r14
        jmp .poll
.byte:  mov dx, COM1_DATA
        in al, dx
        cmp al, EOT
        je .done
        movzx ebx, al
        imul r13, r13, 31
        add r13, rbx
        inc r12
        PRINT msg_got
        mov eax, ebx
        mov cl, 2
        call serial_hex
        PRINT msg_after
        mov rax, r14
        call serial_dec
        PRINT msg_polls
        call pm_timer_hex
        NEWLINE
        xor r14d, r14d
        jmp .poll

.done:  mov ecx, RANDOM_LAST
        call get_random
        call console_line
        PRINT msg_done
        mov rax, r12
        call serial_dec
        PRINT msg_sum
        mov rax, r13
        mov cl, 16
        call serial_hex
        PRINT msg_random_last
        mov rax, [random_buf]
        mov cl, 16
        call serial_hex
        NEWLINE
        EXIT 0

; cmos_hex: AL = CMOS register -> prints its value as 2 hex digits.
cmos_hex:
        push rax
        push rcx
        out CMOS_INDEX, al
        in al, CMOS_DATA
        mov cl, 2
        call serial_hex
        pop rcx
        pop rax
        ret

; pm_timer_hex: prints a 32-bit read of the ACPI PM timer as 8 hex digits.
pm_timer_hex:
        push rax
        push rcx
        push rdx
        mov dx, PM_TIMER_PORT
        in eax, dx
        mov cl, 8
        call serial_hex
        pop rdx
        pop rcx
        pop rax
        ret

; console_line: with a virtio console, prints what its receiveq brings in one 64-byte buffer (clobbers RAX,
; RBX, RCX, RDX, RSI, RDI).
console_line:
        lea rsi, [name_console]
        lea rdi, [cons_rx]              ; cons_rx, cons_tx: queues 0 and 1
        mov ecx, 2
        mov edx, VIRTIO_ID_CONSOLE
        call virtio_open
        test eax, eax
        jnz .none
        PRINT msg_console_ready
        lea rax, [console_buf]
        mov [buf_list + VQ_BUF_ADDR], rax
        mov dword [buf_list + VQ_BUF_LEN], CONSOLE_BUF_BYTES
        mov dword [buf_list + VQ_BUF_FLAGS], VIRTQ_DESC_F_WRITE
        lea rsi, [buf_list]
        mov ecx, 1
        call virtq_submit
        call virtq_wait
        jc .timeout
        mov ebx, eax                    ; the bytes the device wrote
        PRINT msg_console
        mov eax, ebx
        call serial_dec
        PRINT msg_console_bytes
        mov byte [console_buf + rbx], 0
        PRINT console_buf
        NEWLINE
.none:  ret
.timeout:
        PRINT msg_console_timeout
        EXIT EXIT_TIMEOUT

; get_random: ECX = bytes (at most 16) -> random_buf holds that many bytes from virtio-rng.  On timeout
; prints "replay: rng timeout" and exits with EXIT_TIMEOUT.
get_random:
        push rax
        push rcx
        push rsi
        push rdi
        lea rax, [random_buf]
        mov [buf_list + VQ_BUF_ADDR], rax
        mov [buf_list + VQ_BUF_LEN], ecx
        mov dword [buf_list + VQ_BUF_FLAGS], VIRTQ_DESC_F_WRITE
        lea rdi, [rng_q]
        lea rsi, [buf_list]
        mov ecx, 1
        call virtq_submit
        call virtq_wait
        jc .timeout
        pop rdi
        pop rsi
        pop rcx
        pop rax
        ret
.timeout:
        PRINT msg_rng_timeout
        EXIT EXIT_TIMEOUT

%include "lib/serial_code.inc"
%include "lib/virtio_code.inc"

name_rng:       db "virtio-rng", 0
name_console:   db "virtio-console", 0
msg_console_ready: db "replay: console ready", 10, 0
msg_console:    db "replay: console ", 0
msg_console_bytes: db " bytes: ", 0
msg_console_timeout: db "replay: console timeout", 10, 0
msg_rtc:        db "replay: rtc ", 0
msg_pm:         db "replay: pm timer ", 0
msg_random:     db "replay: random ", 0
msg_ready:      db "replay: ready", 10, 0
msg_got:        db "got ", 0
msg_after:      db " after ", 0
msg_polls:      db " polls, pm timer ", 0
msg_done:       db "replay: done ", 0
msg_sum:        db " bytes, sum ", 0
msg_random_last: db ", random ", 0
msg_no_rng:     db "replay: no rng", 10, 0
msg_rng_timeout: db "replay: rng timeout", 10, 0

section .bss align=16
        VIRTQ rng_q
buf_list:       resb VQ_BUF_BYTES
random_buf:     resb RANDOM_FIRST
        VIRTQ cons_rx
        VIRTQ cons_tx                   ; right after cons_rx: virtio_open takes consecutive blocks
console_buf:    resb CONSOLE_BUF_BYTES + 1
