; bench_blk.asm - virtio-blk benchmark guest (bench_blk.bin, a flat long-mode binary loaded at 0x100000,
; entered at CPL0).  bench/bench_virtio.py runs it (rows 9 and 10 of bench/run.py); by hand:
;     pykvm run build/bench_blk.bin --mode long --disk IMAGE --serial stdio
; Needs a virtio-blk (device ID 2) behind one of pykvm's virtio-mmio windows (0xd0000000 + i * 0x1000).
;
; Like virtio_blk.asm it runs on lib/cpl3.inc + lib/virtio.inc: the kernel drops to CPL3 at once and CPL0 is
; entered only through int3 for the kernel calls (VSYS_OPEN, VSYS_CONFIG64, VSYS_SUBMIT: MMIO registers,
; descriptors, the available ring and the QueueNotify write; VSYS_PUTS, VSYS_EXIT).  Everything else - the
; request headers, the spin on the used ring (virtq_wait, bounded by the TSC), the checksum, the write
; pattern, the summary line (lib/format_code.inc) - runs at CPL3, natively on the nested kvm_pvm backend.
; No interrupts (IF = 0; the queue asks for none, VIRTQ_AVAIL_F_NO_INTERRUPT): the guest polls the used ring.
;
; One request in flight: VSYS_SUBMIT always builds the chain from descriptor 0 (lib/virtio.inc), so each
; request is submitted, notified and waited for before the next.  A request is one chain of three
; descriptors: the 16-byte header (device-readable), one data buffer (device-writable for a read,
; device-readable for a write), the status byte (device-writable).
;
; Parameter block (file offsets; the VMM patches the inputs into a copy of the image, like bench_*.asm):
;    8  count     qword  number of requests (0: open the device and exit)
;   16  mode      qword  0: read  65536-byte requests (VIRTIO_BLK_T_IN)
;                        1: write 65536-byte requests (VIRTIO_BLK_T_OUT)
;                        2: read  512-byte requests (one sector each: the notification benchmark)
;   24  flags     qword  bit 0: print the summary line below on COM1 at the end (set in the built image;
;                        the benchmark clears it, so that no COM1 output is timed)
; Results, written by the guest (at CPL3) into the same block, which the VMM reads from guest memory:
;   32  checksum  qword  see below
;   40  done      qword  requests completed with status OK (on an error: the index of the failing request)
;   48  capacity  qword  the disk's capacity in 512-byte sectors (config le64 at 0x100)
;   56  detail    qword  on an error: the request's status byte (exit 3) or its used length (exit 6)
;
; Requests go to sector 0, then upward: request i starts where request i - 1 ended, and wraps to sector 0
; when the request would cross the capacity.  Mode 1 fills its buffer before request i with the qwords
; (i << 32) | j, j = 0 .. bytes/8 - 1 (little-endian).
;
; Checksum (every mode, over the data buffer after each request, i.e. what was read or written): for
; request i, s_i = the sum of the buffer's little-endian qwords mod 2^64; checksum = 0, then for each
; request in order checksum = rol64(checksum, 1) + s_i (mod 2^64).  The host computes the same from the
; image (bench/bench_virtio.py, expected_checksum).
;
; With flags bit 0, prints on COM1 at the end: "bench_blk: <done decimal> requests, checksum <16 hex
; digits>\n".  Error lines are always printed.
; Exit values (pykvm status (v << 1) | 1):
;   0 (status 1)    every request completed with status OK
;   2 (status 5)    "bench_blk: no virtio-blk device\n"
;   3 (status 7)    "bench_blk: device refused initialisation\n", or "bench_blk: request failed\n" (a status
;                   byte other than 0; done = its index, detail = the status)
;   4 (status 9)    "bench_blk: timeout\n": the used ring did not move within VIRTIO_TIMEOUT_TSC (~6-10 s)
;   5 (status 11)   "bench_blk: bad parameters\n": an unknown mode, or a disk smaller than one request
;   6 (status 13)   "bench_blk: wrong used length\n": not data bytes + 1 (read) or 1 (write); detail = it
;   0x7f (status 255) an unexpected #UD/#DF/#GP/#PF (lib/cpl3.inc)

bits 64
default rel
org 0x100000

%define CPL3_MAP_IO 0xd0000000         ; map the 2 MiB page of the virtio-mmio windows
%include "lib/serial.inc"
%include "lib/cpl3.inc"
%include "lib/virtio.inc"

BIG_BYTES       equ 65536
SMALL_BYTES     equ VIRTIO_BLK_SECTOR_BYTES
MODE_READ       equ 0
MODE_WRITE      equ 1
MODE_SMALL      equ 2
FLAG_PRINT      equ 1

EXIT_OK         equ 0
EXIT_NO_DEVICE  equ 2
EXIT_DEVICE_ERROR equ 3
EXIT_TIMEOUT    equ 4
EXIT_BAD_PARAMS equ 5
EXIT_BAD_LENGTH equ 6

; ---- the parameter block: the image starts with a short jump over it -----------------------------------
params:
        jmp short image_start
        times 8 - ($ - params) db 0
p_count:        dq 1024                 ; 8
p_mode:         dq MODE_READ            ; 16
p_flags:        dq FLAG_PRINT           ; 24
r_checksum:     dq 0                    ; 32
r_done:         dq 0                    ; 40
r_capacity:     dq 0                    ; 48
r_detail:       dq 0                    ; 56

; ---- CPL0: set up and drop to user mode (the rest of CPL0 is lib/virtio_code.inc's virtio_service) --
image_start:
        CPL3_INIT
        CPL3_ENTER user_main, user_stack_top

; ---- CPL3 -----------------------------------------------------------------------------------------
; Registers in the request loop: RBX = request index, R12 = sectors per request, R13 = count,
; R14 = next sector, R15 = checksum, EBP = data bytes per request, R10 = the capacity.
user_main:
        xor eax, eax
        mov [r_checksum], rax
        mov [r_done], rax
        mov [r_capacity], rax
        mov [r_detail], rax

        lea rsi, [name_blk]
        lea rdi, [blk_q]
        mov ecx, 1
        mov edx, VIRTIO_ID_BLOCK
        VCALL VSYS_OPEN
        test eax, eax
        jnz open_failed
        mov ecx, VIRTIO_BLK_CFG_CAPACITY ; RDI = blk_q
        VCALL VSYS_CONFIG64
        mov [r_capacity], rax
        mov r10, rax

        ; the request shape by mode
        mov rax, [p_mode]
        mov ebp, BIG_BYTES
        mov edx, VIRTIO_BLK_T_IN
        mov r8d, VIRTQ_DESC_F_WRITE     ; the data buffer's flags
        cmp rax, MODE_READ
        je .shape
        mov edx, VIRTIO_BLK_T_OUT
        xor r8d, r8d
        cmp rax, MODE_WRITE
        je .shape
        mov ebp, SMALL_BYTES
        mov edx, VIRTIO_BLK_T_IN
        mov r8d, VIRTQ_DESC_F_WRITE
        cmp rax, MODE_SMALL
        jne bad_params
.shape: mov r12d, ebp
        shr r12d, 9                     ; sectors per request
        cmp r10, r12
        jb bad_params

        ; the chain, the same for every request: header, data, status
        mov [blk_hdr + VIRTIO_BLK_REQ_TYPE], edx
        mov dword [blk_hdr + VIRTIO_BLK_REQ_RESERVED], 0
        lea rax, [blk_hdr]
        mov [blk_list + VQ_BUF_ADDR], rax
        mov dword [blk_list + VQ_BUF_LEN], VIRTIO_BLK_REQ_BYTES
        mov dword [blk_list + VQ_BUF_FLAGS], 0
        lea rax, [data_buf]
        mov [blk_list + VQ_BUF_BYTES + VQ_BUF_ADDR], rax
        mov [blk_list + VQ_BUF_BYTES + VQ_BUF_LEN], ebp
        mov [blk_list + VQ_BUF_BYTES + VQ_BUF_FLAGS], r8d
        lea rax, [blk_status]
        mov [blk_list + 2 * VQ_BUF_BYTES + VQ_BUF_ADDR], rax
        mov dword [blk_list + 2 * VQ_BUF_BYTES + VQ_BUF_LEN], 1
        mov dword [blk_list + 2 * VQ_BUF_BYTES + VQ_BUF_FLAGS], VIRTQ_DESC_F_WRITE

        xor ebx, ebx
        mov r13, [p_count]
        xor r14d, r14d
        xor r15d, r15d
.request:
        cmp rbx, r13
        jae .done
        mov rax, r14                    ; wrap when the request would cross the capacity
        add rax, r12
        cmp rax, r10
        jbe .in_range
        xor r14d, r14d
.in_range:
        cmp qword [p_mode], MODE_WRITE
        jne .submit
        mov rax, rbx                    ; the write pattern: qword j = (i << 32) | j
        shl rax, 32
        lea rdi, [data_buf]
        mov ecx, ebp
        shr ecx, 3
.fill:  mov [rdi], rax
        inc rax
        add rdi, 8
        dec ecx
        jnz .fill
.submit:
        mov [blk_hdr + VIRTIO_BLK_REQ_SECTOR], r14
        mov byte [blk_status], 0xff     ; not a status the device may write
        lea rsi, [blk_list]
        mov ecx, 3
        lea rdi, [blk_q]
        VCALL VSYS_SUBMIT               ; -> EAX = the used index to wait for
        call virtq_wait                 ; -> EAX = the used length
        jc timeout
        movzx ecx, byte [blk_status]
        test ecx, ecx
        jnz request_failed
        mov ecx, 1                      ; the expected used length: the status byte ...
        cmp qword [p_mode], MODE_WRITE
        je .length
        add ecx, ebp                    ; ... after the data read
.length:
        cmp eax, ecx
        jne wrong_length

        lea rsi, [data_buf]             ; s_i: the sum of the buffer's qwords
        mov ecx, ebp
        shr ecx, 3
        xor eax, eax
.sum:   add rax, [rsi]
        add rsi, 8
        dec ecx
        jnz .sum
        rol r15, 1
        add r15, rax

        inc rbx
        add r14, r12
        jmp .request

.done:  mov [r_checksum], r15
        mov [r_done], rbx
        test qword [p_flags], FLAG_PRINT
        jz .exit
        lea rdi, [line]                 ; "bench_blk: <done> requests, checksum <hex>\n"
        lea rsi, [msg_summary]
        call str_append
        mov rax, rbx
        call dec_append
        lea rsi, [msg_checksum]
        call str_append
        mov rax, r15
        mov cl, 16
        call hex_append
        mov word [rdi], 10              ; "\n", NUL
        lea rsi, [line]
        VCALL VSYS_PUTS
.exit:  mov edi, EXIT_OK
        VCALL VSYS_EXIT

; ---- errors (CPL3): print a line, exit with its value -------------------------------------------------
open_failed:                            ; EAX = VIRTIO_OPEN_MISSING or _REFUSED
        lea rsi, [msg_no_device]
        mov edi, EXIT_NO_DEVICE
        cmp eax, VIRTIO_OPEN_MISSING
        je fail
        lea rsi, [msg_refused]
        mov edi, EXIT_DEVICE_ERROR
        jmp fail
bad_params:
        lea rsi, [msg_bad_params]
        mov edi, EXIT_BAD_PARAMS
        jmp fail
timeout:
        mov [r_done], rbx
        lea rsi, [msg_timeout]
        mov edi, EXIT_TIMEOUT
        jmp fail
request_failed:                         ; ECX = the status byte
        mov [r_done], rbx
        mov [r_detail], rcx
        lea rsi, [msg_request_failed]
        mov edi, EXIT_DEVICE_ERROR
        jmp fail
wrong_length:                           ; EAX = the used length
        mov [r_done], rbx
        mov [r_detail], rax
        lea rsi, [msg_wrong_length]
        mov edi, EXIT_BAD_LENGTH
fail:   mov [r_checksum], r15
        VCALL VSYS_PUTS                 ; RSI -> the line; preserves EDI
        VCALL VSYS_EXIT

; ---- CPL0: handlers and routines --------------------------------------------------------------------
        CPL3_FAULT_HANDLERS

%include "lib/serial_code.inc"
%include "lib/virtio_code.inc"
%include "lib/format_code.inc"         ; str_append, dec_append, hex_append (used at CPL3)

; ---- descriptor tables and strings ----------------------------------------------------------------
        CPL3_TABLES virtio_service

name_blk:       db "virtio-blk", 0
msg_summary:    db "bench_blk: ", 0
msg_checksum:   db " requests, checksum ", 0
msg_no_device:  db "bench_blk: no virtio-blk device", 10, 0
msg_refused:    db "bench_blk: device refused initialisation", 10, 0
msg_bad_params: db "bench_blk: bad parameters", 10, 0
msg_timeout:    db "bench_blk: timeout", 10, 0
msg_request_failed: db "bench_blk: request failed", 10, 0
msg_wrong_length: db "bench_blk: wrong used length", 10, 0
        CPL3_STRINGS

; ---- zero-initialised memory after the image (CPL3_BSS ends page-aligned) ---------------------------
        CPL3_BSS
data_buf:       resb BIG_BYTES          ; page-aligned (CPL3_BSS ends so)
        VIRTQ blk_q                     ; 16-byte aligned: BIG_BYTES is
blk_list:       resb 3 * VQ_BUF_BYTES   ; (VQ_BYTES is a multiple of 16)
blk_hdr:        resb VIRTIO_BLK_REQ_BYTES
line:           resb 128
blk_status:     resb 1
