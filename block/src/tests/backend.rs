//! Backends: ENOMEDIUM, eject with notifiers and drain, queuing, trays.

use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;

use alloc::string::ToString;

use super::harness::Env;
use super::mem::Gate;
use crate::graph::backend::BackendOptions;
use crate::graph::node::NodeState;
use crate::graph::permission::Perm;
use crate::io::{IoError, ReqFlags};

fn rw() -> (Perm, Perm) {
    (Perm::CONSISTENT_READ | Perm::WRITE, Perm::ALL)
}

#[test]
fn empty_backend_fails_with_enomedium() {
    let env = Env::new();
    let (p, s) = rw();
    let b = env
        .reg
        .new_backend(BackendOptions::default(), p, s)
        .unwrap();
    assert_eq!(env.run(b.read(0, 512)), Err(IoError::Enomedium));
    assert_eq!(
        env.run(b.write(0, vec![1], ReqFlags::NONE)),
        Err(IoError::Enomedium)
    );
    assert_eq!(env.run(b.flush()), Err(IoError::Enomedium));
    assert_eq!(b.get_length(), Err(IoError::Enomedium));
    assert_eq!(IoError::Enomedium.to_string(), "No medium found");
}

#[test]
fn ejected_backend_fails_while_second_backend_on_the_tree_works() {
    let env = Env::new();
    let file = env.mem("file", 4096);
    let fmt = env.fmt("fmt", &file).unwrap();
    env.reg.monitor_adopt(&fmt);
    let (p, s) = rw();
    let b1 = env
        .reg
        .new_backend(
            BackendOptions {
                name: Some("b1".into()),
                ..Default::default()
            },
            p,
            s,
        )
        .unwrap();
    let b2 = env
        .reg
        .new_backend(
            BackendOptions {
                name: Some("b2".into()),
                ..Default::default()
            },
            p,
            s,
        )
        .unwrap();
    b1.insert(&fmt).unwrap();
    b2.insert(&fmt).unwrap();
    assert_eq!(fmt.refcnt(), 3);
    env.run(b1.write(0, vec![0x5a; 512], ReqFlags::NONE))
        .unwrap();

    assert!(env.run(b1.remove()));
    assert_eq!(env.run(b1.read(0, 512)), Err(IoError::Enomedium));
    assert_eq!(
        env.run(b1.write(0, vec![1], ReqFlags::NONE)),
        Err(IoError::Enomedium)
    );
    assert_eq!(env.run(b2.read(0, 512)).unwrap(), vec![0x5a; 512]);
    env.run(b2.write(512, vec![1; 512], ReqFlags::FUA)).unwrap();
    assert_eq!(fmt.refcnt(), 2);
    assert_eq!(fmt.state(), NodeState::Open);
    assert!(!env.run(b1.remove()), "a second eject finds nothing");
}

#[test]
fn eject_fires_notifiers_then_drains_then_detaches() {
    let env = Env::new();
    let n = env.mem("n", 4096);
    let gate = Gate::closed();
    *Env::mem_driver(&n).gate.borrow_mut() = Some(gate.clone());
    let (p, s) = rw();
    let b = env
        .reg
        .new_backend(BackendOptions::default(), p, s)
        .unwrap();
    b.insert(&n).unwrap();
    // The backend holds the only other reference: drop ours.
    env.run(crate::graph::node::unref(n.clone()));
    let seen: Rc<RefCell<Vec<String>>> = Rc::default();
    let s2 = seen.clone();
    b.add_remove_notifier(Rc::new(move |b| {
        s2.borrow_mut().push(alloc::format!(
            "remove, root present: {}",
            b.root().is_some()
        ));
    }));

    let b1 = b.clone();
    let w = env
        .exec
        .spawn(async move { b1.write(0, vec![3; 512], ReqFlags::NONE).await });
    env.settle();
    assert_eq!(b.in_flight(), 1);
    assert_eq!(gate.waiting(), 1);
    let b2 = b.clone();
    let ej = env.exec.spawn(async move { b2.remove().await });
    env.settle();
    // Notified, draining, not yet detached.
    assert_eq!(*seen.borrow(), ["remove, root present: true"]);
    assert!(!ej.is_finished());
    assert!(b.root().is_some());
    // A request arriving now waits for the drain and then finds no medium.
    let b3 = b.clone();
    let late = env.exec.spawn(async move { b3.read(0, 512).await });
    env.settle();
    assert!(!late.is_finished());
    gate.open();
    env.settle();
    assert_eq!(w.try_take(), Some(Ok(())));
    assert_eq!(ej.try_take(), Some(true));
    assert_eq!(late.try_take(), Some(Err(IoError::Enomedium)));
    assert_eq!(n.state(), NodeState::Closed);
    assert!(env.log().contains(&"close n".into()));
}

#[test]
fn insert_notifiers_and_medium_errors() {
    let env = Env::new();
    let n = env.mem("n", 1024);
    let (p, s) = rw();
    let b = env
        .reg
        .new_backend(
            BackendOptions {
                name: Some("drv".into()),
                ..Default::default()
            },
            p,
            s,
        )
        .unwrap();
    let count = Rc::new(core::cell::Cell::new(0));
    let c = count.clone();
    b.add_insert_notifier(Rc::new(move |_| c.set(c.get() + 1)));
    b.insert(&n).unwrap();
    assert_eq!(count.get(), 1);
    assert_eq!(
        b.insert(&n).unwrap_err().to_string(),
        "There already is a medium in device 'drv'"
    );
    // Out of range is EIO at the backend, a missing permission EPERM.
    assert_eq!(env.run(b.read(1000, 100)), Err(IoError::Eio));
    assert_eq!(env.run(b.truncate(2048)), Err(IoError::Eperm));
    assert_eq!(b.get_length(), Ok(1024));
}

#[test]
fn open_tray_hides_the_medium() {
    let env = Env::new();
    let n = env.mem("n", 1024);
    let (p, s) = rw();
    let b = env
        .reg
        .new_backend(
            BackendOptions {
                name: Some("cd".into()),
                tray: true,
                ..Default::default()
            },
            p,
            s,
        )
        .unwrap();
    b.insert(&n).unwrap();
    b.set_tray_open(true);
    assert_eq!(env.run(b.read(0, 1)), Err(IoError::Enomedium));
    b.set_tray_open(false);
    assert_eq!(env.run(b.read(0, 1)), Ok(vec![0]));
    let ev = env.events.drain();
    assert_eq!(ev.len(), 3);
    assert_eq!(ev[0].0, "DEVICE_TRAY_MOVED");
    assert_eq!(ev[0].1["tray-open"], true);
    // The read with the tray open failed on a named backend.
    assert_eq!(ev[1].0, "BLOCK_IO_ERROR");
    assert_eq!(ev[1].1["reason"], "No medium found");
    assert_eq!(ev[2].1["device"], "cd");
}
