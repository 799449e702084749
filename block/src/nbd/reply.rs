//! Replies: a completion in, reply bytes out (QEMU: `nbd_co_send_*` in
//! `nbd/server.c`).
//!
//! Which form a reply takes depends on the negotiation:
//!
//! | negotiated | success without data | read | error |
//! |---|---|---|---|
//! | nothing | simple reply | simple reply + data | simple reply with error |
//! | structured replies | simple reply | `OFFSET_DATA`/`OFFSET_HOLE` chunks | `ERROR` chunk with a message |
//! | extended headers | `NONE` chunk | as structured, 32-byte headers | as structured, 32-byte headers |
//!
//! Reads: holes the host reports become `OFFSET_HOLE` chunks unless the
//! client set `NBD_CMD_FLAG_DF` (then one `OFFSET_DATA` chunk carries the
//! zeroes, or one `OFFSET_HOLE` if it is all hole) or has simple replies
//! (the zeroes are sent). Failed pieces become `ERROR_OFFSET` chunks where
//! chunks are allowed; otherwise the whole read fails. The last chunk
//! carries `NBD_REPLY_FLAG_DONE`. A host completion that does not fit the
//! request (wrong length, wrong kind) is answered EIO: the client is never
//! sent a malformed reply, and since every reply is built only once its
//! result is known, no error can arrive after a success header went out.

use alloc::vec::Vec;

use super::extents::{self, Combine, Query};
use super::handshake::{ALLOCATION_DEPTH_ID, BASE_ALLOCATION_ID};
use super::repr::{Chunk, ChunkHeader, Command, Descriptor, SimpleReply};
use super::request::{Completion, ReadChunk};
use super::server::{Connection, Header};
use super::wire::{cmd_flags as cf, errno};
use crate::io::IoError;

/// The `NBD_E*` value for a host error (QEMU's
/// `system_errno_to_nbd_errno`; ENOTSUP only answers a fast zero and
/// EOVERFLOW only a `DF` read, as the spec asks).
pub fn nbd_errno(e: IoError, flags: u16) -> u32 {
    match e.errno() {
        1 | 30 => errno::EPERM,
        5 | 123 | 125 => errno::EIO,
        12 => errno::ENOMEM,
        28 | 27 | 122 => errno::ENOSPC,
        75 if flags & cf::DF != 0 => errno::EOVERFLOW,
        95 if flags & cf::FAST_ZERO != 0 => errno::ENOTSUP,
        108 => errno::ESHUTDOWN,
        _ => errno::EINVAL,
    }
}

impl ReadChunk {
    fn len(&self) -> u64 {
        match self {
            ReadChunk::Data(v) => v.len() as u64,
            ReadChunk::Zero(n) | ReadChunk::Error(_, n) => *n,
        }
    }
}

impl Connection {
    fn chunk_header(&self, h: &Header, done: bool) -> ChunkHeader {
        ChunkHeader {
            cookie: h.cookie,
            offset: h.offset,
            done,
            extended: self.extended,
        }
    }

    /// A simple reply: the request's cookie and `error`.
    fn simple(&mut self, h: &Header, error: u32) {
        crate::trace!(
            nbd_co_send_simple_reply,
            "Send simple reply: cookie = {}, error = {}, type = {}, len = {}",
            h.cookie,
            error,
            h.command.name(),
            if error == 0 && h.command == Command::Read {
                h.len
            } else {
                0
            }
        );
        let r = SimpleReply {
            error,
            cookie: h.cookie,
        };
        self.out.write(|b| r.emit(b));
    }

    fn chunk(&mut self, h: &Header, done: bool, chunk: Chunk<'_>) {
        trace_chunk(h, done, &chunk);
        let ch = self.chunk_header(h, done);
        self.out.write(|b| chunk.emit(ch, b));
    }

    /// Answer `h` with an error.
    pub(super) fn send_error(&mut self, h: Header, error: u32, message: &str) {
        if self.structured {
            self.chunk(&h, true, Chunk::Error { error, message });
        } else {
            self.simple(&h, error);
        }
    }

    /// Answer `h` with success and no data.
    pub(super) fn send_ok(&mut self, h: Header) {
        if self.extended || (self.structured && h.command == Command::Read) {
            self.chunk(&h, true, Chunk::None);
        } else {
            self.simple(&h, 0);
        }
    }

    /// Answer `h` with the host's `completion`.
    pub(super) fn send_completion(&mut self, h: Header, completion: Completion) {
        match (h.command, completion) {
            (_, Completion::Error(e)) => {
                let error = nbd_errno(e, h.flags);
                self.send_error(h, error, e.strerror());
            }
            (Command::Read, Completion::Data(v)) => self.send_read(h, [ReadChunk::Data(v)]),
            (Command::Read, Completion::Zero) => self.send_read(h, [ReadChunk::Zero(h.len)]),
            (Command::Read, Completion::Chunks(v)) => self.send_read(h, v),
            (Command::BlockStatus, Completion::Extent(s)) => self.send_block_status(h, &[s]),
            (Command::BlockStatus, Completion::Extents(v)) => self.send_block_status(h, &v),
            (Command::BlockStatus, Completion::Contexts(v)) => self.send_contexts(h, &v),
            (Command::Read | Command::BlockStatus, _) => self.internal_error(h),
            (_, Completion::Done) => self.send_ok(h),
            (_, _) => self.internal_error(h),
        }
    }

    fn internal_error(&mut self, h: Header) {
        log::error!(
            "nbd: the host completed {} with a result that does not fit it",
            h.command.name()
        );
        self.send_error(h, errno::EIO, "internal error: invalid completion");
    }

    fn send_read<P>(&mut self, h: Header, pieces: P)
    where
        P: AsRef<[ReadChunk]> + IntoIterator<Item = ReadChunk>,
    {
        let list = pieces.as_ref();
        let total = list
            .iter()
            .try_fold(0u64, |acc, p| acc.checked_add(p.len()));
        if total != Some(h.len) {
            self.internal_error(h);
            return;
        }
        let first_error = list.iter().find_map(|p| match p {
            ReadChunk::Error(e, n) if *n > 0 => Some(*e),
            _ => None,
        });
        let df = h.flags & cf::DF != 0;
        if !self.structured || df {
            if let Some(e) = first_error {
                let error = nbd_errno(e, h.flags);
                self.send_error(h, error, e.strerror());
                return;
            }
            if !self.structured {
                self.simple(&h, 0);
            } else if list.iter().all(|p| matches!(p, ReadChunk::Zero(_))) {
                let hole = Chunk::OffsetHole {
                    offset: h.offset,
                    len: h.len as u32,
                };
                self.chunk(&h, true, hole);
                return;
            } else {
                let data = Chunk::OffsetData {
                    offset: h.offset,
                    data_len: h.len,
                };
                self.chunk(&h, true, data);
            }
            for p in pieces {
                match p {
                    ReadChunk::Data(v) => self.out.payload(v),
                    ReadChunk::Zero(n) | ReadChunk::Error(_, n) => self.out.zeroes(n),
                }
            }
            return;
        }
        let last = list.iter().rposition(|p| p.len() > 0);
        let mut pos = h.offset;
        for (i, p) in pieces.into_iter().enumerate() {
            let n = p.len();
            if n == 0 {
                continue;
            }
            let done = Some(i) == last;
            match p {
                ReadChunk::Data(v) => {
                    let data = Chunk::OffsetData {
                        offset: pos,
                        data_len: n,
                    };
                    self.chunk(&h, done, data);
                    self.out.payload(v);
                }
                ReadChunk::Zero(_) => {
                    let hole = Chunk::OffsetHole {
                        offset: pos,
                        len: n as u32,
                    };
                    self.chunk(&h, done, hole);
                }
                ReadChunk::Error(e, _) => {
                    let chunk = Chunk::ErrorOffset {
                        error: nbd_errno(e, h.flags),
                        message: e.strerror(),
                        offset: pos,
                    };
                    self.chunk(&h, done, chunk);
                }
            }
            pos += n;
        }
    }

    /// The shaping rules for `h` on this connection's export.
    fn status_query(&self, h: &Header) -> Option<Query> {
        let export = self.export.as_ref()?;
        Some(Query {
            offset: h.offset,
            len: h.len,
            size: export.size,
            min_block: u64::from(export.block_size.min()),
            req_one: h.flags & cf::REQ_ONE != 0,
            wide: self.extended,
        })
    }

    fn send_block_status(&mut self, h: Header, input: &[crate::io::BlockStatus]) {
        let Some(q) = self.status_query(&h) else {
            self.internal_error(h);
            return;
        };
        let mut descriptors = core::mem::take(&mut self.descriptors);
        extents::normalize(input, q, &mut descriptors);
        if descriptors.is_empty() {
            self.internal_error(h);
        } else {
            let chunk = Chunk::BlockStatus {
                context: BASE_ALLOCATION_ID,
                extents: &descriptors,
            };
            self.chunk(&h, true, chunk);
        }
        descriptors.clear();
        self.descriptors = descriptors;
    }

    /// One block status chunk per context, the last one with
    /// `NBD_REPLY_FLAG_DONE` (QEMU: `nbd_co_send_block_status` and
    /// `nbd_co_send_bitmap` per selected context).
    fn send_contexts(&mut self, h: Header, input: &[(u32, Vec<Descriptor>)]) {
        let Some(q) = self.status_query(&h) else {
            self.internal_error(h);
            return;
        };
        let mut shaped = Vec::with_capacity(input.len());
        for (id, raw) in input {
            let combine = match *id {
                BASE_ALLOCATION_ID => Combine::All,
                ALLOCATION_DEPTH_ID => Combine::Depth,
                _ => Combine::Any,
            };
            let mut out = Vec::new();
            extents::normalize_raw(raw, q, combine, &mut out);
            if out.is_empty() || !self.contexts.iter().any(|(c, _)| c == id) {
                self.internal_error(h);
                return;
            }
            shaped.push((*id, out));
        }
        if shaped.is_empty() {
            self.internal_error(h);
            return;
        }
        let last = shaped.len() - 1;
        for (i, (context, extents)) in shaped.iter().enumerate() {
            let chunk = Chunk::BlockStatus {
                context: *context,
                extents,
            };
            self.chunk(&h, i == last, chunk);
        }
    }
}

/// The chunk trace points (QEMU: `nbd_co_send_chunk_*`).
fn trace_chunk(h: &Header, done: bool, chunk: &Chunk<'_>) {
    match *chunk {
        Chunk::None => crate::trace!(
            nbd_co_send_chunk_done,
            "Send chunk done: cookie = {}",
            h.cookie
        ),
        Chunk::OffsetData { offset, data_len } => crate::trace!(
            nbd_co_send_chunk_read,
            "Send chunk read data: cookie = {}, offset = {offset}, len = {data_len}, done = {done}",
            h.cookie
        ),
        Chunk::OffsetHole { offset, len } => crate::trace!(
            nbd_co_send_chunk_read_hole,
            "Send chunk read hole: cookie = {}, offset = {offset}, len = {len}, done = {done}",
            h.cookie
        ),
        Chunk::BlockStatus { context, extents } => crate::trace!(
            nbd_co_send_chunk_block_status,
            "Send chunk block status: cookie = {}, context = {context}, extents = {}",
            h.cookie,
            extents.len()
        ),
        Chunk::Error { error, message } | Chunk::ErrorOffset { error, message, .. } => {
            crate::trace!(
                nbd_co_send_chunk_error,
                "Send chunk error: cookie = {}, error = {error}, msg = '{message}'",
                h.cookie
            )
        }
    }
}
