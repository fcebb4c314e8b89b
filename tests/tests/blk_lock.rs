//! Image locking against the real QEMU tools: qemu-io (QEMU's block layer in a command-line
//! tool) and qemu-storage-daemon take and check the same OFD lock bytes as vhostbox-blk, so
//! each side refuses the other, and two vhostbox-blk writers refuse each other. The image is
//! checked unchanged after every refusal.

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vhostbox_tests::{blk_args, run_to_exit, sparse_image, Backend};

const BLK: &str = "vhostbox-blk";

/// qemu-io writing 4 KiB of 0x5a at offset 0 of the raw image: (success, its output).
fn qemu_io_write(img: &Path) -> (bool, String) {
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x5a 0 4k"])
        .arg(img)
        .output()
        .expect("qemu-io (qemu-utils)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success() && !text.contains("Failed"), text)
}

fn first_block(img: &Path) -> Vec<u8> {
    fs::read(img).unwrap()[..4096].to_vec()
}

#[test]
fn qemu_cannot_write_an_image_vhostbox_serves_and_readers_share() {
    let d = tempfile::tempdir().unwrap();
    let img = sparse_image(&d.path().join("disk.img"), 1 << 20);
    let sock = d.path().join("blk.sock");
    let mut be = Backend::blk(&sock, &img, &[]);
    let log = be.wait_log("locked (QEMU's OFD locks)");
    assert!(
        log.contains("uses consistent read, write; shares no write, resize"),
        "{log}"
    );
    let (ok, out) = qemu_io_write(&img);
    assert!(!ok, "qemu-io wrote an image vhostbox-blk serves: {out}");
    assert!(out.contains("lock"), "QEMU names the lock: {out}");
    assert_eq!(first_block(&img), vec![0u8; 4096], "nothing was written");

    // Another vhostbox-blk, writable or read-only, is refused with exit 2 and one line.
    let sock2 = d.path().join("blk2.sock");
    let (code, err) = run_to_exit(BLK, &blk_args(&sock2, &img, &[]));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("is in use") && err.contains("does not share the write permission"),
        "{err}"
    );
    let (code, err) = run_to_exit(BLK, &blk_args(&sock2, &img, &["--readonly"]));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("holds the write permission"), "{err}");
    assert!(!sock2.exists());

    // Once it stops, QEMU may write at once: the locks are on an open of their own, which no
    // worker's io_uring keeps alive after the process.
    be.signal_and_wait(libc::SIGTERM);
    let (ok, out) = qemu_io_write(&img);
    assert!(ok, "{out}");
    assert_eq!(first_block(&img), vec![0x5au8; 4096]);

    // Read-only backends share the image with each other, and still keep writers out.
    let ro1 = Backend::blk(&sock, &img, &["--readonly"]);
    let ro2 = Backend::blk(&sock2, &img, &["--readonly"]);
    ro2.wait_log("locked (QEMU's OFD locks): uses consistent read; shares no write, resize");
    let (ok, out) = qemu_io_write(&img);
    assert!(!ok, "qemu-io wrote an image served read-only: {out}");
    drop((ro1, ro2));
}

/// qemu-storage-daemon serving the image writable over its own vhost-user-blk export.
fn qsd(img: &Path, sock: &Path) -> Child {
    let child = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=file0,filename={}",
            img.display()
        ))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e0,node-name=file0,addr.type=unix,addr.path={},writable=on",
            sock.display()
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-storage-daemon (qemu-system-common)");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        assert!(
            Instant::now() < deadline,
            "qemu-storage-daemon never listened"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

#[test]
fn vhostbox_refuses_an_image_qemu_writes_unless_told_lock_off() {
    let d = tempfile::tempdir().unwrap();
    let img = sparse_image(&d.path().join("disk.img"), 1 << 20);
    let mut q = qsd(&img, &d.path().join("qsd.sock"));
    let sock = d.path().join("blk.sock");
    for extra in [&[][..], &["--readonly"][..]] {
        let (code, err) = run_to_exit(BLK, &blk_args(&sock, &img, extra));
        assert_eq!(code, 2, "{extra:?}: {err}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(
            err.contains("is in use") && err.contains("--lock off"),
            "{err}"
        );
        assert!(!sock.exists());
    }
    // --lock off: served, with a warning that says what it risks.
    let be = Backend::blk(&sock, &img, &["--lock", "off"]);
    let log = be.wait_log("not locked (--lock off)");
    assert!(log.contains("WARN"), "{log}");
    drop(be);
    let _ = q.kill();
    let _ = q.wait();
    let (code, err) = run_to_exit(BLK, &["--lock", "maybe", "--null", "1M"]);
    assert_eq!(code, 2, "{err}");
}
