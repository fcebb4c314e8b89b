//! vhostbox-blk: a virtio-blk device backend over vhost-user.
//!
//! Only the device lives here; the launcher, the supervisor, the jail and the vhost-user
//! relay are vhostbox-common's. Layers, from the bottom: [`disk`] (the backing store),
//! [`engine`] (how I/O is carried out: io_uring or synchronous), [`request`] (parsing a
//! descriptor chain), [`queue`] (one queue's loop: pass, poll, complete; free of vhost-user
//! types), [`device`] (the vhost-user glue: features, config space, event routing).

pub mod args;
pub mod config;
pub mod device;
pub mod disk;
pub mod engine;
pub mod image;
pub mod lock;
pub mod nbd;
pub mod queue;
pub mod request;
pub mod seccomp;
pub mod stats;
pub mod throttle;

use std::io;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use vmm_sys_util::epoll::EventSet;

use vhostbox_common::cli::CommonConfig;
use vhostbox_common::inflight::{InflightFd, InflightHook, InflightSlot};
use vhostbox_common::launch::{self, Connection, GuestMemHandle, Limits, Watch};
use vhostbox_common::poll::AdaptivePoll;
use vhostbox_common::sandbox::seccomp::Rules;

use config::{Backing, Config};
use device::{BlkBackend, DeviceConfig};
use disk::{Disk, DiskError};
use engine::{Engine, EngineKind, SyncEngine, UringEngine};
use queue::{BlkQueue, Shared};

/// Why a worker could not set up its device.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot set up io_uring")]
    Uring(#[source] io::Error),
    #[error("cannot make the in-flight region")]
    Inflight(#[source] io::Error),
    #[error("cannot make the I/O limits' timer")]
    Timer(#[source] io::Error),
    #[error("cannot open the qcow2 image")]
    Image(#[source] io::Error),
    #[error("cannot set up the NBD connections")]
    Nbd(#[source] io::Error),
}

/// vhostbox-blk as the launcher runs it.
pub struct Blk {
    pub cfg: Config,
}

impl launch::Device for Blk {
    const NAME: &'static str = "vhostbox-blk";
    const QUEUES_FLAG: &'static str = "--num-queues";
    const CAPABILITIES: &'static str = r#"{"type":"block","features":["read-only","blk-file"]}"#;
    const METRICS: &'static [vhostbox_common::metrics::Def] = stats::METRICS;
    const SETTINGS: &'static [vhostbox_common::settings::Setting] = throttle::SETTINGS;
    type Args = args::Args;
    type ConfigError = config::ConfigError;
    type Opened = Arc<Shared>;
    type OpenError = DiskError;
    type BuildError = BuildError;
    type Backend = Arc<BlkBackend>;

    fn configure(args: args::Args) -> Result<(CommonConfig, Self), config::ConfigError> {
        let (common, cfg) = <(CommonConfig, Config)>::try_from(args)?;
        Ok((common, Blk { cfg }))
    }

    fn open(&self) -> Result<Arc<Shared>, DiskError> {
        let cfg = &self.cfg;
        let disk = match &cfg.backing {
            Backing::Image(p) => {
                let disk = Disk::open_as(
                    p,
                    cfg.readonly,
                    cfg.direct,
                    cfg.logical_block_size,
                    cfg.format,
                    cfg.lock,
                )?;
                match (cfg.lock, disk.file()) {
                    (true, Some(file)) => {
                        let how = lock::lock_path(p, file, cfg.readonly)?;
                        log::info!("image {}: {how}", p.display());
                    }
                    _ => log::warn!(
                        "image {}: not locked (--lock off): nothing stops QEMU, qemu-img or \
                         another backend from writing it at the same time",
                        p.display()
                    ),
                }
                disk
            }
            Backing::Null(size) => {
                Disk::null(*size, cfg.logical_block_size.unwrap_or(512), cfg.readonly)?
            }
            Backing::Nbd(uri) => Disk::nbd(
                uri,
                cfg.readonly,
                cfg.logical_block_size.unwrap_or(512),
                usize::from(cfg.num_queues),
            )?,
        };
        log::info!(
            "{} {} bytes ({} sectors, block size {}), {} queue(s) of {}, engine {:?}{}",
            match &cfg.backing {
                Backing::Image(p) => format!(
                    "image {} ({}{})",
                    p.display(),
                    disk.format,
                    disk.chain()
                        .map(|(p, f)| format!(" over {} ({f})", p.display()))
                        .collect::<String>()
                ),
                Backing::Null(_) => "null device".to_string(),
                Backing::Nbd(_) => disk.nbd_summary().unwrap_or_default(),
            },
            disk.size(),
            disk.sectors(),
            disk.block_size,
            cfg.num_queues,
            cfg.queue_size,
            cfg.engine,
            if cfg.readonly { ", read-only" } else { "" }
        );
        Ok(Arc::new(Shared {
            disk,
            serial: cfg.serial,
            writeback: AtomicBool::new(cfg.writeback),
            stats: Default::default(),
            throttle: throttle::Throttle::new(&cfg.limits),
        }))
    }

    fn resize(
        &self,
        shared: &Arc<Shared>,
        size: Option<u64>,
        force: bool,
    ) -> Result<(u64, u64), String> {
        shared
            .disk
            .resize(size, force)
            .map_err(|e| vhostbox_common::error_chain(&e))
    }

    fn prepare_worker(&self, shared: &Arc<Shared>) -> Result<(), String> {
        shared.disk.nbd_prepare()
    }

    fn worker_spawned(&self, shared: &Arc<Shared>) {
        shared.disk.nbd_spawned()
    }

    fn build_retryable(e: &BuildError) -> bool {
        matches!(e, BuildError::Nbd(_))
    }

    fn initial_settings(&self) -> Vec<u64> {
        self.cfg.limits.to_vec()
    }

    fn metric_queues(&self) -> usize {
        usize::from(self.cfg.num_queues)
    }

    fn limits(&self, shared: &Arc<Shared>) -> Limits {
        let nq = u64::from(self.cfg.num_queues);
        Limits {
            // Own fds plus what a frontend sends: memory regions (up to 509 slots) and three
            // eventfds per queue.
            nofile: 600 + 8 * nq,
            // main, signal, relay, vhost-user and one queue thread per queue, plus slack, plus
            // the kernel's io-wq threads that run blocking io_uring work on the worker's
            // behalf: they count against RLIMIT_NPROC too, and a ring that cannot start one
            // fails the request (the guest would see IOERR). io-wq starts at most 4 per CPU
            // per ring for bounded work.
            nproc: 8 + nq * (1 + 4 * ncpus()),
            fsize: fsize(&shared.disk),
        }
    }

    fn seccomp(&self, shared: &Arc<Shared>, own_pid: u32) -> Rules {
        seccomp::rules(shared.disk.kind, shared.disk.format, own_pid)
    }

    fn build(
        &self,
        shared: &Arc<Shared>,
        mem: &GuestMemHandle,
    ) -> Result<Connection<Arc<BlkBackend>>, BuildError> {
        let cfg = &self.cfg;
        // The rings and the in-flight region cannot be made in the jail.
        let inflight =
            InflightFd::new(cfg.num_queues, cfg.queue_size).map_err(BuildError::Inflight)?;
        let slot = Arc::new(InflightSlot::default());
        let mut fds: Vec<i32> = shared.disk.fd().into_iter().collect();
        // A qcow2 chain is opened here, from the supervisor's fds, so that it reads the
        // metadata as a previous worker left it.
        fds.extend(shared.disk.open_format().map_err(BuildError::Image)?);
        // NBD: the handshake on the sockets the supervisor connected for this worker.
        fds.extend(shared.disk.nbd_open().map_err(BuildError::Nbd)?);
        fds.push(inflight.raw_fd());
        let mut watch = Vec::new();
        let mut queues = Vec::with_capacity(usize::from(cfg.num_queues));
        for i in 0..cfg.num_queues {
            let engine = make_engine(shared, cfg.engine, cfg.queue_size, usize::from(i))
                .map_err(BuildError::Uring)?;
            if let Some(e) = &engine {
                fds.extend(e.fds());
                if let Some(fd) = e.completion_fd() {
                    watch.push(Watch {
                        thread: usize::from(i),
                        fd,
                        events: EventSet::IN,
                        id: u64::from(BlkBackend::completion_event(cfg.num_queues)),
                    });
                }
            }
            let mut q = BlkQueue::new(
                shared.clone(),
                engine,
                usize::from(i),
                cfg.queue_size,
                mem.clone(),
            );
            q.poll = AdaptivePoll::new(cfg.poll_max);
            // The I/O limits' wake-up: made here, where timerfd_create is still allowed.
            let timer = queue::Timer::new().map_err(BuildError::Timer)?;
            fds.push(timer.raw_fd());
            watch.push(Watch {
                thread: usize::from(i),
                fd: timer.raw_fd(),
                events: EventSet::IN,
                id: u64::from(BlkBackend::throttle_event(cfg.num_queues)),
            });
            q.set_timer(timer);
            q.track_in(slot.clone(), usize::from(i));
            queues.push(q);
        }
        let dev_cfg = DeviceConfig {
            num_queues: cfg.num_queues,
            queue_size: cfg.queue_size,
        };
        let backend = Arc::new(BlkBackend::new(shared.clone(), dev_cfg, queues));
        // A resize the supervisor made: the capacity requests are checked against and the
        // config space reports, then the frontend is told.
        let sh = shared.clone();
        vhostbox_common::sandbox::supervisor::on_config_change(Box::new(move |size| {
            let old = sh.disk.size();
            if let Err(e) = sh.disk.grow(size) {
                log::error!(
                    "growing the image from {old} to {size} bytes failed: {e}; the disk keeps \
                     {old} bytes"
                );
                return;
            }
            match vhostbox_common::relay::send_config_change() {
                Ok(true) => log::info!(
                    "capacity {old} -> {size} bytes; the frontend was told (CONFIG_CHANGE_MSG)"
                ),
                Ok(false) => log::warn!(
                    "capacity {old} -> {size} bytes; the frontend set up no backend channel \
                     (VHOST_USER_PROTOCOL_F_BACKEND_REQ): the guest sees the new size when it \
                     reads the config space again (a reconnect, a reboot)"
                ),
                Err(e) => {
                    log::warn!("capacity {old} -> {size} bytes; telling the frontend failed: {e}")
                }
            }
        }));
        let mut conn = Connection::new(backend.clone());
        conn.fds = fds;
        conn.watch = watch;
        conn.hook = Some(Box::new(InflightHook { fd: inflight, slot }));
        #[cfg(feature = "jail-probe")]
        if cfg.engine == EngineKind::IoUring && shared.disk.fd().is_some() {
            let b = backend.clone();
            conn.probe.ring = Some(Box::new(move |op| b.probe_ring(op)));
        }
        #[cfg(feature = "jail-probe")]
        {
            conn.probe.file = shared.disk.fd();
        }
        conn.drain = Some(Box::new(move || backend.shut_down()));
        // qcow2: metadata imago caches (L2 tables, refcounts) goes to the files when the
        // connection ends, as on a guest's flush.
        let sh = shared.clone();
        conn.finished = Some(Box::new(move || {
            if let Err(e) = sh.disk.flush() {
                log::error!("flushing the image at the end of the connection: {e}");
            }
        }));
        conn.drain_rules = seccomp::drain_rules();
        conn.config_rules = seccomp::config_rules(shared.disk.format);
        Ok(conn)
    }
}

/// A queue's engine (none for the null device, which needs none).
fn make_engine(
    shared: &Shared,
    kind: EngineKind,
    queue_size: u16,
    queue: usize,
) -> io::Result<Option<Engine>> {
    if let Some(c) = shared.disk.nbd_conn(queue) {
        return Ok(Some(Engine::Nbd(c)));
    }
    if let Some(img) = shared.disk.image() {
        return Ok(Some(Engine::Image(img.clone())));
    }
    let Some(fd) = shared.disk.fd() else {
        return Ok(None);
    };
    Ok(Some(match kind {
        EngineKind::Sync => Engine::Sync(SyncEngine::new(fd)),
        EngineKind::IoUring => {
            Engine::Uring(Box::new(UringEngine::new(fd, u32::from(queue_size))?))
        }
    }))
}

/// RLIMIT_FSIZE: a raw image never grows (resize raises the limit); a qcow2 file grows as
/// clusters are allocated, up to about its virtual size plus its metadata (L2 tables and
/// refcount blocks, well under 1/16 of it), plus what it held already (snapshots, leaks).
fn fsize(disk: &Disk) -> u64 {
    let size = disk.size();
    if disk.format == image::Format::Qcow2 {
        let have = disk
            .file()
            .and_then(|f| f.metadata().ok())
            .map_or(0, |m| m.len());
        return have
            .saturating_add(size)
            .saturating_add(size / 16)
            .saturating_add(64 << 20);
    }
    size.max(64 << 20)
}

fn ncpus() -> u64 {
    std::thread::available_parallelism().map_or(64, |n| n.get() as u64)
}
