//! The NBD server engine from the first byte: magic, flags, options
//! (`block::nbd::Connection`), fed the input in pieces whose sizes the
//! input's first byte picks. Seeds: `fuzz/corpus/nbd_handshake/`.
#![no_main]
use fuzz::{Answer, drive_server};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, input)) = data.split_first() else {
        return;
    };
    let piece = usize::from(split) + 1;
    drive_server(input, |_| piece, |_| Answer::Good);
});
