//! VM test of online resize: QEMU (TCG, shared memfd RAM, vhost-user-blk-pci) boots the small
//! guest on a vhostbox-blk disk; while the guest runs, `vhostboxctl resize` grows the disk.
//! QEMU gets VHOST_USER_BACKEND_CONFIG_CHANGE_MSG, reads the config space again and interrupts
//! the guest, whose virtio_blk driver takes up the new capacity: its kernel logs the change,
//! /sys/block/vda/size grows, and the guest writes 1 MiB past the old end and reads it back
//! (page cache dropped). On the host, the image holds what the guest wrote, at that offset.

use std::os::unix::fs::FileExt;
use std::process::Command;

use vhostbox_tests::{guest_dir, result_value, vhostboxctl, Backend, Vm};

const OLD_MB: u64 = 32;
const NEW_MB: u64 = 48;

#[test]
fn the_guest_sees_the_disk_grow_and_writes_past_the_old_end() {
    let Some(guest) = guest_dir() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(OLD_MB << 20)
        .unwrap();
    let sock = d.join("vda.sock");
    let csock = d.join("control.sock");
    let be = Backend::blk(
        &sock,
        &img,
        &["--num-queues", "2", "--control", csock.to_str().unwrap()],
    );
    let old_sectors = OLD_MB << 11;
    let script = format!(
        "#!/bin/sh\n\
         r() {{ echo \"RESULT $*\"; echo \"RESULT $*\" >/dev/ttyS1; }}\n\
         r before \"$(cat /sys/block/vda/size)\"\n\
         r ready 1\n\
         i=0\n\
         while [ \"$(cat /sys/block/vda/size)\" = {old_sectors} ] && [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done\n\
         r after \"$(cat /sys/block/vda/size)\"\n\
         r kmsg \"$(dmesg | grep -c 'vda.*capacity change')\"\n\
         dd if=/dev/urandom of=/tmp/p bs=1M count=1 2>/dev/null\n\
         dd if=/tmp/p of=/dev/vda bs=1M seek={OLD_MB} conv=fsync 2>/dev/null || r write fail\n\
         echo 3 > /proc/sys/vm/drop_caches\n\
         r sum \"$(sha256sum < /tmp/p | cut -d' ' -f1)\"\n\
         r back \"$(dd if=/dev/vda bs=1M skip={OLD_MB} count=1 2>/dev/null | sha256sum | cut -d' ' -f1)\"\n\
         r done 1\n"
    );
    let mut vm = Vm::start(
        &guest,
        d,
        &script,
        &[],
        &["--blk", sock.to_str().unwrap(), "--timeout", "0"],
    );
    assert!(
        vm.wait_result("RESULT ready", 240),
        "the guest did not boot\n{}",
        vm.context(&be)
    );
    let (code, r, err) = vhostboxctl(&csock, &["resize", &format!("{NEW_MB}M")]);
    assert_eq!(code, 0, "{err}\n{}", vm.context(&be));
    assert_eq!(r["worker"]["told"], true, "{r}");
    assert!(
        vm.wait_result("RESULT done", 240),
        "the guest did not finish\n{}",
        vm.context(&be)
    );
    let st = vm.wait_exit(60);
    let res = vm.results();
    let ctx = vm.context(&be);
    assert!(st.is_some_and(|s| s.success()), "QEMU failed\n{ctx}");
    assert!(!res.contains(" fail"), "a guest step failed\n{ctx}");
    assert_eq!(
        result_value(&res, "before"),
        Some(old_sectors.to_string().as_str()),
        "{ctx}"
    );
    assert_eq!(
        result_value(&res, "after"),
        Some((NEW_MB << 11).to_string().as_str()),
        "the guest never saw the new capacity\n{ctx}"
    );
    assert_ne!(
        result_value(&res, "kmsg"),
        Some("0"),
        "no kernel message\n{ctx}"
    );
    let sum = result_value(&res, "sum").unwrap_or_default().to_string();
    assert_eq!(sum.len(), 64, "{ctx}");
    assert_eq!(result_value(&res, "back"), Some(sum.as_str()), "{ctx}");
    // On the host: the image grew, and holds the guest's MiB past the old end.
    assert_eq!(std::fs::metadata(&img).unwrap().len(), NEW_MB << 20);
    let mut mib = vec![0u8; 1 << 20];
    std::fs::File::open(&img)
        .unwrap()
        .read_exact_at(&mut mib, OLD_MB << 20)
        .unwrap();
    let host = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(&mib)?;
            c.wait_with_output()
        })
        .unwrap();
    let host = String::from_utf8_lossy(&host.stdout);
    assert_eq!(host.split_whitespace().next(), Some(sum.as_str()), "{ctx}");
    assert!(be.log().contains("the frontend was told"), "{}", be.log());
}
