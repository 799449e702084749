//! `cargo xtask graph`: the live block graph as Graphviz. Asks a running
//! appliance (the socket of `cargo xtask run`) for QEMU's
//! `x-debug-query-block-graph` and draws backends, jobs and nodes, nodes
//! labelled with their driver and refcount, edges with the child's role and
//! its permissions. With `dot` installed it writes SVG or PNG; otherwise
//! the dot text.

use clap::Args;
use serde_json::Value;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

#[derive(Args)]
pub struct GraphArgs {
    /// The QMP socket of a running appliance.
    #[arg(long, default_value = "target/blockhaus/qmp.sock")]
    socket: PathBuf,
    /// Output file: .svg or .png render through `dot`, anything else gets dot text.
    #[arg(long, short)]
    output: Option<PathBuf>,
}

/// Graphviz text for an `x-debug-query-block-graph` result.
pub fn to_dot(graph: &Value) -> String {
    let mut out =
        String::from("digraph blockhaus {\n  rankdir=TB;\n  node [fontname=\"monospace\"];\n");
    for node in graph["nodes"].as_array().into_iter().flatten() {
        let id = node["id"].as_u64().unwrap_or(0);
        let kind = node["type"].as_str().unwrap_or("block-driver");
        let name = node["name"].as_str().unwrap_or("");
        let (shape, mut label) = match kind {
            "block-backend" => ("box", format!("backend\\n{name}")),
            "block-job" => ("parallelogram", format!("job\\n{name}")),
            "block-export" => ("house", format!("export\\n{name}")),
            _ => ("ellipse", name.to_string()),
        };
        if let Some(driver) = node["drv"].as_str().or(node["driver"].as_str()) {
            let _ = write!(label, "\\n{driver}");
        }
        if let Some(refcnt) = node["refcount"].as_u64() {
            let _ = write!(label, "\\nrefcount {refcnt}");
        }
        let _ = writeln!(
            out,
            "  n{id} [shape={shape}, label=\"{}\"];",
            label.replace('"', "\\\"")
        );
    }
    let perms = |v: &Value| {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default()
    };
    for edge in graph["edges"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  n{} -> n{} [label=\"{}\\nperm: {}\\nshared: {}\"];",
            edge["parent"].as_u64().unwrap_or(0),
            edge["child"].as_u64().unwrap_or(0),
            edge["name"].as_str().unwrap_or(""),
            perms(&edge["perm"]),
            perms(&edge["shared-perm"]),
        );
    }
    out.push_str("}\n");
    out
}

pub fn graph(args: GraphArgs) -> Result<(), String> {
    let socket = harness::workspace_root().join(&args.socket);
    let mut qmp = harness::Qmp::connect(&socket, Duration::from_secs(2))
        .map_err(|e| format!("{}: {e} (is `cargo xtask run` up?)", socket.display()))?;
    qmp.negotiate()?;
    let graph = qmp.cmd("x-debug-query-block-graph", Value::Null)?;
    let dot = to_dot(&graph);
    let Some(output) = args.output else {
        print!("{dot}");
        return Ok(());
    };
    write(&dot, &output)
}

/// Writes `dot` to `output`: rendered by Graphviz for `.svg`/`.png`
/// (or, without `dot` installed, as text next to it), else as text.
fn write(dot: &str, output: &std::path::Path) -> Result<(), String> {
    let format = output.extension().and_then(|e| e.to_str()).unwrap_or("");
    if !matches!(format, "svg" | "png") {
        return std::fs::write(output, dot).map_err(|e| format!("{}: {e}", output.display()));
    }
    match Command::new("dot")
        .arg(format!("-T{format}"))
        .arg("-o")
        .arg(output)
        .stdin(Stdio::piped())
        .spawn()
    {
        Ok(mut child) => {
            use std::io::Write;
            child
                .stdin
                .take()
                .ok_or("dot stdin")?
                .write_all(dot.as_bytes())
                .map_err(|e| e.to_string())?;
            let status = child.wait().map_err(|e| e.to_string())?;
            if !status.success() {
                return Err(format!("dot failed ({status})"));
            }
            eprintln!("xtask: wrote {}", output.display());
        }
        Err(_) => {
            let text = output.with_extension("dot");
            std::fs::write(&text, dot).map_err(|e| e.to_string())?;
            eprintln!(
                "xtask: `dot` is not installed (apt-get install graphviz); wrote {}",
                text.display()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn dot_has_nodes_with_driver_and_refcount_and_labelled_edges() {
        let g = json!({
            "nodes": [
                {"id": 1, "type": "block-backend", "name": "exp0"},
                {"id": 2, "type": "block-driver", "name": "fmt", "drv": "qcow2", "refcount": 2},
                {"id": 3, "type": "block-driver", "name": "disk", "driver": "virtio-blk", "refcount": 1}
            ],
            "edges": [
                {"parent": 1, "child": 2, "name": "root", "perm": ["consistent-read", "write"], "shared-perm": ["consistent-read", "write", "write-unchanged"]},
                {"parent": 2, "child": 3, "name": "file", "perm": ["consistent-read"], "shared-perm": []}
            ]
        });
        let dot = to_dot(&g);
        assert!(dot.starts_with("digraph blockhaus {"), "{dot}");
        assert!(
            dot.contains("n1 [shape=box, label=\"backend\\nexp0\"]"),
            "{dot}"
        );
        assert!(
            dot.contains("n2 [shape=ellipse, label=\"fmt\\nqcow2\\nrefcount 2\"]"),
            "{dot}"
        );
        assert!(dot.contains("n1 -> n2 [label=\"root\\nperm: consistent-read,write\\nshared: consistent-read,write,write-unchanged\"]"), "{dot}");
        assert!(
            dot.contains("n2 -> n3 [label=\"file\\nperm: consistent-read\\nshared: \"]"),
            "{dot}"
        );
        assert!(dot.trim_end().ends_with('}'));
    }

    /// With Graphviz installed (`.ci/install-deps` installs it), `-o
    /// FILE.svg` is an SVG drawing of the graph.
    #[test]
    fn svg_output_is_rendered_by_graphviz() {
        let g = json!({
            "nodes": [{"id": 1, "type": "block-backend", "name": "exp0"},
                      {"id": 2, "type": "block-driver", "name": "disk", "drv": "virtio-blk", "refcount": 1}],
            "edges": [{"parent": 1, "child": 2, "name": "root", "perm": ["write"], "shared-perm": []}]
        });
        let dir = tempfile::tempdir().unwrap();
        let svg = dir.path().join("graph.svg");
        write(&to_dot(&g), &svg).unwrap();
        let text =
            std::fs::read_to_string(&svg).expect("dot wrote the SVG (is graphviz installed?)");
        assert!(text.contains("<svg"), "{text}");
        assert!(
            text.contains(">exp0<") && text.contains(">virtio&#45;blk<"),
            "{text}"
        );
        let dot = dir.path().join("graph.dot");
        write(&to_dot(&g), &dot).unwrap();
        assert!(
            std::fs::read_to_string(&dot)
                .unwrap()
                .starts_with("digraph")
        );
    }
}
