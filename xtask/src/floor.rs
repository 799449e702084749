//! The floor for the boot benchmark: the smallest PVH image there is. Its
//! entry writes 0 to `isa-debug-exit`, so QEMU exits as soon as it runs one
//! instruction of the guest; its start-to-exit time is what QEMU itself
//! costs. Written out byte by byte: an ELF64 header, a PT_LOAD and a PT_NOTE
//! program header, the Xen PVH note, and 8 bytes of 32-bit code.

const LOAD_ADDR: u64 = 0x10_0000;
const EHDR: usize = 64;
const PHDR: usize = 56;
const NOTE_OFF: usize = EHDR + 2 * PHDR;
const NOTE_LEN: usize = 12 + 4 + 8;
const CODE_OFF: usize = NOTE_OFF + NOTE_LEN;

/// mov dx, 0xf4; xor eax, eax; out dx, eax; 1: hlt; jmp 1b
const CODE: [u8; 10] = [0x66, 0xBA, 0xF4, 0x00, 0x31, 0xC0, 0xEF, 0xF4, 0xEB, 0xFD];

pub fn image() -> Vec<u8> {
    let total = CODE_OFF + CODE.len();
    let entry = LOAD_ADDR + CODE_OFF as u64;
    let mut f = Vec::with_capacity(total);
    // ELF header
    f.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&0x3Eu16.to_le_bytes()); // x86-64
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&entry.to_le_bytes());
    f.extend_from_slice(&(EHDR as u64).to_le_bytes()); // phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // shoff
    f.extend_from_slice(&0u32.to_le_bytes()); // flags
    for v in [EHDR as u16, PHDR as u16, 2, 64, 0, 0] {
        f.extend_from_slice(&v.to_le_bytes());
    }
    // PT_LOAD: the whole file at 1 MiB, R+X.
    phdr(&mut f, 1, 5, 0, LOAD_ADDR, total as u64, 0x1000);
    // PT_NOTE
    phdr(
        &mut f,
        4,
        4,
        NOTE_OFF as u64,
        LOAD_ADDR + NOTE_OFF as u64,
        NOTE_LEN as u64,
        4,
    );
    // Xen note: namesz 4, descsz 8, type 18 (PHYS32_ENTRY), "Xen\0", entry.
    for v in [4u32, 8, 18] {
        f.extend_from_slice(&v.to_le_bytes());
    }
    f.extend_from_slice(b"Xen\0");
    f.extend_from_slice(&entry.to_le_bytes());
    f.extend_from_slice(&CODE);
    assert_eq!(f.len(), total);
    f
}

fn phdr(f: &mut Vec<u8>, kind: u32, flags: u32, offset: u64, addr: u64, size: u64, align: u64) {
    f.extend_from_slice(&kind.to_le_bytes());
    f.extend_from_slice(&flags.to_le_bytes());
    for v in [offset, addr, addr, size, size, align] {
        f.extend_from_slice(&v.to_le_bytes());
    }
}
