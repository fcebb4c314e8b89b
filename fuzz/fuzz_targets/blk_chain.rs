//! Descriptor-chain reading (request::read_chain over a HeadChain) in guest memory the input
//! fills: loops, out-of-range indices, nested and malformed indirect tables, chains over 4 GiB.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vhostbox_blk::request::{read_chain, HeadChain, MAX_CHAIN};
use vhostbox_fuzz::{memory, queue_size};
use vm_memory::GuestAddress;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let qs = queue_size(data[0]);
    let head = u16::from_le_bytes([data[1], data[2]]);
    // Mostly the table inside memory; sometimes anywhere.
    let table = if data[3] & 0x80 != 0 {
        u64::from_le_bytes([data[3], data[4], data[5], data[6], data[7], 0, 0, 0])
    } else {
        u64::from(data[4]) * 16
    };
    let mem = memory(&data[8..]);
    let mut out = Vec::new();
    let r = read_chain(
        HeadChain::new(&mem, GuestAddress(table), qs, head),
        &mut out,
    );
    // A chain never has more descriptors than the bound.
    assert!(out.len() <= MAX_CHAIN);
    if r.is_ok() {
        assert!(!out.is_empty());
    }
});
