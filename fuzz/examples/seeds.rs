//! Regenerates the NBD seeds in `fuzz/corpus/`: the real client engine
//! talks to the real server engine in memory, each way recorded. What the
//! client sent seeds `nbd_handshake` (a valid handshake and requests); what
//! the server sent seeds `nbd_client`. Run from the workspace root:
//! `cargo run -p fuzz --example seeds`.

use block::nbd::client::{Client, ClientOp, ClientState};
use block::nbd::{Connection, Limits};

/// One session: `block_status` asks for `base:allocation`.
fn session(block_status: bool) -> (Vec<u8>, Vec<u8>) {
    let exports = fuzz::exports();
    let mut server = Connection::new(Limits::default());
    let mut client = Client::new("disk", block_status);
    let (mut to_server, mut to_client) = (Vec::new(), Vec::new());
    let ops = [
        ClientOp::Read {
            offset: 0,
            len: 4096,
        },
        ClientOp::Write {
            offset: 4096,
            data: vec![0x5a; 512],
            fua: false,
        },
        ClientOp::BlockStatus {
            offset: 0,
            len: 65536,
        },
        ClientOp::Flush,
    ];
    let mut next = 0;
    for _ in 0..100 {
        if matches!(client.state(), ClientState::Ready) && next < ops.len() {
            let op = ops[next].clone();
            next += 1;
            if !block_status && matches!(op, ClientOp::BlockStatus { .. }) {
                continue;
            }
            client.submit(op).expect("submit");
        }
        let c = client.output().to_vec();
        client.consume_output(c.len());
        to_server.extend_from_slice(&c);
        let mut pos = 0;
        while pos < c.len() {
            let n = server.receive(&c[pos..], &exports);
            if n == 0 {
                break;
            }
            pos += n;
        }
        while let Some(r) = server.next_request() {
            let done = match r.op {
                block::nbd::Op::Read { len, .. } => {
                    block::nbd::Completion::Data(vec![7; len as usize])
                }
                block::nbd::Op::BlockStatus { len, .. } => {
                    block::nbd::Completion::Extents(vec![block::io::BlockStatus::data(len)])
                }
                _ => block::nbd::Completion::Done,
            };
            server.complete(r.id, done).expect("complete");
        }
        let mut s = Vec::new();
        while !server.output().is_empty() {
            let c = server.output().chunk().to_vec();
            server.consume_output(c.len());
            s.extend_from_slice(&c);
        }
        to_client.extend_from_slice(&s);
        client.receive(&s);
        while client.next_completion().is_some() {}
        if next == ops.len() && client.in_flight() == 0 {
            break;
        }
    }
    (to_server, to_client)
}

fn main() {
    let root = std::path::Path::new("fuzz/corpus");
    for (i, bs) in [false, true].into_iter().enumerate() {
        let (to_server, to_client) = session(bs);
        // The targets' first byte: piece size (and, for the client, whether
        // it asks for block status).
        let mut h = vec![255];
        h.extend_from_slice(&to_server);
        std::fs::write(root.join(format!("nbd_handshake/session-{i}")), &h).unwrap();
        let mut c = vec![if bs { 255 } else { 254 }];
        c.extend_from_slice(&to_client);
        std::fs::write(root.join(format!("nbd_client/session-{i}")), &c).unwrap();
        println!(
            "session {i}: {} bytes to the server, {} to the client",
            to_server.len(),
            to_client.len()
        );
    }
}
