//! The vhost-user glue: features, the config space, and routing each queue thread's events to
//! its [`BlkQueue`] (one queue thread per queue). Everything a request does happens below, in
//! [`crate::queue`].

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use log::{debug, warn};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::VhostUserVirtioFeatures;
use vhost_user_backend::{VhostUserBackend, VringState, VringT};
use vhostbox_common::launch::GuestVring;
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::Queue;
use vm_memory::{ByteValued, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use vhostbox_common::backend::{config_slice, read_only_config, thread_masks};
use vhostbox_common::launch::GuestMemHandle;

use crate::queue::{BlkQueue, GuestMem, Shared, Vring, MAX_DISCARD_SEGMENTS};

pub use crate::request::SIZE_MAX;

/// struct virtio_blk_config, as virtio-bindings defines it, to send as bytes.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
pub struct BlkConfig(pub virtio_blk_config);

// SAFETY: virtio_blk_config is a plain C struct of integers (repr(C, packed) in
// virtio-bindings), so every byte pattern is a valid value and it has no padding.
unsafe impl ByteValued for BlkConfig {}

/// Bytes of the config space offered: up to and including `write_zeroes_may_unmap` and its
/// padding (the fields of VIRTIO_BLK_F_SECURE_ERASE and ZONED after it are not offered).
pub const CONFIG_LEN: usize = std::mem::offset_of!(virtio_blk_config, max_secure_erase_sectors);

/// Offset of the `wce` (writeback) byte, the only field the driver may write.
const CONFIG_WRITEBACK_OFFSET: u32 = std::mem::offset_of!(virtio_blk_config, wce) as u32;

/// Device settings fixed for the process's life.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    pub num_queues: u16,
    pub queue_size: u16,
}

/// The virtio features this device offers.
pub fn device_features(shared: &Shared) -> u64 {
    let mut f = 1u64 << VIRTIO_F_VERSION_1
        | 1 << VIRTIO_RING_F_INDIRECT_DESC
        | 1 << VIRTIO_RING_F_EVENT_IDX
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
        | 1 << VIRTIO_BLK_F_SIZE_MAX
        | 1 << VIRTIO_BLK_F_SEG_MAX
        | 1 << VIRTIO_BLK_F_BLK_SIZE
        | 1 << VIRTIO_BLK_F_TOPOLOGY
        | 1 << VIRTIO_BLK_F_FLUSH
        | 1 << VIRTIO_BLK_F_CONFIG_WCE
        | 1 << VIRTIO_BLK_F_MQ
        | VhostUserVirtioFeatures::LOG_ALL.bits();
    if shared.disk.readonly {
        f |= 1 << VIRTIO_BLK_F_RO;
    } else {
        f |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
    }
    f
}

/// struct virtio_blk_config, little-endian.
pub fn config_space(shared: &Shared, cfg: &DeviceConfig) -> BlkConfig {
    let d = &shared.disk;
    let block_sectors = d.block_size >> 9;
    // Whole blocks, at most 2^32-1 sectors per segment.
    let max_sectors = (u32::MAX / block_sectors) * block_sectors;
    BlkConfig(virtio_blk_config {
        capacity: d.sectors().to_le(),
        size_max: SIZE_MAX.to_le(),
        seg_max: u32::from(cfg.queue_size).saturating_sub(2).max(1).to_le(),
        // geometry: left zero (no CHS).
        blk_size: d.block_size.to_le(),
        physical_block_exp: d.topology.physical_block_exp,
        alignment_offset: d.topology.alignment_offset,
        min_io_size: d.topology.min_io_size.to_le(),
        opt_io_size: d.topology.opt_io_size.to_le(),
        wce: u8::from(shared.writeback.load(Ordering::Relaxed)),
        num_queues: cfg.num_queues.to_le(),
        max_discard_sectors: max_sectors.to_le(),
        max_discard_seg: MAX_DISCARD_SEGMENTS.to_le(),
        discard_sector_alignment: block_sectors.to_le(),
        max_write_zeroes_sectors: max_sectors.to_le(),
        max_write_zeroes_seg: MAX_DISCARD_SEGMENTS.to_le(),
        write_zeroes_may_unmap: 1,
        ..Default::default()
    })
}

/// The library's vring state, as the queue loop sees it.
impl Vring for VringState<GuestMemoryAtomic<GuestMem>> {
    fn queue(&mut self) -> &mut Queue {
        self.get_queue_mut()
    }

    fn needs_notification(&mut self) -> io::Result<bool> {
        VringState::needs_notification(self).map_err(io::Error::other)
    }

    fn notify(&mut self) -> io::Result<()> {
        self.signal_used_queue()
    }
}

/// One connection's device: a new one is built in every worker.
pub struct BlkBackend {
    shared: Arc<Shared>,
    cfg: DeviceConfig,
    queues: Vec<Mutex<BlkQueue>>,
    /// The vring each queue runs on, remembered at its first event so that a stop can
    /// publish what it drains.
    vrings: Vec<Mutex<Option<GuestVring>>>,
    acked: AtomicU64,
    exit: vhostbox_common::ExitEvents,
}

impl BlkBackend {
    /// `queues` are the device's queues, in order (built by the caller, with their engines).
    pub fn new(shared: Arc<Shared>, cfg: DeviceConfig, queues: Vec<BlkQueue>) -> Self {
        let n = queues.len();
        BlkBackend {
            shared,
            cfg,
            queues: queues.into_iter().map(Mutex::new).collect(),
            vrings: (0..n).map(|_| Mutex::new(None)).collect(),
            acked: AtomicU64::new(0),
            exit: Default::default(),
        }
    }

    /// Event id of a queue's engine-completion eventfd (ids up to num_queues are the
    /// library's).
    pub fn completion_event(num_queues: u16) -> u16 {
        num_queues + 1
    }

    /// Event id of a queue's I/O-limit timer.
    pub fn throttle_event(num_queues: u16) -> u16 {
        num_queues + 2
    }

    fn queue(&self, q: usize) -> Option<std::sync::MutexGuard<'_, BlkQueue>> {
        self.queues
            .get(q)
            .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn vring(&self, q: usize) -> Option<GuestVring> {
        self.vrings
            .get(q)?
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Jail probe: an operation on queue 0's pre-made io_uring (its restrictions must
    /// refuse it).
    #[cfg(feature = "jail-probe")]
    pub fn probe_ring(
        &self,
        op: vhostbox_common::sandbox::probe::RingProbe<'_>,
    ) -> io::Result<i32> {
        self.queue(0)
            .and_then(|mut q| q.probe_ring(op))
            .unwrap_or_else(|| Err(io::Error::other("no io_uring on queue 0")))
    }

    /// SIGTERM: every queue takes no new requests, completes what it has in flight and tells
    /// the guest.
    pub fn shut_down(&self) {
        for q in 0..self.queues.len() {
            // The queue first, then its vring: the order the queue thread takes them in
            // (`handle_event`). The other order deadlocked with a queue thread in a pass.
            let Some(mut queue) = self.queue(q) else {
                continue;
            };
            let vring = self.vring(q);
            let mut ring = vring.as_ref().map(|v| v.get_mut());
            match queue.shut_down(ring.as_deref_mut()) {
                Ok(0) => {}
                Ok(n) => debug!("queue {q}: {n} request(s) completed before stopping"),
                Err(e) => warn!("queue {q}: draining: {e}"),
            }
        }
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = vhostbox_common::dirty::DirtyLog;
    type Vring = GuestVring;

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
        vhostbox_common::dirty::set_logging_from_features(features);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            | VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::BACKEND_REQ
    }

    fn set_event_idx(&self, _enabled: bool) {}

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let space = config_space(&self.shared, &self.cfg);
        config_slice(&space.as_slice()[..CONFIG_LEN], offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Only the cache mode (`wce`) is writable, and only with CONFIG_WCE.
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
        Err(read_only_config(offset, buf))
    }

    fn update_memory(&self, _mem: GuestMemHandle) -> io::Result<()> {
        // The queues hold the same handle, which the library has just updated.
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        thread_masks(self.cfg.num_queues, 1)
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        self.exit.take()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let q = queue_index as usize;
        let vring = self.vring(q);
        let mut ring = vring.as_ref().map(|v| v.get_mut());
        match self.queue(q) {
            Some(mut queue) => queue.stop(ring.as_deref_mut()),
            None => Ok(()),
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[GuestVring],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected event set {evset:?}")));
        }
        let Some(vring) = vrings.first() else {
            return Ok(());
        };
        let nq = self.cfg.num_queues;
        let (completions, timer) = match device_event {
            0 => (false, false),
            e if e == Self::completion_event(nq) => (true, false),
            e if e == Self::throttle_event(nq) => (false, true),
            e => return Err(io::Error::other(format!("unknown event {e}"))),
        };
        let Some(mut queue) = self.queue(thread_id) else {
            return Ok(());
        };
        if timer {
            queue.timer_fired();
        }
        {
            let mut slot = self.vrings[thread_id]
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if slot.is_none() {
                *slot = Some(vring.clone());
            }
        }
        queue.run(&mut *vring.get_mut(), completions)
    }
}
