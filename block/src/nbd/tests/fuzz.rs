//! A seeded random fuzz over input bytes: random garbage, and valid
//! sessions with random mutations, fed in random chunk sizes with random
//! completions interleaved. Nothing may panic, every request the engine
//! issues must be one the export can take, and the bookkeeping must stay
//! consistent.

use alloc::vec;
use alloc::vec::Vec;

use super::peer::{MemDisk, Peer};
use crate::io::{BlockStatus, IoError};
use crate::nbd::wire::{cmd, cmd_flags as cf, opt};
use crate::nbd::{BlockSize, Completion, Connection, Export, Limits, Op, ReadChunk};

/// xorshift64*: deterministic, no dependencies.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn exports() -> Vec<Export> {
    let mut small = Export::new("small", 64 * 1024);
    small.block_size = BlockSize::new(512, 4096, 64 * 1024).unwrap();
    vec![Export::new("disk", 1 << 20), small]
}

/// A valid session's bytes: handshake (random options) and requests.
fn session(rng: &mut Rng) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&1u32.to_be_bytes());
    let mut opt = |o: u32, data: &[u8]| {
        out.extend_from_slice(b"IHAVEOPT");
        out.extend_from_slice(&o.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
    };
    let name = if rng.below(2) == 0 { "disk" } else { "small" };
    let extended = rng.below(3) == 0;
    if extended {
        opt(opt::EXTENDED_HEADERS, &[]);
    } else if rng.below(2) == 0 {
        opt(opt::STRUCTURED_REPLY, &[]);
    }
    opt(opt::LIST, &[]);
    opt(
        opt::SET_META_CONTEXT,
        &Peer::meta_data(name, &["base:allocation"]),
    );
    opt(rng.next() as u32, &[1, 2, 3]);
    opt(opt::GO, &Peer::info_data(name, &[3]));
    let mut reqs = Vec::new();
    let size: u64 = if name == "disk" { 1 << 20 } else { 64 * 1024 };
    for cookie in 0..rng.below(20) {
        const COMMANDS: [u16; 7] = [
            cmd::READ,
            cmd::WRITE,
            cmd::FLUSH,
            cmd::TRIM,
            cmd::CACHE,
            cmd::WRITE_ZEROES,
            cmd::BLOCK_STATUS,
        ];
        let wild = rng.below(10) == 0;
        let command = if wild {
            rng.below(9) as u16
        } else {
            COMMANDS[rng.below(7) as usize]
        };
        let mut flags = if wild {
            [0, cf::FUA, cf::DF, cf::REQ_ONE, cf::NO_HOLE | cf::FAST_ZERO][rng.below(5) as usize]
        } else {
            0
        };
        let offset = rng.below(size) & !511;
        let mut len = rng.below(1 << 16).min(size - offset) & !511;
        let offset = if command == cmd::FLUSH { 0 } else { offset };
        if command == cmd::FLUSH {
            len = 0;
        }
        if command == cmd::WRITE && extended {
            flags |= cf::PAYLOAD_LEN;
        }
        let mut h = Vec::new();
        crate::nbd::repr::RequestHeader {
            flags,
            command: command.into(),
            cookie,
            offset,
            length: len,
        }
        .emit(extended, &mut h);
        reqs.extend_from_slice(&h);
        if command == cmd::WRITE {
            reqs.extend(core::iter::repeat_n(0x5a, len as usize));
        }
    }
    out.extend_from_slice(&reqs);
    out
}

fn mutate(rng: &mut Rng, bytes: &mut Vec<u8>) {
    for _ in 0..rng.below(4) {
        if bytes.is_empty() {
            return;
        }
        let i = rng.below(bytes.len() as u64) as usize;
        match rng.below(4) {
            0 => bytes[i] = rng.next() as u8,
            1 => bytes[i] ^= 1 << rng.below(8),
            2 => bytes.truncate(i),
            _ => {
                let junk: Vec<u8> = (0..rng.below(64)).map(|_| rng.next() as u8).collect();
                bytes.splice(i..i, junk);
            }
        }
    }
}

/// Drive one connection with `input`, checking invariants.
fn drive(rng: &mut Rng, input: &[u8]) -> usize {
    let mut issued = 0;
    let exports = exports();
    let limits = Limits {
        max_requests: 1 + rng.below(8) as usize,
        max_option_len: 64 + rng.below(4096) as u32,
        max_options: 64,
        output_high_water: 1 << 16,
        max_write_bytes: 4096 + rng.below(1 << 17),
    };
    let mut conn = Connection::new(limits);
    let mut disk = MemDisk::new(1 << 20);
    let mut held = Vec::new();
    let mut pos = 0;
    let mut rounds = 0;
    while rounds < 10_000 {
        rounds += 1;
        let n = 1 + rng.below(300) as usize;
        let end = (pos + n).min(input.len());
        pos += conn.receive(&input[pos..end], &exports);
        while let Some(r) = conn.next_request() {
            let size = conn.export().map(|e| e.size).unwrap_or(0);
            let check = |offset: u64, len: u64| {
                assert!(len > 0 && offset + len <= size, "{offset}+{len} > {size}");
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
            issued += 1;
            held.push(r);
        }
        // Complete a random subset, sometimes with odd results.
        while !held.is_empty() && rng.below(3) != 0 {
            let i = rng.below(held.len() as u64) as usize;
            let r = held.swap_remove(i);
            let c = match rng.below(6) {
                0 => Completion::Error(IoError::Other(rng.below(200) as i32)),
                1 => Completion::Data(vec![0; rng.below(100) as usize]),
                2 => Completion::Extents(vec![BlockStatus::data(rng.below(1 << 20))]),
                3 => Completion::Chunks(vec![
                    ReadChunk::Zero(rng.below(4096)),
                    ReadChunk::Error(IoError::Eio, rng.below(4096)),
                ]),
                _ => disk.execute(r.op),
            };
            let _ = conn.complete(r.id, c);
        }
        // Drain part of the output.
        let len = conn.output().len();
        if len > 0 {
            let take = rng.below(len + 1) as usize;
            conn.consume_output(take);
        }
        assert!(conn.in_flight() >= held.len());
        if conn.should_close() || (pos >= input.len() && held.is_empty()) {
            break;
        }
    }
    if rng.below(2) == 0 {
        conn.closed();
    }
    for r in held.drain(..) {
        let _ = conn.complete(r.id, Completion::Done);
    }
    assert_eq!(conn.in_flight(), 0, "nothing leaks");
    conn.closed();
    assert_eq!(conn.write_bytes, 0, "write accounting balances");
    issued
}

#[test]
fn random_bytes_never_panic() {
    let mut rng = Rng(0x5eed_0001);
    for _ in 0..300 {
        let n = rng.below(600) as usize;
        let mut input: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
        // Half the time, start with a plausible prefix so the fuzz reaches
        // the option parser.
        if rng.below(2) == 0 {
            let mut prefix = vec![0, 0, 0, 1];
            prefix.extend_from_slice(b"IHAVEOPT");
            prefix.extend_from_slice(&input);
            input = prefix;
        }
        drive(&mut rng, &input);
    }
}

#[test]
fn mutated_sessions_never_panic() {
    let mut rng = Rng(0x5eed_0002);
    let mut issued = 0;
    for _ in 0..400 {
        let mut input = session(&mut rng);
        mutate(&mut rng, &mut input);
        issued += drive(&mut rng, &input);
    }
    assert!(
        issued > 1500,
        "the fuzz reaches the host: {issued} requests"
    );
}

/// Run `input` through a fresh connection fed `chunk` bytes at a time;
/// the host completes the requests in order once all input is in (so the
/// order of replies depends only on the stream). Returns the output.
fn transcript(input: &[u8], chunk: usize) -> Vec<u8> {
    let exports = exports();
    let mut conn = Connection::new(Limits::default());
    let mut disk = MemDisk::new(1 << 20);
    let mut held = Vec::new();
    let mut pos = 0;
    while pos < input.len() {
        let end = pos.saturating_add(chunk).min(input.len());
        let n = conn.receive(&input[pos..end], &exports);
        assert!(n > 0, "no backpressure expected in these sessions");
        pos += n;
        while let Some(r) = conn.next_request() {
            held.push(r);
        }
    }
    for r in held {
        let c = disk.execute(r.op);
        let _ = conn.complete(r.id, c);
    }
    conn.output().chunks().flatten().copied().collect()
}

#[test]
fn output_does_not_depend_on_how_input_is_chunked() {
    let mut rng = Rng(0x5eed_0003);
    let mut compared = 0;
    for i in 0..150 {
        let mut input = session(&mut rng);
        if i % 3 == 0 {
            mutate(&mut rng, &mut input);
        }
        let whole = transcript(&input, usize::MAX);
        let bytewise = transcript(&input, 1);
        let odd = transcript(&input, 1 + rng.below(97) as usize);
        assert!(
            whole == bytewise,
            "session {i}: bytewise input changed the output"
        );
        assert!(
            whole == odd,
            "session {i}: chunked input changed the output"
        );
        compared += whole.len();
    }
    assert!(
        compared > 100_000,
        "the sessions produced output: {compared}"
    );
}
