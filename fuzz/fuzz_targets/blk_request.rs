//! virtio-blk request parsing (request::parse and the discard/write-zeroes segments) from
//! descriptors the input makes up, over guest memory the input fills.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vhostbox_blk::request::{self, Desc, Limits};
use vhostbox_fuzz::memory;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let n = usize::from(data[0] % 9);
    let need = 1 + n * 7;
    if data.len() < need {
        return;
    }
    let descs: Vec<Desc> = (0..n)
        .map(|i| {
            let b = &data[1 + i * 7..1 + (i + 1) * 7];
            Desc {
                // Addresses in or near the 64 KiB of memory, lengths up to 64 KiB or huge.
                addr: u64::from(u32::from_le_bytes([b[0], b[1], b[2], 0])),
                len: if b[5] & 0x40 != 0 {
                    u32::from_le_bytes([b[3], b[4], b[5], b[6]])
                } else {
                    u32::from(u16::from_le_bytes([b[3], b[4]]))
                },
                write: b[6] & 1 != 0,
            }
        })
        .collect();
    let mem = memory(&data[need..]);
    let limits = Limits {
        capacity_sectors: 2048,
        max_segments: 1024,
        max_segment_bytes: 1 << 20,
    };
    if let Ok(req) = request::parse(&mem, &descs, &limits, Vec::new()) {
        // Whatever parses must stay within the device and the chain.
        let total: u64 = descs.iter().map(|d| u64::from(d.len)).sum();
        assert!(req.data_len <= total);
        if let Ok(segs) = request::read_discard_segments(&mem, &req, 32) {
            assert!(segs.len() <= 32);
        }
    }
});
