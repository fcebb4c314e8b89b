//! Protocol tests: the real vhostbox-blk binary driven by libblkio's virtio-blk-vhost-user
//! driver (the `blkio` crate), a complete vhost-user frontend. Every device test runs on both
//! engines. Data is verified through the frontend and in the image file on the host.

use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use blkio::{Blkio, ReqFlags};
use vhostbox_tests::blkio_client::Client;
use vhostbox_tests::{pattern, run_to_exit, sparse_image, Backend, SmallFs};

const ENGINES: [&str; 2] = ["io-uring", "sync"];
const BLK: &str = "vhostbox-blk";

fn image(dir: &Path, size: u64) -> std::path::PathBuf {
    sparse_image(&dir.join("disk.img"), size)
}

fn start(dir: &Path, engine: &str, extra: &[&str]) -> Backend {
    let sock = dir.join("blk.sock");
    let img = dir.join("disk.img");
    let mut args = vec!["--socket-path", sock.to_str().unwrap(), "--engine", engine];
    if !extra.contains(&"--null") {
        args.extend(["--image", img.to_str().unwrap()]);
    }
    args.extend_from_slice(extra);
    Backend::start(BLK, &sock, &args)
}

/// Random 4k writes then reads over 2 queues at queue depth 32, each block's content unique
/// to its position and round; verified through the frontend and in the image on the host.
/// Both engines, with the workers sleeping between passes (no polling) and polling for as
/// long as they may.
#[test]
fn verified_io_two_queues_qd32() {
    for (engine, poll) in ENGINES.iter().flat_map(|&e| [(e, "0"), (e, "1000")]) {
        let label = format!("{engine}, --poll-max-us {poll}");
        let dir = tempfile::tempdir().unwrap();
        let size = 32u64 << 20;
        let img = image(dir.path(), size);
        let be = start(
            dir.path(),
            engine,
            &["--num-queues", "2", "--poll-max-us", poll],
        );
        const QD: usize = 32;
        const BS: usize = 4096;
        let mut c = Client::connect(&be.socket, 2, 2 * QD * BS);
        assert_eq!(c.queues.len(), 2);
        let blocks = size / BS as u64;
        let mut written = std::collections::HashMap::new();
        let mut rng = 0x1234_5678_u64;
        for round in 0..8u64 {
            for q in 0..2 {
                for i in 0..QD {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    // distinct lbas per batch: stride by queue and slot
                    let lba = (rng % (blocks / 64)) * 64 + (q * QD + i) as u64 % 64;
                    let boff = (q * QD + i) * BS;
                    pattern(c.buf(boff, BS), lba, round);
                    written.insert(lba, round);
                    let p = c.ptr(boff);
                    c.queues[q].write(lba * BS as u64, p, BS, boff, ReqFlags::empty());
                }
            }
            for q in 0..2 {
                for (_, ret) in c.wait(q, QD) {
                    assert_eq!(ret, 0, "{label}: write failed");
                }
            }
        }
        // Read everything back at QD32 per queue.
        let lbas: Vec<(u64, u64)> = written.iter().map(|(&l, &g)| (l, g)).collect();
        let mut expect = vec![0u8; BS];
        for batch in lbas.chunks(2 * QD) {
            for (j, &(lba, _)) in batch.iter().enumerate() {
                let q = j % 2;
                let boff = j * BS;
                c.buf(boff, BS).fill(0xee);
                let p = c.ptr(boff);
                c.queues[q].read(lba * BS as u64, p, BS, j, ReqFlags::empty());
            }
            let n0 = batch.len().div_ceil(2);
            let mut done = c.wait(0, n0);
            done.extend(c.wait(1, batch.len() - n0));
            for (j, ret) in done {
                assert_eq!(ret, 0, "{label}: read failed");
                let (lba, g) = batch[j];
                pattern(&mut expect, lba, g);
                assert!(
                    c.buf(j * BS, BS) == &expect[..],
                    "{label}: lba {lba} mismatch"
                );
            }
        }
        drop(c);
        // The host image holds exactly what the guest wrote.
        let f = fs::File::open(&img).unwrap();
        let mut got = vec![0u8; BS];
        for (&lba, &g) in &written {
            f.read_exact_at(&mut got, lba * BS as u64).unwrap();
            pattern(&mut expect, lba, g);
            assert!(got == expect, "{label}: image lba {lba} mismatch");
        }
    }
}

/// Capacity, block size and read-only flag as the frontend sees them.
#[test]
fn reports_geometry() {
    for engine in ENGINES {
        for (lbs, extra) in [
            (512u64, vec![]),
            (4096, vec!["--logical-block-size", "4096"]),
        ] {
            let dir = tempfile::tempdir().unwrap();
            image(dir.path(), 48 << 20);
            let be = start(dir.path(), engine, &extra);
            let c = Client::connect(&be.socket, 1, 4096);
            assert_eq!(c.blkio.get_u64("capacity").unwrap(), 48 << 20);
            assert_eq!(c.blkio.get_i32("request-alignment").unwrap() as u64, lbs);
            assert!(!c.blkio.get_bool("read-only").unwrap());
        }
    }
}

/// Flush succeeds; write-zeroes reads back as zeros through the device and on the host;
/// discard succeeds and leaves the rest intact.
#[test]
fn flush_discard_write_zeroes() {
    for engine in ENGINES {
        let dir = tempfile::tempdir().unwrap();
        let img = image(dir.path(), 8 << 20);
        fs::write(&img, vec![0x5au8; 8 << 20]).unwrap();
        let be = start(dir.path(), engine, &[]);
        let mut c = Client::connect(&be.socket, 1, 1 << 20);
        c.queues[0].flush(0, ReqFlags::empty());
        assert_eq!(c.one(0), 0, "{engine}: flush");
        c.queues[0].write_zeroes(1 << 20, 256 << 10, 0, ReqFlags::empty());
        assert_eq!(c.one(0), 0, "{engine}: write-zeroes (may unmap)");
        c.queues[0].write_zeroes(3 << 20, 64 << 10, 0, ReqFlags::NO_UNMAP);
        assert_eq!(c.one(0), 0, "{engine}: write-zeroes (no unmap)");
        c.queues[0].discard(5 << 20, 1 << 20, 0, ReqFlags::empty());
        assert_eq!(c.one(0), 0, "{engine}: discard");
        c.buf(0, 1 << 20).fill(0xff);
        assert_eq!(c.read(0, 1 << 20, 0, 1 << 20), 0);
        assert!(
            c.buf(0, 256 << 10).iter().all(|&b| b == 0),
            "{engine}: zeros via device"
        );
        assert!(
            c.buf(256 << 10, 768 << 10).iter().all(|&b| b == 0x5a),
            "{engine}: neighbour"
        );
        assert_eq!(c.read(0, 3 << 20, 0, 128 << 10), 0);
        assert!(c.buf(0, 64 << 10).iter().all(|&b| b == 0));
        assert!(c.buf(64 << 10, 64 << 10).iter().all(|&b| b == 0x5a));
        drop(c);
        let host = fs::read(&img).unwrap();
        assert!(host[1 << 20..(1 << 20) + (256 << 10)]
            .iter()
            .all(|&b| b == 0));
        assert!(host[..1 << 20].iter().all(|&b| b == 0x5a));
        assert!(host[(3 << 20) + (64 << 10)..5 << 20]
            .iter()
            .all(|&b| b == 0x5a));
        // The discard reached the file: a hole was punched where it was (a device that
        // acknowledged discards without doing them would fail here).
        assert!(host[5 << 20..6 << 20].iter().all(|&b| b == 0), "{engine}");
        let f = fs::File::open(&img).unwrap();
        // SAFETY: lseek on an fd we own.
        let hole = unsafe { libc::lseek(f.as_raw_fd(), 5 << 20, libc::SEEK_HOLE) };
        assert_eq!(hole, 5 << 20, "{engine}: no hole where the discard was");
        // SAFETY: lseek on an fd we own.
        let data = unsafe { libc::lseek(f.as_raw_fd(), 5 << 20, libc::SEEK_DATA) };
        assert!(
            data >= 6 << 20,
            "{engine}: data at {data} inside the discarded range"
        );
    }
}

/// A read-only device advertises VIRTIO_BLK_F_RO (libblkio refuses to start it writable),
/// serves reads, and no write reaches the image. (libblkio itself fails writes to a read-only
/// device before sending them; the device's own refusal of writes that do arrive is proven by
/// the unit tests on mock queues and by the VM test.)
#[test]
fn readonly_refuses_writes() {
    for engine in ENGINES {
        let dir = tempfile::tempdir().unwrap();
        let img = image(dir.path(), 4 << 20);
        fs::write(&img, vec![0x33u8; 4 << 20]).unwrap();
        let be = start(dir.path(), engine, &["--readonly"]);
        {
            let mut b = Blkio::new("virtio-blk-vhost-user").unwrap();
            b.set_str("path", be.socket.to_str().unwrap()).unwrap();
            b.connect().unwrap();
            let e = b
                .start()
                .err()
                .expect("a writable start of a read-only device must fail");
            assert!(e.message().contains("read-only"), "{}", e.message());
        }
        let mut c = {
            let mut blkio = Blkio::new("virtio-blk-vhost-user").unwrap();
            blkio.set_str("path", be.socket.to_str().unwrap()).unwrap();
            blkio.set_bool("read-only", true).unwrap();
            blkio.connect().unwrap();
            let out = blkio.start().expect("read-only start");
            let region = blkio.alloc_mem_region(64 << 10).unwrap();
            blkio.map_mem_region(&region).unwrap();
            Client {
                blkio,
                queues: out.queues,
                region,
            }
        };
        assert_eq!(c.read(0, 0, 0, 64 << 10), 0);
        assert!(c.buf(0, 64 << 10).iter().all(|&b| b == 0x33));
        c.buf(0, 4096).fill(0x44);
        assert_ne!(c.write(0, 0, 0, 4096), 0, "{engine}: write must fail");
        c.queues[0].write_zeroes(0, 4096, 0, ReqFlags::empty());
        assert_ne!(c.one(0), 0, "{engine}: write-zeroes must fail");
        drop(c);
        assert!(fs::read(&img).unwrap().iter().all(|&b| b == 0x33));
    }
}

/// The frontend goes away and a new one connects to the same socket: data written by the first
/// is read by the second, and the backend served both without restarting.
#[test]
fn reconnect_keeps_data() {
    for engine in ENGINES {
        let dir = tempfile::tempdir().unwrap();
        image(dir.path(), 8 << 20);
        let mut be = start(dir.path(), engine, &["--num-queues", "2"]);
        let pid = be.child.id();
        for round in 0..3u64 {
            let mut c = Client::connect(&be.socket, 2, 64 << 10);
            if round > 0 {
                assert_eq!(c.read(1, (round - 1) * 65536, 0, 65536), 0);
                let mut expect = vec![0u8; 65536];
                pattern(&mut expect, round - 1, 7);
                assert!(
                    c.buf(0, 65536) == &expect[..],
                    "{engine}: data lost over reconnect"
                );
            }
            pattern(c.buf(0, 65536), round, 7);
            assert_eq!(c.write(0, round * 65536, 0, 65536), 0);
            drop(c);
            assert!(
                be.alive(),
                "{engine}: backend died on disconnect: {}",
                be.log()
            );
        }
        assert_eq!(be.child.id(), pid);
        assert!(be.log().matches("frontend connected").count() >= 3);
    }
}

/// Requests beyond the end fail with an error; the device keeps serving afterwards.
#[test]
fn out_of_range_fails_cleanly() {
    for engine in ENGINES {
        let dir = tempfile::tempdir().unwrap();
        image(dir.path(), 1 << 20);
        let mut be = start(dir.path(), engine, &[]);
        let mut c = Client::connect(&be.socket, 1, 8192);
        // libblkio checks ranges itself for reads/writes; cross the end by a sector via a
        // write-zeroes the driver forwards as is.
        c.queues[0].write_zeroes((1 << 20) - 512, 1024, 0, ReqFlags::empty());
        assert_ne!(c.one(0), 0, "{engine}: write-zeroes past the end must fail");
        assert_eq!(
            c.read(0, (1 << 20) - 4096, 0, 4096),
            0,
            "{engine}: still serving"
        );
        drop(c);
        assert!(be.alive());
    }
}

/// The null device reads zeros and accepts writes.
#[test]
fn null_device() {
    for engine in ENGINES {
        let dir = tempfile::tempdir().unwrap();
        let be = start(dir.path(), engine, &["--null", "1G", "--num-queues", "2"]);
        let mut c = Client::connect(&be.socket, 2, 1 << 20);
        assert_eq!(c.blkio.get_u64("capacity").unwrap(), 1 << 30);
        c.buf(0, 1 << 20).fill(0xaa);
        assert_eq!(c.write(1, 0, 0, 1 << 20), 0);
        assert_eq!(c.read(0, 512 << 20, 0, 1 << 20), 0);
        assert!(c.buf(0, 1 << 20).iter().all(|&b| b == 0));
    }
}

/// SIGTERM while a frontend is connected: clean exit 0, socket removed.
#[test]
fn sigterm_clean_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    image(dir.path(), 1 << 20);
    let mut be = start(dir.path(), "io-uring", &[]);
    let mut c = Client::connect(&be.socket, 1, 4096);
    assert_eq!(c.read(0, 0, 0, 4096), 0);
    let st = be.signal_and_wait(libc::SIGTERM);
    assert_eq!(st.code(), Some(0), "{}", be.log());
    assert!(!be.socket.exists(), "socket file left behind");
    drop(c);
    // Idle backend, SIGINT.
    let mut be = start(dir.path(), "sync", &[]);
    let st = be.signal_and_wait(libc::SIGINT);
    assert_eq!(st.code(), Some(0));
    assert!(!be.socket.exists());
}

/// An inherited listening socket (--fd), as systemd or libvirt would pass it.
#[test]
fn inherited_listener_fd() {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), 1 << 20);
    let sock = dir.path().join("inherited.sock");
    let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let fd = l.as_raw_fd();
    let mut cmd = std::process::Command::new(vhostbox_tests::bin_path(BLK));
    cmd.args(["--fd", "3", "--image", img.to_str().unwrap()]);
    // SAFETY: dup2 and fcntl are async-signal-safe; runs in the child before exec.
    unsafe {
        cmd.pre_exec(move || {
            // dup2 onto itself would keep FD_CLOEXEC: clear it explicitly then.
            let r = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    drop(l);
    let mut c = Client::connect(&sock, 1, 4096);
    c.buf(0, 4096).fill(9);
    assert_eq!(c.write(0, 4096, 0, 4096), 0);
    drop(c);
    // SAFETY: kill() on our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(child.wait().unwrap().code(), Some(0));
    // An inherited socket's path is the launcher's to remove.
    assert!(sock.exists());
    assert_eq!(&fs::read(&img).unwrap()[4096..8192], &[9u8; 4096][..]);
}

/// Configuration errors: one line naming the problem, exit status 2, nothing created.
#[test]
fn config_errors_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sock = d.join("s.sock");
    let s = sock.to_str().unwrap();
    let odd = d.join("odd.img");
    fs::write(&odd, vec![0u8; 1000]).unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--socket-path", s, "--image", "/nonexistent/disk.img"],
            "/nonexistent/disk.img",
        ),
        (
            vec!["--socket-path", s, "--image", odd.to_str().unwrap()],
            "not a multiple",
        ),
        (
            vec!["--socket-path", s, "--image", "/dev/null"],
            "neither a regular file",
        ),
        (vec!["--socket-path", s, "--null", "12X"], "invalid size"),
        (
            vec!["--socket-path", s, "--null", "1G", "--num-queues", "0"],
            "--num-queues",
        ),
        (
            vec!["--socket-path", s, "--null", "1G", "--queue-size", "100"],
            "--queue-size",
        ),
        (
            vec!["--socket-path", s, "--null", "1G", "--engine", "aio"],
            "invalid engine",
        ),
        (
            vec!["--socket-path", s, "--null", "1G", "--poll-max-us", "5000"],
            "--poll-max-us 5000 is out of range",
        ),
        (
            vec!["--socket-path", s, "--null", "1G", "--frobnicate"],
            "--frobnicate",
        ),
        (vec!["--fd", "99", "--null", "1G"], "--fd 99"),
        (
            vec!["--socket-path", "/nonexistent/dir/s.sock", "--null", "1G"],
            "cannot bind",
        ),
    ];
    for (args, needle) in cases {
        let (code, err) = run_to_exit(BLK, &args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: '{err}' lacks '{needle}'");
        assert!(!sock.exists(), "{args:?} left a socket behind");
    }
    // A socket path another backend is listening on is busy.
    let be = Backend::start(BLK, &sock, &["--socket-path", s, "--null", "1G"]);
    let (code, err) = run_to_exit(BLK, &["--socket-path", s, "--null", "1G"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("busy"), "{err}");
    drop(be);
}

/// --help reads like a man page: description, every fixed flag, examples, exit status.
#[test]
fn help_is_a_man_page() {
    let out = std::process::Command::new(vhostbox_tests::bin_path(BLK))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let h = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--socket-path",
        "--image",
        "--readonly",
        "--num-queues",
        "--queue-size",
        "--serial",
        "--direct",
        "--engine",
        "--logical-block-size",
        "--null",
        "--fd",
        "EXAMPLES",
        "EXIT STATUS",
    ] {
        assert!(h.contains(flag), "--help lacks {flag}");
    }
}

/// The image sits on a 4 MiB tmpfs that a filler file has nearly filled. Writes that need new
/// space fail with an I/O error; reads and writes of space the image already has keep working
/// meanwhile, and what was written before is intact; once the filler is gone the same writes
/// succeed. The backend stays up throughout.
#[test]
fn full_backing_store_fails_only_the_requests_it_hits() {
    for engine in ENGINES {
        let fs_ = SmallFs::new(4);
        let img = fs_.path().join("disk.img");
        sparse_image(&img, 16 << 20);
        let filler = fs_.path().join("filler");
        fs::write(&filler, vec![1u8; 3 << 20]).unwrap();
        let sock = fs_.path().join("blk.sock");
        let mut be = Backend::blk(&sock, &img, &["--engine", engine]);
        let mut c = Client::connect(&be.socket, 1, 2 << 20);
        // 256 KiB fit.
        pattern(c.buf(0, 256 << 10), 0, 1);
        assert_eq!(c.write(0, 0, 0, 256 << 10), 0, "{engine}: first write");
        // 1 MiB elsewhere does not: an error, not a hang or a dead backend.
        pattern(c.buf(1 << 20, 1 << 20), 2048, 2);
        let r = c.write(0, 8 << 20, 1 << 20, 1 << 20);
        assert!(
            r < 0,
            "{engine}: a write to a full backing store succeeded ({r})"
        );
        // Meanwhile: what was written reads back, and space the image has is still writable.
        c.buf(0, 256 << 10).fill(0);
        assert_eq!(c.read(0, 0, 0, 256 << 10), 0, "{engine}: read while full");
        let mut want = vec![0u8; 256 << 10];
        pattern(&mut want, 0, 1);
        assert!(c.buf(0, 256 << 10) == &want[..], "{engine}: data changed");
        pattern(c.buf(0, 4096), 0, 3);
        assert_eq!(c.write(0, 0, 0, 4096), 0, "{engine}: overwrite while full");
        // The cause goes away: the same write succeeds and reads back.
        fs::remove_file(&filler).unwrap();
        pattern(c.buf(1 << 20, 1 << 20), 2048, 2);
        assert_eq!(
            c.write(0, 8 << 20, 1 << 20, 1 << 20),
            0,
            "{engine}: after freeing"
        );
        c.buf(1 << 20, 1 << 20).fill(0);
        assert_eq!(c.read(0, 8 << 20, 1 << 20, 1 << 20), 0);
        let mut want = vec![0u8; 1 << 20];
        pattern(&mut want, 2048, 2);
        assert!(c.buf(1 << 20, 1 << 20) == &want[..], "{engine}: read back");
        drop(c);
        assert!(be.alive(), "{engine}: the backend died");
        let log = be.log();
        assert!(
            log.contains("No space left on device") || log.contains("short transfer"),
            "{engine}: the error is not in the log:\n{log}"
        );
    }
}

/// systemd socket activation: `systemd-socket-activate` binds the socket and passes it as fd 3
/// with LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES. It takes precedence over --socket-path, which is
/// then never created; the socket file is the service manager's, so it stays at exit.
#[test]
fn systemd_socket_activation_serves_a_libblkio_client() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), 1 << 20);
    let sock = dir.path().join("activated.sock");
    let ignored = dir.path().join("ignored.sock");
    let log_path = dir.path().join("backend.log");
    let mut child = std::process::Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(&sock)
        .args(["--fdname=vhost-user", "-E", "VHOSTBOX_LOG=debug"])
        .arg(vhostbox_tests::bin_path(BLK))
        .args(["--image", img.to_str().unwrap(), "--socket-path"])
        .arg(&ignored)
        .stderr(fs::File::create(&log_path).unwrap())
        .spawn()
        .expect("systemd-socket-activate (apt install systemd)");
    let log = || fs::read_to_string(&log_path).unwrap_or_default();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        assert!(std::time::Instant::now() < deadline, "no socket: {}", log());
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut c = Client::connect(&sock, 1, 8192);
    pattern(c.buf(0, 4096), 3, 1);
    assert_eq!(c.write(0, 3 * 4096, 0, 4096), 0);
    assert_eq!(c.read(0, 3 * 4096, 4096, 4096), 0);
    let (w, r) = {
        let b = c.buf(0, 8192);
        (b[..4096].to_vec(), b[4096..].to_vec())
    };
    assert_eq!(w, r, "read back what was written");
    drop(c);
    // SAFETY: kill() on our child (systemd-socket-activate exec'd the backend: same pid).
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(child.wait().unwrap().code(), Some(0), "{}", log());
    let l = log();
    assert!(
        l.contains("listening on the socket systemd passed: fd 3 ('vhost-user')"),
        "{l}"
    );
    assert!(!ignored.exists(), "--socket-path must yield to LISTEN_FDS");
    let mut host = vec![0u8; 4096];
    fs::File::open(&img)
        .unwrap()
        .read_exact_at(&mut host, 3 * 4096)
        .unwrap();
    assert_eq!(host, w, "the data is in the image");
}
