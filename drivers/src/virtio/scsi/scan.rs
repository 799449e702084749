//! Bring-up: the scan of a controller's targets and LUNs, and what each
//! LUN says about itself (see the parent module's doc). Commands here run
//! synchronously, on the same queue and request machinery as I/O.

use super::command::{Caps, Command, Data};
use super::inquiry;
use super::wire::Response;
use super::{DRIVER_MAX_TRANSFER, Lun, SPIN_LIMIT, VirtioScsi, cdb};
use crate::virtio::{Completion, DiskInfo, Error, Limits, RequestId};
use alloc::collections::BTreeMap;
use alloc::format;
use alloc::vec;
use alloc::vec::Vec;
use virtio_drivers::transport::Transport;

impl<T: Transport> VirtioScsi<T> {
    /// Runs requests to completion (bring-up only: nothing else is in
    /// flight). Completions of other requests are kept for `poll`.
    fn wait(&mut self, ids: &[RequestId]) -> BTreeMap<RequestId, Completion> {
        let mut got = BTreeMap::new();
        let mut others = Vec::new();
        let mut out = Vec::new();
        let mut spins: u64 = 0;
        while got.len() < ids.len() && spins < SPIN_LIMIT {
            if !self.poll(&mut out) {
                core::hint::spin_loop();
                spins += 1;
            }
            for c in out.drain(..) {
                if ids.contains(&c.id) {
                    got.insert(c.id, c);
                } else {
                    others.push(c);
                }
            }
        }
        self.ready.append(&mut others);
        got
    }

    /// One data-in command, synchronously: the bytes the device returned.
    fn command_in(
        &mut self,
        target: u8,
        lun: u16,
        cdb: cdb::Cdb,
        len: usize,
    ) -> Result<Vec<u8>, Error> {
        let cmd = Command {
            cdb,
            data: if len == 0 {
                Data::None
            } else {
                Data::In(0, len)
            },
        };
        let id = self.submit_commands(target, lun, vec![cmd], vec![0; len]);
        let mut done = self.wait(&[id]);
        let c = done
            .remove(&id)
            .ok_or(Error::Setup("SCSI command timed out"))?;
        c.result.map(|()| c.buf)
    }

    pub(super) fn scan(&mut self) -> Result<(), Error> {
        let max_sectors = self.max_sectors;
        const REPORT_LUNS_BYTES: usize = 8 + 8 * 512;
        let targets: Vec<u8> = (0..=self.max_target).map(|t| t as u8).collect();
        let ids: Vec<RequestId> = targets
            .iter()
            .map(|&t| {
                let cmd = Command {
                    cdb: cdb::report_luns(REPORT_LUNS_BYTES as u32),
                    data: Data::In(0, REPORT_LUNS_BYTES),
                };
                self.submit_commands(t, 0, vec![cmd], vec![0; REPORT_LUNS_BYTES])
            })
            .collect();
        let mut done = self.wait(&ids);
        for (&t, id) in targets.iter().zip(&ids) {
            let luns = match done.remove(id).map(|c| (c.result, c.buf)) {
                None => return Err(Error::Setup("REPORT LUNS timed out")),
                Some((Err(Error::Transport(Response::BadTarget)), _)) => continue,
                Some((Ok(()), buf)) => {
                    let mut l = inquiry::parse_report_luns(&buf);
                    l.sort_unstable();
                    l.dedup();
                    l.retain(|&n| u32::from(n) <= self.max_lun);
                    if l.is_empty() { vec![0] } else { l }
                }
                // REPORT LUNS refused: try LUN 0 alone.
                Some((Err(e), _)) => {
                    log::debug!("virtio-scsi target {t}: REPORT LUNS failed: {e}");
                    vec![0]
                }
            };
            for lun in luns {
                match self.probe_lun(t, lun, max_sectors) {
                    Ok(Some(l)) => self.luns.push(l),
                    Ok(None) => {}
                    Err(e) => log::warn!("virtio-scsi {t}:{lun}: not usable: {e}"),
                }
            }
        }
        Ok(())
    }

    pub(super) fn probe_lun(
        &mut self,
        t: u8,
        l: u16,
        max_sectors: u32,
    ) -> Result<Option<Lun>, Error> {
        let inq = inquiry::parse_inquiry(&self.command_in(t, l, cdb::inquiry(None, 96), 96)?);
        if !inq.present() {
            return Ok(None);
        }
        if inq.device_type != inquiry::TYPE_DISK {
            log::info!(
                "virtio-scsi {t}:{l}: {} {} is peripheral type {:#x}, not a disk: skipped",
                inq.vendor,
                inq.product,
                inq.device_type
            );
            return Ok(None);
        }
        let vpd = |s: &mut Self, page: u8| {
            s.command_in(t, l, cdb::inquiry(Some(page), 252), 252)
                .unwrap_or_default()
        };
        let pages = inquiry::parse_supported_pages(&vpd(self, 0x00));
        let serial = if pages.contains(&0x80) {
            inquiry::parse_serial(&vpd(self, 0x80))
        } else {
            Default::default()
        };
        let bl = if pages.contains(&0xb0) {
            inquiry::parse_block_limits(&vpd(self, 0xb0))
        } else {
            Default::default()
        };
        let prov = if pages.contains(&0xb2) {
            inquiry::parse_provisioning(&vpd(self, 0xb2))
        } else {
            Default::default()
        };
        let cap =
            inquiry::parse_capacity_16(&self.command_in(t, l, cdb::read_capacity_16(32), 32)?);
        if cap.block_size < 512 || !cap.block_size.is_power_of_two() {
            return Err(Error::Setup("unusable logical block size"));
        }
        let read_only = self
            .command_in(t, l, cdb::mode_sense_10(192), 192)
            .map(|d| inquiry::parse_write_protect(&d))
            .unwrap_or(false);
        let bs = u64::from(cap.block_size);
        let mut max_transfer = DRIVER_MAX_TRANSFER;
        if bl.max_transfer > 0 {
            max_transfer = max_transfer.min(u64::from(bl.max_transfer) * bs);
        }
        if max_sectors > 0 {
            max_transfer = max_transfer.min(u64::from(max_sectors) * 512);
        }
        let max_transfer = (max_transfer / bs * bs).max(bs);
        let max_unmap = if prov.unmap && bl.max_unmap_blocks > 0 && bl.max_unmap_descriptors > 0 {
            u64::from(bl.max_unmap_blocks) * bs
        } else {
            0
        };
        let max_write_same = if bl.max_write_same > 0 {
            bl.max_write_same.saturating_mul(bs)
        } else if prov.write_same_16_unmap {
            max_transfer
        } else {
            0
        };
        let caps = Caps {
            block_size: cap.block_size,
            max_transfer,
            max_unmap,
            write_same_unmap: prov.write_same_16_unmap,
            max_write_same,
        };
        let max_discard = if max_unmap > 0 {
            max_unmap
        } else if prov.write_same_16_unmap {
            max_write_same
        } else {
            0
        };
        let info = DiskInfo {
            serial,
            model: format!("{} {}", inq.vendor, inq.product),
            capacity: cap.blocks.saturating_mul(bs),
            block_size: cap.block_size,
            physical_block_size: cap.block_size << cap.physical_exponent.min(16),
            read_only,
            flush: true,
            limits: Limits {
                max_transfer: max_transfer.min(u64::from(u32::MAX)) as u32,
                max_segment: u32::MAX,
                max_segments: 1,
                max_discard,
                discard_alignment: bl.unmap_granularity.saturating_mul(cap.block_size),
                max_write_zeroes: max_write_same,
                optimal_transfer: bl.optimal_transfer.saturating_mul(cap.block_size),
                queue_size: self.queue.size(),
            },
        };
        Ok(Some(Lun {
            target: t,
            lun: l,
            info,
            caps,
            gone: false,
        }))
    }
}
