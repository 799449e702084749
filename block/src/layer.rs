//! The block layer as one value: the registry, the driver table, the
//! executor and the platform hook that lets synchronous callers wait.
//!
//! QMP handlers are synchronous (`fn(&mut C, &Args) -> Result<Value, _>`)
//! but I/O is asynchronous. A handler that must wait — for a flush, a
//! drain, a close cascade, a qemu-io request — calls [`BlockLayer::wait`],
//! which runs the executor and polls the [`Platform`] (device completion
//! rings, timers; halting the CPU when nothing is ready) until the future
//! completes, exactly as QEMU's monitor runs a nested `AIO_WAIT_WHILE`.
//! Other tasks (NBD connections, jobs) keep running meanwhile. The kernel
//! calls QMP handlers from its main loop, never from inside a task.
//!
//! # Wiring it into the kernel
//! ```
//! use std::rc::Rc;
//! use block::exec::{Executor, Platform};
//! use block::layer::{BlockContext, BlockLayer};
//! use block::open::DriverClass;
//! use block::qmp::{Dispatcher, QmpContext, Session, VersionInfo};
//! use block::timer::{Clock, ManualClock};
//!
//! // 1. The platform: poll devices and timers, halt when idle.
//! struct Kernel { clock: Rc<ManualClock> }
//! impl Platform for Kernel {
//!     fn poll(&self, exec: &Executor, may_halt: bool) -> bool {
//!         // virtio::poll_completions();     // wakes request futures
//!         exec.timers().fire_expired(self.clock.now_ns());
//!         if may_halt && !exec.has_ready() {
//!             // program the LAPIC timer for exec.timers().next_deadline(); hlt
//!         }
//!         true // interrupts can always wake us
//!     }
//! }
//! let clock = Rc::new(ManualClock::new());
//! let exec = Executor::new();
//! let mut bl = BlockLayer::new(exec.clone(), clock.clone(), Rc::new(Kernel { clock: clock.clone() }));
//!
//! // 2. Device drivers: a class for `blockdev-add {"driver": "virtio-blk", ...}`
//! //    (the closure may capture the kernel's disk table) ...
//! bl.register_driver(DriverClass::new("virtio-blk", |d| {
//!     let _serial = d.opts.str("serial")?;
//!     Err(block::qmp::QmpError::generic("no such disk"))
//! }));
//! //    ... and/or probed disks as ready monitor-owned nodes:
//! //    bl.add_node("vda", Box::new(VirtioBlkNode::new(dev)), Default::default())?;
//!
//! // 3. Boot options, before the QMP greeting.
//! for tok in block::cmdline::tokenize("--blockdev null-co,node-name=n0").unwrap() {
//!     if let block::cmdline::Token::Option { name, value: Some(v) } = tok {
//!         bl.apply_boot_option(&name, &v).unwrap(); // Err: print, halt cleanly
//!     }
//! }
//!
//! // 4. QMP: register the block commands on the kernel's dispatcher.
//! let mut commands: Dispatcher<BlockLayer> = Dispatcher::new();
//! block::commands::register(&mut commands);
//! let mut session = Session::new(VersionInfo::new(7, 2, 0));
//! let _ = session.feed(br#"{"execute": "qmp_capabilities"}"#, &commands, &mut bl);
//!
//! // 5. The main loop: exec.run_ready(), device polling, hlt when idle.
//! while exec.run_ready() {}
//!
//! // 6. Halt: close everything, print the report, power off.
//! let report = bl.close_all().unwrap();
//! assert!(report.unwrap().to_string().ends_with("all 1 nodes closed"));
//! ```
//! A kernel whose QMP context is its own struct implements [`BlockContext`]
//! for it (and forwards [`QmpContext::drain_events`] to the block layer's).

use alloc::boxed::Box;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use core::future::Future;

use serde_json::{Map, Value};

use crate::close_all::{CloseAllError, CloseAllReport, close_all};
use crate::driver::BlockDriver;
use crate::event::EventQueue;
use crate::exec::{Executor, Platform};
use crate::graph::node::{Node, NodeOptions};
use crate::graph::registry::Registry;
use crate::open::{DriverClass, open_blockdev, parse_blockdev};
use crate::options::Opts;
use crate::qmp::{Event, QmpContext, QmpError, Timestamp};
use crate::timer::Clock;

/// The block layer: what QMP commands and the kernel act on.
pub struct BlockLayer {
    registry: Rc<Registry>,
    drivers: Vec<DriverClass>,
    platform: Rc<dyn Platform>,
    events: Rc<EventQueue>,
    tls_creds_check: Option<TlsCredsCheck>,
}

/// The platform's check of a `tls-creds-x509` object's PEM text, run by
/// `object-add` (QEMU loads and checks the files when the object is
/// made): the error text, or `Ok`.
pub type TlsCredsCheck = Rc<dyn Fn(&crate::tls_creds::TlsCredsX509) -> Result<(), String>>;

impl BlockLayer {
    /// A block layer running on `exec`, timed by `clock`, waiting through
    /// `platform`, with the built-in drivers.
    pub fn new(exec: Executor, clock: Rc<dyn Clock>, platform: Rc<dyn Platform>) -> BlockLayer {
        let registry = Registry::new(exec, clock);
        let events = Rc::new(EventQueue::new());
        registry.set_event_sink(events.clone());
        BlockLayer {
            registry,
            drivers: crate::drivers::builtin(),
            platform,
            events,
            tls_creds_check: None,
        }
    }

    /// Has `object-add` check every `tls-creds-x509` object's PEM text
    /// with `check` (the block layer cannot parse certificates itself).
    pub fn set_tls_creds_check(&mut self, check: TlsCredsCheck) {
        self.tls_creds_check = Some(check);
    }

    /// The check set by [`BlockLayer::set_tls_creds_check`], if any.
    pub fn tls_creds_check(&self) -> Option<&TlsCredsCheck> {
        self.tls_creds_check.as_ref()
    }

    /// The registry.
    pub fn registry(&self) -> &Rc<Registry> {
        &self.registry
    }

    /// The executor.
    pub fn executor(&self) -> &Executor {
        self.registry.executor()
    }

    /// The driver classes `blockdev-add` knows, built-in first.
    pub fn drivers(&self) -> &[DriverClass] {
        &self.drivers
    }

    /// Adds a driver class (the kernel's `virtio-blk`, …), replacing one of
    /// the same name.
    pub fn register_driver(&mut self, class: DriverClass) {
        self.drivers.retain(|d| d.name != class.name);
        self.drivers.push(class);
    }

    /// Runs `f` to completion (see the module documentation).
    pub fn wait<F: Future>(&self, f: F) -> Result<F::Output, QmpError> {
        self.executor()
            .block_on(f, &*self.platform)
            .map_err(|e| QmpError::generic(alloc::format!("{e}")))
    }

    /// Takes the events raised so far, oldest first.
    pub fn take_events(&self) -> Vec<(String, Value)> {
        self.events.drain()
    }

    /// The event queue (for the kernel to drain into its QMP sessions).
    pub fn events(&self) -> &Rc<EventQueue> {
        &self.events
    }

    /// `blockdev-add` of `options` (QMP form, or `keyval` for option
    /// strings): opens the tree and hands the top node to the monitor.
    pub fn blockdev_add(
        &self,
        options: &Map<String, Value>,
        keyval: bool,
    ) -> Result<Rc<Node>, QmpError> {
        let opts = Opts::new(options, keyval);
        let spec = parse_blockdev(&opts, &self.drivers)?;
        if spec.node_name.is_none() {
            return Err(QmpError::generic(
                "'node-name' must be specified for the root node",
            ));
        }
        let node = self
            .wait(open_blockdev(self.registry.clone(), spec))?
            .map_err(QmpError::generic)?;
        self.registry.monitor_adopt(&node);
        Ok(node)
    }

    /// Opens a node around a driver instance the kernel built itself (a
    /// probed virtio disk) and hands it to the monitor, as if by
    /// `blockdev-add`.
    pub fn add_node(
        &self,
        name: &str,
        driver: Box<dyn BlockDriver>,
        opts: NodeOptions,
    ) -> Result<Rc<Node>, QmpError> {
        let mut options = Map::new();
        options.insert("driver".into(), Value::String(driver.format_name().into()));
        options.insert("node-name".into(), Value::String(name.into()));
        let node = self
            .registry
            .open_node(Some(name), driver, opts, options, Vec::new())
            .map_err(|e| QmpError::generic(alloc::format!("{e}")))?;
        self.registry.monitor_adopt(&node);
        Ok(node)
    }

    /// The shutdown sequence, waited for (see [`crate::close_all`]).
    pub fn close_all(&self) -> Result<Result<CloseAllReport, CloseAllError>, QmpError> {
        let reg = self.registry.clone();
        self.wait(async move { close_all(&reg).await })
    }
}

/// Events go out through the QMP session, stamped with the block layer's
/// clock (time since boot; a kernel with a wall clock may stamp its own).
impl QmpContext for BlockLayer {
    fn drain_events(&mut self, out: &mut Vec<Event>) {
        let us = self.registry.clock().now_ns() / 1000;
        for (name, data) in self.events.drain() {
            out.push(Event {
                name,
                data: Some(data),
                timestamp: Timestamp::from_micros(us as i64),
            });
        }
    }
}

/// A QMP context that contains a block layer: implement it for the
/// kernel's context to register the block commands on its dispatcher.
pub trait BlockContext {
    /// The block layer.
    fn block_layer(&mut self) -> &mut BlockLayer;
}

impl BlockContext for BlockLayer {
    fn block_layer(&mut self) -> &mut BlockLayer {
        self
    }
}
