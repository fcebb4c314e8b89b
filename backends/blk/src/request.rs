//! virtio-blk requests: parsing a descriptor chain into a [`Request`], without executing it.
//!
//! The layout (virtio 1.2, 5.2.6): a 16-byte device-readable header (type, reserved, sector),
//! then data (device-readable for writes, device-writable for reads), then one device-writable
//! status byte, the very last byte of the chain. The driver may frame these over descriptors in
//! any way, so nothing here assumes one descriptor per part. Every way a chain can be wrong is
//! a [`RequestError`]; if the chain still has a status byte, the guest gets IOERR.

use std::io;

use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend};

pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;

pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Length of the serial returned by GET_ID.
pub const VIRTIO_BLK_ID_BYTES: usize = 20;
/// Size of one discard/write-zeroes segment.
pub const DISCARD_SEGMENT_BYTES: u64 = 16;
/// The `unmap` flag of a write-zeroes segment.
pub const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP: u32 = 1;

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

/// Limits the parser enforces.
const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;
const VRING_DESC_F_INDIRECT: u16 = 4;

/// Why a descriptor chain ended early.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("descriptor index {0} beyond a table of {1}")]
    IndexOutOfRange(u16, u16),
    #[error("descriptor at {0:#x} not in guest memory")]
    Unreadable(u64),
    #[error("chain longer than its table (a loop?)")]
    TooLong,
    #[error("indirect descriptor inside an indirect table")]
    NestedIndirect,
    #[error("indirect table of {0} bytes")]
    BadIndirectTable(u32),
    #[error("chain longer than 4 GiB")]
    TooManyBytes,
}

/// Reads the chain starting at `head` of the split-ring descriptor table at `table` (with
/// `queue_size` entries) into `out`, following NEXT links and one level of indirection, with
/// the rules of virtio 1.2 2.7.5: at most `queue_size` descriptors (of the indirect table's
/// size inside one), no indirect descriptor inside an indirect table, at most 4 GiB in all.
/// On error `out` holds the descriptors read before it (the chain is then treated as cut short).
pub fn walk_chain<M>(
    mem: &M,
    table: GuestAddress,
    queue_size: u16,
    head: u16,
    out: &mut Vec<Desc>,
) -> Result<(), ChainError>
where
    M: GuestMemory + GuestMemoryBackend + ?Sized,
{
    out.clear();
    let (mut table, mut size, mut next) = (table, queue_size, head);
    let mut ttl = queue_size;
    let mut indirect = false;
    let mut bytes: u32 = 0;
    loop {
        if next >= size {
            return Err(ChainError::IndexOutOfRange(next, size));
        }
        if ttl == 0 {
            return Err(ChainError::TooLong);
        }
        let at = table
            .checked_add(u64::from(next) * 16)
            .ok_or(ChainError::Unreadable(table.0))?;
        let mut raw = [0u8; 16];
        mem.read_slice(&mut raw, at)
            .map_err(|_| ChainError::Unreadable(at.0))?;
        let addr = u64::from_le_bytes(raw[0..8].try_into().unwrap());
        let len = u32::from_le_bytes(raw[8..12].try_into().unwrap());
        let flags = u16::from_le_bytes(raw[12..14].try_into().unwrap());
        let link = u16::from_le_bytes(raw[14..16].try_into().unwrap());
        if flags & VRING_DESC_F_INDIRECT != 0 {
            if indirect {
                return Err(ChainError::NestedIndirect);
            }
            if len % 16 != 0 || len == 0 || len / 16 > u32::from(u16::MAX) {
                return Err(ChainError::BadIndirectTable(len));
            }
            // The rest of the chain is the indirect table; a NEXT flag here is ignored.
            indirect = true;
            table = GuestAddress(addr);
            size = (len / 16) as u16;
            ttl = size;
            next = 0;
            continue;
        }
        bytes = bytes.checked_add(len).ok_or(ChainError::TooManyBytes)?;
        out.push(Desc {
            addr,
            len,
            write: flags & VRING_DESC_F_WRITE != 0,
        });
        if flags & VRING_DESC_F_NEXT == 0 {
            return Ok(());
        }
        ttl -= 1;
        next = link;
    }
}

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

    // Status: the last byte of the last writable descriptor.
    let status = match writable.iter().rev().find(|d| d.len > 0) {
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
            if mem
                .read_slice(&mut hdr[got..got + take], GuestAddress(d.addr))
                .is_err()
            {
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
