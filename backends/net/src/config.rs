//! Validated configuration, built from [`Args`] so tests can make one without argv.

use std::fmt;
use std::str::FromStr;

use log::LevelFilter;
use vhostbox_common::logging::parse_level;
use vhostbox_common::sandbox::{Ids, SandboxMode, SeccompMode};

use crate::args::Args;

pub use vhostbox_common::daemon::ListenOn;

/// Where the tap comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TapSource {
    /// Attach to (or create) the tap with this name.
    Name(String),
    /// Queue fds opened by a launcher, one per queue pair.
    Fds(Vec<i32>),
}

/// A MAC address.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// A random locally administered unicast address.
    pub fn random() -> Self {
        let mut b = [0u8; 6];
        // SAFETY: getrandom writes at most 6 bytes into `b`.
        let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
        if n != 6 {
            // Entropy is not available this early only on broken systems; fall back to
            // something unique per process rather than failing.
            b[2..6].copy_from_slice(&std::process::id().to_be_bytes());
        }
        b[0] = (b[0] & 0xfe) | 0x02;
        Mac(b)
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Mac {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("--mac '{s}' is not a MAC address like 52:54:00:12:34:56");
        let parts: Vec<&str> = s.split([':', '-']).collect();
        if parts.len() != 6 {
            return Err(bad());
        }
        let mut b = [0u8; 6];
        for (i, p) in parts.iter().enumerate() {
            if p.len() != 2 {
                return Err(bad());
            }
            b[i] = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if b[0] & 1 != 0 {
            return Err(format!(
                "--mac {s} is a multicast address; a NIC needs a unicast one"
            ));
        }
        if b == [0; 6] {
            return Err(format!("--mac {s} is the all-zero address"));
        }
        Ok(Mac(b))
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: ListenOn,
    pub tap: TapSource,
    pub mac: Mac,
    pub queue_pairs: u16,
    pub queue_size: u16,
    pub mtu: Option<u16>,
    pub log_level: LevelFilter,
    pub sandbox: SandboxMode,
    pub seccomp: SeccompMode,
    /// The jailed worker's ids on the host.
    pub ids: Ids,
    /// Test builds: the escape the worker attempts after entering the jail.
    pub jail_probe: Option<String>,
}

/// The most queue pairs: vhost-user-backend gives each thread a 64-bit queue mask, and each
/// pair is two queues.
pub const MAX_QUEUE_PAIRS: u16 = 32;

impl TryFrom<Args> for Config {
    type Error = String;

    fn try_from(a: Args) -> Result<Self, String> {
        let listen = a.listen.to_listen_on()?;
        let tap = match (a.tap, a.tap_fd.is_empty()) {
            (Some(name), true) => {
                if name.is_empty() || name.len() >= libc::IFNAMSIZ {
                    return Err(format!(
                        "--tap '{name}': an interface name is 1-{} bytes",
                        libc::IFNAMSIZ - 1
                    ));
                }
                if name.contains(['/', ' ', '%']) || name == "." || name == ".." {
                    return Err(format!("--tap '{name}' is not a valid interface name"));
                }
                TapSource::Name(name)
            }
            (None, false) => {
                if let Some(fd) = a.tap_fd.iter().find(|&&fd| fd < 0) {
                    return Err(format!("invalid --tap-fd {fd}"));
                }
                let mut seen = a.tap_fd.clone();
                seen.sort_unstable();
                if seen.windows(2).any(|w| w[0] == w[1]) {
                    return Err("--tap-fd lists the same descriptor twice".into());
                }
                TapSource::Fds(a.tap_fd)
            }
            _ => return Err("exactly one of --tap and --tap-fd is required".into()),
        };
        let queue_pairs = match (&tap, a.queue_pairs) {
            (TapSource::Fds(fds), Some(n)) if usize::from(n) != fds.len() => {
                return Err(format!(
                    "--queue-pairs {n} but {} --tap-fd descriptor(s): give one tap queue per pair",
                    fds.len()
                ))
            }
            (TapSource::Fds(fds), _) => u16::try_from(fds.len()).unwrap_or(u16::MAX),
            (TapSource::Name(_), n) => n.unwrap_or(1),
        };
        if queue_pairs == 0 || queue_pairs > MAX_QUEUE_PAIRS {
            return Err(format!(
                "--queue-pairs {queue_pairs} is out of range 1-{MAX_QUEUE_PAIRS}"
            ));
        }
        if !a.queue_size.is_power_of_two() || !(2..=1024).contains(&a.queue_size) {
            return Err(format!(
                "--queue-size {} must be a power of two between 2 and 1024",
                a.queue_size
            ));
        }
        if let Some(m) = a.mtu {
            if m < 68 {
                return Err(format!("--mtu {m} is out of range 68-65535"));
            }
        }
        let mac = match a.mac {
            Some(s) => s.parse()?,
            None => Mac::random(),
        };
        let log_level = parse_level(&a.log_level)?;
        let ids = a.sandbox.check()?;
        #[cfg(feature = "jail-probe")]
        let jail_probe = a.jail_probe;
        #[cfg(not(feature = "jail-probe"))]
        let jail_probe = None;
        Ok(Config {
            listen,
            tap,
            mac,
            queue_pairs,
            queue_size: a.queue_size,
            mtu: a.mtu,
            log_level,
            sandbox: a.sandbox.sandbox,
            seccomp: a.sandbox.seccomp,
            ids,
            jail_probe,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn parse(argv: &[&str]) -> Result<Config, String> {
        let mut v = vec!["vhostbox-net"];
        v.extend_from_slice(argv);
        let a = Args::try_parse_from(v).map_err(|e| e.to_string())?;
        Config::try_from(a)
    }

    #[test]
    fn defaults_and_fds() {
        let c = parse(&["--socket-path", "/tmp/s", "--tap", "tap0"]).unwrap();
        assert_eq!(c.listen, ListenOn::Path("/tmp/s".into()));
        assert_eq!(c.tap, TapSource::Name("tap0".into()));
        assert_eq!(c.queue_pairs, 1);
        assert_eq!(c.queue_size, 256);
        assert_eq!(c.mtu, None);
        assert_eq!(c.mac.0[0] & 3, 2, "random MAC is local unicast: {}", c.mac);
        let c = parse(&["--fd", "3", "--tap-fd", "4,5", "--tap-fd", "6"]).unwrap();
        assert_eq!(c.tap, TapSource::Fds(vec![4, 5, 6]));
        assert_eq!(c.queue_pairs, 3);
        let c = parse(&["--fd", "3", "--tap", "t", "--mac", "52:54:00:AB:cd:0f"]).unwrap();
        assert_eq!(c.mac, Mac([0x52, 0x54, 0, 0xab, 0xcd, 0x0f]));
        assert_eq!(c.mac.to_string(), "52:54:00:ab:cd:0f");
    }

    #[test]
    fn rejects_bad_values() {
        let base = ["--socket-path", "/tmp/s", "--tap", "tap0"];
        for extra in [
            &["--queue-pairs", "0"][..],
            &["--queue-pairs", "33"],
            &["--queue-size", "100"],
            &["--queue-size", "2048"],
            &["--mtu", "67"],
            &["--mtu", "65536"],
            &["--mac", "52:54:00:12:34"],
            &["--mac", "52:54:00:12:34:5g"],
            &["--mac", "01:00:5e:00:00:01"],
            &["--mac", "00:00:00:00:00:00"],
            &["--mac", "525400123456"],
            &["--log-level", "loud"],
            &["--bogus"],
            &["--user", "0"],
        ] {
            let mut v = base.to_vec();
            v.extend_from_slice(extra);
            assert!(parse(&v).is_err(), "{extra:?} should be rejected");
        }
        assert!(parse(&["--tap", "t"]).is_err(), "no socket");
        assert!(parse(&["--socket-path", "/s"]).is_err(), "no tap");
        assert!(parse(&["--socket-path", "/s", "--tap", "t", "--tap-fd", "3"]).is_err());
        assert!(parse(&["--socket-path", "/s", "--tap", "0123456789abcdef"]).is_err());
        assert!(parse(&["--socket-path", "/s", "--tap", "a/b"]).is_err());
        assert!(parse(&["--socket-path", "/s", "--tap-fd", "3,3"]).is_err());
        assert!(parse(&[
            "--socket-path",
            "/s",
            "--tap-fd",
            "3,4",
            "--queue-pairs",
            "1"
        ])
        .is_err());
    }
}
