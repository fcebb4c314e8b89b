//! The command line. Doc comments here become `--help`.

use clap::Parser;
use vhostbox_common::cli::CommonArgs;

/// A virtio-net device backend over vhost-user, on a tap device.
///
/// vhostbox-net serves one virtio-net device to a virtual machine monitor (QEMU,
/// cloud-hypervisor, or any vhost-user frontend) over a unix socket. The guest uses its stock
/// virtio_net driver; frames go between the guest's virtqueues and a host tap interface, one
/// tap queue per queue pair, each pair served by its own worker thread.
///
/// The tap is opened once at start-up: by name (--tap, attaching to an existing tap or
/// creating one, which needs CAP_NET_ADMIN) or as file descriptors a launcher opened
/// (--tap-fd, so the backend never holds CAP_NET_ADMIN). The tap's offloads follow what the
/// guest negotiates. Frontends are served one after another on the same listener; the tap is
/// kept across connections. SIGTERM or SIGINT shut down cleanly and remove the socket.
///
/// The process is a small supervisor that holds the socket and the tap and forks one jailed
/// worker per frontend connection: new user, mount, pid, net, ipc, uts and cgroup namespaces,
/// an empty read-only root, an unprivileged uid, no capabilities, no_new_privs, Landlock, and a
/// seccomp allow-list (kill on anything else). A worker that dies is logged and replaced.
///
/// EXIT STATUS: 0 after a clean shutdown, 2 for a usage or configuration error (bad flag, bad
/// MAC, a tap that cannot be opened or created, a fd that is not a tap, more queue pairs than
/// the tap supports, busy socket path), 1 for other failures, 4 when the socket file could not
/// be removed at exit.
#[derive(Debug, Parser)]
#[command(
    name = "vhostbox-net",
    version,
    after_help = "EXAMPLES:
    vhostbox-net --socket-path /run/vm1-net.sock --tap vm1tap0 --queue-pairs 2
    vhostbox-net --socket-path /run/vm1-net.sock --tap-fd 3 --mac 52:54:00:12:34:56

    qemu-system-x86_64 ... \\
      -object memory-backend-memfd,id=mem,size=1G,share=on -machine memory-backend=mem \\
      -chardev socket,id=net0,path=/run/vm1-net.sock \\
      -netdev vhost-user,id=net0,chardev=net0,queues=2 \\
      -device virtio-net-pci,netdev=net0,mq=on,vectors=6

    cloud-hypervisor ... --memory size=1G,shared=on \\
      --net vhost_user=true,socket=/run/vm1-net.sock,num_queues=4,queue_size=256"
)]
pub struct Args {
    #[command(flatten)]
    pub common: CommonArgs,

    /// Tap interface to attach to; created (multi-queue, with the virtio-net header) if it
    /// does not exist. Opening or creating a tap by name needs CAP_NET_ADMIN.
    #[arg(
        long,
        value_name = "NAME",
        required_unless_present = "tap_fd",
        conflicts_with = "tap_fd"
    )]
    pub tap: Option<String>,

    /// Already-open tap queue file descriptors (one per queue pair; repeat the flag or give a
    /// comma-separated list), opened by a launcher with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
    /// (and IFF_MULTI_QUEUE for more than one).
    #[arg(long, value_name = "N", value_delimiter = ',')]
    pub tap_fd: Vec<i32>,

    /// MAC address offered to the guest (VIRTIO_NET_F_MAC), e.g. 52:54:00:12:34:56.
    /// Default: a random locally administered address.
    #[arg(long, value_name = "MAC")]
    pub mac: Option<String>,

    /// Number of queue pairs (RX+TX), each with its own tap queue and worker thread (1-32).
    /// Default: the number of --tap-fd descriptors, or 1.
    #[arg(long, value_name = "N")]
    pub queue_pairs: Option<u16>,

    /// Maximum size of each virtqueue: a power of two, 2-1024.
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub queue_size: u16,

    /// Offer the config space (VHOST_USER_PROTOCOL_F_CONFIG: --mac, --mtu, link up, queue
    /// pairs) to frontends that read it, such as DPDK's virtio-user. Off by default: QEMU's
    /// virtio-net builds its config space from its own options and warns about a backend
    /// that offers one.
    #[arg(long)]
    pub offer_config: bool,

    /// MTU offered to the guest (VIRTIO_NET_F_MTU), 68-65535. With --tap, the tap interface's
    /// MTU is set to match.
    #[arg(long, value_name = "N")]
    pub mtu: Option<u16>,
}
