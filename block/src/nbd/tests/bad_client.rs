//! Every row of the bad-client table in `shared/reference/nbd.md`, and
//! the other ways a client can misbehave: the exact error, and the
//! connection kept where the spec allows.

use alloc::vec;
use alloc::vec::Vec;

use super::peer::{Peer, Reply, error_message};
use crate::nbd::repr::{Command, RequestHeader};
use crate::nbd::wire::{cmd, cmd_flags as cf, errno};
use crate::nbd::{BlockSize, CloseReason, Export, Features, InputState, ProtocolError, State};

const MIB: u64 = 1 << 20;

fn exports() -> Vec<Export> {
    let mut ro = Export::new("ro", MIB);
    ro.features = Features::read_only();
    let mut aligned = Export::new("aligned", MIB);
    aligned.block_size = BlockSize::new(512, 4096, 64 * 1024).unwrap();
    let mut plain = Export::new("plain", MIB);
    plain.features = Features {
        flush: false,
        fua: false,
        trim: false,
        write_zeroes: false,
        fast_zero: false,
        cache: false,
        block_status: false,
        ..crate::nbd::Features::all()
    };
    vec![Export::new("disk", MIB), ro, aligned, plain]
}

/// The connection still serves: a read of 512 bytes works.
fn still_serves(p: &mut Peer, structured: bool) {
    p.request(0, cmd::READ, 0xabc, 0, 512);
    p.run();
    if structured {
        assert_eq!(p.structured_read(0xabc, 0, 512), vec![0; 512]);
    } else {
        assert_eq!(p.simple_read(0xabc, 512), vec![0; 512]);
    }
    assert_eq!(p.conn.state(), State::Transmission);
}

fn expect_error(p: &mut Peer, cookie: u64, error: u32) -> Reply {
    p.run();
    let r = p.reply();
    assert_eq!((r.cookie(), r.error()), (cookie, error), "{r:?}");
    r
}

#[test]
fn out_of_range_read_trim_block_status_are_einval() {
    let mut p = Peer::new(exports());
    p.connect("disk", true, false);
    p.request(0, cmd::READ, 1, MIB - 512, 1024);
    let r = expect_error(&mut p, 1, errno::EINVAL);
    assert_eq!(error_message(&r), "request past the end of the export");
    p.request(0, cmd::TRIM, 2, MIB, 512);
    expect_error(&mut p, 2, errno::EINVAL);
    p.request(0, cmd::BLOCK_STATUS, 3, MIB + 4096, 512);
    expect_error(&mut p, 3, errno::EINVAL);
    p.request(0, cmd::CACHE, 4, u64::MAX - 10, 512);
    expect_error(&mut p, 4, errno::EINVAL);
    still_serves(&mut p, true);
}

#[test]
fn out_of_range_write_and_write_zeroes_are_enospc() {
    let mut p = Peer::new(exports());
    p.connect("disk", false, false);
    p.write(0, 1, MIB - 512, &[1; 1024]);
    expect_error(&mut p, 1, errno::ENOSPC);
    p.request(0, cmd::WRITE_ZEROES, 2, MIB, 4096);
    expect_error(&mut p, 2, errno::ENOSPC);
    // Offset + length overflowing 64 bits.
    p.write(0, 3, u64::MAX - 100, &[1; 512]);
    expect_error(&mut p, 3, errno::ENOSPC);
    assert!(p.disk.data.iter().all(|&b| b == 0), "nothing was written");
    still_serves(&mut p, false);
}

#[test]
fn writes_trims_zeroes_on_a_read_only_export_are_eperm() {
    let mut p = Peer::new(exports());
    p.connect("ro", true, false);
    p.write(0, 1, 0, &[1; 4096]);
    let r = expect_error(&mut p, 1, errno::EPERM);
    assert_eq!(error_message(&r), "export is read-only");
    p.request(0, cmd::TRIM, 2, 0, 4096);
    expect_error(&mut p, 2, errno::EPERM);
    p.request(0, cmd::WRITE_ZEROES, 3, 0, 4096);
    expect_error(&mut p, 3, errno::EPERM);
    // Even past the end: read-only is checked first, as nbdkit does.
    p.write(0, 4, 2 * MIB, &[1; 512]);
    expect_error(&mut p, 4, errno::EPERM);
    still_serves(&mut p, true);
}

#[test]
fn unknown_commands_are_einval_and_the_connection_is_kept() {
    let mut p = Peer::new(exports());
    p.connect("disk", false, false);
    p.request(0, 8, 1, 0, 0); // NBD_CMD_RESIZE: not supported
    expect_error(&mut p, 1, errno::EINVAL);
    p.request(0, 0xffff, 2, 123, 456);
    expect_error(&mut p, 2, errno::EINVAL);
    still_serves(&mut p, false);
}

#[test]
fn unknown_or_unnegotiated_flags_are_einval() {
    let mut p = Peer::new(exports());
    p.connect("disk", false, false);
    // Unknown bit.
    p.request(1 << 9, cmd::READ, 1, 0, 512);
    expect_error(&mut p, 1, errno::EINVAL);
    // DF without structured replies.
    p.request(cf::DF, cmd::READ, 2, 0, 512);
    expect_error(&mut p, 2, errno::EINVAL);
    // REQ_ONE on a read, NO_HOLE on a write.
    p.request(cf::REQ_ONE, cmd::READ, 3, 0, 512);
    expect_error(&mut p, 3, errno::EINVAL);
    p.write(cf::NO_HOLE, 4, 0, &[1; 512]);
    expect_error(&mut p, 4, errno::EINVAL);
    // PAYLOAD_LEN in a compact header.
    p.request(cf::PAYLOAD_LEN, cmd::FLUSH, 5, 0, 0);
    expect_error(&mut p, 5, errno::EINVAL);
    still_serves(&mut p, false);

    let mut p = Peer::new(exports());
    p.connect("plain", false, false);
    // FUA and FAST_ZERO the export did not offer.
    p.write(cf::FUA, 6, 0, &[1; 512]);
    expect_error(&mut p, 6, errno::EINVAL);
    p.request(cf::FAST_ZERO, cmd::WRITE_ZEROES, 7, 0, 512);
    expect_error(&mut p, 7, errno::EINVAL);
}

#[test]
fn commands_not_advertised_are_einval() {
    let mut p = Peer::new(exports());
    p.connect("plain", true, false);
    for (c, command) in [cmd::FLUSH, cmd::TRIM, cmd::WRITE_ZEROES, cmd::CACHE]
        .into_iter()
        .enumerate()
    {
        let len = if command == cmd::FLUSH { 0 } else { 512 };
        p.request(0, command, c as u64, 0, len);
        let r = expect_error(&mut p, c as u64, errno::EINVAL);
        assert_eq!(error_message(&r), "command not supported by this export");
    }
    p.request(0, cmd::BLOCK_STATUS, 9, 0, 512);
    expect_error(&mut p, 9, errno::EINVAL);
    still_serves(&mut p, true);
}

#[test]
fn flush_with_an_offset_is_einval() {
    let mut p = Peer::new(exports());
    p.connect("disk", false, false);
    p.request(0, cmd::FLUSH, 1, 512, 0);
    expect_error(&mut p, 1, errno::EINVAL);
    assert_eq!(p.disk.flushes, 0);
}

#[test]
fn misaligned_requests_are_einval() {
    let mut p = Peer::new(exports());
    p.connect("aligned", false, false);
    p.request(0, cmd::READ, 1, 100, 512);
    let r = expect_error(&mut p, 1, errno::EINVAL);
    assert_eq!(
        r,
        Reply::Simple {
            error: errno::EINVAL,
            cookie: 1
        }
    );
    p.write(0, 2, 512, &[1; 100]);
    expect_error(&mut p, 2, errno::EINVAL);
    p.request(0, cmd::TRIM, 3, 512, 513);
    expect_error(&mut p, 3, errno::EINVAL);
    still_serves(&mut p, false);
}

/// QEMU's rule: the real minimum goes to a client that asks for block
/// sizes (or to `NBD_OPT_INFO`); one that does not is told 1 and may send
/// any alignment (the node pads it), as with `NBD_OPT_EXPORT_NAME`.
#[test]
fn a_client_that_did_not_ask_for_block_sizes_is_not_held_to_them() {
    let block_size_reply = |p: &mut Peer, option: u32, infos: &[u16]| {
        p.option(option, &Peer::info_data("aligned", infos));
        let replies = p.opt_replies();
        let bs = replies
            .iter()
            .find(|r| {
                r.kind == crate::nbd::wire::rep::INFO
                    && crate::nbd::wire::get_u16(&r.data, 0..2)
                        == crate::nbd::wire::info::BLOCK_SIZE
            })
            .expect("NBD_INFO_BLOCK_SIZE");
        crate::nbd::wire::get_u32(&bs.data, 2..6)
    };
    let mut p = Peer::new(exports());
    p.greet(1);
    use crate::nbd::wire::{info, opt};
    assert_eq!(block_size_reply(&mut p, opt::INFO, &[]), 512);
    assert_eq!(block_size_reply(&mut p, opt::GO, &[]), 1);
    p.request(0, cmd::READ, 1, 100, 512);
    p.run();
    assert_eq!(p.simple_read(1, 512), vec![0; 512]);
    p.write(0, 2, 100, &[7; 100]);
    p.run();
    assert_eq!(p.reply().error(), 0);

    let mut asked = Peer::new(exports());
    asked.greet(1);
    assert_eq!(
        block_size_reply(&mut asked, opt::GO, &[info::BLOCK_SIZE]),
        512
    );
    asked.request(0, cmd::READ, 1, 100, 512);
    expect_error(&mut asked, 1, errno::EINVAL);
}

#[test]
fn bad_request_magic_is_a_hard_disconnect() {
    let mut p = Peer::new(exports());
    p.connect("disk", false, false);
    p.request(0, cmd::READ, 1, 0, 512);
    p.take_requests();
    let mut h = Vec::new();
    RequestHeader {
        flags: 0,
        command: Command::Read,
        cookie: 2,
        offset: 0,
        length: 512,
    }
    .emit(true, &mut h); // extended magic on a compact connection
    p.send(&h);
    assert_eq!(p.conn.state(), State::Closing);
    assert_eq!(
        p.conn.close_reason(),
        Some(&CloseReason::Protocol(ProtocolError::BadRequestMagic(
            0x21e4_1c71
        )))
    );
    assert!(
        p.conn.should_close(),
        "no waiting for the request in flight"
    );
    assert!(p.pending.is_empty());
}

#[test]
fn writes_above_the_maximum_payload_are_skipped_and_refused() {
    let mut p = Peer::new(exports());
    p.connect("aligned", false, false); // 64 KiB maximum payload
    p.bytewise = false;
    p.write(0, 1, 0, &vec![7; 128 * 1024]);
    let r = expect_error(&mut p, 1, errno::EINVAL);
    assert_eq!(r.cookie(), 1);
    assert!(p.disk.data.iter().all(|&b| b == 0));
    still_serves(&mut p, false);
}

#[test]
fn reads_above_the_maximum_payload_are_einval_or_eoverflow_with_df() {
    let mut p = Peer::new(exports());
    p.connect("aligned", true, false);
    p.request(0, cmd::READ, 1, 0, 128 * 1024);
    expect_error(&mut p, 1, errno::EINVAL);
    p.request(cf::DF, cmd::READ, 2, 0, 128 * 1024);
    expect_error(&mut p, 2, errno::EOVERFLOW);
    // Trims and zeroes may exceed it: no payload either way.
    p.request(0, cmd::WRITE_ZEROES, 3, 0, 512 * 1024);
    p.run();
    assert_eq!(
        p.reply(),
        Reply::Simple {
            error: 0,
            cookie: 3
        }
    );
}

#[test]
fn extended_payloads_beyond_32_mib_disconnect_smaller_ones_are_skipped() {
    let mut p = Peer::new(exports());
    p.connect("aligned", true, true);
    // PAYLOAD_LEN on a read: consumed, then EINVAL.
    p.request_with(cf::PAYLOAD_LEN, cmd::READ, 1, 0, 8, &[0; 8]);
    expect_error(&mut p, 1, errno::EINVAL);
    // A write without PAYLOAD_LEN in extended mode.
    p.request(0, cmd::WRITE, 2, 0, 512);
    expect_error(&mut p, 2, errno::EINVAL);
    // Above the 64 KiB maximum but under 32 MiB: skipped.
    p.write(0, 3, 0, &vec![1; 128 * 1024]);
    expect_error(&mut p, 3, errno::EINVAL);
    still_serves(&mut p, true);
    // 1 GiB announced: hard disconnect.
    p.request(cf::PAYLOAD_LEN, cmd::WRITE, 4, 0, 1 << 30);
    assert_eq!(
        p.conn.close_reason(),
        Some(&CloseReason::Protocol(ProtocolError::PayloadTooLarge(
            1 << 30
        )))
    );
}

#[test]
fn a_payload_that_never_arrives_is_waited_for() {
    let mut p = Peer::new(exports());
    p.connect("disk", false, false);
    assert_eq!(p.conn.input_state(), InputState::Idle);
    let mut h = Vec::new();
    RequestHeader {
        flags: 0,
        command: Command::Write,
        cookie: 1,
        offset: 0,
        length: 4096,
    }
    .emit(false, &mut h);
    p.send(&h[..10]);
    assert_eq!(p.conn.input_state(), InputState::Partial { needed: 18 });
    p.send(&h[10..]);
    p.send(&[1; 1000]);
    assert_eq!(p.conn.input_state(), InputState::Partial { needed: 3096 });
    assert_eq!(p.take_requests(), 0);
    assert!(p.rx.is_empty());
    assert_eq!(p.conn.state(), State::Transmission);
    p.send(&[1; 3096]);
    p.run();
    assert_eq!(
        p.reply(),
        Reply::Simple {
            error: 0,
            cookie: 1
        }
    );
}

#[test]
fn block_status_of_length_zero_is_einval() {
    let mut p = Peer::new(exports());
    p.connect("disk", true, false);
    p.request(0, cmd::BLOCK_STATUS, 1, 0, 0);
    expect_error(&mut p, 1, errno::EINVAL);
}
