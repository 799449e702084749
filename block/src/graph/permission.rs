//! Permissions on child edges (QEMU: `BLK_PERM_*`, `bdrv_child_perm`,
//! `bdrv_a_allow_b`, `bdrv_default_perms`).
//!
//! Every edge carries `perm` (what its parent needs from the child node) and
//! `shared` (what the parent lets *other* parents of that node do). For every
//! pair of parents `a`, `b` of a node, `b.perm` must be a subset of
//! `a.shared`. A node's own edges to its children are derived from what its
//! parents need ([`crate::driver::BlockDriver::child_perm`]), so a change at
//! the top propagates down the graph; the graph code applies such changes as
//! a transaction and rolls everything back if any node refuses.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

/// A set of permissions (QEMU: `uint64_t perm` of `BLK_PERM_*` bits).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Perm(u8);

/// Names in QEMU's order: (bit, QAPI `BlockPermission` name, human name).
const NAMES: [(Perm, &str, &str); 4] = [
    (Perm::CONSISTENT_READ, "consistent-read", "consistent read"),
    (Perm::WRITE, "write", "write"),
    (Perm::WRITE_UNCHANGED, "write-unchanged", "write unchanged"),
    (Perm::RESIZE, "resize", "resize"),
];

impl Perm {
    /// No permission.
    pub const NONE: Perm = Perm(0);
    /// `BLK_PERM_CONSISTENT_READ`: reads see consistent data.
    pub const CONSISTENT_READ: Perm = Perm(1);
    /// `BLK_PERM_WRITE`: writes that change what readers see.
    pub const WRITE: Perm = Perm(2);
    /// `BLK_PERM_WRITE_UNCHANGED`: writes that leave visible content unchanged.
    pub const WRITE_UNCHANGED: Perm = Perm(4);
    /// `BLK_PERM_RESIZE`: changing the node's length.
    pub const RESIZE: Perm = Perm(8);
    /// `BLK_PERM_ALL`.
    pub const ALL: Perm = Perm(15);
    /// QEMU's `DEFAULT_PERM_PASSTHROUGH`: what a filter forwards.
    pub const PASSTHROUGH: Perm = Perm::ALL;

    /// Whether every bit of `other` is in `self`.
    pub fn contains(self, other: Perm) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether any bit of `other` is in `self`.
    pub fn intersects(self, other: Perm) -> bool {
        self.0 & other.0 != 0
    }

    /// `self & other`.
    pub fn and(self, other: Perm) -> Perm {
        Perm(self.0 & other.0)
    }

    /// `self & !other`.
    pub fn minus(self, other: Perm) -> Perm {
        Perm(self.0 & !other.0)
    }

    /// Whether the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// QAPI names (`"consistent-read"`, …), as `x-debug-query-block-graph`
    /// reports them.
    pub fn qapi_names(self) -> Vec<&'static str> {
        NAMES
            .iter()
            .filter(|(p, _, _)| self.contains(*p))
            .map(|(_, n, _)| *n)
            .collect()
    }

    /// Human names joined by `", "` (QEMU: `bdrv_perm_names`).
    pub fn human_names(self) -> String {
        let mut s = String::new();
        for (p, _, name) in NAMES {
            if self.contains(p) {
                if !s.is_empty() {
                    s.push_str(", ");
                }
                s.push_str(name);
            }
        }
        s
    }

    /// Parses one QAPI `BlockPermission` name.
    pub fn from_qapi_name(name: &str) -> Option<Perm> {
        NAMES
            .iter()
            .find(|(_, n, _)| *n == name)
            .map(|(p, _, _)| *p)
    }
}

impl core::ops::BitOr for Perm {
    type Output = Perm;
    fn bitor(self, rhs: Perm) -> Perm {
        Perm(self.0 | rhs.0)
    }
}

impl core::ops::BitOrAssign for Perm {
    fn bitor_assign(&mut self, rhs: Perm) {
        self.0 |= rhs.0;
    }
}

/// What a child is to its parent (QEMU: `BdrvChildRole`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChildRole(u8);

impl ChildRole {
    /// `BDRV_CHILD_DATA`: holds guest data.
    pub const DATA: ChildRole = ChildRole(1);
    /// `BDRV_CHILD_METADATA`: holds the format's metadata.
    pub const METADATA: ChildRole = ChildRole(2);
    /// `BDRV_CHILD_FILTERED`: the parent passes everything through.
    pub const FILTERED: ChildRole = ChildRole(4);
    /// `BDRV_CHILD_COW`: a backing file.
    pub const COW: ChildRole = ChildRole(8);
    /// `BDRV_CHILD_PRIMARY`: the parent's main child (`file`, `image`).
    pub const PRIMARY: ChildRole = ChildRole(16);

    /// Whether every bit of `other` is set.
    pub fn contains(self, other: ChildRole) -> bool {
        self.0 & other.0 == other.0
    }
}

impl core::ops::BitOr for ChildRole {
    type Output = ChildRole;
    fn bitor(self, rhs: ChildRole) -> ChildRole {
        ChildRole(self.0 | rhs.0)
    }
}

/// QEMU's `bdrv_filter_default_perms`: pass through what the parents need
/// and what they share.
pub fn filter_default_perms(perm: Perm, shared: Perm) -> (Perm, Perm) {
    (perm.and(Perm::PASSTHROUGH), shared.and(Perm::PASSTHROUGH))
}

/// QEMU's `bdrv_default_perms` for a node whose child has `role`;
/// `writable` says whether the parent node itself is read-write.
pub fn default_perms(role: ChildRole, writable: bool, perm: Perm, shared: Perm) -> (Perm, Perm) {
    if role.contains(ChildRole::FILTERED) {
        return filter_default_perms(perm, shared);
    }
    let (mut perm, mut shared) = filter_default_perms(perm, shared);
    if role.contains(ChildRole::COW) {
        // bdrv_default_perms_for_cow: only reads go to a backing file; if the
        // parent copes with changing data, the backing file may change too.
        let perm = perm.and(Perm::CONSISTENT_READ);
        let shared = if shared.contains(Perm::WRITE) {
            Perm::WRITE | Perm::RESIZE
        } else {
            Perm::NONE
        };
        return (perm, shared | Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED);
    }
    if role.contains(ChildRole::METADATA) {
        if writable {
            perm |= Perm::WRITE | Perm::RESIZE;
        }
        perm |= Perm::CONSISTENT_READ;
        shared = shared.minus(Perm::WRITE | Perm::RESIZE);
    }
    if role.contains(ChildRole::DATA) {
        shared = shared.minus(Perm::RESIZE);
        if perm.contains(Perm::WRITE_UNCHANGED) {
            perm |= Perm::WRITE;
        }
        if perm.contains(Perm::WRITE) {
            perm |= Perm::RESIZE;
        }
    }
    (perm, shared)
}

/// Two parents of one node disagree (QEMU: the error of `bdrv_a_allow_b`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PermConflict {
    /// The node both parents use.
    pub node: String,
    /// The permissions `required_by` needs and `unshared_by` does not share.
    pub perms: Perm,
    /// Description of the parent needing the permissions (`node 'x'`,
    /// `block device 'drv'`, `an unnamed block device`, …).
    pub required_by: String,
    /// Edge name of that parent (`file`, `root`, …).
    pub required_child: String,
    /// Description of the parent refusing to share them.
    pub unshared_by: String,
    /// Edge name of that parent.
    pub unshared_child: String,
}

impl fmt::Display for PermConflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Permission conflict on node '{n}': permissions '{p}' are both required by {b} \
             (uses node '{n}' as '{bc}' child) and unshared by {a} (uses node '{n}' as '{ac}' child).",
            n = self.node,
            p = self.perms.human_names(),
            b = self.required_by,
            bc = self.required_child,
            a = self.unshared_by,
            ac = self.unshared_child,
        )
    }
}

/// Why a permission change was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PermError {
    /// Two parents conflict.
    Conflict(alloc::boxed::Box<PermConflict>),
    /// A writer would attach to a read-only node.
    ReadOnly,
}

impl fmt::Display for PermError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PermError::Conflict(c) => c.fmt(f),
            PermError::ReadOnly => f.write_str("Block node is read-only"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    #[test]
    fn names_follow_qemu_order() {
        let p = Perm::RESIZE | Perm::CONSISTENT_READ | Perm::WRITE;
        assert_eq!(p.human_names(), "consistent read, write, resize");
        assert_eq!(p.qapi_names(), ["consistent-read", "write", "resize"]);
        assert_eq!(
            Perm::from_qapi_name("write-unchanged"),
            Some(Perm::WRITE_UNCHANGED)
        );
    }

    #[test]
    fn conflict_message_is_qemus() {
        let c = PermConflict {
            node: "disk".into(),
            perms: Perm::RESIZE,
            required_by: "an unnamed block device".into(),
            required_child: "root".into(),
            unshared_by: "block device 'exp'".into(),
            unshared_child: "root".into(),
        };
        assert_eq!(
            c.to_string(),
            "Permission conflict on node 'disk': permissions 'resize' are both required by an unnamed \
             block device (uses node 'disk' as 'root' child) and unshared by block device 'exp' \
             (uses node 'disk' as 'root' child)."
        );
    }

    #[test]
    fn storage_defaults() {
        let data = ChildRole::DATA | ChildRole::PRIMARY;
        let (p, s) = default_perms(data, true, Perm::WRITE | Perm::CONSISTENT_READ, Perm::ALL);
        assert_eq!(p, Perm::WRITE | Perm::CONSISTENT_READ | Perm::RESIZE);
        assert!(!s.contains(Perm::RESIZE));
        let (p, s) = default_perms(
            ChildRole::FILTERED | ChildRole::PRIMARY,
            true,
            Perm::WRITE,
            Perm::ALL,
        );
        assert_eq!((p, s), (Perm::WRITE, Perm::ALL));
    }
}
