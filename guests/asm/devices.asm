; devices.asm - real-mode flat binary (devices.bin, loaded at 0x7c00).
; Proves: the CMOS/RTC (index 0x70, data 0x71), all-ones reads from an unclaimed port, the ignored POST
; port 0x80, and the i8042 reset command (0xfe to port 0x64) ending the VM.
; Prints:
;   "rtc: YYYY-MM-DD hh:mm:ss\n"  the RTC time (BCD decoded unless status B bit 2; 12-hour mode converted
;                                 to 24-hour; YYYY = century register 0x32 * 100 + year)
;   "unclaimed: hhhh\n"           16-bit IN from port 0x3e0, 4 lowercase hex digits ("ffff" expected)
;   "resetting\n"
; then writes 0xfe to port 0x64: pykvm ends the VM (status 0).  If execution continues after the reset
; command, prints "reset failed\n" and exits with value 0x7e (status 0xfd).

bits 16
org 0x7c00

%include "lib/serial.inc"

RTC_SECONDS     equ 0x00
RTC_MINUTES     equ 0x02
RTC_HOURS       equ 0x04
RTC_DAY         equ 0x07
RTC_MONTH       equ 0x08
RTC_YEAR        equ 0x09
RTC_STATUS_A    equ 0x0a
RTC_STATUS_B    equ 0x0b
RTC_CENTURY     equ 0x32
STATUS_A_UIP    equ 0x80            ; update in progress: registers may be inconsistent
STATUS_B_24H    equ 0x02
STATUS_B_BINARY equ 0x04
HOUR_PM         equ 0x80            ; 12-hour mode: PM flag in the hours register
UIP_POLLS       equ 1000            ; an update lasts < 2 ms; give up waiting after this many reads
UNCLAIMED_PORT  equ 0x3e0

start:
        mov cx, UIP_POLLS
.uip:   mov al, RTC_STATUS_A
        call cmos_read
        test al, STATUS_A_UIP
        jz .stable
        dec cx
        jnz .uip
.stable:
        mov al, RTC_STATUS_B
        call cmos_read
        mov [status_b], al

        PRINT msg_rtc
        mov al, RTC_CENTURY
        call rtc_field
        imul bx, ax, 100
        mov al, RTC_YEAR
        call rtc_field
        add ax, bx
        mov cl, 4
        call serial_dec_w
        mov bl, '-'
        mov al, RTC_MONTH
        call rtc_print_2
        mov al, RTC_DAY
        call rtc_print_2
        mov al, ' '
        call serial_putc
        call rtc_hours
        mov cl, 2
        call serial_dec_w
        mov bl, ':'
        mov al, RTC_MINUTES
        call rtc_print_2
        mov al, RTC_SECONDS
        call rtc_print_2
        NEWLINE

        PRINT msg_unclaimed
        mov dx, UNCLAIMED_PORT
        in ax, dx
        movzx eax, ax
        mov cl, 4
        call serial_hex
        NEWLINE

        out POST_PORT, al

        PRINT msg_resetting
        mov al, I8042_RESET
        out I8042_CMD, al
        PRINT msg_reset_failed
        EXIT 0x7e

; cmos_read: AL = register index -> AL = its value.
cmos_read:
        out CMOS_INDEX, al
        in al, CMOS_DATA
        ret

; rtc_field: AL = register index -> EAX = its value, decoded from BCD unless status B says binary.
rtc_field:
        call cmos_read
        ; fall through
; rtc_decode: AL = raw value -> EAX = binary value.
rtc_decode:
        movzx eax, al
        test byte [status_b], STATUS_B_BINARY
        jnz .done
        push dx
        mov dl, al
        and dl, 0x0f            ; units
        shr al, 4               ; tens
        mov ah, 10
        mul ah                  ; AX = tens * 10
        add al, dl
        pop dx
.done:  ret

; rtc_print_2: AL = register index, BL = separator -> prints the separator and the field as 2 digits.
rtc_print_2:
        push ax
        mov al, bl
        call serial_putc
        pop ax
        call rtc_field
        mov cl, 2
        jmp serial_dec_w

; rtc_hours: -> EAX = hour 0-23 (12-hour mode: 12 AM is 0, PM adds 12).
rtc_hours:
        mov al, RTC_HOURS
        call cmos_read
        test byte [status_b], STATUS_B_24H
        jnz rtc_decode
        mov bl, al              ; keep the PM flag
        and al, ~HOUR_PM
        call rtc_decode
        cmp al, 12
        jne .pm
        xor al, al
.pm:    test bl, HOUR_PM
        jz .done
        add al, 12
.done:  ret

%include "lib/serial_code.inc"

status_b:       db 0
msg_rtc:        db "rtc: ", 0
msg_unclaimed:  db "unclaimed: ", 0
msg_resetting:  db "resetting", 10, 0
msg_reset_failed: db "reset failed", 10, 0
