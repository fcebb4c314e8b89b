//! One queue's request processing: pop chains, parse them, run them on the engine, publish
//! completions. Free of vhost-user types so unit tests drive it with mock virtqueues.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use log::{debug, warn};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::disk::{Disk, DiskKind};
use crate::engine::{Completion, Engine, Op, Outcome};
use crate::request::{
    self, Desc, Limits, Request, RequestType, Segment, SECTOR_SHIFT, VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};

/// Guest memory as the backend maps it (no dirty bitmap).
pub type GuestMem = GuestMemoryMmap<()>;

/// Most segments one request may carry (the preadv/pwritev limit).
pub const MAX_SEGMENTS: usize = libc::UIO_MAXIOV as usize;
/// Most discard / write-zeroes segments per request (advertised in the config space).
pub const MAX_DISCARD_SEGMENTS: u32 = 32;

/// State shared by every queue of a device, for the life of the process.
pub struct Shared {
    pub disk: Disk,
    pub serial: [u8; VIRTIO_BLK_ID_BYTES],
    /// The guest's cache mode: true = write-back (flush when asked), false = write-through.
    pub writeback: AtomicBool,
    pub stats: Stats,
}

/// Counters, for logs and tests.
#[derive(Default)]
pub struct Stats {
    pub requests: AtomicU64,
    pub errors: AtomicU64,
}

struct Slot {
    head: u16,
    status: GuestAddress,
    used_len: u32,
    iov: Vec<libc::iovec>,
    /// Keeps the guest memory mapped until the kernel is done with it, even if the frontend
    /// replaces the memory table meanwhile.
    mem: Option<Arc<GuestMem>>,
}

/// Processes one virtqueue.
pub struct QueueWorker {
    shared: Arc<Shared>,
    engine: Option<Engine>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    descs: Vec<Desc>,
    segs: Vec<Segment>,
    done: Vec<Completion>,
    logged_errors: u32,
}

// SAFETY: the raw iovec pointers in `slots` point into guest memory kept alive by the slot's
// `mem` Arc; the worker is only ever used by one thread at a time (behind a Mutex).
unsafe impl Send for QueueWorker {}

impl QueueWorker {
    /// `engine` is None only for the null device, which needs none.
    pub fn new(shared: Arc<Shared>, engine: Option<Engine>, queue_size: u16) -> Self {
        let n = u32::from(queue_size.max(1));
        Self {
            shared,
            engine,
            slots: (0..n)
                .map(|_| Slot {
                    head: 0,
                    status: GuestAddress(0),
                    used_len: 0,
                    iov: Vec::new(),
                    mem: None,
                })
                .collect(),
            free: (0..n).rev().collect(),
            descs: Vec::with_capacity(16),
            segs: Vec::with_capacity(16),
            done: Vec::with_capacity(n as usize),
            logged_errors: 0,
        }
    }

    /// Requests handed to the engine and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.engine.as_ref().map_or(0, |e| e.in_flight())
    }

    /// The engine's completion eventfd, if it has one.
    pub fn completion_fd(&self) -> Option<i32> {
        self.engine.as_ref().and_then(|e| e.completion_fd())
    }

    /// Takes the engine back (to return it to the pool); in-flight work must be drained first.
    pub fn take_engine(&mut self) -> Option<Engine> {
        self.engine.take()
    }

    /// Pops and starts every available request there is room for. Returns whether used
    /// entries were added (the caller then decides whether to notify the guest).
    pub fn process_queue(&mut self, queue: &mut Queue, mem: &Arc<GuestMem>) -> io::Result<bool> {
        let mut used = false;
        loop {
            queue
                .disable_notification(&**mem)
                .map_err(io::Error::other)?;
            while !self.free.is_empty() {
                let Some(chain) = queue.pop_descriptor_chain(&**mem) else {
                    break;
                };
                let head = chain.head_index();
                self.descs.clear();
                for d in chain {
                    self.descs.push(Desc {
                        addr: d.addr().0,
                        len: d.len(),
                        write: d.is_write_only(),
                    });
                }
                used |= self.start(head, queue, mem)?;
            }
            if let Some(e) = self.engine.as_mut() {
                e.kick()?;
            }
            if self.free.is_empty() {
                // Out of room: completions will call back in here. Leave notifications off.
                break;
            }
            if !queue
                .enable_notification(&**mem)
                .map_err(io::Error::other)?
            {
                break;
            }
        }
        Ok(used)
    }

    /// Publishes finished asynchronous requests, then takes new ones if room appeared.
    pub fn process_completions(
        &mut self,
        queue: &mut Queue,
        mem: &Arc<GuestMem>,
    ) -> io::Result<bool> {
        let Some(engine) = self.engine.as_mut() else {
            return Ok(false);
        };
        engine.consume_event();
        let mut done = std::mem::take(&mut self.done);
        engine.reap(&mut done);
        let mut used = false;
        for c in done.drain(..) {
            used |= self.complete(c, queue, mem)?;
        }
        self.done = done;
        if used {
            used |= self.process_queue(queue, mem)?;
        }
        Ok(used)
    }

    /// Waits until nothing is in flight, publishing each completion.
    pub fn drain(&mut self, queue: &mut Queue, mem: &Arc<GuestMem>) -> io::Result<bool> {
        let mut used = false;
        while self.in_flight() > 0 {
            if let Some(e) = self.engine.as_mut() {
                e.kick()?;
                e.wait()?;
                let mut done = std::mem::take(&mut self.done);
                e.reap(&mut done);
                for c in done.drain(..) {
                    used |= self.complete(c, queue, mem)?;
                }
                self.done = done;
            }
        }
        Ok(used)
    }

    /// Waits until nothing is in flight and forgets the completions: the frontend is gone.
    pub fn abandon(&mut self) {
        while self.in_flight() > 0 {
            let Some(e) = self.engine.as_mut() else { break };
            if e.kick().and_then(|_| e.wait()).is_err() {
                break;
            }
            let mut done = Vec::new();
            e.reap(&mut done);
            for c in done {
                self.release(c.token);
            }
        }
    }

    fn release(&mut self, token: u32) {
        if let Some(slot) = self.slots.get_mut(token as usize) {
            slot.mem = None;
            slot.iov.clear();
            self.free.push(token);
        }
    }

    fn complete(&mut self, c: Completion, queue: &mut Queue, mem: &GuestMem) -> io::Result<bool> {
        let Some(slot) = self.slots.get(c.token as usize) else {
            return Ok(false);
        };
        let (head, status_addr, used_len) = (slot.head, slot.status, slot.used_len);
        let status = match c.result {
            Ok(_) => VIRTIO_BLK_S_OK,
            Err(e) => {
                self.note_error(format_args!("I/O error: {e}"));
                VIRTIO_BLK_S_IOERR
            }
        };
        self.release(c.token);
        self.finish(queue, mem, head, status_addr, status, used_len)?;
        Ok(true)
    }

    fn note_error(&mut self, msg: std::fmt::Arguments<'_>) {
        self.shared.stats.errors.fetch_add(1, Ordering::Relaxed);
        // A hostile guest must not be able to flood the host's logs.
        if self.logged_errors < 16 {
            self.logged_errors += 1;
            warn!("request failed: {msg}");
        } else {
            debug!("request failed: {msg}");
        }
    }

    fn finish(
        &self,
        queue: &mut Queue,
        mem: &GuestMem,
        head: u16,
        status_addr: GuestAddress,
        status: u8,
        used_len: u32,
    ) -> io::Result<()> {
        // The address was checked when the chain was parsed; a failure here means the memory
        // table changed under us, and the guest then gets whatever its status byte held.
        let _ = mem.write_obj(status, status_addr);
        queue
            .add_used(mem, head, used_len)
            .map_err(io::Error::other)
    }

    /// Starts one request. Returns true if it completed on the spot (a used entry was added).
    fn start(&mut self, head: u16, queue: &mut Queue, mem: &Arc<GuestMem>) -> io::Result<bool> {
        self.shared.stats.requests.fetch_add(1, Ordering::Relaxed);
        let limits = Limits {
            capacity_sectors: self.shared.disk.sectors(),
            max_segments: MAX_SEGMENTS,
        };
        let segs = std::mem::take(&mut self.segs);
        let req = match request::parse(&**mem, &self.descs, &limits, segs) {
            Ok(r) => r,
            Err((e, status)) => {
                self.note_error(format_args!("malformed request: {e}"));
                match status {
                    Some(s) => self.finish(queue, mem, head, s, VIRTIO_BLK_S_IOERR, 1)?,
                    // No status byte: the request can only be returned with nothing written.
                    None => queue.add_used(&**mem, head, 0).map_err(io::Error::other)?,
                }
                return Ok(true);
            }
        };
        let r = self.execute(head, &req, queue, mem);
        self.segs = req.data;
        r
    }

    fn execute(
        &mut self,
        head: u16,
        req: &Request,
        queue: &mut Queue,
        mem: &Arc<GuestMem>,
    ) -> io::Result<bool> {
        let disk = &self.shared.disk;
        let (status, used_len) = match req.ty {
            RequestType::In | RequestType::Out => {
                let write = req.ty == RequestType::Out;
                let in_len = if write { 1 } else { req.data_len as u32 + 1 };
                if write && disk.readonly {
                    self.note_error(format_args!("write to a read-only device"));
                    (VIRTIO_BLK_S_IOERR, 1)
                } else if disk.kind == DiskKind::Null {
                    if !write && zero_fill(mem, &req.data).is_err() {
                        (VIRTIO_BLK_S_IOERR, 1)
                    } else {
                        (VIRTIO_BLK_S_OK, in_len)
                    }
                } else {
                    let offset = req.sector << SECTOR_SHIFT;
                    let op = if write {
                        Op::Write {
                            offset,
                            dsync: !self.shared.writeback.load(Ordering::Relaxed),
                        }
                    } else {
                        Op::Read { offset }
                    };
                    return self.submit(head, req.status, in_len, op, Some(&req.data), queue, mem);
                }
            }
            RequestType::Flush => {
                if disk.kind == DiskKind::Null || disk.readonly {
                    (VIRTIO_BLK_S_OK, 1)
                } else {
                    return self.submit(head, req.status, 1, Op::Flush, None, queue, mem);
                }
            }
            RequestType::GetId => {
                let n = write_serial(mem, &req.data, &self.shared.serial);
                match n {
                    Ok(n) => (VIRTIO_BLK_S_OK, n as u32 + 1),
                    Err(_) => (VIRTIO_BLK_S_IOERR, 1),
                }
            }
            RequestType::Discard | RequestType::WriteZeroes => (self.discard(req, mem), 1),
            RequestType::Unsupported(t) => {
                self.note_error(format_args!("unsupported request type {t}"));
                (VIRTIO_BLK_S_UNSUPP, 1)
            }
        };
        self.finish(queue, mem, head, req.status, status, used_len)?;
        Ok(true)
    }

    /// Discard and write-zeroes run synchronously in either engine: they are rare, and the
    /// block-device ioctls behind them have no io_uring form.
    fn discard(&mut self, req: &Request, mem: &GuestMem) -> u8 {
        let zeroes = req.ty == RequestType::WriteZeroes;
        if self.shared.disk.readonly {
            self.note_error(format_args!("discard/write-zeroes on a read-only device"));
            return VIRTIO_BLK_S_IOERR;
        }
        let Ok(segments) = request::read_discard_segments(mem, req) else {
            return VIRTIO_BLK_S_IOERR;
        };
        if segments.len() > MAX_DISCARD_SEGMENTS as usize {
            self.note_error(format_args!("{} discard segments", segments.len()));
            return VIRTIO_BLK_S_IOERR;
        }
        let capacity = self.shared.disk.sectors();
        // Validate every segment before touching the disk: a bad request changes nothing.
        for s in &segments {
            let unmap = s.flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
            if s.flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 || (!zeroes && unmap) {
                self.note_error(format_args!("discard flags {:#x}", s.flags));
                return VIRTIO_BLK_S_UNSUPP;
            }
            match s.sector.checked_add(u64::from(s.num_sectors)) {
                Some(end) if end <= capacity => {}
                _ => {
                    self.note_error(format_args!(
                        "discard range {}+{} beyond capacity {capacity}",
                        s.sector, s.num_sectors
                    ));
                    return VIRTIO_BLK_S_IOERR;
                }
            }
        }
        for s in &segments {
            let (off, len) = (
                s.sector << SECTOR_SHIFT,
                u64::from(s.num_sectors) << SECTOR_SHIFT,
            );
            if len == 0 {
                continue;
            }
            let unmap = s.flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
            let r = if zeroes {
                self.shared.disk.write_zeroes(off, len, unmap)
            } else {
                self.shared.disk.discard(off, len)
            };
            if let Err(e) = r {
                self.note_error(format_args!("discard/write-zeroes: {e}"));
                return VIRTIO_BLK_S_IOERR;
            }
        }
        if zeroes
            && !self.shared.writeback.load(Ordering::Relaxed)
            && self.shared.disk.flush().is_err()
        {
            return VIRTIO_BLK_S_IOERR;
        }
        VIRTIO_BLK_S_OK
    }

    #[allow(clippy::too_many_arguments)]
    fn submit(
        &mut self,
        head: u16,
        status: GuestAddress,
        used_len: u32,
        op: Op,
        data: Option<&[Segment]>,
        queue: &mut Queue,
        mem: &Arc<GuestMem>,
    ) -> io::Result<bool> {
        let token = self.free.pop().expect("caller checked for a free slot");
        let slot = &mut self.slots[token as usize];
        slot.head = head;
        slot.status = status;
        slot.used_len = used_len;
        slot.iov.clear();
        let mut bad = false;
        for s in data.unwrap_or(&[]) {
            for vs in mem.get_slices(s.addr, s.len as usize) {
                match vs {
                    Ok(vs) => slot.iov.push(libc::iovec {
                        iov_base: vs.ptr_guard_mut().as_ptr().cast(),
                        iov_len: vs.len(),
                    }),
                    Err(_) => bad = true,
                }
            }
        }
        if bad || slot.iov.len() > MAX_SEGMENTS {
            self.release(token);
            self.finish(queue, mem, head, status, VIRTIO_BLK_S_IOERR, 1)?;
            return Ok(true);
        }
        slot.mem = Some(mem.clone());
        let engine = self
            .engine
            .as_mut()
            .expect("file-backed devices have an engine");
        // SAFETY: the iovecs point into guest memory checked by get_slices, kept mapped by the
        // slot's Arc until the completion is reaped; the iovec array lives in the slot, which
        // is not touched until then either.
        let outcome = unsafe { engine.submit(op, &slot.iov, token) };
        match outcome {
            Outcome::Submitted => Ok(false),
            Outcome::Executed(result) => self.complete(Completion { token, result }, queue, mem),
        }
    }
}

impl Drop for QueueWorker {
    fn drop(&mut self) {
        // Guest buffers must outlive the kernel's use of them.
        self.abandon();
    }
}

fn zero_fill(mem: &GuestMem, data: &[Segment]) -> Result<(), ()> {
    for s in data {
        for vs in mem.get_slices(s.addr, s.len as usize) {
            let vs = vs.map_err(|_| ())?;
            // SAFETY: the slice was checked to lie in guest memory; writing zeros there is
            // exactly what a read of the null device does.
            unsafe { std::ptr::write_bytes(vs.ptr_guard_mut().as_ptr(), 0, vs.len()) };
        }
    }
    Ok(())
}

fn write_serial(mem: &GuestMem, data: &[Segment], serial: &[u8]) -> Result<usize, ()> {
    let mut off = 0usize;
    for s in data {
        if off >= serial.len() {
            break;
        }
        let n = (s.len as usize).min(serial.len() - off);
        mem.write_slice(&serial[off..off + n], s.addr)
            .map_err(|_| ())?;
        off += n;
    }
    Ok(off)
}
