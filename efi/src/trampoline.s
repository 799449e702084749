# blockhaus_enter_pvh(start_info: u32 in %edi, entry: u32 in %esi) -> !
# From UEFI's long mode (identity-mapped) to the PVH entry state: 32-bit
# protected mode, paging off, flat segments, %ebx = start_info. This code and
# its GDT run below 4 GiB (checked by the caller's firmware: images load
# there), so the far return lands at the same physical address.
.section .text.trampoline, "ax"
.code64
.global blockhaus_enter_pvh
blockhaus_enter_pvh:
    cli
    mov %edi, %ebx
    mov %esi, %ebp
    # lgdt from a descriptor built on the stack: no absolute relocation.
    lea tramp_gdt(%rip), %rax
    sub $16, %rsp
    movw $(tramp_gdt_end - tramp_gdt - 1), (%rsp)
    mov %rax, 2(%rsp)
    lgdt (%rsp)
    lea 1f(%rip), %rax
    pushq $0x08
    push %rax
    lretq
.code32
1:  mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %ax, %fs
    mov %ax, %gs
    # Paging off (leaves long mode), then EFER.LME off; PCIDE and LA57 are
    # not used by OVMF or RHF.
    mov %cr0, %eax
    and $0x7fffffff, %eax
    mov %eax, %cr0
    mov $0xC0000080, %ecx
    rdmsr
    and $~(1 << 8), %eax
    wrmsr
    jmp *%ebp
.code64

.section .rodata.trampoline, "a"
.balign 16
tramp_gdt:
    .quad 0
    .quad 0x00CF9A000000FFFF    # 0x08: 32-bit code, flat
    .quad 0x00CF92000000FFFF    # 0x10: data, flat
tramp_gdt_end:
