//! qcow2 over memory file nodes: creation, every structure, the write-back
//! order, bad images, and a seeded model test over a 3-image chain.

use alloc::boxed::Box;
use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use serde_json::{Value, json};

use super::harness::{Env, Qmp};
use crate::drivers::qcow2::Qcow2;
use crate::drivers::qcow2::check::CheckReport;
use crate::graph::node::Node;
use crate::io::ReqFlags;

const MIB: u64 = 1 << 20;

fn drv(node: &Node) -> &Qcow2 {
    match (node.driver() as &dyn core::any::Any).downcast_ref::<Qcow2>() {
        Some(d) => d,
        None => panic!("not a qcow2 node"),
    }
}

/// A memory file node `file` of `file_size` bytes.
pub fn mem(q: &mut Qmp, file: &str, file_size: u64) {
    q.ok(
        "blockdev-add",
        json!({"driver": "mem", "node-name": file, "label": file, "size": file_size}),
    );
}

/// Runs `blockdev-create` and waits for the job; returns its error.
fn create(q: &mut Qmp, options: Value) -> Option<String> {
    q.ok(
        "blockdev-create",
        json!({"job-id": "c", "options": options}),
    );
    q.settle();
    let jobs = q.ok("query-jobs", json!({}));
    assert_eq!(jobs[0]["status"], "concluded", "{jobs}");
    let err = jobs[0]["error"].as_str().map(String::from);
    q.ok("job-dismiss", json!({"id": "c"}));
    err
}

/// A new image of `size` on a new memory file.
pub fn image(q: &mut Qmp, file: &str, size: u64, extra: Value) {
    mem(q, file, 64 * MIB);
    let mut o = json!({"driver": "qcow2", "file": file, "size": size});
    if let (Value::Object(m), Value::Object(e)) = (&mut o, extra) {
        m.extend(e);
    }
    if let Some(e) = create(q, o) {
        panic!("create: {e}");
    }
}

pub fn open(q: &mut Qmp, name: &str, args: Value) {
    let mut o = json!({"driver": "qcow2", "node-name": name, "discard": "unmap"});
    if let (Value::Object(m), Value::Object(e)) = (&mut o, args) {
        m.extend(e);
    }
    q.ok("blockdev-add", o);
}

pub fn node(q: &Qmp, name: &str) -> Rc<Node> {
    match q.bl.registry().find_node(name) {
        Some(n) => n,
        None => panic!("no node {name}"),
    }
}

/// `qemu-img check` of the qcow2 node `name`.
pub fn check(q: &Qmp, name: &str) -> CheckReport {
    let n = node(q, name);
    let r = q.bl.wait(async move { drv(&n).check(&n).await });
    match r {
        Ok(Ok(r)) => r,
        e => panic!("check {name}: {e:?}"),
    }
}

fn file_bytes(q: &Qmp, file: &str) -> Vec<u8> {
    Env::mem_driver(&node(q, file)).data.borrow().clone()
}

fn read(q: &Qmp, name: &str, off: u64, len: usize) -> Vec<u8> {
    let n = node(q, name);
    match q
        .bl
        .wait(async move { n.read(off, len, ReqFlags::NONE).await })
    {
        Ok(Ok(d)) => d,
        e => panic!("read {name} {off}+{len}: {e:?}"),
    }
}

fn write(q: &Qmp, name: &str, off: u64, data: Vec<u8>) {
    let n = node(q, name);
    if let Ok(Err(e)) | Err(e) =
        q.bl.wait(async move { n.write(off, data, ReqFlags::NONE).await })
            .map_err(|e| panic!("{}", e.desc))
    {
        panic!("write {name} {off}: {e}");
    }
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

#[test]
fn create_writes_qemus_layout() {
    let mut q = Qmp::new();
    image(&mut q, "f", 16 * MIB, json!({}));
    let b = file_bytes(&q, "f");
    assert_eq!(&b[0..4], b"QFI\xfb");
    assert_eq!(be32(&b, 4), 3);
    assert_eq!(be32(&b, 20), 16, "64 KiB clusters");
    assert_eq!(be64(&b, 24), 16 * MIB);
    assert_eq!(be32(&b, 36), 1, "one L1 entry covers 512 MiB");
    assert_eq!(
        be64(&b, 40),
        0x30000,
        "L1 after header, refcount table and block"
    );
    assert_eq!(be64(&b, 48), 0x10000);
    assert_eq!(be32(&b, 56), 1);
    assert_eq!(be32(&b, 96), 4, "16-bit refcounts");
    assert_eq!(be32(&b, 100), 112);
    assert_eq!(be64(&b, 0x10000), 0x20000, "refcount block");
    for c in 0..4 {
        assert_eq!(
            u16::from_be_bytes([b[0x20000 + 2 * c], b[0x20001 + 2 * c]]),
            1
        );
    }
    open(&mut q, "q", json!({"file": "f"}));
    assert!(check(&q, "q").is_clean());
    assert_eq!(q.nodes()[1]["image"]["virtual-size"], 16 * MIB);
    let info = &q.nodes()[1]["image"]["format-specific"];
    assert_eq!(info["data"]["compat"], "1.1", "{info}");
}

/// What an image still has of its file is visible (a disk cannot grow:
/// that is all new clusters can take), and follows allocation.
#[test]
fn room_left_in_the_file_is_reported_and_follows_allocation() {
    let mut q = Qmp::new();
    image(&mut q, "f", 16 * MIB, json!({}));
    open(&mut q, "q", json!({"file": "f"}));
    let room = |q: &Qmp| {
        let info = &q.nodes()[1]["image"]["format-specific"]["data"];
        info["x-room-left"]
            .as_u64()
            .unwrap_or_else(|| panic!("{info}"))
    };
    // Header, refcount table, refcount block and L1 table.
    assert_eq!(room(&q), 64 * MIB - 4 * 0x10000);
    // One data cluster and the L2 table that maps it.
    write(&q, "q", 0, vec![1; 0x10000]);
    assert_eq!(room(&q), 64 * MIB - 6 * 0x10000);
    write(&q, "q", 0x10000, vec![2; 100]);
    assert_eq!(room(&q), 64 * MIB - 7 * 0x10000);
    // Counted again at the next open: the same.
    q.ok("blockdev-del", json!({"node-name": "q"}));
    open(&mut q, "q", json!({"file": "f"}));
    assert_eq!(room(&q), 64 * MIB - 7 * 0x10000);
}

#[test]
fn create_refuses_bad_options_with_qemus_texts() {
    let mut q = Qmp::new();
    mem(&mut q, "f", 4 * MIB);
    let cases = [
        (
            json!({"cluster-size": 1000}),
            "Cluster size must be a power of two between 512 and 2048k",
        ),
        (
            json!({"extended-l2": true, "cluster-size": 4096}),
            "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
        ),
        (
            json!({"version": "v2", "lazy-refcounts": true}),
            "Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)",
        ),
        (
            json!({"backing-fmt": "qcow2"}),
            "Backing format cannot be used without backing file",
        ),
        (
            json!({"refcount-bits": 3}),
            "Refcount width must be a power of two and may not exceed 64 bits",
        ),
    ];
    for (extra, text) in cases {
        let mut o = json!({"driver": "qcow2", "file": "f", "size": MIB});
        if let (Value::Object(m), Value::Object(e)) = (&mut o, extra) {
            m.extend(e);
        }
        assert_eq!(create(&mut q, o).as_deref(), Some(text));
    }
    let e = q.err(
        "blockdev-create",
        json!({"job-id": "x", "options": {"driver": "raw", "file": "f", "size": 0}}),
    );
    assert_eq!(e, "Driver 'raw' does not support blockdev-create");
}

#[test]
fn write_read_and_allocation_for_every_cluster_size() {
    for bits in [9u32, 12, 16, 21] {
        let cs = 1u64 << bits;
        let mut q = Qmp::new();
        image(&mut q, "f", 8 * MIB, json!({"cluster-size": cs}));
        open(&mut q, "q", json!({"file": "f"}));
        assert!(
            q.io("q", "write -P 0x5a 1000 5000")
                .starts_with("wrote 5000/5000")
        );
        assert!(
            q.io("q", "read -P 0x5a 1000 5000")
                .starts_with("read 5000/5000")
        );
        assert!(q.io("q", "read -P 0 0 1000").starts_with("read 1000/1000"));
        assert!(
            q.io("q", "read -P 0 6000 4000")
                .starts_with("read 4000/4000")
        );
        let map = q.io("q", "map");
        assert!(map.contains("allocated at offset 0 bytes"), "{bits}: {map}");
        assert!(check(&q, "q").leaks.is_empty());
        q.ok("blockdev-del", json!({"node-name": "q"}));
        open(&mut q, "q", json!({"file": "f"}));
        assert!(check(&q, "q").is_clean(), "{bits}: {:?}", check(&q, "q"));
        assert!(
            q.io("q", "read -P 0x5a 1000 5000")
                .starts_with("read 5000/5000")
        );
    }
}

#[test]
fn refcount_widths_from_1_to_64_bits() {
    for rb in [1u32, 2, 4, 8, 16, 32, 64] {
        let mut q = Qmp::new();
        image(
            &mut q,
            "f",
            4 * MIB,
            json!({"cluster-size": 512, "refcount-bits": rb}),
        );
        open(&mut q, "q", json!({"file": "f"}));
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + rb) as u8).collect();
        write(&q, "q", 777, data.clone());
        assert_eq!(read(&q, "q", 777, data.len()), data, "refcount-bits {rb}");
        q.ok("blockdev-del", json!({"node-name": "q"}));
        open(&mut q, "q", json!({"file": "f"}));
        assert!(check(&q, "q").is_clean(), "{rb}: {:?}", check(&q, "q"));
    }
}

#[test]
fn refcount_table_grows_beyond_its_first_cluster() {
    // 512-byte clusters: one refcount table cluster covers 8 MiB.
    let mut q = Qmp::new();
    image(&mut q, "f", 24 * MIB, json!({"cluster-size": 512}));
    open(&mut q, "q", json!({"file": "f"}));
    for i in 0..12u64 {
        write(&q, "q", i * MIB, vec![i as u8 + 1; MIB as usize]);
    }
    let b = file_bytes(&q, "f");
    q.ok("blockdev-del", json!({"node-name": "q"}));
    let b2 = file_bytes(&q, "f");
    assert!(be32(&b2, 56) > 1, "the refcount table grew");
    assert_ne!(be64(&b2, 48), 512, "and moved");
    drop(b);
    open(&mut q, "q", json!({"file": "f"}));
    assert!(check(&q, "q").is_clean(), "{:?}", check(&q, "q"));
    for i in 0..12u64 {
        assert_eq!(read(&q, "q", i * MIB + 4096, 512), vec![i as u8 + 1; 512]);
    }
}

#[test]
fn zero_writes_and_discard_set_zero_flags_and_free_clusters() {
    let mut q = Qmp::new();
    image(&mut q, "f", 4 * MIB, json!({}));
    open(&mut q, "q", json!({"file": "f"}));
    q.io("q", "write -P 0x11 0 256k");
    assert!(q.io("q", "write -z 64k 64k").starts_with("wrote"));
    assert!(q.io("q", "read -P 0 64k 64k").starts_with("read"));
    assert!(q.io("q", "read -P 0x11 128k 128k").starts_with("read"));
    // Partial zero write: explicit zeroes inside the cluster.
    q.io("q", "write -z 130k 2k");
    assert!(q.io("q", "read -P 0 130k 2k").starts_with("read"));
    assert!(q.io("q", "read -P 0x11 132k 4k").starts_with("read"));
    // Unmap and discard free the host clusters.
    q.io("q", "write -z -u 128k 64k");
    q.io("q", "discard 192k 64k");
    assert!(q.io("q", "read -P 0 64k 192k").starts_with("read"));
    let n = node(&q, "q");
    let st = q.bl.wait(async move { n.flush().await }).unwrap();
    assert_eq!(st, Ok(()));
    let r = check(&q, "q");
    assert!(r.is_clean(), "{r:?}");
    // Block status from the L2 table.
    let n = node(&q, "q");
    let s =
        q.bl.wait(async move { n.block_status(0, 4 * MIB).await })
            .unwrap()
            .unwrap();
    assert!(s.data && s.allocated && s.len == 64 << 10);
    let n = node(&q, "q");
    let s =
        q.bl.wait(async move { n.block_status(64 << 10, 4 * MIB).await })
            .unwrap()
            .unwrap();
    assert!(s.zero && !s.data && s.allocated, "{s:?}");
    assert_eq!(
        s.len,
        192 << 10,
        "zero, zero-unmapped and discarded clusters"
    );
    let n = node(&q, "q");
    let s =
        q.bl.wait(async move { n.block_status(MIB, 3 * MIB).await })
            .unwrap()
            .unwrap();
    assert!(!s.allocated && s.zero && s.len == 3 * MIB, "{s:?}");
    // The freed clusters are reused.
    let used = file_bytes(&q, "f").len();
    q.io("q", "write -P 0x22 1M 128k");
    assert_eq!(file_bytes(&q, "f").len(), used);
    q.ok("blockdev-del", json!({"node-name": "q"}));
    open(&mut q, "q", json!({"file": "f"}));
    assert!(check(&q, "q").is_clean());
}

#[test]
fn discard_no_unref_keeps_the_host_cluster() {
    let mut q = Qmp::new();
    image(&mut q, "f", 4 * MIB, json!({}));
    open(&mut q, "q", json!({"file": "f", "discard-no-unref": true}));
    q.io("q", "write -P 0x11 0 128k");
    let before = file_bytes(&q, "f");
    q.io("q", "discard 0 64k");
    assert!(q.io("q", "read -P 0 0 64k").starts_with("read"));
    q.ok("blockdev-del", json!({"node-name": "q"}));
    let after = file_bytes(&q, "f");
    let l2 = be64(&after, 0x30000) & 0x00ff_ffff_ffff_fe00;
    let e = be64(&after, l2 as usize);
    assert_eq!(e & 1, 1, "zero flag");
    assert_ne!(e & 0x00ff_ffff_ffff_fe00, 0, "host cluster kept");
    drop(before);
    open(&mut q, "q", json!({"file": "f"}));
    assert!(check(&q, "q").is_clean());
}

#[test]
fn backing_chain_cow_and_header_backing_name() {
    let mut q = Qmp::new();
    image(&mut q, "f0", 4 * MIB, json!({}));
    image(
        &mut q,
        "f1",
        4 * MIB,
        json!({"backing-file": "base", "backing-fmt": "qcow2"}),
    );
    open(&mut q, "base", json!({"file": "f0"}));
    q.io("base", "write -P 0x33 0 1M");
    q.ok("blockdev-del", json!({"node-name": "base"}));
    open(&mut q, "base", json!({"file": "f0", "read-only": true}));
    // No `backing` option: the header's name "base" is a node-name.
    open(&mut q, "top", json!({"file": "f1"}));
    assert!(q.io("top", "read -P 0x33 0 1M").starts_with("read"));
    q.io("top", "write -P 0x44 1000 100");
    assert!(q.io("top", "read -P 0x33 0 1000").starts_with("read"));
    assert!(q.io("top", "read -P 0x44 1000 100").starts_with("read"));
    assert!(q.io("top", "read -P 0x33 1100 64436").starts_with("read"));
    assert!(q.io("top", "read -P 0 1M 1M").starts_with("read"));
    // Unallocated extents report the backing file's status.
    let n = node(&q, "top");
    let s =
        q.bl.wait(async move { n.block_status(64 << 10, 4 * MIB).await })
            .unwrap()
            .unwrap();
    assert!(!s.allocated && s.data, "{s:?}");
    // A zero write hides the backing file.
    q.io("top", "write -z 64k 64k");
    assert!(q.io("top", "read -P 0 64k 64k").starts_with("read"));
    assert!(check(&q, "top").leaks.is_empty());
    // Without such a node the open fails and says why.
    q.ok("blockdev-del", json!({"node-name": "top"}));
    q.ok("blockdev-del", json!({"node-name": "base"}));
    let e = q.err(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "top", "file": "f1"}),
    );
    assert!(
        e.contains("qcow2 node 'top': Could not open backing file 'base'"),
        "{e}"
    );
    assert!(!q.node_names().contains(&String::from("top")));
    // `backing: null` opens the overlay alone.
    open(&mut q, "top", json!({"file": "f1", "backing": null}));
    assert!(
        q.io("top", "read -P 0x33 0 1000").starts_with("read"),
        "copied on write"
    );
    assert!(q.io("top", "read -P 0 128k 64k").starts_with("read"));
    // Zeroes written there, whole clusters and a partial one, still hide
    // the backing file once the chain is opened again (a backup into an
    // overlay opened this way; QEMU always sets the zero flag).
    q.io("top", "write -z 1M 128k");
    q.io("top", "write -z 2M 1000");
    q.ok("blockdev-del", json!({"node-name": "top"}));
    open(&mut q, "base", json!({"file": "f0"}));
    q.io("base", "write -P 0x55 1M 2M");
    q.ok("blockdev-del", json!({"node-name": "base"}));
    open(&mut q, "base", json!({"file": "f0", "read-only": true}));
    open(&mut q, "top", json!({"file": "f1"}));
    assert!(q.io("top", "read -P 0 1M 128k").starts_with("read"));
    assert!(q.io("top", "read -P 0 2M 1000").starts_with("read"));
    assert!(q.io("top", "read -P 0x55 2162688 1000").starts_with("read"));
}

#[test]
fn extended_l2_subclusters() {
    let mut q = Qmp::new();
    image(&mut q, "f0", 4 * MIB, json!({}));
    image(&mut q, "f1", 4 * MIB, json!({"extended-l2": true}));
    open(&mut q, "base", json!({"file": "f0"}));
    q.io("base", "write -P 0x55 0 1M");
    q.ok("blockdev-del", json!({"node-name": "base"}));
    open(&mut q, "base", json!({"file": "f0", "read-only": true}));
    open(&mut q, "top", json!({"file": "f1", "backing": "base"}));
    // 64 KiB clusters: 2 KiB subclusters. A 1 KiB write allocates one.
    q.io("top", "write -P 0x66 4096 1024");
    assert!(q.io("top", "read -P 0x55 0 4096").starts_with("read"));
    assert!(q.io("top", "read -P 0x66 4096 1024").starts_with("read"));
    assert!(q.io("top", "read -P 0x55 5120 60k").starts_with("read"));
    let map = q.io("top", "map");
    assert!(
        map.starts_with("4 KiB (0x1000) bytes not allocated at offset 0 bytes (0x0)\r\n2 KiB (0x800) bytes     allocated at offset 4 KiB (0x1000)"),
        "{map}"
    );
    // Zero subclusters.
    q.io("top", "write -z 8k 4k");
    assert!(q.io("top", "read -P 0 8k 4k").starts_with("read"));
    assert!(q.io("top", "read -P 0x55 12k 4k").starts_with("read"));
    q.io("top", "write -P 0x77 9k 1k");
    assert!(q.io("top", "read -P 0 8k 1k").starts_with("read"));
    assert!(q.io("top", "read -P 0x77 9k 1k").starts_with("read"));
    q.ok("blockdev-del", json!({"node-name": "top"}));
    let b = file_bytes(&q, "f1");
    assert_eq!(be64(&b, 72) & 16, 16, "extended L2 incompatible bit");
    open(&mut q, "top", json!({"file": "f1", "backing": "base"}));
    assert!(check(&q, "top").is_clean(), "{:?}", check(&q, "top"));
    assert!(q.io("top", "read -P 0x66 4096 1024").starts_with("read"));
    assert!(q.io("top", "read -P 0x77 9k 1k").starts_with("read"));
}

#[test]
fn flush_writes_refcounts_before_l2_and_frees_after() {
    let mut q = Qmp::new();
    image(&mut q, "f", 4 * MIB, json!({}));
    open(&mut q, "q", json!({"file": "f"}));
    // The first write allocates the L2 table (written through at once).
    q.io("q", "write -P 0x11 0 64k");
    q.io("q", "flush");
    let before = file_bytes(&q, "f");
    let l2 = (be64(&before, 0x30000) & 0x00ff_ffff_ffff_fe00) as usize;
    q.io("q", "write -P 0x12 64k 64k");
    let mid = file_bytes(&q, "f");
    assert!(
        before[..0x30000] == mid[..0x30000],
        "refcounts wait in the cache"
    );
    assert!(
        before[l2..l2 + 0x10000] == mid[l2..l2 + 0x10000],
        "so does the L2 entry"
    );
    q.io("q", "flush");
    let after = file_bytes(&q, "f");
    assert!(
        before[0x20000..0x30000] != after[0x20000..0x30000],
        "refcounts written"
    );
    assert_ne!(be64(&after, l2 + 8), 0, "L2 entry written");
    // A discard frees its cluster only at the next flush, after the L2
    // table no longer points to it.
    q.io("q", "discard 0 64k");
    let freed = file_bytes(&q, "f");
    assert!(after[0x20000..0x30000] == freed[0x20000..0x30000]);
    q.io("q", "flush");
    let done = file_bytes(&q, "f");
    assert_eq!(be64(&done, l2) & 1, 1, "zero flag");
    assert!(
        freed[0x20000..0x30000] != done[0x20000..0x30000],
        "refcount dropped"
    );
    assert!(check(&q, "q").is_clean());
    q.ok("blockdev-del", json!({"node-name": "q"}));
}

#[test]
fn compressed_clusters_inflate() {
    // A stored (uncompressed) deflate block and a fixed-Huffman block,
    // made with zlib (wbits -12): "hello hello hello!" repeated.
    let stored = [1u8, 5, 0, 0xfa, 0xff, b'a', b'b', b'c', b'd', b'e'];
    let mut out = [0u8; 5];
    crate::drivers::qcow2::inflate::inflate(&stored, &mut out).unwrap();
    assert_eq!(&out, b"abcde");
    let fixed = [203u8, 72, 205, 201, 201, 87, 200, 64, 144, 138, 0];
    let mut out = [0u8; 18];
    crate::drivers::qcow2::inflate::inflate(&fixed, &mut out).unwrap();
    assert_eq!(&out, b"hello hello hello!");
    let mut big = [0u8; 19];
    assert!(crate::drivers::qcow2::inflate::inflate(&fixed, &mut big).is_err());
    assert!(crate::drivers::qcow2::inflate::inflate(&[0xff; 8], &mut out).is_err());
    // A dynamic-Huffman block.
    let dynamic = [
        5u8, 193, 9, 14, 0, 16, 12, 4, 192, 183, 174, 58, 86, 66, 85, 74, 125, 223, 12, 88, 61, 44,
        65, 93, 31, 214, 217, 185, 220, 140, 185, 104, 42, 13, 189, 135, 4, 249, 10, 198, 7,
    ];
    let want: Vec<u8> = (0..40u32)
        .map(|i| ((i * i * 7 + i / 3) % 23 + 97) as u8)
        .collect();
    let mut out = [0u8; 40];
    crate::drivers::qcow2::inflate::inflate(&dynamic, &mut out).unwrap();
    assert!(out[..] == want[..]);
}

fn corrupt_and_open(mutate: impl Fn(&mut Vec<u8>), read_only: bool) -> String {
    let mut q = Qmp::new();
    image(&mut q, "f", 4 * MIB, json!({}));
    open(&mut q, "q", json!({"file": "f"}));
    q.io("q", "write -P 0x11 0 64k");
    q.ok("blockdev-del", json!({"node-name": "q"}));
    {
        let f = node(&q, "f");
        let m = Env::mem_driver(&f);
        mutate(&mut m.data.borrow_mut());
    }
    let before = file_bytes(&q, "f");
    let r = q.cmd(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "bad", "file": "f", "read-only": read_only}),
    );
    let text = match r {
        Err(e) => e.desc,
        Ok(_) => {
            // Opened: reads must fail cleanly, writes too, nothing written.
            let out = q.io("bad", "read 0 64k");
            let w = q.io("bad", "write 0 64k");
            format!("opened; read: {out} write: {w}")
        }
    };
    assert_eq!(
        before,
        file_bytes(&q, "f"),
        "nothing written to a bad image"
    );
    text
}

#[test]
fn bad_images_give_clear_errors_and_are_never_written() {
    let set32 =
        |at: usize, v: u32| move |b: &mut Vec<u8>| b[at..at + 4].copy_from_slice(&v.to_be_bytes());
    let set64 =
        |at: usize, v: u64| move |b: &mut Vec<u8>| b[at..at + 8].copy_from_slice(&v.to_be_bytes());
    type Mutation = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(Mutation, &str)> = vec![
        (
            Box::new(set32(0, 0)),
            "qcow2 node 'bad': Image is not in qcow2 format",
        ),
        (Box::new(set32(4, 4)), "Unsupported qcow2 version 4"),
        (Box::new(set32(20, 22)), "Unsupported cluster size: 2^22"),
        (
            Box::new(set64(72, 1 << 20)),
            "Unsupported qcow2 feature(s): Unknown incompatible feature: 100000",
        ),
        (
            Box::new(set64(72, 2)),
            "qcow2: Image is corrupt; cannot be opened read/write",
        ),
        (Box::new(set64(72, 4)), "external data file"),
        (Box::new(set32(32, 2)), "Encrypted qcow2 images"),
        (Box::new(set32(36, 0x100_0000)), "Active L1 table too large"),
        (Box::new(set32(36, 0)), "L1 table is too small"),
        (
            Box::new(set64(40, 0)),
            "Active L1 table offset invalid: it overlaps the image header",
        ),
        (
            Box::new(set64(40, 0x7000_0000)),
            "Active L1 table offset invalid: the table ends past the end",
        ),
        (
            Box::new(set64(40, 0x30001)),
            "Active L1 table offset invalid",
        ),
        (
            Box::new(set32(56, 0)),
            "Image does not contain a reference count table",
        ),
        (
            Box::new(set64(48, 0x7000_0000)),
            "Reference count table offset invalid",
        ),
        (
            Box::new(set32(96, 7)),
            "Reference count entry width too large",
        ),
        (Box::new(set32(100, 100)), "qcow2 header too short"),
    ];
    for (m, text) in cases {
        let e = corrupt_and_open(m, false);
        assert!(e.contains(text), "{e} !~ {text}");
    }
    // A named unknown feature from the image's feature table.
    let e = corrupt_and_open(
        |b| {
            b[72..80].copy_from_slice(&(1u64 << 7).to_be_bytes());
            // Rename the table's entry for bit 4 to bit 7.
            let at = b
                .windows(19)
                .position(|w| w == b"extended L2 entries")
                .unwrap();
            b[at - 1] = 7;
            b[at..at + 19].copy_from_slice(b"shiny new feature!!");
        },
        false,
    );
    assert!(
        e.contains("Unsupported qcow2 feature(s): shiny new feature!!"),
        "{e}"
    );
    // L2 table pointing into the header / past the end: read errors.
    for l2 in [0x200u64, 0x7000_0000] {
        let e = corrupt_and_open(
            move |b| b[0x30000..0x30008].copy_from_slice(&(l2 | 1 << 63).to_be_bytes()),
            false,
        );
        assert!(e.contains("read failed: Input/output error"), "{e}");
        assert!(e.contains("write failed: Input/output error"), "{e}");
    }
    // A dirty image opens read-only.
    let e = corrupt_and_open(|b| b[72..80].copy_from_slice(&1u64.to_be_bytes()), true);
    assert!(e.starts_with("opened; read: read 65536/65536"), "{e}");
    // A corrupt image opens read-only.
    let e = corrupt_and_open(|b| b[72..80].copy_from_slice(&2u64.to_be_bytes()), true);
    assert!(e.starts_with("opened; read: read 65536/65536"), "{e}");
    // A truncated file.
    let e = corrupt_and_open(|b| b.truncate(0x30000), false);
    assert!(e.contains("Active L1 table offset invalid"), "{e}");
    let e = corrupt_and_open(|b| b.truncate(40), false);
    assert!(e.contains("Image is not in qcow2 format"), "{e}");
}

#[test]
fn refcount_underflow_marks_the_image_corrupt() {
    // 1-bit refcounts; the data cluster's refcount is cleared behind the
    // driver's back, then the cluster is discarded: freeing it would take
    // the refcount below zero.
    let mut q = Qmp::new();
    image(
        &mut q,
        "f",
        4 * MIB,
        json!({"cluster-size": 512, "refcount-bits": 1}),
    );
    open(&mut q, "q", json!({"file": "f"}));
    q.io("q", "write -P 0x11 0 512");
    q.ok("blockdev-del", json!({"node-name": "q"}));
    {
        let f = node(&q, "f");
        let m = Env::mem_driver(&f);
        let mut b = m.data.borrow_mut();
        let mask = 0x00ff_ffff_ffff_fe00u64;
        let l1 = be64(&b, 40) as usize;
        let l2 = (be64(&b, l1) & mask) as usize;
        let data = be64(&b, l2) & mask;
        let rb = (be64(&b, be64(&b, 48) as usize) & mask) as usize;
        let c = (data / 512) as usize;
        b[rb + c / 8] &= !(1 << (c % 8));
    }
    open(&mut q, "q", json!({"file": "f"}));
    assert!(!check(&q, "q").corruptions.is_empty());
    q.io("q", "discard 0 512");
    let out = q.io("q", "flush");
    assert!(out.contains("Input/output error"), "{out}");
    let before = file_bytes(&q, "f");
    let out = q.io("q", "write -P 0x22 4096 512");
    assert!(out.contains("Input/output error"), "{out}");
    assert_eq!(before, file_bytes(&q, "f"), "no write after corruption");
}

#[test]
fn backing_loops_are_refused() {
    let mut q = Qmp::new();
    image(&mut q, "f0", MIB, json!({"backing-file": "a"}));
    // The image names itself as its backing file.
    let e = q.err(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "a", "file": "f0"}),
    );
    assert!(e.contains("would create a cycle"), "{e}");
    image(&mut q, "f1", MIB, json!({}));
    open(&mut q, "b", json!({"file": "f1", "backing": null}));
    let e = q.err("blockdev-snapshot", json!({"node": "b", "overlay": "b"}));
    assert!(e.contains("would create a cycle"), "{e}");
}

#[test]
fn blockdev_snapshot_makes_an_overlay() {
    let mut q = Qmp::new();
    image(&mut q, "f0", 4 * MIB, json!({}));
    image(&mut q, "f1", 4 * MIB, json!({"backing-file": "base"}));
    open(&mut q, "base", json!({"file": "f0"}));
    q.io("base", "write -P 0x12 0 128k");
    open(&mut q, "ovl", json!({"file": "f1", "backing": null}));
    q.ok(
        "blockdev-snapshot",
        json!({"node": "base", "overlay": "ovl"}),
    );
    assert!(q.io("ovl", "read -P 0x12 0 128k").starts_with("read"));
    q.io("ovl", "write -P 0x13 0 4k");
    assert!(q.io("base", "read -P 0x12 0 4k").starts_with("read"));
    let e = q.err(
        "blockdev-snapshot",
        json!({"node": "base", "overlay": "ovl"}),
    );
    assert!(e.contains("already has a backing image"), "{e}");
}

/// xorshift64*: reproducible randomness.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn model_run(seed: u64, cs: u64, extra: Value) {
    let size = 2 * MIB;
    let unit = if extra["extended-l2"] == json!(true) {
        cs / 32
    } else {
        cs
    };
    let mut q = Qmp::new();
    let mut model = vec![0u8; size as usize];
    let mut rng = Rng(seed);
    let names = ["l0", "l1", "l2"];
    for (layer, name) in names.iter().enumerate() {
        let file = format!("f{layer}");
        image(&mut q, &file, size, extra.clone());
        let backing = if layer == 0 {
            Value::Null
        } else {
            json!(names[layer - 1])
        };
        if layer > 0 {
            // The layer below becomes read-only backing.
            let below = names[layer - 1];
            let below_file = format!("f{}", layer - 1);
            let below_backing = if layer == 1 {
                Value::Null
            } else {
                json!(names[layer - 2])
            };
            q.ok("blockdev-del", json!({"node-name": below}));
            open(
                &mut q,
                below,
                json!({"file": below_file, "read-only": true, "backing": below_backing}),
            );
        }
        open(&mut q, name, json!({"file": file, "backing": backing}));
        for step in 0..150 {
            let max_len = 3 * cs + 1000;
            let off = rng.below(size - 1);
            let len = 1 + rng.below(core::cmp::min(max_len, size - off));
            let n = node(&q, name);
            match rng.below(10) {
                0..=5 => {
                    let byte = (rng.next() as u8) | 1;
                    let data: Vec<u8> = (0..len).map(|i| byte.wrapping_add(i as u8)).collect();
                    model[off as usize..(off + len) as usize].copy_from_slice(&data);
                    write(&q, name, off, data);
                }
                6 | 7 => {
                    let flags = if rng.below(2) == 0 {
                        ReqFlags::MAY_UNMAP
                    } else {
                        ReqFlags::NONE
                    };
                    model[off as usize..(off + len) as usize].fill(0);
                    let r =
                        q.bl.wait(async move { n.write_zeroes(off, len, flags).await })
                            .unwrap();
                    assert_eq!(r, Ok(()), "seed {seed} step {step}");
                }
                8 if extra["version"] == json!("v2") && layer > 0 => {
                    // v2 discards let the backing file show through.
                }
                8 => {
                    let a = off.div_ceil(unit) * unit;
                    let b = (off + len) / unit * unit;
                    if a < b {
                        model[a as usize..b as usize].fill(0);
                    }
                    let r = q.bl.wait(async move { n.discard(off, len).await }).unwrap();
                    assert_eq!(r, Ok(()), "seed {seed} step {step}");
                }
                _ => {
                    let r = q.bl.wait(async move { n.flush().await }).unwrap();
                    assert_eq!(r, Ok(()));
                }
            }
            let got = read(
                &q,
                name,
                off.saturating_sub(cs),
                (len + 2 * cs).min(size - off.saturating_sub(cs)) as usize,
            );
            let s = off.saturating_sub(cs) as usize;
            assert!(
                got == model[s..s + got.len()],
                "seed {seed} layer {layer} step {step}: read differs from the model"
            );
        }
        assert_eq!(
            read(&q, name, 0, size as usize),
            model,
            "seed {seed} layer {layer}"
        );
        let r = check(&q, name);
        assert!(r.corruptions.is_empty(), "seed {seed} layer {layer}: {r:?}");
    }
    // Close everything, reopen the chain, compare, check.
    q.ok("blockdev-del", json!({"node-name": "l2"}));
    q.ok("blockdev-del", json!({"node-name": "l1"}));
    q.ok("blockdev-del", json!({"node-name": "l0"}));
    open(
        &mut q,
        "l0",
        json!({"file": "f0", "read-only": true, "backing": null}),
    );
    open(
        &mut q,
        "l1",
        json!({"file": "f1", "read-only": true, "backing": "l0"}),
    );
    open(&mut q, "l2", json!({"file": "f2", "backing": "l1"}));
    assert_eq!(
        read(&q, "l2", 0, size as usize),
        model,
        "seed {seed} after reopen"
    );
    for name in names {
        let r = check(&q, name);
        assert!(r.is_clean(), "seed {seed} {name}: {r:?}");
    }
}

#[test]
fn model_chain_of_three_64k() {
    for seed in [1u64, 2, 3] {
        model_run(seed, 65536, json!({}));
    }
}

#[test]
fn model_chain_of_three_512() {
    for seed in [11u64, 12] {
        model_run(seed, 512, json!({"cluster-size": 512}));
    }
}

#[test]
fn model_chain_of_three_v2_4k() {
    model_run(21, 4096, json!({"cluster-size": 4096, "version": "v2"}));
}

#[test]
fn model_chain_of_three_extended_l2() {
    for seed in [31u64, 32] {
        model_run(seed, 65536, json!({"extended-l2": true}));
    }
    model_run(
        33,
        16384,
        json!({"extended-l2": true, "cluster-size": 16384}),
    );
}

#[test]
fn boot_option_opens_qcow2_over_a_node() {
    let mut q = Qmp::new();
    image(&mut q, "f", 4 * MIB, json!({"backing-file": "nothing"}));
    q.bl.apply_boot_option("blockdev", "qcow2,node-name=q,file=f,backing=")
        .unwrap();
    assert!(q.io("q", "read -P 0 0 64k").starts_with("read"));
    q.ok("blockdev-del", json!({"node-name": "q"}));
    let e =
        q.bl.apply_boot_option("blockdev", "qcow2,node-name=r,file=f")
            .unwrap_err();
    let e = alloc::format!("{e:?}");
    assert!(e.contains("Could not open backing file 'nothing'"), "{e}");
}

/// A memory file whose reads wait at a gate while `armed`.
struct SlowReads {
    data: Rc<core::cell::RefCell<Vec<u8>>>,
    gate: Rc<super::mem::Gate>,
    armed: Rc<core::cell::Cell<bool>>,
}

impl crate::driver::BlockDriver for SlowReads {
    fn format_name(&self) -> &str {
        "slowreads"
    }
    fn get_length(&self, _: &Node) -> crate::io::IoResult<u64> {
        Ok(self.data.borrow().len() as u64)
    }
    fn read<'a>(
        &'a self,
        _: &'a Node,
        offset: u64,
        len: usize,
        _: ReqFlags,
    ) -> crate::io::BoxFuture<'a, crate::io::IoResult<Vec<u8>>> {
        Box::pin(async move {
            if self.armed.get() {
                self.gate.pass().await;
            }
            let o = offset as usize;
            Ok(self.data.borrow()[o..o + len].to_vec())
        })
    }
    fn write<'a>(
        &'a self,
        _: &'a Node,
        offset: u64,
        data: Vec<u8>,
        _: ReqFlags,
    ) -> crate::io::BoxFuture<'a, crate::io::IoResult<()>> {
        let o = offset as usize;
        self.data.borrow_mut()[o..o + data.len()].copy_from_slice(&data);
        crate::driver::ready(Ok(()))
    }
}

#[test]
fn a_freed_cluster_is_not_reused_while_a_read_of_it_is_in_flight() {
    let mut q = Qmp::new();
    let data = Rc::new(core::cell::RefCell::new(vec![0u8; 16 << 20]));
    let gate = super::mem::Gate::closed();
    let armed = Rc::new(core::cell::Cell::new(false));
    let (d2, g2, a2) = (data.clone(), gate.clone(), armed.clone());
    q.bl.register_driver(crate::open::DriverClass::new("slowreads", move |_| {
        let (data, gate, armed) = (d2.clone(), g2.clone(), a2.clone());
        Ok(Box::new(move |_| {
            Ok(Box::new(SlowReads { data, gate, armed }) as Box<dyn crate::driver::BlockDriver>)
        }))
    }));
    q.ok(
        "blockdev-add",
        json!({"driver": "slowreads", "node-name": "f"}),
    );
    assert_eq!(
        create(
            &mut q,
            json!({"driver": "qcow2", "file": "f", "size": 4 * MIB})
        ),
        None
    );
    open(&mut q, "q", json!({"file": "f"}));
    q.io("q", "write -P 0x11 0 64k");
    q.io("q", "flush");
    armed.set(true);
    let exec = q.bl.executor().clone();
    let n = node(&q, "q");
    let reader = exec.spawn(async move { n.read(0, 65536, ReqFlags::NONE).await });
    q.settle();
    assert!(
        !reader.is_finished() && gate.waiting() == 1,
        "the read waits at the file"
    );
    let n = node(&q, "q");
    let writer = exec.spawn(async move {
        n.discard(0, 65536).await?;
        n.flush().await?;
        n.write(MIB, vec![0x22; 65536], ReqFlags::NONE).await
    });
    q.settle();
    assert!(!writer.is_finished(), "the free waits for the read");
    gate.open();
    q.settle();
    assert_eq!(reader.try_take(), Some(Ok(vec![0x11; 65536])));
    assert_eq!(writer.try_take(), Some(Ok(())));
    armed.set(false);
    assert!(q.io("q", "read -P 0 0 64k").starts_with("read"));
    assert!(q.io("q", "read -P 0x22 1M 64k").starts_with("read"));
    assert!(check(&q, "q").is_clean());
}

#[test]
fn random_metadata_corruption_never_panics_or_hangs() {
    fuzz_run(json!({"cluster-size": 4096}), 2024, 200, 64 << 10);
    fuzz_run(
        json!({"cluster-size": 16384, "extended-l2": true}),
        2025,
        100,
        128 << 10,
    );
}

fn fuzz_run(create: Value, seed: u64, iterations: u32, span: u64) {
    let size = 4 * MIB;
    let mut q = Qmp::new();
    image(&mut q, "f", size, create);
    open(&mut q, "q", json!({"file": "f"}));
    q.io("q", "write -P 0x11 0 100k");
    q.io("q", "write -P 0x22 2M 8k");
    q.io("q", "write -z 1M 64k");
    q.io("q", "write -P 0x23 1040k 3k");
    q.ok("blockdev-del", json!({"node-name": "q"}));
    let mut good = file_bytes(&q, "f");
    good.truncate(8 << 20);
    let mut rng = Rng(seed);
    for iter in 0..iterations {
        let mut q = Qmp::new();
        mem(&mut q, "f", good.len() as u64);
        {
            let f = node(&q, "f");
            let m = Env::mem_driver(&f);
            let mut d = m.data.borrow_mut();
            d.copy_from_slice(&good);
            if iter % 3 == 1 {
                // Dirty: the open rebuilds refcounts from the damaged tables.
                d[79] |= 1;
            }
            for _ in 0..1 + rng.below(8) {
                let at = rng.below(span) as usize;
                d[at] = match rng.below(3) {
                    0 => rng.next() as u8,
                    1 => 0xff,
                    _ => 0,
                };
            }
        }
        let read_only = iter % 4 == 0;
        let r = q.cmd(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "q", "file": "f", "discard": "unmap",
                   "read-only": read_only}),
        );
        if r.is_err() {
            continue;
        }
        let _ = q.io("q", "read 0 1M");
        let _ = q.io("q", "read 2M 64k");
        if !read_only {
            let off = rng.below(size - 70_000);
            let _ = q.io("q", &format!("write -P 0x33 {off} 70000"));
            let _ = q.io("q", &format!("write -z {} 9000", rng.below(size - 9000)));
            let _ = q.io("q", &format!("discard {} 65536", rng.below(size - 65536)));
            let _ = q.io("q", "flush");
            let _ = q.io("q", "write -P 0x44 3M 4k");
        }
        let _ = q.cmd("blockdev-del", json!({"node-name": "q"}));
    }
}

#[test]
fn zeroing_an_empty_terabyte_allocates_nothing() {
    let mut q = Qmp::new();
    image(&mut q, "f", 1 << 40, json!({}));
    open(&mut q, "q", json!({"file": "f"}));
    let before = file_bytes(&q, "f");
    let n = node(&q, "q");
    let r = q.bl.wait(async move {
        n.write_zeroes(0, 1 << 40, ReqFlags::MAY_UNMAP).await?;
        n.discard(0, 1 << 40).await
    });
    assert_eq!(r.unwrap(), Ok(()));
    q.io("q", "flush");
    assert!(before == file_bytes(&q, "f"), "no metadata was needed");
    assert!(q.io("q", "write -P 0x7 512G 4k").starts_with("wrote"));
    assert!(q.io("q", "read -P 0x7 512G 4k").starts_with("read"));
    assert!(check(&q, "q").is_clean());
}

/// A memory file whose every request yields to other tasks a few times
/// before it completes, so that concurrent requests interleave.
struct Yielding {
    data: Rc<core::cell::RefCell<Vec<u8>>>,
    tick: core::cell::Cell<u64>,
}

impl Yielding {
    async fn pause(&self) {
        let t = self
            .tick
            .get()
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.tick.set(t);
        for _ in 0..(t >> 61) {
            crate::exec::yield_now().await;
        }
    }
}

impl crate::driver::BlockDriver for Yielding {
    fn format_name(&self) -> &str {
        "yielding"
    }
    fn get_length(&self, _: &Node) -> crate::io::IoResult<u64> {
        Ok(self.data.borrow().len() as u64)
    }
    fn read<'a>(
        &'a self,
        _: &'a Node,
        offset: u64,
        len: usize,
        _: ReqFlags,
    ) -> crate::io::BoxFuture<'a, crate::io::IoResult<Vec<u8>>> {
        Box::pin(async move {
            self.pause().await;
            let o = offset as usize;
            Ok(self.data.borrow()[o..o + len].to_vec())
        })
    }
    fn write<'a>(
        &'a self,
        _: &'a Node,
        offset: u64,
        data: Vec<u8>,
        _: ReqFlags,
    ) -> crate::io::BoxFuture<'a, crate::io::IoResult<()>> {
        Box::pin(async move {
            self.pause().await;
            let o = offset as usize;
            self.data.borrow_mut()[o..o + data.len()].copy_from_slice(&data);
            Ok(())
        })
    }
    fn flush<'a>(&'a self, _: &'a Node) -> crate::io::BoxFuture<'a, crate::io::IoResult<()>> {
        Box::pin(async move {
            self.pause().await;
            Ok(())
        })
    }
}

#[test]
fn concurrent_requests_on_shared_clusters_match_the_model() {
    concurrent_run(4096, false);
    concurrent_run(16384, true);
}

fn concurrent_run(cs: u64, ext: bool) {
    const TASKS: u64 = 4;
    const SIZE: u64 = 2 * MIB;
    #[allow(non_snake_case)]
    let CS = cs;
    let sectors = CS / 512;
    let mut q = Qmp::new();
    let data = Rc::new(core::cell::RefCell::new(vec![0u8; 16 << 20]));
    let d2 = data.clone();
    q.bl.register_driver(crate::open::DriverClass::new("yielding", move |_| {
        let data = d2.clone();
        Ok(Box::new(move |_| {
            Ok(Box::new(Yielding {
                data,
                tick: core::cell::Cell::new(1),
            }) as Box<dyn crate::driver::BlockDriver>)
        }))
    }));
    q.ok(
        "blockdev-add",
        json!({"driver": "yielding", "node-name": "f"}),
    );
    let o = json!({"driver": "qcow2", "file": "f", "size": SIZE, "cluster-size": CS, "extended-l2": ext});
    q.ok("blockdev-create", json!({"job-id": "c", "options": o}));
    let exec = q.bl.executor().clone();
    let r = q.bl.wait(async {
        for _ in 0..100 {
            crate::exec::yield_now().await;
        }
    });
    assert!(r.is_ok());
    q.ok("job-dismiss", json!({"id": "c"}));
    open(&mut q, "q", json!({"file": "f"}));
    // Even clusters are shared sector by sector (sector s belongs to task
    // s % TASKS), odd clusters belong whole to task (c / 2) % TASKS.
    let model = Rc::new(core::cell::RefCell::new(vec![0u8; SIZE as usize]));
    let mut handles = Vec::new();
    for t in 0..TASKS {
        let n = node(&q, "q");
        let model = model.clone();
        handles.push(exec.spawn(async move {
            let mut rng = Rng(1000 + t);
            for step in 0..1000 {
                let c = rng.below(SIZE / CS);
                let own_cluster = c % 2 == 1 && (c / 2) % TASKS == t;
                let op = rng.below(6);
                if c.is_multiple_of(2) {
                    // One owned sector of a shared cluster.
                    let s = c * sectors + t + TASKS * rng.below(sectors / TASKS);
                    let off = s * 512;
                    if op == 3 {
                        model.borrow_mut()[off as usize..off as usize + 512].fill(0);
                        n.write_zeroes(off, 512, ReqFlags::MAY_UNMAP).await?;
                    } else if op < 3 {
                        let b = (rng.next() as u8) | 1;
                        model.borrow_mut()[off as usize..off as usize + 512].fill(b);
                        n.write(off, vec![b; 512], ReqFlags::NONE).await?;
                    } else {
                        let got = n.read(off, 512, ReqFlags::NONE).await?;
                        let want = model.borrow()[off as usize..off as usize + 512].to_vec();
                        assert!(got == want, "task {t} step {step}: sector {s}");
                    }
                } else if own_cluster {
                    let off = c * CS;
                    match op {
                        0 | 1 => {
                            let b = (rng.next() as u8) | 1;
                            model.borrow_mut()[off as usize..(off + CS) as usize].fill(b);
                            n.write(off, vec![b; CS as usize], ReqFlags::NONE).await?;
                        }
                        2 => {
                            model.borrow_mut()[off as usize..(off + CS) as usize].fill(0);
                            n.write_zeroes(off, CS, ReqFlags::MAY_UNMAP).await?;
                        }
                        3 => {
                            model.borrow_mut()[off as usize..(off + CS) as usize].fill(0);
                            n.discard(off, CS).await?;
                        }
                        4 => n.flush().await?,
                        _ => {
                            let got = n.read(off, CS as usize, ReqFlags::NONE).await?;
                            let want = model.borrow()[off as usize..(off + CS) as usize].to_vec();
                            assert!(got == want, "task {t} step {step}: cluster {c}");
                        }
                    }
                }
            }
            Ok::<(), crate::io::IoError>(())
        }));
    }
    let r = q.bl.wait(async move {
        let mut out = Vec::new();
        for h in handles {
            out.push(h.await);
        }
        out
    });
    for x in r.unwrap() {
        assert_eq!(x, Ok(()));
    }
    let want = model.borrow().clone();
    assert!(want.iter().filter(|b| **b != 0).count() > (SIZE / 4) as usize);
    assert!(read(&q, "q", 0, SIZE as usize) == want);
    assert!(check(&q, "q").corruptions.is_empty());
    q.io("q", "flush");
    assert!(check(&q, "q").is_clean(), "{:?}", check(&q, "q"));
    q.ok("blockdev-del", json!({"node-name": "q"}));
    open(&mut q, "q", json!({"file": "f"}));
    assert!(read(&q, "q", 0, SIZE as usize) == want);
    assert!(check(&q, "q").is_clean());
}

#[test]
fn blockdev_snapshot_moves_the_users_to_the_overlay() {
    use crate::graph::backend::BackendOptions;
    use crate::graph::permission::Perm;
    let mut q = Qmp::new();
    image(&mut q, "f0", 4 * MIB, json!({}));
    image(&mut q, "f1", 4 * MIB, json!({"backing-file": "base"}));
    open(&mut q, "base", json!({"file": "f0"}));
    q.io("base", "write -P 0x12 0 128k");
    let reg = q.bl.registry().clone();
    let opts = BackendOptions {
        name: Some("drv".into()),
        ..Default::default()
    };
    let blk = reg
        .new_backend(opts, Perm::CONSISTENT_READ | Perm::WRITE, Perm::ALL)
        .unwrap();
    blk.insert(&node(&q, "base")).unwrap();
    open(&mut q, "ovl", json!({"file": "f1", "backing": null}));
    q.ok(
        "blockdev-snapshot",
        json!({"node": "base", "overlay": "ovl"}),
    );
    assert_eq!(blk.root_node().unwrap().name(), "ovl");
    let b = blk.clone();
    let r = q.bl.wait(async move {
        b.write(4096, vec![0x13; 4096], ReqFlags::NONE).await?;
        b.read(0, 8192).await
    });
    let got = r.unwrap().unwrap();
    assert!(got[..4096] == [0x12; 4096] && got[4096..] == [0x13; 4096]);
    assert!(
        q.io("base", "read -P 0x12 0 128k").starts_with("read"),
        "base unchanged"
    );
    let e = q.err("blockdev-del", json!({"node-name": "ovl"}));
    assert!(e.contains("in use"), "{e}");
    // A second overlay on the in-use base is refused: it has one.
    let e = q.err(
        "blockdev-snapshot",
        json!({"node": "base", "overlay": "ovl"}),
    );
    assert!(e.contains("already"), "{e}");
    let b = blk.clone();
    q.bl.wait(async move { b.delete().await }).unwrap();
    q.ok("blockdev-del", json!({"node-name": "ovl"}));
    assert!(check(&q, "base").is_clean());
}

#[test]
fn change_backing_file_rewrites_the_header_and_keeps_extensions() {
    let mut q = Qmp::new();
    image(
        &mut q,
        "f",
        4 * MIB,
        json!({"backing-file": "old", "backing-fmt": "raw"}),
    );
    open(&mut q, "q", json!({"file": "f", "backing": null}));
    q.io("q", "write -P 0x21 0 64k");
    let n = node(&q, "q");
    let r = q.bl.wait(async move {
        n.driver()
            .change_backing_file(&n, Some("new-base"), Some("qcow2"))
            .await
    });
    assert_eq!(r.unwrap(), Ok(()));
    q.ok("blockdev-del", json!({"node-name": "q"}));
    let b = file_bytes(&q, "f");
    let h = crate::drivers::qcow2::header::Header::parse(&b[..65536]).unwrap();
    assert_eq!(h.backing_file.as_deref(), Some("new-base"));
    assert_eq!(h.backing_format.as_deref(), Some("qcow2"));
    assert!(h.feature_names.len() == 8, "the feature table survived");
    open(&mut q, "q", json!({"file": "f", "backing": null}));
    assert!(check(&q, "q").is_clean());
    assert!(q.io("q", "read -P 0x21 0 64k").starts_with("read"));
    let n = node(&q, "q");
    let r =
        q.bl.wait(async move { n.driver().change_backing_file(&n, None, None).await });
    assert_eq!(r.unwrap(), Ok(()));
    q.ok("blockdev-del", json!({"node-name": "q"}));
    let h = crate::drivers::qcow2::header::Header::parse(&file_bytes(&q, "f")[..65536]).unwrap();
    assert_eq!(h.backing_file, None);
    assert_eq!(h.backing_format, None);
}

#[test]
fn growing_over_a_longer_backing_file_reads_zeroes() {
    for version in ["v3", "v2"] {
        let mut q = Qmp::new();
        image(&mut q, "f0", 4 * MIB, json!({}));
        image(&mut q, "f1", MIB, json!({"version": version}));
        open(&mut q, "base", json!({"file": "f0"}));
        q.io("base", "write -P 0x61 0 4M");
        q.ok("blockdev-del", json!({"node-name": "base"}));
        open(&mut q, "base", json!({"file": "f0", "read-only": true}));
        open(&mut q, "top", json!({"file": "f1", "backing": "base"}));
        assert!(q.io("top", "read -P 0x61 0 1M").starts_with("read"));
        q.ok("block_resize", json!({"node-name": "top", "size": 3 * MIB}));
        assert_eq!(node(&q, "top").get_length(), Ok(3 * MIB), "{version}");
        assert!(q.io("top", "read -P 0x61 0 1M").starts_with("read"));
        assert!(
            q.io("top", "read -P 0 1M 2M").starts_with("read"),
            "{version}"
        );
        q.ok("blockdev-del", json!({"node-name": "top"}));
        open(&mut q, "top", json!({"file": "f1", "backing": "base"}));
        assert!(q.io("top", "read -P 0 1M 2M").starts_with("read"));
        assert!(check(&q, "top").is_clean());
    }
}

#[test]
fn close_all_writes_everything_back() {
    let mut q = Qmp::new();
    image(&mut q, "f", 8 * MIB, json!({"cluster-size": 4096}));
    open(&mut q, "q", json!({"file": "f"}));
    q.io("q", "write -P 0x5 0 3M");
    q.io("q", "discard 1M 1M");
    q.io("q", "write -z 2M 4k");
    let f = node(&q, "f");
    let report = q.bl.close_all().unwrap().unwrap();
    assert!(
        alloc::format!("{report}").contains("nodes closed"),
        "{report}"
    );
    let bytes = Env::mem_driver(&f).data.borrow().clone();
    let mut q = Qmp::new();
    mem(&mut q, "f", bytes.len() as u64);
    Env::mem_driver(&node(&q, "f"))
        .data
        .borrow_mut()
        .copy_from_slice(&bytes);
    open(&mut q, "q", json!({"file": "f"}));
    assert!(check(&q, "q").is_clean(), "{:?}", check(&q, "q"));
    assert!(q.io("q", "read -P 0x5 0 1M").starts_with("read"));
    assert!(q.io("q", "read -P 0 1M 1M").starts_with("read"));
    assert!(q.io("q", "read -P 0 2M 4k").starts_with("read"));
    assert!(q.io("q", "read -P 0x5 2052k 1020k").starts_with("read"));
}

#[test]
fn requests_past_the_end_are_refused_without_harm() {
    let mut q = Qmp::new();
    image(&mut q, "f", MIB, json!({}));
    open(&mut q, "q", json!({"file": "f"}));
    let n = node(&q, "q");
    let r = q.bl.wait(async move {
        (
            n.write(MIB - 512, vec![1; 1024], ReqFlags::NONE).await,
            n.write_zeroes(MIB, 512, ReqFlags::NONE).await,
            n.discard(MIB - 65536, 1 << 30).await,
            n.write(0, vec![2; 512], ReqFlags::NONE).await,
        )
    });
    let (a, b, c, d) = r.unwrap();
    assert_eq!(a, Err(crate::io::IoError::Einval));
    assert_eq!(b, Err(crate::io::IoError::Einval));
    assert_eq!(c, Ok(()));
    assert_eq!(d, Ok(()), "the image is not marked corrupt");
    assert!(check(&q, "q").leaks.is_empty());
}

/// An 8 MiB image "f" with 4 KiB clusters and lazy refcounts, `write`
/// done through "q", then closed.
fn written_lazy_image(q: &mut Qmp, write: &str) {
    image(
        q,
        "f",
        8 * MIB,
        json!({"cluster-size": 4096, "lazy-refcounts": true}),
    );
    open(q, "q", json!({"file": "f"}));
    q.io("q", write);
    q.ok("blockdev-del", json!({"node-name": "q"}));
}

/// Edits the bytes of the in-memory file `file` in place.
fn edit_file(q: &Qmp, file: &str, edit: impl FnOnce(&mut Vec<u8>)) {
    let f = node(q, file);
    edit(&mut Env::mem_driver(&f).data.borrow_mut());
}

#[test]
fn a_dirty_image_has_its_refcounts_rebuilt_at_open() {
    let mut q = Qmp::new();
    written_lazy_image(&mut q, "write -P 0x31 0 3M");
    // As after a crash with lazy refcounts: the refcount block lost its
    // increments (the data clusters read as free), a free cluster claims a
    // reference, and the dirty bit is set.
    edit_file(&q, "f", |b| {
        let rb = (be64(b, be64(b, 48) as usize) & 0x00ff_ffff_ffff_fe00) as usize;
        b[rb + 2 * 40..rb + 2 * 900].fill(0);
        b[rb + 2 * 1500..rb + 2 * 1501].copy_from_slice(&[0, 1]);
        b[72..80].copy_from_slice(&1u64.to_be_bytes());
    });
    open(&mut q, "q", json!({"file": "f"}));
    let b = file_bytes(&q, "f");
    assert_eq!(be64(&b, 72) & 1, 0, "dirty bit cleared");
    assert!(check(&q, "q").is_clean(), "{:?}", check(&q, "q"));
    assert!(q.io("q", "read -P 0x31 0 3M").starts_with("read"));
    // New allocations do not land on data the lost refcounts described.
    q.io("q", "write -P 0x32 5M 1M");
    assert!(q.io("q", "read -P 0x31 0 3M").starts_with("read"));
    q.ok("blockdev-del", json!({"node-name": "q"}));
    open(&mut q, "q", json!({"file": "f"}));
    assert!(check(&q, "q").is_clean());
    assert!(q.io("q", "read -P 0x32 5M 1M").starts_with("read"));
}

/// Found by the qcow2 fuzz target: a dirty image whose L2 table points far
/// past the end of the file made the repair at open walk every cluster up
/// to that offset (years). The reference is a corruption, as in QEMU's
/// check ("exceeding the end of the file by one cluster or more"): the
/// read-write open fails at once, and a read-only open's check names it.
#[test]
fn a_reference_far_past_the_end_of_the_file_is_a_corruption_not_a_walk() {
    let mut q = Qmp::new();
    written_lazy_image(&mut q, "write -P 0x31 0 64k");
    let wild: u64 = 1 << 52;
    edit_file(&q, "f", |b| {
        let l1 = be64(b, 40) as usize;
        let l2 = (be64(b, l1) & 0x00ff_ffff_ffff_fe00) as usize;
        let copied = 1u64 << 63;
        b[l2 + 8..l2 + 16].copy_from_slice(&(copied | wild).to_be_bytes());
        b[72..80].copy_from_slice(&1u64.to_be_bytes());
    });
    let e = q.err(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "q", "file": "f"}),
    );
    assert!(e.contains("Could not repair dirty image"), "{e}");
    open(&mut q, "q", json!({"file": "f", "read-only": true}));
    let r = check(&q, "q");
    let text = format!(
        "counting reference for region exceeding the end of the file by one cluster or more: offset {wild:#x} size 0x1000"
    );
    assert!(r.corruptions.contains(&text), "{r:?}");
}

#[test]
fn shrinking_frees_everything_past_the_end() {
    for extra in [
        json!({}),
        json!({"cluster-size": 512}),
        json!({"extended-l2": true}),
    ] {
        let mut q = Qmp::new();
        image(&mut q, "f", 8 * MIB, extra.clone());
        open(&mut q, "q", json!({"file": "f"}));
        let data: Vec<u8> = (0..8 * MIB).map(|i| (i / 4096) as u8 | 1).collect();
        write(&q, "q", 0, data.clone());
        let keep = 3 * MIB + 512;
        q.ok("block_resize", json!({"node-name": "q", "size": keep}));
        assert_eq!(node(&q, "q").get_length(), Ok(keep));
        assert!(
            read(&q, "q", 0, keep as usize) == data[..keep as usize],
            "{extra}"
        );
        let r = check(&q, "q");
        assert!(r.is_clean(), "{extra}: {r:?}");
        // Growing again shows zeroes, not the old data.
        q.ok("block_resize", json!({"node-name": "q", "size": 8 * MIB}));
        assert!(read(&q, "q", keep, 4 * MIB as usize) == vec![0; 4 * MIB as usize]);
        q.ok("blockdev-del", json!({"node-name": "q"}));
        open(&mut q, "q", json!({"file": "f"}));
        assert!(check(&q, "q").is_clean());
        assert!(read(&q, "q", 0, keep as usize) == data[..keep as usize]);
    }
}

#[test]
fn partial_discard_of_a_compressed_extended_l2_cluster_is_ignored() {
    let mut q = Qmp::new();
    image(&mut q, "f", 4 * MIB, json!({"extended-l2": true}));
    open(&mut q, "q", json!({"file": "f"}));
    q.io("q", "write -P 0x51 0 64k");
    q.ok("blockdev-del", json!({"node-name": "q"}));
    {
        // Mark the cluster compressed (its data is not deflate; this test
        // only reads the L2 entry back).
        let f = node(&q, "f");
        let m = Env::mem_driver(&f);
        let mut b = m.data.borrow_mut();
        let l2 = (be64(&b, 0x30000) & 0x00ff_ffff_ffff_fe00) as usize;
        let word = be64(&b, l2) & 0x00ff_ffff_ffff_fe00;
        b[l2..l2 + 8].copy_from_slice(&(word | 1 << 62).to_be_bytes());
        b[l2 + 8..l2 + 16].fill(0);
    }
    open(&mut q, "q", json!({"file": "f"}));
    q.io("q", "discard 4k 8k");
    q.io("q", "flush");
    let b = file_bytes(&q, "f");
    let l2 = (be64(&b, 0x30000) & 0x00ff_ffff_ffff_fe00) as usize;
    assert_eq!(
        be64(&b, l2 + 8),
        0,
        "no subcluster bits on a compressed cluster"
    );
}
