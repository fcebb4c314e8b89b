//! Checks on the driver's side of a split virtqueue that virtio-queue leaves to its users.

use std::sync::atomic::{AtomicU32, Ordering};

use log::{debug, warn};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemory;

/// Whether the driver's avail index is sane: at most a queue's worth of entries ahead of the
/// device. A driver that writes anything else has broken its ring: virtio-queue then pops
/// nothing, while re-enabling notifications still reports new entries, so a loop of "pop until
/// empty, re-enable, go again if more arrived" would spin forever. Callers stop instead (the
/// queue works again once the frontend restarts it). Found by the net_queue fuzz target.
pub fn avail_index_ok<M: GuestMemory>(queue: &Queue, mem: &M) -> bool {
    let Ok(avail) = queue.avail_idx(mem, Ordering::Acquire) else {
        return false;
    };
    let ahead = avail.0.wrapping_sub(queue.next_avail());
    if ahead > queue.size() {
        // A guest can repeat this at will: only the first few reach the log.
        static LOGGED: AtomicU32 = AtomicU32::new(0);
        if LOGGED.fetch_add(1, Ordering::Relaxed) >= 8 {
            debug!("broken ring: avail index {} ({ahead} ahead)", avail.0);
            return false;
        }
        warn!(
            "broken ring: avail index {} is {ahead} entries ahead of the device, more than the \
             queue size {}; the queue stops until it is restarted",
            avail.0,
            queue.size()
        );
        return false;
    }
    true
}

/// Whether the driver has made requests available that the device has not taken, with a sane
/// avail index (see `avail_index_ok`). For polling: reads one index, never logs.
pub fn has_avail<M: GuestMemory>(queue: &Queue, mem: &M) -> bool {
    match queue.avail_idx(mem, Ordering::Acquire) {
        Ok(avail) => {
            let ahead = avail.0.wrapping_sub(queue.next_avail());
            ahead != 0 && ahead <= queue.size()
        }
        Err(_) => false,
    }
}
