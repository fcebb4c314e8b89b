//! Each jail layer proven on its own: a probe (test-only `jail-probe` build) that the layer
//! stops fails under the whole jail and succeeds with only that layer left out
//! (`--jail-probe-without LAYER`). Without the second half, a layer could be deleted and
//! every test would still pass, because another layer happens to stop the same probe.
//!
//! Where seccomp would stop the probe first (a socket, dup, mlock), the run uses
//! `--seccomp none`: the point is the layer under test, not the filter.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use vhostbox_tests::{blk_args, probe_bin, sparse_image, Backend};

/// The outcome line of probe `probe` (`--jail-probe SPEC`) in a fresh backend with `extra`
/// arguments, with or without `layer`.
fn outcome(dir: &Path, spec: &str, extra: &[&str], without: Option<&str>) -> String {
    let img = sparse_image(&dir.join("disk.img"), 1 << 20);
    let sock = dir.join("blk.sock");
    let _ = std::fs::remove_file(&sock);
    let mut args = blk_args(&sock, &img, &["--jail-probe", spec]);
    args.extend_from_slice(extra);
    if let Some(l) = without {
        args.extend_from_slice(&["--jail-probe-without", l]);
    }
    let be = Backend::start_exe(&probe_bin("vhostbox-blk"), &sock, &args);
    let name = spec.split('=').next().unwrap();
    let tag = format!("PROBE {name}: ");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = be.log();
        if let Some(l) = log.lines().find(|l| l.contains(&tag)) {
            return l.to_owned();
        }
        assert!(
            !log.contains("killed by seccomp"),
            "{spec}: seccomp stopped it:\n{log}"
        );
        assert!(Instant::now() < deadline, "{spec}: no outcome:\n{log}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `spec` with the whole jail (must fail with `expect_err` in its message) and with
/// `layer` left out (must succeed).
fn proves(layer: &str, spec: &str, extra: &[&str], expect_err: &str) {
    let dir = tempfile::tempdir().unwrap();
    let with = outcome(dir.path(), spec, extra, None);
    assert!(
        with.contains("failed") && with.contains(expect_err),
        "{layer}: with the layer, {spec}: {with}"
    );
    let without = outcome(dir.path(), spec, extra, Some(layer));
    assert!(
        without.contains("SUCCEEDED"),
        "{layer}: without the layer, {spec}: {without}"
    );
}

/// Landlock's network rules: a TCP connect to a port that listens on the host's loopback, from
/// a worker in the host's network namespace (`--sandbox chroot`).
#[test]
fn landlock_stops_tcp_connect() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let spec = format!("tcp-connect={port}");
    proves(
        "landlock",
        &spec,
        &["--sandbox", "chroot", "--seccomp", "none"],
        "Permission denied",
    );
}

/// Landlock's file system rules: opening the jail's own root directory, which exists.
#[test]
fn landlock_stops_opening_the_jail_root() {
    proves(
        "landlock",
        "open-root",
        &["--sandbox", "chroot", "--seccomp", "none"],
        "Permission denied",
    );
}

/// The pre-made ring's restrictions: a NOP (no file needed, so nothing but the restrictions
/// can refuse it) gets the ring's own EACCES.
#[test]
fn uring_restrictions_refuse_an_opcode_outside_the_list() {
    proves("uring-restrictions", "io-uring-nop", &[], "os error 13");
}

#[test]
fn rlimit_nofile_stops_fd_hoarding() {
    // The worker's limit is 608 fds; the host's is higher.
    proves(
        "rlimit-nofile",
        "nofile=700",
        &["--seccomp", "none"],
        "Too many open files",
    );
}

#[test]
fn rlimit_nproc_stops_thread_spawning() {
    // The worker's limit is 8 + (1 + 4 per CPU) per queue tasks; 100 is beyond it on any
    // machine this runs on.
    proves(
        "rlimit-nproc",
        "threads=100",
        &[],
        "Resource temporarily unavailable",
    );
}

#[test]
fn rlimit_fsize_stops_writes_past_the_image() {
    // RLIMIT_FSIZE is the image size, but at least 64 MiB.
    let at = (64u64 << 20) + 4096;
    proves(
        "rlimit-fsize",
        &format!("fsize={at}"),
        &[],
        "File too large",
    );
}

#[test]
fn rlimit_memlock_stops_locking_memory() {
    proves(
        "rlimit-memlock",
        "mlock",
        &["--seccomp", "none"],
        "Operation not permitted",
    );
}

/// Not dumpable: another process of the worker's own uid (nobody, in `--sandbox chroot`)
/// cannot pass the ptrace access check on it (here /proc/PID/environ, PTRACE_MODE_READ, the
/// check ptrace(2) and /proc/PID/mem make too); it can once the worker is made dumpable.
#[test]
fn not_dumpable_stops_a_sibling_of_the_same_uid() {
    for (without, readable) in [(None, false), (Some("dumpable"), true)] {
        let dir = tempfile::tempdir().unwrap();
        let img = sparse_image(&dir.path().join("disk.img"), 1 << 20);
        let sock = dir.path().join("blk.sock");
        let mut args = blk_args(&sock, &img, &["--sandbox", "chroot"]);
        if let Some(l) = without {
            args.extend_from_slice(&["--jail-probe-without", l]);
        }
        let be = Backend::start_exe(&probe_bin("vhostbox-blk"), &sock, &args);
        be.wait_log("ready; waiting for a frontend");
        let pid = be.worker_pid();
        let status = vhostbox_tests::proc_status(&pid.to_string());
        assert!(status["Uid"].starts_with("65534"), "{status:?}");
        let out = Command::new("cat")
            .arg(format!("/proc/{pid}/environ"))
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap();
        assert_eq!(
            out.status.success(),
            readable,
            "{without:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Per-worker cgroups (`--memory-max`): a worker that grows past its limit is killed by the
/// kernel, not the host; with the cgroup left out the same growth succeeds. While a worker
/// runs it sits in a cgroup of its own, which is removed once it has ended.
#[test]
fn cgroup_memory_max_stops_a_worker_that_grows() {
    let dir = tempfile::tempdir().unwrap();
    let img = sparse_image(&dir.path().join("disk.img"), 1 << 20);
    let sock = dir.path().join("blk.sock");
    // With the cgroup: killed by the OOM killer (SIGKILL), then replaced.
    let args = blk_args(
        &sock,
        &img,
        &["--memory-max", "64M", "--jail-probe", "alloc=256"],
    );
    let mut be = Backend::start_exe(&probe_bin("vhostbox-blk"), &sock, &args);
    let log = be.wait_log("killed by signal 9");
    assert!(!log.contains("PROBE alloc: SUCCEEDED"), "{log}");
    // The replacement (which does not probe) is in its own cgroup.
    be.wait_log("ready; waiting for a frontend");
    let pid = be.worker_pid();
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let mine = cg
        .lines()
        .find(|l| l.contains("memory") || l.starts_with("0::"))
        .unwrap_or("")
        .to_owned();
    assert!(mine.contains("worker-2"), "{cg}");
    // A clean stop removes it.
    let path = mine.rsplit(':').next().unwrap().to_owned();
    let dir_of = |root: &str| std::path::PathBuf::from(format!("{root}{path}"));
    let candidates = [
        dir_of("/sys/fs/cgroup/memory"),
        dir_of("/sys/fs/cgroup/unified"),
        dir_of("/sys/fs/cgroup"),
    ];
    let existing: Vec<_> = candidates.iter().filter(|p| p.exists()).cloned().collect();
    assert!(!existing.is_empty(), "the worker's cgroup {path} exists");
    assert!(be.signal_and_wait(libc::SIGTERM).success());
    for p in existing {
        assert!(!p.exists(), "{} left behind", p.display());
    }
    // Without it: the growth succeeds.
    let dir = tempfile::tempdir().unwrap();
    let img = sparse_image(&dir.path().join("disk.img"), 1 << 20);
    let sock = dir.path().join("blk.sock");
    let mut args = blk_args(
        &sock,
        &img,
        &["--memory-max", "64M", "--jail-probe", "alloc=256"],
    );
    args.extend_from_slice(&["--jail-probe-without", "cgroup"]);
    let be = Backend::start_exe(&probe_bin("vhostbox-blk"), &sock, &args);
    be.wait_log("PROBE alloc: SUCCEEDED");
}

/// A limit asked for where no cgroup can be written is a usage error, not a silent no-op.
#[test]
fn a_cgroup_limit_that_cannot_be_applied_is_a_usage_error() {
    let out = Command::new(probe_bin("vhostbox-blk"))
        .args([
            "--socket-path",
            "/tmp/never.sock",
            "--null",
            "1G",
            "--cpu-weight",
            "0",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--cpu-weight 0 is out of range"));
}
