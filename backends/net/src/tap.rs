//! The host end: tap queues opened by name (attach or create) or taken from a launcher's fds.
//!
//! Every queue is opened with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, non-blocking. The tap's
//! virtio-net header length and offloads are set when the guest negotiates features
//! ([`TapQueue::configure`]); until then the tap offers no offloads, so the kernel hands it only
//! complete, checksummed frames.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU8, Ordering};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
pub const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
pub const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
pub const TUNSETQUEUE: libc::c_ulong = 0x4004_54d9;
const TUNSETVNETLE: libc::c_ulong = 0x4004_54dc;

const IFF_TUN: i16 = 0x0001;
const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;
const IFF_MULTI_QUEUE: i16 = 0x0100;
const IFF_ATTACH_QUEUE: i16 = 0x0200;
const IFF_DETACH_QUEUE: i16 = 0x0400;

pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;
pub const TUN_F_TSO_ECN: u32 = 0x08;
pub const TUN_F_UFO: u32 = 0x10;

/// The most queues a Linux tap can have (MAX_TAP_QUEUES).
pub const MAX_TAP_QUEUES: u16 = 256;

/// struct ifreq, as far as the tun ioctls use it.
#[repr(C)]
#[derive(Clone, Copy)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: i16,
    _pad: [u8; 22],
}

impl IfReq {
    fn new(name: &str, flags: i16) -> Self {
        let mut r = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags,
            _pad: [0; 22],
        };
        let n = name.len().min(libc::IFNAMSIZ - 1);
        r.name[..n].copy_from_slice(&name.as_bytes()[..n]);
        r
    }

    fn name(&self) -> String {
        CStr::from_bytes_until_nul(&self.name)
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

/// Why the tap could not be used. Each message names the problem on one line.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(#[source] io::Error),
    #[error("tap {name}: cannot {what} queue {index} of {count}: {err}{hint}")]
    Attach {
        name: String,
        what: &'static str,
        index: usize,
        count: usize,
        err: io::Error,
        hint: String,
    },
    #[error("--tap-fd {0} is not an open file descriptor")]
    FdNotOpen(RawFd),
    #[error("--tap-fd {0} is not a tap queue (TUNGETIFF: {1})")]
    NotATap(RawFd, io::Error),
    #[error("--tap-fd {0} is a tun (layer 3) device {1}, not a tap")]
    IsTun(RawFd, String),
    #[error("--tap-fd {0} (tap {1}) was opened without {2}; open it with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR")]
    MissingFlag(RawFd, String, &'static str),
    #[error("--tap-fd {0} is tap {1} but --tap-fd {2} is tap {3}: all queues must be one tap")]
    Mixed(RawFd, String, RawFd, String),
    #[error("--tap-fd: tap {0} is not multi-queue (IFF_MULTI_QUEUE), so it cannot serve {1} queue pairs")]
    NotMultiQueue(String, usize),
    #[error("tap {0}: {1}")]
    Setup(String, &'static str, #[source] io::Error),
}

/// One queue of the tap: a file descriptor the frames of one queue pair go through.
#[derive(Debug)]
pub struct TapQueue {
    fd: OwnedFd,
    /// Whether the tap is multi-queue (queues can be detached and re-attached).
    multi_queue: bool,
    /// What this process last made of the queue: [`UNKNOWN`], [`ATTACHED`] or [`DETACHED`].
    /// A worker forked after another one detached the queue starts from UNKNOWN.
    attached: AtomicU8,
}

const UNKNOWN: u8 = 0;
const ATTACHED: u8 = 1;
const DETACHED: u8 = 2;

/// The opened tap: its name and its queues, one per queue pair.
#[derive(Debug)]
pub struct Tap {
    pub name: String,
    pub queues: Vec<TapQueue>,
    /// Whether this process created the interface (it goes away with the last queue).
    pub created: bool,
}

fn ioctl_ptr<T>(fd: RawFd, req: libc::c_ulong, arg: *mut T) -> io::Result<()> {
    // SAFETY: every caller passes a tun ioctl number with a pointer to the struct (or int) that
    // request reads or writes, valid for the call.
    if unsafe { libc::ioctl(fd, req, arg) } < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn ioctl_val(fd: RawFd, req: libc::c_ulong, val: libc::c_ulong) -> io::Result<()> {
    // SAFETY: a tun ioctl that takes its argument by value; no memory is passed.
    if unsafe { libc::ioctl(fd, req, val) } < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn interface_exists(name: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: a valid NUL-terminated string.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

impl Tap {
    /// Attaches `pairs` queues to the tap `name`, creating it if it does not exist.
    pub fn open(name: &str, pairs: usize) -> Result<Tap, TapError> {
        let existed = interface_exists(name);
        let what = if existed { "attach" } else { "create" };
        let mut queues = Vec::with_capacity(pairs);
        // One queue is enough for one pair, and an existing single-queue tap is fine then;
        // new taps are always made multi-queue.
        let mut mq = true;
        for index in 0..pairs {
            let q = loop {
                match open_queue(name, mq) {
                    Ok(fd) => break fd,
                    Err(e)
                        if index == 0
                            && pairs == 1
                            && existed
                            && mq
                            && e.raw_os_error() == Some(libc::EINVAL) =>
                    {
                        mq = false;
                    }
                    Err(e) => {
                        let hint = match e.raw_os_error() {
                            Some(libc::EPERM) => " (needs CAP_NET_ADMIN, or a tap owned by this user; or let a launcher pass --tap-fd)".to_string(),
                            Some(libc::EINVAL) if existed && pairs > 1 => format!(" (the interface is not a multi-queue tap: recreate it with `ip tuntap add {name} mode tap multi_queue vnet_hdr`, or use --queue-pairs 1)"),
                            Some(libc::EINVAL) if existed => " (the interface exists and is not a tap)".to_string(),
                            Some(libc::EBUSY) => " (the interface exists and is not a tap, or is busy)".to_string(),
                            Some(libc::E2BIG) => format!(" (a tap has at most {MAX_TAP_QUEUES} queues; use fewer --queue-pairs)"),
                            _ => String::new(),
                        };
                        return Err(TapError::Attach {
                            name: name.to_owned(),
                            what,
                            index: index + 1,
                            count: pairs,
                            err: e,
                            hint,
                        });
                    }
                }
            };
            queues.push(TapQueue::new(q, mq));
        }
        let tap = Tap {
            name: name.to_owned(),
            queues,
            created: !existed,
        };
        tap.prepare()?;
        Ok(tap)
    }

    /// Takes tap queue fds a launcher opened, checking each.
    pub fn from_fds(fds: &[RawFd]) -> Result<Tap, TapError> {
        let mut name = String::new();
        let mut queues = Vec::with_capacity(fds.len());
        for (i, &fd) in fds.iter().enumerate() {
            // SAFETY: F_GETFD only inspects the descriptor table.
            if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
                return Err(TapError::FdNotOpen(fd));
            }
            let mut req = IfReq::new("", 0);
            ioctl_ptr(fd, TUNGETIFF, &mut req).map_err(|e| TapError::NotATap(fd, e))?;
            let n = req.name();
            if req.flags & IFF_TUN != 0 {
                return Err(TapError::IsTun(fd, n));
            }
            for (flag, fname) in [
                (IFF_TAP, "IFF_TAP"),
                (IFF_NO_PI, "IFF_NO_PI"),
                (IFF_VNET_HDR, "IFF_VNET_HDR"),
            ] {
                if req.flags & flag == 0 {
                    return Err(TapError::MissingFlag(fd, n, fname));
                }
            }
            let mq = req.flags & IFF_MULTI_QUEUE != 0;
            if fds.len() > 1 && !mq {
                return Err(TapError::NotMultiQueue(n, fds.len()));
            }
            if i == 0 {
                name = n;
            } else if n != name {
                return Err(TapError::Mixed(fds[0], name, fd, n));
            }
            // SAFETY: the fd was checked to be an open tap queue that the launcher handed to
            // this process; nothing else here owns it.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: fcntl flag changes on the fd we now own.
            unsafe {
                let fl = libc::fcntl(fd, libc::F_GETFL);
                libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
                libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
            }
            queues.push(TapQueue::new(owned, mq));
        }
        let tap = Tap {
            name,
            queues,
            created: false,
        };
        tap.prepare()?;
        Ok(tap)
    }

    /// Little-endian headers of the virtio 1.x size, no offloads yet.
    fn prepare(&self) -> Result<(), TapError> {
        let q = &self.queues[0];
        let le: libc::c_int = 1;
        // Native endianness is little on every host we build for; on a big-endian host this
        // makes the tap use virtio 1.x's little-endian header. Kernels without the option are
        // little-endian hosts, where it does not matter.
        let _ = ioctl_ptr(
            q.raw_fd(),
            TUNSETVNETLE,
            &le as *const _ as *mut libc::c_int,
        );
        q.configure(crate::hdr::HDR_LEN_V1, 0)
            .map_err(|(what, e)| TapError::Setup(self.name.clone(), what, e))
    }

    /// Sets the interface MTU (needs CAP_NET_ADMIN in the tap's network namespace).
    pub fn set_mtu(&self, mtu: u16) -> io::Result<()> {
        let s = inet_socket()?;
        #[repr(C)]
        struct IfReqMtu {
            name: [u8; libc::IFNAMSIZ],
            mtu: libc::c_int,
            _pad: [u8; 20],
        }
        let base = IfReq::new(&self.name, 0);
        let mut req = IfReqMtu {
            name: base.name,
            mtu: libc::c_int::from(mtu),
            _pad: [0; 20],
        };
        ioctl_ptr(s.as_raw_fd(), libc::SIOCSIFMTU, &mut req)
    }

    /// Whether the interface is administratively up (IFF_UP). A tap that is down refuses
    /// every frame written to it and never has anything to read.
    pub fn is_up(&self) -> io::Result<bool> {
        let s = inet_socket()?;
        let mut req = IfReq::new(&self.name, 0);
        ioctl_ptr(s.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req)?;
        Ok(req.flags & libc::IFF_UP as i16 != 0)
    }

    /// Brings the interface up (needs CAP_NET_ADMIN in the tap's network namespace).
    pub fn set_up(&self) -> io::Result<()> {
        let s = inet_socket()?;
        let mut req = IfReq::new(&self.name, 0);
        ioctl_ptr(s.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req)?;
        req.flags |= libc::IFF_UP as i16;
        ioctl_ptr(s.as_raw_fd(), libc::SIOCSIFFLAGS, &mut req)
    }
}

/// A socket for interface ioctls (SIOCSIFMTU, SIOCGIFFLAGS, ...).
fn inet_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket has no memory arguments; the result is checked.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if s < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh socket owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(s) })
}

fn open_queue(name: &str, mq: bool) -> io::Result<OwnedFd> {
    // SAFETY: a constant NUL-terminated path; the result is checked.
    let fd = unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("cannot open /dev/net/tun: {e}"),
        ));
    }
    // SAFETY: a fresh fd owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    if mq {
        flags |= IFF_MULTI_QUEUE;
    }
    let mut req = IfReq::new(name, flags);
    ioctl_ptr(fd.as_raw_fd(), TUNSETIFF, &mut req)?;
    Ok(fd)
}

impl TapQueue {
    fn new(fd: OwnedFd, multi_queue: bool) -> Self {
        Self {
            fd,
            multi_queue,
            attached: AtomicU8::new(UNKNOWN),
        }
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Sets the virtio-net header length and the offloads the tap may hand us.
    pub fn configure(
        &self,
        hdr_len: usize,
        offloads: u32,
    ) -> Result<(), (&'static str, io::Error)> {
        let sz = hdr_len as libc::c_int;
        ioctl_ptr(
            self.raw_fd(),
            TUNSETVNETHDRSZ,
            &sz as *const _ as *mut libc::c_int,
        )
        .map_err(|e| ("cannot set the virtio-net header size", e))?;
        ioctl_val(self.raw_fd(), TUNSETOFFLOAD, libc::c_ulong::from(offloads))
            .map_err(|e| ("cannot set the offloads", e))
    }

    /// Attaches or detaches this queue (multi-queue taps only): the kernel steers no traffic to
    /// a detached queue, so a queue pair the guest does not use does not swallow frames.
    pub fn set_attached(&self, on: bool) -> io::Result<()> {
        let want = if on { ATTACHED } else { DETACHED };
        if !self.multi_queue || self.attached.load(Ordering::Relaxed) == want {
            return Ok(());
        }
        let flags = if on {
            IFF_ATTACH_QUEUE
        } else {
            IFF_DETACH_QUEUE
        };
        let mut req = IfReq::new("", flags);
        match ioctl_ptr(self.raw_fd(), TUNSETQUEUE, &mut req) {
            Ok(()) => {}
            // EINVAL: the queue is already in that state (what an earlier worker left).
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => return Err(e),
        }
        self.attached.store(want, Ordering::Relaxed);
        Ok(())
    }

    /// Forgets what this process knows of the queue's state (a new worker's first connection).
    pub fn forget_attachment(&self) {
        self.attached.store(UNKNOWN, Ordering::Relaxed);
    }
}
