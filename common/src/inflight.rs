//! In-flight I/O tracking for split virtqueues: the shared-memory side of the vhost-user
//! INFLIGHT_SHMFD protocol feature ("Inflight I/O tracking" in the vhost-user spec).
//!
//! The frontend asks the backend for a region (GET_INFLIGHT_FD), keeps its fd for the life of
//! the device and hands it to every backend that serves the device (SET_INFLIGHT_FD), so a
//! backend that replaces a crashed one finds what its predecessor had taken from the rings and
//! not yet completed. Per queue the region holds:
//!
//! ```text
//! struct QueueRegionSplit {             struct DescStateSplit {       // one per descriptor
//!     u64 features;   // 0                  u8  inflight;             // 1 while in flight
//!     u16 version;    // 1; 0 = fresh       u8  padding[5];
//!     u16 desc_num;   // queue size         u16 next;                 // last-batch list
//!     u16 last_batch_head;                  u64 counter;              // submission order
//!     u16 used_idx;   // used->idx mirror }
//!     DescStateSplit desc[desc_num];
//! }
//! ```
//!
//! The backend's duties, in this order, each step a plain store that is already visible if the
//! process dies right after it:
//! 1. after popping a chain head `i`: `desc[i].counter = counter++`, then `desc[i].inflight = 1`;
//! 2. before publishing `i` in the used ring: `desc[i].next = last_batch_head`,
//!    `last_batch_head = i`; then the used element and used->idx are written;
//! 3. after publishing: `desc[i].inflight = 0`, then `used_idx = used->idx`.
//!
//! A new backend ([`QueueTracker::recover`]) first repairs the one window the steps leave: if
//! `used_idx` lags used->idx, the last batch was published but not yet cleared, so it clears
//! the entries of that batch. Every entry still marked is then in flight: it is resubmitted in
//! `counter` order, and the next chain to pop sits at `used->idx + in_flight` in the avail ring
//! (chains are popped in ring order, and each popped chain is either in the used ring or
//! marked), whatever ring base the frontend sends.
//!
//! The region is written by the frontend too (and by the predecessor, which may have been an
//! attacker's), so nothing read from it is trusted: heads are bounds-checked and every walk is
//! bounded by the queue size. The worst a forged region can do is make the backend resubmit
//! chains from the guest's own descriptor table, which the guest could have asked for anyway.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};

use log::{debug, warn};

use vhost::vhost_user::message::{
    DescStateSplit, FrontendReq, QueueRegionSplit, VhostUserInflight,
};
use vm_memory::ByteValued;

use crate::relay::{Action, Hook, Msg};

/// The region layout version this module writes.
pub const VERSION: u16 = 1;
/// The queue header: QueueRegionSplit up to its descriptor array.
const HEADER: usize = std::mem::offset_of!(QueueRegionSplit, desc);
const DESC: usize = std::mem::size_of::<DescStateSplit>();
const ALIGN: usize = 64;
// Field offsets in the queue header and in one descriptor's state.
const VERSION_AT: usize = std::mem::offset_of!(QueueRegionSplit, version);
const DESC_NUM_AT: usize = std::mem::offset_of!(QueueRegionSplit, desc_num);
const LAST_BATCH_AT: usize = std::mem::offset_of!(QueueRegionSplit, last_batch_head);
const USED_IDX_AT: usize = std::mem::offset_of!(QueueRegionSplit, used_idx);
const INFLIGHT_AT: usize = std::mem::offset_of!(DescStateSplit, inflight);
const NEXT_AT: usize = std::mem::offset_of!(DescStateSplit, next);
const COUNTER_AT: usize = std::mem::offset_of!(DescStateSplit, counter);

/// Bytes one queue's region takes for `queue_size` descriptors.
pub fn queue_region_size(queue_size: u16) -> usize {
    (HEADER + DESC * usize::from(queue_size)).div_ceil(ALIGN) * ALIGN
}

/// Why an in-flight region cannot be given or taken.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    #[error("{asked} queues asked for, the device has {has}")]
    Queues { asked: u16, has: u16 },
    #[error("queue size {asked} asked for, at most {max} is supported")]
    QueueSize { asked: u16, max: u16 },
    #[error("{0} queues of {1} descriptors")]
    Empty(u16, u16),
    #[error("region of {size} bytes for {queues} queues of {queue_size} (needs {need})")]
    Size {
        size: u64,
        queues: u16,
        queue_size: u16,
        need: usize,
    },
    #[error("region {offset}+{size} beyond the {file}-byte file")]
    BeyondFile { offset: u64, size: u64, file: i64 },
    #[error("{0}")]
    Sys(&'static str, #[source] io::Error),
}

/// A shared read-write mapping, unmapped when dropped.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; all access goes through volatile reads and writes
// of naturally aligned integers, and each queue's part is written by one thread at a time.
unsafe impl Send for Mapping {}
// SAFETY: see Send.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(fd: RawFd, len: usize, offset: u64) -> io::Result<Self> {
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "mmap offset too large"))?;
        // SAFETY: maps `len` bytes of `fd` shared; the kernel checks the fd and the range, and
        // the result is checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                off,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            ptr: ptr.cast(),
            len,
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`, which nothing uses any more.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// The region this backend offers in GET_INFLIGHT_FD: a sealed memfd made before the jail,
/// large enough for every queue at the largest queue size.
pub struct InflightFd {
    fd: OwnedFd,
    map: Mapping,
    num_queues: u16,
    max_queue_size: u16,
}

impl InflightFd {
    pub fn new(num_queues: u16, max_queue_size: u16) -> io::Result<Self> {
        let len = usize::from(num_queues) * queue_region_size(max_queue_size);
        // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
        let fd = unsafe {
            libc::memfd_create(
                c"vhostbox-inflight".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: ftruncate/fcntl on our own memfd.
        let r = unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        // The frontend maps it too; sealed, it cannot shrink it under our mapping (SIGBUS).
        // SAFETY: fcntl on our own memfd.
        let r = unsafe {
            libc::fcntl(
                fd.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let map = Mapping::new(fd.as_raw_fd(), len, 0)?;
        Ok(Self {
            fd,
            map,
            num_queues,
            max_queue_size,
        })
    }

    /// Zeroes the region for a new device lifetime and returns the size the frontend should
    /// map, or why the request cannot be met.
    pub fn prepare(&self, num_queues: u16, queue_size: u16) -> Result<u64, InflightError> {
        if num_queues == 0 || num_queues > self.num_queues {
            return Err(InflightError::Queues {
                asked: num_queues,
                has: self.num_queues,
            });
        }
        if queue_size == 0 || queue_size > self.max_queue_size {
            return Err(InflightError::QueueSize {
                asked: queue_size,
                max: self.max_queue_size,
            });
        }
        // SAFETY: zeroes our own mapping, whose length is `map.len`.
        unsafe { std::ptr::write_bytes(self.map.ptr, 0, self.map.len) };
        Ok((usize::from(num_queues) * queue_region_size(queue_size)) as u64)
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// The region the frontend set with SET_INFLIGHT_FD, mapped.
pub struct InflightRegion {
    map: Mapping,
    num_queues: u16,
    queue_size: u16,
}

impl InflightRegion {
    /// Maps what SET_INFLIGHT_FD describes, after checking that the file holds it.
    pub fn map(
        fd: &OwnedFd,
        mmap_size: u64,
        mmap_offset: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Self, InflightError> {
        if num_queues == 0 || queue_size == 0 {
            return Err(InflightError::Empty(num_queues, queue_size));
        }
        let need = usize::from(num_queues) * queue_region_size(queue_size);
        if mmap_size < need as u64 || mmap_size > (64 << 20) {
            return Err(InflightError::Size {
                size: mmap_size,
                queues: num_queues,
                queue_size,
                need,
            });
        }
        // SAFETY: stat is a plain C struct of integers: all-zero is a valid value.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat on a valid fd with a valid out pointer.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } < 0 {
            return Err(InflightError::Sys("fstat", io::Error::last_os_error()));
        }
        match mmap_offset.checked_add(mmap_size) {
            Some(end) if end <= st.st_size as u64 => {}
            _ => {
                return Err(InflightError::BeyondFile {
                    offset: mmap_offset,
                    size: mmap_size,
                    file: st.st_size,
                })
            }
        }
        Ok(Self {
            map: Mapping::new(fd.as_raw_fd(), mmap_size as usize, mmap_offset)
                .map_err(|e| InflightError::Sys("mmap", e))?,
            num_queues,
            queue_size,
        })
    }

    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    /// The tracker for queue `index`, if the region has one of `queue_size` descriptors.
    pub fn queue(self: &Arc<Self>, index: usize, queue_size: u16) -> Option<QueueTracker> {
        if index >= usize::from(self.num_queues) || queue_size != self.queue_size {
            return None;
        }
        // SAFETY: index < num_queues, and `map` checked that num_queues regions fit.
        let base = unsafe { self.map.ptr.add(index * queue_region_size(self.queue_size)) };
        Some(QueueTracker {
            _region: self.clone(),
            base,
            size: queue_size,
            counter: 0,
        })
    }
}

/// Where the backend keeps the region the frontend set, shared between the vhost-user message
/// handling and the queue workers. The generation counts SET_INFLIGHT_FD messages.
#[derive(Default)]
pub struct InflightSlot {
    inner: Mutex<(u64, Option<Arc<InflightRegion>>)>,
}

impl InflightSlot {
    pub fn set(&self, r: InflightRegion) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.0 += 1;
        g.1 = Some(Arc::new(r));
    }

    pub fn get(&self) -> Option<Arc<InflightRegion>> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .clone()
    }
}

/// What a queue resumes with.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Where to pop the next new chain; None when the region was fresh (keep the ring base).
    pub next_avail: Option<u16>,
    /// Chain heads in flight, oldest first, to resubmit before anything new.
    pub resubmit: Vec<u16>,
    /// Entries of a published-but-not-cleared last batch that were cleared.
    pub repaired: u16,
}

/// One queue's part of the region.
pub struct QueueTracker {
    /// Keeps the mapping alive.
    _region: Arc<InflightRegion>,
    base: *mut u8,
    size: u16,
    counter: u64,
}

// SAFETY: `base` points into a mapping kept alive by `_region`; one queue's part is only used by
// the thread that owns its tracker.
unsafe impl Send for QueueTracker {}

impl QueueTracker {
    fn rd<T: Copy>(&self, off: usize) -> T {
        debug_assert!(off + std::mem::size_of::<T>() <= queue_region_size(self.size));
        // SAFETY: `off` lies inside this queue's region (header or a bounds-checked descriptor
        // slot) and is a multiple of the type's size from a 64-byte aligned base.
        unsafe { self.base.add(off).cast::<T>().read_volatile() }
    }

    fn wr<T: Copy>(&mut self, off: usize, v: T) {
        debug_assert!(off + std::mem::size_of::<T>() <= queue_region_size(self.size));
        // SAFETY: as in `rd`.
        unsafe { self.base.add(off).cast::<T>().write_volatile(v) };
        // Program order is what a crash preserves; keep the compiler from reordering stores.
        std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
    }

    fn desc(i: u16) -> usize {
        HEADER + DESC * usize::from(i)
    }

    pub fn version(&self) -> u16 {
        self.rd(VERSION_AT)
    }

    /// Whether descriptor `head` is marked in flight.
    pub fn is_inflight(&self, head: u16) -> bool {
        head < self.size && self.rd::<u8>(Self::desc(head) + INFLIGHT_AT) == 1
    }

    /// Reads the state a predecessor left, repairs its last batch and says what to resubmit.
    /// `ring_used_idx` is used->idx as the guest sees it now.
    pub fn recover(&mut self, ring_used_idx: u16) -> Recovered {
        let version: u16 = self.rd(VERSION_AT);
        let desc_num: u16 = self.rd(DESC_NUM_AT);
        if version != VERSION || desc_num != self.size {
            if version != 0 {
                warn!(
                    "in-flight region: version {version}, {desc_num} descriptors (expected \
                     version {VERSION}, {}): starting it afresh",
                    self.size
                );
            }
            for i in 0..self.size {
                self.wr::<u64>(Self::desc(i), 0);
                self.wr::<u64>(Self::desc(i) + COUNTER_AT, 0);
            }
            self.wr::<u64>(0, 0);
            self.wr::<u16>(DESC_NUM_AT, self.size);
            self.wr::<u16>(LAST_BATCH_AT, 0);
            self.wr::<u16>(USED_IDX_AT, ring_used_idx);
            self.wr::<u16>(VERSION_AT, VERSION);
            self.counter = 0;
            return Recovered::default();
        }
        let mut out = Recovered::default();
        let region_used: u16 = self.rd(USED_IDX_AT);
        if region_used != ring_used_idx {
            // The last batch reached the used ring but was not cleared here.
            let batch = ring_used_idx.wrapping_sub(region_used);
            if batch > self.size {
                warn!(
                    "in-flight region: used index {region_used} vs ring {ring_used_idx}: \
                     not a batch of this queue; not repairing"
                );
            } else {
                let mut h: u16 = self.rd(LAST_BATCH_AT);
                for _ in 0..batch {
                    if h >= self.size {
                        break;
                    }
                    if self.rd::<u8>(Self::desc(h) + INFLIGHT_AT) != 0 {
                        out.repaired += 1;
                    }
                    self.wr::<u8>(Self::desc(h) + INFLIGHT_AT, 0);
                    h = self.rd(Self::desc(h) + NEXT_AT);
                }
            }
            self.wr::<u16>(USED_IDX_AT, ring_used_idx);
        }
        let mut list: Vec<(u64, u16)> = (0..self.size)
            .filter(|&i| self.rd::<u8>(Self::desc(i) + INFLIGHT_AT) == 1)
            .map(|i| (self.rd::<u64>(Self::desc(i) + COUNTER_AT), i))
            .collect();
        list.sort_unstable();
        self.counter = list.last().map_or(0, |&(c, _)| c.wrapping_add(1));
        out.next_avail = Some(ring_used_idx.wrapping_add(list.len() as u16));
        out.resubmit = list.into_iter().map(|(_, i)| i).collect();
        out
    }

    /// Step 1: chain `head` was taken from the avail ring.
    pub fn begin(&mut self, head: u16) {
        if head >= self.size {
            return;
        }
        let c = self.counter;
        self.counter = c.wrapping_add(1);
        self.wr::<u64>(Self::desc(head) + COUNTER_AT, c);
        self.wr::<u8>(Self::desc(head) + INFLIGHT_AT, 1);
    }

    /// Step 2: `head` is about to be published in the used ring.
    pub fn before_used(&mut self, head: u16) {
        if head >= self.size {
            return;
        }
        let last: u16 = self.rd(LAST_BATCH_AT);
        self.wr::<u16>(Self::desc(head) + NEXT_AT, last);
        self.wr::<u16>(LAST_BATCH_AT, head);
    }

    /// Step 3: `head` is in the used ring, whose index is now `used_idx`.
    pub fn after_used(&mut self, head: u16, used_idx: u16) {
        if head < self.size {
            self.wr::<u8>(Self::desc(head) + INFLIGHT_AT, 0);
        }
        self.wr::<u16>(USED_IDX_AT, used_idx);
    }
}

/// Answers GET_INFLIGHT_FD and SET_INFLIGHT_FD in the relay in front of vhost-user-backend
/// (see [`crate::relay`]), which has no support for them, and kicks every queue once when it
/// starts with a region set, so requests a predecessor left in flight are resubmitted without
/// waiting for the guest (which already made them available and will not kick again).
pub struct InflightHook {
    pub fd: InflightFd,
    pub slot: Arc<InflightSlot>,
}

fn reply(inflight: VhostUserInflight, fds: Vec<OwnedFd>) -> Action {
    let payload = inflight.as_slice().to_vec();
    Action::Answer(Some(Msg::reply(FrontendReq::GET_INFLIGHT_FD, payload, fds)))
}

impl InflightHook {
    fn get(&mut self, msg: &Msg) -> Action {
        let Some(ask) = msg.payload_as::<VhostUserInflight>() else {
            warn!("GET_INFLIGHT_FD with a {}-byte payload", msg.payload.len());
            return reply(VhostUserInflight::default(), vec![]);
        };
        let (nq, qs) = (ask.num_queues, ask.queue_size);
        // A size of 0 and no fd tells the frontend that tracking is off.
        let (size, fds) = match self.fd.prepare(nq, qs) {
            Ok(size) => match dup(self.fd.raw_fd()) {
                Ok(fd) => (size, vec![fd]),
                Err(e) => {
                    warn!("GET_INFLIGHT_FD: {e}");
                    (0, vec![])
                }
            },
            Err(e) => {
                warn!("GET_INFLIGHT_FD refused: {e}");
                (0, vec![])
            }
        };
        debug!("GET_INFLIGHT_FD: {nq} queues of {qs}: {size} bytes");
        reply(VhostUserInflight::new(size, 0, nq, qs), fds)
    }

    fn set(&mut self, msg: &mut Msg) -> Action {
        let r = match (msg.payload_as::<VhostUserInflight>(), msg.fds.first()) {
            (Some(i), Some(fd)) => {
                let (size, off, nq, qs) = (i.mmap_size, i.mmap_offset, i.num_queues, i.queue_size);
                InflightRegion::map(fd, size, off, nq, qs).map(|r| {
                    debug!("SET_INFLIGHT_FD: {nq} queues of {qs}");
                    self.slot.set(r)
                })
            }
            _ => Err(InflightError::Sys(
                "SET_INFLIGHT_FD",
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "needs a 24-byte payload and one fd",
                ),
            )),
        };
        if let Err(e) = &r {
            warn!("SET_INFLIGHT_FD refused: {}", crate::error_chain(e));
        }
        // The fd is not kept: the mapping holds the memory.
        msg.fds.clear();
        Action::Answer(
            msg.needs_reply()
                .then(|| Msg::ack(FrontendReq::SET_INFLIGHT_FD, r.is_ok())),
        )
    }
}

impl Hook for InflightHook {
    fn on_frontend(&mut self, msg: &mut Msg) -> Action {
        match msg.request() {
            Some(FrontendReq::GET_INFLIGHT_FD) => self.get(msg),
            Some(FrontendReq::SET_INFLIGHT_FD) => self.set(msg),
            Some(FrontendReq::SET_VRING_KICK) => {
                if self.slot.get().is_some() {
                    if let Some(fd) = msg.fds.first() {
                        let one = 1u64;
                        // SAFETY: writes 8 bytes from a local to the kick eventfd.
                        unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
                    }
                }
                Action::Forward
            }
            _ => Action::Forward,
        }
    }
}

fn dup(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC on a valid fd; the result is checked.
    let r = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(r) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(nq: u16, qs: u16) -> (InflightFd, Arc<InflightRegion>) {
        let fd = InflightFd::new(nq, qs).unwrap();
        let size = fd.prepare(nq, qs).unwrap();
        let own = fd.fd.try_clone().unwrap();
        let r = InflightRegion::map(&own, size, 0, nq, qs).unwrap();
        (fd, Arc::new(r))
    }

    /// A model of a backend taking and completing requests, with the used ring's index.
    struct Model {
        t: QueueTracker,
        used: u16,
    }

    impl Model {
        fn complete(&mut self, head: u16) {
            self.t.before_used(head);
            self.used = self.used.wrapping_add(1);
            self.t.after_used(head, self.used);
        }
    }

    #[test]
    fn fresh_region_is_initialised_and_keeps_the_ring_base() {
        let (_fd, r) = region(2, 8);
        let mut t = r.queue(1, 8).unwrap();
        assert_eq!(t.version(), 0);
        assert_eq!(t.recover(5), Recovered::default());
        assert_eq!(t.version(), VERSION);
        assert!(r.queue(2, 8).is_none(), "only 2 queues");
        assert!(r.queue(0, 16).is_none(), "queue size must match");
    }

    #[test]
    fn out_of_order_completions_resubmit_exactly_the_open_ones_in_order() {
        let (_fd, r) = region(1, 8);
        let mut m = Model {
            t: r.queue(0, 8).unwrap(),
            used: 0,
        };
        m.t.recover(0);
        // Avail ring: 3, 1, 6, 0, 2 taken; 1 and 0 completed (out of order).
        for h in [3, 1, 6, 0, 2] {
            m.t.begin(h);
        }
        m.complete(1);
        m.complete(0);
        // The process dies; a successor maps the same region.
        let mut t2 = r.queue(0, 8).unwrap();
        let rec = t2.recover(m.used);
        assert_eq!(rec.resubmit, vec![3, 6, 2]);
        // 5 taken = 2 used + 3 in flight: the next new chain is at avail position 5.
        assert_eq!(rec.next_avail, Some(5));
        assert_eq!(rec.repaired, 0);
        // The successor continues the counter past the resubmitted ones.
        t2.begin(7);
        let rec = r.queue(0, 8).unwrap().recover(2);
        assert_eq!(rec.resubmit, vec![3, 6, 2, 7]);
    }

    #[test]
    fn death_between_each_step_of_a_completion() {
        // Crash points while completing head 4 with heads 4 and 5 in flight and used at 10.
        for point in 0..4 {
            let (_fd, r) = region(1, 8);
            let mut t = r.queue(0, 8).unwrap();
            t.recover(10);
            t.begin(4);
            t.begin(5);
            let mut ring_used = 10u16;
            if point >= 1 {
                t.before_used(4);
            }
            if point >= 2 {
                ring_used = 11; // the used element and used->idx were written
            }
            if point >= 3 {
                t.after_used(4, 11);
            }
            let rec = r.queue(0, 8).unwrap().recover(ring_used);
            let expect: Vec<u16> = if point >= 2 { vec![5] } else { vec![4, 5] };
            assert_eq!(rec.resubmit, expect, "crash point {point}");
            assert_eq!(rec.next_avail, Some(12), "crash point {point}");
            assert_eq!(rec.repaired, u16::from(point == 2), "crash point {point}");
        }
    }

    #[test]
    fn death_before_marking_refetches_the_chain() {
        let (_fd, r) = region(1, 4);
        let mut t = r.queue(0, 4).unwrap();
        t.recover(u16::MAX); // the used index wraps below
        t.begin(2);
        // Head 0 was popped from the avail ring but the process died before marking it.
        let rec = r.queue(0, 4).unwrap().recover(u16::MAX);
        assert_eq!(rec.resubmit, vec![2]);
        assert_eq!(rec.next_avail, Some(0), "position 65535 + 1 wraps to 0");
    }

    #[test]
    fn forged_regions_are_bounded() {
        let (_fd, r) = region(1, 4);
        let mut t = r.queue(0, 4).unwrap();
        t.recover(0);
        // A frontend writes nonsense: a batch list pointing out of range, a huge lag.
        t.wr::<u16>(LAST_BATCH_AT, 999);
        t.wr::<u16>(USED_IDX_AT, 3);
        t.wr::<u8>(QueueTracker::desc(1) + INFLIGHT_AT, 1);
        let rec = r.queue(0, 4).unwrap().recover(5);
        assert_eq!(rec.resubmit, vec![1]);
        let mut t = r.queue(0, 4).unwrap();
        t.wr::<u16>(USED_IDX_AT, 100);
        let rec = t.recover(5);
        assert_eq!(
            rec.resubmit,
            vec![1],
            "a lag larger than the queue repairs nothing"
        );
        // A desc_num that does not match the queue starts the region afresh.
        t.wr::<u16>(DESC_NUM_AT, 7);
        assert_eq!(t.recover(5), Recovered::default());
        assert!(!t.is_inflight(1));
        // Out-of-range heads are ignored.
        t.begin(4);
        t.before_used(9);
        t.after_used(9, 6);
    }

    #[test]
    fn region_checks() {
        let fd = InflightFd::new(2, 256).unwrap();
        assert!(fd
            .prepare(3, 256)
            .unwrap_err()
            .to_string()
            .contains("3 queues"));
        assert!(fd
            .prepare(2, 512)
            .unwrap_err()
            .to_string()
            .contains("queue size 512"));
        assert_eq!(fd.prepare(2, 128).unwrap(), 2 * 2112);
        let own = fd.fd.try_clone().unwrap();
        let e = InflightRegion::map(&own, 100, 0, 2, 128).err().unwrap();
        assert!(e.to_string().contains("needs 4224"), "{e}");
        let e = InflightRegion::map(&own, 4224, 1 << 20, 2, 128)
            .err()
            .unwrap();
        assert!(e.to_string().contains("beyond"), "{e}");
        // Sealed: the frontend cannot shrink it under the backend's mapping.
        // SAFETY: ftruncate on our fd; expected to fail.
        assert!(unsafe { libc::ftruncate(own.as_raw_fd(), 0) } < 0);
    }
}
