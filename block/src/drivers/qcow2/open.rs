//! Opening an image (QEMU: `qcow2_do_open`): header, feature checks, table
//! validation, the L1 and refcount tables, and the backing file.
//!
//! Every table is checked before it is used (QEMU: `qcow2_validate_table`
//! plus blockhaus's own bounds): aligned to a cluster, not in the header
//! cluster, inside the image file, not absurdly large. Nothing is written
//! to the image unless it opens read-write and every check passed; a
//! corrupt image opens read-only only. A
//! dirty image (lazy refcounts, not closed cleanly) opened read-write has
//! its refcounts rebuilt from the L1/L2 tables first, as QEMU does. The
//! bitmap directory is read here ([`super::bitmaps`]).

use alloc::format;
use alloc::rc::Rc;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use crate::graph::child::{Child, attach_node_child};
use crate::graph::node::Node;
use crate::graph::permission::ChildRole;
use crate::io::ReqFlags;

use super::header::autoclear as autoclear_bits;
use super::header::{Header, MAX_L1_BYTES, MAX_REFTABLE_BYTES, MAX_SNAPSHOTS, field, incompat};
use super::refcount::decode_table;
use super::state::State;

/// Where the backing file comes from (the `backing` option).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackingOpt {
    /// Not given: the header's backing file name, as a node-name.
    FromHeader,
    /// `null` or `""`: no backing file.
    None,
    /// A node reference or definition, attached as the `backing` child.
    Child,
}

fn validate(
    off: u64,
    bytes: u64,
    cs: u64,
    file_len: u64,
    max: u64,
    what: &str,
) -> Result<(), String> {
    if bytes > max {
        return Err(format!("{what} too large"));
    }
    if !off.is_multiple_of(cs) || off.checked_add(bytes).is_none() {
        return Err(format!("{what} offset invalid"));
    }
    if bytes > 0 && off < cs {
        return Err(format!(
            "{what} offset invalid: it overlaps the image header"
        ));
    }
    if off + bytes > file_len {
        return Err(format!(
            "{what} offset invalid: the table ends past the end of the image file ({:#x} > {file_len:#x})",
            off + bytes
        ));
    }
    Ok(())
}

/// Reads a table of big-endian entries in pieces, into memory reserved
/// without aborting: a table too large for this machine is an error.
async fn read_table(f: &Child, off: u64, bytes: u64, what: &str) -> Result<Vec<u64>, String> {
    let n = (bytes / 8) as usize;
    let mut t: Vec<u64> = Vec::new();
    t.try_reserve_exact(n)
        .map_err(|_| format!("Could not allocate memory for the {what} ({bytes} bytes)"))?;
    let mut done = 0u64;
    while done < bytes {
        let chunk = (bytes - done).min(64 << 10);
        let b = f
            .read(off + done, chunk as usize, ReqFlags::NONE)
            .await
            .map_err(|e| format!("Could not read the {what}: {e}"))?;
        t.extend(decode_table(&b));
        done += chunk;
    }
    Ok(t)
}

/// Reads and checks the image behind `f`; the returned state is ready.
pub async fn load(f: &Child, name: &str, read_only: bool) -> Result<State, String> {
    let rd = |e: crate::io::IoError| format!("Could not read qcow2 header: {e}");
    let file_len = f.node().get_length().map_err(rd)?;
    if file_len < 72 {
        return Err(String::from("Image is not in qcow2 format"));
    }
    let probe = f
        .read(0, Header::PROBE_LEN, ReqFlags::NONE)
        .await
        .map_err(rd)?;
    let cs = Header::probe(&probe).map_err(|e| e.to_string())?;
    let first = f.read(0, cs as usize, ReqFlags::NONE).await.map_err(rd)?;
    let h = Header::parse(&first).map_err(|e| e.to_string())?;
    if !read_only && h.incompatible & incompat::CORRUPT != 0 {
        return Err(String::from(
            "qcow2: Image is corrupt; cannot be opened read/write",
        ));
    }
    if h.refcount_table_clusters == 0 {
        return Err(String::from(
            "Image does not contain a reference count table",
        ));
    }
    let rt_bytes = u64::from(h.refcount_table_clusters) * cs;
    validate(
        h.refcount_table_offset,
        rt_bytes,
        cs,
        file_len,
        MAX_REFTABLE_BYTES,
        "Reference count table",
    )?;
    if h.nb_snapshots > MAX_SNAPSHOTS {
        return Err(String::from("Too many snapshots"));
    }
    if h.nb_snapshots > 0 && (h.snapshots_offset % cs != 0 || h.snapshots_offset < cs) {
        return Err(String::from("Snapshot table offset invalid"));
    }
    let l1_bytes = u64::from(h.l1_size) * 8;
    if l1_bytes > MAX_L1_BYTES {
        return Err(String::from("Active L1 table too large"));
    }
    let l2_entries = if h.extended_l2() { cs / 16 } else { cs / 8 };
    let needed = h.size.div_ceil(cs * l2_entries);
    if u64::from(h.l1_size) < needed {
        return Err(String::from("L1 table is too small"));
    }
    validate(
        h.l1_table_offset,
        l1_bytes,
        cs,
        file_len,
        MAX_L1_BYTES,
        "Active L1 table",
    )?;
    let rt = read_table(
        f,
        h.refcount_table_offset,
        rt_bytes,
        "reference count table",
    )
    .await?;
    let l1 = read_table(f, h.l1_table_offset, l1_bytes, "L1 table").await?;
    let autoclear = h.autoclear;
    let mut st = State::new(name, h, l1, rt, file_len, read_only);
    let mut seen = alloc::collections::BTreeSet::new();
    for (i, e) in st.reftable.iter().enumerate() {
        let off = e & super::state::OFFSET_MASK;
        if off != 0 && (!off.is_multiple_of(cs) || off < cs || off + cs > file_len) {
            return Err(format!(
                "Refcount block {i} at offset {off:#x} is outside the image file or unaligned"
            ));
        }
        if off != 0 && !seen.insert(off) {
            return Err(format!(
                "Refcount block {i} at offset {off:#x} is used twice in the refcount table"
            ));
        }
    }
    // The bitmaps extension counts only with its autoclear bit (QEMU:
    // `qcow2_read_extensions`); without it, a program that does not know
    // bitmaps wrote the image, and they are ignored (their clusters leak).
    let bitmaps_ext =
        st.h.extensions
            .iter()
            .find(|(k, _)| *k == super::header::ext::BITMAPS)
            .map(|(_, d)| d.clone());
    match &bitmaps_ext {
        Some(data) if autoclear & autoclear_bits::BITMAPS != 0 => {
            st.bitmaps = Some(super::bitmaps::load_dir(f, &st, data).await?);
        }
        Some(_) => log::warn!(
            "qcow2 node '{name}': a program lacking bitmap support modified this file, \
             so all bitmaps are now considered inconsistent"
        ),
        None => {}
    }
    // Autoclear features this driver does not maintain are cleared before
    // the first write, as the spec requires; the bitmaps bit is kept when
    // the bitmaps were loaded (they are kept consistent).
    let keep = if st.bitmaps.is_some() {
        autoclear & autoclear_bits::BITMAPS
    } else {
        0
    };
    if !read_only && autoclear != keep {
        st.write_header_field(f, field::AUTOCLEAR, keep.to_be_bytes().to_vec())
            .await
            .map_err(|e| format!("Could not update qcow2 header: {e}"))?;
        f.flush()
            .await
            .map_err(|e| format!("Could not update qcow2 header: {e}"))?;
        st.h.autoclear = keep;
    }
    if !read_only && st.h.incompatible & incompat::DIRTY != 0 {
        // Lazy refcounts were in use and the image was not closed: rebuild
        // the refcounts before anything else is written (QEMU repairs at
        // open the same way).
        let n = st
            .repair(f)
            .await
            .map_err(|e| format!("Could not repair dirty image: {e}"))?;
        st.flush_caches(f)
            .await
            .map_err(|e| format!("Could not repair dirty image: {e}"))?;
        f.flush()
            .await
            .map_err(|e| format!("Could not repair dirty image: {e}"))?;
        let clean = st.h.incompatible & !incompat::DIRTY;
        st.write_header_field(f, field::INCOMPAT, clean.to_be_bytes().to_vec())
            .await
            .map_err(|e| format!("Could not update qcow2 header: {e}"))?;
        f.flush()
            .await
            .map_err(|e| format!("Could not update qcow2 header: {e}"))?;
        st.h.incompatible = clean;
        log::info!(
            "qcow2 node '{name}': repaired {n} refcounts of an image that was not closed cleanly"
        );
    }
    let used = st
        .count_used(f)
        .await
        .map_err(|e| format!("Could not read the reference counts: {e}"))?;
    st.used.set(used);
    Ok(st)
}

/// Attaches the header's backing file by node-name (blockhaus has no file
/// system to open it by name). Returns whether a backing child exists now.
pub fn attach_backing_from_header(node: &Rc<Node>, backing_file: &str) -> Result<(), String> {
    let reg = node
        .registry()
        .ok_or_else(|| String::from("qcow2: no registry"))?;
    let Some(b) = reg.find_node(backing_file) else {
        return Err(format!(
            "Could not open backing file '{backing_file}': blockhaus opens backing files as nodes only; \
             add a node named '{backing_file}' first, or give 'backing' (a node-name or definition, or null)"
        ));
    };
    b.ref_();
    match attach_node_child(node, "backing", ChildRole::COW, &b) {
        Ok(_) => Ok(()),
        Err(e) => {
            b.unref_nonfinal();
            Err(format!("Could not open backing file '{backing_file}': {e}"))
        }
    }
}
