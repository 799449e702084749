//! The virtio-scsi driver against the fake device (`virtio::fake`) with a
//! small SCSI target model: scanning (BAD_TARGET, REPORT LUNS, a missing
//! LUN), UNIT ATTENTION retried, INQUIRY/VPD/capacity/write-protect,
//! commands split at the block limits, FUA, UNMAP and WRITE SAME, and
//! sense data decoded into errors.

use super::VirtioScsi;
use super::cdb;
use super::wire::{self, offset};
use crate::virtio::fake::{self, FakeTransport, Model, Shared};
use crate::virtio::transport::{F_INDIRECT_DESC, F_VERSION_1};
use crate::virtio::{Error, Op};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::string::ToString;
use std::vec;
use std::vec::Vec;
use virtio_drivers::transport::DeviceType;

const BS: usize = 512;
const SENSE: usize = 96;

struct Lun {
    data: Vec<u8>,
    serial: &'static str,
    read_only: bool,
}

#[derive(Default)]
struct Targets {
    luns: BTreeMap<(u8, u16), Lun>,
    /// Targets whose next command gets UNIT ATTENTION.
    unit_attention: BTreeSet<u8>,
    /// LBA that fails reads with MEDIUM ERROR.
    bad_lba: Option<u64>,
    /// READs return half their data, GOOD, with the residual set.
    short_reads: bool,
    /// (target, lun, CDB) of every command.
    log: Vec<(u8, u16, Vec<u8>)>,
}

#[derive(Clone, Default)]
struct Scsi(Rc<RefCell<Targets>>);

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

fn check(key: u8, asc: u8) -> (u8, Vec<u8>) {
    let mut s = vec![0u8; 18];
    s[0] = 0x70;
    s[2] = key;
    s[7] = 10;
    s[12] = asc;
    (wire::STATUS_CHECK_CONDITION, s)
}

impl Model for Scsi {
    fn handle(&mut self, _queue: u16, input: &[u8], out_len: usize) -> Vec<u8> {
        let mut t = self.0.borrow_mut();
        let (target, lun) = (
            input[1],
            (u16::from(input[2] & 0x3f) << 8) | u16::from(input[3]),
        );
        let cdb = &input[wire::REQ_HEADER..wire::REQ_HEADER + 32];
        let data_out = &input[wire::REQ_HEADER + 32..];
        let data_in_len = out_len - (wire::RESP_HEADER + SENSE);
        t.log.push((target, lun, cdb[..16].to_vec()));
        let mut resp = vec![0u8; wire::RESP_HEADER + SENSE];
        if !t.luns.keys().any(|&(tg, _)| tg == target) {
            resp[11] = 3; // BAD_TARGET
            return resp;
        }
        let op = cdb[0];
        let mut data_in = Vec::new();
        let (status, sense) = if op != cdb::INQUIRY && t.unit_attention.remove(&target) {
            check(6, 0x29)
        } else if op == cdb::REPORT_LUNS {
            let luns: Vec<u16> = t
                .luns
                .keys()
                .filter(|k| k.0 == target)
                .map(|k| k.1)
                .collect();
            data_in.extend_from_slice(&((luns.len() * 8) as u32).to_be_bytes());
            data_in.extend_from_slice(&[0; 4]);
            for l in luns {
                data_in.extend_from_slice(&[0x40 | (l >> 8) as u8, l as u8, 0, 0, 0, 0, 0, 0]);
            }
            (0, vec![])
        } else if !t.luns.contains_key(&(target, lun)) {
            if op == cdb::INQUIRY {
                data_in = vec![0x7f; 36];
                (0, vec![])
            } else {
                check(5, 0x25)
            }
        } else {
            let bad_lba = t.bad_lba;
            let l = t.luns.get_mut(&(target, lun)).unwrap();
            let blocks = (l.data.len() / BS) as u64;
            match op {
                cdb::TEST_UNIT_READY | cdb::SYNCHRONIZE_CACHE_10 => (0, vec![]),
                cdb::INQUIRY if cdb[1] & 1 == 0 => {
                    data_in = vec![0u8; 36];
                    data_in[8..16].copy_from_slice(b"FAKE    ");
                    data_in[16..32].copy_from_slice(b"DISK            ");
                    (0, vec![])
                }
                cdb::INQUIRY => {
                    let page = cdb[2];
                    data_in = vec![0, page, 0, 0];
                    match page {
                        0x00 => data_in.extend_from_slice(&[0x00, 0x80, 0xb0, 0xb2]),
                        0x80 => data_in.extend_from_slice(l.serial.as_bytes()),
                        0xb0 => {
                            let mut b = vec![0u8; 0x3c];
                            // max transfer 16 blocks, max unmap 64 blocks
                            // in 1 descriptor, granularity 8, write same 32.
                            b[4..8].copy_from_slice(&16u32.to_be_bytes());
                            b[16..20].copy_from_slice(&64u32.to_be_bytes());
                            b[20..24].copy_from_slice(&1u32.to_be_bytes());
                            b[24..28].copy_from_slice(&8u32.to_be_bytes());
                            b[32..40].copy_from_slice(&32u64.to_be_bytes());
                            data_in.extend_from_slice(&b);
                        }
                        0xb2 => data_in.extend_from_slice(&[0, 0xc0, 2, 0]),
                        _ => return resp_with(check(5, 0x24), resp, vec![], data_in_len),
                    }
                    let len = (data_in.len() - 4) as u16;
                    data_in[2..4].copy_from_slice(&len.to_be_bytes());
                    (0, vec![])
                }
                cdb::SERVICE_ACTION_IN_16 => {
                    data_in = vec![0u8; 32];
                    data_in[0..8].copy_from_slice(&(blocks - 1).to_be_bytes());
                    data_in[8..12].copy_from_slice(&(BS as u32).to_be_bytes());
                    (0, vec![])
                }
                cdb::MODE_SENSE_10 => {
                    data_in = vec![0, 6, 0, if l.read_only { 0x80 } else { 0 }, 0, 0, 0, 0];
                    (0, vec![])
                }
                cdb::READ_16 | cdb::WRITE_16 | cdb::WRITE_SAME_16 => {
                    let (lba, n) = (be64(&cdb[2..]), u64::from(be32(&cdb[10..])));
                    if lba + n > blocks {
                        check(5, 0x21)
                    } else if op != cdb::READ_16 && l.read_only {
                        check(7, 0x27)
                    } else if op == cdb::READ_16
                        && bad_lba.is_some_and(|b| (lba..lba + n).contains(&b))
                    {
                        check(3, 0x11)
                    } else {
                        let range = lba as usize * BS..(lba + n) as usize * BS;
                        match op {
                            cdb::READ_16 => data_in = l.data[range].to_vec(),
                            cdb::WRITE_16 => l.data[range].copy_from_slice(data_out),
                            _ => {
                                for b in l.data[range].chunks_mut(BS) {
                                    b.copy_from_slice(&data_out[..BS]);
                                }
                            }
                        }
                        (0, vec![])
                    }
                }
                cdb::UNMAP => {
                    let n_desc = usize::from(u16::from_be_bytes([data_out[2], data_out[3]])) / 16;
                    for d in data_out[8..8 + 16 * n_desc].chunks(16) {
                        let (lba, n) = (be64(d) as usize, be32(&d[8..]) as usize);
                        l.data[lba * BS..(lba + n) * BS].fill(0);
                    }
                    (0, vec![])
                }
                _ => check(5, 0x20),
            }
        };
        if op == cdb::READ_16 && t.short_reads && status == 0 {
            let half = data_in.len() / 2;
            data_in.truncate(half);
            resp[4..8].copy_from_slice(&(half as u32).to_le_bytes());
        }
        resp_with((status, sense), resp, data_in, data_in_len)
    }
}

fn resp_with(
    (status, sense): (u8, Vec<u8>),
    mut resp: Vec<u8>,
    mut data_in: Vec<u8>,
    len: usize,
) -> Vec<u8> {
    resp[0..4].copy_from_slice(&(sense.len() as u32).to_le_bytes());
    resp[10] = status;
    resp[12..12 + sense.len()].copy_from_slice(&sense);
    data_in.truncate(len);
    resp.extend_from_slice(&data_in);
    resp
}

fn controller(targets: Targets) -> (VirtioScsi<FakeTransport>, Shared, Scsi) {
    let mut c = vec![0u8; 36];
    fake::put(&mut c, offset::NUM_QUEUES, &1u32.to_le_bytes());
    fake::put(&mut c, offset::SEG_MAX, &254u32.to_le_bytes());
    fake::put(&mut c, offset::MAX_SECTORS, &0xffffu32.to_le_bytes());
    fake::put(&mut c, offset::SENSE_SIZE, &(SENSE as u32).to_le_bytes());
    fake::put(&mut c, offset::CDB_SIZE, &32u32.to_le_bytes());
    fake::put(&mut c, offset::MAX_TARGET, &7u16.to_le_bytes());
    fake::put(&mut c, offset::MAX_LUN, &16383u32.to_le_bytes());
    let model = Scsi(Rc::new(RefCell::new(targets)));
    let (t, state) = fake::device(
        DeviceType::ScsiHost,
        F_VERSION_1 | F_INDIRECT_DESC | super::events::F_HOTPLUG,
        c,
        model.clone(),
    );
    // The event queue's buffers wait for events.
    state.borrow_mut().hold = vec![super::events::EVENT_QUEUE];
    let s = VirtioScsi::new(t).expect("bring-up");
    (s, state, model)
}

fn two_targets() -> Targets {
    let mut t = Targets::default();
    let lun = |serial, ro, blocks: usize| Lun {
        data: vec![0; blocks * BS],
        serial,
        read_only: ro,
    };
    t.luns.insert((0, 0), lun("zero", false, 1024));
    t.luns.insert((0, 2), lun("two", false, 256));
    t.luns.insert((3, 0), lun("ro", true, 64));
    t.unit_attention = [0, 3].into();
    t
}

#[test]
fn scan_finds_every_lun_and_retries_unit_attention() {
    let (s, state, model) = controller(two_targets());
    let luns = s.luns();
    let ids: Vec<_> = luns
        .iter()
        .map(|l| (l.target, l.lun, l.info.serial.as_str()))
        .collect();
    assert_eq!(ids, vec![(0, 0, "zero"), (0, 2, "two"), (3, 0, "ro")]);
    assert_eq!(luns[0].info.capacity, 1024 * 512);
    assert_eq!(luns[0].info.model, "FAKE DISK");
    assert!(!luns[0].info.read_only && luns[2].info.read_only);
    let l = &luns[0].info.limits;
    assert_eq!(l.max_transfer, 16 * 512);
    assert_eq!(l.max_discard, 64 * 512);
    assert_eq!(l.discard_alignment, 8 * 512);
    assert_eq!(l.max_write_zeroes, 32 * 512);
    assert_eq!(l.queue_size, 256);
    // REPORT LUNS went to all 8 targets at once.
    let m = model.0.borrow();
    let mut report: Vec<u8> = m
        .log
        .iter()
        .filter(|c| c.2[0] == cdb::REPORT_LUNS)
        .map(|c| c.0)
        .collect();
    report[8..].sort();
    assert_eq!(
        report,
        vec![0, 1, 2, 3, 4, 5, 6, 7, 0, 3],
        "8 targets, then 2 retries"
    );
    assert!(m.unit_attention.is_empty());
    let seen = state.borrow().seen.clone();
    let events: Vec<_> = seen.iter().filter(|c| c.queue == 1).collect();
    assert_eq!(events.len(), 8, "event buffers armed");
    assert!(events.iter().all(|c| c.buffers == vec![(16, true)]));
    let requests: Vec<_> = seen.iter().filter(|c| c.queue == 2).collect();
    assert!(requests[..8].iter().all(|c| c.indirect));
    // Request header + CDB (51), response + sense (108), data-in.
    assert_eq!(
        requests[0].buffers,
        vec![(51, false), (108, true), (4104, true)]
    );
}

#[test]
fn reads_and_writes_split_at_the_block_limits_with_fua() {
    let (mut s, _state, model) = controller(two_targets());
    let data: Vec<u8> = (0..40 * 512).map(|i| (i / 512) as u8).collect();
    s.submit(
        0,
        Op::Write {
            offset: 512,
            buf: data.clone(),
            fua: true,
        },
    )
    .unwrap();
    let done = fake::collect(1, |out| s.poll(out));
    assert_eq!(done[0].result, Ok(()));
    let writes: Vec<Vec<u8>> = model
        .0
        .borrow()
        .log
        .iter()
        .filter(|c| c.2[0] == cdb::WRITE_16)
        .map(|c| c.2.clone())
        .collect();
    assert_eq!(
        writes,
        vec![
            cdb::write_16(1, 16, true).as_bytes().to_vec(),
            cdb::write_16(17, 16, true).as_bytes().to_vec(),
            cdb::write_16(33, 8, true).as_bytes().to_vec(),
        ]
    );
    s.submit(
        0,
        Op::Read {
            offset: 512,
            buf: vec![0; data.len()],
        },
    )
    .unwrap();
    let done = fake::collect(1, |out| s.poll(out));
    assert_eq!(done[0].buf, data);
    // Another LUN of the same target is independent.
    assert_eq!(model.0.borrow().luns[&(0, 2)].data[512], 0);
}

#[test]
fn discard_uses_unmap_and_write_zeroes_write_same() {
    let mut t = two_targets();
    t.luns.get_mut(&(0, 0)).unwrap().data.fill(0xaa);
    let (mut s, _state, model) = controller(t);
    s.submit(
        0,
        Op::Discard {
            offset: 0,
            len: 100 * 512,
        },
    )
    .unwrap();
    s.submit(
        0,
        Op::WriteZeroes {
            offset: 200 * 512,
            len: 40 * 512,
            may_unmap: false,
        },
    )
    .unwrap();
    assert!(
        fake::collect(2, |out| s.poll(out))
            .iter()
            .all(|c| c.result.is_ok())
    );
    let m = model.0.borrow();
    let ops: Vec<u8> = m
        .log
        .iter()
        .filter(|c| c.0 == 0 && c.1 == 0)
        .map(|c| c.2[0])
        .collect();
    let tail: Vec<u8> = ops[ops.len() - 4..].to_vec();
    assert_eq!(
        tail,
        vec![
            cdb::UNMAP,
            cdb::UNMAP,
            cdb::WRITE_SAME_16,
            cdb::WRITE_SAME_16
        ],
        "100 blocks at 64 per UNMAP, 40 at 32 per WRITE SAME"
    );
    let d = &m.luns[&(0, 0)].data;
    assert!(d[..100 * 512].iter().all(|&b| b == 0));
    assert_eq!(d[100 * 512], 0xaa);
    assert!(d[200 * 512..240 * 512].iter().all(|&b| b == 0));
    assert_eq!(d[240 * 512], 0xaa);
}

#[test]
fn sense_data_becomes_clear_errors() {
    let mut t = two_targets();
    t.bad_lba = Some(10);
    let (mut s, _state, _model) = controller(t);
    s.submit(
        0,
        Op::Read {
            offset: 0,
            buf: vec![0; 16 * 512],
        },
    )
    .unwrap();
    let done = fake::collect(1, |out| s.poll(out));
    let e = done[0].result.clone().unwrap_err();
    assert_eq!(
        e.to_string(),
        "MEDIUM ERROR: unrecovered read error (asc 0x11, ascq 0x00)"
    );
    assert_eq!(e.errno(), 5);
    // The read-only LUN: refused by the driver before the device.
    assert_eq!(
        s.submit(
            2,
            Op::Write {
                offset: 0,
                buf: vec![0; 512],
                fua: false
            }
        )
        .unwrap_err(),
        Error::ReadOnly
    );
    // Raw commands reach the target and come back decoded.
    let id = s.submit_commands(
        3,
        0,
        vec![super::command::Command {
            cdb: cdb::write_16(0, 1, false),
            data: super::command::Data::OutOwned(vec![1; 512]),
        }],
        vec![],
    );
    let done = fake::collect(1, |out| s.poll(out));
    assert_eq!(done[0].id, id);
    assert_eq!(
        done[0].result.clone().unwrap_err().to_string(),
        "DATA PROTECT: write protected (asc 0x27, ascq 0x00)"
    );
    let id = s.submit_commands(
        5,
        0,
        vec![super::command::Command {
            cdb: cdb::test_unit_ready(),
            data: super::command::Data::None,
        }],
        vec![],
    );
    let done = fake::collect(1, |out| s.poll(out));
    assert_eq!(done[0].id, id);
    assert_eq!(
        done[0].result,
        Err(Error::Transport(wire::Response::BadTarget))
    );
}

#[test]
fn a_short_read_is_an_error() {
    let mut t = two_targets();
    t.short_reads = true;
    let (mut s, _state, _model) = controller(t);
    s.submit(
        0,
        Op::Read {
            offset: 0,
            buf: vec![0; 4096],
        },
    )
    .unwrap();
    let done = fake::collect(1, |out| s.poll(out));
    assert_eq!(done[0].result, Err(Error::Io));
}

fn event(reason: u32, target: u8, lun: u16) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&1u32.to_le_bytes());
    b[4..12].copy_from_slice(&wire::lun_field(target, lun));
    b[12..16].copy_from_slice(&reason.to_le_bytes());
    b
}

#[test]
fn hot_plugged_luns_come_and_go() {
    use super::events::Event;
    let (mut s, state, model) = controller(two_targets());
    assert_eq!(s.luns().len(), 3);
    model.0.borrow_mut().luns.insert(
        (5, 1),
        Lun {
            data: vec![0x5a; 64 * BS],
            serial: "hot",
            read_only: false,
        },
    );
    assert!(state.borrow_mut().fire(1, &event(1, 5, 1)));
    let mut out = Vec::new();
    s.poll(&mut out);
    assert_eq!(s.take_events(), vec![Event::Added { target: 5, lun: 1 }]);
    let i = s.rescan(5, 1).unwrap().expect("a disk answers");
    assert_eq!(i, 3);
    assert_eq!(s.luns()[i].info.serial, "hot");
    s.submit(
        i,
        Op::Read {
            offset: 0,
            buf: vec![0; 512],
        },
    )
    .unwrap();
    let done = fake::collect(1, |out| s.poll(out));
    assert!(done[0].buf.iter().all(|&b| b == 0x5a));

    model.0.borrow_mut().luns.remove(&(5, 1));
    assert!(state.borrow_mut().fire(1, &event(2, 5, 1)));
    s.poll(&mut out);
    assert_eq!(s.take_events(), vec![Event::Removed { target: 5, lun: 1 }]);
    assert_eq!(s.remove(5, 1), Some(3));
    let e = s
        .submit(
            i,
            Op::Read {
                offset: 0,
                buf: vec![0; 512],
            },
        )
        .unwrap_err();
    assert_eq!(e, Error::Gone);
    assert_eq!(e.to_string(), "the LUN was removed (hot-unplugged)");
    // The buffers went back on the event queue.
    assert_eq!(
        state.borrow().seen.iter().filter(|c| c.queue == 1).count(),
        10
    );
}
