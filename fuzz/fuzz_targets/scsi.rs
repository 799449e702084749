//! What a virtio-scsi device answers, parsed by `drivers::virtio::scsi`:
//! the command response (`virtio_scsi_cmd_resp`) and its sense data (fixed
//! and descriptor format), INQUIRY (standard and the VPD pages: supported
//! pages, serial, block limits, provisioning), READ CAPACITY (16), REPORT
//! LUNS, MODE SENSE's write-protect bit, and event-queue entries. The first
//! byte picks the parser; the rest is the device's bytes.
#![no_main]
use drivers::virtio::scsi::{events, inquiry, sense, wire};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, d)) = data.split_first() else {
        return;
    };
    match which % 10 {
        0 => {
            let r = wire::parse_response(d);
            if let Some(s) = sense::parse(r.sense) {
                let _ = (s.is_unit_attention(), s.errno());
            }
        }
        1 => {
            if let Some(s) = sense::parse(d) {
                let _ = (s.is_unit_attention(), s.errno());
            }
        }
        2 => drop(inquiry::parse_inquiry(d)),
        3 => drop(inquiry::parse_supported_pages(d)),
        4 => drop(inquiry::parse_serial(d)),
        5 => drop(inquiry::parse_block_limits(d)),
        6 => drop(inquiry::parse_provisioning(d)),
        7 => drop(inquiry::parse_capacity_16(d)),
        8 => drop(inquiry::parse_report_luns(d)),
        _ => {
            let _ = inquiry::parse_write_protect(d);
            if let Some(b) = d.first_chunk::<16>() {
                let _ = events::parse(b);
            }
        }
    }
});
