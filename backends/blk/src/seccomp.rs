//! vhostbox-blk's part of the seccomp allow-list (the transport part is in vhostbox-common).

use vhostbox_common::sandbox::seccomp::{allow, allow_if, transport_rules, Arg, Rules};

use crate::disk::DiskKind;
use crate::image::Format;

const BLKDISCARD: u64 = 0x1277;
const BLKZEROOUT: u64 = 0x127f;

/// The worker's full allow-list for a device backed by `kind`.
pub fn rules(kind: DiskKind, format: Format, own_pid: u32) -> Rules {
    use libc::*;
    let mut r = transport_rules(own_pid);
    r.extend([
        allow(
            SYS_pread64,
            "pread64",
            "sync engine reads; qcow2: imago reads metadata and data",
        ),
        allow(
            SYS_pwrite64,
            "pwrite64",
            "sync engine writes; write-zeroes fallback; qcow2: imago writes metadata and data",
        ),
        allow(SYS_preadv, "preadv", "sync engine reads into guest buffers"),
        allow(
            SYS_pwritev,
            "pwritev",
            "sync engine writes from guest buffers",
        ),
        allow(
            SYS_preadv2,
            "preadv2",
            "io-uring engine: reads served from the page cache on the spot (RWF_NOWAIT); \
             the sync engine's preadv on libcs that use preadv2",
        ),
        allow(
            SYS_pwritev2,
            "pwritev2",
            "the same, on libcs that use pwritev2",
        ),
        allow(SYS_fdatasync, "fdatasync", "FLUSH, write-through mode"),
        allow(
            SYS_fsync,
            "fsync",
            "FLUSH on libcs that map sync_data to fsync; qcow2: imago's sync",
        ),
        allow(
            SYS_fallocate,
            "fallocate",
            "DISCARD and WRITE_ZEROES on image files; qcow2: imago frees and zeroes clusters",
        ),
        allow(
            SYS_io_uring_enter,
            "io_uring_enter",
            "io-uring engine: submit and reap on the pre-made, restricted rings",
        ),
        allow(
            SYS_timerfd_settime,
            "timerfd_settime",
            "I/O limits: arm the queue's pre-made timer for a bucket's refill",
        ),
    ]);
    if format == Format::Qcow2 {
        r.push(allow(
            SYS_ftruncate,
            "ftruncate",
            "qcow2: imago grows the file for write-zeroes past its end (RLIMIT_FSIZE bounds it)",
        ));
    }
    if kind == DiskKind::Nbd {
        r.extend([
            allow(
                SYS_sendto,
                "sendto",
                "NBD: libnbd's requests on the sockets the supervisor connected",
            ),
            allow(
                SYS_recvfrom,
                "recvfrom",
                "NBD: libnbd's replies on those sockets",
            ),
        ]);
    }
    if kind == DiskKind::BlockDevice {
        r.push(allow_if(
            SYS_ioctl,
            "ioctl",
            "DISCARD and WRITE_ZEROES on block devices, nothing else",
            vec![vec![Arg::Eq(1, BLKDISCARD)], vec![Arg::Eq(1, BLKZEROOUT)]],
        ));
    }
    r
}

/// What the signal thread needs to drain the queues on SIGTERM (its own list is common's
/// `signal_rules`): waiting for the rings' completions.
pub fn drain_rules() -> Rules {
    vec![allow(
        libc::SYS_io_uring_enter,
        "io_uring_enter",
        "io-uring engine: waiting for the requests in flight at SIGTERM",
    )]
}

/// What the heartbeat thread needs to grow a qcow2 image on a resize (its own list is
/// common's `heartbeat_rules`): imago's metadata reads and writes, and the sync. Nothing for
/// raw images, which the supervisor grows.
pub fn config_rules(format: Format) -> Rules {
    use libc::*;
    if format != Format::Qcow2 {
        return Vec::new();
    }
    vec![
        allow(SYS_pread64, "pread64", "qcow2 resize: imago reads metadata"),
        allow(
            SYS_pwrite64,
            "pwrite64",
            "qcow2 resize: imago writes the L1 table and the header",
        ),
        allow(SYS_preadv, "preadv", "qcow2 resize: the same, vectored"),
        allow(SYS_pwritev, "pwritev", "qcow2 resize: the same, vectored"),
        allow(SYS_fsync, "fsync", "qcow2 resize: syncing the header"),
        allow(
            SYS_fallocate,
            "fallocate",
            "qcow2 resize: imago zeroes new clusters",
        ),
        allow(
            SYS_ftruncate,
            "ftruncate",
            "qcow2 resize: imago grows the file",
        ),
    ]
}
