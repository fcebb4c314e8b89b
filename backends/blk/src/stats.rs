//! Each queue's counters ([`QueueCounters`]), kept in the supervisor's metrics page when
//! `--metrics` or `--control` is given, and what the supervisor calls them ([`METRICS`]).

use std::mem::offset_of;
use std::sync::atomic::AtomicU64;

use vhostbox_common::metrics::{Counters, Def, Histogram, Kind};

use crate::request::RequestType;

/// Request types, in the order of [`QueueCounters::requests`].
const TYPES: [&str; 7] = [
    "read",
    "write",
    "flush",
    "get_id",
    "discard",
    "write_zeroes",
    "unsupported",
];

/// Upper bounds of the latency buckets but the last (+Inf), in ns.
pub const LATENCY_BOUNDS_NS: [u64; 15] = [
    1_000,
    2_000,
    5_000,
    10_000,
    20_000,
    50_000,
    100_000,
    200_000,
    500_000,
    1_000_000,
    2_000_000,
    5_000_000,
    10_000_000,
    50_000_000,
    100_000_000,
];
const LATENCY_BOUNDS_S: [f64; 15] = [
    1e-6, 2e-6, 5e-6, 10e-6, 20e-6, 50e-6, 100e-6, 200e-6, 500e-6, 1e-3, 2e-3, 5e-3, 10e-3, 50e-3,
    100e-3,
];

/// One queue's counters. Only the queue's own thread writes them.
#[derive(Default)]
#[repr(C)]
pub struct QueueCounters {
    /// Requests taken, by type: read, write, flush, get_id, discard, write_zeroes, unsupported.
    pub requests: [AtomicU64; 7],
    /// Bytes of read and of write requests taken.
    pub bytes: [AtomicU64; 2],
    /// Requests completed, by status: ok, ioerr, unsupp.
    pub completions: [AtomicU64; 3],
    /// Chains that could not be parsed (returned with an error, or with nothing).
    pub malformed: AtomicU64,
    /// Requests in the engine now.
    pub in_flight: AtomicU64,
    /// Requests the I/O limits held back (each counted once, however long it waited).
    pub throttled: AtomicU64,
    /// From taking a request off the avail ring to its status written (with --metrics).
    pub latency: Histogram<16>,
}

// SAFETY: repr(C), AtomicU64s only (34 of them), all-zero valid.
unsafe impl Counters for QueueCounters {}

impl QueueCounters {
    /// The index in `requests` of a request type.
    pub fn type_index(t: RequestType) -> usize {
        match t {
            RequestType::In => 0,
            RequestType::Out => 1,
            RequestType::Flush => 2,
            RequestType::GetId => 3,
            RequestType::Discard => 4,
            RequestType::WriteZeroes => 5,
            RequestType::Unsupported(_) => 6,
        }
    }
}

const fn word(off: usize) -> usize {
    off / 8
}

const fn request(i: usize) -> Def {
    Def {
        name: "blk_requests",
        help: "Requests the guest queued, by type.",
        kind: Kind::Counter,
        word: word(offset_of!(QueueCounters, requests)) + i,
        labels: match i {
            0 => &[("type", TYPES[0])],
            1 => &[("type", TYPES[1])],
            2 => &[("type", TYPES[2])],
            3 => &[("type", TYPES[3])],
            4 => &[("type", TYPES[4])],
            5 => &[("type", TYPES[5])],
            _ => &[("type", TYPES[6])],
        },
    }
}

const fn completion(i: usize, status: &'static [(&'static str, &'static str)]) -> Def {
    Def {
        name: "blk_completions",
        help: "Requests completed, by the status the guest got: ok, ioerr (an I/O error, a \
               malformed or out-of-range request, a write to a read-only disk), unsupp.",
        kind: Kind::Counter,
        word: word(offset_of!(QueueCounters, completions)) + i,
        labels: status,
    }
}

/// The series of every queue, for the supervisor.
pub const METRICS: &[Def] = &[
    request(0),
    request(1),
    request(2),
    request(3),
    request(4),
    request(5),
    request(6),
    Def {
        name: "blk_bytes",
        help: "Bytes the guest asked to read or write.",
        kind: Kind::Counter,
        word: word(offset_of!(QueueCounters, bytes)),
        labels: &[("direction", "read")],
    },
    Def {
        name: "blk_bytes",
        help: "Bytes the guest asked to read or write.",
        kind: Kind::Counter,
        word: word(offset_of!(QueueCounters, bytes)) + 1,
        labels: &[("direction", "write")],
    },
    completion(0, &[("status", "ok")]),
    completion(1, &[("status", "ioerr")]),
    completion(2, &[("status", "unsupp")]),
    Def {
        name: "blk_malformed_requests",
        help: "Descriptor chains that could not be parsed (also counted as ioerr when they had \
               a status byte).",
        kind: Kind::Counter,
        word: word(offset_of!(QueueCounters, malformed)),
        labels: &[],
    },
    Def {
        name: "blk_in_flight",
        help: "Requests submitted to the engine and not completed yet.",
        kind: Kind::Gauge,
        word: word(offset_of!(QueueCounters, in_flight)),
        labels: &[],
    },
    Def {
        name: "blk_throttled_requests",
        help: "Requests that waited for the I/O limits (--limit-*, set-limits), each counted once.",
        kind: Kind::Counter,
        word: word(offset_of!(QueueCounters, throttled)),
        labels: &[],
    },
    Def {
        name: "blk_request_duration_seconds",
        help: "Time from taking a request off the avail ring to writing its status.",
        kind: Kind::Histogram(&LATENCY_BOUNDS_S),
        word: word(offset_of!(QueueCounters, latency)),
        labels: &[],
    },
];
