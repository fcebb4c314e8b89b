//! The virtio-net header: parsing, the checks a TX header must pass for the negotiated
//! features, and the RX fix-up for the guest's features.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vhostbox_net::hdr::{check_tx, fix_rx, NetHdr};

fuzz_target!(|data: &[u8]| {
    if data.len() < 22 {
        return;
    }
    let features = u64::from_le_bytes(data[0..8].try_into().unwrap());
    let frame_len = usize::from(u16::from_le_bytes([data[8], data[9]]));
    let h = NetHdr::parse(&data[10..22]);
    let _ = check_tx(&h, features, frame_len);
    let mut rx = data[10..22].to_vec();
    let _ = fix_rx(&mut rx, features);
});
