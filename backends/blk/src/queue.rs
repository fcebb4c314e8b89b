//! One queue of the device: the loop that runs when its kick or its engine's completion
//! eventfd fires (pass, poll, complete), and the request handling under it: pop a chain, parse
//! it ([`crate::request`]), run it on the engine ([`crate::engine`]), write the status, publish
//! it in the used ring (keeping the in-flight region in step) and notify the guest.
//!
//! Free of vhost-user types: the loop sees its vring through [`Vring`], so unit tests drive it
//! with a split ring in plain memory.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use vhostbox_common::inflight::{InflightSlot, QueueTracker};
use vhostbox_common::launch::GuestMemHandle;
use vhostbox_common::metrics::{self, QueueStats};
use vhostbox_common::poll::AdaptivePoll;
use vhostbox_common::ring;
use vhostbox_common::{dirty, guest};
use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend};

use crate::disk::{Disk, DiskKind};
use crate::engine::{Completion, Engine, Op, Outcome};
use crate::request::{
    self, ChainError, Desc, HeadChain, Limits, Request, RequestType, Segment, SECTOR_SHIFT,
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use crate::stats::{QueueCounters, LATENCY_BOUNDS_NS};
use crate::throttle::{Cost, Throttle};

pub use vhostbox_common::launch::GuestMem;

/// Most segments one request may carry (the preadv/pwritev limit).
pub const MAX_SEGMENTS: usize = libc::UIO_MAXIOV as usize;
/// Data a pass starts before it returns to let the caller publish and notify: large requests
/// then reach the driver one or two at a time instead of a whole batch at the end, and it
/// resubmits while the rest are copied. Small requests still go 32 to a pass.
pub const PASS_BYTES: usize = 128 << 10;
/// A read at least this large is served from the page cache on the spot when it can be
/// (`Engine::read_now`): its copy costs more than the ring round trip it would be batched in.
pub const READ_NOW_BYTES: usize = 64 << 10;
/// Most discard / write-zeroes segments per request (advertised in the config space).
pub const MAX_DISCARD_SEGMENTS: u32 = 32;

/// State shared by every queue of a device, for the life of the process.
pub struct Shared {
    pub disk: Disk,
    pub serial: [u8; VIRTIO_BLK_ID_BYTES],
    /// The guest's cache mode: true = write-back (flush when asked), false = write-through.
    pub writeback: AtomicBool,
    pub stats: Stats,
    /// The device's I/O limits (shared by its queues).
    pub throttle: Throttle,
}

/// The longest a throttled queue sleeps before it looks again: a limit raised at run time
/// takes effect within this even when the old one had the queue wait for seconds.
const THROTTLE_RECHECK: Duration = Duration::from_millis(50);
/// The shortest a throttled queue sleeps: the buckets then hold a batch when it wakes, rather
/// than the one request a refill of a few microseconds pays for (a wake-up per request cost
/// ~40 us of CPU per I/O at 20k IOPS; docs/benchmarks.md).
const THROTTLE_MIN_WAIT: Duration = Duration::from_millis(1);

/// A queue's one-shot wake-up for when its I/O limits allow the next request (a
/// non-blocking timerfd, made before the jail; arming it is `timerfd_settime`).
#[derive(Debug)]
pub struct Timer(std::os::fd::OwnedFd);

impl Timer {
    pub fn new() -> io::Result<Self> {
        use std::os::fd::FromRawFd;
        // SAFETY: timerfd_create takes no pointers; the fd is checked before it is owned.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd that nothing else owns.
        Ok(Timer(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }))
    }

    pub fn raw_fd(&self) -> i32 {
        use std::os::fd::AsRawFd;
        self.0.as_raw_fd()
    }

    /// Fires once after `d` (at least 1 us).
    fn arm(&self, d: Duration) -> io::Result<()> {
        let d = d.max(Duration::from_micros(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: d.as_secs() as libc::time_t,
                tv_nsec: libc::c_long::from(d.subsec_nanos() as i32),
            },
        };
        // SAFETY: a valid itimerspec for the call's duration; no old value is asked for.
        if unsafe { libc::timerfd_settime(self.raw_fd(), 0, &spec, std::ptr::null_mut()) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Clears a fired timer (nothing to clear is not an error).
    fn clear(&self) {
        let mut n = 0u64;
        // SAFETY: reads 8 bytes into a local u64 from our non-blocking fd.
        unsafe { libc::read(self.raw_fd(), (&mut n as *mut u64).cast(), 8) };
    }
}

/// Counters, for logs and tests.
#[derive(Default)]
pub struct Stats {
    pub errors: AtomicU64,
    /// Requests a previous worker left in flight and this process submitted again.
    pub resubmitted: AtomicU64,
}

struct Slot {
    head: u16,
    status: GuestAddress,
    used_len: u32,
    iov: Vec<libc::iovec>,
    /// Keeps the guest memory mapped until the kernel is done with it, even if the frontend
    /// replaces the memory table meanwhile.
    mem: Option<Arc<GuestMem>>,
    /// When the request was taken (timed queues only).
    t0: Option<Instant>,
    /// The engine writes into the iovecs (a read): marked in the dirty log when it is done.
    into_guest: bool,
}

/// The vring a queue runs on, as its loop needs it.
pub trait Vring {
    /// The queue's state (addresses, indices, notification suppression).
    fn queue(&mut self) -> &mut Queue;
    /// Whether the guest asked to be notified of what was just published (EVENT_IDX).
    fn needs_notification(&mut self) -> io::Result<bool>;
    /// Notifies the guest (the call eventfd).
    fn notify(&mut self) -> io::Result<()>;
}

/// One virtqueue of the device.
pub struct BlkQueue {
    /// Set when new requests arrived while notifications were being re-enabled.
    more: bool,
    /// The connection's guest memory, as the frontend last set it.
    mem: GuestMemHandle,
    /// Where the frontend's in-flight region appears, and this queue's index in it.
    inflight: Option<(Arc<InflightSlot>, usize)>,
    shared: Arc<Shared>,
    engine: Option<Engine>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    descs: Vec<Desc>,
    segs: Vec<Segment>,
    done: Vec<Completion>,
    logged_errors: u32,
    /// In-flight tracking in the frontend's shared region, when it set one.
    tracker: Option<QueueTracker>,
    /// Whether tracking was taken up since the queue (re)started.
    tracking_started: bool,
    /// Set when the worker is being stopped: no new requests are taken.
    stopping: bool,
    /// The last pass popped nothing yet asked for another.
    retried_empty: bool,
    /// Resubmitted heads not yet completed (for the log).
    watch: Vec<u16>,
    /// Leave notifications off after a pass: the caller polls the ring, then calls `rearm`.
    defer_rearm: bool,
    /// Chains the last pass popped.
    last_popped: usize,
    /// A pass popped or completed something since `take_progress` was last called.
    progress: bool,
    /// How long to poll the ring after a pass before sleeping.
    pub poll: AdaptivePoll,
    /// Bytes of reads and writes the current pass started.
    pass_bytes: usize,
    /// This queue's counters (in the metrics page when the supervisor serves them).
    stats: QueueStats<QueueCounters>,
    /// The time of the current pass or batch of completions, when latency is measured (only
    /// when the counters are served: it costs two clock reads per pass).
    clock: Option<Instant>,
    /// Requests the current pass took and finished itself (their latency is the pass's).
    finished_in_pass: u64,
    /// Wakes the queue when the I/O limits allow its next request.
    timer: Option<Timer>,
    /// The I/O limits hold the queue: the last pass put a request back and armed the timer.
    /// No pass re-enables notifications or polls the ring until the timer fires.
    held: bool,
    /// The request that was put back (its avail position and head) and what it has drawn.
    pending: Option<(u16, u16, Cost)>,
}

// SAFETY: the raw iovec pointers in `slots` point into guest memory kept alive by the slot's
// `mem` Arc; the worker is only ever used by one thread at a time (behind a Mutex).
unsafe impl Send for BlkQueue {}

impl BlkQueue {
    /// `engine` is None only for the null device, which needs none.
    pub fn new(
        shared: Arc<Shared>,
        engine: Option<Engine>,
        index: usize,
        queue_size: u16,
        mem: GuestMemHandle,
    ) -> Self {
        let n = u32::from(queue_size.max(1));
        let stats = QueueStats::for_queue(index);
        Self {
            shared,
            engine,
            slots: (0..n)
                .map(|_| Slot {
                    head: 0,
                    status: GuestAddress(0),
                    used_len: 0,
                    iov: Vec::new(),
                    mem: None,
                    t0: None,
                    into_guest: false,
                })
                .collect(),
            free: (0..n).rev().collect(),
            descs: Vec::with_capacity(16),
            segs: Vec::with_capacity(16),
            done: Vec::with_capacity(n as usize),
            logged_errors: 0,
            tracker: None,
            tracking_started: false,
            stopping: false,
            retried_empty: false,
            watch: Vec::new(),
            more: false,
            mem,
            inflight: None,
            defer_rearm: false,
            last_popped: 0,
            progress: false,
            poll: AdaptivePoll::new(Duration::ZERO),
            pass_bytes: 0,
            clock: None,
            finished_in_pass: 0,
            stats,
            timer: None,
            held: false,
            pending: None,
        }
    }

    /// The timer that wakes the queue when its I/O limits allow the next request.
    pub fn set_timer(&mut self, t: Timer) {
        self.timer = Some(t);
    }

    /// The timer fired: the next pass may take requests again.
    pub fn timer_fired(&mut self) {
        if let Some(t) = &self.timer {
            t.clear();
        }
        self.held = false;
    }

    /// Draws the request at `head` (just popped) from the device's I/O limits. `Err(wait)`:
    /// it must wait that long; what it drew so far is remembered for the next try.
    fn admit(&mut self, queue: &Queue, head: u16, mem: &GuestMem) -> Result<(), Duration> {
        let at = queue.next_avail().wrapping_sub(1);
        let (mut cost, again) = match self.pending.take() {
            Some((a, h, c)) if a == at && h == head => (c, true),
            _ => {
                // From the descriptors alone; the request is parsed (and checked) later. A
                // header that cannot be read is not limited: it fails on parsing anyway.
                let ty = self
                    .descs
                    .first()
                    .and_then(|d| mem.read_obj::<u32>(GuestAddress(d.addr)).ok())
                    .map_or(RequestType::Flush, |t| {
                        RequestType::from_u32(u32::from_le(t))
                    });
                let total: u64 = self.descs.iter().map(|d| u64::from(d.len)).sum();
                let data = total.saturating_sub(request::HEADER_BYTES + 1);
                (Cost::new(ty, data), false)
            }
        };
        match self.shared.throttle.admit(&mut cost) {
            Ok(()) => Ok(()),
            Err(wait) => {
                if !again {
                    metrics::inc(&self.stats.throttled);
                }
                self.pending = Some((at, head, cost));
                Err(wait)
            }
        }
    }

    /// This queue's counters.
    pub fn stats(&self) -> &QueueCounters {
        &self.stats
    }

    /// The requests the pass finished itself took at most the pass's time: recorded as that.
    fn time_pass(&mut self) {
        if let (n @ 1.., Some(t0)) = (self.finished_in_pass, self.clock) {
            let ns = nanos(Instant::now() - t0);
            self.stats.latency.observe_n(ns, n, &LATENCY_BOUNDS_NS);
        }
        self.finished_in_pass = 0;
    }

    /// Starts a pass or a batch of completions: the time it began, if latency is measured.
    fn tick(&mut self) {
        if self.stats.served() {
            self.clock = Some(Instant::now());
        }
    }

    /// Requests handed to the engine and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.engine.as_ref().map_or(0, |e| e.in_flight())
    }

    /// The engine's completion eventfd, if it has one.
    pub fn completion_fd(&self) -> Option<i32> {
        self.engine.as_ref().and_then(|e| e.completion_fd())
    }

    /// Jail probe: an operation on this queue's ring; `None` without one.
    #[cfg(feature = "jail-probe")]
    pub fn probe_ring(
        &mut self,
        op: vhostbox_common::sandbox::probe::RingProbe<'_>,
    ) -> Option<io::Result<i32>> {
        self.engine.as_mut()?.probe_ring(op)
    }

    /// The queue's kick (`completions` false) or its engine's completion eventfd (true)
    /// fired: runs passes until nothing is left, busy-polls the ring for a while if that has
    /// paid lately (see [`vhostbox_common::poll`]), then returns for the thread to sleep.
    pub fn run(&mut self, ring: &mut impl Vring, completions: bool) -> io::Result<()> {
        let mut completions = completions;
        self.poll.found_work(Instant::now());
        let mut polling = self.poll.max() > Duration::ZERO;
        loop {
            self.set_defer_rearm(polling);
            let mem = self.passes(ring, completions)?;
            if !polling {
                break;
            }
            // Before sleeping, look at the ring for a while: the driver's next batch often
            // comes within microseconds, and finding it here spares its kick and this thread's
            // wake-up. Only after passes that did something: a ring virtio-queue will not pop
            // from must not keep the thread spinning. Nor while the kernel works on this
            // queue's I/O (buffered writes run on io_uring's worker threads): on a busy host
            // they need the CPU this thread would spin on, and their completion wakes the
            // thread anyway. (The memory of the last pass serves for looking.)
            let queue = ring.queue();
            let found = if self.take_progress()
                && !self.held
                && self.accepting()
                && self.in_flight() == 0
                && queue.ready()
            {
                self.poll.idle(Instant::now());
                let budget = self.poll.budget();
                self.poll_for_work(queue, &mem, budget)
            } else {
                None
            };
            match found {
                Some(c) => {
                    self.poll.found_work(Instant::now());
                    completions = c;
                }
                None => {
                    // Nothing came: notifications back on, then one more look, as a pass
                    // without polling ends.
                    self.rearm(queue, &mem)?;
                    if !self.take_more() {
                        break;
                    }
                    completions = false;
                    polling = false;
                }
            }
        }
        self.set_defer_rearm(false);
        self.poll.idle(Instant::now());
        Ok(())
    }

    /// Passes until one leaves nothing more to do, notifying the guest after each that
    /// published something it asked to hear of. Returns the memory the last pass used.
    fn passes(
        &mut self,
        ring: &mut impl Vring,
        mut completions: bool,
    ) -> io::Result<Arc<GuestMem>> {
        loop {
            // Loaded for every pass: a region the frontend added (ADD_MEM_REG, acknowledged
            // before it queued requests that use it) must be visible to the next pass.
            let mem = self.memory();
            let queue = ring.queue();
            let mut used = false;
            // A predecessor may have died between publishing completions and notifying the
            // guest, which would then wait forever: notify once at every start.
            let restart = queue.ready() && !self.tracking_started;
            if restart {
                let tracker = self.tracker(queue.size());
                used |= self.start_tracking(tracker, queue, &mem)?;
            }
            used |= if completions {
                self.process_completions(queue, &mem)?
            } else if queue.ready() {
                self.process_queue(queue, &mem)?
            } else {
                false
            };
            let more = self.take_more();
            // Reads the kernel served at once (io_uring from the page cache) are already
            // complete: publish them now rather than on the eventfd's next wake-up.
            let done = self.has_completions();
            if restart || (used && ring.needs_notification()?) {
                ring.notify()?;
            }
            if !more && !done {
                return Ok(mem);
            }
            completions = done;
        }
    }

    /// The frontend stops the queue (GET_VRING_BASE): completes what is in flight on `ring`,
    /// so the ring state it reads back is final (without the ring, forgets it). Tracking is
    /// taken up again when the queue restarts, from the region current then.
    pub fn stop(&mut self, ring: Option<&mut impl Vring>) -> io::Result<()> {
        let r = match ring {
            Some(ring) if self.in_flight() > 0 => {
                let mem = self.memory();
                match self.drain(ring.queue(), &mem) {
                    Ok(true) => ring.notify(),
                    Ok(false) => Ok(()),
                    Err(e) => Err(e),
                }
            }
            _ => {
                self.abandon();
                Ok(())
            }
        };
        self.stop_tracking();
        self.poll.reset();
        r
    }

    /// A clean stop (SIGTERM): takes no new requests, completes and publishes every request
    /// in flight and tells the guest, so nothing is left for a successor to redo. Returns how
    /// many requests it completed.
    pub fn shut_down(&mut self, ring: Option<&mut impl Vring>) -> io::Result<usize> {
        self.quiesce();
        let n = self.in_flight();
        let Some(ring) = ring.filter(|_| n > 0) else {
            return Ok(0);
        };
        let mem = self.memory();
        if self.drain(ring.queue(), &mem)? {
            ring.notify()?;
        }
        Ok(n)
    }

    /// Pops and starts every available request there is room for. Returns whether used
    /// entries were added (the caller then decides whether to notify the guest).
    pub fn process_queue(&mut self, queue: &mut Queue, mem: &Arc<GuestMem>) -> io::Result<bool> {
        let mut used = false;
        queue
            .disable_notification(&**mem)
            .map_err(io::Error::other)?;
        let mut popped = 0usize;
        let mut cut = false;
        self.pass_bytes = 0;
        self.tick();
        let limited = self.shared.throttle.refresh();
        self.held = false;
        while !self.free.is_empty() && !self.stopping {
            if self.pass_bytes >= PASS_BYTES && ring::has_avail(queue, &**mem) {
                // Enough data for one pass: let the caller publish and notify, so the driver
                // works on these completions while the next pass runs.
                cut = true;
                break;
            }
            // virtio-queue takes the head from the avail ring; the chain is read with
            // HeadChain, the same rules as virtio-queue's DescriptorChain at half the
            // instructions per descriptor (docs/architecture.md, "Descriptor chains").
            let Some(head) = queue.pop_descriptor_chain(&**mem).map(|c| c.head_index()) else {
                break;
            };
            let table = GuestAddress(queue.desc_table());
            let chain = HeadChain::new(mem, table, queue.size(), head);
            let chain = request::read_chain(chain, &mut self.descs);
            if limited {
                if let Err(wait) = self.admit(queue, head, mem) {
                    // Put it back: the queue is not popped until the limits allow it, and a
                    // frontend that stops the ring meanwhile finds nothing taken.
                    queue.set_next_avail(queue.next_avail().wrapping_sub(1));
                    if let Some(t) = &self.timer {
                        t.arm(wait.clamp(THROTTLE_MIN_WAIT, THROTTLE_RECHECK))?;
                        self.held = true;
                    }
                    break;
                }
            }
            popped += 1;
            if let Some(t) = self.tracker.as_mut() {
                t.begin(head);
            }
            used |= self.start(head, chain, queue, mem)?;
        }
        if let Some(e) = self.engine.as_mut() {
            e.kick()?;
        }
        self.time_pass();
        metrics::set(&self.stats.in_flight, self.in_flight() as u64);
        self.last_popped = popped;
        self.progress |= popped > 0;
        if cut {
            self.more = true;
        } else if !self.defer_rearm && !self.held {
            self.rearm_after(queue, mem, popped)?;
        }
        Ok(used)
    }

    /// Re-enables notifications after the last pass (see `set_defer_rearm`); sets `more` if
    /// requests arrived meanwhile.
    pub fn rearm(&mut self, queue: &mut Queue, mem: &GuestMem) -> io::Result<()> {
        self.rearm_after(queue, mem, self.last_popped)
    }

    fn rearm_after(&mut self, queue: &mut Queue, mem: &GuestMem, popped: usize) -> io::Result<()> {
        // Out of room: completions will call back in here; leave notifications off. Otherwise
        // re-enable them; if more arrived meanwhile, the caller runs another pass with a fresh
        // view of guest memory (the frontend may have added a region since `mem` was taken).
        // A pass that found nothing although more was reported is not repeated: virtio-queue
        // pops nothing from a ring it considers broken (an avail index too far ahead, an avail
        // ring at address 0) while re-enabling notifications still reports entries.
        if self.held {
            // Notifications stay off: the timer wakes the queue.
            return Ok(());
        }
        let last_was_empty_retry = std::mem::take(&mut self.retried_empty);
        let retry = popped > 0 || !last_was_empty_retry;
        if !self.free.is_empty()
            && queue.enable_notification(mem).map_err(io::Error::other)?
            && ring::avail_index_ok(queue, mem)
            && retry
        {
            self.retried_empty = popped == 0;
            self.more = true;
        }
        Ok(())
    }

    /// With `defer` set, passes leave the driver's notifications off at their end, so a caller
    /// that polls the ring afterwards is not kicked for what it finds; it must call `rearm`
    /// before it sleeps.
    pub fn set_defer_rearm(&mut self, defer: bool) {
        self.defer_rearm = defer;
    }

    /// Whether a pass popped or completed anything since the last call. Clears the flag.
    pub fn take_progress(&mut self) -> bool {
        std::mem::take(&mut self.progress)
    }

    /// Whether the engine has finished operations to publish (no system call).
    pub fn has_completions(&mut self) -> bool {
        self.engine.as_mut().is_some_and(|e| e.has_completions())
    }

    /// Whether new requests may be taken (not stopping).
    pub fn accepting(&self) -> bool {
        !self.stopping
    }

    /// Spins for up to `budget` until there is work: `Some(true)` for finished asynchronous
    /// requests, `Some(false)` for new requests (with room to take them), `None` when the
    /// budget ran out. Reads only shared memory: no system calls but the vDSO clock.
    pub fn poll_for_work(
        &mut self,
        queue: &Queue,
        mem: &GuestMem,
        budget: Duration,
    ) -> Option<bool> {
        let deadline = Instant::now() + budget;
        loop {
            if self.has_completions() {
                return Some(true);
            }
            if !self.free.is_empty() && !self.stopping && ring::has_avail(queue, mem) {
                return Some(false);
            }
            if Instant::now() >= deadline {
                return None;
            }
            for _ in 0..16 {
                std::hint::spin_loop();
            }
        }
    }

    /// Whether in-flight tracking was taken up since the queue started.
    pub fn tracking_started(&self) -> bool {
        self.tracking_started
    }

    /// Takes up in-flight tracking for a queue that just started: with `tracker` (the queue's
    /// part of the frontend's region), resubmits what a previous worker left in flight, oldest
    /// first, and moves the ring position to just past what was taken from it, before any new
    /// request. Returns whether used entries were added.
    pub fn start_tracking(
        &mut self,
        tracker: Option<QueueTracker>,
        queue: &mut Queue,
        mem: &Arc<GuestMem>,
    ) -> io::Result<bool> {
        self.tracking_started = true;
        self.tracker = tracker;
        let Some(t) = self.tracker.as_mut() else {
            return Ok(false);
        };
        let ring_used = queue
            .used_idx(&**mem, Ordering::Acquire)
            .map_err(io::Error::other)?
            .0;
        let rec = t.recover(ring_used);
        if rec.repaired > 0 {
            info!(
                "in-flight region: {} request(s) completed just before the previous worker \
                 ended",
                rec.repaired
            );
        }
        if let Some(next) = rec.next_avail {
            if next != queue.next_avail() {
                debug!(
                    "queue resumes at avail index {next} (the frontend's base was {})",
                    queue.next_avail()
                );
            }
            queue.set_next_avail(next);
            queue.set_next_used(ring_used);
        }
        if rec.resubmit.is_empty() {
            return Ok(false);
        }
        info!(
            "resubmitting {} request(s) the previous worker left in flight",
            rec.resubmit.len()
        );
        debug!(
            "resubmitting heads {:?}; ring: used {ring_used}, avail {:?}, next avail {}",
            rec.resubmit,
            queue.avail_idx(&**mem, Ordering::Acquire).map(|w| w.0),
            queue.next_avail()
        );
        self.watch = rec.resubmit.clone();
        self.shared
            .stats
            .resubmitted
            .fetch_add(rec.resubmit.len() as u64, Ordering::Relaxed);
        let mut used = false;
        for head in rec.resubmit {
            // Cannot run out: the heads are distinct descriptor indices of this queue.
            if self.free.is_empty() {
                warn!("no room to resubmit request {head}");
                break;
            }
            let table = GuestAddress(queue.desc_table());
            let chain = HeadChain::new(mem, table, queue.size(), head);
            let chain = request::read_chain(chain, &mut self.descs);
            used |= self.start(head, chain, queue, mem)?;
        }
        if let Some(e) = self.engine.as_mut() {
            e.kick()?;
        }
        Ok(used)
    }

    /// The queue stopped (GET_VRING_BASE): tracking is taken up again when it restarts, from
    /// whatever region is current then.
    pub fn stop_tracking(&mut self) {
        self.tracker = None;
        self.tracking_started = false;
    }

    /// Takes no new requests from now on (a clean shutdown drains what is in flight).
    pub fn quiesce(&mut self) {
        self.stopping = true;
    }

    /// Takes the queue's part (number `index`) of the in-flight region the frontend sets in
    /// `slot`, whenever the queue starts.
    pub fn track_in(&mut self, slot: Arc<InflightSlot>, index: usize) {
        self.inflight = Some((slot, index));
    }

    /// The guest memory as the frontend last set it.
    fn memory(&self) -> Arc<GuestMem> {
        self.mem.memory().into_inner()
    }

    /// This queue's part of the frontend's in-flight region, if it set one that covers it.
    fn tracker(&self, queue_size: u16) -> Option<QueueTracker> {
        let (slot, index) = self.inflight.as_ref()?;
        let r = slot.get()?;
        let t = r.queue(*index, queue_size);
        if t.is_none() {
            warn!(
                "in-flight region of {} queues of {} does not cover queue {index} of \
                 {queue_size}: not tracking it",
                r.num_queues(),
                r.queue_size(),
            );
        }
        t
    }

    /// Whether requests arrived during the last pass and another pass (with a freshly loaded
    /// guest memory) should run. Clears the flag.
    pub fn take_more(&mut self) -> bool {
        std::mem::take(&mut self.more)
    }

    /// Publishes finished asynchronous requests, then takes new ones if room appeared.
    pub fn process_completions(
        &mut self,
        queue: &mut Queue,
        mem: &Arc<GuestMem>,
    ) -> io::Result<bool> {
        let Some(engine) = self.engine.as_mut() else {
            return Ok(false);
        };
        engine.consume_event();
        let mut done = std::mem::take(&mut self.done);
        engine.reap(&mut done);
        self.tick();
        let mut used = false;
        self.progress |= !done.is_empty();
        for c in done.drain(..) {
            used |= self.complete(c, queue, mem)?;
        }
        self.done = done;
        if used {
            used |= self.process_queue(queue, mem)?;
        } else {
            metrics::set(&self.stats.in_flight, self.in_flight() as u64);
        }
        Ok(used)
    }

    /// Waits until nothing is in flight, publishing each completion.
    pub fn drain(&mut self, queue: &mut Queue, mem: &Arc<GuestMem>) -> io::Result<bool> {
        let mut used = false;
        while self.in_flight() > 0 {
            if let Some(e) = self.engine.as_mut() {
                e.kick()?;
                e.wait()?;
                let mut done = std::mem::take(&mut self.done);
                e.reap(&mut done);
                self.tick();
                for c in done.drain(..) {
                    used |= self.complete(c, queue, mem)?;
                }
                self.done = done;
            }
        }
        metrics::set(&self.stats.in_flight, 0);
        Ok(used)
    }

    /// Waits until nothing is in flight and forgets the completions: the frontend is gone.
    pub fn abandon(&mut self) {
        while self.in_flight() > 0 {
            let Some(e) = self.engine.as_mut() else { break };
            if e.kick().and_then(|_| e.wait()).is_err() {
                break;
            }
            let mut done = Vec::new();
            e.reap(&mut done);
            for c in done {
                self.release(c.token);
            }
        }
    }

    fn release(&mut self, token: u32) {
        if let Some(slot) = self.slots.get_mut(token as usize) {
            slot.mem = None;
            slot.iov.clear();
            self.free.push(token);
        }
    }

    fn complete(&mut self, c: Completion, queue: &mut Queue, mem: &GuestMem) -> io::Result<bool> {
        let Some(slot) = self.slots.get(c.token as usize) else {
            return Ok(false);
        };
        let (head, status_addr, used_len, t0) = (slot.head, slot.status, slot.used_len, slot.t0);
        if slot.into_guest && dirty::logging() {
            // The kernel wrote these behind vm-memory's back: log them before the used entry.
            let m = slot.mem.as_deref().unwrap_or(mem);
            for v in &slot.iov {
                dirty::mark_host(m, v.iov_base.cast_const().cast(), v.iov_len);
            }
        }
        let status = match c.result {
            Ok(_) => VIRTIO_BLK_S_OK,
            Err(e) => {
                self.note_error(format_args!("I/O error: {e}"));
                VIRTIO_BLK_S_IOERR
            }
        };
        self.release(c.token);
        self.finish(queue, mem, head, status_addr, status, used_len, t0)?;
        Ok(true)
    }

    fn note_error(&mut self, msg: std::fmt::Arguments<'_>) {
        self.shared.stats.errors.fetch_add(1, Ordering::Relaxed);
        // A hostile guest must not be able to flood the host's logs.
        if self.logged_errors < 16 {
            self.logged_errors += 1;
            warn!("request failed: {msg}");
        } else {
            debug!("request failed: {msg}");
        }
    }

    /// Writes the status, counts the completion (and its latency, from `t0`) and publishes.
    #[allow(clippy::too_many_arguments)]
    fn finish(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMem,
        head: u16,
        status_addr: GuestAddress,
        status: u8,
        used_len: u32,
        t0: Option<Instant>,
    ) -> io::Result<()> {
        // The address was checked when the chain was parsed; a failure here means the memory
        // table changed under us, and the guest then gets whatever its status byte held.
        let _ = guest::write_u8(mem, status_addr, status);
        let i = match status {
            VIRTIO_BLK_S_OK => 0,
            VIRTIO_BLK_S_UNSUPP => 2,
            _ => 1,
        };
        metrics::inc(&self.stats.completions[i]);
        if let (Some(t0), Some(clock)) = (t0, self.clock) {
            if t0 < clock {
                // Reaped in a batch of completions: the batch's time.
                self.stats
                    .latency
                    .observe(nanos(clock - t0), &LATENCY_BOUNDS_NS);
            } else {
                // Taken and finished in this pass: timed at the pass's end, all together.
                self.finished_in_pass += 1;
            }
        }
        self.publish(queue, mem, head, used_len)
    }

    /// Puts `head` in the used ring, keeping the in-flight region in step.
    fn publish(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMem,
        head: u16,
        used_len: u32,
    ) -> io::Result<()> {
        if let Some(t) = self.tracker.as_mut() {
            t.before_used(head);
        }
        queue
            .add_used(mem, head, used_len)
            .map_err(io::Error::other)?;
        if let Some(t) = self.tracker.as_mut() {
            t.after_used(head, queue.next_used());
        }
        if let Some(i) = self.watch.iter().position(|&h| h == head) {
            self.watch.swap_remove(i);
            debug!(
                "resubmitted request {head} completed (used index now {})",
                queue.next_used()
            );
        }
        Ok(())
    }

    /// Starts one request. Returns true if it completed on the spot (a used entry was added).
    /// Starts the request in `self.descs` (read from chain `head`, or cut short if `chain`
    /// says so).
    fn start(
        &mut self,
        head: u16,
        chain: Result<(), ChainError>,
        queue: &mut Queue,
        mem: &Arc<GuestMem>,
    ) -> io::Result<bool> {
        #[cfg(feature = "jail-probe")]
        vhostbox_common::sandbox::probe::tick();
        let limits = Limits {
            capacity_sectors: self.shared.disk.sectors(),
            max_segments: MAX_SEGMENTS,
            max_segment_bytes: request::SIZE_MAX,
        };
        let segs = std::mem::take(&mut self.segs);
        let mut parsed = request::parse(mem, &self.descs, &limits, segs);
        // The frontend may have added a region (and had it acknowledged) after this pass
        // loaded its view and before it queued the request: look again in the current one.
        let fresh = match &parsed {
            Err((e, _)) if e.is_memory() => Some(self.memory()).filter(|m| !Arc::ptr_eq(m, mem)),
            _ => None,
        };
        if let Some(m) = &fresh {
            parsed = request::parse(m, &self.descs, &limits, Vec::new());
        }
        let mem = fresh.as_ref().unwrap_or(mem);
        let (err, status): (&dyn std::fmt::Display, _) = match (&parsed, &chain) {
            (Ok(_), Ok(())) => (&"", None),
            // Whatever a broken chain's descriptors say, it is not executed.
            (Ok(r), Err(e)) => (e, Some(r.status)),
            (Err((e, status)), _) => (e, *status),
        };
        if parsed.is_err() || chain.is_err() {
            self.note_error(format_args!("malformed request {head}: {err}"));
            metrics::inc(&self.stats.malformed);
            match status {
                Some(s) => self.finish(queue, mem, head, s, VIRTIO_BLK_S_IOERR, 1, self.clock)?,
                // No status byte: the request can only be returned with nothing written.
                None => self.publish(queue, mem, head, 0)?,
            }
            if let Ok(r) = parsed {
                self.segs = r.data;
            }
            return Ok(true);
        }
        let Ok(req) = parsed else {
            unreachable!("checked above")
        };
        let r = self.execute(head, &req, queue, mem);
        self.segs = req.data;
        r
    }

    fn execute(
        &mut self,
        head: u16,
        req: &Request,
        queue: &mut Queue,
        mem: &Arc<GuestMem>,
    ) -> io::Result<bool> {
        metrics::inc(&self.stats.requests[QueueCounters::type_index(req.ty)]);
        match req.ty {
            RequestType::In => metrics::add(&self.stats.bytes[0], req.data_len),
            RequestType::Out => metrics::add(&self.stats.bytes[1], req.data_len),
            _ => {}
        }
        let disk = &self.shared.disk;
        let (status, used_len) = match req.ty {
            RequestType::In | RequestType::Out => {
                self.pass_bytes = self.pass_bytes.saturating_add(req.data_len as usize);
                let write = req.ty == RequestType::Out;
                let in_len = if write { 1 } else { req.data_len as u32 + 1 };
                if write && disk.readonly {
                    self.note_error(format_args!("write to a read-only device"));
                    (VIRTIO_BLK_S_IOERR, 1)
                } else if disk.kind == DiskKind::Null {
                    if !write && zero_fill(mem, &req.data).is_err() {
                        (VIRTIO_BLK_S_IOERR, 1)
                    } else {
                        (VIRTIO_BLK_S_OK, in_len)
                    }
                } else {
                    let offset = req.sector << SECTOR_SHIFT;
                    let op = if write {
                        Op::Write {
                            offset,
                            dsync: !self.shared.writeback.load(Ordering::Relaxed),
                        }
                    } else {
                        Op::Read { offset }
                    };
                    return self.submit(head, req.status, in_len, op, Some(&req.data), queue, mem);
                }
            }
            RequestType::Flush => {
                if disk.kind == DiskKind::Null || disk.readonly {
                    (VIRTIO_BLK_S_OK, 1)
                } else {
                    return self.submit(head, req.status, 1, Op::Flush, None, queue, mem);
                }
            }
            RequestType::GetId => {
                let n = write_serial(mem, &req.data, &self.shared.serial);
                match n {
                    Ok(n) => (VIRTIO_BLK_S_OK, n as u32 + 1),
                    Err(_) => (VIRTIO_BLK_S_IOERR, 1),
                }
            }
            RequestType::Discard | RequestType::WriteZeroes => (self.discard(req, mem), 1),
            RequestType::Unsupported(t) => {
                self.note_error(format_args!("unsupported request type {t}"));
                (VIRTIO_BLK_S_UNSUPP, 1)
            }
        };
        self.finish(queue, mem, head, req.status, status, used_len, self.clock)?;
        Ok(true)
    }

    /// Discard and write-zeroes run synchronously in either engine: they are rare, and the
    /// block-device ioctls behind them have no io_uring form.
    fn discard(&mut self, req: &Request, mem: &GuestMem) -> u8 {
        let zeroes = req.ty == RequestType::WriteZeroes;
        if self.shared.disk.readonly {
            self.note_error(format_args!("discard/write-zeroes on a read-only device"));
            return VIRTIO_BLK_S_IOERR;
        }
        let segments = match request::read_discard_segments(mem, req, MAX_DISCARD_SEGMENTS) {
            Ok(s) => s,
            Err(e) => {
                self.note_error(format_args!("discard/write-zeroes: {e}"));
                return VIRTIO_BLK_S_IOERR;
            }
        };
        let capacity = self.shared.disk.sectors();
        // Validate every segment before touching the disk: a bad request changes nothing.
        for s in &segments {
            let unmap = s.flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
            if s.flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 || (!zeroes && unmap) {
                self.note_error(format_args!("discard flags {:#x}", s.flags));
                return VIRTIO_BLK_S_UNSUPP;
            }
            match s.sector.checked_add(u64::from(s.num_sectors)) {
                Some(end) if end <= capacity => {}
                _ => {
                    self.note_error(format_args!(
                        "discard range {}+{} beyond capacity {capacity}",
                        s.sector, s.num_sectors
                    ));
                    return VIRTIO_BLK_S_IOERR;
                }
            }
        }
        for s in &segments {
            let (off, len) = (
                s.sector << SECTOR_SHIFT,
                u64::from(s.num_sectors) << SECTOR_SHIFT,
            );
            if len == 0 {
                continue;
            }
            let unmap = s.flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
            let r = if zeroes {
                self.shared.disk.write_zeroes(off, len, unmap)
            } else {
                self.shared.disk.discard(off, len)
            };
            if let Err(e) = r {
                self.note_error(format_args!("discard/write-zeroes: {e}"));
                return VIRTIO_BLK_S_IOERR;
            }
        }
        if zeroes
            && !self.shared.writeback.load(Ordering::Relaxed)
            && self.shared.disk.flush().is_err()
        {
            return VIRTIO_BLK_S_IOERR;
        }
        VIRTIO_BLK_S_OK
    }

    #[allow(clippy::too_many_arguments)]
    fn submit(
        &mut self,
        head: u16,
        status: GuestAddress,
        used_len: u32,
        op: Op,
        data: Option<&[Segment]>,
        queue: &mut Queue,
        mem: &Arc<GuestMem>,
    ) -> io::Result<bool> {
        let token = self.free.pop().expect("caller checked for a free slot");
        let slot = &mut self.slots[token as usize];
        slot.head = head;
        slot.status = status;
        slot.used_len = used_len;
        slot.t0 = self.clock;
        slot.into_guest = matches!(op, Op::Read { .. });
        slot.iov.clear();
        let mut bad = false;
        for s in data.unwrap_or(&[]) {
            if let Some(vs) = guest::slice(mem, s.addr, s.len as usize) {
                slot.iov.push(libc::iovec {
                    iov_base: vs.ptr_guard_mut().as_ptr().cast(),
                    iov_len: vs.len(),
                });
                continue;
            }
            for vs in mem.get_slices(s.addr, s.len as usize) {
                match vs {
                    Ok(vs) => slot.iov.push(libc::iovec {
                        iov_base: vs.ptr_guard_mut().as_ptr().cast(),
                        iov_len: vs.len(),
                    }),
                    Err(_) => bad = true,
                }
            }
        }
        if bad || slot.iov.len() > MAX_SEGMENTS {
            self.release(token);
            self.finish(queue, mem, head, status, VIRTIO_BLK_S_IOERR, 1, self.clock)?;
            return Ok(true);
        }
        let engine = self
            .engine
            .as_mut()
            .expect("file-backed devices have an engine");
        if let Op::Read { offset } = op {
            // A read the ring would carry alone (nothing queued, nothing more waiting), or a
            // large one, is cheaper served now if the page cache has it all.
            let large = slot.iov.iter().map(|v| v.iov_len).sum::<usize>() >= READ_NOW_BYTES;
            if large || (engine.queued() == 0 && !ring::has_avail(queue, &**mem)) {
                // SAFETY: the iovecs point into guest memory checked by get_slices and kept
                // mapped by `mem` for the duration of the call.
                if let Some(n) = unsafe { engine.read_now(offset, &slot.iov) } {
                    return self.complete(
                        Completion {
                            token,
                            result: Ok(n),
                        },
                        queue,
                        mem,
                    );
                }
            }
        }
        slot.mem = Some(mem.clone());
        // SAFETY: the iovecs point into guest memory checked by get_slices, kept mapped by the
        // slot's Arc until the completion is reaped; the iovec array lives in the slot, which
        // is not touched until then either.
        let outcome = unsafe { engine.submit(op, &slot.iov, token) };
        match outcome {
            Outcome::Submitted => Ok(false),
            Outcome::Executed(result) => self.complete(Completion { token, result }, queue, mem),
        }
    }
}

fn nanos(d: Duration) -> u64 {
    d.as_nanos().min(u128::from(u64::MAX)) as u64
}

impl Drop for BlkQueue {
    fn drop(&mut self) {
        // Guest buffers must outlive the kernel's use of them.
        self.abandon();
    }
}

fn zero_fill(mem: &GuestMem, data: &[Segment]) -> Result<(), ()> {
    for s in data {
        if let Some(vs) = guest::slice(mem, s.addr, s.len as usize) {
            // SAFETY: the slice lies in guest memory (one region); writing zeros there is
            // exactly what a read of the null device does.
            unsafe { std::ptr::write_bytes(vs.ptr_guard_mut().as_ptr(), 0, vs.len()) };
            vs.bitmap().mark_dirty(0, vs.len());
            continue;
        }
        for vs in mem.get_slices(s.addr, s.len as usize) {
            let vs = vs.map_err(|_| ())?;
            // SAFETY: the slice was checked to lie in guest memory; writing zeros there is
            // exactly what a read of the null device does.
            unsafe { std::ptr::write_bytes(vs.ptr_guard_mut().as_ptr(), 0, vs.len()) };
            vs.bitmap().mark_dirty(0, vs.len());
        }
    }
    Ok(())
}

fn write_serial(mem: &GuestMem, data: &[Segment], serial: &[u8]) -> Result<usize, ()> {
    let mut off = 0usize;
    for s in data {
        if off >= serial.len() {
            break;
        }
        let n = (s.len as usize).min(serial.len() - off);
        mem.write_slice(&serial[off..off + n], s.addr)
            .map_err(|_| ())?;
        off += n;
    }
    Ok(off)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{EngineKind, SyncEngine, UringEngine};
    use crate::request::*;
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    use vhostbox_common::test_utils::{Layout, SplitRing};
    use vm_memory::GuestMemoryAtomic;

    /// The driver's side of the queue under test.
    type Vq = SplitRing<Arc<GuestMem>>;

    fn ring(mem: &Arc<GuestMem>) -> Vq {
        SplitRing::new(mem.clone(), QSIZE, Layout::packed(0x1000, QSIZE))
    }

    fn handle(mem: &Arc<GuestMem>) -> GuestMemHandle {
        GuestMemoryAtomic::from(mem.clone())
    }
    const MEM_SIZE: usize = 16 << 20;
    const QSIZE: u16 = 64;
    const HDR: u64 = 0x10_0000;
    const DATA: u64 = 0x20_0000;
    const STATUS: u64 = 0x30_0000;
    const DATA2: u64 = 0x40_0000;

    struct Env {
        _img: tempfile::NamedTempFile,
        path: std::path::PathBuf,
        mem: Arc<GuestMem>,
        shared: Arc<Shared>,
    }

    fn env(size: usize, readonly: bool) -> Env {
        let mut img = tempfile::NamedTempFile::new().unwrap();
        img.write_all(&vec![0u8; size]).unwrap();
        let path = img.path().to_owned();
        let disk = Disk::open(&path, readonly, false, None).unwrap();
        let mut serial = [0u8; VIRTIO_BLK_ID_BYTES];
        serial[..7].copy_from_slice(b"SER-123");
        let shared = Arc::new(Shared {
            disk,
            serial,
            writeback: AtomicBool::new(true),
            stats: Stats::default(),
            throttle: Default::default(),
        });
        let mem = Arc::new(GuestMem::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap());
        Env {
            _img: img,
            path,
            mem,
            shared,
        }
    }

    fn worker(e: &Env, kind: EngineKind) -> BlkQueue {
        let fd = e.shared.disk.fd().unwrap();
        let engine = match kind {
            EngineKind::Sync => Engine::Sync(SyncEngine::new(fd)),
            EngineKind::IoUring => Engine::Uring(Box::new(UringEngine::new(fd, 64).unwrap())),
        };
        BlkQueue::new(e.shared.clone(), Some(engine), 0, QSIZE, handle(&e.mem))
    }

    fn header(mem: &GuestMem, at: u64, ty: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&ty.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(at)).unwrap();
    }

    /// Writes one chain of (addr, len, device-writable) at descriptor index `at` and makes it
    /// available.
    fn add_chain(vq: &mut Vq, at: u16, descs: &[(u64, u32, bool)]) {
        vq.write_chain_at(at, descs);
        vq.publish(at);
    }

    /// Runs the worker until everything available is complete; returns the used entries
    /// (head, len) added by this call.
    fn run(w: &mut BlkQueue, q: &mut Queue, mem: &Arc<GuestMem>) -> Vec<(u32, u32)> {
        let before = q.next_used();
        w.process_queue(q, mem).unwrap();
        w.drain(q, mem).unwrap();
        let after = q.next_used();
        let used_ring = q.used_ring();
        (0..after.wrapping_sub(before))
            .map(|k| {
                let i = before.wrapping_add(k);
                let slot = u64::from(i % QSIZE);
                let at = GuestAddress(used_ring + 4 + slot * 8);
                let id: u32 = mem.read_obj(at).unwrap();
                let len: u32 = mem.read_obj(GuestAddress(at.0 + 4)).unwrap();
                (id, len)
            })
            .collect()
    }

    fn status(mem: &GuestMem, at: u64) -> u8 {
        mem.read_obj(GuestAddress(at)).unwrap()
    }

    fn for_engines(f: impl Fn(EngineKind)) {
        f(EngineKind::Sync);
        f(EngineKind::IoUring);
    }

    /// A worker that died with requests in flight, one of them completed out of order: its
    /// successor resubmits exactly the open ones, oldest first, does not redo the completed
    /// one, ignores the frontend's (stale) ring base and then takes new requests from the
    /// right place.
    #[test]
    fn successor_resubmits_what_was_in_flight() {
        use vhostbox_common::inflight::{InflightFd, InflightRegion};
        for_engines(|kind| {
            let e = env(1 << 20, false);
            let mut vq = ring(&e.mem);
            let heads = [0u16, 4, 8, 12];
            for (k, &h) in heads.iter().enumerate() {
                let at = 0x1000 * k as u64;
                header(&e.mem, HDR + at, VIRTIO_BLK_T_OUT, 8 * k as u64);
                e.mem
                    .write_slice(&[k as u8 + 1; 4096], GuestAddress(DATA + at))
                    .unwrap();
                add_chain(
                    &mut vq,
                    h,
                    &[
                        (HDR + at, 16, false),
                        (DATA + at, 4096, false),
                        (STATUS + at, 1, true),
                    ],
                );
            }
            let fd = InflightFd::new(1, QSIZE).unwrap();
            let size = fd.prepare(1, QSIZE).unwrap();
            // SAFETY: dup of our own memfd, owned by the new OwnedFd.
            let dup = unsafe {
                <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(libc::dup(
                    fd.raw_fd(),
                ))
            };
            let region = Arc::new(InflightRegion::map(&dup, size, 0, 1, QSIZE).unwrap());

            // The predecessor: takes all four, completes head 4 only, dies.
            let mut dead: Queue = vq.queue();
            let mut t = region.queue(0, QSIZE).unwrap();
            t.recover(0);
            for _ in 0..4 {
                let c = dead.pop_descriptor_chain(&*e.mem).unwrap();
                t.begin(c.head_index());
            }
            t.before_used(4);
            dead.add_used(&*e.mem, 4, 1).unwrap();
            t.after_used(4, 1);

            // The successor, told base 1 by the frontend (its used index).
            let mut q: Queue = vq.queue();
            q.set_next_avail(1);
            q.set_next_used(1);
            let mut w = worker(&e, kind);
            w.start_tracking(region.queue(0, QSIZE), &mut q, &e.mem)
                .unwrap();
            assert_eq!(q.next_avail(), 4, "{kind:?}: past the four taken");
            run(&mut w, &mut q, &e.mem);
            let mut ids: Vec<u32> = (1..q.next_used())
                .map(|i| {
                    let at = q.used_ring() + 4 + u64::from(i % QSIZE) * 8;
                    e.mem.read_obj(GuestAddress(at)).unwrap()
                })
                .collect();
            if kind == EngineKind::IoUring {
                ids.sort();
            }
            assert_eq!(ids, vec![0, 8, 12], "{kind:?}: exactly the open ones");
            assert_eq!(e.shared.stats.resubmitted.load(Ordering::Relaxed), 3);
            let img = std::fs::read(&e.path).unwrap();
            for k in 0..4usize {
                let want = if k == 1 { 0 } else { k as u8 + 1 };
                assert!(
                    img[k * 4096..(k + 1) * 4096].iter().all(|&b| b == want),
                    "{kind:?}: sector range of request {k}"
                );
            }
            // A new request is taken from avail position 4, not a repeat of 8 or 12.
            header(&e.mem, HDR + 0x8000, VIRTIO_BLK_T_OUT, 64);
            add_chain(
                &mut vq,
                20,
                &[
                    (HDR + 0x8000, 16, false),
                    (DATA, 512, false),
                    (STATUS, 1, true),
                ],
            );
            assert_eq!(run(&mut w, &mut q, &e.mem), vec![(20, 1)]);
            // Nothing is left marked: a third worker would resubmit nothing.
            let rec = region.queue(0, QSIZE).unwrap().recover(5);
            assert!(rec.resubmit.is_empty(), "{kind:?}: {rec:?}");
            assert_eq!(rec.next_avail, Some(5));
        });
    }

    /// Large requests end a pass after PASS_BYTES, so the caller publishes and notifies
    /// before the next one is copied; the rest follow in later passes, all complete.
    #[test]
    fn large_requests_end_the_pass_early() {
        for_engines(|kind| {
            let e = env(4 << 20, false);
            let mut vq = ring(&e.mem);
            let mut q: Queue = vq.queue();
            let mut w = worker(&e, kind);
            let len = PASS_BYTES as u32;
            for k in 0..3u64 {
                let at = 0x1000 * k;
                header(&e.mem, HDR + at, VIRTIO_BLK_T_IN, k * u64::from(len) / 512);
                add_chain(
                    &mut vq,
                    (k * 3) as u16,
                    &[
                        (HDR + at, 16, false),
                        (DATA + k * u64::from(len), len, true),
                        (STATUS + at, 1, true),
                    ],
                );
            }
            let mut passes = 0;
            loop {
                w.process_queue(&mut q, &e.mem).unwrap();
                passes += 1;
                w.drain(&mut q, &e.mem).unwrap();
                if !w.take_more() {
                    break;
                }
                assert_eq!(q.next_avail(), passes, "one large request per pass");
                assert!(passes <= 3);
            }
            assert_eq!(passes, 3);
            assert_eq!(q.next_used(), 3);
            for k in 0..3u64 {
                assert_eq!(status(&e.mem, STATUS + 0x1000 * k), VIRTIO_BLK_S_OK);
            }
        });
    }

    /// Polling: a deferred pass leaves the driver's kicks off (EVENT_IDX: avail_event not
    /// moved) until `rearm`; `poll_for_work` finds new requests and finished I/O, gives up
    /// after its budget on an empty or broken ring, and takes nothing once stopping.
    #[test]
    fn polling_finds_work_and_defers_kicks() {
        for_engines(|kind| {
            let e = env(1 << 20, false);
            let mut vq = ring(&e.mem);
            let mut q: Queue = vq.queue();
            q.set_event_idx(true);
            let avail_event = GuestAddress(vq.layout().used + 4 + 8 * u64::from(QSIZE));
            let event = |mem: &GuestMem| -> u16 { mem.read_obj(avail_event).unwrap() };
            let budget = Duration::from_micros(200);
            let mut w = worker(&e, kind);
            w.set_defer_rearm(true);

            // Empty ring: nothing found, after the budget.
            let t = Instant::now();
            assert_eq!(w.poll_for_work(&q, &e.mem, budget), None);
            assert!(t.elapsed() >= budget);

            header(&e.mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
            add_chain(&mut vq, 0, &[(HDR, 16, false), (STATUS, 1, true)]);
            assert_eq!(w.poll_for_work(&q, &e.mem, budget), Some(false));
            w.process_queue(&mut q, &e.mem).unwrap();
            w.drain(&mut q, &e.mem).unwrap();
            assert_eq!(q.next_used(), 1);
            assert!(w.take_progress());
            assert!(!w.take_more());
            assert_eq!(event(&e.mem), 0, "a deferred pass must not ask for kicks");
            assert_eq!(w.poll_for_work(&q, &e.mem, budget), None);
            w.rearm(&mut q, &e.mem).unwrap();
            assert_eq!(event(&e.mem), 1, "rearm asks for the next kick");
            assert!(!w.take_more());

            // Reads in flight on io_uring (two in one pass, so the ring carries them rather
            // than the page cache serving them on the spot): their completions are found
            // without the eventfd.
            if kind == EngineKind::IoUring {
                header(&e.mem, HDR, VIRTIO_BLK_T_IN, 0);
                header(&e.mem, HDR + 0x100, VIRTIO_BLK_T_IN, 8);
                add_chain(
                    &mut vq,
                    2,
                    &[(HDR, 16, false), (DATA, 4096, true), (STATUS, 1, true)],
                );
                add_chain(
                    &mut vq,
                    9,
                    &[
                        (HDR + 0x100, 16, false),
                        (DATA2, 4096, true),
                        (STATUS + 0x100, 1, true),
                    ],
                );
                w.process_queue(&mut q, &e.mem).unwrap();
                assert_eq!(w.in_flight(), 2);
                let found = w.poll_for_work(&q, &e.mem, Duration::from_secs(5));
                assert_eq!(found, Some(true));
                w.process_completions(&mut q, &e.mem).unwrap();
                assert_eq!(q.next_used(), 3);
                assert_eq!(w.in_flight(), 0);
            }

            // A broken avail index (more than a queue ahead) is not work.
            let idx: u16 = e.mem.read_obj(GuestAddress(vq.layout().avail + 2)).unwrap();
            e.mem
                .write_obj(
                    idx.wrapping_add(QSIZE + 3),
                    GuestAddress(vq.layout().avail + 2),
                )
                .unwrap();
            assert_eq!(w.poll_for_work(&q, &e.mem, budget), None);
            e.mem
                .write_obj(idx, GuestAddress(vq.layout().avail + 2))
                .unwrap();

            // Stopping: new requests are not work any more.
            add_chain(&mut vq, 6, &[(HDR, 16, false), (STATUS, 1, true)]);
            assert_eq!(w.poll_for_work(&q, &e.mem, budget), Some(false));
            w.quiesce();
            assert!(!w.accepting());
            assert_eq!(w.poll_for_work(&q, &e.mem, budget), None);
        });
    }

    /// io-uring engine: a read issued alone, or a large one, is served from the page cache on
    /// the spot (nothing left in flight after the pass); reads that share a pass go through
    /// the ring; an O_DIRECT image never reads on the spot. The data is right every way.
    #[test]
    fn lone_and_large_reads_are_served_from_the_cache_now() {
        let read = |vq: &mut Vq, mem: &GuestMem, k: u64, sector: u64, len: u32| {
            header(mem, HDR + 0x100 * k, VIRTIO_BLK_T_IN, sector);
            add_chain(
                vq,
                (k * 3) as u16,
                &[
                    (HDR + 0x100 * k, 16, false),
                    (DATA + (k << 17), len, true),
                    (STATUS + 0x100 * k, 1, true),
                ],
            );
        };
        let expect = |mem: &GuestMem, k: u64, sector: u64, len: usize| {
            assert_eq!(status(mem, STATUS + 0x100 * k), VIRTIO_BLK_S_OK);
            let mut got = vec![0u8; len];
            mem.read_slice(&mut got, GuestAddress(DATA + (k << 17)))
                .unwrap();
            let want: Vec<u8> = (0..len as u64)
                .map(|i| (((sector << 9) + i) % 251) as u8)
                .collect();
            assert!(got == want, "request {k}: wrong data");
        };
        for direct in [false, true] {
            let e = env(1 << 20, false);
            let pattern: Vec<u8> = (0..1u64 << 20).map(|i| (i % 251) as u8).collect();
            std::fs::OpenOptions::new()
                .write(true)
                .open(&e.path)
                .unwrap()
                .write_all_at(&pattern, 0)
                .unwrap();
            let e = if direct {
                // The test file system supports O_DIRECT on every machine this runs on; a
                // failure to open is a failure of the test, not a reason to skip half of it.
                let disk = Disk::open(&e.path, false, true, None).expect("O_DIRECT open");
                let shared = Arc::new(Shared {
                    disk,
                    serial: e.shared.serial,
                    writeback: AtomicBool::new(true),
                    stats: Stats::default(),
                    throttle: Default::default(),
                });
                Env { shared, ..e }
            } else {
                e
            };
            let mut vq = ring(&e.mem);
            let mut q: Queue = vq.queue();
            let mut w = worker(&e, EngineKind::IoUring);

            // Alone: done on the spot unless O_DIRECT.
            read(&mut vq, &e.mem, 0, 8, 4096);
            w.process_queue(&mut q, &e.mem).unwrap();
            assert_eq!(w.in_flight(), usize::from(direct));
            w.drain(&mut q, &e.mem).unwrap();
            assert_eq!(q.next_used(), 1);
            expect(&e.mem, 0, 8, 4096);

            // Two in one pass: both through the ring.
            read(&mut vq, &e.mem, 1, 16, 4096);
            read(&mut vq, &e.mem, 2, 40, 4096);
            w.process_queue(&mut q, &e.mem).unwrap();
            assert_eq!(w.in_flight(), 2);
            w.drain(&mut q, &e.mem).unwrap();
            assert_eq!(q.next_used(), 3);
            expect(&e.mem, 1, 16, 4096);
            expect(&e.mem, 2, 40, 4096);

            // Large, with another request waiting: on the spot, then the pass ends.
            read(&mut vq, &e.mem, 3, 256, PASS_BYTES as u32);
            read(&mut vq, &e.mem, 4, 0, PASS_BYTES as u32);
            w.process_queue(&mut q, &e.mem).unwrap();
            assert_eq!(q.next_avail(), 4, "the pass ends after {PASS_BYTES} bytes");
            assert_eq!(w.in_flight(), usize::from(direct));
            w.drain(&mut q, &e.mem).unwrap();
            assert!(w.take_more());
            run(&mut w, &mut q, &e.mem);
            assert_eq!(q.next_used(), 5);
            expect(&e.mem, 3, 256, PASS_BYTES);
            expect(&e.mem, 4, 0, PASS_BYTES);
        }
    }

    /// Regression (found by the net_queue fuzz target, the same loop shape): an avail index
    /// more than a queue's worth ahead must not make the worker ask for pass after pass.
    #[test]
    fn broken_avail_index_stops_the_queue() {
        let e = env(1 << 20, false);
        let mut vq = ring(&e.mem);
        let mut q: Queue = vq.queue();
        let mut w = worker(&e, EngineKind::Sync);
        e.mem
            .write_obj(QSIZE + 5, GuestAddress(vq.layout().avail + 2))
            .unwrap();
        assert!(!w.process_queue(&mut q, &e.mem).unwrap());
        assert!(!w.take_more(), "the caller would loop forever");
        // An avail ring at address 0 (virtio-queue pops nothing from it) with entries in its
        // index: at most one more pass, then the caller stops.
        q.try_set_avail_ring_address(GuestAddress(0)).unwrap();
        e.mem.write_obj(2u16, GuestAddress(2)).unwrap();
        let mut passes = 0;
        loop {
            w.process_queue(&mut q, &e.mem).unwrap();
            passes += 1;
            if !w.take_more() {
                break;
            }
            assert!(passes < 3, "the caller would loop forever");
        }
        // The allowance of one extra look comes back after a pass that took something:
        // otherwise a real race (a request made available just as notifications were
        // re-enabled) would be ignored and the queue would stall.
        w.process_queue(&mut q, &e.mem).unwrap();
        assert!(w.take_more(), "a first empty look gets one more");
        q.try_set_avail_ring_address(GuestAddress(vq.layout().avail))
            .unwrap();
        e.mem
            .write_obj(0u16, GuestAddress(vq.layout().avail + 2))
            .unwrap();
        header(&e.mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
        add_chain(&mut vq, 0, &[(HDR, 16, false), (STATUS, 1, true)]);
        assert_eq!(run(&mut w, &mut q, &e.mem), vec![(0, 1)]);
        q.try_set_avail_ring_address(GuestAddress(0)).unwrap();
        w.process_queue(&mut q, &e.mem).unwrap();
        assert!(w.take_more(), "one more look is due after progress");
        w.process_queue(&mut q, &e.mem).unwrap();
        assert!(!w.take_more());
    }

    /// A region the frontend added after a pass loaded its view of guest memory: once the
    /// connection's memory has it (the library updates the handle at ADD_MEM_REG) the request
    /// is re-parsed against the current memory and succeeds; if it does not, the request fails
    /// with IOERR (and the backend keeps going).
    #[test]
    fn request_in_a_region_added_during_a_pass() {
        for_engines(|kind| {
            let e = env(1 << 20, false);
            let new_at = 0x200_0000u64;
            let region = vm_memory::GuestRegionMmap::new(
                vm_memory::MmapRegion::new(1 << 20).unwrap(),
                GuestAddress(new_at),
            )
            .unwrap();
            let grown = Arc::new(e.mem.insert_region(Arc::new(region)).unwrap());
            for added in [false, true] {
                let mut vq = ring(&e.mem);
                let mut q: Queue = vq.queue();
                let mut w = worker(&e, kind);
                if added {
                    w.mem.lock().unwrap().replace((*grown).clone());
                }
                header(&e.mem, HDR, VIRTIO_BLK_T_OUT, 8);
                grown
                    .write_slice(&[0x5a; 4096], GuestAddress(new_at))
                    .unwrap();
                add_chain(
                    &mut vq,
                    0,
                    &[(HDR, 16, false), (new_at, 4096, false), (STATUS, 1, true)],
                );
                let used = run(&mut w, &mut q, &e.mem);
                assert_eq!(used.len(), 1);
                let mut back = vec![0u8; 4096];
                std::fs::File::open(&e.path)
                    .unwrap()
                    .read_exact_at(&mut back, 8 * 512)
                    .unwrap();
                if added {
                    assert_eq!(status(&e.mem, STATUS), VIRTIO_BLK_S_OK, "{kind:?}");
                    assert!(
                        back.iter().all(|&b| b == 0x5a),
                        "{kind:?}: data not written"
                    );
                } else {
                    assert_eq!(status(&e.mem, STATUS), VIRTIO_BLK_S_IOERR, "{kind:?}");
                    assert!(back.iter().all(|&b| b == 0), "{kind:?}: wrote anyway");
                }
            }
        });
    }

    #[test]
    fn write_then_read_round_trip() {
        for_engines(|kind| {
            let e = env(1 << 20, false);
            let mut vq = ring(&e.mem);
            let mut q: Queue = vq.queue();
            let mut w = worker(&e, kind);
            let data: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 251) as u8).collect();
            e.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
            header(&e.mem, HDR, VIRTIO_BLK_T_OUT, 16);
            // Data split over two descriptors.
            add_chain(
                &mut vq,
                0,
                &[
                    (HDR, 16, false),
                    (DATA, 4096, false),
                    (DATA + 4096, 4096, false),
                    (STATUS, 1, true),
                ],
            );
            assert_eq!(run(&mut w, &mut q, &e.mem), vec![(0, 1)]);
            assert_eq!(status(&e.mem, STATUS), VIRTIO_BLK_S_OK);
            let mut host = vec![0u8; 8192];
            std::fs::File::open(&e.path)
                .unwrap()
                .read_exact_at(&mut host, 16 * 512)
                .unwrap();
            assert_eq!(host, data, "{kind:?}: image content");

            // Read it back, header and data in one descriptor each way, status merged with data.
            header(&e.mem, HDR, VIRTIO_BLK_T_IN, 16);
            e.mem
                .write_slice(&[0xffu8; 8193], GuestAddress(DATA2))
                .unwrap();
            add_chain(&mut vq, 4, &[(HDR, 16, false), (DATA2, 8193, true)]);
            assert_eq!(run(&mut w, &mut q, &e.mem), vec![(4, 8193)]);
            let mut back = vec![0u8; 8192];
            e.mem.read_slice(&mut back, GuestAddress(DATA2)).unwrap();
            assert_eq!(back, data, "{kind:?}: read back");
            assert_eq!(status(&e.mem, DATA2 + 8192), VIRTIO_BLK_S_OK);
        });
    }

    #[test]
    fn header_split_across_descriptors() {
        for_engines(|kind| {
            let e = env(1 << 20, false);
            let mut vq = ring(&e.mem);
            let mut q: Queue = vq.queue();
            let mut w = worker(&e, kind);
            std::fs::OpenOptions::new()
                .write(true)
                .open(&e.path)
                .unwrap()
                .write_all_at(&[0xabu8; 512], 3 * 512)
                .unwrap();
            header(&e.mem, HDR, VIRTIO_BLK_T_IN, 3);
            add_chain(
                &mut vq,
                0,
                &[
                    (HDR, 5, false),
                    (HDR + 5, 11, false),
                    (DATA, 512, true),
                    (STATUS, 1, true),
                ],
            );
            assert_eq!(run(&mut w, &mut q, &e.mem), vec![(0, 513)]);
            assert_eq!(status(&e.mem, STATUS), VIRTIO_BLK_S_OK);
            let mut back = [0u8; 512];
            e.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
            assert!(back.iter().all(|&b| b == 0xab));
        });
    }

    #[test]
    fn flush_get_id_and_unsupported() {
        for_engines(|kind| {
            let e = env(1 << 20, false);
            let mut vq = ring(&e.mem);
            let mut q: Queue = vq.queue();
            let mut w = worker(&e, kind);
            header(&e.mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
            add_chain(&mut vq, 0, &[(HDR, 16, false), (STATUS, 1, true)]);
            assert_eq!(run(&mut w, &mut q, &e.mem), vec![(0, 1)]);
            assert_eq!(status(&e.mem, STATUS), VIRTIO_BLK_S_OK);

            header(&e.mem, HDR + 64, VIRTIO_BLK_T_GET_ID, 0);
            add_chain(
                &mut vq,
                2,
                &[
                    (HDR + 64, 16, false),
                    (DATA, 20, true),
                    (STATUS + 8, 1, true),
                ],
            );
            assert_eq!(run(&mut w, &mut q, &e.mem), vec![(2, 21)]);
            let mut id = [0u8; 20];
            e.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
            assert_eq!(&id[..8], b"SER-123\0");
            assert_eq!(status(&e.mem, STATUS + 8), VIRTIO_BLK_S_OK);

            header(&e.mem, HDR + 128, 0x7777, 0);
            add_chain(
                &mut vq,
                5,
                &[(HDR + 128, 16, false), (STATUS + 16, 1, true)],
            );
            assert_eq!(run(&mut w, &mut q, &e.mem), vec![(5, 1)]);
            assert_eq!(status(&e.mem, STATUS + 16), VIRTIO_BLK_S_UNSUPP);
        });
    }

    #[test]
    fn discard_and_write_zeroes() {
        for_engines(|kind| {
            let e = env(1 << 20, false);
            std::fs::write(&e.path, vec![0x11u8; 1 << 20]).unwrap();
            let mut vq = ring(&e.mem);
            let mut q: Queue = vq.queue();
            let mut w = worker(&e, kind);
            let seg = |sector: u64, n: u32, flags: u32| {
                let mut s = [0u8; 16];
                s[0..8].copy_from_slice(&sector.to_le_bytes());
                s[8..12].copy_from_slice(&n.to_le_bytes());
                s[12..16].copy_from_slice(&flags.to_le_bytes());
                s
            };
            let mut two = [0u8; 32];
            two[..16].copy_from_slice(&seg(8, 8, 0));
            two[16..].copy_from_slice(&seg(64, 16, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP));
            e.mem.write_slice(&two, GuestAddress(DATA)).unwrap();
            header(&e.mem, HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
            add_chain(
                &mut vq,
                0,
                &[(HDR, 16, false), (DATA, 32, false), (STATUS, 1, true)],
            );
            assert_eq!(run(&mut w, &mut q, &e.mem), vec![(0, 1)]);
            assert_eq!(status(&e.mem, STATUS), VIRTIO_BLK_S_OK);
            let host = std::fs::read(&e.path).unwrap();
            assert!(host[8 * 512..16 * 512].iter().all(|&b| b == 0), "{kind:?}");
            assert!(host[64 * 512..80 * 512].iter().all(|&b| b == 0));
            assert!(host[..8 * 512].iter().all(|&b| b == 0x11));
            assert!(host[16 * 512..64 * 512].iter().all(|&b| b == 0x11));

            // Discard with the unmap flag, or reserved flags: UNSUPP, nothing changes.
            for (i, flags) in [(0u16, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP), (1, 0x80)] {
                e.mem
                    .write_slice(&seg(0, 8, flags), GuestAddress(DATA + 64))
                    .unwrap();
                header(&e.mem, HDR + 64, VIRTIO_BLK_T_DISCARD, 0);
                let at = 4 + i * 3;
                add_chain(
                    &mut vq,
                    at,
                    &[
                        (HDR + 64, 16, false),
                        (DATA + 64, 16, false),
                        (STATUS, 1, true),
                    ],
                );
                assert_eq!(run(&mut w, &mut q, &e.mem), vec![(u32::from(at), 1)]);
                assert_eq!(status(&e.mem, STATUS), VIRTIO_BLK_S_UNSUPP);
            }
            // Out-of-range segment after a valid one: IOERR and neither is applied.
            let mut two = [0u8; 32];
            two[..16].copy_from_slice(&seg(0, 8, 0));
            two[16..].copy_from_slice(&seg(2040, 16, 0));
            e.mem.write_slice(&two, GuestAddress(DATA + 128)).unwrap();
            header(&e.mem, HDR + 128, VIRTIO_BLK_T_WRITE_ZEROES, 0);
            add_chain(
                &mut vq,
                12,
                &[
                    (HDR + 128, 16, false),
                    (DATA + 128, 32, false),
                    (STATUS, 1, true),
                ],
            );
            assert_eq!(run(&mut w, &mut q, &e.mem), vec![(12, 1)]);
            assert_eq!(status(&e.mem, STATUS), VIRTIO_BLK_S_IOERR);
            assert!(std::fs::read(&e.path).unwrap()[..8 * 512]
                .iter()
                .all(|&b| b == 0x11));
        });
    }

    /// Every malformed chain gets IOERR (or, without a status byte, a zero-length completion),
    /// nothing reaches the image, and the worker keeps serving.
    #[test]
    fn malformed_chains() {
        for_engines(|kind| {
            let e = env(1 << 20, false);
            std::fs::write(&e.path, vec![0x22u8; 1 << 20]).unwrap();
            let mut vq = ring(&e.mem);
            let mut q: Queue = vq.queue();
            let mut w = worker(&e, kind);
            e.mem
                .write_slice(&[0x99u8; 8192], GuestAddress(DATA))
                .unwrap();
            let beyond = MEM_SIZE as u64 + 0x1000;
            type Case = (u32, u64, Vec<(u64, u32, bool)>, Option<u8>);
            let cases: Vec<Case> = vec![
                // no device-writable descriptor at all: no status to write
                (
                    VIRTIO_BLK_T_OUT,
                    0,
                    vec![(HDR, 16, false), (DATA, 512, false)],
                    None,
                ),
                // header too short
                (
                    VIRTIO_BLK_T_IN,
                    0,
                    vec![(HDR, 8, false), (STATUS, 1, true)],
                    Some(VIRTIO_BLK_S_IOERR),
                ),
                // write whose data is device-writable (wrong direction)
                (
                    VIRTIO_BLK_T_OUT,
                    0,
                    vec![(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)],
                    Some(VIRTIO_BLK_S_IOERR),
                ),
                // read whose data is device-readable (wrong direction)
                (
                    VIRTIO_BLK_T_IN,
                    0,
                    vec![(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)],
                    Some(VIRTIO_BLK_S_IOERR),
                ),
                // readable descriptor after a writable one
                (
                    VIRTIO_BLK_T_IN,
                    0,
                    vec![
                        (HDR, 16, false),
                        (DATA, 512, true),
                        (DATA2, 16, false),
                        (STATUS, 1, true),
                    ],
                    Some(VIRTIO_BLK_S_IOERR),
                ),
                // sector past the end
                (
                    VIRTIO_BLK_T_OUT,
                    2048,
                    vec![(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)],
                    Some(VIRTIO_BLK_S_IOERR),
                ),
                // range crossing the end
                (
                    VIRTIO_BLK_T_OUT,
                    2047,
                    vec![(HDR, 16, false), (DATA, 1024, false), (STATUS, 1, true)],
                    Some(VIRTIO_BLK_S_IOERR),
                ),
                // sector + length overflows u64
                (
                    VIRTIO_BLK_T_IN,
                    u64::MAX,
                    vec![(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)],
                    Some(VIRTIO_BLK_S_IOERR),
                ),
                // length not a multiple of 512
                (
                    VIRTIO_BLK_T_OUT,
                    0,
                    vec![(HDR, 16, false), (DATA, 500, false), (STATUS, 1, true)],
                    Some(VIRTIO_BLK_S_IOERR),
                ),
                // data buffer outside guest memory
                (
                    VIRTIO_BLK_T_OUT,
                    0,
                    vec![(HDR, 16, false), (beyond, 512, false), (STATUS, 1, true)],
                    Some(VIRTIO_BLK_S_IOERR),
                ),
                (
                    VIRTIO_BLK_T_IN,
                    0,
                    vec![
                        (HDR, 16, false),
                        (MEM_SIZE as u64 - 256, 512, true),
                        (STATUS, 1, true),
                    ],
                    Some(VIRTIO_BLK_S_IOERR),
                ),
                // status byte outside guest memory: nothing can be reported
                (
                    VIRTIO_BLK_T_IN,
                    0,
                    vec![(HDR, 16, false), (DATA, 512, true), (beyond, 1, true)],
                    None,
                ),
                // discard payload not a multiple of 16 bytes
                (
                    VIRTIO_BLK_T_DISCARD,
                    0,
                    vec![(HDR, 16, false), (DATA, 15, false), (STATUS, 1, true)],
                    Some(VIRTIO_BLK_S_IOERR),
                ),
            ];
            let mut at = 0u16;
            for (i, (ty, sector, descs, want)) in cases.into_iter().enumerate() {
                header(&e.mem, HDR, ty, sector);
                e.mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
                add_chain(&mut vq, at, &descs);
                let used = run(&mut w, &mut q, &e.mem);
                assert_eq!(used.len(), 1, "{kind:?} case {i}: completed once");
                assert_eq!(used[0].0, u32::from(at), "case {i}");
                match want {
                    Some(s) => assert_eq!(status(&e.mem, STATUS), s, "{kind:?} case {i}"),
                    None => assert_eq!(used[0].1, 0, "{kind:?} case {i}: zero-length completion"),
                }
                at += descs.len() as u16;
            }
            assert!(
                std::fs::read(&e.path).unwrap().iter().all(|&b| b == 0x22),
                "image untouched"
            );
            // Still serving.
            header(&e.mem, HDR, VIRTIO_BLK_T_IN, 0);
            add_chain(
                &mut vq,
                at,
                &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)],
            );
            assert_eq!(run(&mut w, &mut q, &e.mem).len(), 1);
            assert_eq!(status(&e.mem, STATUS), VIRTIO_BLK_S_OK);
            assert!(e.shared.stats.errors.load(Ordering::Relaxed) >= 13);
        });
    }

    #[test]
    fn readonly_refuses_writes() {
        for_engines(|kind| {
            let e = env(1 << 20, true);
            let mut vq = ring(&e.mem);
            let mut q: Queue = vq.queue();
            let mut w = worker(&e, kind);
            e.mem
                .write_slice(&[0x77u8; 512], GuestAddress(DATA))
                .unwrap();
            for (i, ty) in [
                VIRTIO_BLK_T_OUT,
                VIRTIO_BLK_T_WRITE_ZEROES,
                VIRTIO_BLK_T_DISCARD,
            ]
            .into_iter()
            .enumerate()
            {
                header(&e.mem, HDR, ty, 0);
                let len = if ty == VIRTIO_BLK_T_OUT { 512 } else { 16 };
                if ty != VIRTIO_BLK_T_OUT {
                    let mut s = [0u8; 16];
                    s[8..12].copy_from_slice(&8u32.to_le_bytes());
                    e.mem.write_slice(&s, GuestAddress(DATA)).unwrap();
                }
                let at = (i * 3) as u16;
                add_chain(
                    &mut vq,
                    at,
                    &[(HDR, 16, false), (DATA, len, false), (STATUS, 1, true)],
                );
                assert_eq!(run(&mut w, &mut q, &e.mem), vec![(u32::from(at), 1)]);
                assert_eq!(
                    status(&e.mem, STATUS),
                    VIRTIO_BLK_S_IOERR,
                    "{kind:?} type {ty}"
                );
            }
            assert!(std::fs::read(&e.path).unwrap().iter().all(|&b| b == 0));
            // Reads and flushes still work.
            header(&e.mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
            add_chain(&mut vq, 9, &[(HDR, 16, false), (STATUS, 1, true)]);
            run(&mut w, &mut q, &e.mem);
            assert_eq!(status(&e.mem, STATUS), VIRTIO_BLK_S_OK);
        });
    }

    /// Many requests in flight at once (io_uring keeps them all queued), all completed, with
    /// each read landing in its own buffer.
    #[test]
    fn many_in_flight() {
        for_engines(|kind| {
            let e = env(1 << 20, false);
            let content: Vec<u8> = (0..(1u32 << 20)).map(|i| (i / 4096) as u8).collect();
            std::fs::write(&e.path, &content).unwrap();
            let mut vq = ring(&e.mem);
            let mut q: Queue = vq.queue();
            let mut w = worker(&e, kind);
            for i in 0..20u64 {
                let hdr = HDR + i * 16;
                header(&e.mem, hdr, VIRTIO_BLK_T_IN, i * 8);
                add_chain(
                    &mut vq,
                    (i * 3) as u16,
                    &[
                        (hdr, 16, false),
                        (DATA + i * 4096, 4096, true),
                        (STATUS + i, 1, true),
                    ],
                );
            }
            let used = run(&mut w, &mut q, &e.mem);
            assert_eq!(used.len(), 20);
            for i in 0..20u64 {
                assert_eq!(status(&e.mem, STATUS + i), VIRTIO_BLK_S_OK);
                let mut b = vec![0u8; 4096];
                e.mem
                    .read_slice(&mut b, GuestAddress(DATA + i * 4096))
                    .unwrap();
                assert!(b.iter().all(|&x| x == i as u8), "{kind:?} request {i}");
            }
        });
    }

    /// The I/O limits hold a queue: a request the buckets cannot pay for is put back on the
    /// ring (nothing published, the ring position unchanged, notifications left off), the
    /// timer is armed, and once the buckets refill the same request goes through with what
    /// it had already drawn kept. Requests that are not limited are unaffected.
    #[test]
    fn a_throttled_request_is_put_back_and_resumed() {
        let mut e = env(1 << 20, false);
        // 100 reads/s, a burst of 2; bytes at 8 KiB/s with a 4 KiB burst (one read's worth).
        Arc::get_mut(&mut e.shared).unwrap().throttle =
            Throttle::new(&[0, 100, 0, 0, 8192, 0, 2, 4096]);
        let mut vq = ring(&e.mem);
        let mut q: Queue = vq.queue();
        let mut w = worker(&e, EngineKind::Sync);
        w.set_timer(Timer::new().unwrap());
        // The buckets start empty: wait for one read's bytes (0.5 s) and two IOPS tokens.
        std::thread::sleep(Duration::from_millis(520));
        for i in 0..3u64 {
            header(&e.mem, HDR + i * 16, VIRTIO_BLK_T_IN, i * 8);
            add_chain(
                &mut vq,
                (i * 3) as u16,
                &[
                    (HDR + i * 16, 16, false),
                    (DATA + i * 4096, 4096, true),
                    (STATUS + i, 1, true),
                ],
            );
        }
        let used = run(&mut w, &mut q, &e.mem);
        assert_eq!(used, vec![(0, 4097)], "one read fits the byte bucket");
        assert!(w.held, "the queue waits for its timer");
        assert_eq!(q.next_avail(), 1, "the second read was put back");
        assert!(!w.take_more(), "a held queue asks for no further pass");
        assert_eq!(w.stats().throttled.load(Ordering::Relaxed), 1);
        // A pass before the refill takes nothing and counts nothing twice.
        w.timer_fired();
        let used = run(&mut w, &mut q, &e.mem);
        assert!(used.is_empty(), "{used:?}");
        assert_eq!(w.stats().throttled.load(Ordering::Relaxed), 1);
        // The timer's fd became readable when the wait was over.
        let mut p = libc::pollfd {
            fd: w.timer.as_ref().unwrap().raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let fired = unsafe { libc::poll(&mut p, 1, 2000) };
        assert_eq!(fired, 1, "timer never fired");
        std::thread::sleep(Duration::from_millis(520));
        w.timer_fired();
        let used = run(&mut w, &mut q, &e.mem);
        assert_eq!(used, vec![(3, 4097)]);
        assert_eq!(status(&e.mem, STATUS + 1), VIRTIO_BLK_S_OK);
        // A flush is never limited, even behind a held read.
        header(&e.mem, HDR + 0x100, VIRTIO_BLK_T_FLUSH, 0);
        let mut w2 = worker(&e, EngineKind::Sync);
        let mut vq2 = ring(&e.mem);
        let mut q2: Queue = vq2.queue();
        add_chain(
            &mut vq2,
            0,
            &[(HDR + 0x100, 16, false), (STATUS + 9, 1, true)],
        );
        assert_eq!(run(&mut w2, &mut q2, &e.mem), vec![(0, 1)]);
    }

    #[test]
    fn null_device_reads_zeros() {
        let shared = Arc::new(Shared {
            disk: Disk::null(1 << 30, 512, false).unwrap(),
            serial: [0; 20],
            writeback: AtomicBool::new(true),
            stats: Stats::default(),
            throttle: Default::default(),
        });
        let mem = Arc::new(GuestMem::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap());
        let mut vq = ring(&mem);
        let mut q: Queue = vq.queue();
        let mut w = BlkQueue::new(shared, None, 0, QSIZE, handle(&mem));
        mem.write_slice(&[0xffu8; 4096], GuestAddress(DATA))
            .unwrap();
        header(&mem, HDR, VIRTIO_BLK_T_IN, (1 << 21) - 8);
        add_chain(
            &mut vq,
            0,
            &[(HDR, 16, false), (DATA, 4096, true), (STATUS, 1, true)],
        );
        assert_eq!(run(&mut w, &mut q, &mem), vec![(0, 4097)]);
        let mut b = vec![1u8; 4096];
        mem.read_slice(&mut b, GuestAddress(DATA)).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        header(&mem, HDR, VIRTIO_BLK_T_OUT, 1 << 21);
        add_chain(
            &mut vq,
            3,
            &[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)],
        );
        run(&mut w, &mut q, &mem);
        assert_eq!(
            status(&mem, STATUS),
            VIRTIO_BLK_S_IOERR,
            "past the end of the null device"
        );
    }
}
