//! vhostbox-net's part of the seccomp allow-list (the transport part is in vhostbox-common).
//!
//! Frames move with read(2) (one frame per call from the tap) and writev(2) (one frame per
//! call, gathered from guest memory), both already in the transport part. The tap ioctls the
//! worker may issue act only on the tap queue they are called on; TUNSETIFF (attach to or
//! create an interface) is not among them, and /dev/net/tun cannot be opened in the jail anyway.

use vhostbox_common::sandbox::seccomp::{allow_if, transport_rules, Arg, Rules};

use crate::tap::{TUNSETOFFLOAD, TUNSETQUEUE, TUNSETVNETHDRSZ};

/// The worker's full allow-list.
pub fn rules(own_pid: u32) -> Rules {
    let mut r = transport_rules(own_pid);
    r.push(allow_if(
        libc::SYS_ioctl,
        "ioctl",
        "tap: offloads and header size follow the guest's features; queues attach and detach \
         as the guest enables queue pairs; nothing else",
        vec![
            vec![Arg::Eq(1, TUNSETOFFLOAD)],
            vec![Arg::Eq(1, TUNSETVNETHDRSZ)],
            vec![Arg::Eq(1, TUNSETQUEUE)],
        ],
    ));
    r
}
