//! I/O engines: how a read, write or flush on the backing file is carried out.
//!
//! Both engines take the same operation (an offset and iovecs that point straight into guest
//! memory, so data is never copied) and either complete it on the spot (`Executed`) or queue it
//! and report its completion later through [`Engine::reap`] (`Submitted`). The device code does
//! not care which engine ran. The io_uring engine keeps up to a queue's worth of requests in
//! flight per queue, signals completions through an eventfd that the queue's worker thread
//! polls, and uses only a registered file (index 0), never a raw fd: a ring can later be
//! restricted to exactly these opcodes and that file.
//!
//! The io_uring engine can also serve a read from the host's page cache on the spot
//! ([`Engine::read_now`]: `preadv2` with `RWF_NOWAIT`, which never waits for the disk), as
//! io_uring itself would try first. The worker asks for that where a ring round trip costs more
//! than it saves: a read issued alone (nothing to batch it with) or a large one (the copy
//! dominates). Whatever the cache cannot serve whole goes through the ring as before.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use io_uring::register::Restriction;
use io_uring::{opcode, squeue, types, IoUring};

/// Which engine a device uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    IoUring,
    Sync,
}

/// An `--engine` that is neither io-uring nor sync.
#[derive(Debug, thiserror::Error)]
#[error("invalid engine '{0}': use io-uring or sync")]
pub struct EngineKindError(pub String);

impl std::str::FromStr for EngineKind {
    type Err = EngineKindError;
    fn from_str(s: &str) -> Result<Self, EngineKindError> {
        match s {
            "io-uring" | "io_uring" => Ok(Self::IoUring),
            "sync" => Ok(Self::Sync),
            _ => Err(EngineKindError(s.to_owned())),
        }
    }
}

/// A data-path operation on the backing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read {
        offset: u64,
    },
    /// `dsync`: the write must be durable when it completes (write-through cache mode).
    Write {
        offset: u64,
        dsync: bool,
    },
    Flush,
}

/// What happened to a submitted operation.
#[derive(Debug)]
pub enum Outcome {
    /// Completed now; the result is the number of bytes transferred.
    Executed(io::Result<usize>),
    /// Queued; its completion comes from `reap` with the same token.
    Submitted,
}

/// A finished asynchronous operation.
#[derive(Debug)]
pub struct Completion {
    pub token: u32,
    pub result: io::Result<usize>,
}

/// An engine bound to one backing file.
pub enum Engine {
    Sync(SyncEngine),
    Uring(Box<UringEngine>),
    /// A qcow2 image: each operation runs on the calling thread through imago, which maps
    /// guest offsets to clusters (and to the backing chain).
    Image(std::sync::Arc<crate::image::Image>),
    /// An NBD export: each operation is a request on the queue's connection, waited for on
    /// the calling thread (libnbd's synchronous calls).
    Nbd(std::sync::Arc<crate::nbd::Conn>),
}

/// An NBD request's result. A dead connection (the server went away) ends the worker with
/// `EXIT_BACKING_LOST` on the spot, before the request completes: it stays in the in-flight
/// region for the frontend to resubmit to the next worker, which the supervisor gives a new
/// connection. Any other error is the request's (IOERR to the guest).
pub fn nbd_result<T>(conn: &crate::nbd::Conn, r: io::Result<T>) -> io::Result<T> {
    if let Err(e) = &r {
        if conn.is_dead() {
            log::error!("the NBD connection is gone ({e}); ending this worker");
            // SAFETY: _exit ends the process at once, as a crash would: nothing is completed.
            unsafe { libc::_exit(vhostbox_common::sandbox::supervisor::EXIT_BACKING_LOST) };
        }
    }
    r
}

/// Runs `op` on an NBD connection, one request per iovec (contiguous in the disk).
///
/// # Safety
/// As for [`Engine::submit`], for the duration of the call.
unsafe fn nbd_execute(c: &crate::nbd::Conn, op: Op, iov: &[libc::iovec]) -> io::Result<usize> {
    let (mut offset, write, fua) = match op {
        Op::Flush => return nbd_result(c, c.flush()).map(|()| 0),
        Op::Read { offset } => (offset, false, false),
        Op::Write { offset, dsync } => (offset, true, dsync),
    };
    let mut done = 0usize;
    for v in iov.iter().filter(|v| v.iov_len > 0) {
        let r = if write {
            // SAFETY: the caller's contract: the iovec is readable for the call.
            unsafe { c.pwrite(v.iov_base.cast(), v.iov_len, offset, fua && c.info.can_fua) }
        } else {
            // SAFETY: the caller's contract: the iovec is writable for the call.
            unsafe { c.pread(v.iov_base.cast(), v.iov_len, offset) }
        };
        nbd_result(c, r)?;
        offset += v.iov_len as u64;
        done += v.iov_len;
    }
    if fua && !c.info.can_fua {
        nbd_result(c, c.flush())?;
    }
    Ok(done)
}

impl Engine {
    /// Carries out or queues `op` over `iov`.
    ///
    /// # Safety
    /// The iovecs must point to memory valid for the operation (writable for reads) that stays
    /// valid and untouched by Rust code until the operation completes: for `Submitted`, until
    /// its completion is returned by `reap`.
    pub unsafe fn submit(&mut self, op: Op, iov: &[libc::iovec], token: u32) -> Outcome {
        match self {
            // SAFETY: forwarded contract.
            Engine::Sync(e) => Outcome::Executed(unsafe { e.execute(op, iov) }),
            // SAFETY: forwarded contract.
            Engine::Uring(u) => unsafe { u.push(op, iov, token) },
            // SAFETY: forwarded contract.
            Engine::Nbd(c) => Outcome::Executed(unsafe { nbd_execute(c, op, iov) }),
            Engine::Image(img) => Outcome::Executed(match op {
                Op::Flush => img.flush().map(|()| 0),
                // SAFETY: forwarded contract.
                Op::Read { offset } => unsafe { img.read(iov, offset) },
                // SAFETY: forwarded contract.
                Op::Write { offset, dsync } => unsafe { img.write(iov, offset, dsync) },
            }),
        }
    }

    /// Hands queued operations to the kernel.
    pub fn kick(&mut self) -> io::Result<()> {
        match self {
            Engine::Sync(_) | Engine::Image(_) | Engine::Nbd(_) => Ok(()),
            Engine::Uring(u) => u.kick(),
        }
    }

    /// Collects finished operations without blocking.
    pub fn reap(&mut self, out: &mut Vec<Completion>) {
        if let Engine::Uring(u) = self {
            u.reap(out)
        }
    }

    /// Tries to complete a read now from the host's page cache, without waiting for the disk:
    /// `Some` with the result if it did, `None` if it must go through [`Engine::submit`]
    /// (data not cached, a short read, an `O_DIRECT` file, or the sync engine, whose every
    /// operation completes on the spot anyway).
    ///
    /// # Safety
    /// As for [`Engine::submit`], for the duration of the call.
    pub unsafe fn read_now(&mut self, offset: u64, iov: &[libc::iovec]) -> Option<usize> {
        match self {
            Engine::Sync(_) | Engine::Image(_) | Engine::Nbd(_) => None,
            // SAFETY: forwarded contract.
            Engine::Uring(u) => unsafe { u.read_now(offset, iov) },
        }
    }

    /// Operations queued for the kernel but not handed to it yet (by [`Engine::kick`]).
    pub fn queued(&self) -> usize {
        match self {
            Engine::Sync(_) | Engine::Image(_) | Engine::Nbd(_) => 0,
            Engine::Uring(u) => u.queued,
        }
    }

    /// Whether finished operations wait to be reaped (no system call).
    pub fn has_completions(&mut self) -> bool {
        match self {
            Engine::Sync(_) | Engine::Image(_) | Engine::Nbd(_) => false,
            Engine::Uring(u) => u.in_flight > 0 && !u.ring.completion().is_empty(),
        }
    }

    /// Blocks until at least one queued operation finished (no-op with nothing in flight).
    pub fn wait(&mut self) -> io::Result<()> {
        match self {
            Engine::Sync(_) | Engine::Image(_) | Engine::Nbd(_) => Ok(()),
            Engine::Uring(u) => u.wait(),
        }
    }

    /// Operations queued or in flight.
    pub fn in_flight(&self) -> usize {
        match self {
            Engine::Sync(_) | Engine::Image(_) | Engine::Nbd(_) => 0,
            Engine::Uring(u) => u.in_flight,
        }
    }

    /// The eventfd that becomes readable when completions are ready.
    pub fn completion_fd(&self) -> Option<RawFd> {
        match self {
            Engine::Sync(_) | Engine::Image(_) | Engine::Nbd(_) => None,
            Engine::Uring(u) => Some(u.eventfd.as_raw_fd()),
        }
    }

    /// The fds the engine holds (ring and eventfd), for the jail's keep-list.
    pub fn fds(&self) -> Vec<RawFd> {
        match self {
            Engine::Sync(_) => Vec::new(),
            Engine::Image(img) => img.fds.clone(),
            Engine::Nbd(c) => vec![c.fd],
            Engine::Uring(u) => vec![u.ring_fd(), u.eventfd.as_raw_fd()],
        }
    }

    /// Jail probe: submits an operation the ring's restrictions must refuse (an OPENAT, or a
    /// NOP on the fixed file) and returns the completion's result; `None` for the sync engine.
    #[cfg(feature = "jail-probe")]
    pub fn probe_ring(
        &mut self,
        op: vhostbox_common::sandbox::probe::RingProbe<'_>,
    ) -> Option<io::Result<i32>> {
        use vhostbox_common::sandbox::probe::RingProbe;
        let Engine::Uring(u) = self else { return None };
        let path = match op {
            RingProbe::OpenAt(p) => Some(p),
            RingProbe::Nop => None,
        };
        let sqe = match path {
            Some(p) => opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), p.as_ptr()).build(),
            None => opcode::Nop::new().build().flags(squeue::Flags::FIXED_FILE),
        }
        .user_data(u64::MAX);
        // SAFETY: `path` outlives the wait below, which reaps the operation.
        if unsafe { u.ring.submission().push(&sqe) }.is_err() {
            return Some(Err(io::Error::other("submission queue full")));
        }
        if let Err(e) = u.ring.submit_and_wait(1) {
            return Some(Err(e));
        }
        let cqe = u.ring.completion().find(|c| c.user_data() == u64::MAX)?;
        let r = cqe.result();
        Some(if r < 0 {
            Err(io::Error::from_raw_os_error(-r))
        } else {
            Ok(r)
        })
    }

    /// The io_uring fd, if any.
    pub fn ring_fd(&self) -> Option<RawFd> {
        match self {
            Engine::Sync(_) | Engine::Image(_) | Engine::Nbd(_) => None,
            Engine::Uring(u) => Some(u.ring_fd()),
        }
    }

    /// Clears the completion eventfd's counter.
    pub fn consume_event(&self) {
        if let Some(fd) = self.completion_fd() {
            let mut v = 0u64;
            // SAFETY: reads 8 bytes into a u64 we own from a non-blocking eventfd.
            unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
        }
    }
}

/// Runs each operation on the calling thread with preadv/pwritev/fdatasync.
pub struct SyncEngine {
    fd: RawFd,
}

impl SyncEngine {
    /// `fd` must stay open for the engine's life (the device keeps the file).
    pub fn new(fd: RawFd) -> Self {
        Self { fd }
    }

    /// # Safety
    /// See [`Engine::submit`].
    unsafe fn execute(&mut self, op: Op, iov: &[libc::iovec]) -> io::Result<usize> {
        match op {
            Op::Flush => {
                // SAFETY: fdatasync has no memory arguments.
                if unsafe { libc::fdatasync(self.fd) } < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(0)
            }
            Op::Read { offset } => {
                // SAFETY: forwarded contract on iov.
                unsafe { transfer(self.fd, iov, offset, false) }
            }
            Op::Write { offset, dsync } => {
                // SAFETY: forwarded contract on iov.
                let n = unsafe { transfer(self.fd, iov, offset, true) }?;
                // SAFETY: fdatasync has no memory arguments.
                if dsync && unsafe { libc::fdatasync(self.fd) } < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(n)
            }
        }
    }
}

/// preadv/pwritev over all of `iov`, resuming after short transfers.
///
/// # Safety
/// The iovecs must point to valid memory (writable when reading).
unsafe fn transfer(fd: RawFd, iov: &[libc::iovec], offset: u64, write: bool) -> io::Result<usize> {
    let total: usize = iov.iter().map(|v| v.iov_len).sum();
    let mut done = 0usize;
    let mut cur: Vec<libc::iovec>;
    let mut slice = iov;
    while done < total {
        let cnt = slice.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
        let off = (offset + done as u64) as libc::off_t;
        // SAFETY: the iovecs are valid per the caller's contract; the kernel checks the rest.
        let r = unsafe {
            if write {
                libc::pwritev(fd, slice.as_ptr(), cnt, off)
            } else {
                libc::preadv(fd, slice.as_ptr(), cnt, off)
            }
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        done += r as usize;
        if done < total {
            // Rebuild the remaining iovec list after a short transfer (rare).
            let mut skip = done;
            cur = Vec::new();
            for v in iov {
                if skip >= v.iov_len {
                    skip -= v.iov_len;
                    continue;
                }
                cur.push(libc::iovec {
                    // SAFETY: skip < iov_len, so the pointer stays inside the buffer.
                    iov_base: unsafe { v.iov_base.cast::<u8>().add(skip) }.cast(),
                    iov_len: v.iov_len - skip,
                });
                skip = 0;
            }
            slice = &cur;
        }
    }
    Ok(done)
}

/// An io_uring bound to one backing file, registered as fixed file 0.
pub struct UringEngine {
    ring: IoUring,
    /// The image's own fd, for reads served from the page cache (`read_now`).
    fd: RawFd,
    /// Whether `read_now` may try: not for `O_DIRECT` files (a read there always waits for
    /// the device), and not after the kernel refused `RWF_NOWAIT` for this file.
    nowait_reads: bool,
    eventfd: OwnedFd,
    in_flight: usize,
    queued: usize,
    /// Expected byte count per token, to detect short transfers.
    expected: Vec<usize>,
}

impl UringEngine {
    /// Creates a ring with room for `depth` operations on `fd`. Call before any sandbox: it
    /// needs io_uring_setup, which the sandbox denies.
    pub fn new(fd: RawFd, depth: u32) -> io::Result<Self> {
        let entries = depth.next_power_of_two().max(8);
        // Created disabled so restrictions can be registered before its first use.
        let ring = IoUring::builder()
            .setup_cqsize(entries * 2)
            .setup_r_disabled()
            .build(entries)?;
        ring.submitter().register_files(&[fd])?;
        // SAFETY: eventfd has no memory arguments; the result is checked.
        let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh eventfd owned by nobody else.
        let eventfd = unsafe { OwnedFd::from_raw_fd(efd) };
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        // From here on the ring can do exactly what the engine needs: read, write and fsync on
        // the registered image file. No other opcode (an OPENAT, a CONNECT, ...), no raw fds,
        // no further register calls. A compromised worker holding the ring gains nothing
        // beyond what it already has.
        let fixed = squeue::Flags::FIXED_FILE.bits();
        let mut res = [
            Restriction::sqe_op(opcode::Read::CODE),
            Restriction::sqe_op(opcode::Write::CODE),
            Restriction::sqe_op(opcode::Readv::CODE),
            Restriction::sqe_op(opcode::Writev::CODE),
            Restriction::sqe_op(opcode::Fsync::CODE),
            Restriction::sqe_flags_required(fixed),
            Restriction::sqe_flags_allowed(fixed),
        ];
        if !vhostbox_common::sandbox::layer_removed("uring-restrictions") {
            ring.submitter().register_restrictions(&mut res)?;
        }
        ring.submitter().register_enable_rings()?;
        // SAFETY: fcntl(F_GETFL) has no memory arguments.
        let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        Ok(Self {
            ring,
            fd,
            nowait_reads: fl >= 0 && fl & libc::O_DIRECT == 0,
            eventfd,
            in_flight: 0,
            queued: 0,
            expected: vec![0; entries as usize * 2],
        })
    }

    /// The ring's own fd, for the sandbox's keep-list.
    pub fn ring_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }

    /// # Safety
    /// See [`Engine::submit`].
    unsafe fn push(&mut self, op: Op, iov: &[libc::iovec], token: u32) -> Outcome {
        let file = types::Fixed(0);
        let total: usize = iov.iter().map(|v| v.iov_len).sum();
        let entry = match op {
            Op::Flush => opcode::Fsync::new(file)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            Op::Read { offset } if iov.len() == 1 => {
                opcode::Read::new(file, iov[0].iov_base.cast(), iov[0].iov_len as u32)
                    .offset(offset)
                    .build()
            }
            Op::Read { offset } => opcode::Readv::new(file, iov.as_ptr(), iov.len() as u32)
                .offset(offset)
                .build(),
            Op::Write { offset, dsync } => {
                let flags = if dsync { libc::RWF_DSYNC } else { 0 };
                if iov.len() == 1 {
                    opcode::Write::new(file, iov[0].iov_base.cast(), iov[0].iov_len as u32)
                        .offset(offset)
                        .rw_flags(flags)
                        .build()
                } else {
                    opcode::Writev::new(file, iov.as_ptr(), iov.len() as u32)
                        .offset(offset)
                        .rw_flags(flags)
                        .build()
                }
            }
        };
        let entry = entry.user_data(u64::from(token));
        if (token as usize) >= self.expected.len() {
            self.expected.resize(token as usize + 1, 0);
        }
        self.expected[token as usize] = total;
        loop {
            // SAFETY: the buffers the entry points to stay valid until its completion (the
            // caller's contract); the iovec array itself is owned by the caller's slot.
            let pushed = unsafe { self.ring.submission().push(&entry) };
            match pushed {
                Ok(()) => break,
                Err(_full) => {
                    // The submission queue is full: hand it to the kernel and retry.
                    if let Err(e) = self.kick() {
                        return Outcome::Executed(Err(e));
                    }
                }
            }
        }
        self.queued += 1;
        self.in_flight += 1;
        Outcome::Submitted
    }

    /// # Safety
    /// See [`Engine::read_now`].
    unsafe fn read_now(&mut self, offset: u64, iov: &[libc::iovec]) -> Option<usize> {
        if !self.nowait_reads || iov.is_empty() || iov.len() > libc::UIO_MAXIOV as usize {
            return None;
        }
        let total: usize = iov.iter().map(|v| v.iov_len).sum();
        // SAFETY: the iovecs point to writable memory that stays valid during the call (the
        // caller's contract); RWF_NOWAIT makes the kernel give up rather than wait for I/O.
        let n = unsafe {
            libc::preadv2(
                self.fd,
                iov.as_ptr(),
                iov.len() as libc::c_int,
                offset as libc::off_t,
                libc::RWF_NOWAIT,
            )
        };
        if n >= 0 && n as usize == total {
            return Some(total);
        }
        if n < 0 {
            let e = io::Error::last_os_error().raw_os_error();
            if e == Some(libc::EOPNOTSUPP) || e == Some(libc::EINVAL) {
                // This file (or kernel) does not do non-blocking reads: stop asking.
                self.nowait_reads = false;
            }
        }
        // Not cached (EAGAIN), partly cached, past the end or failed: the ring does the whole
        // read again and reports what it finds. Bytes already copied are overwritten with the
        // same data.
        None
    }

    fn kick(&mut self) -> io::Result<()> {
        if self.queued == 0 {
            return Ok(());
        }
        loop {
            match self.ring.submit() {
                Ok(_) => {
                    self.queued = 0;
                    return Ok(());
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    // The completion queue is full; completions will be reaped by the caller
                    // and the submission retried on the next kick.
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        for cqe in self.ring.completion() {
            let token = cqe.user_data() as u32;
            let res = cqe.result();
            self.in_flight -= 1;
            let result = if res < 0 {
                Err(io::Error::from_raw_os_error(-res))
            } else {
                let want = self.expected.get(token as usize).copied().unwrap_or(0);
                let got = res as usize;
                if want != 0 && got != want {
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("short transfer: {got} of {want} bytes"),
                    ))
                } else {
                    Ok(got)
                }
            };
            out.push(Completion { token, result });
        }
    }

    fn wait(&mut self) -> io::Result<()> {
        if self.in_flight == 0 {
            return Ok(());
        }
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {
                    self.queued = 0;
                    return Ok(());
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    fn iov(buf: &mut [u8]) -> [libc::iovec; 1] {
        [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }]
    }

    /// Whether any page of `[off, off + len)` of `fd` is in the page cache (mincore).
    fn resident(fd: RawFd, off: usize, len: usize) -> bool {
        // SAFETY: a fresh shared read-only mapping of the file; nothing else uses it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                off + len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let page = 4096;
        let mut vec = vec![0u8; (off + len).div_ceil(page)];
        // SAFETY: `p` maps `off + len` bytes; `vec` has one byte per page of it.
        let r = unsafe { libc::mincore(p, off + len, vec.as_mut_ptr()) };
        assert_eq!(r, 0);
        // SAFETY: unmaps exactly the mapping made above.
        unsafe { libc::munmap(p, off + len) };
        vec[off / page..].iter().any(|b| b & 1 != 0)
    }

    /// `read_now` serves what the page cache holds whole, declines what it does not (not
    /// cached, or past the end of the file) without waiting, and never runs on the sync engine.
    #[test]
    fn read_now_serves_only_what_the_cache_holds() {
        // On the disk the build is on, not /tmp, which may be a tmpfs that cannot evict.
        let target = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target");
        let mut f = if target.is_dir() {
            tempfile::NamedTempFile::new_in(target).unwrap()
        } else {
            tempfile::NamedTempFile::new().unwrap()
        };
        let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 253) as u8).collect();
        f.write_all(&data).unwrap();
        f.as_file().sync_all().unwrap();
        let fd = f.as_file().as_raw_fd();
        let mut e = Engine::Uring(Box::new(UringEngine::new(fd, 8).unwrap()));
        let mut buf = vec![0u8; 8192];

        // Evict the (clean) pages: the read would have to wait for the disk. Some
        // filesystems (tmpfs, some overlays) keep them; there this half cannot be shown,
        // and says so rather than passing on a read that never had to wait.
        // SAFETY: fadvise has no memory arguments.
        let r = unsafe { libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(r, 0);
        if resident(fd, 65536, 8192) {
            eprintln!("page cache kept the file after DONTNEED: uncached case not exercised");
        } else {
            // SAFETY: `buf` outlives the call.
            assert_eq!(unsafe { e.read_now(65536, &iov(&mut buf)) }, None);
        }

        // Cached again (an ordinary read): served, with the right bytes.
        let mut warm = vec![0u8; 8192];
        f.as_file().read_exact_at(&mut warm, 65536).unwrap();
        // SAFETY: as above.
        assert_eq!(unsafe { e.read_now(65536, &iov(&mut buf)) }, Some(8192));
        assert!(buf == data[65536..65536 + 8192]);

        // Half past the end: a short read is left to the ring, which reports it.
        // SAFETY: as above.
        let short = unsafe { e.read_now((1 << 20) - 4096, &iov(&mut buf)) };
        assert_eq!(short, None);

        let mut s = Engine::Sync(SyncEngine::new(fd));
        // SAFETY: as above.
        assert_eq!(unsafe { s.read_now(65536, &iov(&mut buf)) }, None);
    }
}
