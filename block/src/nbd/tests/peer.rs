//! A scripted NBD client and an in-memory host for the engine's tests.
//!
//! The client half builds option and request bytes and decodes replies
//! from the engine's output; the host half ([`MemDisk`]) executes
//! requests against a sparse in-memory disk with 4 KiB allocation blocks,
//! so reads report holes and block status reports real extents.

use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use crate::io::{BlockStatus, IoError, ReqFlags};
use crate::nbd::repr::{Command, RequestHeader};
use crate::nbd::wire::{self, get_u16, get_u32, get_u64};
use crate::nbd::{Completion, Connection, Export, Limits, Op, ReadChunk, Request};

/// Allocation granularity of [`MemDisk`].
pub const BLOCK: u64 = 4096;

/// A sparse in-memory disk.
pub struct MemDisk {
    pub data: Vec<u8>,
    pub allocated: Vec<bool>,
    pub flushes: usize,
    pub fua_writes: usize,
    /// Make every request fail with this error.
    pub fail: Option<IoError>,
}

impl MemDisk {
    pub fn new(size: u64) -> MemDisk {
        MemDisk {
            data: vec![0; size as usize],
            allocated: vec![false; size.div_ceil(BLOCK) as usize],
            flushes: 0,
            fua_writes: 0,
            fail: None,
        }
    }

    fn allocate(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        for b in offset / BLOCK..(offset + len).div_ceil(BLOCK) {
            self.allocated[b as usize] = true;
        }
    }

    fn deallocate(&mut self, offset: u64, len: u64) {
        for b in offset.div_ceil(BLOCK)..(offset + len) / BLOCK {
            self.allocated[b as usize] = false;
        }
    }

    fn zero(&mut self, offset: u64, len: u64) {
        self.data[offset as usize..(offset + len) as usize].fill(0);
    }

    /// Runs of (allocated, length) from `offset` to the end.
    fn runs(&self, offset: u64, len: u64) -> Vec<(bool, u64)> {
        let end = (offset + len).min(self.data.len() as u64);
        let mut runs: Vec<(bool, u64)> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let b = pos / BLOCK;
            let a = self.allocated[b as usize];
            let n = ((b + 1) * BLOCK).min(end) - pos;
            match runs.last_mut() {
                Some((la, ln)) if *la == a => *ln += n,
                _ => runs.push((a, n)),
            }
            pos += n;
        }
        runs
    }

    /// Execute one request.
    pub fn execute(&mut self, op: Op) -> Completion {
        if let Some(e) = self.fail {
            return Completion::Error(e);
        }
        match op {
            Op::Read { offset, len } => {
                let chunks = self
                    .runs(offset, len)
                    .into_iter()
                    .scan(offset, |pos, (a, n)| {
                        let start = *pos as usize;
                        *pos += n;
                        Some(if a {
                            ReadChunk::Data(self.data[start..start + n as usize].to_vec())
                        } else {
                            ReadChunk::Zero(n)
                        })
                    })
                    .collect();
                Completion::Chunks(chunks)
            }
            Op::Write {
                offset,
                data,
                flags,
            } => {
                if flags.contains(ReqFlags::FUA) {
                    self.fua_writes += 1;
                }
                self.allocate(offset, data.len() as u64);
                self.data[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
                Completion::Done
            }
            Op::Flush => {
                self.flushes += 1;
                Completion::Done
            }
            Op::Trim { offset, len, .. } => {
                self.zero(offset, len);
                self.deallocate(offset, len);
                Completion::Done
            }
            Op::WriteZeroes { offset, len, flags } => {
                if flags.contains(ReqFlags::NO_FALLBACK) && !flags.contains(ReqFlags::MAY_UNMAP) {
                    return Completion::Error(IoError::Enotsup);
                }
                self.zero(offset, len);
                if flags.contains(ReqFlags::MAY_UNMAP) {
                    self.deallocate(offset, len);
                } else {
                    self.allocate(offset, len);
                }
                Completion::Done
            }
            Op::Cache { .. } => Completion::Done,
            Op::BlockStatus { offset, len, .. } => {
                let extents = self
                    .runs(offset, len.max(1))
                    .into_iter()
                    .map(|(a, n)| BlockStatus {
                        data: a,
                        zero: !a,
                        allocated: a,
                        len: n,
                    })
                    .collect();
                Completion::Extents(extents)
            }
        }
    }
}

/// A decoded option reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptReply {
    pub option: u32,
    pub kind: u32,
    pub data: Vec<u8>,
}

/// A decoded reply (simple, or one structured/extended chunk).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Simple {
        error: u32,
        cookie: u64,
    },
    Chunk {
        flags: u16,
        kind: u16,
        cookie: u64,
        /// Only in extended replies.
        offset: Option<u64>,
        payload: Vec<u8>,
    },
}

impl Reply {
    pub fn cookie(&self) -> u64 {
        match self {
            Reply::Simple { cookie, .. } | Reply::Chunk { cookie, .. } => *cookie,
        }
    }

    /// The error of a simple reply or an error chunk (0 otherwise).
    pub fn error(&self) -> u32 {
        match self {
            Reply::Simple { error, .. } => *error,
            Reply::Chunk { kind, payload, .. } if kind & wire::reply_type::FLAG_ERROR != 0 => {
                get_u32(payload, 0..4)
            }
            Reply::Chunk { .. } => 0,
        }
    }

    pub fn done(&self) -> bool {
        match self {
            Reply::Simple { .. } => true,
            Reply::Chunk { flags, .. } => flags & wire::reply_flags::DONE != 0,
        }
    }
}

/// Client and host around one [`Connection`].
pub struct Peer {
    pub conn: Connection,
    pub exports: Vec<Export>,
    pub disk: MemDisk,
    /// Bytes from the server not yet decoded.
    pub rx: VecDeque<u8>,
    /// Bytes sent to the server but not yet taken.
    pub pending: Vec<u8>,
    pub extended: bool,
    /// Requests the host took but has not completed.
    pub held: Vec<Request>,
    /// Feed input one byte at a time.
    pub bytewise: bool,
}

impl Peer {
    pub fn new(exports: Vec<Export>) -> Peer {
        Peer::with_limits(exports, Limits::default())
    }

    pub fn with_limits(exports: Vec<Export>, limits: Limits) -> Peer {
        let size = exports.first().map_or(0, |e| e.size);
        let mut p = Peer {
            conn: Connection::new(limits),
            exports,
            disk: MemDisk::new(size),
            rx: VecDeque::new(),
            pending: Vec::new(),
            extended: false,
            held: Vec::new(),
            bytewise: false,
        };
        p.drain();
        p
    }

    /// A peer whose server requires TLS
    /// ([`Connection::new_tls_required`]).
    pub fn tls_required(exports: Vec<Export>) -> Peer {
        let mut p = Peer::new(exports);
        p.conn = Connection::new_tls_required(Limits::default());
        p.rx.clear();
        p.drain();
        p
    }

    /// Move the engine's output into `rx`.
    pub fn drain(&mut self) {
        loop {
            let chunk = self.conn.output().chunk();
            if chunk.is_empty() {
                break;
            }
            let n = chunk.len();
            self.rx.extend(chunk.iter().copied());
            self.conn.consume_output(n);
        }
    }

    /// Feed everything pending (as far as the engine takes it).
    pub fn pump(&mut self) {
        loop {
            let before = self.pending.len();
            if before == 0 {
                break;
            }
            let n = if self.bytewise {
                self.conn.receive(&self.pending[..1], &self.exports)
            } else {
                self.conn.receive(&self.pending, &self.exports)
            };
            self.pending.drain(..n);
            self.drain();
            if n == 0 {
                break;
            }
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
        self.pump();
    }

    /// Take `n` decoded bytes.
    pub fn take(&mut self, n: usize) -> Vec<u8> {
        assert!(
            self.rx.len() >= n,
            "wanted {n} bytes from the server, have {}",
            self.rx.len()
        );
        self.rx.drain(..n).collect()
    }

    /// Read the greeting and send client flags.
    pub fn greet(&mut self, client_flags: u32) {
        let g = self.take(wire::greeting::LEN);
        assert_eq!(get_u64(&g, wire::greeting::PASSWD), wire::NBD_MAGIC);
        assert_eq!(get_u64(&g, wire::greeting::MAGIC), wire::NBD_OPTS_MAGIC);
        assert_eq!(get_u16(&g, wire::greeting::FLAGS), 3);
        self.send(&client_flags.to_be_bytes());
    }

    pub fn option(&mut self, option: u32, data: &[u8]) {
        let mut b = Vec::new();
        b.extend_from_slice(&wire::NBD_OPTS_MAGIC.to_be_bytes());
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b);
    }

    pub fn opt_reply(&mut self) -> OptReply {
        let h = self.take(wire::option_reply::LEN);
        assert_eq!(get_u64(&h, wire::option_reply::MAGIC), wire::NBD_REP_MAGIC);
        let len = get_u32(&h, wire::option_reply::LENGTH) as usize;
        OptReply {
            option: get_u32(&h, wire::option_reply::OPTION),
            kind: get_u32(&h, wire::option_reply::TYPE),
            data: self.take(len),
        }
    }

    /// Replies up to and including the final one (ACK or an error).
    pub fn opt_replies(&mut self) -> Vec<OptReply> {
        let mut v = Vec::new();
        loop {
            let r = self.opt_reply();
            let last = r.kind == wire::rep::ACK || r.kind & wire::rep::FLAG_ERROR != 0;
            v.push(r);
            if last {
                return v;
            }
        }
    }

    /// `NBD_OPT_GO`/`INFO` data.
    pub fn info_data(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    /// `NBD_OPT_*_META_CONTEXT` data.
    pub fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    }

    /// A full handshake: structured replies and/or extended headers,
    /// `base:allocation`, then GO to `name`. Returns the transmission
    /// flags.
    pub fn connect(&mut self, name: &str, structured: bool, extended: bool) -> u16 {
        self.connect_with(name, structured, extended, &["base:allocation"])
    }

    /// [`Peer::connect`] selecting the metadata contexts `queries`.
    pub fn connect_with(
        &mut self,
        name: &str,
        structured: bool,
        extended: bool,
        queries: &[&str],
    ) -> u16 {
        self.greet(1);
        if extended {
            self.option(wire::opt::EXTENDED_HEADERS, &[]);
            assert_eq!(self.opt_reply().kind, wire::rep::ACK);
            self.extended = true;
        } else if structured {
            self.option(wire::opt::STRUCTURED_REPLY, &[]);
            assert_eq!(self.opt_reply().kind, wire::rep::ACK);
        }
        if structured || extended {
            self.option(wire::opt::SET_META_CONTEXT, &Peer::meta_data(name, queries));
            let r = self.opt_replies();
            assert_eq!(r.last().map(|r| r.kind), Some(wire::rep::ACK), "{r:?}");
        }
        self.option(
            wire::opt::GO,
            &Peer::info_data(name, &[wire::info::BLOCK_SIZE]),
        );
        let replies = self.opt_replies();
        assert_eq!(
            replies.last().map(|r| r.kind),
            Some(wire::rep::ACK),
            "{replies:?}"
        );
        let export = replies
            .iter()
            .find(|r| r.kind == wire::rep::INFO && get_u16(&r.data, 0..2) == wire::info::EXPORT)
            .expect("NBD_INFO_EXPORT");
        get_u16(&export.data, 10..12)
    }

    pub fn request(&mut self, flags: u16, command: u16, cookie: u64, offset: u64, len: u64) {
        self.request_with(flags, command, cookie, offset, len, &[]);
    }

    pub fn request_with(
        &mut self,
        flags: u16,
        command: u16,
        cookie: u64,
        offset: u64,
        len: u64,
        payload: &[u8],
    ) {
        let mut b = Vec::new();
        RequestHeader {
            flags,
            command: Command::from(command),
            cookie,
            offset,
            length: len,
        }
        .emit(self.extended, &mut b);
        b.extend_from_slice(payload);
        self.send(&b);
    }

    pub fn write(&mut self, flags: u16, cookie: u64, offset: u64, data: &[u8]) {
        let flags = if self.extended {
            flags | wire::cmd_flags::PAYLOAD_LEN
        } else {
            flags
        };
        self.request_with(
            flags,
            wire::cmd::WRITE,
            cookie,
            offset,
            data.len() as u64,
            data,
        );
    }

    /// Take the host's requests and keep them.
    pub fn take_requests(&mut self) -> usize {
        let mut n = 0;
        while let Some(r) = self.conn.next_request() {
            self.held.push(r);
            n += 1;
        }
        n
    }

    /// Execute held and new requests, completing them in reverse order.
    pub fn run(&mut self) {
        loop {
            self.take_requests();
            if self.held.is_empty() {
                break;
            }
            while let Some(r) = self.held.pop() {
                let c = self.disk.execute(r.op);
                self.conn.complete(r.id, c).expect("completes");
            }
            self.drain();
            self.pump();
        }
        self.drain();
    }

    pub fn reply(&mut self) -> Reply {
        let magic = get_u32(&self.rx.iter().take(4).copied().collect::<Vec<u8>>(), 0..4);
        match magic {
            wire::NBD_SIMPLE_REPLY_MAGIC => {
                let h = self.take(wire::simple_reply::LEN);
                Reply::Simple {
                    error: get_u32(&h, wire::simple_reply::ERROR),
                    cookie: get_u64(&h, wire::simple_reply::COOKIE),
                }
            }
            wire::NBD_STRUCTURED_REPLY_MAGIC => {
                let h = self.take(wire::chunk::LEN);
                let len = get_u32(&h, wire::chunk::LENGTH) as usize;
                Reply::Chunk {
                    flags: get_u16(&h, wire::chunk::FLAGS),
                    kind: get_u16(&h, wire::chunk::TYPE),
                    cookie: get_u64(&h, wire::chunk::COOKIE),
                    offset: None,
                    payload: self.take(len),
                }
            }
            wire::NBD_EXTENDED_REPLY_MAGIC => {
                let h = self.take(wire::chunk::LEN_EXT);
                let len = get_u64(&h, wire::chunk::LENGTH_EXT) as usize;
                Reply::Chunk {
                    flags: get_u16(&h, wire::chunk::FLAGS),
                    kind: get_u16(&h, wire::chunk::TYPE),
                    cookie: get_u64(&h, wire::chunk::COOKIE),
                    offset: Some(get_u64(&h, wire::chunk::OFFSET_EXT)),
                    payload: self.take(len),
                }
            }
            other => panic!("bad reply magic {other:#x}"),
        }
    }

    /// All chunks of one reply (until DONE).
    pub fn full_reply(&mut self) -> Vec<Reply> {
        let mut v = Vec::new();
        loop {
            let r = self.reply();
            let done = r.done();
            v.push(r);
            if done {
                return v;
            }
        }
    }

    /// Read data of a simple reply.
    pub fn simple_read(&mut self, cookie: u64, len: usize) -> Vec<u8> {
        assert_eq!(self.reply(), Reply::Simple { error: 0, cookie });
        self.take(len)
    }

    /// Reassemble a structured read reply into bytes (holes as zeroes),
    /// checking the chunks stay inside the request.
    pub fn structured_read(&mut self, cookie: u64, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0xEEu8; len];
        let mut covered = 0;
        for r in self.full_reply() {
            let Reply::Chunk {
                kind,
                payload,
                cookie: c,
                ..
            } = r
            else {
                panic!("simple reply to a structured read");
            };
            assert_eq!(c, cookie);
            match kind {
                wire::reply_type::OFFSET_DATA => {
                    let at = (get_u64(&payload, 0..8) - offset) as usize;
                    let data = &payload[8..];
                    buf[at..at + data.len()].copy_from_slice(data);
                    covered += data.len();
                }
                wire::reply_type::OFFSET_HOLE => {
                    let at = (get_u64(&payload, 0..8) - offset) as usize;
                    let n = get_u32(&payload, 8..12) as usize;
                    assert!(n > 0);
                    buf[at..at + n].fill(0);
                    covered += n;
                }
                wire::reply_type::NONE => assert!(payload.is_empty()),
                other => panic!("unexpected chunk type {other:#x}"),
            }
        }
        assert_eq!(covered, len, "chunks cover the request exactly");
        buf
    }
}

/// The error message of an error chunk.
pub fn error_message(r: &Reply) -> String {
    match r {
        Reply::Chunk { payload, .. } => {
            let n = get_u16(payload, 4..6) as usize;
            String::from_utf8_lossy(&payload[6..6 + n]).into_owned()
        }
        Reply::Simple { .. } => String::new(),
    }
}
