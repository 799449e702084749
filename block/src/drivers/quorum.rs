//! `quorum` (QEMU: `block/quorum.c`): replicate writes to N children, vote
//! on reads.
//!
//! Reads (`read-pattern=quorum`) go to every child at once; the versions
//! that came back are compared and the most common one wins if at least
//! `vote-threshold` children returned it. Children that failed or returned
//! another version are reported with `QUORUM_REPORT_BAD`; a lost vote is
//! `QUORUM_FAILURE` and EIO. With `rewrite-corrupted` the winning data is
//! written back over the losing versions before the read completes.
//! `read-pattern=fifo` reads the children in order until one succeeds.
//! Writes go to every child and succeed if `vote-threshold` children
//! succeeded. Flushes vote on their error codes.
//!
//! Children are added and removed at run time with `x-blockdev-change`.
//! Closing follows the 2015 fix: each child edge is removed before its
//! reference is dropped (see [`crate::graph::node`]), so nothing can reach a half
//! closed child through the quorum node.

use alloc::boxed::Box;
use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::Cell;

use serde_json::json;

use crate::driver::{BlockDriver, ChildChangeError};
use crate::exec::join_all;
use crate::graph::child::Child;
use crate::graph::node::Node;
use crate::graph::permission::{ChildRole, Perm};
use crate::io::{BoxFuture, IoError, IoResult, ReqFlags};
use crate::open::{DriverClass, DriverOpts, Opener};
use crate::qmp::QmpError;

/// `quorum`.
pub fn class() -> DriverClass {
    DriverClass::new("quorum", parse)
}

/// `read-pattern`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadPattern {
    /// Vote among all children.
    Quorum,
    /// First child that succeeds.
    Fifo,
}

/// One quorum node.
pub struct Quorum {
    threshold: usize,
    pattern: ReadPattern,
    rewrite_corrupted: bool,
    blkverify: bool,
    next_child_index: Cell<u32>,
}

fn parse(d: &mut DriverOpts<'_, '_>) -> Result<Opener, QmpError> {
    let blkverify = d.opts.bool_or("blkverify", false)?;
    let n = d.child_list("children", ChildRole::DATA)?;
    let threshold = match d.opts.opt_i64("vote-threshold")? {
        Some(t) => t,
        None => {
            return Err(QmpError::missing_parameter(
                &d.opts.full_name("vote-threshold"),
            ));
        }
    };
    let rewrite = d.opts.bool_or("rewrite-corrupted", false)?;
    let pattern = match d.opts.opt_enum("read-pattern", &["quorum", "fifo"])? {
        Some("fifo") => ReadPattern::Fifo,
        _ => ReadPattern::Quorum,
    };
    Ok(Box::new(move |_| {
        if n < 1 {
            return Err("Number of provided children must be 1 or more".into());
        }
        if threshold < 1 {
            return Err("Parameter 'vote-threshold' expects a value >= 1".into());
        }
        if threshold as usize > n {
            return Err("threshold may not exceed children count".into());
        }
        let (blkverify, rewrite) = match pattern {
            ReadPattern::Quorum => (blkverify, rewrite),
            ReadPattern::Fifo => (false, false),
        };
        if blkverify && (n != 2 || threshold != 2) {
            return Err("blkverify=on can only be set if there are exactly two files and vote-threshold is 2".into());
        }
        if rewrite && blkverify {
            return Err("rewrite-corrupted=on cannot be used with blkverify=on".into());
        }
        Ok(Box::new(Quorum {
            threshold: threshold as usize,
            pattern,
            rewrite_corrupted: rewrite,
            blkverify,
            next_child_index: Cell::new(n as u32),
        }) as Box<dyn BlockDriver>)
    }))
}

fn sectors(offset: u64, len: u64) -> (u64, u64) {
    let start = offset / 512;
    (
        start,
        offset
            .saturating_add(len)
            .div_ceil(512)
            .saturating_sub(start),
    )
}

/// The child edges that are quorum members.
fn members(node: &Node) -> Vec<Rc<Child>> {
    node.children()
        .into_iter()
        .filter(|c| c.name().starts_with("children."))
        .collect()
}

/// The most common error (QEMU: `quorum_vote_error`).
fn vote_error(errors: &[IoError]) -> IoError {
    let mut best = (IoError::Eio, 0);
    for e in errors {
        let n = errors.iter().filter(|x| *x == e).count();
        if n > best.1 {
            best = (*e, n);
        }
    }
    best.0
}

impl Quorum {
    fn report_bad(
        node: &Node,
        op: &str,
        child: &Child,
        offset: u64,
        len: u64,
        err: Option<IoError>,
    ) {
        let (sector, count) = sectors(offset, len);
        let mut data = json!({
            "type": op, "node-name": child.node().name(), "sector-num": sector, "sectors-count": count,
        });
        if let (Some(e), serde_json::Value::Object(m)) = (err, &mut data) {
            m.insert("error".into(), json!(e.strerror()));
        }
        if let Some(r) = node.registry() {
            r.emit("QUORUM_REPORT_BAD", data);
        }
    }

    fn report_failure(node: &Node, offset: u64, len: u64) {
        let (sector, count) = sectors(offset, len);
        if let Some(r) = node.registry() {
            r.emit(
                "QUORUM_FAILURE",
                json!({"reference": node.name(), "sector-num": sector, "sectors-count": count}),
            );
        }
    }

    async fn read_quorum(
        &self,
        node: &Node,
        offset: u64,
        len: usize,
        flags: ReqFlags,
    ) -> IoResult<Vec<u8>> {
        let children = members(node);
        let futs: Vec<BoxFuture<'_, IoResult<Vec<u8>>>> = children
            .iter()
            .map(|c| Box::pin(c.read(offset, len, flags)) as BoxFuture<'_, _>)
            .collect();
        let results = join_all(futs).await;
        let mut errors = Vec::new();
        // Versions: (index of a child holding it, members).
        let mut versions: Vec<(usize, Vec<usize>)> = Vec::new();
        for (i, r) in results.iter().enumerate() {
            match r {
                Err(e) => {
                    Self::report_bad(node, "read", &children[i], offset, len as u64, Some(*e));
                    errors.push(*e);
                }
                Ok(data) => match versions
                    .iter_mut()
                    .find(|(j, _)| matches!(&results[*j], Ok(d) if d == data))
                {
                    Some((_, m)) => m.push(i),
                    None => versions.push((i, alloc::vec![i])),
                },
            }
        }
        let success = children.len() - errors.len();
        if success < self.threshold {
            Self::report_failure(node, offset, len as u64);
            return Err(vote_error(&errors));
        }
        let Some(win) = versions
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.1.len().cmp(&b.1.1.len()).then(b.0.cmp(&a.0)))
            .map(|(i, _)| i)
        else {
            return Err(IoError::Eio);
        };
        if versions.len() > 1 && self.blkverify {
            log::error!(
                "quorum '{}': blkverify contents mismatch at offset {offset}",
                node.name()
            );
            return Err(IoError::Eio);
        }
        let (win_idx, win_members) = (versions[win].0, versions[win].1.len());
        if win_members < self.threshold {
            Self::report_failure(node, offset, len as u64);
            return Err(IoError::Eio);
        }
        let winner = match &results[win_idx] {
            Ok(d) => d.clone(),
            Err(e) => return Err(*e),
        };
        let bad: Vec<usize> = versions
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != win)
            .flat_map(|(_, v)| v.1.clone())
            .collect();
        for i in &bad {
            Self::report_bad(node, "read", &children[*i], offset, len as u64, None);
        }
        if self.rewrite_corrupted && !bad.is_empty() {
            let futs: Vec<BoxFuture<'_, IoResult<()>>> = bad
                .iter()
                .map(|i| {
                    Box::pin(children[*i].write(offset, winner.clone(), ReqFlags::NONE))
                        as BoxFuture<'_, _>
                })
                .collect();
            for r in join_all(futs).await {
                if let Err(e) = r {
                    log::warn!(
                        "quorum '{}': rewriting a corrupted child failed: {e}",
                        node.name()
                    );
                }
            }
        }
        Ok(winner)
    }

    async fn read_fifo(
        &self,
        node: &Node,
        offset: u64,
        len: usize,
        flags: ReqFlags,
    ) -> IoResult<Vec<u8>> {
        let mut last = Err(IoError::Eio);
        for c in members(node) {
            last = c.read(offset, len, flags).await;
            match &last {
                Ok(_) => break,
                Err(e) => Self::report_bad(node, "read", &c, offset, len as u64, Some(*e)),
            }
        }
        last
    }

    /// Writes (or zero-writes) to every child and counts the successes.
    async fn write_all(
        &self,
        node: &Node,
        offset: u64,
        len: u64,
        data: Option<Vec<u8>>,
        flags: ReqFlags,
    ) -> IoResult<()> {
        let children = members(node);
        let futs: Vec<BoxFuture<'_, IoResult<()>>> = children
            .iter()
            .map(|c| match &data {
                Some(d) => Box::pin(c.write(offset, d.clone(), flags)) as BoxFuture<'_, _>,
                None => Box::pin(c.write_zeroes(offset, len, flags)) as BoxFuture<'_, _>,
            })
            .collect();
        let mut errors = Vec::new();
        for (i, r) in join_all(futs).await.into_iter().enumerate() {
            if let Err(e) = r {
                Self::report_bad(node, "write", &children[i], offset, len, Some(e));
                errors.push(e);
            }
        }
        if children.len() - errors.len() < self.threshold {
            Self::report_failure(node, offset, len);
            return Err(vote_error(&errors));
        }
        Ok(())
    }
}

impl BlockDriver for Quorum {
    fn format_name(&self) -> &str {
        "quorum"
    }

    /// QEMU's `quorum_co_getlength`: every child must have the same length.
    fn get_length(&self, node: &Node) -> IoResult<u64> {
        let children = members(node);
        let first = children
            .first()
            .ok_or(IoError::Enomedium)?
            .node()
            .get_length()?;
        for c in &children[1..] {
            if c.node().get_length()? != first {
                return Err(IoError::Eio);
            }
        }
        Ok(first)
    }

    fn read<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: usize,
        flags: ReqFlags,
    ) -> BoxFuture<'a, IoResult<Vec<u8>>> {
        match self.pattern {
            ReadPattern::Quorum => Box::pin(self.read_quorum(node, offset, len, flags)),
            ReadPattern::Fifo => Box::pin(self.read_fifo(node, offset, len, flags)),
        }
    }

    fn write<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        data: Vec<u8>,
        flags: ReqFlags,
    ) -> BoxFuture<'a, IoResult<()>> {
        let len = data.len() as u64;
        Box::pin(self.write_all(node, offset, len, Some(data), flags))
    }

    fn supported_write_flags(&self) -> ReqFlags {
        ReqFlags::FUA | ReqFlags::MAY_UNMAP | ReqFlags::WRITE_UNCHANGED
    }

    fn write_zeroes<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: u64,
        flags: ReqFlags,
    ) -> BoxFuture<'a, IoResult<()>> {
        Box::pin(self.write_all(node, offset, len, None, flags))
    }

    /// QEMU's `quorum_co_flush`: flush every child, vote on the errors.
    fn flush<'a>(&'a self, node: &'a Node) -> BoxFuture<'a, IoResult<()>> {
        Box::pin(async move {
            let mut errors = Vec::new();
            let children = members(node);
            for c in &children {
                if let Err(e) = c.flush().await {
                    Self::report_bad(node, "flush", c, 0, 0, Some(e));
                    errors.push(e);
                }
            }
            if children.len() - errors.len() >= self.threshold {
                Ok(())
            } else {
                Err(vote_error(&errors))
            }
        })
    }

    fn flushes_children(&self) -> bool {
        true
    }

    /// QEMU's `quorum_child_perm`: the children must not diverge, so
    /// nobody else may write or resize them.
    fn child_perm(&self, _: &Node, _: &Child, perm: Perm, shared: Perm) -> (Perm, Perm) {
        let mut p = perm.and(Perm::PASSTHROUGH);
        if self.rewrite_corrupted {
            p |= Perm::WRITE;
        }
        (p, shared.and(Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED))
    }

    fn add_child_name(&self, _: &Node, _: &Node) -> Result<String, ChildChangeError> {
        if self.blkverify {
            return Err(ChildChangeError::Refused(
                "Cannot add a child to a quorum in blkverify mode".into(),
            ));
        }
        let i = self.next_child_index.get();
        if i == u32::MAX {
            return Err(ChildChangeError::Refused("Too many children".into()));
        }
        Ok(format!("children.{i}"))
    }

    fn child_added(&self, _: &Node, _: &Child) {
        self.next_child_index.set(self.next_child_index.get() + 1);
    }

    fn can_del_child(&self, node: &Node, _: &Child) -> Result<(), ChildChangeError> {
        if members(node).len() <= self.threshold {
            return Err(ChildChangeError::Refused(format!(
                "The number of children cannot be lower than the vote threshold {}",
                self.threshold
            )));
        }
        Ok(())
    }

    fn child_removed(&self, _: &Node, child: &Child) {
        let last = self.next_child_index.get().saturating_sub(1);
        if child.name() == format!("children.{last}") {
            self.next_child_index.set(last);
        }
    }

    fn query_info(&self, _: &Node) -> Option<serde_json::Value> {
        Some(json!({
            "vote-threshold": self.threshold,
            "read-pattern": match self.pattern { ReadPattern::Quorum => "quorum", ReadPattern::Fifo => "fifo" },
            "rewrite-corrupted": self.rewrite_corrupted,
        }))
    }
}
