//! The qcow2 driver (`block::drivers::qcow2`) against QEMU's own tools:
//! images made by `qemu-img create`/`convert` and `qemu-io` (compressed,
//! extended L2, v2, refcount widths, backing chains) open and read exactly
//! as `qemu-img convert -O raw` reads them; images the driver creates and
//! writes pass `qemu-img check` (no errors, no leaks) and `qemu-img compare`
//! equal to a flat model, for several cluster sizes.
//!
//! The driver runs over a small std file-backed protocol driver (`file`,
//! defined here), inside a `BlockLayer` on a simulated platform.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::rc::Rc;

use block::driver::{BlockDriver, ready};
use block::exec::{Executor, SimulatedPlatform};
use block::graph::node::Node;
use block::io::{BoxFuture, IoError, IoResult, ReqFlags};
use block::layer::BlockLayer;
use block::open::DriverClass;
use block::qmp::{Args, Dispatcher, QmpError};
use block::timer::ManualClock;
use harness::host::{dirty_extents, image_bitmaps};
use serde_json::{Map, Value, json};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// `file`: a host file as a protocol node (QEMU: `file-posix`, minus
/// everything but I/O). Writes past the end grow the file.
struct FileNode {
    file: RefCell<File>,
    name: String,
}

fn eio(e: std::io::Error) -> IoError {
    eprintln!("file I/O: {e}");
    IoError::Eio
}

impl BlockDriver for FileNode {
    fn format_name(&self) -> &str {
        "file"
    }
    fn get_length(&self, _: &Node) -> IoResult<u64> {
        self.file.borrow().metadata().map(|m| m.len()).map_err(eio)
    }
    fn read<'a>(
        &'a self,
        _: &'a Node,
        offset: u64,
        len: usize,
        _: ReqFlags,
    ) -> BoxFuture<'a, IoResult<Vec<u8>>> {
        let mut buf = vec![0u8; len];
        let r = self
            .file
            .borrow()
            .read_exact_at(&mut buf, offset)
            .map_err(eio);
        ready(r.map(|()| buf))
    }
    fn write<'a>(
        &'a self,
        _: &'a Node,
        offset: u64,
        data: Vec<u8>,
        _: ReqFlags,
    ) -> BoxFuture<'a, IoResult<()>> {
        ready(self.file.borrow().write_all_at(&data, offset).map_err(eio))
    }
    fn truncate<'a>(&'a self, _: &'a Node, size: u64) -> BoxFuture<'a, IoResult<()>> {
        ready(self.file.borrow().set_len(size).map_err(eio))
    }
    fn filename(&self, _: &Node) -> Option<String> {
        Some(self.name.clone())
    }
}

fn file_class() -> DriverClass {
    DriverClass::new("file", |d| {
        let name = d.opts.str("filename")?.to_string();
        Ok(Box::new(move |_| {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&name)
                .map_err(|e| format!("Could not open '{name}': {e}"))?;
            Ok(Box::new(FileNode {
                file: RefCell::new(file),
                name,
            }) as Box<dyn BlockDriver>)
        }))
    })
}

/// A block layer with the `file` driver and the QMP commands.
struct Layer {
    bl: BlockLayer,
    d: Dispatcher<BlockLayer>,
}

impl Layer {
    fn new() -> Layer {
        let clock = Rc::new(ManualClock::new());
        let platform = Rc::new(SimulatedPlatform::new(clock.clone()));
        let mut bl = BlockLayer::new(Executor::new(), clock, platform);
        bl.register_driver(file_class());
        let mut d = Dispatcher::new();
        block::commands::register(&mut d);
        Layer { bl, d }
    }

    fn cmd(&mut self, name: &str, args: Value) -> Result<Value, QmpError> {
        let map = match args {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        let h = self
            .d
            .get(name)
            .unwrap_or_else(|| panic!("no command {name}"));
        h(&mut self.bl, &Args::new(&map))
    }

    fn ok(&mut self, name: &str, args: Value) -> Value {
        match self.cmd(name, args.clone()) {
            Ok(v) => v,
            Err(e) => panic!("{name} {args}: {}", e.desc),
        }
    }

    fn node(&self, name: &str) -> Rc<Node> {
        self.bl
            .registry()
            .find_node(name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    fn read(&self, name: &str, off: u64, len: usize) -> Vec<u8> {
        let n = self.node(name);
        match self
            .bl
            .wait(async move { n.read(off, len, ReqFlags::NONE).await })
        {
            Ok(Ok(v)) => v,
            e => panic!("read {name} {off}+{len}: {e:?}"),
        }
    }

    fn write(&self, name: &str, off: u64, data: Vec<u8>) {
        let n = self.node(name);
        let r = self
            .bl
            .wait(async move { n.write(off, data, ReqFlags::NONE).await });
        assert!(matches!(r, Ok(Ok(()))), "write {name} {off}");
    }

    fn zero(&self, name: &str, off: u64, len: u64, unmap: bool) {
        let n = self.node(name);
        let f = if unmap {
            ReqFlags::MAY_UNMAP
        } else {
            ReqFlags::NONE
        };
        let r = self
            .bl
            .wait(async move { n.write_zeroes(off, len, f).await });
        assert!(matches!(r, Ok(Ok(()))), "zero {name} {off}");
    }

    fn discard(&self, name: &str, off: u64, len: u64) {
        let n = self.node(name);
        let r = self.bl.wait(async move { n.discard(off, len).await });
        assert!(matches!(r, Ok(Ok(()))), "discard {name} {off}");
    }

    /// Waits for the `blockdev-create` job `id`, dismisses it.
    fn create(&mut self, options: Value) {
        self.ok(
            "blockdev-create",
            json!({"job-id": "c", "options": options}),
        );
        while self.bl.executor().run_ready() {}
        let jobs = self.ok("query-jobs", json!({}));
        assert_eq!(jobs[0]["status"], "concluded", "{jobs}");
        assert!(jobs[0].get("error").is_none(), "{jobs}");
        self.ok("job-dismiss", json!({"id": "c"}));
    }
}

fn run(cmd: &mut Command) -> Output {
    let text = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{text}: {e}"))
}

fn ok(cmd: &mut Command) -> String {
    let text = format!("{cmd:?}");
    let o = run(cmd);
    assert!(
        o.status.success(),
        "{text}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn qemu_img(args: &[&str]) -> String {
    ok(Command::new("qemu-img").args(args))
}

fn qemu_io(img: &Path, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.arg("-f").arg("qcow2");
    for x in cmds {
        c.arg("-c").arg(x);
    }
    c.arg(img);
    let out = ok(&mut c);
    assert!(!out.contains("failed"), "{out}");
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// The image's content as QEMU reads it.
fn raw_of(img: &Path, dir: &Path) -> Vec<u8> {
    let out = dir.join("ref.raw");
    qemu_img(&["convert", "-O", "raw", p(img), p(&out)]);
    std::fs::read(&out).expect("read ref.raw")
}

/// `qemu-img check`: exit 0 (clean), with its text for the message.
fn assert_clean(img: &Path) {
    let o = run(Command::new("qemu-img").args(["check", "-f", "qcow2", p(img)]));
    let text =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        o.status.code(),
        Some(0),
        "qemu-img check {}: {text}",
        img.display()
    );
    assert!(
        text.contains("No errors were found on the image."),
        "{text}"
    );
}

fn assert_compare(img: &Path, model: &[u8], dir: &Path) {
    let raw = dir.join("model.raw");
    std::fs::write(&raw, model).expect("write model");
    let o = run(Command::new("qemu-img").args([
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        p(img),
        p(&raw),
    ]));
    let text =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        o.status.code(),
        Some(0),
        "qemu-img compare {}: {text}",
        img.display()
    );
}

fn file_ref(path: &Path) -> Value {
    json!({"driver": "file", "filename": p(path)})
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Compares a node's whole content with `want`, in 1 MiB reads.
fn assert_reads(l: &Layer, node: &str, want: &[u8], what: &str) {
    let mut off = 0usize;
    while off < want.len() {
        let n = (want.len() - off).min(MIB as usize);
        let got = l.read(node, off as u64, n);
        if got[..] != want[off..off + n] {
            let i = (0..n).find(|i| got[*i] != want[off + i]).unwrap_or(0);
            panic!("{what}: first difference at byte {}", off + i);
        }
        off += n;
    }
}

#[test]
fn qemu_made_images_read_back_identically() {
    let dir = tempfile::tempdir().expect("tempdir");
    // (name, qemu-img create options, discard unit)
    let variants: &[(&str, &[&str], u64)] = &[
        ("v3-64k", &["-o", "cluster_size=65536"], 65536),
        ("v3-512", &["-o", "cluster_size=512"], 512),
        (
            "v3-4k-rc1",
            &["-o", "cluster_size=4096,refcount_bits=1"],
            4096,
        ),
        (
            "v3-2m-rc64",
            &["-o", "cluster_size=2097152,refcount_bits=64"],
            2 * MIB,
        ),
        ("v2-64k", &["-o", "compat=0.10"], 65536),
        ("extl2-64k", &["-o", "extended_l2=on"], 2048),
        (
            "extl2-32k",
            &["-o", "extended_l2=on,cluster_size=32768"],
            1024,
        ),
        (
            "prealloc-metadata",
            &["-o", "preallocation=metadata"],
            65536,
        ),
        (
            "extl2-prealloc",
            &["-o", "extended_l2=on,preallocation=metadata"],
            2048,
        ),
    ];
    for (i, (name, opts, unit)) in variants.iter().enumerate() {
        let img = dir.path().join(format!("{name}.qcow2"));
        let mut args = vec!["create", "-f", "qcow2"];
        args.extend_from_slice(opts);
        args.push(p(&img));
        args.push("8M");
        qemu_img(&args);
        qemu_io(
            &img,
            &[
                "write -P 0x11 0 100k",
                "write -P 0x22 1000 3000",
                "write -z 200k 64k",
                "write -P 0x33 1M 5k",
                "write -P 0x44 3M 1M",
                "write -z -u 3M 512k",
                "discard 3584k 64k",
                "write -P 0x55 8388096 512",
                "write -P 0x66 5M 192k",
                "write -z 5M 64k",
                "write -z 5184k 4k",
            ],
        );
        let want = raw_of(&img, dir.path());
        let mut l = Layer::new();
        l.ok(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "q", "read-only": true, "file": file_ref(&img)}),
        );
        assert_reads(&l, "q", &want, name);
        // Allocation from the L2 tables matches qemu-img map.
        let map = l.ok(
            "human-monitor-command",
            json!({"command-line": "qemu-io q \"map\""}),
        );
        assert!(
            map.as_str()
                .unwrap_or("")
                .contains("allocated at offset 0 bytes"),
            "{name}: {map}"
        );
        // blockhaus writes on QEMU's layout; QEMU checks and compares.
        l.ok("blockdev-del", json!({"node-name": "q"}));
        l.ok(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "q", "discard": "unmap", "file": file_ref(&img)}),
        );
        let mut model = want.clone();
        random_ops(&l, "q", &mut model, 500 + i as u64, 60, *unit);
        assert_reads(&l, "q", &model, name);
        l.ok("blockdev-del", json!({"node-name": "q"}));
        assert_clean(&img);
        assert_compare(&img, &model, dir.path());
    }
}

#[test]
fn compressed_images_read_and_rewrite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let size = 4 * MIB as usize;
    let mut src = vec![0u8; size];
    // Compressible text, incompressible noise and zeroes.
    for (i, b) in src.iter_mut().enumerate().take(MIB as usize) {
        *b = b"the quick brown fox jumps over the lazy dog "[i % 44];
    }
    src[MIB as usize..2 * MIB as usize].copy_from_slice(&pattern(7, MIB as usize));
    for (i, b) in src[3 * MIB as usize..].iter_mut().enumerate() {
        *b = (i / 4096) as u8;
    }
    let raw = dir.path().join("src.raw");
    std::fs::write(&raw, &src).expect("write src");
    for cs in ["4096", "65536", "2097152", "32768,extended_l2=on"] {
        let img = dir
            .path()
            .join(format!("c{}.qcow2", cs.replace([',', '='], "-")));
        qemu_img(&[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            &format!("cluster_size={cs}"),
            p(&raw),
            p(&img),
        ]);
        let mut l = Layer::new();
        l.ok(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "q", "discard": "unmap", "file": file_ref(&img)}),
        );
        assert_reads(&l, "q", &src, &format!("compressed {cs}"));
        // Writes into compressed clusters rewrite them uncompressed and
        // free the compressed bytes.
        let mut model = src.clone();
        let data = pattern(9, 10_000);
        model[5000..15_000].copy_from_slice(&data);
        l.write("q", 5000, data);
        model[3 * MIB as usize..3 * MIB as usize + 200_000].fill(0);
        l.zero("q", 3 * MIB, 200_000, true);
        assert_reads(&l, "q", &model, &format!("rewritten {cs}"));
        l.ok("blockdev-del", json!({"node-name": "q"}));
        assert_clean(&img);
        assert_compare(&img, &model, dir.path());
    }
}

#[test]
fn qemu_made_backing_chain_through_nested_definitions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base.qcow2");
    let mid = dir.path().join("mid.qcow2");
    let top = dir.path().join("top.qcow2");
    qemu_img(&["create", "-f", "qcow2", p(&base), "4M"]);
    qemu_io(&base, &["write -P 0xa1 0 4M"]);
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        "-b",
        p(&base),
        "-F",
        "qcow2",
        p(&mid),
    ]);
    qemu_io(&mid, &["write -P 0xb2 100k 100k", "write -z 1M 64k"]);
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on",
        "-b",
        p(&mid),
        "-F",
        "qcow2",
        p(&top),
    ]);
    qemu_io(&top, &["write -P 0xc3 150k 3k", "discard 3M 64k"]);
    let mut want = raw_of(&top, dir.path());
    let mut l = Layer::new();
    l.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "top", "discard": "unmap", "file": file_ref(&top),
               "backing": {"driver": "qcow2", "node-name": "mid", "file": file_ref(&mid),
                           "backing": {"driver": "qcow2", "node-name": "base", "file": file_ref(&base),
                                       "backing": null}}}),
    );
    assert_reads(&l, "top", &want, "chain");
    // Copy-on-write from two layers down, into subclusters.
    let data = pattern(3, 70_000);
    want[60_000..130_000].copy_from_slice(&data);
    l.write("top", 60_000, data);
    assert_reads(&l, "top", &want, "chain after writes");
    l.ok("blockdev-del", json!({"node-name": "top"}));
    assert_clean(&top);
    assert_eq!(
        raw_of(&top, dir.path()),
        want,
        "QEMU reads what blockhaus wrote"
    );
}

/// xorshift64*.
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

/// Random writes, zeroes and discards into `node`, mirrored in `model`.
fn random_ops(l: &Layer, node: &str, model: &mut [u8], seed: u64, ops: usize, unit: u64) {
    let mut rng = Rng(seed);
    let size = model.len() as u64;
    for _ in 0..ops {
        let off = rng.below(size - 1);
        let len = 1 + rng.below((256 * KIB).min(size - off));
        match rng.below(8) {
            0..=4 => {
                let data = pattern(rng.next(), len as usize);
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
                l.write(node, off, data);
            }
            5 | 6 => {
                model[off as usize..(off + len) as usize].fill(0);
                l.zero(node, off, len, rng.below(2) == 0);
            }
            _ => {
                let a = off.div_ceil(unit) * unit;
                let b = (off + len) / unit * unit;
                if a < b {
                    model[a as usize..b as usize].fill(0);
                }
                l.discard(node, off, len);
            }
        }
    }
}

#[test]
fn images_written_by_blockhaus_pass_qemu_img_check_and_compare() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases: &[(&str, Value, u64)] = &[
        ("64k", json!({}), 65536),
        ("512", json!({"cluster-size": 512}), 512),
        (
            "4k-v2",
            json!({"cluster-size": 4096, "version": "v2"}),
            4096,
        ),
        ("2m", json!({"cluster-size": 2 * MIB}), 2 * MIB),
        ("extl2", json!({"extended-l2": true}), 2048),
        (
            "rc1-16k",
            json!({"cluster-size": 16384, "refcount-bits": 1, "lazy-refcounts": true}),
            16384,
        ),
    ];
    for (i, (name, extra, unit)) in cases.iter().enumerate() {
        let img = dir.path().join(format!("{name}.qcow2"));
        File::create(&img).expect("create file");
        let size = 12 * MIB;
        let mut l = Layer::new();
        l.ok(
            "blockdev-add",
            json!({"driver": "file", "node-name": "f", "filename": p(&img)}),
        );
        let mut o = json!({"driver": "qcow2", "file": "f", "size": size});
        if let (Value::Object(m), Value::Object(e)) = (&mut o, extra.clone()) {
            m.extend(e);
        }
        l.create(o);
        l.ok(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "q", "file": "f", "discard": "unmap"}),
        );
        let mut model = vec![0u8; size as usize];
        random_ops(&l, "q", &mut model, 100 + i as u64, 120, *unit);
        assert_reads(&l, "q", &model, name);
        l.ok("blockdev-del", json!({"node-name": "q"}));
        l.ok("blockdev-del", json!({"node-name": "f"}));
        assert_clean(&img);
        assert_compare(&img, &model, dir.path());
        let info = qemu_img(&["info", "--output=json", p(&img)]);
        let info: Value = serde_json::from_str(&info).expect("json");
        assert_eq!(info["virtual-size"], size, "{name}");
        // And QEMU's writes on top of ours still check clean.
        qemu_io(&img, &["write -P 0x99 5M 300k"]);
        assert_clean(&img);
    }
}

#[test]
fn blockhaus_overlay_on_a_qemu_base_and_growth() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        p(&base),
        "6M",
    ]);
    qemu_io(&base, &["write -P 0x5a 0 6M"]);
    File::create(&top).expect("create file");
    let mut l = Layer::new();
    l.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "base", "read-only": true,
                                "file": file_ref(&base), "backing": null}),
    );
    l.ok(
        "blockdev-add",
        json!({"driver": "file", "node-name": "tf", "filename": p(&top)}),
    );
    l.create(json!({"driver": "qcow2", "file": "tf", "size": 6 * MIB,
                    "backing-file": p(&base), "backing-fmt": "qcow2", "cluster-size": 65536}));
    l.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "top", "file": "tf",
                                "backing": "base", "discard": "unmap"}),
    );
    let mut model = raw_of(&base, dir.path());
    random_ops(&l, "top", &mut model, 77, 100, 65536);
    assert_reads(&l, "top", &model, "overlay");
    // Grow by 40 MiB: the new area reads as zeroes.
    l.ok(
        "block_resize",
        json!({"node-name": "top", "size": 46 * MIB}),
    );
    model.resize(46 * MIB as usize, 0);
    let tail = pattern(5, 100_000);
    model[45 * MIB as usize..45 * MIB as usize + 100_000].copy_from_slice(&tail);
    l.write("top", 45 * MIB, tail);
    assert_reads(&l, "top", &model, "grown");
    l.ok("blockdev-del", json!({"node-name": "top"}));
    l.ok("blockdev-del", json!({"node-name": "tf"}));
    assert_clean(&top);
    assert_compare(&top, &model, dir.path());
    let info: Value =
        serde_json::from_str(&qemu_img(&["info", "--output=json", p(&top)])).expect("json");
    assert_eq!(info["backing-filename"], p(&base));
    assert_eq!(info["backing-filename-format"], "qcow2");
    // Re-pointing the header (what stream/commit do): QEMU follows it.
    let copy = dir.path().join("base-copy.qcow2");
    std::fs::copy(&base, &copy).expect("copy base");
    let mut l = Layer::new();
    l.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "top", "backing": null, "file": file_ref(&top)}),
    );
    let n = l.node("top");
    let c = p(&copy).to_string();
    let r = l.bl.wait(async move {
        n.driver()
            .change_backing_file(&n, Some(&c), Some("qcow2"))
            .await
    });
    assert!(matches!(r, Ok(Ok(()))), "{r:?}");
    l.ok("blockdev-del", json!({"node-name": "top"}));
    let info: Value =
        serde_json::from_str(&qemu_img(&["info", "--output=json", p(&top)])).expect("json");
    assert_eq!(info["backing-filename"], p(&copy));
    assert_clean(&top);
    assert_compare(&top, &model, dir.path());
}

#[test]
fn qemu_refusals_and_bad_images() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("bad.qcow2");
    qemu_img(&["create", "-f", "qcow2", p(&img), "1M"]);
    // Make the image truncated in the middle of its L1 table.
    let f = OpenOptions::new().write(true).open(&img).expect("open");
    f.set_len(0x30004).expect("truncate");
    drop(f);
    let mut l = Layer::new();
    let e = l
        .cmd(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "bad", "file": file_ref(&img)}),
        )
        .expect_err("truncated image");
    assert!(
        e.desc
            .starts_with("qcow2 node 'bad': Active L1 table offset invalid"),
        "{}",
        e.desc
    );
    let zstd = dir.path().join("zstd.qcow2");
    let o = run(Command::new("qemu-img").args([
        "create",
        "-f",
        "qcow2",
        "-o",
        "compression_type=zstd",
        p(&zstd),
        "1M",
    ]));
    if o.status.success() {
        let e = l
            .cmd(
                "blockdev-add",
                json!({"driver": "qcow2", "node-name": "z", "file": file_ref(&zstd)}),
            )
            .expect_err("zstd");
        assert!(e.desc.contains("zstd"), "{}", e.desc);
    }
}

/// What reached the recording file node, in order.
#[derive(Clone)]
enum Op {
    Write(u64, Vec<u8>),
    Flush,
}

type OpLog = Rc<RefCell<Vec<Op>>>;

/// `recfile`: a memory file node that logs every write and flush, so a
/// test can rebuild what a disk might hold after a crash at any point.
struct RecFile {
    data: Rc<RefCell<Vec<u8>>>,
    log: OpLog,
}

impl BlockDriver for RecFile {
    fn format_name(&self) -> &str {
        "recfile"
    }
    fn get_length(&self, _: &Node) -> IoResult<u64> {
        Ok(self.data.borrow().len() as u64)
    }
    fn read<'a>(
        &'a self,
        _: &'a Node,
        offset: u64,
        len: usize,
        _: ReqFlags,
    ) -> BoxFuture<'a, IoResult<Vec<u8>>> {
        let d = self.data.borrow();
        let o = offset as usize;
        ready(d.get(o..o + len).map(<[u8]>::to_vec).ok_or(IoError::Eio))
    }
    fn write<'a>(
        &'a self,
        _: &'a Node,
        offset: u64,
        data: Vec<u8>,
        _: ReqFlags,
    ) -> BoxFuture<'a, IoResult<()>> {
        apply(&mut self.data.borrow_mut(), offset, &data);
        self.log.borrow_mut().push(Op::Write(offset, data));
        ready(Ok(()))
    }
    fn flush<'a>(&'a self, _: &'a Node) -> BoxFuture<'a, IoResult<()>> {
        self.log.borrow_mut().push(Op::Flush);
        ready(Ok(()))
    }
}

fn apply(d: &mut Vec<u8>, offset: u64, data: &[u8]) {
    let end = offset as usize + data.len();
    if d.len() < end {
        d.resize(end, 0);
    }
    d[offset as usize..end].copy_from_slice(data);
}

/// A guest flush that completed: the model then, and where the log was.
struct Durable {
    log_len: usize,
    model: Vec<u8>,
}

/// The image a crash run starts from: made by `blockdev-create` with these
/// options, or QEMU's image with its content.
enum Start {
    Create(Value),
    Image(Vec<u8>, Vec<u8>),
}

fn crash_run(dir: &Path, name: &str, start: Start, unit: u64, seed: u64) {
    let data = Rc::new(RefCell::new(Vec::new()));
    let log: OpLog = Rc::default();
    let mut l = Layer::new();
    let (d2, l2) = (data.clone(), log.clone());
    l.bl.register_driver(DriverClass::new("recfile", move |_| {
        let (data, log) = (d2.clone(), l2.clone());
        Ok(Box::new(move |_| {
            Ok(Box::new(RecFile { data, log }) as Box<dyn BlockDriver>)
        }))
    }));
    l.ok(
        "blockdev-add",
        json!({"driver": "recfile", "node-name": "f"}),
    );
    let size = 8 * MIB;
    let mut model = vec![0u8; size as usize];
    let start_kind = matches!(start, Start::Image(..));
    match start {
        Start::Create(create) => {
            let mut o = json!({"driver": "qcow2", "file": "f", "size": size});
            if let (Value::Object(m), Value::Object(e)) = (&mut o, create) {
                m.extend(e);
            }
            l.create(o);
        }
        Start::Image(bytes, content) => {
            *data.borrow_mut() = bytes;
            model = content;
        }
    }
    let initial = data.borrow().clone();
    let at_snapshot = start_kind.then(|| model.clone());
    log.borrow_mut().clear();
    l.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "q", "file": "f", "discard": "unmap"}),
    );
    // Guest operations: (log index when it started, range it touched).
    let mut rng = Rng(seed);
    let mut durable = vec![Durable {
        log_len: 0,
        model: model.clone(),
    }];
    let mut touched: Vec<(usize, u64, u64)> = Vec::new();
    for _ in 0..150 {
        let start = log.borrow().len();
        let off = rng.below(size - 1);
        let len = 1 + rng.below((200 * KIB).min(size - off));
        match rng.below(10) {
            0..=5 => {
                let d = pattern(rng.next(), len as usize);
                model[off as usize..(off + len) as usize].copy_from_slice(&d);
                l.write("q", off, d);
            }
            6 | 7 => {
                model[off as usize..(off + len) as usize].fill(0);
                l.zero("q", off, len, rng.below(2) == 0);
            }
            8 => {
                let a = off.div_ceil(unit) * unit;
                let b = (off + len) / unit * unit;
                if a < b {
                    model[a as usize..b as usize].fill(0);
                }
                l.discard("q", off, len);
            }
            _ => {
                let n = l.node("q");
                let r = l.bl.wait(async move { n.flush().await });
                assert!(matches!(r, Ok(Ok(()))));
                durable.push(Durable {
                    log_len: log.borrow().len(),
                    model: model.clone(),
                });
                continue;
            }
        }
        touched.push((start, off, len));
    }
    assert_reads(&l, "q", &model, name);
    let ops = log.borrow().clone();
    for trial in 0..25 {
        let k = rng.below(ops.len() as u64 + 1) as usize;
        let last_flush = ops[..k]
            .iter()
            .rposition(|o| matches!(o, Op::Flush))
            .map_or(0, |i| i + 1);
        let mut img = initial.clone();
        for (i, op) in ops[..k].iter().enumerate() {
            if let Op::Write(off, d) = op
                && (i < last_flush || rng.below(2) == 0)
            {
                apply(&mut img, *off, d);
            }
        }
        let path = dir.join(format!("{name}-crash{trial}.qcow2"));
        std::fs::write(&path, &img).expect("write crash image");
        let o = run(Command::new("qemu-img").args(["check", "-f", "qcow2", p(&path)]));
        let text =
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
        assert!(
            matches!(o.status.code(), Some(0) | Some(3)),
            "{name} crash at {k}/{}: corruption: {text}",
            ops.len()
        );
        // Everything flushed before the crash is there, except what later
        // guest requests (started before the crash) may have changed.
        let Some(d) = durable.iter().rev().find(|d| d.log_len <= last_flush) else {
            continue;
        };
        let got = raw_of(&path, dir);
        let mut mask = vec![true; size as usize];
        for (start, off, len) in &touched {
            if *start >= d.log_len && *start < k {
                mask[*off as usize..(*off + *len) as usize].fill(false);
            }
        }
        let bad = (0..size as usize).find(|i| mask[*i] && got[*i] != d.model[*i]);
        assert!(
            bad.is_none(),
            "{name} crash at {k}: flushed data lost at byte {bad:?}"
        );
        if let Some(snap) = &at_snapshot
            && trial % 5 == 0
        {
            qemu_img(&["snapshot", "-a", "s1", p(&path)]);
            assert!(
                raw_of(&path, dir) == *snap,
                "{name} crash at {k}: the snapshot changed"
            );
        }
    }
}

#[test]
fn crash_at_any_write_leaves_no_corruption_and_keeps_flushed_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    crash_run(dir.path(), "64k", Start::Create(json!({})), 65536, 1);
    crash_run(
        dir.path(),
        "extl2",
        Start::Create(json!({"extended-l2": true})),
        2048,
        2,
    );
    crash_run(
        dir.path(),
        "512",
        Start::Create(json!({"cluster-size": 512})),
        512,
        3,
    );
    // A QEMU image with an internal snapshot: shared L2 tables and
    // clusters are copied on the way.
    for (name, opts, unit) in [
        ("snap", "cluster_size=4096", 4096),
        ("snap-extl2", "extended_l2=on,cluster_size=16384", 512),
    ] {
        let img = dir.path().join(format!("{name}.qcow2"));
        qemu_img(&["create", "-f", "qcow2", "-o", opts, p(&img), "8M"]);
        qemu_io(&img, &["write -P 0x11 0 3M", "write -P 0x12 5M 1M"]);
        qemu_img(&["snapshot", "-c", "s1", p(&img)]);
        let content = raw_of(&img, dir.path());
        let bytes = std::fs::read(&img).expect("read image");
        crash_run(dir.path(), name, Start::Image(bytes, content), unit, 4);
    }
}

#[test]
fn internal_snapshots_stay_intact_under_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, opts, unit) in [
        ("snap", "cluster_size=65536", 65536u64),
        ("snap-extl2", "extended_l2=on", 2048),
        ("snap-512", "cluster_size=512", 512),
    ] {
        let img = dir.path().join(format!("{name}.qcow2"));
        qemu_img(&["create", "-f", "qcow2", "-o", opts, p(&img), "4M"]);
        qemu_io(&img, &["write -P 0x11 0 1M", "write -P 0x12 2M 300k"]);
        let at_snapshot = raw_of(&img, dir.path());
        qemu_img(&["snapshot", "-c", "s1", p(&img)]);
        qemu_io(&img, &["write -P 0x22 0 64k"]);
        let mut model = raw_of(&img, dir.path());
        let mut l = Layer::new();
        l.ok(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "s", "discard": "unmap", "file": file_ref(&img)}),
        );
        assert_reads(&l, "s", &model, name);
        // Writes, zeroes and discards over clusters and L2 tables shared
        // with the snapshot copy them first.
        random_ops(&l, "s", &mut model, 900, 60, unit);
        assert_reads(&l, "s", &model, name);
        l.ok("blockdev-del", json!({"node-name": "s"}));
        assert_clean(&img);
        assert_compare(&img, &model, dir.path());
        // blockhaus's own check walks the snapshots the same way.
        l.ok(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "s", "read-only": true, "file": file_ref(&img)}),
        );
        let n = l.node("s");
        let report = l.bl.wait(async move {
            let d = (n.driver() as &dyn std::any::Any)
                .downcast_ref::<block::drivers::qcow2::Qcow2>()
                .expect("qcow2");
            d.check(&n).await
        });
        let report = report.expect("wait").expect("check");
        assert!(report.is_clean(), "{name}: {report:?}");
        l.ok("blockdev-del", json!({"node-name": "s"}));
        // The snapshot still holds what it held.
        qemu_img(&["snapshot", "-a", "s1", p(&img)]);
        assert!(
            raw_of(&img, dir.path()) == at_snapshot,
            "{name}: snapshot changed"
        );
        assert_clean(&img);
    }
}

#[test]
fn bitmaps_without_their_autoclear_bit_are_ignored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut l = Layer::new();
    // A program without bitmap support wrote the image and cleared the
    // autoclear bit: the bitmaps are ignored (QEMU: "a program lacking
    // bitmap support modified this file"), the image stays free of
    // corruption (their clusters may leak, as with QEMU).
    let bm = dir.path().join("bitmap.qcow2");
    qemu_img(&["create", "-f", "qcow2", p(&bm), "4M"]);
    qemu_img(&["bitmap", "--add", p(&bm), "b0"]);
    let f = OpenOptions::new().write(true).open(&bm).expect("open");
    f.write_all_at(&[0u8; 8], 88).expect("clear autoclear");
    drop(f);
    l.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "b", "file": file_ref(&bm)}),
    );
    assert!(l.node("b").dirty_bitmaps().is_empty());
    l.write("b", 0, vec![0x33; 70_000]);
    l.ok("blockdev-del", json!({"node-name": "b"}));
    let o = run(Command::new("qemu-img").args(["check", "-f", "qcow2", p(&bm)]));
    assert!(matches!(o.status.code(), Some(0) | Some(3)), "{o:?}");
    assert_eq!(raw_of(&bm, dir.path())[..70_000], vec![0x33; 70_000][..]);
    assert!(image_bitmaps(&bm).is_empty());
}

/// An 8 MiB image with lazy refcounts and 4 KiB clusters.
fn lazy_image(dir: &Path) -> std::path::PathBuf {
    let img = dir.join("lazy.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on,cluster_size=4096",
        p(&img),
        "8M",
    ]);
    img
}

#[test]
fn a_qemu_crash_with_lazy_refcounts_is_repaired_at_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = lazy_image(dir.path());
    // qemu-io's `abort` crashes QEMU with the image dirty and refcounts
    // not written.
    let o = run(Command::new("qemu-io").args(["-c", "write -P 0x71 0 2M", "-c", "abort", p(&img)]));
    assert!(!o.status.success());
    let head = std::fs::read(&img).expect("read");
    assert_eq!(head[79] & 1, 1, "left dirty");
    let o = run(Command::new("qemu-img").args(["check", "-f", "qcow2", p(&img)]));
    assert_eq!(o.status.code(), Some(2), "QEMU sees the refcount errors");
    let mut l = Layer::new();
    l.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "q", "file": file_ref(&img)}),
    );
    let mut model = vec![0u8; 8 * MIB as usize];
    model[..2 * MIB as usize].fill(0x71);
    let more = pattern(11, 1_000_000);
    model[3 * MIB as usize..3 * MIB as usize + 1_000_000].copy_from_slice(&more);
    l.write("q", 3 * MIB, more);
    assert_reads(&l, "q", &model, "repaired");
    l.ok("blockdev-del", json!({"node-name": "q"}));
    assert_clean(&img);
    assert_compare(&img, &model, dir.path());
    assert_eq!(std::fs::read(&img).expect("read")[79] & 1, 0, "clean");
}

#[test]
fn shrinking_leaves_no_leaks_for_qemu() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, opts) in [
        ("shrink-64k", "cluster_size=65536"),
        ("shrink-extl2", "extended_l2=on"),
    ] {
        let img = dir.path().join(format!("{name}.qcow2"));
        qemu_img(&["create", "-f", "qcow2", "-o", opts, p(&img), "16M"]);
        qemu_io(
            &img,
            &[
                "write -c -P 0x42 12M 1M",
                "write -P 0x41 0 12M",
                "write -P 0x41 13M 3M",
            ],
        );
        let mut l = Layer::new();
        l.ok(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "q", "file": file_ref(&img)}),
        );
        let keep = 5 * MIB + 512;
        l.ok("block_resize", json!({"node-name": "q", "size": keep}));
        l.ok("blockdev-del", json!({"node-name": "q"}));
        assert_clean(&img);
        let model = vec![0x41u8; keep as usize];
        assert_compare(&img, &model, dir.path());
        let info: Value =
            serde_json::from_str(&qemu_img(&["info", "--output=json", p(&img)])).expect("json");
        assert_eq!(info["virtual-size"], keep, "{name}");
    }
}

#[test]
fn refcount_table_growth_on_a_qemu_layout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("grow.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        p(&img),
        "32M",
    ]);
    qemu_io(&img, &["write -P 0x61 0 6M"]);
    let mut model = raw_of(&img, dir.path());
    let mut l = Layer::new();
    l.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "q", "discard": "unmap", "file": file_ref(&img)}),
    );
    // 20 MiB more data: the first refcount table cluster covers 8 MiB.
    for i in 0..20u64 {
        let d = pattern(i + 1, MIB as usize);
        let off = (8 + i) * MIB + 512 * i;
        model[off as usize..(off + MIB) as usize].copy_from_slice(&d);
        l.write("q", off, d);
    }
    random_ops(&l, "q", &mut model, 31, 40, 512);
    assert_reads(&l, "q", &model, "grown table");
    l.ok("blockdev-del", json!({"node-name": "q"}));
    assert_clean(&img);
    assert_compare(&img, &model, dir.path());
}

/// Bitmaps made by `qemu-img bitmap` survive an open read-write, record
/// the writes made meanwhile (enabled ones only), and are stored when the
/// node closes: `qemu-img info` lists them without `in-use`, qemu-nbd
/// serves the dirty extents, `qemu-img check` is clean.
#[test]
fn qemu_made_bitmaps_are_kept_and_record_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("b.qcow2");
    qemu_img(&["create", "-f", "qcow2", p(&img), "4M"]);
    qemu_img(&["bitmap", "--add", "-g", "64k", p(&img), "b0"]);
    qemu_img(&["bitmap", "--add", "--disable", p(&img), "b1"]);
    qemu_io(&img, &["write 0 64k", "write 1M 4k"]);
    let mut l = Layer::new();
    l.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "q", "discard": "unmap", "file": file_ref(&img)}),
    );
    {
        let n = l.node("q");
        let bm = n.dirty_bitmaps();
        assert_eq!(bm.len(), 2, "{bm:?}");
        assert_eq!(bm[0].name, "b0");
        assert!(bm[0].enabled && bm[0].persistent && !bm[0].inconsistent);
        assert_eq!(bm[0].bitmap.granularity(), 64 * KIB);
        assert_eq!(bm[0].bitmap.dirty_bytes(), 128 * KIB);
        assert!(!bm[1].enabled);
        assert_eq!(bm[1].bitmap.dirty_bytes(), 0);
    }
    // While open read-write the stored bitmaps are marked in use.
    for (name, flags, _) in image_bitmaps(&img) {
        assert!(flags.contains(&"in-use".to_string()), "{name}: {flags:?}");
    }
    l.write("q", 2 * MIB + 100, vec![7; 10]);
    l.zero("q", 3 * MIB, 64 * KIB, false);
    l.discard("q", 3 * MIB + 512 * KIB, 64 * KIB);
    l.ok("blockdev-del", json!({"node-name": "q"}));
    assert_clean(&img);
    assert_eq!(
        image_bitmaps(&img),
        vec![
            ("b0".to_string(), vec!["auto".to_string()], 64 * KIB),
            ("b1".to_string(), vec![], 64 * KIB),
        ]
    );
    assert_eq!(
        dirty_extents(&img, "b0"),
        vec![
            (0, 64 * KIB),
            (MIB, 64 * KIB),
            (2 * MIB, 64 * KIB),
            (3 * MIB, 64 * KIB),
            (3 * MIB + 512 * KIB, 64 * KIB),
        ]
    );
    assert_eq!(dirty_extents(&img, "b1"), vec![]);
    // QEMU writes on; blockhaus reads back what QEMU stored.
    qemu_io(&img, &["write 256k 4k"]);
    let mut l = Layer::new();
    l.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "q", "file": file_ref(&img)}),
    );
    assert_eq!(
        l.node("q").dirty_bitmaps()[0].bitmap.dirty_bytes(),
        6 * 64 * KIB
    );
    l.ok("blockdev-del", json!({"node-name": "q"}));
    assert_clean(&img);
}

/// An image left with bitmaps in use (the process died before storing
/// them) opens with them inconsistent; they stay in use in the image, as
/// QEMU keeps them, and the image checks clean.
#[test]
fn bitmaps_left_in_use_open_inconsistent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("b.qcow2");
    qemu_img(&["create", "-f", "qcow2", p(&img), "4M"]);
    qemu_img(&["bitmap", "--add", p(&img), "b0"]);
    qemu_img(&["bitmap", "--add", p(&img), "b1"]);
    qemu_io(&img, &["write 0 64k"]);
    let mut l = Layer::new();
    l.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "q", "file": file_ref(&img)}),
    );
    l.write("q", MIB, vec![1; 4096]);
    // Removed over QMP: out of the image at once.
    l.ok(
        "block-dirty-bitmap-remove",
        json!({"node": "q", "name": "b1"}),
    );
    // No close: the other bitmap stays in use in the image.
    std::mem::forget(l);
    assert_clean(&img);
    assert_eq!(
        image_bitmaps(&img),
        vec![(
            "b0".to_string(),
            vec!["in-use".to_string(), "auto".to_string()],
            64 * KIB
        )]
    );
    let mut l = Layer::new();
    l.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "q", "file": file_ref(&img)}),
    );
    {
        let n = l.node("q");
        let bm = n.dirty_bitmaps();
        assert!(bm[0].inconsistent && !bm[0].enabled, "{bm:?}");
    }
    l.write("q", 2 * MIB, vec![1; 4096]);
    l.ok("blockdev-del", json!({"node-name": "q"}));
    assert_clean(&img);
    assert_eq!(image_bitmaps(&img)[0].1, vec!["in-use", "auto"]);
}

/// The repair of an image QEMU left dirty (lazy refcounts) counts the
/// bitmaps' clusters as in use: they keep their refcounts, and the image
/// checks clean with its bitmap (in use, so inconsistent) still there.
#[test]
fn repair_at_open_keeps_the_bitmap_clusters() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = lazy_image(dir.path());
    qemu_img(&["bitmap", "--add", "-g", "4k", p(&img), "b0"]);
    // Stored once with data, then QEMU crashes with the image dirty.
    qemu_io(&img, &["write -P 0x71 0 2M"]);
    let o =
        run(Command::new("qemu-io").args(["-c", "write -P 0x72 4M 1M", "-c", "abort", p(&img)]));
    assert!(!o.status.success());
    let mut l = Layer::new();
    l.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "q", "file": file_ref(&img)}),
    );
    assert!(l.node("q").dirty_bitmaps()[0].inconsistent);
    l.ok("blockdev-del", json!({"node-name": "q"}));
    assert_clean(&img);
    assert_eq!(image_bitmaps(&img)[0].0, "b0");
}

/// A resize resizes the bitmaps, which are stored at the new size: QEMU
/// reads them back and serves the write past the old end.
#[test]
fn bitmaps_follow_a_resize() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("r.qcow2");
    qemu_img(&["create", "-f", "qcow2", p(&img), "4M"]);
    qemu_img(&["bitmap", "--add", p(&img), "b0"]);
    qemu_io(&img, &["write 0 4k"]);
    let mut l = Layer::new();
    l.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "q", "file": file_ref(&img)}),
    );
    l.ok("block_resize", json!({"node-name": "q", "size": 64 * MIB}));
    l.write("q", 50 * MIB, vec![9; 4096]);
    l.ok("blockdev-del", json!({"node-name": "q"}));
    assert_clean(&img);
    assert_eq!(
        dirty_extents(&img, "b0"),
        vec![(0, 64 * KIB), (50 * MIB, 64 * KIB)]
    );
}
