//! The client engine against the server engine, in memory, and against
//! a scripted server that closes or sends garbage at every step (QEMU
//! iotest 083's matrix): the open fails with QEMU's text or requests fail
//! with `EIO`, never a hang or a panic.

use alloc::vec;
use alloc::vec::Vec;

use super::peer::Peer;
use crate::io::IoError;
use crate::nbd::client::{Client, ClientOp, ClientReply, ClientState, Handle, SubmitError};
use crate::nbd::repr::{OptionReply, SimpleReply};
use crate::nbd::wire::{self, opt, rep};
use crate::nbd::{Export, Features};

/// Move bytes both ways and run the server's requests until quiet.
fn pump(c: &mut Client, p: &mut Peer) {
    for _ in 0..1000 {
        let out = c.output().to_vec();
        c.consume_output(out.len());
        if !out.is_empty() {
            p.send(&out);
        }
        p.run();
        let back: Vec<u8> = p.rx.drain(..).collect();
        if !back.is_empty() {
            c.receive(&back);
        }
        if out.is_empty() && back.is_empty() {
            return;
        }
    }
    panic!("client and server never went quiet");
}

fn open(export: Export) -> (Client, Peer) {
    let name = export.name.clone();
    let mut p = Peer::new(vec![export]);
    let mut c = Client::new(&name, true);
    pump(&mut c, &mut p);
    (c, p)
}

fn run(c: &mut Client, p: &mut Peer, op: ClientOp) -> Result<ClientReply, IoError> {
    let h = c.submit(op).map_err(|e| match e {
        SubmitError::Failed(e) => e,
        SubmitError::Busy => panic!("busy"),
    })?;
    pump(c, p);
    let (got, r) = c.next_completion().expect("a completion");
    assert_eq!(got, h);
    r
}

#[test]
fn negotiates_go_structured_and_base_allocation() {
    let (c, p) = open(Export::new("disk", 1 << 20));
    assert_eq!(c.state(), &ClientState::Ready, "{:?}", c.open_error());
    let info = c.info().unwrap();
    assert_eq!(info.size, 1 << 20);
    assert!(info.structured);
    assert!(info.base_allocation.is_some());
    assert_eq!(info.block_size.max_payload(), 32 << 20);
    assert!(!info.read_only());
    assert!(p.conn.structured_replies());
}

#[test]
fn reads_writes_holes_and_block_status() {
    let (mut c, mut p) = open(Export::new("disk", 1 << 20));
    let data = vec![0xa5u8; 8192];
    let w = ClientOp::Write {
        offset: 4096,
        data: data.clone(),
        fua: true,
    };
    assert_eq!(run(&mut c, &mut p, w), Ok(ClientReply::Done));
    assert_eq!(p.disk.fua_writes, 1);
    // A read over hole, data, hole: assembled from several chunks.
    let r = run(
        &mut c,
        &mut p,
        ClientOp::Read {
            offset: 0,
            len: 16384,
        },
    );
    let mut want = vec![0u8; 16384];
    want[4096..12288].fill(0xa5);
    assert_eq!(r, Ok(ClientReply::Data(want)));
    let bs = |c: &mut Client, p: &mut Peer, offset| match run(
        c,
        p,
        ClientOp::BlockStatus { offset, len: 65536 },
    ) {
        Ok(ClientReply::Status(s)) => s,
        other => panic!("{other:?}"),
    };
    let s = bs(&mut c, &mut p, 0);
    assert!(!s.data && s.zero && s.len == 4096, "{s:?}");
    let s = bs(&mut c, &mut p, 4096);
    assert!(s.data && !s.zero && s.len == 8192, "{s:?}");
    assert_eq!(run(&mut c, &mut p, ClientOp::Flush), Ok(ClientReply::Done));
    assert_eq!(p.disk.flushes, 1);
    let t = ClientOp::Trim {
        offset: 4096,
        len: 4096,
        fua: false,
    };
    assert_eq!(run(&mut c, &mut p, t), Ok(ClientReply::Done));
    assert!(!bs(&mut c, &mut p, 4096).data);
    let z = ClientOp::WriteZeroes {
        offset: 8192,
        len: 4096,
        fua: false,
        may_unmap: false,
        fast: false,
    };
    assert_eq!(run(&mut c, &mut p, z), Ok(ClientReply::Done));
    let r = run(
        &mut c,
        &mut p,
        ClientOp::Read {
            offset: 8192,
            len: 4096,
        },
    );
    assert_eq!(r, Ok(ClientReply::Data(vec![0; 4096])));
}

#[test]
fn sixteen_requests_in_flight_complete_out_of_order() {
    let (mut c, mut p) = open(Export::new("disk", 1 << 20));
    let mut handles = Vec::new();
    for i in 0..16u64 {
        let op = ClientOp::Write {
            offset: i * 4096,
            data: vec![i as u8; 4096],
            fua: false,
        };
        handles.push(c.submit(op).unwrap());
    }
    let extra = ClientOp::Read {
        offset: 0,
        len: 512,
    };
    assert_eq!(c.submit(extra), Err(SubmitError::Busy));
    assert_eq!(c.in_flight(), 16);
    pump(&mut c, &mut p);
    let mut done: Vec<Handle> = core::iter::from_fn(|| c.next_completion())
        .map(|(h, r)| {
            assert_eq!(r, Ok(ClientReply::Done));
            h
        })
        .collect();
    // The peer completes held requests in reverse order.
    assert_ne!(done, handles);
    done.sort();
    assert_eq!(done, handles);
    for i in 0..16u64 {
        let at = (i * 4096) as usize;
        assert!(p.disk.data[at..at + 4096].iter().all(|&b| b == i as u8));
    }
}

#[test]
fn read_only_export_refuses_writes_and_unadvertised_commands() {
    let mut e = Export::new("ro", 1 << 20);
    e.features = Features::read_only();
    let (mut c, mut p) = open(e);
    assert!(c.info().unwrap().read_only());
    let w = ClientOp::Write {
        offset: 0,
        data: vec![1; 512],
        fua: false,
    };
    assert_eq!(c.submit(w), Err(SubmitError::Failed(IoError::Eperm)));
    assert_eq!(
        c.submit(ClientOp::Flush),
        Err(SubmitError::Failed(IoError::Enotsup))
    );
    let r = run(
        &mut c,
        &mut p,
        ClientOp::Read {
            offset: 0,
            len: 512,
        },
    );
    assert_eq!(r, Ok(ClientReply::Data(vec![0; 512])));
}

#[test]
fn requests_outside_the_export_or_its_block_sizes_are_refused() {
    let (mut c, _p) = open(Export::new("disk", 1 << 20));
    for op in [
        ClientOp::Read {
            offset: (1 << 20) - 512,
            len: 1024,
        },
        ClientOp::Read { offset: 0, len: 0 },
        ClientOp::Read {
            offset: u64::MAX - 1,
            len: 4,
        },
    ] {
        assert_eq!(c.submit(op), Err(SubmitError::Failed(IoError::Einval)));
    }
    assert_eq!(c.in_flight(), 0);
    assert!(c.output().is_empty());
}

#[test]
fn unknown_export_fails_the_open_with_qemus_text() {
    let mut p = Peer::new(vec![Export::new("disk", 1 << 20)]);
    let mut c = Client::new("nope", true);
    pump(&mut c, &mut p);
    assert_eq!(c.state(), &ClientState::Failed);
    let e = c.open_error().unwrap();
    assert!(e.starts_with("Requested export not available"), "{e}");
}

#[test]
fn disconnect_sends_disc_and_the_server_closes() {
    let (mut c, mut p) = open(Export::new("disk", 1 << 20));
    c.disconnect();
    assert_eq!(c.state(), &ClientState::Closed);
    pump(&mut c, &mut p);
    assert!(p.conn.should_close());
    assert_eq!(
        c.submit(ClientOp::Flush),
        Err(SubmitError::Failed(IoError::Eio))
    );
}

/// What a full handshake looks like from the server: the transcript of
/// the server's bytes, and the client's bytes after each of its steps.
fn server_transcript() -> Vec<u8> {
    let mut p = Peer::new(vec![Export::new("disk", 1 << 20)]);
    let mut c = Client::new("disk", true);
    let mut transcript = Vec::new();
    for _ in 0..100 {
        let out = c.output().to_vec();
        c.consume_output(out.len());
        p.send(&out);
        let back: Vec<u8> = p.rx.drain(..).collect();
        if back.is_empty() {
            break;
        }
        transcript.extend_from_slice(&back);
        c.receive(&back);
    }
    assert_eq!(c.state(), &ClientState::Ready);
    transcript
}

#[test]
fn server_closing_at_every_handshake_byte_fails_the_open() {
    let t = server_transcript();
    for cut in 0..t.len() {
        let mut c = Client::new("disk", true);
        c.receive(&t[..cut]);
        assert_eq!(c.state(), &ClientState::Handshake, "cut {cut}");
        c.closed();
        assert_eq!(c.state(), &ClientState::Failed);
        assert!(c.open_error().is_some());
        assert_eq!(
            c.submit(ClientOp::Flush),
            Err(SubmitError::Failed(IoError::Eio))
        );
    }
}

#[test]
fn garbage_at_every_handshake_byte_never_panics_or_opens_wrongly() {
    let t = server_transcript();
    for at in 0..t.len() {
        for flip in [0x01u8, 0x80, 0xff] {
            let mut g = t.clone();
            g[at] ^= flip;
            let mut c = Client::new("disk", true);
            c.receive(&g);
            // Either the corruption was refused, or the handshake waits for
            // more (a length grew), or it landed in a field the client may
            // accept (size, flags, an info value); closing then settles it.
            if c.state() == &ClientState::Handshake {
                c.closed();
                assert!(c.open_error().is_some());
            }
            if let Some(info) = c.info() {
                assert!(info.size.is_multiple_of(u64::from(info.block_size.min())));
            }
        }
    }
}

#[test]
fn server_closing_or_garbage_during_requests_fails_them_with_eio() {
    for garbage in [false, true] {
        let (mut c, mut p) = open(Export::new("disk", 1 << 20));
        let r = c
            .submit(ClientOp::Read {
                offset: 0,
                len: 4096,
            })
            .unwrap();
        let f = c.submit(ClientOp::Flush).unwrap();
        let out = c.output().to_vec();
        c.consume_output(out.len());
        p.send(&out);
        if garbage {
            c.receive(&[0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0]);
        } else {
            c.closed();
        }
        assert_eq!(c.state(), &ClientState::Failed);
        let mut got: Vec<_> = core::iter::from_fn(|| c.next_completion()).collect();
        got.sort_by_key(|(h, _)| *h);
        assert_eq!(got, vec![(r, Err(IoError::Eio)), (f, Err(IoError::Eio))]);
        let again = c.submit(ClientOp::Read {
            offset: 0,
            len: 512,
        });
        assert_eq!(again, Err(SubmitError::Failed(IoError::Eio)));
    }
}

#[test]
fn a_reply_truncated_at_every_byte_then_closed_fails_with_eio() {
    let (mut c0, mut p) = open(Export::new("disk", 1 << 20));
    let h = c0
        .submit(ClientOp::Read {
            offset: 0,
            len: 4096,
        })
        .unwrap();
    let out = c0.output().to_vec();
    p.send(&out);
    p.run();
    let reply: Vec<u8> = p.rx.drain(..).collect();
    for cut in 0..reply.len() {
        let (mut c, _) = open(Export::new("disk", 1 << 20));
        assert_eq!(
            c.submit(ClientOp::Read {
                offset: 0,
                len: 4096
            }),
            Ok(h)
        );
        c.receive(&reply[..cut]);
        assert!(c.next_completion().is_none(), "cut {cut}");
        c.closed();
        assert_eq!(c.next_completion(), Some((h, Err(IoError::Eio))));
    }
}

/// A scripted server: greeting, then canned answers, starting with the
/// refusal of extended headers (the client asks for them first).
fn greeting() -> Vec<u8> {
    let mut g = Vec::new();
    g.extend_from_slice(&wire::NBD_MAGIC.to_be_bytes());
    g.extend_from_slice(&wire::NBD_OPTS_MAGIC.to_be_bytes());
    g.extend_from_slice(&3u16.to_be_bytes());
    OptionReply::Error {
        code: rep::ERR_UNSUP,
        message: "",
    }
    .emit(opt::EXTENDED_HEADERS, &mut g);
    g
}

#[test]
fn go_unsupported_falls_back_to_export_name_without_block_status() {
    let mut c = Client::new("disk", true);
    let mut s = greeting();
    OptionReply::Error {
        code: rep::ERR_UNSUP,
        message: "",
    }
    .emit(opt::STRUCTURED_REPLY, &mut s);
    // No structured replies: no SET_META_CONTEXT; GO comes next.
    OptionReply::Error {
        code: rep::ERR_UNSUP,
        message: "",
    }
    .emit(opt::GO, &mut s);
    s.extend_from_slice(&(1u64 << 20).to_be_bytes());
    s.extend_from_slice(&(wire::transmission_flags::HAS_FLAGS).to_be_bytes());
    c.receive(&s);
    assert_eq!(c.state(), &ClientState::Ready, "{:?}", c.open_error());
    let info = c.info().unwrap();
    assert!(!info.structured && info.base_allocation.is_none());
    assert!(!info.read_only() && info.size == 1 << 20);
    // The client sent EXPORT_NAME last.
    let out = c.output();
    let tail = &out[out.len() - 4 - 16..];
    assert_eq!(wire::get_u32(tail, 8..12), opt::EXPORT_NAME);
    // Simple replies for reads, then.
    let h = c.submit(ClientOp::Read { offset: 0, len: 4 }).unwrap();
    let mut r = Vec::new();
    SimpleReply {
        error: 0,
        cookie: h.0,
    }
    .emit(&mut r);
    r.extend_from_slice(&[1, 2, 3, 4]);
    c.receive(&r);
    assert_eq!(
        c.next_completion(),
        Some((h, Ok(ClientReply::Data(vec![1, 2, 3, 4]))))
    );
    let bs = c.submit(ClientOp::BlockStatus { offset: 0, len: 4 });
    assert_eq!(bs, Err(SubmitError::Failed(IoError::Enotsup)));
}

#[test]
fn a_simple_reply_to_a_structured_read_is_a_protocol_error() {
    let (mut c, _p) = open(Export::new("disk", 1 << 20));
    let h = c.submit(ClientOp::Read { offset: 0, len: 4 }).unwrap();
    let mut r = Vec::new();
    SimpleReply {
        error: 0,
        cookie: h.0,
    }
    .emit(&mut r);
    r.extend_from_slice(&[0; 4]);
    c.receive(&r);
    assert_eq!(c.state(), &ClientState::Failed);
    assert_eq!(c.next_completion(), Some((h, Err(IoError::Eio))));
}

#[test]
fn server_errors_map_to_errno_and_keep_the_connection() {
    let (mut c, mut p) = open(Export::new("disk", 1 << 20));
    p.disk.fail = Some(IoError::Enospc);
    let w = ClientOp::Write {
        offset: 0,
        data: vec![1; 512],
        fua: false,
    };
    assert_eq!(run(&mut c, &mut p, w), Err(IoError::Enospc));
    let r = run(
        &mut c,
        &mut p,
        ClientOp::Read {
            offset: 0,
            len: 512,
        },
    );
    assert_eq!(r, Err(IoError::Enospc));
    p.disk.fail = None;
    assert_eq!(c.state(), &ClientState::Ready);
    assert_eq!(run(&mut c, &mut p, ClientOp::Flush), Ok(ClientReply::Done));
}

/// A server without `NBD_OPT_GO` that answers `NBD_OPT_EXPORT_NAME` with
/// an export of `size` bytes.
pub(super) fn export_name_server(size: u64) -> Vec<u8> {
    let mut s = greeting();
    for o in [opt::STRUCTURED_REPLY, opt::GO] {
        OptionReply::Error {
            code: rep::ERR_UNSUP,
            message: "",
        }
        .emit(o, &mut s);
    }
    s.extend_from_slice(&size.to_be_bytes());
    s.extend_from_slice(&(wire::transmission_flags::HAS_FLAGS).to_be_bytes());
    s
}

#[test]
fn an_export_refused_at_the_end_of_the_handshake_does_not_open() {
    let mut c = Client::new("disk", true);
    c.receive(&export_name_server(u64::MAX));
    assert_eq!(c.state(), &ClientState::Failed);
    assert_eq!(
        c.open_error(),
        Some("Export size 18446744073709551615 is too large")
    );
    // Before, the export showed as opened (`info` is what the node
    // opens on) although the open had failed.
    assert_eq!(c.info(), None);
    assert_eq!(
        c.submit(ClientOp::Read {
            offset: 0,
            len: 512
        }),
        Err(SubmitError::Failed(IoError::Eio))
    );
}

#[test]
fn negotiates_extended_headers_when_the_server_offers_them() {
    let (mut c, mut p) = open(Export::new("disk", 1 << 20));
    let info = *c.info().unwrap();
    assert!(info.extended && info.structured && info.base_allocation.is_some());
    assert!(p.conn.extended_headers());
    // Requests and replies in the extended form, block status with
    // 64-bit extents.
    let w = ClientOp::Write {
        offset: 8192,
        data: vec![0x5a; 4096],
        fua: false,
    };
    assert_eq!(run(&mut c, &mut p, w), Ok(ClientReply::Done));
    let r = run(
        &mut c,
        &mut p,
        ClientOp::Read {
            offset: 8192,
            len: 4096,
        },
    );
    assert_eq!(r, Ok(ClientReply::Data(vec![0x5a; 4096])));
    match run(
        &mut c,
        &mut p,
        ClientOp::BlockStatus {
            offset: 8192,
            len: 65536,
        },
    ) {
        Ok(ClientReply::Status(s)) => assert!(s.data && s.len == 4096, "{s:?}"),
        other => panic!("{other:?}"),
    }
    match run(
        &mut c,
        &mut p,
        ClientOp::BlockStatus {
            offset: 65536,
            len: 65536,
        },
    ) {
        Ok(ClientReply::Status(s)) => assert!(!s.data && s.len == 65536, "{s:?}"),
        other => panic!("{other:?}"),
    }
    c.disconnect();
    pump(&mut c, &mut p);
    assert!(p.conn.should_close());
}

#[test]
fn with_extended_headers_a_structured_reply_is_a_protocol_error() {
    let (mut c, _p) = open(Export::new("disk", 1 << 20));
    assert!(c.info().unwrap().extended);
    let h = c
        .submit(ClientOp::Read {
            offset: 0,
            len: 512,
        })
        .unwrap();
    // A compact structured chunk (20-byte header): NONE, done.
    let mut r = Vec::new();
    r.extend_from_slice(&wire::NBD_STRUCTURED_REPLY_MAGIC.to_be_bytes());
    r.extend_from_slice(&1u16.to_be_bytes());
    r.extend_from_slice(&0u16.to_be_bytes());
    r.extend_from_slice(&h.0.to_be_bytes());
    r.extend_from_slice(&0u32.to_be_bytes());
    c.receive(&r);
    assert_eq!(c.state(), &ClientState::Failed);
    assert_eq!(c.next_completion(), Some((h, Err(IoError::Eio))));
}
