//! The block layer's QAPI types and events, for the command signatures
//! (QEMU: `qapi/block-core.json`, `qapi/job.json`, `qapi/block-export.json`);
//! the notation is [`crate::qmp::schema`]'s. Members follow QEMU 7.2's
//! order and names, limited to what blockhaus fills in.

use crate::qmp::Dispatcher;

/// Named types, `@Name` in signatures.
pub const TYPES: &[(&str, &str)] = &[
    (
        "BlockdevDriver",
        "(blkdebug|copy-on-read|nbd|null-co|qcow2|quorum|raw|throttle|virtio-blk|virtio-scsi|..)",
    ),
    ("BlockdevDetectZeroesOptions", "(off|on|unmap)"),
    ("BlockdevOnError", "(report|ignore|enospc|stop|auto)"),
    (
        "JobType",
        "(commit|stream|mirror|backup|create|amend|snapshot-load|snapshot-save|snapshot-delete)",
    ),
    (
        "JobStatus",
        "(undefined|created|running|paused|ready|standby|waiting|pending|aborting|concluded|null)",
    ),
    (
        "BlockPermission",
        "(consistent-read|write|write-unchanged|resize)",
    ),
    ("IoOperationType", "(read|write)"),
    ("BlockErrorAction", "(ignore|report|stop)"),
    (
        "ImageInfo",
        "{filename:str, format:str, dirty-flag?:bool, actual-size?:int, virtual-size:int, \
         cluster-size?:int, encrypted?:bool, compressed?:bool, backing-filename?:str, \
         full-backing-filename?:str, backing-filename-format?:str, \
         format-specific?:{type:str, data:any}}",
    ),
    (
        "BlockDirtyInfo",
        "{name?:str, count:int, granularity:uint32, recording:bool, busy:bool, \
         persistent:bool, inconsistent?:bool}",
    ),
    (
        "BlockDeviceInfo",
        "{file:str, node-name?:str, ro:bool, drv:str, backing_file?:str, backing_file_depth:int, \
         encrypted:bool, detect_zeroes:@BlockdevDetectZeroesOptions, bps:int, bps_rd:int, \
         bps_wr:int, iops:int, iops_rd:int, iops_wr:int, image:@ImageInfo, \
         cache:{writeback:bool, direct:bool, no-flush:bool}, write_threshold:int, \
         dirty-bitmaps?:[@BlockDirtyInfo]}",
    ),
    (
        "BlockInfo",
        "{device:str, qdev?:str, type:str, removable:bool, locked:bool, \
         inserted?:@BlockDeviceInfo, tray_open?:bool}",
    ),
    (
        "XDbgBlockGraph",
        "{nodes:[{id:int, type:(block-backend|block-job|block-driver), name:str, drv?:str, \
         refcount?:int}], edges:[{parent:int, child:int, name:str, perm:[@BlockPermission], \
         shared-perm:[@BlockPermission]}]}",
    ),
    (
        "JobInfo",
        "{id:str, type:@JobType, status:@JobStatus, current-progress:int, total-progress:int, \
         error?:str}",
    ),
    (
        "BlockJobInfo",
        "{type:str, device:str, len:int, offset:int, busy:bool, paused:bool, speed:int, \
         io-status:(ok|failed|nospace), ready:bool, status:@JobStatus, auto-finalize:bool, \
         auto-dismiss:bool, error?:str}",
    ),
    (
        "BlockExportInfo",
        "{id:str, type:(nbd|vhost-user-blk|fuse|vduse-blk), node-name:str, shutting-down:bool, x-clients:int}",
    ),
    (
        "BlockDeviceTimedStats",
        "{interval_length:int, min_rd_latency_ns:int, max_rd_latency_ns:int, \
         avg_rd_latency_ns:int, min_wr_latency_ns:int, max_wr_latency_ns:int, \
         avg_wr_latency_ns:int, min_flush_latency_ns:int, max_flush_latency_ns:int, \
         avg_flush_latency_ns:int, avg_rd_queue_depth:number, avg_wr_queue_depth:number}",
    ),
    (
        "BlockLatencyHistogramInfo",
        "{boundaries:[int], bins:[int]}",
    ),
    (
        "BlockDeviceStats",
        "{rd_bytes:int, wr_bytes:int, unmap_bytes:int, rd_operations:int, wr_operations:int, \
         flush_operations:int, unmap_operations:int, rd_total_time_ns:int, \
         wr_total_time_ns:int, flush_total_time_ns:int, unmap_total_time_ns:int, \
         wr_highest_offset:int, rd_merged:int, wr_merged:int, unmap_merged:int, \
         idle_time_ns?:int, failed_rd_operations:int, failed_wr_operations:int, \
         failed_flush_operations:int, failed_unmap_operations:int, invalid_rd_operations:int, \
         invalid_wr_operations:int, invalid_flush_operations:int, \
         invalid_unmap_operations:int, account_invalid:bool, account_failed:bool, \
         timed_stats:[@BlockDeviceTimedStats], rd_latency_histogram?:@BlockLatencyHistogramInfo, \
         wr_latency_histogram?:@BlockLatencyHistogramInfo, \
         flush_latency_histogram?:@BlockLatencyHistogramInfo}",
    ),
    (
        "BlockStats",
        "{device?:str, qdev?:str, node-name?:str, stats:@BlockDeviceStats, parent?:@BlockStats, \
         backing?:@BlockStats}",
    ),
];

/// The events the block layer emits, with their data members.
pub const EVENTS: &[(&str, &str)] = &[
    ("JOB_STATUS_CHANGE", "id:str, status:@JobStatus"),
    (
        "BLOCK_JOB_COMPLETED",
        "type:@JobType, device:str, len:int, offset:int, speed:int, error?:str",
    ),
    (
        "BLOCK_JOB_CANCELLED",
        "type:@JobType, device:str, len:int, offset:int, speed:int",
    ),
    (
        "BLOCK_JOB_ERROR",
        "device:str, operation:@IoOperationType, action:@BlockErrorAction",
    ),
    (
        "BLOCK_JOB_READY",
        "type:@JobType, device:str, len:int, offset:int, speed:int",
    ),
    ("BLOCK_JOB_PENDING", "type:@JobType, id:str"),
    ("DEVICE_TRAY_MOVED", "device:str, id:str, tray-open:bool"),
    ("BLOCK_EXPORT_DELETED", "id:str"),
    (
        "BLOCK_IO_ERROR",
        "device:str, node-name?:str, operation:@IoOperationType, action:@BlockErrorAction, \
         nospace?:bool, reason:str",
    ),
    (
        "QUORUM_FAILURE",
        "reference:str, sector-num:int, sectors-count:int",
    ),
    (
        "QUORUM_REPORT_BAD",
        "type:(read|write|flush), error?:str, node-name:str, sector-num:int, sectors-count:int",
    ),
];

/// Registers the types and events on `d`.
pub fn register<C>(d: &mut Dispatcher<C>) {
    for (name, spec) in TYPES {
        d.register_type(name, spec);
    }
    for (name, data) in EVENTS {
        d.register_event(name, data);
    }
}
