//! vhostbox-net: a virtio-net device backend over vhost-user, on a tap device.
//!
//! Only the device lives here; the launcher, the supervisor, the jail and the vhost-user
//! relay are vhostbox-common's. Layers, from the bottom: [`tap`] (the host end), [`hdr`] (the
//! virtio-net header and the offload rules), [`datapath`] (one queue pair's RX and TX, free of
//! vhost-user types), [`device`] (the vhost-user glue: features, config space, event routing).

pub mod args;
pub mod config;
pub mod datapath;
pub mod device;
pub mod hdr;
pub mod seccomp;
pub mod stats;
pub mod tap;

use std::sync::Arc;

use vmm_sys_util::epoll::EventSet;

use vhostbox_common::cli::CommonConfig;
use vhostbox_common::launch::{self, Connection, GuestMemHandle, Limits, Watch};
use vhostbox_common::sandbox::seccomp::Rules;

use config::{Config, TapSource};
use device::{DeviceConfig, NetBackend};
use tap::{Tap, TapError};

/// vhostbox-net as the launcher runs it.
pub struct Net {
    pub cfg: Config,
}

impl launch::Device for Net {
    const NAME: &'static str = "vhostbox-net";
    const QUEUES_FLAG: &'static str = "--queue-pairs";
    const RINGS_PER_QUEUE: u32 = 2;
    const CAPABILITIES: &'static str = r#"{"type":"net"}"#;
    const METRICS: &'static [vhostbox_common::metrics::Def] = stats::METRICS;
    type Args = args::Args;
    type ConfigError = config::ConfigError;
    type Opened = Arc<Tap>;
    type OpenError = TapError;
    type BuildError = std::convert::Infallible;
    type Backend = Arc<NetBackend>;

    fn configure(args: args::Args) -> Result<(CommonConfig, Self), config::ConfigError> {
        let (common, cfg) = <(CommonConfig, Config)>::try_from(args)?;
        Ok((common, Net { cfg }))
    }

    fn open(&self) -> Result<Arc<Tap>, TapError> {
        let cfg = &self.cfg;
        let tap = match &cfg.tap {
            TapSource::Name(n) => Tap::open(n, usize::from(cfg.queue_pairs))?,
            TapSource::Fds(fds) => Tap::from_fds(fds)?,
        };
        if let (Some(mtu), TapSource::Name(_)) = (cfg.mtu, &cfg.tap) {
            if let Err(e) = tap.set_mtu(mtu) {
                log::warn!(
                    "cannot set the MTU of tap {} to {mtu}: {e}; set it to match the guest's",
                    tap.name
                );
            }
        }
        // A tap this process created is its to bring up; one it was given is the operator's,
        // who must know when it is down: every frame would be refused.
        if tap.created {
            if let Err(e) = tap.set_up() {
                log::warn!("cannot bring tap {} up: {e}", tap.name);
            }
        }
        match tap.is_up() {
            Ok(true) => {}
            Ok(false) => log::warn!(
                "*** tap {} is DOWN: the guest's frames will be dropped and it will receive \
                 nothing until it is up (ip link set {} up) ***",
                tap.name,
                tap.name
            ),
            Err(e) => log::warn!("cannot read the state of tap {}: {e}", tap.name),
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
        Ok(Arc::new(tap))
    }

    fn metric_queues(&self) -> usize {
        usize::from(self.cfg.queue_pairs)
    }

    fn limits(&self, _tap: &Arc<Tap>) -> Limits {
        let pairs = u64::from(self.cfg.queue_pairs);
        Limits {
            // Own fds plus what a frontend sends: memory regions (up to 509 slots) and three
            // eventfds per queue.
            nofile: 600 + 16 * pairs,
            // main, signal, relay, vhost-user and one queue thread per pair, plus slack.
            nproc: 8 + pairs,
            // The worker writes no files at all.
            fsize: 1 << 20,
        }
    }

    fn seccomp(&self, _tap: &Arc<Tap>, own_pid: u32) -> Rules {
        seccomp::rules(own_pid)
    }

    fn build(
        &self,
        tap: &Arc<Tap>,
        mem: &GuestMemHandle,
    ) -> Result<Connection<Arc<NetBackend>>, std::convert::Infallible> {
        let cfg = &self.cfg;
        let dev_cfg = DeviceConfig {
            queue_pairs: cfg.queue_pairs,
            queue_size: cfg.queue_size,
            mac: cfg.mac,
            mtu: cfg.mtu,
            offer_config: cfg.offer_config,
        };
        let backend = Arc::new(NetBackend::new(tap.clone(), dev_cfg, mem.clone()));
        let mut conn = Connection::new(backend.clone());
        conn.fds = tap.queues.iter().map(|q| q.raw_fd()).collect();
        let id = u64::from(NetBackend::tap_event(cfg.queue_pairs));
        conn.watch = tap
            .queues
            .iter()
            .enumerate()
            .map(|(thread, q)| Watch {
                thread,
                fd: q.raw_fd(),
                events: EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED,
                id,
            })
            .collect();
        conn.finished = Some(Box::new(move || backend.finished()));
        Ok(conn)
    }
}
