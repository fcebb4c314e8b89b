//! The vhost-user glue: features, config space, and routing worker-thread events to the
//! per-queue [`QueueWorker`]s. One worker thread per queue.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use log::{debug, warn};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringRwLock, VringT};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use vhostbox_common::daemon::{config_slice, Device, ExitEvents};
use vhostbox_common::inflight::{InflightFd, InflightHook, InflightSlot};
use vhostbox_common::poll::AdaptivePoll;
use vhostbox_common::vu_shim::Shim;

use crate::engine::{Engine, EngineKind, SyncEngine, UringEngine};
use crate::worker::{GuestMem, QueueWorker, Shared, MAX_DISCARD_SEGMENTS};

const VHOST_USER_F_PROTOCOL_FEATURES: u32 = 30;
/// Largest single data segment the driver may use (VIRTIO_BLK_F_SIZE_MAX).
pub const SIZE_MAX: u32 = 1 << 20;
/// Offset of the `writeback` byte in struct virtio_blk_config.
const CONFIG_WRITEBACK_OFFSET: u32 = 32;
/// Bytes of struct virtio_blk_config up to and including write_zeroes_may_unmap + padding.
pub const CONFIG_LEN: usize = 60;

/// Device settings fixed for the process's life.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    pub num_queues: u16,
    pub queue_size: u16,
    pub engine: EngineKind,
    /// The most a queue worker busy-polls its ring before sleeping (zero: never).
    pub poll_max: Duration,
}

/// The virtio features this device offers.
pub fn device_features(shared: &Shared) -> u64 {
    let mut f = 1u64 << VIRTIO_F_VERSION_1
        | 1 << VIRTIO_RING_F_INDIRECT_DESC
        | 1 << VIRTIO_RING_F_EVENT_IDX
        | 1 << VHOST_USER_F_PROTOCOL_FEATURES
        | 1 << VIRTIO_BLK_F_SIZE_MAX
        | 1 << VIRTIO_BLK_F_SEG_MAX
        | 1 << VIRTIO_BLK_F_BLK_SIZE
        | 1 << VIRTIO_BLK_F_TOPOLOGY
        | 1 << VIRTIO_BLK_F_FLUSH
        | 1 << VIRTIO_BLK_F_CONFIG_WCE
        | 1 << VIRTIO_BLK_F_MQ;
    if shared.disk.readonly {
        f |= 1 << VIRTIO_BLK_F_RO;
    } else {
        f |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
    }
    f
}

/// struct virtio_blk_config, little-endian.
pub fn config_space(shared: &Shared, cfg: &DeviceConfig) -> [u8; CONFIG_LEN] {
    let d = &shared.disk;
    let mut c = [0u8; CONFIG_LEN];
    let put32 = |c: &mut [u8; CONFIG_LEN], off: usize, v: u32| {
        c[off..off + 4].copy_from_slice(&v.to_le_bytes())
    };
    c[0..8].copy_from_slice(&d.sectors().to_le_bytes());
    put32(&mut c, 8, SIZE_MAX);
    put32(
        &mut c,
        12,
        u32::from(cfg.queue_size).saturating_sub(2).max(1),
    );
    // 16..20 geometry: left zero (no CHS).
    put32(&mut c, 20, d.block_size);
    c[24] = d.topology.physical_block_exp;
    c[25] = d.topology.alignment_offset;
    c[26..28].copy_from_slice(&d.topology.min_io_size.to_le_bytes());
    put32(&mut c, 28, d.topology.opt_io_size);
    c[32] = u8::from(shared.writeback.load(Ordering::Relaxed));
    c[34..36].copy_from_slice(&cfg.num_queues.to_le_bytes());
    let block_sectors = d.block_size >> 9;
    // Whole blocks, at most 2^32-1 sectors per segment.
    let max_sectors = (u32::MAX / block_sectors) * block_sectors;
    put32(&mut c, 36, max_sectors); // max_discard_sectors
    put32(&mut c, 40, MAX_DISCARD_SEGMENTS); // max_discard_seg
    put32(&mut c, 44, block_sectors); // discard_sector_alignment
    put32(&mut c, 48, max_sectors); // max_write_zeroes_sectors
    put32(&mut c, 52, MAX_DISCARD_SEGMENTS); // max_write_zeroes_seg
    c[56] = 1; // write_zeroes_may_unmap
    c
}

/// The connection's guest memory, as the frontend last set it.
type MemSlot = RwLock<Option<GuestMemoryAtomic<GuestMem>>>;

fn load_memory(slot: &MemSlot) -> Option<Arc<GuestMem>> {
    let guard = slot.read().unwrap_or_else(|e| e.into_inner());
    guard.as_ref().map(|m| m.memory().into_inner())
}

/// Per-connection backend state. A new one is built for every frontend.
pub struct BlkBackend {
    shared: Arc<Shared>,
    cfg: DeviceConfig,
    mem: Arc<MemSlot>,
    workers: Vec<Mutex<QueueWorker>>,
    /// The vring each worker serves, remembered so stop_vring can publish drained requests.
    vrings: Vec<Mutex<Option<VringRwLock>>>,
    exit: Arc<ExitEvents>,
    acked: AtomicU64,
    event_idx: AtomicBool,
    pool: Arc<Mutex<Vec<Option<Engine>>>>,
    /// The in-flight region the frontend set, if any.
    inflight: Arc<InflightSlot>,
}

impl BlkBackend {
    /// Event id of a worker's engine-completion eventfd (ids up to num_queues are reserved).
    pub fn completion_event(&self) -> u16 {
        self.cfg.num_queues + 1
    }

    fn memory(&self) -> io::Result<Arc<GuestMem>> {
        load_memory(&self.mem).ok_or_else(|| io::Error::other("no guest memory mapped"))
    }

    fn run(&self, queue_index: usize, vring: &VringRwLock, completions: bool) -> io::Result<()> {
        let mut worker = self.workers[queue_index]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        {
            let mut slot = self.vrings[queue_index]
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if slot.is_none() {
                *slot = Some(vring.clone());
            }
        }
        let mut state = vring.get_mut();
        let mut used = false;
        let mut completions = completions;
        let mut restart = false;
        worker.poll.found_work(Instant::now());
        let mut polling = worker.poll.max() > Duration::ZERO;
        loop {
            worker.set_defer_rearm(polling);
            let mem = loop {
                // Loaded for every pass: a region the frontend added (ADD_MEM_REG,
                // acknowledged before it queued requests that use it) must be visible to the
                // next pass.
                let mem = self.memory()?;
                let queue = state.get_queue_mut();
                if queue.ready() && !worker.tracking_started() {
                    // A predecessor may have died between publishing completions and
                    // notifying the guest, which would then wait forever: notify once at
                    // every start.
                    restart = true;
                    let tracker = self.inflight.get().and_then(|r| {
                        let t = r.queue(queue_index, queue.size());
                        if t.is_none() {
                            warn!(
                                "in-flight region of {} queues of {} does not cover queue \
                                 {queue_index} of {}: not tracking it",
                                r.num_queues(),
                                r.queue_size(),
                                queue.size()
                            );
                        }
                        t
                    });
                    used |= worker.start_tracking(tracker, queue, &mem)?;
                }
                used |= if completions {
                    worker.process_completions(queue, &mem)?
                } else if queue.ready() {
                    worker.process_queue(queue, &mem)?
                } else {
                    false
                };
                let more = worker.take_more();
                // Reads the kernel served at once (io_uring from the page cache) are already
                // complete: publish them now rather than on the eventfd's next wake-up.
                let done = worker.has_completions();
                if restart || (used && state.needs_notification().map_err(io::Error::other)?) {
                    state.signal_used_queue()?;
                }
                (used, restart) = (false, false);
                if !more && !done {
                    break mem;
                }
                completions = done;
            };
            if !polling {
                break;
            }
            // Before sleeping, look at the ring for a while (see vhostbox_common::poll): the
            // driver's next batch often comes within microseconds, and finding it here spares
            // its kick and this thread's wake-up. Only after passes that did something: a ring
            // virtio-queue will not pop from must not keep the thread spinning. (The memory
            // of the last pass serves for looking; the next pass loads it afresh.)
            let queue = state.get_queue_mut();
            // Nor while the kernel works on this queue's I/O (buffered writes run on io_uring's
            // worker threads): on a busy host they need the CPU this thread would spin on, and
            // their completion wakes the thread anyway.
            let found = if worker.take_progress()
                && worker.accepting()
                && worker.in_flight() == 0
                && queue.ready()
            {
                worker.poll.idle(Instant::now());
                let budget = worker.poll.budget();
                worker.poll_for_work(queue, &mem, budget)
            } else {
                None
            };
            match found {
                Some(c) => {
                    worker.poll.found_work(Instant::now());
                    completions = c;
                }
                None => {
                    // Nothing came: notifications back on, then one more look, as a pass
                    // without polling ends.
                    worker.rearm(queue, &mem)?;
                    if !worker.take_more() {
                        break;
                    }
                    completions = false;
                    polling = false;
                }
            }
        }
        worker.set_defer_rearm(false);
        worker.poll.idle(Instant::now());
        Ok(())
    }

    /// Completes what is in flight on queue `q` so the ring state the frontend reads back
    /// (GET_VRING_BASE) is final.
    fn stop_queue(&self, q: usize, worker: &mut QueueWorker) -> io::Result<()> {
        if worker.in_flight() == 0 {
            return Ok(());
        }
        let vring = self.vrings[q]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let (Some(vring), Ok(mem)) = (vring, self.memory()) else {
            worker.abandon();
            return Ok(());
        };
        let mut state = vring.get_mut();
        if worker.drain(state.get_queue_mut(), &mem)? {
            state.signal_used_queue()?;
        }
        Ok(())
    }

    /// A clean stop: takes no new requests, completes and publishes every request in flight
    /// and tells the guest, so nothing is left for a successor to redo.
    pub fn drain_all(&self) {
        for q in 0..self.workers.len() {
            let mut worker = self.workers[q].lock().unwrap_or_else(|e| e.into_inner());
            worker.quiesce();
            if worker.in_flight() == 0 {
                continue;
            }
            let vring = self.vrings[q]
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            let (Some(vring), Ok(mem)) = (vring, self.memory()) else {
                continue;
            };
            let n = worker.in_flight();
            let mut state = vring.get_mut();
            match worker.drain(state.get_queue_mut(), &mem) {
                Ok(true) => {
                    let _ = state.signal_used_queue();
                    debug!("queue {q}: {n} request(s) completed before stopping");
                }
                Ok(false) => {}
                Err(e) => warn!("queue {q}: draining: {e}"),
            }
        }
    }
}

impl Drop for BlkBackend {
    fn drop(&mut self) {
        // Wait for the kernel to finish with guest buffers, then give the rings back for the
        // next connection (they were made before any sandbox and cannot be made again).
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        for (i, w) in self.workers.iter().enumerate() {
            let mut w = w.lock().unwrap_or_else(|e| e.into_inner());
            w.abandon();
            if let Some(e) = w.take_engine() {
                pool[i] = Some(e);
            }
        }
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        usize::from(self.cfg.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.cfg.queue_size)
    }

    fn features(&self) -> u64 {
        device_features(&self.shared)
    }

    fn acked_features(&self, features: u64) {
        self.acked.store(features, Ordering::Relaxed);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        config_slice(&config_space(&self.shared, &self.cfg), offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Only the cache mode (`writeback`) is writable, and only with CONFIG_WCE.
        let wce = self.acked.load(Ordering::Relaxed) & (1 << VIRTIO_BLK_F_CONFIG_WCE) != 0;
        if offset == CONFIG_WRITEBACK_OFFSET && buf.len() == 1 && wce {
            let wb = buf[0] != 0;
            debug!(
                "guest set cache mode to {}",
                if wb { "write-back" } else { "write-through" }
            );
            self.shared.writeback.store(wb, Ordering::Relaxed);
            if !wb {
                // Switching to write-through: what was cached so far becomes durable now.
                self.shared.disk.flush()?;
            }
            return Ok(());
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "SET_CONFIG of read-only field: offset {offset} size {}",
                buf.len()
            ),
        ))
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMem>) -> io::Result<()> {
        *self.mem.write().unwrap_or_else(|e| e.into_inner()) = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.cfg.num_queues).map(|i| 1u64 << i).collect()
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        self.exit.pair(thread_index)
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let q = queue_index as usize;
        let Some(w) = self.workers.get(q) else {
            return Ok(());
        };
        let mut worker = w.lock().unwrap_or_else(|e| e.into_inner());
        let r = self.stop_queue(q, &mut worker);
        // A restarted queue takes tracking up again, from the region current then.
        worker.stop_tracking();
        worker.poll.reset();
        r
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected event set {evset:?}")));
        }
        let Some(vring) = vrings.first() else {
            return Ok(());
        };
        if device_event == 0 {
            self.run(thread_id, vring, false)
        } else if device_event == self.completion_event() {
            self.run(thread_id, vring, true)
        } else {
            Err(io::Error::other(format!("unknown event {device_event}")))
        }
    }
}

/// The device across connections: shared state, the per-queue engines (made once, before any
/// sandbox) and the exit events.
pub struct BlkDevice {
    shared: Arc<Shared>,
    cfg: DeviceConfig,
    pool: Arc<Mutex<Vec<Option<Engine>>>>,
    exit: Arc<ExitEvents>,
    default_writeback: bool,
    /// The relay in front of vhost-user-backend that answers the in-flight messages.
    shim: Shim,
    /// The in-flight region for the next connection, made before any sandbox.
    inflight_fd: Option<Arc<InflightFd>>,
}

impl BlkDevice {
    pub fn new(shared: Arc<Shared>, cfg: DeviceConfig) -> io::Result<Self> {
        let n = usize::from(cfg.num_queues);
        let mut pool = Vec::with_capacity(n);
        for _ in 0..n {
            pool.push(match (shared.disk.fd(), cfg.engine) {
                (None, _) => None,
                (Some(fd), EngineKind::Sync) => Some(Engine::Sync(SyncEngine::new(fd))),
                (Some(fd), EngineKind::IoUring) => Some(Engine::Uring(Box::new(
                    UringEngine::new(fd, u32::from(cfg.queue_size)).map_err(|e| {
                        io::Error::new(e.kind(), format!("cannot set up io_uring: {e}"))
                    })?,
                ))),
            });
        }
        let default_writeback = shared.writeback.load(Ordering::Relaxed);
        let inflight_fd = Arc::new(InflightFd::new(cfg.num_queues, cfg.queue_size)?);
        Ok(Self {
            shared,
            cfg,
            pool: Arc::new(Mutex::new(pool)),
            exit: Arc::new(ExitEvents::new(n)?),
            default_writeback,
            shim: Shim::new()?,
            inflight_fd: Some(inflight_fd),
        })
    }
}

impl BlkDevice {
    /// Every fd the device holds (rings, completion and exit eventfds): the jail's keep-list.
    pub fn fds(&self) -> Vec<std::os::fd::RawFd> {
        let mut v = self.exit.raw_fds();
        v.extend(self.shim.fds());
        v.extend(self.inflight_fd.as_ref().map(|f| f.raw_fd()));
        let pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        for e in pool.iter().flatten() {
            v.extend(e.fds());
        }
        v
    }

    /// Jail probe: asks the first pre-made io_uring to open `path`; `None` without a ring.
    #[cfg(feature = "jail-probe")]
    pub fn probe_uring_openat(&self, path: &std::ffi::CStr) -> Option<std::io::Result<i32>> {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        pool.iter_mut().flatten().find_map(|e| e.probe_openat(path))
    }
}

impl Device for BlkDevice {
    type Backend = Arc<BlkBackend>;

    fn connect(&mut self) -> io::Result<Arc<BlkBackend>> {
        self.exit.reset();
        // Each frontend starts from the device's default cache mode.
        self.shared
            .writeback
            .store(self.default_writeback, Ordering::Relaxed);
        // Each connection gets its own region: a frontend that comes back later brings its own
        // and must not find another frontend's state in it. A jailed worker serves one
        // connection with the region made before the jail; unconfined, one is made here.
        let inflight = Arc::new(InflightSlot::default());
        let fd = match self.inflight_fd.take() {
            Some(f) => Ok(f),
            None => InflightFd::new(self.cfg.num_queues, self.cfg.queue_size).map(Arc::new),
        };
        match fd {
            Ok(fd) => self.shim.set_hook(Box::new(InflightHook {
                fd,
                slot: inflight.clone(),
            })),
            Err(e) => warn!("no in-flight tracking for this connection: {e}"),
        }
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        let n = usize::from(self.cfg.num_queues);
        let mem: Arc<MemSlot> = Arc::new(RwLock::new(None));
        let workers = (0..n)
            .map(|i| {
                let mut w =
                    QueueWorker::new(self.shared.clone(), pool[i].take(), self.cfg.queue_size);
                w.poll = AdaptivePoll::new(self.cfg.poll_max);
                let m = mem.clone();
                w.set_memory_source(Box::new(move || load_memory(&m)));
                Mutex::new(w)
            })
            .collect();
        Ok(Arc::new(BlkBackend {
            shared: self.shared.clone(),
            cfg: self.cfg.clone(),
            mem,
            workers,
            vrings: (0..n).map(|_| Mutex::new(None)).collect(),
            exit: self.exit.clone(),
            acked: AtomicU64::new(0),
            event_idx: AtomicBool::new(false),
            pool: self.pool.clone(),
            inflight,
        }))
    }

    fn shim(&mut self) -> Option<&mut Shim> {
        Some(&mut self.shim)
    }

    fn drainer(&self, backend: &Arc<BlkBackend>) -> Option<Box<dyn Fn() + Send>> {
        let b = backend.clone();
        Some(Box::new(move || b.drain_all()))
    }

    fn attach(
        &mut self,
        backend: &Arc<BlkBackend>,
        handlers: &[Arc<VringEpollHandler<Arc<BlkBackend>>>],
    ) -> io::Result<()> {
        for (i, h) in handlers.iter().enumerate() {
            let fd = backend.workers[i]
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .completion_fd();
            if let Some(fd) = fd {
                h.register_listener(fd, EventSet::IN, u64::from(backend.completion_event()))?;
            }
        }
        Ok(())
    }
}
