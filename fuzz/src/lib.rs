//! What the fuzz targets share: guest memory filled from the input and a split virtqueue laid
//! out in it, so the input decides every descriptor, ring entry and buffer byte; and a
//! vhost-user message stream built from the input.

use std::io::Write;
use std::os::unix::net::UnixStream;

use vhostbox_common::test_utils::{device_queue, Layout};
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};

/// Guest memory size: small, so that random addresses often land inside it.
pub const MEM: usize = 0x10000;
/// The avail ring first and the descriptor table right after it, so that short inputs already
/// fill both; the used ring (written by the device) further up. Not at address 0: virtio-queue
/// treats an avail ring there as "not ready" and pops nothing.
pub const AVAIL_RING: u64 = 0x10;
pub const DESC_TABLE: u64 = 0x400;
pub const USED_RING: u64 = 0x8000;

pub type Mem = vhostbox_common::launch::GuestMem;

/// 64 KiB of guest memory holding `data` from address 0 (the rest zero).
pub fn memory(data: &[u8]) -> Mem {
    let m = Mem::from_ranges(&[(GuestAddress(0), MEM)]).expect("guest memory");
    let n = data.len().min(MEM);
    m.write_slice(&data[..n], GuestAddress(0)).unwrap();
    m
}

/// A ready queue of `size` (a power of two up to 256) with its rings at the fixed addresses:
/// the descriptors and the avail ring come from the input.
pub fn queue(size: u16, event_idx: bool) -> Queue {
    let at = Layout {
        desc: DESC_TABLE,
        avail: AVAIL_RING,
        used: USED_RING,
    };
    device_queue(size, at, event_idx)
}

/// Queue sizes the targets pick from.
pub fn queue_size(b: u8) -> u16 {
    [1u16, 2, 4, 16, 64, 256][usize::from(b) % 6]
}

/// Writes `data` to `s` as a stream of vhost-user messages: each is
/// `[request u8][flags u8][size u8][payload...]` in the input, sent with a valid header
/// (version 1, NEED_REPLY if asked for) so the fuzzer spends its time on the handlers rather
/// than on framing; a size beyond the input's end sends what is left, as a truncated message.
pub fn send_messages(mut s: &UnixStream, data: &[u8]) {
    // One write for the whole stream: written message by message, thousands of tiny messages
    // would fill the socket's buffer (it counts per write) before the device reads any.
    let mut out = Vec::with_capacity(data.len() * 4 + 64);
    let mut i = 0;
    while i + 3 <= data.len() {
        let (req, flags, size) = (data[i], data[i + 1], usize::from(data[i + 2]));
        i += 3;
        let end = (i + size).min(data.len());
        let payload = &data[i..end];
        i = end;
        let mut hdr = Vec::with_capacity(12 + payload.len());
        hdr.extend_from_slice(&u32::from(req % 48).to_le_bytes());
        hdr.extend_from_slice(&(0x1 | u32::from(flags & 0x8)).to_le_bytes());
        hdr.extend_from_slice(&(size as u32).to_le_bytes());
        hdr.extend_from_slice(payload);
        out.extend_from_slice(&hdr);
    }
    let _ = s.write_all(&out);
}

/// Reads and discards what the device answers on `s` until it closes, on a thread: replies
/// left unread would fill the socket and stall the device (the fuzz target would then report
/// a hang that is its own).
pub fn drain_replies(s: &UnixStream) -> std::thread::JoinHandle<()> {
    let mut r = s.try_clone().expect("dup the socket");
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while matches!(std::io::Read::read(&mut r, &mut buf), Ok(n) if n > 0) {}
    })
}

/// One fuzz input as one vhost-user connection: the messages go in on one end of a socket
/// pair, `serve` serves the other end until the stream ends, and the answers are drained.
pub fn serve_input(data: &[u8], serve: impl FnOnce(UnixStream)) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let replies = drain_replies(&ours);
    send_messages(&ours, data);
    let _ = ours.shutdown(std::net::Shutdown::Write);
    serve(theirs);
    drop(ours);
    let _ = replies.join();
}
