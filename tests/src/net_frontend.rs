//! A virtio-net driver on top of `VhostUserDevice`: queue 2*i receives and queue 2*i+1
//! transmits for queue pair i (no control queue).

use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::frontend::{DeviceOptions, GuestMemory, VhostUserDevice, VIRTIO_F_VERSION_1};

pub const VIRTIO_NET_F_CSUM: u64 = 1 << 0;
pub const VIRTIO_NET_F_GUEST_CSUM: u64 = 1 << 1;
pub const VIRTIO_NET_F_MTU: u64 = 1 << 3;
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
pub const VIRTIO_NET_F_GUEST_TSO4: u64 = 1 << 7;
pub const VIRTIO_NET_F_GUEST_TSO6: u64 = 1 << 8;
pub const VIRTIO_NET_F_GUEST_ECN: u64 = 1 << 9;
pub const VIRTIO_NET_F_GUEST_UFO: u64 = 1 << 10;
pub const VIRTIO_NET_F_HOST_TSO4: u64 = 1 << 11;
pub const VIRTIO_NET_F_HOST_TSO6: u64 = 1 << 12;
pub const VIRTIO_NET_F_HOST_ECN: u64 = 1 << 13;
pub const VIRTIO_NET_F_HOST_UFO: u64 = 1 << 14;
pub const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << 15;
pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
pub const VIRTIO_NET_F_CTRL_VQ: u64 = 1 << 17;
pub const VIRTIO_NET_F_MQ: u64 = 1 << 22;

pub const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
pub const VIRTIO_NET_HDR_F_DATA_VALID: u8 = 2;
pub const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;
pub const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;
pub const VIRTIO_NET_HDR_GSO_UDP: u8 = 3;
pub const VIRTIO_NET_HDR_GSO_TCPV6: u8 = 4;
pub const VIRTIO_NET_HDR_GSO_ECN: u8 = 0x80;

/// struct virtio_net_hdr_v1 (10 bytes without num_buffers, 12 with).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
    pub num_buffers: u16,
}

impl NetHdr {
    /// The first `len` (10 or 12) bytes of the little-endian header.
    pub fn to_bytes(&self, len: usize) -> Vec<u8> {
        let mut b = vec![self.flags, self.gso_type];
        for v in [
            self.hdr_len,
            self.gso_size,
            self.csum_start,
            self.csum_offset,
            self.num_buffers,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.truncate(len);
        b
    }

    /// Parses 10 or more bytes; num_buffers is 0 when fewer than 12 are given.
    pub fn from_bytes(b: &[u8]) -> NetHdr {
        let le16 = |o: usize| {
            b.get(o..o + 2)
                .map_or(0, |s| u16::from_le_bytes([s[0], s[1]]))
        };
        NetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: le16(2),
            gso_size: le16(4),
            csum_start: le16(6),
            csum_offset: le16(8),
            num_buffers: le16(10),
        }
    }
}

/// How a TX packet (header, then frame) is laid out over descriptors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxLayout {
    /// Header and frame in one descriptor.
    Single,
    /// The header in its own descriptor, the frame in a second (legacy drivers).
    SeparateHeader,
    /// Header and frame as one byte stream cut into descriptors of at most n bytes (the
    /// header may straddle descriptors).
    Chunks(usize),
}

/// How an RX buffer is posted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxLayout {
    /// One descriptor (Linux with MRG_RXBUF).
    Single,
    /// A header-sized descriptor followed by one for the data (legacy drivers).
    SeparateHeader,
}

/// The leading fields of struct virtio_net_config.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetConfig {
    pub mac: [u8; 6],
    pub status: u16,
    pub max_virtqueue_pairs: u16,
    pub mtu: u16,
}

#[derive(Clone, Copy)]
struct Buf {
    addr: u64,
    cap: usize,
    /// Bytes handed to the device.
    len: usize,
}

/// The guest buffers of one queue: a pool reused by size, and what each in-flight head owns.
struct Buffers {
    free: Vec<Buf>,
    in_flight: Vec<Option<Buf>>,
}

impl Buffers {
    fn new(queue_size: u16) -> Self {
        Buffers {
            free: Vec::new(),
            in_flight: vec![None; queue_size.into()],
        }
    }

    fn get(&mut self, mem: &GuestMemory, len: usize) -> Buf {
        match self.free.iter().position(|b| b.cap >= len) {
            Some(i) => Buf {
                len,
                ..self.free.swap_remove(i)
            },
            None => Buf {
                addr: mem.alloc(len.max(1), 64),
                cap: len.max(1),
                len,
            },
        }
    }

    fn release(&mut self, head: u16) -> Option<Buf> {
        let b = self.in_flight.get_mut(usize::from(head))?.take()?;
        self.free.push(b);
        Some(b)
    }

    fn count(&self) -> usize {
        self.in_flight.iter().flatten().count()
    }
}

/// A virtio-net driver. Guest buffers are pooled per queue and reused by size. Tests may also
/// drive `device().queue(i)` directly; used entries taken that way bypass the buffer
/// bookkeeping, so let `wait_tx_done` / `recv` drain a queue before doing so.
pub struct NetFrontend {
    dev: VhostUserDevice,
    hdr_len: usize,
    rx: Vec<Buffers>,
    tx: Vec<Buffers>,
}

impl NetFrontend {
    /// Connects with 2 * `queue_pairs` queues; see `VhostUserDevice::connect_with`.
    pub fn connect(
        socket: impl AsRef<Path>,
        queue_pairs: usize,
        features_wanted: u64,
        opts: &DeviceOptions,
    ) -> io::Result<Self> {
        let dev = VhostUserDevice::connect_with(socket, 2 * queue_pairs, features_wanted, opts)?;
        Ok(Self::new(dev))
    }

    /// Drives an already connected device with an even number of queues.
    pub fn new(mut dev: VhostUserDevice) -> Self {
        let f = dev.negotiated_features();
        let hdr_len = if f & (VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MRG_RXBUF) != 0 {
            12
        } else {
            10
        };
        let size = dev.queue(0).size();
        let pairs = dev.num_queues() / 2;
        let bufs = |_| Buffers::new(size);
        NetFrontend {
            dev,
            hdr_len,
            rx: (0..pairs).map(bufs).collect(),
            tx: (0..pairs).map(bufs).collect(),
        }
    }

    pub fn device(&mut self) -> &mut VhostUserDevice {
        &mut self.dev
    }
    pub fn features(&self) -> u64 {
        self.dev.negotiated_features()
    }
    /// 12 with VERSION_1 or MRG_RXBUF, else 10.
    pub fn hdr_len(&self) -> usize {
        self.hdr_len
    }
    pub fn queue_pairs(&self) -> usize {
        self.rx.len()
    }

    pub fn config(&mut self) -> io::Result<NetConfig> {
        let b = self.dev.get_config(0, 12)?;
        let le16 = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        Ok(NetConfig {
            mac: b[..6].try_into().unwrap(),
            status: le16(6),
            max_virtqueue_pairs: le16(8),
            mtu: le16(10),
        })
    }

    /// Sends header + frame in one descriptor.
    pub fn send(&mut self, pair: usize, hdr: &NetHdr, frame: &[u8]) -> io::Result<u16> {
        self.send_with_layout(pair, hdr, frame, TxLayout::Single, false)
    }

    /// Sends a packet laid out as `layout`, through an indirect table if `indirect`, and
    /// kicks. Reclaims finished TX buffers first; waits up to 5 s for room in a full queue.
    /// Returns the head.
    pub fn send_with_layout(
        &mut self,
        pair: usize,
        hdr: &NetHdr,
        frame: &[u8],
        layout: TxLayout,
        indirect: bool,
    ) -> io::Result<u16> {
        let mut bytes = hdr.to_bytes(self.hdr_len);
        bytes.extend_from_slice(frame);
        let pieces: Vec<(usize, usize)> = match layout {
            TxLayout::Single => vec![(0, bytes.len())],
            TxLayout::SeparateHeader => vec![(0, self.hdr_len), (self.hdr_len, frame.len())],
            TxLayout::Chunks(n) => {
                assert!(n > 0, "zero-sized chunks");
                (0..bytes.len())
                    .step_by(n)
                    .map(|o| (o, n.min(bytes.len() - o)))
                    .collect()
            }
        };
        let needed = if indirect { 1 } else { pieces.len() };
        self.reclaim_tx(pair);
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.dev.queue(2 * pair + 1).num_free() < needed {
            if !self.take_tx(pair, deadline.saturating_duration_since(Instant::now())) {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "TX queue stays full",
                ));
            }
        }
        let buf = self.tx[pair].get(self.dev.mem(), bytes.len());
        self.dev.mem().write(buf.addr, &bytes);
        let descs: Vec<_> = pieces
            .iter()
            .map(|&(o, l)| (buf.addr + o as u64, l as u32, false))
            .collect();
        let q = self.dev.queue(2 * pair + 1);
        let head = if indirect {
            q.add_indirect(&descs)
        } else {
            q.add(&descs)
        };
        q.kick();
        self.tx[pair].in_flight[usize::from(head)] = Some(buf);
        Ok(head)
    }

    fn take_tx(&mut self, pair: usize, timeout: Duration) -> bool {
        let Some((head, _)) = self.dev.queue(2 * pair + 1).wait_used(timeout) else {
            return false;
        };
        self.tx[pair].release(head);
        true
    }

    /// Takes back every finished TX buffer without waiting; returns how many.
    pub fn reclaim_tx(&mut self, pair: usize) -> usize {
        let mut n = 0;
        while self.take_tx(pair, Duration::ZERO) {
            n += 1;
        }
        n
    }

    /// TX packets the device has not returned yet.
    pub fn tx_in_flight(&self, pair: usize) -> usize {
        self.tx[pair].count()
    }

    /// Waits until the device has returned every TX buffer of `pair`; false on timeout.
    pub fn wait_tx_done(&mut self, pair: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.tx_in_flight(pair) > 0 {
            if !self.take_tx(pair, deadline.saturating_duration_since(Instant::now())) {
                return false;
            }
        }
        true
    }

    /// Posts `count` device-writable buffers of `buf_len` bytes, one descriptor each, and
    /// kicks. Panics if the queue lacks free descriptors.
    pub fn post_rx(&mut self, pair: usize, count: usize, buf_len: usize) {
        self.post_rx_with_layout(pair, count, buf_len, RxLayout::Single)
    }

    /// Like `post_rx`; with `RxLayout::SeparateHeader` each buffer of `buf_len` bytes is
    /// posted as a header-sized descriptor and one for the rest (contiguous in memory).
    pub fn post_rx_with_layout(
        &mut self,
        pair: usize,
        count: usize,
        buf_len: usize,
        layout: RxLayout,
    ) {
        let h = self.hdr_len;
        for _ in 0..count {
            let buf = self.rx[pair].get(self.dev.mem(), buf_len);
            let descs = match layout {
                RxLayout::Single => vec![(buf.addr, buf_len as u32, true)],
                RxLayout::SeparateHeader => {
                    assert!(buf_len > h, "RX buffer smaller than the header");
                    vec![
                        (buf.addr, h as u32, true),
                        (buf.addr + h as u64, (buf_len - h) as u32, true),
                    ]
                }
            };
            let head = self.dev.queue(2 * pair).add(&descs);
            self.rx[pair].in_flight[usize::from(head)] = Some(buf);
        }
        self.dev.queue(2 * pair).kick();
    }

    /// RX buffers posted and not yet returned.
    pub fn rx_posted(&self, pair: usize) -> usize {
        self.rx[pair].count()
    }

    /// The next used RX entry as is, `(head, used length)`; its buffer goes back to the pool.
    pub fn rx_used_raw(&mut self, pair: usize, timeout: Duration) -> Option<(u16, u32)> {
        let (head, len) = self.dev.queue(2 * pair).wait_used(timeout)?;
        self.rx[pair].release(head);
        Some((head, len))
    }

    fn take_rx(&mut self, pair: usize, timeout: Duration) -> Option<Vec<u8>> {
        let (head, len) = self.dev.queue(2 * pair).wait_used(timeout)?;
        let buf = self.rx[pair]
            .release(head)
            .unwrap_or_else(|| panic!("used RX head {head} was not posted by post_rx"));
        assert!(
            len as usize <= buf.len,
            "used length {len} > {} byte RX buffer",
            buf.len
        );
        Some(self.dev.mem().read_vec(buf.addr, len as usize))
    }

    /// Receives one packet: header and frame. With MRG_RXBUF collects num_buffers used
    /// buffers. The buffers go back to the pool for the next `post_rx`. Panics on a used
    /// length shorter than the header or longer than the buffer, or on missing buffers.
    pub fn recv(&mut self, pair: usize, timeout: Duration) -> Option<(NetHdr, Vec<u8>)> {
        let first = self.take_rx(pair, timeout)?;
        assert!(
            first.len() >= self.hdr_len,
            "used RX length {} < header",
            first.len()
        );
        let hdr = NetHdr::from_bytes(&first[..self.hdr_len]);
        let mut frame = first[self.hdr_len..].to_vec();
        if self.features() & VIRTIO_NET_F_MRG_RXBUF != 0 {
            assert!(hdr.num_buffers >= 1, "num_buffers is 0");
            for k in 1..hdr.num_buffers {
                let more = self.take_rx(pair, Duration::from_secs(1));
                let more =
                    more.unwrap_or_else(|| panic!("num_buffers {} but {k} used", hdr.num_buffers));
                frame.extend_from_slice(&more);
            }
        }
        Some((hdr, frame))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_hdr_bytes() {
        let h = NetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            gso_type: VIRTIO_NET_HDR_GSO_TCPV4,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 3,
        };
        let b = h.to_bytes(12);
        assert_eq!(b, [1, 1, 54, 0, 0xa8, 5, 34, 0, 16, 0, 3, 0]);
        assert_eq!(NetHdr::from_bytes(&b), h);
        assert_eq!(
            NetHdr::from_bytes(&h.to_bytes(10)),
            NetHdr {
                num_buffers: 0,
                ..h
            }
        );
    }
}
