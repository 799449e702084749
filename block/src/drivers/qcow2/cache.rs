//! The metadata table caches (QEMU: `Qcow2Cache` in `block/qcow2-cache.c`,
//! one for L2 tables, one for refcount blocks).
//!
//! A cache holds whole clusters by their offset in the image file, marks
//! them dirty when changed and evicts the least recently used clean entry.
//! It does no I/O itself: the image state ([`super::state::State`]) loads
//! and writes entries back in the order QEMU's *flush dependencies* demand
//! (`qcow2_cache_set_dependency`): refcount blocks before the L2 tables
//! whose new entries they account for, and L2 tables before the refcount
//! decrements of what they stopped referencing.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

/// One cached table.
pub struct Slot {
    /// Offset of the table in the image file.
    pub offset: u64,
    /// The table's bytes, one cluster.
    pub data: Vec<u8>,
    /// Changed since it was read or written.
    pub dirty: bool,
    used: u64,
}

/// A table cache of at most `capacity` clusters.
pub struct Cache {
    capacity: usize,
    slots: Vec<Slot>,
    index: BTreeMap<u64, usize>,
    tick: u64,
}

impl Cache {
    /// An empty cache of `capacity` tables (at least 2).
    pub fn new(capacity: usize) -> Cache {
        Cache {
            capacity: capacity.max(2),
            slots: Vec::new(),
            index: BTreeMap::new(),
            tick: 0,
        }
    }

    /// The index of the table at `offset`, marking it used.
    pub fn find(&mut self, offset: u64) -> Option<usize> {
        self.tick += 1;
        let t = self.tick;
        let i = *self.index.get(&offset)?;
        self.slots[i].used = t;
        Some(i)
    }

    /// The slot at `i`.
    pub fn slot(&self, i: usize) -> Option<&Slot> {
        self.slots.get(i)
    }

    /// The slot at `i`, for a change (the caller marks it dirty).
    pub fn slot_mut(&mut self, i: usize) -> Option<&mut Slot> {
        self.slots.get_mut(i)
    }

    /// Whether a new table needs an eviction first.
    pub fn is_full(&self) -> bool {
        self.slots.len() >= self.capacity
    }

    /// Drops the least recently used clean table; `false` if all are dirty.
    pub fn evict_clean(&mut self) -> bool {
        let victim = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.dirty)
            .min_by_key(|(_, s)| s.used)
            .map(|(i, _)| i);
        match victim {
            Some(i) => {
                self.remove_at(i);
                true
            }
            None => false,
        }
    }

    /// The least recently used table (dirty or not).
    pub fn lru(&self) -> Option<usize> {
        self.slots
            .iter()
            .enumerate()
            .min_by_key(|(_, s)| s.used)
            .map(|(i, _)| i)
    }

    /// Adds a table (the caller made room) and returns its index.
    pub fn insert(&mut self, offset: u64, data: Vec<u8>, dirty: bool) -> usize {
        self.tick += 1;
        self.remove(offset);
        self.slots.push(Slot {
            offset,
            data,
            dirty,
            used: self.tick,
        });
        let i = self.slots.len() - 1;
        self.index.insert(offset, i);
        i
    }

    fn remove_at(&mut self, i: usize) {
        let s = self.slots.swap_remove(i);
        self.index.remove(&s.offset);
        if let Some(moved) = self.slots.get(i) {
            self.index.insert(moved.offset, i);
        }
    }

    /// Forgets the table at `offset` (it was freed or replaced).
    pub fn remove(&mut self, offset: u64) {
        if let Some(i) = self.index.get(&offset).copied() {
            self.remove_at(i);
        }
    }

    /// Indices of dirty tables, lowest offset first (sequential writes).
    pub fn dirty(&self) -> Vec<usize> {
        let mut v: Vec<usize> = (0..self.slots.len())
            .filter(|i| self.slots[*i].dirty)
            .collect();
        v.sort_by_key(|i| self.slots[*i].offset);
        v
    }

    /// Whether any table is dirty.
    pub fn any_dirty(&self) -> bool {
        self.slots.iter().any(|s| s.dirty)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn evicts_least_recently_used_clean() {
        let mut c = Cache::new(2);
        c.insert(512, vec![0; 4], false);
        c.insert(1024, vec![0; 4], true);
        assert!(c.is_full());
        assert!(c.find(512).is_some());
        assert!(c.evict_clean());
        assert!(c.find(512).is_none());
        assert!(!c.evict_clean());
        assert_eq!(c.dirty().len(), 1);
    }
}
