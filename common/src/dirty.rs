//! Dirty-page logging for live migration (VHOST_F_LOG_ALL with VHOST_USER_PROTOCOL_F_LOG_SHMFD).
//!
//! The frontend hands over a shared bitmap (SET_LOG_BASE: one bit per 4 KiB guest page) and,
//! while it migrates, acknowledges VHOST_F_LOG_ALL. Every byte the backend writes into guest
//! memory must then show up in that bitmap, or the destination gets a stale page.
//!
//! The bitmap itself is vhost-user-backend's: its `SET_LOG_BASE` handler maps the log and
//! installs an [`AtomicBitmapMmap`] in each region's bitmap through [`BitmapReplace`], and
//! vm-memory marks every write made through its accessors (`Bytes::write*`, the used ring
//! that virtio-queue publishes, volatile slice copies). [`DirtyLog`] is the region bitmap we
//! give it, a thin wrapper over the library's [`BitmapMmapRegion`] that changes two things:
//!
//! - Its slices borrow the region's bitmap ([`RefSlice`]) instead of cloning an `Arc` per
//!   guest access: the library's own slice type costs two atomic operations on one shared
//!   cache line for every descriptor read, on every queue thread, logging or not.
//! - Marking is skipped unless VHOST_F_LOG_ALL is acknowledged ([`set_logging_from_features`]): with
//!   logging off a write costs one relaxed load of a flag that never changes, and logging
//!   really stops when the frontend turns it off (the library would go on marking until the
//!   connection ends).
//!
//! What vm-memory cannot see is written by hand: data that io_uring or `preadv` put straight
//! into guest buffers, and memory filled through a raw pointer. [`mark_host`] marks those,
//! after the data landed and before the request is published in the used ring, so that the
//! final log sync after GET_VRING_BASE (which drains what is in flight) sees them.
//!
//! One worker serves one connection, so "logging is on" is a process-wide flag.

use std::sync::atomic::{AtomicBool, Ordering};

use vhost::vhost_user::VhostUserVirtioFeatures;
use vhost_user_backend::bitmap::{AtomicBitmapMmap, BitmapMmapRegion, BitmapReplace};
use vm_memory::bitmap::{Bitmap, RefSlice, WithBitmapSlice};
use vm_memory::mmap::NewBitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use crate::launch::GuestMem;

/// Whether VHOST_F_LOG_ALL is acknowledged on this process's connection.
static LOGGING: AtomicBool = AtomicBool::new(false);

/// Turns marking on or off, as the frontend's SET_FEATURES says (`features` as acknowledged).
pub fn set_logging_from_features(features: u64) {
    let on = features & VhostUserVirtioFeatures::LOG_ALL.bits() != 0;
    let was = LOGGING.swap(on, Ordering::SeqCst);
    if was != on {
        log::info!(
            "dirty-page logging {}",
            if on { "on (migration)" } else { "off" }
        );
    }
}

/// Whether writes into guest memory are being logged.
#[inline]
pub fn logging() -> bool {
    LOGGING.load(Ordering::Relaxed) && !skip_for_test()
}

/// Test-only negative control (jail-probe builds): `VHOSTBOX_PROBE_SKIP_DMA_LOG=1` makes the
/// backend forget the writes vm-memory cannot see, so that a migration test can show it
/// catches exactly that bug. Read at start ([`read_test_switch`]), before the jail clears the
/// environment.
#[cfg(feature = "jail-probe")]
static SKIP: AtomicBool = AtomicBool::new(false);

/// Reads the test-only switch from the environment (jail-probe builds; nothing otherwise).
pub fn read_test_switch() {
    #[cfg(feature = "jail-probe")]
    SKIP.store(
        std::env::var_os("VHOSTBOX_PROBE_SKIP_DMA_LOG").is_some(),
        Ordering::Relaxed,
    );
}

#[cfg(feature = "jail-probe")]
#[inline]
fn skip_for_test() -> bool {
    SKIP.load(Ordering::Relaxed)
}

#[cfg(not(feature = "jail-probe"))]
#[inline(always)]
fn skip_for_test() -> bool {
    false
}

/// A guest memory region's dirty bitmap: the frontend's log once SET_LOG_BASE installed it.
#[derive(Debug, Default, Clone)]
pub struct DirtyLog {
    log: BitmapMmapRegion,
}

impl<'a> WithBitmapSlice<'a> for DirtyLog {
    type S = RefSlice<'a, DirtyLog>;
}

impl Bitmap for DirtyLog {
    #[inline]
    fn mark_dirty(&self, offset: usize, len: usize) {
        // After the write it accompanies (vm-memory marks after copying): a write that still
        // sees logging off happened before the frontend's first full pass over guest memory.
        if LOGGING.load(Ordering::Relaxed) {
            self.log.mark_dirty(offset, len);
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.log.dirty_at(offset)
    }

    #[inline]
    fn slice_at(&self, offset: usize) -> RefSlice<'_, DirtyLog> {
        RefSlice::new(self, offset)
    }
}

impl BitmapReplace for DirtyLog {
    type InnerBitmap = AtomicBitmapMmap;

    fn replace(&self, bitmap: AtomicBitmapMmap) {
        self.log.replace(bitmap);
    }
}

impl NewBitmap for DirtyLog {
    fn with_len(_len: usize) -> Self {
        Self::default()
    }
}

/// Marks `len` bytes at host address `ptr`, which lie in one region of `mem`: a write made
/// behind vm-memory's back (io_uring, `preadv`, a raw fill). Does nothing unless logging.
pub fn mark_host(mem: &GuestMem, ptr: *const u8, len: usize) {
    if len == 0 || !logging() {
        return;
    }
    let p = ptr as usize;
    for r in mem.iter() {
        let Ok(base) = r.get_host_address(MemoryRegionAddress(0)) else {
            continue;
        };
        let base = base as usize;
        let size = r.len() as usize;
        if p >= base && p - base < size {
            r.bitmap().mark_dirty(p - base, len.min(size - (p - base)));
            return;
        }
    }
}
