//! Queries (QEMU: `block/qapi.c`, `qmp_x_debug_query_block_graph` in
//! `block.c`): `query-named-block-nodes`, `query-block`,
//! `x-debug-query-block-graph`.

use alloc::rc::Rc;
use alloc::vec::Vec;

use serde_json::{Map, Value, json};

use crate::graph::backend::Backend;
use crate::graph::node::Node;
use crate::graph::permission::Perm;
use crate::job::RegistryJobs;
use crate::layer::BlockLayer;
use crate::qmp::{Args, QmpError};

type Res = Result<Value, QmpError>;

/// QEMU's `ImageInfo` of a node. Without backing files `flat` changes
/// nothing yet: no `backing-image` chain is ever nested.
fn image_info(node: &Node, _flat: bool) -> Value {
    let mut m = Map::new();
    m.insert("filename".into(), json!(node.filename()));
    m.insert("format".into(), json!(node.driver_name()));
    m.insert("virtual-size".into(), json!(node.get_length().unwrap_or(0)));
    if let Some(info) = node.driver().query_info(node) {
        m.insert(
            "format-specific".into(),
            json!({"type": node.driver_name(), "data": info}),
        );
    }
    Value::Object(m)
}

/// QEMU's `BlockDeviceInfo` of a node (`bdrv_block_device_info`).
pub fn block_device_info(node: &Node, flat: bool) -> Value {
    let o = node.options();
    let mut v = json!({
        "file": node.filename(),
        "node-name": node.name(),
        "ro": o.read_only,
        "drv": node.driver_name(),
        "encrypted": false,
        "detect_zeroes": o.detect_zeroes.as_str(),
        "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0,
        "image": image_info(node, flat),
        "cache": {"writeback": true, "direct": o.cache_direct, "no-flush": o.cache_no_flush},
        "write_threshold": 0,
        "backing_file_depth": 0,
    });
    if let (Some(bitmaps), Some(m)) = (crate::dirty_bitmap_commands::query(node), v.as_object_mut())
    {
        m.insert("dirty-bitmaps".into(), bitmaps);
    }
    v
}

/// `query-named-block-nodes`: every node, in creation order.
pub fn query_named_block_nodes(bl: &BlockLayer, args: &Args<'_>) -> Res {
    let flat = args.opt_bool("flat")?.unwrap_or(false);
    args.check_known(&["flat"])?;
    Ok(named_block_nodes(bl, flat))
}

/// The value of `query-named-block-nodes` (for comparing graphs in tests).
pub fn named_block_nodes(bl: &BlockLayer, flat: bool) -> Value {
    Value::Array(
        bl.registry()
            .nodes()
            .iter()
            .filter(|n| n.state() == crate::graph::node::NodeState::Open)
            .map(|n| block_device_info(n, flat))
            .collect(),
    )
}

/// QEMU's `BlockInfo` of a named backend.
fn block_info(b: &Backend) -> Value {
    let mut m = Map::new();
    m.insert("device".into(), json!(b.name().unwrap_or("")));
    m.insert("type".into(), json!("unknown"));
    m.insert("removable".into(), json!(true));
    m.insert("locked".into(), json!(false));
    if b.has_tray() {
        m.insert("tray_open".into(), json!(b.is_tray_open()));
    }
    if let Some(root) = b.root_node() {
        m.insert("inserted".into(), block_device_info(&root, false));
    }
    Value::Object(m)
}

/// `query-block`: the named backends.
pub fn query_block(bl: &BlockLayer, args: &Args<'_>) -> Res {
    args.check_known(&[])?;
    Ok(Value::Array(
        bl.registry()
            .backends()
            .iter()
            .filter(|b| b.name().is_some())
            .map(|b| block_info(b))
            .collect(),
    ))
}

fn edge(parent: usize, child: usize, name: &str, perm: Perm, shared: Perm) -> Value {
    json!({"parent": parent, "child": child, "name": name, "perm": perm.qapi_names(), "shared-perm": shared.qapi_names()})
}

/// `x-debug-query-block-graph`: backends, jobs and nodes with every edge.
/// blockhaus adds `drv` and `refcount` to the `block-driver` nodes, which
/// QEMU's output lacks, so that a rendering can show them.
pub fn query_block_graph(bl: &BlockLayer, args: &Args<'_>) -> Res {
    args.check_known(&[])?;
    Ok(block_graph(bl))
}

/// The value of `x-debug-query-block-graph`.
pub fn block_graph(bl: &BlockLayer) -> Value {
    let reg = bl.registry();
    let backends = reg.backends();
    let jobs = reg.jobs();
    let nodes: Vec<Rc<Node>> = reg.nodes();
    let node_id = |n: &Node| -> usize {
        backends.len()
            + jobs.len()
            + nodes
                .iter()
                .position(|x| core::ptr::eq(&**x, n))
                .unwrap_or(0)
            + 1
    };
    let mut out_nodes = Vec::new();
    let mut out_edges = Vec::new();
    for (i, b) in backends.iter().enumerate() {
        out_nodes
            .push(json!({"id": i + 1, "type": "block-backend", "name": b.name().unwrap_or("")}));
        if let Some(root) = b.root() {
            out_edges.push(edge(
                i + 1,
                node_id(root.node()),
                root.name(),
                root.perm(),
                root.shared(),
            ));
        }
    }
    for (j, job) in jobs.iter().enumerate() {
        let id = backends.len() + j + 1;
        out_nodes.push(json!({"id": id, "type": "block-job", "name": job.id()}));
        for (k, b) in job.backends().iter().enumerate() {
            if let Some(root) = b.root() {
                let name = if k == 0 { "main node" } else { "target" };
                out_edges.push(edge(
                    id,
                    node_id(root.node()),
                    name,
                    root.perm(),
                    root.shared(),
                ));
            }
        }
    }
    for n in &nodes {
        let id = node_id(n);
        out_nodes.push(json!({
            "id": id, "type": "block-driver", "name": n.name(), "drv": n.driver_name(), "refcount": n.refcnt(),
        }));
        for c in n.children() {
            out_edges.push(edge(id, node_id(c.node()), c.name(), c.perm(), c.shared()));
        }
    }
    json!({"nodes": out_nodes, "edges": out_edges})
}
