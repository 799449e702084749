//! The block layer's QMP commands, for any context that holds a
//! [`BlockLayer`] (QEMU: the `block-core.json` / `block.json` commands that
//! qemu-storage-daemon offers, plus `object-add` and
//! `human-monitor-command`; the job commands are in
//! [`crate::jobs::commands`]).
//!
//! ```
//! use block::layer::BlockLayer;
//! use block::qmp::Dispatcher;
//! let mut d: Dispatcher<BlockLayer> = Dispatcher::new();
//! block::commands::register(&mut d);
//! assert!(d.contains("blockdev-add"));
//! ```

use serde_json::Value;

use crate::layer::{BlockContext, BlockLayer};
use crate::qmp::{Args, Dispatcher, QmpError, Signature};
use crate::{blockdev, dirty_bitmap_commands, object, qemu_io, query, stats};

type Res = Result<Value, QmpError>;

/// A command's implementation over the block layer.
pub type Command = fn(&BlockLayer, &Args<'_>) -> Res;

/// Every command, by name.
pub const COMMANDS: [(&str, Signature, Command); 24] = [
    (
        "blockdev-add",
        Signature::new(
            "driver:@BlockdevDriver, node-name?:str, discard?:(ignore|unmap), cache?:{direct?:bool, no-flush?:bool}, read-only?:bool, auto-read-only?:bool, force-share?:bool, detect-zeroes?:@BlockdevDetectZeroesOptions, ..",
            "{}",
        ),
        blockdev::blockdev_add,
    ),
    (
        "blockdev-del",
        Signature::new("node-name:str", "{}"),
        blockdev::blockdev_del,
    ),
    (
        "x-blockdev-change",
        Signature::new("parent:str, child?:str, node?:str", "{}"),
        blockdev::x_blockdev_change,
    ),
    (
        "block_resize",
        Signature::new("device?:str, node-name?:str, size:int", "{}"),
        blockdev::block_resize,
    ),
    (
        "blockdev-open-tray",
        Signature::new("device?:str, id?:str, force?:bool", "{}"),
        blockdev::blockdev_open_tray,
    ),
    (
        "blockdev-close-tray",
        Signature::new("device?:str, id?:str", "{}"),
        blockdev::blockdev_close_tray,
    ),
    (
        "blockdev-remove-medium",
        Signature::new("id:str", "{}"),
        blockdev::blockdev_remove_medium,
    ),
    (
        "blockdev-insert-medium",
        Signature::new("id:str, node-name:str", "{}"),
        blockdev::blockdev_insert_medium,
    ),
    (
        "eject",
        Signature::new("device?:str, id?:str, force?:bool", "{}"),
        blockdev::eject,
    ),
    (
        "query-named-block-nodes",
        Signature::new("flat?:bool", "[@BlockDeviceInfo]"),
        query::query_named_block_nodes,
    ),
    (
        "query-block",
        Signature::new("", "[@BlockInfo]"),
        query::query_block,
    ),
    (
        "x-debug-query-block-graph",
        Signature::new("", "@XDbgBlockGraph"),
        query::query_block_graph,
    ),
    (
        "query-blockstats",
        Signature::new("query-nodes?:bool", "[@BlockStats]"),
        stats::query_blockstats,
    ),
    (
        "block-latency-histogram-set",
        Signature::new(
            "id:str, boundaries?:[uint64], boundaries-read?:[uint64], \
             boundaries-write?:[uint64], boundaries-flush?:[uint64]",
            "{}",
        ),
        stats::block_latency_histogram_set,
    ),
    (
        "object-add",
        Signature::new(
            "qom-type:(throttle-group|tls-creds-x509|authz-simple), id:str, ..",
            "{}",
        ),
        object::object_add,
    ),
    (
        "object-del",
        Signature::new("id:str", "{}"),
        object::object_del,
    ),
    (
        "human-monitor-command",
        Signature::new("command-line:str, cpu-index?:int", "str"),
        qemu_io::human_monitor_command,
    ),
    (
        "block-dirty-bitmap-add",
        Signature::new(
            "node:str, name:str, granularity?:uint32, persistent?:bool, disabled?:bool",
            "{}",
        ),
        dirty_bitmap_commands::add,
    ),
    (
        "block-dirty-bitmap-remove",
        Signature::new("node:str, name:str", "{}"),
        dirty_bitmap_commands::remove,
    ),
    (
        "block-dirty-bitmap-clear",
        Signature::new("node:str, name:str", "{}"),
        dirty_bitmap_commands::clear,
    ),
    (
        "block-dirty-bitmap-enable",
        Signature::new("node:str, name:str", "{}"),
        dirty_bitmap_commands::enable,
    ),
    (
        "block-dirty-bitmap-disable",
        Signature::new("node:str, name:str", "{}"),
        dirty_bitmap_commands::disable,
    ),
    (
        "block-dirty-bitmap-merge",
        Signature::new("node:str, target:str, bitmaps:[any]", "{}"),
        dirty_bitmap_commands::merge,
    ),
    (
        "transaction",
        Signature::new(
            "actions:[{type:(abort|block-dirty-bitmap-add|block-dirty-bitmap-remove|\
             block-dirty-bitmap-clear|block-dirty-bitmap-enable|block-dirty-bitmap-disable|\
             block-dirty-bitmap-merge|blockdev-backup|blockdev-snapshot|\
             blockdev-snapshot-internal-sync|blockdev-snapshot-sync|drive-backup), data:any}], \
             properties?:{completion-mode?:(individual|grouped)}",
            "{}",
        ),
        crate::transaction::transaction,
    ),
];

macro_rules! handler {
    ($i:expr) => {{
        fn h<C: BlockContext>(c: &mut C, a: &Args<'_>) -> Res {
            (COMMANDS[$i].2)(c.block_layer(), a)
        }
        h::<C>
    }};
}

/// Registers every block command on `d`.
pub fn register<C: BlockContext + 'static>(d: &mut Dispatcher<C>) {
    let handlers: [crate::qmp::Handler<C>; 24] = [
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
        handler!(23),
    ];
    for (i, h) in handlers.into_iter().enumerate() {
        d.register(COMMANDS[i].0, COMMANDS[i].1, h);
    }
    crate::schema::register(d);
    crate::drivers::qcow2::commands::register(d);
    crate::jobs::commands::register(d);
    crate::trace::register(d);
}
