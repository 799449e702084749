//! Option haggling: every option, every reply, every refusal.

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use super::peer::{OptReply, Peer};
use crate::nbd::wire::{self, get_u16, get_u32, get_u64, info, opt, rep, transmission_flags as tf};
use crate::nbd::{BlockSize, CloseReason, Export, Features, Limits, ProtocolError, State};

fn exports() -> Vec<Export> {
    let mut disk = Export::new("disk", 1 << 20);
    disk.description = String::from("the first disk");
    let mut ro = Export::new("ro", 64 * 1024);
    ro.features = Features::read_only();
    vec![disk, ro]
}

const ALL_RW: u16 = tf::HAS_FLAGS
    | tf::SEND_FLUSH
    | tf::SEND_FUA
    | tf::SEND_TRIM
    | tf::SEND_WRITE_ZEROES
    | tf::CAN_MULTI_CONN
    | tf::SEND_CACHE
    | tf::SEND_FAST_ZERO;

#[test]
fn greeting_is_nbdmagic_ihaveopt_and_fixed_newstyle_no_zeroes() {
    let mut p = Peer::new(exports());
    assert_eq!(
        p.take(18),
        [
            b'N', b'B', b'D', b'M', b'A', b'G', b'I', b'C', b'I', b'H', b'A', b'V', b'E', b'O',
            b'P', b'T', 0, 3
        ]
    );
    assert_eq!(p.conn.state(), State::Handshake);
}

#[test]
fn export_name_sends_size_flags_and_124_zeroes() {
    let mut p = Peer::new(exports());
    p.greet(1);
    p.option(opt::EXPORT_NAME, b"disk");
    let r = p.take(10 + 124);
    assert_eq!(get_u64(&r, 0..8), 1 << 20);
    assert_eq!(get_u16(&r, 8..10), ALL_RW);
    assert!(r[10..].iter().all(|&b| b == 0));
    assert!(p.rx.is_empty());
    assert_eq!(p.conn.state(), State::Transmission);
    assert_eq!(p.conn.export().map(|e| e.name.as_str()), Some("disk"));
}

#[test]
fn export_name_with_no_zeroes_sends_ten_bytes() {
    let mut p = Peer::new(exports());
    p.greet(3);
    p.option(opt::EXPORT_NAME, b"ro");
    let r = p.take(10);
    assert_eq!(get_u64(&r, 0..8), 64 * 1024);
    assert_eq!(
        get_u16(&r, 8..10),
        tf::HAS_FLAGS | tf::READ_ONLY | tf::CAN_MULTI_CONN | tf::SEND_CACHE
    );
    assert!(p.rx.is_empty());
}

#[test]
fn go_answers_export_name_description_block_size_then_ack() {
    let mut p = Peer::new(exports());
    p.greet(1);
    p.option(
        opt::GO,
        &Peer::info_data(
            "disk",
            &[info::NAME, info::DESCRIPTION, info::BLOCK_SIZE, 77],
        ),
    );
    let r = p.opt_replies();
    let infos: Vec<(u16, Vec<u8>)> = r
        .iter()
        .filter(|r| r.kind == rep::INFO)
        .map(|r| (get_u16(&r.data, 0..2), r.data[2..].to_vec()))
        .collect();
    let mut export = Vec::new();
    export.extend_from_slice(&(1u64 << 20).to_be_bytes());
    export.extend_from_slice(&ALL_RW.to_be_bytes());
    let mut bs = Vec::new();
    for v in [1u32, 4096, 32 << 20] {
        bs.extend_from_slice(&v.to_be_bytes());
    }
    assert_eq!(
        infos,
        vec![
            (info::EXPORT, export),
            (info::NAME, b"disk".to_vec()),
            (info::DESCRIPTION, b"the first disk".to_vec()),
            (info::BLOCK_SIZE, bs),
        ]
    );
    assert_eq!(
        r.last().map(|r| (r.option, r.kind)),
        Some((opt::GO, rep::ACK))
    );
    assert!(r.iter().all(|r| r.option == opt::GO));
    assert_eq!(p.conn.state(), State::Transmission);
}

#[test]
fn info_does_not_end_the_handshake_and_go_may_follow() {
    let mut p = Peer::new(exports());
    p.greet(1);
    p.option(opt::INFO, &Peer::info_data("ro", &[]));
    let r = p.opt_replies();
    // NBD_INFO_EXPORT and the unsolicited NBD_INFO_BLOCK_SIZE, then ACK.
    assert_eq!(r.len(), 3, "{r:?}");
    assert_eq!(p.conn.state(), State::Handshake);
    p.option(opt::GO, &Peer::info_data("ro", &[]));
    assert_eq!(p.opt_replies().len(), 3);
    assert_eq!(p.conn.state(), State::Transmission);
}

#[test]
fn go_to_an_unknown_export_is_err_unknown_and_haggling_goes_on() {
    let mut p = Peer::new(exports());
    p.greet(1);
    p.option(opt::GO, &Peer::info_data("nope", &[]));
    assert_eq!(
        p.opt_reply(),
        OptReply {
            option: opt::GO,
            kind: rep::ERR_UNKNOWN,
            data: b"export 'nope' not present".to_vec()
        }
    );
    p.option(opt::GO, &Peer::info_data("disk", &[]));
    assert_eq!(p.opt_replies().last().map(|r| r.kind), Some(rep::ACK));
}

#[test]
fn default_export_name_is_looked_up_as_empty() {
    let mut e = exports();
    e.push(Export::new("", 4096));
    let mut p = Peer::new(e);
    p.greet(1);
    p.option(opt::GO, &Peer::info_data("", &[]));
    let r = p.opt_replies();
    assert_eq!(get_u64(&r[0].data, 2..10), 4096);
}

#[test]
fn list_names_every_export_with_its_description() {
    let mut p = Peer::new(exports());
    p.greet(1);
    p.option(opt::LIST, &[]);
    let r = p.opt_replies();
    assert_eq!(r.len(), 3);
    let mut first = Vec::new();
    first.extend_from_slice(&4u32.to_be_bytes());
    first.extend_from_slice(b"diskthe first disk");
    assert_eq!(
        r[0],
        OptReply {
            option: opt::LIST,
            kind: rep::SERVER,
            data: first
        }
    );
    assert_eq!(r[1].data, [&2u32.to_be_bytes()[..], b"ro"].concat());
    assert_eq!(r[2].kind, rep::ACK);

    p.option(opt::LIST, b"x");
    let e = p.opt_reply();
    assert_eq!(e.kind, rep::ERR_INVALID);
    assert_eq!(e.data, b"option must carry no data");
}

#[test]
fn abort_is_acked_and_closes_and_later_input_is_ignored() {
    let mut p = Peer::new(exports());
    p.greet(1);
    p.option(opt::ABORT, b"ignored data");
    assert_eq!(
        p.opt_reply(),
        OptReply {
            option: opt::ABORT,
            kind: rep::ACK,
            data: vec![]
        }
    );
    assert!(p.conn.should_close());
    assert_eq!(p.conn.close_reason(), Some(&CloseReason::Abort));
    p.option(opt::LIST, &[]);
    assert!(p.rx.is_empty());
    assert!(p.pending.is_empty(), "input after ABORT is swallowed");
}

#[test]
fn starttls_without_tls_is_err_policy() {
    let mut p = Peer::new(exports());
    p.greet(1);
    p.option(opt::STARTTLS, &[]);
    let r = p.opt_reply();
    assert_eq!(
        (r.kind, r.data.as_slice()),
        (rep::ERR_POLICY, &b"TLS not configured"[..])
    );
}

#[test]
fn unknown_options_are_err_unsup_and_skipped_unbuffered() {
    let mut p = Peer::new(exports());
    p.bytewise = true;
    p.greet(1);
    p.option(99, &[0x55; 300]);
    assert_eq!(
        p.opt_reply(),
        OptReply {
            option: 99,
            kind: rep::ERR_UNSUP,
            data: b"Unsupported option 99".to_vec()
        }
    );
    // The withdrawn NBD_OPT_PEEK_EXPORT too.
    p.option(opt::PEEK_EXPORT, &[]);
    assert_eq!(p.opt_reply().kind, rep::ERR_UNSUP);
    // A huge unknown option is skipped, whatever its length.
    let mut h = Vec::new();
    h.extend_from_slice(&wire::NBD_OPTS_MAGIC.to_be_bytes());
    h.extend_from_slice(&1000u32.to_be_bytes());
    h.extend_from_slice(&u32::MAX.to_be_bytes());
    p.bytewise = false;
    p.send(&h);
    assert_eq!(
        p.conn.input_state(),
        crate::nbd::InputState::Partial {
            needed: u64::from(u32::MAX)
        }
    );
}

#[test]
fn structured_reply_and_extended_headers() {
    let mut p = Peer::new(exports());
    p.greet(1);
    p.option(opt::STRUCTURED_REPLY, b"x");
    assert_eq!(p.opt_reply().kind, rep::ERR_INVALID);
    p.option(opt::STRUCTURED_REPLY, &[]);
    assert_eq!(p.opt_reply().kind, rep::ACK);
    p.option(opt::EXTENDED_HEADERS, &[]);
    assert_eq!(p.opt_reply().kind, rep::ACK);
    p.option(opt::STRUCTURED_REPLY, &[]);
    let r = p.opt_reply();
    assert_eq!(r.kind, rep::ERR_EXT_HEADER_REQD);
    assert!(p.conn.structured_replies() && p.conn.extended_headers());
}

#[test]
fn meta_contexts_need_structured_replies() {
    let mut p = Peer::new(exports());
    p.greet(1);
    p.option(opt::LIST_META_CONTEXT, &Peer::meta_data("disk", &[]));
    let r = p.opt_reply();
    assert_eq!(r.kind, rep::ERR_INVALID);
    assert_eq!(r.data, b"request structured replies first");
}

#[test]
fn list_meta_context_offers_base_allocation() {
    let mut p = Peer::new(exports());
    p.greet(1);
    p.option(opt::STRUCTURED_REPLY, &[]);
    p.opt_reply();
    let ctx = [&0u32.to_be_bytes()[..], b"base:allocation"].concat();
    for queries in [&[][..], &["base:"][..], &["base:allocation", "qemu:x"][..]] {
        p.option(opt::LIST_META_CONTEXT, &Peer::meta_data("disk", queries));
        let r = p.opt_replies();
        assert_eq!(r.len(), 2, "{queries:?}");
        assert_eq!((r[0].kind, &r[0].data), (rep::META_CONTEXT, &ctx));
    }
    p.option(
        opt::LIST_META_CONTEXT,
        &Peer::meta_data("disk", &["qemu:dirty-bitmap:b", "base:nothing"]),
    );
    assert_eq!(p.opt_replies().len(), 1, "unknown queries are ignored");
    p.option(opt::LIST_META_CONTEXT, &Peer::meta_data("nope", &[]));
    assert_eq!(p.opt_reply().kind, rep::ERR_UNKNOWN);
    // A query length running past the option is syntactically invalid.
    let mut bad = Peer::meta_data("disk", &["base:allocation"]);
    bad.truncate(bad.len() - 1);
    p.option(opt::LIST_META_CONTEXT, &bad);
    assert_eq!(p.opt_reply().kind, rep::ERR_INVALID);
}

#[test]
fn set_meta_context_selects_for_one_export_only() {
    let mut p = Peer::new(exports());
    p.greet(1);
    p.option(opt::STRUCTURED_REPLY, &[]);
    p.opt_reply();
    p.option(
        opt::SET_META_CONTEXT,
        &Peer::meta_data("disk", &["base:", "base:allocation"]),
    );
    let r = p.opt_replies();
    assert_eq!(r.len(), 2);
    assert_eq!(
        get_u32(&r[0].data, 0..4),
        crate::nbd::handshake::BASE_ALLOCATION_ID
    );
    assert_eq!(&r[0].data[4..], b"base:allocation");
    // GO to another export: no context is selected there.
    p.option(opt::GO, &Peer::info_data("ro", &[]));
    p.opt_replies();
    p.request(0, wire::cmd::BLOCK_STATUS, 1, 0, 4096);
    let r = p.reply();
    assert_eq!(r.error(), wire::errno::EINVAL);
    assert_eq!(
        super::peer::error_message(&r),
        "no metadata context selected"
    );
}

#[test]
fn set_meta_context_with_no_queries_selects_nothing() {
    let mut p = Peer::new(exports());
    p.greet(1);
    p.option(opt::STRUCTURED_REPLY, &[]);
    p.opt_reply();
    p.option(
        opt::SET_META_CONTEXT,
        &Peer::meta_data("disk", &["base:allocation"]),
    );
    assert_eq!(p.opt_replies().len(), 2);
    p.option(opt::SET_META_CONTEXT, &Peer::meta_data("disk", &[]));
    assert_eq!(p.opt_replies().len(), 1);
    p.option(opt::GO, &Peer::info_data("disk", &[]));
    p.opt_replies();
    p.request(0, wire::cmd::BLOCK_STATUS, 1, 0, 4096);
    assert_eq!(p.reply().error(), wire::errno::EINVAL);
}

#[test]
fn transmission_flags_follow_negotiation() {
    let mut p = Peer::new(exports());
    assert_eq!(p.connect("disk", false, false), ALL_RW);
    let mut p = Peer::new(exports());
    assert_eq!(p.connect("disk", true, false), ALL_RW | tf::SEND_DF);
    let mut p = Peer::new(exports());
    assert_eq!(
        p.connect("disk", true, true),
        ALL_RW | tf::SEND_DF | tf::BLOCK_STATUS_PAYLOAD
    );
    assert_eq!(
        p.conn.transmission_flags(),
        ALL_RW | tf::SEND_DF | tf::BLOCK_STATUS_PAYLOAD
    );
}

#[test]
fn malformed_go_is_err_invalid() {
    let mut p = Peer::new(exports());
    p.greet(1);
    // Name length past the end.
    let mut d = Peer::info_data("disk", &[]);
    d[3] = 200;
    p.option(opt::GO, &d);
    assert_eq!(p.opt_reply().kind, rep::ERR_INVALID);
    // Trailing byte after the info list.
    let mut d = Peer::info_data("disk", &[info::NAME]);
    d.push(0);
    p.option(opt::INFO, &d);
    assert_eq!(p.opt_reply().kind, rep::ERR_INVALID);
    // A name with a NUL.
    p.option(opt::GO, &Peer::info_data("di\0sk", &[]));
    assert_eq!(p.opt_reply().kind, rep::ERR_INVALID);
    // Invalid UTF-8.
    let mut d = Peer::info_data("disk", &[]);
    d[4] = 0xff;
    p.option(opt::GO, &d);
    assert_eq!(p.opt_reply().kind, rep::ERR_INVALID);
    assert_eq!(p.conn.state(), State::Handshake);
}

#[test]
fn oversized_options_are_err_too_big_and_skipped() {
    let limits = Limits {
        max_option_len: 1024,
        ..Limits::default()
    };
    let mut p = Peer::with_limits(exports(), limits);
    p.greet(1);
    let mut d = Peer::info_data("disk", &[]);
    d.resize(5000, 0);
    p.option(opt::GO, &d);
    let r = p.opt_reply();
    assert_eq!(r.kind, rep::ERR_TOO_BIG);
    assert_eq!(r.data, b"option 7 longer than 1024 bytes");
    p.option(opt::GO, &Peer::info_data("disk", &[]));
    assert_eq!(p.opt_replies().last().map(|r| r.kind), Some(rep::ACK));
}

#[test]
fn oversized_export_name_disconnects() {
    let mut p = Peer::new(exports());
    p.greet(1);
    p.option(opt::EXPORT_NAME, &vec![b'a'; 20000]);
    assert!(p.conn.should_close());
    assert_eq!(
        p.conn.close_reason(),
        Some(&CloseReason::Protocol(ProtocolError::BadExportName))
    );
    assert!(p.rx.is_empty());
}

#[test]
fn too_many_options_disconnects() {
    let limits = Limits {
        max_options: 5,
        ..Limits::default()
    };
    let mut p = Peer::with_limits(exports(), limits);
    p.greet(1);
    for _ in 0..5 {
        p.option(77, &[]);
        assert_eq!(p.opt_reply().kind, rep::ERR_UNSUP);
    }
    p.option(77, &[]);
    assert!(p.rx.is_empty());
    assert_eq!(
        p.conn.close_reason(),
        Some(&CloseReason::Protocol(ProtocolError::TooManyOptions))
    );
}

#[test]
fn unknown_client_flags_disconnect() {
    let mut p = Peer::new(exports());
    p.greet(1 | 4);
    assert!(p.conn.should_close());
    assert_eq!(
        p.conn.close_reason(),
        Some(&CloseReason::Protocol(ProtocolError::UnknownClientFlags(5)))
    );
    assert!(p.rx.is_empty());
}

#[test]
fn bad_option_magic_disconnects() {
    let mut p = Peer::new(exports());
    p.greet(1);
    p.send(b"IHAVEOPX\0\0\0\x03\0\0\0\0");
    assert!(p.conn.should_close());
    assert!(matches!(
        p.conn.close_reason(),
        Some(CloseReason::Protocol(ProtocolError::BadOptionMagic(_)))
    ));
}

#[test]
fn export_name_of_an_unknown_export_disconnects() {
    let mut p = Peer::new(exports());
    p.greet(1);
    p.option(opt::EXPORT_NAME, b"nope");
    assert!(p.conn.should_close());
    assert_eq!(
        p.conn.close_reason(),
        Some(&CloseReason::Protocol(ProtocolError::UnknownExport(
            "nope".into()
        )))
    );
    assert!(p.rx.is_empty());
}

#[test]
fn export_name_after_extended_headers_disconnects() {
    let mut p = Peer::new(exports());
    p.greet(1);
    p.option(opt::EXTENDED_HEADERS, &[]);
    p.opt_reply();
    p.option(opt::EXPORT_NAME, b"disk");
    assert_eq!(
        p.conn.close_reason(),
        Some(&CloseReason::Protocol(
            ProtocolError::ExportNameWithExtendedHeaders
        ))
    );
}

#[test]
fn shutdown_during_haggling_answers_err_shutdown_but_acks_abort() {
    let mut p = Peer::new(exports());
    p.greet(1);
    p.conn.shutdown();
    p.option(opt::GO, &Peer::info_data("disk", &[]));
    let r = p.opt_reply();
    assert_eq!(
        (r.kind, r.data.as_slice()),
        (rep::ERR_SHUTDOWN, &b"Server shutting down"[..])
    );
    p.option(opt::ABORT, &[]);
    assert_eq!(p.opt_reply().kind, rep::ACK);
    assert!(p.conn.should_close());
}

#[test]
fn block_size_constraints_are_checked() {
    use crate::nbd::BlockSizeError;
    assert_eq!(BlockSize::new(512, 4096, 1 << 20).map(|b| b.min()), Ok(512));
    assert_eq!(
        BlockSize::new(3, 4096, 1 << 20),
        Err(BlockSizeError::Minimum(3))
    );
    assert_eq!(
        BlockSize::new(1 << 17, 1 << 17, 1 << 20),
        Err(BlockSizeError::Minimum(1 << 17))
    );
    assert_eq!(
        BlockSize::new(4096, 512, 1 << 20),
        Err(BlockSizeError::Preferred(512))
    );
    assert_eq!(
        BlockSize::new(1, 256, 1 << 20),
        Err(BlockSizeError::Preferred(256))
    );
    assert_eq!(
        BlockSize::new(1, 4096, 4096),
        Err(BlockSizeError::MaxPayload(4096))
    );
}

#[test]
fn handshake_fed_byte_by_byte_gives_the_same_bytes() {
    let script = |p: &mut Peer| {
        p.connect("disk", true, false);
        p.write(0, 1, 0, &[7; 4096]);
        p.run();
        p.request(0, wire::cmd::READ, 2, 0, 4096);
        p.run();
        p.rx.iter().copied().collect::<Vec<u8>>()
    };
    let mut bulk = Peer::new(exports());
    let mut bytewise = Peer::new(exports());
    bytewise.bytewise = true;
    let a = script(&mut bulk);
    let b = script(&mut bytewise);
    assert!(!a.is_empty());
    assert_eq!(a, b);
}

/// The context names of a reply list (ids dropped), in order.
fn context_names(r: &[super::peer::OptReply]) -> Vec<(u32, String)> {
    r.iter()
        .filter(|r| r.kind == rep::META_CONTEXT)
        .map(|r| {
            (
                get_u32(&r.data, 0..4),
                String::from_utf8(r.data[4..].to_vec()).unwrap(),
            )
        })
        .collect()
}

#[test]
fn qemu_contexts_list_and_set_as_qemu_does() {
    let mut disk = Export::new("disk", 1 << 20);
    disk.allocation_depth = true;
    disk.bitmaps = vec![String::from("b0"), String::from("b1")];
    let mut p = Peer::new(vec![disk]);
    p.greet(1);
    p.option(opt::STRUCTURED_REPLY, &[]);
    p.opt_reply();
    let list = |p: &mut Peer, q: &[&str]| {
        p.option(opt::LIST_META_CONTEXT, &Peer::meta_data("disk", q));
        context_names(&p.opt_replies())
    };
    let all = [
        (0, String::from("base:allocation")),
        (0, String::from("qemu:allocation-depth")),
        (0, String::from("qemu:dirty-bitmap:b0")),
        (0, String::from("qemu:dirty-bitmap:b1")),
    ];
    assert_eq!(list(&mut p, &[]), all);
    assert_eq!(list(&mut p, &["qemu:"]), all[1..]);
    assert_eq!(list(&mut p, &["qemu:dirty-bitmap:"]), all[2..]);
    assert_eq!(
        list(&mut p, &["qemu:dirty-bitmap:b1", "qemu:dirty-bitmap:nope"]),
        all[3..]
    );
    // SET takes exact names only, listed in the server's order, with
    // QEMU's ids shifted by one (base:allocation is 1 here).
    p.option(
        opt::SET_META_CONTEXT,
        &Peer::meta_data(
            "disk",
            &["qemu:dirty-bitmap:b1", "qemu:", "base:allocation"],
        ),
    );
    assert_eq!(
        context_names(&p.opt_replies()),
        [
            (1, String::from("base:allocation")),
            (4, String::from("qemu:dirty-bitmap:b1")),
        ]
    );
}

/// Every reply a plain-text client gets from a TLS server, none naming an
/// export.
fn assert_tls_reqd(p: &mut Peer, option: u32) {
    let r = p.opt_reply();
    let text = alloc::format!("Option 0x{option:x} not permitted before TLS");
    assert_eq!(
        (r.option, r.kind, r.data.as_slice()),
        (option, rep::ERR_TLS_REQD, text.as_bytes())
    );
}

#[test]
fn tls_server_refuses_every_option_before_starttls() {
    for bytewise in [false, true] {
        let mut p = Peer::tls_required(exports());
        p.bytewise = bytewise;
        p.greet(1);
        p.option(opt::LIST, &[]);
        assert_tls_reqd(&mut p, opt::LIST);
        p.option(opt::GO, &Peer::info_data("disk", &[]));
        assert_tls_reqd(&mut p, opt::GO);
        p.option(opt::INFO, &Peer::info_data("disk", &[info::NAME]));
        assert_tls_reqd(&mut p, opt::INFO);
        p.option(opt::STRUCTURED_REPLY, &[]);
        assert_tls_reqd(&mut p, opt::STRUCTURED_REPLY);
        p.option(opt::LIST_META_CONTEXT, &[1, 2, 3]);
        assert_tls_reqd(&mut p, opt::LIST_META_CONTEXT);
        // Unknown, and too long to buffer: skipped all the same.
        p.option(77, &vec![9; 100_000]);
        assert_tls_reqd(&mut p, 77);
        assert!(p.rx.is_empty());
        assert!(p.pending.is_empty());
        assert_eq!(p.conn.state(), State::Handshake);
        assert!(!p.conn.tls_pending() && !p.conn.tls_active());
    }
}

#[test]
fn tls_server_drops_export_name_before_starttls() {
    let mut p = Peer::tls_required(exports());
    p.greet(1);
    p.option(opt::EXPORT_NAME, b"disk");
    assert!(p.rx.is_empty(), "no size, no flags");
    assert!(p.conn.should_close());
    assert_eq!(
        p.conn.close_reason(),
        Some(&CloseReason::Protocol(ProtocolError::NotBeforeTls(
            opt::EXPORT_NAME
        )))
    );
    assert_eq!(p.conn.state(), State::Closing);
}

#[test]
fn tls_server_refuses_abort_before_starttls_and_closes() {
    let mut p = Peer::tls_required(exports());
    p.greet(1);
    p.option(opt::ABORT, &[]);
    assert_tls_reqd(&mut p, opt::ABORT);
    assert!(p.conn.should_close());
    assert_eq!(p.conn.close_reason(), Some(&CloseReason::Abort));
}

#[test]
fn starttls_is_acked_then_the_haggling_restarts_inside_tls() {
    let mut p = Peer::tls_required(exports());
    p.greet(1);
    // STARTTLS, and in the same segment what the client sends next (its
    // TLS hello): the engine must leave it for the TLS layer.
    let mut b = Vec::new();
    b.extend_from_slice(&wire::NBD_OPTS_MAGIC.to_be_bytes());
    b.extend_from_slice(&opt::STARTTLS.to_be_bytes());
    b.extend_from_slice(&0u32.to_be_bytes());
    b.extend_from_slice(&[0x16, 0x03, 0x01, 0x00, 0x05]);
    p.send(&b);
    let r = p.opt_reply();
    assert_eq!((r.option, r.kind), (opt::STARTTLS, rep::ACK));
    assert!(r.data.is_empty());
    assert!(p.rx.is_empty());
    assert!(p.conn.tls_pending());
    assert_eq!(p.pending, [0x16, 0x03, 0x01, 0x00, 0x05], "left untaken");
    assert_eq!(p.conn.input_state(), crate::nbd::InputState::Blocked);
    // The host did its handshake; the decrypted stream starts afresh.
    p.pending.clear();
    p.conn.tls_started();
    assert!(p.conn.tls_active() && !p.conn.tls_pending());
    p.option(opt::STARTTLS, &[]);
    let r = p.opt_reply();
    assert_eq!(
        (r.kind, r.data.as_slice()),
        (rep::ERR_INVALID, &b"TLS already enabled"[..])
    );
    p.option(opt::LIST, &[]);
    let r = p.opt_replies();
    assert_eq!(r.len(), 3, "two exports and the ACK: {r:?}");
    p.option(opt::GO, &Peer::info_data("disk", &[]));
    let r = p.opt_replies();
    assert_eq!(r.last().map(|r| r.kind), Some(rep::ACK));
    assert_eq!(p.conn.state(), State::Transmission);
}

#[test]
fn starttls_with_data_is_refused_and_disconnects() {
    let mut p = Peer::tls_required(exports());
    p.greet(1);
    p.option(opt::STARTTLS, &[1]);
    let r = p.opt_reply();
    assert_eq!(
        (r.kind, r.data.as_slice()),
        (
            rep::ERR_INVALID,
            &b"option 'starttls' has unexpected length"[..]
        )
    );
    assert!(!p.conn.tls_pending());
    assert!(p.conn.should_close());
    assert_eq!(
        p.conn.close_reason(),
        Some(&CloseReason::Protocol(ProtocolError::StartTlsWithData))
    );
}

#[test]
fn tls_started_without_starttls_does_nothing() {
    let mut p = Peer::tls_required(exports());
    p.conn.tls_started();
    p.greet(1);
    p.option(opt::LIST, &[]);
    assert_tls_reqd(&mut p, opt::LIST);
}
