//! vhostbox-net: a virtio-net device backend over vhost-user, on a tap device.
//!
//! Layers, from the bottom: [`tap`] (the host end), [`hdr`] (the virtio-net header and the
//! offload rules), [`datapath`] (one queue pair's RX and TX, free of vhost-user types),
//! [`vhu_net`] (the vhost-user glue).

pub mod args;
pub mod config;
pub mod datapath;
pub mod hdr;
pub mod seccomp;
pub mod tap;
pub mod vhu_net;

use std::sync::Arc;

use config::{Config, TapSource};
use tap::Tap;
use vhostbox_common::daemon::{self, VhostListener};
use vhostbox_common::sandbox::supervisor::{supervise, EmptyDir, EXIT_JAIL_FAILED};
use vhostbox_common::sandbox::{self, JailConfig, SandboxMode};
use vhostbox_common::{error_chain, EXIT_USAGE};

const NAME: &str = "vhostbox-net";

/// Runs the daemon; returns the process exit code.
pub fn run(cfg: Config) -> i32 {
    daemon::block_shutdown_signals();
    // Open everything privileged first: the listener and the tap, before anything a sandbox
    // would forbid.
    let mut listener = match VhostListener::open(&cfg.listen) {
        Ok(l) => l,
        Err(e) => return fail_usage(&e),
    };
    let pairs = usize::from(cfg.queue_pairs);
    let tap = match &cfg.tap {
        TapSource::Name(n) => Tap::open(n, pairs),
        TapSource::Fds(fds) => Tap::from_fds(fds),
    };
    let tap = match tap {
        Ok(t) => Arc::new(t),
        Err(e) => return fail_usage(&e),
    };
    if let (Some(mtu), TapSource::Name(_)) = (cfg.mtu, &cfg.tap) {
        if let Err(e) = tap.set_mtu(mtu) {
            log::warn!(
                "cannot set the MTU of tap {} to {mtu}: {e}; set it to match the guest's",
                tap.name
            );
        }
    }
    log::info!(
        "tap {} ({}{} queue(s)), mac {}, {} queue pair(s) of {}{}",
        tap.name,
        match (&cfg.tap, tap.created) {
            (TapSource::Fds(_), _) => "from --tap-fd, ",
            (_, true) => "created, ",
            (_, false) => "attached, ",
        },
        tap.queues.len(),
        cfg.mac,
        cfg.queue_pairs,
        cfg.queue_size,
        cfg.mtu.map(|m| format!(", mtu {m}")).unwrap_or_default()
    );
    let dev_cfg = vhu_net::DeviceConfig {
        queue_pairs: cfg.queue_pairs,
        queue_size: cfg.queue_size,
        mac: cfg.mac,
        mtu: cfg.mtu,
    };
    let mut device = match vhu_net::NetDevice::new(tap.clone(), dev_cfg) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("{NAME}: {e}");
            return 1;
        }
    };
    if cfg.sandbox == SandboxMode::None {
        if let Err(e) = device.arm_shim() {
            eprintln!("{NAME}: cannot set up the vhost-user relay: {e}");
            return 1;
        }
        return daemon::serve_unconfined(NAME, &mut listener, &mut device);
    }
    let chroot_dir = match EmptyDir::for_mode(cfg.sandbox) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("{NAME}: {e}");
            return 1;
        }
    };
    let jail = JailConfig {
        mode: cfg.sandbox,
        seccomp: cfg.seccomp,
        ids: cfg.ids,
        chroot_dir: chroot_dir.as_ref().map(|d| d.0.clone()),
        // Own fds plus what a frontend sends: memory regions (up to 509 slots) and three
        // eventfds per queue.
        nofile: 600 + 16 * u64::from(cfg.queue_pairs),
        // main, signal, vhost-user and one worker thread per pair, plus slack.
        nproc: 8 + u64::from(cfg.queue_pairs),
        // The worker writes no files at all.
        fsize: 1 << 20,
    };
    let names = seccomp::rules(1);
    let listen_fd = listener.raw_fd();
    let probe = cfg.jail_probe.clone();
    let code = supervise(NAME, &jail, &names, |ctx| {
        // In the worker, not yet jailed: the relay's private socket pair.
        if let Err(e) = device.arm_shim() {
            log::error!("cannot set up the vhost-user relay: {e}");
            return EXIT_JAIL_FAILED;
        }
        let mut keep = vec![listen_fd, ctx.report_fd];
        keep.extend(device.fds());
        vhostbox_common::sandbox::seccomp::set_report_fd(ctx.report_fd);
        // SAFETY: getpid has no arguments.
        let pid = unsafe { libc::getpid() } as u32;
        if let Err(e) = sandbox::enter(&jail, &keep, seccomp::rules(pid)) {
            log::error!("cannot enter the sandbox: {e}");
            return EXIT_JAIL_FAILED;
        }
        if let (Some(p), 1) = (&probe, ctx.generation) {
            return run_probe(p);
        }
        daemon::serve_exit_code(NAME, &mut listener, &mut device, true)
    });
    drop(chroot_dir);
    drop(listener);
    code
}

#[cfg(feature = "jail-probe")]
fn run_probe(name: &str) -> i32 {
    vhostbox_common::sandbox::probe::run(name, &mut |_| None)
}

#[cfg(not(feature = "jail-probe"))]
fn run_probe(_name: &str) -> i32 {
    unreachable!("--jail-probe exists only in builds with the jail-probe feature")
}

fn fail_usage(e: &dyn std::error::Error) -> i32 {
    eprintln!("{NAME}: {}", error_chain(e));
    EXIT_USAGE
}
