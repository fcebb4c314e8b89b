//! VM tests: QEMU (TCG, shared memfd guest RAM, vhost-user-blk-pci) boots the small Linux guest
//! from scripts/build-guest.sh, whose stock virtio_blk driver uses vhostbox-blk, jailed with the
//! default sandbox and `--seccomp kill`. In the guest: fio with crc32c verify over the whole
//! disk, a filesystem made, written, checked and read back, the serial and the queue count
//! seen by the driver, and a second, read-only disk that refuses writes and reads back what the
//! host put there. On the host afterwards: the file the guest wrote, pulled out of the image
//! with debugfs, and the read-only image unchanged.
//!
//! The guest comes from build/guest (scripts/test.sh builds it). Without it the tests fail,
//! unless VHOSTBOX_SKIP_VM=1, when they say loudly that they did not run.

use std::fs;
use std::path::Path;
use std::process::Command;

use vhostbox_tests::{guest_dir, pattern, repo, result_value, sparse_image, Backend, GuestRun};

const DISK_MB: u64 = 64;
const RO_MB: u64 = 8;

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

fn vm_disk_test(engine: &str) {
    let Some(guest) = guest_dir() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // The read-write disk starts sparse; the read-only one holds a known pattern.
    let img = sparse_image(&d.join("disk.img"), DISK_MB << 20);
    let ro_img = d.join("ro.img");
    let mut ro = vec![0u8; (RO_MB << 20) as usize];
    for (i, chunk) in ro.chunks_mut(4096).enumerate() {
        pattern(chunk, i as u64, 7);
    }
    fs::write(&ro_img, &ro).unwrap();
    let ro_sum = sha256(&ro_img);

    let sock = d.join("vda.sock");
    let ro_sock = d.join("vdb.sock");
    let mut rw = Backend::blk(
        &sock,
        &img,
        &[
            "--num-queues",
            "2",
            "--serial",
            "vhostbox-vm0",
            "--engine",
            engine,
        ],
    );
    let mut rob = Backend::blk(
        &ro_sock,
        &ro_img,
        &["--readonly", "--num-queues", "2", "--engine", engine],
    );

    // /test.sh: the stock blk-test.sh on each disk, plus what the driver sees.
    let script = d.join("test.sh");
    fs::write(
        &script,
        "#!/bin/sh\n\
         r() { echo \"RESULT $*\"; echo \"RESULT $*\" >/dev/ttyS1; }\n\
         r serial \"$(cat /sys/block/vda/serial)\"\n\
         r mq \"$(ls /sys/block/vda/mq | wc -l)\"\n\
         r ro-flag \"$(cat /sys/block/vdb/ro)\"\n\
         r vda-sectors \"$(cat /sys/block/vda/size)\"\n\
         BLK_DEV=/dev/vda BLK_TESTS='fio fs' /bin/sh /blk-test.sh\n\
         BLK_DEV=/dev/vdb BLK_TESTS='ro read' /bin/sh /blk-test.sh\n",
    )
    .unwrap();
    let blk_test = repo().join("scripts/guest/blk-test.sh");
    let mut run = GuestRun::new(
        &guest,
        d,
        &[(&script, "/test.sh"), (&blk_test, "/blk-test.sh")],
    );
    let out = run
        .cmd
        .args(["--blk", sock.to_str().unwrap()])
        .args(["--blk", ro_sock.to_str().unwrap()])
        .args(["--blk-queues", "2", "--cpus", "2", "--timeout", "400"])
        .args([
            "--append",
            &format!(
                "BLK_FIO_SIZE={}M BLK_FIO_ENGINE=libaio BLK_FIO_IODEPTH=16",
                DISK_MB
            ),
        ])
        .output()
        .unwrap();
    let (res, ctx) = run.report(&out, &[("rw backend", rw.log()), ("ro backend", rob.log())]);
    assert!(out.status.success(), "QEMU failed\n{ctx}");
    assert_eq!(
        res.matches("RESULT done").count(),
        2,
        "guest did not finish\n{ctx}"
    );
    assert!(!res.contains(" fail"), "a guest step failed\n{ctx}");
    assert_eq!(result_value(&res, "serial"), Some("vhostbox-vm0"), "{ctx}");
    assert_eq!(result_value(&res, "mq"), Some("2"), "{ctx}");
    assert_eq!(result_value(&res, "ro-flag"), Some("1"), "{ctx}");
    assert_eq!(
        result_value(&res, "vda-sectors"),
        Some((DISK_MB << 11).to_string().as_str()),
        "{ctx}"
    );
    assert_eq!(result_value(&res, "fio-verify"), Some("ok"), "{ctx}");
    assert_eq!(result_value(&res, "fs"), Some("ok"), "{ctx}");
    assert_eq!(result_value(&res, "ro"), Some("ok"), "{ctx}");
    assert_eq!(
        result_value(&res, "read sha256"),
        Some(ro_sum.as_str()),
        "the guest read something else from the read-only disk\n{ctx}"
    );

    // The host side: the file the guest wrote is in the image, byte for byte.
    let guest_sum = result_value(&res, "fs-file /vhostbox-test.bin sha256")
        .unwrap_or_else(|| panic!("no fs-file line\n{ctx}"))
        .to_string();
    let pulled = d.join("pulled.bin");
    let st = Command::new("debugfs")
        .arg("-R")
        .arg(format!("dump /vhostbox-test.bin {}", pulled.display()))
        .arg(&img)
        .output()
        .unwrap();
    assert!(st.status.success() && pulled.exists(), "debugfs: {st:?}");
    assert_eq!(
        sha256(&pulled),
        guest_sum,
        "image content differs from what the guest wrote"
    );
    assert_eq!(sha256(&ro_img), ro_sum, "the read-only image changed");

    // Both backends served jailed and are still up for the next frontend.
    assert!(rw.alive() && rob.alive(), "a backend died\n{ctx}");
    let log = rw.log();
    assert!(!log.contains("killed by seccomp"), "{log}");
    assert!(
        log.contains("worker started"),
        "not supervised/jailed?\n{log}"
    );
}

#[test]
fn vm_guest_fio_verify_and_filesystem_io_uring() {
    vm_disk_test("io-uring");
}

#[test]
fn vm_guest_fio_verify_and_filesystem_sync() {
    vm_disk_test("sync");
}
