//! vhostbox-net's datapath on rings the input fills: TX chains gathered and written to a fake
//! tap (which checks every byte it is handed is readable), and RX frames from the input
//! written into guest buffers, with the feature set (offloads, MRG_RXBUF, header size) taken
//! from the input too.
#![no_main]

use std::io;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use vhostbox_fuzz::{memory, queue, queue_size};
use vhostbox_net::datapath::{NetStats, QueuePair, TapIo};

struct FakeTap {
    frames: Vec<Vec<u8>>,
    full_after: usize,
    written: usize,
}

impl TapIo for FakeTap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(f) = self.frames.pop() else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        let n = f.len().min(buf.len());
        buf[..n].copy_from_slice(&f[..n]);
        Ok(n)
    }

    unsafe fn write_frame(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        if self.written >= self.full_after {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.written += 1;
        let mut sum = 0u8;
        let mut n = 0;
        for v in iov {
            // SAFETY: the datapath promises every iovec is readable for its length; reading
            // it all is what this target checks (a wild pointer crashes here).
            let s = unsafe { std::slice::from_raw_parts(v.iov_base.cast::<u8>(), v.iov_len) };
            sum = s.iter().fold(sum, |a, b| a.wrapping_add(*b));
            n += v.iov_len;
        }
        std::hint::black_box(sum);
        Ok(n)
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 16 {
        return;
    }
    let features = u64::from_le_bytes(data[0..8].try_into().unwrap());
    let qs = queue_size(data[8]);
    let event_idx = data[9] & 1 != 0;
    let rx_side = data[9] & 2 != 0;
    // Frames for RX: up to 4, sized by the input, cut from the input.
    let mut frames = Vec::new();
    for k in 0..usize::from(data[10] % 5) {
        let len = usize::from(u16::from_le_bytes([data[11], data[12]])) >> k;
        frames.push(data.iter().cycle().skip(k).take(len).copied().collect());
    }
    let tap = FakeTap {
        frames,
        full_after: usize::from(data[13]),
        written: 0,
    };
    let mut w = QueuePair::new(
        tap,
        vhostbox_common::metrics::QueueStats::Own(Arc::new(NetStats::default())),
    );
    w.set_features(features);
    let mut q = queue(qs, event_idx);
    let mem = memory(&data[16..]);
    for _ in 0..3 {
        let r = if rx_side {
            w.process_rx(&mut q, &mem)
        } else {
            w.process_tx(&mut q, &mem)
        };
        if r.is_err() {
            break;
        }
        w.tap_writable();
        w.tap_readable();
    }
});
