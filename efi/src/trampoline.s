# blockhaus_pvh_stub(start_info %edi, entry %esi, src %edx, dst %ecx,
#                    len %r8d) -> !
# From UEFI's long mode (identity-mapped) to the PVH entry state: 32-bit
# protected mode, paging off, flat segments, %ebx = start_info, after
# copying the kernel (`len` bytes, laid out as in memory) from `src` to its
# load address `dst`. The copy comes last because the kernel's range may
# hold the firmware's page tables, GDT and stack and this loader itself
# (rust-hypervisor-firmware keeps its state at 1-2 MiB and loads us at
# 2 MiB). So the stub is position-independent and self-contained (code and
# GDT between the two labels): the loader copies it to a page of its own
# outside the kernel's range, below 4 GiB, and calls it there. It uses the
# stack only in long mode: in 32-bit mode %esp is a scratch register (the
# kernel sets up its own stack; interrupts are off).
.section .text.trampoline, "ax"
.code64
.global blockhaus_pvh_stub
.global blockhaus_pvh_stub_end
blockhaus_pvh_stub:
    cli
    mov %edi, %ebx
    mov %esi, %ebp
    mov %edx, %esi
    mov %ecx, %edi
    mov %r8d, %ecx
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
    # not used by OVMF or RHF. rdmsr/wrmsr need %ecx: the length waits in
    # %esp.
    mov %ecx, %esp
    mov %cr0, %eax
    and $0x7fffffff, %eax
    mov %eax, %cr0
    mov $0xC0000080, %ecx
    rdmsr
    and $~(1 << 8), %eax
    wrmsr
    # Physical addresses from here: the kernel to its load address, four
    # bytes a step (`len` is whole pages; TCG runs each step of a `rep`
    # on its own, so bytes would take four times as long).
    mov %esp, %ecx
    shr $2, %ecx
    cld
    rep movsl
    jmp *%ebp
.balign 16
tramp_gdt:
    .quad 0
    .quad 0x00CF9A000000FFFF    # 0x08: 32-bit code, flat
    .quad 0x00CF92000000FFFF    # 0x10: data, flat
tramp_gdt_end:
blockhaus_pvh_stub_end:
.code64
