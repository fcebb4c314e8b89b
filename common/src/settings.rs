//! Settings a running backend can be given through `--control` (`set-limits`), shared by the
//! supervisor, the service process and the workers in one small anonymous shared mapping.
//!
//! The supervisor maps it before anything is forked and writes the values from the command
//! line; every process forked after that shares it. The service process, which parses what
//! control clients send, writes new values; the worker's queue threads read them with one
//! relaxed load per pass (the generation word) and take up a change at their next pass. The
//! device says what the words mean ([`Setting`], `launch::Device::SETTINGS`); this module
//! only stores them.
//!
//! Writes are published with a sequence counter (odd while a write is under way), so a reader
//! never sees half of an update. There is one writer at a time: the service process is single
//! threaded, and the supervisor writes only before it forks.
//!
//! The mapping is writable in a worker too (it is inherited). That is no hole: the values only
//! tell the worker what to enforce on its own guest, and a worker that ignores them needs no
//! write access to do so. What a compromised worker can do is misreport them to `status`.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// Words for values (the mapping also holds the sequence word).
pub const MAX_SETTINGS: usize = 15;
/// The largest value a setting takes (2^50: a petabyte per second, a quadrillion IOPS).
pub const MAX_VALUE: u64 = 1 << 50;

/// How a setting's value is written and shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// A plain count (operations per second, a number of operations).
    Count,
    /// Bytes: given as a number or a size such as "50M".
    Bytes,
}

/// One setting a device accepts.
#[derive(Debug, Clone, Copy)]
pub struct Setting {
    /// Its name in `set-limits` and `status` ("read-iops").
    pub name: &'static str,
    pub unit: Unit,
    /// One line for `help`.
    pub help: &'static str,
}

/// The shared words and what they are.
#[derive(Debug)]
pub struct Settings {
    base: NonNull<AtomicU64>,
    defs: &'static [Setting],
}

// SAFETY: the mapping is only ever accessed through atomics and is never unmapped.
unsafe impl Send for Settings {}
// SAFETY: as above.
unsafe impl Sync for Settings {}

static SETTINGS: OnceLock<Settings> = OnceLock::new();

impl Settings {
    /// Maps the words for `defs` with `initial` values (missing ones 0) and makes them the
    /// process's; processes forked after this share them. Only the first call maps anything.
    pub fn install(defs: &'static [Setting], initial: &[u64]) -> std::io::Result<&'static Self> {
        assert!(defs.len() <= MAX_SETTINGS, "too many settings");
        if let Some(s) = SETTINGS.get() {
            return Ok(s);
        }
        let base = crate::metrics::shared_words(1 + MAX_SETTINGS)?;
        let s = SETTINGS.get_or_init(|| Settings { base, defs });
        let mut v = [0u64; MAX_SETTINGS];
        for (d, i) in v.iter_mut().zip(initial) {
            *d = (*i).min(MAX_VALUE);
        }
        s.write(&v[..defs.len()]);
        Ok(s)
    }

    /// The process's settings, if they were installed.
    pub fn get() -> Option<&'static Self> {
        SETTINGS.get()
    }

    /// What the words are.
    pub fn defs(&self) -> &'static [Setting] {
        self.defs
    }

    fn word(&self, i: usize) -> &AtomicU64 {
        assert!(i <= MAX_SETTINGS);
        // SAFETY: the mapping holds 1 + MAX_SETTINGS words and lives for the process's life.
        unsafe { &*self.base.as_ptr().add(i) }
    }

    /// The sequence word: it changes with every write. One relaxed load: cheap enough to
    /// look at in every pass.
    pub fn generation(&self) -> u64 {
        self.word(0).load(Ordering::Relaxed)
    }

    /// The current values (one per def) and the generation they belong to.
    pub fn read(&self) -> (u64, Vec<u64>) {
        loop {
            let g = self.word(0).load(Ordering::Acquire);
            if g & 1 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let v: Vec<u64> = (0..self.defs.len())
                .map(|i| self.word(1 + i).load(Ordering::Relaxed).min(MAX_VALUE))
                .collect();
            std::sync::atomic::fence(Ordering::Acquire);
            if self.word(0).load(Ordering::Relaxed) == g {
                return (g, v);
            }
        }
    }

    /// Replaces the values (one per def; the single writer's call).
    pub fn write(&self, values: &[u64]) {
        let g = self.word(0).load(Ordering::Relaxed);
        let g = if g & 1 == 1 { g + 1 } else { g };
        self.word(0).store(g + 1, Ordering::Relaxed);
        std::sync::atomic::fence(Ordering::Release);
        for (i, v) in values.iter().take(self.defs.len()).enumerate() {
            self.word(1 + i)
                .store((*v).min(MAX_VALUE), Ordering::Relaxed);
        }
        self.word(0).store(g + 2, Ordering::Release);
    }

    /// The values by name, for `status` and the reply to `set-limits`.
    pub fn to_json(&self) -> serde_json::Value {
        let (_, v) = self.read();
        let m: serde_json::Map<_, _> = self
            .defs
            .iter()
            .zip(v)
            .map(|(d, v)| (d.name.to_string(), serde_json::Value::from(v)))
            .collect();
        serde_json::Value::Object(m)
    }

    /// Applies a `set-limits` request: `args` names some settings (the rest keep their
    /// values); a value is a number, a size string for byte settings ("50M"), or null for 0.
    /// Nothing changes unless every named setting is valid.
    pub fn update(&self, args: &serde_json::Map<String, serde_json::Value>) -> Result<(), String> {
        if self.defs.is_empty() {
            return Err("this backend has no settings to change".into());
        }
        if args.is_empty() {
            return Err(format!("name at least one of: {}", self.names()));
        }
        let (_, mut v) = self.read();
        for (k, val) in args {
            let Some(i) = self.defs.iter().position(|d| d.name == k) else {
                return Err(format!(
                    "unknown setting '{k}' (settings: {})",
                    self.names()
                ));
            };
            let d = &self.defs[i];
            let n = match val {
                serde_json::Value::Null => 0,
                serde_json::Value::Number(n) => n
                    .as_u64()
                    .ok_or_else(|| format!("{k}: not a whole number >= 0"))?,
                serde_json::Value::String(s) if d.unit == Unit::Bytes => {
                    crate::size::parse_size(s).map_err(|e| format!("{k}: {e}"))?
                }
                _ => {
                    return Err(format!(
                        "{k}: {}",
                        match d.unit {
                            Unit::Count => "a number (0: unlimited)",
                            Unit::Bytes =>
                                "a number of bytes or a size such as \"50M\" (0: unlimited)",
                        }
                    ))
                }
            };
            if n > MAX_VALUE {
                return Err(format!(
                    "{k}: {n} is more than the largest value, {MAX_VALUE}"
                ));
            }
            v[i] = n;
        }
        self.write(&v);
        Ok(())
    }

    fn names(&self) -> String {
        self.defs
            .iter()
            .map(|d| d.name)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFS: &[Setting] = &[
        Setting {
            name: "iops",
            unit: Unit::Count,
            help: "",
        },
        Setting {
            name: "bps",
            unit: Unit::Bytes,
            help: "",
        },
    ];

    #[test]
    fn updates_are_all_or_nothing_and_bounded() {
        let s = Settings::install(DEFS, &[5]).unwrap();
        assert_eq!(s.read().1, vec![5, 0]);
        let g = s.generation();
        let args = |j: serde_json::Value| j.as_object().unwrap().clone();
        s.update(&args(serde_json::json!({"bps": "1M"}))).unwrap();
        assert_eq!(s.read().1, vec![5, 1 << 20]);
        assert_ne!(s.generation(), g);
        for bad in [
            serde_json::json!({"iops": 7, "nope": 1}),
            serde_json::json!({"iops": -1}),
            serde_json::json!({"iops": "10"}),
            serde_json::json!({"bps": "10X"}),
            serde_json::json!({"iops": 1.5}),
            serde_json::json!({"iops": MAX_VALUE + 1}),
            serde_json::json!({}),
        ] {
            let g = s.generation();
            assert!(s.update(&args(bad.clone())).is_err(), "{bad}");
            assert_eq!(s.read().1, vec![5, 1 << 20], "{bad} changed something");
            assert_eq!(s.generation(), g);
        }
        s.update(&args(serde_json::json!({"iops": null}))).unwrap();
        assert_eq!(s.read().1, vec![0, 1 << 20]);
        assert_eq!(s.to_json(), serde_json::json!({"iops": 0, "bps": 1 << 20}));
    }
}
