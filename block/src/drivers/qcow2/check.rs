//! A consistency check (QEMU: `qcow2_check_refcounts`, the core of
//! `qemu-img check`): recomputes every cluster's refcount from the
//! metadata and compares it with the refcount blocks.
//!
//! Covers the header, the L1 table, L2 tables, data and compressed
//! clusters, the refcount table and blocks, and internal snapshots (their
//! table, L1 tables and what those reference) and persistent bitmaps
//! (directory, tables, data).

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use crate::graph::child::Child;
use crate::io::IoResult;

use super::cluster::{COPIED, L2Entry};
use super::state::{OFFSET_MASK, State, get64};
use crate::io::ReqFlags;

/// What a check found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Clusters whose refcount is lower than their references (or a
    /// wrong COPIED flag): QEMU's "ERROR".
    pub corruptions: Vec<String>,
    /// Clusters with a refcount but fewer references: QEMU's "Leaked".
    pub leaks: Vec<u64>,
}

impl CheckReport {
    /// No errors, no leaks.
    pub fn is_clean(&self) -> bool {
        self.corruptions.is_empty() && self.leaks.is_empty()
    }
}

/// What the metadata references: the refcount each cluster index needs
/// (`want`, inside the file), the `OFLAG_COPIED` checks, and the clusters
/// referenced at or past the end of the file (`beyond`).
struct References {
    want: BTreeMap<u64, u64>,
    copied_checks: Vec<(String, u64, bool)>,
    beyond: BTreeMap<u64, u64>,
}

/// QEMU's text for a reference past the end of the file.
fn beyond_the_end(offset: u64, size: u64) -> String {
    format!(
        "counting reference for region exceeding the end of the file by one cluster or more: offset {offset:#x} size {size:#x}"
    )
}

impl State {
    fn count(&self, map: &mut BTreeMap<u64, u64>, off: u64, len: u64) {
        if len == 0 {
            return;
        }
        for c in off / self.cs..=(off + len - 1) / self.cs {
            *map.entry(c).or_insert(0) += 1;
        }
    }

    /// Every cluster's refcount as the metadata implies it, and the
    /// COPIED flags to verify: `(what, cluster offset, flag set)`.
    #[allow(clippy::type_complexity)]
    async fn references(&mut self, f: &Child) -> IoResult<References> {
        let mut want: BTreeMap<u64, u64> = BTreeMap::new();
        let cs = self.cs;
        self.count(&mut want, 0, cs);
        let l1_bytes = (self.l1.len() as u64 * 8).div_ceil(cs) * cs;
        self.count(&mut want, self.h.l1_table_offset, l1_bytes);
        let rt_bytes = u64::from(self.h.refcount_table_clusters) * cs;
        self.count(&mut want, self.h.refcount_table_offset, rt_bytes);
        for e in self.reftable.clone() {
            let off = e & OFFSET_MASK;
            if off != 0 {
                self.count(&mut want, off, cs);
            }
        }
        let mut copied_checks = Vec::new();
        let l1 = self.l1.clone();
        self.count_tree(f, &l1, &mut want, Some(&mut copied_checks))
            .await?;
        // Internal snapshots: their table, their L1 tables and everything
        // those reference (QEMU counts a table shared with the active L1
        // once per L1, and its clusters with it).
        let mut at = self.h.snapshots_offset;
        let mut budget: u64 = 64 << 20;
        for _ in 0..self.h.nb_snapshots {
            let e = f.read(at, 40, ReqFlags::NONE).await?;
            let l1_off = get64(&e, 0);
            let l1_size = u64::from(u32::from_be_bytes([e[8], e[9], e[10], e[11]]));
            let id = u64::from(u16::from_be_bytes([e[12], e[13]]));
            let name = u64::from(u16::from_be_bytes([e[14], e[15]]));
            let extra = u64::from(u32::from_be_bytes([e[36], e[37], e[38], e[39]]));
            at += (40 + extra + id + name).div_ceil(8) * 8;
            if l1_size * 8 > super::header::MAX_L1_BYTES
                || l1_off.saturating_add(l1_size * 8) > self.file_len
                || at > self.file_len
            {
                return Err(self.corruption("snapshot table or snapshot L1 table invalid"));
            }
            budget = match budget.checked_sub(l1_size * 8) {
                Some(b) => b,
                None => {
                    log::error!(
                        "qcow2 node '{}': snapshot L1 tables too large to walk",
                        self.name
                    );
                    return Err(crate::io::IoError::Eio);
                }
            };
            self.count(&mut want, l1_off, (l1_size * 8).div_ceil(cs) * cs);
            let b = f
                .read(l1_off, (l1_size * 8) as usize, ReqFlags::NONE)
                .await?;
            let snap_l1 = super::refcount::decode_table(&b);
            self.count_tree(f, &snap_l1, &mut want, None).await?;
        }
        if self.h.nb_snapshots > 0 {
            let start = self.h.snapshots_offset;
            self.count(&mut want, start, at - start);
        }
        // Persistent bitmaps (QEMU: `qcow2_check_bitmaps_refcounts`).
        if let Some(dir) = &self.bitmaps {
            for (off, len) in super::bitmaps::clusters(dir, cs) {
                self.count(&mut want, off, len);
            }
        }
        Ok(References {
            beyond: want.split_off(&self.file_len.div_ceil(cs)),
            want,
            copied_checks,
        })
    }

    /// Counts the L2 tables of `l1` and the clusters they reference.
    async fn count_tree(
        &mut self,
        f: &Child,
        l1: &[u64],
        want: &mut BTreeMap<u64, u64>,
        mut copied: Option<&mut Vec<(String, u64, bool)>>,
    ) -> IoResult<()> {
        let cs = self.cs;
        let per = if self.ext { 16 } else { 8 };
        for (i, e) in l1.iter().enumerate() {
            let off = e & OFFSET_MASK;
            if off == 0 {
                continue;
            }
            self.count(want, off, cs);
            if let Some(c) = copied.as_deref_mut() {
                c.push((format!("L1 entry {i}"), off, e & COPIED != 0));
            }
            self.check_table(off, "L2 table")?;
            let slot = self.load_l2(f, off).await?;
            let table = self
                .l2c
                .slot(slot)
                .map(|s| s.data.clone())
                .unwrap_or_default();
            for j in 0..self.l2_entries as usize {
                let word = get64(&table, j * per);
                let e = L2Entry {
                    word,
                    bitmap: if self.ext {
                        get64(&table, j * per + 8)
                    } else {
                        0
                    },
                };
                if self.is_compressed(e) {
                    let (o, l) = self.compressed_extent(e);
                    self.count(want, o, l);
                    continue;
                }
                let host = self.host(e);
                if host == 0 {
                    continue;
                }
                let _ = self.sub(e, 0)?;
                self.count(want, host, cs);
                if let Some(c) = copied.as_deref_mut() {
                    let g = (i as u64 * self.l2_entries + j as u64) * cs;
                    c.push((format!("L2 entry for {g:#x}"), host, word & COPIED != 0));
                }
            }
        }
        Ok(())
    }

    /// Repairs the refcounts of an image left dirty by lazy refcounts
    /// (QEMU: `qcow2_check` with `BDRV_FIX_ERRORS | BDRV_FIX_LEAKS` at
    /// open, then `qcow2_mark_clean`). Clusters in use are reserved while
    /// missing refcount blocks are allocated. Returns how many refcounts
    /// changed.
    pub async fn repair(&mut self, f: &Child) -> IoResult<u64> {
        let References { want, beyond, .. } = self.references(f).await?;
        // Nothing can hold a refcount for a cluster the file does not have
        // (and walking up to a wild offset would never end).
        if let Some(&c) = beyond.keys().next() {
            return Err(self.corruption(&beyond_the_end(c * self.cs, self.cs)));
        }
        self.reserved = want.keys().copied().collect();
        let end = want
            .keys()
            .next_back()
            .copied()
            .unwrap_or(0)
            .max(self.file_len.div_ceil(self.cs));
        let mut fixed = 0;
        let mut c = 0;
        while c <= end {
            let have = self.refcount(f, c).await?;
            let need = want.get(&c).copied().unwrap_or(0);
            if have != need {
                self.force_refcount(f, c, need).await?;
                fixed += 1;
            }
            c += 1;
        }
        self.reserved.clear();
        // New refcount blocks count themselves; check once more.
        let References { want, .. } = self.references(f).await?;
        for (c, need) in want {
            if self.refcount(f, c).await? < need {
                self.force_refcount(f, c, need).await?;
            }
        }
        self.free_index = 0;
        Ok(fixed)
    }

    /// Checks the image (the caches are used, not written).
    pub async fn check(&mut self, f: &Child) -> IoResult<CheckReport> {
        let mut r = CheckReport::default();
        let cs = self.cs;
        let References {
            want,
            copied_checks,
            beyond,
        } = self.references(f).await?;
        // QEMU (`qcow2_inc_refcounts_imrt`): a reference past the end of
        // the file by a cluster or more is a corruption, not counted.
        for &c in beyond.keys() {
            r.corruptions.push(beyond_the_end(c * cs, cs));
        }
        let last = want.keys().next_back().copied().unwrap_or(0);
        let end = last.max(self.file_len.div_ceil(cs));
        for c in 0..=end {
            let have = self.refcount(f, c).await?;
            let need = want.get(&c).copied().unwrap_or(0);
            if have < need {
                r.corruptions.push(format!(
                    "cluster {:#x}: refcount={have} reference={need}",
                    c * cs
                ));
            } else if have > need {
                r.leaks.push(c * cs);
            }
        }
        for (what, off, copied) in copied_checks {
            let rc = self.refcount(f, off / cs).await?;
            if copied != (rc == 1) {
                r.corruptions.push(format!(
                    "OFLAG_COPIED wrong for {what} (cluster {off:#x}, refcount {rc})"
                ));
            }
        }
        Ok(r)
    }
}
