//! One queue pair's datapath: frames between the guest's RX/TX virtqueues and a tap queue.
//!
//! Free of vhost-user types: unit tests drive it with mock virtqueues and a fake tap.
//!
//! RX (tap to guest): a frame is read from the tap into a bounce buffer, then copied into as
//! many guest buffers as it needs (one chain without MRG_RXBUF; with it, as many as needed,
//! `num_buffers` set). Buffers are taken from the ring only once enough of them are there, so a
//! frame is never half-written into guest memory: when the ring runs dry the frame waits in the
//! bounce buffer, the queue's notifications are re-enabled and the next RX kick resumes. A frame
//! that no buffer the guest could offer would hold is dropped and counted. The tap is polled
//! edge-triggered: while a frame waits, the tap is not read, and nothing spins.
//!
//! TX (guest to tap): a chain is checked (device-readable only, inside guest memory, at most
//! one header plus [`MAX_FRAME_LEN`] bytes, a header that uses only negotiated offloads) and
//! written to the tap straight from guest memory with one writev. A chain that fails a check is
//! dropped, counted, and returned to the guest. When the tap is full (EAGAIN) the chain is put
//! back and TX waits for the tap to become writable.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use log::debug;
use vhostbox_common::metrics::{self, Counters, QueueStats};
use vhostbox_common::ring;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::hdr::{self, check_tx, fix_rx, NetHdr, ETH_HLEN, MAX_FRAME_LEN, NUM_BUFFERS_OFFSET};

pub use vhostbox_common::launch::GuestMem;

/// Frames handled per direction before a pass yields to other events.
pub const BUDGET: usize = 256;
/// The bounce buffer: the largest frame a tap can produce, with slack.
pub const RX_BUF_LEN: usize = 128 << 10;
/// The most segments one TX frame may have (UIO_MAXIOV).
const MAX_IOV: usize = 1024;

/// What the datapath needs from a tap queue.
pub trait TapIo {
    /// Reads one frame (virtio-net header included). `WouldBlock` when there is none.
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize>;

    /// Writes one frame (virtio-net header included) gathered from `iov`. `WouldBlock` when the
    /// tap cannot take it now.
    ///
    /// # Safety
    /// Every iovec must point to memory valid for reads of its length.
    unsafe fn write_frame(&mut self, iov: &[libc::iovec]) -> io::Result<usize>;
}

/// A queue pair's counters, logged (summed over the pairs) when a frontend disconnects and, in
/// the supervisor's metrics page, served by `--metrics` (see [`crate::stats`]).
#[derive(Debug, Default)]
#[repr(C)]
pub struct NetStats {
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// Frames no guest buffer could hold (too big without MRG_RXBUF, or bigger than the ring).
    pub rx_too_big: AtomicU64,
    /// Frames with an offload the guest did not negotiate.
    pub rx_bad_offload: AtomicU64,
    /// RX chains with a device-readable or out-of-memory descriptor, returned unused.
    pub rx_bad_chains: AtomicU64,
    /// Times a frame waited for the guest to add RX buffers.
    pub rx_waits: AtomicU64,
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// TX chains dropped as malformed (writable descriptor, outside memory, too short).
    pub tx_malformed: AtomicU64,
    /// TX frames longer than a header plus MAX_FRAME_LEN.
    pub tx_oversize: AtomicU64,
    /// TX frames whose header asks for something not negotiated.
    pub tx_bad_header: AtomicU64,
    /// TX frames the tap refused.
    pub tx_tap_errors: AtomicU64,
    /// Times TX waited for the tap to become writable.
    pub tx_waits: AtomicU64,
}

// SAFETY: repr(C), AtomicU64s only, all-zero valid.
unsafe impl Counters for NetStats {}

impl NetStats {
    fn inc(c: &AtomicU64) {
        metrics::inc(c);
    }

    /// Counters holding `values` (in layout order).
    pub fn from_values(values: &[u64]) -> Self {
        let s = NetStats::default();
        for (w, v) in s.words().iter().zip(values) {
            w.store(*v, Ordering::Relaxed);
        }
        s
    }

    /// One line for the log.
    pub fn summary(&self) -> String {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "rx {} frames {} bytes (dropped: {} too big, {} bad offload; {} bad chains; {} waits for buffers), \
             tx {} frames {} bytes (dropped: {} malformed, {} oversize, {} bad header, {} refused by tap; {} waits for tap)",
            g(&self.rx_frames),
            g(&self.rx_bytes),
            g(&self.rx_too_big),
            g(&self.rx_bad_offload),
            g(&self.rx_bad_chains),
            g(&self.rx_waits),
            g(&self.tx_frames),
            g(&self.tx_bytes),
            g(&self.tx_malformed),
            g(&self.tx_oversize),
            g(&self.tx_bad_header),
            g(&self.tx_tap_errors),
            g(&self.tx_waits),
        )
    }
}

/// Why a TX chain is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TxDrop {
    Malformed(&'static str),
    Oversize,
    Header(hdr::HdrError),
}

/// One chain taken for the frame being delivered: its head and its slice of `segs`.
#[derive(Debug, Clone, Copy)]
struct RxChain {
    head: u16,
    start: usize,
    end: usize,
}

enum Delivery {
    Delivered,
    /// Not enough buffers yet (this many were there); the frame waits.
    NoRoom(u16),
    /// No buffer the guest could offer holds it.
    TooBig,
}

/// The datapath of one queue pair.
pub struct QueuePair<T: TapIo> {
    tap: T,
    features: u64,
    hdr_len: usize,
    mrg: bool,
    rx_buf: Vec<u8>,
    /// Length of the frame waiting in `rx_buf` (0: none).
    rx_len: usize,
    tap_readable: bool,
    tap_writable: bool,
    rx_more: bool,
    tx_more: bool,
    /// Whether RX chains were returned (used entries added) outside a delivery.
    rx_used: bool,
    iov: Vec<libc::iovec>,
    chains: Vec<RxChain>,
    segs: Vec<(GuestAddress, usize)>,
    stats: QueueStats<NetStats>,
}

// SAFETY: the iovecs are scratch space, only valid during one TX call and never shared; the rest
// is plain data plus the tap, which is Send.
unsafe impl<T: TapIo + Send> Send for QueuePair<T> {}

impl<T: TapIo> QueuePair<T> {
    pub fn new(tap: T, stats: QueueStats<NetStats>) -> Self {
        Self {
            tap,
            features: 0,
            hdr_len: hdr::HDR_LEN_LEGACY,
            mrg: false,
            rx_buf: vec![0; RX_BUF_LEN],
            rx_len: 0,
            // Until the tap says otherwise: frames may already be queued.
            tap_readable: true,
            tap_writable: true,
            rx_more: false,
            tx_more: false,
            rx_used: false,
            iov: Vec::new(),
            chains: Vec::new(),
            segs: Vec::new(),
            stats,
        }
    }

    /// The features the driver acknowledged: header length, MRG_RXBUF, allowed offloads.
    pub fn set_features(&mut self, features: u64) {
        self.features = features;
        self.hdr_len = hdr::hdr_len(features);
        self.mrg = features & (1 << virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF) != 0;
    }

    pub fn tap_mut(&mut self) -> &mut T {
        &mut self.tap
    }

    /// The tap reported readable (edge): read it on the next RX pass.
    pub fn tap_readable(&mut self) {
        self.tap_readable = true;
    }

    /// The tap reported writable (edge): TX may resume.
    pub fn tap_writable(&mut self) {
        self.tap_writable = true;
    }

    /// Whether RX stopped at its budget with work left. Clears the flag.
    pub fn take_rx_more(&mut self) -> bool {
        std::mem::take(&mut self.rx_more)
    }

    /// Whether TX stopped at its budget with work left. Clears the flag.
    pub fn take_tx_more(&mut self) -> bool {
        std::mem::take(&mut self.tx_more)
    }

    /// Whether a frame is waiting for RX buffers.
    pub fn rx_pending(&self) -> bool {
        self.rx_len > 0
    }

    /// Moves frames from the tap to the RX queue. Returns whether used entries were added.
    pub fn process_rx(&mut self, queue: &mut Queue, mem: &GuestMem) -> io::Result<bool> {
        let mut used = false;
        let mut budget = BUDGET;
        let mut notifications_off = false;
        // "More arrived" after a look is a race: look again. A look that finds no buffer
        // beyond the ones the last look saw means the ring is broken (see process_tx), and the
        // pass ends.
        let mut retried: Option<u16> = None;
        loop {
            if self.rx_len == 0 {
                if !self.tap_readable {
                    break;
                }
                if budget == 0 {
                    self.rx_more = true;
                    break;
                }
                match self.tap.read_frame(&mut self.rx_buf) {
                    Ok(n) => {
                        budget -= 1;
                        if n < self.hdr_len {
                            continue;
                        }
                        if !fix_rx(&mut self.rx_buf[..self.hdr_len], self.features) {
                            NetStats::inc(&self.stats.rx_bad_offload);
                            continue;
                        }
                        self.rx_len = n;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.tap_readable = false;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        // EBADFD: a detached queue. Wait for the next edge.
                        debug!("tap read: {e}");
                        self.tap_readable = false;
                        break;
                    }
                }
            }
            if !notifications_off {
                queue.disable_notification(mem).map_err(io::Error::other)?;
                notifications_off = true;
            }
            match self.deliver(queue, mem)? {
                Delivery::Delivered => {
                    used = true;
                    self.rx_len = 0;
                    retried = None;
                }
                Delivery::TooBig => {
                    NetStats::inc(&self.stats.rx_too_big);
                    self.rx_len = 0;
                    retried = None;
                }
                Delivery::NoRoom(seen) => {
                    // Ask for a kick when a buffer beyond the `seen` ones comes (with
                    // EVENT_IDX, avail_event is where the next pass must find a new buffer);
                    // if one came meanwhile, go on.
                    let next = queue.next_avail();
                    queue.set_next_avail(next.wrapping_add(seen));
                    let more = queue.enable_notification(mem).map_err(io::Error::other);
                    queue.set_next_avail(next);
                    // Another look is due unless the last one saw no new buffer at all.
                    if more? && retried != Some(seen) && ring::avail_index_ok(queue, mem) {
                        retried = Some(seen);
                        queue.disable_notification(mem).map_err(io::Error::other)?;
                        continue;
                    }
                    NetStats::inc(&self.stats.rx_waits);
                    break;
                }
            }
        }
        Ok(used || std::mem::take(&mut self.rx_used))
    }

    /// Copies the frame in the bounce buffer into guest buffers.
    fn deliver(&mut self, queue: &mut Queue, mem: &GuestMem) -> io::Result<Delivery> {
        let total = self.rx_len;
        let mut rollback = queue.next_avail();
        self.chains.clear();
        self.segs.clear();
        let mut cap = 0usize;
        while cap < total && (self.mrg || self.chains.is_empty()) {
            if self.chains.len() >= usize::from(queue.size()) {
                break;
            }
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let start = self.segs.len();
            let mut ok = true;
            let mut chain_cap = 0usize;
            let mut open_ended = false;
            for d in chain {
                open_ended = d.has_next();
                let len = d.len() as usize;
                if !d.is_write_only() || !mem.check_range(d.addr(), len) {
                    ok = false;
                    break;
                }
                if len > 0 {
                    self.segs.push((d.addr(), len));
                    chain_cap += len;
                }
            }
            if !ok || open_ended || chain_cap == 0 {
                // Return it unused, together with the buffers already taken for this frame:
                // a frame's buffers must be published back to back.
                NetStats::inc(&self.stats.rx_bad_chains);
                for c in self.chains.drain(..) {
                    queue.add_used(mem, c.head, 0).map_err(io::Error::other)?;
                }
                queue.add_used(mem, head, 0).map_err(io::Error::other)?;
                self.rx_used = true;
                self.segs.clear();
                cap = 0;
                rollback = queue.next_avail();
                continue;
            }
            self.chains.push(RxChain {
                head,
                start,
                end: self.segs.len(),
            });
            cap += chain_cap;
        }
        if cap < total {
            queue.set_next_avail(rollback);
            let ring_full = self.chains.len() >= usize::from(queue.size());
            // Without MRG_RXBUF one chain must hold the frame; with it, all of the ring.
            return Ok(if (!self.mrg && !self.chains.is_empty()) || ring_full {
                Delivery::TooBig
            } else {
                Delivery::NoRoom(self.chains.len() as u16)
            });
        }
        self.write_frame(queue, mem)?;
        Ok(Delivery::Delivered)
    }

    /// Writes the frame in the bounce buffer over the chains taken for it (with num_buffers
    /// set) and publishes them.
    fn write_frame(&mut self, queue: &mut Queue, mem: &GuestMem) -> io::Result<()> {
        let total = self.rx_len;
        if self.hdr_len > NUM_BUFFERS_OFFSET {
            let n = self.chains.len() as u16;
            self.rx_buf[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2]
                .copy_from_slice(&n.to_le_bytes());
        }
        let mut off = 0usize;
        for c in &self.chains {
            let mut written = 0usize;
            for &(addr, len) in &self.segs[c.start..c.end] {
                if off == total {
                    break;
                }
                let n = len.min(total - off);
                // Cannot fail: the range was checked above and the memory is held by `mem`.
                mem.write_slice(&self.rx_buf[off..off + n], addr)
                    .map_err(io::Error::other)?;
                off += n;
                written += n;
            }
            queue
                .add_used(mem, c.head, written as u32)
                .map_err(io::Error::other)?;
        }
        NetStats::inc(&self.stats.rx_frames);
        metrics::add(&self.stats.rx_bytes, (total - self.hdr_len) as u64);
        Ok(())
    }

    /// Moves frames from the TX queue to the tap. Returns whether used entries were added.
    pub fn process_tx(&mut self, queue: &mut Queue, mem: &GuestMem) -> io::Result<bool> {
        if !self.tap_writable {
            return Ok(false);
        }
        let mut used = false;
        let mut budget = BUDGET;
        // See process_rx: one more look after "more arrived", not an endless one. virtio-queue
        // pops nothing from a ring it considers broken (an avail index too far ahead, an avail
        // ring at address 0) while re-enabling notifications still reports entries.
        let mut retried = false;
        queue.disable_notification(mem).map_err(io::Error::other)?;
        loop {
            if budget == 0 {
                self.tx_more = true;
                break;
            }
            let rollback = queue.next_avail();
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                if !retried
                    && queue.enable_notification(mem).map_err(io::Error::other)?
                    && ring::avail_index_ok(queue, mem)
                {
                    retried = true;
                    queue.disable_notification(mem).map_err(io::Error::other)?;
                    continue;
                }
                break;
            };
            retried = false;
            budget -= 1;
            let head = chain.head_index();
            match self.gather_tx(chain, mem) {
                Ok(len) => loop {
                    // SAFETY: gather_tx built the iovecs from slices checked to lie in guest
                    // memory, which `mem` keeps mapped for this call.
                    match unsafe { self.tap.write_frame(&self.iov) } {
                        Ok(_) => {
                            NetStats::inc(&self.stats.tx_frames);
                            metrics::add(&self.stats.tx_bytes, (len - self.hdr_len) as u64);
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            queue.set_next_avail(rollback);
                            self.tap_writable = false;
                            NetStats::inc(&self.stats.tx_waits);
                            return Ok(used);
                        }
                        Err(e) => {
                            debug!("tap refused a {len}-byte frame: {e}");
                            NetStats::inc(&self.stats.tx_tap_errors);
                        }
                    }
                    break;
                },
                Err(why) => {
                    debug!("TX chain {head} dropped: {why:?}");
                    NetStats::inc(match why {
                        TxDrop::Malformed(_) => &self.stats.tx_malformed,
                        TxDrop::Oversize => &self.stats.tx_oversize,
                        TxDrop::Header(_) => &self.stats.tx_bad_header,
                    });
                }
            }
            queue.add_used(mem, head, 0).map_err(io::Error::other)?;
            used = true;
        }
        Ok(used)
    }

    /// Checks a TX chain and builds its iovecs; returns its length (header included).
    fn gather_tx(
        &mut self,
        chain: virtio_queue::DescriptorChain<&GuestMem>,
        mem: &GuestMem,
    ) -> Result<usize, TxDrop> {
        self.iov.clear();
        let limit = self.hdr_len + MAX_FRAME_LEN;
        let mut total = 0usize;
        let mut open_ended = false;
        for d in chain {
            // The last descriptor must end the chain: one that still points on was cut short
            // (a loop, a next index beyond the table, an unreadable indirect table).
            open_ended = d.has_next();
            if d.is_write_only() {
                return Err(TxDrop::Malformed(
                    "device-writable descriptor in a TX chain",
                ));
            }
            total += d.len() as usize;
            if total > limit {
                return Err(TxDrop::Oversize);
            }
            for vs in mem.get_slices(d.addr(), d.len() as usize) {
                let vs = vs.map_err(|_| TxDrop::Malformed("buffer outside guest memory"))?;
                self.iov.push(libc::iovec {
                    iov_base: vs.ptr_guard().as_ptr().cast_mut().cast(),
                    iov_len: vs.len(),
                });
            }
            if self.iov.len() > MAX_IOV {
                return Err(TxDrop::Malformed("more than 1024 segments"));
            }
        }
        if open_ended {
            return Err(TxDrop::Malformed(
                "the descriptor chain does not end (a loop or a bad next index)",
            ));
        }
        if total < self.hdr_len + ETH_HLEN {
            return Err(TxDrop::Malformed(
                "shorter than a header and an Ethernet header",
            ));
        }
        let mut h = [0u8; hdr::HDR_LEN_V1];
        let mut got = 0;
        for v in &self.iov {
            let n = v.iov_len.min(self.hdr_len - got);
            // SAFETY: the iovec points into guest memory checked by get_slices and mapped for
            // the duration of this call; `h` has room for hdr_len bytes.
            unsafe {
                std::ptr::copy_nonoverlapping(v.iov_base.cast::<u8>(), h[got..].as_mut_ptr(), n)
            };
            got += n;
            if got == self.hdr_len {
                break;
            }
        }
        let parsed = NetHdr::parse(&h);
        check_tx(&parsed, self.features, total - self.hdr_len).map_err(TxDrop::Header)?;
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hdr::*;
    use std::collections::VecDeque;
    use std::sync::Arc;
    use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
    use virtio_bindings::virtio_net::*;

    const QSIZE: u16 = 64;
    const MEM_SIZE: usize = 32 << 20;
    const BUFS: u64 = 0x10_0000;
    use vhostbox_common::test_utils::{Layout, SplitRing};

    /// A tap that hands out queued frames and records written ones.
    #[derive(Default)]
    struct FakeTap {
        incoming: VecDeque<Vec<u8>>,
        written: Vec<Vec<u8>>,
        reads: usize,
        full: bool,
        refuse: bool,
    }

    impl TapIo for FakeTap {
        fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.reads += 1;
            let f = self
                .incoming
                .pop_front()
                .ok_or_else(|| io::Error::from(io::ErrorKind::WouldBlock))?;
            buf[..f.len()].copy_from_slice(&f);
            Ok(f.len())
        }

        unsafe fn write_frame(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
            if self.full {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            if self.refuse {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
            let mut f = Vec::new();
            for v in iov {
                // SAFETY: the caller guarantees readable iovecs.
                f.extend_from_slice(unsafe {
                    std::slice::from_raw_parts(v.iov_base.cast::<u8>(), v.iov_len)
                });
            }
            self.written.push(f.clone());
            Ok(f.len())
        }
    }

    /// The driver's side of one split virtqueue, and the device's view of it.
    struct Vq {
        ring: SplitRing<Arc<GuestMem>>,
        avail: u64,
        queue: Queue,
    }

    impl Vq {
        fn new(mem: &Arc<GuestMem>, at: u64) -> Vq {
            let ring = SplitRing::new(mem.clone(), QSIZE, Layout::packed(at, QSIZE));
            let queue = ring.queue();
            assert!(queue.is_valid(&**mem));
            Vq {
                avail: ring.layout().avail,
                ring,
                queue,
            }
        }

        /// Publishes a chain of (addr, len, device-writable).
        fn push(&mut self, _mem: &GuestMem, descs: &[(u64, u32, bool)]) -> u16 {
            self.ring.add(descs)
        }

        /// Used entries (head, len) published since the last call.
        fn take_used(&mut self, _mem: &GuestMem) -> Vec<(u32, u32)> {
            self.ring.take_used()
        }
    }

    struct Env {
        mem: Arc<GuestMem>,
        rx: Vq,
        tx: Vq,
        w: QueuePair<FakeTap>,
        stats: QueueStats<NetStats>,
    }

    const V1: u64 = 1 << VIRTIO_F_VERSION_1;
    const MRG: u64 = 1 << VIRTIO_NET_F_MRG_RXBUF;
    const ALL_OFFLOADS: u64 = 1 << VIRTIO_NET_F_CSUM
        | 1 << VIRTIO_NET_F_HOST_TSO4
        | 1 << VIRTIO_NET_F_HOST_TSO6
        | 1 << VIRTIO_NET_F_HOST_ECN
        | 1 << VIRTIO_NET_F_HOST_UFO
        | 1 << VIRTIO_NET_F_GUEST_CSUM
        | 1 << VIRTIO_NET_F_GUEST_TSO4
        | 1 << VIRTIO_NET_F_GUEST_TSO6
        | 1 << VIRTIO_NET_F_GUEST_ECN
        | 1 << VIRTIO_NET_F_GUEST_UFO;

    fn env(features: u64) -> Env {
        let mem = Arc::new(GuestMem::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap());
        let rx = Vq::new(&mem, 0);
        let tx = Vq::new(&mem, 0x8000);
        let stats = QueueStats::Own(Arc::new(NetStats::default()));
        let mut w = QueuePair::new(FakeTap::default(), stats.clone());
        w.set_features(features);
        Env {
            mem,
            rx,
            tx,
            w,
            stats,
        }
    }

    fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    /// Regression (net_queue fuzz target): an avail index more than a queue's worth ahead of
    /// the device made TX and RX spin forever (nothing pops, yet re-enabling notifications
    /// reports new entries). Both now stop; a fixed ring works again.
    #[test]
    fn broken_avail_index_does_not_spin() {
        let mut e = env(V1);
        e.w.tap_mut().incoming.push_back(frame(60, 1));
        for vq in [&e.rx, &e.tx] {
            e.mem
                .write_obj(QSIZE + 10, GuestAddress(vq.avail + 2))
                .unwrap();
        }
        assert!(!e.w.process_tx(&mut e.tx.queue, &e.mem).unwrap());
        assert!(!e.w.process_rx(&mut e.rx.queue, &e.mem).unwrap());
        // The driver repairs its ring (as a reset would): TX works again.
        e.mem.write_obj(0u16, GuestAddress(e.tx.avail + 2)).unwrap();
        e.tx.ring.set_avail_idx(0);
        e.tx.push(&e.mem, &[(BUFS, 12 + 60, false)]);
        e.w.tap_writable();
        assert!(e.w.process_tx(&mut e.tx.queue, &e.mem).unwrap());
        assert_eq!(e.w.tap_mut().written.len(), 1);
    }

    /// Regression (net_queue fuzz target): an avail ring at guest address 0, which
    /// virtio-queue treats as "not ready" and pops nothing from, while its index says there
    /// are entries: TX and RX end their pass instead of spinning.
    #[test]
    fn avail_ring_at_address_zero_does_not_spin() {
        let mut e = env(V1);
        e.w.tap_mut().incoming.push_back(frame(60, 1));
        for q in [&mut e.rx.queue, &mut e.tx.queue] {
            q.try_set_avail_ring_address(GuestAddress(0)).unwrap();
        }
        // Index 3 at address 2 (inside the RX descriptor table, which is at 0 here).
        e.mem.write_obj(3u16, GuestAddress(2)).unwrap();
        assert!(!e.w.process_tx(&mut e.tx.queue, &e.mem).unwrap());
        assert!(!e.w.process_rx(&mut e.rx.queue, &e.mem).unwrap());
    }

    /// An Ethernet frame of `len` bytes with a recognisable pattern.
    fn frame(len: usize, seed: u8) -> Vec<u8> {
        let mut f: Vec<u8> = (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect();
        f[..6].copy_from_slice(&[0xff; 6]);
        if len >= 14 {
            f[12..14].copy_from_slice(&[0x88, 0xb5]);
        }
        f
    }

    fn hdr_bytes(h: &NetHdr, len: usize) -> Vec<u8> {
        let mut b = vec![h.flags, h.gso_type];
        for v in [h.hdr_len, h.gso_size, h.csum_start, h.csum_offset, 0] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.truncate(len);
        b
    }

    /// Lays `bytes` out at `at` and returns descriptors covering them per `split`.
    fn place(mem: &GuestMem, at: u64, bytes: &[u8], split: &[usize]) -> Vec<(u64, u32, bool)> {
        mem.write_slice(bytes, GuestAddress(at)).unwrap();
        let mut v = Vec::new();
        let mut off = 0;
        for &n in split {
            v.push((at + off as u64, n as u32, false));
            off += n;
        }
        if off < bytes.len() {
            v.push((at + off as u64, (bytes.len() - off) as u32, false));
        }
        v
    }

    #[test]
    fn tx_frames_reach_the_tap_byte_exact() {
        for features in [V1, V1 | MRG | ALL_OFFLOADS, 0] {
            let mut e = env(features);
            let hl = hdr_len(features);
            let mut expect = Vec::new();
            for (i, len) in [14usize, 60, 1514, 9014, 65000].into_iter().enumerate() {
                let mut bytes = hdr_bytes(&NetHdr::default(), hl);
                bytes.extend(frame(len, i as u8));
                // Header alone, header with the frame, and the frame in three pieces.
                let split: &[usize] = match i % 3 {
                    0 => &[hl],
                    1 => &[],
                    _ => &[hl + 3, 7],
                };
                let d = place(&e.mem, BUFS + i as u64 * 0x2_0000, &bytes, split);
                e.tx.push(&e.mem, &d);
                expect.push(bytes);
            }
            assert!(e.w.process_tx(&mut e.tx.queue, &e.mem).unwrap());
            assert_eq!(e.w.tap_mut().written, expect, "features {features:#x}");
            let used = e.tx.take_used(&e.mem);
            assert_eq!(used.len(), 5);
            assert!(used.iter().all(|&(_, len)| len == 0));
            assert_eq!(get(&e.stats.tx_frames), 5);
        }
    }

    #[test]
    fn bad_tx_chains_are_dropped_and_counted_and_tx_goes_on() {
        let mut e = env(V1 | (1 << VIRTIO_NET_F_CSUM));
        let good = {
            let mut b = hdr_bytes(&NetHdr::default(), 12);
            b.extend(frame(100, 1));
            b
        };
        let g = place(&e.mem, BUFS, &good, &[]);
        let tso = NetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
        };
        let mut tso_bytes = hdr_bytes(&tso, 12);
        tso_bytes.extend(frame(3000, 2));
        let t = place(&e.mem, BUFS + 0x1_0000, &tso_bytes, &[]);
        let big = vec![0u8; 12 + MAX_FRAME_LEN + 1];
        let b = place(&e.mem, BUFS + 0x4_0000, &big, &[]);
        let chains: Vec<Vec<(u64, u32, bool)>> = vec![
            // A device-writable descriptor in a TX chain.
            vec![g[0], (BUFS + 0x3_0000, 64, true)],
            // Outside guest memory.
            vec![(MEM_SIZE as u64 - 16, 128, false)],
            // Only a header and half an Ethernet header.
            vec![(BUFS, 12 + 7, false)],
            // TSO without HOST_TSO4.
            t,
            // Longer than any frame.
            b,
            g.clone(),
        ];
        for c in &chains {
            e.tx.push(&e.mem, c);
        }
        e.w.process_tx(&mut e.tx.queue, &e.mem).unwrap();
        assert_eq!(e.w.tap_mut().written, vec![good.clone()]);
        assert_eq!(
            e.tx.take_used(&e.mem).len(),
            chains.len(),
            "every chain returned"
        );
        assert_eq!(get(&e.stats.tx_malformed), 3);
        assert_eq!(get(&e.stats.tx_bad_header), 1);
        assert_eq!(get(&e.stats.tx_oversize), 1);
        assert_eq!(get(&e.stats.tx_frames), 1);
        // A frame the tap refuses is dropped too, and the next one goes through.
        e.w.tap_mut().refuse = true;
        e.tx.push(&e.mem, &g);
        e.w.process_tx(&mut e.tx.queue, &e.mem).unwrap();
        e.w.tap_mut().refuse = false;
        e.tx.push(&e.mem, &g);
        e.w.process_tx(&mut e.tx.queue, &e.mem).unwrap();
        assert_eq!(get(&e.stats.tx_tap_errors), 1);
        assert_eq!(e.w.tap_mut().written.len(), 2);
        assert_eq!(e.tx.take_used(&e.mem).len(), 2);
    }

    #[test]
    fn tx_waits_for_a_full_tap_without_losing_the_frame() {
        let mut e = env(V1);
        let mut bytes = hdr_bytes(&NetHdr::default(), 12);
        bytes.extend(frame(200, 3));
        let d = place(&e.mem, BUFS, &bytes, &[]);
        e.tx.push(&e.mem, &d);
        e.w.tap_mut().full = true;
        assert!(!e.w.process_tx(&mut e.tx.queue, &e.mem).unwrap());
        assert!(e.tx.take_used(&e.mem).is_empty());
        assert_eq!(get(&e.stats.tx_waits), 1);
        // A kick while the tap is still full does not spin on it.
        e.w.tap_mut().full = false;
        assert!(!e.w.process_tx(&mut e.tx.queue, &e.mem).unwrap());
        assert!(e.w.tap_mut().written.is_empty());
        // The tap becomes writable: the same frame goes out.
        e.w.tap_writable();
        assert!(e.w.process_tx(&mut e.tx.queue, &e.mem).unwrap());
        assert_eq!(e.w.tap_mut().written, vec![bytes]);
        assert_eq!(e.tx.take_used(&e.mem).len(), 1);
    }

    /// Posts `n` RX buffers of `len` bytes each, at distinct addresses from `at`, filled with
    /// 0xee so unwritten bytes show.
    fn post_rx(e: &mut Env, at: u64, n: usize, len: u32) -> Vec<(u16, u64)> {
        (0..n)
            .map(|i| {
                let addr = at + i as u64 * 0x1_0000;
                e.mem
                    .write_slice(&vec![0xee; len as usize], GuestAddress(addr))
                    .unwrap();
                (e.rx.push(&e.mem, &[(addr, len, true)]), addr)
            })
            .collect()
    }

    fn read(mem: &GuestMem, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    #[test]
    fn rx_without_mrg_one_chain_per_frame() {
        let mut e = env(V1);
        let bufs = post_rx(&mut e, BUFS, 3, 1526);
        let frames: Vec<Vec<u8>> = [60usize, 1514].iter().map(|&l| frame(l, 9)).collect();
        for f in &frames {
            let mut b = hdr_bytes(&NetHdr::default(), 12);
            b.extend(f);
            e.w.tap_mut().incoming.push_back(b);
        }
        // Too big for one 1526-byte buffer: dropped, the buffer stays for the next frame.
        let mut b = hdr_bytes(&NetHdr::default(), 12);
        b.extend(frame(4000, 1));
        e.w.tap_mut().incoming.push_back(b);
        let mut b = hdr_bytes(&NetHdr::default(), 12);
        b.extend(frame(100, 2));
        e.w.tap_mut().incoming.push_back(b);
        assert!(e.w.process_rx(&mut e.rx.queue, &e.mem).unwrap());
        let used = e.rx.take_used(&e.mem);
        assert_eq!(
            used,
            vec![
                (u32::from(bufs[0].0), 72),
                (u32::from(bufs[1].0), 1526),
                (u32::from(bufs[2].0), 112)
            ]
        );
        for (i, f) in frames.iter().enumerate() {
            let got = read(&e.mem, bufs[i].1, 12 + f.len());
            assert_eq!(
                u16::from_le_bytes([got[10], got[11]]),
                1,
                "num_buffers is 1"
            );
            assert_eq!(&got[12..], &f[..]);
        }
        assert_eq!(&read(&e.mem, bufs[2].1, 112)[12..], &frame(100, 2)[..]);
        assert_eq!(get(&e.stats.rx_too_big), 1);
        assert_eq!(get(&e.stats.rx_frames), 3);
    }

    #[test]
    fn rx_with_mrg_spreads_a_frame_over_buffers() {
        let mut e = env(V1 | MRG | ALL_OFFLOADS);
        let bufs = post_rx(&mut e, BUFS, 8, 1536);
        let f = frame(9000, 4);
        let mut b = hdr_bytes(&NetHdr::default(), 12);
        b.extend(&f);
        e.w.tap_mut().incoming.push_back(b);
        assert!(e.w.process_rx(&mut e.rx.queue, &e.mem).unwrap());
        let used = e.rx.take_used(&e.mem);
        // 9012 bytes in 1536-byte buffers: 5 full ones and 1332 bytes.
        assert_eq!(used.len(), 6);
        let mut got = Vec::new();
        for (k, &(head, len)) in used.iter().enumerate() {
            assert_eq!(head, u32::from(bufs[k].0));
            assert_eq!(len, if k < 5 { 1536 } else { 1332 });
            got.extend(read(&e.mem, bufs[k].1, len as usize));
        }
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 6, "num_buffers");
        assert_eq!(&got[12..], &f[..]);
        // The untouched buffers stay untouched.
        assert!(read(&e.mem, bufs[6].1, 1536).iter().all(|&b| b == 0xee));
    }

    #[test]
    fn rx_waits_for_buffers_without_half_writing_or_spinning() {
        let mut e = env(V1 | MRG);
        for seed in 0..3 {
            let mut b = hdr_bytes(&NetHdr::default(), 12);
            b.extend(frame(3000, seed));
            e.w.tap_mut().incoming.push_back(b);
        }
        // No buffers: the first frame waits, the tap is not read further.
        assert!(!e.w.process_rx(&mut e.rx.queue, &e.mem).unwrap());
        assert!(e.w.rx_pending());
        assert_eq!(e.w.tap_mut().reads, 1);
        assert!(!e.w.process_rx(&mut e.rx.queue, &e.mem).unwrap());
        assert_eq!(
            e.w.tap_mut().reads,
            1,
            "no re-reading while the ring is empty"
        );
        // Room for part of the frame only: nothing is written, nothing is used.
        let first = post_rx(&mut e, BUFS, 1, 2048);
        assert!(!e.w.process_rx(&mut e.rx.queue, &e.mem).unwrap());
        assert!(e.rx.take_used(&e.mem).is_empty());
        assert!(read(&e.mem, first[0].1, 2048).iter().all(|&b| b == 0xee));
        assert_eq!(get(&e.stats.rx_waits), 3);
        // Enough room: all three frames arrive, in order.
        post_rx(&mut e, BUFS + 0x10_0000, 5, 2048);
        assert!(e.w.process_rx(&mut e.rx.queue, &e.mem).unwrap());
        let used = e.rx.take_used(&e.mem);
        assert_eq!(used.len(), 6, "three frames of two buffers each");
        assert_eq!(get(&e.stats.rx_frames), 3);
        assert!(!e.w.rx_pending());
    }

    #[test]
    fn a_frame_bigger_than_the_whole_ring_is_dropped() {
        let mut e = env(V1 | MRG);
        // 64 buffers of 64 bytes cannot hold 9000 bytes.
        post_rx(&mut e, BUFS, usize::from(QSIZE), 64);
        let mut b = hdr_bytes(&NetHdr::default(), 12);
        b.extend(frame(9000, 0));
        e.w.tap_mut().incoming.push_back(b);
        let mut b = hdr_bytes(&NetHdr::default(), 12);
        b.extend(frame(100, 0));
        e.w.tap_mut().incoming.push_back(b);
        e.w.process_rx(&mut e.rx.queue, &e.mem).unwrap();
        assert_eq!(get(&e.stats.rx_too_big), 1);
        assert_eq!(get(&e.stats.rx_frames), 1);
        assert_eq!(
            e.rx.take_used(&e.mem).len(),
            2,
            "the small frame took two buffers"
        );
    }

    #[test]
    fn bad_rx_chains_are_returned_empty() {
        for features in [V1, V1 | MRG] {
            let mut e = env(features);
            // Device-readable, then outside memory, then a good one.
            e.rx.push(&e.mem, &[(BUFS, 2048, false)]);
            e.rx.push(&e.mem, &[(MEM_SIZE as u64 - 100, 2048, true)]);
            let good = post_rx(&mut e, BUFS + 0x10_0000, 1, 2048);
            let mut b = hdr_bytes(&NetHdr::default(), 12);
            b.extend(frame(500, 5));
            e.w.tap_mut().incoming.push_back(b.clone());
            assert!(e.w.process_rx(&mut e.rx.queue, &e.mem).unwrap());
            let used = e.rx.take_used(&e.mem);
            assert_eq!(used, vec![(0, 0), (1, 0), (u32::from(good[0].0), 512)]);
            assert_eq!(get(&e.stats.rx_bad_chains), 2);
            assert_eq!(&read(&e.mem, good[0].1, 512)[12..], &b[12..]);
        }
    }

    #[test]
    fn rx_headers_follow_negotiated_offloads() {
        let tso = NetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
        };
        let valid = NetHdr {
            flags: F_DATA_VALID,
            ..NetHdr::default()
        };
        // (features, header from the tap, delivered?, flags the guest sees)
        let csum = 1u64 << VIRTIO_NET_F_GUEST_CSUM;
        let tso4 = csum | 1 << VIRTIO_NET_F_GUEST_TSO4;
        let cases = [
            (V1 | MRG, valid, true, 0),
            (V1 | MRG | csum, valid, true, F_DATA_VALID),
            (V1 | MRG, tso, false, 0),
            (V1 | MRG | csum, tso, false, 0),
            (V1 | MRG | tso4, tso, true, F_NEEDS_CSUM),
        ];
        for (features, h, delivered, flags) in cases {
            let mut e = env(features);
            let bufs = post_rx(&mut e, BUFS, 4, 4096);
            let mut b = hdr_bytes(&h, 12);
            b.extend(frame(3000, 6));
            e.w.tap_mut().incoming.push_back(b.clone());
            e.w.process_rx(&mut e.rx.queue, &e.mem).unwrap();
            let used = e.rx.take_used(&e.mem);
            assert_eq!(!used.is_empty(), delivered, "{features:#x} {h:?}");
            if delivered {
                let got = read(&e.mem, bufs[0].1, 12);
                assert_eq!(got[0], flags);
                assert_eq!(NetHdr::parse(&got).gso_type, h.gso_type);
                assert_eq!(NetHdr::parse(&got).gso_size, h.gso_size);
            } else {
                assert_eq!(get(&e.stats.rx_bad_offload), 1);
            }
        }
    }

    #[test]
    fn legacy_header_is_ten_bytes() {
        let mut e = env(0);
        let bufs = post_rx(&mut e, BUFS, 1, 2048);
        let mut b = hdr_bytes(&NetHdr::default(), 10);
        b.extend(frame(60, 7));
        e.w.tap_mut().incoming.push_back(b.clone());
        e.w.process_rx(&mut e.rx.queue, &e.mem).unwrap();
        assert_eq!(e.rx.take_used(&e.mem), vec![(u32::from(bufs[0].0), 70)]);
        assert_eq!(read(&e.mem, bufs[0].1, 70), b);
    }

    #[test]
    fn rx_budget_leaves_the_rest_for_the_next_pass() {
        let mut e = env(V1 | MRG);
        for i in 0..(BUDGET + 10) {
            let mut b = hdr_bytes(&NetHdr::default(), 12);
            b.extend(frame(60, i as u8));
            e.w.tap_mut().incoming.push_back(b);
        }
        let mut delivered = 0;
        let mut passes = 0;
        while delivered < BUDGET + 10 {
            post_rx(&mut e, BUFS, 32, 2048);
            e.w.process_rx(&mut e.rx.queue, &e.mem).unwrap();
            delivered += e.rx.take_used(&e.mem).len();
            passes += 1;
            assert!(passes < 20);
        }
        assert_eq!(get(&e.stats.rx_frames), (BUDGET + 10) as u64);
    }
}
