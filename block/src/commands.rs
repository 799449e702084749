//! The block layer's QMP commands, for any context that holds a
//! [`BlockLayer`] (QEMU: the `block-core.json` / `block.json` commands that
//! qemu-storage-daemon offers, plus `object-add`, `query-jobs` and
//! `human-monitor-command`).
//!
//! ```
//! use block::layer::{BlockContext, BlockLayer};
//! use block::qmp::Dispatcher;
//! # fn ctx() -> BlockLayer { unimplemented!() }
//! let mut d: Dispatcher<BlockLayer> = Dispatcher::new();
//! block::commands::register(&mut d);
//! assert!(d.contains("blockdev-add"));
//! ```

use serde_json::Value;

use crate::layer::{BlockContext, BlockLayer};
use crate::qmp::{Args, Dispatcher, QmpError};
use crate::{blockdev, object, qemu_io, query};

type Res = Result<Value, QmpError>;

/// A command's implementation over the block layer.
pub type Command = fn(&BlockLayer, &Args<'_>) -> Res;

/// Every command, by name.
pub const COMMANDS: [(&str, Command); 23] = [
    ("blockdev-add", blockdev::blockdev_add),
    ("blockdev-del", blockdev::blockdev_del),
    ("x-blockdev-change", blockdev::x_blockdev_change),
    ("block_resize", blockdev::block_resize),
    ("blockdev-open-tray", blockdev::blockdev_open_tray),
    ("blockdev-close-tray", blockdev::blockdev_close_tray),
    ("blockdev-remove-medium", blockdev::blockdev_remove_medium),
    ("blockdev-insert-medium", blockdev::blockdev_insert_medium),
    ("eject", blockdev::eject),
    ("query-named-block-nodes", query::query_named_block_nodes),
    ("query-block", query::query_block),
    ("x-debug-query-block-graph", query::query_block_graph),
    ("object-add", object::object_add),
    ("object-del", object::object_del),
    ("human-monitor-command", qemu_io::human_monitor_command),
    ("query-jobs", blockdev::query_jobs),
    ("job-cancel", blockdev::job_cancel),
    ("job-pause", blockdev::job_pause),
    ("job-resume", blockdev::job_resume),
    ("job-complete", blockdev::job_complete),
    ("job-dismiss", blockdev::job_dismiss),
    ("block-job-cancel", block_job_cancel),
    ("query-block-jobs", query_block_jobs),
];

fn block_job_cancel(bl: &BlockLayer, args: &Args<'_>) -> Res {
    let device = args.str("device")?;
    let force = args.opt_bool("force")?.unwrap_or(false);
    args.check_known(&["device", "force"])?;
    let Some(job) = bl.registry().find_job(device) else {
        return Err(QmpError::device_not_active(alloc::format!(
            "Block job '{device}' not found"
        )));
    };
    job.cancel(force)
        .map_err(|e| QmpError::generic(alloc::string::ToString::to_string(&e)))?;
    Ok(serde_json::json!({}))
}

fn query_block_jobs(bl: &BlockLayer, args: &Args<'_>) -> Res {
    args.check_known(&[])?;
    Ok(Value::Array(
        bl.registry()
            .jobs()
            .iter()
            .map(|j| {
                let (offset, len) = j.progress();
                serde_json::json!({
                    "type": j.job_type(), "device": j.id(), "len": len, "offset": offset,
                    "busy": false, "paused": matches!(j.status(), crate::job::JobStatus::Paused | crate::job::JobStatus::Standby),
                    "speed": j.speed(), "io-status": "ok", "ready": j.status() == crate::job::JobStatus::Ready,
                    "status": j.status().as_str(), "auto-finalize": true, "auto-dismiss": true,
                })
            })
            .collect(),
    ))
}

macro_rules! handler {
    ($i:expr) => {{
        fn h<C: BlockContext>(c: &mut C, a: &Args<'_>) -> Res {
            (COMMANDS[$i].1)(c.block_layer(), a)
        }
        h::<C>
    }};
}

/// Registers every block command on `d`.
pub fn register<C: BlockContext + 'static>(d: &mut Dispatcher<C>) {
    let handlers: [crate::qmp::Handler<C>; 23] = [
        handler!(0),
        handler!(1),
        handler!(2),
        handler!(3),
        handler!(4),
        handler!(5),
        handler!(6),
        handler!(7),
        handler!(8),
        handler!(9),
        handler!(10),
        handler!(11),
        handler!(12),
        handler!(13),
        handler!(14),
        handler!(15),
        handler!(16),
        handler!(17),
        handler!(18),
        handler!(19),
        handler!(20),
        handler!(21),
        handler!(22),
    ];
    for (i, h) in handlers.into_iter().enumerate() {
        d.register(COMMANDS[i].0, h);
    }
    crate::drivers::qcow2::commands::register(d);
}
