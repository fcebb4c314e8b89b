//! The test-only fourth backend, vhostbox-testdev (tests/src/bin), which has nothing but its
//! device logic: the shared launcher gives it the jail, the supervisor and the one-worker-per-
//! connection lifecycle, and it serves a real vhost-user frontend with verified data.

use std::time::Duration;

use vhostbox_tests::frontend::{VhostUserDevice, VIRTIO_F_VERSION_1};
use vhostbox_tests::{assert_jailed, Backend};

/// Fills a chain (16 readable bytes, then 4096 + 100 writable) and checks every byte; returns
/// the connection, still open.
fn fill_once(sock: &std::path::Path, byte: u8) -> VhostUserDevice {
    let mut dev = VhostUserDevice::connect(sock, 1, 256, VIRTIO_F_VERSION_1, 1 << 20).unwrap();
    let mem = dev.mem().clone();
    let (ro, a, b) = (mem.alloc(16, 16), mem.alloc(4096, 16), mem.alloc(100, 16));
    mem.write(ro, &[7; 16]);
    let q = dev.queue(0);
    let head = q.add(&[(ro, 16, false), (a, 4096, true), (b, 100, true)]);
    q.kick();
    let (id, len) = q.wait_used(Duration::from_secs(10)).expect("completion");
    assert_eq!((id, len), (head, 4196));
    assert!(mem.read_vec(a, 4096).iter().all(|&x| x == byte));
    assert!(mem.read_vec(b, 100).iter().all(|&x| x == byte));
    assert_eq!(
        mem.read_vec(ro, 16),
        vec![7; 16],
        "a readable buffer was written"
    );
    dev
}

#[test]
fn a_fourth_backend_gets_the_launcher_jail_and_lifecycle() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("fill.sock");
    let s = sock.to_str().unwrap();
    let mut be = Backend::start(
        "vhostbox-testdev",
        &sock,
        &["--socket-path", s, "--byte", "92"],
    );
    let conn = fill_once(&sock, 92);
    let first = be.worker_pid();
    assert_jailed(first);
    // The next frontend is served by a fresh worker, also jailed.
    drop(conn);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while be.worker_pid() == first {
        assert!(std::time::Instant::now() < deadline, "no new worker");
        std::thread::sleep(Duration::from_millis(10));
    }
    let conn = fill_once(&sock, 92);
    let second = be.worker_pid();
    assert_ne!(first, second);
    assert_jailed(second);
    assert!(
        be.log().contains(&format!("worker {first} finished")),
        "{}",
        be.log()
    );
    drop(conn);
    // A clean stop removes the socket.
    let st = be.signal_and_wait(libc::SIGTERM);
    assert!(st.success(), "{st}: {}", be.log());
    assert!(!sock.exists());
}

#[test]
fn a_bad_flag_of_the_fourth_backend_is_a_usage_error() {
    let out = std::process::Command::new(vhostbox_tests::bin_path("vhostbox-testdev"))
        .args(["--socket-path", "/tmp/x.sock", "--byte", "300"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = std::process::Command::new(vhostbox_tests::bin_path("vhostbox-testdev"))
        .args([
            "--socket-path",
            "/tmp/x.sock",
            "--sandbox",
            "chroot",
            "--user",
            "0",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("vhostbox-testdev: "), "{err}");
}
