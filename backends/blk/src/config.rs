//! Validated configuration, built from [`Args`] so tests can make one without argv.

use std::path::PathBuf;
use std::time::Duration;

use log::LevelFilter;
use vhostbox_common::logging::parse_level;
use vhostbox_common::sandbox::{Ids, SandboxMode, SeccompMode};
use vhostbox_common::size::parse_size;

use crate::args::Args;
use crate::engine::EngineKind;
use crate::request::VIRTIO_BLK_ID_BYTES;

pub use vhostbox_common::daemon::ListenOn;

/// What backs the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backing {
    Image(PathBuf),
    Null(u64),
}

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: ListenOn,
    pub backing: Backing,
    pub readonly: bool,
    pub num_queues: u16,
    pub queue_size: u16,
    pub serial: [u8; VIRTIO_BLK_ID_BYTES],
    pub direct: bool,
    pub engine: EngineKind,
    /// The most a queue worker busy-polls before sleeping (zero: never).
    pub poll_max: Duration,
    pub logical_block_size: Option<u32>,
    pub writeback: bool,
    pub log_level: LevelFilter,
    pub sandbox: SandboxMode,
    pub seccomp: SeccompMode,
    /// The jailed worker's ids on the host.
    pub ids: Ids,
    /// Test builds: the escape the worker attempts after entering the jail.
    pub jail_probe: Option<String>,
}

/// The largest `--poll-max-us`.
pub const MAX_POLL_US: u32 = 1000;

/// The most queues a device may have (one worker thread each).
pub const MAX_QUEUES: u16 = 64;

impl TryFrom<Args> for Config {
    type Error = String;

    fn try_from(a: Args) -> Result<Self, String> {
        let listen = a.listen.to_listen_on()?;
        let backing = match (a.image, a.null) {
            (Some(p), None) => Backing::Image(p),
            (None, Some(s)) => Backing::Null(parse_size(&s).map_err(|e| format!("--null: {e}"))?),
            _ => return Err("exactly one of --image and --null is required".into()),
        };
        if a.num_queues == 0 || a.num_queues > MAX_QUEUES {
            return Err(format!(
                "--num-queues {} is out of range 1-{MAX_QUEUES}",
                a.num_queues
            ));
        }
        if !a.queue_size.is_power_of_two() || !(2..=1024).contains(&a.queue_size) {
            return Err(format!(
                "--queue-size {} must be a power of two between 2 and 1024",
                a.queue_size
            ));
        }
        let mut serial = [0u8; VIRTIO_BLK_ID_BYTES];
        if let Some(s) = a.serial {
            if s.len() > VIRTIO_BLK_ID_BYTES {
                return Err(format!(
                    "--serial '{s}' is {} bytes, at most {VIRTIO_BLK_ID_BYTES} fit",
                    s.len()
                ));
            }
            serial[..s.len()].copy_from_slice(s.as_bytes());
        }
        if let Some(bs) = a.logical_block_size {
            if bs != 512 && bs != 4096 {
                return Err(format!("--logical-block-size {bs} must be 512 or 4096"));
            }
        }
        let engine = a.engine.parse::<EngineKind>()?;
        if a.poll_max_us > MAX_POLL_US {
            return Err(format!(
                "--poll-max-us {} is out of range 0-{MAX_POLL_US}",
                a.poll_max_us
            ));
        }
        let log_level = parse_level(&a.log_level)?;
        let ids = a.sandbox.check()?;
        #[cfg(feature = "jail-probe")]
        let jail_probe = a.jail_probe;
        #[cfg(not(feature = "jail-probe"))]
        let jail_probe = None;
        Ok(Config {
            listen,
            backing,
            readonly: a.readonly,
            num_queues: a.num_queues,
            queue_size: a.queue_size,
            serial,
            direct: a.direct,
            engine,
            poll_max: Duration::from_micros(u64::from(a.poll_max_us)),
            logical_block_size: a.logical_block_size,
            writeback: !a.writethrough,
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
        let mut v = vec!["vhostbox-blk"];
        v.extend_from_slice(argv);
        let a = Args::try_parse_from(v).map_err(|e| e.to_string())?;
        Config::try_from(a)
    }

    #[test]
    fn defaults() {
        let c = parse(&["--socket-path", "/tmp/s", "--image", "/tmp/i"]).unwrap();
        assert_eq!(c.listen, ListenOn::Path("/tmp/s".into()));
        assert_eq!(c.backing, Backing::Image("/tmp/i".into()));
        assert_eq!(c.num_queues, 1);
        assert_eq!(c.queue_size, 256);
        assert_eq!(c.engine, EngineKind::IoUring);
        assert_eq!(c.poll_max, Duration::from_micros(50));
        assert!(c.writeback);
        assert_eq!(c.serial, [0; 20]);
    }

    #[test]
    fn null_with_suffix_and_fd() {
        let c = parse(&["--fd", "3", "--null", "8G", "--engine", "sync"]).unwrap();
        assert_eq!(c.listen, ListenOn::Fd(3));
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
    }
}
