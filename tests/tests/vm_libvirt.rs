//! VM test through libvirt: a real libvirtd 11 (started by scripts/start-services.sh) runs
//! QEMU as `libvirt-qemu`, with a vhostbox disk and NIC defined only in the domain XML that
//! docs/usage.md shows (`<disk type='vhostuser'>` with `<reconnect>`, `<interface
//! type='vhostuser'>`, shared memfd memory). The backends run as root, jailed, and let QEMU's
//! group connect with `--socket-group libvirt-qemu --socket-mode 0660`.
//!
//! Checked: the guest's fio with crc32c verify and an ext4 file system on the vhostbox disk;
//! the guest pings the host over the vhostbox NIC; QEMU's log has no complaint about a
//! protocol feature; the domain ends by itself.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use vhostbox_tests::netns::NetNs;
use vhostbox_tests::{guest_dir, repo, result_value, sparse_image, Backend};

const HOST_IP: &str = "10.78.0.1";
const GUEST_IP: &str = "10.78.0.2";
const TAP: &str = "lvtap0";

fn virsh(args: &[&str]) -> std::process::Output {
    Command::new("virsh")
        .args(["-c", "qemu:///system"])
        .args(args)
        .output()
        .expect("virsh (scripts/setup-host.sh installs libvirt)")
}

fn world_readable(p: &Path) {
    fs::set_permissions(p, fs::Permissions::from_mode(0o644)).unwrap();
}

#[test]
fn vm_libvirt_domain_with_a_vhostbox_disk_and_nic() {
    let Some(guest) = guest_dir() else { return };
    let v = virsh(&["version"]);
    assert!(
        v.status.success(),
        "libvirtd is not running (scripts/start-services.sh starts it): {}",
        String::from_utf8_lossy(&v.stderr)
    );
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // QEMU runs as libvirt-qemu: it must reach the sockets, kernel and initrd here.
    fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();

    let img = sparse_image(&d.join("disk.img"), 64 << 20);
    let blk_sock = d.join("blk.sock");
    let perms = ["--socket-group", "libvirt-qemu", "--socket-mode", "0660"];
    let mut blk_args = vec![
        "--socket-path",
        blk_sock.to_str().unwrap(),
        "--image",
        img.to_str().unwrap(),
        "--num-queues",
        "2",
    ];
    blk_args.extend(perms);
    let blk = Backend::start("vhostbox-blk", &blk_sock, &blk_args);

    let ns = NetNs::new().expect("network namespace");
    let net_sock = d.join("net.sock");
    let mut net_args = vec!["--socket-path", net_sock.to_str().unwrap(), "--tap", TAP];
    net_args.extend(perms);
    let net = ns.run(|| Backend::start("vhostbox-net", &net_sock, &net_args));
    ns.wait_link(TAP);
    ns.ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", TAP]);

    let script = d.join("test.sh");
    fs::write(
        &script,
        vhostbox_tests::guest_net_script(GUEST_IP)
            + &format!(
                "if ping -c 3 -W 5 {HOST_IP} >/dev/null; then r ping ok; else r ping fail; fi\n\
             BLK_DEV=/dev/vda BLK_TESTS='fio fs' BLK_FIO_SIZE=16M /bin/sh /blk-test.sh\n"
            ),
    )
    .unwrap();
    let overlay = d.join("overlay.cpio.gz");
    let st = Command::new(repo().join("scripts/mk-overlay.sh"))
        .arg(&overlay)
        .arg(format!("{}:/test.sh", script.display()))
        .arg(format!(
            "{}:/blk-test.sh",
            repo().join("scripts/guest/blk-test.sh").display()
        ))
        .status()
        .unwrap();
    assert!(st.success(), "mk-overlay.sh failed");
    let kernel = d.join("bzImage");
    fs::copy(guest.join("bzImage"), &kernel).unwrap();
    let initrd = d.join("initrd");
    let mut all = fs::read(guest.join("initramfs.cpio.gz")).unwrap();
    all.extend(fs::read(&overlay).unwrap());
    fs::write(&initrd, all).unwrap();
    world_readable(&kernel);
    world_readable(&initrd);

    let name = format!("vhostbox-test-{}", std::process::id());
    let console = d.join("console.txt");
    let results = d.join("results.txt");
    let p = |x: &Path| x.to_str().unwrap().to_owned();
    // One vCPU: QEMU 10.0's multi-threaded TCG can abort with two (see run-guest.sh).
    let xml = format!(
        "<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>512</memory>
  <vcpu>1</vcpu>
  <memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 quiet panic=-1 vbnoshell=1</cmdline>
  </os>
  <cpu mode='maximum' migratable='off'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='vhostuser' device='disk'>
      <driver name='qemu' type='raw' queues='2'/>
      <source type='unix' path='{blk_sock}'>
        <reconnect enabled='yes' timeout='1'/>
      </source>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='vhostuser'>
      <mac address='52:54:00:76:63:00'/>
      <source type='unix' path='{net_sock}' mode='client'/>
      <model type='virtio'/>
    </interface>
    <serial type='file'><source path='{console}'/><target port='0'/></serial>
    <serial type='file'><source path='{results}'/><target port='1'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
",
        kernel = p(&kernel),
        initrd = p(&initrd),
        blk_sock = p(&blk_sock),
        net_sock = p(&net_sock),
        console = p(&console),
        results = p(&results),
    );
    let xml_path = d.join("domain.xml");
    fs::write(&xml_path, &xml).unwrap();
    let created = virsh(&["create", xml_path.to_str().unwrap()]);
    let qemu_log =
        || fs::read_to_string(format!("/var/log/libvirt/qemu/{name}.log")).unwrap_or_default();
    let ctx = |res: &str| {
        let con = fs::read_to_string(&console).unwrap_or_default();
        let tail: Vec<&str> = con.lines().rev().take(40).collect();
        format!(
            "--- results\n{res}\n--- console (tail)\n{}\n--- qemu log\n{}\n--- blk\n{}\n--- net\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
            qemu_log(),
            blk.log(),
            net.log()
        )
    };
    assert!(
        created.status.success(),
        "virsh create: {}\n{}",
        String::from_utf8_lossy(&created.stderr),
        ctx("")
    );
    // A transient domain disappears when the guest powers off.
    let deadline = Instant::now() + Duration::from_secs(400);
    while virsh(&["domstate", &name]).status.success() {
        if Instant::now() > deadline {
            let _ = virsh(&["destroy", &name]);
            panic!("the domain did not end\n{}", ctx(""));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let res = fs::read_to_string(&results).unwrap_or_default();
    let ctx = ctx(&res);
    assert!(res.contains("RESULT done"), "guest did not finish\n{ctx}");
    assert!(!res.contains(" fail"), "a guest step failed\n{ctx}");
    assert_eq!(result_value(&res, "ping"), Some("ok"), "{ctx}");
    assert_eq!(result_value(&res, "fio-verify"), Some("ok"), "{ctx}");
    assert_eq!(result_value(&res, "fs"), Some("ok"), "{ctx}");
    assert!(
        !qemu_log().contains("VHOST_USER_PROTOCOL_F"),
        "QEMU complained about a protocol feature\n{ctx}"
    );
    assert!(
        blk.log().contains("frontend connected") && net.log().contains("frontend connected"),
        "{ctx}"
    );
}
