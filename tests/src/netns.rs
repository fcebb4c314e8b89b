//! Network namespaces, taps and packet sockets for the net tests: every tap a test uses lives
//! in a namespace the test created, so no frame can leave the machine.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::Command;
use std::time::{Duration, Instant};

/// A network namespace, alive as long as this handle (no name, nothing to clean up).
pub struct NetNs {
    fd: OwnedFd,
}

fn check(r: libc::c_int, what: &str) -> io::Result<libc::c_int> {
    if r < 0 {
        let e = io::Error::last_os_error();
        Err(io::Error::new(e.kind(), format!("{what}: {e}")))
    } else {
        Ok(r)
    }
}

impl NetNs {
    /// A fresh namespace with only `lo` (down) and IPv6 off, so the kernel sends nothing of
    /// its own on the test's links.
    pub fn new() -> io::Result<NetNs> {
        std::thread::scope(|s| {
            s.spawn(|| {
                check(
                    // SAFETY: unshare affects only this thread, which exits right after.
                    unsafe { libc::unshare(libc::CLONE_NEWNET) },
                    "unshare(CLONE_NEWNET)",
                )?;
                for f in ["all", "default"] {
                    let _ =
                        std::fs::write(format!("/proc/sys/net/ipv6/conf/{f}/disable_ipv6"), "1");
                }
                let fd = check(
                    // SAFETY: a constant NUL-terminated path; the result is checked.
                    unsafe {
                        libc::open(
                            c"/proc/thread-self/ns/net".as_ptr(),
                            libc::O_RDONLY | libc::O_CLOEXEC,
                        )
                    },
                    "open ns/net",
                )?;
                Ok(NetNs {
                    // SAFETY: a fresh fd owned by nobody else.
                    fd: unsafe { OwnedFd::from_raw_fd(fd) },
                })
            })
            .join()
            .expect("netns thread")
        })
    }

    /// A second handle on the same namespace (for another thread).
    pub fn clone_handle(&self) -> NetNs {
        NetNs {
            fd: self.fd.try_clone().expect("dup namespace fd"),
        }
    }

    /// Runs `f` on a thread inside the namespace. Sockets and taps it opens, and processes it
    /// spawns, belong to the namespace.
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        std::thread::scope(|s| {
            s.spawn(|| {
                check(
                    // SAFETY: setns on a namespace fd we own; affects only this thread.
                    unsafe { libc::setns(self.fd.as_raw_fd(), libc::CLONE_NEWNET) },
                    "setns",
                )
                .expect("enter the test namespace");
                f()
            })
            .join()
            .expect("thread in the namespace panicked")
        })
    }

    /// Runs `ip ARGS` in the namespace; panics if it fails.
    pub fn ip(&self, args: &[&str]) {
        let out = self.run(|| Command::new("ip").args(args).output().expect("run ip"));
        assert!(
            out.status.success(),
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Waits up to 10 s for interface `name` to exist; returns its index.
    pub fn wait_link(&self, name: &str) -> u32 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(i) = self.run(|| ifindex(name)) {
                return i;
            }
            assert!(Instant::now() < deadline, "interface {name} never appeared");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The index of interface `name` in the calling thread's namespace.
pub fn ifindex(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: a valid NUL-terminated string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
pub const IFF_TAP: i16 = 0x0002;
pub const IFF_NO_PI: i16 = 0x1000;
pub const IFF_VNET_HDR: i16 = 0x4000;
pub const IFF_MULTI_QUEUE: i16 = 0x0100;

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: i16,
    _pad: [u8; 22],
}

/// Opens one queue of tap `name` with `flags` (creating the tap if needed), in the calling
/// thread's namespace. Without CLOEXEC when `inheritable`, to hand to a backend as --tap-fd.
pub fn open_tap(name: &str, flags: i16, inheritable: bool) -> io::Result<OwnedFd> {
    let cloexec = if inheritable { 0 } else { libc::O_CLOEXEC };
    let fd = check(
        // SAFETY: a constant NUL-terminated path; the result is checked.
        unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | cloexec) },
        "open /dev/net/tun",
    )?;
    // SAFETY: a fresh fd owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = IfReq {
        name: [0; 16],
        flags,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    check(
        // SAFETY: TUNSETIFF reads and writes the ifreq we own.
        unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req) },
        "TUNSETIFF",
    )?;
    Ok(fd)
}

/// Makes the tap behind `fd` outlive its queues (like `ip tuntap add`).
pub fn persist(fd: &OwnedFd) -> io::Result<()> {
    check(
        // SAFETY: TUNSETPERSIST takes an int by value.
        unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETPERSIST, 1 as libc::c_ulong) },
        "TUNSETPERSIST",
    )
    .map(|_| ())
}

/// An AF_PACKET socket bound to one interface: the host's view of the wire.
pub struct PacketSocket {
    fd: OwnedFd,
    /// Frames carry a virtio-net header (PACKET_VNET_HDR), 10 bytes.
    pub vnet_hdr: bool,
}

const PACKET_VNET_HDR: libc::c_int = 15;

impl PacketSocket {
    /// Opens it in the calling thread's namespace, receiving every frame on `ifname`.
    pub fn bind(ifname: &str, vnet_hdr: bool) -> io::Result<PacketSocket> {
        let idx = ifindex(ifname)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, ifname.to_string()))?;
        let proto = (libc::ETH_P_ALL as u16).to_be();
        let fd = check(
            // SAFETY: socket has no memory arguments; the result is checked.
            unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    libc::c_int::from(proto),
                )
            },
            "socket(AF_PACKET)",
        )?;
        // SAFETY: a fresh fd owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        if vnet_hdr {
            let one: libc::c_int = 1;
            check(
                // SAFETY: setsockopt reads an int we own.
                unsafe {
                    libc::setsockopt(
                        fd.as_raw_fd(),
                        libc::SOL_PACKET,
                        PACKET_VNET_HDR,
                        (&one as *const libc::c_int).cast(),
                        4,
                    )
                },
                "PACKET_VNET_HDR",
            )?;
        }
        // SAFETY: an all-zero sockaddr_ll is valid; the fields are set below.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_protocol = proto;
        sa.sll_ifindex = idx as i32;
        check(
            // SAFETY: bind reads a sockaddr_ll we own of the given size.
            unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&sa as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            },
            "bind(AF_PACKET)",
        )?;
        let big: libc::c_int = 8 << 20;
        for opt in [libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE] {
            // SAFETY: setsockopt reads an int we own.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&big as *const libc::c_int).cast(),
                    4,
                )
            };
        }
        Ok(PacketSocket { fd, vnet_hdr })
    }

    /// Transmits one frame (prefixed with its virtio-net header if `vnet_hdr`).
    pub fn send(&self, bytes: &[u8]) -> io::Result<()> {
        // SAFETY: send reads bytes.len() bytes from a slice we borrow.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
        check(n as libc::c_int, "send(AF_PACKET)").map(|_| ())
    }

    /// The next frame received on the interface that `keep` accepts, waiting up to `timeout`.
    pub fn recv_matching(
        &self,
        timeout: Duration,
        keep: impl Fn(&[u8]) -> bool,
    ) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let mut p = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut p, 1, left.as_millis().max(1) as i32) } <= 0 {
                continue;
            }
            // SAFETY: recv writes at most buf.len() bytes into our buffer.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n > 0 && keep(&buf[..n as usize]) {
                return Some(buf[..n as usize].to_vec());
            }
        }
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// The test ethertype (IEEE 802 local experimental).
pub const TEST_ETHERTYPE: [u8; 2] = [0x88, 0xb5];

/// A test frame of `len` bytes (at least 14) from `src` to `dst`: the test ethertype, then a
/// sequence number and a pattern that makes every byte position checkable.
pub fn test_frame(dst: [u8; 6], src: [u8; 6], len: usize, seq: u32) -> Vec<u8> {
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&TEST_ETHERTYPE);
    f.extend_from_slice(&seq.to_be_bytes());
    let mut x = seq.wrapping_mul(2_654_435_761) | 1;
    while f.len() < len {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        f.push(x as u8);
    }
    f.truncate(len);
    f
}

/// Whether `f` (a frame without virtio-net header, from offset `skip`) is a test frame.
pub fn is_test_frame(f: &[u8], skip: usize) -> bool {
    f.len() >= skip + 14 && f[skip + 12..skip + 14] == TEST_ETHERTYPE
}
