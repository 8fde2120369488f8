; bench_snapshot.asm - the snapshot benchmark guest (bench_snapshot.bin; bench/bench_snapshot.py).  pykvm and
; QEMU boot the same file: a multiboot kernel (flag bit 16, the a.out kludge: loaded at 0x100000 as it is),
; entered in 32-bit protected mode.  It goes to long mode itself, sets up lib/cpl3.inc's kernel and drops to
; CPL3, where it does its work (natively on the nested kvm_pvm backend, whose CPL0 is emulated):
;
; 1. It writes the first qword of every 4 KiB page of `touch` bytes from TOUCH_BASE (4 MiB) up with that
;    page's address (a guest that has used some memory: pages that are not zero, each one different).
; 2. The snapshot point: it prints "bench_snapshot: touched <pages decimal> pages\n" and writes
;    SNAPSHOT_POINT (0x20) to the debug-exit port, where pykvm's run ends and the snapshot is taken.  The
;    next instruction, the first one a restored machine executes, writes RESUMED (0x21) to the same port.
;    With `hold` set (QEMU, which cannot stop a run at a port write and exits at its debug-exit device
;    instead), the guest waits between the two until port 0xf4 reads other than 0xff: QEMU reads an
;    unassigned port as all ones, and its isa-debug-exit as 0, so a machine started without the device
;    waits there (to be stopped and saved), and one restored with the device goes on to RESUMED.
; 3. Then, in rounds for ever: it writes the first qword of each of `redirty` pages from TOUCH_BASE up
;    with the complement of the page's address and writes DIRTIED (0x22) to the debug-exit port.  A reset
;    to the snapshot brings back each page's address.
;
; The port writes are made from CPL0 (int3 through a DPL3 gate: lib/cpl3.inc's TSS has no I/O bitmap);
; each one therefore also writes the kernel stack page.  The touched and rewritten pages are clamped to
; the RAM the multiboot information reports (mem_upper) and to the low 1 GiB lib/cpl3.inc maps.
;
; Parameter block (file offsets; the benchmark patches a copy):
;   32  touch    qword  bytes to write before the snapshot point (rounded down to pages)
;   40  redirty  qword  pages to rewrite in each round after it
;   48  hold     qword  1: wait at the snapshot point for a debug-exit device to appear (see 2.)
; Exit values (status (v << 1) | 1): 0x20 snapshot point, 0x21 resumed, 0x22 a round done; 0x7f an
; unexpected #UD/#DF/#GP/#PF (lib/cpl3.inc, after "fault <vector>\n").

bits 32
org 0x100000

%include "lib/multiboot_aout.inc"
        MULTIBOOT_AOUT_HEADER start32

p_touch:        dq 16 << 20             ; 32
p_redirty:      dq 0                    ; 40
p_hold:         dq 0                    ; 48

%include "lib/multiboot_long.inc"

MB_MAGIC        equ 0x2badb002
MB_INFO_MEM     equ 1 << 0              ; flags bit 0: mem_lower and mem_upper are valid

start32:
        xor edx, edx                    ; RAM above 1 MiB, in KiB (0: unknown)
        cmp eax, MB_MAGIC
        jne .no_info
        test dword [ebx], MB_INFO_MEM
        jz .no_info
        mov edx, [ebx + 8]              ; mem_upper
.no_info:
        mov [mem_upper_kib], edx
        MULTIBOOT_LONG_MODE start64

bits 64
default rel

%include "lib/serial.inc"
%include "lib/cpl3.inc"

TOUCH_BASE      equ 4 << 20
MAPPED_END      equ 1 << 30             ; lib/cpl3.inc maps the low 1 GiB
PAGE            equ 4096
SNAPSHOT_POINT  equ 0x20
RESUMED         equ 0x21
DIRTIED         equ 0x22
NO_DEVICE       equ 0xff                ; what QEMU reads from an unassigned port
KC_POINT        equ 0                   ; kernel calls (RAX, then int3)
KC_DIRTIED      equ 1

start64:
        CPL3_INIT
        mov eax, [mem_upper_kib]        ; the pages that may be written: up to the end of RAM, or of the map
        shl rax, 10
        add rax, 1 << 20
        mov ecx, MAPPED_END
        cmp rax, rcx
        cmova rax, rcx
        sub rax, TOUCH_BASE
        jae .fits
        xor eax, eax
.fits:  shr rax, 12
        mov [usable_pages], rax
        CPL3_ENTER user_main, user_stack_top

; int3 from CPL3: RAX = KC_POINT (RDX = pages touched) or KC_DIRTIED
kernel_call:
        cmp eax, KC_DIRTIED
        je .dirtied
        PRINT msg_touched
        mov rax, rdx
        call serial_dec
        PRINT msg_pages
        cmp qword [p_hold], 0
        jne .hold
        mov al, SNAPSHOT_POINT
        out EXIT_PORT, al               ; pykvm's run ends here; the snapshot resumes at the next instruction
        jmp .resumed
.hold:  in al, EXIT_PORT
        cmp al, NO_DEVICE
        je .hold
.resumed:
        mov al, RESUMED
        out EXIT_PORT, al
        iretq
.dirtied:
        mov al, DIRTIED
        out EXIT_PORT, al
        iretq

        CPL3_FAULT_HANDLERS
%include "lib/serial_code.inc"

; ---- CPL3 (no stack: a round writes only its pages and, through the kernel call, the kernel stack) -----
%macro CLAMP_PAGES 0                    ; RCX = pages, at most usable_pages
        cmp rcx, [usable_pages]
        jbe %%ok
        mov rcx, [usable_pages]
%%ok:
%endmacro

user_main:
        mov rcx, [p_touch]
        shr rcx, 12
        CLAMP_PAGES
        mov rdx, rcx
        mov rdi, TOUCH_BASE
        jrcxz .touched
.touch: mov [rdi], rdi
        add rdi, PAGE
        dec rcx
        jnz .touch
.touched:
        mov eax, KC_POINT
        int3
.round: mov rcx, [p_redirty]
        CLAMP_PAGES
        mov rdi, TOUCH_BASE
        jrcxz .done
.write: mov rax, rdi
        not rax
        mov [rdi], rax
        add rdi, PAGE
        dec rcx
        jnz .write
.done:  mov eax, KC_DIRTIED
        int3
        jmp .round

        CPL3_TABLES kernel_call

msg_touched:    db "bench_snapshot: touched ", 0
msg_pages:      db " pages", 10, 0
        CPL3_STRINGS
load_end:

        CPL3_BSS
        MULTIBOOT_LONG_MODE_BSS
mem_upper_kib:  resd 1
                resd 1
usable_pages:   resq 1
bss_end:
