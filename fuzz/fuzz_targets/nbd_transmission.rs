//! The NBD server engine in transmission: a valid handshake (newstyle,
//! structured replies or extended headers, `NBD_OPT_GO` on one of two
//! exports) built from the input, then requests generated from it that
//! look valid (known commands, flags, offsets and lengths near the
//! export's, write payloads), with a few wild ones, answered by the host
//! well, with errors, in chunks or short.
#![no_main]
use arbitrary::Arbitrary;
use block::nbd::repr::RequestHeader;
use block::nbd::wire::{cmd, cmd_flags as cf, opt};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Mode {
    Simple,
    Structured,
    Extended,
}

#[derive(Arbitrary, Debug)]
struct Req {
    command: u8,
    flags: u8,
    offset: u32,
    len: u32,
    wild: bool,
    answer: u8,
}

#[derive(Arbitrary, Debug)]
struct Session {
    mode: Mode,
    small: bool,
    meta: bool,
    piece: u16,
    reqs: Vec<Req>,
    tail: Vec<u8>,
}

const COMMANDS: [u16; 8] = [
    cmd::READ,
    cmd::WRITE,
    cmd::FLUSH,
    cmd::TRIM,
    cmd::CACHE,
    cmd::WRITE_ZEROES,
    cmd::BLOCK_STATUS,
    cmd::DISC,
];
const FLAGS: [u16; 6] = [0, cf::FUA, cf::DF, cf::REQ_ONE, cf::NO_HOLE, cf::FAST_ZERO];

fn option(out: &mut Vec<u8>, o: u32, data: &[u8]) {
    out.extend_from_slice(b"IHAVEOPT");
    out.extend_from_slice(&o.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

fn name_data(name: &str, extra: &[u8]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(extra);
    d
}

fuzz_target!(|s: Session| {
    let name = if s.small { "small" } else { "disk" };
    let size: u64 = if s.small { 64 * 1024 } else { 1 << 20 };
    let mut input = 1u32.to_be_bytes().to_vec();
    let extended = matches!(s.mode, Mode::Extended);
    match s.mode {
        Mode::Simple => {}
        Mode::Structured => option(&mut input, opt::STRUCTURED_REPLY, &[]),
        Mode::Extended => option(&mut input, opt::EXTENDED_HEADERS, &[]),
    }
    if s.meta {
        let ctx = "base:allocation";
        let mut q = 1u32.to_be_bytes().to_vec();
        q.extend_from_slice(&(ctx.len() as u32).to_be_bytes());
        q.extend_from_slice(ctx.as_bytes());
        option(&mut input, opt::SET_META_CONTEXT, &name_data(name, &q));
    }
    option(&mut input, opt::GO, &name_data(name, &0u16.to_be_bytes()));
    let mut answers = Vec::new();
    for (cookie, r) in s.reqs.iter().take(64).enumerate() {
        let command = if r.wild {
            u16::from(r.command)
        } else {
            COMMANDS[usize::from(r.command) % COMMANDS.len()]
        };
        let mut flags = if r.wild {
            u16::from(r.flags)
        } else {
            FLAGS[usize::from(r.flags) % FLAGS.len()]
        };
        let (offset, mut len) = if r.wild {
            (u64::from(r.offset), u64::from(r.len))
        } else {
            let offset = (u64::from(r.offset) % size) & !511;
            (offset, (u64::from(r.len) % (size - offset + 1)) & !511)
        };
        if command == cmd::WRITE {
            len = len.min(1 << 16);
            if extended {
                flags |= cf::PAYLOAD_LEN;
            }
        }
        RequestHeader {
            flags,
            command: command.into(),
            cookie: cookie as u64,
            offset,
            length: len,
        }
        .emit(extended, &mut input);
        if command == cmd::WRITE {
            input.extend(std::iter::repeat_n(0xa5, len as usize));
        }
        answers.push(match r.answer % 8 {
            0 => fuzz::Answer::Error(r.answer),
            1 => fuzz::Answer::Chunks,
            2 => fuzz::Answer::Short,
            _ => fuzz::Answer::Good,
        });
    }
    input.extend_from_slice(&s.tail);
    let piece = usize::from(s.piece) + 1;
    fuzz::drive_server(
        &input,
        |_| piece,
        |i| answers.get(i).copied().unwrap_or(fuzz::Answer::Good),
    );
});
