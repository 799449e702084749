//! `null-co` / `null-aio` (QEMU: `block/null.c`): a protocol driver with a
//! length and no data. Writes are dropped; reads return zeroes; with
//! `read-zeroes` block-status says the node reads as zeroes, without it
//! the content is "unallocated" (QEMU leaves the buffer untouched; ours is
//! always zeroed). `latency-ns` delays every request on the executor's
//! timers.

use alloc::boxed::Box;
use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use crate::driver::{BlockDriver, ready};
use crate::graph::node::Node;
use crate::io::{BlockStatus, BoxFuture, IoResult, ReqFlags};
use crate::open::{DriverClass, DriverOpts, Opener};
use crate::qmp::QmpError;
use crate::timer::{Clock, TimerList};

/// `null-co`.
pub fn null_co() -> DriverClass {
    DriverClass::new("null-co", parse_co)
}
/// `null-aio` (the same driver under its AIO name).
pub fn null_aio() -> DriverClass {
    DriverClass::new("null-aio", parse_aio)
}

/// QEMU's default length: 1 GiB.
pub const DEFAULT_SIZE: u64 = 1 << 30;

/// One null node.
pub struct Null {
    name: &'static str,
    size: u64,
    read_zeroes: bool,
    latency_ns: u64,
    clock: Rc<dyn Clock>,
    timers: TimerList,
}

fn parse_co(d: &mut DriverOpts<'_, '_>) -> Result<Opener, QmpError> {
    parse(d, "null-co")
}

fn parse_aio(d: &mut DriverOpts<'_, '_>) -> Result<Opener, QmpError> {
    parse(d, "null-aio")
}

fn parse(d: &mut DriverOpts<'_, '_>, name: &'static str) -> Result<Opener, QmpError> {
    let size = match d.opts.opt_i64("size")? {
        Some(s) if s < 0 => {
            return Err(QmpError::invalid_parameter_value(
                &d.opts.full_name("size"),
                "a non-negative value",
            ));
        }
        Some(s) => s as u64,
        None => DEFAULT_SIZE,
    };
    let latency_ns = d.opts.opt_u64("latency-ns")?.unwrap_or(0);
    let read_zeroes = d.opts.bool_or("read-zeroes", false)?;
    Ok(Box::new(move |ctx| {
        let r = ctx.registry;
        Ok(Box::new(Null {
            name,
            size,
            read_zeroes,
            latency_ns,
            clock: r.clock(),
            timers: r.executor().timers().clone(),
        }) as Box<dyn BlockDriver>)
    }))
}

impl Null {
    async fn delay(&self) {
        if self.latency_ns > 0 {
            let deadline = self.clock.now_ns().saturating_add(self.latency_ns);
            self.timers.sleep_until(self.clock.clone(), deadline).await;
        }
    }
}

impl BlockDriver for Null {
    fn format_name(&self) -> &str {
        self.name
    }

    fn get_length(&self, _: &Node) -> IoResult<u64> {
        Ok(self.size)
    }

    fn read<'a>(
        &'a self,
        _: &'a Node,
        _: u64,
        len: usize,
        _: ReqFlags,
    ) -> BoxFuture<'a, IoResult<Vec<u8>>> {
        Box::pin(async move {
            self.delay().await;
            Ok(vec![0; len])
        })
    }

    fn write<'a>(
        &'a self,
        _: &'a Node,
        _: u64,
        _: Vec<u8>,
        _: ReqFlags,
    ) -> BoxFuture<'a, IoResult<()>> {
        Box::pin(async move {
            self.delay().await;
            Ok(())
        })
    }

    fn supported_write_flags(&self) -> ReqFlags {
        ReqFlags::FUA | ReqFlags::MAY_UNMAP
    }

    fn flush<'a>(&'a self, _: &'a Node) -> BoxFuture<'a, IoResult<()>> {
        Box::pin(async move {
            self.delay().await;
            Ok(())
        })
    }

    fn write_zeroes<'a>(
        &'a self,
        _: &'a Node,
        _: u64,
        _: u64,
        _: ReqFlags,
    ) -> BoxFuture<'a, IoResult<()>> {
        ready(Ok(()))
    }

    fn block_status<'a>(
        &'a self,
        _: &'a Node,
        _: u64,
        len: u64,
    ) -> BoxFuture<'a, IoResult<BlockStatus>> {
        ready(Ok(if self.read_zeroes {
            BlockStatus::zero(len)
        } else {
            BlockStatus {
                data: false,
                zero: false,
                allocated: false,
                len,
            }
        }))
    }

    fn filename(&self, _: &Node) -> Option<String> {
        Some(format!("{}://", self.name))
    }
}
