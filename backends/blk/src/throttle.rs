//! I/O limits: IOPS and bytes per second, read and write separately or together, each a token
//! bucket (the `ratelimit` crate: lock-free, shared by the device's queue threads, its rate
//! and size changeable while it is in use).
//!
//! A request draws one token from the IOPS buckets and its data length from the byte buckets
//! of its class (total, and read or write). A bucket holds at most its burst: by default a
//! tenth of a second's worth, as QEMU's throttling does without `*-max`. A request larger than
//! the burst draws it in burst-sized parts, so it waits its full cost. When a bucket is empty
//! the queue stops popping its ring (the request is put back, see `queue`), sleeps on a timer
//! for the bucket's refill, and goes on; nothing fails and other queues are not held up
//! beyond their share of the same buckets.
//!
//! Limits come from the command line and change at run time through `--control` `set-limits`
//! ([`vhostbox_common::settings`]): every queue looks at the settings' generation at the start
//! of each pass, and the first to see a change applies it to the shared buckets.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use ratelimit::{Ratelimiter, TryWaitError};
use vhostbox_common::settings::{Setting, Settings, Unit};

use crate::request::RequestType;

/// The settings, in the order of their words: the six rates, then the two bursts.
pub const SETTINGS: &[Setting] = &[
    Setting {
        name: "iops",
        unit: Unit::Count,
        help: "reads and writes per second, together (0: unlimited)",
    },
    Setting {
        name: "read-iops",
        unit: Unit::Count,
        help: "reads per second",
    },
    Setting {
        name: "write-iops",
        unit: Unit::Count,
        help: "writes (with discard and write-zeroes) per second",
    },
    Setting {
        name: "bps",
        unit: Unit::Bytes,
        help: "bytes read and written per second, together",
    },
    Setting {
        name: "read-bps",
        unit: Unit::Bytes,
        help: "bytes read per second",
    },
    Setting {
        name: "write-bps",
        unit: Unit::Bytes,
        help: "bytes written per second",
    },
    Setting {
        name: "iops-burst",
        unit: Unit::Count,
        help: "most operations an IOPS bucket holds (0: a tenth of a second's worth)",
    },
    Setting {
        name: "bps-burst",
        unit: Unit::Bytes,
        help: "most bytes a byte bucket holds (0: a tenth of a second's worth)",
    },
];

/// Which buckets a request draws from, besides the totals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Read,
    Write,
    /// Flush, GET_ID, unsupported types: not limited.
    Free,
}

impl Class {
    pub fn of(t: RequestType) -> Self {
        match t {
            RequestType::In => Class::Read,
            RequestType::Out | RequestType::Discard | RequestType::WriteZeroes => Class::Write,
            _ => Class::Free,
        }
    }
}

/// What a request still has to draw: one IOPS token from the total and its class's bucket,
/// and its bytes from the total and its class's byte bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cost {
    class: Class,
    left: [u64; 4],
}

impl Cost {
    /// Discard and write-zeroes move no data through the guest's buffers: one operation each,
    /// no bytes.
    pub fn new(t: RequestType, data_bytes: u64) -> Self {
        let class = Class::of(t);
        let bytes = match t {
            RequestType::In | RequestType::Out => data_bytes,
            _ => 0,
        };
        Cost {
            class,
            left: [1, 1, bytes, bytes],
        }
    }
}

/// The device's buckets.
pub struct Throttle {
    /// iops, read-iops, write-iops, bps, read-bps, write-bps.
    buckets: [Ratelimiter; 6],
    /// The settings generation last applied (u64::MAX: none yet).
    applied: AtomicU64,
    active: AtomicBool,
    apply: Mutex<()>,
}

impl std::fmt::Debug for Throttle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Throttle")
            .field("rates", &self.buckets.each_ref().map(|b| b.rate()))
            .finish()
    }
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle {
            buckets: std::array::from_fn(|_| Ratelimiter::new(0)),
            applied: AtomicU64::new(u64::MAX),
            active: AtomicBool::new(false),
            apply: Mutex::new(()),
        }
    }
}

impl Throttle {
    /// Buckets for `values` (in the order of [`SETTINGS`]; missing ones 0).
    pub fn new(values: &[u64]) -> Self {
        let t = Throttle::default();
        t.set(values);
        if let Some(s) = Settings::get() {
            // The supervisor installed the settings from the same command line.
            t.applied.store(s.read().0, Ordering::Relaxed);
        }
        t
    }

    /// Sets rates and bursts; the buckets keep the tokens they hold (up to the new burst).
    fn set(&self, values: &[u64]) {
        let v = |i: usize| values.get(i).copied().unwrap_or(0);
        for (i, b) in self.buckets.iter().enumerate() {
            let rate = v(i);
            let burst = match v(if i < 3 { 6 } else { 7 }) {
                0 => (rate / 10).max(1),
                n => n,
            };
            b.set_rate(rate);
            if rate > 0 {
                b.set_max_tokens(burst);
            }
        }
        let active = self.buckets.iter().any(|b| b.rate() > 0);
        self.active.store(active, Ordering::Relaxed);
    }

    /// Takes up a change of the shared settings, if there was one; returns whether any limit
    /// is set. One relaxed load when nothing changed.
    pub fn refresh(&self) -> bool {
        if let Some(s) = Settings::get() {
            if s.generation() != self.applied.load(Ordering::Relaxed) {
                let _one = self.apply.lock().unwrap_or_else(|e| e.into_inner());
                let (g, v) = s.read();
                if g != self.applied.load(Ordering::Relaxed) {
                    self.set(&v);
                    self.applied.store(g, Ordering::Relaxed);
                    log::info!("I/O limits now {}", describe(&v));
                }
            }
        }
        self.active.load(Ordering::Relaxed)
    }

    /// Draws what `cost` still needs. `Err(wait)`: a bucket is empty; what was drawn so far
    /// stays drawn (`cost` remembers it), and the caller tries again after about `wait`.
    pub fn admit(&self, cost: &mut Cost) -> Result<(), Duration> {
        let class = match cost.class {
            Class::Free => return Ok(()),
            Class::Read => 1,
            Class::Write => 2,
        };
        for (k, idx) in [0, class, 3, 3 + class].into_iter().enumerate() {
            let b = &self.buckets[idx];
            while cost.left[k] > 0 {
                if b.rate() == 0 {
                    cost.left[k] = 0;
                    break;
                }
                let part = cost.left[k].min(b.max_tokens().max(1));
                match b.try_wait_n(part) {
                    Ok(()) => cost.left[k] -= part,
                    Err(TryWaitError::Insufficient(d)) => return Err(d),
                    // The burst shrank under us to nothing: treat as unlimited.
                    Err(_) => cost.left[k] = 0,
                }
            }
        }
        Ok(())
    }
}

/// "iops 1000, read-bps 52428800", or "none".
pub fn describe(values: &[u64]) -> String {
    let set: Vec<String> = SETTINGS
        .iter()
        .zip(values)
        .filter(|(_, v)| **v > 0)
        .map(|(d, v)| format!("{} {v}", d.name))
        .collect();
    if set.is_empty() {
        "none".into()
    } else {
        set.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn unlimited_admits_everything_at_once() {
        let t = Throttle::new(&[]);
        assert!(!t.refresh());
        let mut c = Cost::new(RequestType::In, 1 << 30);
        assert_eq!(t.admit(&mut c), Ok(()));
    }

    #[test]
    fn a_rate_is_held_to_and_parts_wait_their_turn() {
        // 1000 reads/s with a burst of 10: the first 10 go at once, the 11th waits ~1 ms.
        let t = Throttle::new(&[0, 1000, 0, 0, 0, 0, 10, 0]);
        assert!(t.refresh());
        std::thread::sleep(Duration::from_millis(20)); // fill the bucket
        for i in 0..10 {
            let mut c = Cost::new(RequestType::In, 4096);
            assert_eq!(t.admit(&mut c), Ok(()), "request {i}");
        }
        let mut c = Cost::new(RequestType::In, 4096);
        let wait = t.admit(&mut c).unwrap_err();
        assert!(wait <= Duration::from_millis(2), "{wait:?}");
        // Writes are not read-limited.
        let mut w = Cost::new(RequestType::Out, 4096);
        assert_eq!(t.admit(&mut w), Ok(()));
        // Flushes never are.
        let mut f = Cost::new(RequestType::Flush, 0);
        assert_eq!(t.admit(&mut f), Ok(()));
    }

    #[test]
    fn a_request_larger_than_the_burst_pays_in_full() {
        // 1 MB/s with a 64 KiB burst: a 256 KiB read takes about 0.26 s of refills.
        let t = Throttle::new(&[0, 0, 0, 1 << 20, 0, 0, 0, 64 << 10]);
        let t0 = Instant::now();
        let mut c = Cost::new(RequestType::In, 256 << 10);
        let mut waits = 0;
        while let Err(d) = t.admit(&mut c) {
            waits += 1;
            std::thread::sleep(d);
        }
        assert!(waits >= 4, "{waits}");
        // A lower bound only: what the buckets guarantee.
        assert!(
            t0.elapsed() >= Duration::from_millis(240),
            "{:?}",
            t0.elapsed()
        );
    }

    #[test]
    fn settings_change_the_rates_in_place() {
        let t = Throttle::new(&[100]);
        assert!(t.refresh());
        t.set(&[0, 0, 0, 0, 0, 0, 0, 0]);
        assert!(!t.refresh());
        let mut c = Cost::new(RequestType::Out, 1 << 20);
        assert_eq!(t.admit(&mut c), Ok(()));
        assert_eq!(describe(&[5, 0, 0, 0, 7]), "iops 5, read-bps 7");
    }
}
