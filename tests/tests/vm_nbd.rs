//! VM test of an NBD-backed disk across NBD server restarts: QEMU (TCG, 2 queues,
//! `reconnect-ms`) boots the small guest on vhostbox-blk `--nbd`, in front of qemu-nbd serving
//! a raw image over a unix socket. The guest runs fio write+verify rounds without pause; the
//! test kills qemu-nbd three times while they run and starts it again half a second later.
//! Each time a request finds the connection dead, the worker ends without completing it, the
//! supervisor reconnects once qemu-nbd is back, QEMU reconnects to the next worker and
//! resubmits what was in flight. The guest must see no I/O error and no verify failure, and
//! the image file must hold what the guest reads.

use std::os::unix::fs::FileExt;
use std::time::Duration;

use vhostbox_tests::{
    fio_until_stop_script, guest_dir, qemu_nbd, result_value, sha256_hex, sparse_image, Backend, Vm,
};

const DISK_MB: u64 = 80;
const AREA_MB: u64 = 64;
const STOP_BLOCK: u64 = 18432;
const RESTARTS: usize = 3;

use vhostbox_tests::log_count_within as wait_count;

#[test]
fn a_guest_sees_no_error_across_three_nbd_server_restarts() {
    let Some(guest) = guest_dir() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = sparse_image(&d.join("disk.raw"), DISK_MB << 20);
    let nsock = d.join("nbd.sock");
    let mut srv = qemu_nbd(&img, &nsock, &[]);
    let sock = d.join("vda.sock");
    let uri = format!("nbd+unix:///?socket={}", nsock.display());
    let be = Backend::start(
        "vhostbox-blk",
        &sock,
        &[
            "--socket-path",
            sock.to_str().unwrap(),
            "--nbd",
            &uri,
            "--num-queues",
            "2",
        ],
    );
    let mut vm = Vm::start(
        &guest,
        d,
        &fio_until_stop_script(STOP_BLOCK, AREA_MB),
        &[],
        &[
            "--blk",
            sock.to_str().unwrap(),
            "--blk-queues",
            "2",
            "--cpus",
            "2",
            "--reconnect-ms",
            "200",
        ],
    );
    assert!(
        vm.wait_result("RESULT start", 120),
        "the guest did not start\n{}",
        vm.context(&be)
    );
    for k in 1..=RESTARTS {
        std::thread::sleep(Duration::from_millis(700));
        srv.kill();
        assert!(
            wait_count(&be, "lost its connection to the backing store", k, 60),
            "no request found the dead connection (restart {k})\n{}",
            vm.context(&be)
        );
        std::thread::sleep(Duration::from_millis(500));
        srv = qemu_nbd(&img, &nsock, &[]);
        assert!(
            wait_count(&be, "frontend connected", k + 1, 60),
            "the guest's QEMU did not reconnect (restart {k})\n{}",
            vm.context(&be)
        );
    }
    let (res, ctx, resubmitted) = vhostbox_tests::stop_fio_guest(&mut vm, &be, &img, STOP_BLOCK);
    let log = be.log();
    eprintln!(
        "guest fio rounds: {}; requests resubmitted: {resubmitted}",
        result_value(&res, "rounds").unwrap_or("?")
    );
    assert_eq!(result_value(&res, "fio-failures"), Some("0"), "{ctx}");
    assert_eq!(result_value(&res, "io-errors"), Some("0"), "{ctx}");
    assert!(
        log.contains("cannot prepare the next worker: cannot reach the NBD server"),
        "the supervisor never waited for the server\n{ctx}"
    );
    assert!(
        resubmitted > 0,
        "nothing was in flight at a restart: the retry path was not exercised\n{ctx}"
    );
    let mut area = vec![0u8; (AREA_MB << 20) as usize];
    std::fs::File::open(&img)
        .unwrap()
        .read_exact_at(&mut area, 0)
        .unwrap();
    assert_eq!(
        result_value(&res, "area-sha"),
        Some(sha256_hex(&area).as_str()),
        "the image differs from what the guest reads\n{ctx}"
    );
    drop(srv);
}
