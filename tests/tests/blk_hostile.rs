//! vhostbox-blk against a hostile guest and a hostile local user: the real binary (jailed,
//! `--seccomp kill`), driven by the test frontend, which builds any chain a guest could.
//! Each test is a regression test for a hole found in review (issue 15).

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use vhostbox_tests::blkreq::{F_DISCARD, S_IOERR, S_OK, T_DISCARD, T_IN, T_OUT, UNTOUCHED};
use vhostbox_tests::frontend::{
    DeviceOptions, VhostUserDevice, Virtqueue, VIRTIO_F_VERSION_1, VIRTIO_RING_F_INDIRECT_DESC,
};
use vhostbox_tests::{proc_status, sparse_image, Backend};

/// A jailed backend (`--seccomp kill`) on a fresh image of `size` bytes in `dir`.
fn backend(dir: &Path, size: u64) -> (Backend, std::path::PathBuf, std::path::PathBuf) {
    let img = sparse_image(&dir.join("disk.img"), size);
    let sock = dir.join("blk.sock");
    let be = Backend::blk(&sock, &img, &["--seccomp", "kill"]);
    (be, img, sock)
}

fn connect(sock: &Path, mem_size: usize) -> VhostUserDevice {
    let opts = DeviceOptions {
        queue_size: 256,
        mem_size,
        ..Default::default()
    };
    let features = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC | F_DISCARD;
    VhostUserDevice::connect_with(sock, 1, features, &opts).unwrap()
}

/// A request header of `ty` at `sector` in fresh guest memory; returns its address.
fn header(q: &Virtqueue, ty: u32, sector: u64) -> u64 {
    let mem = q.mem();
    let hdr = mem.alloc(16, 16);
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&ty.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write(hdr, &h);
    hdr
}

/// A status byte preset to UNTOUCHED; returns its address.
fn status(q: &Virtqueue) -> u64 {
    let s = q.mem().alloc(1, 1);
    q.mem().write(s, &[UNTOUCHED]);
    s
}

/// Kicks and waits for one completion: (head, len).
fn complete(q: &mut Virtqueue) -> (u16, u32) {
    q.kick();
    q.wait_used(Duration::from_secs(20)).expect("a completion")
}

/// The worker's peak resident memory, in KiB.
fn peak_rss_kib(pid: i32) -> u64 {
    let st = proc_status(&pid.to_string());
    st["VmHWM"].trim_end_matches(" kB").trim().parse().unwrap()
}

/// A guest makes a discard of 1000 segments whose buffers all point at the same 1 MiB area
/// (1000 MiB of "payload", each buffer within SIZE_MAX): the worker must refuse it from its length, before reading or
/// allocating any of it. Before the fix it allocated and filled the whole payload.
#[test]
fn a_discard_of_1000_overlapping_1mib_segments_costs_no_memory_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let (be, img, sock) = backend(dir.path(), 64 << 20);
    let mut dev = connect(&sock, 64 << 20);
    let q = dev.queue(0);
    let hdr = header(q, T_DISCARD, 0);
    let page = q.mem().alloc(1 << 20, 4096);
    let st = status(q);
    let mut bufs = vec![(hdr, 16, false)];
    bufs.extend(std::iter::repeat_n((page, 1 << 20, false), 1000));
    bufs.push((st, 1, true));
    let head = q.add_indirect(&bufs);
    assert_eq!(complete(q), (head, 1));
    assert_eq!(q.mem().read_vec(st, 1), vec![S_IOERR]);
    let peak = peak_rss_kib(be.worker_pid());
    // The whole worker, guest memory mappings touched included, stays far below the payload.
    assert!(peak < 256 << 10, "worker peak RSS {peak} KiB");
    assert!(
        be.log().contains("more than the 32 the device offers"),
        "{}",
        be.log()
    );
    // The device goes on serving: a write and its read back.
    let data = vec![0x5au8; 4096];
    let q = dev.queue(0);
    let (hdr, buf, st) = (header(q, T_OUT, 8), q.mem().alloc(4096, 512), status(q));
    q.mem().write(buf, &data);
    let head = q.add(&[(hdr, 16, false), (buf, 4096, false), (st, 1, true)]);
    assert_eq!(complete(q), (head, 1));
    assert_eq!(q.mem().read_vec(st, 1), vec![S_OK]);
    let mut back = vec![0u8; 4096];
    std::fs::File::open(&img)
        .unwrap()
        .read_exact_at(&mut back, 8 * 512)
        .unwrap();
    assert_eq!(back, data);
}

/// A READ whose last descriptor (where the status would be) is device-readable: the device
/// must not write into it (virtio 1.2, 2.7.5.1); it returns the chain with nothing written.
#[test]
fn no_status_is_written_into_a_device_readable_descriptor() {
    let dir = tempfile::tempdir().unwrap();
    let (_be, _img, sock) = backend(dir.path(), 1 << 20);
    let mut dev = connect(&sock, 16 << 20);
    let q = dev.queue(0);
    let (hdr, buf, st) = (header(q, T_IN, 0), q.mem().alloc(512, 512), status(q));
    q.mem().write(buf, &[UNTOUCHED; 512]);
    let head = q.add(&[(hdr, 16, false), (buf, 512, true), (st, 1, false)]);
    assert_eq!(complete(q), (head, 0));
    assert_eq!(q.mem().read_vec(st, 1), vec![UNTOUCHED], "status written");
    assert_eq!(
        q.mem().read_vec(buf, 512),
        vec![UNTOUCHED; 512],
        "data read"
    );
}

/// A chain that loops (here inside an indirect table) is cut short and failed, never run as
/// the request its first descriptors describe.
#[test]
fn a_looping_indirect_chain_is_failed_not_executed() {
    let dir = tempfile::tempdir().unwrap();
    let (_be, img, sock) = backend(dir.path(), 1 << 20);
    let mut dev = connect(&sock, 16 << 20);
    let q = dev.queue(0);
    let (hdr, buf, st) = (header(q, T_OUT, 0), q.mem().alloc(512, 512), status(q));
    q.mem().write(buf, &[0x77; 512]);
    // The indirect table: hdr -> data -> status -> back to data, forever.
    let table = q.mem().alloc(3 * 16, 16);
    let desc = |addr: u64, len: u32, flags: u16, next: u16| {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        d
    };
    q.mem().write(table, &desc(hdr, 16, 1, 1));
    q.mem().write(table + 16, &desc(buf, 512, 1, 2));
    q.mem().write(table + 32, &desc(st, 1, 2 | 1, 1));
    let head = q.add_raw_descs(&[vhostbox_tests::frontend::Desc {
        addr: table,
        len: 48,
        flags: vhostbox_tests::frontend::VIRTQ_DESC_F_INDIRECT,
        next: 0,
    }]);
    let (id, _len) = complete(q);
    assert_eq!(id, head);
    let mut back = vec![0u8; 512];
    std::fs::File::open(&img)
        .unwrap()
        .read_exact_at(&mut back, 0)
        .unwrap();
    assert_eq!(back, vec![0; 512], "the looping write was executed");
    assert_ne!(q.mem().read_vec(st, 1), vec![S_OK]);
}

/// The relay's private listener cannot be used by a local process: in `--sandbox none` (the
/// worker shares the host's network namespace, so its abstract name shows in /proc/net/unix)
/// a connect while the worker waits finds no room, and once a frontend is served nothing
/// listens at all. Before the fix the listener stayed open and a local process could queue a
/// connection that the library took as the next frontend.
#[test]
fn a_local_process_gets_nothing_from_the_relay() {
    let dir = tempfile::tempdir().unwrap();
    let img = sparse_image(&dir.path().join("disk.img"), 1 << 20);
    let sock = dir.path().join("blk.sock");
    let be = Backend::blk(&sock, &img, &["--sandbox", "none"]);
    be.wait_log("ready; waiting for a frontend");
    let pid = be.worker_pid();
    let names = relay_names(pid);
    assert_eq!(names.len(), 1, "one relay listener: {names:?}");
    let e = connect_abstract(&names[0]).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EAGAIN), "while waiting: {e}");
    let _dev = connect(&sock, 16 << 20);
    let e = connect_abstract(&names[0]).unwrap_err();
    assert_eq!(
        e.raw_os_error(),
        Some(libc::ECONNREFUSED),
        "while serving: {e}"
    );
    assert!(relay_names(pid).is_empty());
}

/// The abstract names of the relay listeners of this host's network namespace that belong to
/// process `pid` (the name carries it).
fn relay_names(pid: i32) -> Vec<String> {
    let tag = format!("@vhostbox-relay-{pid}-");
    std::fs::read_to_string("/proc/net/unix")
        .unwrap()
        .lines()
        // Listening sockets: state 01 (unconnected) with the __SO_ACCEPTCON flag 00010000.
        .filter(|l| l.split_whitespace().nth(3) == Some("00010000"))
        .filter_map(|l| l.split_whitespace().nth(7))
        .filter(|n| n.starts_with(&tag))
        .map(|n| n[1..].to_owned())
        .collect()
}

fn connect_abstract(name: &str) -> std::io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    // SAFETY: socket(2) with constant arguments; the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0) };
    assert!(fd >= 0);
    let mut sa = libc::sockaddr_un {
        sun_family: libc::AF_UNIX as libc::sa_family_t,
        sun_path: [0; 108],
    };
    let name = addr.as_abstract_name().unwrap();
    for (d, &s) in sa.sun_path[1..].iter_mut().zip(name) {
        *d = s as libc::c_char;
    }
    let len = (2 + 1 + name.len()) as libc::socklen_t;
    // SAFETY: connect with an initialised address of `len` bytes on our socket.
    let r = unsafe { libc::connect(fd, (&sa as *const libc::sockaddr_un).cast(), len) };
    let e = std::io::Error::last_os_error();
    // SAFETY: closes the socket made above.
    unsafe { libc::close(fd) };
    if r == 0 {
        Ok(())
    } else {
        Err(e)
    }
}

/// SIGTERM right after a frontend hangs up, while the supervisor is starting the next worker,
/// must stop the backend cleanly: before the fix the new worker lost the signal (pid 1 of its
/// namespace, no handler yet), and the supervisor waited 10 s and SIGKILLed it.
#[test]
fn sigterm_while_the_next_worker_starts_is_not_lost() {
    for round in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let img = sparse_image(&dir.path().join("disk.img"), 1 << 20);
        let sock = dir.path().join("blk.sock");
        let mut be = Backend::blk(&sock, &img, &[]);
        let dev = connect(&sock, 16 << 20);
        let first = be.worker_pid();
        drop(dev);
        // The moment the next worker is forked.
        while be.worker_pid() == first {
            std::thread::yield_now();
        }
        let st = be.signal_and_wait(libc::SIGTERM);
        let log = be.log();
        assert!(st.success(), "round {round}: {st}\n{log}");
        assert!(
            !log.contains("did not stop in time"),
            "round {round}:\n{log}"
        );
        assert!(!sock.exists(), "round {round}: socket left behind");
    }
}
