//! virtio-blk requests: parsing a descriptor chain into a [`Request`], without executing it.
//!
//! The layout (virtio 1.2, 5.2.6): a 16-byte device-readable header (type, reserved, sector),
//! then data (device-readable for writes, device-writable for reads), then one device-writable
//! status byte, the very last byte of the chain. The driver may frame these over descriptors in
//! any way, so nothing here assumes one descriptor per part. Every way a chain can be wrong is
//! a [`RequestError`]; if the chain still has a status byte, the guest gets IOERR.

use std::io;

use virtio_bindings::virtio_blk as vb;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend};

pub use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};

/// The status byte's values (virtio-bindings has them as u32).
pub const VIRTIO_BLK_S_OK: u8 = vb::VIRTIO_BLK_S_OK as u8;
pub const VIRTIO_BLK_S_IOERR: u8 = vb::VIRTIO_BLK_S_IOERR as u8;
pub const VIRTIO_BLK_S_UNSUPP: u8 = vb::VIRTIO_BLK_S_UNSUPP as u8;

/// Length of the serial returned by GET_ID.
pub const VIRTIO_BLK_ID_BYTES: usize = vb::VIRTIO_BLK_ID_BYTES as usize;
/// Size of one discard/write-zeroes segment.
pub const DISCARD_SEGMENT_BYTES: u64 =
    std::mem::size_of::<vb::virtio_blk_discard_write_zeroes>() as u64;

const HEADER_BYTES: u64 = 16;
pub const SECTOR_SHIFT: u32 = 9;
pub const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;

/// One descriptor of a chain, as the driver gave it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

/// A contiguous range of guest memory holding request data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    Unsupported(u32),
}

impl RequestType {
    fn from_u32(t: u32) -> Self {
        match t {
            VIRTIO_BLK_T_IN => Self::In,
            VIRTIO_BLK_T_OUT => Self::Out,
            VIRTIO_BLK_T_FLUSH => Self::Flush,
            VIRTIO_BLK_T_GET_ID => Self::GetId,
            VIRTIO_BLK_T_DISCARD => Self::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => Self::WriteZeroes,
            other => Self::Unsupported(other),
        }
    }
}

/// What is wrong with a chain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("chain has no device-writable status byte")]
    NoStatus,
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    #[error("header is {0} bytes, needs 16")]
    HeaderTooShort(u64),
    #[error("header not in guest memory")]
    HeaderUnreadable,
    #[error("{0:?} request carries data in the wrong direction")]
    WrongDirection(RequestType),
    #[error("data length {0} is not a multiple of 512")]
    UnalignedLength(u64),
    #[error("sector {sector} + {sectors} sectors is beyond the capacity {capacity}")]
    OutOfRange {
        sector: u64,
        sectors: u64,
        capacity: u64,
    },
    #[error("data buffer not in guest memory")]
    BadBuffer,
    #[error("request has {0} segments, more than supported")]
    TooManySegments(usize),
    #[error("discard/write-zeroes payload of {0} bytes is malformed")]
    BadDiscardPayload(u64),
}

/// A parsed request whose buffers are known to lie in guest memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub ty: RequestType,
    pub sector: u64,
    /// The data segments (without header and status), in order.
    pub data: Vec<Segment>,
    pub data_len: u64,
    pub status: GuestAddress,
}

/// The result of parsing: a request, or an error with the status byte to report it through
/// (None when the chain has none: it can only be completed with length 0).
pub type ParseResult = Result<Request, (RequestError, Option<GuestAddress>)>;

/// What is wrong with a descriptor chain as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("empty chain (a bad head index or an unreadable or bad indirect table)")]
    Empty,
    #[error(
        "chain cut short: its last descriptor points to a next one (a loop, an index out of \
         range, an unreadable, nested or misaligned indirect table, or more than 4 GiB)"
    )]
    CutShort,
    #[error("chain of more than {MAX_CHAIN} descriptors")]
    TooLong,
}

/// The most descriptors a chain may have: more than any request can use (1024 data segments
/// plus header and status), and a bound on what one chain makes the queue keep.
pub const MAX_CHAIN: usize = 2048;

/// Reads a chain's descriptors into `out`, in order. The chain is virtio-queue's
/// [`virtio_queue::DescriptorChain`] (popped from the avail ring) or a [`HeadChain`]
/// (resubmitted by its head): both follow NEXT links and one level of indirection with the
/// rules of virtio 1.2 2.7.5 and simply end where a rule is broken, so a chain that ends on a
/// descriptor still pointing to a next one was cut short and is an error. On error `out` holds
/// the descriptors read before it (the request then usually lacks its status byte).
pub fn read_chain(
    chain: impl Iterator<Item = Descriptor>,
    out: &mut Vec<Desc>,
) -> Result<(), ChainError> {
    out.clear();
    let mut open = true;
    for d in chain {
        if out.len() == MAX_CHAIN {
            return Err(ChainError::TooLong);
        }
        out.push(Desc {
            addr: d.addr().0,
            len: d.len(),
            write: d.is_write_only(),
        });
        open = d.has_next();
    }
    match (out.is_empty(), open) {
        (true, _) => Err(ChainError::Empty),
        (false, true) => Err(ChainError::CutShort),
        (false, false) => Ok(()),
    }
}

/// The chain starting at descriptor `head` of a split ring's table, for requests a predecessor
/// left in flight (virtio-queue makes its `DescriptorChain` only from the avail ring). It
/// follows the same rules as virtio-queue's: at most `queue_size` descriptors (the table's size
/// inside an indirect one), no indirect descriptor inside an indirect table, an indirect table
/// a multiple of 16 bytes, at most 4 GiB in all; it ends where one is broken.
pub struct HeadChain<'a, M: ?Sized> {
    mem: &'a M,
    table: GuestAddress,
    size: u16,
    next: u16,
    ttl: u16,
    indirect: bool,
    bytes: u32,
}

impl<'a, M: GuestMemory + ?Sized> HeadChain<'a, M> {
    pub fn new(mem: &'a M, table: GuestAddress, queue_size: u16, head: u16) -> Self {
        HeadChain {
            mem,
            table,
            size: queue_size,
            next: head,
            ttl: queue_size,
            indirect: false,
            bytes: 0,
        }
    }
}

impl<M: GuestMemory + ?Sized> Iterator for HeadChain<'_, M> {
    type Item = Descriptor;

    fn next(&mut self) -> Option<Descriptor> {
        if self.ttl == 0 || self.next >= self.size {
            return None;
        }
        let at = self.table.checked_add(u64::from(self.next) * 16)?;
        let d: Descriptor = self.mem.read_obj(at).ok()?;
        if d.refers_to_indirect_table() {
            let entries = d.len() / 16;
            if self.indirect
                || !d.len().is_multiple_of(16)
                || entries == 0
                || entries > u32::from(u16::MAX)
            {
                return None;
            }
            self.indirect = true;
            self.table = d.addr();
            self.size = entries as u16;
            self.ttl = self.size;
            self.next = 0;
            return self.next();
        }
        self.bytes = self.bytes.checked_add(d.len())?;
        if d.has_next() {
            self.next = d.next();
            self.ttl -= 1;
        } else {
            self.ttl = 0;
        }
        Some(d)
    }
}

/// Limits the parser enforces.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub capacity_sectors: u64,
    pub max_segments: usize,
}

fn range_ok<M: GuestMemory + GuestMemoryBackend + ?Sized>(mem: &M, addr: u64, len: u64) -> bool {
    if len == 0 {
        return true;
    }
    let Some(_end) = addr.checked_add(len - 1) else {
        return false;
    };
    GuestMemoryBackend::check_range(mem, GuestAddress(addr), len as usize)
}

impl RequestError {
    /// Whether the error is about addresses outside the guest memory view used.
    pub fn is_memory(&self) -> bool {
        matches!(
            self,
            RequestError::NoStatus | RequestError::HeaderUnreadable | RequestError::BadBuffer
        )
    }
}

/// Parses a chain. `descs` holds the chain's descriptors in order; `data` is a scratch vector
/// that becomes the request's segment list (cleared first; its capacity is reused).
pub fn parse<M>(mem: &M, descs: &[Desc], limits: &Limits, mut data: Vec<Segment>) -> ParseResult
where
    M: GuestMemory + GuestMemoryBackend + ?Sized,
{
    data.clear();
    // Split point: readable descriptors, then writable ones.
    let first_w = descs.iter().position(|d| d.write).unwrap_or(descs.len());
    let (readable, writable) = descs.split_at(first_w);
    let status = status_byte(mem, writable).ok_or((RequestError::NoStatus, None))?;
    let fail = |e| Err((e, Some(status)));
    if writable.iter().any(|d| !d.write) {
        return fail(RequestError::ReadableAfterWritable);
    }
    let (ty, sector, data_start) = match header(mem, readable) {
        Ok(h) => h,
        Err(e) => return fail(e),
    };
    let readable_len: u64 = readable.iter().map(|d| u64::from(d.len)).sum();
    let out_len = readable_len - HEADER_BYTES;
    let writable_len: u64 = writable.iter().map(|d| u64::from(d.len)).sum();
    let in_len = writable_len - 1;
    let mut segs = Segments {
        mem,
        limits,
        data: &mut data,
    };
    let data_len = match ty {
        RequestType::In | RequestType::GetId if out_len != 0 => {
            return fail(RequestError::WrongDirection(ty))
        }
        RequestType::In | RequestType::GetId => segs.writable(writable, in_len).map(|_| in_len),
        RequestType::Out | RequestType::Discard | RequestType::WriteZeroes if in_len != 0 => {
            return fail(RequestError::WrongDirection(ty))
        }
        RequestType::Out | RequestType::Discard | RequestType::WriteZeroes => {
            segs.readable(readable, data_start).map(|_| out_len)
        }
        RequestType::Flush | RequestType::Unsupported(_) => Ok(0),
    };
    let data_len = match data_len.and_then(|n| check_len(ty, sector, n, limits)) {
        Ok(n) => n,
        Err(e) => return fail(e),
    };
    Ok(Request {
        ty,
        sector,
        data,
        data_len,
        status,
    })
}

/// The status byte: the last byte of the last descriptor, which must be device-writable (the
/// device must not write into a device-readable buffer: virtio 1.2, 2.7.5.1).
fn status_byte<M>(mem: &M, writable: &[Desc]) -> Option<GuestAddress>
where
    M: GuestMemory + GuestMemoryBackend + ?Sized,
{
    let d = writable
        .iter()
        .rev()
        .find(|d| d.len > 0)
        .filter(|d| d.write)?;
    let a = d.addr.checked_add(u64::from(d.len) - 1)?;
    range_ok(mem, a, 1).then_some(GuestAddress(a))
}

/// The header: the first 16 readable bytes, possibly spread over descriptors. Returns the
/// type, the sector and where the data starts (descriptor index, offset in it).
fn header<M>(mem: &M, readable: &[Desc]) -> Result<(RequestType, u64, (usize, u64)), RequestError>
where
    M: GuestMemory + GuestMemoryBackend + ?Sized,
{
    let readable_len: u64 = readable.iter().map(|d| u64::from(d.len)).sum();
    if readable_len < HEADER_BYTES {
        return Err(RequestError::HeaderTooShort(readable_len));
    }
    let mut hdr = [0u8; HEADER_BYTES as usize];
    let mut got = 0usize;
    for (i, d) in readable.iter().enumerate() {
        let take = (hdr.len() - got).min(d.len as usize);
        if take > 0 {
            mem.read_slice(&mut hdr[got..got + take], GuestAddress(d.addr))
                .map_err(|_| RequestError::HeaderUnreadable)?;
            got += take;
        }
        if got == hdr.len() {
            let ty = RequestType::from_u32(u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]));
            let sector = u64::from_le_bytes(hdr[8..16].try_into().expect("8 bytes"));
            return Ok((ty, sector, (i, take as u64)));
        }
    }
    unreachable!("readable_len covers the header")
}

/// Collects data segments, each checked to lie in guest memory, at most `max_segments`.
struct Segments<'a, M: ?Sized> {
    mem: &'a M,
    limits: &'a Limits,
    data: &'a mut Vec<Segment>,
}

impl<M: GuestMemory + GuestMemoryBackend + ?Sized> Segments<'_, M> {
    fn push(&mut self, addr: u64, len: u64) -> Result<(), RequestError> {
        if len == 0 {
            return Ok(());
        }
        if self.data.len() >= self.limits.max_segments {
            return Err(RequestError::TooManySegments(self.data.len() + 1));
        }
        if !range_ok(self.mem, addr, len) {
            return Err(RequestError::BadBuffer);
        }
        self.data.push(Segment {
            addr: GuestAddress(addr),
            len: len as u32,
        });
        Ok(())
    }

    /// The writable bytes before the status byte (`len` of them).
    fn writable(&mut self, writable: &[Desc], mut len: u64) -> Result<(), RequestError> {
        for d in writable {
            let n = u64::from(d.len).min(len);
            self.push(d.addr, n)?;
            len -= n;
        }
        Ok(())
    }

    /// The readable bytes after the header, from `start` (descriptor index, offset).
    fn readable(&mut self, readable: &[Desc], start: (usize, u64)) -> Result<(), RequestError> {
        let (di, doff) = start;
        for (i, d) in readable.iter().enumerate().skip(di) {
            let off = if i == di { doff } else { 0 };
            self.push(d.addr + off, u64::from(d.len) - off)?;
        }
        Ok(())
    }
}

/// Checks the data length of a request of type `ty` at `sector`.
fn check_len(ty: RequestType, sector: u64, len: u64, limits: &Limits) -> Result<u64, RequestError> {
    match ty {
        RequestType::In | RequestType::Out => {
            if !len.is_multiple_of(SECTOR_SIZE) {
                return Err(RequestError::UnalignedLength(len));
            }
            let sectors = len >> SECTOR_SHIFT;
            match sector.checked_add(sectors) {
                Some(end) if end <= limits.capacity_sectors => Ok(len),
                _ => Err(RequestError::OutOfRange {
                    sector,
                    sectors,
                    capacity: limits.capacity_sectors,
                }),
            }
        }
        RequestType::Discard | RequestType::WriteZeroes
            if len == 0 || !len.is_multiple_of(DISCARD_SEGMENT_BYTES) =>
        {
            Err(RequestError::BadDiscardPayload(len))
        }
        _ => Ok(len),
    }
}

/// One segment of a discard or write-zeroes payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiscardSegment {
    pub sector: u64,
    pub num_sectors: u32,
    pub flags: u32,
}

/// Reads the discard/write-zeroes segments of a request.
pub fn read_discard_segments<M>(mem: &M, req: &Request) -> io::Result<Vec<DiscardSegment>>
where
    M: GuestMemory + GuestMemoryBackend + ?Sized,
{
    let mut raw = vec![0u8; req.data_len as usize];
    let mut off = 0usize;
    for s in &req.data {
        mem.read_slice(&mut raw[off..off + s.len as usize], s.addr)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        off += s.len as usize;
    }
    Ok(raw
        .chunks_exact(DISCARD_SEGMENT_BYTES as usize)
        .map(|c| DiscardSegment {
            sector: u64::from_le_bytes(c[0..8].try_into().expect("8 bytes")),
            num_sectors: u32::from_le_bytes(c[8..12].try_into().expect("4 bytes")),
            flags: u32::from_le_bytes(c[12..16].try_into().expect("4 bytes")),
        })
        .collect())
}
