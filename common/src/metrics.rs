//! Counters a jailed worker keeps and its supervisor serves, with no new syscall in the jail.
//!
//! The supervisor maps one shared anonymous page (a few, for many queues) before it forks any
//! worker ([`Page::install`]). Every worker inherits the mapping: it counts into it with plain
//! atomic stores, and the supervisor reads it whenever `--metrics` is scraped or `--control`
//! asks for `stats`. The mapping outlives each worker, so the counters of a queue add up over
//! every connection and every replacement, as Prometheus expects of a counter.
//!
//! The page has one block of [`BLOCK_WORDS`] words for the connection ([`ConnWord`]: features
//! and rings the frontend set), then one block per queue (blk) or queue pair (net). A device
//! lays its block out as a `#[repr(C)]` struct of `AtomicU64` ([`Counters`]) and describes it
//! with [`Def`]s, which the supervisor turns into OpenMetrics text (`prometheus-client`) and
//! JSON. Without `--metrics` or `--control` there is no page, and each queue counts into memory
//! of its own ([`QueueStats`]), for the log.
//!
//! A compromised worker can write anything into the page; the supervisor only ever reads
//! numbers from it, so the worst it gets is wrong figures about that worker itself.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Deref;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// Words (u64) per block: one block for the connection, one per queue.
pub const BLOCK_WORDS: usize = 64;

/// Adds `v` to a counter that only one thread writes (each queue is served by one thread):
/// a load and a store, no locked instruction.
#[inline]
pub fn add(c: &AtomicU64, v: u64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(v), Ordering::Relaxed);
}

/// Adds one.
#[inline]
pub fn inc(c: &AtomicU64) {
    add(c, 1);
}

/// Sets a gauge.
#[inline]
pub fn set(c: &AtomicU64, v: u64) {
    c.store(v, Ordering::Relaxed);
}

/// A queue's counters as a device lays them out.
///
/// # Safety
/// The type must be `#[repr(C)]`, made only of `AtomicU64` (arrays of them included), at most
/// [`BLOCK_WORDS`] of them, and valid when all zero.
pub unsafe trait Counters: Default + Send + Sync + 'static {
    /// The counters as words, in layout order.
    fn words(&self) -> &[AtomicU64] {
        let n = std::mem::size_of::<Self>() / 8;
        // SAFETY: by the trait's contract Self is n AtomicU64 in a row.
        unsafe { std::slice::from_raw_parts((self as *const Self).cast::<AtomicU64>(), n) }
    }
}

/// The words of the connection block (block 0), written by the worker's relay.
#[derive(Debug, Clone, Copy)]
#[repr(usize)]
pub enum ConnWord {
    /// 1 while a frontend is connected, 0 otherwise.
    Connected = 0,
    /// The virtio features the frontend acknowledged (SET_FEATURES).
    Features = 1,
    /// The vhost-user protocol features it acknowledged.
    ProtocolFeatures = 2,
    /// Bit i set: ring i is enabled (rings 0-63).
    RingsEnabled = 3,
    /// Memory regions in the frontend's table.
    MemRegions = 4,
}

/// `words` zeroed atomic words in an anonymous shared mapping that lives as long as the
/// process (it is never unmapped): processes forked after this share it.
pub(crate) fn shared_words(words: usize) -> std::io::Result<NonNull<AtomicU64>> {
    // SAFETY: a fresh anonymous shared mapping; nothing else refers to that range.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            words * 8,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(NonNull::new(p.cast::<AtomicU64>()).expect("mmap does not return null"))
}

/// The shared page, once the supervisor made it.
static PAGE: OnceLock<Page> = OnceLock::new();

/// The mapping the supervisor shares with its workers.
#[derive(Debug)]
pub struct Page {
    base: NonNull<AtomicU64>,
    queues: usize,
}

// SAFETY: the mapping is only ever accessed through atomics.
unsafe impl Send for Page {}
// SAFETY: as above.
unsafe impl Sync for Page {}

impl Page {
    /// Maps the page for `queues` queue blocks and makes it the process's; the workers forked
    /// after this share it. Only the first call maps anything.
    pub fn install(queues: usize) -> std::io::Result<&'static Page> {
        if let Some(p) = PAGE.get() {
            return Ok(p);
        }
        let base = shared_words((1 + queues) * BLOCK_WORDS)?;
        Ok(PAGE.get_or_init(|| Page { base, queues }))
    }

    /// The process's page, if the supervisor made one.
    pub fn get() -> Option<&'static Page> {
        PAGE.get()
    }

    /// Queue blocks in the page.
    pub fn queues(&self) -> usize {
        self.queues
    }

    fn block(&self, i: usize) -> &[AtomicU64] {
        // SAFETY: block i lies within the mapping made for 1 + queues blocks (callers check
        // i <= queues); anonymous memory is zeroed, a valid AtomicU64 pattern.
        unsafe { std::slice::from_raw_parts(self.base.as_ptr().add(i * BLOCK_WORDS), BLOCK_WORDS) }
    }

    /// A word of the connection block.
    pub fn conn(&self, w: ConnWord) -> &AtomicU64 {
        &self.block(0)[w as usize]
    }

    /// Queue `q`'s words (`None` past the last).
    pub fn queue_words(&self, q: usize) -> Option<&[AtomicU64]> {
        (q < self.queues).then(|| self.block(1 + q))
    }

    /// Queue `q`'s block as the device's struct.
    fn queue_as<T: Counters>(&'static self, q: usize) -> Option<&'static T> {
        const { assert!(std::mem::size_of::<T>() <= BLOCK_WORDS * 8) };
        let w = self.queue_words(q)?;
        // SAFETY: T is repr(C) AtomicU64s (Counters), no larger than a block, and the block is
        // aligned for u64; the mapping is never unmapped.
        Some(unsafe { &*w.as_ptr().cast::<T>() })
    }

    /// Zeroes the gauges of the connection block (the worker that set them is gone).
    pub fn worker_gone(&self) {
        for w in [
            ConnWord::Connected,
            ConnWord::RingsEnabled,
            ConnWord::MemRegions,
        ] {
            self.conn(w).store(0, Ordering::Relaxed);
        }
    }
}

/// Sets a word of the connection block, if there is a page.
pub fn set_conn(w: ConnWord, v: u64) {
    if let Some(p) = Page::get() {
        p.conn(w).store(v, Ordering::Relaxed);
    }
}

/// Reads a word of the connection block (0 without a page).
pub fn conn(w: ConnWord) -> u64 {
    Page::get().map_or(0, |p| p.conn(w).load(Ordering::Relaxed))
}

/// A queue's counters: its block of the shared page, or memory of its own without one.
#[derive(Debug)]
pub enum QueueStats<T: 'static> {
    Page(&'static T),
    Own(Arc<T>),
}

impl<T: Counters> QueueStats<T> {
    /// Queue `q`'s counters.
    pub fn for_queue(q: usize) -> Self {
        match Page::get().and_then(|p| p.queue_as::<T>(q)) {
            Some(t) => QueueStats::Page(t),
            None => QueueStats::Own(Arc::default()),
        }
    }

    /// Whether the counters are shared with a supervisor that serves them.
    pub fn served(&self) -> bool {
        matches!(self, QueueStats::Page(_))
    }

    /// The values now.
    pub fn snapshot(&self) -> Vec<u64> {
        self.words()
            .iter()
            .map(|w| w.load(Ordering::Relaxed))
            .collect()
    }
}

impl<T> Clone for QueueStats<T> {
    fn clone(&self) -> Self {
        match self {
            QueueStats::Page(t) => QueueStats::Page(t),
            QueueStats::Own(a) => QueueStats::Own(a.clone()),
        }
    }
}

impl<T> Deref for QueueStats<T> {
    type Target = T;
    fn deref(&self) -> &T {
        match self {
            QueueStats::Page(t) => t,
            QueueStats::Own(a) => a,
        }
    }
}

/// A latency histogram in a queue block: `N` buckets (the last is +Inf), the sum in
/// nanoseconds and the count. Buckets are not cumulative here; the exposition sums them.
#[derive(Debug)]
#[repr(C)]
pub struct Histogram<const N: usize> {
    pub buckets: [AtomicU64; N],
    pub sum_ns: AtomicU64,
    pub count: AtomicU64,
}

impl<const N: usize> Default for Histogram<N> {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_ns: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }
}

impl<const N: usize> Histogram<N> {
    /// Records one observation; `bounds_ns` are the upper bounds of the first N-1 buckets.
    #[inline]
    pub fn observe(&self, ns: u64, bounds_ns: &[u64]) {
        self.observe_n(ns, 1, bounds_ns);
    }

    /// Records `n` observations of the same value.
    #[inline]
    pub fn observe_n(&self, ns: u64, n: u64, bounds_ns: &[u64]) {
        let i = bounds_ns.partition_point(|&b| b < ns).min(N - 1);
        add(&self.buckets[i], n);
        add(&self.sum_ns, ns.saturating_mul(n));
        add(&self.count, n);
    }
}

/// What a metric is.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    Counter,
    Gauge,
    /// Upper bounds in seconds of all buckets but the last (+Inf); the words are the buckets,
    /// then the sum in ns, then the count ([`Histogram`]).
    Histogram(&'static [f64]),
}

/// One series of a queue block: a family name, its help, the word it reads and its labels
/// (a `queue` label is added).
#[derive(Debug, Clone, Copy)]
pub struct Def {
    /// Without the `vhostbox_` prefix and, for counters, without `_total`.
    pub name: &'static str,
    pub help: &'static str,
    pub kind: Kind,
    pub word: usize,
    pub labels: &'static [(&'static str, &'static str)],
}

/// A sample's value.
#[derive(Debug, Clone)]
pub enum Value {
    Int(u64),
    Float(f64),
    Histogram {
        sum: f64,
        count: u64,
        /// (upper bound, non-cumulative count).
        buckets: Vec<(f64, u64)>,
    },
}

/// One metric family and its samples, ready to encode.
#[derive(Debug, Clone)]
pub struct Family {
    pub name: String,
    pub help: String,
    pub kind: MetricType,
    pub samples: Vec<(Vec<(String, String)>, Value)>,
}

/// Every family a scrape shows, in order.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub families: Vec<Family>,
}

impl Snapshot {
    /// Adds one sample, to the family of that name (made on first use).
    pub fn push(
        &mut self,
        name: &str,
        help: &str,
        kind: MetricType,
        labels: Vec<(String, String)>,
        v: Value,
    ) {
        if let Some(f) = self.families.iter_mut().find(|f| f.name == name) {
            f.samples.push((labels, v));
            return;
        }
        self.families.push(Family {
            name: name.into(),
            help: help.into(),
            kind,
            samples: vec![(labels, v)],
        });
    }

    /// Adds every queue's series of a device from the page.
    pub fn push_queues(&mut self, page: &Page, defs: &[Def]) {
        for d in defs {
            for q in 0..page.queues() {
                let Some(w) = page.queue_words(q) else { break };
                let mut labels = vec![("queue".to_string(), q.to_string())];
                labels.extend(d.labels.iter().map(|(k, v)| (k.to_string(), v.to_string())));
                let get = |i: usize| w.get(i).map_or(0, |x| x.load(Ordering::Relaxed));
                let (kind, v) = match d.kind {
                    Kind::Counter => (MetricType::Counter, Value::Int(get(d.word))),
                    Kind::Gauge => (MetricType::Gauge, Value::Int(get(d.word))),
                    Kind::Histogram(bounds) => {
                        let n = bounds.len() + 1;
                        let buckets = bounds
                            .iter()
                            .copied()
                            .chain(std::iter::once(f64::INFINITY))
                            .enumerate()
                            .map(|(i, b)| (b, get(d.word + i)))
                            .collect();
                        let v = Value::Histogram {
                            sum: get(d.word + n) as f64 / 1e9,
                            count: get(d.word + n + 1),
                            buckets,
                        };
                        (MetricType::Histogram, v)
                    }
                };
                self.push(d.name, d.help, kind, labels, v);
            }
        }
    }

    /// The OpenMetrics text exposition (names prefixed `vhostbox_`).
    pub fn openmetrics(&self) -> String {
        let mut reg = Registry::with_prefix("vhostbox");
        reg.register_collector(Box::new(self.clone()));
        let mut s = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut s, &reg);
        s
    }

    /// The same figures as JSON: `{family: [{labels..., "value": v}]}`.
    pub fn json(&self) -> serde_json::Value {
        let mut out = serde_json::Map::new();
        for f in &self.families {
            let name = match f.kind {
                MetricType::Counter => format!("vhostbox_{}_total", f.name),
                _ => format!("vhostbox_{}", f.name),
            };
            let samples = f
                .samples
                .iter()
                .map(|(labels, v)| {
                    let mut m: BTreeMap<String, serde_json::Value> = labels
                        .iter()
                        .map(|(k, v)| (k.clone(), serde_json::Value::from(v.as_str())))
                        .collect();
                    let v = match v {
                        Value::Int(i) => serde_json::json!(i),
                        Value::Float(x) => serde_json::json!(x),
                        Value::Histogram {
                            sum,
                            count,
                            buckets,
                        } => serde_json::json!({
                            "sum": sum,
                            "count": count,
                            "buckets": buckets
                                .iter()
                                .map(|(b, c)| serde_json::json!([
                                    if b.is_finite() { serde_json::json!(b) } else { "+Inf".into() },
                                    c
                                ]))
                                .collect::<Vec<_>>(),
                        }),
                    };
                    m.insert("value".into(), v);
                    serde_json::Value::Object(m.into_iter().collect())
                })
                .collect();
            out.insert(name, serde_json::Value::Array(samples));
        }
        serde_json::Value::Object(out)
    }
}

impl Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), fmt::Error> {
        for f in &self.families {
            let mut m = enc.encode_descriptor(&f.name, &f.help, None, f.kind)?;
            for (labels, v) in &f.samples {
                let labels: Vec<(&str, &str)> = labels
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                if f.kind == MetricType::Info {
                    m.encode_info(&labels)?;
                    continue;
                }
                let mut s = m.encode_family(&labels)?;
                match (f.kind, v) {
                    (MetricType::Counter, Value::Int(i)) => {
                        s.encode_counter::<NoLabelSet, _, u64>(i, None)?
                    }
                    (MetricType::Counter, Value::Float(x)) => {
                        s.encode_counter::<NoLabelSet, _, f64>(x, None)?
                    }
                    (_, Value::Int(i)) => s.encode_gauge(i)?,
                    (_, Value::Float(x)) => s.encode_gauge(x)?,
                    (
                        _,
                        Value::Histogram {
                            sum,
                            count,
                            buckets,
                        },
                    ) => s.encode_histogram::<NoLabelSet>(*sum, *count, buckets, None)?,
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[repr(C)]
    #[derive(Default)]
    struct Q {
        a: AtomicU64,
        lat: Histogram<3>,
    }
    // SAFETY: repr(C), AtomicU64 only.
    unsafe impl Counters for Q {}

    const BOUNDS: &[f64] = &[1e-6, 1e-3];
    const DEFS: &[Def] = &[
        Def {
            name: "things",
            help: "Things done",
            kind: Kind::Counter,
            word: 0,
            labels: &[("type", "a")],
        },
        Def {
            name: "latency_seconds",
            help: "How long",
            kind: Kind::Histogram(BOUNDS),
            word: 1,
            labels: &[],
        },
    ];

    #[test]
    fn page_counts_render_as_openmetrics_and_json() {
        let page = Page::install(2).unwrap();
        let q1 = QueueStats::<Q>::for_queue(1);
        assert!(q1.served());
        inc(&q1.a);
        add(&q1.a, 2);
        q1.lat.observe(500, &[1000, 1_000_000]);
        q1.lat.observe(5_000_000, &[1000, 1_000_000]);
        // Past the page's queues: memory of its own.
        assert!(!QueueStats::<Q>::for_queue(2).served());
        let mut s = Snapshot::default();
        s.push_queues(page, DEFS);
        let text = s.openmetrics();
        assert!(
            text.contains("vhostbox_things_total{queue=\"1\",type=\"a\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("vhostbox_things_total{queue=\"0\",type=\"a\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("vhostbox_latency_seconds_bucket{le=\"0.000001\",queue=\"1\"} 1\n")
                || text
                    .contains("vhostbox_latency_seconds_bucket{queue=\"1\",le=\"0.000001\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("vhostbox_latency_seconds_count{queue=\"1\"} 2\n"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
        let j = s.json();
        assert_eq!(j["vhostbox_things_total"][1]["value"], 3);
        assert_eq!(j["vhostbox_latency_seconds"][1]["value"]["count"], 2);
    }
}
