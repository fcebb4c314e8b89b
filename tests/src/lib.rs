//! Helpers for the protocol and VM tests: start the real backend binaries, wait for their
//! sockets, and drive them with real frontends.

pub mod blkio_client;
pub mod blkreq;
pub mod frontend;
pub mod hostile;
pub mod net_frontend;
pub mod netns;
pub mod openmetrics;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Path of a workspace binary built next to the running test (`target/<profile>/NAME`).
/// `VHOSTBOX_BIN_DIR` overrides the directory.
pub fn bin_path(name: &str) -> PathBuf {
    if let Ok(dir) = std::env::var("VHOSTBOX_BIN_DIR") {
        return Path::new(&dir).join(name);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // A test runs as target/<profile>/deps/<test>-<hash>; a tool (the benchmarks) as
    // target/<profile>/<tool>, next to the binaries.
    let mut dir = exe.parent().expect("target dir");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().expect("target dir");
    }
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} not built: run `cargo build --workspace --bins` first (scripts/test.sh does)",
        p.display()
    );
    p
}

/// The test-only build of backend `name` with the `jail-probe` feature (scripts/test.sh makes
/// it in target/jail-probe), or `VHOSTBOX_PROBE_BIN` for vhostbox-blk.
pub fn probe_bin(name: &str) -> PathBuf {
    if let (Ok(p), "vhostbox-blk") = (std::env::var("VHOSTBOX_PROBE_BIN"), name) {
        return p.into();
    }
    let p = repo().join("target/jail-probe/debug").join(name);
    assert!(
        p.exists(),
        "{} missing: build it with `cargo build -p {name} --features jail-probe \
         --target-dir target/jail-probe` (scripts/test.sh does)",
        p.display()
    );
    p
}

/// The fields of /proc/PID/status (PID may be `PID/task/TID`).
pub fn proc_status(pid: &str) -> std::collections::HashMap<String, String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

/// Asserts that every thread of process `pid` runs under a seccomp filter with no_new_privs,
/// no capability in any set and no uid or gid 0, in namespaces of its own, in an empty root.
pub fn assert_jailed(pid: i32) {
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let t = t.unwrap().file_name().into_string().unwrap();
        let st = proc_status(&t);
        assert_eq!(st["Seccomp"], "2", "thread {t}: {st:?}");
        assert_eq!(st["NoNewPrivs"], "1", "thread {t}");
        for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            assert_eq!(st[cap], "0000000000000000", "thread {t}: {cap}");
        }
        for ids in ["Uid", "Gid"] {
            assert!(
                st[ids].split_whitespace().all(|i| i != "0"),
                "thread {t}: {ids} {}",
                st[ids]
            );
        }
    }
    for ns in ["user", "mnt", "pid", "net", "ipc", "uts", "cgroup"] {
        let w = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        let h = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_ne!(w, h, "worker {pid} shares the test's {ns} namespace");
    }
    let root = std::fs::read_dir(format!("/proc/{pid}/root"))
        .unwrap()
        .count();
    assert_eq!(root, 0, "worker {pid} sees files in its root");
}

/// Creates a sparse file of `bytes` at `path` (a fresh disk image) and returns its path.
pub fn sparse_image(path: &Path, bytes: u64) -> PathBuf {
    std::fs::File::create(path)
        .and_then(|f| f.set_len(bytes))
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
    path.to_owned()
}

/// vhostbox-blk's arguments to serve `image` on `socket`, followed by `extra`.
pub fn blk_args<'a>(socket: &'a Path, image: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "--socket-path",
        socket.to_str().expect("utf-8 socket path"),
        "--image",
        image.to_str().expect("utf-8 image path"),
    ];
    v.extend_from_slice(extra);
    v
}

/// Runs `vhostboxctl --control sock args...`: its exit status, the reply it printed (JSON, on
/// success) and what it wrote on stderr (the error, on failure).
pub fn vhostboxctl(sock: &Path, args: &[&str]) -> (i32, serde_json::Value, String) {
    let o = std::process::Command::new(bin_path("vhostboxctl"))
        .arg("--control")
        .arg(sock)
        .args(args)
        .output()
        .unwrap();
    let v = serde_json::from_slice(&o.stdout).unwrap_or(serde_json::Value::Null);
    (
        o.status.code().unwrap_or(-1),
        v,
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

/// The command name the service process (`--metrics`, `--control`) gives itself.
const SERVICE_COMM: &str = "vbx-service";

/// A backend process, killed on drop.
pub struct Backend {
    pub child: Child,
    pub socket: PathBuf,
    stderr_path: PathBuf,
}

impl Backend {
    /// Starts `bin` with `args` and waits until `socket` exists (the backend binds it).
    pub fn start(bin: &str, socket: &Path, args: &[&str]) -> Backend {
        Backend::start_exe(&bin_path(bin), socket, args)
    }

    /// vhostbox-blk serving `image` on `socket`, with `extra` arguments.
    pub fn blk(socket: &Path, image: &Path, extra: &[&str]) -> Backend {
        Backend::start("vhostbox-blk", socket, &blk_args(socket, image, extra))
    }

    /// Like `start`, for an executable given by path.
    pub fn start_exe(exe: &Path, socket: &Path, args: &[&str]) -> Backend {
        Backend::start_exe_env(exe, socket, args, &[])
    }

    /// Like `start_exe`, with more environment variables.
    pub fn start_exe_env(
        exe: &Path,
        socket: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Backend {
        let stderr_path = socket.with_extension("log");
        let log = std::fs::File::create(&stderr_path).expect("log file");
        let child = Command::new(exe)
            .args(args)
            .env("VHOSTBOX_LOG", "debug")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn backend");
        let mut b = Backend {
            child,
            socket: socket.to_owned(),
            stderr_path,
        };
        b.wait_for_socket();
        b
    }

    fn wait_for_socket(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.socket.exists() {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("backend exited early with {st}: {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "socket never appeared: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// What the backend wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Sends a signal and waits (up to 20 s) for the exit status.
    pub fn signal_and_wait(&mut self, sig: i32) -> ExitStatus {
        // SAFETY: kill() on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
        self.wait_exit(Duration::from_secs(20))
            .unwrap_or_else(|| panic!("backend did not exit: {}", self.log()))
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The backend's (the supervisor's) pid.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The pid of the supervisor's service process (`--metrics`, `--control`), waiting up to
    /// 10 s for it.
    ///
    /// The service process names itself before it enters its jail: this waits (up to 10 s)
    /// until its seccomp filter is on, the jail's last step, so that what a test then reads in
    /// /proc is the jailed process, not one still setting up (seen once in CI: every
    /// capability and no filter yet).
    pub fn service_pid(&self) -> i32 {
        let pid = self.child_pid("service process", |comm| comm == SERVICE_COMM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline
            && proc_status(&pid.to_string())
                .get("Seccomp")
                .map(String::as_str)
                != Some("2")
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        pid
    }

    /// The pid of the supervisor's current worker, waiting up to 10 s for one to exist.
    pub fn worker_pid(&self) -> i32 {
        // Not the service process, which names itself.
        self.child_pid("worker", |comm| comm != SERVICE_COMM)
    }

    /// The first child of the supervisor whose command name passes `pick`, waiting up to 10 s.
    fn child_pid(&self, what: &str, pick: impl Fn(&str) -> bool) -> i32 {
        let pid = self.pid();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let kids = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                .unwrap_or_default();
            let found = kids.split_whitespace().find(|k| {
                std::fs::read_to_string(format!("/proc/{k}/comm")).is_ok_and(|c| pick(c.trim()))
            });
            if let Some(k) = found {
                return k.parse().unwrap();
            }
            assert!(Instant::now() < deadline, "no {what}: {}", self.log());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits up to 20 s for `needle` to appear in the log; returns the log.
    pub fn wait_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let log = self.log();
            if log.contains(needle) {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in the log:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (up to 20 s) until `needle` appears at least `n` times in the log.
    pub fn wait_log_count(&self, needle: &str, n: usize) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let log = self.log();
            if log.matches(needle).count() >= n {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "{needle:?} not {n} times in the log:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the process still runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILLs the supervisor's current worker and waits (up to 20 s) for its replacement;
    /// returns the killed pid.
    pub fn kill_worker(&self) -> i32 {
        let pid = self.worker_pid();
        // SAFETY: kill() on the backend's worker, a process this test started (indirectly).
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.worker_pid() == pid {
            assert!(Instant::now() < deadline, "no new worker after {pid}");
            std::thread::sleep(Duration::from_millis(5));
        }
        pid
    }
}

/// A tmpfs of `mb` MiB mounted on a temporary directory, unmounted (lazily: a backend may still
/// hold a file) when dropped. Needs root, which the test suite runs as.
pub struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    pub fn new(mb: u64) -> SmallFs {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mb}m"), "tmpfs"])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mounting a {mb} MiB tmpfs (the test needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallFs { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- backend log\n{}", self.log());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `bin` with `args` to completion and returns (exit code, stderr).
pub fn run_to_exit(bin: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(bin_path(bin))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A deterministic byte pattern for block `lba` written in round `gen`: verifies position and
/// freshness of data, not just its presence.
pub fn pattern(buf: &mut [u8], lba: u64, gen: u64) {
    let mut x =
        lba.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ gen.wrapping_mul(0xD1B5_4A32_D192_ED03) | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The guest for VM tests (build/guest), or None when they are skipped on purpose
/// (VHOSTBOX_SKIP_VM=1, said loudly). Without a guest and without that, it panics.
pub fn guest_dir() -> Option<PathBuf> {
    let dir = repo().join("build/guest");
    if dir.join("vmlinux").exists() && dir.join("initramfs.cpio.gz").exists() {
        return Some(dir);
    }
    if std::env::var("VHOSTBOX_SKIP_VM").as_deref() == Ok("1") {
        eprintln!(
            "VM TEST SKIPPED (VHOSTBOX_SKIP_VM=1): no guest in {}",
            dir.display()
        );
        return None;
    }
    panic!(
        "no guest in {}: run scripts/build-guest.sh (or set VHOSTBOX_SKIP_VM=1 to skip VM tests)",
        dir.display()
    );
}

/// The start of a guest's /test.sh that uses a NIC: `r KEY VALUE` reports on the result
/// channel, and eth0 gets `ip`/24.
pub fn guest_net_script(ip: &str) -> String {
    format!(
        "#!/bin/sh\n\
         r() {{ echo \"RESULT $*\"; echo \"RESULT $*\" >/dev/ttyS1; }}\n\
         ip link set eth0 up && ip addr add {ip}/24 dev eth0 || r net-setup fail\n"
    )
}

/// The value of `RESULT KEY VALUE` in a guest's result channel.
pub fn result_value<'a>(results: &'a str, key: &str) -> Option<&'a str> {
    results
        .lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix("RESULT "))
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ').map(str::trim))
}

/// A guest booted by scripts/run-guest.sh from `guest` with a test overlay: `files` are
/// (host path, path in the guest), the first one usually `/test.sh`. Files of the run go to
/// `dir`. Add the devices and options to `cmd`, then run it.
pub struct GuestRun {
    pub cmd: Command,
    pub results: PathBuf,
    pub console: PathBuf,
}

impl GuestRun {
    pub fn new(guest: &Path, dir: &Path, files: &[(&Path, &str)]) -> GuestRun {
        let overlay = dir.join("overlay.cpio.gz");
        let st = Command::new(repo().join("scripts/mk-overlay.sh"))
            .arg(&overlay)
            .args(files.iter().map(|(p, at)| format!("{}:{at}", p.display())))
            .status()
            .unwrap();
        assert!(st.success(), "mk-overlay.sh failed");
        let results = dir.join("results.txt");
        let console = dir.join("console.txt");
        let mut cmd = Command::new(repo().join("scripts/run-guest.sh"));
        cmd.arg("--guest-dir")
            .arg(guest)
            .arg("--overlay")
            .arg(&overlay)
            .arg("--result")
            .arg(&results)
            .arg("--console")
            .arg(&console);
        GuestRun {
            cmd,
            results,
            console,
        }
    }

    /// What the guest reported on its result channel, and a context for failure messages:
    /// the exit status, QEMU's stderr, the results, the console's tail and `logs`.
    pub fn report(&self, out: &std::process::Output, logs: &[(&str, String)]) -> (String, String) {
        let res = std::fs::read_to_string(&self.results).unwrap_or_default();
        let con = std::fs::read_to_string(&self.console).unwrap_or_default();
        let tail: Vec<&str> = con.lines().rev().take(60).collect();
        let mut ctx = format!(
            "run-guest: {:?}\n{}\n--- results\n{res}\n--- console (tail)\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        );
        for (name, log) in logs {
            ctx.push_str(&format!("\n--- {name}\n{log}"));
        }
        (res, ctx)
    }
}

/// A guest under QEMU, killed (the whole process group) when dropped.
pub struct Vm {
    pub child: Child,
    pub results: PathBuf,
    console: PathBuf,
    stderr: PathBuf,
}

impl Vm {
    /// Boots the guest with `script` as /test.sh (and `files`, as in [`GuestRun::new`]) and
    /// `args` for scripts/run-guest.sh; returns at once.
    pub fn start(
        guest: &Path,
        d: &Path,
        script: &str,
        files: &[(&Path, &str)],
        args: &[&str],
    ) -> Vm {
        let path = d.join("test.sh");
        std::fs::write(&path, script).unwrap();
        let mut all: Vec<(&Path, &str)> = vec![(&path, "/test.sh")];
        all.extend_from_slice(files);
        let GuestRun {
            mut cmd,
            results,
            console,
        } = GuestRun::new(guest, d, &all);
        let stderr = d.join("qemu.err");
        let child = cmd
            // No timeout wrapper: it would put QEMU in a process group of its own, out of
            // reach of Drop. The test's own waits are bounded.
            .args(["--timeout", "0"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .process_group(0)
            .spawn()
            .unwrap();
        Vm {
            child,
            results,
            console,
            stderr,
        }
    }

    pub fn results(&self) -> String {
        std::fs::read_to_string(&self.results).unwrap_or_default()
    }

    /// Waits for `needle` in the results; false after `secs` or when QEMU ended.
    pub fn wait_result(&mut self, needle: &str, secs: u64) -> bool {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < deadline {
            if self.results().contains(needle) {
                return true;
            }
            if let Ok(Some(_)) = self.child.try_wait() {
                return self.results().contains(needle);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    pub fn wait_exit(&mut self, secs: u64) -> Option<ExitStatus> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }

    /// The results, the console's tail and the backend's log, for failure messages.
    pub fn context(&self, backend: &Backend) -> String {
        let con = std::fs::read_to_string(&self.console).unwrap_or_default();
        let tail: Vec<&str> = con.lines().rev().take(50).collect();
        let log = backend.log();
        let log_tail: Vec<&str> = log.lines().rev().take(80).collect();
        format!(
            "--- run-guest.sh/QEMU stderr\n{}\n--- results\n{}\n--- console (tail)\n{}\n--- backend log (tail)\n{}",
            std::fs::read_to_string(&self.stderr).unwrap_or_default(),
            self.results(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
            log_tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        )
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill() on the process group the child leads.
            unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
            let _ = self.child.wait();
        }
    }
}

/// Runs `qemu-img args...` in `dir`; panics with its output unless it succeeds, returns its
/// stdout.
pub fn qemu_img(dir: &Path, args: &[&str]) -> String {
    let o = Command::new("qemu-img")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("qemu-img");
    assert!(
        o.status.success(),
        "qemu-img {args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `qemu-img create` of the qcow2 image `name` in `dir` over `backing` (of `format`), named
/// relative to `dir` as qemu-img writes it into the header.
pub fn qcow2_overlay(dir: &Path, backing: &str, format: &str, name: &str) {
    qemu_img(
        dir,
        &[
            "create", "-q", "-f", "qcow2", "-b", backing, "-F", format, name,
        ],
    );
}

/// The sha256 of `bytes`, in hex (by sha256sum, as the guest computes it).
pub fn sha256_hex(bytes: &[u8]) -> String {
    let mut c = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum");
    std::io::Write::write_all(&mut c.stdin.take().unwrap(), bytes).unwrap();
    let out = c.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// What QEMU's own code reads from the qcow2 image `name` in `dir`: `qemu-img check` must find
/// no errors, then `qemu-img convert` to raw gives the disk's bytes.
pub fn qcow2_contents(dir: &Path, name: &str) -> Vec<u8> {
    let check = qemu_img(dir, &["check", name]);
    assert!(
        check.contains("No errors were found"),
        "qemu-img check {name}: {check}"
    );
    let out = format!("{name}.converted.raw");
    qemu_img(dir, &["convert", "-f", "qcow2", "-O", "raw", name, &out]);
    let bytes = std::fs::read(dir.join(&out)).unwrap();
    std::fs::remove_file(dir.join(&out)).unwrap();
    bytes
}

/// The guest's side of the blk crash tests: fio rounds on /dev/vda (random writes of 4-64 KiB,
/// crc32c verify, 2 jobs of 24 MiB at 0 and 32 MiB, libaio 16 deep) until the 4 KiB block
/// `stop_block` starts with STOP; then RESULT rounds, fio-failures, io-errors (kernel log
/// lines), area-sha (the first `area_mb` MiB), done.
pub fn fio_until_stop_script(stop_block: u64, area_mb: u64) -> String {
    format!(
        "#!/bin/sh\n\
         r() {{ echo \"RESULT $*\"; echo \"RESULT $*\" >/dev/ttyS1; }}\n\
         stop() {{\n\
           echo 1 >/proc/sys/vm/drop_caches\n\
           [ \"$(dd if=/dev/vda bs=4096 skip={stop_block} count=1 2>/dev/null | head -c 4)\" = STOP ]\n\
         }}\n\
         r start\n\
         i=0; fails=0\n\
         while ! stop; do\n\
           i=$((i + 1))\n\
           if ! fio --name=k$i --filename=/dev/vda --rw=randwrite --bsrange=4k-64k \\\n\
                --size=24M --numjobs=2 --offset_increment=32M --ioengine=libaio \\\n\
                --iodepth=16 --direct=1 --verify=crc32c --do_verify=1 --verify_fatal=1 \\\n\
                --randseed=$i --group_reporting --output=/tmp/fio.txt; then\n\
             fails=$((fails + 1)); tail -30 /tmp/fio.txt\n\
           fi\n\
           r round $i\n\
         done\n\
         r rounds $i\n\
         r fio-failures $fails\n\
         dmesg | grep -i -E 'I/O error|blk_update_request|timeout|hung' >/tmp/errs\n\
         cat /tmp/errs\n\
         r io-errors $(wc -l </tmp/errs)\n\
         echo 1 >/proc/sys/vm/drop_caches\n\
         r area-sha $(dd if=/dev/vda bs=1M count={area_mb} 2>/dev/null | sha256sum | cut -d' ' -f1)\n\
         r done\n"
    )
}

/// An NBD server process (qemu-nbd, nbdkit), killed on drop.
pub struct NbdServer(pub Child);

impl NbdServer {
    /// Kills it and waits for it to be gone.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// qemu-nbd serving `image` (raw) on the unix socket `sock`, for up to 8 clients at once and
/// one after another (`--persistent`), with `extra` options; returns once it listens.
pub fn qemu_nbd(image: &Path, sock: &Path, extra: &[&str]) -> NbdServer {
    let _ = std::fs::remove_file(sock);
    let child = Command::new("qemu-nbd")
        .args(["-f", "raw", "--persistent", "--shared=8", "-k"])
        .arg(sock)
        .args(extra)
        .arg(image)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-nbd");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "qemu-nbd's socket never came");
        std::thread::sleep(Duration::from_millis(20));
    }
    NbdServer(child)
}

/// The end of a [`fio_until_stop_script`] guest: writes STOP into `img` at `stop_block`,
/// waits for QEMU to exit cleanly and the guest to report done. Returns the results, the
/// failure context and how many requests the backend's workers resubmitted in all.
pub fn stop_fio_guest(
    vm: &mut Vm,
    be: &Backend,
    img: &Path,
    stop_block: u64,
) -> (String, String, usize) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    f.write_all_at(b"STOP", stop_block * 4096).unwrap();
    f.sync_all().unwrap();
    let st = vm.wait_exit(300);
    let ctx = vm.context(be);
    assert!(st.is_some_and(|s| s.success()), "QEMU: {st:?}\n{ctx}");
    let res = vm.results();
    assert!(
        res.contains("RESULT done"),
        "the guest did not finish\n{ctx}"
    );
    let resubmitted = be
        .log()
        .lines()
        .filter_map(|l| l.split("resubmitting ").nth(1))
        .filter_map(|l| l.split_whitespace().next()?.parse::<usize>().ok())
        .sum();
    (res, ctx, resubmitted)
}

/// Waits until `b`'s log has `n` lines containing `needle`; false after `secs`.
pub fn log_count_within(b: &Backend, needle: &str, n: usize, secs: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if b.log().matches(needle).count() >= n {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}
