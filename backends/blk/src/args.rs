//! The command line. Doc comments here become `--help`.

use std::path::PathBuf;

use clap::Parser;
use vhostbox_common::cli::CommonArgs;

/// Default `--poll-max-us`.
pub const DEFAULT_POLL_MAX_US: u32 = 50;

/// A virtio-blk device backend over vhost-user.
///
/// vhostbox-blk serves one virtio-blk device to a virtual machine monitor (QEMU,
/// cloud-hypervisor, or any vhost-user frontend) over a unix socket. The guest uses its stock
/// virtio_blk driver; the device model runs here, in its own small process, not in the VMM.
///
/// The backing store is a raw or qcow2 image file (qcow2 with its backing chain), a host
/// block device, an NBD export (--nbd), or (--null) a device that reads zeros and drops writes, for benchmarks. The socket is bound (or taken with --fd) and
/// the image opened once at start-up; frontends are then served one after another on the same
/// listener: when a frontend disconnects, its state is dropped and the next one is accepted.
/// SIGTERM or SIGINT shut down cleanly and remove the socket.
///
/// The process is a small supervisor that holds the socket and the image and forks one
/// jailed worker per frontend connection: new user, mount, pid, net, ipc, uts and cgroup
/// namespaces, an empty read-only root, an unprivileged uid, no capabilities, no_new_privs,
/// Landlock with no filesystem or network access, and a seccomp allow-list (kill on anything
/// else). A worker that dies is logged (with the blocked syscall, for seccomp) and replaced.
///
/// EXIT STATUS: 0 after a clean shutdown, 2 for a usage or configuration error (bad flag,
/// missing or unreadable image, size not a multiple of the block size, busy socket path),
/// 1 for other failures, 4 when the socket file could not be removed at exit.
#[derive(Debug, Parser)]
#[command(
    name = "vhostbox-blk",
    version,
    after_help = "EXAMPLES:
    vhostbox-blk --socket-path /run/vm1-disk.sock --image /var/lib/vm1.raw --num-queues 2
    vhostbox-blk --socket-path /tmp/bench.sock --null 8G --num-queues 2

    qemu-system-x86_64 ... \\
      -object memory-backend-memfd,id=mem,size=1G,share=on -machine memory-backend=mem \\
      -chardev socket,id=disk0,path=/run/vm1-disk.sock \\
      -device vhost-user-blk-pci,chardev=disk0,num-queues=2

    cloud-hypervisor ... --memory size=1G,shared=on \\
      --disk vhost_user=true,socket=/run/vm1-disk.sock,num_queues=2,queue_size=256"
)]
pub struct Args {
    #[command(flatten)]
    pub common: CommonArgs,

    /// Disk image file (raw or qcow2) or host block device to serve.
    #[arg(
        long,
        value_name = "PATH",
        visible_alias = "blk-file",
        required_unless_present_any = ["null", "nbd"],
        conflicts_with_all = ["null", "nbd"]
    )]
    pub image: Option<PathBuf>,

    /// The image's format: raw or qcow2 (a qcow2 image's backing chain is followed and
    /// opened read-only). Default: probed from its header; a probed qcow2 image may not name
    /// a backing file, and a format other than raw or qcow2 is refused. When given, the
    /// image must be of that format.
    #[arg(long, value_name = "raw|qcow2", conflicts_with = "null")]
    pub format: Option<String>,

    /// Serve an export of an NBD server instead of an image: `nbd://HOST[:PORT][/EXPORT]` or
    /// `nbd+unix:///[EXPORT]?socket=PATH` (qemu-nbd, nbdkit, rbd-nbd, ...). The supervisor
    /// connects, the jailed worker only talks over the connected sockets (one per queue when
    /// the server allows several); when the server goes away the next worker gets new ones.
    /// Needs libnbd (libnbd.so.0) at run time.
    #[arg(long, value_name = "URI", conflicts_with_all = ["null", "format", "direct"])]
    pub nbd: Option<String>,

    /// Serve a null device of SIZE bytes instead of an image: reads return zeros, writes are
    /// dropped. SIZE takes K, M, G or T suffixes. For benchmarks.
    #[arg(long, value_name = "SIZE")]
    pub null: Option<String>,

    /// Expose the device read-only (VIRTIO_BLK_F_RO); the image is opened read-only.
    #[arg(long, visible_alias = "read-only")]
    pub readonly: bool,

    /// Lock the image the way QEMU does (OFD locks on its permission bytes), so that QEMU,
    /// qemu-img and other vhostbox-blk processes cannot write it while it is served, and it is
    /// not served while one of them writes it: on (default) or off.
    #[arg(long, value_name = "on|off", default_value = "on", value_parser = ["on", "off"])]
    pub lock: String,

    /// Number of virtqueues, each served by its own worker thread (1-64).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub num_queues: u16,

    /// Maximum size of each virtqueue: a power of two, 2-1024.
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub queue_size: u16,

    /// Serial number reported to the guest (GET_ID), up to 20 bytes.
    #[arg(long, value_name = "ID")]
    pub serial: Option<String>,

    /// Open the image with O_DIRECT, bypassing the host page cache.
    #[arg(long)]
    pub direct: bool,

    /// I/O engine: io-uring (many requests in flight per queue) or sync (one at a time,
    /// on the queue's worker thread).
    #[arg(long, value_name = "ENGINE", default_value = "io-uring")]
    pub engine: String,

    /// Busy-poll budget, in microseconds: after each pass a queue's worker keeps looking at
    /// its ring for up to this long before it sleeps, which spares the guest's kick and the
    /// worker's wake-up when requests follow each other closely. The budget adapts per queue
    /// (it grows while requests come sooner than this, drops to zero when the queue is quiet),
    /// like QEMU's poll-max-ns. 0 turns polling off (0-1000).
    #[arg(long, value_name = "US", default_value_t = DEFAULT_POLL_MAX_US)]
    pub poll_max_us: u32,

    /// Logical block size exposed to the guest: 512 or 4096. Default: the host device's, or
    /// 512 for image files.
    #[arg(long, value_name = "BYTES")]
    pub logical_block_size: Option<u32>,

    /// Start with the guest's write cache off (write-through: every write is durable when it
    /// completes). The guest can change the mode (VIRTIO_BLK_F_CONFIG_WCE).
    #[arg(long)]
    pub writethrough: bool,

    /// I/O limit: reads and writes per second, together (0 or unset: unlimited). Throttled
    /// requests wait in the backend (the queue stops being taken from); none fails. Changed
    /// at run time with --control's set-limits.
    #[arg(long, value_name = "N", help_heading = "I/O limits")]
    pub limit_iops: Option<u64>,

    /// I/O limit: reads per second.
    #[arg(long, value_name = "N", help_heading = "I/O limits")]
    pub limit_read_iops: Option<u64>,

    /// I/O limit: writes per second (discard and write-zeroes count as writes).
    #[arg(long, value_name = "N", help_heading = "I/O limits")]
    pub limit_write_iops: Option<u64>,

    /// I/O limit: bytes read and written per second, together (K, M, G suffixes).
    #[arg(long, value_name = "SIZE", help_heading = "I/O limits")]
    pub limit_bps: Option<String>,

    /// I/O limit: bytes read per second.
    #[arg(long, value_name = "SIZE", help_heading = "I/O limits")]
    pub limit_read_bps: Option<String>,

    /// I/O limit: bytes written per second.
    #[arg(long, value_name = "SIZE", help_heading = "I/O limits")]
    pub limit_write_bps: Option<String>,

    /// I/O limit: the most operations an IOPS bucket holds, the burst allowed after a quiet
    /// spell (default: a tenth of a second at the rate, as QEMU's throttling).
    #[arg(long, value_name = "N", help_heading = "I/O limits")]
    pub limit_iops_burst: Option<u64>,

    /// I/O limit: the most bytes a byte bucket holds (default: a tenth of a second's worth).
    #[arg(long, value_name = "SIZE", help_heading = "I/O limits")]
    pub limit_bps_burst: Option<String>,
}
