//! qcow2 open and metadata: the input is the image file (header, header
//! extensions incl. the bitmaps extension, L1/L2 tables, refcount tables
//! and blocks, the snapshot table, compressed clusters), opened read-only
//! or writable through `blockdev-add` over `fuzz-mem`, then read, written,
//! checked, and closed (which flushes what the driver keeps). Seeds:
//! images made by `qemu-img` (`fuzz/corpus/qcow2/`).
#![no_main]
use libfuzzer_sys::fuzz_target;
use serde_json::json;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, image)) = data.split_first() else {
        return;
    };
    let mut m = fuzz::Monitor::new(image.to_vec());
    let ok = |r: Option<Result<serde_json::Value, _>>| matches!(r, Some(Ok(_)));
    if !ok(m.cmd(
        "blockdev-add",
        json!({"driver": "fuzz-mem", "node-name": "f"}),
    )) {
        return;
    }
    let read_only = mode & 1 == 0;
    let opened = ok(m.cmd(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "q", "file": "f", "backing": null, "read-only": read_only}),
    ));
    if !opened {
        return;
    }
    let io = |m: &mut fuzz::Monitor, line: &str| {
        let line = format!("qemu-io q \"{line}\"");
        let _ = m.cmd("human-monitor-command", json!({"command-line": line}));
    };
    io(&mut m, "read 0 64k");
    io(&mut m, "map");
    io(&mut m, "read 1M 128k");
    let _ = m.cmd("query-named-block-nodes", json!({}));
    if !read_only {
        io(&mut m, "write -P 0x5a 32k 8k");
        io(&mut m, "write -z 1M 64k");
        io(&mut m, "discard 0 64k");
        if mode & 2 != 0 {
            let _ = m.cmd(
                "block-dirty-bitmap-add",
                json!({"node": "q", "name": "b", "persistent": true}),
            );
        }
    }
    let _ = m.cmd("blockdev-del", json!({"node-name": "q"}));
});
