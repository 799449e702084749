//! The randomized halt test of issue 7. From a seed: a random graph over
//! real images (raw and qcow2 on 2-4 virtio-blk disks, qcow2 backing
//! chains, random `raw`/`throttle` layers, quorums of three), random jobs
//! where they are valid (mirror, backup, stream, active commit) at random
//! speeds, random qemu-io writers over QMP (plain, FUA, flushed) and NBD
//! writers (qemu-io on the host through an export of the volume, in the
//! last 4 MiB of it), and a halt at a random moment by `quit`, the power
//! button or a fatal error (a panic inside a QMP command) — sometimes
//! while a write is still in flight.
//! Then on the host: QEMU exited 0 (33 after the panic), every qcow2 image
//! passes `qemu-img check` with no errors and no leaks, the close-all
//! report closed every node and cancelled (or saw finish) every job, and
//! each volume the writers used reads back exactly as the model says
//! wherever its final content is well defined (a mirror or backup source,
//! every quorum child, a stream or commit top seen through its chain; not
//! the jobs' targets, which are only checked for consistency).
//!
//! Every qcow2 volume the writers use (alone or as a chain's top, unless an
//! active commit replaces it) also carries a persistent dirty bitmap: after
//! the halt it is stored in the image and its dirty set covers every
//! acknowledged write (issue 15).
//!
//! `BLOCKHAUS_SEED=S` replays one seed; `BLOCKHAUS_SOAK_COUNT=N` runs N
//! seeds (default 5, or 1 with a seed given); `cargo xtask soak` sets them.
//! Every qcow2 image must be clean, leaks included, those a force-cancelled
//! job was writing too (a mirror's or backup's target, a stream's top, a
//! commit's base): a cancelled job abandons its reads but lets its writes
//! in flight land (`Pool::abandon` in block/src/jobs/copy.rs).

use harness::host::{MIB, QemuIoSession, create, dirty_extents, run};
use harness::qemu::FAILURE_EXIT_STATUS;
use harness::{Appliance, Machine, QemuConfig};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Virtual size of every volume (mirror and backup want equal sizes).
const VSIZE: u64 = 32 * MIB;
/// The end of every volume that only its NBD writer writes (the writes
/// over QMP stay below it), so each byte's last writer is known.
const NBD_REGION: u64 = 4 * MIB;

/// One NBD client writing a volume through its export while the halt
/// comes: its writes in order, and what qemu-io printed.
struct NbdWriter {
    vol: usize,
    writes: Vec<(u64, u64, u8)>,
    client: std::thread::JoinHandle<String>,
}

/// Starts `qemu-io` over NBD with `writes` (offset, length, pattern), one
/// after the other, on export `name`; returns once it is connected (see
/// `QemuIoSession`).
fn nbd_writer(port: u16, name: &str, writes: &[(u64, u64, u8)]) -> std::thread::JoinHandle<String> {
    let mut session = QemuIoSession::open(
        &["-f", "raw"],
        &format!("nbd://127.0.0.1:{port}/{name}"),
        300,
    );
    let cmds: Vec<String> = writes
        .iter()
        .enumerate()
        .map(|(i, (off, len, p))| {
            let fua = if i % 3 == 2 { "-f " } else { "" };
            format!("write {fua}-P {p:#x} {off} {len}")
        })
        .collect();
    std::thread::spawn(move || {
        session.send(&cmds);
        session.finish().1
    })
}

/// splitmix64: small, seedable, good enough.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    /// True with probability `num/den`.
    fn chance(&mut self, num: u64, den: u64) -> bool {
        self.next() % den < num
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.next() as usize % items.len()]
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fmt {
    Raw,
    Qcow2,
}

#[derive(Debug)]
struct Disk {
    path: PathBuf,
    fmt: Fmt,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Single(usize),
    Quorum([usize; 3]),
    /// qcow2 base on one disk ← qcow2 top on another.
    Chain(usize, usize),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Job {
    Mirror,
    Backup,
    Stream,
    Commit,
}

#[derive(Debug, Clone, PartialEq)]
enum Role {
    /// Written by the writers; the job, if any, has this volume as source.
    Writer(Option<(Job, String)>),
    /// A mirror's or backup's target: written only by its job.
    Target,
}

#[derive(Debug)]
struct Vol {
    kind: Kind,
    /// Node names bottom up; the last is the root.
    stack: Vec<String>,
    /// The node the data lives in below the layers (disk, qcow2 top, quorum).
    data: String,
    role: Role,
    model: Vec<u8>,
    /// A write whose reply never came: either its data or the old data.
    maybe: Vec<(u64, u64, u8)>,
    /// Every acknowledged write.
    acked: Vec<(u64, u64)>,
    /// The disk whose qcow2 node carries the persistent bitmap `soak`.
    bitmap: Option<usize>,
}

impl Vol {
    fn root(&self) -> &str {
        self.stack.last().unwrap()
    }
}

struct SeedGuard(u64);

impl Drop for SeedGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "\nhalt_random: seed {} FAILED; replay with BLOCKHAUS_SEED={}\n",
                self.0, self.0
            );
        }
    }
}

fn host_io(path: &Path, fmt: Fmt, cmd: &str) {
    let f = match fmt {
        Fmt::Raw => "raw",
        Fmt::Qcow2 => "qcow2",
    };
    let out = run(Command::new("qemu-io").args(["-f", f, "-c", cmd]).arg(path));
    assert!(!out.to_lowercase().contains("fail"), "{cmd}: {out}");
}

fn qcow2_create(path: &Path, backing: Option<&Path>) {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["create", "-q", "-f", "qcow2"]);
    if let Some(b) = backing {
        cmd.args(["-F", "qcow2", "-b"]).arg(b);
    }
    run(cmd.arg(path).arg(VSIZE.to_string()));
}

fn grow(path: &Path) {
    // A disk cannot grow as qcow2 allocates: room for data and metadata.
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(VSIZE + 16 * MIB)
        .unwrap();
}

/// The volume's content as a raw byte vector, through its format (and
/// backing chain).
fn read_image(path: &Path, fmt: Fmt, scratch: &Path) -> Vec<u8> {
    match fmt {
        Fmt::Raw => {
            let mut v = std::fs::read(path).unwrap();
            v.truncate(VSIZE as usize);
            v
        }
        Fmt::Qcow2 => {
            run(Command::new("qemu-img")
                .args(["convert", "-f", "qcow2", "-O", "raw"])
                .arg(path)
                .arg(scratch));
            let v = std::fs::read(scratch).unwrap();
            std::fs::remove_file(scratch).unwrap();
            v
        }
    }
}

/// `qemu-img check`: no errors and no leaks.
fn check_clean(path: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(path)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains("No errors were found on the image."),
        "qemu-img check {}:\n{text}",
        path.display()
    );
}

fn compare(what: &str, got: &[u8], vol: &Vol) {
    assert_eq!(got.len(), vol.model.len(), "{what}: size");
    if got == vol.model.as_slice() {
        return;
    }
    for (i, (&g, &m)) in got.iter().zip(&vol.model).enumerate() {
        if g == m {
            continue;
        }
        let i = i as u64;
        let excused = vol
            .maybe
            .iter()
            .any(|&(o, l, p)| (o..o + l).contains(&i) && g == p);
        assert!(
            excused,
            "{what}: byte {i} is {g:#x}, expected {m:#x} (volume {vol:?})",
            vol = (&vol.kind, &vol.stack, &vol.role, &vol.maybe)
        );
    }
}

fn hmp_line(node: &str, cmd: &str) -> Value {
    json!({"execute": "human-monitor-command",
           "arguments": {"command-line": format!("qemu-io {node} \"{cmd}\"")}})
}

/// The halt at the end of a run.
#[derive(Debug, Clone, Copy)]
enum Halt {
    Quit,
    Powerdown,
    /// A write sent, `quit` right behind it without waiting.
    QuitBehindWrite,
    /// A write sent, then the power button without waiting.
    PowerdownDuringWrite,
    /// A fatal error: a panic inside a QMP command (`x-blockhaus-panic`).
    Panic,
    /// A write sent, the panicking command right behind it.
    PanicBehindWrite,
}

fn one_seed(seed: u64) {
    let _guard = SeedGuard(seed);
    let mut rng = Rng(seed);
    let dir = tempfile::Builder::new()
        .prefix("blockhaus-halt-random-")
        .tempdir()
        .unwrap();
    let scratch = dir.path().join("scratch.raw");

    // ---- disks and volumes ----
    let ndisks = rng.range(2, 4) as usize;
    let mut disks: Vec<Disk> = Vec::new();
    let mut vols: Vec<Vol> = Vec::new();
    let mut next = 0usize;
    while next < ndisks {
        let left = ndisks - next;
        let r = rng.range(0, 99);
        let kind = if left >= 3 && r < 25 {
            Kind::Quorum([next, next + 1, next + 2])
        } else if left >= 2 && r < 55 {
            Kind::Chain(next, next + 1)
        } else {
            Kind::Single(next)
        };
        let used = match kind {
            Kind::Single(_) => 1,
            Kind::Chain(..) => 2,
            Kind::Quorum(_) => 3,
        };
        let v = vols.len();
        let pattern = 0x10 + v as u8;
        let mut model = vec![0u8; VSIZE as usize];
        let data;
        let mut stack = Vec::new();
        match kind {
            Kind::Single(_) | Kind::Quorum(_) => {
                let ids: Vec<usize> = (next..next + used).collect();
                let mut children = Vec::new();
                let init_len = rng.range(1, 8) * MIB;
                for &i in &ids {
                    let fmt = if rng.chance(1, 2) {
                        Fmt::Raw
                    } else {
                        Fmt::Qcow2
                    };
                    let path = dir.path().join(format!("disk{i}.img"));
                    match fmt {
                        Fmt::Raw => create(&path, VSIZE),
                        Fmt::Qcow2 => qcow2_create(&path, None),
                    }
                    host_io(&path, fmt, &format!("write -P {pattern:#x} 0 {init_len}"));
                    if fmt == Fmt::Qcow2 {
                        grow(&path);
                    }
                    stack.push(format!("d{i}"));
                    if fmt == Fmt::Qcow2 {
                        stack.push(format!("f{i}"));
                        children.push(format!("f{i}"));
                    } else {
                        children.push(format!("d{i}"));
                    }
                    disks.push(Disk { path, fmt });
                }
                model[..init_len as usize].fill(pattern);
                if used == 3 {
                    stack.push(format!("q{v}"));
                    data = format!("q{v}");
                } else {
                    data = children[0].clone();
                }
            }
            Kind::Chain(b, t) => {
                let base = dir.path().join(format!("disk{b}.img"));
                let top = dir.path().join(format!("disk{t}.img"));
                qcow2_create(&base, None);
                host_io(&base, Fmt::Qcow2, &format!("write -P {pattern:#x} 0 8M"));
                qcow2_create(&top, Some(&base));
                host_io(&top, Fmt::Qcow2, "write -P 0xf0 2M 1M");
                grow(&base);
                grow(&top);
                model[..8 * MIB as usize].fill(pattern);
                model[2 * MIB as usize..3 * MIB as usize].fill(0xf0);
                disks.push(Disk {
                    path: base,
                    fmt: Fmt::Qcow2,
                });
                disks.push(Disk {
                    path: top,
                    fmt: Fmt::Qcow2,
                });
                stack.extend([
                    format!("d{b}"),
                    format!("d{t}"),
                    format!("f{b}"),
                    format!("f{t}"),
                ]);
                data = format!("f{t}");
            }
        }
        vols.push(Vol {
            kind,
            stack,
            data,
            role: Role::Writer(None),
            model,
            maybe: Vec::new(),
            acked: Vec::new(),
            bitmap: None,
        });
        next += used;
    }

    // ---- jobs (decided before layers: some need a layer, commit none) ----
    let nv = vols.len();
    let mut order: Vec<usize> = (0..nv).collect();
    for i in (1..nv).rev() {
        order.swap(i, rng.next() as usize % (i + 1));
    }
    let mut target_of: Vec<Option<usize>> = vec![None; nv];
    for &v in &order {
        if vols[v].role != Role::Writer(None) {
            continue;
        }
        let job = match vols[v].kind {
            Kind::Chain(..) => *rng.pick(&[None, Some(Job::Stream), Some(Job::Commit)]),
            _ => *rng.pick(&[None, Some(Job::Mirror), Some(Job::Backup)]),
        };
        let Some(job) = job else { continue };
        if matches!(job, Job::Mirror | Job::Backup) {
            let free: Vec<usize> = (0..nv)
                .filter(|&t| {
                    t != v
                        && vols[t].role == Role::Writer(None)
                        && !matches!(vols[t].kind, Kind::Chain(..))
                        && !target_of.contains(&Some(t))
                })
                .collect();
            if free.is_empty() {
                continue;
            }
            let t = *rng.pick(&free);
            vols[t].role = Role::Target;
            target_of[v] = Some(t);
        }
        vols[v].role = Role::Writer(Some((job, format!("j{v}"))));
    }

    // ---- layers ----
    let mut groups = 0usize;
    let mut layer_opts: Vec<Value> = Vec::new();
    let mut objects: Vec<Value> = Vec::new();
    for (v, vol) in vols.iter_mut().enumerate() {
        let job = match &vol.role {
            Role::Writer(Some((j, _))) => Some(*j),
            _ => None,
        };
        let (min, max) = match job {
            Some(Job::Commit) => (0, 0),
            Some(Job::Backup | Job::Stream) => (1, 2),
            _ => (0, 2),
        };
        let n = rng.range(min, max);
        let mut below = vol.data.clone();
        for k in 0..n {
            let name = format!("l{v}_{k}");
            if rng.chance(1, 2) {
                layer_opts.push(json!({"driver": "raw", "node-name": name, "file": below}));
            } else {
                let group = if groups > 0 && rng.chance(1, 2) {
                    format!("tg{}", rng.range(0, groups as u64 - 1))
                } else {
                    let bps = rng.range(4, 64) * MIB;
                    objects.push(
                        json!({"qom-type": "throttle-group", "id": format!("tg{groups}"),
                                        "limits": {"bps-total": bps}}),
                    );
                    groups += 1;
                    format!("tg{}", groups - 1)
                };
                layer_opts.push(
                    json!({"driver": "throttle", "node-name": name, "file": below,
                                       "throttle-group": group}),
                );
            }
            println!("  layer {name}: {}", layer_opts.last().unwrap());
            vol.stack.push(name.clone());
            below = name;
        }
    }

    let machine = if rng.chance(1, 4) {
        Machine::Pc
    } else {
        Machine::Q35
    };
    println!("seed {seed}: {ndisks} disks, machine {}", machine.name());
    for (v, vol) in vols.iter().enumerate() {
        println!(
            "  volume {v}: {:?} {:?} stack {:?} role {:?} target {:?}",
            vol.kind,
            vol.kind_fmts(&disks),
            vol.stack,
            vol.role,
            target_of[v]
        );
    }

    // ---- boot and build ----
    let port = harness::qemu::free_port();
    let cfg = QemuConfig {
        machine,
        disks: disks.iter().map(|d| d.path.clone()).collect(),
        append: "blockhaus.test-fault=panic-on-qmp \
                 --nbd-server addr.type=inet,addr.host=0.0.0.0,addr.port=10809"
            .into(),
        nbd_port: Some(port),
        ..QemuConfig::default()
    };
    let mut a = Appliance::boot(&cfg);
    let add = |a: &mut Appliance, opts: Value| {
        a.qmp()
            .cmd("blockdev-add", opts.clone())
            .unwrap_or_else(|e| panic!("blockdev-add {opts}: {e}"));
    };
    for (i, d) in disks.iter().enumerate() {
        add(
            &mut a,
            json!({"driver": "virtio-blk", "node-name": format!("d{i}"), "serial": format!("disk{i}")}),
        );
        let chained = vols
            .iter()
            .any(|v| matches!(v.kind, Kind::Chain(b, t) if b == i || t == i));
        if d.fmt == Fmt::Qcow2 && !chained {
            add(
                &mut a,
                json!({"driver": "qcow2", "node-name": format!("f{i}"), "file": format!("d{i}")}),
            );
        }
    }
    for (v, vol) in vols.iter().enumerate() {
        match vol.kind {
            Kind::Chain(b, t) => {
                add(
                    &mut a,
                    json!({"driver": "qcow2", "node-name": format!("f{b}"), "file": format!("d{b}")}),
                );
                add(
                    &mut a,
                    json!({"driver": "qcow2", "node-name": format!("f{t}"), "file": format!("d{t}"),
                           "backing": format!("f{b}")}),
                );
            }
            Kind::Quorum(ids) => {
                let children: Vec<String> = ids
                    .iter()
                    .map(|&i| match disks[i].fmt {
                        Fmt::Raw => format!("d{i}"),
                        Fmt::Qcow2 => format!("f{i}"),
                    })
                    .collect();
                add(
                    &mut a,
                    json!({"driver": "quorum", "node-name": format!("q{v}"), "vote-threshold": 2,
                           "children": children}),
                );
            }
            Kind::Single(_) => {}
        }
    }
    for o in objects {
        a.qmp()
            .cmd("object-add", o.clone())
            .unwrap_or_else(|e| panic!("object-add {o}: {e}"));
    }
    for l in layer_opts {
        add(&mut a, l);
    }
    let user_nodes: Vec<String> = vols.iter().flat_map(|v| v.stack.clone()).collect();

    // Persistent bitmaps (chosen from the seed, not the random stream, so
    // the rest of a seed's run stays as it was).
    for (v, vol) in vols.iter_mut().enumerate() {
        let disk = match (&vol.kind, &vol.role) {
            (_, Role::Target | Role::Writer(Some((Job::Commit, _)))) => None,
            (Kind::Single(i), _) if disks[*i].fmt == Fmt::Qcow2 => Some(*i),
            (Kind::Chain(_, t), _) => Some(*t),
            _ => None,
        };
        let Some(i) = disk else { continue };
        let granularity = [4096, 65536][(seed as usize + v) % 2];
        let args = json!({"node": format!("f{i}"), "name": "soak", "persistent": true,
                          "granularity": granularity});
        println!("  block-dirty-bitmap-add {args}");
        a.qmp()
            .cmd("block-dirty-bitmap-add", args.clone())
            .unwrap_or_else(|e| panic!("block-dirty-bitmap-add {args}: {e}"));
        vol.bitmap = Some(i);
    }

    // Some writes before the jobs start.
    let writers: Vec<usize> = (0..nv)
        .filter(|&v| matches!(vols[v].role, Role::Writer(_)))
        .collect();
    let mut pattern = 0x20u8;
    let mut write = |a: &mut Appliance, rng: &mut Rng, vols: &mut Vec<Vol>| {
        let Some(&v) = (!writers.is_empty()).then(|| rng.pick(&writers)) else {
            return;
        };
        let (off, len) = random_range(rng);
        pattern = pattern.wrapping_add(1).max(0x20);
        let fua = if rng.chance(1, 4) { "-f " } else { "" };
        let root = vols[v].root().to_string();
        let out = a.qemu_io(&root, &format!("write {fua}-P {pattern:#x} {off} {len}"));
        assert!(out.contains(&format!("wrote {len}/{len}")), "{out}");
        vols[v].model[off as usize..(off + len) as usize].fill(pattern);
        vols[v].acked.push((off, len));
        if rng.chance(1, 4) {
            a.qemu_io(&root, "flush");
        }
    };
    for _ in 0..rng.range(0, 3) {
        write(&mut a, &mut rng, &mut vols);
    }

    // ---- jobs ----
    let speeds = [0, MIB, 4 * MIB, 16 * MIB];
    let mut jobs = Vec::new();
    for v in 0..nv {
        let Role::Writer(Some((job, id))) = vols[v].role.clone() else {
            continue;
        };
        let speed = *rng.pick(&speeds);
        let (cmd, args) = match job {
            Job::Mirror => {
                let t = target_of[v].unwrap();
                (
                    "blockdev-mirror",
                    json!({"job-id": id, "device": vols[v].root(), "target": vols[t].root(),
                           "sync": "full", "speed": speed}),
                )
            }
            Job::Backup => {
                let t = target_of[v].unwrap();
                let below_root = &vols[v].stack[vols[v].stack.len() - 2];
                (
                    "blockdev-backup",
                    json!({"job-id": id, "device": below_root, "target": vols[t].root(),
                           "sync": "full", "speed": speed}),
                )
            }
            Job::Stream => (
                "block-stream",
                json!({"job-id": id, "device": vols[v].data, "speed": speed}),
            ),
            Job::Commit => (
                "block-commit",
                json!({"job-id": id, "device": vols[v].data, "speed": speed}),
            ),
        };
        println!("  {cmd} {args}");
        a.qmp()
            .cmd(cmd, args.clone())
            .unwrap_or_else(|e| panic!("{cmd} {args}: {e}"));
        jobs.push(id);
    }

    // ---- NBD writers on some volumes, in their own region ----
    let mut nbd_writers = Vec::new();
    for &v in &writers {
        if nbd_writers.len() == 2 || !rng.chance(1, 2) {
            continue;
        }
        let export = json!({"type": "nbd", "id": format!("x{v}"), "node-name": vols[v].root(),
                            "name": format!("v{v}"), "writable": true});
        println!("  block-export-add {export}");
        a.qmp()
            .cmd("block-export-add", export.clone())
            .unwrap_or_else(|e| panic!("block-export-add {export}: {e}"));
        let writes: Vec<(u64, u64, u8)> = (0..rng.range(16, 160))
            .map(|n| {
                let len = rng.range(1, 512) * 512;
                let off = VSIZE - NBD_REGION + rng.range(0, (NBD_REGION - len) / 512) * 512;
                (off, len, 0x80 + (n % 0x70) as u8)
            })
            .collect();
        let client = nbd_writer(port, &format!("v{v}"), &writes);
        nbd_writers.push(NbdWriter {
            vol: v,
            writes,
            client,
        });
    }

    // ---- writers, then the halt at a random moment ----
    for _ in 0..rng.range(1, 10) {
        write(&mut a, &mut rng, &mut vols);
        if rng.chance(1, 3) {
            std::thread::sleep(Duration::from_millis(rng.range(0, 150)));
        }
    }
    std::thread::sleep(Duration::from_millis(rng.range(0, 300)));
    let how = *rng.pick(&[
        Halt::Quit,
        Halt::Powerdown,
        Halt::QuitBehindWrite,
        Halt::PowerdownDuringWrite,
        Halt::Panic,
        Halt::PanicBehindWrite,
    ]);
    println!("  halt: {how:?}");
    let inflight = match how {
        Halt::QuitBehindWrite | Halt::PowerdownDuringWrite | Halt::PanicBehindWrite
            if !writers.is_empty() =>
        {
            let v = *rng.pick(&writers);
            let (off, len) = random_range(&mut rng);
            let line = hmp_line(vols[v].root(), &format!("write -P 0xfe {off} {len}"));
            a.qmp().send_raw(format!("{line}\n").as_bytes()).unwrap();
            Some((v, off, len))
        }
        _ => None,
    };
    let reason = match how {
        Halt::Quit | Halt::QuitBehindWrite => {
            a.qmp().send_raw(b"{\"execute\": \"quit\"}\n").unwrap();
            "host-qmp-quit"
        }
        Halt::Powerdown | Halt::PowerdownDuringWrite => {
            a.qemu_monitor()
                .unwrap()
                .cmd("system_powerdown", Value::Null)
                .unwrap();
            "guest-shutdown"
        }
        Halt::Panic | Halt::PanicBehindWrite => {
            a.qmp()
                .send_raw(b"{\"execute\": \"x-blockhaus-panic\"}\n")
                .unwrap();
            "guest-panic"
        }
    };
    // A QMP client reads while the appliance stops: everything it says
    // until the connection closes at poweroff.
    let q = a.qmp();
    q.set_timeout(Duration::from_secs(90)).unwrap();
    let mut events: Vec<Value> = q.events.drain(..).collect();
    let mut replies = Vec::new();
    while let Ok(v) = q.recv() {
        if v.get("event").is_some() {
            events.push(v);
        } else {
            replies.push(v);
        }
    }
    let status = a.wait_exit(Duration::from_secs(90));
    let console = a.console();
    let status = status.unwrap_or_else(|| panic!("QEMU did not exit:\n{console}"));
    // This client read everything: nothing may have been dropped for it.
    assert!(!console.contains("QMP client is not reading"), "{console}");
    let expected = match how {
        // The failure exit, after the whole halt sequence.
        Halt::Panic | Halt::PanicBehindWrite => FAILURE_EXIT_STATUS,
        _ => 0,
    };
    assert_eq!(status.code(), Some(expected), "{console}");
    if let Some((v, off, len)) = inflight {
        let acked = replies
            .first()
            .and_then(|r| r["return"].as_str())
            .is_some_and(|s| s.contains(&format!("wrote {len}/{len}")));
        println!("  in-flight write acknowledged: {acked}");
        if acked {
            vols[v].model[off as usize..(off + len) as usize].fill(0xfe);
            vols[v].acked.push((off, len));
        } else {
            vols[v].maybe.push((off, len, 0xfe));
        }
    }
    // Each NBD writer's acknowledged writes are a prefix of its list (a
    // write is sent once the one before was answered); the first one not
    // answered may or may not have landed, the rest were never sent.
    for w in nbd_writers {
        let out = w.client.join().unwrap();
        let acked = out.lines().filter(|l| l.starts_with("wrote ")).count();
        println!(
            "  NBD writer on volume {}: {acked} of {} writes acknowledged",
            w.vol,
            w.writes.len()
        );
        for (i, &(off, len, p)) in w.writes.iter().enumerate() {
            let range = off as usize..(off + len) as usize;
            if i < acked {
                let line = format!("wrote {len}/{len} bytes at offset {off}");
                assert!(out.contains(&line), "{line}:\n{out}");
                vols[w.vol].model[range].fill(p);
                vols[w.vol].acked.push((off, len));
            } else {
                vols[w.vol].maybe.push((off, len, p));
            }
        }
    }
    if matches!(how, Halt::Quit | Halt::QuitBehindWrite) {
        assert!(
            replies.iter().any(|r| r == &json!({"return": {}})),
            "quit answered: {replies:?}"
        );
    }
    let shutdown = events
        .iter()
        .find(|e| e["event"] == "SHUTDOWN")
        .unwrap_or_else(|| panic!("no SHUTDOWN event: {events:?}\n{console}"));
    assert_eq!(shutdown["data"]["reason"], reason, "{shutdown}");

    // ---- the close-all report ----
    let start = console
        .find("=== block layer closed ===")
        .unwrap_or_else(|| panic!("no close-all report:\n{console}"));
    let section = &console[start..];
    assert!(
        !console.contains("NODES LEFT OPEN") && !console.contains("FAILED"),
        "{console}"
    );
    let cancelled: Vec<String> = section
        .lines()
        .find_map(|l| l.trim().strip_prefix("close-all: jobs cancelled: "))
        .map(|r| r.split(", ").map(String::from).collect())
        .unwrap_or_else(|| panic!("{console}"));
    let closed: Vec<&str> = section
        .lines()
        .filter_map(|l| l.trim().strip_prefix("close-all: closed node '"))
        .map(|r| r.split('\'').next().unwrap())
        .collect();
    let all: usize = section
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("close-all: all ")
                .and_then(|r| r.strip_suffix(" nodes closed"))
        })
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no \"all N nodes closed\":\n{console}"));
    assert_eq!(all, closed.len(), "{console}");
    for n in &user_nodes {
        assert!(closed.contains(&n.as_str()), "{n} not closed:\n{console}");
    }
    for id in &jobs {
        let completed: Vec<&Value> = events
            .iter()
            .filter(|e| e["event"] == "BLOCK_JOB_COMPLETED" && e["data"]["device"] == *id)
            .collect();
        for c in &completed {
            assert!(c["data"].get("error").is_none(), "job {id} failed: {c}");
        }
        assert!(
            cancelled.contains(id) || !completed.is_empty(),
            "job {id} neither cancelled nor completed:\n{console}"
        );
    }
    for e in &events {
        assert_ne!(e["event"], "BLOCK_JOB_ERROR", "{e}");
    }

    // ---- the host's view ----
    // Every qcow2 image, jobs' targets included: a force-cancelled job
    // lets its writes in flight land.
    for d in &disks {
        if d.fmt == Fmt::Qcow2 {
            check_clean(&d.path);
        }
    }
    for (v, vol) in vols.iter().enumerate() {
        if let Some(i) = vol.bitmap {
            bitmap_covers(
                &format!("seed {seed}, volume {v}"),
                &disks[i].path,
                &vol.acked,
            );
        }
        if vol.role == Role::Target {
            continue;
        }
        let images: Vec<usize> = match vol.kind {
            Kind::Single(i) => vec![i],
            Kind::Quorum(ids) => ids.to_vec(),
            Kind::Chain(_, t) => vec![t],
        };
        for i in images {
            let got = read_image(&disks[i].path, disks[i].fmt, &scratch);
            compare(&format!("seed {seed}, volume {v}, disk{i}"), &got, vol);
        }
    }
}

/// The bitmap `soak` stored in `img` marks every byte of `acked`.
fn bitmap_covers(what: &str, img: &Path, acked: &[(u64, u64)]) {
    let dirty = dirty_extents(img, "soak");
    for &(off, len) in acked {
        let mut at = off;
        for &(o, l) in &dirty {
            if o <= at && at < o + l {
                at = o + l;
            }
        }
        assert!(
            at >= off + len,
            "{what}: acknowledged write {off}+{len} not in bitmap soak (dirty {dirty:?})"
        );
    }
    println!(
        "  {what}: bitmap soak covers {} acknowledged writes",
        acked.len()
    );
}

impl Vol {
    fn kind_fmts(&self, disks: &[Disk]) -> Vec<Fmt> {
        match self.kind {
            Kind::Single(i) => vec![disks[i].fmt],
            Kind::Quorum(ids) => ids.iter().map(|&i| disks[i].fmt).collect(),
            Kind::Chain(..) => vec![Fmt::Qcow2, Fmt::Qcow2],
        }
    }
}

/// A random write over QMP: mostly sector-aligned, sometimes not; up to
/// 512 KiB; below the NBD writers' region.
fn random_range(rng: &mut Rng) -> (u64, u64) {
    let end = VSIZE - NBD_REGION;
    let len = if rng.chance(1, 4) {
        rng.range(1, 70_000)
    } else {
        rng.range(1, 1024) * 512
    };
    let off = if rng.chance(1, 4) {
        rng.range(0, end - len)
    } else {
        rng.range(0, (end - len) / 512) * 512
    };
    (off, len)
}

#[test]
fn random_graphs_jobs_and_writers_halted_at_a_random_moment() {
    let given: Option<u64> = std::env::var("BLOCKHAUS_SEED")
        .ok()
        .map(|s| s.trim().parse().expect("BLOCKHAUS_SEED is a number"));
    let count: u64 = std::env::var("BLOCKHAUS_SOAK_COUNT")
        .ok()
        .map(|s| s.trim().parse().expect("BLOCKHAUS_SOAK_COUNT is a number"))
        .unwrap_or(if given.is_some() { 1 } else { 5 });
    let first = given.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            ^ u64::from(std::process::id())
    });
    for i in 0..count {
        let seed = first.wrapping_add(i);
        eprintln!("halt_random: seed {seed} ({}/{count})", i + 1);
        one_seed(seed);
    }
}
