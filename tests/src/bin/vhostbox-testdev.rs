//! vhostbox-testdev: a test-only fourth backend, to prove the launcher is shared. It has
//! nothing but its device logic: one queue whose every device-writable buffer it fills with
//! `--byte` (default 0xa5), completing each chain with the number of bytes written. The command
//! line, the supervisor, the jail, the relay and the lifecycle are vhostbox-common's, exactly
//! as vhostbox-blk and vhostbox-net get them.

use std::convert::Infallible;
use std::io;
use std::sync::Arc;

use clap::Parser;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::VhostUserVirtioFeatures;
use vhost_user_backend::{VhostUserBackend, VringT};
use vhostbox_common::launch::GuestVring;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddressSpace};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use vhostbox_common::cli::{CommonArgs, CommonConfig, CommonError};
use vhostbox_common::launch::{self, Connection, GuestMemHandle, Limits};
use vhostbox_common::sandbox::seccomp::{transport_rules, Rules};
use vhostbox_common::ExitEvents;

/// A test device that fills the guest's buffers with one byte.
#[derive(Debug, Parser)]
#[command(name = "vhostbox-testdev")]
struct Args {
    #[command(flatten)]
    common: CommonArgs,

    /// The byte every device-writable buffer is filled with.
    #[arg(long, default_value_t = 0xa5)]
    byte: u8,
}

struct Fill {
    byte: u8,
}

struct FillBackend {
    byte: u8,
    mem: GuestMemHandle,
    exit: ExitEvents,
}

impl VhostUserBackend for FillBackend {
    type Bitmap = vhostbox_common::dirty::DirtyLog;
    type Vring = GuestVring;

    fn num_queues(&self) -> usize {
        1
    }
    fn max_queue_size(&self) -> usize {
        256
    }
    fn features(&self) -> u64 {
        1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }
    fn set_event_idx(&self, _enabled: bool) {}
    fn update_memory(&self, _mem: GuestMemHandle) -> io::Result<()> {
        Ok(())
    }
    fn exit_event(&self, _thread: usize) -> Option<(EventConsumer, EventNotifier)> {
        self.exit.take()
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[GuestVring],
        _thread: usize,
    ) -> io::Result<()> {
        let (0, Some(vring)) = (device_event, vrings.first()) else {
            return Ok(());
        };
        let mem = self.mem.memory();
        let mut state = vring.get_mut();
        let chains: Vec<_> = state
            .get_queue_mut()
            .iter(&*mem)
            .map_err(io::Error::other)?
            .collect();
        for chain in chains {
            let head = chain.head_index();
            let mut written = 0u32;
            for d in chain.writable() {
                let fill = vec![self.byte; d.len() as usize];
                if mem.write_slice(&fill, d.addr()).is_ok() {
                    written += d.len();
                }
            }
            state
                .get_queue_mut()
                .add_used(&*mem, head, written)
                .map_err(io::Error::other)?;
        }
        state.signal_used_queue()
    }
}

impl launch::Device for Fill {
    const NAME: &'static str = "vhostbox-testdev";
    const CAPABILITIES: &'static str = r#"{"type":"rng"}"#;
    type Args = Args;
    type ConfigError = CommonError;
    type Opened = ();
    type OpenError = Infallible;
    type BuildError = Infallible;
    type Backend = Arc<FillBackend>;

    fn configure(a: Args) -> Result<(CommonConfig, Self), CommonError> {
        Ok((CommonConfig::try_from(a.common)?, Fill { byte: a.byte }))
    }
    fn open(&self) -> Result<(), Infallible> {
        Ok(())
    }
    fn limits(&self, _: &()) -> Limits {
        Limits {
            nofile: 600,
            nproc: 8,
            fsize: 0,
        }
    }
    fn seccomp(&self, _: &(), own_pid: u32) -> Rules {
        transport_rules(own_pid)
    }
    fn build(
        &self,
        _: &(),
        mem: &GuestMemHandle,
    ) -> Result<Connection<Arc<FillBackend>>, Infallible> {
        Ok(Connection::new(Arc::new(FillBackend {
            byte: self.byte,
            mem: mem.clone(),
            exit: ExitEvents::default(),
        })))
    }
}

fn main() {
    std::process::exit(launch::main::<Fill>());
}
