//! The virtio-blk driver against the fake device (`virtio::fake`):
//! bring-up, descriptor chains, splitting, completion by token in any
//! order, the backlog beyond the queue size, FUA, errors.

use super::VirtioBlk;
use super::features::*;
use super::request::ReqType;
use crate::virtio::fake::{self, FakeTransport, Model, Shared};
use crate::virtio::transport::{F_INDIRECT_DESC, F_VERSION_1};
use crate::virtio::{Completion, Error, Op};
use std::cell::RefCell;
use std::rc::Rc;
use std::vec;
use std::vec::Vec;
use virtio_drivers::transport::DeviceType;

/// A RAM disk speaking virtio-blk; sectors in `bad` fail with IOERR.
#[derive(Clone, Default)]
struct Disk {
    data: Rc<RefCell<Vec<u8>>>,
    /// (type, sector, bytes of data) per request.
    log: Rc<RefCell<Vec<(u32, u64, usize)>>>,
    bad: Option<u64>,
}

impl Model for Disk {
    fn handle(&mut self, _queue: u16, input: &[u8], out_len: usize) -> Vec<u8> {
        let kind = u32::from_le_bytes(input[0..4].try_into().unwrap());
        let sector = u64::from_le_bytes(input[8..16].try_into().unwrap());
        let payload = &input[16..];
        let mut data = self.data.borrow_mut();
        let at = sector as usize * 512;
        let n = match kind {
            0 => out_len - 1,
            1 => payload.len(),
            _ => 0,
        };
        self.log.borrow_mut().push((kind, sector, n));
        if let Some(bad) = self.bad
            && (kind == 0 || kind == 1)
            && (sector..sector + (n / 512) as u64).contains(&bad)
        {
            let mut out = vec![0; out_len];
            out[out_len - 1] = 1;
            return out;
        }
        match kind {
            0 => {
                let mut out = data[at..at + n].to_vec();
                out.push(0);
                out
            }
            1 => {
                data[at..at + n].copy_from_slice(payload);
                vec![0]
            }
            4 => vec![0],
            8 => {
                let mut id = b"fake-serial".to_vec();
                id.resize(20, 0);
                id.push(0);
                id
            }
            11 | 13 => {
                let s = u64::from_le_bytes(payload[0..8].try_into().unwrap()) as usize;
                let count = u32::from_le_bytes(payload[8..12].try_into().unwrap()) as usize;
                data[s * 512..(s + count) * 512].fill(0);
                vec![0]
            }
            _ => vec![2],
        }
    }
}

fn config(capacity_sectors: u64, size_max: u32, seg_max: u32) -> Vec<u8> {
    let mut c = vec![0u8; 64];
    fake::put(&mut c, offset::CAPACITY, &capacity_sectors.to_le_bytes());
    fake::put(&mut c, offset::SIZE_MAX, &size_max.to_le_bytes());
    fake::put(&mut c, offset::SEG_MAX, &seg_max.to_le_bytes());
    fake::put(&mut c, offset::BLK_SIZE, &512u32.to_le_bytes());
    fake::put(&mut c, offset::MAX_DISCARD_SECTORS, &64u32.to_le_bytes());
    fake::put(&mut c, offset::MAX_DISCARD_SEG, &1u32.to_le_bytes());
    fake::put(
        &mut c,
        offset::DISCARD_SECTOR_ALIGNMENT,
        &8u32.to_le_bytes(),
    );
    fake::put(
        &mut c,
        offset::MAX_WRITE_ZEROES_SECTORS,
        &1024u32.to_le_bytes(),
    );
    c
}

const ALL: u64 = F_VERSION_1
    | F_INDIRECT_DESC
    | F_SIZE_MAX
    | F_SEG_MAX
    | F_BLK_SIZE
    | F_FLUSH
    | F_DISCARD
    | F_WRITE_ZEROES;

fn blk(
    features: u64,
    disk: &Disk,
    size_max: u32,
    seg_max: u32,
) -> (VirtioBlk<FakeTransport>, Shared) {
    let (t, state) = fake::device(
        DeviceType::Block,
        features,
        config(2048, size_max, seg_max),
        disk.clone(),
    );
    disk.data.borrow_mut().resize(2048 * 512, 0);
    let b = VirtioBlk::new(t).expect("bring-up");
    (b, state)
}

fn run(b: &mut VirtioBlk<FakeTransport>, n: usize) -> Vec<Completion> {
    fake::collect(n, |out| b.poll(out))
}

#[test]
fn bring_up_negotiates_reads_limits_and_the_serial() {
    let disk = Disk::default();
    let (b, state) = blk(ALL | (1 << 7), &disk, 65536, 8);
    let s = state.borrow();
    assert_eq!(
        s.driver_features, ALL,
        "offered but unknown features are declined"
    );
    let i = b.info();
    assert_eq!(i.serial, "fake-serial");
    assert_eq!(i.capacity, 2048 * 512);
    assert_eq!(i.limits.queue_size, 256);
    assert_eq!(i.limits.max_transfer, 8 * 65536);
    assert_eq!(i.limits.max_discard, 64 * 512);
    assert_eq!(i.limits.discard_alignment, 8 * 512);
    assert_eq!(i.limits.max_write_zeroes, 1024 * 512);
    assert!(i.flush && !i.read_only);
    // GET_ID: header (readable), 20 id bytes and the status (writable).
    assert_eq!(s.seen[0].buffers, vec![(16, false), (20, true), (1, true)]);
    assert!(s.seen[0].indirect);
}

#[test]
fn writes_and_reads_split_at_size_max_and_seg_max() {
    let disk = Disk::default();
    // 4 KiB segments, 2 per request: 8 KiB per device request.
    let (mut b, state) = blk(ALL, &disk, 4096, 2);
    let data: Vec<u8> = (0..20 * 1024).map(|i| (i % 251) as u8).collect();
    let id = b
        .submit(Op::Write {
            offset: 512,
            buf: data.clone(),
            fua: false,
        })
        .unwrap();
    let done = run(&mut b, 1);
    assert_eq!(done.len(), 1);
    assert_eq!((done[0].id, done[0].result.clone()), (id, Ok(())));
    assert_eq!(done[0].buf, data, "the buffer comes back");
    assert_eq!(&disk.data.borrow()[512..512 + data.len()], &data[..]);
    let log: Vec<_> = disk.log.borrow()[1..].to_vec();
    assert_eq!(log, vec![(1, 1, 8192), (1, 17, 8192), (1, 33, 4096)]);
    // Header, two 4 KiB data segments, status; data device-readable.
    let seen = state.borrow().seen.clone();
    assert_eq!(
        seen[1].buffers,
        vec![(16, false), (4096, false), (4096, false), (1, true)]
    );

    let id = b
        .submit(Op::Read {
            offset: 512,
            buf: vec![0; data.len()],
        })
        .unwrap();
    let done = run(&mut b, 1);
    assert_eq!(done[0].id, id);
    assert_eq!(done[0].buf, data);
    assert_eq!(
        state.borrow().seen.last().unwrap().buffers,
        vec![(16, false), (4096, true), (1, true)],
        "read data is device-writable"
    );
}

#[test]
fn completions_in_any_order_each_reach_their_request() {
    let disk = Disk::default();
    let (mut b, state) = blk(ALL, &disk, 65536, 8);
    for (i, chunk) in disk.data.borrow_mut().chunks_mut(512).enumerate() {
        chunk.fill(i as u8);
    }
    state.borrow_mut().auto = false;
    let ids: Vec<_> = (0..3u64)
        .map(|i| {
            b.submit(Op::Read {
                offset: i * 512,
                buf: vec![0xee; 512],
            })
            .unwrap()
        })
        .collect();
    let mut out = Vec::new();
    assert!(!b.poll(&mut out) || out.is_empty());
    assert_eq!(state.borrow().held(), 3);
    assert_eq!(b.in_flight(), 3);
    state.borrow_mut().complete(&[2, 0]);
    b.poll(&mut out);
    assert_eq!(
        out.iter().map(|c| c.id).collect::<Vec<_>>(),
        vec![ids[2], ids[0]]
    );
    state.borrow_mut().complete(&[0]);
    b.poll(&mut out);
    assert_eq!(out.len(), 3);
    for c in &out {
        let i = ids.iter().position(|&id| id == c.id).unwrap();
        assert!(
            c.buf.iter().all(|&x| x == i as u8),
            "request {i} got its own data"
        );
    }
}

#[test]
fn more_requests_than_ring_slots_wait_in_the_backlog() {
    let disk = Disk::default();
    let (mut b, state) = blk(ALL, &disk, 65536, 8);
    state.borrow_mut().auto = false;
    for i in 0..300u64 {
        b.submit(Op::Read {
            offset: (i % 2048) * 512,
            buf: vec![0; 512],
        })
        .unwrap();
    }
    let mut out = Vec::new();
    assert_eq!(b.in_flight(), 0, "submit only queues; poll sends");
    b.poll(&mut out);
    assert_eq!(b.in_flight(), 256, "the ring is full, one slot per request");
    assert_eq!(state.borrow().notifies, 2, "GET_ID, then one batch");
    let mut rounds = 0;
    while out.len() < 300 && rounds < 10 {
        state.borrow_mut().complete_all_reversed();
        b.poll(&mut out);
        rounds += 1;
    }
    assert_eq!(out.len(), 300);
    assert!(out.iter().all(|c| c.result.is_ok()));
    assert_eq!(b.in_flight(), 0);
    assert!(!b.busy());
}

#[test]
fn fua_write_is_followed_by_a_flush_after_its_data() {
    let disk = Disk::default();
    let (mut b, state) = blk(ALL, &disk, 4096, 1);
    state.borrow_mut().auto = false;
    b.submit(Op::Write {
        offset: 0,
        buf: vec![7; 8192],
        fua: true,
    })
    .unwrap();
    let mut out = Vec::new();
    b.poll(&mut out);
    assert_eq!(state.borrow().held(), 2, "both data parts, no flush yet");
    state.borrow_mut().complete(&[0, 1]);
    b.poll(&mut out);
    assert!(out.is_empty(), "not complete before the flush");
    assert_eq!(state.borrow().held(), 1);
    state.borrow_mut().complete(&[0]);
    b.poll(&mut out);
    assert_eq!(out.len(), 1);
    let kinds: Vec<u32> = disk.log.borrow()[1..].iter().map(|l| l.0).collect();
    assert_eq!(kinds, vec![ReqType::Out as u32, 1, ReqType::Flush as u32]);
}

#[test]
fn discard_and_write_zeroes_send_segments_split_at_their_limits() {
    let disk = Disk::default();
    let (mut b, _state) = blk(ALL, &disk, 65536, 8);
    disk.data.borrow_mut().fill(0xff);
    b.submit(Op::Discard {
        offset: 0,
        len: 100 * 512,
    })
    .unwrap();
    b.submit(Op::WriteZeroes {
        offset: 200 * 512,
        len: 4 * 512,
        may_unmap: true,
    })
    .unwrap();
    assert_eq!(run(&mut b, 2).len(), 2);
    let log: Vec<_> = disk.log.borrow()[1..].to_vec();
    assert_eq!(log, vec![(11, 0, 0), (11, 0, 0), (13, 0, 0)]);
    let d = disk.data.borrow();
    assert!(d[..100 * 512].iter().all(|&x| x == 0));
    assert_eq!(d[100 * 512], 0xff);
    assert!(d[200 * 512..204 * 512].iter().all(|&x| x == 0));
}

#[test]
fn device_errors_and_refusals() {
    let disk = Disk {
        bad: Some(5),
        ..Disk::default()
    };
    let (mut b, state) = blk(ALL & !F_FLUSH, &disk, 65536, 8);
    b.submit(Op::Read {
        offset: 0,
        buf: vec![0; 8 * 512],
    })
    .unwrap();
    let done = run(&mut b, 1);
    assert_eq!(done[0].result, Err(Error::Io));
    assert_eq!(done[0].result.clone().unwrap_err().errno(), 5);
    // Without VIRTIO_BLK_F_FLUSH a flush has nothing to do.
    let before = state.borrow().notifies;
    b.submit(Op::Flush).unwrap();
    assert_eq!(run(&mut b, 1)[0].result, Ok(()));
    assert_eq!(state.borrow().notifies, before);

    let ro = Disk::default();
    let (mut b, state) = blk(ALL | F_RO, &ro, 65536, 8);
    assert!(b.info().read_only);
    let before = state.borrow().notifies;
    assert_eq!(
        b.submit(Op::Write {
            offset: 0,
            buf: vec![1; 512],
            fua: false
        })
        .unwrap_err(),
        Error::ReadOnly
    );
    assert_eq!(
        state.borrow().notifies,
        before,
        "nothing reached the device"
    );

    let (mut b, _) = blk(ALL & !F_WRITE_ZEROES, &Disk::default(), 65536, 8);
    assert_eq!(
        b.submit(Op::WriteZeroes {
            offset: 0,
            len: 512,
            may_unmap: false
        })
        .unwrap_err(),
        Error::Unsupported
    );
}

#[test]
fn releasing_the_device_frees_its_dma_memory() {
    use crate::virtio::hal::THREAD_PAGES;
    let before = THREAD_PAGES.with(|c| c.get());
    let disk = Disk::default();
    let (mut b, state) = blk(ALL, &disk, 65536, 8);
    assert!(
        THREAD_PAGES.with(|c| c.get()) > before,
        "the ring is DMA memory"
    );
    state.borrow_mut().auto = false;
    b.submit(Op::Read {
        offset: 0,
        buf: vec![0; 4096],
    })
    .unwrap();
    drop(b);
    assert_eq!(THREAD_PAGES.with(|c| c.get()), before);
}
