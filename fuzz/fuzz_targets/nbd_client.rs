//! The NBD client engine (`block::nbd::client::Client`) against a hostile
//! server: the input is everything the server sends (handshake replies,
//! option replies, simple, structured and extended replies), in pieces the
//! first byte sizes. Once the client is ready it submits one request of
//! each kind; every request must complete (with data or an error) by the
//! time the connection is closed.
#![no_main]
use block::nbd::client::{Client, ClientOp, ClientState};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&first, input)) = data.split_first() else {
        return;
    };
    let mut client = Client::new("disk", first & 1 == 1);
    let piece = usize::from(first >> 1) + 1;
    let mut submitted = 0;
    let mut completed = 0;
    let ops = [
        ClientOp::Read {
            offset: 0,
            len: 4096,
        },
        ClientOp::Write {
            offset: 4096,
            data: vec![0x5a; 512],
            fua: true,
        },
        ClientOp::BlockStatus {
            offset: 0,
            len: 1 << 20,
        },
        ClientOp::Flush,
        ClientOp::Trim {
            offset: 0,
            len: 512,
            fua: false,
        },
        ClientOp::WriteZeroes {
            offset: 8192,
            len: 4096,
            fua: false,
            may_unmap: true,
            fast: true,
        },
        ClientOp::Cache {
            offset: 0,
            len: 512,
        },
    ];
    for chunk in input.chunks(piece) {
        if matches!(client.state(), ClientState::Ready)
            && submitted < ops.len()
            && client.submit(ops[submitted].clone()).is_ok()
        {
            submitted += 1;
        }
        let n = client.output().len();
        client.consume_output(n);
        client.receive(chunk);
        while client.next_completion().is_some() {
            completed += 1;
        }
    }
    client.closed();
    while client.next_completion().is_some() {
        completed += 1;
    }
    assert_eq!(client.in_flight(), 0, "closing completes every request");
    assert_eq!(completed, submitted, "each request completes once");
});
