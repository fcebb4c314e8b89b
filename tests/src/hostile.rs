//! A black-box hostile vhost-user frontend, written from the vhost-user specification rather
//! than from vhostbox's code: raw frames (12-byte header: request, flags, size; then the
//! payload; fds as SCM_RIGHTS), so it can send what no well-behaved library would: wrong
//! sizes, region tables that do not fit their fds, ring sizes and bases out of range, fds of
//! the wrong kind, floods, and messages cut off in the middle.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

// Request codes and flags, from the vhost-user specification.
pub const GET_FEATURES: u32 = 1;
pub const SET_FEATURES: u32 = 2;
pub const SET_OWNER: u32 = 3;
pub const SET_MEM_TABLE: u32 = 5;
pub const SET_VRING_NUM: u32 = 8;
pub const SET_VRING_ADDR: u32 = 9;
pub const SET_VRING_BASE: u32 = 10;
pub const GET_VRING_BASE: u32 = 11;
pub const SET_VRING_KICK: u32 = 12;
pub const SET_VRING_CALL: u32 = 13;
pub const GET_PROTOCOL_FEATURES: u32 = 15;
pub const SET_PROTOCOL_FEATURES: u32 = 16;
pub const GET_CONFIG: u32 = 24;
pub const GET_INFLIGHT_FD: u32 = 31;
pub const SET_INFLIGHT_FD: u32 = 32;
pub const ADD_MEM_REG: u32 = 37;
pub const VERSION: u32 = 0x1;
pub const NEED_REPLY: u32 = 0x8;
pub const PROTOCOL_FEATURES_BIT: u64 = 1 << 30;
pub const F_VERSION_1: u64 = 1 << 32;
/// Protocol features: MQ, REPLY_ACK, CONFIG, CONFIGURE_MEM_SLOTS.
pub const PF_MQ: u64 = 1 << 0;
pub const PF_REPLY_ACK: u64 = 1 << 3;
pub const PF_CONFIG: u64 = 1 << 9;
pub const PF_MEM_SLOTS: u64 = 1 << 15;

/// A raw connection to a backend.
pub struct Hostile {
    pub sock: UnixStream,
}

impl Hostile {
    pub fn connect(path: &Path) -> io::Result<Hostile> {
        let sock = UnixStream::connect(path)?;
        sock.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(Hostile { sock })
    }

    /// Sends one message as given: `size` is what the header claims, whatever `payload` holds.
    pub fn send_raw(
        &self,
        request: u32,
        flags: u32,
        size: u32,
        payload: &[u8],
        fds: &[RawFd],
    ) -> io::Result<()> {
        let mut bytes = Vec::with_capacity(12 + payload.len());
        bytes.extend_from_slice(&request.to_ne_bytes());
        bytes.extend_from_slice(&flags.to_ne_bytes());
        bytes.extend_from_slice(&size.to_ne_bytes());
        bytes.extend_from_slice(payload);
        let n = self
            .sock
            .send_with_fds(&[&bytes[..]], fds)
            .map_err(io::Error::other)?;
        (&self.sock).write_all(&bytes[n..])
    }

    /// Sends a well-formed message.
    pub fn send(
        &self,
        request: u32,
        need_reply: bool,
        payload: &[u8],
        fds: &[RawFd],
    ) -> io::Result<()> {
        let flags = VERSION | if need_reply { NEED_REPLY } else { 0 };
        self.send_raw(request, flags, payload.len() as u32, payload, fds)
    }

    /// Reads one reply: (request, payload).
    pub fn recv(&self) -> io::Result<(u32, Vec<u8>)> {
        let mut hdr = [0u8; 12];
        (&self.sock).read_exact(&mut hdr)?;
        let f = |i: usize| u32::from_ne_bytes(hdr[4 * i..4 * i + 4].try_into().unwrap());
        let mut payload = vec![0u8; f(2) as usize];
        (&self.sock).read_exact(&mut payload)?;
        Ok((f(0), payload))
    }

    /// Sends with NEED_REPLY and returns the REPLY_ACK value (0: success).
    pub fn ack(&self, request: u32, payload: &[u8], fds: &[RawFd]) -> io::Result<u64> {
        self.send(request, true, payload, fds)?;
        let (r, p) = self.recv()?;
        assert_eq!(r, request, "a reply to another request");
        Ok(u64::from_le_bytes(p[..8].try_into().unwrap()))
    }

    /// A u64 query (GET_FEATURES, GET_PROTOCOL_FEATURES).
    pub fn get_u64(&self, request: u32) -> io::Result<u64> {
        self.send(request, false, &[], &[])?;
        let (_, p) = self.recv()?;
        Ok(u64::from_le_bytes(p[..8].try_into().unwrap()))
    }

    /// SET_OWNER, features (VERSION_1 and PROTOCOL_FEATURES) and the protocol features a
    /// frontend needs, REPLY_ACK among them, as every well-behaved frontend starts.
    pub fn handshake(&self) -> io::Result<()> {
        self.send(SET_OWNER, false, &[], &[])?;
        let f = self.get_u64(GET_FEATURES)?;
        let pf = self.get_u64(GET_PROTOCOL_FEATURES)?;
        let want = PF_MQ | PF_REPLY_ACK | PF_CONFIG | PF_MEM_SLOTS;
        self.send(
            SET_PROTOCOL_FEATURES,
            false,
            &(pf & want).to_le_bytes(),
            &[],
        )?;
        let feats = f & (F_VERSION_1 | PROTOCOL_FEATURES_BIT);
        assert_eq!(self.ack(SET_FEATURES, &feats.to_le_bytes(), &[])?, 0);
        Ok(())
    }
}

/// A ring state payload (index, num).
pub fn vring_state(index: u32, num: u32) -> Vec<u8> {
    let mut p = index.to_le_bytes().to_vec();
    p.extend_from_slice(&num.to_le_bytes());
    p
}

/// A SET_MEM_TABLE payload of one region.
pub fn mem_table(gpa: u64, size: u64, user: u64, offset: u64) -> Vec<u8> {
    let mut p = 1u32.to_le_bytes().to_vec();
    p.extend_from_slice(&0u32.to_le_bytes());
    for v in [gpa, size, user, offset] {
        p.extend_from_slice(&v.to_le_bytes());
    }
    p
}

/// An ADD_MEM_REG payload.
pub fn one_region(gpa: u64, size: u64, user: u64, offset: u64) -> Vec<u8> {
    let mut p = 0u64.to_le_bytes().to_vec();
    for v in [gpa, size, user, offset] {
        p.extend_from_slice(&v.to_le_bytes());
    }
    p
}

/// A memfd of `size` bytes (unsealed).
pub fn memfd(size: u64) -> std::fs::File {
    // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"hostile".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a fresh fd nothing else owns.
    let f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    f.set_len(size).unwrap();
    f
}

/// An eventfd.
pub fn eventfd() -> vmm_sys_util::eventfd::EventFd {
    vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap()
}

/// The raw fd of anything that has one.
pub fn raw(f: &impl AsRawFd) -> RawFd {
    f.as_raw_fd()
}
