//! Shared drivers for the fuzz targets in `fuzz_targets/`: each target
//! feeds libFuzzer's bytes to one engine of `block` or `drivers` and checks
//! the engine's own invariants (nothing panics, every request it issues is
//! one the export can take, nothing leaks). Built and run by
//! `cargo xtask fuzz TARGET` with LLVM's SanitizerCoverage on stable Rust.

pub mod mem;

use block::io::{BlockStatus, IoError};
use block::nbd::{BlockSize, Completion, Connection, Export, Limits, Op, ReadChunk};

/// The exports a fuzzed NBD server offers: a 1 MiB disk and a small one
/// with a 512-byte minimum block size.
pub fn exports() -> Vec<Export> {
    let mut small = Export::new("small", 64 * 1024);
    small.block_size = BlockSize::new(512, 4096, 64 * 1024).expect("valid block size");
    vec![Export::new("disk", 1 << 20), small]
}

/// How the host answers requests, chosen by the fuzzer per request.
#[derive(Clone, Copy, Debug)]
pub enum Answer {
    Good,
    Error(u8),
    Chunks,
    Short,
}

/// Drives one server connection: `input` arrives in pieces of
/// `chunk(i)` bytes; each request the engine issues is checked against its
/// export and completed as `answer(i)` says, and output is drained.
pub fn drive_server(
    input: &[u8],
    mut chunk: impl FnMut(usize) -> usize,
    mut answer: impl FnMut(usize) -> Answer,
) {
    let exports = exports();
    let mut conn = Connection::new(Limits {
        max_requests: 4,
        max_option_len: 4096,
        max_options: 64,
        output_high_water: 1 << 16,
        max_write_bytes: 1 << 17,
    });
    let mut pos = 0usize;
    let mut issued = 0;
    for round in 0..10_000 {
        let end = pos.saturating_add(chunk(round).max(1)).min(input.len());
        pos += conn.receive(&input[pos..end], &exports);
        let mut held = Vec::new();
        while let Some(r) = conn.next_request() {
            let size = conn.export().map(|e| e.size).unwrap_or(0);
            let check = |offset: u64, len: u64| {
                assert!(
                    len > 0 && offset.checked_add(len).is_some_and(|e| e <= size),
                    "{offset}+{len} outside a {size}-byte export"
                );
            };
            match &r.op {
                Op::Read { offset, len } => check(*offset, *len),
                Op::Write { offset, data, .. } => check(*offset, data.len() as u64),
                Op::Trim { offset, len, .. }
                | Op::WriteZeroes { offset, len, .. }
                | Op::Cache { offset, len }
                | Op::BlockStatus { offset, len, .. } => check(*offset, *len),
                Op::Flush => {}
            }
            held.push(r);
        }
        for r in held {
            let c = match (answer(issued), &r.op) {
                (Answer::Error(e), _) => Completion::Error(IoError::Other(i32::from(e))),
                (Answer::Chunks, Op::Read { len, .. }) => Completion::Chunks(vec![
                    ReadChunk::Zero(len / 2),
                    ReadChunk::Error(IoError::Eio, len - len / 2),
                ]),
                (Answer::Short, Op::Read { len, .. }) => {
                    Completion::Data(vec![0; *len as usize / 2])
                }
                (_, Op::Read { len, .. }) => Completion::Data(vec![0x5a; *len as usize]),
                (_, Op::BlockStatus { len, .. }) => {
                    Completion::Extents(vec![BlockStatus::data(*len)])
                }
                _ => Completion::Done,
            };
            issued += 1;
            let _ = conn.complete(r.id, c);
        }
        let n = conn.output().len();
        conn.consume_output(usize::try_from(n).unwrap_or(usize::MAX));
        if conn.should_close() || pos >= input.len() {
            break;
        }
    }
    assert_eq!(conn.in_flight(), 0, "every request was completed");
    conn.closed();
}

/// A block layer with every QMP command the appliance registers, on a
/// simulated platform, and a `fuzz-mem` driver over [`Monitor::bytes`].
pub struct Monitor {
    pub session: block::qmp::Session,
    pub dispatcher: block::qmp::Dispatcher<block::layer::BlockLayer>,
    pub layer: block::layer::BlockLayer,
    pub bytes: mem::Bytes,
}

impl Monitor {
    pub fn new(image: Vec<u8>) -> Monitor {
        use std::rc::Rc;
        let exec = block::exec::Executor::new();
        let clock = Rc::new(block::timer::ManualClock::new());
        let platform = Rc::new(block::exec::SimulatedPlatform::new(clock.clone()));
        let mut layer = block::layer::BlockLayer::new(exec, clock, platform);
        let bytes = Rc::new(std::cell::RefCell::new(image));
        layer.register_driver(mem::class(bytes.clone()));
        let mut dispatcher = block::qmp::Dispatcher::new();
        block::commands::register(&mut dispatcher);
        Monitor {
            session: block::qmp::Session::new(block::qmp::VersionInfo::new(7, 2, 0)),
            dispatcher,
            layer,
            bytes,
        }
    }

    /// Feeds QMP input; returns whether `quit` ran. Output is dropped.
    pub fn feed(&mut self, input: &[u8]) -> bool {
        let action = self.session.feed(input, &self.dispatcher, &mut self.layer);
        self.session.take_output();
        action == block::qmp::Action::Quit
    }

    /// Runs one command (arguments an object) and returns its result.
    pub fn cmd(
        &mut self,
        name: &str,
        args: serde_json::Value,
    ) -> Option<Result<serde_json::Value, block::qmp::QmpError>> {
        let serde_json::Value::Object(map) = args else {
            return None;
        };
        self.dispatcher
            .call(name, &mut self.layer, &block::qmp::Args::new(&map))
    }
}
