//! What vhostbox-blk advertises, checked where it is enforced: the real binary driven by the
//! test frontend, which (unlike libblkio) sends whatever the test asks for. Config space
//! fields (SEG_MAX, SIZE_MAX, BLK_SIZE, TOPOLOGY, WCE), write-through and the guest's cache
//! mode switch, SIZE_MAX enforced, writes refused by a read-only device itself, and
//! `--seccomp log`.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vhostbox_tests::blkreq::{self, *};
use vhostbox_tests::frontend::{DeviceOptions, VhostUserDevice, VIRTIO_F_VERSION_1};
use vhostbox_tests::{probe_bin, sparse_image, Backend};

const FEATURES: u64 = VIRTIO_F_VERSION_1
    | F_SIZE_MAX
    | F_SEG_MAX
    | F_BLK_SIZE
    | F_TOPOLOGY
    | F_CONFIG_WCE
    | F_DISCARD;

fn start(dir: &Path, extra: &[&str]) -> (Backend, PathBuf) {
    let img = sparse_image(&dir.join("disk.img"), 8 << 20);
    std::fs::write(&img, vec![0x33u8; 8 << 20]).unwrap();
    let sock = dir.join("blk.sock");
    let mut args = vec!["--queue-size", "128", "--seccomp", "kill"];
    args.extend_from_slice(extra);
    (Backend::blk(&sock, &img, &args), img)
}

fn connect(be: &Backend) -> VhostUserDevice {
    let opts = DeviceOptions {
        queue_size: 128,
        mem_size: 16 << 20,
        ..Default::default()
    };
    VhostUserDevice::connect_with(&be.socket, 1, FEATURES, &opts).unwrap()
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

#[test]
fn config_space_fields_and_the_guests_cache_mode() {
    let dir = tempfile::tempdir().unwrap();
    let (be, _img) = start(dir.path(), &[]);
    let mut dev = connect(&be);
    let c = dev.get_config(0, 60).unwrap();
    assert_eq!(
        u64::from_le_bytes(c[0..8].try_into().unwrap()),
        (8 << 20) / 512
    );
    assert_eq!(le32(&c, 8), 1 << 20, "size_max");
    assert_eq!(
        le32(&c, 12),
        126,
        "seg_max is the queue size less header and status"
    );
    assert_eq!(le32(&c, 20), 512, "blk_size");
    // Topology of an image file: the file system block (4 KiB here) as the physical block.
    assert_eq!(c[24], 3, "physical_block_exp: 4096 / 512 = 2^3");
    assert_eq!(u16::from_le_bytes([c[26], c[27]]), 1, "min_io_size");
    assert_eq!(c[32], 1, "write-back by default");
    // The guest switches to write-through; the device reports it.
    dev.set_config(32, &[0]).unwrap();
    assert_eq!(dev.get_config(32, 1).unwrap(), vec![0]);
    assert!(dev.set_config(0, &[0; 8]).is_err(), "capacity is read-only");
    drop(dev);
    // --writethrough starts each frontend write-through.
    let dir = tempfile::tempdir().unwrap();
    let (be, img) = start(dir.path(), &["--writethrough"]);
    let mut dev = connect(&be);
    assert_eq!(dev.get_config(32, 1).unwrap(), vec![0]);
    // Write-through writes complete (RWF_DSYNC) and are in the image.
    let q = dev.queue(0);
    let buf = q.mem().alloc(4096, 512);
    q.mem().write(buf, &[0x7a; 4096]);
    assert_eq!(blkreq::run(q, T_OUT, 8, &[(buf, 4096, false)]), (S_OK, 1));
    let mut back = vec![0u8; 4096];
    std::fs::File::open(&img)
        .unwrap()
        .read_exact_at(&mut back, 4096)
        .unwrap();
    assert_eq!(back, vec![0x7a; 4096]);
}

/// SIZE_MAX is advertised as 1 MiB: a data descriptor of 2 MiB is refused, the same 2 MiB in
/// two descriptors is served.
#[test]
fn size_max_is_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let (be, img) = start(dir.path(), &[]);
    let mut dev = connect(&be);
    let q = dev.queue(0);
    let buf = q.mem().alloc(2 << 20, 4096);
    q.mem().write(buf, &vec![0x44; 2 << 20]);
    assert_eq!(
        blkreq::run(q, T_OUT, 0, &[(buf, 2 << 20, false)]),
        (S_IOERR, 1)
    );
    let mut back = vec![0u8; 2 << 20];
    let f = std::fs::File::open(&img).unwrap();
    f.read_exact_at(&mut back, 0).unwrap();
    assert!(
        back.iter().all(|&b| b == 0x33),
        "the refused write changed the image"
    );
    let halves = [(buf, 1 << 20, false), (buf + (1 << 20), 1 << 20, false)];
    assert_eq!(blkreq::run(q, T_OUT, 0, &halves), (S_OK, 1));
    f.read_exact_at(&mut back, 0).unwrap();
    assert!(back.iter().all(|&b| b == 0x44));
    assert!(
        be.log().contains("more than the advertised SIZE_MAX"),
        "{}",
        be.log()
    );
}

/// A read-only device refuses writes and discards that reach it (libblkio refuses them before
/// they are sent, so this needs a frontend that sends them), and the image is unchanged.
#[test]
fn a_readonly_device_refuses_writes_itself() {
    let dir = tempfile::tempdir().unwrap();
    let (be, img) = start(dir.path(), &["--readonly"]);
    let mut dev = connect(&be);
    let q = dev.queue(0);
    let buf = q.mem().alloc(4096, 512);
    q.mem().write(buf, &[0x55; 4096]);
    assert_eq!(
        blkreq::run(q, T_OUT, 0, &[(buf, 4096, false)]),
        (S_IOERR, 1)
    );
    let seg = blkreq::segment(q, 0, 8, 0);
    assert_eq!(blkreq::run(q, T_DISCARD, 0, &[seg]), (S_IOERR, 1));
    let out = q.mem().alloc(4096, 512);
    assert_eq!(blkreq::run(q, T_IN, 0, &[(out, 4096, true)]), (S_OK, 4097));
    assert_eq!(q.mem().read_vec(out, 4096), vec![0x33; 4096]);
    let host = std::fs::read(&img).unwrap();
    assert!(host.iter().all(|&b| b == 0x33));
}

/// `--seccomp log`: a syscall off the list is allowed (and logged by the kernel), so the
/// probe's socket() succeeds and the worker is not killed.
#[test]
fn seccomp_log_allows_and_keeps_the_worker() {
    let dir = tempfile::tempdir().unwrap();
    let img = sparse_image(&dir.path().join("disk.img"), 1 << 20);
    let sock = dir.path().join("blk.sock");
    let args = vhostbox_tests::blk_args(
        &sock,
        &img,
        &["--seccomp", "log", "--jail-probe", "socket-inet"],
    );
    let be = Backend::start_exe(&probe_bin("vhostbox-blk"), &sock, &args);
    let log = be.wait_log("PROBE socket-inet: ");
    assert!(log.contains("PROBE socket-inet: SUCCEEDED"), "{log}");
    assert!(!log.contains("killed by seccomp"), "{log}");
}
