//! `blkdebug` (QEMU: `block/blkdebug.c`): a filter that injects errors, for
//! fault tests — the block graph's fault injector, as smoltcp's
//! `FaultInjector` is for devices.
//!
//! `inject-error` is a list of rules. QEMU's keys: `iotype` (list of
//! `read`, `write`, `write-zeroes`, `discard`, `flush`, `block-status`;
//! default all but `block-status`), `errno` (default 5, EIO), `sector`
//! (the rule fires for requests covering that 512-byte sector; default any
//! request), `once` (remove the rule after it fired), `immediately` and
//! `state` (a rule for a state other than 1 never fires: blockhaus has no
//! `set-state` rules), `event` (accepted; blockhaus formats raise no debug
//! events, so a rule is active from the start). blockhaus extensions:
//! `x-length` (with `sector`: the rule covers `x-length` bytes from that
//! sector, any overlapping request fires it) and `x-after` (the first N
//! matching requests pass; the rule fires from request N+1 on).
//! `take-child-perms` / `unshare-child-perms` adjust the image edge as in
//! QEMU.

use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::RefCell;

use serde_json::Value;

use crate::driver::{BlockDriver, forward, ready};
use crate::graph::child::Child;
use crate::graph::node::Node;
use crate::graph::permission::{ChildRole, Perm, filter_default_perms};
use crate::io::{BlockStatus, BoxFuture, IoError, IoResult, ReqFlags};
use crate::open::{DriverClass, DriverOpts, Opener};
use crate::qmp::QmpError;

/// `blkdebug`.
pub fn class() -> DriverClass {
    DriverClass::new("blkdebug", parse)
}

const IOTYPES: [&str; 6] = [
    "read",
    "write",
    "write-zeroes",
    "discard",
    "flush",
    "block-status",
];
const PERMS: [&str; 4] = ["consistent-read", "write", "write-unchanged", "resize"];

/// The operation a rule applies to (QEMU: `BlkdebugIOType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoType {
    /// Reads.
    Read = 0,
    /// Writes.
    Write = 1,
    /// Write-zeroes.
    WriteZeroes = 2,
    /// Discards.
    Discard = 3,
    /// Flushes.
    Flush = 4,
    /// Block-status queries.
    BlockStatus = 5,
}

/// One error-injection rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    iotypes: u8,
    errno: i32,
    range: Option<(u64, u64)>,
    once: bool,
    skip: u64,
    state: i64,
}

/// One blkdebug node.
pub struct Blkdebug {
    rules: RefCell<Vec<Rule>>,
    take: Perm,
    unshare: Perm,
}

fn perms(list: Option<Vec<&str>>) -> Perm {
    let mut p = Perm::NONE;
    for n in list.unwrap_or_default() {
        if let Some(x) = Perm::from_qapi_name(n) {
            p |= x;
        }
    }
    p
}

fn parse(d: &mut DriverOpts<'_, '_>) -> Result<Opener, QmpError> {
    if d.opts.has("config") {
        return Err(QmpError::generic(
            "blkdebug: config files are not supported",
        ));
    }
    d.child("image", ChildRole::FILTERED | ChildRole::PRIMARY)?;
    let _align = d.opts.opt_i64("align")?;
    let take = perms(d.opts.opt_enum_list("take-child-perms", &PERMS)?);
    let unshare = perms(d.opts.opt_enum_list("unshare-child-perms", &PERMS)?);
    let mut rules = Vec::new();
    for (path, v) in d.opts.opt_list("inject-error")?.unwrap_or_default() {
        let Value::Object(m) = v else {
            return Err(QmpError::invalid_parameter_type(&path, "object"));
        };
        let o = d.opts.element(path, m);
        let _event = o.opt_str("event")?;
        let state = o.opt_i64("state")?.unwrap_or(1);
        let iotypes = match o.opt_enum_list("iotype", &IOTYPES)? {
            None => 0b1_1111,
            Some(l) => l
                .iter()
                .filter_map(|t| IOTYPES.iter().position(|x| x == t))
                .fold(0u8, |m, i| m | (1 << i)),
        };
        let errno = o.opt_i64("errno")?.unwrap_or(5);
        let sector = o.opt_i64("sector")?;
        let once = o.bool_or("once", false)?;
        let _immediately = o.opt_bool("immediately")?;
        let length = o.opt_u64("x-length")?.unwrap_or(512).max(1);
        let skip = o.opt_u64("x-after")?.unwrap_or(0);
        o.check_unexpected()?;
        let range = match sector {
            Some(s) if s >= 0 => Some(((s as u64).saturating_mul(512), length)),
            _ => None,
        };
        let errno = i32::try_from(errno).unwrap_or(5);
        rules.push(Rule {
            iotypes,
            errno,
            range,
            once,
            skip,
            state,
        });
    }
    Ok(Box::new(move |_| {
        Ok(Box::new(Blkdebug {
            rules: RefCell::new(rules),
            take,
            unshare,
        }) as Box<dyn BlockDriver>)
    }))
}

impl Blkdebug {
    /// Checks the rules for a request (QEMU: `rule_check`).
    fn check(&self, op: IoType, offset: u64, len: u64) -> IoResult<()> {
        let mut rules = self.rules.borrow_mut();
        let mut fired = None;
        for (i, r) in rules.iter_mut().enumerate() {
            if r.state != 1 || r.iotypes & (1 << op as u8) == 0 {
                continue;
            }
            if let Some((start, rlen)) = r.range {
                // A request matches if it overlaps the rule's range.
                if len == 0
                    || offset >= start.saturating_add(rlen)
                    || offset.saturating_add(len) <= start
                {
                    continue;
                }
            }
            if r.skip > 0 {
                r.skip -= 1;
                continue;
            }
            fired = Some((i, r.errno, r.once));
            break;
        }
        match fired {
            None => Ok(()),
            Some((i, errno, once)) => {
                if once {
                    rules.remove(i);
                }
                log::debug!("blkdebug: injecting errno {errno} for {op:?} at {offset}+{len}");
                Err(IoError::from_errno(errno))
            }
        }
    }
}

impl BlockDriver for Blkdebug {
    fn format_name(&self) -> &str {
        "blkdebug"
    }

    fn read<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: usize,
        flags: ReqFlags,
    ) -> BoxFuture<'a, IoResult<Vec<u8>>> {
        match self.check(IoType::Read, offset, len as u64) {
            Ok(()) => forward::read(node, offset, len, flags),
            Err(e) => ready(Err(e)),
        }
    }

    fn write<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        data: Vec<u8>,
        flags: ReqFlags,
    ) -> BoxFuture<'a, IoResult<()>> {
        match self.check(IoType::Write, offset, data.len() as u64) {
            Ok(()) => forward::write(node, offset, data, flags),
            Err(e) => ready(Err(e)),
        }
    }

    fn supported_write_flags(&self) -> ReqFlags {
        ReqFlags::FUA | ReqFlags::MAY_UNMAP | ReqFlags::WRITE_UNCHANGED
    }

    fn flush<'a>(&'a self, _: &'a Node) -> BoxFuture<'a, IoResult<()>> {
        ready(self.check(IoType::Flush, 0, 0))
    }

    fn discard<'a>(&'a self, node: &'a Node, offset: u64, len: u64) -> BoxFuture<'a, IoResult<()>> {
        match self.check(IoType::Discard, offset, len) {
            Ok(()) => forward::discard(node, offset, len),
            Err(e) => ready(Err(e)),
        }
    }

    fn write_zeroes<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: u64,
        flags: ReqFlags,
    ) -> BoxFuture<'a, IoResult<()>> {
        match self.check(IoType::WriteZeroes, offset, len) {
            Ok(()) => forward::write_zeroes(node, offset, len, flags),
            Err(e) => ready(Err(e)),
        }
    }

    fn block_status<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'a, IoResult<BlockStatus>> {
        match self.check(IoType::BlockStatus, offset, len) {
            Ok(()) => forward::block_status(node, offset, len),
            Err(e) => ready(Err(e)),
        }
    }

    fn child_perm(&self, _: &Node, _: &Child, perm: Perm, shared: Perm) -> (Perm, Perm) {
        let (p, s) = filter_default_perms(perm, shared);
        (p | self.take, s.minus(self.unshare))
    }

    fn is_filter(&self) -> bool {
        true
    }

    fn filename(&self, node: &Node) -> Option<String> {
        let _ = node;
        None
    }
}
