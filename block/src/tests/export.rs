//! NBD exports ([`crate::export`]): the table and its lifecycle, and
//! requests executed on a memory node through the real NBD engine.

use alloc::rc::Rc;
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;
use serde_json::json;

use super::harness::Env;
use crate::dirty_bitmap::NamedBitmap;
use crate::export::bitmaps::BitmapRef;
use crate::export::{ExportTable, NbdExport, NewExport, Target, execute};
use crate::graph::backend::BackendOptions;
use crate::graph::node::NodeOptions;
use crate::graph::permission::Perm;
use crate::io::{BlockStatus, IoError, IoResult, ReqFlags};
use crate::nbd::tests::peer::{Peer, Reply};
use crate::nbd::wire::{self, cmd, cmd_flags, get_u32};
use crate::nbd::{Completion, Export, ExportSet, MetaContext, Op};

const MIB: usize = 1 << 20;

fn new_export<'a>(id: &'a str, node: &'a str, writable: bool) -> NewExport<'a> {
    NewExport {
        id,
        node_name: node,
        name: None,
        description: None,
        writable,
        on_eject: None,
        allocation_depth: false,
        bitmaps: Vec::new(),
    }
}

/// The exports a client is offered.
fn offered(t: &ExportTable) -> Vec<Export> {
    let mut v = Vec::new();
    t.for_each(&mut |e| v.push(e.clone()));
    v
}

/// Runs the engine's requests on the export's backend, completing them in
/// reverse order, until none is left.
fn serve(env: &Env, p: &mut Peer, e: &NbdExport) {
    loop {
        p.take_requests();
        if p.held.is_empty() {
            break;
        }
        while let Some(r) = p.held.pop() {
            let c = env.run(execute(e, r.op));
            p.conn.complete(r.id, c).expect("completes");
        }
        p.drain();
        p.pump();
    }
    p.drain();
}

fn flushes(env: &Env) -> usize {
    env.log().iter().filter(|l| *l == "flush disk0").count()
}

#[test]
fn a_memory_node_served_through_the_engine() {
    let env = Env::new();
    let unmap = NodeOptions {
        discard_unmap: true,
        ..Default::default()
    };
    let node = env.mem_opts("disk0", MIB, unmap);
    let table = ExportTable::new(env.reg.clone());
    let e = table
        .add(NewExport {
            name: Some("disk"),
            description: Some("the disk"),
            ..new_export("e0", "disk0", true)
        })
        .unwrap();
    let offered = offered(&table);
    assert_eq!(offered.len(), 1);
    assert_eq!(offered[0].name, "disk");
    assert_eq!(offered[0].description, "the disk");
    assert_eq!(offered[0].size, MIB as u64);
    assert!(!offered[0].features.read_only && offered[0].features.trim);
    assert!(!offered[0].features.rotational);

    let mut p = Peer::new(offered);
    p.connect("disk", true, false);
    p.write(0, 1, 4096, &[0x5a; 8192]);
    serve(&env, &mut p, &e);
    assert_eq!(
        p.reply(),
        Reply::Simple {
            error: 0,
            cookie: 1
        }
    );
    p.request(0, cmd::READ, 2, 4096, 8192);
    serve(&env, &mut p, &e);
    assert_eq!(p.structured_read(2, 4096, 8192), vec![0x5a; 8192]);
    assert_eq!(
        Env::mem_driver(&node).data.borrow()[4096..12288],
        [0x5a; 8192]
    );

    // A trim with FUA is a discard, then a flush.
    let before = flushes(&env);
    p.request(0, cmd::TRIM, 3, 4096, 4096);
    serve(&env, &mut p, &e);
    assert_eq!(
        p.reply(),
        Reply::Simple {
            error: 0,
            cookie: 3
        }
    );
    assert_eq!(flushes(&env), before);
    p.request(cmd_flags::FUA, cmd::TRIM, 4, 8192, 4096);
    serve(&env, &mut p, &e);
    assert_eq!(
        p.reply(),
        Reply::Simple {
            error: 0,
            cookie: 4
        }
    );
    assert_eq!(flushes(&env), before + 1);
    assert!(
        Env::mem_driver(&node).data.borrow()[4096..12288]
            .iter()
            .all(|&b| b == 0)
    );

    // Block status: the node's own answer, as one extent.
    p.request(0, cmd::BLOCK_STATUS, 5, 4096, 4096);
    serve(&env, &mut p, &e);
    let r = p.full_reply();
    let Reply::Chunk { kind, payload, .. } = &r[0] else {
        panic!("{r:?}");
    };
    assert_eq!(*kind, wire::reply_type::BLOCK_STATUS);
    // Context id, then (length, flags): a hole reading as zeroes.
    assert_eq!(get_u32(payload, 4..8), 4096);
    assert_eq!(get_u32(payload, 8..12), 3);
    assert_eq!(payload.len(), 12, "one extent");
}

/// A target with no allocation information, recording what it is asked.
#[derive(Default)]
struct Blind {
    calls: RefCell<Vec<String>>,
}

impl Blind {
    fn note(&self, what: &str) {
        self.calls.borrow_mut().push(what.into());
    }
}

impl Target for Blind {
    async fn read(&self, _: u64, _: u64) -> IoResult<Completion> {
        Err(IoError::Eio)
    }
    async fn write(&self, _: u64, _: Vec<u8>, _: ReqFlags) -> IoResult<()> {
        self.note("write");
        Ok(())
    }
    async fn write_zeroes(&self, _: u64, _: u64, _: ReqFlags) -> IoResult<()> {
        self.note("write-zeroes");
        Ok(())
    }
    async fn discard(&self, _: u64, _: u64) -> IoResult<()> {
        self.note("discard");
        Err(IoError::Enotsup)
    }
    async fn flush(&self) -> IoResult<()> {
        self.note("flush");
        Ok(())
    }
    async fn block_status(&self, _: u64, _: u64) -> IoResult<Vec<BlockStatus>> {
        Err(IoError::Enotsup)
    }
}

#[test]
fn execute_falls_back_to_data_and_stops_a_failed_trim_before_its_flush() {
    let env = Env::new();
    let t = Blind::default();
    let status = Op::BlockStatus {
        offset: 512,
        len: 4096,
        req_one: false,
        contexts: vec![(1, MetaContext::BaseAllocation)],
    };
    assert_eq!(
        env.run(execute(&t, status)),
        Completion::Extent(BlockStatus::data(4096))
    );
    let trim = Op::Trim {
        offset: 0,
        len: 512,
        flags: ReqFlags::FUA,
    };
    assert_eq!(
        env.run(execute(&t, trim)),
        Completion::Error(IoError::Enotsup)
    );
    assert_eq!(
        *t.calls.borrow(),
        ["discard"],
        "no flush after a failed discard"
    );
    let cache = Op::Cache {
        offset: 0,
        len: 512,
    };
    assert_eq!(env.run(execute(&t, cache)), Completion::Done);
    let read = Op::Read {
        offset: 0,
        len: 512,
    };
    assert_eq!(env.run(execute(&t, read)), Completion::Error(IoError::Eio));
}

#[test]
fn add_checks_ids_names_and_read_only_nodes_with_qemus_texts() {
    let env = Env::new();
    env.mem("disk0", MIB);
    env.mem_opts(
        "ro0",
        MIB,
        NodeOptions {
            read_only: true,
            ..Default::default()
        },
    );
    let table = ExportTable::new(env.reg.clone());
    let err = |r: Result<Rc<NbdExport>, String>| r.err().unwrap_or_default();
    assert_eq!(
        err(table.add(new_export("#x", "disk0", false))),
        "Invalid block export id"
    );
    table.add(new_export("e0", "disk0", false)).unwrap();
    assert_eq!(
        err(table.add(new_export("e0", "disk0", false))),
        "Block export id 'e0' is already in use"
    );
    assert_eq!(
        err(table.add(new_export("e1", "disk0", false))),
        "NBD server already has export named 'disk0'"
    );
    assert_eq!(
        err(table.add(new_export("e1", "ro0", true))),
        "Cannot export read-only node as writable"
    );
    assert!(table.add(new_export("e1", "nope", false)).is_err());
    let long = "x".repeat(4097);
    assert_eq!(
        err(table.add(NewExport {
            name: Some(&long),
            ..new_export("e1", "ro0", false)
        })),
        alloc::format!("export name '{long}' too long")
    );
    let ro = table.add(new_export("e1", "ro0", false)).unwrap();
    let f = ro.describe().features;
    assert!(f.read_only && f.flush && !f.trim);
    assert_eq!(
        table.all().iter().map(|e| e.id.clone()).collect::<Vec<_>>(),
        ["e0", "e1"]
    );
}

#[test]
fn an_export_holds_its_node_against_resize_until_reaped_after_its_last_client() {
    let env = Env::new();
    let node = env.mem("disk0", MIB);
    let table = ExportTable::new(env.reg.clone());
    let e = table.add(new_export("e0", "disk0", true)).unwrap();
    assert_eq!(e.backend.perm().0, Perm::CONSISTENT_READ | Perm::WRITE);
    assert_eq!(e.backend.perm().1, Perm::ALL.minus(Perm::RESIZE));
    assert_eq!(node.refcnt(), 2);

    e.clients.set(1);
    e.request_shutdown(false);
    assert!(!table.reap(), "a client is still there");
    assert!(table.by_name("disk0").is_none() && table.find("disk0").is_none());
    assert!(offered(&table).is_empty());
    assert!(table.by_id("e0").is_some(), "still listed, shutting down");
    assert!(!e.hard.get());

    e.clients.set(0);
    assert!(table.reap());
    env.settle();
    assert!(table.all().is_empty());
    assert_eq!(node.refcnt(), 1, "the export's backend is gone");
    assert_eq!(
        env.events.drain(),
        [("BLOCK_EXPORT_DELETED".to_string(), json!({"id": "e0"}))]
    );
    assert!(!table.reap(), "nothing more to reap");
}

#[test]
fn a_legacy_export_follows_its_backends_eject_and_close_all_ends_every_export() {
    let env = Env::new();
    let node = env.mem("disk0", MIB);
    env.mem("disk1", MIB);
    let named = env
        .reg
        .new_backend(
            BackendOptions {
                name: Some("drive0".into()),
                ..Default::default()
            },
            Perm::CONSISTENT_READ,
            Perm::ALL,
        )
        .unwrap();
    named.insert(&node).unwrap();
    let table = ExportTable::new(env.reg.clone());
    let e = table
        .add(NewExport {
            on_eject: Some(named.clone()),
            ..new_export("drive0", "disk0", false)
        })
        .unwrap();
    table.add(new_export("e1", "disk1", false)).unwrap();
    assert!(env.run(named.remove()));
    assert!(
        e.shutting_down.get() && e.hard.get(),
        "eject: hard shutdown"
    );
    assert!(table.reap());
    env.settle();
    assert_eq!(
        env.events.drain(),
        [("BLOCK_EXPORT_DELETED".to_string(), json!({"id": "drive0"}))]
    );

    assert_eq!(table.close_all(), ["e1"]);
    assert!(table.all().is_empty());
    assert_eq!(
        env.events.drain(),
        [("BLOCK_EXPORT_DELETED".to_string(), json!({"id": "e1"}))]
    );
}

/// The (context id, [(length, flags)]) of each block status chunk of a
/// reply, and whether the last one ends it.
fn status_chunks(r: &[Reply]) -> Vec<(u32, Vec<(u32, u32)>)> {
    assert!(r.last().is_some_and(Reply::done), "{r:?}");
    r.iter()
        .map(|c| {
            let Reply::Chunk { kind, payload, .. } = c else {
                panic!("{c:?}");
            };
            assert_eq!(*kind, wire::reply_type::BLOCK_STATUS, "{c:?}");
            let ext = payload[4..]
                .chunks(8)
                .map(|d| (get_u32(d, 0..4), get_u32(d, 4..8)))
                .collect();
            (get_u32(payload, 0..4), ext)
        })
        .collect()
}

#[test]
fn an_export_serves_its_bitmap_and_allocation_depth_and_keeps_the_bitmap_busy() {
    let env = Env::new();
    let node = env.mem("disk0", MIB);
    node.dirty_bitmaps_mut()
        .push(NamedBitmap::new("b0", MIB as u64, 4096));
    let table = ExportTable::new(env.reg.clone());
    let e = table
        .add(NewExport {
            name: Some("disk"),
            allocation_depth: true,
            bitmaps: vec![BitmapRef::Local("b0".into())],
            ..new_export("e0", "disk0", true)
        })
        .unwrap();
    assert!(node.dirty_bitmaps()[0].busy);
    let offered = offered(&table);
    assert_eq!(offered[0].bitmaps, ["b0"]);
    assert!(offered[0].allocation_depth);

    let mut p = Peer::new(offered);
    p.connect_with(
        "disk",
        true,
        false,
        &[
            "base:allocation",
            "qemu:allocation-depth",
            "qemu:dirty-bitmap:b0",
        ],
    );
    p.write(0, 1, 8192, &[0x5a; 4096]);
    serve(&env, &mut p, &e);
    p.reply();
    p.request(0, cmd::BLOCK_STATUS, 2, 0, 65536);
    serve(&env, &mut p, &e);
    let r = p.full_reply();
    assert_eq!(
        status_chunks(&r),
        [
            (1, vec![(65536, 0)]),
            (2, vec![(65536, 1)]),
            (3, vec![(8192, 0), (4096, 1), (65536 - 12288, 0)]),
        ]
    );
    // One descriptor each under NBD_CMD_FLAG_REQ_ONE, none past the
    // request.
    p.request(cmd_flags::REQ_ONE, cmd::BLOCK_STATUS, 3, 8192, 1024);
    serve(&env, &mut p, &e);
    let r = p.full_reply();
    assert_eq!(status_chunks(&r)[2], (3, vec![(1024, 1)]));

    // Gone with the export: the bitmap is free again.
    e.request_shutdown(true);
    table.reap();
    assert!(!node.dirty_bitmaps()[0].busy);
}

#[test]
fn exported_bitmaps_are_refused_with_qemus_texts() {
    let env = Env::new();
    let node = env.mem("disk0", MIB);
    let mut b1 = NamedBitmap::new("b1", MIB as u64, 65536);
    b1.enabled = false;
    node.dirty_bitmaps_mut()
        .extend([NamedBitmap::new("b0", MIB as u64, 65536), b1]);
    let table = ExportTable::new(env.reg.clone());
    let add = |bitmaps: Vec<BitmapRef>, writable: bool| {
        table
            .add(NewExport {
                bitmaps,
                ..new_export("e0", "disk0", writable)
            })
            .err()
    };
    let local = |n: &str| BitmapRef::Local(n.into());
    assert_eq!(
        add(vec![local("nope")], true).as_deref(),
        Some("Bitmap 'nope' is not found")
    );
    assert_eq!(
        add(vec![local("b0")], false).as_deref(),
        Some("Enabled bitmap 'b0' incompatible with readonly export")
    );
    let ext = |node: &str, name: &str| BitmapRef::External {
        node: node.into(),
        name: name.into(),
    };
    assert_eq!(
        add(vec![ext("nada", "b0")], true).as_deref(),
        Some("Node 'nada' not found")
    );
    assert_eq!(
        add(vec![ext("disk0", "b9")], true).as_deref(),
        Some("Dirty bitmap 'b9' not found")
    );
    node.dirty_bitmaps_mut()[0].inconsistent = true;
    assert_eq!(
        add(vec![local("b1"), ext("disk0", "b0")], true).as_deref(),
        Some("Bitmap 'b0' is inconsistent and cannot be used")
    );
    assert!(
        node.dirty_bitmaps().iter().all(|b| !b.busy),
        "no half claim"
    );
    // A disabled bitmap goes on a read-only export; then it is busy.
    assert_eq!(add(vec![local("b1")], false), None);
    let e1 = table.add(NewExport {
        name: Some("d1"),
        bitmaps: vec![local("b1")],
        ..new_export("e1", "disk0", true)
    });
    assert_eq!(
        e1.err().as_deref(),
        Some("Bitmap 'b1' is currently in use by another operation and cannot be used")
    );
}
