; virtio_flood.asm - long-mode flat binary (virtio_flood.bin, loaded at 0x100000), entered at CPL0: a
; hostile virtio driver that asks the host to take guest-sized buffers.  Run it as
;     pykvm run build/virtio_flood.bin --mode long -m 64M --balloon --disk IMAGE
; (the balloon is device ID 5, the disk ID 2, behind pykvm's virtio-mmio windows).
;
; Every chain it posts is 256 MiB long in a 64 MiB guest: sixteen 16 MiB descriptors that all name the
; same guest memory at 16 MiB.  A host that copied a chain's bytes before checking what the request can
; legitimately need would hold 256 MiB for it.  In order:
;   1. balloon inflateq (queue 0): the chain as a page-number array -> waits for it to be used;
;   2. balloon statsq (queue 2): the chain as statistics -> not waited for (the device holds a statistics
;      buffer until the host wants fresh numbers);
;   3. blk DISCARD: header, the chain as discard segments, status -> waits, prints the status byte;
;   4. blk WRITE_ZEROES: the same -> waits, prints the status byte.
; Features accepted when offered: the balloon's STATS_VQ, blk's DISCARD and WRITE_ZEROES (VIRTIO_FEATURES_LO).
;
; Prints on COM1:
;     balloon: inflate used <length decimal>\n
;     blk: discard status <decimal>\n
;     blk: write-zeroes status <decimal>\n
; Exit value 0 (status 1) when all four went through (whatever the statuses: the host chooses them);
; 2 (status 5) a device is missing, 3 (status 7) a device refused initialisation, 4 (status 9) a used
; ring did not move within VIRTIO_TIMEOUT_TSC ticks: "<device>: timeout\n".

bits 64
default rel
org 0x100000

%define VQ_SIZE 32                      ; room for a header, 16 data descriptors and a status
%define VIRTIO_FEATURES_LO ((1 << 1) | (1 << 13) | (1 << 14))  ; balloon STATS_VQ; blk DISCARD, WRITE_ZEROES
%define CPL3_MAP_IO 0xd0000000
%include "lib/serial.inc"
%include "lib/cpl3.inc"
%include "lib/virtio.inc"

ALIAS_GPA       equ 0x1000000           ; the guest memory every data descriptor names (16 MiB)
ALIAS_BYTES     equ 0x1000000
ALIASES         equ 16                  ; 16 x 16 MiB = 256 MiB per chain
LINE_BYTES      equ 96
BALLOON_QUEUES  equ 3                   ; inflateq, deflateq, statsq

EXIT_OK         equ 0
EXIT_NO_DEVICE  equ 2
EXIT_REFUSED    equ 3
EXIT_TIMEOUT    equ 4

image_start:
        CPL3_INIT
        CPL3_ENTER user_main, user_stack_top

; ---- CPL3 -----------------------------------------------------------------------------------------
user_main:
        lea rsi, [name_balloon]
        lea rdi, [bal_inflate]          ; bal_inflate, bal_deflate, bal_stats: queues 0, 1, 2
        mov ecx, BALLOON_QUEUES
        mov edx, VIRTIO_ID_BALLOON
        VCALL VSYS_OPEN
        call check_open

        lea rdi, [list]                 ; the aliases, device-readable
        mov ecx, ALIASES
        xor edx, edx
        call put_aliases
        lea rsi, [list]
        mov ecx, ALIASES
        lea rdi, [bal_inflate]
        VCALL VSYS_SUBMIT
        call wait_or_die
        mov rbx, rax
        lea rdi, [line]
        lea rsi, [msg_inflate]
        call str_append
        mov rax, rbx
        call dec_append
        call end_line

        lea rsi, [list]                 ; the same list as statistics (the device keeps the buffer)
        mov ecx, ALIASES
        lea rdi, [bal_stats]
        VCALL VSYS_SUBMIT

        lea rsi, [name_blk]
        lea rdi, [blk_q]
        mov ecx, 1
        mov edx, VIRTIO_ID_BLOCK
        VCALL VSYS_OPEN
        call check_open

        mov edi, VIRTIO_BLK_T_DISCARD
        lea r8, [msg_discard]
        call blk_flood
        mov edi, VIRTIO_BLK_T_WRITE_ZEROES
        lea r8, [msg_zeroes]
        call blk_flood

        mov edi, EXIT_OK
        VCALL VSYS_EXIT

; put_aliases: RDI -> buffer list, ECX = entries, EDX = flags: ECX entries naming ALIAS_GPA, ALIAS_BYTES.
; Returns RDI past them.
put_aliases:
        mov qword [rdi + VQ_BUF_ADDR], ALIAS_GPA
        mov dword [rdi + VQ_BUF_LEN], ALIAS_BYTES
        mov [rdi + VQ_BUF_FLAGS], edx
        add rdi, VQ_BUF_BYTES
        dec ecx
        jnz put_aliases
        ret

; blk_flood: EDI = request type, R8 -> message: header, the aliases (device-readable), status; waits and
; prints "<message><status>".
blk_flood:
        mov [blk_hdr + VIRTIO_BLK_REQ_TYPE], edi
        mov dword [blk_hdr + VIRTIO_BLK_REQ_RESERVED], 0
        mov qword [blk_hdr + VIRTIO_BLK_REQ_SECTOR], 0
        mov byte [blk_status], 0xff
        lea rdi, [list]
        lea rax, [blk_hdr]
        mov [rdi + VQ_BUF_ADDR], rax
        mov dword [rdi + VQ_BUF_LEN], VIRTIO_BLK_REQ_BYTES
        mov dword [rdi + VQ_BUF_FLAGS], 0
        add rdi, VQ_BUF_BYTES
        mov ecx, ALIASES
        xor edx, edx
        call put_aliases
        lea rax, [blk_status]
        mov [rdi + VQ_BUF_ADDR], rax
        mov dword [rdi + VQ_BUF_LEN], 1
        mov dword [rdi + VQ_BUF_FLAGS], VIRTQ_DESC_F_WRITE
        lea rsi, [list]
        mov ecx, ALIASES + 2
        lea rdi, [blk_q]
        VCALL VSYS_SUBMIT
        call wait_or_die
        lea rdi, [line]
        mov rsi, r8
        call str_append
        movzx eax, byte [blk_status]
        call dec_append
        jmp end_line

; check_open: EAX = VSYS_OPEN's result, RSI -> device name: returns if it is VIRTIO_OPEN_OK, else says
; why and exits.
check_open:
        test eax, eax
        jz .ok
        mov ebx, eax
        lea rdi, [line]
        call str_append
        lea rsi, [msg_no_device]
        mov r12d, EXIT_NO_DEVICE
        cmp ebx, VIRTIO_OPEN_MISSING
        je .say
        lea rsi, [msg_refused]
        mov r12d, EXIT_REFUSED
.say:   call str_append
        lea rsi, [line]
        VCALL VSYS_PUTS
        mov edi, r12d
        VCALL VSYS_EXIT
.ok:    ret

; wait_or_die: RDI -> queue block, EAX = used index -> EAX = used length; on timeout says so and exits.
wait_or_die:
        call virtq_wait
        jc .timeout
        ret
.timeout:
        mov rsi, [rdi + VQ_NAME]
        lea rdi, [line]
        call str_append
        lea rsi, [msg_timeout]
        call str_append
        lea rsi, [line]
        VCALL VSYS_PUTS
        mov edi, EXIT_TIMEOUT
        VCALL VSYS_EXIT

; end_line: RDI -> the end of the text in `line`: adds a newline and prints the line.
end_line:
        lea rsi, [msg_newline]
        call str_append
        lea rsi, [line]
        VCALL VSYS_PUTS
        ret

; ---- CPL0: handlers and routines --------------------------------------------------------------------
        CPL3_FAULT_HANDLERS

%include "lib/serial_code.inc"
%include "lib/format_code.inc"
%include "lib/virtio_code.inc"

        CPL3_TABLES virtio_service

name_balloon:   db "balloon", 0
name_blk:       db "blk", 0
msg_inflate:    db "balloon: inflate used ", 0
msg_discard:    db "blk: discard status ", 0
msg_zeroes:     db "blk: write-zeroes status ", 0
msg_no_device:  db ": no device", 10, 0
msg_refused:    db ": device refused initialisation", 10, 0
msg_timeout:    db ": timeout", 10, 0
msg_newline:    db 10, 0
        CPL3_STRINGS

        CPL3_BSS
        VIRTQ bal_inflate
        VIRTQ bal_deflate               ; consecutive blocks: VSYS_OPEN takes them in order
        VIRTQ bal_stats
        VIRTQ blk_q
list:           resb (ALIASES + 2) * VQ_BUF_BYTES
blk_hdr:        resb VIRTIO_BLK_REQ_BYTES
line:           resb LINE_BYTES
blk_status:     resb 1
