//! Named backends with a tray (QEMU: what `-drive if=none,id=ID` plus a
//! removable device give a guest): `--drive id=ID,node-name=NODE` on the
//! command line and `x-drive-add` over QMP. They are what `eject`,
//! `blockdev-open-tray`/`-remove-medium`/`-insert-medium` act on, and what
//! the legacy `nbd-server-add device=ID` export follows: ejecting the drive
//! deletes that export (QEMU iotest 140).

use crate::app::Appliance;
use alloc::format;
use alloc::string::{String, ToString};
use block::graph::backend::BackendOptions;
use block::graph::permission::Perm;
use block::layer::BlockLayer;
use block::qmp::{Args, Dispatcher, QmpError};
use serde_json::{Map, Value};

/// Creates drive `id` with node `node` inserted.
fn add(block: &BlockLayer, id: &str, node: &str) -> Result<(), String> {
    let registry = block.registry();
    let node = registry
        .find_node(node)
        .ok_or_else(|| format!("Cannot find device='' nor node-name='{node}'"))?;
    let opts = BackendOptions {
        name: Some(id.to_string()),
        tray: true,
        ..BackendOptions::default()
    };
    // The drive itself does no I/O: its users (exports) take their own
    // permissions on the node.
    let blk = registry
        .new_backend(opts, Perm::NONE, Perm::ALL)
        .map_err(|e| e.to_string())?;
    blk.insert(&node).map_err(|e| e.to_string())
}

fn x_drive_add(app: &mut Appliance, args: &Args<'_>) -> Result<Value, QmpError> {
    let id = args.str("id")?;
    let node = args.str("node-name")?;
    args.check_known(&["id", "node-name"])?;
    add(&app.block, id, node).map_err(QmpError::generic)?;
    Ok(Value::Object(Map::new()))
}

/// Registers `x-drive-add`.
pub fn register(commands: &mut Dispatcher<Appliance>) {
    commands.register(
        "x-drive-add",
        block::qmp::Signature::new("id:str, node-name:str", "{}"),
        x_drive_add,
    );
}

/// `--drive id=ID,node-name=NODE`: `Ok(false)` for any other option.
pub fn apply_boot_option(block: &BlockLayer, name: &str, value: &str) -> Result<bool, String> {
    if name != "drive" {
        return Ok(false);
    }
    let opts =
        block::keyval::keyval_parse(value, None).map_err(|e| format!("--drive {value}: {e}"))?;
    let get = |k: &str| opts.get(k).and_then(Value::as_str);
    if let Some(extra) = opts
        .keys()
        .find(|k| !matches!(k.as_str(), "id" | "node-name"))
    {
        return Err(format!("--drive {value}: Invalid parameter '{extra}'"));
    }
    let (Some(id), Some(node)) = (get("id"), get("node-name")) else {
        return Err(format!(
            "--drive {value}: 'id' and 'node-name' are required"
        ));
    };
    add(block, id, node).map_err(|e| format!("--drive {value}: {e}"))?;
    Ok(true)
}
