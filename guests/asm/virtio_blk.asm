; virtio_blk.asm - long-mode flat binary (virtio_blk.bin, loaded at 0x100000), entered at CPL0: the
; end-to-end virtio test.  Run it as
;     pykvm run build/virtio_blk.bin --mode long --disk IMAGE --console virtio
; Needs a virtio-blk (device ID 2) and a virtio-console (ID 3) behind pykvm's virtio-mmio windows
; (0xd0000000 + i * 0x1000, i = 0..7), a disk of at least 128 sectors, writable.
;
; The kernel (lib/cpl3.inc: own page tables for the low 1 GiB and the MMIO windows, GDT, TSS, IDT) drops to
; CPL3 at once; the whole test runs there and enters CPL0 only through int3 for the kernel calls of
; lib/virtio.inc (device initialisation, MMIO registers, descriptors and the available ring, COM1 output).
; CPL3 builds the requests, spins on the used rings (bounded by the TSC) and does the 64 KiB loops,
; natively on the nested kvm_pvm backend.  No interrupts: IF stays 0.
;
; Steps: open the console (queues 0 receiveq, 1 transmitq) and the disk (queue 0 requestq), each by the
; virtio 1.2 3.1.1 sequence with VIRTIO_F_VERSION_1 as the only feature; read the capacity (config le64 at
; 0x100); print line 1; generate the pattern; write it to sectors 0..127 in one OUT request (header,
; one 65536-byte buffer, status); FLUSH; zero the buffer; read sectors 0..127 back in one IN request; count
; the bytes that differ from the pattern; print line 2; GET_ID into a 20-byte buffer; print line 3; exit.
;
; The pattern (65536 bytes; the host-side test generates the same and compares the image's first 64 KiB):
; xorshift64 (Marsaglia, shifts 13, 7, 17) on a 64-bit state x, seeded with x = 0x9e3779b97f4a7c15.  For
; each of the 8192 qwords i = 0..8191: x ^= x << 13; x ^= x >> 7; x ^= x << 17 (all mod 2^64, logical
; shifts); then qword i = x, stored little-endian at byte offset 8 * i.  The seed itself is not stored:
; qword 0 is the state after one step, 0xdc1b77ae0bf34dad, so the image starts with the bytes
; ad 4d f3 0b ae 77 1b dc 76 60 6e 02 b9 ee f0 64; SHA-256 of the 65536 bytes: b3a275a845f1d698913621853f15
; d7daf7b3e2f02acc98018f2305c9a99d46c5.  guests/README.md has a Python reference.
;
; Prints (each line on COM1, then the same bytes on the virtio console's transmitq, so with pykvm's
; `--console virtio --serial stdio`, where both reach stdout, every line shows twice):
;     virtio-blk: capacity <sectors decimal> sectors\n
;     virtio-blk: wrote 65536 bytes, flushed, read back: OK\n       (or: read back: MISMATCH <bytes decimal>\n)
;     virtio-blk: id <GET_ID string: up to 20 bytes, up to the first NUL>\n
; Exit values (pykvm status (v << 1) | 1):
;   0 (status 1)   every byte read back matched
;   1 (status 3)   mismatching bytes (line 2 says how many; line 3 still follows)
;   2 (status 5)   a device is missing: "virtio-console: no device\n" or "virtio-blk: no device\n"
;   3 (status 7)   a device error: a request's status byte is not 0 ("virtio-blk: <write|flush|read|get-id>
;                  failed, status <decimal>\n"), or a device refused initialisation (features not accepted,
;                  a queue unavailable or smaller than 8 entries, DEVICE_NEEDS_RESET):
;                  "virtio-<blk|console>: device refused initialisation\n"
;   4 (status 9)   a used ring did not move within VIRTIO_TIMEOUT_TSC TSC ticks (~6-10 s):
;                  "virtio-<blk|console>: timeout, device status <2 hex digits>\n"
;   0x7f (status 255)  an unexpected #UD/#DF/#GP/#PF: "fault <vector decimal>\n" (lib/cpl3.inc)
; Error lines go to the console too when it is up (not a console timeout's).
;
; Assembled with -DPAUSE_AFTER_FLUSH (virtio_blk_pause.bin) it also writes PAUSED (0x40, pykvm status 129)
; to the debug-exit port once the FLUSH completed, before it reads the pattern back, and goes on when
; the machine runs again: a snapshot taken there holds the written disk, and the restored guest reads it.

bits 64
default rel
org 0x100000

%define CPL3_MAP_IO 0xd0000000         ; map the 2 MiB page of the virtio-mmio windows (VIRTIO_MMIO_BASE)
%include "lib/serial.inc"
%include "lib/cpl3.inc"
%include "lib/virtio.inc"

PATTERN_BYTES   equ 65536
PATTERN_SECTOR  equ 0                   ; first sector written and read
PATTERN_SEED    equ 0x9e3779b97f4a7c15
LINE_BYTES      equ 128

EXIT_OK         equ 0
EXIT_MISMATCH   equ 1
EXIT_NO_DEVICE  equ 2
EXIT_DEVICE_ERROR equ 3
EXIT_TIMEOUT    equ 4
PAUSED          equ 0x40

%if PATTERN_BYTES % VIRTIO_BLK_SECTOR_BYTES
  %error "the pattern must be whole sectors"
%endif

; XORSHIFT64 state, scratch: one step of the pattern generator (see the header).
%macro XORSHIFT64 2
        mov %2, %1
        shl %2, 13
        xor %1, %2
        mov %2, %1
        shr %2, 7
        xor %1, %2
        mov %2, %1
        shl %2, 17
        xor %1, %2
%endmacro

; ---- CPL0: set up and drop to user mode (the rest of CPL0 is lib/virtio_code.inc's virtio_service) --
image_start:
        CPL3_INIT
        CPL3_ENTER user_main, user_stack_top

; ---- CPL3 -----------------------------------------------------------------------------------------
user_main:
        lea rsi, [name_console]         ; the console first, so that later messages reach it
        lea rdi, [cons_rx]              ; cons_rx, cons_tx: queues 0 and 1
        mov ecx, 2
        mov edx, VIRTIO_ID_CONSOLE
        VCALL VSYS_OPEN
        test eax, eax
        jnz open_failed
        mov byte [console_up], 1

        lea rsi, [name_blk]
        lea rdi, [blk_q]
        mov ecx, 1
        mov edx, VIRTIO_ID_BLOCK
        VCALL VSYS_OPEN
        test eax, eax
        jnz open_failed

        mov ecx, VIRTIO_BLK_CFG_CAPACITY ; RDI = blk_q
        VCALL VSYS_CONFIG64
        lea rdi, [line]
        lea rsi, [msg_capacity]
        call str_append
        call dec_append
        lea rsi, [msg_sectors]
        call str_append
        call print_line

        ; the pattern
        mov rax, PATTERN_SEED
        lea rdi, [data_buf]
        mov ecx, PATTERN_BYTES / 8
.fill:  XORSHIFT64 rax, rdx
        mov [rdi], rax
        add rdi, 8
        dec ecx
        jnz .fill

        mov edi, VIRTIO_BLK_T_OUT
        mov esi, PATTERN_SECTOR
        lea rdx, [data_buf]
        mov ecx, PATTERN_BYTES
        lea r8, [op_write]
        call blk_request
        mov edi, VIRTIO_BLK_T_FLUSH
        xor esi, esi
        xor ecx, ecx                    ; no data
        lea r8, [op_flush]
        call blk_request
%ifdef PAUSE_AFTER_FLUSH
        mov edi, PAUSED
        VCALL VSYS_PAUSE
%endif

        lea rdi, [data_buf]             ; forget what was written
        xor eax, eax
        mov ecx, PATTERN_BYTES / 8
        rep stosq

        mov edi, VIRTIO_BLK_T_IN
        mov esi, PATTERN_SECTOR
        lea rdx, [data_buf]
        mov ecx, PATTERN_BYTES
        lea r8, [op_read]
        call blk_request

        ; compare with a fresh run of the generator: RBX = bytes that differ
        mov rax, PATTERN_SEED
        lea rsi, [data_buf]
        mov ecx, PATTERN_BYTES / 8
        xor ebx, ebx
.compare:
        XORSHIFT64 rax, rdx
        mov rdx, [rsi]
        xor rdx, rax
        jz .same
        mov r9d, 8
.byte:  test dl, dl
        setnz r10b
        movzx r10d, r10b
        add rbx, r10
        shr rdx, 8
        dec r9d
        jnz .byte
.same:  add rsi, 8
        dec ecx
        jnz .compare

        lea rdi, [line]
        lea rsi, [msg_wrote]
        call str_append
        mov eax, PATTERN_BYTES
        call dec_append
        lea rsi, [msg_read_back]
        call str_append
        lea rsi, [msg_ok]
        test rbx, rbx
        jz .verdict
        lea rsi, [msg_mismatch]
        call str_append
        mov rax, rbx
        call dec_append
        lea rsi, [msg_newline]
.verdict:
        call str_append
        call print_line

        mov edi, VIRTIO_BLK_T_GET_ID
        xor esi, esi
        lea rdx, [id_buf]
        mov ecx, VIRTIO_BLK_ID_BYTES
        lea r8, [op_get_id]
        call blk_request
        mov byte [id_buf + VIRTIO_BLK_ID_BYTES], 0  ; a 20-byte id has no NUL of its own
        lea rdi, [line]
        lea rsi, [msg_id]
        call str_append
        lea rsi, [id_buf]
        call str_append
        lea rsi, [msg_newline]
        call str_append
        call print_line

        xor edi, edi                    ; EXIT_OK, or EXIT_MISMATCH
        test rbx, rbx
        setnz dil
        VCALL VSYS_EXIT

; open_failed: EAX = VIRTIO_OPEN_MISSING or _REFUSED, RSI -> device name.  Does not return.
open_failed:
        mov ebx, eax
        lea rdi, [line]
        call str_append
        lea rsi, [msg_no_device]
        mov r12d, EXIT_NO_DEVICE
        cmp ebx, VIRTIO_OPEN_MISSING
        je .say
        lea rsi, [msg_refused]
        mov r12d, EXIT_DEVICE_ERROR
.say:   call str_append
        call print_line
        mov edi, r12d
        VCALL VSYS_EXIT

; blk_request: EDI = request type, RSI = sector, RDX -> data, ECX = data bytes (0: no data buffer),
; R8 -> the operation's name for the error message.  One chain: the header (device-readable), the data
; (device-writable unless OUT), the status byte (device-writable); waits for it.  Returns if the status is
; VIRTIO_BLK_S_OK; otherwise prints "virtio-blk: <op> failed, status <n>" and exits with EXIT_DEVICE_ERROR.
blk_request:
        push rax
        push rbx
        push rcx
        push rsi
        push rdi
        mov [blk_hdr + VIRTIO_BLK_REQ_TYPE], edi
        mov dword [blk_hdr + VIRTIO_BLK_REQ_RESERVED], 0
        mov [blk_hdr + VIRTIO_BLK_REQ_SECTOR], rsi
        mov byte [blk_status], 0xff     ; not a status the device may write
        lea rbx, [blk_list]
        lea rax, [blk_hdr]
        mov [rbx + VQ_BUF_ADDR], rax
        mov dword [rbx + VQ_BUF_LEN], VIRTIO_BLK_REQ_BYTES
        mov dword [rbx + VQ_BUF_FLAGS], 0
        add rbx, VQ_BUF_BYTES
        test ecx, ecx
        jz .status
        mov [rbx + VQ_BUF_ADDR], rdx
        mov [rbx + VQ_BUF_LEN], ecx
        mov eax, VIRTQ_DESC_F_WRITE
        cmp edi, VIRTIO_BLK_T_OUT
        jne .data_flags
        xor eax, eax
.data_flags:
        mov [rbx + VQ_BUF_FLAGS], eax
        add rbx, VQ_BUF_BYTES
.status:
        lea rax, [blk_status]
        mov [rbx + VQ_BUF_ADDR], rax
        mov dword [rbx + VQ_BUF_LEN], 1
        mov dword [rbx + VQ_BUF_FLAGS], VIRTQ_DESC_F_WRITE
        add rbx, VQ_BUF_BYTES
        lea rsi, [blk_list]
        mov rcx, rbx
        sub rcx, rsi
        shr ecx, 4                      ; entries (VQ_BUF_BYTES each)
        lea rdi, [blk_q]
        VCALL VSYS_SUBMIT
        call wait_or_die
        movzx eax, byte [blk_status]
        test eax, eax
        jnz .failed
        pop rdi
        pop rsi
        pop rcx
        pop rbx
        pop rax
        ret
.failed:
        mov rbx, rax
        lea rdi, [line]
        lea rsi, [name_blk]
        call str_append
        lea rsi, [msg_colon]
        call str_append
        mov rsi, r8
        call str_append
        lea rsi, [msg_failed]
        call str_append
        mov rax, rbx
        call dec_append
        lea rsi, [msg_newline]
        call str_append
        call print_line
        mov edi, EXIT_DEVICE_ERROR
        VCALL VSYS_EXIT

; wait_or_die: RDI -> queue block, EAX = used index from VSYS_SUBMIT -> EAX = used length.  On timeout
; prints "<device>: timeout, device status <hex>" and exits with EXIT_TIMEOUT.
wait_or_die:
        call virtq_wait
        jc .timeout
        ret
.timeout:
        mov rbx, rdi
        VCALL VSYS_STATUS
        mov r12d, eax
        lea rax, [cons_tx]
        cmp rbx, rax
        jne .say
        mov byte [console_up], 0        ; the console is what hangs: COM1 only
.say:   lea rdi, [line]
        mov rsi, [rbx + VQ_NAME]
        call str_append
        lea rsi, [msg_timeout]
        call str_append
        mov eax, r12d
        mov cl, 2
        call hex_append
        lea rsi, [msg_newline]
        call str_append
        call print_line
        mov edi, EXIT_TIMEOUT
        VCALL VSYS_EXIT

; print_line: prints the NUL-terminated `line` on COM1 (kernel call) and, when the console is up, sends
; the same bytes on its transmitq and waits until the device has used them.
print_line:
        push rax
        push rcx
        push rsi
        push rdi
        lea rsi, [line]
        VCALL VSYS_PUTS
        cmp byte [console_up], 0
        je .done
        xor ecx, ecx
.length:
        cmp byte [rsi + rcx], 0
        je .send
        inc ecx
        jmp .length
.send:  mov [cons_list + VQ_BUF_ADDR], rsi
        mov [cons_list + VQ_BUF_LEN], ecx
        mov dword [cons_list + VQ_BUF_FLAGS], 0
        lea rsi, [cons_list]
        mov ecx, 1
        lea rdi, [cons_tx]
        VCALL VSYS_SUBMIT
        call wait_or_die
.done:  pop rdi
        pop rsi
        pop rcx
        pop rax
        ret

; ---- CPL0: handlers and routines --------------------------------------------------------------------
        CPL3_FAULT_HANDLERS

%include "lib/serial_code.inc"
%include "lib/format_code.inc"
%include "lib/virtio_code.inc"

; ---- descriptor tables and strings ----------------------------------------------------------------
        CPL3_TABLES virtio_service

name_console:   db "virtio-console", 0
name_blk:       db "virtio-blk", 0
msg_capacity:   db "virtio-blk: capacity ", 0
msg_sectors:    db " sectors", 10, 0
msg_wrote:      db "virtio-blk: wrote ", 0
msg_read_back:  db " bytes, flushed, read back: ", 0
msg_ok:         db "OK", 10, 0
msg_mismatch:   db "MISMATCH ", 0
msg_id:         db "virtio-blk: id ", 0
msg_no_device:  db ": no device", 10, 0
msg_refused:    db ": device refused initialisation", 10, 0
msg_colon:      db ": ", 0
msg_failed:     db " failed, status ", 0
msg_timeout:    db ": timeout, device status ", 0
msg_newline:    db 10, 0
op_write:       db "write", 0
op_flush:       db "flush", 0
op_read:        db "read", 0
op_get_id:      db "get-id", 0
        CPL3_STRINGS

; ---- zero-initialised memory after the image (CPL3_BSS ends page-aligned) ---------------------------
        CPL3_BSS
data_buf:       resb PATTERN_BYTES      ; page-aligned
        VIRTQ cons_rx
        VIRTQ cons_tx                   ; right after cons_rx: VSYS_OPEN takes consecutive blocks
        VIRTQ blk_q
blk_list:       resb 3 * VQ_BUF_BYTES
cons_list:      resb VQ_BUF_BYTES
blk_hdr:        resb VIRTIO_BLK_REQ_BYTES
line:           resb LINE_BYTES
id_buf:         resb VIRTIO_BLK_ID_BYTES + 1
blk_status:     resb 1
console_up:     resb 1
