//! ELF static PIE → PE32+ EFI application, for the UEFI loader.
//!
//! This toolchain has no `x86_64-unknown-uefi` standard library (and none can
//! be fetched), so `efi/` is built for `x86_64-unknown-none` as a static PIE
//! with every loadable segment on its own page, linked at 0x1000. Each
//! segment becomes a PE section at RVA = its address; each
//! `R_X86_64_RELATIVE` becomes a DIR64 base relocation with the addend
//! written in place. ImageBase is 0, which is also what rust-hypervisor-
//! firmware needs to relocate an image (it loads others unrelocated).

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const DT_RELA: u64 = 7;
const DT_RELASZ: u64 = 8;
const R_X86_64_NONE: u32 = 0;
const R_X86_64_RELATIVE: u32 = 8;
const SECTION_ALIGN: u32 = 0x1000;
const FILE_ALIGN: u32 = 0x200;
const HEADERS: u32 = 0x400;

fn rd<const N: usize>(b: &[u8], off: usize) -> Result<[u8; N], String> {
    b.get(off..off + N)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| format!("ELF truncated at {off:#x}"))
}
fn u16_at(b: &[u8], off: usize) -> Result<u16, String> {
    rd::<2>(b, off).map(u16::from_le_bytes)
}
fn u32_at(b: &[u8], off: usize) -> Result<u32, String> {
    rd::<4>(b, off).map(u32::from_le_bytes)
}
fn u64_at(b: &[u8], off: usize) -> Result<u64, String> {
    rd::<8>(b, off).map(u64::from_le_bytes)
}
fn align(v: u32, a: u32) -> u32 {
    v.div_ceil(a) * a
}

/// A PE section: name, RVA, virtual size, raw data, characteristics.
type Section<'a> = ([u8; 8], u32, u32, &'a [u8], u32);

struct Segment {
    vaddr: u32,
    filesz: u32,
    memsz: u32,
    flags: u32,
}

/// Converts the loader's ELF into a PE32+ EFI application (subsystem 10).
pub fn elf_to_efi(elf: &[u8]) -> Result<Vec<u8>, String> {
    if elf.get(..4) != Some(b"\x7fELF") || u16_at(elf, 16)? != 3 || u16_at(elf, 18)? != 0x3e {
        return Err("not an x86_64 ELF PIE (ET_DYN)".into());
    }
    let entry = u64_at(elf, 24)?;
    let phoff = u64_at(elf, 32)? as usize;
    let phnum = u16_at(elf, 56)? as usize;
    let mut segs = Vec::new();
    let mut image = Vec::new();
    let mut dynamic = None;
    for i in 0..phnum {
        let ph = phoff + i * 56;
        let ty = u32_at(elf, ph)?;
        let offset = u64_at(elf, ph + 8)? as usize;
        let vaddr = u64_at(elf, ph + 16)?;
        let filesz = u64_at(elf, ph + 32)? as usize;
        let memsz = u64_at(elf, ph + 40)?;
        if ty == PT_DYNAMIC {
            dynamic = Some((vaddr as usize, filesz));
        }
        if ty != PT_LOAD {
            continue;
        }
        if vaddr % SECTION_ALIGN as u64 != 0
            || vaddr < HEADERS as u64
            || vaddr + memsz > u32::MAX as u64
        {
            return Err(format!(
                "segment at {vaddr:#x} is not page-aligned above the headers"
            ));
        }
        let end = (vaddr + memsz) as usize;
        if image.len() < end {
            image.resize(end, 0);
        }
        let data = elf
            .get(offset..offset + filesz)
            .ok_or("segment outside the file")?;
        image[vaddr as usize..vaddr as usize + filesz].copy_from_slice(data);
        segs.push(Segment {
            vaddr: vaddr as u32,
            filesz: filesz as u32,
            memsz: memsz as u32,
            flags: u32_at(elf, ph + 4)?,
        });
    }
    if segs.is_empty() {
        return Err("no loadable segment".into());
    }
    // Relocations: from the dynamic section (in the image, by address).
    let mut relocs = Vec::new();
    if let Some((dyn_addr, dyn_size)) = dynamic {
        let (mut rela, mut relasz) = (0usize, 0usize);
        for e in (dyn_addr..dyn_addr + dyn_size).step_by(16) {
            match u64_at(&image, e)? {
                DT_RELA => rela = u64_at(&image, e + 8)? as usize,
                DT_RELASZ => relasz = u64_at(&image, e + 8)? as usize,
                _ => {}
            }
        }
        for r in (rela..rela + relasz).step_by(24) {
            let offset = u64_at(&image, r)? as usize;
            let kind = u64_at(&image, r + 8)? as u32;
            let addend = u64_at(&image, r + 16)?;
            match kind {
                R_X86_64_NONE => {}
                R_X86_64_RELATIVE => {
                    image
                        .get_mut(offset..offset + 8)
                        .ok_or("relocation outside the image")?
                        .copy_from_slice(&addend.to_le_bytes());
                    relocs.push(offset as u32);
                }
                other => return Err(format!("unsupported relocation type {other}")),
            }
        }
    }
    relocs.sort_unstable();
    let mut reloc = Vec::new();
    let mut i = 0;
    while i < relocs.len() {
        let page = relocs[i] & !0xfff;
        let start = reloc.len();
        reloc.extend_from_slice(&page.to_le_bytes());
        reloc.extend_from_slice(&0u32.to_le_bytes());
        while i < relocs.len() && relocs[i] & !0xfff == page {
            reloc.extend_from_slice(&((10u16 << 12) | (relocs[i] & 0xfff) as u16).to_le_bytes());
            i += 1;
        }
        if (reloc.len() - start) % 4 != 0 {
            reloc.extend_from_slice(&0u16.to_le_bytes()); // IMAGE_REL_BASED_ABSOLUTE pad
        }
        let size = (reloc.len() - start) as u32;
        reloc[start + 4..start + 8].copy_from_slice(&size.to_le_bytes());
    }
    let reloc_rva = align(image.len() as u32, SECTION_ALIGN);
    let size_of_image = align(reloc_rva + reloc.len().max(1) as u32, SECTION_ALIGN);

    // Sections: (name, rva, vsize, data, characteristics).
    let mut sections: Vec<Section<'_>> = Vec::new();
    for s in &segs {
        let (name, ch) = if s.flags & 1 != 0 {
            (*b".text\0\0\0", 0x6000_0020)
        } else if s.filesz == 0 {
            (*b".bss\0\0\0\0", 0xC000_0080)
        } else if s.flags & 2 != 0 {
            (*b".data\0\0\0", 0xC000_0040)
        } else {
            (*b".rdata\0\0", 0x4000_0040)
        };
        let data = &image[s.vaddr as usize..(s.vaddr + s.filesz) as usize];
        sections.push((name, s.vaddr, s.memsz, data, ch));
    }
    sections.push((
        *b".reloc\0\0",
        reloc_rva,
        reloc.len() as u32,
        &reloc,
        0x4200_0040,
    ));

    let mut out = vec![0u8; HEADERS as usize];
    let (mut code, mut idata, mut udata) = (0u32, 0u32, 0u32);
    let mut table = Vec::new();
    for (name, rva, vsize, data, ch) in &sections {
        let raw = align(data.len() as u32, FILE_ALIGN);
        let ptr = if raw == 0 { 0 } else { out.len() as u32 };
        if raw != 0 {
            out.extend_from_slice(data);
            out.resize((ptr + raw) as usize, 0);
        }
        match ch & 0xe0 {
            0x20 => code += raw,
            0x80 => udata += align(*vsize, FILE_ALIGN),
            _ => idata += raw,
        }
        table.extend_from_slice(name);
        for v in [*vsize, *rva, raw, ptr, 0, 0] {
            table.extend_from_slice(&v.to_le_bytes());
        }
        table.extend_from_slice(&[0; 4]);
        table.extend_from_slice(&ch.to_le_bytes());
    }
    let mut h = Vec::with_capacity(HEADERS as usize);
    // DOS header: "MZ" and e_lfanew = 0x40.
    h.extend_from_slice(b"MZ");
    h.resize(0x3c, 0);
    h.extend_from_slice(&0x40u32.to_le_bytes());
    h.extend_from_slice(b"PE\0\0");
    // COFF header.
    h.extend_from_slice(&0x8664u16.to_le_bytes());
    h.extend_from_slice(&(sections.len() as u16).to_le_bytes());
    h.extend_from_slice(&[0; 12]);
    h.extend_from_slice(&240u16.to_le_bytes());
    h.extend_from_slice(&0x0022u16.to_le_bytes()); // executable, large-address-aware
    // Optional header (PE32+).
    h.extend_from_slice(&0x20bu16.to_le_bytes());
    h.extend_from_slice(&[0, 0]);
    for v in [code, idata, udata, entry as u32, segs[0].vaddr] {
        h.extend_from_slice(&v.to_le_bytes());
    }
    h.extend_from_slice(&0u64.to_le_bytes()); // ImageBase
    h.extend_from_slice(&SECTION_ALIGN.to_le_bytes());
    h.extend_from_slice(&FILE_ALIGN.to_le_bytes());
    h.extend_from_slice(&[0; 8]); // OS and image versions
    h.extend_from_slice(&[0; 4]); // subsystem version
    h.extend_from_slice(&[0; 4]); // Win32VersionValue
    h.extend_from_slice(&size_of_image.to_le_bytes());
    h.extend_from_slice(&HEADERS.to_le_bytes());
    h.extend_from_slice(&[0; 4]); // checksum
    h.extend_from_slice(&10u16.to_le_bytes()); // EFI application
    h.extend_from_slice(&0u16.to_le_bytes());
    for v in [0x10000u64, 0x10000, 0, 0] {
        h.extend_from_slice(&v.to_le_bytes());
    }
    h.extend_from_slice(&0u32.to_le_bytes()); // loader flags
    h.extend_from_slice(&16u32.to_le_bytes());
    for dir in 0..16 {
        let (rva, size) = if dir == 5 && !reloc.is_empty() {
            (reloc_rva, reloc.len() as u32)
        } else {
            (0, 0)
        };
        h.extend_from_slice(&rva.to_le_bytes());
        h.extend_from_slice(&size.to_le_bytes());
    }
    h.extend_from_slice(&table);
    if h.len() > HEADERS as usize {
        return Err("too many sections for the PE headers".into());
    }
    out[..h.len()].copy_from_slice(&h);
    Ok(out)
}
