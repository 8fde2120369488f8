; bad_insn.asm - long-mode flat binary (bad_insn.bin, loaded at 0x100000), runs at CPL0.
; Proves: an instruction the in-kernel emulator cannot handle at CPL0 (popcnt on the nested "kvm_pvm"
; backend, see PLATFORM.md) ends the VM with KVM_EXIT_INTERNAL_ERROR.
; Prints: "popcnt next\n"; then, only where popcnt executes (hardware VT-x/AMD-V), "popcnt ok\n" and
; exits with value 0x10 (pykvm status 0x21).

bits 64
default rel
org 0x100000

%include "lib/serial.inc"

start:
        PRINT msg_next
        mov ebx, 0xf0f0
        popcnt rax, rbx
        PRINT msg_ok
        EXIT 0x10

%include "lib/serial_code.inc"

msg_next:       db "popcnt next", 10, 0
msg_ok:         db "popcnt ok", 10, 0
