//! Validated configuration, built from [`Args`] so tests can make one without argv.

use std::path::PathBuf;
use std::time::Duration;

use vhostbox_common::cli::{check_count, check_queue_size, CommonConfig, CommonError};
use vhostbox_common::size::{parse_size, SizeError};

use crate::args::Args;
use crate::engine::EngineKind;
use crate::request::VIRTIO_BLK_ID_BYTES;

pub use vhostbox_common::listener::ListenOn;

/// What backs the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backing {
    Image(PathBuf),
    Null(u64),
    Nbd(crate::nbd::NbdUri),
}

/// vhostbox-blk's own settings (the common ones are in [`CommonConfig`]).
#[derive(Debug, Clone)]
pub struct Config {
    pub backing: Backing,
    /// `--format`: None to probe.
    pub format: Option<crate::image::Format>,
    pub readonly: bool,
    pub num_queues: u16,
    pub queue_size: u16,
    pub serial: [u8; VIRTIO_BLK_ID_BYTES],
    pub direct: bool,
    pub engine: EngineKind,
    /// The most a queue busy-polls before its thread sleeps (zero: never).
    pub poll_max: Duration,
    pub logical_block_size: Option<u32>,
    pub writeback: bool,
    /// `--lock on`: QEMU-compatible image locks.
    pub lock: bool,
    /// `--limit-*`, in the order of [`crate::throttle::SETTINGS`] (0: unset).
    pub limits: [u64; 8],
}

/// The largest `--poll-max-us`.
pub const MAX_POLL_US: u32 = 1000;

/// The most queues a device may have (one queue thread each).
pub const MAX_QUEUES: u16 = 64;

/// Why the command line cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Common(#[from] CommonError),
    #[error("exactly one of --image, --nbd and --null is required")]
    Backing,
    #[error("--nbd: {0}")]
    Nbd(#[from] crate::nbd::UriError),
    #[error("--null")]
    NullSize(#[source] SizeError),
    #[error(transparent)]
    Count(#[from] vhostbox_common::cli::CountError),
    #[error(transparent)]
    QueueSize(#[from] vhostbox_common::cli::QueueSizeError),
    #[error("--serial '{0}' is {1} bytes, at most {VIRTIO_BLK_ID_BYTES} fit")]
    Serial(String, usize),
    #[error("--logical-block-size {0} must be 512 or 4096")]
    BlockSize(u32),
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineKindError),
    #[error("--format: {0}")]
    Format(#[from] crate::image::FormatError),
    #[error("--poll-max-us {0} is out of range 0-{MAX_POLL_US}")]
    PollMax(u32),
    #[error("--{0}")]
    LimitSize(&'static str, #[source] SizeError),
    #[error("--{0} {1} is more than the largest limit, {max}", max = vhostbox_common::settings::MAX_VALUE)]
    LimitRange(&'static str, u64),
}

impl TryFrom<Args> for (CommonConfig, Config) {
    type Error = ConfigError;

    fn try_from(a: Args) -> Result<Self, ConfigError> {
        let common = CommonConfig::try_from(a.common)?;
        let backing = match (a.image, a.null, a.nbd) {
            (Some(p), None, None) => Backing::Image(p),
            (None, Some(s), None) => Backing::Null(parse_size(&s).map_err(ConfigError::NullSize)?),
            (None, None, Some(u)) => Backing::Nbd(u.parse()?),
            _ => return Err(ConfigError::Backing),
        };
        let num_queues = check_count("--num-queues", a.num_queues, MAX_QUEUES)?;
        let queue_size = check_queue_size(a.queue_size)?;
        let mut serial = [0u8; VIRTIO_BLK_ID_BYTES];
        if let Some(s) = a.serial {
            if s.len() > VIRTIO_BLK_ID_BYTES {
                let n = s.len();
                return Err(ConfigError::Serial(s, n));
            }
            serial[..s.len()].copy_from_slice(s.as_bytes());
        }
        if let Some(bs) = a.logical_block_size {
            if bs != 512 && bs != 4096 {
                return Err(ConfigError::BlockSize(bs));
            }
        }
        let engine = a.engine.parse::<EngineKind>()?;
        if a.poll_max_us > MAX_POLL_US {
            return Err(ConfigError::PollMax(a.poll_max_us));
        }
        let bytes = |flag: &'static str, v: Option<String>| -> Result<u64, ConfigError> {
            v.map_or(Ok(0), |s| {
                parse_size(&s).map_err(|e| ConfigError::LimitSize(flag, e))
            })
        };
        let limits = [
            a.limit_iops.unwrap_or(0),
            a.limit_read_iops.unwrap_or(0),
            a.limit_write_iops.unwrap_or(0),
            bytes("limit-bps", a.limit_bps)?,
            bytes("limit-read-bps", a.limit_read_bps)?,
            bytes("limit-write-bps", a.limit_write_bps)?,
            a.limit_iops_burst.unwrap_or(0),
            bytes("limit-bps-burst", a.limit_bps_burst)?,
        ];
        for (v, d) in limits.iter().zip(crate::throttle::SETTINGS) {
            if *v > vhostbox_common::settings::MAX_VALUE {
                return Err(ConfigError::LimitRange(d.name, *v));
            }
        }
        let format = a.format.map(|f| f.parse()).transpose()?;
        let cfg = Config {
            backing,
            format,
            readonly: a.readonly,
            num_queues,
            queue_size,
            serial,
            direct: a.direct,
            engine,
            poll_max: Duration::from_micros(u64::from(a.poll_max_us)),
            logical_block_size: a.logical_block_size,
            writeback: !a.writethrough,
            lock: a.lock == "on",
            limits,
        };
        Ok((common, cfg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_both(argv: &[&str]) -> Result<(CommonConfig, Config), String> {
        vhostbox_common::cli::parse_argv::<Args, _>("vhostbox-blk", argv)
    }

    fn parse(argv: &[&str]) -> Result<Config, String> {
        parse_both(argv).map(|(_, c)| c)
    }

    #[test]
    fn defaults() {
        let (common, c) = parse_both(&["--socket-path", "/tmp/s", "--image", "/tmp/i"]).unwrap();
        assert_eq!(common.listen, ListenOn::Path("/tmp/s".into()));
        assert_eq!(c.backing, Backing::Image("/tmp/i".into()));
        assert_eq!(c.num_queues, 1);
        assert_eq!(c.queue_size, 256);
        assert_eq!(c.engine, EngineKind::IoUring);
        assert_eq!(c.poll_max, Duration::from_micros(50));
        assert!(c.writeback);
        assert_eq!(c.serial, [0; 20]);
        assert_eq!(c.limits, [0; 8]);
        assert_eq!(c.format, None);
        let c = parse(&["--socket-path", "/s", "--image", "/i", "--format", "qcow2"]).unwrap();
        assert_eq!(c.format, Some(crate::image::Format::Qcow2));
    }

    #[test]
    fn limits() {
        let c = parse(&[
            "--socket-path",
            "/s",
            "--null",
            "1G",
            "--limit-read-iops",
            "500",
            "--limit-write-bps",
            "10M",
            "--limit-bps-burst",
            "1M",
        ])
        .unwrap();
        assert_eq!(c.limits, [0, 500, 0, 0, 0, 10 << 20, 0, 1 << 20]);
    }

    #[test]
    fn null_with_suffix_and_fd() {
        let (common, c) = parse_both(&["--fd", "3", "--null", "8G", "--engine", "sync"]).unwrap();
        assert_eq!(common.listen, ListenOn::Fd(3));
        assert_eq!(c.backing, Backing::Null(8 << 30));
        assert_eq!(c.engine, EngineKind::Sync);
    }

    #[test]
    fn rejects_bad_values() {
        let base = ["--socket-path", "/tmp/s", "--image", "/tmp/i"];
        for extra in [
            &["--num-queues", "0"][..],
            &["--num-queues", "65"],
            &["--queue-size", "100"],
            &["--queue-size", "2048"],
            &["--serial", "012345678901234567890"],
            &["--logical-block-size", "1024"],
            &["--engine", "aio"],
            &["--poll-max-us", "1001"],
            &["--poll-max-us", "-1"],
            &["--log-level", "loud"],
            &["--bogus"],
            &["--sandbox", "vm"],
            &["--seccomp", "maybe"],
            &["--user", "no-such-user-here"],
            &["--user", "0"],
            &["--user", "x:y"],
            &["--limit-iops", "-5"],
            &["--limit-iops", "1e6"],
            &["--limit-bps", "10Q"],
            &["--limit-read-bps", "2000000T"],
            &["--limit-iops-burst", "x"],
            &["--format", "vmdk"],
            &["--format", "QCOW2"],
        ] {
            let mut v = base.to_vec();
            v.extend_from_slice(extra);
            assert!(parse(&v).is_err(), "{extra:?} should be rejected");
        }
        assert!(parse(&["--image", "/tmp/i"]).is_err(), "no socket");
        assert!(parse(&["--socket-path", "/s"]).is_err(), "no backing");
        assert!(parse(&["--socket-path", "/s", "--fd", "3", "--null", "1G"]).is_err());
        assert!(parse(&["--socket-path", "/s", "--image", "/i", "--null", "1G"]).is_err());
        assert!(parse(&["--socket-path", "/s", "--null", "1Q"]).is_err());
        assert!(parse(&["--socket-path", "/s", "--null", "1G", "--format", "raw"]).is_err());
        assert!(parse(&["--socket-path", "/s", "--nbd", "nbds://h/e"]).is_err());
        assert!(parse(&["--socket-path", "/s", "--nbd", "nbd://h", "--image", "/i"]).is_err());
        assert!(parse(&["--socket-path", "/s", "--nbd", "nbd://h", "--direct"]).is_err());
        let c = parse(&["--socket-path", "/s", "--nbd", "nbd://h:99/e"]).unwrap();
        assert!(matches!(c.backing, Backing::Nbd(ref u) if u.export == "e"));
    }
}
