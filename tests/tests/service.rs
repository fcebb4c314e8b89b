//! Running a backend as a service: who may connect to its socket, what it says when only its
//! owner can, and what its exit status says when it could not remove the socket.

use std::ffi::CString;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use vhostbox_tests::{run_to_exit, Backend};

/// A group and two users that exist nowhere but in these tests (ids are just numbers).
const SOCK_GID: u32 = 4242;
const MEMBER_UID: u32 = 4243;
const OTHER_GID: u32 = 4244;

fn root() -> bool {
    // SAFETY: geteuid has no arguments.
    unsafe { libc::geteuid() == 0 }
}

/// A directory anyone can traverse, for a socket other users should be able to reach.
fn open_dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    fs::set_permissions(d.path(), fs::Permissions::from_mode(0o755)).unwrap();
    d
}

/// vhostbox-blk serving a 1 MiB null device on `sock`, with `extra` flags.
fn start_null(sock: &Path, extra: &[&str]) -> Backend {
    let mut args = vec!["--socket-path", sock.to_str().unwrap(), "--null", "1M"];
    args.extend_from_slice(extra);
    Backend::start("vhostbox-blk", sock, &args)
}

/// connect(2) to `path` from a child process running as `uid`:`gid` with no supplementary
/// groups; returns 0 or the errno.
fn connect_as(path: &Path, uid: u32, gid: u32) -> i32 {
    let c = CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: sockaddr_un is a plain C struct: all-zero is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(c.as_bytes()) {
        *d = *s as libc::c_char;
    }
    // SAFETY: fork; the child only makes raw syscalls (async-signal-safe) and _exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork");
    if pid == 0 {
        // SAFETY: plain syscalls on values prepared before the fork.
        unsafe {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                libc::_exit(200);
            }
            let s = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
            let r = libc::connect(
                s,
                (&addr as *const libc::sockaddr_un).cast(),
                std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
            );
            libc::_exit(if r == 0 { 0 } else { *libc::__errno_location() });
        }
    }
    let mut status = 0;
    // SAFETY: waitpid on the child just forked.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert!(libc::WIFEXITED(status));
    let code = libc::WEXITSTATUS(status);
    assert_ne!(code, 200, "the child could not switch ids");
    code
}

#[test]
fn socket_group_and_mode_let_that_group_connect_and_no_one_else() {
    if !root() {
        eprintln!("skipped: needs root to connect as other users");
        return;
    }
    let d = open_dir();
    let sock = d.path().join("blk.sock");
    let gid = SOCK_GID.to_string();
    let b = start_null(&sock, &["--socket-group", &gid, "--socket-mode", "0660"]);
    let m = fs::metadata(&sock).unwrap();
    assert_eq!(m.gid(), SOCK_GID, "{}", b.log());
    assert_eq!(m.permissions().mode() & 0o7777, 0o660);
    let log = b.wait_log("listening on");
    assert!(log.contains("(mode 0660, owner 0:4242)"), "{log}");
    assert!(
        !log.contains("only uid"),
        "no warning when the group may connect:\n{log}"
    );
    assert_eq!(connect_as(&sock, MEMBER_UID, SOCK_GID), 0, "{}", b.log());
    assert_eq!(
        connect_as(&sock, MEMBER_UID, OTHER_GID),
        libc::EACCES,
        "a user outside the group must be refused"
    );
}

#[test]
fn a_socket_only_its_owner_can_use_is_named_in_the_log() {
    let d = open_dir();
    let sock = d.path().join("blk.sock");
    let b = start_null(&sock, &["--socket-mode", "755"]);
    let log = b.wait_log("listening on");
    assert!(log.contains("WARN"), "{log}");
    assert!(
        log.contains("can connect to") && log.contains("--socket-group GROUP --socket-mode 0660"),
        "{log}"
    );
    if root() {
        assert_eq!(connect_as(&sock, MEMBER_UID, SOCK_GID), libc::EACCES);
    }
}

#[test]
fn bad_socket_permissions_are_usage_errors_that_create_nothing() {
    let d = open_dir();
    let sock = d.path().join("blk.sock");
    let s = sock.to_str().unwrap();
    for (args, want) in [
        (
            vec!["--socket-group", "no-such-group-vhostbox"],
            "--socket-group 'no-such-group-vhostbox': no such group",
        ),
        (
            vec!["--socket-mode", "0999"],
            "--socket-mode '0999': expected octal permission bits",
        ),
        (
            vec!["--socket-mode", "01777"],
            "--socket-mode '01777': expected octal permission bits",
        ),
    ] {
        let mut a = vec!["--socket-path", s, "--null", "1M"];
        a.extend(args);
        let (code, err) = run_to_exit("vhostbox-blk", &a);
        assert_eq!(code, 2, "{err}");
        assert!(err.contains(want), "{want:?} not in {err}");
        assert!(!sock.exists(), "a refused start must not create the socket");
    }
    // The permission flags belong to --socket-path; with --fd they are a usage error.
    let (code, err) = run_to_exit(
        "vhostbox-blk",
        &["--fd", "3", "--socket-mode", "0660", "--null", "1M"],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--socket-path"), "{err}");
}

#[test]
fn a_socket_that_cannot_be_removed_gives_exit_status_4() {
    if !root() {
        eprintln!("skipped: needs a root supervisor that drops CAP_DAC_OVERRIDE");
        return;
    }
    // Root binds the socket with all its capabilities, then gives up CAP_DAC_OVERRIDE: in a
    // directory owned by another user it can no longer remove it (what libvirt users saw).
    let d = open_dir();
    let dir = d.path().join("theirs");
    fs::create_dir(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(MEMBER_UID), Some(SOCK_GID)).unwrap();
    let sock = dir.join("blk.sock");
    let mut b = start_null(&sock, &[]);
    b.wait_log("ready; waiting for a frontend");
    let st = b.signal_and_wait(libc::SIGTERM);
    assert_eq!(st.code(), Some(4), "{}", b.log());
    let log = b.log();
    assert!(
        log.contains(&format!("cannot remove socket {}", sock.display()))
            && log.contains("Permission denied"),
        "{log}"
    );
    assert!(sock.exists(), "the socket is indeed left behind");
    fs::remove_file(&sock).unwrap();
}

#[test]
fn a_clean_stop_removes_the_socket_and_exits_0() {
    let d = open_dir();
    let sock = d.path().join("blk.sock");
    let mut b = start_null(&sock, &[]);
    b.wait_log("ready; waiting for a frontend");
    let st = b.signal_and_wait(libc::SIGTERM);
    assert_eq!(st.code(), Some(0), "{}", b.log());
    assert!(!sock.exists());
}

/// The datagrams a backend sent to its NOTIFY_SOCKET, collected by a thread.
struct NotifySocket {
    path: std::path::PathBuf,
    got: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl NotifySocket {
    fn new(dir: &Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let rx = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let g = got.clone();
        std::thread::spawn(move || {
            let mut b = [0u8; 4096];
            while let Ok(n) = rx.recv(&mut b) {
                g.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&b[..n]).into_owned());
            }
        });
        NotifySocket { path, got }
    }

    fn messages(&self) -> Vec<String> {
        self.got.lock().unwrap().clone()
    }

    fn count(&self, needle: &str) -> usize {
        self.messages()
            .iter()
            .filter(|m| m.contains(needle))
            .count()
    }

    /// Waits up to 20 s until `n` messages contain `needle`.
    fn wait_for(&self, needle: &str, n: usize) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while self.count(needle) < n {
            assert!(
                std::time::Instant::now() < deadline,
                "fewer than {n} {needle:?} in {:#?}",
                self.messages()
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

fn blkio_connect(sock: &Path) -> blkio::Blkio {
    let mut b = blkio::Blkio::new("virtio-blk-vhost-user").unwrap();
    b.set_str("path", sock.to_str().unwrap()).unwrap();
    b.connect().unwrap();
    b.start().unwrap();
    b
}

/// The service manager hears READY once the socket is served, STATUS as it changes,
/// WATCHDOG only while the worker answers (not while it is stopped), and STOPPING at the end.
#[test]
fn notify_socket_gets_ready_status_watchdog_and_stopping() {
    let d = open_dir();
    let ns = NotifySocket::new(d.path());
    let sock = d.path().join("blk.sock");
    // A 300 ms watchdog: pings every 150 ms.
    let mut b = Backend::start_exe_env(
        &vhostbox_tests::bin_path("vhostbox-blk"),
        &sock,
        &["--socket-path", sock.to_str().unwrap(), "--null", "1M"],
        &[
            ("NOTIFY_SOCKET", ns.path.to_str().unwrap()),
            ("WATCHDOG_USEC", "300000"),
        ],
    );
    ns.wait_for("READY=1", 1);
    let worker = b.worker_pid();
    let first = ns.messages()[0].clone();
    assert!(first.contains("READY=1"), "READY comes first: {first}");
    assert!(
        first.contains(&format!(
            "STATUS=waiting for a frontend (worker {worker}; restarted 0 times)"
        )),
        "{first}"
    );
    ns.wait_for("WATCHDOG=1", 3);

    let client = blkio_connect(&sock);
    ns.wait_for(&format!("STATUS=serving a frontend (worker {worker};"), 1);

    // A stopped worker answers no heartbeat: the pings to systemd stop, and resume with it.
    // SAFETY: kill() on the backend's worker, started (indirectly) by this test.
    unsafe { libc::kill(worker, libc::SIGSTOP) };
    b.wait_log(&format!("worker {worker} does not answer its heartbeat"));
    let before = ns.count("WATCHDOG=1");
    std::thread::sleep(std::time::Duration::from_millis(1500)); // 10 ping periods
    assert_eq!(
        ns.count("WATCHDOG=1"),
        before,
        "no watchdog ping while the worker is stopped"
    );
    // SAFETY: as above.
    unsafe { libc::kill(worker, libc::SIGCONT) };
    ns.wait_for("WATCHDOG=1", before + 2);

    // A worker that dies is replaced, and the status says so. First the clean end of the
    // connection: that worker exits by itself, and a kill racing with that exit would be a
    // clean end, not a death; so the next worker is waited for, and it is the one killed.
    drop(client);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let next_worker = loop {
        let w = b.worker_pid();
        if w != worker
            && ns.count(&format!(
                "STATUS=waiting for a frontend (worker {w}; restarted 0 times)"
            )) == 1
        {
            break w;
        }
        assert!(std::time::Instant::now() < deadline, "{:#?}", ns.messages());
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    let killed = b.kill_worker();
    assert_eq!(killed, next_worker);
    ns.wait_for(
        &format!("STATUS=worker {killed} died; starting a new one (restarted once)"),
        1,
    );
    let next = b.worker_pid();
    ns.wait_for(
        &format!("STATUS=waiting for a frontend (worker {next}; restarted once)"),
        1,
    );
    assert_eq!(ns.count("READY=1"), 1, "READY is sent once");

    assert_eq!(b.signal_and_wait(libc::SIGTERM).code(), Some(0));
    ns.wait_for("STOPPING=1", 1);
    let all = ns.messages();
    let stop = all.iter().position(|m| m.contains("STOPPING=1")).unwrap();
    assert!(
        all[stop..].iter().all(|m| !m.contains("READY=1")),
        "nothing but the end after STOPPING: {all:#?}"
    );
}

/// Receives datagrams on `sock` until one carries an fd; returns its text and the fd.
fn recv_with_fd(sock: &std::os::unix::net::UnixDatagram) -> (String, std::os::fd::OwnedFd) {
    use std::os::fd::{AsRawFd, FromRawFd};
    sock.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    loop {
        let mut b = [0u8; 4096];
        let mut iov = libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        };
        let mut cbuf = [0u64; 8];
        // SAFETY: msghdr is plain C data: all-zero is valid; the pointers set below are ours.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&cbuf);
        // SAFETY: recvmsg into the buffers above.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        assert!(
            n >= 0,
            "no FDSTORE message: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: walks the control messages recvmsg filled in.
        let fd = unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (!c.is_null() && (*c).cmsg_type == libc::SCM_RIGHTS)
                .then(|| std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<i32>()))
        };
        if let Some(fd) = fd {
            let text = String::from_utf8_lossy(&b[..n as usize]).into_owned();
            // SAFETY: a fresh fd we received and own.
            return (text, unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
        }
    }
}

/// `--fd-store`: the bound socket goes to the service manager's fd store, named vhost-user;
/// the path stays at exit; the next process, given the stored fd as systemd passes it after
/// a restart (LISTEN_FDS), serves frontends on the same path.
#[test]
fn the_fd_store_keeps_the_socket_across_a_restart() {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let d = open_dir();
    let ns_path = d.path().join("notify.sock");
    let ns = std::os::unix::net::UnixDatagram::bind(&ns_path).unwrap();
    let sock = d.path().join("blk.sock");
    let mut first = Backend::start_exe_env(
        &vhostbox_tests::bin_path("vhostbox-blk"),
        &sock,
        &[
            "--socket-path",
            sock.to_str().unwrap(),
            "--null",
            "1M",
            "--fd-store",
        ],
        &[("NOTIFY_SOCKET", ns_path.to_str().unwrap())],
    );
    let (text, fd) = recv_with_fd(&ns);
    assert_eq!(text.trim(), "FDSTORE=1\nFDNAME=vhost-user", "{text:?}");
    let listener = std::os::unix::net::UnixListener::from(fd);
    first.wait_log("the socket is in the service manager's fd store");
    assert_eq!(first.signal_and_wait(libc::SIGTERM).code(), Some(0));
    assert!(sock.exists(), "the path stays for the stored socket");
    // The stored fd is the socket at that path: a connection to the path comes out of it.
    let probe = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    listener.set_nonblocking(true).unwrap();
    let (accepted, _) = listener
        .accept()
        .expect("the stored fd listens on the path");
    drop((probe, accepted));
    listener.set_nonblocking(false).unwrap();

    // The restart, as systemd does it: the stored fd as fd 3, named in LISTEN_FDNAMES.
    let raw = listener.as_raw_fd();
    let log_path = d.path().join("second.log");
    let mut cmd = std::process::Command::new("sh");
    cmd.args(["-c", "LISTEN_PID=$$ exec \"$0\" \"$@\""])
        .arg(vhostbox_tests::bin_path("vhostbox-blk"))
        .args(["--null", "1M"])
        .env("LISTEN_FDS", "1")
        .env("LISTEN_FDNAMES", "vhost-user")
        .stderr(fs::File::create(&log_path).unwrap());
    // SAFETY: dup2 and fcntl only, between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(raw, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut second = cmd.spawn().unwrap();
    let b = blkio_connect(&sock);
    assert_eq!(b.get_u64("capacity").unwrap(), 1 << 20);
    drop(b);
    // SAFETY: kill() on our child.
    unsafe { libc::kill(second.id() as i32, libc::SIGTERM) };
    let st = second.wait().unwrap();
    let log = fs::read_to_string(&log_path).unwrap();
    assert_eq!(st.code(), Some(0), "{log}");
    assert!(
        log.contains("listening on the socket systemd passed: fd 3 ('vhost-user')"),
        "{log}"
    );
}
