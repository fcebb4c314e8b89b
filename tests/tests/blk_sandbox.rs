//! The jail, proven from the outside on the real binary: the worker's /proc status, namespaces,
//! root and fds; every attack a probe build attempts from inside the jail fails or gets the
//! worker killed by seccomp, the supervisor reports it and a fresh worker serves the next
//! frontend; the other sandbox modes; bad --user values.
//!
//! The probe tests need the test-only build with the `jail-probe` feature, which scripts/test.sh
//! makes: `cargo build -p vhostbox-blk --features jail-probe --target-dir target/jail-probe`
//! (or point VHOSTBOX_PROBE_BIN at one).

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use blkio::{Blkio, Completion, ReqFlags};
use vhostbox_tests::{blk_args, pattern, run_to_exit, sparse_image, Backend};

const BLK: &str = "vhostbox-blk";

fn probe_bin() -> PathBuf {
    vhostbox_tests::probe_bin("vhostbox-blk")
}

fn image(dir: &Path) -> PathBuf {
    sparse_image(&dir.join("disk.img"), 16 << 20)
}

/// Connects with libblkio, writes a 64 KiB pattern at `lba`, reads it back and compares; also
/// checks the image on the host. Returns with the client disconnected.
fn verified_io(sock: &Path, img: &Path, lba: u64) {
    let mut b = Blkio::new("virtio-blk-vhost-user").unwrap();
    b.set_str("path", sock.to_str().unwrap()).unwrap();
    b.connect().expect("connect");
    b.set_i32("num-queues", 1).unwrap();
    let mut out = b.start().expect("start");
    let len = 64 << 10;
    let region = b.alloc_mem_region(2 * len).unwrap();
    b.map_mem_region(&region).unwrap();
    // SAFETY: the region is a live mapping of 2 * len bytes owned by this function.
    let mem = unsafe { std::slice::from_raw_parts_mut(region.addr as *mut u8, 2 * len) };
    pattern(&mut mem[..len], lba, 99);
    mem[len..].fill(0);
    let q = &mut out.queues[0];
    let run = |q: &mut blkio::Blkioq| {
        let mut c = [std::mem::MaybeUninit::<Completion>::uninit()];
        let mut t = Duration::from_secs(20);
        let n = q.do_io(&mut c, 1, Some(&mut t), None).expect("do_io");
        assert_eq!(n, 1, "no completion");
        // SAFETY: do_io initialised the first completion.
        unsafe { c[0].assume_init_read() }.ret
    };
    q.write(lba * 512, mem.as_mut_ptr(), len, 0, ReqFlags::empty());
    assert_eq!(run(q), 0, "write failed");
    q.read(
        lba * 512,
        mem[len..].as_mut_ptr(),
        len,
        0,
        ReqFlags::empty(),
    );
    assert_eq!(run(q), 0, "read failed");
    assert!(mem[..len] == mem[len..], "read back something else");
    let on_disk = fs::read(img).unwrap();
    let off = (lba * 512) as usize;
    assert!(
        on_disk[off..off + len] == mem[..len],
        "the image does not hold the data"
    );
    b.unmap_mem_region(&region);
    b.free_mem_region(&region);
}

fn status(pid: i32) -> HashMap<String, String> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

/// The properties every jailed thread must have.
fn assert_jailed_thread(st: &HashMap<String, String>, what: &str) {
    assert_eq!(
        st["Seccomp"], "2",
        "{what}: not under a seccomp filter: {st:?}"
    );
    assert_eq!(st["NoNewPrivs"], "1", "{what}: {st:?}");
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(st[cap], "0000000000000000", "{what}: {cap} not empty");
    }
    for ids in ["Uid", "Gid"] {
        for id in st[ids].split_whitespace() {
            assert_ne!(id, "0", "{what}: runs with {ids} 0: {}", st[ids]);
        }
    }
    assert_eq!(st["Groups"], "", "{what}: supplementary groups left");
}

fn assert_jailed(pid: i32) {
    let tasks: Vec<_> = fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    for t in &tasks {
        let st = status(t.parse().unwrap());
        assert_jailed_thread(&st, &format!("worker {pid} thread {t}"));
    }
    // Every namespace differs from the test's (the host's).
    for ns in ["user", "mnt", "pid", "net", "ipc", "uts", "cgroup"] {
        let w = fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        let h = fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_ne!(w, h, "worker shares the host's {ns} namespace");
    }
    // Its root holds nothing.
    let root: Vec<_> = fs::read_dir(format!("/proc/{pid}/root"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(root.is_empty(), "worker's root is not empty: {root:?}");
    // Only sockets, the image, eventfds, io_uring, the report pipe and stdio are open.
    for e in fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let e = e.unwrap();
        let target = fs::read_link(e.path()).unwrap();
        let t = target.to_string_lossy();
        let ok = t.starts_with("socket:")
            || t.starts_with("anon_inode:")
            || t.starts_with("pipe:")
            || t.ends_with("disk.img")
            || t.ends_with(".log")
            || t == "/dev/null"
            || t.starts_with("/memfd:");
        assert!(ok, "unexpected fd {:?} -> {t}", e.file_name());
    }
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let nofile: u64 = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .unwrap()
        .parse()
        .unwrap();
    assert!(nofile <= 1024, "RLIMIT_NOFILE not tightened: {nofile}");
}

/// The worker that waits for a frontend and the one serving it (with its queue threads) are
/// jailed, on both engines; the supervisor's worker is replaced after each connection.
#[test]
fn worker_is_jailed_while_idle_and_serving() {
    for engine in ["io-uring", "sync"] {
        let dir = tempfile::tempdir().unwrap();
        let img = image(dir.path());
        let sock = dir.path().join("blk.sock");
        let be = Backend::start(
            BLK,
            &sock,
            &blk_args(&sock, &img, &["--engine", engine, "--num-queues", "2"]),
        );
        let idle = be.worker_pid();
        be.wait_log("ready; waiting for a frontend");
        assert_jailed(idle);

        // Serving: keep a connection open and inspect the worker and its threads.
        let mut b = Blkio::new("virtio-blk-vhost-user").unwrap();
        b.set_str("path", sock.to_str().unwrap()).unwrap();
        b.connect().unwrap();
        b.set_i32("num-queues", 2).unwrap();
        let _q = b.start().unwrap();
        let threads = fs::read_dir(format!("/proc/{idle}/task")).unwrap().count();
        assert!(threads >= 3, "expected queue threads in the serving worker");
        assert_jailed(idle);
        drop(b);
        verified_io(&sock, &img, 8);
        let log = be.log();
        assert!(!log.contains("killed"), "{log}");
    }
}

/// What each probe should run into. `killed`: the seccomp filter (default --seccomp kill);
/// `layer`: the layer that must stop it when seccomp is off.
struct Probe {
    name: &'static str,
    /// Stopped with --seccomp none too (by namespaces, Landlock, capabilities, ids, io_uring
    /// restrictions); false for the attempts only seccomp can stop.
    stopped_without_seccomp: bool,
}

const PROBES: &[Probe] = &[
    Probe {
        name: "open-passwd",
        stopped_without_seccomp: true,
    },
    Probe {
        name: "open-old-root",
        stopped_without_seccomp: true,
    },
    Probe {
        name: "exec-sh",
        stopped_without_seccomp: true,
    },
    Probe {
        name: "socket-inet",
        stopped_without_seccomp: false,
    },
    Probe {
        name: "socket-netlink",
        stopped_without_seccomp: false,
    },
    Probe {
        name: "kill",
        stopped_without_seccomp: true,
    },
    Probe {
        name: "ptrace",
        stopped_without_seccomp: true,
    },
    Probe {
        name: "mount",
        stopped_without_seccomp: true,
    },
    Probe {
        name: "setuid-root",
        stopped_without_seccomp: true,
    },
    Probe {
        name: "io-uring-setup",
        stopped_without_seccomp: false,
    },
    Probe {
        name: "io-uring-openat",
        stopped_without_seccomp: true,
    },
    Probe {
        name: "mprotect-exec",
        stopped_without_seccomp: false,
    },
    Probe {
        name: "mmap-exec",
        stopped_without_seccomp: false,
    },
];

/// Runs one probe in a fresh backend; returns the supervisor's log once the outcome is known,
/// after checking that the replacement worker serves a frontend and nothing host-side was hit.
fn run_probe(probe: &str, seccomp: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let sock = dir.path().join("blk.sock");
    // A host file outside the jail and a host process, as targets.
    let secret = dir.path().join("secret.txt");
    fs::write(&secret, "host secret").unwrap();
    let mut victim = Command::new("sleep")
        .arg("60")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let spec = match probe {
        "open-old-root" => format!("{probe}={}", secret.display()),
        "kill" | "ptrace" => format!("{probe}={}", victim.id()),
        _ => probe.to_string(),
    };
    let be = Backend::start_exe(
        &probe_bin(),
        &sock,
        &blk_args(&sock, &img, &["--seccomp", seccomp, "--jail-probe", &spec]),
    );
    let log = be.wait_log("worker started, pid");
    // The outcome: the probe's own report, or the supervisor's seccomp report.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let log = loop {
        let l = be.log();
        if l.contains(&format!("PROBE {probe}: ")) || l.contains("killed by seccomp") {
            break l;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no outcome for {probe}:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        !log.contains("SUCCEEDED"),
        "probe {probe} got through the jail:\n{log}"
    );
    // The replacement worker (generation 2 does not probe) serves a frontend: the first
    // worker is gone (it probed and exited or was killed), so this connection waits in the
    // listener's backlog for its successor.
    verified_io(&sock, &img, 16);
    assert!(
        matches!(victim.try_wait(), Ok(None)),
        "the host process was killed by probe {probe}"
    );
    let _ = victim.kill();
    let _ = victim.wait();
    assert_eq!(fs::read_to_string(&secret).unwrap(), "host secret");
    be.log()
}

/// With the default --seccomp kill, every attack either fails or kills the worker; the
/// supervisor names the syscall and the next worker serves.
#[test]
fn every_probe_fails_under_the_default_jail() {
    let mut summary = Vec::new();
    for p in PROBES {
        let log = run_probe(p.name, "kill");
        let line = log
            .lines()
            .find(|l| {
                l.contains(&format!("PROBE {}: failed", p.name)) || l.contains("killed by seccomp")
            })
            .unwrap_or_else(|| panic!("no outcome line for {}:\n{log}", p.name));
        if line.contains("killed by seccomp") {
            assert!(
                line.contains("is not allowed") && line.contains("syscall "),
                "the report must name the syscall: {line}"
            );
        }
        summary.push(format!("{:16} {}", p.name, line.trim()));
    }
    eprintln!("{}", summary.join("\n"));
}

/// With seccomp off, the other layers alone still stop everything but what only seccomp can
/// (creating sockets in the empty net namespace, a new io_uring, executable memory).
#[test]
fn layers_below_seccomp_stop_file_exec_mount_uid_signal_and_uring_attacks() {
    for p in PROBES.iter().filter(|p| p.stopped_without_seccomp) {
        let log = run_probe(p.name, "none");
        assert!(
            log.contains(&format!("PROBE {}: failed", p.name)),
            "probe {} was not stopped by the layers below seccomp:\n{log}",
            p.name
        );
    }
}

/// A worker killed by seccomp is replaced, and the supervisor names the syscall: in kill mode
/// from the seccomp notification it receives, in trap mode from the worker's SIGSYS handler.
#[test]
fn seccomp_killed_worker_is_replaced_and_reported() {
    for mode in ["kill", "trap"] {
        for (probe, nr, name) in [("socket-inet", 41, "socket"), ("mount", 165, "mount")] {
            let log = run_probe(probe, mode);
            let want = format!("killed by seccomp: syscall {nr} ({name}) is not allowed");
            assert!(log.contains(&want), "{mode}: {log}");
            assert!(log.matches("worker started, pid").count() >= 2, "{log}");
        }
    }
}

#[test]
fn chroot_mode_serves_jailed_as_nobody() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let sock = dir.path().join("blk.sock");
    let be = Backend::start(BLK, &sock, &blk_args(&sock, &img, &["--sandbox", "chroot"]));
    let w = be.worker_pid();
    be.wait_log("ready; waiting for a frontend");
    let st = status(w);
    assert_jailed_thread(&st, "chroot worker");
    assert!(st["Uid"].starts_with("65534"), "{st:?}");
    let root: Vec<_> = fs::read_dir(format!("/proc/{w}/root")).unwrap().collect();
    assert!(root.is_empty());
    verified_io(&sock, &img, 0);
}

#[test]
fn explicit_user_and_no_sandbox() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let sock = dir.path().join("blk.sock");
    let be = Backend::start(BLK, &sock, &blk_args(&sock, &img, &["--user", "4242:4343"]));
    let w = be.worker_pid();
    be.wait_log("ready; waiting for a frontend");
    let st = status(w);
    assert!(st["Uid"].split_whitespace().all(|u| u == "4242"), "{st:?}");
    assert!(st["Gid"].split_whitespace().all(|g| g == "4343"), "{st:?}");
    verified_io(&sock, &img, 0);
    drop(be);

    let sock2 = dir.path().join("blk2.sock");
    let be = Backend::start(BLK, &sock2, &blk_args(&sock2, &img, &["--sandbox", "none"]));
    let log = be.wait_log("ready");
    assert!(
        log.contains("WARN") && log.contains("sandbox"),
        "no loud warning:\n{log}"
    );
    verified_io(&sock2, &img, 32);
}

#[test]
fn bad_user_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let sock = dir.path().join("blk.sock");
    for (user, needle) in [
        ("no-such-user-xyz", "no-such-user-xyz"),
        ("0", "root"),
        ("root", "root"),
        ("12:x", "12:x"),
    ] {
        let (code, err) = run_to_exit(BLK, &blk_args(&sock, &img, &["--user", user]));
        assert_eq!(code, 2, "--user {user}: {err}");
        assert!(err.contains(needle), "--user {user}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");
        assert!(!sock.exists(), "socket left behind for --user {user}");
    }
}

/// A worker never outlives its supervisor, even though switching ids clears the parent-death
/// signal: killing the supervisor with SIGKILL takes the worker down too.
#[test]
fn worker_dies_with_its_supervisor() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let sock = dir.path().join("blk.sock");
    let mut be = Backend::start(BLK, &sock, &blk_args(&sock, &img, &[]));
    let w = be.worker_pid();
    be.wait_log("ready; waiting for a frontend");
    assert_eq!(status(w)["PPid"], be.pid().to_string());
    be.child.kill().unwrap();
    be.child.wait().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let state = fs::read_to_string(format!("/proc/{w}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("State:"))
                    .map(|l| l.to_string())
            });
        match state {
            None => break,                                // gone
            Some(s) if s.contains("Z (zombie)") => break, // dead, waiting for a reaper
            Some(s) => assert!(
                std::time::Instant::now() < deadline,
                "worker {w} outlived its supervisor: {s}"
            ),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The supervisor itself, started as root, keeps only the capabilities its job needs (KILL,
/// SETGID, SETUID, SETPCAP, SYS_CHROOT; SYS_ADMIN only where the kernel reserves user
/// namespaces to it), with no_new_privs.
#[test]
fn supervisor_keeps_only_what_it_needs() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let sock = dir.path().join("blk.sock");
    let be = Backend::start(BLK, &sock, &blk_args(&sock, &img, &[]));
    be.worker_pid();
    let st = status(be.pid());
    // SAFETY: geteuid has no arguments.
    if unsafe { libc::geteuid() } != 0 {
        return; // an unprivileged supervisor has nothing to drop
    }
    let allowed: u64 = [5u32, 6, 7, 8, 18, 21].iter().fold(0, |m, &c| m | 1 << c);
    for set in ["CapEff", "CapPrm", "CapBnd"] {
        let v = u64::from_str_radix(&st[set], 16).unwrap();
        assert_eq!(
            v & !allowed,
            0,
            "supervisor {set} {v:#x} holds more than it needs"
        );
        assert_ne!(
            v & (1 << 7),
            0,
            "supervisor lost CAP_SETUID (needed for uid maps)"
        );
    }
    assert_eq!(st["CapInh"], "0000000000000000");
    assert_eq!(st["CapAmb"], "0000000000000000");
    assert_eq!(st["NoNewPrivs"], "1");
    verified_io(&sock, &img, 4);
}
