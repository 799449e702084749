//! The NBD server engine: the Network Block Device protocol
//! (NetworkBlockDevice/nbd `doc/proto.md`, with the `extension-ext-header`
//! branch's extended headers), sans I/O — bytes in, requests out,
//! completions in, bytes out. It never does I/O, never blocks and never
//! panics on anything a client sends; the kernel's TCP glue and the test
//! adapter in `tests/` drive the same code.
//!
//! Layers, bottom up, as smoltcp splits a protocol:
//!
//! 1. [`wire`] — the numbers: magics, flags, option/command/reply/info and
//!    error codes, header layouts as byte ranges. No meaning, no
//!    allocation.
//! 2. [`repr`] — typed options, request headers, option replies and reply
//!    chunks, parsed from and emitted to bytes. Parsing sheds everything
//!    invalid; whatever exists can be emitted.
//! 3. The connection state machine, [`Connection`] (QEMU's `NBDClient`),
//!    one concern per file: [`server`] (input parsing, request slots,
//!    closing), [`handshake`] (fixed newstyle option haggling),
//!    [`transmission`] (request validation into [`Request`]s),
//!    [`reply`] (completions into simple, structured or extended
//!    replies), [`extents`] (block status shaped to the spec's rules),
//!    [`output`] (the zero-copy outgoing queue).
//! 4. What the host supplies: [`export`] (the export set, features and
//!    block sizes) and [`request`] (requests to execute and their
//!    completions, in the block layer's `ReqFlags`/`IoError`/`BlockStatus`
//!    vocabulary).
//!
//! ```
//! use block::nbd::{Completion, Connection, Export, Limits, Op};
//!
//! let exports = vec![Export::new("disk", 1 << 20)];
//! let mut conn = Connection::new(Limits::default());
//! // Greeting: NBDMAGIC, IHAVEOPT, handshake flags.
//! assert_eq!(conn.output().chunk().len(), 18);
//! conn.consume_output(18);
//!
//! // Client flags (fixed newstyle, no zeroes), then NBD_OPT_EXPORT_NAME "disk".
//! let mut input = vec![0, 0, 0, 3];
//! input.extend_from_slice(b"IHAVEOPT");
//! input.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 4]);
//! input.extend_from_slice(b"disk");
//! // NBD_CMD_READ of 512 bytes at 0, cookie 7.
//! input.extend_from_slice(&[0x25, 0x60, 0x95, 0x13, 0, 0, 0, 0]);
//! input.extend_from_slice(&7u64.to_be_bytes());
//! input.extend_from_slice(&0u64.to_be_bytes());
//! input.extend_from_slice(&512u32.to_be_bytes());
//! assert_eq!(conn.receive(&input, &exports), input.len());
//!
//! let req = conn.next_request().unwrap();
//! assert_eq!(req.op, Op::Read { offset: 0, len: 512 });
//! conn.complete(req.id, Completion::Data(vec![0xa5; 512])).unwrap();
//! // Size and flags, then a simple reply (magic, error 0, cookie) and the data.
//! let out: Vec<u8> = conn.output().chunks().flatten().copied().collect();
//! assert_eq!(out.len(), 10 + 16 + 512);
//! assert_eq!(&out[10..14], &[0x67, 0x44, 0x66, 0x98]);
//! assert_eq!(out[26..], [0xa5; 512]);
//! ```

pub mod client;
pub mod client_node;
pub mod export;
pub mod extents;
pub mod handshake;
pub mod output;
pub mod reply;
pub mod repr;
pub mod request;
pub mod server;
pub mod transmission;
pub mod wire;

#[cfg(test)]
pub(crate) mod tests;

pub use export::{BlockSize, BlockSizeError, Export, ExportSet, Features};
pub use output::Output;
pub use repr::Descriptor;
pub use request::{CompleteError, Completion, MetaContext, Op, ReadChunk, Request, RequestId};
pub use server::{CloseReason, Connection, InputState, Limits, ProtocolError, State};
