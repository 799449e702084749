//! Persistent dirty bitmaps in the image (QEMU: `block/qcow2-bitmap.c`,
//! `docs/interop/qcow2.txt` "Bitmaps extension").
//!
//! The bitmaps extension points to the bitmap directory; each directory
//! entry points to a bitmap table, whose entries point to clusters of
//! bitmap data (0: all clean, 1 with no offset: all dirty). At open the
//! directory and every bitmap are read and become the node's named
//! bitmaps; an entry found `in-use` was not stored after its last use (a
//! crash) and becomes an `inconsistent` bitmap. Opened read-write, every
//! consistent entry is marked `in-use` in place before anything is
//! written, and the autoclear bit of the extension is kept. When the node
//! closes ([`store`], QEMU's `qcow2_store_persistent_dirty_bitmaps` at
//! inactivation) the persistent bitmaps are written to new clusters, a new
//! directory without `in-use` replaces the old one in the header, and the
//! old clusters are freed. A crash at any point leaves either the old
//! directory (its entries `in-use`: inconsistent next time) or the new one.

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use crate::dirty_bitmap::NamedBitmap;
use crate::graph::child::Child;
use crate::graph::node::Node;
use crate::io::{IoResult, ReqFlags};

use super::header::{self, autoclear, ext, field};
use super::refcount::decode_table;
use super::state::{OFFSET_MASK, State, get64, put64};

/// `BME_FLAG_IN_USE`: the bitmap was not stored since it was last loaded
/// for writing.
pub const IN_USE: u32 = 1 << 0;
/// `BME_FLAG_AUTO`: the bitmap records writes (enabled).
pub const AUTO: u32 = 1 << 1;
/// `BME_FLAG_EXTRA_DATA_COMPATIBLE`.
pub const EXTRA_DATA_COMPATIBLE: u32 = 1 << 2;
/// `BME_MIN_GRANULARITY_BITS`.
pub const MIN_GRANULARITY_BITS: u8 = 9;
/// `BME_MAX_GRANULARITY_BITS`.
pub const MAX_GRANULARITY_BITS: u8 = 31;
/// `BME_MAX_TABLE_SIZE` (entries).
pub const MAX_TABLE_SIZE: u64 = 0x800_0000;
/// `BME_MAX_NAME_SIZE`.
pub const MAX_NAME_SIZE: usize = 1023;
/// `QCOW2_MAX_BITMAPS`.
pub const MAX_BITMAPS: u32 = 65535;
/// `QCOW2_MAX_BITMAP_DIRECTORY_SIZE`.
pub const MAX_DIRECTORY_SIZE: u64 = 1024 * MAX_BITMAPS as u64;
/// `BME_TABLE_ENTRY_RESERVED_MASK`.
const TABLE_ENTRY_RESERVED: u64 = 0xff00_0000_0000_01fe;
/// `BME_TABLE_ENTRY_FLAG_ALL_ONES`.
const ALL_ONES: u64 = 1;
/// The only bitmap type: dirty tracking.
const TYPE_DIRTY_TRACKING: u8 = 1;

/// One entry of the bitmap directory, with its bitmap table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// Where the bitmap table is.
    pub table_offset: u64,
    /// The bitmap table (entries as on disk).
    pub table: Vec<u64>,
    /// `IN_USE`, `AUTO`, `EXTRA_DATA_COMPATIBLE`.
    pub flags: u32,
    /// log2 of the granularity.
    pub granularity_bits: u8,
    /// Extra data (kept as found).
    pub extra: Vec<u8>,
    /// The bitmap's name.
    pub name: String,
}

impl DirEntry {
    fn encoded_len(&self) -> usize {
        (24 + self.extra.len() + self.name.len()).div_ceil(8) * 8
    }
}

/// The directory as it is in the image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Directory {
    /// `bitmap_directory_offset`.
    pub offset: u64,
    /// `bitmap_directory_size`.
    pub size: u64,
    /// The entries, in order.
    pub entries: Vec<DirEntry>,
}

/// Entries of the table of a bitmap over `len` bytes (QEMU:
/// `size_to_clusters(s, bitmap_bytes)`).
pub fn table_size(len: u64, granularity: u64, cs: u64) -> u64 {
    len.div_ceil(granularity).div_ceil(cs * 8)
}

/// Parses the extension's data (QEMU: `qcow2_read_extensions`, case
/// `QCOW2_EXT_MAGIC_BITMAPS`): `(nb_bitmaps, directory size, offset)`.
pub fn parse_ext(data: &[u8], cs: u64) -> Result<(u32, u64, u64), String> {
    if data.len() != 24 {
        return Err(String::from("bitmaps_ext: Invalid extension length"));
    }
    let nb = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
    if data[4..8] != [0; 4] {
        return Err(String::from("bitmaps_ext: reserved field is not zero"));
    }
    let size = get64(data, 8);
    let offset = get64(data, 16);
    if nb > MAX_BITMAPS {
        return Err(format!(
            "bitmaps_ext: Image has {nb} bitmaps, exceeding the QEMU supported maximum of {MAX_BITMAPS}"
        ));
    }
    if nb == 0 {
        return Err(String::from(
            "bitmaps_ext: found bitmaps extension with zero bitmaps",
        ));
    }
    if !offset.is_multiple_of(cs) || offset == 0 {
        return Err(String::from("bitmaps_ext: invalid bitmap directory offset"));
    }
    if size > MAX_DIRECTORY_SIZE {
        return Err(format!(
            "bitmaps_ext: bitmap directory size ({size}) exceeds the maximum supported size ({MAX_DIRECTORY_SIZE})"
        ));
    }
    Ok((nb, size, offset))
}

/// Parses `nb` directory entries (QEMU: `bitmap_list_load` and
/// `check_dir_entry`); the tables are left empty.
pub fn parse_dir(b: &[u8], nb: u32, cs: u64, file_len: u64) -> Result<Vec<DirEntry>, String> {
    let mut at = 0usize;
    let mut out = Vec::new();
    for _ in 0..nb {
        let Some(fixed) = b.get(at..at + 24) else {
            return Err(String::from("Broken bitmap directory"));
        };
        let table_offset = get64(fixed, 0);
        let table_size = u32::from_be_bytes([fixed[8], fixed[9], fixed[10], fixed[11]]);
        let flags = u32::from_be_bytes([fixed[12], fixed[13], fixed[14], fixed[15]]);
        let kind = fixed[16];
        let granularity_bits = fixed[17];
        let name_size = usize::from(u16::from_be_bytes([fixed[18], fixed[19]]));
        let extra_size = u32::from_be_bytes([fixed[20], fixed[21], fixed[22], fixed[23]]) as usize;
        let len = (24 + extra_size + name_size).div_ceil(8) * 8;
        let Some(whole) = b.get(at..at + len) else {
            return Err(String::from("Broken bitmap directory"));
        };
        let extra = whole[24..24 + extra_size].to_vec();
        let name = String::from_utf8_lossy(&whole[24 + extra_size..24 + extra_size + name_size])
            .into_owned();
        let phys = u64::from(table_size) * 8;
        if kind != TYPE_DIRTY_TRACKING
            || !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&granularity_bits)
            || u64::from(table_size) > MAX_TABLE_SIZE
            || flags & !(IN_USE | AUTO | EXTRA_DATA_COMPATIBLE) != 0
            || name_size > MAX_NAME_SIZE
            || (table_size != 0
                && (!table_offset.is_multiple_of(cs)
                    || table_offset < cs
                    || table_offset.saturating_add(phys) > file_len))
            || (extra_size != 0 && flags & EXTRA_DATA_COMPATIBLE == 0)
        {
            return Err(format!("Bitmap '{name}' doesn't satisfy the constraints"));
        }
        out.push(DirEntry {
            table_offset,
            table: vec![0; table_size as usize],
            flags,
            granularity_bits,
            extra,
            name,
        });
        at += len;
    }
    if at as u64 != b.len() as u64 {
        return Err(String::from("Broken bitmap directory"));
    }
    Ok(out)
}

/// The directory as stored (QEMU: `bitmap_list_store`'s encoding).
pub fn encode_dir(entries: &[DirEntry]) -> Vec<u8> {
    let mut b = Vec::new();
    for e in entries {
        let start = b.len();
        b.extend_from_slice(&e.table_offset.to_be_bytes());
        b.extend_from_slice(&(e.table.len() as u32).to_be_bytes());
        b.extend_from_slice(&e.flags.to_be_bytes());
        b.push(TYPE_DIRTY_TRACKING);
        b.push(e.granularity_bits);
        b.extend_from_slice(&(e.name.len() as u16).to_be_bytes());
        b.extend_from_slice(&(e.extra.len() as u32).to_be_bytes());
        b.extend_from_slice(&e.extra);
        b.extend_from_slice(e.name.as_bytes());
        b.resize(start + e.encoded_len(), 0);
    }
    b
}

/// Reads the directory and every bitmap table of an image whose bitmaps
/// extension is consistent (autoclear bit set).
pub async fn load_dir(f: &Child, st: &State, data: &[u8]) -> Result<Directory, String> {
    let cs = st.cs;
    let (nb, size, offset) = parse_ext(data, cs)?;
    if offset.saturating_add(size) > st.file_len {
        return Err(String::from("bitmaps_ext: invalid bitmap directory offset"));
    }
    let rd = |e: crate::io::IoError| format!("Could not read the bitmap directory: {e}");
    let b = f
        .read(offset, size as usize, ReqFlags::NONE)
        .await
        .map_err(rd)?;
    let mut entries = parse_dir(&b, nb, cs, st.file_len)?;
    for e in entries.iter_mut() {
        // QEMU's `check_dir_entry`: the table covers the image. An entry
        // in use may predate a resize; its content is not used anyway.
        let want = table_size(st.h.size, 1 << e.granularity_bits, cs);
        if e.flags & IN_USE == 0 && (e.table.len() as u64) < want {
            return Err(format!(
                "Bitmap '{}' doesn't satisfy the constraints",
                e.name
            ));
        }
        if e.table.is_empty() {
            continue;
        }
        let t = f
            .read(e.table_offset, e.table.len() * 8, ReqFlags::NONE)
            .await
            .map_err(|err| format!("Could not read bitmap '{}': {err}", e.name))?;
        e.table = decode_table(&t);
        for &x in &e.table {
            let off = x & OFFSET_MASK;
            if x & TABLE_ENTRY_RESERVED != 0
                || (off != 0 && x & ALL_ONES != 0)
                || (off != 0 && (off < cs || off.saturating_add(cs) > st.file_len))
            {
                return Err(format!(
                    "Bitmap '{}' has an invalid bitmap table entry {x:#x}",
                    e.name
                ));
            }
        }
    }
    Ok(Directory {
        offset,
        size,
        entries,
    })
}

/// The node's bitmaps for the directory's entries (QEMU:
/// `qcow2_load_dirty_bitmaps`): the data of consistent ones is read, an
/// entry `in-use` becomes an empty inconsistent bitmap.
pub async fn load_bitmaps(
    f: &Child,
    st: &State,
    dir: &Directory,
) -> Result<Vec<NamedBitmap>, String> {
    let cs = st.cs;
    let mut out = Vec::new();
    for e in &dir.entries {
        let mut b = NamedBitmap::new(&e.name, st.h.size, 1 << e.granularity_bits);
        b.persistent = true;
        b.readonly = st.read_only;
        b.enabled = e.flags & AUTO != 0;
        if e.flags & IN_USE != 0 {
            b.inconsistent = true;
            b.enabled = false;
            log::warn!(
                "qcow2 node '{}': bitmap '{}' was not stored when the image was last used: it is inconsistent",
                st.name,
                e.name
            );
        } else {
            for (i, &x) in e.table.iter().enumerate() {
                let at = i as u64 * cs;
                let off = x & OFFSET_MASK;
                if off != 0 {
                    let data = f
                        .read(off, cs as usize, ReqFlags::NONE)
                        .await
                        .map_err(|err| format!("Could not read bitmap '{}': {err}", e.name))?;
                    b.bitmap.deserialize(at, &data);
                } else if x & ALL_ONES != 0 {
                    b.bitmap.deserialize(at, &vec![0xff; cs as usize]);
                }
            }
        }
        out.push(b);
    }
    Ok(out)
}

/// Marks every consistent entry `in-use` in the image, in place (QEMU:
/// `update_ext_header_and_dir_in_place` at a read-write open): from now on
/// the stored data is stale until [`store`] runs.
pub async fn mark_in_use(f: &Child, st: &mut State, dir: &mut Directory) -> IoResult<()> {
    for e in dir.entries.iter_mut() {
        e.flags |= IN_USE;
    }
    let b = encode_dir(&dir.entries);
    st.pwrite(f, dir.offset, b).await?;
    f.flush().await
}

/// Every cluster the bitmaps use: directory, tables, data (for the
/// consistency check and the repair of dirty images).
pub fn clusters(dir: &Directory, cs: u64) -> Vec<(u64, u64)> {
    let mut v = vec![(dir.offset, dir.size.div_ceil(cs) * cs)];
    for e in &dir.entries {
        if !e.table.is_empty() {
            v.push((e.table_offset, (e.table.len() as u64 * 8).div_ceil(cs) * cs));
        }
        for x in &e.table {
            let off = x & OFFSET_MASK;
            if off != 0 {
                v.push((off, cs));
            }
        }
    }
    v
}

async fn write_bitmap(f: &Child, st: &mut State, b: &NamedBitmap) -> IoResult<DirEntry> {
    let cs = st.cs;
    let g = b.bitmap.granularity();
    let n = table_size(b.bitmap.len(), g, cs);
    let mut table = Vec::with_capacity(n as usize);
    for i in 0..n {
        let data = b.bitmap.serialize(i * cs, cs as usize);
        if data.iter().all(|x| *x == 0) {
            table.push(0);
            continue;
        }
        let off = st.alloc_clusters(f, 1).await?;
        st.pwrite(f, off, data).await?;
        table.push(off);
    }
    let mut table_offset = 0;
    if n > 0 {
        let bytes = (n * 8).div_ceil(cs) * cs;
        table_offset = st.alloc_clusters(f, bytes / cs).await?;
        let mut t = vec![0u8; bytes as usize];
        for (i, x) in table.iter().enumerate() {
            put64(&mut t, i * 8, *x);
        }
        st.pwrite(f, table_offset, t).await?;
    }
    Ok(DirEntry {
        table_offset,
        table,
        flags: if b.enabled { AUTO } else { 0 },
        granularity_bits: g.trailing_zeros() as u8,
        extra: Vec::new(),
        name: b.name.clone(),
    })
}

/// Stores the node's persistent bitmaps (QEMU:
/// `qcow2_store_persistent_dirty_bitmaps`): new data, tables and
/// directory, the header pointed at them, then the old clusters freed.
/// Entries of inconsistent bitmaps stay as they are; entries without a
/// bitmap on the node any more are dropped.
pub async fn store(f: &Child, st: &mut State, node: &Node) -> IoResult<()> {
    if st.read_only || st.corrupt {
        return Ok(());
    }
    let mine: Vec<NamedBitmap> = node
        .dirty_bitmaps()
        .iter()
        .filter(|b| b.persistent && !b.inconsistent)
        .cloned()
        .collect();
    let keep: Vec<String> = node
        .dirty_bitmaps()
        .iter()
        .filter(|b| b.persistent && b.inconsistent)
        .map(|b| b.name.clone())
        .collect();
    let Some(old) = st.bitmaps.clone() else {
        if mine.is_empty() {
            return Ok(());
        }
        return write_directory(f, st, &mine, Vec::new(), None).await;
    };
    // Entries of inconsistent bitmaps are carried over; the others are
    // replaced (or dropped) and freed once the new directory is in place.
    let (kept, dropped): (Vec<DirEntry>, Vec<DirEntry>) = old
        .entries
        .iter()
        .cloned()
        .partition(|e| keep.contains(&e.name));
    write_directory(f, st, &mine, kept, Some((old, dropped))).await
}

/// Takes the entry `name` out of the image at once (QEMU:
/// `qcow2_co_remove_persistent_dirty_bitmap`): a new directory without it,
/// the others as they are; its clusters freed. Nothing to do if the image
/// has no such entry (a bitmap added since the open).
pub async fn remove(f: &Child, st: &mut State, name: &str) -> IoResult<()> {
    let Some(old) = st.bitmaps.clone() else {
        return Ok(());
    };
    if st.read_only || !old.entries.iter().any(|e| e.name == name) {
        return Ok(());
    }
    let (dropped, kept): (Vec<DirEntry>, Vec<DirEntry>) =
        old.entries.iter().cloned().partition(|e| e.name == name);
    write_directory(f, st, &[], kept, Some((old, dropped))).await
}

async fn write_directory(
    f: &Child,
    st: &mut State,
    mine: &[NamedBitmap],
    mut entries: Vec<DirEntry>,
    old: Option<(Directory, Vec<DirEntry>)>,
) -> IoResult<()> {
    let cs = st.cs;
    for b in mine {
        entries.push(write_bitmap(f, st, b).await?);
    }
    let mut dir = Directory::default();
    if !entries.is_empty() {
        let bytes = encode_dir(&entries);
        dir.size = bytes.len() as u64;
        let n = dir.size.div_ceil(cs);
        dir.offset = st.alloc_clusters(f, n).await?;
        let mut padded = bytes;
        padded.resize((n * cs) as usize, 0);
        st.pwrite(f, dir.offset, padded).await?;
    }
    dir.entries = entries;
    // Everything the new header points to is durable first.
    st.flush_caches(f).await?;
    f.flush().await?;
    let ext_data = (!dir.entries.is_empty()).then(|| {
        let mut d = vec![0u8; 24];
        d[..4].copy_from_slice(&(dir.entries.len() as u32).to_be_bytes());
        put64(&mut d, 8, dir.size);
        put64(&mut d, 16, dir.offset);
        d
    });
    let current = f.read(0, cs as usize, ReqFlags::NONE).await?;
    let Some(mut new) = header::with_extension(&st.h, &current, ext::BITMAPS, ext_data.as_deref())
    else {
        log::error!(
            "qcow2 node '{}': the bitmap directory does not fit in the header cluster",
            st.name
        );
        return Err(crate::io::IoError::Einval);
    };
    let ac = if dir.entries.is_empty() {
        st.h.autoclear & !autoclear::BITMAPS
    } else {
        st.h.autoclear | autoclear::BITMAPS
    };
    put64(&mut new, field::AUTOCLEAR as usize, ac);
    st.write_header_field(f, 0, new.clone()).await?;
    f.flush().await?;
    if let Ok(h) = header::Header::parse(&new) {
        st.h.extensions = h.extensions;
        st.h.has_bitmaps = h.has_bitmaps;
    }
    st.h.autoclear = ac;
    st.bitmaps = (!dir.entries.is_empty()).then_some(dir);
    if let Some((old_dir, dropped)) = old {
        // The old directory and every entry not carried over as it was.
        let freed = Directory {
            entries: dropped,
            ..old_dir
        };
        for (off, len) in clusters(&freed, cs) {
            if off != 0 && len > 0 {
                st.free_now(f, off, len).await?;
            }
        }
        st.flush_caches(f).await?;
    }
    Ok(())
}

/// Whether the image may be resized with these bitmaps (QEMU:
/// `qcow2_truncate_bitmaps_check`): the node's bitmaps are resized with it
/// and stored at their new size, so every stored one must be usable.
pub fn truncate_check(dir: Option<&Directory>, node: &[NamedBitmap]) -> Result<(), String> {
    for e in dir.map(|d| &d.entries[..]).unwrap_or_default() {
        let Some(b) = node.iter().find(|b| b.name == e.name) else {
            return Err(String::from(
                "Cannot resize qcow2 with persistent bitmaps that were not loaded into memory",
            ));
        };
        b.check(crate::dirty_bitmap::check::DEFAULT)?;
    }
    Ok(())
}

/// Whether a new persistent bitmap can be stored in this image (QEMU:
/// `qcow2_co_can_store_new_dirty_bitmap` and `check_constraints_on_bitmap`),
/// with QEMU's texts. `stored` are the node's persistent bitmaps now.
pub fn can_store_new(
    h: &header::Header,
    read_only: bool,
    stored: &[&NamedBitmap],
    name: &str,
    granularity: u64,
) -> Result<(), String> {
    let cs = h.cluster_size();
    let bits = granularity.trailing_zeros();
    if h.version < 3 {
        Err(String::from("Cannot store dirty bitmaps in qcow2 v2 files"))
    } else if read_only {
        Err(String::from("the image is opened read-only"))
    } else if bits > u32::from(MAX_GRANULARITY_BITS) {
        Err(format!(
            "Granularity exceeds maximum ({} bytes)",
            1u64 << MAX_GRANULARITY_BITS
        ))
    } else if bits < u32::from(MIN_GRANULARITY_BITS) {
        Err(format!(
            "Granularity is under minimum ({} bytes)",
            1u64 << MIN_GRANULARITY_BITS
        ))
    } else if h.size.div_ceil(granularity).div_ceil(8) > 0x2000_0000
        || table_size(h.size, granularity, cs) > MAX_TABLE_SIZE
    {
        Err(String::from(
            "Too much space will be occupied by the bitmap. Use larger granularity",
        ))
    } else if name.len() > MAX_NAME_SIZE {
        Err(format!(
            "Name length exceeds maximum ({MAX_NAME_SIZE} characters)"
        ))
    } else if stored.len() >= MAX_BITMAPS as usize {
        Err(String::from(
            "Maximum number of persistent bitmaps is already reached",
        ))
    } else if stored
        .iter()
        .map(|b| (24 + b.name.len()).div_ceil(8) * 8)
        .sum::<usize>()
        + (24 + name.len()).div_ceil(8) * 8
        > MAX_DIRECTORY_SIZE as usize
    {
        Err(String::from("Not enough space in the bitmap directory"))
    } else {
        Ok(())
    }
}
