//! The relay between the frontend's connection and vhost-user-backend.
//!
//! Every frontend message passes through a small thread of the worker before the library sees
//! it, for two reasons:
//!
//! - QEMU's virtio-net sends VHOST_USER_SET_VRING_ENABLE for every queue pair as soon as the
//!   guest acknowledges its features, which is before QEMU starts the vhost device and sends
//!   VHOST_USER_SET_FEATURES. vhost-user-backend 0.24 rejects SET_VRING_ENABLE until
//!   VHOST_USER_F_PROTOCOL_FEATURES has been acknowledged in SET_FEATURES, and drops the
//!   connection. The spec only says the message "should be sent only when
//!   VHOST_USER_F_PROTOCOL_FEATURES has been negotiated" (it was: the bit was offered and the
//!   protocol features set). So until SET_FEATURES has gone by, the relay answers
//!   SET_VRING_ENABLE itself (an ack when one is asked for), remembers the state asked for,
//!   and hands the remembered states to the library right after SET_FEATURES: QEMU repeats
//!   them after starting the device only for multiqueue NICs.
//! - A device may add a [`Hook`] that sees every frontend message first and may answer it
//!   itself: vhostbox-blk answers the in-flight tracking messages (GET_INFLIGHT_FD and
//!   SET_INFLIGHT_FD) there, which vhost-user-backend does not implement.
//!
//! vhost-user-backend only takes connections from a listener, so the library's side is a
//! listener of its own with exactly one connection queued: the relay's. [`Relay::new`] makes
//! both before the jail (the jailed worker needs no socket or connect), and the listener is
//! closed as soon as the library has accepted, so nothing is left listening. Its abstract name
//! is private to the worker's network namespace in `--sandbox namespace`; in the other modes a
//! local process could see it in /proc/net/unix, so the listener's backlog is 0 (one pending
//! connection fits, no second) and the relay's own connect is non-blocking: if anyone else got
//! in first, that connect fails and the listener is made again under a new name. A connection
//! made after the library's accept is never accepted and dies with the listener.
//!
//! Only control messages pass through the relay; the datapath (shared memory, eventfds) never
//! does.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};

use log::debug;
use vhost::vhost_user::message::{
    FrontendReq, VhostUserHeaderFlag, VhostUserLog, VhostUserMemory, VhostUserMemoryRegion,
    VhostUserSingleMemoryRegion, VhostUserVringAddr, VhostUserVringState, MAX_MSG_SIZE,
};
use vhost::vhost_user::Listener;
use vm_memory::ByteValued;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::metrics::{self, ConnWord};

/// The most fds one vhost-user message carries (VHOST_MEMORY_BASELINE_NREGIONS).
const MAX_FDS: usize = 8;
/// Bytes of the message header: request, flags, size (three native-endian u32).
const HEADER: usize = 12;
/// Largest payload of a well-formed message (vhost's MAX_MSG_SIZE less the header).
const MAX_PAYLOAD: usize = MAX_MSG_SIZE - HEADER;
/// Attempts at a listener nobody else connected to first.
const BIND_ATTEMPTS: usize = 8;

/// What the relay does with a frontend message.
pub enum Action {
    /// Pass it on to vhost-user-backend.
    Forward,
    /// Answer the frontend with this message (or nothing) and do not pass it on.
    Answer(Option<Msg>),
}

/// Sees each frontend message before the library does.
pub trait Hook: Send {
    fn on_frontend(&mut self, msg: &mut Msg) -> Action;
}

/// The library's side, made before the jail: a private listener with the relay's connection
/// queued on it.
pub struct Relay {
    listener: Listener,
    ours: UnixStream,
    rings: Option<RingLimit>,
}

/// How many rings the device has, and the flag that sets it, to refuse (and explain) a ring
/// index past them.
#[derive(Debug, Clone)]
pub struct RingLimit {
    pub count: u32,
    /// What the device was started with, e.g. "vhostbox-net --queue-pairs 1".
    pub started_with: String,
}

impl Relay {
    /// Makes the private listener and queues the relay's connection on it.
    pub fn new() -> io::Result<Relay> {
        let mut last = None;
        for _ in 0..BIND_ATTEMPTS {
            let (listener, name) = private_listener()?;
            match connect_nonblocking(&name) {
                Ok(ours) => {
                    ours.set_nonblocking(false)?;
                    return Ok(Relay {
                        listener: Listener::from(listener),
                        ours,
                        rings: None,
                    });
                }
                // Someone else's connection filled the one place: start afresh.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    log::warn!("relay: a foreign connection to {name:?} was refused; new name");
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("no private listener")))
    }

    /// Refuse messages for a ring the device does not have, naming the request, the ring and
    /// how many there are (the library would only say "invalid parameters" and hang up).
    pub fn limit_rings(mut self, limit: RingLimit) -> Self {
        self.rings = Some(limit);
        self
    }

    /// The fds to keep in a jail.
    pub fn fds(&self) -> Vec<RawFd> {
        vec![self.listener.as_raw_fd(), self.ours.as_raw_fd()]
    }

    /// Relays `frontend` on a thread, passing each message to `hook` first. Returns the
    /// library's side: the listener to hand to `VhostUserDaemon::start`, to be dropped right
    /// after.
    pub fn start(self, frontend: UnixStream, hook: Option<Box<dyn Hook>>) -> io::Result<Listener> {
        let ours = self.ours;
        let checks = Checks {
            rings: self.rings,
            ..Checks::default()
        };
        std::thread::Builder::new()
            .name("vu-relay".into())
            .spawn(move || relay(frontend, ours, hook, checks))?;
        Ok(self.listener)
    }
}

/// A listening socket with a random abstract name and room for one pending connection.
fn private_listener() -> io::Result<(UnixListener, Vec<u8>)> {
    let mut rnd = [0u8; 8];
    // SAFETY: getrandom writes at most 8 bytes into `rnd`.
    if unsafe { libc::getrandom(rnd.as_mut_ptr().cast(), rnd.len(), 0) } != 8 {
        return Err(io::Error::last_os_error());
    }
    let name = format!(
        "vhostbox-relay-{}-{:016x}",
        std::process::id(),
        u64::from_ne_bytes(rnd)
    )
    .into_bytes();
    let fd = socket()?;
    let (addr, len) = abstract_addr(&name);
    // SAFETY: bind and listen on our own socket with an initialised address of `len` bytes.
    unsafe {
        if libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        ) < 0
            || libc::listen(fd.as_raw_fd(), 0) < 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok((UnixListener::from(fd), name))
}

fn socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn abstract_addr(name: &[u8]) -> (libc::sockaddr_un, libc::socklen_t) {
    let mut addr = libc::sockaddr_un {
        sun_family: libc::AF_UNIX as libc::sa_family_t,
        sun_path: [0; 108],
    };
    // sun_path[0] stays 0: an abstract name.
    for (d, &s) in addr.sun_path[1..].iter_mut().zip(name) {
        *d = s as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + 1 + name.len().min(107);
    (addr, len as libc::socklen_t)
}

/// Connects without waiting: a listener with no room answers EAGAIN at once.
fn connect_nonblocking(name: &[u8]) -> io::Result<UnixStream> {
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let (addr, len) = abstract_addr(name);
    // SAFETY: connect with an initialised address of `len` bytes.
    let r = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(fd))
}

/// One vhost-user message: the header fields, the payload and the fds that came with it.
pub struct Msg {
    request: u32,
    flags: u32,
    pub payload: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

impl Msg {
    /// The request code as sent.
    pub fn code(&self) -> u32 {
        self.request
    }

    /// The request, if the code is one vhost knows.
    pub fn request(&self) -> Option<FrontendReq> {
        FrontendReq::try_from(self.request).ok()
    }

    /// Whether the frontend asked for an acknowledgement (REPLY_ACK).
    pub fn needs_reply(&self) -> bool {
        self.flags & VhostUserHeaderFlag::NEED_REPLY.bits() != 0
    }

    /// The payload's first bytes as `T`, if it has that many.
    pub fn payload_as<T: ByteValued>(&self) -> Option<T> {
        let bytes = self.payload.get(..std::mem::size_of::<T>())?;
        T::from_slice(bytes).copied()
    }

    /// A reply to `request` carrying `payload` and `fds`.
    pub fn reply(request: FrontendReq, payload: Vec<u8>, fds: Vec<OwnedFd>) -> Msg {
        Msg {
            request: request.into(),
            flags: 1 | VhostUserHeaderFlag::REPLY.bits(),
            payload,
            fds,
        }
    }

    /// A request that asks for no reply.
    pub fn new_request(request: FrontendReq, payload: Vec<u8>) -> Msg {
        Msg {
            request: request.into(),
            flags: 1,
            payload,
            fds: Vec::new(),
        }
    }

    /// The REPLY_ACK answer: 0 for success, anything else for failure.
    pub fn ack(request: FrontendReq, ok: bool) -> Msg {
        Self::reply(request, u64::from(!ok).to_le_bytes().to_vec(), Vec::new())
    }

    /// A failed REPLY_ACK for a request code (known to vhost or not).
    fn nack(code: u32) -> Msg {
        Msg {
            request: code,
            flags: 1 | VhostUserHeaderFlag::REPLY.bits(),
            payload: 1u64.to_le_bytes().to_vec(),
            fds: Vec::new(),
        }
    }

    fn header(&self) -> [u8; HEADER] {
        let mut h = [0u8; HEADER];
        h[0..4].copy_from_slice(&self.request.to_ne_bytes());
        h[4..8].copy_from_slice(&self.flags.to_ne_bytes());
        h[8..12].copy_from_slice(&(self.payload.len() as u32).to_ne_bytes());
        h
    }
}

/// A message's request for the log: vhost's name, or the number.
fn request_name(m: &Msg) -> String {
    match m.request() {
        Some(r) => format!("{r:?}"),
        None => format!("request {}", m.code()),
    }
}

/// Reads one message; None at end of stream.
fn read_msg(s: &UnixStream) -> io::Result<Option<Msg>> {
    let mut hdr = [0u8; HEADER];
    let mut fds = [-1; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: hdr.as_mut_ptr().cast(),
        iov_len: hdr.len(),
    }];
    // SAFETY: the iovec points to `hdr`, which we own and which may take any bytes.
    let (n, nfds) = unsafe { s.recv_with_fds(&mut iov, &mut fds) }.map_err(io::Error::other)?;
    // SAFETY: recv_with_fds handed these fds to us; nothing else owns them.
    let fds: Vec<OwnedFd> = fds[..nfds]
        .iter()
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if n == 0 {
        return Ok(None);
    }
    read_exact(s, &mut hdr[n..])?;
    let field = |i: usize| u32::from_ne_bytes(hdr[4 * i..4 * i + 4].try_into().expect("4 bytes"));
    let size = field(2) as usize;
    if size > MAX_PAYLOAD {
        return Err(io::Error::other(format!("message payload of {size} bytes")));
    }
    let mut payload = vec![0u8; size];
    read_exact(s, &mut payload)?;
    Ok(Some(Msg {
        request: field(0),
        flags: field(1),
        payload,
        fds,
    }))
}

fn read_exact(s: &UnixStream, mut buf: &mut [u8]) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: reads at most buf.len() bytes into a buffer we own.
        let n = unsafe { libc::read(s.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        match n {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n if n < 0 => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            n => buf = &mut buf[n as usize..],
        }
    }
    Ok(())
}

fn write_msg(s: &UnixStream, m: &Msg) -> io::Result<()> {
    let mut bytes = m.header().to_vec();
    bytes.extend_from_slice(&m.payload);
    let fds: Vec<RawFd> = m.fds.iter().map(|f| f.as_raw_fd()).collect();
    let n = s
        .send_with_fds(&[&bytes[..]], &fds)
        .map_err(io::Error::other)?;
    if n != bytes.len() {
        // The fds went with the first part; the rest is plain data.
        let mut w = s;
        std::io::Write::write_all(&mut w, &bytes[n..])?;
    }
    Ok(())
}

/// Most early ring states remembered (a frontend could send any index).
const MAX_EARLY: usize = 512;

/// The relay's bookkeeping of SET_VRING_ENABLE before SET_FEATURES.
#[derive(Default)]
struct EarlyEnable {
    features_set: bool,
    states: std::collections::BTreeMap<u32, u32>,
}

impl EarlyEnable {
    /// Whether the relay answers `m` itself (it was remembered).
    fn take(&mut self, m: &Msg) -> bool {
        if self.features_set || m.request() != Some(FrontendReq::SET_VRING_ENABLE) {
            return false;
        }
        debug!("relay: SET_VRING_ENABLE before SET_FEATURES answered here");
        if let Some(s) = m.payload_as::<VhostUserVringState>() {
            let (index, num) = (s.index, s.num);
            if self.states.len() < MAX_EARLY || self.states.contains_key(&index) {
                self.states.insert(index, num);
            }
        }
        true
    }

    /// After `m` went to the library: the remembered states, once SET_FEATURES went by.
    fn after(&mut self, m: &Msg) -> Vec<Msg> {
        if self.features_set || m.request() != Some(FrontendReq::SET_FEATURES) {
            return Vec::new();
        }
        self.features_set = true;
        std::mem::take(&mut self.states)
            .into_iter()
            .map(|(index, state)| {
                debug!("relay: ring {index} enable={state} passed on after SET_FEATURES");
                let s = VhostUserVringState::new(index, state);
                Msg::new_request(FrontendReq::SET_VRING_ENABLE, s.as_slice().to_vec())
            })
            .collect()
    }
}

/// What the relay refuses before vhost-user-backend sees it: messages the library would accept
/// although they break the ring or the worker. Each refusal is logged and, if the frontend
/// asked for one, answered with a failure; the message is not passed on.
///
/// - SET_VRING_NUM of 0 or a size that is not a power of two: virtio-queue ignores such a size
///   and keeps the old one, so the ring would run with a size the driver did not lay out.
///   The ring also stays unusable (its SET_VRING_KICK is refused) until a valid size comes.
/// - SET_VRING_BASE past 0xffff: split rings have 16-bit indices (packed rings are not
///   offered), and the library would truncate it.
/// - SET_VRING_KICK/CALL/ERR with an fd that is not an eventfd-like anonymous inode open for
///   reading and writing (a regular file would stall the queue without a word).
/// - Any ring message (SET_VRING_NUM/ADDR/BASE/KICK/CALL/ERR/ENABLE) for a ring past the
///   device's last, with what the device was started with: a frontend that asks for more
///   queues than the backend has.
/// - SET_MEM_TABLE and ADD_MEM_REG whose regions lie beyond their fd's end, or whose fd is not
///   a regular file (a memfd, a hugetlbfs or tmpfs file): the worker would die of SIGBUS at
///   the first access.
/// - SET_LOG_BASE whose log is not a regular file (memfd), lies beyond its fd's end, is
///   empty or larger than [`MAX_LOG_BYTES`], or does not cover the guest memory the frontend
///   set: the worker would die of SIGBUS at the first logged write, or the library would end
///   the connection. The reply to SET_LOG_BASE has no status field, so this refusal ends the
///   connection (see [`relay`]).
#[derive(Default)]
struct Checks {
    /// Guest memory regions as the frontend set them: (guest address, size).
    regions: Vec<(u64, u64)>,
    /// Rings whose last SET_VRING_NUM was refused.
    no_size: std::collections::BTreeSet<u32>,
    /// Whether the frontend's memory was found not sealed against shrinking (logged once).
    unsealed_logged: bool,
    /// The device's rings, if the caller said.
    rings: Option<RingLimit>,
}

/// The largest dirty-page log accepted: 1 GiB, one bit per page of 32 TiB of guest memory.
pub const MAX_LOG_BYTES: u64 = 1 << 30;
/// The page size the dirty-page log counts in (the vhost-user spec's VHOST_LOG_PAGE).
const LOG_PAGE: u64 = 0x1000;

/// Bits 0-7 of a SET_VRING_KICK/CALL/ERR payload: the ring; bit 8: no fd (polling).
const VRING_IDX_MASK: u64 = 0xff;
const VRING_NOFD: u64 = 0x100;

impl Checks {
    fn check(&mut self, m: &Msg) -> Result<(), String> {
        self.check_ring_index(m)?;
        use FrontendReq::*;
        match m.request() {
            Some(SET_VRING_NUM) => {
                let s = m
                    .payload_as::<VhostUserVringState>()
                    .ok_or("short payload")?;
                let (index, num) = (s.index, s.num);
                if num == 0 || !num.is_power_of_two() {
                    self.no_size.insert(index);
                    return Err(format!(
                        "ring {index} size {num}: a split ring's size is a power of two"
                    ));
                }
                self.no_size.remove(&index);
                Ok(())
            }
            Some(SET_VRING_BASE) => {
                let s = m
                    .payload_as::<VhostUserVringState>()
                    .ok_or("short payload")?;
                let (index, num) = (s.index, s.num);
                if num > u32::from(u16::MAX) {
                    return Err(format!("ring {index} base {num:#x}: indices are 16 bits"));
                }
                Ok(())
            }
            Some(req @ (SET_VRING_KICK | SET_VRING_CALL | SET_VRING_ERR)) => {
                let v = m.payload_as::<u64>().ok_or("short payload")?;
                let index = (v & VRING_IDX_MASK) as u32;
                if req == SET_VRING_KICK && self.no_size.contains(&index) {
                    return Err(format!("ring {index} has no valid size"));
                }
                if v & VRING_NOFD != 0 {
                    return Ok(());
                }
                let fd = m.fds.first().ok_or("no fd")?;
                check_eventfd(fd).map_err(|e| format!("ring {index}: {e}"))
            }
            Some(SET_MEM_TABLE) => {
                let hdr = m.payload_as::<VhostUserMemory>().ok_or("short payload")?;
                let n = hdr.num_regions as usize;
                let size = std::mem::size_of::<VhostUserMemoryRegion>();
                let body = &m.payload[std::mem::size_of::<VhostUserMemory>()..];
                if n != m.fds.len() || body.len() < n * size {
                    return Err(format!("{n} regions, {} fds", m.fds.len()));
                }
                let mut regions = Vec::with_capacity(n);
                for (i, fd) in m.fds.iter().enumerate() {
                    let r = VhostUserMemoryRegion::from_slice(&body[i * size..(i + 1) * size])
                        .copied()
                        .ok_or("bad region")?;
                    self.check_region(fd, r.mmap_offset, r.memory_size)
                        .map_err(|e| format!("region {i}: {e}"))?;
                    regions.push((r.guest_phys_addr, r.memory_size));
                }
                self.regions = regions;
                Ok(())
            }
            Some(ADD_MEM_REG) => {
                let r = m
                    .payload_as::<VhostUserSingleMemoryRegion>()
                    .ok_or("short payload")?;
                let fd = m.fds.first().ok_or("no fd")?;
                self.check_region(fd, r.mmap_offset, r.memory_size)?;
                self.regions.push((r.guest_phys_addr, r.memory_size));
                Ok(())
            }
            Some(REM_MEM_REG) => {
                if let Some(r) = m.payload_as::<VhostUserSingleMemoryRegion>() {
                    let gpa = r.guest_phys_addr;
                    self.regions.retain(|&(a, _)| a != gpa);
                }
                Ok(())
            }
            Some(SET_LOG_BASE) => self.check_log(m),
            Some(SET_BACKEND_REQ_FD) => {
                let fd = m.fds.first().ok_or("no fd")?;
                let st = fstat(fd).map_err(|e| e.to_string())?;
                if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
                    return Err(format!("the fd is not a socket (mode {:o})", st.st_mode));
                }
                Ok(())
            }
            Some(SET_LOG_FD) => {
                let fd = m.fds.first().ok_or("no fd")?;
                check_eventfd(fd)
            }
            _ => Ok(()),
        }
    }

    /// A ring message for a ring the device has (GET_VRING_BASE is left to the library: its
    /// frontend waits for a reply that a refusal would not give).
    fn check_ring_index(&self, m: &Msg) -> Result<(), String> {
        use FrontendReq::*;
        let Some(limit) = &self.rings else {
            return Ok(());
        };
        let index = match m.request() {
            Some(SET_VRING_NUM | SET_VRING_BASE | SET_VRING_ENABLE) => {
                m.payload_as::<VhostUserVringState>().map(|s| s.index)
            }
            Some(SET_VRING_ADDR) => m.payload_as::<VhostUserVringAddr>().map(|a| a.index),
            Some(SET_VRING_KICK | SET_VRING_CALL | SET_VRING_ERR) => {
                m.payload_as::<u64>().map(|v| (v & VRING_IDX_MASK) as u32)
            }
            _ => None,
        };
        match index {
            Some(i) if i >= limit.count => Err(format!(
                "ring {i}, but the device has {} (rings 0-{}; started as {}): the frontend asks \
                 for more queues than the backend has; start the backend with more, or give \
                 the frontend fewer",
                limit.count,
                limit.count.saturating_sub(1),
                limit.started_with
            )),
            _ => Ok(()),
        }
    }

    /// The dirty-page log: a shared file covering every guest page the frontend mapped.
    fn check_log(&mut self, m: &Msg) -> Result<(), String> {
        let log = m.payload_as::<VhostUserLog>().ok_or("short payload")?;
        let fd = m.fds.first().ok_or("no fd")?;
        let (size, offset) = (log.mmap_size, log.mmap_offset);
        if size > MAX_LOG_BYTES {
            return Err(format!(
                "a {size}-byte log, more than the {MAX_LOG_BYTES} bytes that cover 32 TiB of \
                 guest memory"
            ));
        }
        self.check_region(fd, offset, size)
            .map_err(|e| format!("log: {e}"))?;
        // One bit per 4 KiB page, from guest address 0 to the end of the highest region.
        let end = self
            .regions
            .iter()
            .map(|&(a, n)| a.saturating_add(n))
            .max()
            .unwrap_or(0);
        let needed = end.div_ceil(LOG_PAGE).div_ceil(8);
        if size < needed {
            return Err(format!(
                "a {size}-byte log covers {} bytes of guest memory, which ends at {end:#x} \
                 (needs {needed} bytes)",
                size.saturating_mul(8 * LOG_PAGE)
            ));
        }
        Ok(())
    }

    /// A guest memory region of `len` bytes at `offset` in `fd`.
    fn check_region(&mut self, fd: &OwnedFd, offset: u64, len: u64) -> Result<(), String> {
        let st = fstat(fd).map_err(|e| e.to_string())?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err("not a memfd or regular file".into());
        }
        match offset.checked_add(len) {
            Some(end) if len > 0 && end <= st.st_size as u64 => {}
            _ => {
                return Err(format!(
                    "{len} bytes at offset {offset} of a {}-byte file",
                    st.st_size
                ))
            }
        }
        // SAFETY: F_GET_SEALS on an fd we hold; fails (EINVAL) for files that are not memfds.
        let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
        if seals >= 0 && seals & libc::F_SEAL_SHRINK == 0 && !self.unsealed_logged {
            self.unsealed_logged = true;
            log::warn!(
                "guest memory is a memfd not sealed against shrinking: a frontend that \
                 truncates it kills the worker (SIGBUS; the supervisor replaces it)"
            );
        }
        Ok(())
    }
}

fn fstat(fd: &OwnedFd) -> io::Result<libc::stat> {
    // SAFETY: stat is a plain C struct of integers: all-zero is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat on an fd we hold, into a struct we own.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

/// An eventfd is an anonymous inode (no file type) open for reading and writing.
fn check_eventfd(fd: &OwnedFd) -> Result<(), String> {
    let st = fstat(fd).map_err(|e| e.to_string())?;
    // SAFETY: F_GETFL on an fd we hold.
    let fl = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if st.st_mode & libc::S_IFMT != 0 || fl < 0 || fl & libc::O_ACCMODE != libc::O_RDWR {
        return Err(format!(
            "the fd is not an eventfd (mode {:o}, flags {fl:#x})",
            st.st_mode
        ));
    }
    Ok(())
}

/// Waits until `a` or `b` is readable (or hung up): which ones.
fn wait_readable(a: &UnixStream, b: &UnixStream) -> io::Result<(bool, bool)> {
    loop {
        let mut p = [a.as_raw_fd(), b.as_raw_fd()].map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        });
        // SAFETY: two valid pollfds.
        if unsafe { libc::poll(p.as_mut_ptr(), 2, -1) } < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        return Ok((p[0].revents != 0, p[1].revents != 0));
    }
}

fn relay(
    frontend: UnixStream,
    backend: UnixStream,
    mut hook: Option<Box<dyn Hook>>,
    mut checks: Checks,
) {
    use crate::sandbox::seccomp::{install_thread, relay_rules, ThreadKind};
    if let Err(e) = install_thread(ThreadKind::Relay, relay_rules(std::process::id())) {
        log::error!("relay: {e}");
        let _ = frontend.shutdown(std::net::Shutdown::Both);
        return;
    }
    let mut early = EarlyEnable::default();
    metrics::set_conn(ConnWord::Connected, 1);
    let r = (|| -> io::Result<()> {
        loop {
            let (from_frontend, from_backend) = wait_readable(&frontend, &backend)?;
            if from_frontend {
                let Some(mut m) = read_msg(&frontend)? else {
                    return Ok(());
                };
                if let Err(why) = checks.check(&m) {
                    if m.request() == Some(FrontendReq::SET_LOG_BASE) {
                        // The reply carries no status (QEMU reads any reply as success), and
                        // a migration that goes on without a usable log would corrupt the
                        // destination silently: the connection ends instead, so the frontend
                        // sees the failure. The backend serves the next connection.
                        log::warn!(
                            "refused SET_LOG_BASE: {why}; ending the connection (a migration \
                             without a usable dirty log would corrupt the destination)"
                        );
                        return Ok(());
                    }
                    log::warn!("refused {}: {why}", request_name(&m));
                    if m.needs_reply() {
                        write_msg(&frontend, &Msg::nack(m.code()))?;
                    }
                    continue;
                }
                if let Some(h) = hook.as_mut() {
                    if let Action::Answer(reply) = h.on_frontend(&mut m) {
                        if let Some(r) = reply {
                            write_msg(&frontend, &r)?;
                        }
                        continue;
                    }
                }
                if m.request() == Some(FrontendReq::SET_LOG_FD) {
                    // The log's eventfd (for frontends that want a signal per logged write;
                    // QEMU never sends it). Checked above; logging needs no signal, so it is
                    // closed here instead of reaching the library, which does not know it.
                    if m.needs_reply() {
                        write_msg(&frontend, &Msg::ack(FrontendReq::SET_LOG_FD, true))?;
                    }
                    continue;
                }
                if early.take(&m) {
                    if m.needs_reply() {
                        write_msg(&frontend, &Msg::ack(FrontendReq::SET_VRING_ENABLE, true))?;
                    }
                    continue;
                }
                if m.request() == Some(FrontendReq::SET_BACKEND_REQ_FD) {
                    // Kept to send CONFIG_CHANGE_MSG, which the vhost crate's backend channel
                    // cannot send; the library gets the fd as well.
                    let fd = m.fds.first().and_then(|f| f.try_clone().ok());
                    *BACKEND_CHANNEL.lock().unwrap_or_else(|e| e.into_inner()) = fd;
                }
                record(&m);
                write_msg(&backend, &m)?;
                for e in early.after(&m) {
                    write_msg(&backend, &e)?;
                }
            }
            if from_backend {
                let Some(m) = read_msg(&backend)? else {
                    return Ok(());
                };
                write_msg(&frontend, &m)?;
            }
        }
    })();
    if let Err(e) = r {
        debug!("relay ended: {e}");
    }
    metrics::set_conn(ConnWord::Connected, 0);
    *BACKEND_CHANNEL.lock().unwrap_or_else(|e| e.into_inner()) = None;
    let _ = frontend.shutdown(std::net::Shutdown::Both);
    let _ = backend.shutdown(std::net::Shutdown::Both);
}

/// The frontend's backend channel (SET_BACKEND_REQ_FD, with VHOST_USER_PROTOCOL_F_BACKEND_REQ),
/// while it is connected.
static BACKEND_CHANNEL: std::sync::Mutex<Option<OwnedFd>> = std::sync::Mutex::new(None);

/// VHOST_USER_BACKEND_CONFIG_CHANGE_MSG.
const BACKEND_CONFIG_CHANGE_MSG: u32 = 2;
/// The header's version bits (the only flags a request without NEED_REPLY carries).
const VHOST_USER_VERSION: u32 = 1;

/// Tells the frontend that the device's config space changed (blk: its capacity), on the
/// backend channel: VHOST_USER_BACKEND_CONFIG_CHANGE_MSG, no payload, no reply asked for.
/// QEMU then reads the config space again (GET_CONFIG) and interrupts the guest. Returns
/// false when the frontend set up no channel.
pub fn send_config_change() -> io::Result<bool> {
    let g = BACKEND_CHANNEL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(fd) = g.as_ref() else {
        return Ok(false);
    };
    let mut hdr = [0u8; 12];
    hdr[0..4].copy_from_slice(&BACKEND_CONFIG_CHANGE_MSG.to_le_bytes());
    hdr[4..8].copy_from_slice(&VHOST_USER_VERSION.to_le_bytes());
    // SAFETY: writes our 12-byte buffer to the socket we hold.
    let n = unsafe { libc::write(fd.as_raw_fd(), hdr.as_ptr().cast(), hdr.len()) };
    if n != hdr.len() as isize {
        return Err(if n < 0 {
            io::Error::last_os_error()
        } else {
            io::Error::other("short write")
        });
    }
    Ok(true)
}

/// Notes in the metrics page what the frontend set up (features, rings, memory), for the
/// supervisor's `status`.
fn record(m: &Msg) {
    use FrontendReq::*;
    match m.request() {
        Some(SET_FEATURES) => {
            if let Some(v) = m.payload_as::<u64>() {
                metrics::set_conn(ConnWord::Features, v);
            }
        }
        Some(SET_PROTOCOL_FEATURES) => {
            if let Some(v) = m.payload_as::<u64>() {
                metrics::set_conn(ConnWord::ProtocolFeatures, v);
            }
        }
        Some(SET_VRING_ENABLE) => {
            if let Some(st) = m.payload_as::<VhostUserVringState>() {
                let (index, num) = (st.index, st.num);
                if index < 64 {
                    let bits = metrics::conn(ConnWord::RingsEnabled);
                    let bits = if num != 0 {
                        bits | 1 << index
                    } else {
                        bits & !(1 << index)
                    };
                    metrics::set_conn(ConnWord::RingsEnabled, bits);
                }
            }
        }
        Some(SET_MEM_TABLE) => {
            if let Some(h) = m.payload_as::<VhostUserMemory>() {
                metrics::set_conn(ConnWord::MemRegions, u64::from(h.num_regions));
            }
        }
        Some(ADD_MEM_REG) => {
            let n = metrics::conn(ConnWord::MemRegions);
            metrics::set_conn(ConnWord::MemRegions, n.saturating_add(1));
        }
        Some(REM_MEM_REG) => {
            let n = metrics::conn(ConnWord::MemRegions);
            metrics::set_conn(ConnWord::MemRegions, n.saturating_sub(1));
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The name the relay's listener is bound to, from the kernel.
    fn bound_name(l: &Listener) -> Vec<u8> {
        let mut addr: libc::sockaddr_un = libc::sockaddr_un {
            sun_family: 0,
            sun_path: [0; 108],
        };
        let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
        // SAFETY: getsockname into a sockaddr_un we own, `len` its size.
        let r = unsafe {
            libc::getsockname(
                l.as_raw_fd(),
                (&mut addr as *mut libc::sockaddr_un).cast(),
                &mut len,
            )
        };
        assert_eq!(r, 0);
        let n = len as usize - std::mem::size_of::<libc::sa_family_t>();
        addr.sun_path[1..n].iter().map(|&c| c as u8).collect()
    }

    #[test]
    fn a_foreign_connect_gets_no_place_and_nothing_after_the_accept() {
        let relay = Relay::new().unwrap();
        let name = bound_name(&relay.listener);
        // The one place is taken by the relay's own connection.
        let e = connect_nonblocking(&name).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "{e}");
        let (frontend, _peer) = UnixStream::pair().unwrap();
        let listener = relay.start(frontend, None).unwrap();
        let accepted = listener.accept().unwrap().expect("the relay's connection");
        drop(listener);
        drop(accepted);
        // Nothing listens any more.
        let e = connect_nonblocking(&name).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{e}");
    }

    #[test]
    fn enable_before_features_is_answered_then_passed_on() {
        let mut early = EarlyEnable::default();
        let enable = |i: u32| {
            Msg::new_request(
                FrontendReq::SET_VRING_ENABLE,
                VhostUserVringState::new(i, 1).as_slice().to_vec(),
            )
        };
        assert!(early.take(&enable(0)));
        assert!(early.take(&enable(1)));
        let features = Msg::new_request(FrontendReq::SET_FEATURES, vec![0; 8]);
        assert!(!early.take(&features));
        let passed = early.after(&features);
        assert_eq!(passed.len(), 2);
        assert_eq!(
            passed[1]
                .payload_as::<VhostUserVringState>()
                .map(|s| s.index),
            Some(1)
        );
        assert!(
            !early.take(&enable(2)),
            "after SET_FEATURES the library answers"
        );
        assert!(early.after(&features).is_empty());
    }
}
