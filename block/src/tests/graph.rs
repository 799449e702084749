//! Nodes, names, refcounts, close order, permissions.

use alloc::string::ToString;
use alloc::vec;

use super::harness::Env;
use crate::graph::backend::BackendOptions;
use crate::graph::child::{AttachError, attach_node_child};
use crate::graph::node::{DetectZeroes, NodeOptions, NodeState, unref};
use crate::graph::permission::{ChildRole, Perm};
use crate::graph::registry::{FlushOutcome, NameError, OpenNodeError};
use crate::io::{IoError, ReqFlags};

fn writer() -> BackendOptions {
    BackendOptions::default()
}

#[test]
fn close_runs_parents_before_children_and_flushes_first() {
    let env = Env::new();
    let file = env.mem("file", 4096);
    let fmt = env.fmt("fmt", &file).unwrap();
    env.reg.monitor_adopt(&fmt);
    assert_eq!(file.refcnt(), 1);
    let b = env
        .reg
        .new_backend(writer(), Perm::CONSISTENT_READ | Perm::WRITE, Perm::ALL)
        .unwrap();
    b.insert(&fmt).unwrap();
    assert_eq!(fmt.refcnt(), 2);
    env.run(b.write(0, vec![0xab; 512], ReqFlags::NONE))
        .unwrap();

    // The monitor lets go; the backend still holds the tree open.
    assert!(env.reg.monitor_release(&fmt));
    env.run(unref(fmt.clone()));
    assert_eq!(fmt.state(), NodeState::Open);
    assert!(env.log().is_empty());

    // Ejecting drops the last reference: fmt closes, then file.
    assert!(env.run(b.remove()));
    assert_eq!(
        env.log(),
        [
            "flush fmt",
            "flush file",
            "close fmt (file open: true)",
            "close file"
        ]
    );
    let closed = env.reg.take_closed();
    assert_eq!(
        closed
            .iter()
            .map(|c| c.name.as_str())
            .collect::<alloc::vec::Vec<_>>(),
        ["fmt", "file"]
    );
    assert_eq!(closed[0].flush, FlushOutcome::Flushed);
    assert_eq!(closed[1].flush, FlushOutcome::Clean);
    assert!(env.reg.nodes().is_empty());
    assert_eq!(fmt.state(), NodeState::Closed);
    assert_eq!(env.run(b.read(0, 512)), Err(IoError::Enomedium));
}

#[test]
fn node_names_are_unique_and_generated_when_absent() {
    let env = Env::new();
    let _a = env.mem("disk0", 512);
    assert_eq!(
        env.reg.assign_node_name(Some("disk0")),
        Err(NameError::Duplicate("disk0".into()))
    );
    assert_eq!(
        env.reg
            .assign_node_name(Some("disk0"))
            .unwrap_err()
            .to_string(),
        "Duplicate nodes with node-name='disk0'"
    );
    assert_eq!(
        env.reg
            .assign_node_name(Some("0x"))
            .unwrap_err()
            .to_string(),
        "Invalid node-name: '0x'"
    );
    assert_eq!(
        env.reg
            .assign_node_name(Some("a234567890123456789012345678901234"))
            .unwrap_err(),
        NameError::TooLong
    );
    assert_eq!(
        env.reg.assign_node_name(None),
        Ok(("#block000".into(), true))
    );
    assert_eq!(
        env.reg.assign_node_name(None),
        Ok(("#block001".into(), true))
    );
    let _b = env
        .reg
        .new_backend(
            BackendOptions {
                name: Some("drv".into()),
                ..writer()
            },
            Perm::NONE,
            Perm::ALL,
        )
        .unwrap();
    assert_eq!(
        env.reg
            .assign_node_name(Some("drv"))
            .unwrap_err()
            .to_string(),
        "node-name=drv is conflicting with a device id"
    );
    let e = env.reg.new_backend(
        BackendOptions {
            name: Some("disk0".into()),
            ..writer()
        },
        Perm::NONE,
        Perm::ALL,
    );
    assert_eq!(
        e.err().unwrap().to_string(),
        "Device name 'disk0' conflicts with an existing node name"
    );
    let e = env.reg.new_backend(
        BackendOptions {
            name: Some("drv".into()),
            ..writer()
        },
        Perm::NONE,
        Perm::ALL,
    );
    assert_eq!(
        e.err().unwrap().to_string(),
        "Device with id 'drv' already exists"
    );
}

#[test]
fn second_format_node_on_one_file_conflicts_and_changes_nothing() {
    let env = Env::new();
    let file = env.mem("file", 4096);
    env.reg.monitor_adopt(&file);
    file.ref_();
    let a = env.fmt("a", &file).unwrap();
    file.ref_();
    let err = env.fmt("b", &file).err().unwrap();
    assert_eq!(
        err,
        "Permission conflict on node 'file': permissions 'write, resize' are both required by node 'a' \
         (uses node 'file' as 'file' child) and unshared by node 'b' (uses node 'file' as 'file' child)."
    );
    // The failed open left nothing behind; its reference is ours to undo.
    assert!(file.unref_nonfinal());
    assert_eq!(file.refcnt(), 2);
    assert_eq!(file.parents().len(), 1);
    assert!(env.reg.find_node("b").is_none());
    assert_eq!(env.node_names(), ["file", "a"]);
    let _ = a;
}

#[test]
fn backend_resize_against_export_that_does_not_share_it() {
    let env = Env::new();
    let n = env.mem("disk", 4096);
    env.reg.monitor_adopt(&n);
    let exp = env
        .reg
        .new_backend(
            BackendOptions {
                name: Some("exp".into()),
                ..writer()
            },
            Perm::CONSISTENT_READ | Perm::WRITE,
            Perm::ALL.minus(Perm::RESIZE),
        )
        .unwrap();
    exp.insert(&n).unwrap();
    let resizer = env
        .reg
        .new_backend(writer(), Perm::RESIZE, Perm::ALL)
        .unwrap();
    let e = resizer.insert(&n).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Permission conflict on node 'disk': permissions 'resize' are both required by an unnamed block device \
         (uses node 'disk' as 'root' child) and unshared by block device 'exp' (uses node 'disk' as 'root' child)."
    );
    assert_eq!(n.refcnt(), 2);
    assert!(resizer.root().is_none());
    // Changing perms of an attached backend is checked the same way.
    let reader = env
        .reg
        .new_backend(writer(), Perm::CONSISTENT_READ, Perm::ALL)
        .unwrap();
    reader.insert(&n).unwrap();
    assert!(
        reader
            .set_perm(Perm::CONSISTENT_READ | Perm::RESIZE, Perm::ALL)
            .is_err()
    );
    assert_eq!(reader.perm(), (Perm::CONSISTENT_READ, Perm::ALL));
    assert_eq!(reader.root().unwrap().perm(), Perm::CONSISTENT_READ);
}

#[test]
fn writers_cannot_attach_to_read_only_nodes() {
    let env = Env::new();
    let ro = env.mem_opts(
        "ro",
        512,
        NodeOptions {
            read_only: true,
            ..Default::default()
        },
    );
    let b = env
        .reg
        .new_backend(writer(), Perm::WRITE, Perm::ALL)
        .unwrap();
    assert_eq!(
        b.insert(&ro).unwrap_err().to_string(),
        "Block node is read-only"
    );
    let r = env
        .reg
        .new_backend(writer(), Perm::CONSISTENT_READ, Perm::ALL)
        .unwrap();
    r.insert(&ro).unwrap();
    assert_eq!(
        env.run(ro.write(0, vec![1], ReqFlags::NONE)),
        Err(IoError::Eperm)
    );
}

#[test]
fn cycles_are_refused() {
    let env = Env::new();
    let file = env.mem("file", 512);
    let fmt = env.fmt("fmt", &file).unwrap();
    let e = attach_node_child(&file, "file", ChildRole::DATA, &fmt)
        .err()
        .unwrap();
    assert!(matches!(e, AttachError::Cycle { .. }));
    assert_eq!(
        e.to_string(),
        "Making 'fmt' a file child of 'file' would create a cycle"
    );
    assert!(file.children().is_empty());
}

#[test]
fn failed_open_reports_the_attach_error() {
    let env = Env::new();
    let ro = env.mem_opts(
        "ro",
        512,
        NodeOptions {
            read_only: true,
            ..Default::default()
        },
    );
    // A writable format over a read-only file wants WRITE on it.
    let e = env.fmt("f", &ro).err().unwrap();
    assert_eq!(e, "Block node is read-only");
    let _ = OpenNodeError::Name(NameError::TooLong);
    assert_eq!(ro.refcnt(), 1);
}

#[test]
fn generic_request_path() {
    let env = Env::new();
    let n = env.mem_opts(
        "n",
        1024,
        NodeOptions {
            detect_zeroes: DetectZeroes::Unmap,
            discard_unmap: true,
            ..Default::default()
        },
    );
    env.run(n.write(0, vec![7; 1024], ReqFlags::NONE)).unwrap();
    // Past the end reads as zeroes at node level.
    let d = env.run(n.read(1000, 48, ReqFlags::NONE)).unwrap();
    assert_eq!(&d[..24], &[7; 24]);
    assert_eq!(&d[24..], &[0; 24]);
    // detect-zeroes=unmap turns a zero write into an unmapping write-zeroes.
    env.run(n.write(0, vec![0; 512], ReqFlags::NONE)).unwrap();
    let st = env.run(n.block_status(0, 1024)).unwrap();
    assert_eq!((st.allocated, st.len), (false, 512));
    let st = env.run(n.block_status(512, 4096)).unwrap();
    assert_eq!((st.allocated, st.data, st.len), (true, true, 512));
    assert_eq!(env.run(n.block_status(1024, 10)).unwrap().len, 0);
    // FUA is emulated with a flush.
    env.log.borrow_mut().clear();
    env.run(n.write(0, vec![1; 8], ReqFlags::FUA)).unwrap();
    assert_eq!(env.log(), ["flush n"]);
    assert!(!n.is_dirty());
    // discard=ignore makes discard a no-op.
    let keep = env.mem("keep", 512);
    env.run(keep.write(0, vec![9; 512], ReqFlags::NONE))
        .unwrap();
    env.run(keep.discard(0, 512)).unwrap();
    assert_eq!(env.run(keep.read(0, 1, ReqFlags::NONE)).unwrap(), [9]);
}

#[test]
fn child_edges_enforce_their_permissions() {
    let env = Env::new();
    let file = env.mem("file", 512);
    file.ref_();
    let fmt = env.fmt("fmt", &file).unwrap();
    let edge = fmt.file().unwrap();
    assert!(edge.perm().contains(Perm::WRITE));
    crate::graph::child::set_child_perm(&edge, Perm::CONSISTENT_READ, Perm::ALL).unwrap();
    assert_eq!(
        env.run(edge.write(0, vec![1], ReqFlags::NONE)),
        Err(IoError::Eperm)
    );
    assert_eq!(env.run(edge.truncate(1024)), Err(IoError::Eperm));
    assert_eq!(env.run(edge.read(0, 1, ReqFlags::NONE)), Ok(vec![0]));
}

#[test]
fn force_share_children_share_everything() {
    let env = Env::new();
    for force_share in [false, true] {
        let ro = env.mem_opts(
            "ro",
            512,
            NodeOptions {
                read_only: true,
                force_share,
                ..Default::default()
            },
        );
        ro.ref_();
        let fmt_opts = NodeOptions {
            read_only: true,
            ..Default::default()
        };
        let drv = super::mem::RecFmt {
            label: "f".into(),
            log: env.log.clone(),
        };
        let f = env
            .reg
            .open_node(
                None,
                alloc::boxed::Box::new(drv),
                fmt_opts,
                Default::default(),
                vec![("file".into(), super::mem::fmt_file(), ro.clone())],
            )
            .unwrap();
        let resizer = env
            .reg
            .new_backend(writer(), Perm::RESIZE, Perm::ALL)
            .unwrap();
        assert_eq!(
            resizer.insert(&ro).is_ok(),
            force_share,
            "force-share={force_share}"
        );
        env.run(resizer.delete());
        env.run(unref(f));
        env.run(unref(ro));
    }
}
