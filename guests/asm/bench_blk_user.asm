; bench_blk_user.asm - the virtio-blk benchmark guest whose driver runs entirely at CPL3 (bench_blk_user.bin).
; bench/bench_virtio.py runs it under pykvm and under QEMU microvm, on the same image; by hand:
;     pykvm run build/bench_blk_user.bin --disk IMAGE --serial stdio
;     qemu-system-x86_64 -enable-kvm -M microvm,isa-serial=on -nodefaults -no-user-config -nographic
;         -serial stdio -device isa-debug-exit,iobase=0xf4,iosize=0x04 -m 64M -no-reboot
;         -global virtio-mmio.force-legacy=false -drive id=d0,file=IMAGE,format=raw,if=none
;         -device virtio-blk-device,drive=d0 -kernel build/bench_blk_user.bin
;
; A multiboot kernel (flag bit 16, the a.out kludge: the file loads at 0x100000 as it is), entered in 32-bit
; protected mode.  It switches to long mode itself (PAE page tables for the first 4 MiB, EFER.LME, CR0.PG),
; sets up lib/cpl3.inc's kernel (page tables with the user bit for the low 1 GiB and for the 2 MiB pages of
; both machines' virtio-mmio windows, GDT, TSS, IDT) and drops to CPL3.  From there on the driver is user
; code: it finds the disk, initialises it, writes descriptors and the available ring, writes QueueNotify,
; polls the used ring and checksums the data, all at CPL3 (natively on the nested kvm_pvm backend, whose
; CPL0 is emulated); CPL0 is entered (int3) only to print and to exit.  No interrupts: IF stays 0 and the
; available ring asks for none (VIRTQ_AVAIL_F_NO_INTERRUPT).
;
; The disk is the first virtio-mmio window, version 2 (virtio 1.x), whose device ID is 2, found by reading
; the magic in the candidate windows of both machines: pykvm's, 0xd0000000 + i * 0x1000 (i < 8), then QEMU
; microvm's, 0xfeb00000 + i * 0x200 (i < 24).  (QEMU's virtio-mmio is legacy, version 1, unless started with
; -global virtio-mmio.force-legacy=false; a version-1 window is skipped.)  Initialisation is virtio 1.2
; 3.1.1 with VIRTIO_F_VERSION_1 as the only feature, one queue of QUEUE_SIZE entries.
;
; `depth` requests are in flight (queue depth 1..8): request slot j owns descriptors 3j (the 16-byte header,
; device-readable), 3j + 1 (its data buffer of `size` bytes) and 3j + 2 (its status byte), chained once at
; set-up.  The guest makes all slots available and notifies once, then: wait for the used index to move;
; for every new used element check its status and length, checksum its buffer and put the slot back with
; the next request; one QueueNotify for all the slots put back; until `count` requests completed.  Request i
; reads (mode 0) or writes (mode 1) `size` bytes at sector (i mod (capacity / per)) * per, per = size / 512.
; Before a write, its buffer holds the qwords (i << 32) | k, k = 0 .. size/8 - 1 (little-endian).
;
; Checksum (order-independent, as completions may come in any order): for request i, s_i = the sum of the
; buffer's little-endian qwords mod 2^64 after the request (what was read, or written); checksum = the sum
; of rol64(s_i, i mod 64) mod 2^64 over all requests.  bench/bench_virtio.py computes it from the image.
;
; Parameter block (file offsets; the benchmark patches the inputs into a copy of the file):
;   32  count     qword  requests (0: find and initialise the disk, report, exit)
;   40  size      qword  bytes per request: a multiple of 512, at most 65536
;   48  depth     qword  requests in flight, 1..8
;   56  mode      qword  0 read (VIRTIO_BLK_T_IN), 1 write (VIRTIO_BLK_T_OUT)
; Results, written at CPL3 into the same block, and printed on COM1 at the end:
;   64  checksum  qword
;   72  done      qword  requests completed with status OK
;   80  capacity  qword  the disk's capacity in sectors
;   88  cycles    qword  TSC ticks from the first submission to the last completion
;   96  window    qword  the disk's virtio-mmio window
;  104  detail    qword  on an error: the status byte (exit 3) or the used length (exit 6)
; The report line, always:
;   "bench_blk_user: done <done> checksum <16 hex> cycles <cycles> capacity <sectors> window <8 hex>\n"
; Exit values (status (v << 1) | 1), each failure after a line "bench_blk_user: <what>\n":
;   0  every request completed with status OK
;   2  no virtio-blk (version 2) in any window
;   3  the device refused initialisation (features, queue size) or a request's status byte is not 0
;   4  the used ring did not move within VIRTIO_TIMEOUT_TSC TSC ticks (~6-10 s)
;   5  bad parameters (size, depth, mode), or a disk smaller than one request
;   6  a used element with a wrong id or length (detail = the length)
;   0x7f  an unexpected #UD/#DF/#GP/#PF (lib/cpl3.inc)

; ---- the multiboot header and the parameter block: the file's first bytes ---------------------------
bits 32
org 0x100000

%include "lib/multiboot_aout.inc"
        MULTIBOOT_AOUT_HEADER start32

p_count:        dq 1024                 ; 32
p_size:         dq 65536                ; 40
p_depth:        dq 1                    ; 48
p_mode:         dq 0                    ; 56
r_checksum:     dq 0                    ; 64
r_done:         dq 0                    ; 72
r_capacity:     dq 0                    ; 80
r_cycles:       dq 0                    ; 88
r_window:       dq 0                    ; 96
r_detail:       dq 0                    ; 104

; ---- 32-bit protected mode: into long mode on page tables for the first 4 MiB --------------------------
%include "lib/multiboot_long.inc"

start32:
        MULTIBOOT_LONG_MODE start64

; ---- 64-bit: the kernel ------------------------------------------------------------------------------
bits 64
default rel

%define CPL3_MAP_IO 0xd0000000          ; pykvm's windows; QEMU's 2 MiB page is added below
%define VQ_SIZE 32                      ; queue entries: 3 descriptors for each of up to 8 slots
%include "lib/serial.inc"
%include "lib/cpl3.inc"
%include "lib/virtio.inc"

QEMU_MMIO_BASE  equ 0xfeb00000          ; QEMU microvm: 24 windows of 0x200 bytes
QEMU_MMIO_STRIDE equ 0x200
QEMU_MMIO_WINDOWS equ 24
MAX_DEPTH       equ 8
MAX_SIZE        equ 65536
MODE_READ       equ 0
MODE_WRITE      equ 1
KC_EXIT         equ 0                   ; kernel calls (RAX, then int3): EDI = exit value
KC_PUTS         equ 1                   ;                                  RSI -> NUL-terminated line

EXIT_OK         equ 0
EXIT_NO_DEVICE  equ 2
EXIT_DEVICE_ERROR equ 3
EXIT_TIMEOUT    equ 4
EXIT_BAD_PARAMS equ 5
EXIT_BAD_USED   equ 6

start64:
        CPL3_INIT
        mov rax, (QEMU_MMIO_BASE & ~0x1fffff) | PAGE_PRESENT_RW_USER | PAGE_HUGE
        mov [pd_io + ((QEMU_MMIO_BASE >> 21) & 511) * 8], rax
        mov rax, cr3                    ; flush the TLB: the new entry is in use from here
        mov cr3, rax
        CPL3_ENTER user_main, user_stack_top

; int3 from CPL3: RAX = KC_EXIT (EDI = value) or KC_PUTS (RSI -> line)
kernel_call:
        cmp eax, KC_EXIT
        je .exit
        call serial_puts
        iretq
.exit:  mov eax, edi
        out EXIT_PORT, al
        cli
.halt:  hlt
        jmp .halt

        CPL3_FAULT_HANDLERS
%include "lib/serial_code.inc"

; ---- CPL3: the driver --------------------------------------------------------------------------------
; Registers of the request loop: R12 = the window, R13 = count, R14 = requests submitted, R15 = checksum,
; RBX = requests completed, EBP = size; [used_seen] and [avail_idx] are the ring positions.
user_main:
        xor eax, eax
        mov [r_checksum], rax
        mov [r_done], rax
        mov [r_capacity], rax
        mov [r_cycles], rax
        mov [r_window], rax
        mov [r_detail], rax

        mov rax, [p_size]               ; parameters: 512 <= size <= 64 KiB, a multiple of 512
        test eax, 511
        jnz bad_params
        test rax, rax
        jz bad_params
        cmp rax, MAX_SIZE
        ja bad_params
        mov ebp, eax
        mov rax, [p_depth]
        test rax, rax
        jz bad_params
        cmp rax, MAX_DEPTH
        ja bad_params
        cmp qword [p_mode], MODE_WRITE
        ja bad_params

        call find_disk                  ; -> R12 = the window, or 0
        test r12, r12
        jz no_device
        mov [r_window], r12
        call init_disk                  ; CF set: refused
        jc refused
        call read_capacity              ; -> RAX
        mov [r_capacity], rax
        mov ecx, ebp
        shr ecx, 9                      ; sectors per request
        xor edx, edx
        div rcx                         ; RAX = requests that fit on the disk
        test rax, rax
        jz bad_params
        mov [chunks], rax
        call build_chains

        mov r13, [p_count]
        xor r14d, r14d
        xor r15d, r15d
        xor ebx, ebx
        rdtsc
        shl rdx, 32
        or rax, rdx
        mov [tsc_start], rax
        xor ecx, ecx                    ; slot
.first: cmp rcx, [p_depth]
        jae .first_done
        cmp r14, r13
        jae .first_done
        call submit                     ; slot RCX gets request R14
        inc rcx
        jmp .first
.first_done:
        call publish                    ; avail.idx and QueueNotify, if anything was submitted

.wait:  cmp rbx, r13
        jae .done
        call wait_used                  ; CF set: timeout
        jc timeout
.next_used:
        movzx eax, word [disk_q + VQ_USED + VIRTQ_RING_IDX]
        cmp ax, [used_seen]
        je .put_back
        call complete                   ; the used element at used_seen; may submit again
        jmp .next_used
.put_back:
        call publish
        jmp .wait

.done:  rdtsc
        shl rdx, 32
        or rax, rdx
        sub rax, [tsc_start]
        mov [r_cycles], rax
        mov [r_checksum], r15
        mov [r_done], rbx
        call report
        mov edi, EXIT_OK
        mov eax, KC_EXIT
        int3

; Find the first version-2 virtio-blk window: -> R12 (0 if none).
find_disk:
        mov r12d, VIRTIO_MMIO_BASE
        mov ecx, VIRTIO_MMIO_WINDOWS
        mov edx, VIRTIO_MMIO_STRIDE
        call .scan
        jnc .found
        mov r12d, QEMU_MMIO_BASE
        mov ecx, QEMU_MMIO_WINDOWS
        mov edx, QEMU_MMIO_STRIDE
        call .scan
        jnc .found
        xor r12d, r12d
.found: ret
.scan:  cmp dword [r12 + VIRTIO_REG_MAGIC], VIRTIO_MMIO_MAGIC   ; ECX windows from R12, EDX apart
        jne .skip
        cmp dword [r12 + VIRTIO_REG_VERSION], VIRTIO_MMIO_VERSION
        jne .skip
        cmp dword [r12 + VIRTIO_REG_DEVICE_ID], VIRTIO_ID_BLOCK
        je .hit
.skip:  add r12, rdx
        dec ecx
        jnz .scan
        stc
        ret
.hit:   clc
        ret

; virtio 1.2 3.1.1 on the window at R12: CF set if the device refuses.
init_disk:
        mov dword [r12 + VIRTIO_REG_STATUS], 0           ; reset
        mov ecx, VIRTIO_RESET_POLLS
.reset: cmp dword [r12 + VIRTIO_REG_STATUS], 0
        je .reset_done
        dec ecx
        jnz .reset
        jmp .refuse
.reset_done:
        mov dword [r12 + VIRTIO_REG_STATUS], VIRTIO_STATUS_ACKNOWLEDGE
        mov dword [r12 + VIRTIO_REG_STATUS], VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER
        mov dword [r12 + VIRTIO_REG_DEVICE_FEATURES_SEL], 1
        test dword [r12 + VIRTIO_REG_DEVICE_FEATURES], VIRTIO_F_VERSION_1_HI
        jz .refuse
        mov dword [r12 + VIRTIO_REG_DRIVER_FEATURES_SEL], 0
        mov dword [r12 + VIRTIO_REG_DRIVER_FEATURES], 0
        mov dword [r12 + VIRTIO_REG_DRIVER_FEATURES_SEL], 1
        mov dword [r12 + VIRTIO_REG_DRIVER_FEATURES], VIRTIO_F_VERSION_1_HI
        mov dword [r12 + VIRTIO_REG_STATUS], VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK
        test dword [r12 + VIRTIO_REG_STATUS], VIRTIO_STATUS_FEATURES_OK
        jz .refuse
        mov dword [r12 + VIRTIO_REG_QUEUE_SEL], 0
        cmp dword [r12 + VIRTIO_REG_QUEUE_NUM_MAX], VQ_SIZE
        jb .refuse
        mov dword [r12 + VIRTIO_REG_QUEUE_NUM], VQ_SIZE
        mov word [disk_q + VQ_AVAIL + VIRTQ_RING_FLAGS], VIRTQ_AVAIL_F_NO_INTERRUPT
        lea rax, [disk_q + VQ_DESC]
        mov [r12 + VIRTIO_REG_QUEUE_DESC_LOW], eax
        shr rax, 32
        mov [r12 + VIRTIO_REG_QUEUE_DESC_HIGH], eax
        lea rax, [disk_q + VQ_AVAIL]
        mov [r12 + VIRTIO_REG_QUEUE_DRIVER_LOW], eax
        shr rax, 32
        mov [r12 + VIRTIO_REG_QUEUE_DRIVER_HIGH], eax
        lea rax, [disk_q + VQ_USED]
        mov [r12 + VIRTIO_REG_QUEUE_DEVICE_LOW], eax
        shr rax, 32
        mov [r12 + VIRTIO_REG_QUEUE_DEVICE_HIGH], eax
        mov dword [r12 + VIRTIO_REG_QUEUE_READY], 1
        mov dword [r12 + VIRTIO_REG_STATUS], VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK | VIRTIO_STATUS_DRIVER_OK
        test dword [r12 + VIRTIO_REG_STATUS], VIRTIO_STATUS_NEEDS_RESET
        jnz .refuse
        clc
        ret
.refuse:
        mov dword [r12 + VIRTIO_REG_STATUS], VIRTIO_STATUS_FAILED
        stc
        ret

; The capacity (config le64 at 0x100), read until the configuration generation holds still: -> RAX.
read_capacity:
.again: mov ecx, [r12 + VIRTIO_REG_CONFIG_GENERATION]
        mov eax, [r12 + VIRTIO_REG_CONFIG + VIRTIO_BLK_CFG_CAPACITY]
        mov edx, [r12 + VIRTIO_REG_CONFIG + VIRTIO_BLK_CFG_CAPACITY + 4]
        cmp ecx, [r12 + VIRTIO_REG_CONFIG_GENERATION]
        jne .again
        shl rdx, 32
        or rax, rdx
        ret

; Chain every slot's three descriptors once: header -> buffer -> status.
build_chains:
        mov edx, VIRTIO_BLK_T_IN
        mov r8d, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE          ; the buffer's flags
        cmp qword [p_mode], MODE_WRITE
        jne .shape
        mov edx, VIRTIO_BLK_T_OUT
        mov r8d, VIRTQ_DESC_F_NEXT
.shape: xor ecx, ecx                                            ; slot
.slot:  mov rax, rcx
        shl rax, 4
        lea rsi, [headers + rax]                                ; 16 bytes per header
        mov [rsi + VIRTIO_BLK_REQ_TYPE], edx
        mov dword [rsi + VIRTIO_BLK_REQ_RESERVED], 0
        imul eax, ecx, 3 * VIRTQ_DESC_BYTES
        lea rdi, [disk_q + VQ_DESC + rax]                       ; descriptor 3j
        mov [rdi + VIRTQ_DESC_ADDR], rsi
        mov dword [rdi + VIRTQ_DESC_LEN], VIRTIO_BLK_REQ_BYTES
        mov word [rdi + VIRTQ_DESC_FLAGS], VIRTQ_DESC_F_NEXT
        lea eax, [ecx * 3 + 1]
        mov [rdi + VIRTQ_DESC_NEXT], ax
        mov rax, rcx
        shl rax, 16
        lea rsi, [buffers + rax]                                ; 64 KiB per buffer
        mov [rdi + VIRTQ_DESC_BYTES + VIRTQ_DESC_ADDR], rsi
        mov [rdi + VIRTQ_DESC_BYTES + VIRTQ_DESC_LEN], ebp
        mov [rdi + VIRTQ_DESC_BYTES + VIRTQ_DESC_FLAGS], r8w
        lea eax, [ecx * 3 + 2]
        mov [rdi + VIRTQ_DESC_BYTES + VIRTQ_DESC_NEXT], ax
        lea rsi, [statuses + rcx]
        mov [rdi + 2 * VIRTQ_DESC_BYTES + VIRTQ_DESC_ADDR], rsi
        mov dword [rdi + 2 * VIRTQ_DESC_BYTES + VIRTQ_DESC_LEN], 1
        mov word [rdi + 2 * VIRTQ_DESC_BYTES + VIRTQ_DESC_FLAGS], VIRTQ_DESC_F_WRITE
        inc ecx
        cmp ecx, MAX_DEPTH
        jb .slot
        ret

; Slot RCX gets request R14 (then R14 + 1): its sector, its status byte, for a write its pattern; its head
; descriptor goes into the available ring (published by `publish`).  Preserves RCX.
submit:
        push rcx
        mov [slot_request + rcx * 8], r14
        mov byte [statuses + rcx], 0xff                         ; not a status the device may write
        mov rax, r14                                            ; sector = (i mod chunks) * per
        xor edx, edx
        div qword [chunks]
        mov rax, rdx
        mov edx, ebp
        shr edx, 9
        imul rax, rdx
        mov rdx, rcx
        shl rdx, 4
        mov [headers + rdx + VIRTIO_BLK_REQ_SECTOR], rax
        cmp qword [p_mode], MODE_WRITE
        jne .avail
        mov rdi, rcx                                            ; qword k = (i << 32) | k
        shl rdi, 16
        lea rdi, [buffers + rdi]
        mov rax, r14
        shl rax, 32
        mov edx, ebp
        shr edx, 3
.fill:  mov [rdi], rax
        inc rax
        add rdi, 8
        dec edx
        jnz .fill
.avail: movzx eax, word [avail_idx]
        mov edx, eax
        and edx, VQ_SIZE - 1
        imul ecx, ecx, 3
        mov [disk_q + VQ_AVAIL + VIRTQ_RING_ENTRIES + rdx * 2], cx
        inc eax
        mov [avail_idx], ax
        inc r14
        pop rcx
        ret

; Make the submitted slots visible (avail.idx) and notify, if any were submitted since the last time.
publish:
        movzx eax, word [avail_idx]
        cmp ax, [disk_q + VQ_AVAIL + VIRTQ_RING_IDX]
        je .none
        mov [disk_q + VQ_AVAIL + VIRTQ_RING_IDX], ax            ; x86 keeps the stores in order
        mov dword [r12 + VIRTIO_REG_QUEUE_NOTIFY], 0
.none:  ret

; Spin until the used index differs from [used_seen]: CF set after VIRTIO_TIMEOUT_TSC ticks.
wait_used:
        rdtsc
        shl rdx, 32
        or rax, rdx
        mov rsi, rax
.spin:  movzx eax, word [disk_q + VQ_USED + VIRTQ_RING_IDX]
        cmp ax, [used_seen]
        jne .moved
        pause
        rdtsc
        shl rdx, 32
        or rax, rdx
        sub rax, rsi
        mov rdx, VIRTIO_TIMEOUT_TSC
        cmp rax, rdx
        jb .spin
        stc
        ret
.moved: clc
        ret

; The used element at [used_seen]: check it, checksum the slot's buffer, put the slot back if requests
; remain.  RBX = completed, R15 = checksum.
complete:
        movzx eax, word [used_seen]
        mov edx, eax
        inc eax
        mov [used_seen], ax
        and edx, VQ_SIZE - 1
        mov ecx, [disk_q + VQ_USED + VIRTQ_RING_ENTRIES + rdx * VIRTQ_USED_ELEM_BYTES]      ; id
        mov r8d, [disk_q + VQ_USED + VIRTQ_RING_ENTRIES + rdx * VIRTQ_USED_ELEM_BYTES + VIRTQ_USED_ELEM_LEN]
        mov eax, ecx                                            ; slot = id / 3, id a head
        xor edx, edx
        mov r9d, 3
        div r9d
        test edx, edx
        jnz .bad_id
        cmp eax, [p_depth]
        jae .bad_id
        mov ecx, eax
        movzx eax, byte [statuses + rcx]
        test eax, eax
        jnz .failed
        lea eax, [ebp + 1]                                      ; a read writes the data and the status byte
        cmp qword [p_mode], MODE_WRITE
        jne .length
        mov eax, 1
.length:
        cmp r8d, eax
        jne .bad_length
        mov rsi, rcx                                            ; s = the buffer's qword sum
        shl rsi, 16
        lea rsi, [buffers + rsi]
        mov edx, ebp
        shr edx, 3
        xor eax, eax
.sum:   add rax, [rsi]
        add rsi, 8
        dec edx
        jnz .sum
        push rcx
        mov rcx, [slot_request + rcx * 8]                       ; checksum += rol64(s, i mod 64)
        rol rax, cl
        pop rcx
        add r15, rax
        inc rbx
        cmp r14, r13
        jae .no_more
        call submit
.no_more:
        ret
.bad_id:
        mov r8d, ecx
.bad_length:
        add rsp, 8                                              ; leave the request loop
        mov [r_detail], r8
        mov [r_done], rbx
        lea rsi, [msg_bad_used]
        mov edi, EXIT_BAD_USED
        jmp fail
.failed:
        add rsp, 8
        mov [r_detail], rax
        mov [r_done], rbx
        lea rsi, [msg_failed]
        mov edi, EXIT_DEVICE_ERROR
        jmp fail

; "bench_blk_user: done <n> checksum <hex> cycles <n> capacity <n> window <hex>\n" on COM1.
report:
        lea rdi, [line]
        lea rsi, [msg_done]
        call str_append
        mov rax, [r_done]
        call dec_append
        lea rsi, [msg_checksum]
        call str_append
        mov rax, [r_checksum]
        mov cl, 16
        call hex_append
        lea rsi, [msg_cycles]
        call str_append
        mov rax, [r_cycles]
        call dec_append
        lea rsi, [msg_capacity]
        call str_append
        mov rax, [r_capacity]
        call dec_append
        lea rsi, [msg_window]
        call str_append
        mov rax, [r_window]
        mov cl, 8
        call hex_append
        mov word [rdi], 10                                      ; "\n", NUL
        lea rsi, [line]
        mov eax, KC_PUTS
        int3
        ret

no_device:
        lea rsi, [msg_no_device]
        mov edi, EXIT_NO_DEVICE
        jmp fail
refused:
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
fail:   mov [r_checksum], r15
        mov eax, KC_PUTS                                        ; RSI -> the line; EDI survives
        int3
        push rdi
        call report
        pop rdi
        mov eax, KC_EXIT
        int3

%include "lib/format_code.inc"

        CPL3_TABLES kernel_call

msg_done:       db "bench_blk_user: done ", 0
msg_checksum:   db " checksum ", 0
msg_cycles:     db " cycles ", 0
msg_capacity:   db " capacity ", 0
msg_window:     db " window ", 0
msg_no_device:  db "bench_blk_user: no virtio-blk (virtio-mmio version 2)", 10, 0
msg_refused:    db "bench_blk_user: device refused initialisation", 10, 0
msg_bad_params: db "bench_blk_user: bad parameters", 10, 0
msg_timeout:    db "bench_blk_user: timeout", 10, 0
msg_failed:     db "bench_blk_user: request failed", 10, 0
msg_bad_used:   db "bench_blk_user: wrong used element", 10, 0
        CPL3_STRINGS
load_end:

; ---- zero-initialised memory (the loader clears it up to bss_end) -----------------------------------------
        CPL3_BSS
        MULTIBOOT_LONG_MODE_BSS         ; the 32-bit code's page tables
buffers:        resb MAX_DEPTH * MAX_SIZE
        VIRTQ disk_q                    ; 16-byte aligned (the buffers are)
headers:        resb MAX_DEPTH * VIRTIO_BLK_REQ_BYTES
slot_request:   resq MAX_DEPTH
chunks:         resq 1
tsc_start:      resq 1
avail_idx:      resw 1
used_seen:      resw 1
statuses:       resb MAX_DEPTH
line:           resb 160
bss_end:
