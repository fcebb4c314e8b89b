//! What the supervisor calls each queue pair's counters ([`NetStats`]) on `--metrics`.

use std::mem::offset_of;

use vhostbox_common::metrics::{Def, Kind};

use crate::datapath::NetStats;

const fn c(
    name: &'static str,
    help: &'static str,
    off: usize,
    labels: &'static [(&'static str, &'static str)],
) -> Def {
    Def {
        name,
        help,
        kind: Kind::Counter,
        word: off / 8,
        labels,
    }
}

const FRAMES: &str = "Frames passed between the guest and the tap (rx: to the guest).";
const BYTES: &str = "Bytes of those frames, without the virtio-net header.";
const DROPS: &str = "Frames dropped, by direction and reason: rx too_big (no guest buffer can \
                     hold it), bad_offload (an offload the guest did not negotiate); tx \
                     malformed (chain), oversize, bad_header, tap_refused.";
const BAD_CHAINS: &str = "RX chains returned unused: a device-readable or out-of-memory \
                          descriptor.";
const WAITS: &str = "Times a frame waited: rx for guest buffers, tx for the tap to take it.";

/// The series of every pair, for the supervisor.
pub const METRICS: &[Def] = &[
    c(
        "net_frames",
        FRAMES,
        offset_of!(NetStats, rx_frames),
        &[("direction", "rx")],
    ),
    c(
        "net_frames",
        FRAMES,
        offset_of!(NetStats, tx_frames),
        &[("direction", "tx")],
    ),
    c(
        "net_bytes",
        BYTES,
        offset_of!(NetStats, rx_bytes),
        &[("direction", "rx")],
    ),
    c(
        "net_bytes",
        BYTES,
        offset_of!(NetStats, tx_bytes),
        &[("direction", "tx")],
    ),
    c(
        "net_dropped_frames",
        DROPS,
        offset_of!(NetStats, rx_too_big),
        &[("direction", "rx"), ("reason", "too_big")],
    ),
    c(
        "net_dropped_frames",
        DROPS,
        offset_of!(NetStats, rx_bad_offload),
        &[("direction", "rx"), ("reason", "bad_offload")],
    ),
    c(
        "net_dropped_frames",
        DROPS,
        offset_of!(NetStats, tx_malformed),
        &[("direction", "tx"), ("reason", "malformed")],
    ),
    c(
        "net_dropped_frames",
        DROPS,
        offset_of!(NetStats, tx_oversize),
        &[("direction", "tx"), ("reason", "oversize")],
    ),
    c(
        "net_dropped_frames",
        DROPS,
        offset_of!(NetStats, tx_bad_header),
        &[("direction", "tx"), ("reason", "bad_header")],
    ),
    c(
        "net_dropped_frames",
        DROPS,
        offset_of!(NetStats, tx_tap_errors),
        &[("direction", "tx"), ("reason", "tap_refused")],
    ),
    c(
        "net_rx_bad_chains",
        BAD_CHAINS,
        offset_of!(NetStats, rx_bad_chains),
        &[],
    ),
    c(
        "net_waits",
        WAITS,
        offset_of!(NetStats, rx_waits),
        &[("direction", "rx")],
    ),
    c(
        "net_waits",
        WAITS,
        offset_of!(NetStats, tx_waits),
        &[("direction", "tx")],
    ),
];
