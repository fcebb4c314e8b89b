//! Test support (feature `test-utils`): the driver's side of a split virtqueue, laid out in any
//! memory the test owns. The backends' unit tests, the fuzz targets and the test frontend all
//! drive their rings with this one [`SplitRing`].
//!
//! Layout (virtio 1.2, 2.7): a 16-byte-aligned descriptor table, the avail ring (flags, idx,
//! ring, used_event), the used ring 4-aligned (flags, idx, ring of (id, len), avail_event).

use std::sync::atomic::{fence, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

/// VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT as descriptor flags.
pub const F_NEXT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
pub const F_WRITE: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
pub const F_INDIRECT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16;
/// VRING_USED_F_NO_NOTIFY.
pub const USED_F_NO_NOTIFY: u16 = virtio_bindings::virtio_ring::VRING_USED_F_NO_NOTIFY as u16;

/// Memory a ring lives in, as the driver writes and reads it.
pub trait RingMemory {
    fn write(&self, addr: u64, data: &[u8]);
    fn read(&self, addr: u64, buf: &mut [u8]);
    /// A 16-bit store the device may read concurrently (release ordering).
    fn store_u16(&self, addr: u64, v: u16);
    /// A 16-bit load of what the device may write concurrently (acquire ordering).
    fn load_u16(&self, addr: u64) -> u16;
}

impl<B: vm_memory::bitmap::Bitmap + 'static> RingMemory for vm_memory::GuestMemoryMmap<B> {
    fn write(&self, addr: u64, data: &[u8]) {
        self.write_slice(data, GuestAddress(addr))
            .expect("ring write inside guest memory");
    }

    fn read(&self, addr: u64, buf: &mut [u8]) {
        self.read_slice(buf, GuestAddress(addr))
            .expect("ring read inside guest memory");
    }

    fn store_u16(&self, addr: u64, v: u16) {
        self.store(v, GuestAddress(addr), Ordering::Release)
            .expect("ring store inside guest memory");
    }

    fn load_u16(&self, addr: u64) -> u16 {
        self.load(GuestAddress(addr), Ordering::Acquire)
            .expect("ring load inside guest memory")
    }
}

impl<T: RingMemory + ?Sized> RingMemory for &T {
    fn write(&self, addr: u64, data: &[u8]) {
        (**self).write(addr, data)
    }
    fn read(&self, addr: u64, buf: &mut [u8]) {
        (**self).read(addr, buf)
    }
    fn store_u16(&self, addr: u64, v: u16) {
        (**self).store_u16(addr, v)
    }
    fn load_u16(&self, addr: u64) -> u16 {
        (**self).load_u16(addr)
    }
}

impl<T: RingMemory + ?Sized> RingMemory for std::sync::Arc<T> {
    fn write(&self, addr: u64, data: &[u8]) {
        (**self).write(addr, data)
    }
    fn read(&self, addr: u64, buf: &mut [u8]) {
        (**self).read(addr, buf)
    }
    fn store_u16(&self, addr: u64, v: u16) {
        (**self).store_u16(addr, v)
    }
    fn load_u16(&self, addr: u64) -> u16 {
        (**self).load_u16(addr)
    }
}

/// A descriptor as written to a table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

/// Where a ring's three parts are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

impl Layout {
    /// The three parts one after another from `base` (16-aligned), each aligned as the spec
    /// asks.
    pub fn packed(base: u64, size: u16) -> Self {
        let n = u64::from(size);
        let desc = base.next_multiple_of(16);
        let avail = desc + 16 * n;
        let used = (avail + 6 + 2 * n).next_multiple_of(4);
        Layout { desc, avail, used }
    }

    /// Bytes from `desc` to the end of the used ring (for `packed` layouts).
    pub fn len(&self, size: u16) -> u64 {
        self.used + 6 + 8 * u64::from(size) - self.desc
    }
}

/// The device's view of a ring of `size` entries at `at`: a ready virtio-queue `Queue`,
/// whatever the memory holds (fuzz targets fill it from their input).
pub fn device_queue(size: u16, at: Layout, event_idx: bool) -> Queue {
    let mut q = Queue::new(size.max(1).next_power_of_two()).expect("queue size");
    q.set_size(size);
    q.try_set_desc_table_address(GuestAddress(at.desc))
        .expect("desc table address");
    q.try_set_avail_ring_address(GuestAddress(at.avail))
        .expect("avail ring address");
    q.try_set_used_ring_address(GuestAddress(at.used))
        .expect("used ring address");
    q.set_event_idx(event_idx);
    q.set_ready(true);
    q
}

/// The driver's side of one split virtqueue.
pub struct SplitRing<M> {
    mem: M,
    size: u16,
    at: Layout,
    free: Vec<u16>,
    /// Table slots each in-flight head owns (empty: not in flight).
    chains: Vec<Vec<u16>>,
    avail_idx: u16,
    kicked_idx: u16,
    last_used: u16,
    event_idx: bool,
}

impl<M: RingMemory> SplitRing<M> {
    /// A ring of `size` entries at `at` in `mem`, zeroed.
    pub fn new(mem: M, size: u16, at: Layout) -> Self {
        assert!(size.is_power_of_two(), "queue size {size}");
        let n = usize::from(size);
        mem.write(at.desc, &vec![0; 16 * n]);
        mem.write(at.avail, &vec![0; 6 + 2 * n]);
        mem.write(at.used, &vec![0; 6 + 8 * n]);
        SplitRing {
            mem,
            size,
            at,
            free: (0..size).rev().collect(),
            chains: vec![Vec::new(); n],
            avail_idx: 0,
            kicked_idx: 0,
            last_used: 0,
            event_idx: false,
        }
    }

    /// With EVENT_IDX negotiated: `poll_used` writes used_event, `kick_needed` reads
    /// avail_event.
    pub fn with_event_idx(mut self, on: bool) -> Self {
        self.event_idx = on;
        self
    }

    pub fn mem(&self) -> &M {
        &self.mem
    }
    pub fn size(&self) -> u16 {
        self.size
    }
    pub fn layout(&self) -> Layout {
        self.at
    }
    pub fn num_free(&self) -> usize {
        self.free.len()
    }
    /// The table slot the next added chain's head will take.
    pub fn next_free(&self) -> Option<u16> {
        self.free.last().copied()
    }
    /// The next avail index the driver will publish.
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }
    /// The used index up to which the driver has consumed entries.
    pub fn last_used(&self) -> u16 {
        self.last_used
    }

    /// The device's view: a ready virtio-queue `Queue` on this ring.
    pub fn queue(&self) -> Queue {
        device_queue(self.size, self.at, self.event_idx)
    }

    /// Writes descriptor `i` of the table at `table`.
    pub fn write_desc_at(&self, table: u64, i: u16, d: &Desc) {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&d.addr.to_le_bytes());
        b[8..12].copy_from_slice(&d.len.to_le_bytes());
        b[12..14].copy_from_slice(&d.flags.to_le_bytes());
        b[14..16].copy_from_slice(&d.next.to_le_bytes());
        self.mem.write(table + 16 * u64::from(i), &b);
    }

    /// Reads descriptor `i` of the ring's table.
    pub fn read_desc(&self, i: u16) -> Desc {
        let mut b = [0u8; 16];
        self.mem.read(self.at.desc + 16 * u64::from(i), &mut b);
        Desc {
            addr: u64::from_le_bytes(b[..8].try_into().expect("8 bytes")),
            len: u32::from_le_bytes(b[8..12].try_into().expect("4 bytes")),
            flags: u16::from_le_bytes([b[12], b[13]]),
            next: u16::from_le_bytes([b[14], b[15]]),
        }
    }

    /// The descriptors of a chain of `(address, length, device-writable)` buffers, linked in
    /// order (`next` is the position in the chain).
    pub fn chain_descs(bufs: &[(u64, u32, bool)]) -> Vec<Desc> {
        let last = bufs.len().saturating_sub(1);
        bufs.iter()
            .enumerate()
            .map(|(i, &(addr, len, writable))| Desc {
                addr,
                len,
                flags: if writable { F_WRITE } else { 0 } | if i < last { F_NEXT } else { 0 },
                next: if i < last { i as u16 + 1 } else { 0 },
            })
            .collect()
    }

    /// Adds a chain of `(address, length, device-writable)` buffers in free table slots and
    /// publishes it. Panics if fewer descriptors are free than buffers given.
    pub fn add(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
        self.add_raw(&Self::chain_descs(bufs))
    }

    /// Writes `descs` into free table slots exactly as given, except `next`: a value below
    /// `descs.len()` names a position in `descs` and is translated to that descriptor's slot;
    /// larger values are written verbatim. Publishes the first one as head and returns it.
    pub fn add_raw(&mut self, descs: &[Desc]) -> u16 {
        assert!(!descs.is_empty(), "empty chain");
        assert!(descs.len() <= self.free.len(), "virtqueue full");
        let slots: Vec<u16> = (0..descs.len()).map(|_| self.free.pop().unwrap()).collect();
        for (d, &slot) in descs.iter().zip(&slots) {
            let next = slots.get(usize::from(d.next)).copied().unwrap_or(d.next);
            self.write_desc_at(self.at.desc, slot, &Desc { next, ..*d });
        }
        let head = slots[0];
        self.chains[usize::from(head)] = slots;
        self.publish(head);
        head
    }

    /// Puts the buffers in the indirect table at `table` (16-aligned, room for them) behind
    /// one VRING_DESC_F_INDIRECT descriptor and publishes it.
    pub fn add_indirect(&mut self, table: u64, bufs: &[(u64, u32, bool)]) -> u16 {
        assert!(!bufs.is_empty(), "empty indirect chain");
        for (i, d) in Self::chain_descs(bufs).iter().enumerate() {
            self.write_desc_at(table, i as u16, d);
        }
        let d = Desc {
            addr: table,
            len: 16 * bufs.len() as u32,
            flags: F_INDIRECT,
            next: 0,
        };
        self.add_raw(&[d])
    }

    /// Writes a chain of buffers at consecutive table slots from `head` without publishing it
    /// (for tests that choose the heads, and chains the device takes from the table alone).
    pub fn write_chain_at(&mut self, head: u16, bufs: &[(u64, u32, bool)]) {
        let slots: Vec<u16> = (0..bufs.len() as u16).map(|i| head + i).collect();
        self.free.retain(|s| !slots.contains(s));
        for (i, d) in Self::chain_descs(bufs).iter().enumerate() {
            let next = if d.flags & F_NEXT != 0 {
                head + d.next
            } else {
                0
            };
            self.write_desc_at(self.at.desc, head + i as u16, &Desc { next, ..*d });
        }
        self.chains[usize::from(head)] = slots;
    }

    /// Puts `head` (any value, for negative tests too) into the avail ring and publishes it.
    pub fn publish(&mut self, head: u16) {
        let slot = self.at.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        self.mem.write(slot, &head.to_le_bytes());
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // The ring entry and the descriptors must be visible before the new index.
        fence(Ordering::Release);
        self.mem.store_u16(self.at.avail + 2, self.avail_idx);
    }

    /// Writes the avail index as given (for broken-ring tests).
    pub fn set_avail_idx(&mut self, idx: u16) {
        self.avail_idx = idx;
        self.mem.store_u16(self.at.avail + 2, idx);
    }

    /// Whether the device wants a kick for what was published since the last call
    /// (avail_event with EVENT_IDX, else the used ring's NO_NOTIFY flag).
    pub fn kick_needed(&mut self) -> bool {
        fence(Ordering::SeqCst);
        let (old, new) = (self.kicked_idx, self.avail_idx);
        self.kicked_idx = new;
        if self.event_idx {
            let event = self
                .mem
                .load_u16(self.at.used + 4 + 8 * u64::from(self.size));
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            self.mem.load_u16(self.at.used) & USED_F_NO_NOTIFY == 0
        }
    }

    /// Marks everything published so far as kicked.
    pub fn kicked(&mut self) {
        self.kicked_idx = self.avail_idx;
    }

    /// The device's used index.
    pub fn used_idx(&self) -> u16 {
        self.mem.load_u16(self.at.used + 2)
    }

    /// Used entry number `i` (an index into the used ring, wrapped by the queue size).
    pub fn used_entry(&self, i: u16) -> (u32, u32) {
        let at = self.at.used + 4 + 8 * u64::from(i % self.size);
        let mut b = [0u8; 8];
        self.mem.read(at, &mut b);
        (
            u32::from_le_bytes(b[..4].try_into().expect("4 bytes")),
            u32::from_le_bytes(b[4..].try_into().expect("4 bytes")),
        )
    }

    /// Takes the next used entry, if any, and frees its chain's descriptors. With EVENT_IDX,
    /// writes used_event so the device notifies on the next entry. An id that is not in flight
    /// (a raw `publish`) is returned as is; one outside the ring panics.
    pub fn poll_used(&mut self) -> Option<(u16, u32)> {
        if self.used_idx() == self.last_used {
            return None;
        }
        let (id, len) = self.used_entry(self.last_used);
        self.last_used = self.last_used.wrapping_add(1);
        if self.event_idx {
            let at = self.at.avail + 4 + 2 * u64::from(self.size);
            self.mem.store_u16(at, self.last_used);
        }
        assert!(id < u32::from(self.size), "device returned used id {id}");
        let chain = std::mem::take(&mut self.chains[id as usize]);
        self.free.extend(chain.into_iter().rev());
        Some((id as u16, len))
    }

    /// Every used entry published since the last call, `(head, len)`.
    pub fn take_used(&mut self) -> Vec<(u32, u32)> {
        std::iter::from_fn(|| self.poll_used())
            .map(|(id, len)| (u32::from(id), len))
            .collect()
    }
}

/// Serves one frontend already connected on `stream` with a device's connection, as a worker
/// does but in this process and without a listener or signal handling, until the stream ends:
/// the fuzz targets drive a device's whole vhost-user handling (relay, hook, library, backend)
/// this way.
pub fn serve_stream<B>(
    name: &str,
    conn: crate::launch::Connection<B>,
    mem: crate::launch::GuestMemHandle,
    stream: std::os::unix::net::UnixStream,
) -> Result<(), crate::connection::ConnectionError>
where
    B: vhost_user_backend::VhostUserBackend<
            Bitmap = crate::dirty::DirtyLog,
            Vring = crate::launch::GuestVring,
        > + Clone
        + 'static,
{
    use crate::connection::ConnectionError;
    let relay = crate::relay::Relay::new().map_err(ConnectionError::Relay)?;
    let mut daemon = vhost_user_backend::VhostUserDaemon::new(name.to_owned(), conn.backend, mem)
        .map_err(ConnectionError::Daemon)?;
    for w in &conn.watch {
        if let Some(h) = daemon.get_epoll_handlers().get(w.thread) {
            h.register_listener(w.fd, w.events, w.id)
                .map_err(ConnectionError::Watch)?;
        }
    }
    let mut library_side = relay
        .start(stream, conn.hook)
        .map_err(ConnectionError::Relay)?;
    daemon
        .start(&mut library_side)
        .map_err(ConnectionError::Daemon)?;
    drop(library_side);
    let r = daemon.wait().map_err(ConnectionError::Daemon);
    drop(daemon);
    if let Some(f) = conn.finished {
        f();
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launch::GuestMem;
    use virtio_queue::QueueOwnedT;

    #[test]
    fn a_chain_added_is_popped_by_virtio_queue_and_comes_back_used() {
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut ring = SplitRing::new(&mem, 8, Layout::packed(0x1000, 8));
        let head = ring.add(&[(0x8000, 16, false), (0x9000, 512, true)]);
        let mut q = ring.queue();
        let chain = q.iter(&mem).unwrap().next().expect("one chain");
        assert_eq!(chain.head_index(), head);
        let d: Vec<_> = chain.collect();
        assert_eq!(d.len(), 2);
        assert!(d[1].is_write_only() && d[1].len() == 512);
        q.add_used(&mem, head, 512).unwrap();
        assert_eq!(ring.take_used(), vec![(u32::from(head), 512)]);
        assert_eq!(ring.num_free(), 8);
    }
}
