//! Validated configuration, built from [`Args`] so tests can make one without argv.

use std::fmt;
use std::str::FromStr;

use vhostbox_common::cli::{check_count, check_queue_size, CommonConfig, CommonError};

use crate::args::Args;

pub use vhostbox_common::listener::ListenOn;

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

/// A `--mac` that cannot be a NIC's address.
#[derive(Debug, thiserror::Error)]
pub enum MacError {
    #[error("--mac '{0}' is not a MAC address like 52:54:00:12:34:56")]
    Syntax(String),
    #[error("--mac {0} is a multicast address; a NIC needs a unicast one")]
    Multicast(String),
    #[error("--mac {0} is the all-zero address")]
    Zero(String),
}

impl FromStr for Mac {
    type Err = MacError;

    fn from_str(s: &str) -> Result<Self, MacError> {
        let bad = || MacError::Syntax(s.to_owned());
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
            return Err(MacError::Multicast(s.to_owned()));
        }
        if b == [0; 6] {
            return Err(MacError::Zero(s.to_owned()));
        }
        Ok(Mac(b))
    }
}

/// vhostbox-net's own settings (the common ones are in [`CommonConfig`]).
#[derive(Debug, Clone)]
pub struct Config {
    pub tap: TapSource,
    pub mac: Mac,
    pub queue_pairs: u16,
    pub queue_size: u16,
    pub mtu: Option<u16>,
    /// `--offer-config`.
    pub offer_config: bool,
}

/// The most queue pairs: vhost-user-backend gives each thread a 64-bit queue mask, and each
/// pair is two queues.
pub const MAX_QUEUE_PAIRS: u16 = 32;

/// Why the command line cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Common(#[from] CommonError),
    #[error("--tap '{0}': an interface name is 1-{max} bytes", max = libc::IFNAMSIZ - 1)]
    TapNameLength(String),
    #[error("--tap '{0}' is not a valid interface name")]
    TapName(String),
    #[error("invalid --tap-fd {0}")]
    TapFd(i32),
    #[error("--tap-fd lists the same descriptor twice")]
    TapFdTwice,
    #[error("exactly one of --tap and --tap-fd is required")]
    TapSource,
    #[error("--queue-pairs {pairs} but {fds} --tap-fd descriptor(s): give one tap queue per pair")]
    PairsVsFds { pairs: u16, fds: usize },
    #[error(transparent)]
    Count(#[from] vhostbox_common::cli::CountError),
    #[error(transparent)]
    QueueSize(#[from] vhostbox_common::cli::QueueSizeError),
    #[error("--mtu {0} is out of range 68-65535")]
    Mtu(u16),
    #[error(transparent)]
    Mac(#[from] MacError),
}

fn tap_source(name: Option<String>, fds: Vec<i32>) -> Result<TapSource, ConfigError> {
    match (name, fds.is_empty()) {
        (Some(name), true) => {
            if name.is_empty() || name.len() >= libc::IFNAMSIZ {
                return Err(ConfigError::TapNameLength(name));
            }
            if name.contains(['/', ' ', '%']) || name == "." || name == ".." {
                return Err(ConfigError::TapName(name));
            }
            Ok(TapSource::Name(name))
        }
        (None, false) => {
            if let Some(&fd) = fds.iter().find(|&&fd| fd < 0) {
                return Err(ConfigError::TapFd(fd));
            }
            let mut seen = fds.clone();
            seen.sort_unstable();
            if seen.windows(2).any(|w| w[0] == w[1]) {
                return Err(ConfigError::TapFdTwice);
            }
            Ok(TapSource::Fds(fds))
        }
        _ => Err(ConfigError::TapSource),
    }
}

impl TryFrom<Args> for (CommonConfig, Config) {
    type Error = ConfigError;

    fn try_from(a: Args) -> Result<Self, ConfigError> {
        let common = CommonConfig::try_from(a.common)?;
        let tap = tap_source(a.tap, a.tap_fd)?;
        let queue_pairs = match (&tap, a.queue_pairs) {
            (TapSource::Fds(fds), Some(n)) if usize::from(n) != fds.len() => {
                return Err(ConfigError::PairsVsFds {
                    pairs: n,
                    fds: fds.len(),
                })
            }
            (TapSource::Fds(fds), _) => u16::try_from(fds.len()).unwrap_or(u16::MAX),
            (TapSource::Name(_), n) => n.unwrap_or(1),
        };
        let queue_pairs = check_count("--queue-pairs", queue_pairs, MAX_QUEUE_PAIRS)?;
        let queue_size = check_queue_size(a.queue_size)?;
        if let Some(m) = a.mtu.filter(|&m| m < 68) {
            return Err(ConfigError::Mtu(m));
        }
        let mac = match a.mac {
            Some(s) => s.parse()?,
            None => Mac::random(),
        };
        let cfg = Config {
            tap,
            mac,
            queue_pairs,
            queue_size,
            mtu: a.mtu,
            offer_config: a.offer_config,
        };
        Ok((common, cfg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_both(argv: &[&str]) -> Result<(CommonConfig, Config), String> {
        vhostbox_common::cli::parse_argv::<Args, _>("vhostbox-net", argv)
    }

    fn parse(argv: &[&str]) -> Result<Config, String> {
        parse_both(argv).map(|(_, c)| c)
    }

    #[test]
    fn defaults_and_fds() {
        let (common, c) = parse_both(&["--socket-path", "/tmp/s", "--tap", "tap0"]).unwrap();
        assert_eq!(common.listen, ListenOn::Path("/tmp/s".into()));
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
