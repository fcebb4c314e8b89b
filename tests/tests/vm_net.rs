//! VM test: QEMU (TCG, shared memfd RAM, `-netdev vhost-user` + `virtio-net-pci`, 2 queue
//! pairs, 2 vCPUs) boots the small Linux guest, whose stock virtio_net driver uses vhostbox-net,
//! jailed with the default sandbox and `--seccomp kill`. The host end of the tap sits in a
//! network namespace the test creates, so nothing leaves the machine.
//!
//! Checked: the guest pings the host and the host pings the guest; 16 MiB go over TCP each way
//! with matching SHA-256 on both ends; inside the guest the MTU, the queue count and the
//! negotiated feature bits (offloads, MRG_RXBUF, EVENT_IDX, MQ) are what the backend offered.
//!
//! The guest comes from build/guest (scripts/test.sh builds it). Without it the test fails,
//! unless VHOSTBOX_SKIP_VM=1, when it says loudly that it did not run.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use vhostbox_tests::netns::NetNs;
use vhostbox_tests::{guest_dir, pattern, result_value, Backend, GuestRun};

const NET: &str = "vhostbox-net";
const TAP: &str = "vmtap0";
const HOST_IP: &str = "10.77.0.1";
const GUEST_IP: &str = "10.77.0.2";
const MTU: &str = "4000";
const XFER: usize = 16 << 20;

fn sha256_of(data: &[u8], scratch: &Path) -> String {
    fs::write(scratch, data).unwrap();
    let out = Command::new("sha256sum").arg(scratch).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Guest feature bits that must be negotiated (positions in the sysfs features string).
const FEATURE_BITS: &[(usize, &str)] = &[
    (0, "CSUM"),
    (1, "GUEST_CSUM"),
    (3, "MTU"),
    (7, "GUEST_TSO4"),
    (8, "GUEST_TSO6"),
    (11, "HOST_TSO4"),
    (12, "HOST_TSO6"),
    (15, "MRG_RXBUF"),
    (22, "MQ"),
    (28, "INDIRECT_DESC"),
    (29, "EVENT_IDX"),
    (32, "VERSION_1"),
];

#[test]
fn vm_guest_ping_and_tcp_both_ways_over_vhostbox_net() {
    let Some(guest) = guest_dir() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ns = NetNs::new().expect("network namespace");
    let sock = d.join("net.sock");
    let backend = ns.run(|| {
        Backend::start(
            NET,
            &sock,
            &[
                "--socket-path",
                sock.to_str().unwrap(),
                "--tap",
                TAP,
                "--queue-pairs",
                "2",
                "--mtu",
                MTU,
                "--mac",
                "52:54:00:76:62:00",
            ],
        )
    });
    ns.wait_link(TAP);
    ns.ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", TAP]);
    ns.ip(&["link", "set", TAP, "up"]);

    // Host side of the transfers: the guest uploads to :5001 and downloads from :5002.
    let (up_l, down_l) = ns.run(|| {
        (
            TcpListener::bind((HOST_IP, 5001)).unwrap(),
            TcpListener::bind((HOST_IP, 5002)).unwrap(),
        )
    });
    let mut down_data = vec![0u8; XFER];
    for (i, c) in down_data.chunks_mut(4096).enumerate() {
        pattern(c, i as u64, 11);
    }
    let down_sum = sha256_of(&down_data, &d.join("down.bin"));
    let (tx, rx) = mpsc::channel();
    let up_tx = tx.clone();
    std::thread::spawn(move || {
        let r = (|| -> std::io::Result<Vec<u8>> {
            let (mut s, _) = up_l.accept()?;
            s.set_read_timeout(Some(Duration::from_secs(120)))?;
            let mut v = vec![0u8; XFER];
            s.read_exact(&mut v)?;
            Ok(v)
        })();
        let _ = up_tx.send(("up", r));
    });
    std::thread::spawn(move || {
        let r = (|| -> std::io::Result<Vec<u8>> {
            let (mut s, _) = down_l.accept()?;
            s.set_write_timeout(Some(Duration::from_secs(120)))?;
            s.write_all(&down_data)?;
            Ok(Vec::new())
        })();
        let _ = tx.send(("down", r));
    });
    // The host pings the guest until it answers (the guest is up for the whole transfer).
    let ns_ping = NetNs::clone_handle(&ns);
    let pinger = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(240);
        while Instant::now() < deadline {
            let ok = ns_ping.run(|| {
                Command::new("busybox")
                    .args(["ping", "-c", "1", "-W", "1", GUEST_IP])
                    .output()
                    .map(|o| o.status.success())
                    .unwrap_or(false)
            });
            if ok {
                return true;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        false
    });

    let script = d.join("test.sh");
    fs::write(
        &script,
        vhostbox_tests::guest_net_script(GUEST_IP)
            + &format!(
                "r mtu \"$(cat /sys/class/net/eth0/mtu)\"\n\
             r queues \"$(ls -d /sys/class/net/eth0/queues/rx-* | wc -l)\"\n\
             r features \"$(cat /sys/class/net/eth0/device/features)\"\n\
             if ping -c 3 -W 5 {HOST_IP} >/dev/null; then r ping ok; else r ping fail; fi\n\
             dd if=/dev/urandom of=/tmp/up bs=1M count={mb} 2>/dev/null\n\
             r up-sha \"$(sha256sum </tmp/up | cut -d' ' -f1)\"\n\
             nc {HOST_IP} 5001 </tmp/up >/dev/null || r up fail\n\
             nc {HOST_IP} 5002 </dev/null >/tmp/down || r down fail\n\
             r down-sha \"$(sha256sum </tmp/down | cut -d' ' -f1)\"\n\
             r eth0 \"$(cat /sys/class/net/eth0/statistics/rx_packets) rx $(cat /sys/class/net/eth0/statistics/tx_packets) tx\"\n\
             sleep 2\n\
             r done\n",
            mb = XFER >> 20
        ),
    )
    .unwrap();
    let mut run = GuestRun::new(&guest, d, &[(&script, "/test.sh")]);
    let out = run
        .cmd
        .args(["--net", sock.to_str().unwrap()])
        .args(["--net-queues", "2", "--net-mtu", MTU, "--cpus", "2"])
        .args(["--timeout", "400"])
        .output()
        .unwrap();
    let (res, ctx) = run.report(&out, &[("backend", backend.log())]);
    assert!(out.status.success(), "QEMU failed\n{ctx}");
    assert!(res.contains("RESULT done"), "guest did not finish\n{ctx}");
    assert!(!res.contains(" fail"), "a guest step failed\n{ctx}");
    assert_eq!(result_value(&res, "ping"), Some("ok"), "{ctx}");
    assert_eq!(result_value(&res, "mtu"), Some(MTU), "{ctx}");
    assert_eq!(result_value(&res, "queues"), Some("2"), "{ctx}");
    let feats = result_value(&res, "features")
        .unwrap_or_default()
        .as_bytes();
    for &(bit, name) in FEATURE_BITS {
        assert_eq!(feats.get(bit), Some(&b'1'), "{name} not negotiated\n{ctx}");
    }
    assert!(
        pinger.join().unwrap(),
        "the host never got an answer from the guest\n{ctx}"
    );

    let mut got = std::collections::HashMap::new();
    for _ in 0..2 {
        let (what, r) = rx
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("a transfer never finished\n{ctx}"));
        got.insert(what, r.unwrap_or_else(|e| panic!("{what}: {e}\n{ctx}")));
    }
    let up_sum = sha256_of(&got["up"], &d.join("up.bin"));
    assert_eq!(
        result_value(&res, "up-sha"),
        Some(up_sum.as_str()),
        "upload corrupted\n{ctx}"
    );
    assert_eq!(
        result_value(&res, "down-sha"),
        Some(down_sum.as_str()),
        "download corrupted\n{ctx}"
    );
    let log = backend.log();
    assert!(!log.contains("killed"), "{log}");
    assert!(log.contains("worker started"), "not jailed?\n{log}");
}
