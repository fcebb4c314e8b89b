//! A VM-free vhost-user frontend: guest memory in memfds, split virtqueues driven from the
//! driver side, and a device connection that negotiates features and hands the rings to a
//! backend. Device drivers (net_frontend) build on it; all messages go through
//! `vhost::vhost_user::Frontend`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight};
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

pub use vhostbox_common::test_utils::{
    Desc, F_INDIRECT as VIRTQ_DESC_F_INDIRECT, F_NEXT as VIRTQ_DESC_F_NEXT,
    F_WRITE as VIRTQ_DESC_F_WRITE,
};
use vhostbox_common::test_utils::{Layout, RingMemory, SplitRing};

pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

fn vu<T>(what: &str, r: vhost::Result<T>) -> io::Result<T> {
    r.map_err(|e| io::Error::other(format!("{what}: {e}")))
}

/// One memfd mapped shared into this process.
struct Region {
    gpa: u64,
    size: u64,
    host: *mut u8,
    fd: OwnedFd,
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: `host` is a mapping of `size` bytes made in `GuestMemory::with_regions`,
        // unmapped only here.
        unsafe { libc::munmap(self.host.cast(), self.size as usize) };
    }
}

/// Guest RAM: memfd regions at fixed guest physical addresses, with a bump allocator.
/// Out-of-range accesses panic (they are bugs in the test).
pub struct GuestMemory {
    regions: Vec<Region>,
    next: Mutex<Vec<u64>>,
}

// SAFETY: the raw pointers are private mappings owned by this struct for its whole life; all
// access goes through bounds-checked copies and atomics, never through Rust references (the
// backend process writes the same memory concurrently anyway).
unsafe impl Send for GuestMemory {}
// SAFETY: see Send; the allocator state is behind a Mutex.
unsafe impl Sync for GuestMemory {}

impl GuestMemory {
    /// One region of `size` bytes at guest address 0.
    pub fn new(size: usize) -> io::Result<Self> {
        Self::with_regions(&[(0, size)])
    }

    /// One memfd region per `(guest address, size)`; they must not overlap.
    pub fn with_regions(layout: &[(u64, usize)]) -> io::Result<Self> {
        let mut regions = Vec::new();
        for &(gpa, size) in layout {
            // SAFETY: a NUL-terminated name; the result is checked.
            let fd = unsafe { libc::memfd_create(c"vhostbox-guest".as_ptr(), libc::MFD_CLOEXEC) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: `fd` is a fresh descriptor that nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: resizes our own memfd.
            if unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) } < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: a new shared mapping of the whole memfd at an address the kernel picks.
            let host = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    size,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd.as_raw_fd(),
                    0,
                )
            };
            if host == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            let size = size as u64;
            regions.push(Region {
                gpa,
                size,
                host: host.cast(),
                fd,
            });
        }
        Ok(GuestMemory {
            next: Mutex::new(vec![0; regions.len()]),
            regions,
        })
    }

    /// The regions as SET_MEM_TABLE wants them (userspace_addr: our mapping).
    pub fn region_infos(&self) -> Vec<VhostUserMemoryRegionInfo> {
        let info = |r: &Region| VhostUserMemoryRegionInfo {
            guest_phys_addr: r.gpa,
            memory_size: r.size,
            userspace_addr: r.host as u64,
            mmap_offset: 0,
            mmap_handle: r.fd.as_raw_fd(),
        };
        self.regions.iter().map(info).collect()
    }

    /// The first guest address above every region: a handy out-of-memory address.
    pub fn end(&self) -> u64 {
        self.regions
            .iter()
            .map(|r| r.gpa + r.size)
            .max()
            .unwrap_or(0)
    }

    /// Whether `[addr, addr + len)` lies within one region.
    pub fn contains(&self, addr: u64, len: usize) -> bool {
        self.find(addr, len).is_some()
    }

    fn find(&self, addr: u64, len: usize) -> Option<*mut u8> {
        let r = self.regions.iter().find(|r| {
            addr >= r.gpa && addr - r.gpa <= r.size && len as u64 <= r.size - (addr - r.gpa)
        })?;
        Some(r.host.wrapping_add((addr - r.gpa) as usize))
    }

    fn host(&self, addr: u64, len: usize) -> *mut u8 {
        self.find(addr, len)
            .unwrap_or_else(|| panic!("guest range {addr:#x}+{len:#x} is outside guest memory"))
    }

    /// This process's virtual address of guest address `addr` (what SET_VRING_ADDR carries).
    pub fn host_addr(&self, addr: u64) -> u64 {
        self.host(addr, 0) as u64
    }

    pub fn write(&self, addr: u64, data: &[u8]) {
        let p = self.host(addr, data.len());
        // SAFETY: host() checked the range lies in one live mapping; `data` is not in it.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) }
    }

    pub fn read(&self, addr: u64, buf: &mut [u8]) {
        let p = self.host(addr, buf.len());
        // SAFETY: host() checked the range lies in one live mapping; `buf` is not in it.
        unsafe { std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), buf.len()) }
    }

    pub fn read_vec(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.read(addr, &mut v);
        v
    }

    pub fn write_u16(&self, addr: u64, v: u16) {
        self.write(addr, &v.to_le_bytes());
    }

    pub fn read_u16(&self, addr: u64) -> u16 {
        let mut b = [0; 2];
        self.read(addr, &mut b);
        u16::from_le_bytes(b)
    }

    pub fn write_u32(&self, addr: u64, v: u32) {
        self.write(addr, &v.to_le_bytes());
    }

    pub fn read_u32(&self, addr: u64) -> u32 {
        let mut b = [0; 4];
        self.read(addr, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn write_u64(&self, addr: u64, v: u64) {
        self.write(addr, &v.to_le_bytes());
    }

    /// A ring index (avail/used idx, used_event, avail_event) shared with the device.
    pub fn atomic_u16(&self, addr: u64) -> &AtomicU16 {
        assert!(addr & 1 == 0, "unaligned ring index at {addr:#x}");
        let p = self.host(addr, 2);
        // SAFETY: in range and 2-aligned (the mapping is page-aligned); the mapping lives as
        // long as `self`, and ring indices are only accessed atomically.
        unsafe { AtomicU16::from_ptr(p.cast()) }
    }

    /// Allocates `len` bytes aligned to `align` (a power of two) from the first region with
    /// room. Never freed. Panics when memory is exhausted.
    pub fn alloc(&self, len: usize, align: u64) -> u64 {
        (0..self.regions.len())
            .find_map(|i| self.try_alloc(i, len, align))
            .unwrap_or_else(|| panic!("guest memory exhausted allocating {len} bytes"))
    }

    /// Like `alloc`, from region `region` only.
    pub fn alloc_in(&self, region: usize, len: usize, align: u64) -> u64 {
        self.try_alloc(region, len, align)
            .unwrap_or_else(|| panic!("guest region {region} exhausted allocating {len} bytes"))
    }

    fn try_alloc(&self, i: usize, len: usize, align: u64) -> Option<u64> {
        let r = &self.regions[i];
        let mut next = self.next.lock().unwrap();
        let start = (r.gpa + next[i]).next_multiple_of(align);
        (start + len as u64 <= r.gpa + r.size).then(|| {
            next[i] = start + len as u64 - r.gpa;
            start
        })
    }
}

impl RingMemory for GuestMemory {
    fn write(&self, addr: u64, data: &[u8]) {
        GuestMemory::write(self, addr, data)
    }
    fn read(&self, addr: u64, buf: &mut [u8]) {
        GuestMemory::read(self, addr, buf)
    }
    fn store_u16(&self, addr: u64, v: u16) {
        self.atomic_u16(addr).store(v, Ordering::Release)
    }
    fn load_u16(&self, addr: u64) -> u16 {
        self.atomic_u16(addr).load(Ordering::Acquire)
    }
}

/// The driver side of a split virtqueue in guest memory (vhostbox-common's `SplitRing`), with
/// its kick and call eventfds.
pub struct Virtqueue {
    ring: SplitRing<Arc<GuestMemory>>,
    /// Per-head indirect table: address and capacity in descriptors.
    indirect: Vec<(u64, usize)>,
    kick: EventFd,
    call: EventFd,
}

impl Virtqueue {
    /// Allocates the rings in `mem`: the descriptor table 16-aligned, the avail ring (with
    /// used_event) 2-aligned, the used ring (with avail_event) 4-aligned.
    pub fn new(mem: Arc<GuestMemory>, size: u16, event_idx: bool) -> io::Result<Self> {
        assert!(
            size.is_power_of_two() && size <= 32768,
            "bad queue size {size}"
        );
        let n = u64::from(size);
        let at = Layout {
            desc: mem.alloc(16 * n as usize, 16),
            avail: mem.alloc(6 + 2 * n as usize, 2),
            used: mem.alloc(6 + 8 * n as usize, 4),
        };
        let efd = || EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC);
        Ok(Virtqueue {
            ring: SplitRing::new(mem, size, at).with_event_idx(event_idx),
            indirect: vec![(0, 0); size.into()],
            kick: efd()?,
            call: efd()?,
        })
    }

    pub fn size(&self) -> u16 {
        self.ring.size()
    }
    pub fn desc_addr(&self) -> u64 {
        self.ring.layout().desc
    }
    pub fn avail_addr(&self) -> u64 {
        self.ring.layout().avail
    }
    pub fn used_addr(&self) -> u64 {
        self.ring.layout().used
    }
    pub fn num_free(&self) -> usize {
        self.ring.num_free()
    }
    /// The next avail index the driver will publish.
    pub fn avail_idx(&self) -> u16 {
        self.ring.avail_idx()
    }
    /// The used index up to which the driver has consumed entries.
    pub fn last_used(&self) -> u16 {
        self.ring.last_used()
    }
    pub fn kick_fd(&self) -> &EventFd {
        &self.kick
    }
    pub fn call_fd(&self) -> &EventFd {
        &self.call
    }
    pub fn mem(&self) -> &Arc<GuestMemory> {
        self.ring.mem()
    }

    /// Reads descriptor `i` of the table.
    pub fn read_desc(&self, i: u16) -> Desc {
        self.ring.read_desc(i)
    }

    /// Adds a chain of `(guest address, length, device-writable)` buffers and publishes it.
    /// Panics if fewer descriptors are free than buffers given.
    pub fn add(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
        self.ring.add(bufs)
    }

    /// Adds the buffers through one VIRTQ_DESC_F_INDIRECT descriptor and publishes it.
    pub fn add_indirect(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
        // The head the ring will use is the next free slot; its table is kept per head.
        let head = self.ring.next_free().expect("virtqueue full");
        let (mut table, cap) = self.indirect[usize::from(head)];
        if cap < bufs.len() {
            table = self.mem().alloc(16 * bufs.len(), 16);
            self.indirect[usize::from(head)] = (table, bufs.len());
        }
        let got = self.ring.add_indirect(table, bufs);
        assert_eq!(got, head);
        got
    }

    /// Writes `descs` into free table slots exactly as given, except `next`: a value below
    /// `descs.len()` names a position in `descs` and is translated to that descriptor's slot;
    /// larger values are written verbatim. Publishes the first one as head and returns it.
    pub fn add_raw_descs(&mut self, descs: &[Desc]) -> u16 {
        self.ring.add_raw(descs)
    }

    /// Puts `head` (any value, for negative tests too) into the avail ring and publishes it.
    pub fn publish(&mut self, head: u16) {
        self.ring.publish(head)
    }

    /// Signals the kick eventfd.
    pub fn kick(&mut self) {
        self.ring.kicked();
        self.kick.write(1).expect("write kick eventfd");
    }

    /// Kicks only if the device asked for it (avail_event with EVENT_IDX, else the used ring's
    /// NO_NOTIFY flag). Returns whether it kicked.
    pub fn kick_if_needed(&mut self) -> bool {
        let needed = self.ring.kick_needed();
        if needed {
            self.kick();
        }
        needed
    }

    /// Takes the next used entry, if any, and frees its chain's descriptors. With EVENT_IDX,
    /// writes used_event so the device notifies on the next entry. Panics on an id outside the
    /// ring; an id that is not in flight (a raw `publish`) is returned as is.
    pub fn poll_used(&mut self) -> Option<(u16, u32)> {
        self.ring.poll_used()
    }

    /// Waits up to `timeout` for a used entry: checks the ring, then polls the call eventfd
    /// for at most 10 ms, and again (a suppressed notification never arrives).
    pub fn wait_used(&mut self, timeout: Duration) -> Option<(u16, u32)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(u) = self.poll_used() {
                return Some(u);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let ms = left.min(Duration::from_millis(10)).as_millis().max(1) as i32;
            let mut pfd = libc::pollfd {
                fd: self.call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            if unsafe { libc::poll(&mut pfd, 1, ms) } > 0 {
                let _ = self.call.read();
            }
        }
    }
}

/// Connection options; `Default` gives 256-entry queues, 64 MiB of guest memory and the
/// protocol features MQ | REPLY_ACK | CONFIG | CONFIGURE_MEM_SLOTS.
#[derive(Clone, Debug)]
pub struct DeviceOptions {
    pub queue_size: u16,
    pub mem_size: usize,
    /// A second memory region `(guest address, size)`, used once the first is full or
    /// through `GuestMemory::alloc_in(1, ..)`.
    pub extra_region: Option<(u64, usize)>,
    /// Protocol features to acknowledge if the backend offers them.
    pub protocol_features: u64,
    /// How long to retry connecting while the socket is missing or refuses.
    pub connect_timeout: Duration,
    /// Socket read timeout: a backend that stops answering fails the call instead of hanging.
    pub reply_timeout: Duration,
    /// Send SET_VRING_ENABLE(1) for every queue at connect (with protocol features).
    pub enable_queues: bool,
    /// Ask for an in-flight region (GET_INFLIGHT_FD) and set it (SET_INFLIGHT_FD) before the
    /// queues start, as QEMU's vhost-user-blk does, if the backend offers INFLIGHT_SHMFD.
    pub inflight: bool,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        let pf = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
        DeviceOptions {
            queue_size: 256,
            mem_size: 64 << 20,
            extra_region: None,
            protocol_features: pf.bits(),
            connect_timeout: Duration::from_secs(5),
            reply_timeout: Duration::from_secs(10),
            enable_queues: true,
            inflight: false,
        }
    }
}

/// A vhost-user device as the frontend sees it: the socket, guest memory and the queues.
pub struct VhostUserDevice {
    fe: Frontend,
    mem: Arc<GuestMemory>,
    queues: Vec<Virtqueue>,
    features: u64,
    protocol_features: u64,
    opts: DeviceOptions,
    /// The in-flight region the backend gave (kept across reconnects, as QEMU keeps it).
    inflight: Option<InflightRegion>,
}

/// The in-flight region as the frontend holds it: the description, the fd and a mapping.
pub struct InflightRegion {
    pub info: VhostUserInflight,
    pub file: std::fs::File,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: a shared mapping accessed with plain reads and writes from one thread at a time.
unsafe impl Send for InflightRegion {}

impl InflightRegion {
    fn map(info: VhostUserInflight, file: std::fs::File) -> io::Result<Self> {
        let len = info.mmap_size as usize;
        // SAFETY: maps the region the backend gave, shared, at its offset; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                info.mmap_offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            info,
            file,
            ptr: ptr.cast(),
            len,
        })
    }

    /// The region's bytes (the backend writes them concurrently: a snapshot).
    pub fn bytes(&self) -> Vec<u8> {
        // SAFETY: reads the whole mapping, which lives as long as self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len).to_vec() }
    }

    /// Writes `data` at `offset`, as a frontend (or a dying backend) could.
    pub fn write(&self, offset: usize, data: &[u8]) {
        assert!(offset + data.len() <= self.len);
        // SAFETY: the range was checked to lie inside the mapping.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(offset), data.len()) };
    }
}

impl Drop for InflightRegion {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping made in `map`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

impl VhostUserDevice {
    pub fn connect(
        socket: impl AsRef<Path>,
        num_queues: usize,
        queue_size: u16,
        features_wanted: u64,
        mem_size: usize,
    ) -> io::Result<Self> {
        let opts = DeviceOptions {
            queue_size,
            mem_size,
            ..Default::default()
        };
        Self::connect_with(socket, num_queues, features_wanted, &opts)
    }

    /// Connects and sets the device up: owner, features (`features_wanted` & offered, plus
    /// PROTOCOL_FEATURES if offered), protocol features, memory table, and every queue
    /// started and enabled.
    pub fn connect_with(
        socket: impl AsRef<Path>,
        num_queues: usize,
        features_wanted: u64,
        opts: &DeviceOptions,
    ) -> io::Result<Self> {
        let (fe, features, protocol_features) =
            Self::handshake(socket.as_ref(), num_queues, features_wanted, opts)?;
        let mut layout = vec![(0, opts.mem_size)];
        layout.extend(opts.extra_region);
        let mem = Arc::new(GuestMemory::with_regions(&layout)?);
        let event_idx = features & VIRTIO_RING_F_EVENT_IDX != 0;
        let queues = (0..num_queues)
            .map(|_| Virtqueue::new(mem.clone(), opts.queue_size, event_idx))
            .collect::<io::Result<_>>()?;
        let mut dev = VhostUserDevice {
            fe,
            mem,
            queues,
            features,
            protocol_features,
            opts: opts.clone(),
            inflight: None,
        };
        dev.setup(features_wanted)?;
        Ok(dev)
    }

    /// Connects again after the backend went away, keeping guest memory, the rings and the
    /// in-flight region, as QEMU does with `reconnect-ms`: the same negotiation, then
    /// SET_INFLIGHT_FD with the region the first backend gave, and every queue restarted at
    /// its used index (what QEMU falls back to when GET_VRING_BASE cannot be asked).
    pub fn reconnect(mut self, socket: impl AsRef<Path>) -> io::Result<Self> {
        let wanted = self.features;
        let (fe, features, protocol_features) =
            Self::handshake(socket.as_ref(), self.queues.len(), wanted, &self.opts)?;
        if features != self.features {
            return Err(io::Error::other(format!(
                "features changed across the reconnect: {features:#x} vs {:#x}",
                self.features
            )));
        }
        self.fe = fe;
        self.protocol_features = protocol_features;
        self.setup(wanted)?;
        Ok(self)
    }

    /// The in-flight region, if one was negotiated.
    pub fn inflight(&self) -> Option<&InflightRegion> {
        self.inflight.as_ref()
    }

    /// SET_MEM_TABLE, the in-flight region and every queue started (at its used index).
    fn setup(&mut self, _features_wanted: u64) -> io::Result<()> {
        vu(
            "SET_MEM_TABLE",
            self.fe.set_mem_table(&self.mem.region_infos()),
        )?;
        let pf = VhostUserProtocolFeatures::from_bits_truncate(self.protocol_features);
        if self.opts.inflight && pf.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD) {
            if self.inflight.is_none() {
                let ask =
                    VhostUserInflight::new(0, 0, self.queues.len() as u16, self.opts.queue_size);
                let (info, file) = vu("GET_INFLIGHT_FD", self.fe.get_inflight_fd(&ask))?;
                self.inflight = Some(InflightRegion::map(info, file)?);
            }
            let r = self.inflight.as_ref().unwrap();
            vu(
                "SET_INFLIGHT_FD",
                self.fe.set_inflight_fd(&r.info, r.file.as_raw_fd()),
            )?;
        }
        for i in 0..self.queues.len() {
            let base = self.mem.read_u16(self.queues[i].used_addr() + 2);
            self.start_queue(i, base)?;
            if self.opts.enable_queues && self.protocol_features != 0 {
                self.set_vring_enable(i, true)?;
            }
        }
        Ok(())
    }

    /// Opens the socket and negotiates: owner, features, protocol features, queue count.
    fn handshake(
        socket: &Path,
        num_queues: usize,
        features_wanted: u64,
        opts: &DeviceOptions,
    ) -> io::Result<(Frontend, u64, u64)> {
        let sock = connect_retry(socket, opts.connect_timeout)?;
        sock.set_read_timeout(Some(opts.reply_timeout))?;
        let mut fe = Frontend::from_stream(sock, num_queues as u64);
        vu("SET_OWNER", fe.set_owner())?;
        let offered = vu("GET_FEATURES", fe.get_features())?;
        let features = offered & (features_wanted | VHOST_USER_F_PROTOCOL_FEATURES);
        let mut protocol_features = 0;
        if features & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
            let pf = vu("GET_PROTOCOL_FEATURES", fe.get_protocol_features())?;
            let mut wanted = VhostUserProtocolFeatures::from_bits_truncate(opts.protocol_features);
            if opts.inflight {
                wanted |= VhostUserProtocolFeatures::INFLIGHT_SHMFD;
            }
            let pf = pf & wanted;
            vu("SET_PROTOCOL_FEATURES", fe.set_protocol_features(pf))?;
            if pf.contains(VhostUserProtocolFeatures::MQ) {
                let n = vu("GET_QUEUE_NUM", fe.get_queue_num())?;
                if n < num_queues as u64 {
                    let msg = format!("backend has {n} queues, {num_queues} wanted");
                    return Err(io::Error::other(msg));
                }
            }
            if pf.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                // Without NEED_REPLY the Frontend never waits for an ack: errors would go unseen.
                fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
            protocol_features = pf.bits();
        }
        vu("SET_FEATURES", fe.set_features(features))?;
        Ok((fe, features, protocol_features))
    }

    /// SET_VRING_NUM, _ADDR, _BASE(`base`), _CALL and _KICK for queue `i`: at connect, or to
    /// restart a queue after `stop_queue` (pass the index it returned).
    pub fn start_queue(&mut self, i: usize, base: u16) -> io::Result<()> {
        let q = &self.queues[i];
        let cfg = VringConfigData {
            queue_max_size: q.size(),
            queue_size: q.size(),
            flags: 0,
            desc_table_addr: self.mem.host_addr(q.desc_addr()),
            used_ring_addr: self.mem.host_addr(q.used_addr()),
            avail_ring_addr: self.mem.host_addr(q.avail_addr()),
            log_addr: None,
        };
        vu("SET_VRING_NUM", self.fe.set_vring_num(i, q.size()))?;
        vu("SET_VRING_ADDR", self.fe.set_vring_addr(i, &cfg))?;
        vu("SET_VRING_BASE", self.fe.set_vring_base(i, base))?;
        vu("SET_VRING_CALL", self.fe.set_vring_call(i, &q.call))?;
        vu("SET_VRING_KICK", self.fe.set_vring_kick(i, &q.kick))
    }

    /// GET_VRING_BASE: stops queue `i` and returns the device's next avail index.
    pub fn stop_queue(&mut self, i: usize) -> io::Result<u16> {
        vu("GET_VRING_BASE", self.fe.get_vring_base(i)).map(|b| b as u16)
    }

    pub fn set_vring_enable(&mut self, i: usize, enable: bool) -> io::Result<()> {
        vu("SET_VRING_ENABLE", self.fe.set_vring_enable(i, enable))
    }

    /// GET_CONFIG: `len` bytes of config space from `offset`.
    pub fn get_config(&mut self, offset: u32, len: u32) -> io::Result<Vec<u8>> {
        let buf = vec![0; len as usize];
        let r = self
            .fe
            .get_config(offset, len, VhostUserConfigFlags::empty(), &buf);
        vu("GET_CONFIG", r).map(|(_, data)| data)
    }

    /// SET_CONFIG: writes `data` into the config space at `offset`.
    pub fn set_config(&mut self, offset: u32, data: &[u8]) -> io::Result<()> {
        let r = self
            .fe
            .set_config(offset, VhostUserConfigFlags::WRITABLE, data);
        vu("SET_CONFIG", r)
    }

    pub fn negotiated_features(&self) -> u64 {
        self.features
    }
    pub fn protocol_features(&self) -> u64 {
        self.protocol_features
    }
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }
    pub fn queue(&mut self, i: usize) -> &mut Virtqueue {
        &mut self.queues[i]
    }
    pub fn mem(&self) -> &Arc<GuestMemory> {
        &self.mem
    }
    /// The raw frontend, for messages this type does not wrap.
    pub fn frontend(&mut self) -> &mut Frontend {
        &mut self.fe
    }

    /// Closes the connection (as dropping does); the backend may then take the next frontend.
    pub fn disconnect(self) {}
}

fn connect_retry(path: &Path, timeout: Duration) -> io::Result<UnixStream> {
    let deadline = Instant::now() + timeout;
    loop {
        match UnixStream::connect(path) {
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20))
            }
            r => return r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(size: u16, event_idx: bool) -> Virtqueue {
        Virtqueue::new(
            Arc::new(GuestMemory::new(1 << 20).unwrap()),
            size,
            event_idx,
        )
        .unwrap()
    }

    /// Plays device: puts `(id, len)` into the used ring and bumps used idx.
    fn complete(q: &Virtqueue, id: u16, len: u32) {
        let m = q.mem();
        let idx = m.read_u16(q.used_addr() + 2);
        let e = q.used_addr() + 4 + 8 * u64::from(idx % q.size());
        m.write_u32(e, id.into());
        m.write_u32(e + 4, len);
        m.atomic_u16(q.used_addr() + 2)
            .store(idx.wrapping_add(1), Ordering::Release);
    }

    fn avail_entry(q: &Virtqueue, i: u16) -> u16 {
        q.mem()
            .read_u16(q.avail_addr() + 4 + 2 * u64::from(i % q.size()))
    }

    #[test]
    fn ring_layout() {
        let q = queue(256, true);
        assert_eq!(q.desc_addr() % 16, 0);
        assert_eq!(q.avail_addr() % 2, 0);
        assert_eq!(q.used_addr() % 4, 0);
        assert!(q.desc_addr() + 16 * 256 <= q.avail_addr());
        assert!(q.avail_addr() + 6 + 2 * 256 <= q.used_addr());
        assert!(q.mem().contains(q.used_addr(), 6 + 8 * 256));
        assert_eq!(q.num_free(), 256);
    }

    #[test]
    fn chain_free_list_and_used() {
        let mut q = queue(8, true);
        let head = q.add(&[(0x8000, 12, false), (0x9000, 100, true), (0xa000, 50, true)]);
        assert_eq!(q.num_free(), 5);
        assert_eq!(q.mem().read_u16(q.avail_addr() + 2), 1);
        assert_eq!(avail_entry(&q, 0), head);
        let d0 = q.read_desc(head);
        assert_eq!((d0.addr, d0.len, d0.flags), (0x8000, 12, VIRTQ_DESC_F_NEXT));
        let d1 = q.read_desc(d0.next);
        assert_eq!(d1.flags, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE);
        let d2 = q.read_desc(d1.next);
        assert_eq!(
            (d2.addr, d2.len, d2.flags),
            (0xa000, 50, VIRTQ_DESC_F_WRITE)
        );
        let second = q.add(&[(0xb000, 1, false)]);
        assert_eq!(q.num_free(), 4);
        assert!(q.poll_used().is_none());
        complete(&q, second, 0);
        complete(&q, head, 150);
        assert_eq!(q.poll_used(), Some((second, 0)));
        assert_eq!(q.poll_used(), Some((head, 150)));
        assert_eq!(q.poll_used(), None);
        assert_eq!(q.num_free(), 8);
        // used_event follows the consumed entries.
        assert_eq!(q.mem().read_u16(q.avail_addr() + 4 + 2 * 8), 2);
        // Wrap the 16-bit indices around a small ring many times.
        for i in 0..70_000u32 {
            let h = q.add(&[(0x8000, i, false), (0x9000, 1, true)]);
            complete(&q, h, i);
            assert_eq!(q.poll_used(), Some((h, i)));
        }
        assert_eq!(q.num_free(), 8);
    }

    #[test]
    fn indirect_and_raw_descs() {
        let mut q = queue(4, false);
        let head = q.add_indirect(&[(0x8000, 10, false), (0x9000, 20, true)]);
        assert_eq!(q.num_free(), 3);
        let d = q.read_desc(head);
        assert_eq!((d.len, d.flags), (32, VIRTQ_DESC_F_INDIRECT));
        let t1 = q.mem().read_vec(d.addr + 16, 16);
        assert_eq!(u64::from_le_bytes(t1[..8].try_into().unwrap()), 0x9000);
        assert_eq!(u16::from_le_bytes([t1[12], t1[13]]), VIRTQ_DESC_F_WRITE);
        assert_eq!(u16::from_le_bytes([t1[0xe], t1[0xf]]), 0);
        complete(&q, head, 20);
        assert_eq!(q.wait_used(Duration::ZERO), Some((head, 20)));
        // The same head reuses its table.
        let again = q.add_indirect(&[(0x8000, 1, false)]);
        assert_eq!((again, q.read_desc(again).addr), (head, d.addr));
        complete(&q, again, 0);
        assert!(q.poll_used().is_some());

        // A loop: relative `next` is translated, out-of-range `next` is kept.
        let f = VIRTQ_DESC_F_NEXT;
        let h = q.add_raw_descs(&[
            Desc {
                addr: 0x8000,
                len: 1,
                flags: f,
                next: 1,
            },
            Desc {
                addr: 0x9000,
                len: 1,
                flags: f,
                next: 0,
            },
        ]);
        let d0 = q.read_desc(h);
        assert_eq!(q.read_desc(d0.next).next, h);
        complete(&q, h, 0);
        assert!(q.poll_used().is_some());
        let h = q.add_raw_descs(&[Desc {
            addr: q.mem().end(),
            len: 8,
            flags: f,
            next: 999,
        }]);
        assert_eq!(q.read_desc(h).next, 999);
        assert!(!q.mem().contains(q.read_desc(h).addr, 8));
        q.publish(3);
        assert_eq!(avail_entry(&q, q.avail_idx().wrapping_sub(1)), 3);
    }

    #[test]
    fn notifications() {
        let mut q = queue(8, true);
        let start = Instant::now();
        assert_eq!(q.wait_used(Duration::from_millis(30)), None);
        assert!(start.elapsed() >= Duration::from_millis(30));
        let h = q.add(&[(0x8000, 1, true)]);
        q.kick();
        assert_eq!(q.kick_fd().read().unwrap(), 1);
        // A "device" thread completes the buffer later and signals the call eventfd.
        let (mem, call, used) = (
            q.mem().clone(),
            q.call_fd().try_clone().unwrap(),
            q.used_addr(),
        );
        let dev = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            mem.write_u32(used + 4, h.into());
            mem.write_u32(used + 8, 7);
            mem.atomic_u16(used + 2).store(1, Ordering::Release);
            call.write(1).unwrap();
        });
        assert_eq!(q.wait_used(Duration::from_secs(5)), Some((h, 7)));
        dev.join().unwrap();
        // avail_event: the device wants a kick once avail idx passes 2.
        let avail_event = q.used_addr() + 4 + 8 * 8;
        q.mem().write_u16(avail_event, 2);
        q.add(&[(0x8000, 1, true)]); // idx 2: entry 1 published, event 2 not reached
        assert!(!q.kick_if_needed());
        q.add(&[(0x8000, 1, true)]); // idx 3: entry 2 published
        assert!(q.kick_if_needed());
        assert!(!q.kick_if_needed());
        // Without EVENT_IDX: the used ring's NO_NOTIFY flag.
        let mut q = queue(8, false);
        q.mem()
            .write_u16(q.used_addr(), vhostbox_common::test_utils::USED_F_NO_NOTIFY);
        q.add(&[(0x8000, 1, true)]);
        assert!(!q.kick_if_needed());
        q.mem().write_u16(q.used_addr(), 0);
        assert!(q.kick_if_needed());
    }

    #[test]
    fn two_regions() {
        let m = GuestMemory::with_regions(&[(0, 4096), (1 << 32, 8192)]).unwrap();
        assert_eq!(m.alloc(4000, 8), 0);
        assert_eq!(m.alloc(200, 64), 1 << 32);
        assert_eq!(m.alloc_in(1, 10, 4096), (1 << 32) + 4096);
        m.write((1 << 32) + 8190, &[1, 2]);
        assert_eq!(m.read_vec((1 << 32) + 8190, 2), [1, 2]);
        assert!(!m.contains((1 << 32) + 8190, 3));
        assert!(!m.contains(4000, 200));
        assert_eq!(m.end(), (1 << 32) + 8192);
        let infos = m.region_infos();
        assert_eq!(
            (infos[1].guest_phys_addr, infos[1].memory_size),
            (1 << 32, 8192)
        );
        assert_eq!(m.host_addr((1 << 32) + 5), infos[1].userspace_addr + 5);
        let oob = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| m.read_u16(8192)));
        assert!(oob.is_err());
    }
}
