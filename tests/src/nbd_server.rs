//! A small std TCP adapter around the sans-IO NBD engine
//! (`block::nbd::Connection`), so real clients (qemu-io, qemu-img,
//! nbdinfo, nbdcopy, nbdsh) can probe the very code the appliance runs.
//!
//! It listens on 127.0.0.1 on an ephemeral port and runs one thread per
//! connection: read bytes, feed them to the engine, execute the requests
//! it issues with the appliance's own [`block::export::execute`] against a
//! [`Backing`] (in memory with 4 KiB allocation clusters, or a file),
//! complete each batch in reverse order (so replies
//! really go out of order), write the engine's output, close when it says
//! so. [`NbdServer`] stops everything when dropped, even if a test panics.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use block::export::{Target, execute};
use block::io::{BlockStatus, IoError, IoResult, ReqFlags};
use block::nbd::{Completion, Connection, Export, ExportSet, Features, Limits, Op, ReadChunk};
use nbdtls::{Credentials, TlsConnection};

/// Allocation cluster of the in-memory backing.
pub const CLUSTER: u64 = 4096;

/// What an export's bytes live in.
pub enum Backing {
    /// A sparse in-memory disk: unwritten or trimmed clusters are holes
    /// that read as zeroes, so block status and `OFFSET_HOLE` are real.
    Memory {
        /// Size in bytes.
        size: u64,
    },
    /// An existing file (no holes reported; fast zero refused).
    File(File),
}

/// The state of an in-memory disk.
struct MemDisk {
    data: Vec<u8>,
    allocated: Vec<bool>,
}

impl MemDisk {
    fn new(size: u64) -> MemDisk {
        MemDisk {
            data: vec![0; size as usize],
            allocated: vec![false; size.div_ceil(CLUSTER) as usize],
        }
    }

    fn range(offset: u64, len: u64) -> std::ops::Range<usize> {
        offset as usize..(offset + len) as usize
    }

    fn set_allocated(&mut self, offset: u64, len: u64, on: bool) {
        let (first, end) = if on {
            (offset / CLUSTER, (offset + len).div_ceil(CLUSTER))
        } else {
            // Only clusters entirely inside the range become holes.
            (offset.div_ceil(CLUSTER), (offset + len) / CLUSTER)
        };
        for c in first..end.max(first) {
            self.allocated[c as usize] = on;
        }
    }

    /// Consecutive runs of (allocated, length) over `[offset, offset+len)`.
    fn runs(&self, offset: u64, len: u64) -> Vec<(bool, u64)> {
        let end = offset + len;
        let mut runs: Vec<(bool, u64)> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let c = pos / CLUSTER;
            let a = self.allocated[c as usize];
            let n = ((c + 1) * CLUSTER).min(end) - pos;
            match runs.last_mut() {
                Some((la, ln)) if *la == a => *ln += n,
                _ => runs.push((a, n)),
            }
            pos += n;
        }
        runs
    }

    fn read(&self, offset: u64, len: u64) -> Completion {
        let mut pos = offset as usize;
        let mut chunks = Vec::new();
        for (a, n) in self.runs(offset, len) {
            let n_us = n as usize;
            chunks.push(if a {
                ReadChunk::Data(self.data[pos..pos + n_us].to_vec())
            } else {
                ReadChunk::Zero(n)
            });
            pos += n_us;
        }
        if let [ReadChunk::Data(_)] = chunks.as_slice()
            && let Some(ReadChunk::Data(v)) = chunks.pop()
        {
            return Completion::Data(v);
        }
        Completion::Chunks(chunks)
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let len = data.len() as u64;
        self.data[Self::range(offset, len)].copy_from_slice(data);
        self.set_allocated(offset, len, true);
    }

    fn discard(&mut self, offset: u64, len: u64) {
        // Only whole clusters are discarded (they then read as zeroes);
        // the rest of the range is left alone, as a discard may.
        let first = offset.div_ceil(CLUSTER) * CLUSTER;
        let end = (offset + len) / CLUSTER * CLUSTER;
        if end > first {
            self.data[Self::range(first, end - first)].fill(0);
        }
        self.set_allocated(offset, len, false);
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, flags: ReqFlags) {
        self.data[Self::range(offset, len)].fill(0);
        let unmap = flags.contains(ReqFlags::MAY_UNMAP);
        self.set_allocated(offset, len, !unmap);
    }

    fn block_status(&self, offset: u64, len: u64) -> Vec<BlockStatus> {
        self.runs(offset, len)
            .into_iter()
            .map(|(a, n)| BlockStatus {
                data: a,
                zero: !a,
                allocated: a,
                len: n,
            })
            .collect()
    }
}

enum Store {
    Memory(Mutex<MemDisk>),
    File(File),
}

fn io_error(e: &io::Error) -> IoError {
    e.raw_os_error().map_or(IoError::Eio, IoError::from_errno)
}

impl Store {
    fn memory(m: &Mutex<MemDisk>) -> MutexGuard<'_, MemDisk> {
        m.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs one request through the appliance's own request execution
    /// ([`block::export::execute`]); every store operation is synchronous,
    /// so the future is ready at its first poll.
    fn execute(&self, op: Op) -> Completion {
        let mut f = pin!(execute(self, op));
        match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(c) => c,
            Poll::Pending => unreachable!("store operations never wait"),
        }
    }
}

/// Writes zeroes to a file, then syncs it for FUA.
fn file_zeroes(f: &File, offset: u64, len: u64, flags: ReqFlags) -> io::Result<()> {
    let zeroes = vec![0; len.min(1 << 20) as usize];
    let mut pos = offset;
    while pos < offset + len {
        let n = (offset + len - pos).min(zeroes.len() as u64) as usize;
        f.write_all_at(&zeroes[..n], pos)?;
        pos += n as u64;
    }
    fua(f, flags)
}

/// `fdatasync` after a FUA write.
fn fua(f: &File, flags: ReqFlags) -> io::Result<()> {
    if flags.contains(ReqFlags::FUA) {
        f.sync_data()?;
    }
    Ok(())
}

/// The sparse memory disk, or the file through `std::fs` (no holes;
/// discards ignored; flush and FUA are `fdatasync`).
impl Target for Store {
    async fn read(&self, offset: u64, len: u64) -> IoResult<Completion> {
        match self {
            Store::Memory(m) => Ok(Store::memory(m).read(offset, len)),
            Store::File(f) => {
                let mut buf = vec![0; len as usize];
                f.read_exact_at(&mut buf, offset)
                    .map_err(|e| io_error(&e))?;
                Ok(Completion::Data(buf))
            }
        }
    }
    async fn write(&self, offset: u64, data: Vec<u8>, flags: ReqFlags) -> IoResult<()> {
        match self {
            Store::Memory(m) => Store::memory(m).write(offset, &data),
            Store::File(f) => f
                .write_all_at(&data, offset)
                .and_then(|()| fua(f, flags))
                .map_err(|e| io_error(&e))?,
        }
        Ok(())
    }
    async fn write_zeroes(&self, offset: u64, len: u64, flags: ReqFlags) -> IoResult<()> {
        match self {
            Store::Memory(m) => Store::memory(m).write_zeroes(offset, len, flags),
            // Writing zeroes to a file is no faster than writing data.
            Store::File(_) if flags.contains(ReqFlags::NO_FALLBACK) => {
                return Err(IoError::Enotsup);
            }
            Store::File(f) => file_zeroes(f, offset, len, flags).map_err(|e| io_error(&e))?,
        }
        Ok(())
    }
    async fn discard(&self, offset: u64, len: u64) -> IoResult<()> {
        if let Store::Memory(m) = self {
            Store::memory(m).discard(offset, len);
        }
        Ok(())
    }
    async fn flush(&self) -> IoResult<()> {
        match self {
            Store::Memory(_) => Ok(()),
            Store::File(f) => f.sync_data().map_err(|e| io_error(&e)),
        }
    }
    async fn block_status(&self, offset: u64, len: u64) -> IoResult<Vec<BlockStatus>> {
        match self {
            Store::Memory(m) => Ok(Store::memory(m).block_status(offset, len)),
            Store::File(_) => Err(IoError::Enotsup),
        }
    }
}

/// What a test can learn about the server afterwards.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Connections accepted.
    pub connections: usize,
    /// Connections that reached transmission.
    pub transmissions: usize,
    /// Requests executed, by kind (`read`, `write`, `write+fua`, `flush`,
    /// `trim`, `write-zeroes`, `cache`, `block-status`).
    pub ops: BTreeMap<String, usize>,
    /// The most requests one connection had outstanding at once.
    pub max_batch: usize,
    /// Why each connection ended (`CloseReason` text).
    pub closes: Vec<String>,
}

impl Stats {
    /// Requests executed of `kind`.
    pub fn op(&self, kind: &str) -> usize {
        self.ops.get(kind).copied().unwrap_or(0)
    }
}

fn op_kind(op: &Op) -> &'static str {
    match op {
        Op::Read { .. } => "read",
        Op::Write { flags, .. } if flags.contains(ReqFlags::FUA) => "write+fua",
        Op::Write { .. } => "write",
        Op::Flush => "flush",
        Op::Trim { .. } => "trim",
        Op::WriteZeroes { .. } => "write-zeroes",
        Op::Cache { .. } => "cache",
        Op::BlockStatus { .. } => "block-status",
    }
}

struct Shared {
    exports: Vec<Export>,
    stores: Vec<Store>,
    stats: Mutex<Stats>,
    streams: Mutex<Vec<TcpStream>>,
    stop: AtomicBool,
    /// TLS required, with these credentials.
    tls: Option<Credentials>,
}

impl Shared {
    fn stats(&self) -> std::sync::MutexGuard<'_, Stats> {
        self.stats.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A running server; dropping it closes every connection and joins every
/// thread.
pub struct NbdServer {
    port: u16,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
    workers: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl NbdServer {
    /// Serve `exports` on 127.0.0.1, an ephemeral port.
    pub fn start(exports: Vec<(Export, Backing)>) -> io::Result<NbdServer> {
        NbdServer::start_with(exports, None)
    }

    /// Serve `exports` requiring TLS with `creds` (the engine behind
    /// [`nbdtls::TlsConnection`]).
    pub fn start_tls(exports: Vec<(Export, Backing)>, creds: Credentials) -> io::Result<NbdServer> {
        NbdServer::start_with(exports, Some(creds))
    }

    fn start_with(
        exports: Vec<(Export, Backing)>,
        tls: Option<Credentials>,
    ) -> io::Result<NbdServer> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let (exports, stores) = exports
            .into_iter()
            .map(|(e, b)| {
                let store = match b {
                    Backing::Memory { size } => Store::Memory(Mutex::new(MemDisk::new(size))),
                    Backing::File(f) => Store::File(f),
                };
                (e, store)
            })
            .unzip();
        let shared = Arc::new(Shared {
            exports,
            stores,
            stats: Mutex::new(Stats::default()),
            streams: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            tls,
        });
        let workers = Arc::new(Mutex::new(Vec::new()));
        let acceptor = {
            let shared = shared.clone();
            let workers = workers.clone();
            thread::spawn(move || accept_loop(listener, shared, workers))
        };
        Ok(NbdServer {
            port,
            shared,
            acceptor: Some(acceptor),
            workers,
        })
    }

    /// A writable in-memory export with every feature.
    pub fn memory_export(name: &str, size: u64) -> (Export, Backing) {
        (Export::new(name, size), Backing::Memory { size })
    }

    /// A file export (flush and FUA reach the file with `fdatasync`).
    pub fn file_export(name: &str, path: &Path, read_only: bool) -> io::Result<(Export, Backing)> {
        let file = File::options().read(true).write(!read_only).open(path)?;
        let size = file.metadata()?.len();
        let mut e = Export::new(name, size);
        e.features = Features {
            read_only,
            ..Features::all()
        };
        Ok((e, Backing::File(file)))
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `nbd://127.0.0.1:PORT/NAME`.
    pub fn uri(&self, name: &str) -> String {
        format!("nbd://127.0.0.1:{}/{name}", self.port)
    }

    /// The bytes of an in-memory export.
    pub fn contents(&self, name: &str) -> Option<Vec<u8>> {
        let i = self.shared.exports.iter().position(|e| e.name == name)?;
        match &self.shared.stores[i] {
            Store::Memory(m) => Some(Store::memory(m).data.clone()),
            Store::File(_) => None,
        }
    }

    /// Fill part of an in-memory export (allocating it).
    pub fn fill(&self, name: &str, offset: u64, data: &[u8]) {
        if let Some(i) = self.shared.exports.iter().position(|e| e.name == name)
            && let Store::Memory(m) = &self.shared.stores[i]
        {
            Store::memory(m).write(offset, data);
        }
    }

    /// A snapshot of the statistics.
    pub fn stats(&self) -> Stats {
        self.shared.stats().clone()
    }

    /// Wait until `n` connections have ended (the client side may exit
    /// before the server thread has recorded why), at most 10 s.
    pub fn wait_closes(&self, n: usize) -> Stats {
        for _ in 0..1000 {
            let s = self.stats();
            if s.closes.len() >= n {
                return s;
            }
            thread::sleep(Duration::from_millis(10));
        }
        self.stats()
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        for s in self
            .shared
            .streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            let _ = s.shutdown(Shutdown::Both);
        }
        let workers =
            std::mem::take(&mut *self.workers.lock().unwrap_or_else(PoisonError::into_inner));
        for w in workers {
            let _ = w.join();
        }
    }
}

fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    workers: Arc<Mutex<Vec<JoinHandle<()>>>>,
) {
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                shared.stats().connections += 1;
                let Ok(clone) = stream.try_clone() else {
                    continue;
                };
                shared
                    .streams
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(clone);
                let shared = shared.clone();
                let w = thread::spawn(move || {
                    let reason = serve(stream, &shared);
                    shared.stats().closes.push(reason);
                });
                workers
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(w);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(5));
            }
            Err(_) => thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// What `serve` drives: the plain engine, or the engine behind TLS.
trait Session {
    fn engine(&mut self) -> &mut Connection;
    /// Write what is owed; false if the socket failed.
    fn send(&mut self, stream: &mut TcpStream) -> bool;
    fn receive(&mut self, input: &[u8], exports: &dyn ExportSet) -> usize;
    /// Move bytes between the TLS layer and the engine.
    fn poll(&mut self, exports: &dyn ExportSet);
    fn should_close(&self) -> bool;
    fn closed(&mut self);
    fn reason(&self) -> String;
}

impl Session for Connection {
    fn engine(&mut self) -> &mut Connection {
        self
    }
    fn send(&mut self, stream: &mut TcpStream) -> bool {
        while !self.output().is_empty() {
            let slices: Vec<io::IoSlice<'_>> = self
                .output()
                .chunks()
                .take(64)
                .map(io::IoSlice::new)
                .collect();
            match stream.write_vectored(&slices) {
                Ok(0) | Err(_) => return false,
                Ok(n) => self.consume_output(n),
            }
        }
        true
    }
    fn receive(&mut self, input: &[u8], exports: &dyn ExportSet) -> usize {
        Connection::receive(self, input, exports)
    }
    fn poll(&mut self, _: &dyn ExportSet) {}
    fn should_close(&self) -> bool {
        Connection::should_close(self)
    }
    fn closed(&mut self) {
        Connection::closed(self);
    }
    fn reason(&self) -> String {
        self.close_reason()
            .map_or_else(|| "closed".to_string(), |r| r.to_string())
    }
}

impl Session for TlsConnection {
    fn engine(&mut self) -> &mut Connection {
        TlsConnection::engine(self)
    }
    fn send(&mut self, stream: &mut TcpStream) -> bool {
        while !self.output().is_empty() {
            match stream.write(self.output()) {
                Ok(0) | Err(_) => return false,
                Ok(n) => self.consume_output(n),
            }
        }
        true
    }
    fn receive(&mut self, input: &[u8], exports: &dyn ExportSet) -> usize {
        TlsConnection::receive(self, input, exports)
    }
    fn poll(&mut self, exports: &dyn ExportSet) {
        TlsConnection::poll(self, exports);
    }
    fn should_close(&self) -> bool {
        TlsConnection::should_close(self)
    }
    fn closed(&mut self) {
        TlsConnection::closed(self);
    }
    fn reason(&self) -> String {
        match (self.error(), self.engine_ref().close_reason()) {
            (Some(e), _) => e.to_string(),
            (None, Some(r)) => r.to_string(),
            (None, None) => "closed".to_string(),
        }
    }
}

/// Run one connection to its end; returns why it ended.
fn serve(stream: TcpStream, shared: &Shared) -> String {
    match &shared.tls {
        Some(creds) => serve_session(
            stream,
            shared,
            TlsConnection::new(Limits::default(), creds.clone()),
        ),
        None => serve_session(stream, shared, Connection::new(Limits::default())),
    }
}

fn serve_session(mut stream: TcpStream, shared: &Shared, mut conn: impl Session) -> String {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_nodelay(true);
    let mut inbuf: Vec<u8> = Vec::new();
    let mut tmp = vec![0u8; 256 * 1024];
    let mut counted = false;
    loop {
        // 1. Send what is owed.
        conn.poll(&shared.exports);
        if !conn.send(&mut stream) {
            conn.closed();
        }
        if conn.should_close() {
            break;
        }
        if !counted && conn.engine().export().is_some() {
            counted = true;
            shared.stats().transmissions += 1;
        }
        // 2. Feed what was read and not yet taken.
        let mut progress = false;
        if !inbuf.is_empty() {
            let n = conn.receive(&inbuf, &shared.exports);
            inbuf.drain(..n);
            progress |= n > 0;
        }
        // 3. Execute everything issued, completing in reverse order.
        let mut batch = Vec::new();
        while let Some(r) = conn.engine().next_request() {
            batch.push(r);
        }
        if !batch.is_empty() {
            progress = true;
            let store = conn
                .engine()
                .export()
                .and_then(|e| shared.exports.iter().position(|x| x.name == e.name))
                .map(|i| &shared.stores[i]);
            {
                let mut stats = shared.stats();
                stats.max_batch = stats.max_batch.max(batch.len());
                for r in &batch {
                    *stats.ops.entry(op_kind(&r.op).to_string()).or_default() += 1;
                }
            }
            while let Some(r) = batch.pop() {
                let c = match store {
                    Some(s) => s.execute(r.op),
                    None => Completion::Error(IoError::Enomedium),
                };
                let _ = conn.engine().complete(r.id, c);
            }
        }
        if progress {
            continue;
        }
        // 4. Need more input.
        match stream.read(&mut tmp) {
            Ok(0) | Err(_) => {
                conn.closed();
                break;
            }
            Ok(n) => inbuf.extend_from_slice(&tmp[..n]),
        }
    }
    let _ = stream.shutdown(Shutdown::Both);
    conn.reason()
}
