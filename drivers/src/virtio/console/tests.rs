//! The driver against the fake device (`virtio::fake`): the control
//! handshake QEMU runs, the order of data and connects/disconnects, and
//! transmit chunking.

use super::control::{self, encode};
use super::{Event, F_MULTIPORT, RX_BUFFERS, VirtioSerial};
use crate::virtio::fake::{self, FakeTransport, Model, Shared};
use crate::virtio::transport::F_VERSION_1;
use std::cell::RefCell;
use std::rc::Rc;
use std::vec::Vec;
use virtio_drivers::transport::DeviceType;

const CONTROL_RX: u16 = 2;
const CONTROL_TX: u16 = 3;
const PORT1_RX: u16 = 4;
const PORT1_TX: u16 = 5;

/// One chain the driver sent: its queue and its bytes.
type Chain = (u16, Vec<u8>);

/// What the driver sent, in order.
#[derive(Clone, Default)]
struct Sent(Rc<RefCell<Vec<Chain>>>);

impl Model for Sent {
    fn handle(&mut self, queue: u16, input: &[u8], _out_len: usize) -> Vec<u8> {
        self.0.borrow_mut().push((queue, input.to_vec()));
        Vec::new()
    }
}

impl Sent {
    fn control(&self) -> Vec<[u8; 8]> {
        self.0
            .borrow()
            .iter()
            .filter(|(q, _)| *q == CONTROL_TX)
            .map(|(_, m)| m[..8].try_into().unwrap())
            .collect()
    }

    fn data(&self, queue: u16) -> Vec<u8> {
        self.0
            .borrow()
            .iter()
            .filter(|(q, _)| *q == queue)
            .flat_map(|(_, d)| d.clone())
            .collect()
    }
}

fn serial(
    features: u64,
) -> (
    Result<VirtioSerial<FakeTransport>, super::Error>,
    Shared,
    Sent,
) {
    let mut c = vec![0u8; 12];
    fake::put(&mut c, 4, &2u32.to_le_bytes());
    let sent = Sent::default();
    let (t, state) = fake::device(DeviceType::Console, features, c, sent.clone());
    state.borrow_mut().max_queue_size = 128;
    // Receive queues keep their buffers until the test fills one.
    state.borrow_mut().hold = vec![0, CONTROL_RX, PORT1_RX];
    (VirtioSerial::new(t), state, sent)
}

fn fire(state: &Shared, queue: u16, bytes: &[u8]) {
    assert!(
        state.borrow_mut().fire(queue, bytes),
        "no buffer on {queue}"
    );
}

fn named(id: u32, name: &str) -> Vec<u8> {
    let mut m = encode(id, control::PORT_NAME, 1).to_vec();
    m.extend_from_slice(name.as_bytes());
    m
}

#[test]
fn runs_qemus_handshake_and_orders_data_around_disconnects() {
    let (dev, state, sent) = serial(F_VERSION_1 | F_MULTIPORT);
    let mut dev = dev.expect("bring-up");
    assert_eq!(sent.control(), [encode(0, control::DEVICE_READY, 1)]);
    let mut out = Vec::new();

    // PORT_ADD for a served port and for one beyond the ports set up.
    fire(&state, CONTROL_RX, &encode(1, control::DEVICE_ADD, 1));
    fire(&state, CONTROL_RX, &encode(9, control::DEVICE_ADD, 1));
    fire(&state, CONTROL_RX, &named(1, "org.qemu.qmp.0"));
    assert!(dev.poll(&mut out));
    assert_eq!(
        out,
        [Event::Added(1), Event::Named(1, "org.qemu.qmp.0".into())]
    );
    assert_eq!(
        sent.control()[1..],
        [
            encode(1, control::PORT_READY, 1),
            encode(9, control::PORT_READY, 0)
        ]
    );
    dev.open(1);
    assert_eq!(sent.control()[3], encode(1, control::PORT_OPEN, 1));

    // The client connects, sends, goes away and another connects, all
    // before one poll: its bytes come before its disconnect.
    out.clear();
    fire(&state, CONTROL_RX, &encode(1, control::PORT_OPEN, 1));
    fire(&state, PORT1_RX, b"{\"execute\": \"qmp_cap");
    fire(&state, CONTROL_RX, &encode(1, control::PORT_OPEN, 0));
    fire(&state, CONTROL_RX, &encode(1, control::PORT_OPEN, 1));
    assert!(dev.poll(&mut out));
    assert_eq!(
        out,
        [
            Event::HostOpen(1),
            Event::Data(1, b"{\"execute\": \"qmp_cap".to_vec()),
            Event::HostClosed(1),
            Event::HostOpen(1),
        ]
    );
    assert!(dev.host_open(1));

    // Data after a connect comes after it; every receive buffer is back.
    out.clear();
    fire(&state, PORT1_RX, b"{}");
    assert!(dev.poll(&mut out));
    assert_eq!(out, [Event::Data(1, b"{}".to_vec())]);
    let held = |q| state.borrow().seen.iter().filter(|c| c.queue == q).count();
    assert_eq!(held(PORT1_RX), RX_BUFFERS + 2, "re-armed after each fill");
    assert!(!dev.poll(&mut out), "nothing new");

    // Writes are chunked; the device got every byte, in order.
    let big: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
    assert_eq!(dev.write(1, &big), big.len());
    assert_eq!(sent.data(PORT1_TX), big);
    assert!(dev.poll(&mut out), "the transmit buffers come back");
    assert!(!dev.unsent(1));
    assert_eq!(dev.write(7, b"x"), 0, "no such port");
}

#[test]
fn a_device_without_multiport_is_refused() {
    let (dev, _, _) = serial(F_VERSION_1);
    assert!(dev.is_err());
}
