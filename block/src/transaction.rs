//! `transaction` (QEMU 7.2: `qmp_transaction` in `blockdev.c`): several
//! actions, all or nothing. Each action is prepared in order; if one
//! fails, every prepared action (the failing one too) is aborted in
//! reverse order; otherwise every one is committed in order; then each is
//! cleaned up. Actions: `abort`, `block-dirty-bitmap-add`, `-remove`,
//! `-clear`, `-enable`, `-disable`, `-merge`, `blockdev-backup` (the job
//! starts at commit, is cancelled at abort) and `blockdev-snapshot`
//! (undone at abort). QEMU's `blockdev-snapshot-sync`,
//! `blockdev-snapshot-internal-sync` and `drive-backup` actions are
//! refused, as blockhaus has no such commands; so is `completion-mode`
//! `grouped`, as blockhaus has no job transactions.

use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;

use serde_json::{Value, json};

use crate::dirty_bitmap::NamedBitmap;
use crate::dirty_bitmap_commands as bitmap;
use crate::drivers::qcow2::commands::{Snapshot, snapshot_prepare, snapshot_undo};
use crate::graph::node::Node;
use crate::job::Job;
use crate::layer::BlockLayer;
use crate::qmp::{Args, QmpError};

type Res = Result<Value, QmpError>;

/// `TransactionActionKind` of QEMU 7.2.
pub const ACTIONS: &[&str] = &[
    "abort",
    "block-dirty-bitmap-add",
    "block-dirty-bitmap-remove",
    "block-dirty-bitmap-clear",
    "block-dirty-bitmap-enable",
    "block-dirty-bitmap-disable",
    "block-dirty-bitmap-merge",
    "blockdev-backup",
    "blockdev-snapshot",
    "blockdev-snapshot-internal-sync",
    "blockdev-snapshot-sync",
    "drive-backup",
];

/// What a prepared action undoes or finishes.
enum Prepared {
    /// A bitmap was added: removed at abort.
    Added(Rc<Node>, String),
    /// A bitmap was changed: put back as it was at abort.
    Changed(Rc<Node>, NamedBitmap),
    /// A bitmap was removed from position `usize`: put back at abort.
    Removed(Rc<Node>, usize, NamedBitmap),
    /// A backup job was created: started at commit, cancelled at abort.
    Backup(Rc<Job>),
    /// A snapshot was taken: undone at abort.
    Snapshot(Snapshot),
    /// Nothing to undo.
    Nothing,
}

/// The node and bitmap an action's data names (for the undo copy); the
/// action itself reports a missing one with QEMU's text.
fn find(bl: &BlockLayer, data: &Args<'_>, name_key: &str) -> Option<(Rc<Node>, NamedBitmap)> {
    let node = data.opt_str("node").ok()??;
    let name = data.opt_str(name_key).ok()??;
    let n = bl.registry().lookup(Some(node), Some(node)).ok()?;
    let b = n.dirty_bitmaps().iter().find(|b| b.name == name)?.clone();
    Some((n, b))
}

/// Prepares one action (QEMU: `BlkActionOps.prepare`). `done` receives
/// what to undo before an error is returned, when something was done.
fn prepare(
    bl: &BlockLayer,
    kind: &str,
    data: &Args<'_>,
    done: &mut Option<Prepared>,
) -> Result<(), QmpError> {
    match kind {
        "abort" => {
            data.check_known(&[])?;
            Err(QmpError::generic("Transaction aborted using Abort action"))
        }
        "block-dirty-bitmap-add" => {
            bitmap::add(bl, data)?;
            let node = bl
                .registry()
                .lookup(Some(data.str("node")?), Some(data.str("node")?))
                .map_err(QmpError::generic)?;
            *done = Some(Prepared::Added(node, data.str("name")?.into()));
            Ok(())
        }
        "block-dirty-bitmap-remove" => {
            let before = find(bl, data, "name");
            let at = before
                .as_ref()
                .and_then(|(n, b)| n.dirty_bitmaps().iter().position(|x| x.name == b.name));
            bitmap::remove(bl, data)?;
            if let (Some((n, b)), Some(at)) = (before, at) {
                *done = Some(Prepared::Removed(n, at, b));
            }
            Ok(())
        }
        "block-dirty-bitmap-clear"
        | "block-dirty-bitmap-enable"
        | "block-dirty-bitmap-disable"
        | "block-dirty-bitmap-merge" => {
            let key = if kind == "block-dirty-bitmap-merge" {
                "target"
            } else {
                "name"
            };
            let before = find(bl, data, key);
            match kind {
                "block-dirty-bitmap-clear" => bitmap::clear(bl, data)?,
                "block-dirty-bitmap-enable" => bitmap::enable(bl, data)?,
                "block-dirty-bitmap-disable" => bitmap::disable(bl, data)?,
                _ => bitmap::merge(bl, data)?,
            };
            if let Some((n, b)) = before {
                *done = Some(Prepared::Changed(n, b));
            }
            Ok(())
        }
        "blockdev-backup" => {
            let job = crate::jobs::commands::backup_prepare(bl, data, false)?;
            *done = Some(Prepared::Backup(job));
            Ok(())
        }
        "blockdev-snapshot" => {
            let snap = snapshot_prepare(bl, data)?;
            *done = Some(Prepared::Snapshot(snap));
            Ok(())
        }
        other => Err(QmpError::generic(format!(
            "Action '{other}' is not supported by blockhaus"
        ))),
    }
}

/// Undoes a prepared action (QEMU: `BlkActionOps.abort`).
fn abort(bl: &BlockLayer, p: Prepared) -> Result<(), QmpError> {
    match p {
        Prepared::Added(n, name) => n.dirty_bitmaps_mut().retain(|b| b.name != name),
        Prepared::Changed(n, before) => {
            if let Some(b) = n
                .dirty_bitmaps_mut()
                .iter_mut()
                .find(|b| b.name == before.name)
            {
                *b = before;
            }
        }
        Prepared::Removed(n, at, before) => {
            let mut list = n.dirty_bitmaps_mut();
            let at = at.min(list.len());
            list.insert(at, before);
        }
        Prepared::Backup(job) => bl.wait(async move { job.cancel_sync().await })?,
        Prepared::Snapshot(snap) => bl.wait(snapshot_undo(snap))?,
        Prepared::Nothing => {}
    }
    Ok(())
}

/// Commits a prepared action (QEMU: `BlkActionOps.commit`).
fn commit(p: &Prepared) {
    if let Prepared::Backup(job) = p {
        job.start();
    }
}

/// `transaction`.
pub fn transaction(bl: &BlockLayer, args: &Args<'_>) -> Res {
    args.check_known(&["actions", "properties"])?;
    let actions = args.obj_list("actions")?;
    if let Some(props) = args.opt_obj("properties")? {
        props.check_known(&["completion-mode"])?;
        if props.opt_enum_str("completion-mode", &["individual", "grouped"])? == Some("grouped") {
            return Err(QmpError::generic(
                "completion-mode 'grouped' is not supported by blockhaus: it has no job \
                 transactions",
            ));
        }
    }
    // Every action is parsed before any runs, as QAPI does.
    let mut parsed = Vec::with_capacity(actions.len());
    for a in &actions {
        a.check_known(&["type", "data"])?;
        let kind = a.enum_str("type", ACTIONS)?;
        parsed.push((kind, a.obj("data")?));
    }
    let mut prepared: Vec<Prepared> = Vec::new();
    let mut failure = None;
    for (kind, data) in &parsed {
        let mut done = None;
        let r = prepare(bl, kind, data, &mut done);
        prepared.push(done.unwrap_or(Prepared::Nothing));
        if let Err(e) = r {
            failure = Some(e);
            break;
        }
    }
    if let Some(e) = failure {
        while let Some(p) = prepared.pop() {
            abort(bl, p)?;
        }
        return Err(e);
    }
    for p in &prepared {
        commit(p);
    }
    Ok(json!({}))
}
