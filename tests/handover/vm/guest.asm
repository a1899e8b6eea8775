; The tiny VM of the live-migration hand-over test: one boot sector, booted by SeaBIOS from the Berth volume.
;
; At boot it writes COUNT sectors at KEEP_LBA with pattern(lba, 0), once: data written long before any migration.
; Then it loops forever over generations g = 1, 2, 3, ...: write COUNT sectors at DATA_LBA with pattern(lba, g) (one
; BIOS int 13h extended write), wait for a timer tick, read both regions back and compare them with what it wrote
; (kept in memory); only then write g+1. So every generation is read back, also when the VM migrated between its
; write and its read (then data written on the source host is checked by the guest on the target host), and the
; boot-time region is re-read after every generation, wherever the VM runs by then.
;
; Serial port COM1, one line each:  "BOOT"  |  "G <g> OK" (generation g read back intact)
;   "BAD s=<lba> g=<generation found in that sector> want=<expected>"  |  "IOERR <int 13h status>"  (then it halts)
;
; pattern(lba, g), 128 little-endian dwords: "BRTH", lba, g, then x0 = lba*0x9E3779B1 xor g*0x85EBCA6B and
; x(i+1) = rol(x(i), 5) + 0x6D2B79F5 (mod 2^32). tests/handover/vm/pattern.py computes the same, to check the disk.
;
; Build: nasm -f bin -o guest.img guest.asm   (512 bytes, ends with the 55 AA boot signature)

bits 16
org 0x7c00

KEEP_LBA equ 128                ; written once at boot (generation 0)
DATA_LBA equ 64                 ; rewritten every generation (32 KiB into the disk, past this boot sector)
COUNT    equ 64                 ; sectors per region: 32 KiB, one int 13h call each way
WBUF     equ 0x1000             ; segment of pattern(DATA_LBA.., g) (linear 0x10000)
KBUF     equ 0x2000             ; segment of pattern(KEEP_LBA.., 0)
RBUF     equ 0x3000             ; segment of the read buffer
COM1     equ 0x3f8

start:
    cli
    xor ax, ax
    mov ds, ax
    mov ss, ax
    mov sp, 0x7c00
    sti
    cld
    mov [drive], dl
    mov si, msg_boot
    call puts
    xor ebp, ebp                ; ebp = generation: 0 for the boot-time region
    mov bx, KBUF
    mov edx, KEEP_LBA
    call fill_write

generation:
    inc ebp
    mov bx, WBUF
    mov edx, DATA_LBA
    call fill_write
    sti
    hlt                         ; wait for a timer tick (55 ms at most) between write and read-back: the data
                                ; rests on the disk a while, and the host keeps some CPU
    mov bx, KBUF
    mov edx, KEEP_LBA
    xor eax, eax
    call check
    mov bx, WBUF
    mov edx, DATA_LBA
    mov eax, ebp
    call check
    mov si, msg_g
    call puts
    mov eax, ebp
    call putdec
    mov si, msg_ok
    call puts
    jmp generation

fill_write:                     ; bx:0 = pattern(edx.., ebp) for COUNT sectors, then written at edx
    mov es, bx
    xor di, di
    mov [dap_lba], edx
.sector:
    mov eax, 'BRTH'
    stosd
    mov eax, edx
    stosd
    mov eax, ebp
    stosd
    imul eax, edx, 0x9E3779B1
    imul ecx, ebp, 0x85EBCA6B
    xor eax, ecx
    mov cx, 125
.word:
    stosd
    rol eax, 5
    add eax, 0x6D2B79F5
    loop .word
    inc edx
    mov ecx, [dap_lba]
    add ecx, COUNT
    cmp edx, ecx
    jb .sector
    mov ah, 0x43
    mov [dap_seg], bx
    jmp disk

check:                          ; read COUNT sectors at edx into RBUF, compare with bx:0 (generation eax)
    mov [want], eax
    mov [dap_lba], edx
    mov ah, 0x42
    mov word [dap_seg], RBUF
    call disk
    push ds
    mov ds, bx
    push word RBUF
    pop es
    xor si, si
    xor di, di
    mov cx, COUNT * 128
    repe cmpsd
    pop ds
    jne bad
    ret

bad:                            ; di is just past the first differing dword in the read buffer
    sub di, 4
    shr di, 9                   ; sector index
    mov si, msg_bad
    call puts
    movzx eax, di
    add eax, [dap_lba]
    call putdec
    mov si, msg_found
    call puts
    shl di, 9
    mov eax, [es:di + 8]        ; the generation field of that sector as read
    call putdec
    mov si, msg_want
    call puts
    mov eax, [want]
    call putdec
    jmp halt

disk:                           ; int 13h extended read (ah=42h) / write (ah=43h) of COUNT sectors (dap)
    mov word [dap_count], COUNT ; the BIOS writes back how many it transferred
    mov al, 0
    mov si, dap
    mov dl, [drive]
    int 0x13
    jc .error
    ret
.error:
    movzx ebp, ah
    mov si, msg_ioerr
    call puts
    mov eax, ebp
    call putdec
halt:
    mov si, msg_nl
    call puts
.forever:
    cli
    hlt
    jmp .forever

puts:                           ; ds:si, zero-terminated
    lodsb
    test al, al
    jz .done
    call putc
    jmp puts
.done:
    ret

putc:                           ; al -> COM1 (wait for the transmit holding register)
    push dx
    push ax
    mov dx, COM1 + 5
.wait:
    in al, dx
    test al, 0x20
    jz .wait
    pop ax
    mov dx, COM1
    out dx, al
    pop dx
    ret

putdec:                         ; eax, unsigned decimal
    push ebx
    push edx
    mov ebx, 10
    xor cx, cx
.digit:
    xor edx, edx
    div ebx
    push dx
    inc cx
    test eax, eax
    jnz .digit
.print:
    pop ax
    add al, '0'
    call putc
    loop .print
    pop edx
    pop ebx
    ret

msg_boot  db "BOOT", 13, 10, 0
msg_g     db "G ", 0
msg_ok    db " OK"
msg_nl    db 13, 10, 0
msg_bad   db "BAD s=", 0
msg_found db " g=", 0
msg_want  db " want=", 0
msg_ioerr db "IOERR ", 0

drive     db 0
align 4
want      dd 0
dap       db 16, 0
dap_count dw COUNT
          dw 0                  ; buffer offset
dap_seg   dw 0                  ; buffer segment
dap_lba   dq 0

times 510 - ($ - $$) db 0
dw 0xAA55
