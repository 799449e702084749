//! `throttle` (QEMU: `block/throttle.c`): a filter that holds requests to
//! the limits of its `throttle-group` object, shared with every other
//! throttle node of the group. Flushes and block-status are not throttled.

use alloc::boxed::Box;
use alloc::format;
use alloc::rc::Rc;
use alloc::vec::Vec;

use crate::driver::{BlockDriver, forward};
use crate::drivers::throttle_group::ThrottleGroup;
use crate::graph::node::Node;
use crate::graph::permission::ChildRole;
use crate::io::{BoxFuture, IoResult, ReqFlags};
use crate::open::{DriverClass, DriverOpts, Opener};
use crate::qmp::QmpError;

/// `throttle`.
pub fn class() -> DriverClass {
    DriverClass::new("throttle", parse)
}

/// One throttle node.
pub struct Throttle {
    group: Rc<ThrottleGroup>,
    left: core::cell::Cell<bool>,
}

impl Drop for Throttle {
    fn drop(&mut self) {
        // A node that failed to open is dropped without being closed.
        if !self.left.replace(true) {
            self.group.leave();
        }
    }
}

fn parse(d: &mut DriverOpts<'_, '_>) -> Result<Opener, QmpError> {
    let group = d.opts.str("throttle-group")?.to_string();
    d.child("file", ChildRole::FILTERED | ChildRole::PRIMARY)?;
    Ok(Box::new(move |ctx| {
        let g = ctx
            .registry
            .object(&group)
            .and_then(|o| o.downcast::<ThrottleGroup>().ok())
            .ok_or_else(|| format!("Throttle group '{group}' does not exist"))?;
        g.join();
        Ok(Box::new(Throttle {
            group: g,
            left: core::cell::Cell::new(false),
        }) as Box<dyn BlockDriver>)
    }))
}

use alloc::string::ToString;

impl Throttle {
    /// The group.
    pub fn group(&self) -> &Rc<ThrottleGroup> {
        &self.group
    }
}

impl BlockDriver for Throttle {
    fn format_name(&self) -> &str {
        "throttle"
    }

    fn read<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: usize,
        flags: ReqFlags,
    ) -> BoxFuture<'a, IoResult<Vec<u8>>> {
        Box::pin(async move {
            self.group.intercept(false, len as u64).await;
            forward::read(node, offset, len, flags).await
        })
    }

    fn write<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        data: Vec<u8>,
        flags: ReqFlags,
    ) -> BoxFuture<'a, IoResult<()>> {
        Box::pin(async move {
            self.group.intercept(true, data.len() as u64).await;
            forward::write(node, offset, data, flags).await
        })
    }

    fn supported_write_flags(&self) -> ReqFlags {
        ReqFlags::FUA | ReqFlags::MAY_UNMAP | ReqFlags::WRITE_UNCHANGED
    }

    fn discard<'a>(&'a self, node: &'a Node, offset: u64, len: u64) -> BoxFuture<'a, IoResult<()>> {
        Box::pin(async move {
            self.group.intercept(true, len).await;
            forward::discard(node, offset, len).await
        })
    }

    fn write_zeroes<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: u64,
        flags: ReqFlags,
    ) -> BoxFuture<'a, IoResult<()>> {
        Box::pin(async move {
            self.group.intercept(true, len).await;
            forward::write_zeroes(node, offset, len, flags).await
        })
    }

    fn close(&self, _: &Node) {
        if !self.left.replace(true) {
            self.group.leave();
        }
    }

    fn is_filter(&self) -> bool {
        true
    }

    fn query_info(&self, _: &Node) -> Option<serde_json::Value> {
        Some(serde_json::json!({"throttle-group": self.group.id()}))
    }
}
