//! NBD exports (`--nbd`), with real NBD servers as peers: qemu-nbd over a unix socket and
//! nbdkit over TCP, driven by libblkio through the real, jailed binary. Data is checked
//! against what the server holds (the image file qemu-nbd serves; a new worker's reads for
//! nbdkit's memory), and the connections are counted in the kernel's socket table.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use blkio::ReqFlags;
use vhostbox_tests::blkio_client::Client;
use vhostbox_tests::{pattern, qemu_nbd, run_to_exit, Backend, NbdServer};

const MIB: usize = 1 << 20;
const DISK: usize = 16 * MIB;
const BLOCK: usize = 4096;

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ok() {
        assert!(Instant::now() < deadline, "{what} never came");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// nbdkit's memory plugin (DISK bytes, in nbdkit's memory) on 127.0.0.1, on a free port.
fn nbdkit_memory() -> (NbdServer, u16) {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("nbdkit")
        .args(["--foreground", "--ipaddr", "127.0.0.1", "--port"])
        .arg(port.to_string())
        .args(["memory", &format!("size={DISK}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nbdkit");
    wait_for("nbdkit's port", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    (NbdServer(child), port)
}

/// Established TCP connections to `port` in this network namespace (the supervisor's,
/// where the workers' sockets were made).
fn connections_to(port: u16) -> usize {
    let t = std::fs::read_to_string("/proc/net/tcp").unwrap();
    t.lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[2].ends_with(&format!(":{port:04X}")) && f[3] == "01"
        })
        .count()
}

fn image_with_pattern(path: &Path) -> Vec<u8> {
    let mut model = vec![0u8; DISK];
    for (lba, b) in model.chunks_mut(BLOCK).enumerate() {
        pattern(b, lba as u64, 1);
    }
    std::fs::write(path, &model).unwrap();
    model
}

fn verify(c: &mut Client, q: usize, model: &[u8], what: &str) {
    const CHUNK: usize = 256 << 10;
    for off in (0..model.len()).step_by(CHUNK) {
        c.buf(0, CHUNK).fill(0xee);
        assert_eq!(c.read(q, off as u64, 0, CHUNK), 0, "{what}: read at {off}");
        assert!(
            c.buf(0, CHUNK) == &model[off..off + CHUNK],
            "{what}: the 256 KiB at {off} differ from the model"
        );
    }
}

fn write_at(c: &mut Client, q: usize, model: &mut [u8], off: usize, len: usize, gen: u64) {
    for (i, b) in c.buf(0, len).chunks_mut(BLOCK).enumerate() {
        pattern(b, (off / BLOCK + i) as u64, gen);
    }
    model[off..off + len].copy_from_slice(c.buf(0, len));
    assert_eq!(c.write(q, off as u64, 0, len), 0, "write at {off}");
}

fn flush(c: &mut Client, q: usize) {
    c.queues[q].flush(0, ReqFlags::empty());
    assert_eq!(c.one(q), 0, "flush");
}

/// vhostbox-blk serving the export at `uri` on `sock`, with `extra` arguments.
fn blk_nbd(sock: &Path, uri: &str, extra: &[&str]) -> Backend {
    let mut args = vec!["--socket-path", sock.to_str().unwrap(), "--nbd", uri];
    args.extend_from_slice(extra);
    Backend::start("vhostbox-blk", sock, &args)
}

fn unix_uri(sock: &Path) -> String {
    format!("nbd+unix:///?socket={}", sock.display())
}

struct Dir {
    _d: tempfile::TempDir,
    path: PathBuf,
}

fn dir() -> Dir {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().to_owned();
    Dir { _d: d, path }
}

#[test]
fn a_qemu_nbd_export_over_a_unix_socket_is_read_and_written() {
    let d = dir();
    let img = d.path.join("disk.raw");
    let mut model = image_with_pattern(&img);
    let nsock = d.path.join("nbd.sock");
    let _srv = qemu_nbd(&img, &nsock, &[]);
    let sock = d.path.join("blk.sock");
    let uri = unix_uri(&nsock);
    let mut be = blk_nbd(&sock, &uri, &["--num-queues", "2"]);
    let log = be.wait_log("ready");
    assert!(log.contains("NBD export nbd+unix:///?socket="), "{log}");
    let mut c = Client::connect(&sock, 2, 2 * MIB);
    assert_eq!(c.blkio.get_u64("capacity").unwrap(), DISK as u64);
    verify(&mut c, 0, &model, "the export");
    write_at(&mut c, 0, &mut model, 0, 8 * BLOCK, 2);
    write_at(&mut c, 1, &mut model, 3 * MIB + BLOCK, MIB, 3);
    c.queues[1].write_zeroes((8 * MIB) as u64, (256 << 10) as u64, 0, ReqFlags::empty());
    assert_eq!(c.one(1), 0, "write-zeroes");
    model[8 * MIB..8 * MIB + (256 << 10)].fill(0);
    c.queues[0].discard((12 * MIB) as u64, MIB as u64, 0, ReqFlags::empty());
    assert_eq!(c.one(0), 0, "discard");
    flush(&mut c, 0);
    verify(&mut c, 1, &model[..12 * MIB], "after the writes");
    drop(c);
    assert!(be.signal_and_wait(libc::SIGTERM).success());
    // What qemu-nbd wrote into its image, read from the file.
    let disk = std::fs::read(&img).unwrap();
    assert!(
        disk[..12 * MIB] == model[..12 * MIB],
        "the image does not hold what was written"
    );
}

#[test]
fn an_nbdkit_export_over_tcp_gets_one_connection_per_queue() {
    let d = dir();
    let (_srv, port) = nbdkit_memory();
    let sock = d.path.join("blk.sock");
    let uri = format!("nbd://127.0.0.1:{port}");
    let be = blk_nbd(&sock, &uri, &["--num-queues", "2"]);
    let log = be.wait_log("ready; waiting for a frontend");
    assert!(
        log.contains("2 connection(s) per worker, multi-conn"),
        "{log}"
    );
    // The idle worker holds its two connections; the start-up probe's is gone.
    wait_for("two connections", || connections_to(port) == 2);
    let mut model = vec![0u8; DISK];
    let mut c = Client::connect(&sock, 2, 2 * MIB);
    write_at(&mut c, 0, &mut model, 0, MIB, 4);
    write_at(&mut c, 1, &mut model, 5 * MIB, MIB, 5);
    flush(&mut c, 1);
    verify(&mut c, 0, &model, "queue 0");
    verify(&mut c, 1, &model, "queue 1");
    drop(c);
    // The next worker, on new connections, reads what the server kept.
    be.wait_log_count("ready; waiting for a frontend", 2);
    wait_for("two new connections", || connections_to(port) == 2);
    let mut c = Client::connect(&sock, 2, 2 * MIB);
    verify(&mut c, 1, &model, "in the next worker");
}

#[test]
fn when_the_server_goes_away_the_next_worker_reconnects() {
    let d = dir();
    let img = d.path.join("disk.raw");
    let mut model = image_with_pattern(&img);
    let nsock = d.path.join("nbd.sock");
    let srv = qemu_nbd(&img, &nsock, &[]);
    let sock = d.path.join("blk.sock");
    let uri = unix_uri(&nsock);
    let be = blk_nbd(&sock, &uri, &[]);
    let mut c = Client::connect(&sock, 1, 2 * MIB);
    write_at(&mut c, 0, &mut model, MIB, MIB, 6);
    flush(&mut c, 0);
    drop(srv);
    // The next request finds the connection dead: the worker ends without completing it.
    let p = c.ptr(0);
    c.queues[0].read(0, p, BLOCK, 0, ReqFlags::empty());
    let mut none: [std::mem::MaybeUninit<blkio::Completion>; 0] = [];
    let mut now = Duration::ZERO;
    let _ = c.queues[0].do_io(&mut none, 0, Some(&mut now), None);
    be.wait_log("lost its connection to the backing store");
    drop(c);
    be.wait_log("cannot prepare the next worker: cannot reach the NBD server");
    let _srv = qemu_nbd(&img, &nsock, &[]);
    be.wait_log_count("ready; waiting for a frontend", 2);
    let mut c = Client::connect(&sock, 1, 2 * MIB);
    verify(&mut c, 0, &model, "after the server came back");
}

#[test]
fn what_cannot_be_served_is_refused_at_start() {
    let d = dir();
    let img = d.path.join("disk.raw");
    image_with_pattern(&img);
    let nsock = d.path.join("nbd.sock");
    let _srv = qemu_nbd(&img, &nsock, &["--read-only", "-x", "vm1"]);
    let sock = d.path.join("blk.sock");
    let s = sock.to_str().unwrap();
    let ro = format!("nbd+unix:///vm1?socket={}", nsock.display());
    let wrong = format!("nbd+unix:///other?socket={}", nsock.display());
    let gone = format!("nbd+unix:///?socket={}", d.path.join("none.sock").display());
    for (args, want) in [
        (vec!["--nbd", gone.as_str()], "cannot reach the NBD server"),
        (vec!["--nbd", wrong.as_str()], "NBD handshake with"),
        (vec!["--nbd", ro.as_str()], "is read-only: give --readonly"),
        (
            vec!["--nbd", "nbds://127.0.0.1/e"],
            "TLS (nbds) is not supported",
        ),
        (vec!["--nbd", "nbd://127.0.0.1:0/"], "bad port"),
    ] {
        let mut all = vec!["--socket-path", s];
        all.extend(&args);
        let (code, err) = run_to_exit("vhostbox-blk", &all);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: want '{want}' in {err}");
    }
    // Read-only, it is served, and refuses writes itself.
    let _be = blk_nbd(&sock, &ro, &["--readonly"]);
    let mut c = Client::connect_as(&sock, 1, 64 << 10, true);
    assert_eq!(c.read(0, 0, 0, BLOCK), 0);
    let mut want = vec![0u8; BLOCK];
    pattern(&mut want, 0, 1);
    assert!(
        c.buf(0, BLOCK) == &want[..],
        "wrong data from the read-only export"
    );
}
