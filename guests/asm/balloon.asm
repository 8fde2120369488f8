; balloon.asm - long-mode flat binary (balloon.bin, loaded at 0x100000), entered at CPL0: a guest with a
; minimal virtio-balloon driver (virtio 1.2, 5.5) that follows the host's target.  Run it as
;     pykvm run build/balloon.bin --mode long --balloon [--control PATH] [--cmdline "ws=16 touch=64"]
; and change the target with `pykvm ctl PATH balloon 32M` (or `vm.balloon.target = "32M"`).
;
; CPL0 (emulated on the nested kvm_pvm backend, so it stays small): lib/cpl3.inc's page tables, GDT, TSS and
; IDT; the IDT grown to 48 gates with the PIC's vectors 0x20-0x2f; the PICs remapped there with IRQ 0
; unmasked; the PIT at 100 Hz; the RAM size (fw_cfg key 0x03) and the command line (keys 0x14/0x15) read
; from fw_cfg.  Then it drops to CPL3, where the driver runs natively and enters CPL0 only through int3 for
; the kernel calls of lib/virtio.inc and four of its own (BSYS_*: open the balloon with the features it
; wants, write `actual`, poll COM1 for a byte, sleep).  BSYS_OPEN also unmasks the balloon's own interrupt
; line (pykvm's virtio IRQs, by window: 5, 6, 7, 10, 11, 12, 14, 15), so a configuration-change interrupt
; ends the sleep at once; the PIT tick ends it at the latest after 10 ms.  IF is 0 except inside BSYS_SLEEP.
;
; Memory: RAM from 1 MiB is the image and its bss, then the pool, from the next 2 MiB boundary up to the
; end of RAM (at most 1 GiB: what the page tables map).  The guest touches (writes one byte per 4 KiB page)
; `touch` MiB of the pool from its bottom at start, as a guest that has been running for a while, and
; re-touches its working set, the bottom `ws` MiB, on every wake-up.  The balloon grows down from the top
; of the pool, 4 KiB pages handed over in chains of up to 8 descriptors of up to 256 PFNs (1 KiB) each, and
; shrinks from its bottom (the pages inflated last), updating `actual` after each chain.  The working set
; never extends into the balloon.
;
; Command line (fw_cfg; pykvm --cmdline): `ws=<MiB>` working set (default 16), `touch=<MiB>` touched at
; start (default: the whole pool).  Serial input (COM1, one command per line): `w<MiB>` sets the working
; set (and touches it), `q` ends the guest.
;
; Features: VIRTIO_F_VERSION_1 and, when offered, VIRTIO_BALLOON_F_STATS_VQ (queues: 0 inflateq, 1 deflateq,
; 2 statsq).  Statistics (10-byte {le16 tag, le64 value} entries, bytes): MEMTOT (5) = RAM - balloon,
; MEMFREE (4) = pool outside the balloon, the touched pages and the working set, CACHES (7) = touched but
; outside the working set, AVAIL (6) = MEMFREE + CACHES; so MEMTOT - AVAIL = the memory below the pool + the
; working set (what the host's policy counts as active).  The buffer is posted once
; after the first touch and again whenever the device returns it (5.5.6.3: its request for fresh numbers).
;
; Prints (COM1):
;     balloon: ram <MiB> MiB, pool <MiB> MiB, stats <on|off>, working set <MiB> MiB, touched <MiB> MiB\n
;     balloon: <pages> pages (<MiB> MiB)\n                     each time it has followed a new target
;     balloon: full at <pages> pages\n                          a target beyond the pool (once per target)
;     balloon: working set <MiB> MiB\n                          after `w<MiB>`
;     balloon: bye\n                                            after `q`, then exit value 0 (status 1)
; Errors (exit value -> status): no balloon device "balloon: no device\n" 2 -> 5; the device refused the
; features or a queue "balloon: device refused initialisation\n" 3 -> 7; a used ring did not move within
; VIRTIO_TIMEOUT_TSC ticks "balloon: timeout, device status <hex>\n" 4 -> 9; fw_cfg gave no usable RAM size
; "balloon: no RAM size\n" 5 -> 11; an unexpected #UD/#DF/#GP/#PF "fault <vector>\n" 0x7f -> 255.

bits 64
default rel
org 0x100000

%define CPL3_MAP_IO 0xd0000000          ; map the virtio-mmio windows (lib/cpl3.inc)
%include "lib/serial.inc"
%include "lib/cpl3.inc"
%include "lib/virtio.inc"

BALLOON_F_STATS_VQ      equ 1 << 1
BALLOON_CFG_NUM_PAGES   equ 0           ; le32, then le32 actual at 4
BALLOON_CFG_ACTUAL      equ 4
BALLOON_QUEUES_MAX      equ 3           ; inflateq, deflateq, statsq
PFNS_PER_DESC           equ 256         ; one 1 KiB descriptor, as Linux's VIRTIO_BALLOON_ARRAY_PFNS_MAX
DESCS_PER_BATCH         equ VQ_SIZE     ; a chain of up to 8 such descriptors per notification
PFNS_PER_BATCH          equ PFNS_PER_DESC * DESCS_PER_BATCH
STAT_SWAP_TAGS_BYTES    equ 10          ; one statistics entry: le16 tag, le64 value
STAT_MEMFREE            equ 4
STAT_MEMTOT             equ 5
STAT_AVAIL              equ 6
STAT_CACHES             equ 7
STAT_ENTRIES            equ 4

PAGE                    equ 4096
MIB                     equ 1 << 20
HUGE                    equ 2 * MIB
MAPPED_LIMIT            equ 1 << 30     ; lib/cpl3.inc identity maps the low 1 GiB
DEFAULT_WS_MIB          equ 16
LINE_BYTES              equ 160
CMD_BYTES               equ 32
CMDLINE_BYTES           equ 256

; The PC platform (8259 PICs, 8254 PIT, fw_cfg), as lib/pc.inc names them for the 32-bit guests.
PIC1_CMD                equ 0x20
PIC1_DATA               equ 0x21
PIC2_CMD                equ 0xa0
PIC2_DATA               equ 0xa1
PIC_EOI                 equ 0x20
PIC_VECTOR              equ 0x20        ; IRQ 0-7 -> 0x20-0x27, IRQ 8-15 -> 0x28-0x2f
PIT_CH0                 equ 0x40
PIT_CMD                 equ 0x43
PIT_CH0_MODE2           equ 0x34        ; channel 0, lobyte/hibyte, rate generator
PIT_DIV_100HZ           equ 11932
FW_CFG_SEL              equ 0x510
FW_CFG_DATA             equ 0x511
FW_CFG_RAM_SIZE         equ 0x03
FW_CFG_CMDLINE_SIZE     equ 0x14
FW_CFG_CMDLINE_DATA     equ 0x15
IDT_GATES               equ 0x30        ; exceptions and the two PICs' vectors

EXIT_OK                 equ 0
EXIT_NO_DEVICE          equ 2
EXIT_REFUSED            equ 3
EXIT_TIMEOUT            equ 4
EXIT_NO_RAM             equ 5

; Kernel calls of this guest (lib/virtio.inc's VSYS_* are 0-5).
BSYS_OPEN               equ 16          ; RDI -> 3 queue blocks, RSI -> name: EAX = VIRTIO_OPEN_*, EDX = features 0-31
BSYS_SET_ACTUAL         equ 17          ; RDI -> a queue block of the device, ESI = pages: write `actual`
BSYS_GETC               equ 18          ; EAX = the next byte from COM1, or -1 if none is waiting
BSYS_SLEEP              equ 19          ; sti; hlt; cli: until the PIT tick or the balloon's interrupt

; ---- CPL0: set up, then drop to user mode ---------------------------------------------------------------
image_start:
        CPL3_INIT
        call interrupts_init
        call fw_cfg_init
        CPL3_ENTER user_main, user_stack_top

; interrupts_init: the IDT of lib/cpl3.inc copied into big_idt with gates for vectors 0x20-0x2f added;
; the PICs (ICW1-4) at vectors 0x20/0x28, all masked but IRQ 0; the PIT at 100 Hz.
interrupts_init:
        lea rsi, [idt]
        lea rdi, [big_idt]
        mov ecx, (idt_end - idt) / 8
        rep movsq
        lea rdi, [big_idt + PIC_VECTOR * 16]
        lea rax, [isr_master]
        mov ecx, 8
        call set_gates
        lea rax, [isr_slave]
        mov ecx, 8
        call set_gates
        lidt [big_idt_ptr]
        mov al, 0x11                    ; ICW1: edge, cascade, ICW4 follows
        out PIC1_CMD, al
        out PIC2_CMD, al
        mov al, PIC_VECTOR              ; ICW2: vector bases
        out PIC1_DATA, al
        mov al, PIC_VECTOR + 8
        out PIC2_DATA, al
        mov al, 1 << 2                  ; ICW3: the slave on IRQ 2
        out PIC1_DATA, al
        mov al, 2
        out PIC2_DATA, al
        mov al, 0x01                    ; ICW4: 8086 mode
        out PIC1_DATA, al
        out PIC2_DATA, al
        mov al, 0xff & ~1               ; OCW1: IRQ 0 only
        out PIC1_DATA, al
        mov al, 0xff
        out PIC2_DATA, al
        mov al, PIT_CH0_MODE2
        out PIT_CMD, al
        mov al, PIT_DIV_100HZ & 0xff
        out PIT_CH0, al
        mov al, PIT_DIV_100HZ >> 8
        out PIT_CH0, al
        ret

; set_gates: RAX = handler, RDI -> first gate, ECX = count: 64-bit interrupt gates, DPL0; RDI advanced.
set_gates:
        mov rdx, rax
        shr rdx, 16
.gate:  mov [rdi], ax
        mov word [rdi + 2], KERNEL_CS
        mov word [rdi + 4], GATE_KERNEL << 8
        mov [rdi + 6], dx
        mov rsi, rdx
        shr rsi, 16
        mov [rdi + 8], esi
        mov dword [rdi + 12], 0
        add rdi, 16
        dec ecx
        jnz .gate
        ret

isr_master:
        push rax
        mov al, PIC_EOI
        out PIC1_CMD, al
        pop rax
        iretq

isr_slave:
        push rax
        mov al, PIC_EOI
        out PIC2_CMD, al
        out PIC1_CMD, al
        pop rax
        iretq

; fw_cfg_init: ram_size <- fw_cfg RAM size (u64); cmdline <- the command line (NUL-terminated, truncated).
fw_cfg_init:
        mov ax, FW_CFG_RAM_SIZE
        mov dx, FW_CFG_SEL
        out dx, ax
        mov dx, FW_CFG_DATA
        lea rdi, [ram_size]
        mov ecx, 8
.ram:   in al, dx
        mov [rdi], al
        inc rdi
        dec ecx
        jnz .ram
        mov ax, FW_CFG_CMDLINE_SIZE
        mov dx, FW_CFG_SEL
        out dx, ax
        mov dx, FW_CFG_DATA
        xor ecx, ecx                    ; u32 LE size, NUL included
        mov ebx, 4
.size:  in al, dx
        movzx eax, al
        shl eax, 24
        shr ecx, 8
        or ecx, eax
        dec ebx
        jnz .size
        cmp ecx, CMDLINE_BYTES - 1
        jbe .fits
        mov ecx, CMDLINE_BYTES - 1
.fits:  mov ax, FW_CFG_CMDLINE_DATA
        mov dx, FW_CFG_SEL
        out dx, ax
        mov dx, FW_CFG_DATA
        lea rdi, [cmdline]
        test ecx, ecx
        jz .done
.text:  in al, dx
        mov [rdi], al
        inc rdi
        dec ecx
        jnz .text
.done:  mov byte [rdi], 0
        ret

; balloon_service: the #BP handler: this guest's calls, then lib/virtio_code.inc's.
balloon_service:
        cmp eax, BSYS_SLEEP
        je .sleep
        cmp eax, BSYS_GETC
        je .getc
        cmp eax, BSYS_SET_ACTUAL
        je .actual
        cmp eax, BSYS_OPEN
        je .open
        jmp virtio_service
.sleep: sti                             ; the interrupt shadow covers hlt: no wake-up is lost
        hlt
        cli
        iretq
.getc:  push rdx
        mov dx, COM1_LSR
        in al, dx
        test al, LSR_DR
        mov eax, -1
        jz .none
        mov dx, COM1_DATA
        in al, dx
        movzx eax, al
.none:  pop rdx
        iretq
.actual:
        push rbx
        mov rbx, [rdi + VQ_BASE]
        mov [rbx + VIRTIO_REG_CONFIG + BALLOON_CFG_ACTUAL], esi
        pop rbx
        iretq
.open:  push rbx
        push rcx
        push rdi
        push r8
        call balloon_open
        pop r8
        pop rdi
        pop rcx
        pop rbx
        iretq

; balloon_open: BSYS_OPEN.  Initialises the balloon (3.1.1) with VERSION_1 and STATS_VQ if offered, its
; queues (2, or 3 with statistics), DRIVER_OK; unmasks its interrupt line.  Clobbers RBX, RCX, RDI, R8.
balloon_open:
        mov edx, VIRTIO_ID_BALLOON
        call virtio_find                ; RBX = the window
        mov eax, VIRTIO_OPEN_MISSING
        jc .out
        xor eax, eax
        mov [rbx + VIRTIO_REG_STATUS], eax
        mov ecx, VIRTIO_RESET_POLLS
.reset: mov eax, [rbx + VIRTIO_REG_STATUS]
        test eax, eax
        jz .ack
        dec ecx
        jnz .reset
        jmp .refused
.ack:   mov eax, VIRTIO_STATUS_ACKNOWLEDGE
        mov [rbx + VIRTIO_REG_STATUS], eax
        mov eax, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER
        mov [rbx + VIRTIO_REG_STATUS], eax
        mov eax, 1
        mov [rbx + VIRTIO_REG_DEVICE_FEATURES_SEL], eax
        mov eax, [rbx + VIRTIO_REG_DEVICE_FEATURES]
        test eax, VIRTIO_F_VERSION_1_HI
        jz .refused
        xor eax, eax
        mov [rbx + VIRTIO_REG_DEVICE_FEATURES_SEL], eax
        mov eax, [rbx + VIRTIO_REG_DEVICE_FEATURES]
        and eax, BALLOON_F_STATS_VQ
        mov r8d, eax                    ; R8D = the features of word 0 we take
        xor eax, eax
        mov [rbx + VIRTIO_REG_DRIVER_FEATURES_SEL], eax
        mov [rbx + VIRTIO_REG_DRIVER_FEATURES], r8d
        mov eax, 1
        mov [rbx + VIRTIO_REG_DRIVER_FEATURES_SEL], eax
        mov eax, VIRTIO_F_VERSION_1_HI
        mov [rbx + VIRTIO_REG_DRIVER_FEATURES], eax
        mov eax, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK
        mov [rbx + VIRTIO_REG_STATUS], eax
        mov eax, [rbx + VIRTIO_REG_STATUS]
        test eax, VIRTIO_STATUS_FEATURES_OK
        jz .refused
        xor ecx, ecx                    ; ECX = queue index
.queue: call virtq_setup
        jc .refused
        add rdi, VQ_BYTES
        inc ecx
        cmp ecx, 2
        jb .queue
        test r8d, BALLOON_F_STATS_VQ
        jz .ready
        cmp ecx, 3
        jb .queue
.ready: call virtio_driver_ok
        jc .refused
        call unmask_irq
        mov edx, r8d
        mov eax, VIRTIO_OPEN_OK
        ret
.refused:
        call virtio_fail
        mov eax, VIRTIO_OPEN_REFUSED
.out:   ret

; unmask_irq: RBX = the balloon's window -> its IRQ (pykvm's virtio_irqs by window) unmasked in the PIC.
unmask_irq:
        mov eax, ebx                    ; the windows are below 4 GiB
        sub eax, VIRTIO_MMIO_BASE
        shr eax, 12
        lea rcx, [virtio_irqs]
        movzx ecx, byte [rcx + rax]
        cmp ecx, 8
        jae .slave
        in al, PIC1_DATA
        mov dl, 1
        shl dl, cl
        not dl
        and al, dl
        out PIC1_DATA, al
        ret
.slave: sub ecx, 8
        in al, PIC2_DATA
        mov dl, 1
        shl dl, cl
        not dl
        and al, dl
        out PIC2_DATA, al
        in al, PIC1_DATA
        and al, ~(1 << 2)               ; the cascade
        out PIC1_DATA, al
        ret

; ---- CPL3: the driver ---------------------------------------------------------------------------------
user_main:
        mov rax, [ram_size]
        cmp rax, 4 * MIB
        jb no_ram
        mov rcx, MAPPED_LIMIT
        cmp rax, rcx
        jbe .ram_ok
        mov rax, rcx
.ram_ok:
        and rax, ~(PAGE - 1)
        mov [ram_size], rax
        mov [pool_end], rax
        lea rcx, [image_end]
        add rcx, HUGE - 1
        and rcx, ~(HUGE - 1)
        mov [pool_start], rcx
        cmp rcx, rax
        jae no_ram
        sub rax, rcx
        shr rax, 12
        mov [pool_pages], rax

        call parse_cmdline

        lea rdi, [q_inflate]            ; q_inflate, q_deflate, q_stats: consecutive blocks
        lea rsi, [name_balloon]
        VCALL BSYS_OPEN
        cmp eax, VIRTIO_OPEN_MISSING
        je no_device
        test eax, eax
        jnz refused
        mov [features], edx

        mov rax, [pool_start]           ; the first touch
        add rax, [touch_bytes]
        call clamp_to_pool
        mov [touched_top], rax
        mov rdi, [pool_start]
        mov rsi, rax
        call touch_range
        call touch_working_set

        lea rdi, [line]                 ; "balloon: ram <MiB> MiB, pool ..."
        lea rsi, [msg_ram]
        call str_append
        mov rax, [ram_size]
        shr rax, 20
        call dec_append
        lea rsi, [msg_pool]
        call str_append
        mov rax, [pool_pages]
        shr rax, 8
        call dec_append
        lea rsi, [msg_stats_on]
        test dword [features], BALLOON_F_STATS_VQ
        jnz .stats_word
        lea rsi, [msg_stats_off]
.stats_word:
        call str_append
        mov rax, [ws_bytes]
        shr rax, 20
        call dec_append
        lea rsi, [msg_touched]
        call str_append
        mov rax, [touched_top]
        sub rax, [pool_start]
        shr rax, 20
        call dec_append
        lea rsi, [msg_mib_nl]
        call str_append
        call print_line

        test dword [features], BALLOON_F_STATS_VQ
        jz main_loop
        call post_stats

main_loop:
        call follow_target
        call read_input
        test dword [features], BALLOON_F_STATS_VQ
        jz .touch
        movzx eax, word [q_stats + VQ_USED + VIRTQ_RING_IDX]
        cmp eax, [stats_wait]
        jne .touch
        call post_stats                 ; the device returned the buffer: it wants fresh numbers
.touch: call touch_working_set
        VCALL BSYS_SLEEP
        jmp main_loop

; follow_target: reads num_pages; inflates or deflates in batches until the balloon holds that many pages
; (or the pool is exhausted), updating `actual` after each batch; prints when it changed anything.
follow_target:
        lea rdi, [q_inflate]
        mov ecx, BALLOON_CFG_NUM_PAGES
        VCALL VSYS_CONFIG64             ; EAX = num_pages, upper half = actual
        mov eax, eax
        mov [wanted_pages], rax
        mov rbx, rax                    ; RBX = the target in pages
        cmp rbx, [pool_pages]
        jbe .reachable
        mov rbx, [pool_pages]
.reachable:
        xor r12d, r12d                  ; R12 = batches done
.step:  mov rax, [balloon_pages]
        cmp rbx, rax
        je .done
        ja .inflate
        sub rax, rbx                    ; deflate min(PFNS_PER_BATCH, balloon - target)
        mov ecx, PFNS_PER_BATCH
        cmp rax, rcx
        cmovb ecx, eax
        call deflate_batch
        inc r12
        jmp .step
.inflate:
        mov rcx, rbx
        sub rcx, rax
        mov eax, PFNS_PER_BATCH
        cmp rcx, rax
        cmova ecx, eax
        call inflate_batch
        inc r12
        jmp .step
.done:  test r12, r12
        jz .full
        lea rdi, [line]                 ; "balloon: <pages> pages (<MiB> MiB)"
        lea rsi, [msg_prefix]
        call str_append
        mov rax, [balloon_pages]
        call dec_append
        lea rsi, [msg_pages]
        call str_append
        mov rax, [balloon_pages]
        shr rax, 8
        call dec_append
        lea rsi, [msg_mib_paren]
        call str_append
        call print_line
.full:  mov rax, [wanted_pages]          ; a target beyond the pool: say so once
        cmp rax, [pool_pages]
        jbe .out
        cmp rax, [full_reported]
        je .out
        mov [full_reported], rax
        lea rdi, [line]
        lea rsi, [msg_full]
        call str_append
        mov rax, [balloon_pages]
        call dec_append
        lea rsi, [msg_pages_nl]
        call str_append
        call print_line
.out:   ret

; inflate_batch: ECX = pages (1..PFNS_PER_BATCH): the next ECX pages below the balloon, highest first, on
; inflateq.
inflate_batch:
        mov rax, [pool_end]
        shr rax, 12
        sub rax, [balloon_pages]        ; RAX = the balloon's lowest PFN (one past the free pool)
        lea rdi, [pfns]
        mov edx, ecx
.pfn:   dec rax
        mov [rdi], eax
        add rdi, 4
        dec edx
        jnz .pfn
        push rcx
        lea rdi, [q_inflate]
        call send_pfns
        pop rcx
        add [balloon_pages], rcx
        mov rax, [pool_end]             ; the balloon's pages are neither touched nor free now
        mov rdx, [balloon_pages]
        shl rdx, 12
        sub rax, rdx
        cmp [touched_top], rax
        jbe .actual
        mov [touched_top], rax
.actual:
        jmp set_actual

; deflate_batch: ECX = pages (1..PFNS_PER_BATCH): the balloon's lowest ECX pages, on deflateq.
deflate_batch:
        mov rax, [pool_end]
        shr rax, 12
        sub rax, [balloon_pages]
        lea rdi, [pfns]
        mov edx, ecx
.pfn:   mov [rdi], eax
        inc rax
        add rdi, 4
        dec edx
        jnz .pfn
        push rcx
        lea rdi, [q_deflate]
        call send_pfns
        pop rcx
        sub [balloon_pages], rcx
set_actual:
        lea rdi, [q_inflate]
        mov esi, [balloon_pages]
        VCALL BSYS_SET_ACTUAL
        ret

; send_pfns: RDI -> queue block, ECX = PFNs in `pfns` (1..PFNS_PER_BATCH): one chain of device-readable
; descriptors of up to PFNS_PER_DESC PFNs each; waits for it.
send_pfns:
        lea rsi, [pfn_list]
        lea rax, [pfns]
        xor edx, edx                    ; EDX = descriptors
.desc:  mov [rsi + VQ_BUF_ADDR], rax
        mov r8d, PFNS_PER_DESC
        cmp ecx, r8d
        cmovb r8d, ecx
        sub ecx, r8d
        shl r8d, 2
        mov [rsi + VQ_BUF_LEN], r8d
        mov dword [rsi + VQ_BUF_FLAGS], 0
        add rax, PFNS_PER_DESC * 4
        add rsi, VQ_BUF_BYTES
        inc edx
        test ecx, ecx
        jnz .desc
        lea rsi, [pfn_list]
        mov ecx, edx
        VCALL VSYS_SUBMIT
        jmp wait_or_die

; post_stats: the statistics of the header into stats_buf, posted on statsq (not waited for: the device
; holds it until it wants fresh numbers).
post_stats:
        call memory_figures             ; RAX = free, RDX = caches
        lea rdi, [stats_buf]
        mov rbx, [ram_size]
        mov rcx, [balloon_pages]
        shl rcx, 12
        sub rbx, rcx
        mov word [rdi], STAT_MEMTOT
        mov [rdi + 2], rbx
        mov word [rdi + 10], STAT_MEMFREE
        mov [rdi + 12], rax
        mov word [rdi + 20], STAT_CACHES
        mov [rdi + 22], rdx
        add rax, rdx
        mov word [rdi + 30], STAT_AVAIL
        mov [rdi + 32], rax
        lea rsi, [stats_list]
        mov [rsi + VQ_BUF_ADDR], rdi
        mov dword [rsi + VQ_BUF_LEN], STAT_ENTRIES * STAT_SWAP_TAGS_BYTES
        mov dword [rsi + VQ_BUF_FLAGS], 0
        lea rdi, [q_stats]
        mov ecx, 1
        VCALL VSYS_SUBMIT
        mov [stats_wait], eax
        ret

; memory_figures -> RAX = free bytes (pool below the balloon, above both the touched pages and the working
; set, which is in use even where it has not been touched again yet), RDX = caches (touched, outside the
; working set).
memory_figures:
        call working_set_end            ; RCX = the working set's end
        mov rdx, [touched_top]
        cmp rdx, rcx
        cmovb rdx, rcx                  ; RDX = max(touched_top, the working set's end)
        call free_top                   ; RAX = the top of the pool outside the balloon
        sub rax, rdx
        mov rdx, [touched_top]
        sub rdx, rcx
        jae .ok
        xor edx, edx
.ok:    ret

; free_top -> RAX = pool_end - balloon.  working_set_end -> RCX = min(pool_start + ws, free_top).
free_top:
        mov rax, [balloon_pages]
        shl rax, 12
        neg rax
        add rax, [pool_end]
        ret

working_set_end:
        push rax
        call free_top
        mov rcx, [pool_start]
        add rcx, [ws_bytes]
        cmp rcx, rax
        jbe .ok
        mov rcx, rax
.ok:    pop rax
        ret

; clamp_to_pool: RAX = an address -> RAX = min(RAX, free_top).
clamp_to_pool:
        push rcx
        mov rcx, rax
        call free_top
        cmp rcx, rax
        cmovb rax, rcx
        pop rcx
        ret

; touch_working_set: one byte written per page of the working set; touched_top follows it up.
touch_working_set:
        call working_set_end
        mov rdi, [pool_start]
        mov rsi, rcx
        call touch_range
        cmp rcx, [touched_top]
        jbe .ok
        mov [touched_top], rcx
.ok:    ret

; touch_range: RDI = start, RSI = end (page aligned): one byte written per 4 KiB page.
touch_range:
        inc byte [touch_round]
        mov al, [touch_round]
.page:  cmp rdi, rsi
        jae .done
        mov [rdi], al
        add rdi, PAGE
        jmp .page
.done:  ret

; read_input: every byte waiting on COM1 into cmd_buf; a line is a command (w<MiB>, q).
read_input:
        VCALL BSYS_GETC
        cmp eax, -1
        je .done
        cmp al, 10
        je .line
        cmp al, 13
        je .line
        mov ecx, [cmd_len]
        cmp ecx, CMD_BYTES - 1
        jae read_input                  ; too long: the rest of the line is dropped
        lea rdx, [cmd_buf]
        mov [rdx + rcx], al
        inc dword [cmd_len]
        jmp read_input
.line:  mov ecx, [cmd_len]
        mov dword [cmd_len], 0
        test ecx, ecx
        jz read_input
        lea rsi, [cmd_buf]
        mov byte [rsi + rcx], 0
        mov al, [rsi]
        cmp al, 'q'
        je quit
        cmp al, 'w'
        jne read_input
        inc rsi
        call parse_dec                  ; RAX = MiB
        shl rax, 20
        mov [ws_bytes], rax
        call touch_working_set
        lea rdi, [line]
        lea rsi, [msg_ws]
        call str_append
        mov rax, [ws_bytes]
        shr rax, 20
        call dec_append
        lea rsi, [msg_mib_nl]
        call str_append
        call print_line
        jmp read_input
.done:  ret

quit:   lea rsi, [msg_bye]
        VCALL VSYS_PUTS
        mov edi, EXIT_OK
        VCALL VSYS_EXIT

; parse_cmdline: ws=<MiB> and touch=<MiB> from the command line (defaults: 16 MiB, the whole pool).
parse_cmdline:
        mov qword [ws_bytes], DEFAULT_WS_MIB * MIB
        mov rax, [pool_pages]
        shl rax, 12
        mov [touch_bytes], rax
        lea rsi, [cmdline]
.token: mov al, [rsi]
        test al, al
        jz .done
        cmp al, ' '
        jne .word
        inc rsi
        jmp .token
.word:  lea rdi, [key_ws]
        call starts_with
        jnc .ws
        lea rdi, [key_touch]
        call starts_with
        jnc .touch
.skip:  mov al, [rsi]                   ; an unknown word
        test al, al
        jz .done
        cmp al, ' '
        je .token
        inc rsi
        jmp .skip
.ws:    call parse_dec
        shl rax, 20
        mov [ws_bytes], rax
        jmp .skip
.touch: call parse_dec
        shl rax, 20
        mov [touch_bytes], rax
        jmp .skip
.done:  ret

; starts_with: RSI -> text, RDI -> NUL-terminated key: CF clear and RSI past the key if the text starts
; with it; CF set and RSI unchanged if not.
starts_with:
        push rsi
.next:  mov al, [rdi]
        test al, al
        jz .yes
        cmp al, [rsi]
        jne .no
        inc rdi
        inc rsi
        jmp .next
.yes:   add rsp, 8
        clc
        ret
.no:    pop rsi
        stc
        ret

; parse_dec: RSI -> decimal digits -> RAX = their value; RSI past them.
parse_dec:
        xor eax, eax
.digit: movzx ecx, byte [rsi]
        sub ecx, '0'
        cmp ecx, 9
        ja .done
        imul rax, rax, 10
        add rax, rcx
        inc rsi
        jmp .digit
.done:  ret

; wait_or_die: RDI -> queue block, EAX = used index from VSYS_SUBMIT -> returns when it is used; on a
; timeout prints "balloon: timeout, device status <hex>" and exits.
wait_or_die:
        call virtq_wait
        jc .timeout
        ret
.timeout:
        VCALL VSYS_STATUS
        mov r12d, eax
        lea rdi, [line]
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

no_device:
        lea rsi, [msg_no_device]
        mov r12d, EXIT_NO_DEVICE
        jmp die
refused:
        lea rsi, [msg_refused]
        mov r12d, EXIT_REFUSED
        jmp die
no_ram: lea rsi, [msg_no_ram]
        mov r12d, EXIT_NO_RAM
die:    VCALL VSYS_PUTS
        mov edi, r12d
        VCALL VSYS_EXIT

; print_line: the NUL-terminated `line` on COM1.
print_line:
        push rsi
        lea rsi, [line]
        VCALL VSYS_PUTS
        pop rsi
        ret

; ---- CPL0: handlers and routines --------------------------------------------------------------------
        CPL3_FAULT_HANDLERS

%include "lib/serial_code.inc"
%include "lib/format_code.inc"
%include "lib/virtio_code.inc"

; ---- tables and strings -------------------------------------------------------------------------------
        CPL3_TABLES balloon_service

align 8
big_idt_ptr:
        dw IDT_GATES * 16 - 1
        dq big_idt
virtio_irqs:    db 5, 6, 7, 10, 11, 12, 14, 15     ; pykvm's VIRTIO_IRQS, by window

name_balloon:   db "virtio-balloon", 0
key_ws:         db "ws=", 0
key_touch:      db "touch=", 0
msg_prefix:     db "balloon: ", 0
msg_ram:        db "balloon: ram ", 0
msg_pool:       db " MiB, pool ", 0
msg_stats_on:   db " MiB, stats on, working set ", 0
msg_stats_off:  db " MiB, stats off, working set ", 0
msg_touched:    db " MiB, touched ", 0
msg_mib_nl:     db " MiB", 10, 0
msg_pages:      db " pages (", 0
msg_mib_paren:  db " MiB)", 10, 0
msg_full:       db "balloon: full at ", 0
msg_pages_nl:   db " pages", 10, 0
msg_ws:         db "balloon: working set ", 0
msg_bye:        db "balloon: bye", 10, 0
msg_no_device:  db "balloon: no device", 10, 0
msg_refused:    db "balloon: device refused initialisation", 10, 0
msg_no_ram:     db "balloon: no RAM size", 10, 0
msg_timeout:    db "balloon: timeout, device status ", 0
msg_newline:    db 10, 0
        CPL3_STRINGS

; ---- zero-initialised memory after the image (CPL3_BSS ends page-aligned) ------------------------------
        CPL3_BSS
big_idt:        resb IDT_GATES * 16
        VIRTQ q_inflate
        VIRTQ q_deflate                 ; consecutive: BSYS_OPEN takes the blocks in queue order
        VIRTQ q_stats
pfns:           resd PFNS_PER_BATCH
pfn_list:       resb VQ_BUF_BYTES * DESCS_PER_BATCH
stats_list:     resb VQ_BUF_BYTES
stats_buf:      resb STAT_ENTRIES * STAT_SWAP_TAGS_BYTES
                resb 6
ram_size:       resq 1
pool_start:     resq 1
pool_end:       resq 1
pool_pages:     resq 1
balloon_pages:  resq 1
touched_top:    resq 1
ws_bytes:       resq 1
touch_bytes:    resq 1
full_reported:  resq 1
wanted_pages:   resq 1
features:       resd 1
stats_wait:     resd 1
cmd_len:        resd 1
touch_round:    resb 1
cmd_buf:        resb CMD_BYTES
line:           resb LINE_BYTES
cmdline:        resb CMDLINE_BYTES
image_end:
