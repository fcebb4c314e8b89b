//! virtio-blk requests: parsing a descriptor chain into a [`Request`], without executing it.
//!
//! The layout (virtio 1.2, 5.2.6): a 16-byte device-readable header (type, reserved, sector),
//! then data (device-readable for writes, device-writable for reads), then one device-writable
//! status byte, the very last byte of the chain. The driver may frame these over descriptors in
//! any way, so nothing here assumes one descriptor per part. Every way a chain can be wrong is
//! a [`RequestError`]; if the chain still has a status byte, the guest gets IOERR.

use vhostbox_common::guest;
use vhostbox_common::launch::GuestMem;
use virtio_bindings::virtio_blk as vb;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress};

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

pub const HEADER_BYTES: u64 = 16;
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
    pub fn from_u32(t: u32) -> Self {
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
    #[error("data segment of {0} bytes, more than the advertised SIZE_MAX")]
    SegmentTooLarge(u64),
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
pub struct HeadChain<'a> {
    mem: &'a GuestMem,
    table: GuestAddress,
    size: u16,
    next: u16,
    ttl: u16,
    indirect: bool,
    bytes: u32,
}

impl<'a> HeadChain<'a> {
    pub fn new(mem: &'a GuestMem, table: GuestAddress, queue_size: u16, head: u16) -> Self {
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

impl Iterator for HeadChain<'_> {
    type Item = Descriptor;

    fn next(&mut self) -> Option<Descriptor> {
        if self.ttl == 0 || self.next >= self.size {
            return None;
        }
        let at = self.table.checked_add(u64::from(self.next) * 16)?;
        let mut raw = [0u8; 16];
        guest::read(self.mem, at, &mut raw)?;
        let d = Descriptor::new(
            u64::from_le_bytes(raw[0..8].try_into().expect("8 bytes")),
            u32::from_le_bytes(raw[8..12].try_into().expect("4 bytes")),
            u16::from_le_bytes([raw[12], raw[13]]),
            u16::from_le_bytes([raw[14], raw[15]]),
        );
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
    /// The largest data segment (one descriptor's part of the data): SIZE_MAX.
    pub max_segment_bytes: u32,
}

/// Largest single data segment the driver may use (VIRTIO_BLK_F_SIZE_MAX, advertised).
pub const SIZE_MAX: u32 = 1 << 20;

fn range_ok(mem: &GuestMem, addr: u64, len: u64) -> bool {
    if len == 0 {
        return true;
    }
    let Some(_end) = addr.checked_add(len - 1) else {
        return false;
    };
    guest::contains(mem, GuestAddress(addr), len as usize)
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
///
/// Kept in one piece on purpose: it runs for every request, and split into helpers it measured
/// slower (more instructions per request in callgrind, lower IOPS on the null device).
pub fn parse(
    mem: &GuestMem,
    descs: &[Desc],
    limits: &Limits,
    mut data: Vec<Segment>,
) -> ParseResult {
    data.clear();
    // Split point: readable descriptors, then writable ones.
    let first_w = descs.iter().position(|d| d.write).unwrap_or(descs.len());
    let (readable, writable) = descs.split_at(first_w);

    // Status: the last byte of the last descriptor, which must be device-writable (the
    // device must not write into a device-readable buffer: virtio 1.2, 2.7.5.1).
    let status = match writable
        .iter()
        .rev()
        .find(|d| d.len > 0)
        .filter(|d| d.write)
    {
        Some(d) => {
            let a = d.addr.checked_add(u64::from(d.len) - 1);
            match a {
                Some(a) if range_ok(mem, a, 1) => GuestAddress(a),
                _ => return Err((RequestError::NoStatus, None)),
            }
        }
        None => return Err((RequestError::NoStatus, None)),
    };
    let fail = |e| Err((e, Some(status)));
    if writable.iter().any(|d| !d.write) {
        return fail(RequestError::ReadableAfterWritable);
    }

    // Header: the first 16 readable bytes, possibly spread over descriptors.
    let readable_len: u64 = readable.iter().map(|d| u64::from(d.len)).sum();
    if readable_len < HEADER_BYTES {
        return fail(RequestError::HeaderTooShort(readable_len));
    }
    let mut hdr = [0u8; HEADER_BYTES as usize];
    let mut got = 0usize;
    let mut data_start: Option<(usize, u64)> = None; // (desc index, offset) of the first data byte
    for (i, d) in readable.iter().enumerate() {
        let take = (hdr.len() - got).min(d.len as usize);
        if take > 0 {
            if guest::read(mem, GuestAddress(d.addr), &mut hdr[got..got + take]).is_none() {
                return fail(RequestError::HeaderUnreadable);
            }
            got += take;
        }
        if got == hdr.len() {
            data_start = Some((i, take as u64));
            break;
        }
    }
    let ty = RequestType::from_u32(u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]));
    let sector = u64::from_le_bytes(hdr[8..16].try_into().expect("8 bytes"));

    // Data: the readable bytes after the header, or the writable bytes before the status.
    let (di, doff) = data_start.expect("header was complete");
    let out_len = readable_len - HEADER_BYTES;
    let writable_len: u64 = writable.iter().map(|d| u64::from(d.len)).sum();
    let in_len = writable_len - 1;
    let push = |data: &mut Vec<Segment>, addr: u64, len: u64| -> Result<(), RequestError> {
        if len == 0 {
            return Ok(());
        }
        if data.len() >= limits.max_segments {
            return Err(RequestError::TooManySegments(data.len() + 1));
        }
        if len > u64::from(limits.max_segment_bytes) {
            return Err(RequestError::SegmentTooLarge(len));
        }
        if !range_ok(mem, addr, len) {
            return Err(RequestError::BadBuffer);
        }
        data.push(Segment {
            addr: GuestAddress(addr),
            len: len as u32,
        });
        Ok(())
    };
    let data_len = match ty {
        RequestType::In | RequestType::GetId => {
            if out_len != 0 {
                return fail(RequestError::WrongDirection(ty));
            }
            let mut left = in_len;
            for d in writable {
                let n = u64::from(d.len).min(left);
                if let Err(e) = push(&mut data, d.addr, n) {
                    return fail(e);
                }
                left -= n;
            }
            in_len
        }
        RequestType::Out | RequestType::Discard | RequestType::WriteZeroes => {
            if in_len != 0 {
                return fail(RequestError::WrongDirection(ty));
            }
            for (i, d) in readable.iter().enumerate().skip(di) {
                let off = if i == di { doff } else { 0 };
                if let Err(e) = push(&mut data, d.addr + off, u64::from(d.len) - off) {
                    return fail(e);
                }
            }
            out_len
        }
        RequestType::Flush | RequestType::Unsupported(_) => 0,
    };

    match ty {
        RequestType::In | RequestType::Out => {
            if !data_len.is_multiple_of(SECTOR_SIZE) {
                return fail(RequestError::UnalignedLength(data_len));
            }
            let sectors = data_len >> SECTOR_SHIFT;
            match sector.checked_add(sectors) {
                Some(end) if end <= limits.capacity_sectors => {}
                _ => {
                    return fail(RequestError::OutOfRange {
                        sector,
                        sectors,
                        capacity: limits.capacity_sectors,
                    })
                }
            }
        }
        RequestType::Discard | RequestType::WriteZeroes
            if data_len == 0 || !data_len.is_multiple_of(DISCARD_SEGMENT_BYTES) =>
        {
            return fail(RequestError::BadDiscardPayload(data_len));
        }
        _ => {}
    }
    Ok(Request {
        ty,
        sector,
        data,
        data_len,
        status,
    })
}

/// One segment of a discard or write-zeroes payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiscardSegment {
    pub sector: u64,
    pub num_sectors: u32,
    pub flags: u32,
}

/// Why a discard/write-zeroes payload cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DiscardError {
    #[error("{0} segments, more than the {1} the device offers")]
    TooMany(u64, u32),
    #[error("payload not in guest memory")]
    Unreadable,
}

/// Reads the discard/write-zeroes segments of a request, at most `max` of them. The count
/// comes from the request's (guest-chosen) data length and is checked before anything is
/// read or allocated: one request can never cost more than `max` segments of memory.
pub fn read_discard_segments(
    mem: &GuestMem,
    req: &Request,
    max: u32,
) -> Result<Vec<DiscardSegment>, DiscardError> {
    let count = req.data_len / DISCARD_SEGMENT_BYTES;
    if count > u64::from(max) {
        return Err(DiscardError::TooMany(count, max));
    }
    let mut raw = [0u8; DISCARD_SEGMENT_BYTES as usize];
    let mut fill = 0usize;
    let mut out = Vec::with_capacity(count as usize);
    for s in &req.data {
        let mut at = s.addr;
        let mut left = s.len as usize;
        while left > 0 {
            let n = (raw.len() - fill).min(left);
            mem.read_slice(&mut raw[fill..fill + n], at)
                .map_err(|_| DiscardError::Unreadable)?;
            (fill, left, at) = (fill + n, left - n, GuestAddress(at.0 + n as u64));
            if fill == raw.len() {
                out.push(DiscardSegment {
                    sector: u64::from_le_bytes(raw[0..8].try_into().expect("8 bytes")),
                    num_sectors: u32::from_le_bytes(raw[8..12].try_into().expect("4 bytes")),
                    flags: u32::from_le_bytes(raw[12..16].try_into().expect("4 bytes")),
                });
                fill = 0;
            }
        }
    }
    Ok(out)
}
