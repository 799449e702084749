//! The QMP commands about the disk table: `x-query-devices` lists every
//! disk present, claimed or not: `serial`, `transport` (`virtio-blk`,
//! `virtio-scsi`), `pci-address` (`BB:DD.F` of the device or its
//! controller), `target`/`lun`/`model` (SCSI only), `size`, `block-size`,
//! `physical-block-size`, `read-only`, `write-cache`, `claimed-by` (when a
//! node holds it), and `limits` (`max-transfer`, `max-segment`,
//! `max-segments`, `max-discard`, `discard-alignment`, `max-write-zeroes`,
//! `optimal-transfer`, `queue-size`; bytes, 0 = not supported), and
//! `boot-disk: true` on the disk the image was booted from, and `stats`:
//! the I/O the disk's virtqueue saw since boot (see `disk_stats`).

use crate::app::Appliance;
use crate::disks::{Disk, Transport};
use alloc::format;
use block::qmp::{Args, Dispatcher, QmpError};
use serde_json::{Value, json};

fn disk_json(d: &Disk) -> Value {
    let i = &d.info;
    let l = &i.limits;
    let mut v = json!({
        "serial": i.serial,
        "transport": match d.transport {
            Transport::VirtioBlk => "virtio-blk",
            Transport::VirtioScsi { .. } => "virtio-scsi",
        },
        "pci-address": format!("{}", d.pci),
        "size": i.capacity,
        "block-size": i.block_size,
        "physical-block-size": i.physical_block_size,
        "read-only": i.read_only,
        "write-cache": i.flush,
        "limits": {
            "max-transfer": l.max_transfer,
            "max-segment": l.max_segment,
            "max-segments": l.max_segments,
            "max-discard": l.max_discard,
            "discard-alignment": l.discard_alignment,
            "max-write-zeroes": l.max_write_zeroes,
            "optimal-transfer": l.optimal_transfer,
            "queue-size": l.queue_size,
        },
    });
    v["stats"] = d.stats.to_json();
    if d.boot {
        v["boot-disk"] = json!(true);
    }
    if let Some(owner) = &d.claimed_by {
        v["claimed-by"] = json!(owner);
    }
    if let Transport::VirtioScsi { target, lun } = d.transport {
        v["target"] = json!(target);
        v["lun"] = json!(lun);
        v["model"] = json!(i.model);
    }
    v
}

/// `x-query-devices`: every disk found, claimed or not.
fn query_devices(app: &mut Appliance, args: &Args<'_>) -> Result<Value, QmpError> {
    args.check_known(&[])?;
    let mut disks = app.disks.borrow_mut();
    disks.poll();
    Ok(Value::Array(
        disks
            .list()
            .iter()
            .filter(|d| d.present)
            .map(disk_json)
            .collect(),
    ))
}

/// Registers `x-query-devices`.
pub fn register(commands: &mut Dispatcher<Appliance>) {
    commands.register(
        "x-query-devices",
        block::qmp::Signature::new("", "[any]"),
        query_devices,
    );
}
