//! virtio-blk requests built by hand on a test frontend's queue (`frontend::Virtqueue`), for
//! tests that send what a driver would not: whatever chain the test gives, unchecked.

use std::time::Duration;

use crate::frontend::Virtqueue;

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_GET_ID: u32 = 8;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const F_SIZE_MAX: u64 = 1 << 1;
pub const F_SEG_MAX: u64 = 1 << 2;
pub const F_BLK_SIZE: u64 = 1 << 6;
pub const F_TOPOLOGY: u64 = 1 << 10;
pub const F_CONFIG_WCE: u64 = 1 << 11;
pub const F_DISCARD: u64 = 1 << 13;
pub const F_WRITE_ZEROES: u64 = 1 << 14;
/// What the status byte holds until the device writes it.
pub const UNTOUCHED: u8 = 0xee;

/// Adds one request: a 16-byte header of `ty` at `sector`, the buffers `bufs` (address,
/// length, device-writable) and a 1-byte status initialised to [`UNTOUCHED`]. Returns the
/// head and the status byte's address; not kicked.
pub fn add(q: &mut Virtqueue, ty: u32, sector: u64, bufs: &[(u64, u32, bool)]) -> (u16, u64) {
    let mem = q.mem().clone();
    let hdr = mem.alloc(16, 16);
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&ty.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write(hdr, &h);
    let st = mem.alloc(1, 1);
    mem.write(st, &[UNTOUCHED]);
    let mut chain = vec![(hdr, 16, false)];
    chain.extend_from_slice(bufs);
    chain.push((st, 1, true));
    (q.add(&chain), st)
}

/// Adds one request (see [`add`]), kicks, waits for it and returns its status and used length.
/// Panics if another head completes or nothing does within 20 s.
pub fn run(q: &mut Virtqueue, ty: u32, sector: u64, bufs: &[(u64, u32, bool)]) -> (u8, u32) {
    let (head, st) = add(q, ty, sector, bufs);
    q.kick();
    let (id, len) = q.wait_used(Duration::from_secs(20)).expect("no completion");
    assert_eq!(id, head, "another request completed");
    (q.mem().read_vec(st, 1)[0], len)
}

/// A discard or write-zeroes payload of one segment, as a device-readable buffer.
pub fn segment(q: &Virtqueue, sector: u64, sectors: u32, flags: u32) -> (u64, u32, bool) {
    let s = q.mem().alloc(16, 16);
    let mut b = [0u8; 16];
    b[0..8].copy_from_slice(&sector.to_le_bytes());
    b[8..12].copy_from_slice(&sectors.to_le_bytes());
    b[12..16].copy_from_slice(&flags.to_le_bytes());
    q.mem().write(s, &b);
    (s, 16, false)
}
