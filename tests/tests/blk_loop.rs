//! The block-device path, on a real one: a loop device (`losetup`) over a file. Size and
//! topology come from the device's ioctls, DISCARD becomes BLKDISCARD and WRITE_ZEROES
//! BLKZEROOUT, and both go through the seccomp ioctl rule in kill mode (an ioctl off the rule
//! would kill the worker and fail the test). Needs root, which the test suite runs as.

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use vhostbox_tests::blkreq::{self, *};
use vhostbox_tests::frontend::{DeviceOptions, VhostUserDevice, VIRTIO_F_VERSION_1};
use vhostbox_tests::Backend;

const MIB: u64 = 1 << 20;

/// A loop device over a 16 MiB file full of 0x5a, detached when dropped.
struct Loop {
    dev: PathBuf,
    file: PathBuf,
    _dir: tempfile::TempDir,
}

impl Loop {
    fn new(sector_size: u32) -> Loop {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let file = dir.path().join("backing.img");
        std::fs::write(&file, vec![0x5au8; 16 << 20]).unwrap();
        let out = Command::new("losetup")
            .args([
                "--find",
                "--show",
                "--sector-size",
                &sector_size.to_string(),
            ])
            .arg(&file)
            .output()
            .expect("losetup");
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dev = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        Loop {
            dev,
            file,
            _dir: dir,
        }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

fn serve(dev: &Path, sock: &Path) -> Backend {
    Backend::start(
        "vhostbox-blk",
        sock,
        &[
            "--socket-path",
            sock.to_str().unwrap(),
            "--image",
            dev.to_str().unwrap(),
            "--seccomp",
            "kill",
        ],
    )
}

fn connect(be: &Backend) -> VhostUserDevice {
    let opts = DeviceOptions {
        queue_size: 64,
        mem_size: 16 << 20,
        ..Default::default()
    };
    let f = VIRTIO_F_VERSION_1 | F_BLK_SIZE | F_TOPOLOGY | F_DISCARD | F_WRITE_ZEROES;
    VhostUserDevice::connect_with(&be.socket, 1, f, &opts).unwrap()
}

#[test]
fn a_loop_device_reports_its_size_and_block_size() {
    for lbs in [512u32, 4096] {
        let lo = Loop::new(lbs);
        let dir = tempfile::tempdir().unwrap();
        let be = serve(&lo.dev, &dir.path().join("blk.sock"));
        let mut dev = connect(&be);
        let c = dev.get_config(0, 60).unwrap();
        let capacity = u64::from_le_bytes(c[0..8].try_into().unwrap());
        assert_eq!(
            capacity,
            (16 << 20) / 512,
            "capacity is in 512-byte sectors"
        );
        let blk_size = u32::from_le_bytes(c[20..24].try_into().unwrap());
        assert_eq!(blk_size, lbs, "the device's logical block size");
        assert_eq!(c[24], 0, "physical block = logical block on a loop device");
        // Discard granularity is the block size.
        let align = u32::from_le_bytes(c[44..48].try_into().unwrap());
        assert_eq!(align, lbs / 512);
        assert!(be.log().contains("image /dev/loop"), "{}", be.log());
    }
}

#[test]
fn discard_and_write_zeroes_reach_the_device() {
    let lo = Loop::new(512);
    let dir = tempfile::tempdir().unwrap();
    let be = serve(&lo.dev, &dir.path().join("blk.sock"));
    let mut dev = connect(&be);
    let q = dev.queue(0);
    // WRITE_ZEROES of 1 MiB at 2 MiB (BLKZEROOUT), with and without UNMAP.
    let seg = blkreq::segment(q, (2 * MIB) / 512, (MIB / 512) as u32, 0);
    assert_eq!(blkreq::run(q, T_WRITE_ZEROES, 0, &[seg]).0, S_OK);
    let seg = blkreq::segment(q, (4 * MIB) / 512, (MIB / 512) as u32, 1);
    assert_eq!(blkreq::run(q, T_WRITE_ZEROES, 0, &[seg]).0, S_OK);
    // DISCARD of 1 MiB at 8 MiB (BLKDISCARD: the loop driver punches a hole in its file).
    let seg = blkreq::segment(q, (8 * MIB) / 512, (MIB / 512) as u32, 0);
    assert_eq!(blkreq::run(q, T_DISCARD, 0, &[seg]).0, S_OK);
    // Read back through the device.
    let buf = q.mem().alloc(MIB as usize, 4096);
    assert_eq!(
        blkreq::run(q, T_IN, (2 * MIB) / 512, &[(buf, MIB as u32, true)]).0,
        S_OK
    );
    assert!(q.mem().read_vec(buf, MIB as usize).iter().all(|&b| b == 0));
    assert_eq!(
        blkreq::run(q, T_IN, (3 * MIB) / 512, &[(buf, MIB as u32, true)]).0,
        S_OK
    );
    assert!(q
        .mem()
        .read_vec(buf, MIB as usize)
        .iter()
        .all(|&b| b == 0x5a));
    drop(dev);
    let log = be.log();
    assert!(!log.contains("killed by"), "{log}");
    // The backing file: zeros where zeroed, a hole where discarded, the rest untouched.
    let f = std::fs::File::open(&lo.file).unwrap();
    let mut b = vec![0u8; MIB as usize];
    for (at, want) in [(2, 0u8), (3, 0x5a), (4, 0), (8, 0), (9, 0x5a)] {
        f.read_exact_at(&mut b, at * MIB).unwrap();
        assert!(b.iter().all(|&x| x == want), "MiB {at} of the file");
    }
    // SAFETY: lseek on an fd we own.
    let hole = unsafe { libc::lseek(f.as_raw_fd(), (8 * MIB) as i64, libc::SEEK_HOLE) };
    assert_eq!(hole, (8 * MIB) as i64, "no hole where the discard was");
}

#[test]
fn a_loop_device_grown_with_losetup_c_is_taken_up_by_a_bare_resize() {
    let lo = Loop::new(512);
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("blk.sock");
    let csock = dir.path().join("ctl.sock");
    let be = Backend::start(
        "vhostbox-blk",
        &sock,
        &[
            "--socket-path",
            sock.to_str().unwrap(),
            "--image",
            lo.dev.to_str().unwrap(),
            "--control",
            csock.to_str().unwrap(),
        ],
    );
    let mut dev = connect(&be);
    // A size given for a block device is refused: the device's size is its own.
    let (code, _, err) = vhostbox_tests::vhostboxctl(&csock, &["resize", "32M"]);
    assert_ne!(code, 0);
    assert!(err.contains("a block device's size is its own"), "{err}");
    // Grow the loop device's file, then the device (losetup -c), then take it up.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&lo.file)
        .unwrap()
        .set_len(24 << 20)
        .unwrap();
    let st = Command::new("losetup")
        .arg("-c")
        .arg(&lo.dev)
        .status()
        .unwrap();
    assert!(st.success(), "losetup -c");
    let (code, r, err) = vhostbox_tests::vhostboxctl(&csock, &["resize"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(r["old"], 16 << 20, "{r}");
    assert_eq!(r["new"], 24 << 20, "{r}");
    be.wait_log("capacity 16777216 -> 25165824 bytes");
    // The connected frontend reads the new capacity, and reads the grown part.
    let c = dev.get_config(0, 8).unwrap();
    assert_eq!(
        u64::from_le_bytes(c[0..8].try_into().unwrap()),
        (24 << 20) / 512
    );
    let q = dev.queue(0);
    let buf = q.mem().alloc(4096, 4096);
    assert_eq!(
        blkreq::run(q, T_IN, (20 * MIB) / 512, &[(buf, 4096, true)]).0,
        S_OK,
        "a read past the old end"
    );
    assert!(q.mem().read_vec(buf, 4096).iter().all(|&b| b == 0));
}
