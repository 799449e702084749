//! QMP from the first byte: the JSON lexer and parser (QEMU's grammar,
//! single quotes, limits), the session (negotiation, `id`, OOB) and the
//! dispatch of every command the appliance registers to the block layer
//! (on a simulated platform), fed in pieces. The first byte picks the piece
//! size and whether capabilities are negotiated first.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&first, input)) = data.split_first() else {
        return;
    };
    let mut m = fuzz::Monitor::new(vec![0; 1 << 20]);
    if first & 1 == 1 {
        let _ = m.feed(b"{\"execute\": \"qmp_capabilities\"}\n");
    }
    let piece = usize::from(first >> 1) + 1;
    for chunk in input.chunks(piece) {
        if m.feed(chunk) {
            break;
        }
    }
});
