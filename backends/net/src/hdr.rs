//! The virtio-net header (struct virtio_net_hdr_v1) and how negotiated features map onto it
//! and onto the tap's offloads.

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::*;

use crate::tap::{TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_UFO};

/// Header length with VIRTIO_F_VERSION_1 or MRG_RXBUF (with `num_buffers`).
pub const HDR_LEN_V1: usize = 12;
/// Legacy header length without MRG_RXBUF.
pub const HDR_LEN_LEGACY: usize = 10;

pub const F_NEEDS_CSUM: u8 = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
pub const F_DATA_VALID: u8 = VIRTIO_NET_HDR_F_DATA_VALID as u8;
pub const GSO_NONE: u8 = VIRTIO_NET_HDR_GSO_NONE as u8;
pub const GSO_TCPV4: u8 = VIRTIO_NET_HDR_GSO_TCPV4 as u8;
pub const GSO_UDP: u8 = VIRTIO_NET_HDR_GSO_UDP as u8;
pub const GSO_TCPV6: u8 = VIRTIO_NET_HDR_GSO_TCPV6 as u8;
pub const GSO_ECN: u8 = VIRTIO_NET_HDR_GSO_ECN as u8;

/// Offset of `num_buffers` in the header.
pub const NUM_BUFFERS_OFFSET: usize = 10;

/// Ethernet header length: the shortest frame the tap accepts.
pub const ETH_HLEN: usize = 14;
/// The longest frame (without the virtio-net header): a 64 KiB GSO packet behind an Ethernet
/// and a VLAN header.
pub const MAX_FRAME_LEN: usize = 65535 + ETH_HLEN + 4;

fn has(features: u64, bit: u32) -> bool {
    features & (1u64 << bit) != 0
}

/// Header length for the negotiated features.
pub fn hdr_len(features: u64) -> usize {
    if has(features, VIRTIO_F_VERSION_1) || has(features, VIRTIO_NET_F_MRG_RXBUF) {
        HDR_LEN_V1
    } else {
        HDR_LEN_LEGACY
    }
}

/// The tap offloads matching what the guest can receive.
pub fn tap_offloads(features: u64) -> u32 {
    if !has(features, VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut o = TUN_F_CSUM;
    for (bit, flag) in [
        (VIRTIO_NET_F_GUEST_TSO4, TUN_F_TSO4),
        (VIRTIO_NET_F_GUEST_TSO6, TUN_F_TSO6),
        (VIRTIO_NET_F_GUEST_ECN, TUN_F_TSO_ECN),
        (VIRTIO_NET_F_GUEST_UFO, TUN_F_UFO),
    ] {
        if has(features, bit) {
            o |= flag;
        }
    }
    o
}

/// The fields of the header the datapath checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl NetHdr {
    pub fn parse(b: &[u8]) -> Self {
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        NetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
        }
    }
}

/// Why a header is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HdrError {
    #[error("flags {0:#x} include bits the driver must not set")]
    Flags(u8),
    #[error("NEEDS_CSUM without the negotiated {0} feature")]
    Csum(&'static str),
    #[error("gso_type {0:#x} is not a known type")]
    GsoType(u8),
    #[error("gso_type {0:#x} without the negotiated {1} feature")]
    GsoNotNegotiated(u8, &'static str),
    #[error("checksum offset {start}+{offset} lies beyond the {len}-byte frame")]
    CsumRange { start: u16, offset: u16, len: usize },
    #[error("gso_size 0 with a GSO type")]
    GsoSize,
}

/// Checks a driver-to-device (TX) header against the negotiated features: the device accepts
/// only the offloads it offered and the driver acknowledged (virtio 1.2, 5.1.6.2).
pub fn check_tx(h: &NetHdr, features: u64, frame_len: usize) -> Result<(), HdrError> {
    if h.flags & !F_NEEDS_CSUM != 0 {
        return Err(HdrError::Flags(h.flags));
    }
    if h.flags & F_NEEDS_CSUM != 0 {
        if !has(features, VIRTIO_NET_F_CSUM) {
            return Err(HdrError::Csum("CSUM"));
        }
        let end = usize::from(h.csum_start) + usize::from(h.csum_offset) + 2;
        if end > frame_len {
            return Err(HdrError::CsumRange {
                start: h.csum_start,
                offset: h.csum_offset,
                len: frame_len,
            });
        }
    }
    let base = h.gso_type & !GSO_ECN;
    let (bit, name) = match base {
        GSO_NONE if h.gso_type & GSO_ECN == 0 => return Ok(()),
        GSO_NONE => return Err(HdrError::GsoType(h.gso_type)),
        GSO_TCPV4 => (VIRTIO_NET_F_HOST_TSO4, "HOST_TSO4"),
        GSO_TCPV6 => (VIRTIO_NET_F_HOST_TSO6, "HOST_TSO6"),
        GSO_UDP => (VIRTIO_NET_F_HOST_UFO, "HOST_UFO"),
        _ => return Err(HdrError::GsoType(h.gso_type)),
    };
    if !has(features, bit) {
        return Err(HdrError::GsoNotNegotiated(h.gso_type, name));
    }
    if h.gso_type & GSO_ECN != 0 && !has(features, VIRTIO_NET_F_HOST_ECN) {
        return Err(HdrError::GsoNotNegotiated(h.gso_type, "HOST_ECN"));
    }
    if h.gso_size == 0 {
        return Err(HdrError::GsoSize);
    }
    Ok(())
}

/// Makes a device-to-driver (RX) header from the tap fit the negotiated features. Returns false
/// if the frame needs an offload the guest did not negotiate (the tap's offloads follow the
/// features, so this means the tap was reconfigured behind our back): such a frame is dropped.
pub fn fix_rx(h: &mut [u8], features: u64) -> bool {
    let parsed = NetHdr::parse(h);
    if !has(features, VIRTIO_NET_F_GUEST_CSUM) {
        if parsed.flags & F_NEEDS_CSUM != 0 {
            return false;
        }
        // "If VIRTIO_NET_F_GUEST_CSUM is not negotiated, the device MUST set flags to zero."
        h[0] = 0;
    }
    let ok = match parsed.gso_type & !GSO_ECN {
        GSO_NONE => true,
        GSO_TCPV4 => has(features, VIRTIO_NET_F_GUEST_TSO4),
        GSO_TCPV6 => has(features, VIRTIO_NET_F_GUEST_TSO6),
        GSO_UDP => has(features, VIRTIO_NET_F_GUEST_UFO),
        _ => false,
    };
    ok && (parsed.gso_type & GSO_ECN == 0 || has(features, VIRTIO_NET_F_GUEST_ECN))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL_HOST: u64 = 1 << VIRTIO_NET_F_CSUM
        | 1 << VIRTIO_NET_F_HOST_TSO4
        | 1 << VIRTIO_NET_F_HOST_TSO6
        | 1 << VIRTIO_NET_F_HOST_ECN
        | 1 << VIRTIO_NET_F_HOST_UFO;

    fn h(flags: u8, gso_type: u8, gso_size: u16) -> NetHdr {
        NetHdr {
            flags,
            gso_type,
            hdr_len: 54,
            gso_size,
            csum_start: 34,
            csum_offset: 16,
        }
    }

    #[test]
    fn tx_header_needs_the_matching_feature() {
        let cases: &[(NetHdr, u32)] = &[
            (h(F_NEEDS_CSUM, GSO_NONE, 0), VIRTIO_NET_F_CSUM),
            (h(F_NEEDS_CSUM, GSO_TCPV4, 1448), VIRTIO_NET_F_HOST_TSO4),
            (h(F_NEEDS_CSUM, GSO_TCPV6, 1428), VIRTIO_NET_F_HOST_TSO6),
            (h(F_NEEDS_CSUM, GSO_UDP, 1472), VIRTIO_NET_F_HOST_UFO),
            (
                h(F_NEEDS_CSUM, GSO_TCPV4 | GSO_ECN, 1448),
                VIRTIO_NET_F_HOST_ECN,
            ),
        ];
        for (hdr, bit) in cases {
            assert_eq!(check_tx(hdr, ALL_HOST, 2000), Ok(()), "{hdr:?}");
            assert!(
                check_tx(hdr, ALL_HOST & !(1 << bit), 2000).is_err(),
                "{hdr:?} accepted without feature bit {bit}"
            );
        }
        assert_eq!(check_tx(&NetHdr::default(), 0, 60), Ok(()));
    }

    #[test]
    fn tx_header_rejects_nonsense() {
        for bad in [
            h(F_DATA_VALID, GSO_NONE, 0),
            h(0x80, GSO_NONE, 0),
            h(F_NEEDS_CSUM, 2, 1448),
            h(F_NEEDS_CSUM, 5, 1448),
            h(F_NEEDS_CSUM, GSO_ECN, 0),
            h(F_NEEDS_CSUM, GSO_TCPV4, 0),
        ] {
            assert!(check_tx(&bad, ALL_HOST, 2000).is_err(), "{bad:?}");
        }
        // The checksum field must lie inside the frame.
        assert!(check_tx(&h(F_NEEDS_CSUM, GSO_NONE, 0), ALL_HOST, 51).is_err());
        assert!(check_tx(&h(F_NEEDS_CSUM, GSO_NONE, 0), ALL_HOST, 52).is_ok());
    }

    #[test]
    fn rx_header_follows_guest_features() {
        let mut b = [F_DATA_VALID, GSO_NONE, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        assert!(fix_rx(&mut b, 0));
        assert_eq!(b[0], 0, "DATA_VALID cleared without GUEST_CSUM");
        let mut b = [F_DATA_VALID, GSO_NONE, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        assert!(fix_rx(&mut b, 1 << VIRTIO_NET_F_GUEST_CSUM));
        assert_eq!(b[0], F_DATA_VALID);
        let mut b = [F_NEEDS_CSUM, GSO_TCPV4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let csum = 1 << VIRTIO_NET_F_GUEST_CSUM;
        assert!(!fix_rx(&mut b, 0));
        assert!(!fix_rx(&mut b, csum));
        assert!(fix_rx(&mut b, csum | 1 << VIRTIO_NET_F_GUEST_TSO4));
        b[1] = GSO_TCPV4 | GSO_ECN;
        assert!(!fix_rx(&mut b, csum | 1 << VIRTIO_NET_F_GUEST_TSO4));
        assert!(fix_rx(
            &mut b,
            csum | 1 << VIRTIO_NET_F_GUEST_TSO4 | 1 << VIRTIO_NET_F_GUEST_ECN
        ));
    }

    #[test]
    fn offloads_and_header_length() {
        assert_eq!(
            tap_offloads(1 << VIRTIO_NET_F_GUEST_TSO4),
            0,
            "TSO needs CSUM"
        );
        let f = 1 << VIRTIO_NET_F_GUEST_CSUM
            | 1 << VIRTIO_NET_F_GUEST_TSO4
            | 1 << VIRTIO_NET_F_GUEST_TSO6
            | 1 << VIRTIO_NET_F_GUEST_ECN
            | 1 << VIRTIO_NET_F_GUEST_UFO;
        assert_eq!(
            tap_offloads(f),
            TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_UFO
        );
        assert_eq!(hdr_len(0), HDR_LEN_LEGACY);
        assert_eq!(hdr_len(1 << VIRTIO_NET_F_MRG_RXBUF), HDR_LEN_V1);
        assert_eq!(hdr_len(1 << VIRTIO_F_VERSION_1), HDR_LEN_V1);
    }
}
