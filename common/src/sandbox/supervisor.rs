//! The supervisor: a minimal process that holds the listener and the device fds and forks one
//! jailed worker at a time to serve frontends.
//!
//! Each worker serves one frontend connection and exits, so nothing a guest or frontend did to
//! one worker survives into the next connection. When a worker dies (a crash, a seccomp kill),
//! the supervisor logs why, including the blocked syscall for seccomp deaths, and forks a fresh
//! jailed worker on the same fds, so the frontend's reconnect finds a working device. The
//! supervisor stays single-threaded: the workers are made with a raw `clone` that also creates
//! their namespaces, which is only sound from a single-threaded parent.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use log::{error, info, warn};

use super::seccomp::{self, Rules};
use super::{Ids, JailConfig, SandboxMode};
use crate::service::Notifier;

/// Exit code of a worker that could not set up its device or enter its jail: the supervisor
/// gives up (a replacement would fail the same way).
pub const EXIT_JAIL_FAILED: i32 = 3;

/// A worker's exit status when it lost its connection to the backing store (an NBD server
/// that went away): the supervisor connects anew, with back-off, for the next worker.
pub const EXIT_BACKING_LOST: i32 = 5;

/// Why the supervisor stopped.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("{0}")]
    Sys(&'static str, #[source] io::Error),
    #[error("restricting the supervisor")]
    Restrict(#[source] super::JailError),
    #[error("cannot start a worker{hint}")]
    Spawn {
        #[source]
        err: io::Error,
        hint: &'static str,
    },
    #[error("putting worker {0} in its cgroup")]
    Cgroup(i32, #[source] super::cgroup::CgroupError),
    #[error("setting up the worker's user namespace: writing /proc/{pid}/{file}")]
    IdMap {
        pid: i32,
        file: &'static str,
        #[source]
        err: io::Error,
    },
}

/// Fds only the supervisor may hold (an image's lock): a forked worker closes them before it
/// does anything else, so a worker that is slow to die never holds them after the supervisor.
static SUPERVISOR_ONLY: std::sync::Mutex<Vec<RawFd>> = std::sync::Mutex::new(Vec::new());

/// Registers `fd` as one no worker may hold: every forked worker closes it first thing.
pub fn keep_from_workers(fd: RawFd) {
    SUPERVISOR_ONLY
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(fd);
}

/// Undoes [`keep_from_workers`] for an fd about to be closed (its number may be reused).
pub fn let_workers_forget(fd: RawFd) {
    SUPERVISOR_ONLY
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|&f| f != fd);
}

/// What a worker knows about its supervisor.
#[derive(Debug, Clone, Copy)]
pub struct WorkerCtx {
    /// Pipe to the supervisor for seccomp reports; keep it open in the jail.
    pub report_fd: RawFd,
    /// 1 for the first worker, counting up with each replacement.
    pub generation: u64,
}

fn cvt(r: libc::c_long, what: &'static str) -> Result<libc::c_long, SupervisorError> {
    if r < 0 {
        return Err(SupervisorError::Sys(what, io::Error::last_os_error()));
    }
    Ok(r)
}

fn pipe() -> Result<(OwnedFd, OwnedFd), SupervisorError> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    cvt(r as libc::c_long, "pipe2")?;
    // SAFETY: fresh fds owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn sigset(sigs: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set; sigaddset with valid signals.
    unsafe {
        let mut s: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut s);
        for &x in sigs {
            libc::sigaddset(&mut s, x);
        }
        s
    }
}

/// Writes the new user namespace's maps: `ids` map to themselves and nothing else exists
/// inside, root included.
fn write_id_maps(pid: i32, ids: Ids) -> Result<(), SupervisorError> {
    // SAFETY: geteuid has no arguments.
    let privileged = unsafe { libc::geteuid() } == 0;
    let w = |file: &'static str, s: String| {
        fs::write(format!("/proc/{pid}/{file}"), s).map_err(|err| SupervisorError::IdMap {
            pid,
            file,
            err,
        })
    };
    if !privileged {
        // Unprivileged: only our own ids may be mapped, and setgroups must be denied first.
        w("setgroups", "deny".into())?;
    }
    w("gid_map", format!("{0} {0} 1\n", ids.gid))?;
    w("uid_map", format!("{0} {0} 1\n", ids.uid))
}

/// io_uring charges ring memory to the creating user's locked memory, checked against
/// RLIMIT_MEMLOCK summed over every process of that user. Workers create their rings before
/// switching ids, so all backends of one host share the supervisors' user's allowance (8 MiB
/// by default, a few hundred rings). The supervisor raises its soft limit to the hard limit,
/// which the workers inherit for ring setup (each sets it to 0 in its jail afterwards);
/// operators with many backends raise the hard limit (systemd: LimitMEMLOCK=).
fn lift_memlock_for_rings() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim);
        }
    }
}

fn seqpacket_pair() -> Result<(OwnedFd, OwnedFd), SupervisorError> {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two fds into the array.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    cvt(r as libc::c_long, "socketpair")?;
    // SAFETY: fresh fds owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Reads one message from the report socket into `reports`; returns the fd it carried (a
/// kill-mode worker's seccomp listener), if any.
fn recv_report(sock: RawFd, reports: &mut String) -> Option<OwnedFd> {
    let mut b = [0u8; 512];
    let mut iov = libc::iovec {
        iov_base: b.as_mut_ptr().cast(),
        iov_len: b.len(),
    };
    let mut cbuf = seccomp::FdMsgBuf::new();
    let mut msg = cbuf.msghdr(&mut iov);
    // SAFETY: recvmsg into the buffers above; MSG_CMSG_CLOEXEC marks received fds close-on-exec.
    let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC) };
    if n <= 0 {
        return None;
    }
    let mut fd = None;
    // SAFETY: walks the control messages recvmsg filled in, within msg_controllen.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let raw = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<i32>());
                fd = Some(OwnedFd::from_raw_fd(raw));
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if fd.is_none() {
        push_report(reports, &b[..n as usize]);
    }
    fd
}

/// Takes one notification from a seccomp listener: the blocked syscall's number.
fn recv_notification(listener: RawFd) -> Option<i64> {
    // SAFETY: the kernel requires a zeroed struct; ioctl fills it in.
    let mut n: libc::seccomp_notif = unsafe { std::mem::zeroed() };
    // SAFETY: SECCOMP_IOCTL_NOTIF_RECV writes one seccomp_notif into `n`.
    let r = unsafe { libc::ioctl(listener, libc::SECCOMP_IOCTL_NOTIF_RECV, &mut n) };
    (r == 0).then_some(i64::from(n.data.nr))
}

/// Appends what a worker wrote to the report pipe, keeping only the last few lines: the pipe
/// comes from a process that may be compromised, so it must not grow the supervisor's memory.
fn push_report(reports: &mut String, bytes: &[u8]) {
    const KEEP: usize = 256;
    reports.push_str(&String::from_utf8_lossy(bytes));
    if reports.len() > KEEP {
        let mut cut = reports.len() - KEEP;
        while !reports.is_char_boundary(cut) {
            cut += 1;
        }
        reports.drain(..cut);
    }
}

/// Removes every `token` from `reports`; whether there was one.
fn take_token(reports: &mut String, token: &str) -> bool {
    if reports.contains(token) {
        *reports = reports.replace(token, "");
        true
    } else {
        false
    }
}

struct Child {
    pid: i32,
    /// Its cgroup, removed when the child is dropped (after it was reaped).
    _cgroup: Option<super::cgroup::WorkerCgroup>,
    started: Instant,
    /// The worker said it got as far as serving a frontend.
    served: bool,
}

/// What a worker writes on the report channel once a frontend is connected.
const SERVING: &str = "SERVING\n";
/// What a worker writes once it waits for a frontend on the listener.
const READY: &str = "READY\n";
/// The supervisor's heartbeat to the worker, and the worker's answer.
const PING: &[u8] = b"PING\n";
const PONG: &str = "PONG\n";

/// Tells the supervisor (if there is one) that this worker waits for a frontend.
pub fn report_ready() {
    let fd = seccomp::report_fd();
    if fd >= 0 {
        // SAFETY: writes a static string to the report socket.
        unsafe { libc::write(fd, READY.as_ptr().cast(), READY.len()) };
    }
}

/// The supervisor tells the worker the device's new capacity: `CONFIG <bytes>`.
const CONFIG: &str = "CONFIG ";

/// What a worker does when the supervisor resized its device (blk: take up the capacity and
/// send the frontend VHOST_USER_BACKEND_CONFIG_CHANGE_MSG).
type ConfigHook = Box<dyn Fn(u64) + Send + Sync>;
static CONFIG_HOOK: std::sync::Mutex<Option<ConfigHook>> = std::sync::Mutex::new(None);

/// Sets what this worker does on a `CONFIG` message from the supervisor (run on the heartbeat
/// thread, under its seccomp list: it may write to sockets it holds, nothing more).
pub fn on_config_change(hook: ConfigHook) {
    *CONFIG_HOOK.lock().unwrap_or_else(|e| e.into_inner()) = Some(hook);
}

/// The worker's side of the heartbeat: answers each ping of the supervisor on the report
/// socket, forever (a thread of its own), and takes up capacity changes (`CONFIG`). Returns
/// when the socket is gone.
pub fn answer_heartbeats() {
    let fd = seccomp::report_fd();
    if fd < 0 {
        return;
    }
    let mut b = [0u8; 64];
    loop {
        // SAFETY: reads into a local buffer of the size given.
        let n = unsafe { libc::read(fd, b.as_mut_ptr().cast(), b.len()) };
        if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        if n <= 0 {
            return;
        }
        let msg = &b[..n as usize];
        if msg == PING {
            // SAFETY: writes a static string to the report socket.
            unsafe { libc::write(fd, PONG.as_ptr().cast(), PONG.len()) };
        } else if let Some(size) = std::str::from_utf8(msg)
            .ok()
            .and_then(|m| m.trim_end().strip_prefix(CONFIG))
            .and_then(|v| v.parse::<u64>().ok())
        {
            if let Some(h) = CONFIG_HOOK
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
            {
                h(size);
            }
        }
    }
}

/// Tells the supervisor (if there is one) that this worker serves a frontend: if it dies now,
/// it is replaced at once, since it is not failing on its way up (which would be retried with
/// a growing delay).
pub fn report_serving() {
    let fd = seccomp::report_fd();
    if fd >= 0 {
        // SAFETY: writes a static string to the report socket.
        unsafe { libc::write(fd, SERVING.as_ptr().cast(), SERVING.len()) };
    }
}

/// A resize the device made (`resize` on `--control`): the old and new size in bytes, and
/// the RLIMIT_FSIZE its workers get from now on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resized {
    pub old: u64,
    pub new: u64,
    pub fsize: u64,
}

/// The device's resize, run by the supervisor: the new size (None: re-read it) and whether
/// shrinking is allowed.
pub type ResizeFn<'a> = Box<dyn Fn(Option<u64>, bool) -> Result<Resized, String> + 'a>;

/// The service process asks the supervisor to resize: `RESIZE <bytes or -> <force 0|1>`.
pub const RESIZE_REQUEST: &str = "RESIZE ";

/// What the supervisor serves about its device on `--metrics` and `--control`.
pub struct Service<'a> {
    /// The program's name.
    pub name: &'static str,
    /// The device's per-queue series (in [`crate::metrics::Page`]).
    pub defs: &'static [crate::metrics::Def],
    /// Queues (blk) or queue pairs (net).
    pub queues: usize,
    /// The endpoints, if any were asked for.
    pub server: Option<crate::control::Server>,
    /// The device's resize, if it has one.
    pub resize: Option<ResizeFn<'a>>,
    /// Runs before each worker is forked: what the worker needs made with the supervisor's
    /// reach (connections to an NBD server). An error is logged and retried with back-off.
    pub prepare: Option<PrepareFn<'a>>,
    /// Runs after each worker was forked: the supervisor drops its copies of what `prepare`
    /// made.
    pub spawned: Option<Box<dyn FnMut() + 'a>>,
}

/// See [`Service::prepare`].
pub type PrepareFn<'a> = Box<dyn FnMut() -> Result<(), String> + 'a>;

/// Runs the supervisor until SIGTERM, SIGINT or SIGHUP. `worker` runs in each forked, not yet
/// jailed worker process and returns its exit code; it must enter the jail itself (it knows
/// which fds to keep) before serving. Returns the process exit code.
pub fn supervise(
    jail: &JailConfig,
    rules: &Rules,
    service: Service<'_>,
    mut worker: impl FnMut(WorkerCtx) -> i32,
) -> i32 {
    lift_memlock_for_rings();
    let mut server = None;
    let code = match Supervisor::new(jail, rules, service).and_then(|mut s| {
        let r = s.run(&mut worker);
        s.stop_service();
        server = s.service.server.take();
        r
    }) {
        Ok(code) => code,
        Err(e) => {
            error!("supervisor: {}", crate::error_chain(&e));
            1
        }
    };
    if let Some(s) = server {
        s.remove();
    }
    code
}

/// How a worker ended, as far as what comes next is concerned.
enum Ended {
    /// It served its connection and exited cleanly: start the next one at once.
    Finished,
    /// It could not set up its device or jail: a replacement would fail the same way.
    GiveUp,
    /// It died (crash, seccomp, signal): log why, and replace it after a pause if it died
    /// on its way up.
    Died,
}

/// The supervisor's state between poll rounds.
struct Supervisor<'a> {
    jail: &'a JailConfig,
    rules: &'a Rules,
    signals: OwnedFd,
    report_r: OwnedFd,
    report_w: OwnedFd,
    /// The last lines the current worker wrote on the report channel.
    reports: String,
    backoff: Duration,
    child: Option<Child>,
    stopping: bool,
    stop_deadline: Option<Instant>,
    generation: u64,
    /// Kill mode: the current worker's seccomp listener, and the syscall it reported.
    notif: Option<OwnedFd>,
    notified: Option<i64>,
    /// The service manager (systemd), if any.
    notify: Notifier,
    /// `READY=1` was sent.
    ready: bool,
    /// Workers replaced after they died (not counting clean ends of a connection).
    restarts: u64,
    watchdog: Option<Watchdog>,
    /// What `--metrics` and `--control` serve.
    service: Service<'a>,
    /// Counters only the supervisor sees.
    facts: Facts,
    /// When the next worker may start (after a worker that died on its way up).
    spawn_at: Option<Instant>,
    /// The jailed process serving `--metrics` and `--control`, and the supervisor's end of
    /// the socket it asks for figures on.
    svc: Option<(i32, OwnedFd)>,
    /// When the service process may be started (again).
    svc_at: Option<Instant>,
    svc_backoff: Duration,
}

/// The supervisor's own counters, for metrics and `status`.
#[derive(Default)]
struct Facts {
    started: Option<Instant>,
    /// Frontends served (each worker that reported SERVING).
    connections: u64,
    /// Workers killed by seccomp, by syscall name.
    seccomp_kills: std::collections::BTreeMap<String, u64>,
    /// Workers that ended, by how ("finished", "exited", "signal", "seccomp").
    exits: std::collections::BTreeMap<String, u64>,
}

/// The watchdog's state: pings to systemd only while the worker answers the heartbeat.
struct Watchdog {
    /// Half systemd's timeout.
    period: Duration,
    next: Instant,
    /// A heartbeat went to the worker and it has not answered yet.
    awaiting: bool,
    /// The "does not answer" warning was logged for the current worker.
    warned: bool,
}

const FIRST_BACKOFF: Duration = Duration::from_millis(50);

impl<'a> Supervisor<'a> {
    /// Blocks the signals it handles (into a signalfd), makes the report channel and narrows
    /// the process to what supervising needs.
    fn new(
        jail: &'a JailConfig,
        rules: &'a Rules,
        service: Service<'a>,
    ) -> Result<Self, SupervisorError> {
        let sigs = sigset(&[libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGCHLD]);
        // SAFETY: sigprocmask with a valid set.
        let r = unsafe { libc::sigprocmask(libc::SIG_BLOCK, &sigs, std::ptr::null_mut()) };
        cvt(r as libc::c_long, "sigprocmask")?;
        // SAFETY: signalfd with a valid set; the result is checked.
        let sfd = cvt(
            unsafe { libc::signalfd(-1, &sigs, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) }
                as libc::c_long,
            "signalfd",
        )?;
        // SAFETY: a fresh fd.
        let signals = unsafe { OwnedFd::from_raw_fd(sfd as RawFd) };
        // The report channel: a socket so that a kill-mode worker can hand over its seccomp
        // listener; trap mode writes its "SECCOMP NR" line on it.
        let (report_r, report_w) = seqpacket_pair()?;
        // SAFETY: fcntl on our fd.
        unsafe { libc::fcntl(report_r.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        super::restrict_supervisor(jail.mode).map_err(SupervisorError::Restrict)?;
        let notify = Notifier::from_env();
        Ok(Supervisor {
            jail,
            rules,
            signals,
            report_r,
            report_w,
            reports: String::new(),
            backoff: FIRST_BACKOFF,
            child: None,
            stopping: false,
            stop_deadline: None,
            generation: 0,
            notif: None,
            notified: None,
            watchdog: notify.watchdog().map(|t| Watchdog {
                period: t / 2,
                next: Instant::now(),
                awaiting: false,
                warned: false,
            }),
            notify,
            ready: false,
            restarts: 0,
            service,
            facts: Facts {
                started: Some(Instant::now()),
                ..Default::default()
            },
            spawn_at: None,
            svc: None,
            svc_at: Some(Instant::now()),
            svc_backoff: FIRST_BACKOFF,
        })
    }

    fn run(&mut self, worker: &mut dyn FnMut(WorkerCtx) -> i32) -> Result<i32, SupervisorError> {
        loop {
            if self.child.is_none() {
                if self.stopping {
                    return Ok(0);
                }
                if let Some(at) = self.spawn_at {
                    if Instant::now() < at {
                        self.wait_and_handle()?;
                        continue;
                    }
                    self.spawn_at = None;
                }
                if let Some(prepare) = self.service.prepare.as_mut() {
                    if let Err(e) = prepare() {
                        warn!(
                            "cannot prepare the next worker: {e}; retrying in {} ms",
                            self.backoff.as_millis()
                        );
                        self.notify
                            .status(&format!("waiting for the backing store: {e}"));
                        self.spawn_at = Some(Instant::now() + self.backoff);
                        self.backoff = (self.backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                }
                self.generation += 1;
                let ctx = WorkerCtx {
                    report_fd: self.report_w.as_raw_fd(),
                    generation: self.generation,
                };
                let spawned = spawn(self.jail, ctx, worker, &[], false);
                if let Some(f) = self.service.spawned.as_mut() {
                    f();
                }
                let c = spawned?;
                info!("worker started, pid {}", c.pid);
                self.child = Some(c);
            }
            self.wait_and_handle()?;
            let Some((pid, status, lived, served)) = self.reap() else {
                continue;
            };
            match self.ended(pid, status) {
                Ended::Finished => self.backoff = FIRST_BACKOFF,
                Ended::GiveUp => return Ok(1),
                Ended::Died if self.stopping => return Ok(0),
                Ended::Died => {
                    self.restarts += 1;
                    self.notify.status(&format!(
                        "worker {pid} died; starting a new one ({})",
                        self.restarts_text()
                    ));
                    self.pace(pid, lived, served)
                }
            }
        }
    }

    /// Waits for a signal, a report or a seccomp notification (200 ms at most while
    /// stopping) and handles what came.
    fn wait_and_handle(&mut self) -> Result<(), SupervisorError> {
        let notif_fd = self.notif.as_ref().map_or(-1, |l| l.as_raw_fd());
        let mut fds: Vec<libc::pollfd> = [
            self.signals.as_raw_fd(),
            self.report_r.as_raw_fd(),
            notif_fd,
        ]
        .map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .to_vec();
        fds.push(libc::pollfd {
            fd: self.svc.as_ref().map_or(-1, |(_, c)| c.as_raw_fd()),
            events: libc::POLLIN,
            revents: 0,
        });
        let now = Instant::now();
        let mut waits: Vec<Duration> = Vec::new();
        if self.stopping {
            waits.push(Duration::from_millis(200));
        }
        if let Some(w) = self.watchdog.as_ref().filter(|_| self.ready) {
            waits.push(w.next.saturating_duration_since(now));
        }
        if let Some(at) = self.spawn_at {
            waits.push(at.saturating_duration_since(now));
        }
        if let Some(at) = self.svc_at.filter(|_| self.service.server.is_some()) {
            waits.push(at.saturating_duration_since(now));
        }
        let timeout = waits.into_iter().min().map_or(-1, |d| {
            // Round up: a deadline 0.4 ms away must not spin with timeout 0.
            i32::try_from(d.as_micros().div_ceil(1000)).unwrap_or(i32::MAX)
        });
        // SAFETY: fds is a valid array of pollfds of that length (poll skips a negative fd).
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(SupervisorError::Sys("poll", e));
            }
        }
        if fds[1].revents & libc::POLLIN != 0 {
            self.take_reports();
        }
        if fds[2].revents & libc::POLLIN != 0 {
            self.take_notification();
        } else if fds[2].revents & (libc::POLLHUP | libc::POLLERR) != 0 {
            self.notif = None;
        }
        self.take_signals();
        if fds[3].revents & libc::POLLIN != 0 {
            self.answer_service();
        }
        self.tend_service();
        self.watchdog_tick();
        if let (Some(c), Some(d)) = (&self.child, self.stop_deadline) {
            if Instant::now() > d {
                warn!("worker {} did not stop in time, killing it", c.pid);
                // SAFETY: kill() on our own child.
                unsafe { libc::kill(c.pid, libc::SIGKILL) };
                self.stop_deadline = None;
            }
        }
        Ok(())
    }

    fn take_reports(&mut self) {
        if let Some(l) = recv_report(self.report_r.as_raw_fd(), &mut self.reports) {
            self.notif = Some(l);
        }
        if take_token(&mut self.reports, PONG) {
            if let Some(w) = self.watchdog.as_mut() {
                w.awaiting = false;
                w.warned = false;
            }
        }
        let pid = self.child.as_ref().map_or(0, |c| c.pid);
        if take_token(&mut self.reports, READY) {
            let status = format!(
                "waiting for a frontend (worker {pid}; {})",
                self.restarts_text()
            );
            if self.ready {
                self.notify.status(&status);
            } else {
                self.ready = true;
                self.notify.ready(&status);
                if let Some(w) = self.watchdog.as_mut() {
                    w.next = Instant::now();
                }
            }
        }
        if take_token(&mut self.reports, SERVING) {
            if let Some(c) = self.child.as_mut() {
                c.served = true;
            }
            self.facts.connections += 1;
            self.notify.status(&format!(
                "serving a frontend (worker {pid}; {})",
                self.restarts_text()
            ));
        }
    }

    fn restarts_text(&self) -> String {
        match self.restarts {
            1 => "restarted once".into(),
            n => format!("restarted {n} times"),
        }
    }

    /// Every half watchdog period: `WATCHDOG=1` if the current worker answered the last
    /// heartbeat (or none is running: the supervisor itself is alive), then the next heartbeat.
    fn watchdog_tick(&mut self) {
        let Some(w) = self.watchdog.as_mut() else {
            return;
        };
        if !self.ready {
            // systemd starts the watchdog once the service is ready.
            return;
        }
        let now = Instant::now();
        if now < w.next {
            return;
        }
        w.next = now + w.period;
        match &self.child {
            Some(c) if w.awaiting => {
                if !w.warned {
                    warn!(
                        "worker {} does not answer its heartbeat: no watchdog pings to the \
                         service manager until it does",
                        c.pid
                    );
                    w.warned = true;
                }
                return;
            }
            Some(_) => {
                w.awaiting = true;
                // SAFETY: writes a static buffer to our report socket (non-blocking: a full
                // buffer means the worker is not reading, which the next tick sees).
                unsafe { libc::write(self.report_r.as_raw_fd(), PING.as_ptr().cast(), PING.len()) };
            }
            None => w.awaiting = false,
        }
        self.notify.watchdog_ping();
    }

    fn take_notification(&mut self) {
        if let (Some(l), Some(c)) = (&self.notif, &self.child) {
            if let Some(nr) = recv_notification(l.as_raw_fd()) {
                // The offending thread is blocked in the kernel; end the whole worker.
                self.notified = Some(nr);
                // SAFETY: kill() on our own child.
                unsafe { libc::kill(c.pid, libc::SIGKILL) };
            }
        }
    }

    /// Drains the signalfd; SIGTERM, SIGINT or SIGHUP start a clean stop of the worker.
    fn take_signals(&mut self) {
        loop {
            // SAFETY: signalfd_siginfo is a plain C struct of integers: all-zero is valid.
            let mut si: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
            let sz = std::mem::size_of::<libc::signalfd_siginfo>();
            // SAFETY: reads one siginfo into our struct.
            let n = unsafe {
                libc::read(
                    self.signals.as_raw_fd(),
                    (&mut si as *mut libc::signalfd_siginfo).cast(),
                    sz,
                )
            };
            if n != sz as isize {
                return;
            }
            let sig = si.ssi_signo as i32;
            if sig != libc::SIGCHLD && !self.stopping {
                info!("signal {sig} received, stopping the worker");
                self.notify.stopping();
                self.stopping = true;
                self.stop_deadline = Some(Instant::now() + Duration::from_secs(10));
                if let Some(c) = &self.child {
                    // SAFETY: kill() on our own child.
                    unsafe { libc::kill(c.pid, libc::SIGTERM) };
                }
            }
        }
    }

    /// The current worker, if it has ended: (pid, wait status, how long it lived, whether it
    /// was serving).
    fn reap(&mut self) -> Option<(i32, i32, Duration, bool)> {
        let c = self.child.as_ref()?;
        let mut status = 0;
        // SAFETY: waitpid on our own child with a valid status pointer.
        let r = unsafe { libc::waitpid(c.pid, &mut status, libc::WNOHANG) };
        if r != c.pid {
            return None;
        }
        let ended = (c.pid, status, c.started.elapsed(), c.served);
        self.child = None;
        if let Some(p) = crate::metrics::Page::get() {
            p.worker_gone();
        }
        self.notif = None;
        if let Some(w) = self.watchdog.as_mut() {
            w.awaiting = false;
            w.warned = false;
        }
        Some(ended)
    }

    /// Logs how worker `pid` ended.
    fn ended(&mut self, pid: i32, status: i32) -> Ended {
        if let Some(nr) = self.notified.take() {
            self.seccomp_kill(pid, nr);
        } else if libc::WIFEXITED(status) {
            match libc::WEXITSTATUS(status) {
                0 => {
                    info!("worker {pid} finished");
                    self.count_exit("finished");
                    return Ended::Finished;
                }
                EXIT_JAIL_FAILED => {
                    error!("worker {pid} could not enter its sandbox; giving up");
                    self.count_exit("setup_failed");
                    return Ended::GiveUp;
                }
                EXIT_BACKING_LOST => {
                    warn!(
                        "worker {pid} lost its connection to the backing store; the next \
                         worker gets a new one"
                    );
                    self.count_exit("backing_lost");
                }
                c => {
                    warn!("worker {pid} exited with status {c}");
                    self.count_exit("failed");
                }
            }
        } else if libc::WIFSIGNALED(status) {
            let sig = libc::WTERMSIG(status);
            if sig == libc::SIGSYS {
                self.report_trap(pid);
            } else {
                error!("worker {pid} killed by signal {sig}");
                self.count_exit("signal");
            }
        }
        Ended::Died
    }

    /// A worker killed by SIGSYS: trap mode's handler reported the syscall before dying.
    fn report_trap(&mut self, pid: i32) {
        // Let the report channel catch up.
        let _ = recv_report(self.report_r.as_raw_fd(), &mut self.reports);
        let nr = self
            .reports
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("SECCOMP "))
            .and_then(|v| v.trim().parse::<i64>().ok());
        match nr {
            Some(nr) => self.seccomp_kill(pid, nr),
            None => {
                error!(
                    "worker {pid} killed by SIGSYS without a report (it did not come from the \
                     seccomp filter's trap handler)"
                );
                self.count_exit("signal");
            }
        }
        self.reports.clear();
    }

    fn seccomp_kill(&mut self, pid: i32, nr: i64) {
        let name = seccomp::syscall_name(nr, self.rules);
        error!("worker {pid} killed by seccomp: syscall {nr} ({name}) is not allowed");
        *self.facts.seccomp_kills.entry(name).or_default() += 1;
        self.count_exit("seccomp");
    }

    fn count_exit(&mut self, how: &'static str) {
        *self.facts.exits.entry(how.to_string()).or_default() += 1;
    }

    /// After a death: one that dies right after starting would otherwise be respawned in a
    /// tight loop; one that died while serving is replaced at once (the frontend is waiting).
    /// The pause is a deadline of the poll loop, which keeps serving signals and clients.
    fn pace(&mut self, pid: i32, lived: Duration, served: bool) {
        if served {
            info!("replacing worker {pid}, which was serving a frontend");
            self.backoff = FIRST_BACKOFF;
        } else if lived < Duration::from_secs(2) {
            self.spawn_at = Some(Instant::now() + self.backoff);
            self.backoff = (self.backoff * 2).min(Duration::from_secs(5));
        } else {
            self.backoff = FIRST_BACKOFF;
        }
    }
}

/// Forks a jailed child (a worker, or with `service` the service process, which keeps the
/// endpoints' fds `keep` and gets no cgroup of its own).
fn spawn(
    jail: &JailConfig,
    ctx: WorkerCtx,
    worker: &mut dyn FnMut(WorkerCtx) -> i32,
    keep: &[RawFd],
    service: bool,
) -> Result<Child, SupervisorError> {
    let (sync_r, sync_w) = pipe()?;
    // Copied before the clone: the child must not take a lock.
    let mut supervisor_only = SUPERVISOR_ONLY
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    supervisor_only.retain(|fd| !keep.contains(fd));
    let mut flags = libc::SIGCHLD as libc::c_long;
    if jail.mode == SandboxMode::Namespace {
        flags |= (libc::CLONE_NEWUSER
            | libc::CLONE_NEWNS
            | libc::CLONE_NEWPID
            | libc::CLONE_NEWNET
            | libc::CLONE_NEWIPC
            | libc::CLONE_NEWUTS
            | libc::CLONE_NEWCGROUP) as libc::c_long;
    }
    // SAFETY: clone without CLONE_VM and with a null stack behaves like fork: the child gets a
    // copy of this (single-threaded) process and continues here with return value 0.
    let pid = unsafe { libc::syscall(libc::SYS_clone, flags, 0, 0, 0, 0) };
    if pid < 0 {
        let err = io::Error::last_os_error();
        let hint = if jail.mode == SandboxMode::Namespace {
            " (creating user/mount/pid/net/ipc/uts/cgroup namespaces: are user namespaces enabled? \
             check user.max_user_namespaces and kernel.unprivileged_userns_clone; as root, \
             --sandbox chroot works without them; --sandbox none runs unconfined)"
        } else {
            ""
        };
        return Err(SupervisorError::Spawn { err, hint });
    }
    if pid == 0 {
        // The worker. Never return into the supervisor's code: _exit with the worker's code.
        for &fd in supervisor_only.iter() {
            // SAFETY: closes an fd of the supervisor's that this copy must not keep.
            unsafe { libc::close(fd) };
        }
        drop(sync_w);
        let mut b = [0u8; 1];
        // SAFETY: read into a local byte; prctl/sigprocmask with valid arguments.
        let code = unsafe {
            let n = libc::read(sync_r.as_raw_fd(), b.as_mut_ptr().cast(), 1);
            if n != 1 {
                libc::_exit(EXIT_JAIL_FAILED);
            }
            // Die with the supervisor: a worker must never outlive the process that owns the
            // socket path.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
            // SIGTERM, SIGINT and SIGHUP stay blocked (as in the supervisor) until the
            // worker's signal thread waits for them: blocked, one that comes early is kept
            // pending. Unblocked without a handler it would be dropped, because the worker is
            // pid 1 of its pid namespace, and the stop would hang.
            let chld = sigset(&[libc::SIGCHLD]);
            libc::sigprocmask(libc::SIG_UNBLOCK, &chld, std::ptr::null_mut());
            drop(sync_r);
            worker(ctx)
        };
        // SAFETY: ends the worker without running the supervisor's destructors.
        unsafe { libc::_exit(code) };
    }
    let pid = pid as i32;
    drop(sync_r);
    if jail.mode == SandboxMode::Namespace {
        if let Err(e) = write_id_maps(pid, jail.ids) {
            // SAFETY: kill/waitpid on our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
            return Err(e);
        }
    }
    let cgroup = match jail
        .cgroups
        .as_ref()
        .filter(|_| !service)
        .map(|c| c.add_worker(pid, ctx.generation))
    {
        Some(Err(e)) => {
            // SAFETY: kill/waitpid on our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
            return Err(SupervisorError::Cgroup(pid, e));
        }
        other => other.and_then(Result::ok),
    };
    // SAFETY: write one byte from a local to our pipe.
    unsafe { libc::write(sync_w.as_raw_fd(), b"g".as_ptr().cast(), 1) };
    Ok(Child {
        pid,
        _cgroup: cgroup,
        started: Instant::now(),
        served: false,
    })
}

/// An empty directory for `--sandbox chroot`, removed when dropped.
pub struct EmptyDir(pub PathBuf);

impl EmptyDir {
    /// The directory `--sandbox chroot` needs; none for the other modes.
    pub fn for_mode(mode: super::SandboxMode) -> io::Result<Option<Self>> {
        if mode != super::SandboxMode::Chroot {
            return Ok(None);
        }
        Self::create().map(Some)
    }

    pub fn create() -> io::Result<Self> {
        let base = std::env::temp_dir().join(format!("vhostbox-root-{}", std::process::id()));
        fs::create_dir(&base)?;
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&base, fs::Permissions::from_mode(0o555))?;
        Ok(EmptyDir(base))
    }
}

impl Drop for EmptyDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir(&self.0);
    }
}

/// CPU seconds of process `pid` from /proc (0 if it cannot be read).
fn proc_cpu_seconds(pid: i32) -> f64 {
    let Ok(s) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // The command name is in parentheses and may hold spaces: fields count from after it.
    let Some(rest) = s.rfind(')').map(|i| &s[i + 1..]) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat(5), 12 and 13 after the name.
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| f.get(i).and_then(|v| v.parse::<u64>().ok()))
        .sum();
    // SAFETY: sysconf with a valid name.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    ticks as f64 / hz as f64
}

/// CPU seconds (user + system) of this process, or of its reaped children.
fn rusage_seconds(who: libc::c_int) -> f64 {
    // SAFETY: rusage is plain integers; getrusage fills it in.
    let mut r: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to our struct.
    if unsafe { libc::getrusage(who, &mut r) } != 0 {
        return 0.0;
    }
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(r.ru_utime) + t(r.ru_stime)
}

impl Supervisor<'_> {
    /// What the supervisor knows now, for metrics and the control socket.
    fn report(&self) -> crate::service::Report {
        let worker = self.child.as_ref().map(|c| crate::service::WorkerReport {
            pid: c.pid,
            generation: self.generation,
            serving: c.served,
            uptime: c.started.elapsed(),
        });
        crate::service::Report {
            name: self.service.name,
            uptime: self.facts.started.map_or(Duration::ZERO, |s| s.elapsed()),
            worker,
            connections: self.facts.connections,
            restarts: self.restarts,
            seccomp_kills: self.facts.seccomp_kills.clone(),
            exits: self.facts.exits.clone(),
            cpu_supervisor: rusage_seconds(libc::RUSAGE_SELF),
            cpu_workers: rusage_seconds(libc::RUSAGE_CHILDREN)
                + self.child.as_ref().map_or(0.0, |c| proc_cpu_seconds(c.pid)),
            stopping: self.stopping,
            queues: self.service.queues,
        }
    }
}

impl Supervisor<'_> {
    /// Starts the service process when it is due, and reaps it when it has ended.
    fn tend_service(&mut self) {
        if let Some((pid, _)) = &self.svc {
            let mut status = 0;
            // SAFETY: waitpid on our own child with a valid status pointer.
            if unsafe { libc::waitpid(*pid, &mut status, libc::WNOHANG) } != *pid {
                return;
            }
            let pid = *pid;
            if let Some((_, chan)) = self.svc.take() {
                let_workers_forget(chan.as_raw_fd());
            }
            if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == EXIT_JAIL_FAILED {
                error!(
                    "service process {pid} could not enter its sandbox: no --metrics or --control"
                );
                return;
            }
            if !self.stopping {
                warn!("service process {pid} ended (wait status {status:#x}); starting a new one");
                self.svc_at = Some(Instant::now() + self.svc_backoff);
                self.svc_backoff = (self.svc_backoff * 2).min(Duration::from_secs(5));
            }
            return;
        }
        if self.stopping || self.service.server.is_none() {
            return;
        }
        match self.svc_at {
            Some(at) if Instant::now() >= at => {}
            _ => return,
        }
        self.svc_at = None;
        if let Err(e) = self.start_service() {
            error!(
                "cannot start the service process: {}",
                crate::error_chain(&e)
            );
            self.svc_at = Some(Instant::now() + Duration::from_secs(5));
        }
    }

    /// Forks the jailed process that serves the endpoints: it, not the supervisor, parses
    /// what clients send. It asks the supervisor for its figures over a socket pair.
    fn start_service(&mut self) -> Result<(), SupervisorError> {
        let jail = self.jail;
        let defs = self.service.defs;
        let name = self.service.name;
        let Some(srv) = self.service.server.as_mut() else {
            return Ok(());
        };
        let (ours, theirs) = seqpacket_pair()?;
        // SAFETY: fcntl on our fd.
        unsafe { libc::fcntl(ours.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        keep_from_workers(ours.as_raw_fd());
        let keep = srv.fds();
        let ctx = WorkerCtx {
            report_fd: theirs.as_raw_fd(),
            generation: 0,
        };
        let mut main = |ctx: WorkerCtx| crate::service::serve_endpoints(srv, name, defs, jail, ctx);
        let c = match spawn(jail, ctx, &mut main, &keep, true) {
            Ok(c) => c,
            Err(e) => {
                let_workers_forget(ours.as_raw_fd());
                return Err(e);
            }
        };
        drop(theirs);
        info!(
            "service process started, pid {} (--metrics, --control)",
            c.pid
        );
        self.svc = Some((c.pid, ours));
        Ok(())
    }

    /// The service process asked for the figures (or reported the syscall that killed it).
    fn answer_service(&mut self) {
        let Some((pid, chan)) = &self.svc else { return };
        let (pid, fd) = (*pid, chan.as_raw_fd());
        loop {
            let mut b = [0u8; 64];
            // SAFETY: recv into a local buffer of the size given.
            let n = unsafe { libc::recv(fd, b.as_mut_ptr().cast(), b.len(), libc::MSG_DONTWAIT) };
            if n <= 0 {
                return;
            }
            let msg = &b[..n as usize];
            if let Some(req) = std::str::from_utf8(msg)
                .ok()
                .and_then(|m| m.strip_prefix(RESIZE_REQUEST))
            {
                let reply = self.resize(req).to_string();
                // SAFETY: sends our buffer on our socket (one datagram; non-blocking).
                unsafe { libc::send(fd, reply.as_ptr().cast(), reply.len(), libc::MSG_DONTWAIT) };
            } else if msg == crate::service::REPORT_REQUEST {
                let reply = self.report().to_json().to_string();
                // SAFETY: sends our buffer on our socket (one datagram; non-blocking).
                unsafe { libc::send(fd, reply.as_ptr().cast(), reply.len(), libc::MSG_DONTWAIT) };
            } else if let Some(nr) = std::str::from_utf8(msg)
                .ok()
                .and_then(|m| m.trim().strip_prefix("SECCOMP "))
                .and_then(|v| v.parse::<i64>().ok())
            {
                let rules = seccomp::service_rules(1);
                error!(
                    "service process {pid} killed by seccomp: syscall {nr} ({}) is not allowed",
                    seccomp::syscall_name(nr, &rules)
                );
            }
        }
    }

    /// A resize the service process asked for: the device resizes (the supervisor holds the
    /// image), workers from now on get the new file-size limit, and the current one is told
    /// (its limit raised, then `CONFIG <bytes>` to take up the capacity and tell its frontend).
    fn resize(&mut self, req: &str) -> serde_json::Value {
        let mut it = req.split_whitespace();
        let size = match it.next() {
            Some("-") => None,
            Some(v) => match v.parse::<u64>() {
                Ok(n) => Some(n),
                Err(_) => return serde_json::json!({"error": "bad size"}),
            },
            None => return serde_json::json!({"error": "no size"}),
        };
        let force = it.next() == Some("1");
        let Some(f) = self.service.resize.as_ref() else {
            return serde_json::json!({"error": "this device has no disk to resize"});
        };
        let r = match f(size, force) {
            Ok(r) => r,
            Err(e) => {
                warn!("resize refused: {e}");
                return serde_json::json!({ "error": e });
            }
        };
        info!("resized from {} to {} bytes", r.old, r.new);
        super::FSIZE.store(r.fsize, std::sync::atomic::Ordering::Relaxed);
        let mut worker = serde_json::Value::Null;
        if let Some(c) = &self.child {
            let lim = libc::rlimit {
                rlim_cur: r.fsize,
                rlim_max: libc::RLIM_INFINITY,
            };
            // SAFETY: prlimit on our own child with a valid struct; no old value asked for.
            let raised =
                unsafe { libc::prlimit(c.pid, libc::RLIMIT_FSIZE, &lim, std::ptr::null_mut()) }
                    == 0;
            if !raised {
                warn!(
                    "worker {}: cannot raise its file-size limit to {} bytes ({}): its writes \
                     past the old size fail until the next worker",
                    c.pid,
                    r.fsize,
                    io::Error::last_os_error()
                );
            }
            let msg = format!("{CONFIG}{}\n", r.new);
            // SAFETY: writes our buffer to our report socket (non-blocking).
            let told =
                unsafe { libc::write(self.report_r.as_raw_fd(), msg.as_ptr().cast(), msg.len()) }
                    == msg.len() as isize;
            worker =
                serde_json::json!({"pid": c.pid, "told": told, "file_size_limit_raised": raised});
        }
        serde_json::json!({ "old": r.old, "new": r.new, "worker": worker })
    }

    /// Ends the service process (at the supervisor's exit).
    fn stop_service(&mut self) {
        if let Some((pid, _)) = self.svc.take() {
            // SAFETY: kill/waitpid on our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
        }
    }
}
