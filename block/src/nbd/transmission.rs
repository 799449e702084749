//! Transmission: request headers in, validated [`Request`]s out (QEMU:
//! `nbd_co_receive_request` and `nbd_check_meta_export` in `nbd/server.c`).
//!
//! Every request is checked before the host sees it, in this order (the
//! first failing check answers; nbdkit's order, with the spec's errors):
//!
//! 1. framing: a payload above the maximum is skipped and answered EINVAL
//!    (compact headers: always; extended headers: up to 32 MiB or the
//!    maximum, beyond which the spec asks for a hard disconnect); a bad
//!    magic is a hard disconnect;
//! 2. the server is shutting down: ESHUTDOWN;
//! 3. unknown command: EINVAL, connection kept;
//! 4. write, trim or write-zeroes on a read-only export: EPERM;
//! 5. a flag unknown, not valid for the command, or not negotiated: EINVAL;
//! 6. a command not advertised (flush, trim, write-zeroes, cache; block
//!    status without a selected context): EINVAL;
//! 7. flush with a nonzero offset or length: EINVAL;
//! 8. a range past the end: ENOSPC for write and write-zeroes, EINVAL for
//!    the rest;
//! 9. offset or length not a multiple of the minimum block size: EINVAL;
//! 10. a read above the maximum payload: EOVERFLOW with `NBD_CMD_FLAG_DF`,
//!     EINVAL without; block status of length 0: EINVAL.
//!
//! A request of length 0 that passed is answered at once (success),
//! without troubling the host; a failed write's payload is skipped before
//! its error goes out, so the connection stays in step.

use alloc::vec::Vec;

use super::repr::{Command, RequestHeader};
use super::request::{MetaContext, Op, Request};
use super::server::{CloseReason, Connection, ErrorReply, Header, PendingWrite, ProtocolError, Rx};
use super::wire::{cmd_flags as cf, errno, get_u64, transmission_flags as tf};
use crate::io::ReqFlags;

/// The spec's "never treat ≤ 32 MiB as abuse" bound.
const ABUSE_FLOOR: u64 = 32 * 1024 * 1024;

/// Block status payload: 8 bytes of effect length and one 4-byte id per
/// context, up to 6 ids (what the header buffer holds; a client names each
/// selected context once).
const BLOCK_STATUS_PAYLOAD_MAX: u64 = 8 + 4 * 6;

/// A refused request: the `NBD_E*` error and a message for humans.
pub(super) type Refusal = (u32, &'static str);

impl Connection {
    fn max_payload(&self) -> u64 {
        self.export
            .as_ref()
            .map_or(u64::from(super::export::MIN_MAX_PAYLOAD), |e| {
                u64::from(e.block_size.max_payload())
            })
    }

    /// A request header arrived.
    pub(super) fn on_request_header(&mut self) {
        let extended = self.extended;
        let h = match RequestHeader::parse(&self.hdr, extended) {
            Ok(h) => h,
            Err(super::repr::HeaderError::BadMagic(m)) => {
                self.protocol_error(ProtocolError::BadRequestMagic(m));
                return;
            }
        };
        crate::trace!(
            nbd_receive_request,
            "Got request: {{ .flags = 0x{:x}, .type = {} ({}), from = {}, len = {}, cookie = {} }}",
            h.flags,
            u16::from(h.command),
            h.command.name(),
            h.offset,
            h.length,
            h.cookie
        );
        let header = Header {
            flags: h.flags,
            command: h.command,
            cookie: h.cookie,
            offset: h.offset,
            len: h.length,
        };
        if h.command == Command::Disc {
            log::debug!("nbd: client sent NBD_CMD_DISC");
            self.begin_close(CloseReason::Disconnect, true);
            self.rx = Rx::Stopped;
            return;
        }
        let payload_flag = extended && h.flags & cf::PAYLOAD_LEN != 0;
        let payload = if extended {
            if payload_flag { h.length } else { 0 }
        } else if h.command == Command::Write {
            h.length
        } else {
            0
        };
        let max = self.max_payload();
        if payload > max {
            let skip_limit = if extended {
                max.max(ABUSE_FLOOR)
            } else {
                u64::from(u32::MAX)
            };
            if payload > skip_limit {
                self.protocol_error(ProtocolError::PayloadTooLarge(payload));
            } else {
                self.skip_then_refuse(header, payload, (errno::EINVAL, "payload too large"));
            }
            return;
        }
        if payload_flag
            && h.command == Command::BlockStatus
            && self.flags & tf::BLOCK_STATUS_PAYLOAD != 0
        {
            if (8..=BLOCK_STATUS_PAYLOAD_MAX).contains(&payload) && (payload - 8).is_multiple_of(4)
            {
                self.rx = Rx::BlockStatusPayload {
                    header,
                    len: payload as usize,
                };
            } else {
                self.skip_then_refuse(
                    header,
                    payload,
                    (errno::EINVAL, "invalid block status payload"),
                );
            }
            return;
        }
        if payload > 0 && h.command != Command::Write {
            self.skip_then_refuse(header, payload, (errno::EINVAL, "unexpected payload"));
            return;
        }
        match self.validate(&header) {
            Err(refusal) => self.skip_then_refuse(header, payload, refusal),
            Ok(()) => self.dispatch(header),
        }
    }

    /// Skip `payload` bytes, then answer `refusal`.
    fn skip_then_refuse(&mut self, header: Header, payload: u64, refusal: Refusal) {
        let (error, message) = refusal;
        log::debug!(
            "nbd: refusing {} (cookie {:#x}): {message}",
            header.command.name(),
            header.cookie
        );
        if payload == 0 {
            self.send_error(header, error, message);
        } else {
            self.rx = Rx::Skip {
                left: payload,
                reply: Some(ErrorReply {
                    header,
                    error,
                    message,
                }),
            };
        }
    }

    /// The payload of a block status request arrived.
    pub(super) fn on_block_status_payload(&mut self, mut header: Header, len: usize) {
        self.rx = Rx::RequestHeader;
        header.len = get_u64(&self.hdr, 0..8);
        let ids: Vec<u32> = self.hdr[8..len]
            .as_chunks::<4>()
            .0
            .iter()
            .map(|id| u32::from_be_bytes(*id))
            .collect();
        let mut wanted = Vec::with_capacity(ids.len());
        for (i, id) in ids.iter().enumerate() {
            match self.contexts.iter().find(|(c, _)| c == id) {
                Some(c) if !ids[..i].contains(id) => wanted.push(c.clone()),
                _ => {
                    self.send_error(header, errno::EINVAL, "unknown or repeated context id");
                    return;
                }
            }
        }
        if wanted.is_empty() {
            self.send_error(header, errno::EINVAL, "unknown or repeated context id");
            return;
        }
        match self.validate(&header) {
            Err((error, message)) => self.send_error(header, error, message),
            Ok(()) => self.push_block_status(header, wanted),
        }
    }

    /// Check a request against the protocol and the export.
    fn validate(&self, h: &Header) -> Result<(), Refusal> {
        if self.shutting_down {
            return Err((errno::ESHUTDOWN, "server shutting down"));
        }
        let Some(export) = self.export.as_ref() else {
            return Err((errno::EINVAL, "no export"));
        };
        let f = self.flags;
        let has = |bit: u16| f & bit != 0;
        let cmd = h.command;
        if let Command::Unknown(_) = cmd {
            return Err((errno::EINVAL, "invalid request type"));
        }
        if has(tf::READ_ONLY)
            && matches!(cmd, Command::Write | Command::Trim | Command::WriteZeroes)
        {
            return Err((errno::EPERM, "export is read-only"));
        }

        let mut allowed = 0u16;
        if has(tf::SEND_FUA) {
            allowed |= cf::FUA;
        }
        match cmd {
            Command::Read if has(tf::SEND_DF) => allowed |= cf::DF,
            Command::WriteZeroes => {
                allowed |= cf::NO_HOLE;
                if has(tf::SEND_FAST_ZERO) {
                    allowed |= cf::FAST_ZERO;
                }
            }
            Command::BlockStatus => {
                allowed |= cf::REQ_ONE;
                if has(tf::BLOCK_STATUS_PAYLOAD) {
                    allowed |= cf::PAYLOAD_LEN;
                }
            }
            Command::Write if self.extended => allowed |= cf::PAYLOAD_LEN,
            _ => {}
        }
        if h.flags & !allowed != 0 {
            return Err((errno::EINVAL, "unsupported flags for this command"));
        }
        if self.extended && cmd == Command::Write && h.flags & cf::PAYLOAD_LEN == 0 {
            return Err((errno::EINVAL, "write without NBD_CMD_FLAG_PAYLOAD_LEN"));
        }

        let advertised = match cmd {
            Command::Flush => has(tf::SEND_FLUSH),
            Command::Trim => has(tf::SEND_TRIM),
            Command::WriteZeroes => has(tf::SEND_WRITE_ZEROES),
            Command::Cache => has(tf::SEND_CACHE),
            _ => true,
        };
        if !advertised {
            return Err((errno::EINVAL, "command not supported by this export"));
        }
        if cmd == Command::BlockStatus && self.contexts.is_empty() {
            return Err((errno::EINVAL, "no metadata context selected"));
        }
        if cmd == Command::Flush {
            if h.offset != 0 || h.len != 0 {
                return Err((errno::EINVAL, "flush with nonzero offset or length"));
            }
            return Ok(());
        }

        let in_range = h
            .offset
            .checked_add(h.len)
            .is_some_and(|end| end <= export.size);
        if !in_range {
            return Err(match cmd {
                Command::Write | Command::WriteZeroes => {
                    (errno::ENOSPC, "request past the end of the export")
                }
                _ => (errno::EINVAL, "request past the end of the export"),
            });
        }
        let min = u64::from(export.block_size.min());
        if !h.offset.is_multiple_of(min) || !h.len.is_multiple_of(min) {
            return Err((
                errno::EINVAL,
                "request not aligned to the minimum block size",
            ));
        }
        // A data chunk's 32-bit length also holds its 8-byte offset.
        let read_max = u64::from(export.block_size.max_payload()).min(u64::from(u32::MAX) - 8);
        if cmd == Command::Read && h.len > read_max {
            return Err(if h.flags & cf::DF != 0 {
                (errno::EOVERFLOW, "read too large for one chunk")
            } else {
                (errno::EINVAL, "read larger than the maximum payload")
            });
        }
        if cmd == Command::BlockStatus && h.len == 0 {
            return Err((errno::EINVAL, "block status of length 0"));
        }
        Ok(())
    }

    /// Hand a valid request to the host (or answer an empty one).
    fn dispatch(&mut self, h: Header) {
        let fua = if h.flags & cf::FUA != 0 {
            ReqFlags::FUA
        } else {
            ReqFlags::NONE
        };
        if h.len == 0 && !matches!(h.command, Command::Flush | Command::BlockStatus) {
            self.send_ok(h);
            return;
        }
        let op = match h.command {
            Command::Read => Op::Read {
                offset: h.offset,
                len: h.len,
            },
            Command::Write => {
                // The payload's buffer is allocated fallibly and within the
                // host's room: a host that cannot hold it answers ENOMEM
                // (after skipping the payload) rather than failing whole.
                let mut data = Vec::new();
                if h.len > self.payload_room || data.try_reserve_exact(h.len as usize).is_err() {
                    self.skip_then_refuse(h, h.len, (errno::ENOMEM, "out of memory"));
                    return;
                }
                self.payload_room -= h.len;
                self.write_bytes += h.len;
                self.rx = Rx::WritePayload {
                    pending: PendingWrite { header: h, data },
                };
                return;
            }
            Command::Flush => Op::Flush,
            Command::Trim => Op::Trim {
                offset: h.offset,
                len: h.len,
                flags: fua,
            },
            Command::WriteZeroes => {
                let mut flags = fua;
                if h.flags & cf::NO_HOLE == 0 {
                    flags = flags | ReqFlags::MAY_UNMAP;
                }
                if h.flags & cf::FAST_ZERO != 0 {
                    flags = flags | ReqFlags::NO_FALLBACK;
                }
                Op::WriteZeroes {
                    offset: h.offset,
                    len: h.len,
                    flags,
                }
            }
            Command::Cache => Op::Cache {
                offset: h.offset,
                len: h.len,
            },
            Command::BlockStatus => {
                let all = self.contexts.clone();
                self.push_block_status(h, all);
                return;
            }
            Command::Disc | Command::Unknown(_) => return,
        };
        self.push_request(h, op);
    }

    /// A write's payload is complete.
    pub(super) fn on_write_payload(&mut self, pending: PendingWrite) {
        let h = pending.header;
        let flags = if h.flags & cf::FUA != 0 {
            ReqFlags::FUA
        } else {
            ReqFlags::NONE
        };
        let op = Op::Write {
            offset: h.offset,
            data: pending.data,
            flags,
        };
        self.push_request(h, op);
    }

    /// A block status request for `contexts` (every selected one, or
    /// those the payload names).
    fn push_block_status(&mut self, h: Header, contexts: Vec<(u32, MetaContext)>) {
        let op = Op::BlockStatus {
            offset: h.offset,
            len: h.len,
            req_one: h.flags & cf::REQ_ONE != 0,
            contexts,
        };
        self.push_request(h, op);
    }

    fn push_request(&mut self, h: Header, op: Op) {
        let id = self.acquire(h);
        self.ready.push_back(Request {
            id,
            cookie: h.cookie,
            op,
        });
    }
}
