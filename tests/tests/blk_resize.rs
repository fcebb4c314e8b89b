//! Online resize (`resize` on `--control`), against the real jailed binary driven by the test
//! frontend (the `vhost` crate's `Frontend`), which sets up the backend channel
//! (VHOST_USER_PROTOCOL_F_BACKEND_REQ) as QEMU does and reads what arrives on it.
//!
//! What is checked is data and messages: the image file's size and content, the capacity in
//! the config space, VHOST_USER_BACKEND_CONFIG_CHANGE_MSG on the channel, requests past the old
//! end that succeed (and past the new end that fail), and the worker's file-size limit.

use std::io::Read;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::VhostUserFrontend;
use vhostbox_tests::blkreq::{self, *};
use vhostbox_tests::frontend::{DeviceOptions, VhostUserDevice, VIRTIO_F_VERSION_1};
use vhostbox_tests::{pattern, vhostboxctl, Backend};

const MB: u64 = 1 << 20;

fn connect(be: &Backend) -> (VhostUserDevice, UnixStream) {
    let opts = DeviceOptions {
        queue_size: 128,
        mem_size: 16 << 20,
        protocol_features: DeviceOptions::default().protocol_features
            | VhostUserProtocolFeatures::BACKEND_REQ.bits(),
        ..Default::default()
    };
    let mut dev = VhostUserDevice::connect_with(&be.socket, 1, VIRTIO_F_VERSION_1, &opts).unwrap();
    let (ours, theirs) = UnixStream::pair().unwrap();
    dev.frontend().set_backend_request_fd(&theirs).unwrap();
    ours.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    (dev, ours)
}

fn capacity(dev: &mut VhostUserDevice) -> u64 {
    let c = dev.get_config(0, 8).unwrap();
    u64::from_le_bytes(c[0..8].try_into().unwrap()) * 512
}

/// The next message on the backend channel: (request, flags, payload size).
fn backend_msg(chan: &mut UnixStream) -> (u32, u32, u32) {
    let mut h = [0u8; 12];
    chan.read_exact(&mut h)
        .expect("no message on the backend channel");
    let w = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().unwrap());
    (w(0), w(4), w(8))
}

/// A 4 KiB write of the pattern for `lba` at byte `at`, then a read back; the statuses.
fn write_read(dev: &mut VhostUserDevice, at: u64, lba: u64) -> (u8, u8) {
    let q = dev.queue(0);
    let buf = q.mem().alloc(8192, 4096);
    let mut data = vec![0u8; 4096];
    pattern(&mut data, lba, 9);
    q.mem().write(buf, &data);
    let (w, _) = blkreq::run(q, T_OUT, at / 512, &[(buf, 4096, false)]);
    q.mem().write(buf + 4096, &[0u8; 4096]);
    let (r, _) = blkreq::run(q, T_IN, at / 512, &[(buf + 4096, 4096, true)]);
    if w == S_OK && r == S_OK {
        assert_eq!(
            q.mem().read_vec(buf + 4096, 4096),
            data,
            "read back at {at}"
        );
    }
    (w, r)
}

fn on_disk(img: &Path, at: u64, lba: u64) -> bool {
    let mut back = vec![0u8; 4096];
    std::fs::File::open(img)
        .unwrap()
        .read_exact_at(&mut back, at)
        .unwrap();
    let mut want = vec![0u8; 4096];
    pattern(&mut want, lba, 9);
    back == want
}

/// The soft RLIMIT_FSIZE of a process.
fn fsize_limit(pid: i32) -> String {
    let l = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    l.lines()
        .find(|l| l.starts_with("Max file size"))
        .and_then(|l| l.split_whitespace().nth(3))
        .unwrap()
        .to_string()
}

/// Grow: the file grows, the capacity changes, the frontend gets CONFIG_CHANGE_MSG, the
/// running worker may now write past the old end (its file-size limit was raised) and past
/// the new end may not. Shrinking is refused unless forced; a size changed under the device is
/// taken up by a resize without a size; a new worker keeps the new size; bad sizes change
/// nothing.
#[test]
fn resize_grows_the_disk_under_a_connected_frontend() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::write(&img, vec![0x33u8; (64 * MB) as usize]).unwrap();
    let sock = dir.path().join("blk.sock");
    let csock = dir.path().join("control.sock");
    let be = Backend::blk(
        &sock,
        &img,
        &["--queue-size", "128", "--control", csock.to_str().unwrap()],
    );
    let (mut dev, mut chan) = connect(&be);
    assert_eq!(capacity(&mut dev), 64 * MB);
    // Past the end: refused, nothing written.
    assert_eq!(write_read(&mut dev, 80 * MB, 1), (S_IOERR, S_IOERR));
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 64 * MB);
    let worker = be.worker_pid();
    assert_eq!(fsize_limit(worker), (64 * MB).to_string());

    let (code, r, err) = vhostboxctl(&csock, &["resize", "96M"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(r["old"], 64 * MB, "{r}");
    assert_eq!(r["new"], 96 * MB, "{r}");
    assert_eq!(r["worker"]["told"], true, "{r}");
    assert_eq!(r["worker"]["file_size_limit_raised"], true, "{r}");
    assert_eq!(
        backend_msg(&mut chan),
        (2, 1, 0),
        "VHOST_USER_BACKEND_CONFIG_CHANGE_MSG, version 1, no payload, no reply asked"
    );
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 96 * MB);
    assert_eq!(capacity(&mut dev), 96 * MB);
    assert_eq!(fsize_limit(worker), (96 * MB).to_string());
    // Past the old end, in the same worker: served, and on disk.
    assert_eq!(write_read(&mut dev, 90 * MB, 2), (S_OK, S_OK));
    assert!(on_disk(&img, 90 * MB, 2));
    assert_eq!(write_read(&mut dev, 96 * MB, 3), (S_IOERR, S_IOERR));

    // Shrinking: refused, then forced.
    let (code, _, err) = vhostboxctl(&csock, &["resize", "72M"]);
    assert_eq!(code, 1);
    assert!(err.contains("refused unless forced"), "{err}");
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 96 * MB);
    assert_eq!(capacity(&mut dev), 96 * MB);
    let (code, r, err) = vhostboxctl(&csock, &["resize", "92M", "--force"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(r["new"], 92 * MB);
    assert_eq!(backend_msg(&mut chan).0, 2);
    assert_eq!(capacity(&mut dev), 92 * MB);
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 92 * MB);
    assert!(
        on_disk(&img, 90 * MB, 2),
        "the data below the new end is kept"
    );

    // Bad sizes: refused, nothing changes.
    for (args, why) in [
        (&["resize", "1000"][..], "not a positive multiple"),
        (&["resize", "2000000T"][..], "more than the largest"),
        (&["resize", "12Q"][..], "12Q"),
    ] {
        let (code, _, err) = vhostboxctl(&csock, args);
        assert_eq!(code, 1, "{args:?}");
        assert!(err.contains(why), "{args:?}: {err}");
    }
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 92 * MB);

    // Grown under the device (truncate), then taken up by a resize without a size.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(100 * MB)
        .unwrap();
    assert_eq!(capacity(&mut dev), 92 * MB, "not taken up on its own");
    let (code, r, err) = vhostboxctl(&csock, &["resize"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(r["new"], 100 * MB, "{r}");
    assert_eq!(backend_msg(&mut chan).0, 2);
    assert_eq!(capacity(&mut dev), 100 * MB);

    // A new worker (the frontend reconnects) serves the new size, with the new limit.
    drop(dev);
    drop(chan);
    be.wait_log_count("frontend disconnected", 1);
    let (mut dev, _chan) = connect(&be);
    assert_eq!(capacity(&mut dev), 100 * MB);
    assert_eq!(fsize_limit(be.worker_pid()), (100 * MB).to_string());
    assert_eq!(write_read(&mut dev, 99 * MB, 4), (S_OK, S_OK));
    assert!(on_disk(&img, 99 * MB, 4));
    assert!(!be.log().contains("killed by seccomp"), "{}", be.log());
}

/// Without a backend channel the resize still happens (the guest sees it when it reads the
/// config space again); a read-only device and the null device without a size refuse.
#[test]
fn resize_without_a_channel_and_what_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::write(&img, vec![0u8; (8 * MB) as usize]).unwrap();
    let csock = dir.path().join("control.sock");
    let be = Backend::blk(
        &dir.path().join("blk.sock"),
        &img,
        &["--readonly", "--control", csock.to_str().unwrap()],
    );
    let (code, _, err) = vhostboxctl(&csock, &["resize", "16M"]);
    assert_eq!(code, 1);
    assert!(err.contains("read-only"), "{err}");
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 8 * MB);
    drop(be);

    let csock = dir.path().join("control2.sock");
    let sock = dir.path().join("null.sock");
    let be = Backend::start(
        "vhostbox-blk",
        &sock,
        &[
            "--socket-path",
            sock.to_str().unwrap(),
            "--null",
            "1G",
            "--control",
            csock.to_str().unwrap(),
        ],
    );
    let (code, _, err) = vhostboxctl(&csock, &["resize"]);
    assert_eq!(code, 1);
    assert!(err.contains("give a size"), "{err}");
    let opts = DeviceOptions {
        queue_size: 128,
        mem_size: 16 << 20,
        ..Default::default()
    };
    let mut dev = VhostUserDevice::connect_with(&sock, 1, VIRTIO_F_VERSION_1, &opts).unwrap();
    let (code, r, err) = vhostboxctl(&csock, &["resize", "2G"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(r["new"], 2u64 << 30);
    be.wait_log("set up no backend channel");
    assert_eq!(capacity(&mut dev), 2 << 30);
}
