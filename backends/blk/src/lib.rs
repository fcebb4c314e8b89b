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
pub mod vhu_blk;
pub mod worker;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use config::{Backing, Config, ListenOn};
use disk::Disk;
use vhostbox_common::daemon::{self, VhostListener};
use vhostbox_common::EXIT_USAGE;

/// Runs the daemon; returns the process exit code.
pub fn run(cfg: Config) -> i32 {
    // Open everything privileged first: the listener and the image (and the io_uring rings,
    // in BlkDevice::new), before anything a sandbox would forbid.
    let listener = match &cfg.listen {
        ListenOn::Path(p) => VhostListener::bind(p),
        ListenOn::Fd(fd) => VhostListener::from_fd(*fd),
    };
    let listener = match listener {
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
    };
    let mut device = match vhu_blk::BlkDevice::new(shared, dev_cfg) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("vhostbox-blk: {e}");
            return 1;
        }
    };
    match daemon::serve("vhostbox-blk", listener, &mut device) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("vhostbox-blk: {}", error_chain(&e));
            1
        }
    }
}

fn fail_usage(e: &dyn std::error::Error) -> i32 {
    eprintln!("vhostbox-blk: {}", error_chain(e));
    EXIT_USAGE
}

/// "outer: inner: innermost", on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
