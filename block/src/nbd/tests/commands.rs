//! Transmission: every command, every reply form, out-of-order
//! completion, disconnects and shutdown.

use alloc::vec;
use alloc::vec::Vec;

use super::peer::{Peer, Reply, error_message};
use crate::io::{BlockStatus, IoError, ReqFlags};
use crate::nbd::handshake::BASE_ALLOCATION_ID;
use crate::nbd::wire::{cmd, cmd_flags as cf, errno, get_u32, get_u64, reply_type as rt, state};
use crate::nbd::{
    CloseReason, CompleteError, Completion, Export, InputState, Limits, MetaContext, Op, ReadChunk,
    State,
};

const MIB: u64 = 1 << 20;

fn disk() -> Vec<Export> {
    vec![Export::new("disk", MIB)]
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn write_read_round_trip_with_simple_replies() {
    let mut p = Peer::new(disk());
    p.connect("disk", false, false);
    let data = pattern(8192, 1);
    p.write(0, 10, 4096, &data);
    p.run();
    assert_eq!(
        p.reply(),
        Reply::Simple {
            error: 0,
            cookie: 10
        }
    );
    p.request(0, cmd::READ, 11, 4096, 8192);
    p.run();
    assert_eq!(p.simple_read(11, 8192), data);
    // A hole reads as zeroes in a simple reply too.
    p.request(0, cmd::READ, 12, 65536, 4096);
    p.run();
    assert_eq!(p.simple_read(12, 4096), vec![0; 4096]);
}

#[test]
fn fua_flush_trim_zeroes_cache_reach_the_host_with_block_layer_flags() {
    let mut p = Peer::new(disk());
    p.connect("disk", false, false);
    p.write(cf::FUA, 1, 0, &[1; 512]);
    p.request(0, cmd::FLUSH, 2, 0, 0);
    p.request(cf::FUA, cmd::TRIM, 3, 4096, 4096);
    p.request(cf::NO_HOLE, cmd::WRITE_ZEROES, 4, 8192, 4096);
    p.request(cf::FAST_ZERO, cmd::WRITE_ZEROES, 5, 12288, 4096);
    p.request(0, cmd::CACHE, 6, 0, 65536);
    p.take_requests();
    let ops: Vec<&Op> = p.held.iter().map(|r| &r.op).collect();
    assert_eq!(
        ops,
        vec![
            &Op::Write {
                offset: 0,
                data: vec![1; 512],
                flags: ReqFlags::FUA
            },
            &Op::Flush,
            &Op::Trim {
                offset: 4096,
                len: 4096,
                flags: ReqFlags::FUA
            },
            &Op::WriteZeroes {
                offset: 8192,
                len: 4096,
                flags: ReqFlags::NONE
            },
            &Op::WriteZeroes {
                offset: 12288,
                len: 4096,
                flags: ReqFlags::MAY_UNMAP | ReqFlags::NO_FALLBACK
            },
            &Op::Cache {
                offset: 0,
                len: 65536
            },
        ]
    );
    assert_eq!(
        p.held.iter().map(|r| r.cookie).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5, 6]
    );
    p.run();
    let mut cookies: Vec<u64> = (0..6).map(|_| p.reply()).map(|r| r.cookie()).collect();
    cookies.sort();
    assert_eq!(cookies, [1, 2, 3, 4, 5, 6]);
    assert_eq!((p.disk.flushes, p.disk.fua_writes), (1, 1));
    assert!(p.disk.allocated[2], "NO_HOLE allocates");
}

#[test]
fn replies_go_out_in_completion_order() {
    let mut p = Peer::new(disk());
    p.connect("disk", true, false);
    for c in 1..=3 {
        p.request(0, cmd::READ, c, 0, 512);
    }
    assert_eq!(p.take_requests(), 3);
    assert_eq!(p.conn.in_flight(), 3);
    let mut held = core::mem::take(&mut p.held);
    // Complete 2, then 3, then 1.
    let order = [1usize, 2, 0];
    for &i in &order {
        let r = &held[i];
        p.conn
            .complete(r.id, Completion::Data(vec![i as u8; 512]))
            .unwrap();
    }
    p.drain();
    for &i in &order {
        let got = p.structured_read(i as u64 + 1, 0, 512);
        assert_eq!(got, vec![i as u8; 512]);
    }
    // Completing twice is refused, harmlessly.
    let r = held.remove(0);
    assert_eq!(
        p.conn.complete(r.id, Completion::Zero),
        Err(CompleteError::UnknownRequest)
    );
    assert_eq!(p.conn.in_flight(), 0);
}

#[test]
fn structured_reads_send_holes_as_offset_hole() {
    let mut p = Peer::new(disk());
    p.connect("disk", true, false);
    p.write(0, 1, 4096, &pattern(4096, 9));
    p.run();
    p.reply();
    p.request(0, cmd::READ, 2, 0, 12288);
    p.run();
    let chunks = p.full_reply();
    let kinds: Vec<(u16, bool)> = chunks
        .iter()
        .map(|c| match c {
            Reply::Chunk { kind, flags, .. } => (*kind, flags & 1 != 0),
            Reply::Simple { .. } => (0xffff, true),
        })
        .collect();
    assert_eq!(
        kinds,
        [
            (rt::OFFSET_HOLE, false),
            (rt::OFFSET_DATA, false),
            (rt::OFFSET_HOLE, true)
        ]
    );
    let Reply::Chunk { payload, .. } = &chunks[0] else {
        unreachable!()
    };
    assert_eq!((get_u64(payload, 0..8), get_u32(payload, 8..12)), (0, 4096));
    let Reply::Chunk { payload, .. } = &chunks[1] else {
        unreachable!()
    };
    assert_eq!(get_u64(payload, 0..8), 4096);
    assert_eq!(payload[8..], pattern(4096, 9)[..]);
}

#[test]
fn df_reads_send_one_data_chunk_with_the_zeroes() {
    let mut p = Peer::new(disk());
    p.connect("disk", true, false);
    p.write(0, 1, 4096, &pattern(4096, 3));
    p.run();
    p.reply();
    p.request(cf::DF, cmd::READ, 2, 0, 12288);
    p.run();
    let chunks = p.full_reply();
    assert_eq!(chunks.len(), 1);
    let Reply::Chunk { kind, payload, .. } = &chunks[0] else {
        unreachable!()
    };
    assert_eq!(*kind, rt::OFFSET_DATA);
    let mut want = vec![0; 12288];
    want[4096..8192].copy_from_slice(&pattern(4096, 3));
    assert_eq!(payload[8..], want[..]);
    // All hole under DF: one OFFSET_HOLE.
    p.request(cf::DF, cmd::READ, 3, 65536, 8192);
    p.run();
    let chunks = p.full_reply();
    assert!(matches!(
        &chunks[..],
        [Reply::Chunk {
            kind: rt::OFFSET_HOLE,
            ..
        }]
    ));
}

#[test]
fn read_errors_become_error_chunks_or_simple_errors() {
    // Structured: failed pieces are ERROR_OFFSET chunks, good ones data.
    let mut p = Peer::new(disk());
    p.connect("disk", true, false);
    p.request(0, cmd::READ, 1, 0, 8192);
    p.take_requests();
    let r = p.held.pop().unwrap();
    let chunks = vec![
        ReadChunk::Data(vec![5; 4096]),
        ReadChunk::Error(IoError::Eio, 4096),
    ];
    p.conn.complete(r.id, Completion::Chunks(chunks)).unwrap();
    p.drain();
    let reply = p.full_reply();
    assert_eq!(reply.len(), 2);
    let Reply::Chunk { kind, payload, .. } = &reply[1] else {
        unreachable!()
    };
    assert_eq!(*kind, rt::ERROR_OFFSET);
    assert_eq!(get_u32(payload, 0..4), errno::EIO);
    assert_eq!(error_message(&reply[1]), "Input/output error");
    assert_eq!(get_u64(payload, payload.len() - 8..payload.len()), 4096);

    // Simple replies: the whole read fails, no data follows.
    let mut p = Peer::new(disk());
    p.connect("disk", false, false);
    p.disk.fail = Some(IoError::Eio);
    p.request(0, cmd::READ, 7, 0, 4096);
    p.run();
    assert_eq!(
        p.reply(),
        Reply::Simple {
            error: errno::EIO,
            cookie: 7
        }
    );
    assert!(p.rx.is_empty());
}

#[test]
fn host_errors_map_to_nbd_errors() {
    let mut p = Peer::new(disk());
    p.connect("disk", true, false);
    let cases = [
        (IoError::Eperm, 0, errno::EPERM),
        (IoError::Enospc, 0, errno::ENOSPC),
        (IoError::Enomedium, 0, errno::EIO),
        (IoError::Other(12), 0, errno::ENOMEM),
        (IoError::Other(30), 0, errno::EPERM),
        (IoError::Other(108), 0, errno::ESHUTDOWN),
        (IoError::Enotsup, 0, errno::EINVAL),
        (IoError::Enotsup, cf::FAST_ZERO, errno::ENOTSUP),
    ];
    for (i, (e, flags, want)) in cases.into_iter().enumerate() {
        p.disk.fail = Some(e);
        p.request(flags, cmd::WRITE_ZEROES, i as u64, 0, 4096);
        p.run();
        let r = p.reply();
        assert_eq!((r.cookie(), r.error()), (i as u64, want), "{e:?}");
        assert_eq!(error_message(&r), e.strerror());
    }
}

#[test]
fn fast_zero_that_would_be_slow_is_enotsup() {
    let mut p = Peer::new(disk());
    p.connect("disk", true, false);
    p.request(cf::FAST_ZERO | cf::NO_HOLE, cmd::WRITE_ZEROES, 1, 0, 4096);
    p.run();
    assert_eq!(p.reply().error(), errno::ENOTSUP);
}

#[test]
fn block_status_compact_and_req_one() {
    let mut p = Peer::new(disk());
    p.connect("disk", true, false);
    p.write(0, 1, 8192, &[1; 4096]);
    p.run();
    p.reply();
    p.request(0, cmd::BLOCK_STATUS, 2, 0, 16384);
    p.run();
    let r = p.full_reply();
    assert_eq!(r.len(), 1);
    let Reply::Chunk { kind, payload, .. } = &r[0] else {
        unreachable!()
    };
    assert_eq!(*kind, rt::BLOCK_STATUS);
    let hz = state::HOLE | state::ZERO;
    let want: Vec<u32> = vec![BASE_ALLOCATION_ID, 8192, hz, 4096, 0, 4096, hz];
    let got: Vec<u32> = payload.chunks(4).map(|c| get_u32(c, 0..4)).collect();
    assert_eq!(got, want);

    p.request(cf::REQ_ONE, cmd::BLOCK_STATUS, 3, 0, 4096);
    p.run();
    let Reply::Chunk { payload, .. } = p.reply() else {
        unreachable!()
    };
    let got: Vec<u32> = payload.chunks(4).map(|c| get_u32(c, 0..4)).collect();
    assert_eq!(got, [BASE_ALLOCATION_ID, 4096, hz]);
}

#[test]
fn block_status_with_a_bad_host_answer_is_eio() {
    let mut p = Peer::new(disk());
    p.connect("disk", true, false);
    p.request(0, cmd::BLOCK_STATUS, 1, 0, 4096);
    p.take_requests();
    let r = p.held.pop().unwrap();
    p.conn.complete(r.id, Completion::Extents(vec![])).unwrap();
    p.drain();
    assert_eq!(p.reply().error(), errno::EIO);
    // A read completed with the wrong length.
    p.request(0, cmd::READ, 2, 0, 4096);
    p.take_requests();
    let r = p.held.pop().unwrap();
    p.conn
        .complete(r.id, Completion::Data(vec![0; 10]))
        .unwrap();
    p.drain();
    let r = p.reply();
    assert_eq!(r.error(), errno::EIO);
    assert_eq!(error_message(&r), "internal error: invalid completion");
}

#[test]
fn extended_headers_use_32_byte_replies_with_the_request_offset() {
    let mut p = Peer::new(disk());
    p.connect("disk", true, true);
    let data = pattern(4096, 5);
    p.write(0, 1, 8192, &data);
    p.run();
    assert_eq!(
        p.reply(),
        Reply::Chunk {
            flags: 1,
            kind: rt::NONE,
            cookie: 1,
            offset: Some(8192),
            payload: vec![]
        }
    );
    p.request(0, cmd::READ, 2, 8192, 4096);
    p.run();
    let r = p.full_reply();
    let Reply::Chunk {
        kind,
        offset,
        payload,
        ..
    } = &r[0]
    else {
        unreachable!()
    };
    assert_eq!((*kind, *offset), (rt::OFFSET_DATA, Some(8192)));
    assert_eq!(payload[8..], data[..]);

    // Block status: 64-bit descriptors with a count.
    p.request(0, cmd::BLOCK_STATUS, 3, 0, 3 * MIB);
    p.run();
    assert_eq!(p.reply().error(), errno::EINVAL, "past the end");
    p.request(0, cmd::BLOCK_STATUS, 4, 0, MIB);
    p.run();
    let Reply::Chunk { kind, payload, .. } = p.reply() else {
        unreachable!()
    };
    assert_eq!(kind, rt::BLOCK_STATUS_EXT);
    assert_eq!(get_u32(&payload, 0..4), BASE_ALLOCATION_ID);
    assert_eq!(get_u32(&payload, 4..8), 3);
    let hz = u64::from(state::HOLE | state::ZERO);
    let d: Vec<u64> = payload[8..].chunks(8).map(|c| get_u64(c, 0..8)).collect();
    assert_eq!(d, [8192, hz, 4096, 0, MIB - 12288, hz]);
}

#[test]
fn extended_block_status_payload_form() {
    let mut p = Peer::new(disk());
    p.connect("disk", true, true);
    let mut payload = Vec::new();
    payload.extend_from_slice(&4096u64.to_be_bytes());
    payload.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
    p.request_with(cf::PAYLOAD_LEN, cmd::BLOCK_STATUS, 1, 0, 12, &payload);
    p.take_requests();
    assert_eq!(
        p.held[0].op,
        Op::BlockStatus {
            offset: 0,
            len: 4096,
            req_one: false,
            contexts: vec![(BASE_ALLOCATION_ID, MetaContext::BaseAllocation)],
        }
    );
    p.run();
    assert_eq!(p.reply().error(), 0);
    // An unknown id: the payload is consumed, then EINVAL.
    let mut payload = Vec::new();
    payload.extend_from_slice(&4096u64.to_be_bytes());
    payload.extend_from_slice(&99u32.to_be_bytes());
    p.request_with(cf::PAYLOAD_LEN, cmd::BLOCK_STATUS, 2, 0, 12, &payload);
    assert_eq!(p.reply().error(), errno::EINVAL);
    // Ids not selected, or too many of them.
    p.request_with(cf::PAYLOAD_LEN, cmd::BLOCK_STATUS, 3, 0, 20, &[0; 20]);
    assert_eq!(p.reply().error(), errno::EINVAL);
    p.request_with(cf::PAYLOAD_LEN, cmd::BLOCK_STATUS, 3, 0, 36, &[0; 36]);
    assert_eq!(p.reply().error(), errno::EINVAL);
    p.request(0, cmd::READ, 4, 0, 512);
    p.run();
    assert_eq!(p.structured_read(4, 0, 512), vec![0; 512], "still in step");
}

/// With several contexts selected, a request names the ones it wants in
/// its payload (each once), and the host answers one chunk per context,
/// the last one ending the reply.
#[test]
fn extended_block_status_picks_contexts_by_id() {
    let mut e = Export::new("disk", MIB);
    e.bitmaps = vec![alloc::string::String::from("b0")];
    e.allocation_depth = true;
    let mut p = Peer::new(vec![e]);
    p.connect_with(
        "disk",
        true,
        true,
        &[
            "base:allocation",
            "qemu:allocation-depth",
            "qemu:dirty-bitmap:b0",
        ],
    );
    let ids = |p: &mut Peer, cookie: u64, ids: &[u32]| {
        let mut payload = Vec::new();
        payload.extend_from_slice(&4096u64.to_be_bytes());
        for id in ids {
            payload.extend_from_slice(&id.to_be_bytes());
        }
        let len = payload.len() as u64;
        p.request_with(cf::PAYLOAD_LEN, cmd::BLOCK_STATUS, cookie, 0, len, &payload);
    };
    ids(&mut p, 1, &[3, 1]);
    p.take_requests();
    let r = p.held.pop().unwrap();
    assert_eq!(
        r.op,
        Op::BlockStatus {
            offset: 0,
            len: 4096,
            req_one: false,
            contexts: vec![
                (3, MetaContext::DirtyBitmap("b0".into())),
                (BASE_ALLOCATION_ID, MetaContext::BaseAllocation),
            ],
        }
    );
    let d = |length, flags| crate::nbd::Descriptor { length, flags };
    p.conn
        .complete(
            r.id,
            Completion::Contexts(vec![
                (3, vec![d(1024, 0), d(3072, 1)]),
                (BASE_ALLOCATION_ID, vec![d(MIB, 0)]),
            ]),
        )
        .unwrap();
    p.drain();
    let chunks = p.full_reply();
    assert_eq!(chunks.len(), 2);
    assert!(!chunks[0].done() && chunks[1].done());
    let Reply::Chunk { payload, .. } = &chunks[0] else {
        panic!("{chunks:?}")
    };
    assert_eq!(get_u32(payload, 0..4), 3);
    let got: Vec<u64> = payload[8..].chunks(8).map(|c| get_u64(c, 0..8)).collect();
    assert_eq!(got, [1024, 0, 3072, 1]);
    // Repeated: refused.
    ids(&mut p, 2, &[2, 2]);
    assert_eq!(p.reply().error(), errno::EINVAL);
}

#[test]
fn zero_length_requests_are_answered_without_the_host() {
    let mut p = Peer::new(disk());
    p.connect("disk", true, false);
    p.request(0, cmd::READ, 1, 4096, 0);
    p.write(0, 2, 4096, &[]);
    p.request(0, cmd::TRIM, 3, 0, 0);
    assert_eq!(p.take_requests(), 0);
    assert_eq!(
        p.reply(),
        Reply::Chunk {
            flags: 1,
            kind: rt::NONE,
            cookie: 1,
            offset: None,
            payload: vec![]
        }
    );
    assert_eq!(
        p.reply(),
        Reply::Simple {
            error: 0,
            cookie: 2
        }
    );
    assert_eq!(
        p.reply(),
        Reply::Simple {
            error: 0,
            cookie: 3
        }
    );
}

#[test]
fn disc_waits_for_requests_in_flight_then_closes() {
    let mut p = Peer::new(disk());
    p.connect("disk", false, false);
    p.write(0, 1, 0, &[9; 512]);
    p.request(0, cmd::DISC, 2, 0, 0);
    p.send(b"garbage after DISC is ignored");
    assert_eq!(p.conn.state(), State::Closing);
    assert_eq!(p.conn.input_state(), InputState::Finished);
    assert!(!p.conn.should_close(), "a write is still pending");
    p.run();
    assert_eq!(
        p.reply(),
        Reply::Simple {
            error: 0,
            cookie: 1
        }
    );
    assert!(p.conn.should_close());
    assert_eq!(p.conn.close_reason(), Some(&CloseReason::Disconnect));
    assert_eq!(p.disk.data[..512], [9; 512]);
}

#[test]
fn a_vanished_client_drops_completions_cleanly() {
    let mut p = Peer::new(disk());
    p.connect("disk", false, false);
    p.write(0, 1, 0, &[1; 512]);
    p.request(0, cmd::READ, 2, 0, 512);
    p.take_requests();
    p.request(0, cmd::READ, 3, 0, 512); // queued, never taken
    // Half a write payload.
    let mut h = Vec::new();
    crate::nbd::repr::RequestHeader {
        flags: 0,
        command: crate::nbd::repr::Command::Write,
        cookie: 4,
        offset: 0,
        length: 4096,
    }
    .emit(false, &mut h);
    p.send(&h);
    p.send(&[0; 100]);
    assert_eq!(p.conn.input_state(), InputState::Partial { needed: 3996 });
    assert_eq!(p.conn.in_flight(), 3);
    p.conn.closed();
    assert_eq!(p.conn.in_flight(), 2, "the queued request is dropped");
    assert!(p.conn.next_request().is_none());
    for r in core::mem::take(&mut p.held) {
        let c = p.disk.execute(r.op);
        assert_eq!(p.conn.complete(r.id, c), Err(CompleteError::Closed));
    }
    assert_eq!(p.conn.in_flight(), 0);
    assert!(p.conn.output().is_empty());
    assert!(p.conn.should_close());
    assert_eq!(p.conn.receive(b"more", &p.exports), 4);
}

#[test]
fn input_stops_while_too_many_requests_are_pending() {
    let limits = Limits {
        max_requests: 2,
        ..Limits::default()
    };
    let mut p = Peer::with_limits(disk(), limits);
    p.connect("disk", false, false);
    for c in 0..5 {
        p.request(0, cmd::READ, c, 0, 512);
    }
    assert_eq!(p.take_requests(), 2);
    assert_eq!(p.conn.input_state(), InputState::Blocked);
    assert_eq!(p.pending.len(), 3 * 28, "the rest stays with the caller");
    p.run();
    let mut cookies = Vec::new();
    while !p.rx.is_empty() {
        let r = p.reply();
        assert_eq!(r.error(), 0);
        p.take(512);
        cookies.push(r.cookie());
    }
    cookies.sort();
    assert_eq!(cookies, [0, 1, 2, 3, 4]);
    assert_eq!(p.conn.input_state(), InputState::Idle);
}

#[test]
fn a_write_beyond_the_payload_room_is_enomem_and_the_connection_goes_on() {
    let mut p = Peer::new(disk());
    p.connect("disk", false, false);
    p.conn.set_payload_room(6000);
    // The first fits the room, the second no longer does: it is skipped
    // whole (its payload is not taken for a request header) and refused.
    p.write(0, 1, 0, &pattern(4096, 1));
    p.write(0, 2, 4096, &pattern(4096, 2));
    p.run();
    let mut replies = [p.reply(), p.reply()];
    replies.sort_by_key(|r| r.cookie());
    assert_eq!(
        replies,
        [
            Reply::Simple {
                error: 0,
                cookie: 1
            },
            Reply::Simple {
                error: errno::ENOMEM,
                cookie: 2
            }
        ]
    );
    p.conn.set_payload_room(1 << 20);
    p.write(0, 3, 4096, &pattern(4096, 3));
    p.run();
    assert_eq!(p.reply().error(), 0);
    p.request(0, cmd::READ, 4, 0, 8192);
    p.run();
    let mut want = pattern(4096, 1);
    want.extend(pattern(4096, 3));
    assert_eq!(p.simple_read(4, 8192), want);
}

#[test]
fn shutdown_fails_queued_and_new_requests_and_closes_after_in_flight() {
    let mut p = Peer::new(disk());
    p.connect("disk", false, false);
    p.request(0, cmd::READ, 1, 0, 512);
    p.take_requests();
    p.request(0, cmd::READ, 2, 0, 512);
    p.conn.shutdown();
    p.drain();
    assert_eq!(
        p.reply(),
        Reply::Simple {
            error: errno::ESHUTDOWN,
            cookie: 2
        }
    );
    p.request(0, cmd::FLUSH, 3, 0, 0);
    assert_eq!(
        p.reply(),
        Reply::Simple {
            error: errno::ESHUTDOWN,
            cookie: 3
        }
    );
    assert!(!p.conn.should_close());
    p.run();
    p.simple_read(1, 512);
    assert!(p.conn.should_close());
    assert_eq!(p.conn.close_reason(), Some(&CloseReason::Shutdown));
}

#[test]
fn block_status_extents_from_a_single_completion() {
    let mut p = Peer::new(disk());
    p.connect("disk", true, false);
    p.request(0, cmd::BLOCK_STATUS, 1, 4096, 8192);
    p.take_requests();
    let r = p.held.pop().unwrap();
    p.conn
        .complete(r.id, Completion::Extent(BlockStatus::data(1 << 30)))
        .unwrap();
    p.drain();
    let Reply::Chunk { payload, .. } = p.reply() else {
        unreachable!()
    };
    // Clamped to the end of the export.
    assert_eq!(get_u32(&payload, 4..8), (MIB - 4096) as u32);
    assert_eq!(get_u32(&payload, 8..12), 0);
}

#[test]
fn input_stops_while_too_many_write_bytes_are_held() {
    let limits = Limits {
        max_write_bytes: 8192,
        ..Limits::default()
    };
    let mut p = Peer::with_limits(disk(), limits);
    p.connect("disk", false, false);
    for c in 0..4 {
        p.write(0, c, c * 4096, &[c as u8 + 1; 4096]);
    }
    assert_eq!(p.take_requests(), 2);
    assert_eq!(p.conn.input_state(), InputState::Blocked);
    p.run();
    let mut cookies: Vec<u64> = (0..4).map(|_| p.reply().cookie()).collect();
    cookies.sort();
    assert_eq!(cookies, [0, 1, 2, 3]);
    assert_eq!(p.disk.data[3 * 4096], 4);
}

#[test]
fn option_replies_pile_up_no_further_than_the_high_water_mark() {
    let limits = Limits {
        output_high_water: 100,
        ..Limits::default()
    };
    let mut p = Peer::with_limits(disk(), limits);
    p.greet(1);
    // Send ten unknown options without reading the replies.
    let mut opts = Vec::new();
    for _ in 0..10 {
        opts.extend_from_slice(b"IHAVEOPT");
        opts.extend_from_slice(&[0, 0, 0, 99, 0, 0, 0, 0]);
    }
    let n = p.conn.receive(&opts, &p.exports);
    assert!(n < opts.len(), "stopped at the high-water mark");
    assert_eq!(p.conn.input_state(), InputState::Blocked);
    assert!(p.conn.output().len() <= 100 + 64);
}
