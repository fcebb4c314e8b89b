//! The one launcher every backend runs under.
//!
//! A backend describes its device with the [`Device`] trait: its command line, what the
//! supervisor opens with its privileges (an image, a tap), what a worker builds before it gives
//! them up (io_uring rings, eventfds, the per-connection vhost-user backend) and its part of the
//! seccomp allow-list. [`main`] does the rest, the same for every backend:
//!
//! 1. parse and validate the command line (usage errors exit 2), start logging;
//! 2. bind the socket (or take `--fd`), then let the device open what it needs;
//! 3. supervise: fork one worker per frontend connection, and a fresh one when it ends or dies
//!    ([`crate::sandbox::supervisor`]);
//! 4. in each worker: build the device, make the relay, enter the jail (skipped with
//!    `--sandbox none`, which changes nothing else), then serve exactly one connection
//!    ([`crate::connection`]) and exit.
//!
//! So every connection starts from a process that no earlier frontend has touched, in every
//! sandbox mode, and no code exists for an in-process loop over connections.

use std::os::fd::RawFd;

use clap::Parser;
use log::{error, info, warn};
use vhost_user_backend::{VhostUserBackend, VringRwLock};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::cli::CommonConfig;
use crate::connection::{self, Drainer};
use crate::listener::VhostListener;
use crate::relay::{Hook, Relay};
use crate::sandbox::seccomp::Rules;
use crate::sandbox::supervisor::{self, EmptyDir, WorkerCtx, EXIT_JAIL_FAILED};
use crate::sandbox::{self, JailConfig, SandboxMode};
use crate::{error_chain, EXIT_USAGE};

/// Guest memory as the backends map it, each region with its dirty-page log
/// ([`crate::dirty`]).
pub type GuestMem = GuestMemoryMmap<crate::dirty::DirtyLog>;

/// The connection's guest memory: the frontend's current table, replaced as it changes.
pub type GuestMemHandle = GuestMemoryAtomic<GuestMem>;

/// A vring over the connection's guest memory.
pub type GuestVring = VringRwLock<GuestMemHandle>;

/// Resource limits of a worker, which depend on the device.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// RLIMIT_NOFILE: fds the worker may hold (its own plus what a frontend sends).
    pub nofile: u64,
    /// RLIMIT_NPROC: tasks (threads) the worker may have.
    pub nproc: u64,
    /// RLIMIT_FSIZE: largest file offset the worker may write.
    pub fsize: u64,
}

/// An fd of the device to watch in a queue thread's epoll, besides the kick eventfds.
#[derive(Debug, Clone, Copy)]
pub struct Watch {
    /// Which queue thread.
    pub thread: usize,
    pub fd: RawFd,
    pub events: EventSet,
    /// The event id `handle_event` sees (greater than the number of queues).
    pub id: u64,
}

/// A device's side of one connection, built in the worker before the jail.
pub struct Connection<B> {
    /// The vhost-user backend the library drives.
    pub backend: B,
    /// Every fd the worker must keep in the jail (what the device opened, rings, eventfds).
    pub fds: Vec<RawFd>,
    /// Sees each frontend message before the library (see [`crate::relay`]).
    pub hook: Option<Box<dyn Hook>>,
    /// Fds to add to the queue threads' epolls.
    pub watch: Vec<Watch>,
    /// Runs on SIGTERM, before the frontend is cut off: completes what is in flight.
    pub drain: Option<Drainer>,
    /// What `drain` needs beyond the signal thread's own allow-list
    /// ([`crate::sandbox::seccomp::signal_rules`]).
    pub drain_rules: Rules,
    /// What the heartbeat thread needs beyond its own allow-list
    /// ([`crate::sandbox::seccomp::heartbeat_rules`]) to run the device's config-change hook
    /// ([`crate::sandbox::supervisor::on_config_change`]): blk's qcow2 grows its image there.
    pub config_rules: Rules,
    /// Runs when the connection is over (a summary for the log).
    pub finished: Option<Box<dyn FnOnce() + Send>>,
    /// Test builds: what the device lends the jail probes (its ring, its backing file).
    #[cfg(feature = "jail-probe")]
    pub probe: crate::sandbox::probe::ProbeKit,
}

impl<B> Connection<B> {
    /// A connection with nothing but the backend.
    pub fn new(backend: B) -> Self {
        Connection {
            backend,
            fds: Vec::new(),
            hook: None,
            watch: Vec::new(),
            drain: None,
            drain_rules: Vec::new(),
            config_rules: Vec::new(),
            finished: None,
            #[cfg(feature = "jail-probe")]
            probe: Default::default(),
        }
    }
}

/// What a backend binary is: everything that is not common to all of them.
pub trait Device: Sized {
    /// The program's name, for logs and errors.
    const NAME: &'static str;
    /// The flag that sets the number of queues, for errors about a frontend that wants more
    /// (e.g. "--num-queues").
    const QUEUES_FLAG: &'static str = "";
    /// Rings per unit of that flag (net: 2, an RX and a TX ring per queue pair).
    const RINGS_PER_QUEUE: u32 = 1;
    /// What `--print-capabilities` prints: a VHostUserBackendCapabilities of QEMU's
    /// docs/interop/vhost-user.json, one line of JSON.
    const CAPABILITIES: &'static str;
    /// The per-queue series the device counts in [`crate::metrics::Page`] (`--metrics`).
    const METRICS: &'static [crate::metrics::Def] = &[];
    /// What `set-limits` can change at run time ([`crate::settings`]); none by default.
    const SETTINGS: &'static [crate::settings::Setting] = &[];
    /// The command line (a clap parser that flattens [`crate::cli::CommonArgs`]).
    type Args: Parser;
    /// Why the command line cannot be used.
    type ConfigError: std::error::Error;
    /// What the supervisor opens with its privileges and keeps for its whole life.
    type Opened;
    /// Why opening failed (a usage error: exit status 2).
    type OpenError: std::error::Error;
    /// Why a worker could not build its connection (it then exits, and the supervisor gives
    /// up: a replacement would fail the same way).
    type BuildError: std::error::Error;
    /// The vhost-user backend of one connection.
    type Backend: VhostUserBackend<Bitmap = crate::dirty::DirtyLog, Vring = crate::launch::GuestVring>
        + Clone
        + 'static;

    /// Validates the command line.
    fn configure(args: Self::Args) -> Result<(CommonConfig, Self), Self::ConfigError>;

    /// In the supervisor, with its privileges, before any worker exists.
    fn open(&self) -> Result<Self::Opened, Self::OpenError>;

    /// Blocks of counters in the metrics page: queues (blk), queue pairs (net).
    /// `resize` on `--control`, in the supervisor: the new size in bytes (None: re-read the
    /// backing's), whether shrinking is allowed; the old and new size. The workers are told
    /// by the supervisor (see `sandbox::supervisor::on_config_change`).
    fn resize(
        &self,
        _opened: &Self::Opened,
        _size: Option<u64>,
        _force: bool,
    ) -> Result<(u64, u64), String> {
        Err(format!("{} has no disk to resize", Self::NAME))
    }

    /// In the supervisor, before each worker is forked: what the worker needs made with the
    /// supervisor's reach (blk: connections to an NBD server, which the jail cannot make). An
    /// error is logged and retried with back-off; the frontend waits.
    fn prepare_worker(&self, _opened: &Self::Opened) -> Result<(), String> {
        Ok(())
    }

    /// In the supervisor, right after each worker was forked: drop what `prepare_worker`
    /// made (the worker has its copies).
    fn worker_spawned(&self, _opened: &Self::Opened) {}

    /// Whether a build error means the backing store went away (a new worker, with a new
    /// connection, may succeed) rather than a setup that can never work.
    fn build_retryable(_e: &Self::BuildError) -> bool {
        false
    }

    /// The values of [`Self::SETTINGS`] the command line gave, in order.
    fn initial_settings(&self) -> Vec<u64> {
        Vec::new()
    }

    fn metric_queues(&self) -> usize {
        1
    }

    /// The worker's resource limits.
    fn limits(&self, opened: &Self::Opened) -> Limits;

    /// The worker's seccomp allow-list (the device part added to
    /// [`crate::sandbox::seccomp::transport_rules`]).
    fn seccomp(&self, opened: &Self::Opened, own_pid: u32) -> Rules;

    /// In a fresh worker, still privileged: everything the connection needs that cannot be
    /// made in the jail. `mem` is the guest memory the library will fill in.
    fn build(
        &self,
        opened: &Self::Opened,
        mem: &GuestMemHandle,
    ) -> Result<Connection<Self::Backend>, Self::BuildError>;
}

/// The whole program: parse, open, supervise. Returns the exit status.
pub fn main<D: Device>() -> i32 {
    // Before the parse: the vhost-user convention is that it works with no other flag, while
    // the device's own flags are required otherwise.
    if std::env::args_os()
        .skip(1)
        .any(|a| a == "--print-capabilities")
    {
        println!("{}", D::CAPABILITIES);
        return 0;
    }
    let args = D::Args::parse();
    // Test-only switches are read here: the jail clears the environment.
    crate::dirty::read_test_switch();
    let (common, dev) = match D::configure(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{}: {}", D::NAME, error_chain(&e));
            return EXIT_USAGE;
        }
    };
    crate::logging::init(D::NAME, common.log_level);
    run(&common, &dev)
}

/// Opens what is privileged and supervises workers until SIGTERM, SIGINT or SIGHUP.
pub fn run<D: Device>(common: &CommonConfig, dev: &D) -> i32 {
    connection::block_shutdown_signals();
    #[cfg(feature = "jail-probe")]
    crate::sandbox::probe::set_without(&common.jail_probe_without);
    // Everything privileged first, before anything a sandbox would forbid. The endpoints
    // before the vhost-user socket: once that exists, so do they.
    let server = match service_endpoints(common, dev.metric_queues()) {
        Ok(s) => s,
        Err(e) => return usage(D::NAME, &e),
    };
    if !D::SETTINGS.is_empty() {
        if let Err(e) = crate::settings::Settings::install(D::SETTINGS, &dev.initial_settings()) {
            error!("cannot map the settings page: {e}");
            return 1;
        }
    }
    let mut listener = match VhostListener::open(&common.listen, common.socket_perms) {
        Ok(l) => l,
        Err(e) => return usage(D::NAME, &e),
    };
    if common.fd_store && matches!(common.listen, crate::listener::ListenOn::Path(_)) {
        let stored = crate::service::Notifier::from_env()
            .store_fd(listener.raw_fd(), crate::listener::ACTIVATED_NAME);
        if stored {
            info!("the socket is in the service manager's fd store: a restart keeps it");
            listener.keep_path_at_exit();
        } else {
            warn!("--fd-store: no service manager (NOTIFY_SOCKET) took the socket");
        }
    }
    let opened = match dev.open() {
        Ok(o) => o,
        Err(e) => return usage(D::NAME, &e),
    };
    if let Some(a) = server.as_ref().and_then(|s| s.metrics_addr()) {
        info!("serving metrics on {a}");
    }
    match &common.listen {
        crate::listener::ListenOn::Activated { fd, name } => {
            info!("listening on the socket systemd passed: fd {fd} ('{name}')")
        }
        crate::listener::ListenOn::Fd(fd) => info!("listening on inherited fd {fd}"),
        crate::listener::ListenOn::Path(_) => {
            if let Some((line, warning)) = listener.access_summary() {
                info!("{line}");
                if let Some(w) = warning {
                    warn!("{w}");
                }
            }
        }
    }
    if common.sandbox == SandboxMode::None {
        warn!(
            "*** --sandbox none: the workers run UNCONFINED, with all the privileges of this \
             user ***"
        );
    }
    let chroot_dir = match EmptyDir::for_mode(common.sandbox) {
        Ok(d) => d,
        Err(e) => {
            error!("cannot create the empty chroot directory: {e}");
            return 1;
        }
    };
    let limits = dev.limits(&opened);
    let cgroups = if crate::sandbox::layer_removed("cgroup") {
        None
    } else {
        match crate::sandbox::cgroup::Cgroups::setup(common.cgroup_limits) {
            Ok(c) => c,
            Err(e) => return usage(D::NAME, &e),
        }
    };
    let jail = JailConfig {
        mode: common.sandbox,
        seccomp: common.seccomp,
        ids: common.ids,
        chroot_dir: chroot_dir.as_ref().map(|d| d.0.clone()),
        nofile: limits.nofile,
        nproc: limits.nproc,
        fsize: limits.fsize,
        cgroups,
    };
    // Only for syscall names in the supervisor's messages.
    let names = dev.seccomp(&opened, 1);
    let resize: supervisor::ResizeFn<'_> = Box::new(|size, force| {
        let (old, new) = dev.resize(&opened, size, force)?;
        Ok(supervisor::Resized {
            old,
            new,
            fsize: dev.limits(&opened).fsize,
        })
    });
    let service = supervisor::Service {
        name: D::NAME,
        defs: D::METRICS,
        queues: dev.metric_queues(),
        server,
        resize: Some(resize),
        prepare: Some(Box::new(|| dev.prepare_worker(&opened))),
        spawned: Some(Box::new(|| dev.worker_spawned(&opened))),
    };
    let code = supervisor::supervise(&jail, &names, service, |ctx| {
        worker(dev, &opened, &jail, &listener, common, ctx)
    });
    drop(chroot_dir);
    match listener.remove() {
        Ok(()) => code,
        Err(e) => {
            error!("{}", error_chain(&e));
            if code == 0 {
                crate::EXIT_SOCKET_LEFT
            } else {
                code
            }
        }
    }
}

/// Why the metrics page or an endpoint could not be set up.
#[derive(Debug, thiserror::Error)]
enum EndpointError {
    #[error("cannot map the metrics page")]
    Page(#[source] std::io::Error),
    #[error(transparent)]
    Serve(#[from] crate::control::ServeError),
}

/// The metrics page (before any worker exists, so that every worker shares it) and the
/// `--metrics` / `--control` endpoints, when asked for.
fn service_endpoints(
    common: &CommonConfig,
    queues: usize,
) -> Result<Option<crate::control::Server>, EndpointError> {
    if common.metrics.is_none() && common.control.is_none() {
        return Ok(None);
    }
    crate::metrics::Page::install(queues).map_err(EndpointError::Page)?;
    Ok(crate::control::Server::open(
        common.metrics.as_ref(),
        common.control.as_deref(),
        common.socket_perms,
    )?)
}

fn usage(name: &str, e: &dyn std::error::Error) -> i32 {
    eprintln!("{name}: {}", error_chain(e));
    EXIT_USAGE
}

/// The device's rings and what it was started with, for the relay's refusals.
fn ring_limit<D: Device>(backend: &D::Backend) -> crate::relay::RingLimit {
    let count = backend.num_queues() as u32;
    let started_with = match D::QUEUES_FLAG {
        "" => format!("{} with {count} queue(s)", D::NAME),
        f => format!("{} {f} {}", D::NAME, count / D::RINGS_PER_QUEUE.max(1)),
    };
    crate::relay::RingLimit {
        count,
        started_with,
    }
}

/// One worker process: build, jail, serve one connection. Returns its exit status.
fn worker<D: Device>(
    dev: &D,
    opened: &D::Opened,
    jail: &JailConfig,
    listener: &VhostListener,
    common: &CommonConfig,
    ctx: WorkerCtx,
) -> i32 {
    // One malloc arena for the whole worker. With an arena per thread, glibc reads
    // /proc/sys/vm/overcommit_memory the first time it shrinks a thread's heap: in the jail
    // that openat is a seccomp kill (found by the RLIMIT_NPROC layer test, with 100 threads).
    // The datapath allocates nothing per request, so one arena costs nothing measurable.
    // SAFETY: mallopt with an integer option, before any other thread exists.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let conn = match dev.build(opened, &mem) {
        Ok(c) => c,
        Err(e) => {
            error!("cannot set up the device: {}", error_chain(&e));
            if D::build_retryable(&e) {
                return supervisor::EXIT_BACKING_LOST;
            }
            return EXIT_JAIL_FAILED;
        }
    };
    let relay = match Relay::new() {
        Ok(r) => r.limit_rings(ring_limit::<D>(&conn.backend)),
        Err(e) => {
            error!("cannot set up the vhost-user relay: {e}");
            return EXIT_JAIL_FAILED;
        }
    };
    let mut keep = vec![listener.raw_fd(), ctx.report_fd];
    keep.extend(relay.fds());
    keep.extend(&conn.fds);
    sandbox::seccomp::set_report_fd(ctx.report_fd);
    // SAFETY: getpid has no arguments.
    let pid = unsafe { libc::getpid() } as u32;
    if let Err(e) = sandbox::enter(jail, &keep, dev.seccomp(opened, pid)) {
        error!("cannot enter the sandbox: {}", error_chain(&e));
        return EXIT_JAIL_FAILED;
    }
    #[cfg(feature = "jail-probe")]
    let mut conn = conn;
    #[cfg(feature = "jail-probe")]
    if let Some(p) = &common.jail_probe {
        // Only the first worker probes, so its replacement shows the device still works;
        // `seccomp-after=N` arms every worker instead.
        if !crate::sandbox::probe::arm_crash(p) && ctx.generation == 1 {
            return crate::sandbox::probe::run(p, &mut conn.probe);
        }
    }
    #[cfg(not(feature = "jail-probe"))]
    let _ = (&common.jail_probe, ctx.generation);
    match connection::serve(D::NAME, listener, relay, conn, mem) {
        Ok(()) => 0,
        Err(e) => {
            error!("{}", error_chain(&e));
            1
        }
    }
}
