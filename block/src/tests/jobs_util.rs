//! Helpers for the block job tests: memory and qcow2 nodes over QMP, named
//! backends that play the guest, writers that run while a job copies, and
//! a loop that advances simulated time until a condition holds.

use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::Cell;

use serde_json::{Value, json};

use super::harness::{Env, Qmp};
use crate::graph::backend::{Backend, BackendOptions};
use crate::graph::node::Node;
use crate::graph::permission::Perm;
use crate::io::ReqFlags;
use crate::job::RegistryJobs;
use crate::timer::Clock;

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;

/// A memory node `name` of `size` bytes filled with a pattern derived
/// from `seed` (every 512-byte sector different).
pub fn mem_node(q: &mut Qmp, name: &str, size: u64, seed: u8) -> Rc<Node> {
    q.ok(
        "blockdev-add",
        json!({"driver": "mem", "node-name": name, "label": name, "size": size}),
    );
    let n = node(q, name);
    if seed != 0 {
        let mut d = Env::mem_driver(&n).data.borrow_mut();
        for (i, b) in d.iter_mut().enumerate() {
            *b = seed.wrapping_add((i / 512) as u8).wrapping_mul(7) ^ (i as u8);
        }
    }
    n
}

pub fn node(q: &Qmp, name: &str) -> Rc<Node> {
    match q.bl.registry().find_node(name) {
        Some(n) => n,
        None => panic!("no node {name}"),
    }
}

/// The bytes of a memory node.
pub fn mem_bytes(n: &Node) -> Vec<u8> {
    Env::mem_driver(n).data.borrow().clone()
}

/// Reads a whole node through a temporary backend (through its chain).
pub fn read_all(q: &Qmp, n: &Rc<Node>) -> Vec<u8> {
    let reg = q.bl.registry().clone();
    let n = n.clone();
    let r = q.bl.wait(async move {
        let b = reg
            .new_backend(BackendOptions::default(), Perm::CONSISTENT_READ, Perm::ALL)
            .map_err(|e| format!("{e}"))?;
        b.insert(&n).map_err(|e| format!("{e}"))?;
        let len = b.get_length().map_err(|e| format!("{e}"))?;
        let d = b.read(0, len as usize).await.map_err(|e| format!("{e}"));
        b.delete().await;
        d
    });
    match r {
        Ok(Ok(d)) => d,
        Ok(Err(e)) => panic!("read: {e}"),
        Err(e) => panic!("read: {}", e.desc),
    }
}

/// A named backend `name` on `node` (a guest's disk, an export).
pub fn guest(q: &Qmp, name: &str, node: &Rc<Node>) -> Rc<Backend> {
    let reg = q.bl.registry();
    let b = match reg.new_backend(
        BackendOptions {
            name: Some(name.into()),
            ..BackendOptions::default()
        },
        Perm::CONSISTENT_READ | Perm::WRITE,
        Perm::ALL.minus(Perm::RESIZE),
    ) {
        Ok(b) => b,
        Err(e) => panic!("{e}"),
    };
    if let Err(e) = b.insert(node) {
        panic!("{e}");
    }
    b
}

/// A guest writer: `count` writes of `len` bytes at pseudo-random
/// offsets below `size`, one every millisecond of simulated time, each
/// with its own byte; the model keeps what the disk must contain.
pub struct Writer {
    pub done: Rc<Cell<u32>>,
    /// What the disk holds after every acknowledged write.
    pub model: Rc<core::cell::RefCell<Vec<u8>>>,
    /// The write in flight, if any: `(offset, len)`.
    pub inflight: Rc<Cell<Option<(u64, u64)>>>,
}

pub fn start_writer(
    q: &Qmp,
    b: &Rc<Backend>,
    model: Vec<u8>,
    count: u32,
    len: u64,
    seed: u64,
) -> Writer {
    let done = Rc::new(Cell::new(0));
    let model = Rc::new(core::cell::RefCell::new(model));
    let inflight = Rc::new(Cell::new(None));
    let (d, m, b, inf) = (done.clone(), model.clone(), b.clone(), inflight.clone());
    let timers = q.bl.executor().timers().clone();
    let clock: Rc<dyn Clock> = q.clock.clone();
    let size = m.borrow().len() as u64;
    q.bl.executor().spawn(async move {
        let mut x = seed | 1;
        for i in 0..count {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let off = (x % (size / len)) * len;
            let byte = (i as u8).wrapping_mul(31).wrapping_add(seed as u8) | 1;
            let data = vec![byte; len as usize];
            inf.set(Some((off, len)));
            match b.write(off, data, ReqFlags::NONE).await {
                Ok(()) => {}
                // The halt path ejected the disk under the guest.
                Err(crate::io::IoError::Enomedium) => return,
                Err(e) => panic!("guest write at {off}: {e}"),
            }
            m.borrow_mut()[off as usize..(off + len) as usize].fill(byte);
            inf.set(None);
            d.set(i + 1);
            let t = clock.now_ns() + 1_000_000;
            timers.sleep_until(clock.clone(), t).await;
        }
    });
    Writer {
        done,
        model,
        inflight,
    }
}

/// Runs tasks and advances simulated time (to the next timer) until
/// `cond` holds.
pub fn run_until(q: &Qmp, what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..200_000 {
        q.settle();
        if cond() {
            return;
        }
        let exec = q.bl.executor();
        match exec.timers().next_deadline() {
            Some(d) => {
                q.clock.set(d);
                exec.timers().fire_expired(d);
            }
            None => panic!("stalled waiting for {what}"),
        }
    }
    panic!("gave up waiting for {what}");
}

/// The status of job `id` ("gone" once dismissed).
pub fn status(q: &Qmp, id: &str) -> String {
    match q.bl.registry().find_job(id) {
        Some(j) => j.status().as_str().into(),
        None => String::from("gone"),
    }
}

/// Job events as a compact list: statuses and event names.
pub fn event_trail(events: &[(String, Value)]) -> Vec<String> {
    events
        .iter()
        .filter(|(n, _)| n.starts_with("JOB_") || n.starts_with("BLOCK_JOB_"))
        .map(|(n, d)| {
            if n == "JOB_STATUS_CHANGE" {
                d["status"].as_str().unwrap_or("?").into()
            } else {
                n.clone()
            }
        })
        .collect()
}

/// The data of the first event called `name`.
pub fn event<'a>(events: &'a [(String, Value)], name: &str) -> &'a Value {
    match events.iter().find(|(n, _)| n == name) {
        Some((_, d)) => d,
        None => panic!("no {name} in {events:?}"),
    }
}

/// A qcow2 image of `size` on a new 64 MiB memory file `file`, opened as
/// `name` over `backing` (`None`: no backing file).
pub fn qcow2(q: &mut Qmp, name: &str, file: &str, size: u64, backing: Option<&str>) -> Rc<Node> {
    q.ok(
        "blockdev-add",
        json!({"driver": "mem", "node-name": file, "label": file, "size": 64 * MIB}),
    );
    q.ok(
        "blockdev-create",
        json!({"job-id": "create", "options": {"driver": "qcow2", "file": file, "size": size}}),
    );
    run_until(q, "create", || status(q, "create") == "concluded");
    q.ok("job-dismiss", json!({"id": "create"}));
    let backing = match backing {
        Some(b) => Value::String(b.into()),
        None => Value::Null,
    };
    q.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": name, "file": file, "backing": backing}),
    );
    node(q, name)
}

/// Writes `len` bytes of `byte` at `off` into `name` with qemu-io.
pub fn io_write(q: &mut Qmp, name: &str, off: u64, len: u64, byte: u8) {
    let out = q.io(name, &format!("write -P {byte} {off} {len}"));
    assert!(out.contains("wrote"), "{out}");
}

/// Asserts that close-all closes every node and leaves nothing open.
pub fn close_all_clean(q: &Qmp) -> crate::close_all::CloseAllReport {
    match q.bl.close_all() {
        Ok(Ok(r)) => {
            assert!(r.is_clean());
            assert!(q.bl.registry().nodes().is_empty());
            r
        }
        Ok(Err(e)) => panic!("{e}"),
        Err(e) => panic!("{}", e.desc),
    }
}
