//! VM test of a qcow2 overlay: QEMU (TCG, shared memfd RAM, vhost-user-blk-pci, 2 queues)
//! boots the small guest on vhostbox-blk serving `top.qcow2` over a raw base that holds a
//! known pattern. The guest's own virtio_blk driver runs fio with crc32c verify (2 jobs, one
//! per half of the first 32 MiB, libaio, 16 deep, so both queues allocate clusters at once),
//! then reads back what it wrote and an area it never touched. On the host, after the
//! backend has exited: `qemu-img check` finds no errors, `qemu-img convert` reads the same
//! bytes the guest read, the untouched area is the base's, and the base file is unchanged.

use vhostbox_tests::{
    guest_dir, pattern, qcow2_contents, qcow2_overlay, result_value, sha256_hex, Backend, Vm,
};

const DISK_MB: usize = 48;
const WRITTEN_MB: usize = 32;
/// The area the guest only reads: the base shows through.
const UNTOUCHED_MB: usize = 40;

#[test]
fn a_guest_runs_fio_verify_on_a_qcow2_overlay_over_a_raw_base() {
    let Some(guest) = guest_dir() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut base = vec![0u8; DISK_MB << 20];
    for (lba, b) in base.chunks_mut(4096).enumerate() {
        pattern(b, lba as u64, 1);
    }
    std::fs::write(d.join("base.raw"), &base).unwrap();
    qcow2_overlay(d, "base.raw", "raw", "top.qcow2");
    let sock = d.join("vda.sock");
    let mut be = Backend::blk(
        &sock,
        &d.join("top.qcow2"),
        &["--format", "qcow2", "--num-queues", "2"],
    );
    let half = WRITTEN_MB / 2;
    let rest = DISK_MB - UNTOUCHED_MB;
    let script = format!(
        "#!/bin/sh\n\
         r() {{ echo \"RESULT $*\"; echo \"RESULT $*\" >/dev/ttyS1; }}\n\
         r sectors \"$(cat /sys/block/vda/size)\"\n\
         r mq \"$(ls /sys/block/vda/mq | wc -l)\"\n\
         cd /tmp\n\
         if fio --name=v --filename=/dev/vda --rw=randwrite --bs=4k --size={half}M \
            --offset_increment={half}M --numjobs=2 --verify=crc32c --verify_fatal=1 \
            --verify_state_save=0 --ioengine=libaio --iodepth=16 --direct=1 \
            --group_reporting >/tmp/fio.out 2>&1; then r fio ok; else cat /tmp/fio.out; r fio fail; fi\n\
         echo 3 > /proc/sys/vm/drop_caches\n\
         r written \"$(dd if=/dev/vda bs=1M count={WRITTEN_MB} 2>/dev/null | sha256sum | cut -d' ' -f1)\"\n\
         r untouched \"$(dd if=/dev/vda bs=1M skip={UNTOUCHED_MB} count={rest} 2>/dev/null | sha256sum | cut -d' ' -f1)\"\n\
         r done 1\n"
    );
    let mut vm = Vm::start(
        &guest,
        d,
        &script,
        &[],
        &[
            "--blk",
            sock.to_str().unwrap(),
            "--blk-queues",
            "2",
            "--cpus",
            "2",
        ],
    );
    assert!(
        vm.wait_result("RESULT done", 400),
        "the guest did not finish\n{}",
        vm.context(&be)
    );
    let st = vm.wait_exit(60);
    let res = vm.results();
    let ctx = vm.context(&be);
    assert!(st.is_some_and(|s| s.success()), "QEMU failed\n{ctx}");
    assert_eq!(
        result_value(&res, "sectors"),
        Some(((DISK_MB as u64) << 11).to_string().as_str()),
        "{ctx}"
    );
    assert_eq!(result_value(&res, "mq"), Some("2"), "{ctx}");
    assert_eq!(result_value(&res, "fio"), Some("ok"), "{ctx}");
    assert!(be.signal_and_wait(libc::SIGTERM).success(), "{ctx}");

    let out = qcow2_contents(d, "top.qcow2");
    assert_eq!(out.len(), DISK_MB << 20);
    assert_eq!(
        result_value(&res, "written"),
        Some(sha256_hex(&out[..WRITTEN_MB << 20]).as_str()),
        "qemu-img reads other data than the guest read back\n{ctx}"
    );
    assert_ne!(
        &out[..WRITTEN_MB << 20],
        &base[..WRITTEN_MB << 20],
        "the guest's writes are not in the overlay"
    );
    let untouched = sha256_hex(&base[UNTOUCHED_MB << 20..]);
    assert_eq!(
        result_value(&res, "untouched"),
        Some(untouched.as_str()),
        "the guest does not see the base\n{ctx}"
    );
    assert_eq!(sha256_hex(&out[UNTOUCHED_MB << 20..]), untouched);
    assert!(
        std::fs::read(d.join("base.raw")).unwrap() == base,
        "the base changed"
    );
}
