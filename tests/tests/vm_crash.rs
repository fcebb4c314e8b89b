//! VM tests of crash safety: QEMU (TCG, shared memfd RAM) with `reconnect-ms` on its vhost-user
//! sockets boots the small guest while its backends' jailed workers die under it.
//!
//! - blk, SIGKILL: the guest runs fio rounds (random writes of 4-64 KiB, crc32c verify, 2 jobs
//!   at queue depth 16) while the test kills the worker 20 times, each at a random moment while
//!   it serves. The guest must see no I/O error and every verify must pass; at the end the
//!   guest's and the host's SHA-256 of the written area agree, and the backends show that
//!   requests left in flight were resubmitted from the in-flight region.
//! - blk, seccomp: the same, but each worker (the test-only jail-probe build,
//!   `--jail-probe seccomp-after=N`) makes a forbidden syscall mid-I/O and is killed by its own
//!   filter, 20 times.
//! - net: the guest pings the host through vhostbox-net while the test kills the worker 5
//!   times; after each kill the host reaches the guest again, and the guest's own pings get
//!   through again at the end.
//!
//! The guest stops its loop when the test tells it to through the disk itself (a marker in a
//! sector fio does not touch) or over the network (a TCP port that starts listening).

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vhostbox_tests::netns::NetNs;
use vhostbox_tests::{blk_args, guest_dir, repo, result_value, sparse_image, Backend, SmallFs, Vm};

const RECONNECT_MS: &str = "200";
const KILLS: usize = 20;
/// The written area: two fio jobs of 24 MiB at 0 and 32 MiB.
const AREA_MB: u64 = 64;
/// The sector (of 4 KiB) the test writes STOP into, outside the area.
const STOP_BLOCK: u64 = 18432;
const DISK_MB: u64 = 80;

/// A guest with `reconnect-ms` on its sockets and two vCPUs.
fn start_vm(guest: &Path, d: &Path, script: &str, args: &[&str]) -> Vm {
    let mut all = vec!["--reconnect-ms", RECONNECT_MS, "--cpus", "2"];
    all.extend_from_slice(args);
    Vm::start(guest, d, script, &[], &all)
}

/// A small xorshift generator: random moments without a dependency, seeded from the clock (the
/// seed is printed so a failing run can be repeated).
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        let seed = std::env::var("VHOSTBOX_KILL_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
                    | 1
            });
        eprintln!("kill moments: VHOSTBOX_KILL_SEED={seed}");
        Rng(seed)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

use vhostbox_tests::log_count_within as wait_count;

fn sha256_range(path: &Path, len: u64) -> String {
    let f = fs::File::open(path).unwrap();
    let mut buf = vec![0u8; len as usize];
    f.read_exact_at(&mut buf, 0).unwrap();
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), &buf).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// The guest's side of the blk tests: fio rounds until the disk says STOP.
fn blk_guest_script() -> String {
    vhostbox_tests::fio_until_stop_script(STOP_BLOCK, AREA_MB)
}

/// Runs the blk crash test. `kill` kills the worker from outside; without it, the workers kill
/// themselves (the seccomp probe) and the test only counts.
fn blk_crash_test(exe: &Path, extra: &[&str], kill: bool) {
    let Some(guest) = guest_dir() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = sparse_image(&d.join("disk.img"), DISK_MB << 20);
    let sock = d.join("vda.sock");
    let mut args = blk_args(&sock, &img, &["--num-queues", "2"]);
    args.extend_from_slice(extra);
    let mut backend = Backend::start_exe(exe, &sock, &args);
    let mut vm = start_vm(
        &guest,
        d,
        &blk_guest_script(),
        &["--blk", sock.to_str().unwrap(), "--blk-queues", "2"],
    );
    assert!(
        vm.wait_result("RESULT start", 120),
        "the guest did not start\n{}",
        vm.context(&backend)
    );
    let started = Instant::now();
    let mut rng = Rng::new();
    let mut deaths = 0;
    let mut reconnect = Vec::new();
    if kill {
        let mut killed_at: Option<Instant> = None;
        while deaths < KILLS {
            // Each kill hits a worker that serves the guest, at a random moment of its I/O.
            assert!(
                wait_count(&backend, "frontend connected", deaths + 1, 60),
                "the guest did not come back after kill {deaths}\n{}",
                vm.context(&backend)
            );
            if let Some(t) = killed_at {
                reconnect.push(t.elapsed());
            }
            std::thread::sleep(Duration::from_millis(100 + rng.below(1400)));
            backend.kill_worker();
            killed_at = Some(Instant::now());
            deaths += 1;
        }
    } else {
        assert!(
            wait_count(&backend, "killed by seccomp", KILLS, 400),
            "fewer than {KILLS} seccomp kills\n{}",
            vm.context(&backend)
        );
        deaths = backend.log().matches("killed by seccomp").count();
    }
    let took = started.elapsed();
    assert!(
        wait_count(&backend, "frontend connected", deaths + 1, 60),
        "the guest did not come back after the last death\n{}",
        vm.context(&backend)
    );
    let (res, ctx, resubmitted) =
        vhostbox_tests::stop_fio_guest(&mut vm, &backend, &img, STOP_BLOCK);
    let log = backend.log();
    reconnect.sort();
    eprintln!(
        "{deaths} worker deaths in {:.1} s; guest fio rounds: {}; requests resubmitted: \
         {resubmitted}; kill to frontend reconnected: median {:?}, max {:?}",
        took.as_secs_f64(),
        result_value(&res, "rounds").unwrap_or("?"),
        reconnect.get(reconnect.len() / 2),
        reconnect.last()
    );
    assert_eq!(result_value(&res, "fio-failures"), Some("0"), "{ctx}");
    assert_eq!(result_value(&res, "io-errors"), Some("0"), "{ctx}");
    assert_eq!(
        result_value(&res, "area-sha"),
        Some(sha256_range(&img, AREA_MB << 20).as_str()),
        "the image differs from what the guest reads\n{ctx}"
    );
    assert!(
        log.matches("worker started").count() > deaths,
        "workers were not replaced\n{ctx}"
    );
    assert!(
        resubmitted > 0,
        "no death left a request in flight to resubmit: the in-flight path was not exercised\n{ctx}"
    );
    assert!(backend.alive(), "the supervisor died\n{ctx}");
}

#[test]
fn vm_blk_guest_sees_nothing_of_20_worker_kills() {
    let exe = vhostbox_tests::bin_path("vhostbox-blk");
    blk_crash_test(&exe, &["--engine", "io-uring", "--direct"], true);
}

#[test]
fn vm_blk_guest_sees_nothing_of_20_seccomp_kills() {
    let exe = repo().join("target/jail-probe/debug/vhostbox-blk");
    assert!(
        exe.exists(),
        "{} missing: build it with `cargo build -p vhostbox-blk --features jail-probe \
         --target-dir target/jail-probe` (scripts/test.sh does)",
        exe.display()
    );
    blk_crash_test(
        &exe,
        &[
            "--engine",
            "io-uring",
            "--seccomp",
            "kill",
            "--jail-probe",
            "seccomp-after=1500",
        ],
        false,
    );
}

const TAP: &str = "crashtap0";
const HOST_IP: &str = "10.79.0.1";
const GUEST_IP: &str = "10.79.0.2";
const NET_KILLS: usize = 5;

fn host_pings_guest(ns: &NetNs) -> bool {
    ns.run(|| {
        Command::new("busybox")
            .args(["ping", "-c", "1", "-W", "1", GUEST_IP])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    })
}

#[test]
fn vm_net_link_comes_back_after_each_of_5_worker_kills() {
    let Some(guest) = guest_dir() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ns = NetNs::new().expect("network namespace");
    let sock = d.join("net.sock");
    let mut backend = ns.run(|| {
        Backend::start(
            "vhostbox-net",
            &sock,
            &["--socket-path", sock.to_str().unwrap(), "--tap", TAP],
        )
    });
    ns.wait_link(TAP);
    ns.ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", TAP]);
    ns.ip(&["link", "set", TAP, "up"]);
    // The guest pings the host until port 5003 on the host accepts a connection.
    let script = format!(
        "#!/bin/sh\n\
         r() {{ echo \"RESULT $*\"; echo \"RESULT $*\" >/dev/ttyS1; }}\n\
         ip link set eth0 up && ip addr add {GUEST_IP}/24 dev eth0 || r net-setup fail\n\
         r start\n\
         ok=0; lost=0\n\
         while ! nc -w 1 {HOST_IP} 5003 </dev/null >/dev/null 2>&1; do\n\
           if ping -c 1 -W 1 {HOST_IP} >/dev/null 2>&1; then ok=$((ok + 1)); else lost=$((lost + 1)); fi\n\
         done\n\
         r pings $ok lost $lost\n\
         if ping -c 3 -W 5 {HOST_IP} >/dev/null; then r final-ping ok; else r final-ping fail; fi\n\
         r done\n"
    );
    let mut vm = start_vm(&guest, d, &script, &["--net", sock.to_str().unwrap()]);
    assert!(
        vm.wait_result("RESULT start", 120),
        "the guest did not start\n{}",
        vm.context(&backend)
    );
    let mut recovery = Vec::new();
    let wait_ping = |what: &str, vm: &Vm, backend: &Backend| -> Duration {
        let t = Instant::now();
        while !host_pings_guest(&ns) {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "the guest is unreachable {what}\n{}",
                vm.context(backend)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        t.elapsed()
    };
    wait_ping("after boot", &vm, &backend);
    for k in 1..=NET_KILLS {
        backend.kill_worker();
        recovery.push(wait_ping(&format!("after kill {k}"), &vm, &backend));
        std::thread::sleep(Duration::from_millis(500));
    }
    // Accept and close at once: the guest's nc sees the end of the stream and exits.
    let stop = ns.run(|| TcpListener::bind((HOST_IP, 5003)).unwrap());
    std::thread::spawn(move || {
        for c in stop.incoming() {
            drop(c);
        }
    });
    let st = vm.wait_exit(120);
    let ctx = vm.context(&backend);
    assert!(st.is_some_and(|s| s.success()), "QEMU: {st:?}\n{ctx}");
    let res = vm.results();
    eprintln!(
        "reachable again after each kill in: {:?}; guest pings: {}",
        recovery,
        result_value(&res, "pings").unwrap_or("?")
    );
    assert!(
        res.contains("RESULT done"),
        "the guest did not finish\n{ctx}"
    );
    assert!(!res.contains(" fail"), "a guest step failed\n{ctx}");
    let ok: usize = result_value(&res, "pings")
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    assert!(
        ok > NET_KILLS,
        "the guest's pings did not get through\n{ctx}"
    );
    assert!(
        backend.log().matches("frontend connected").count() > NET_KILLS,
        "{ctx}"
    );
    assert!(backend.alive(), "the supervisor died\n{ctx}");
}

/// The guest's disk image lives on a 24 MiB tmpfs that a 12 MiB filler shares. The guest
/// writes 8 MiB (fits), then 8 MiB more, which runs out of space: its writes fail with I/O
/// errors, the backend stays up. The test then removes the filler and writes GO into the disk;
/// the guest writes the second 8 MiB again, which now succeeds, and reads both back intact.
#[test]
fn vm_blk_full_backing_store_fails_writes_then_recovers() {
    let Some(guest) = guest_dir() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let small = SmallFs::new(24);
    let mnt = small.path();
    let img = mnt.join("disk.img");
    sparse_image(&img, 32 << 20);
    let filler = mnt.join("filler");
    fs::write(&filler, vec![1u8; 12 << 20]).unwrap();
    let sock = d.join("vda.sock");
    let mut backend = Backend::blk(&sock, &img, &[]);
    const GO_BLOCK: u64 = 7936; // 31 MiB
    let script = format!(
        "#!/bin/sh\n\
         r() {{ echo \"RESULT $*\"; echo \"RESULT $*\" >/dev/ttyS1; }}\n\
         w() {{ dd if=$1 of=/dev/vda bs=1M seek=$2 oflag=direct 2>/tmp/dd.err; }}\n\
         dd if=/dev/urandom of=/tmp/a bs=1M count=8 2>/dev/null\n\
         dd if=/dev/urandom of=/tmp/b bs=1M count=8 2>/dev/null\n\
         if w /tmp/a 0; then r first ok; else r first fail; cat /tmp/dd.err; fi\n\
         if w /tmp/b 8; then r second-failed no; else r second-failed yes; fi\n\
         r second-error \"$(tail -1 /tmp/dd.err)\"\n\
         r kernel-io-errors $(dmesg | grep -c 'I/O error')\n\
         go() {{ [ \"$(dd if=/dev/vda bs=4096 skip={GO_BLOCK} count=1 iflag=direct 2>/dev/null | head -c 2)\" = GO ]; }}\n\
         n=0; until go; do sleep 0.2; n=$((n + 1)); [ $n -lt 600 ] || break; done\n\
         if w /tmp/b 8; then r third ok; else r third fail; cat /tmp/dd.err; fi\n\
         want=$(cat /tmp/a /tmp/b | sha256sum | cut -d' ' -f1)\n\
         got=$(dd if=/dev/vda bs=1M count=16 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)\n\
         if [ \"$want\" = \"$got\" ]; then r verify ok; else r verify fail; fi\n\
         r sha $got\n\
         r done\n"
    );
    let mut vm = start_vm(
        &guest,
        d,
        &script,
        &["--blk", sock.to_str().unwrap(), "--blk-queues", "1"],
    );
    assert!(
        vm.wait_result("RESULT kernel-io-errors", 180),
        "the guest did not get through the full-disk writes\n{}",
        vm.context(&backend)
    );
    assert!(
        backend.alive(),
        "the backend died\n{}",
        vm.context(&backend)
    );
    fs::remove_file(&filler).unwrap();
    let f = fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(b"GO", GO_BLOCK * 4096).unwrap();
    let st = vm.wait_exit(180);
    let ctx = vm.context(&backend);
    assert!(st.is_some_and(|s| s.success()), "QEMU: {st:?}\n{ctx}");
    let res = vm.results();
    eprintln!(
        "while full: dd said {:?}; kernel I/O errors: {}",
        result_value(&res, "second-error").unwrap_or("?"),
        result_value(&res, "kernel-io-errors").unwrap_or("?")
    );
    assert!(
        res.contains("RESULT done"),
        "the guest did not finish\n{ctx}"
    );
    assert_eq!(result_value(&res, "first"), Some("ok"), "{ctx}");
    assert_eq!(result_value(&res, "second-failed"), Some("yes"), "{ctx}");
    let errs: usize = result_value(&res, "kernel-io-errors")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(errs > 0, "the guest saw no I/O error\n{ctx}");
    assert_eq!(result_value(&res, "third"), Some("ok"), "{ctx}");
    assert_eq!(result_value(&res, "verify"), Some("ok"), "{ctx}");
    assert_eq!(
        result_value(&res, "sha"),
        Some(sha256_range(&img, 16 << 20).as_str()),
        "{ctx}"
    );
    let log = backend.log();
    assert!(
        log.contains("No space left on device") || log.contains("short transfer"),
        "{ctx}"
    );
    assert!(!log.contains("killed"), "{ctx}");
    assert!(backend.alive(), "the backend died\n{ctx}");
}
