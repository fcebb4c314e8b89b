//! The vhost-user glue: features, config space, and routing each queue pair's events (RX kick,
//! TX kick, tap readiness) to its [`QueuePair`]. One queue thread per queue pair.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use log::{info, warn};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringT};
use vhostbox_common::launch::GuestVring;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{ByteValued, GuestAddressSpace};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use vhostbox_common::backend::{config_slice, read_only_config, thread_masks};
use vhostbox_common::launch::GuestMemHandle;
use vhostbox_common::metrics::QueueStats;

use crate::config::Mac;
use crate::datapath::{GuestMem, NetStats, QueuePair, TapIo};
use crate::hdr;
use crate::tap::Tap;

/// struct virtio_net_config, as virtio-bindings defines it, to send as bytes.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
pub struct NetConfig(pub virtio_net_config);

// SAFETY: virtio_net_config is a plain C struct of integers (repr(C, packed) in
// virtio-bindings), so every byte pattern is a valid value and it has no padding.
unsafe impl ByteValued for NetConfig {}

/// Bytes of the config space offered: up to and including `mtu` (the RSS and duplex fields
/// after it are not offered).
pub const CONFIG_LEN: usize = std::mem::offset_of!(virtio_net_config, speed);

/// Device settings fixed for the process's life.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    pub queue_pairs: u16,
    pub queue_size: u16,
    pub mac: Mac,
    pub mtu: Option<u16>,
    /// Offer VHOST_USER_PROTOCOL_F_CONFIG.
    pub offer_config: bool,
}

/// The virtio features this device offers.
pub fn device_features(cfg: &DeviceConfig) -> u64 {
    let mut f = 1u64 << VIRTIO_F_VERSION_1
        | 1 << VIRTIO_RING_F_INDIRECT_DESC
        | 1 << VIRTIO_RING_F_EVENT_IDX
        | vhost::vhost_user::VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
        | 1 << VIRTIO_NET_F_CSUM
        | 1 << VIRTIO_NET_F_GUEST_CSUM
        | 1 << VIRTIO_NET_F_HOST_TSO4
        | 1 << VIRTIO_NET_F_HOST_TSO6
        | 1 << VIRTIO_NET_F_HOST_ECN
        | 1 << VIRTIO_NET_F_HOST_UFO
        | 1 << VIRTIO_NET_F_GUEST_TSO4
        | 1 << VIRTIO_NET_F_GUEST_TSO6
        | 1 << VIRTIO_NET_F_GUEST_ECN
        | 1 << VIRTIO_NET_F_GUEST_UFO
        | 1 << VIRTIO_NET_F_MRG_RXBUF
        | 1 << VIRTIO_NET_F_MAC
        | 1 << VIRTIO_NET_F_STATUS
        | vhost::vhost_user::VhostUserVirtioFeatures::LOG_ALL.bits();
    if cfg.queue_pairs > 1 {
        f |= 1 << VIRTIO_NET_F_MQ;
    }
    if cfg.mtu.is_some() {
        f |= 1 << VIRTIO_NET_F_MTU;
    }
    f
}

/// struct virtio_net_config, little-endian: mac, status (link up), max_virtqueue_pairs, mtu.
pub fn config_space(cfg: &DeviceConfig) -> NetConfig {
    NetConfig(virtio_net_config {
        mac: cfg.mac.0,
        status: (VIRTIO_NET_S_LINK_UP as u16).to_le(),
        max_virtqueue_pairs: cfg.queue_pairs.to_le(),
        mtu: cfg.mtu.unwrap_or(1500).to_le(),
        ..Default::default()
    })
}

/// One queue of the tap, as the datapath sees it.
pub struct TapHandle {
    tap: Arc<Tap>,
    index: usize,
}

impl TapIo for TapHandle {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let fd = self.tap.queues[self.index].raw_fd();
        // SAFETY: reads at most buf.len() bytes into a buffer we own.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    unsafe fn write_frame(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        let fd = self.tap.queues[self.index].raw_fd();
        // SAFETY: the caller guarantees the iovecs are readable; at most 1024 of them.
        let n = unsafe { libc::writev(fd, iov.as_ptr(), iov.len() as libc::c_int) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

/// One connection's device: a new one is built in every worker.
pub struct NetBackend {
    cfg: DeviceConfig,
    tap: Arc<Tap>,
    mem: GuestMemHandle,
    pairs: Vec<Mutex<QueuePair<TapHandle>>>,
    acked: AtomicU64,
    exit: vhostbox_common::ExitEvents,
    /// Each pair's counters, and what they held when this connection began.
    stats: Vec<QueueStats<NetStats>>,
    base: Vec<Vec<u64>>,
}

fn active(v: &GuestVring) -> bool {
    let s = v.get_ref();
    s.is_enabled() && s.get_queue().ready()
}

/// Kicks the vring's own kick eventfd, so its worker comes back after other pending events.
fn self_kick(v: &GuestVring) {
    if let Some(k) = v.get_ref().get_kick() {
        let one = 1u64;
        // SAFETY: writes 8 bytes from a u64 we own to an eventfd.
        unsafe { libc::write(k.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }
}

impl NetBackend {
    /// A device on `tap` whose queues see the guest memory through `mem`.
    pub fn new(tap: Arc<Tap>, cfg: DeviceConfig, mem: GuestMemHandle) -> Self {
        // Every queue starts attached, whatever a previous worker left, so frames sent as soon
        // as the frontend is set up are not lost; queues of pairs the guest leaves disabled are
        // detached on their first event.
        for (i, q) in tap.queues.iter().enumerate() {
            q.forget_attachment();
            if let Err(e) = q.set_attached(true) {
                warn!("tap {} queue {i}: cannot attach: {e}", tap.name);
            }
        }
        let stats: Vec<QueueStats<NetStats>> = (0..usize::from(cfg.queue_pairs))
            .map(QueueStats::for_queue)
            .collect();
        let base = stats.iter().map(|s| s.snapshot()).collect();
        let pairs = stats
            .iter()
            .enumerate()
            .map(|(index, st)| {
                let io = TapHandle {
                    tap: tap.clone(),
                    index,
                };
                Mutex::new(QueuePair::new(io, st.clone()))
            })
            .collect();
        NetBackend {
            cfg,
            tap,
            mem,
            pairs,
            acked: AtomicU64::new(0),
            exit: Default::default(),
            stats,
            base,
        }
    }

    /// Event id of a pair's tap readiness (ids up to the queue count are the library's).
    pub fn tap_event(queue_pairs: u16) -> u16 {
        2 * queue_pairs + 1
    }

    /// This connection's traffic, summed over the pairs.
    pub fn stats(&self) -> NetStats {
        let mut sum: Vec<u64> = Vec::new();
        for (s, b) in self.stats.iter().zip(&self.base) {
            let now = s.snapshot();
            sum.resize(now.len(), 0);
            for (i, v) in now.iter().enumerate() {
                sum[i] += v.wrapping_sub(b.get(i).copied().unwrap_or(0));
            }
        }
        NetStats::from_values(&sum)
    }

    /// The connection is over: the traffic summary, and no queue attached, so no stale
    /// frames wait for the next guest.
    pub fn finished(&self) {
        info!("traffic of that connection: {}", self.stats().summary());
        for (i, q) in self.tap.queues.iter().enumerate() {
            if let Err(e) = q.set_attached(false) {
                warn!("tap {} queue {i}: cannot detach: {e}", self.tap.name);
            }
        }
    }

    fn pass(
        &self,
        worker: &mut QueuePair<TapHandle>,
        vring: &GuestVring,
        rx: bool,
        mem: &GuestMem,
    ) -> io::Result<()> {
        let mut state = vring.get_mut();
        let queue = state.get_queue_mut();
        let used = if rx {
            worker.process_rx(queue, mem)?
        } else {
            worker.process_tx(queue, mem)?
        };
        if used && state.needs_notification().map_err(io::Error::other)? {
            state.signal_used_queue()?;
        }
        Ok(())
    }
}

impl VhostUserBackend for NetBackend {
    type Bitmap = vhostbox_common::dirty::DirtyLog;
    type Vring = GuestVring;

    fn num_queues(&self) -> usize {
        2 * usize::from(self.cfg.queue_pairs)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.cfg.queue_size)
    }

    fn features(&self) -> u64 {
        device_features(&self.cfg)
    }

    fn acked_features(&self, features: u64) {
        self.acked.store(features, Ordering::Relaxed);
        vhostbox_common::dirty::set_logging_from_features(features);
        let offloads = hdr::tap_offloads(features);
        let hdr_len = hdr::hdr_len(features);
        // Header size and offloads belong to the tap device: one queue sets them for all.
        if let Err((what, e)) = self.tap.queues[0].configure(hdr_len, offloads) {
            warn!("tap {}: {what}: {e}", self.tap.name);
        }
        for w in &self.pairs {
            w.lock()
                .unwrap_or_else(|e| e.into_inner())
                .set_features(features);
        }
        log::debug!("features {features:#x}: header {hdr_len} bytes, tap offloads {offloads:#x}");
    }

    /// CONFIG only with `--offer-config`: QEMU's virtio-net builds the config space itself
    /// (MAC, MTU and link state from its own options) and warns about a backend that offers it.
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        let f = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::LOG_SHMFD;
        if self.cfg.offer_config {
            f | VhostUserProtocolFeatures::CONFIG
        } else {
            f
        }
    }

    fn set_event_idx(&self, _enabled: bool) {}

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let space = config_space(&self.cfg);
        config_slice(&space.as_slice()[..CONFIG_LEN], offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        Err(read_only_config(offset, buf))
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        self.exit.take()
    }

    /// A pair per thread: RX and TX of one pair share a thread and its tap queue.
    fn queues_per_thread(&self) -> Vec<u64> {
        thread_masks(self.cfg.queue_pairs, 2)
    }

    fn update_memory(&self, _mem: GuestMemHandle) -> io::Result<()> {
        // `self.mem` is the same handle, which the library has just updated.
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[GuestVring],
        thread_id: usize,
    ) -> io::Result<()> {
        let (Some(rxv), Some(txv)) = (vrings.first(), vrings.get(1)) else {
            return Ok(());
        };
        let Some(w) = self.pairs.get(thread_id) else {
            return Ok(());
        };
        let mut w = w.lock().unwrap_or_else(|e| e.into_inner());
        let (mut rx, mut tx) = (false, false);
        match device_event {
            0 => rx = true,
            1 => tx = true,
            e if e == Self::tap_event(self.cfg.queue_pairs) => {
                if evset.intersects(EventSet::IN | EventSet::ERROR | EventSet::HANG_UP) {
                    w.tap_readable();
                    rx = true;
                }
                if evset.contains(EventSet::OUT) {
                    w.tap_writable();
                    tx = true;
                }
            }
            e => return Err(io::Error::other(format!("unknown event {e}"))),
        }
        let (rx_on, tx_on) = (active(rxv), active(txv));
        // The kernel steers traffic only to attached queues: a pair the guest does not use
        // must not swallow frames.
        if let Err(e) = self.tap.queues[thread_id].set_attached(rx_on || tx_on) {
            warn!(
                "tap {} queue {thread_id}: cannot attach or detach: {e}",
                self.tap.name
            );
        }
        let mem = self.mem.memory();
        if rx && rx_on {
            self.pass(&mut w, rxv, true, &mem)?;
        }
        if tx && tx_on {
            self.pass(&mut w, txv, false, &mem)?;
        }
        // Work left after a budget: come back once other events (the other direction, the
        // exit event) had their turn.
        if w.take_rx_more() {
            self_kick(rxv);
        }
        if w.take_tx_more() {
            self_kick(txv);
        }
        Ok(())
    }
}
