//! vhostbox-blk: a virtio-blk device backend over vhost-user.
//!
//! Layers, from the bottom: [`disk`] (the backing store), [`engine`] (how I/O is carried
//! out: io_uring or synchronous), [`request`] (parsing a descriptor chain), [`worker`] (one
//! queue's processing, free of vhost-user types), [`vhu_blk`] (the vhost-user glue).

pub mod args;
pub mod config;
pub mod disk;
pub mod engine;
pub mod request;
pub mod seccomp;
pub mod vhu_blk;
pub mod worker;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use config::{Backing, Config};
use disk::Disk;
use vhostbox_common::daemon::{self, VhostListener};
use vhostbox_common::sandbox::supervisor::{supervise, EmptyDir, EXIT_JAIL_FAILED};
use vhostbox_common::sandbox::{self, JailConfig, SandboxMode};
use vhostbox_common::{error_chain, EXIT_USAGE};

const NAME: &str = "vhostbox-blk";

/// Runs the daemon; returns the process exit code.
pub fn run(cfg: Config) -> i32 {
    daemon::block_shutdown_signals();
    // Open everything privileged first: the listener and the image (and the io_uring rings,
    // in BlkDevice::new), before anything a sandbox would forbid.
    let listener = match VhostListener::open(&cfg.listen) {
        Ok(l) => l,
        Err(e) => return fail_usage(&e),
    };
    let disk = match &cfg.backing {
        Backing::Image(p) => Disk::open(p, cfg.readonly, cfg.direct, cfg.logical_block_size),
        Backing::Null(size) => {
            Disk::null(*size, cfg.logical_block_size.unwrap_or(512), cfg.readonly)
        }
    };
    let disk = match disk {
        Ok(d) => d,
        Err(e) => return fail_usage(&e),
    };
    log::info!(
        "{} {} bytes ({} sectors, block size {}), {} queue(s) of {}, engine {:?}{}",
        match &cfg.backing {
            Backing::Image(p) => format!("image {}", p.display()),
            Backing::Null(_) => "null device".to_string(),
        },
        disk.size,
        disk.sectors(),
        disk.block_size,
        cfg.num_queues,
        cfg.queue_size,
        cfg.engine,
        if cfg.readonly { ", read-only" } else { "" }
    );
    let shared = Arc::new(worker::Shared {
        disk,
        serial: cfg.serial,
        writeback: AtomicBool::new(cfg.writeback),
        stats: Default::default(),
    });
    let dev_cfg = vhu_blk::DeviceConfig {
        num_queues: cfg.num_queues,
        queue_size: cfg.queue_size,
        engine: cfg.engine,
        poll_max: cfg.poll_max,
    };
    let mut listener = listener;
    if cfg.sandbox == SandboxMode::None {
        return match vhu_blk::BlkDevice::new(shared, dev_cfg) {
            Ok(mut device) => daemon::serve_unconfined(NAME, &mut listener, &mut device),
            Err(e) => {
                eprintln!("{NAME}: {e}");
                1
            }
        };
    }
    let chroot_dir = match EmptyDir::for_mode(cfg.sandbox) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("{NAME}: {e}");
            return 1;
        }
    };
    let kind = shared.disk.kind;
    let jail = JailConfig {
        mode: cfg.sandbox,
        seccomp: cfg.seccomp,
        ids: cfg.ids,
        chroot_dir: chroot_dir.as_ref().map(|d| d.0.clone()),
        // Own fds plus what a frontend sends: memory regions (up to 509 slots) and three
        // eventfds per queue.
        nofile: 600 + 8 * u64::from(cfg.num_queues),
        // main, signal, vhost-user and one worker thread per queue, plus slack, plus the
        // kernel's io-wq threads that run blocking io_uring work on the worker's behalf: they
        // count against RLIMIT_NPROC too, and a ring that cannot start one fails the request
        // (the guest would see IOERR). io-wq starts at most 4 per CPU per ring for bounded work.
        nproc: 8 + u64::from(cfg.num_queues) * (1 + 4 * ncpus()),
        fsize: shared.disk.size.max(64 << 20),
    };
    // The report list is only used for names in the supervisor's messages.
    let names = seccomp::rules(kind, 1);
    let listen_fd = listener.raw_fd();
    let probe = cfg.jail_probe.clone();
    let code = supervise(NAME, &jail, &names, |ctx| {
        // In the worker process, not yet jailed: make what needs privilege (the rings).
        let mut device = match vhu_blk::BlkDevice::new(shared.clone(), dev_cfg.clone()) {
            Ok(d) => d,
            Err(e) => {
                log::error!("{e}");
                return EXIT_JAIL_FAILED;
            }
        };
        let mut keep = vec![listen_fd, ctx.report_fd];
        keep.extend(shared.disk.fd());
        keep.extend(device.fds());
        vhostbox_common::sandbox::seccomp::set_report_fd(ctx.report_fd);
        // SAFETY: getpid has no arguments.
        let pid = unsafe { libc::getpid() } as u32;
        if let Err(e) = sandbox::enter(&jail, &keep, seccomp::rules(kind, pid)) {
            log::error!("cannot enter the sandbox: {e}");
            return EXIT_JAIL_FAILED;
        }
        // Only the first worker probes, so its replacement shows the device still works;
        // `seccomp-after=N` arms every worker instead.
        if let Some(p) = &probe {
            if !arm_crash(p) && ctx.generation == 1 {
                return run_probe(p, &mut device);
            }
        }
        daemon::serve_exit_code(NAME, &mut listener, &mut device, true)
    });
    drop(chroot_dir);
    drop(listener);
    code
}

fn ncpus() -> u64 {
    std::thread::available_parallelism().map_or(64, |n| n.get() as u64)
}

#[cfg(feature = "jail-probe")]
fn run_probe(name: &str, device: &mut vhu_blk::BlkDevice) -> i32 {
    vhostbox_common::sandbox::probe::run(name, &mut |path| device.probe_uring_openat(path))
}

#[cfg(feature = "jail-probe")]
fn arm_crash(spec: &str) -> bool {
    vhostbox_common::sandbox::probe::arm_crash(spec)
}

#[cfg(not(feature = "jail-probe"))]
fn arm_crash(_spec: &str) -> bool {
    false
}

#[cfg(not(feature = "jail-probe"))]
fn run_probe(_name: &str, _device: &mut vhu_blk::BlkDevice) -> i32 {
    unreachable!("--jail-probe exists only in builds with the jail-probe feature")
}

fn fail_usage(e: &dyn std::error::Error) -> i32 {
    eprintln!("{NAME}: {}", error_chain(e));
    EXIT_USAGE
}
