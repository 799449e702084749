//! The job commands of QMP (QEMU: `blockdev.c`'s `qmp_blockdev_mirror`,
//! `qmp_blockdev_backup`, `qmp_block_stream`, `qmp_block_commit`,
//! `qmp_block_job_*`, and `job-qmp.c`'s `qmp_job_*`), with QEMU's argument
//! names, defaults and error texts.
//!
//! ```text
//! blockdev-mirror {"job-id"?, "device", "target", "sync": "full"|"top"|"none",
//!                  "speed"?, "granularity"?, "buf-size"?, "on-source-error"?,
//!                  "on-target-error"?, "filter-node-name"?, "copy-mode"?: "background",
//!                  "unmap"?, "auto-finalize"?, "auto-dismiss"?}
//! blockdev-backup {"job-id"?, "device", "target", "sync": "full"|"top"|"none",
//!                  "speed"?, "compress"?: false, "on-source-error"?, "on-target-error"?,
//!                  "filter-node-name"?, "auto-finalize"?, "auto-dismiss"?}
//! block-stream    {"job-id"?, "device", "base"? | "base-node"?, "backing-file"?,
//!                  "speed"?, "on-error"?, "filter-node-name"?, "auto-finalize"?, "auto-dismiss"?}
//! block-commit    {"job-id"?, "device", "top"? | "top-node"?, "base"? | "base-node"?,
//!                  "backing-file"?, "speed"?, "on-error"?, "filter-node-name"?,
//!                  "auto-finalize"?, "auto-dismiss"?}
//! job-pause | job-resume | job-cancel | job-complete | job-finalize | job-dismiss {"id"}
//! block-job-pause | block-job-resume | block-job-complete {"device"}
//! block-job-cancel {"device", "force"?}     block-job-set-speed {"device", "speed"}
//! block-job-finalize | block-job-dismiss {"id"}
//! query-jobs, query-block-jobs
//! ```
//! `job-cancel` is a forced cancel, as in QEMU; `block-job-cancel` without
//! `force` lets a ready mirror complete without pivoting.

use alloc::format;
use alloc::rc::Rc;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use serde_json::{Value, json};

use crate::graph::node::Node;
use crate::job::{Job, JobStatus, RegistryJobs};
use crate::layer::{BlockContext, BlockLayer};
use crate::qmp::{Args, Dispatcher, QmpError, Signature};

use super::JobSetup;
use super::backup::{BackupOptions, BitmapMode, start_backup};
use super::chain::{backing, chain, chain_contains, find_base};
use super::commit::start_commit;
use super::mirror::{DEFAULT_BUF_SIZE, DEFAULT_GRANULARITY, MirrorOptions, SyncMode, start_mirror};
use super::on_error::OnError;
use super::stream::start_stream;

type Res = Result<Value, QmpError>;

fn ok() -> Res {
    Ok(json!({}))
}

fn generic(e: impl ToString) -> QmpError {
    QmpError::generic(e.to_string())
}

/// `speed`, `auto-finalize`, `auto-dismiss`.
fn job_setup(args: &Args<'_>) -> Result<JobSetup, QmpError> {
    let speed = args.opt_i64("speed")?.unwrap_or(0);
    if speed < 0 {
        return Err(QmpError::invalid_parameter("speed"));
    }
    Ok(JobSetup {
        speed: speed as u64,
        auto_finalize: args.opt_bool("auto-finalize")?.unwrap_or(true),
        auto_dismiss: args.opt_bool("auto-dismiss")?.unwrap_or(true),
    })
}

/// The node `device` names: a backend's root or a node-name (QEMU:
/// `bdrv_lookup_bs(device, device)`).
fn lookup(bl: &BlockLayer, device: &str) -> Result<Rc<Node>, QmpError> {
    bl.registry()
        .lookup(Some(device), Some(device))
        .map_err(QmpError::generic)
}

/// QEMU's `qmp_get_root_bs`: the node must have no parent node.
fn root_node(bl: &BlockLayer, device: &str) -> Result<Rc<Node>, QmpError> {
    let n = lookup(bl, device)?;
    if n.parents().iter().any(|p| p.parent_node().is_some()) {
        return Err(QmpError::generic("Need a root block node"));
    }
    Ok(n)
}

/// `job-id`, defaulting to the name of the node's named backend, else
/// `""` which `job_create` refuses (QEMU: `block_job_create` with
/// `bdrv_get_device_name`).
fn job_id(args: &Args<'_>, node: &Node) -> Result<String, QmpError> {
    match args.opt_str("job-id")? {
        Some(id) => Ok(id.into()),
        None => Ok(node
            .parents()
            .iter()
            .filter_map(|p| p.parent_backend())
            .find_map(|b| b.name().map(String::from))
            .unwrap_or_default()),
    }
}

/// `sync` of a mirror (QEMU: `mirror_start`'s refusal of bitmap modes).
fn sync_mode(args: &Args<'_>) -> Result<SyncMode, QmpError> {
    match args.enum_str("sync", &["top", "full", "none", "incremental", "bitmap"])? {
        "top" => Ok(SyncMode::Top),
        "full" => Ok(SyncMode::Full),
        "none" => Ok(SyncMode::None),
        other => Err(QmpError::generic(format!(
            "Sync mode '{other}' not supported"
        ))),
    }
}

/// `blockdev-mirror` (QEMU: `qmp_blockdev_mirror` →
/// `blockdev_mirror_common`).
pub fn blockdev_mirror(bl: &BlockLayer, args: &Args<'_>) -> Res {
    args.check_known(&[
        "job-id",
        "device",
        "target",
        "replaces",
        "sync",
        "speed",
        "granularity",
        "buf-size",
        "on-source-error",
        "on-target-error",
        "filter-node-name",
        "copy-mode",
        "unmap",
        "auto-finalize",
        "auto-dismiss",
    ])?;
    let device = args.str("device")?;
    let target_name = args.str("target")?;
    let sync = sync_mode(args)?;
    let setup = job_setup(args)?;
    let granularity = args.opt_u32("granularity")?.map_or(0, u64::from);
    if granularity != 0 && !(512..=64 << 20).contains(&granularity) {
        return Err(QmpError::invalid_parameter_value(
            "granularity",
            "a value in range [512B, 64MB]",
        ));
    }
    if granularity & granularity.wrapping_sub(1) != 0 {
        return Err(QmpError::invalid_parameter_value(
            "granularity",
            "a power of 2",
        ));
    }
    let buf_size = match args.opt_i64("buf-size")? {
        Some(b) if b <= 0 => return Err(QmpError::invalid_parameter("buf-size")),
        Some(b) => b as u64,
        None => DEFAULT_BUF_SIZE,
    };
    if args.opt_str("replaces")?.is_some() {
        return Err(QmpError::generic("'replaces' is not supported"));
    }
    if let Some(m) = args.opt_enum_str("copy-mode", &["background", "write-blocking"])?
        && m != "background"
    {
        return Err(QmpError::generic(
            "copy-mode 'write-blocking' is not supported",
        ));
    }
    let _unmap = args.opt_bool("unmap")?;
    let on_source_error = OnError::parse(args, "on-source-error")?;
    let on_target_error = OnError::parse(args, "on-target-error")?;
    let filter = args.opt_str("filter-node-name")?;
    let source = root_node(bl, device)?;
    let target = lookup(bl, target_name)?;
    if Rc::ptr_eq(&source, &target) {
        return Err(QmpError::generic("Can't mirror node into itself"));
    }
    let id = job_id(args, &source)?;
    // QEMU: sync=top without a backing file is sync=full.
    let sync = if sync == SyncMode::Top && backing(&source).is_none() {
        SyncMode::Full
    } else {
        sync
    };
    let opts = MirrorOptions {
        sync,
        granularity: if granularity == 0 {
            DEFAULT_GRANULARITY
        } else {
            granularity
        },
        buf_size,
        on_source_error,
        on_target_error,
        filter_node_name: filter.map(String::from),
        commit_base: None,
    };
    bl.wait(start_mirror(&id, "mirror", &source, &target, opts, setup))?
        .map_err(QmpError::generic)?;
    ok()
}

/// `sync`, `bitmap` and `bitmap-mode` of a backup, checked as QEMU's
/// `do_backup_common` and `backup_job_create` check them
/// (`sync=incremental` is `sync=bitmap` with `bitmap-mode=on-success`).
fn backup_bitmap(
    sync: &str,
    bitmap: Option<&str>,
    mode: Option<BitmapMode>,
) -> Result<(SyncMode, Option<(String, BitmapMode)>), QmpError> {
    let (sync, mode) = if sync == "incremental" {
        if mode.is_some_and(|m| m != BitmapMode::OnSuccess) {
            return Err(QmpError::generic(
                "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'",
            ));
        }
        (SyncMode::Bitmap, Some(BitmapMode::OnSuccess))
    } else {
        let s = match sync {
            "top" => SyncMode::Top,
            "full" => SyncMode::Full,
            "none" => SyncMode::None,
            _ => SyncMode::Bitmap,
        };
        (s, mode)
    };
    let Some(name) = bitmap else {
        if mode.is_some() && sync != SyncMode::Bitmap {
            return Err(QmpError::generic(
                "Cannot specify bitmap sync mode without a bitmap",
            ));
        }
        if sync == SyncMode::Bitmap {
            return Err(QmpError::generic(format!(
                "must provide a valid bitmap name for '{}' sync mode",
                sync.as_str()
            )));
        }
        return Ok((sync, None));
    };
    let Some(mode) = mode else {
        return Err(QmpError::generic(
            "Bitmap sync mode must be given when providing a bitmap",
        ));
    };
    if sync == SyncMode::None {
        return Err(QmpError::generic(
            "sync mode 'none' does not produce meaningful bitmap outputs",
        ));
    }
    if mode == BitmapMode::Never && sync != SyncMode::Bitmap {
        return Err(QmpError::generic(format!(
            "Bitmap sync mode 'never' has no meaningful effect when combined with sync mode '{}'",
            sync.as_str()
        )));
    }
    Ok((sync, Some((name.into(), mode))))
}

/// `blockdev-backup` (QEMU: `qmp_blockdev_backup` → `backup_job_create`).
pub fn blockdev_backup(bl: &BlockLayer, args: &Args<'_>) -> Res {
    backup_prepare(bl, args, true)?;
    ok()
}

/// Creates the backup job `args` ask for, started or not (a
/// `transaction` starts it when it commits).
pub fn backup_prepare(
    bl: &BlockLayer,
    args: &Args<'_>,
    start: bool,
) -> Result<Rc<crate::job::Job>, QmpError> {
    args.check_known(&[
        "job-id",
        "device",
        "target",
        "sync",
        "speed",
        "compress",
        "on-source-error",
        "on-target-error",
        "filter-node-name",
        "auto-finalize",
        "auto-dismiss",
        "bitmap",
        "bitmap-mode",
    ])?;
    let device = args.str("device")?;
    let target_name = args.str("target")?;
    let sync_name = args.enum_str("sync", &["top", "full", "none", "incremental", "bitmap"])?;
    let bitmap = args.opt_str("bitmap")?;
    let mode = match args.opt_enum_str("bitmap-mode", &["on-success", "never", "always"])? {
        Some("on-success") => Some(BitmapMode::OnSuccess),
        Some("never") => Some(BitmapMode::Never),
        Some(_) => Some(BitmapMode::Always),
        None => None,
    };
    let setup = job_setup(args)?;
    if args.opt_bool("compress")? == Some(true) {
        return Err(QmpError::generic(
            "Compression is not supported for this drive",
        ));
    }
    let (sync, bitmap) = backup_bitmap(sync_name, bitmap, mode)?;
    let opts = BackupOptions {
        sync,
        on_source_error: OnError::parse(args, "on-source-error")?,
        on_target_error: OnError::parse(args, "on-target-error")?,
        filter_node_name: args.opt_str("filter-node-name")?.map(String::from),
        bitmap,
        start,
    };
    let source = lookup(bl, device)?;
    let target = lookup(bl, target_name)?;
    let id = job_id(args, &source)?;
    bl.wait(start_backup(&id, &source, &target, opts, setup))?
        .map_err(QmpError::generic)
}

/// A chain member by file name or node-name (QEMU:
/// `bdrv_find_backing_image`).
fn find_backing_image(top: &Rc<Node>, name: &str) -> Option<Rc<Node>> {
    chain(top)
        .into_iter()
        .skip(1)
        .find(|n| n.name() == name || n.filename() == name)
}

/// The arguments `block-stream` and `block-commit` share.
const CHAIN_JOB_ARGS: [&str; 9] = [
    "job-id",
    "device",
    "backing-file",
    "backing-mask-protocol",
    "speed",
    "on-error",
    "filter-node-name",
    "auto-finalize",
    "auto-dismiss",
];

/// `block-stream` (QEMU: `qmp_block_stream`).
pub fn block_stream(bl: &BlockLayer, args: &Args<'_>) -> Res {
    args.check_known(&[CHAIN_JOB_ARGS.as_slice(), &["base", "base-node"]].concat())?;
    let device = args.str("device")?;
    let base = args.opt_str("base")?;
    let base_node = args.opt_str("base-node")?;
    let backing_file = args.opt_str("backing-file")?;
    let _mask = args.opt_bool("backing-mask-protocol")?;
    let setup = job_setup(args)?;
    let on_error = OnError::parse(args, "on-error")?;
    let filter = args.opt_str("filter-node-name")?;
    if base.is_some() && base_node.is_some() {
        return Err(QmpError::generic(
            "'base' and 'base-node' cannot be specified at the same time",
        ));
    }
    let top = lookup(bl, device)?;
    let base_bs =
        match (base, base_node) {
            (Some(b), _) => Some(find_backing_image(&top, b).ok_or_else(|| {
                QmpError::generic(format!("Can't find '{b}' in the backing chain"))
            })?),
            (None, Some(b)) => {
                let n = bl
                    .registry()
                    .lookup(None, Some(b))
                    .map_err(QmpError::generic)?;
                if Rc::ptr_eq(&n, &top) || !chain_contains(&top, &n) {
                    return Err(QmpError::generic(format!(
                        "Node '{b}' is not a backing image of '{device}'"
                    )));
                }
                Some(n)
            }
            (None, None) => None,
        };
    if base_bs.is_none() && backing_file.is_some() {
        return Err(QmpError::generic(
            "backing file specified, but streaming the entire chain",
        ));
    }
    let id = job_id(args, &top)?;
    bl.wait(start_stream(
        &id,
        &top,
        base_bs,
        on_error,
        filter,
        backing_file,
        setup,
    ))?
    .map_err(QmpError::generic)?;
    ok()
}

/// `block-commit` (QEMU: `qmp_block_commit`).
pub fn block_commit(bl: &BlockLayer, args: &Args<'_>) -> Res {
    args.check_known(
        &[
            CHAIN_JOB_ARGS.as_slice(),
            &["base-node", "base", "top-node", "top"],
        ]
        .concat(),
    )?;
    let device = args.str("device")?;
    let base = args.opt_str("base")?;
    let base_node = args.opt_str("base-node")?;
    let top = args.opt_str("top")?;
    let top_node = args.opt_str("top-node")?;
    let backing_file = args.opt_str("backing-file")?;
    let _mask = args.opt_bool("backing-mask-protocol")?;
    let setup = job_setup(args)?;
    let on_error = OnError::parse(args, "on-error")?;
    let filter = args.opt_str("filter-node-name")?;
    // QEMU looks the device up first: libvirt probes for DeviceNotFound.
    let bs = match root_node(bl, device) {
        Ok(n) => n,
        Err(e) if bl.registry().lookup(Some(device), Some(device)).is_ok() => return Err(e),
        Err(_) => {
            return Err(QmpError::device_not_found(format!(
                "Device '{device}' not found"
            )));
        }
    };
    if top.is_some() && top_node.is_some() {
        return Err(QmpError::generic(
            "'top-node' and 'top' are mutually exclusive",
        ));
    }
    let reg = bl.registry();
    let top_bs = match (top, top_node) {
        (_, Some(t)) => {
            let n = reg.lookup(None, Some(t)).map_err(QmpError::generic)?;
            if !chain_contains(&bs, &n) {
                return Err(QmpError::generic(format!(
                    "'{t}' is not in this backing file chain"
                )));
            }
            n
        }
        (Some(t), None) => {
            if bs.name() == t || bs.filename() == t {
                bs.clone()
            } else {
                find_backing_image(&bs, t)
                    .ok_or_else(|| QmpError::generic(format!("Top image file {t} not found")))?
            }
        }
        (None, None) => bs.clone(),
    };
    if base.is_some() && base_node.is_some() {
        return Err(QmpError::generic(
            "'base-node' and 'base' are mutually exclusive",
        ));
    }
    let base_bs = match (base, base_node) {
        (_, Some(b)) => {
            let n = reg.lookup(None, Some(b)).map_err(QmpError::generic)?;
            if !chain_contains(&top_bs, &n) {
                return Err(QmpError::generic(format!(
                    "'{b}' is not in this backing file chain"
                )));
            }
            n
        }
        (Some(b), None) => find_backing_image(&top_bs, b)
            .ok_or_else(|| QmpError::generic(format!("Can't find '{b}' in the backing chain")))?,
        (None, None) => find_base(&top_bs),
    };
    if Rc::ptr_eq(&top_bs, &base_bs) {
        return Err(QmpError::generic("cannot commit an image into itself"));
    }
    let id = job_id(args, &bs)?;
    // QEMU: active commit when top is the active layer or has a writer.
    let (top_perm, _) = top_bs.cumulative_perms();
    let active =
        Rc::ptr_eq(&top_bs, &bs) || top_perm.contains(crate::graph::permission::Perm::WRITE);
    if active && backing_file.is_some() {
        return Err(QmpError::generic(if Rc::ptr_eq(&top_bs, &bs) {
            "'backing-file' specified, but 'top' is the active layer"
        } else {
            "'backing-file' specified, but 'top' has a writer on it"
        }));
    }
    if active {
        // Active commit (QEMU: commit_active_start).
        let opts = MirrorOptions {
            sync: SyncMode::Full,
            on_source_error: on_error,
            on_target_error: on_error,
            filter_node_name: filter.map(String::from),
            commit_base: Some(base_bs.clone()),
            ..MirrorOptions::default()
        };
        bl.wait(start_mirror(&id, "commit", &top_bs, &base_bs, opts, setup))?
            .map_err(QmpError::generic)?;
    } else {
        bl.wait(start_commit(
            &id,
            &bs,
            &top_bs,
            &base_bs,
            on_error,
            backing_file,
            filter,
            setup,
        ))?
        .map_err(QmpError::generic)?;
    }
    ok()
}

// ---- the job verbs ----

fn find_job(bl: &BlockLayer, id: &str) -> Result<Rc<Job>, QmpError> {
    bl.registry()
        .find_job(id)
        .ok_or_else(|| QmpError::generic("Job not found"))
}

/// Whether a job is a block job (QEMU: `is_block_job`); `create` is not.
fn is_block_job(j: &Job) -> bool {
    j.job_type() != "create"
}

/// QEMU's `find_block_job_locked`.
fn find_block_job(bl: &BlockLayer, id: &str) -> Result<Rc<Job>, QmpError> {
    bl.registry()
        .find_job(id)
        .filter(|j| is_block_job(j))
        .ok_or_else(|| QmpError::device_not_active(format!("Block job '{id}' not found")))
}

fn verb(r: Result<(), crate::job::JobError>) -> Res {
    r.map_err(generic)?;
    ok()
}

macro_rules! job_verb {
    ($name:ident, $doc:literal, $key:literal, $find:ident, |$j:ident| $body:expr) => {
        #[doc = $doc]
        pub fn $name(bl: &BlockLayer, args: &Args<'_>) -> Res {
            let id = args.str($key)?;
            args.check_known(&[$key])?;
            let $j = $find(bl, id)?;
            verb($body)
        }
    };
}

job_verb!(job_pause, "`job-pause`.", "id", find_job, |j| j.pause());
job_verb!(job_resume, "`job-resume`.", "id", find_job, |j| j.resume());
job_verb!(
    job_cancel,
    "`job-cancel` (always forced, as QEMU's).",
    "id",
    find_job,
    |j| j.cancel(true)
);
job_verb!(job_complete, "`job-complete`.", "id", find_job, |j| j
    .complete());
job_verb!(job_finalize, "`job-finalize`.", "id", find_job, |j| j
    .finalize());
job_verb!(job_dismiss, "`job-dismiss`.", "id", find_job, |j| j
    .dismiss());
job_verb!(
    block_job_pause,
    "`block-job-pause`.",
    "device",
    find_block_job,
    |j| j.pause()
);
job_verb!(
    block_job_resume,
    "`block-job-resume`.",
    "device",
    find_block_job,
    |j| j.resume()
);
job_verb!(
    block_job_complete,
    "`block-job-complete`.",
    "device",
    find_block_job,
    |j| j.complete()
);
job_verb!(
    block_job_finalize,
    "`block-job-finalize`.",
    "id",
    find_block_job,
    |j| j.finalize()
);
job_verb!(
    block_job_dismiss,
    "`block-job-dismiss`.",
    "id",
    find_block_job,
    |j| j.dismiss()
);

/// `block-job-cancel` (`force` default false: a ready mirror completes
/// without pivoting).
pub fn block_job_cancel(bl: &BlockLayer, args: &Args<'_>) -> Res {
    let device = args.str("device")?;
    let force = args.opt_bool("force")?.unwrap_or(false);
    args.check_known(&["device", "force"])?;
    let job = find_block_job(bl, device)?;
    if job.is_user_paused() && !force {
        return Err(QmpError::generic(format!(
            "The block job for device '{device}' is currently paused"
        )));
    }
    verb(job.cancel(force))
}

/// `block-job-set-speed`.
pub fn block_job_set_speed(bl: &BlockLayer, args: &Args<'_>) -> Res {
    let device = args.str("device")?;
    let speed = args.i64("speed")?;
    args.check_known(&["device", "speed"])?;
    let job = find_block_job(bl, device)?;
    if speed < 0 {
        return Err(QmpError::invalid_parameter("speed"));
    }
    verb(job.set_speed(speed as u64))
}

/// `query-jobs` (QEMU: `JobInfo`).
pub fn query_jobs(bl: &BlockLayer, args: &Args<'_>) -> Res {
    args.check_known(&[])?;
    Ok(Value::Array(
        bl.registry().jobs().iter().map(|j| j.info()).collect(),
    ))
}

/// One `BlockJobInfo`.
pub fn block_job_info(j: &Job) -> Value {
    let (offset, len) = j.progress();
    let mut v = json!({
        "type": j.job_type(), "device": j.id(), "len": len, "offset": offset,
        "busy": j.status() == JobStatus::Running,
        "paused": matches!(j.status(), JobStatus::Paused | JobStatus::Standby),
        "speed": j.speed(), "io-status": j.io_status(),
        "ready": matches!(j.status(), JobStatus::Ready | JobStatus::Standby),
        "status": j.status().as_str(),
        "auto-finalize": j.auto_finalize(), "auto-dismiss": j.auto_dismiss(),
    });
    if let (Some(e), Value::Object(m)) = (j.error(), &mut v) {
        m.insert("error".into(), Value::String(e));
    }
    v
}

/// `query-block-jobs`.
pub fn query_block_jobs(bl: &BlockLayer, args: &Args<'_>) -> Res {
    args.check_known(&[])?;
    let jobs: Vec<Value> = bl
        .registry()
        .jobs()
        .iter()
        .filter(|j| is_block_job(j))
        .map(|j| block_job_info(j))
        .collect();
    Ok(Value::Array(jobs))
}

/// A command over the block layer.
pub type Command = fn(&BlockLayer, &Args<'_>) -> Res;

/// Every job command, by name.
pub const COMMANDS: [(&str, Signature, Command); 19] = [
    (
        "blockdev-mirror",
        Signature::new(
            "job-id?:str, device:str, target:str, replaces?:str, sync:(top|full|none|incremental|bitmap), speed?:int, granularity?:uint32, buf-size?:int, on-source-error?:@BlockdevOnError, on-target-error?:@BlockdevOnError, filter-node-name?:str, copy-mode?:(background|write-blocking), unmap?:bool, auto-finalize?:bool, auto-dismiss?:bool",
            "{}",
        ),
        blockdev_mirror,
    ),
    (
        "blockdev-backup",
        Signature::new(
            "job-id?:str, device:str, target:str, sync:(top|full|none|incremental|bitmap), speed?:int, compress?:bool, on-source-error?:@BlockdevOnError, on-target-error?:@BlockdevOnError, filter-node-name?:str, auto-finalize?:bool, auto-dismiss?:bool, bitmap?:str, bitmap-mode?:(on-success|never|always)",
            "{}",
        ),
        blockdev_backup,
    ),
    (
        "block-stream",
        Signature::new(
            "job-id?:str, device:str, backing-file?:str, backing-mask-protocol?:bool, speed?:int, on-error?:@BlockdevOnError, filter-node-name?:str, auto-finalize?:bool, auto-dismiss?:bool, base?:str, base-node?:str",
            "{}",
        ),
        block_stream,
    ),
    (
        "block-commit",
        Signature::new(
            "job-id?:str, device:str, backing-file?:str, backing-mask-protocol?:bool, speed?:int, on-error?:@BlockdevOnError, filter-node-name?:str, auto-finalize?:bool, auto-dismiss?:bool, base-node?:str, base?:str, top-node?:str, top?:str",
            "{}",
        ),
        block_commit,
    ),
    ("query-jobs", Signature::new("", "[@JobInfo]"), query_jobs),
    (
        "query-block-jobs",
        Signature::new("", "[@BlockJobInfo]"),
        query_block_jobs,
    ),
    ("job-pause", Signature::new("id:str", "{}"), job_pause),
    ("job-resume", Signature::new("id:str", "{}"), job_resume),
    ("job-cancel", Signature::new("id:str", "{}"), job_cancel),
    ("job-complete", Signature::new("id:str", "{}"), job_complete),
    ("job-finalize", Signature::new("id:str", "{}"), job_finalize),
    ("job-dismiss", Signature::new("id:str", "{}"), job_dismiss),
    (
        "block-job-pause",
        Signature::new("device:str", "{}"),
        block_job_pause,
    ),
    (
        "block-job-resume",
        Signature::new("device:str", "{}"),
        block_job_resume,
    ),
    (
        "block-job-complete",
        Signature::new("device:str", "{}"),
        block_job_complete,
    ),
    (
        "block-job-finalize",
        Signature::new("id:str", "{}"),
        block_job_finalize,
    ),
    (
        "block-job-dismiss",
        Signature::new("id:str", "{}"),
        block_job_dismiss,
    ),
    (
        "block-job-cancel",
        Signature::new("device:str, force?:bool", "{}"),
        block_job_cancel,
    ),
    (
        "block-job-set-speed",
        Signature::new("device:str, speed:int", "{}"),
        block_job_set_speed,
    ),
];

macro_rules! handlers {
    ($($i:literal),*) => {{
        [$({
            fn h<C: BlockContext>(c: &mut C, a: &Args<'_>) -> Res {
                (COMMANDS[$i].2)(c.block_layer(), a)
            }
            h::<C> as crate::qmp::Handler<C>
        }),*]
    }};
}

/// Registers every job command on `d`.
pub fn register<C: BlockContext + 'static>(d: &mut Dispatcher<C>) {
    let handlers: [crate::qmp::Handler<C>; 19] = handlers!(
        0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18
    );
    for (i, h) in handlers.into_iter().enumerate() {
        d.register(COMMANDS[i].0, COMMANDS[i].1, h);
    }
}
