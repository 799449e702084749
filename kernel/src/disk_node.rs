//! Protocol nodes over the appliance's disks: `driver=virtio-blk`
//! and `driver=virtio-scsi` in `blockdev-add` / `--blockdev`, the bottom of
//! every tree that reaches real storage.
//!
//! A node claims its disk (one node per disk) and releases it when it
//! closes; the generic layer flushes it first. Requests become driver
//! requests on the shared [`Disks`]; their futures wait on the request's
//! ticket and are woken by [`Disks::poll`] (main loop, or the block layer's
//! platform while a QMP command waits). Requests that are not aligned to
//! the disk's logical block size are done as read-modify-write of the
//! covering blocks, serialised against every other request on those
//! blocks ([`block::align`]), as QEMU's block layer does for
//! `request_alignment`.

use crate::app::SharedDisks;
use crate::disks::{Ticket, Transport};
use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use block::align::{AlignedDevice, Aligner};
use block::driver::BlockDriver;
use block::graph::node::Node;
use block::io::{BoxFuture, IoError, IoResult, ReqFlags};
use block::open::DriverClass;
use block::qmp::QmpError;
use core::future::Future;
use core::pin::Pin;
use core::task::{Context, Poll};
use drivers::pci::Address;
use drivers::virtio::{Completion, DiskInfo, Op};
use serde_json::{Value, json};

/// A submitted request's completion.
struct Pending {
    disks: SharedDisks,
    ticket: Option<Ticket>,
}

impl Future for Pending {
    type Output = Completion;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Completion> {
        let Some(ticket) = self.ticket else {
            return Poll::Pending;
        };
        let poll = self.disks.borrow_mut().poll_completion(ticket, cx);
        if poll.is_ready() {
            self.ticket = None;
        }
        poll
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        // A dropped request still completes on the device; take its
        // completion if it is already there so it is not kept forever.
        if let (Some(ticket), Ok(mut disks)) = (self.ticket, self.disks.try_borrow_mut()) {
            let _ = disks.take(ticket);
        }
    }
}

fn io_error(e: &drivers::virtio::Error) -> IoError {
    IoError::from_errno(e.errno())
}

/// One disk as a graph node.
pub struct DiskNode {
    disks: SharedDisks,
    index: usize,
    info: DiskInfo,
    driver: &'static str,
    /// Pads requests to the logical block size and serialises the
    /// read-modify-writes that needs.
    aligner: Aligner,
}

impl DiskNode {
    async fn run(&self, op: Op) -> IoResult<Vec<u8>> {
        let ticket = self
            .disks
            .borrow_mut()
            .submit(self.index, op)
            .map_err(|e| io_error(&e))?;
        let done = Pending {
            disks: self.disks.clone(),
            ticket: Some(ticket),
        }
        .await;
        match done.result {
            Ok(()) => Ok(done.buf),
            Err(e) => {
                log::debug!("{} '{}': {e}", self.driver, self.info.serial);
                Err(io_error(&e))
            }
        }
    }

    /// A disk cannot grow: writing past its end is ENOSPC, as on a host
    /// block device (a qcow2 image that needs more room than its disk).
    fn check_room(&self, offset: u64, len: u64) -> IoResult<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.info.capacity => Ok(()),
            _ => Err(IoError::Enospc),
        }
    }

    async fn write_at(&self, offset: u64, data: Vec<u8>, fua: bool) -> IoResult<()> {
        self.check_room(offset, data.len() as u64)?;
        self.aligner.write(self, offset, data, fua).await
    }
}

/// What the device itself takes: whole logical blocks.
impl AlignedDevice for DiskNode {
    fn read_blocks(&self, offset: u64, len: usize) -> BoxFuture<'_, IoResult<Vec<u8>>> {
        Box::pin(self.run(Op::Read {
            offset,
            buf: vec![0; len],
        }))
    }

    fn write_blocks(&self, offset: u64, buf: Vec<u8>, fua: bool) -> BoxFuture<'_, IoResult<()>> {
        Box::pin(async move { self.run(Op::Write { offset, buf, fua }).await.map(drop) })
    }
}

impl BlockDriver for DiskNode {
    fn format_name(&self) -> &str {
        self.driver
    }

    fn get_length(&self, _node: &Node) -> IoResult<u64> {
        Ok(self.info.capacity)
    }

    fn request_alignment(&self, _node: &Node) -> u64 {
        self.aligner.alignment()
    }

    fn read<'a>(
        &'a self,
        _node: &'a Node,
        offset: u64,
        len: usize,
        _flags: ReqFlags,
    ) -> BoxFuture<'a, IoResult<Vec<u8>>> {
        Box::pin(self.aligner.read(self, offset, len))
    }

    fn write<'a>(
        &'a self,
        _node: &'a Node,
        offset: u64,
        data: Vec<u8>,
        flags: ReqFlags,
    ) -> BoxFuture<'a, IoResult<()>> {
        Box::pin(self.write_at(offset, data, flags.contains(ReqFlags::FUA)))
    }

    fn supported_write_flags(&self) -> ReqFlags {
        ReqFlags::FUA
    }

    fn flush<'a>(&'a self, _node: &'a Node) -> BoxFuture<'a, IoResult<()>> {
        Box::pin(async move {
            if !self.info.flush || self.info.read_only {
                return Ok(()); // no volatile cache to flush
            }
            self.run(Op::Flush).await.map(drop)
        })
    }

    fn discard<'a>(
        &'a self,
        _node: &'a Node,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'a, IoResult<()>> {
        Box::pin(async move {
            // Advisory: discard the whole blocks inside the range only,
            // ordered against a read-modify-write of the blocks.
            let _tracked = self.aligner.track(offset, len).await?;
            let Some((offset, len)) = self.aligner.whole_blocks_within(offset, len) else {
                return Ok(());
            };
            self.run(Op::Discard { offset, len }).await.map(drop)
        })
    }

    fn write_zeroes<'a>(
        &'a self,
        _node: &'a Node,
        offset: u64,
        len: u64,
        flags: ReqFlags,
    ) -> BoxFuture<'a, IoResult<()>> {
        Box::pin(async move {
            self.check_room(offset, len)?;
            if !self.aligner.is_aligned(offset, len) {
                return Err(IoError::Enotsup); // the generic layer writes zeroes
            }
            let _tracked = self.aligner.track(offset, len).await?;
            let may_unmap = flags.contains(ReqFlags::MAY_UNMAP);
            self.run(Op::WriteZeroes {
                offset,
                len,
                may_unmap,
            })
            .await
            .map(drop)
        })
    }

    fn close(&self, node: &Node) {
        log::info!(
            "{} '{}': closed by node '{}'",
            self.driver,
            self.info.serial,
            node.name()
        );
        self.disks.borrow_mut().release(self.index);
    }

    fn filename(&self, _node: &Node) -> Option<String> {
        Some(format!("{}://{}", self.driver, self.info.serial))
    }

    fn query_info(&self, _node: &Node) -> Option<Value> {
        let disks = self.disks.borrow();
        let disk = disks.list().get(self.index)?;
        let mut v = json!({
            "serial": self.info.serial,
            "pci-addr": format!("{:02x}:{:02x}.{}", disk.pci.bus, disk.pci.device, disk.pci.function),
            "block-size": self.info.block_size,
            "device-read-only": self.info.read_only,
        });
        if let Transport::VirtioScsi { target, lun } = disk.transport {
            v["target"] = json!(target);
            v["lun"] = json!(lun);
        }
        Some(json!({"type": self.driver, "data": v}))
    }
}

/// The `virtio-blk` and `virtio-scsi` driver classes over `disks`.
pub fn classes(disks: &SharedDisks) -> [DriverClass; 2] {
    [
        class("virtio-blk", disks.clone()),
        class("virtio-scsi", disks.clone()),
    ]
}

fn class(driver: &'static str, disks: SharedDisks) -> DriverClass {
    DriverClass::new(driver, move |d| {
        let scsi = driver == "virtio-scsi";
        let serial = d.opts.opt_str("serial")?.map(String::from);
        let pci = d.opts.opt_str("pci-addr")?.map(String::from);
        let (target, lun) = if scsi {
            (d.opts.opt_u64("target")?, d.opts.opt_u64("lun")?)
        } else {
            (None, None)
        };
        let boot_ok = d.opts.opt_bool("x-boot-disk")?.unwrap_or(false);
        d.opts.check_unexpected()?;
        let pci = match pci {
            Some(p) => Some(Address::parse(&p).ok_or_else(|| {
                QmpError::generic(format!("Invalid PCI address '{p}' (expected BB:DD.F)"))
            })?),
            None => None,
        };
        let index = {
            let disks = disks.borrow();
            let found = match (&serial, pci, target) {
                (Some(s), _, _) => disks.find(s),
                (None, Some(p), None) if !scsi => disks.find_blk(p),
                (None, p, Some(t)) if scsi => disks.find_scsi(p, t as u8, lun.unwrap_or(0) as u16),
                _ => {
                    return Err(QmpError::generic(if scsi {
                        "virtio-scsi needs 'serial' or 'target' (with 'lun' and 'pci-addr' as needed)"
                    } else {
                        "virtio-blk needs 'serial' or 'pci-addr'"
                    }));
                }
            };
            let what = match (&serial, pci) {
                (Some(s), _) => format!("serial '{s}'"),
                (None, Some(p)) => {
                    format!("PCI address {:02x}:{:02x}.{}", p.bus, p.device, p.function)
                }
                _ => format!("target {} lun {}", target.unwrap_or(0), lun.unwrap_or(0)),
            };
            let index =
                found.ok_or_else(|| QmpError::generic(format!("No {driver} disk with {what}")))?;
            let disk = &disks.list()[index];
            let kind = match disk.transport {
                Transport::VirtioBlk => "virtio-blk",
                Transport::VirtioScsi { .. } => "virtio-scsi",
            };
            if kind != driver {
                return Err(QmpError::generic(format!(
                    "Disk with {what} is a {kind} disk, not {driver}"
                )));
            }
            if disk.boot && !boot_ok {
                return Err(QmpError::generic(format!(
                    "Disk '{}' is the boot disk (it holds the ESP): open it with \"x-boot-disk\": true",
                    disk.info.serial
                )));
            }
            if !disk.present {
                return Err(QmpError::generic(format!("Disk with {what} was removed")));
            }
            if disk.info.read_only && !d.common.read_only {
                return Err(QmpError::generic(format!(
                    "Disk '{}' is read-only: open it with \"read-only\": true",
                    disk.info.serial
                )));
            }
            index
        };
        let owner = match d.opts.get("node-name") {
            Some(Value::String(n)) => n.clone(),
            _ => String::from("(unnamed)"),
        };
        let disks = disks.clone();
        Ok(Box::new(move |_ctx: &block::open::OpenCtx<'_>| {
            // A disk belongs to one node at a time; the node releases it on close.
            disks.borrow_mut().claim(index, &owner)?;
            let info = disks.borrow().list()[index].info.clone();
            Ok(Box::new(DiskNode {
                disks: disks.clone(),
                index,
                aligner: Aligner::new(info.block_size),
                info,
                driver,
            }) as Box<dyn BlockDriver>)
        }) as block::open::Opener)
    })
}
