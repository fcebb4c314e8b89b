//! A small relay in front of vhost-user-backend for frontends that enable rings before they
//! set features.
//!
//! QEMU's virtio-net sends VHOST_USER_SET_VRING_ENABLE for every queue pair as soon as the
//! guest acknowledges its features, which is before QEMU starts the vhost device and sends
//! VHOST_USER_SET_FEATURES. vhost-user-backend 0.24 rejects SET_VRING_ENABLE until
//! VHOST_USER_F_PROTOCOL_FEATURES has been acknowledged in SET_FEATURES, and drops the
//! connection. The spec only says the message "should be sent only when
//! VHOST_USER_F_PROTOCOL_FEATURES has been negotiated" (it was: the bit was offered and the
//! protocol features set). So until SET_FEATURES has gone by, the relay answers
//! SET_VRING_ENABLE itself (an ack when one is asked for), remembers the state asked for, and
//! forwards everything else, file descriptors included. Right after SET_FEATURES it hands the
//! remembered states to the library: QEMU repeats them after starting the device only for
//! multiqueue NICs, so a single-queue NIC would otherwise keep its rings disabled.
//!
//! A device may add a [`Hook`] that sees every frontend message first and may answer it
//! itself: vhostbox-blk answers the in-flight tracking messages (GET_INFLIGHT_FD and
//! SET_INFLIGHT_FD) there, which vhost-user-backend does not implement.
//!
//! The relay sits between the frontend's connection and a pre-connected socket pair that the
//! library accepts from a private abstract-namespace listener. Both are made before the jail,
//! so the jailed worker needs no syscall it did not already have (accept, recvmsg, sendmsg,
//! poll). Only control messages pass through it; the datapath (shared memory, eventfds) never
//! does.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};

use log::debug;
use vhost::vhost_user::Listener;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const SET_FEATURES: u32 = 2;
const SET_VRING_ENABLE: u32 = 18;
const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
/// The most fds one vhost-user message carries (VHOST_MEMORY_BASELINE_NREGIONS).
const MAX_FDS: usize = 8;
/// The largest payload a sane message has (SET_MEM_TABLE with 8 regions, config space).
const MAX_PAYLOAD: usize = 4096;

/// The library's side: a private listener with one connection already queued.
pub struct Shim {
    listener: Listener,
    client: Option<UnixStream>,
    addr: SocketAddr,
    hook: Option<Box<dyn Hook>>,
}

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

impl Shim {
    /// Makes the private listener and connects the relay's end to it.
    pub fn new() -> io::Result<Shim> {
        let mut name = [0u8; 8];
        // SAFETY: getrandom writes at most 8 bytes into `name`.
        unsafe { libc::getrandom(name.as_mut_ptr().cast(), name.len(), 0) };
        let name = format!(
            "vhostbox-shim-{}-{:016x}",
            std::process::id(),
            u64::from_ne_bytes(name)
        );
        let addr = SocketAddr::from_abstract_name(name.as_bytes())?;
        let l = UnixListener::bind_addr(&addr)?;
        let mut s = Shim {
            listener: Listener::from(l),
            client: None,
            addr,
            hook: None,
        };
        s.rearm()?;
        Ok(s)
    }

    /// Queues the next connection (needs socket and connect: only outside a jail).
    pub fn rearm(&mut self) -> io::Result<()> {
        if self.client.is_none() {
            self.client = Some(UnixStream::connect_addr(&self.addr)?);
        }
        Ok(())
    }

    /// The fds to keep in a jail.
    pub fn fds(&self) -> Vec<RawFd> {
        let mut v = vec![self.listener.as_raw_fd()];
        v.extend(self.client.as_ref().map(|c| c.as_raw_fd()));
        v
    }

    /// The hook for the next connection (each connection takes it).
    pub fn set_hook(&mut self, hook: Box<dyn Hook>) {
        self.hook = Some(hook);
    }

    /// Relays `frontend` to the queued connection on a thread; returns the listener to hand to
    /// the library, which accepts that connection.
    pub fn relay(&mut self, frontend: UnixStream) -> io::Result<&mut Listener> {
        let backend = self
            .client
            .take()
            .ok_or_else(|| io::Error::other("relay already used; no queued connection"))?;
        let hook = self.hook.take();
        std::thread::Builder::new()
            .name("vu-relay".into())
            .spawn(move || relay(frontend, backend, hook))?;
        Ok(&mut self.listener)
    }
}

/// One vhost-user message: the 12-byte header, the payload and the fds that came with it.
pub struct Msg {
    hdr: [u8; 12],
    pub payload: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

impl Msg {
    fn field(&self, i: usize) -> u32 {
        u32::from_le_bytes(self.hdr[4 * i..4 * i + 4].try_into().unwrap())
    }

    /// The request code.
    pub fn request(&self) -> u32 {
        self.field(0)
    }

    /// Whether the frontend asked for an acknowledgement (REPLY_ACK).
    pub fn needs_reply(&self) -> bool {
        self.field(1) & FLAG_NEED_REPLY != 0
    }

    /// A reply to `request` carrying `payload` and `fds`.
    pub fn reply(request: u32, payload: Vec<u8>, fds: Vec<OwnedFd>) -> Msg {
        let mut hdr = [0u8; 12];
        hdr[0..4].copy_from_slice(&request.to_le_bytes());
        hdr[4..8].copy_from_slice(&(FLAG_VERSION | FLAG_REPLY).to_le_bytes());
        hdr[8..12].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        Msg { hdr, payload, fds }
    }

    /// A request that asks for no reply.
    pub fn new_request(request: u32, payload: Vec<u8>) -> Msg {
        let mut hdr = [0u8; 12];
        hdr[0..4].copy_from_slice(&request.to_le_bytes());
        hdr[4..8].copy_from_slice(&FLAG_VERSION.to_le_bytes());
        hdr[8..12].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        Msg {
            hdr,
            payload,
            fds: Vec::new(),
        }
    }

    fn payload_u32(&self, i: usize) -> u32 {
        u32::from_le_bytes(self.payload[4 * i..4 * i + 4].try_into().unwrap())
    }

    /// The REPLY_ACK answer: 0 for success, anything else for failure.
    pub fn ack(request: u32, ok: bool) -> Msg {
        Self::reply(request, u64::from(!ok).to_le_bytes().to_vec(), Vec::new())
    }
}

/// Reads one message; None at end of stream.
fn read_msg(s: &UnixStream) -> io::Result<Option<Msg>> {
    let mut hdr = [0u8; 12];
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
    let size = u32::from_le_bytes(hdr[8..12].try_into().unwrap()) as usize;
    if size > MAX_PAYLOAD {
        return Err(io::Error::other(format!("message payload of {size} bytes")));
    }
    let mut payload = vec![0u8; size];
    read_exact(s, &mut payload)?;
    Ok(Some(Msg { hdr, payload, fds }))
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
    let mut bytes = m.hdr.to_vec();
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

fn relay(frontend: UnixStream, backend: UnixStream, mut hook: Option<Box<dyn Hook>>) {
    let mut features_set = false;
    let mut early: std::collections::BTreeMap<u32, u32> = Default::default();
    let r = (|| -> io::Result<()> {
        loop {
            let mut p = [
                libc::pollfd {
                    fd: frontend.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: backend.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: two valid pollfds.
            if unsafe { libc::poll(p.as_mut_ptr(), 2, -1) } < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if p[0].revents != 0 {
                let Some(mut m) = read_msg(&frontend)? else {
                    return Ok(());
                };
                let req = m.field(0);
                if let Some(h) = hook.as_mut() {
                    if let Action::Answer(reply) = h.on_frontend(&mut m) {
                        if let Some(r) = reply {
                            write_msg(&frontend, &r)?;
                        }
                        continue;
                    }
                }
                if req == SET_VRING_ENABLE && !features_set {
                    debug!("relay: SET_VRING_ENABLE before SET_FEATURES answered here");
                    if m.payload.len() >= 8 {
                        let (index, state) = (m.payload_u32(0), m.payload_u32(1));
                        if early.len() < MAX_EARLY || early.contains_key(&index) {
                            early.insert(index, state);
                        }
                    }
                    if m.needs_reply() {
                        write_msg(&frontend, &Msg::ack(req, true))?;
                    }
                    continue;
                }
                write_msg(&backend, &m)?;
                if req == SET_FEATURES && !features_set {
                    features_set = true;
                    for (index, state) in std::mem::take(&mut early) {
                        debug!("relay: ring {index} enable={state} passed on after SET_FEATURES");
                        let mut payload = index.to_le_bytes().to_vec();
                        payload.extend_from_slice(&state.to_le_bytes());
                        write_msg(&backend, &Msg::new_request(SET_VRING_ENABLE, payload))?;
                    }
                }
            }
            if p[1].revents != 0 {
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
    let _ = frontend.shutdown(std::net::Shutdown::Both);
    let _ = backend.shutdown(std::net::Shutdown::Both);
}
