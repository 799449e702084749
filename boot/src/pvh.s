# PVH entry: QEMU (pc, q35, microvm), Cloud Hypervisor and Firecracker jump
# here in 32-bit protected mode, paging off, with %ebx = physical address of
# the hvm_start_info structure. We identity-map the first 4 GiB with 2 MiB
# pages (RAM below 4 GiB, the PCI hole, ECAM, the LAPIC and IOAPIC), switch to
# long mode, enable SSE, zero .bss and call `pvh_rust_entry(start_info)`.
# RAM above 4 GiB is mapped from Rust once the memory map has been read.

# XEN_ELFNOTE_PHYS32_ENTRY (type 18). Section and note 4-byte aligned: QEMU
# 7.2 misreads the entry point of a note aligned to 8.
.section .note.Xen, "a", @note
.balign 4
.long 4                 # namesz
.long 8                 # descsz
.long 18                # type: XEN_ELFNOTE_PHYS32_ENTRY
.asciz "Xen"
.balign 4
.quad pvh_start

.section .text.boot, "ax"
.code32
.global pvh_start
pvh_start:
    cli
    cld
    # %ebx (start_info) must survive until the call into Rust.

    # Zero the page-table pages: PML4, PDPT, 4 PDs.
    mov $boot_pml4, %edi
    mov $(6 * 4096 / 4), %ecx
    xor %eax, %eax
    rep stosl

    # PML4[0] -> PDPT
    mov $boot_pdpt, %eax
    or $0x3, %eax
    mov %eax, boot_pml4

    # PDPT[0..4] -> PD0..PD3
    mov $boot_pd, %eax
    or $0x3, %eax
    mov $boot_pdpt, %edi
    mov $4, %ecx
1:  mov %eax, (%edi)
    add $4096, %eax
    add $8, %edi
    loop 1b

    # PD entries: 2048 x 2 MiB pages, present | writable | page-size.
    mov $boot_pd, %edi
    xor %ecx, %ecx
2:  mov %ecx, %eax
    shl $21, %eax
    or $0x83, %eax
    mov %eax, (%edi)
    # the high dword: bits 32.. of (ecx << 21) = ecx >> 11
    mov %ecx, %eax
    shr $11, %eax
    mov %eax, 4(%edi)
    add $8, %edi
    inc %ecx
    cmp $2048, %ecx
    jne 2b

    # CR3, CR4.PAE, EFER.LME (+NXE), CR0.PG
    mov $boot_pml4, %eax
    mov %eax, %cr3
    mov %cr4, %eax
    or $(1 << 5), %eax
    mov %eax, %cr4
    mov $0xC0000080, %ecx
    rdmsr
    or $(1 << 8), %eax
    wrmsr
    mov %cr0, %eax
    or $((1 << 31) | 1), %eax
    mov %eax, %cr0

    lgdt boot_gdt_ptr
    ljmp $0x08, $long_entry

.code64
long_entry:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    xor %eax, %eax
    mov %ax, %fs
    mov %ax, %gs
    mov $__stack_top, %rsp

    # SSE: CR0.EM off, CR0.MP on; CR4.OSFXSR | OSXMMEXCPT.
    mov %cr0, %rax
    and $~(1 << 2), %rax
    or $(1 << 1), %rax
    mov %rax, %cr0
    mov %cr4, %rax
    or $((1 << 9) | (1 << 10)), %rax
    mov %rax, %cr4

    # Zero .bss (page tables and stack live outside it).
    mov $__bss_start, %rdi
    mov $__bss_end, %rcx
    sub %rdi, %rcx
    shr $3, %rcx
    xor %eax, %eax
    rep stosq

    mov %ebx, %edi
    xor %ebp, %ebp
    call pvh_rust_entry
3:  hlt
    jmp 3b

.section .rodata.boot, "a"
.balign 16
boot_gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF    # 0x08: 64-bit code
    .quad 0x00CF92000000FFFF    # 0x10: data
boot_gdt_end:
boot_gdt_ptr:
    .word boot_gdt_end - boot_gdt - 1
    .quad boot_gdt

# Not .bss: .bss is zeroed after these are live.
.section .pagetables, "aw", @nobits
.balign 4096
.global boot_pml4
boot_pml4: .skip 4096
.global boot_pdpt
boot_pdpt: .skip 4096
.global boot_pd
boot_pd:   .skip 4 * 4096
