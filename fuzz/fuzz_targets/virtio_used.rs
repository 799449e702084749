//! The virtio-blk driver (`drivers::virtio::blk`) against a misbehaving
//! device (`drivers::virtio::fake` with `misbehave`): for every chain it
//! completes, the device publishes what the input says instead of the
//! right used element: nothing, a wrong chain head (in or out of range), a
//! wrong length, or the element twice. The driver must not panic, must
//! not complete a request it never submitted, and must complete each one
//! at most once.
#![no_main]
use arbitrary::Arbitrary;
use drivers::virtio::blk::VirtioBlk;
use drivers::virtio::blk::features::{F_FLUSH, F_SEG_MAX, F_SIZE_MAX, offset};
use drivers::virtio::fake::{self, Model};
use drivers::virtio::transport::{F_INDIRECT_DESC, F_VERSION_1};
use drivers::virtio::{Completion, Op};
use libfuzzer_sys::fuzz_target;
use std::collections::BTreeSet;
use virtio_drivers::transport::DeviceType;

/// Answers every request well: reads with zeroes, then status OK.
struct Good;

impl Model for Good {
    fn handle(&mut self, _queue: u16, _input: &[u8], out_len: usize) -> Vec<u8> {
        vec![0; out_len]
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Used {
    Right,
    Drop,
    Head(u16),
    Len(u32),
    Twice,
}

#[derive(Arbitrary, Debug)]
struct Input {
    indirect: bool,
    /// Read (false) or write (true), sector, sectors.
    ops: Vec<(bool, u8, u8)>,
    used: Vec<Used>,
}

fuzz_target!(|input: Input| {
    let mut config = vec![0u8; 64];
    fake::put(&mut config, offset::CAPACITY, &2048u64.to_le_bytes());
    fake::put(&mut config, offset::SIZE_MAX, &4096u32.to_le_bytes());
    fake::put(&mut config, offset::SEG_MAX, &4u32.to_le_bytes());
    let features = F_VERSION_1
        | F_SIZE_MAX
        | F_SEG_MAX
        | F_FLUSH
        | if input.indirect { F_INDIRECT_DESC } else { 0 };
    let (t, state) = fake::device(DeviceType::Block, features, config, Good);
    let Ok(mut blk) = VirtioBlk::new(t) else {
        return;
    };
    let mut script = input.used.clone().into_iter();
    state.borrow_mut().misbehave = Some(Box::new(move |head, len| {
        match script.next().unwrap_or(Used::Right) {
            Used::Right => vec![(head, len)],
            Used::Drop => vec![],
            Used::Head(h) => vec![(u32::from(h), len)],
            Used::Len(l) => vec![(head, l)],
            Used::Twice => vec![(head, len), (head, len)],
        }
    }));
    let mut submitted = BTreeSet::new();
    for &(write, sector, sectors) in input.ops.iter().take(64) {
        let offset = u64::from(sector) * 512;
        let len = (usize::from(sectors) % 16 + 1) * 512;
        let op = if write {
            Op::Write {
                offset,
                buf: vec![0x5a; len],
                fua: false,
            }
        } else {
            Op::Read {
                offset,
                buf: vec![0; len],
            }
        };
        if let Ok(id) = blk.submit(op) {
            submitted.insert(id);
        }
    }
    let mut done: Vec<Completion> = Vec::new();
    for _ in 0..1000 {
        blk.poll(&mut done);
    }
    let mut seen = BTreeSet::new();
    for c in &done {
        assert!(
            submitted.contains(&c.id),
            "completed a request never submitted"
        );
        assert!(seen.insert(c.id), "completed twice");
    }
});
