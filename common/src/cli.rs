//! The flags every backend has, and their validation. A backend's own `Args` flattens
//! [`CommonArgs`]; its `Config` holds the [`CommonConfig`] made from them.

use log::LevelFilter;

use crate::listener::{ListenArgs, ListenError, ListenOn, SocketPerms};
use crate::logging::{parse_level, LevelError};
use crate::sandbox::{Ids, SandboxArgs, SandboxMode, SeccompMode, UserError};

/// Flags of every backend: where to listen, logging, the jail.
#[derive(Debug, Clone, clap::Args)]
pub struct CommonArgs {
    #[command(flatten)]
    pub listen: ListenArgs,

    /// Print what this backend supports as JSON (QEMU's vhost-user.json convention, for
    /// libvirt and other management tools) and exit.
    #[arg(long)]
    pub print_capabilities: bool,

    /// Log level: off, error, warn, info, debug, trace. VHOSTBOX_LOG overrides it.
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    pub log_level: String,

    #[command(flatten)]
    pub sandbox: SandboxArgs,

    /// Serve metrics (OpenMetrics text, HTTP GET /metrics) on HOST:PORT or unix:PATH. Off by
    /// default.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<crate::control::MetricsAddr>,

    /// Hand the socket --socket-path binds to systemd's file descriptor store (FDSTORE=1,
    /// with FileDescriptorStoreMax= in the unit), so a restarted service gets the same socket
    /// back in LISTEN_FDS and the path is left in place at exit. Implied when systemd sets
    /// $FDSTORE (systemd 254 and later).
    #[arg(long)]
    pub fd_store: bool,

    /// Serve the control socket (one JSON request per line; see vhostboxctl) at PATH. It gets
    /// the vhost-user socket's --socket-group and --socket-mode.
    #[arg(long, value_name = "PATH")]
    pub control: Option<std::path::PathBuf>,

    /// Test builds only: after entering the jail, the worker attempts this escape and reports
    /// the outcome (see docs/security.md).
    #[cfg(feature = "jail-probe")]
    #[arg(long, value_name = "ATTEMPT", hide = true)]
    pub jail_probe: Option<String>,

    /// Test builds only: leave these jail layers out (comma-separated: landlock, dumpable,
    /// rlimit-nofile, rlimit-nproc, rlimit-fsize, rlimit-memlock, uring-restrictions, cgroup),
    /// to show that a probe stopped with the layer succeeds without it.
    #[cfg(feature = "jail-probe")]
    #[arg(long, value_name = "LAYERS", hide = true, value_delimiter = ',')]
    pub jail_probe_without: Vec<String>,
}

/// Why the common flags are not usable.
#[derive(Debug, thiserror::Error)]
pub enum CommonError {
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error(transparent)]
    LogLevel(#[from] LevelError),
    #[error(transparent)]
    User(#[from] UserError),
}

/// The validated common flags.
#[derive(Debug, Clone)]
pub struct CommonConfig {
    pub listen: ListenOn,
    /// `--socket-group`, `--socket-mode` for a socket bound here.
    pub socket_perms: SocketPerms,
    pub log_level: LevelFilter,
    pub sandbox: SandboxMode,
    pub seccomp: SeccompMode,
    /// The jailed worker's ids on the host.
    pub ids: Ids,
    /// Per-worker cgroup limits (none asked: no cgroups are made).
    pub cgroup_limits: crate::sandbox::cgroup::CgroupLimits,
    /// `--metrics`: where the supervisor serves metrics.
    pub metrics: Option<crate::control::MetricsAddr>,
    /// `--control`: the control socket's path.
    pub control: Option<std::path::PathBuf>,
    /// `--fd-store`, or `$FDSTORE` set by systemd: store the bound socket there.
    pub fd_store: bool,
    /// Test builds: the escape the worker attempts after entering the jail.
    pub jail_probe: Option<String>,
    /// Test builds: jail layers left out.
    #[cfg(feature = "jail-probe")]
    pub jail_probe_without: Vec<String>,
}

impl TryFrom<CommonArgs> for CommonConfig {
    type Error = CommonError;

    fn try_from(a: CommonArgs) -> Result<Self, CommonError> {
        #[cfg(feature = "jail-probe")]
        let jail_probe = a.jail_probe;
        #[cfg(not(feature = "jail-probe"))]
        let jail_probe = None;
        Ok(CommonConfig {
            listen: a.listen.to_listen_on()?,
            socket_perms: a.listen.perms()?,
            log_level: parse_level(&a.log_level)?,
            ids: a.sandbox.check()?,
            cgroup_limits: a.sandbox.cgroup_limits()?,
            sandbox: a.sandbox.sandbox,
            seccomp: a.sandbox.seccomp,
            metrics: a.metrics,
            control: a.control,
            fd_store: a.fd_store
                || std::env::var("FDSTORE")
                    .ok()
                    .and_then(|v| v.parse::<u32>().ok())
                    .is_some_and(|n| n > 0),
            jail_probe,
            #[cfg(feature = "jail-probe")]
            jail_probe_without: a.jail_probe_without,
        })
    }
}

/// The largest queue any backend offers.
pub const MAX_QUEUE_SIZE: u16 = 1024;

/// A `--queue-size` that is not a power of two between 2 and [`MAX_QUEUE_SIZE`].
#[derive(Debug, thiserror::Error)]
#[error("--queue-size {0} must be a power of two between 2 and {MAX_QUEUE_SIZE}")]
pub struct QueueSizeError(pub u16);

/// Checks `--queue-size`.
pub fn check_queue_size(n: u16) -> Result<u16, QueueSizeError> {
    if n.is_power_of_two() && (2..=MAX_QUEUE_SIZE).contains(&n) {
        Ok(n)
    } else {
        Err(QueueSizeError(n))
    }
}

/// A count flag (`--num-queues`, `--queue-pairs`) outside `1..=max`.
#[derive(Debug, thiserror::Error)]
#[error("{flag} {value} is out of range 1-{max}")]
pub struct CountError {
    pub flag: &'static str,
    pub value: u16,
    pub max: u16,
}

/// Checks a count flag.
pub fn check_count(flag: &'static str, value: u16, max: u16) -> Result<u16, CountError> {
    if (1..=max).contains(&value) {
        Ok(value)
    } else {
        Err(CountError { flag, value, max })
    }
}

/// Test support: parses `argv` (without the program name) into a backend's args and
/// validates them into `C`, every error as text.
#[cfg(any(test, feature = "test-utils"))]
pub fn parse_argv<A, C>(name: &str, argv: &[&str]) -> Result<C, String>
where
    A: clap::Parser,
    C: TryFrom<A>,
    C::Error: std::fmt::Display,
{
    let args = A::try_parse_from(std::iter::once(name).chain(argv.iter().copied()))
        .map_err(|e| e.to_string())?;
    C::try_from(args).map_err(|e| e.to_string())
}
