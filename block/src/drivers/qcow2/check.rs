//! A consistency check (QEMU: `qcow2_check_refcounts`, the core of
//! `qemu-img check`): recomputes every cluster's refcount from the
//! metadata and compares it with the refcount blocks.
//!
//! Covers the header, the L1 table, L2 tables, data and compressed
//! clusters, the refcount table and blocks. Images with internal snapshots
//! (whose tables this does not walk) are not checked.

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use crate::child::Child;
use crate::io::IoResult;

use super::cluster::COPIED;
use super::state::{OFFSET_MASK, State};

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
    async fn references(
        &mut self,
        f: &Child,
    ) -> IoResult<(BTreeMap<u64, u64>, Vec<(String, u64, bool)>)> {
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
        for (i, e) in self.l1.clone().iter().enumerate() {
            let off = e & OFFSET_MASK;
            if off != 0 {
                self.count(&mut want, off, cs);
                copied_checks.push((format!("L1 entry {i}"), off, e & COPIED != 0));
            }
        }
        for (g, e) in self.all_entries(f).await? {
            if self.is_compressed(e) {
                let (o, l) = self.compressed_extent(e);
                self.count(&mut want, o, l);
                continue;
            }
            let host = self.host(e);
            if host == 0 {
                continue;
            }
            let _ = self.sub(e, 0)?;
            self.count(&mut want, host, cs);
            copied_checks.push((format!("L2 entry for {g:#x}"), host, e.word & COPIED != 0));
        }
        Ok((want, copied_checks))
    }

    /// Repairs the refcounts of an image left dirty by lazy refcounts
    /// (QEMU: `qcow2_check` with `BDRV_FIX_ERRORS | BDRV_FIX_LEAKS` at
    /// open, then `qcow2_mark_clean`). Clusters in use are reserved while
    /// missing refcount blocks are allocated. Returns how many refcounts
    /// changed.
    pub async fn repair(&mut self, f: &Child) -> IoResult<u64> {
        let (want, _) = self.references(f).await?;
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
        let (want, _) = self.references(f).await?;
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
        let (want, copied_checks) = self.references(f).await?;
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
