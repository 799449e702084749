//! A block layer on a simulated platform, with helpers to build graphs.

use alloc::boxed::Box;
use alloc::rc::Rc;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::future::Future;

use serde_json::Map;

use super::mem::{Log, Mem, RecFmt, fmt_file};
use crate::event::EventQueue;
use crate::exec::{Executor, SimulatedPlatform};
use crate::graph::node::{Node, NodeOptions};
use crate::graph::registry::Registry;
use crate::timer::ManualClock;

pub struct Env {
    pub exec: Executor,
    pub clock: Rc<ManualClock>,
    pub platform: SimulatedPlatform,
    pub reg: Rc<Registry>,
    pub events: Rc<EventQueue>,
    pub log: Log,
}

impl Env {
    pub fn new() -> Env {
        let exec = Executor::new();
        let clock = Rc::new(ManualClock::new());
        let reg = Registry::new(exec.clone(), clock.clone());
        let events = Rc::new(EventQueue::new());
        reg.set_event_sink(events.clone());
        Env {
            platform: SimulatedPlatform::new(clock.clone()),
            exec,
            clock,
            reg,
            events,
            log: Log::default(),
        }
    }

    /// Runs `f` to completion, running every task meanwhile.
    pub fn run<F: Future>(&self, f: F) -> F::Output {
        match self.exec.block_on(f, &self.platform) {
            Ok(v) => v,
            Err(e) => panic!("{e}"),
        }
    }

    /// Advances simulated time, fires due timers, runs what became ready.
    pub fn tick(&self, ns: u64) {
        use crate::timer::Clock;
        self.clock.advance(ns);
        self.exec.timers().fire_expired(self.clock.now_ns());
        self.settle();
    }

    /// Runs ready tasks until none is ready.
    pub fn settle(&self) {
        while self.exec.run_ready() {}
    }

    /// A memory node owned by the caller (refcount 1); returns the driver's
    /// data handle too.
    pub fn mem(&self, name: &str, size: usize) -> Rc<Node> {
        self.mem_opts(name, size, NodeOptions::default())
    }

    pub fn mem_opts(&self, name: &str, size: usize, opts: NodeOptions) -> Rc<Node> {
        let drv = Mem::new(name, size, &self.log);
        match self
            .reg
            .open_node(Some(name), Box::new(drv), opts, Map::new(), Vec::new())
        {
            Ok(n) => n,
            Err(e) => panic!("{e}"),
        }
    }

    /// A recording format node over `file`, taking over the caller's
    /// reference on `file`.
    pub fn fmt(&self, name: &str, file: &Rc<Node>) -> Result<Rc<Node>, String> {
        let drv = RecFmt {
            label: name.to_string(),
            log: self.log.clone(),
        };
        self.reg
            .open_node(
                Some(name),
                Box::new(drv),
                NodeOptions::default(),
                Map::new(),
                alloc::vec![("file".to_string(), fmt_file(), file.clone(),)],
            )
            .map_err(|e| e.to_string())
    }

    pub fn mem_driver(node: &Node) -> &Mem {
        match (node.driver() as &dyn core::any::Any).downcast_ref::<Mem>() {
            Some(m) => m,
            None => panic!("not a mem node"),
        }
    }

    pub fn log(&self) -> Vec<String> {
        self.log.borrow().clone()
    }

    pub fn node_names(&self) -> Vec<String> {
        self.reg
            .nodes()
            .iter()
            .map(|n| n.name().to_string())
            .collect()
    }
}

/// A block layer with its QMP commands, on a simulated platform.
pub struct Qmp {
    pub bl: crate::layer::BlockLayer,
    pub clock: Rc<ManualClock>,
    pub d: crate::qmp::Dispatcher<crate::layer::BlockLayer>,
    pub log: Log,
}

impl Qmp {
    pub fn new() -> Qmp {
        let exec = Executor::new();
        let clock = Rc::new(ManualClock::new());
        let platform = Rc::new(SimulatedPlatform::new(clock.clone()));
        let mut bl = crate::layer::BlockLayer::new(exec, clock.clone(), platform);
        bl.register_driver(super::mem::mem_class());
        let mut d = crate::qmp::Dispatcher::new();
        crate::commands::register(&mut d);
        let log = super::mem::LOG.with(|l| {
            l.borrow_mut().clear();
            l.clone()
        });
        super::mem::OPENED.with(|o| o.borrow_mut().clear());
        Qmp { bl, clock, d, log }
    }

    /// Runs a command; arguments must be an object.
    pub fn cmd(
        &mut self,
        name: &str,
        args: serde_json::Value,
    ) -> Result<serde_json::Value, crate::qmp::QmpError> {
        let map = match args {
            serde_json::Value::Object(m) => m,
            _ => Map::new(),
        };
        let Some(result) = self
            .d
            .call(name, &mut self.bl, &crate::qmp::Args::new(&map))
        else {
            panic!("no command {name}")
        };
        result
    }

    /// Runs a command that must succeed.
    pub fn ok(&mut self, name: &str, args: serde_json::Value) -> serde_json::Value {
        match self.cmd(name, args.clone()) {
            Ok(v) => v,
            Err(e) => panic!("{name} {args}: {}", e.desc),
        }
    }

    /// Runs a command that must fail with a GenericError; returns its text.
    pub fn err(&mut self, name: &str, args: serde_json::Value) -> String {
        match self.cmd(name, args.clone()) {
            Ok(v) => panic!("{name} {args} succeeded: {v}"),
            Err(e) => {
                assert_eq!(
                    e.class,
                    crate::qmp::ErrorClass::GenericError,
                    "{name} {args}: {}",
                    e.desc
                );
                e.desc
            }
        }
    }

    pub fn nodes(&self) -> serde_json::Value {
        crate::query::named_block_nodes(&self.bl, false)
    }

    pub fn node_names(&self) -> Vec<String> {
        self.bl
            .registry()
            .nodes()
            .iter()
            .map(|n| n.name().to_string())
            .collect()
    }

    /// `qemu-io` through human-monitor-command.
    pub fn io(&mut self, device: &str, command: &str) -> String {
        let line = alloc::format!("qemu-io {device} \"{command}\"");
        match self.ok(
            "human-monitor-command",
            serde_json::json!({"command-line": line}),
        ) {
            serde_json::Value::String(s) => s,
            v => panic!("{v}"),
        }
    }

    pub fn events(&self) -> Vec<(String, serde_json::Value)> {
        self.bl.take_events()
    }

    pub fn log(&self) -> Vec<String> {
        self.log.borrow().clone()
    }

    pub fn settle(&self) {
        while self.bl.executor().run_ready() {}
    }
}
