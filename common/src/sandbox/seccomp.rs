//! Seccomp allow-lists as Rust data: a transport part every backend shares (this file) plus a
//! device part each backend adds. Every entry says who needs it. Calls that could widen what
//! the worker can do are restricted by argument: `ioctl` to the requests a device names,
//! `mmap`/`mprotect` without PROT_EXEC, `clone` to threads only, `fcntl` to flag and dup
//! operations, `prctl` to naming threads, `tgkill` to the worker's own threads. Sockets cannot
//! be created at all; the worker only uses the ones it inherited.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI32, Ordering};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};

use super::{JailError, SeccompMode};

/// A condition on one syscall argument.
#[derive(Debug, Clone)]
pub enum Arg {
    /// argument `n` equals the value
    Eq(u8, u64),
    /// argument `n` masked with `mask` equals the value
    Masked(u8, u64, u64),
}

/// One allowed syscall: unconditionally (`when` empty) or when any one of the argument
/// combinations in `when` matches (the conditions inside a combination must all hold).
#[derive(Debug, Clone)]
pub struct Allow {
    pub nr: i64,
    pub name: &'static str,
    /// Who needs it and why.
    pub why: &'static str,
    pub when: Vec<Vec<Arg>>,
}

/// An allow-list.
pub type Rules = Vec<Allow>;

/// Allows `nr` unconditionally.
pub fn allow(nr: i64, name: &'static str, why: &'static str) -> Allow {
    Allow {
        nr,
        name,
        why,
        when: Vec::new(),
    }
}

/// Allows `nr` when one of the argument combinations matches.
pub fn allow_if(nr: i64, name: &'static str, why: &'static str, when: Vec<Vec<Arg>>) -> Allow {
    Allow {
        nr,
        name,
        why,
        when,
    }
}

/// What every backend worker needs: the Rust runtime, the vhost-user connection, the epoll
/// worker threads of vhost-user-backend, guest memory mapping and logging.
pub fn transport_rules(own_pid: u32) -> Rules {
    use libc::*;
    let no_exec = |n: u8| vec![vec![Arg::Masked(n, PROT_EXEC as u64, 0)]];
    vec![
        allow(SYS_read, "read", "vhost-user socket, eventfds (kick, exit, completion)"),
        allow(SYS_write, "write", "eventfds (call, notifications), log lines on stderr"),
        allow(SYS_writev, "writev", "log lines on stderr"),
        allow(SYS_recvmsg, "recvmsg", "vhost-user messages and the fds they carry"),
        allow(SYS_sendmsg, "sendmsg", "vhost-user replies"),
        allow_if(
            SYS_getsockopt,
            "getsockopt",
            "SOL_SOCKET SO_DOMAIN and SO_TYPE only: vhost checks the backend channel \
             (SET_BACKEND_REQ_FD) is a unix stream socket",
            vec![
                vec![Arg::Eq(1, SOL_SOCKET as u64), Arg::Eq(2, SO_DOMAIN as u64)],
                vec![Arg::Eq(1, SOL_SOCKET as u64), Arg::Eq(2, SO_TYPE as u64)],
            ],
        ),
        allow(SYS_accept4, "accept4", "the one frontend connection, on the inherited listener"),
        allow(SYS_accept, "accept", "the same, on libcs that use accept"),
        allow(SYS_shutdown, "shutdown", "closing the connection on SIGTERM"),
        allow(SYS_poll, "poll", "waiting for the frontend to connect"),
        allow(SYS_ppoll, "ppoll", "the same, on libcs that use ppoll"),
        allow(SYS_epoll_create1, "epoll_create1", "one epoll per vring worker thread"),
        allow(SYS_epoll_ctl, "epoll_ctl", "registering kick and completion eventfds"),
        allow(SYS_epoll_wait, "epoll_wait", "vring worker threads"),
        allow(SYS_epoll_pwait, "epoll_pwait", "the same, on libcs that use epoll_pwait"),
        allow(SYS_eventfd2, "eventfd2", "vhost-user-backend's per-connection events"),
        allow(SYS_close, "close", "fds from the frontend are closed when replaced"),
        allow_if(SYS_fcntl, "fcntl", "fd flags (non-blocking eventfds), the seals of a frontend's memory (relay), duplicating the in-flight memfd", vec![
            vec![Arg::Eq(1, F_GETFL as u64)],
            vec![Arg::Eq(1, F_GET_SEALS as u64)],
            vec![Arg::Eq(1, F_SETFL as u64)],
            vec![Arg::Eq(1, F_GETFD as u64)],
            vec![Arg::Eq(1, F_SETFD as u64)],
            vec![Arg::Eq(1, F_DUPFD_CLOEXEC as u64)],
        ]),
        allow(SYS_fstat, "fstat", "sizing the guest memory fds the frontend sends"),
        allow(SYS_newfstatat, "newfstatat", "the same, via fstatat(fd, \"\", AT_EMPTY_PATH)"),
        allow(SYS_statx, "statx", "the same, on newer libcs"),
        allow_if(SYS_mmap, "mmap", "guest memory regions, heap, thread stacks; never executable", no_exec(2)),
        allow_if(SYS_mprotect, "mprotect", "thread stack guard pages; never executable", no_exec(2)),
        allow(SYS_munmap, "munmap", "guest memory regions when the table changes, heap"),
        allow(SYS_mremap, "mremap", "heap reallocation"),
        allow(SYS_madvise, "madvise", "heap and freed thread stacks"),
        allow(SYS_brk, "brk", "heap"),
        allow(SYS_futex, "futex", "locks and condition variables between threads"),
        allow_if(SYS_clone, "clone", "vring worker threads; threads only, never processes", vec![
            vec![Arg::Masked(0, CLONE_THREAD as u64, CLONE_THREAD as u64)],
        ]),
        allow(SYS_clone3, "clone3", "answered ENOSYS by the second filter so libc falls back to clone, whose flags can be checked"),
        allow(SYS_set_robust_list, "set_robust_list", "new threads"),
        allow(SYS_rseq, "rseq", "new threads (glibc registers restartable sequences)"),
        allow(SYS_sigaltstack, "sigaltstack", "Rust's stack-overflow guard on new threads"),
        allow(SYS_rt_sigprocmask, "rt_sigprocmask", "blocking SIGTERM/SIGINT for the signal thread"),
        allow(SYS_rt_sigaction, "rt_sigaction", "installing the shutdown signal handlers"),
        allow(SYS_rt_sigreturn, "rt_sigreturn", "returning from signal handlers"),
        allow(SYS_rt_sigtimedwait, "rt_sigtimedwait", "the signal thread's sigwait"),
        allow(SYS_restart_syscall, "restart_syscall", "interrupted sleeps"),
        allow(SYS_sched_yield, "sched_yield", "spinning locks"),
        allow(SYS_sched_getaffinity, "sched_getaffinity", "glibc sizes new thread stacks and Rust's available_parallelism"),
        allow(SYS_getpid, "getpid", "log lines"),
        allow(SYS_gettid, "gettid", "libc thread bookkeeping"),
        allow(SYS_getrandom, "getrandom", "hash map seeds"),
        allow(SYS_clock_gettime, "clock_gettime", "timeouts (when the vDSO is unavailable)"),
        allow(SYS_clock_nanosleep, "clock_nanosleep", "back-off sleeps"),
        allow(SYS_nanosleep, "nanosleep", "back-off sleeps"),
        allow_if(SYS_prctl, "prctl", "naming threads", vec![vec![Arg::Eq(0, PR_SET_NAME as u64)]]),
        allow_if(SYS_tgkill, "tgkill", "abort() signals its own thread", vec![vec![Arg::Eq(0, u64::from(own_pid))]]),
        allow(SYS_exit, "exit", "thread exit"),
        allow(SYS_exit_group, "exit_group", "process exit"),
        allow_if(SYS_seccomp, "seccomp", "the relay and signal threads narrow themselves with a filter of their own (a filter can only take away)", vec![
            vec![Arg::Eq(0, SECCOMP_SET_MODE_FILTER as u64), Arg::Eq(1, 0)],
        ]),
    ]
}

/// The kinds of thread a worker runs, beyond the library's queue and message threads (which
/// run under the process's whole allow-list). Each installs its own, narrower list on top as
/// its first action, so a bug in what it parses reaches only what that thread needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The vhost-user relay: parses every frontend message before the library does.
    Relay,
    /// The signal thread: waits for SIGTERM, has the device drain, cuts the frontend off.
    Signals,
    /// Answers the supervisor's heartbeat on the report socket.
    Heartbeat,
}

/// What every thread of ours needs to live and die: memory for the heap, locks, the log,
/// and thread exit.
fn thread_common(own_pid: u32) -> Rules {
    use libc::*;
    let no_exec = |n: u8| vec![vec![Arg::Masked(n, PROT_EXEC as u64, 0)]];
    vec![
        allow(SYS_write, "write", "log lines on stderr; eventfds"),
        allow(SYS_writev, "writev", "log lines on stderr"),
        allow(SYS_getpid, "getpid", "log lines"),
        allow(SYS_futex, "futex", "locks shared with the other threads"),
        allow(SYS_sched_yield, "sched_yield", "spinning locks"),
        allow_if(
            SYS_mmap,
            "mmap",
            "heap growth; never executable",
            no_exec(2),
        ),
        allow(SYS_munmap, "munmap", "heap; the thread's stack at exit"),
        allow(SYS_mremap, "mremap", "heap reallocation"),
        allow(SYS_madvise, "madvise", "heap; the thread's stack at exit"),
        allow(SYS_brk, "brk", "heap"),
        allow(
            SYS_clock_gettime,
            "clock_gettime",
            "timeouts (when the vDSO is unavailable)",
        ),
        allow(
            SYS_rt_sigprocmask,
            "rt_sigprocmask",
            "glibc blocks signals around thread exit",
        ),
        allow(
            SYS_rt_sigreturn,
            "rt_sigreturn",
            "returning from the SIGSYS report handler",
        ),
        allow(SYS_restart_syscall, "restart_syscall", "interrupted waits"),
        allow(
            SYS_sigaltstack,
            "sigaltstack",
            "Rust's stack-overflow guard, removed at exit",
        ),
        allow_if(
            SYS_tgkill,
            "tgkill",
            "abort() signals its own thread",
            vec![vec![Arg::Eq(0, u64::from(own_pid))]],
        ),
        allow(SYS_exit, "exit", "thread exit"),
        allow(SYS_exit_group, "exit_group", "process exit (a panic)"),
    ]
}

/// The relay thread's list.
pub fn relay_rules(own_pid: u32) -> Rules {
    use libc::*;
    let mut r = thread_common(own_pid);
    r.extend([
        allow(SYS_poll, "poll", "waiting on the frontend and the library"),
        allow(SYS_ppoll, "ppoll", "the same, on libcs that use ppoll"),
        allow(SYS_recvmsg, "recvmsg", "messages and their fds"),
        allow(SYS_sendmsg, "sendmsg", "passing messages and fds on"),
        allow(SYS_read, "read", "message bodies"),
        allow(SYS_close, "close", "fds of refused or answered messages"),
        allow(SYS_shutdown, "shutdown", "ending both sides when one goes away"),
        allow(SYS_fstat, "fstat", "checking the fds a frontend sends (eventfds, memory)"),
        allow(SYS_newfstatat, "newfstatat", "the same, via fstatat(fd, \"\", AT_EMPTY_PATH)"),
        allow(SYS_statx, "statx", "the same, on newer libcs"),
        allow_if(SYS_fcntl, "fcntl", "access mode and seals of a frontend's fds; close-on-exec on received fds; dup of the in-flight memfd", vec![
            vec![Arg::Eq(1, F_GETFL as u64)],
            vec![Arg::Eq(1, F_GET_SEALS as u64)],
            vec![Arg::Eq(1, F_GETFD as u64)],
            vec![Arg::Eq(1, F_SETFD as u64)],
            vec![Arg::Eq(1, F_DUPFD_CLOEXEC as u64)],
        ]),
    ]);
    r
}

/// The service process's list (`--metrics`, `--control`): it accepts clients on listeners it
/// inherited, reads their requests, asks the supervisor for its figures over one socket and
/// writes replies. It opens nothing, maps no file and starts no thread.
pub fn service_rules(own_pid: u32) -> Rules {
    use libc::*;
    let mut r = thread_common(own_pid);
    r.extend([
        allow(
            SYS_poll,
            "poll",
            "waiting for clients, their requests, the supervisor",
        ),
        allow(SYS_ppoll, "ppoll", "the same, on libcs that use ppoll"),
        allow(
            SYS_accept4,
            "accept4",
            "clients, on the inherited listeners",
        ),
        allow(SYS_accept, "accept", "the same, on libcs that use accept"),
        allow(SYS_read, "read", "requests"),
        allow(
            SYS_recvfrom,
            "recvfrom",
            "requests (std's socket read); the supervisor's figures",
        ),
        allow(
            SYS_sendto,
            "sendto",
            "asking the supervisor; replies (std's socket write)",
        ),
        allow(SYS_close, "close", "clients that are done"),
        allow(SYS_shutdown, "shutdown", "ending a reply"),
        allow_if(
            SYS_fcntl,
            "fcntl",
            "making accepted clients non-blocking; F_GETFD: std checks that an fd it closes was open (debug builds)",
            vec![
                vec![Arg::Eq(1, F_GETFL as u64)],
                vec![Arg::Eq(1, F_SETFL as u64)],
                vec![Arg::Eq(1, F_GETFD as u64)],
            ],
        ),
        allow_if(
            SYS_ioctl,
            "ioctl",
            "FIONBIO only (std's set_nonblocking)",
            vec![vec![Arg::Eq(1, FIONBIO)]],
        ),
        allow(SYS_getrandom, "getrandom", "hash map seeds"),
    ]);
    r
}

/// The heartbeat thread's list: it reads pings and writes answers on one socket.
pub fn heartbeat_rules(own_pid: u32) -> Rules {
    use libc::*;
    let mut r = thread_common(own_pid);
    r.push(allow(SYS_read, "read", "the supervisor's heartbeat"));
    r
}

/// The signal thread's list; `drain` is what the device's drain needs (blk: io_uring_enter).
pub fn signal_rules(own_pid: u32, drain: Rules) -> Rules {
    use libc::*;
    let mut r = thread_common(own_pid);
    r.extend([
        allow(SYS_rt_sigtimedwait, "rt_sigtimedwait", "sigwait"),
        allow(SYS_read, "read", "eventfds while draining"),
        allow(
            SYS_shutdown,
            "shutdown",
            "cutting the frontend's connection off",
        ),
    ]);
    r.extend(drain);
    r
}

/// The worker's seccomp mode, for the thread filters (`None` until the jail is entered).
static MODE: AtomicI32 = AtomicI32::new(-1);

fn set_mode(mode: SeccompMode) {
    MODE.store(mode as i32, Ordering::Relaxed);
}

/// Installs `rules` for the calling thread (on top of the process's list, so a syscall must be
/// on both to pass), in the worker's
/// seccomp mode. A forbidden syscall traps: the report handler tells the supervisor which one,
/// then the whole worker dies, as in kill mode (a second notifying listener cannot exist).
/// Nothing to do outside a jail or with `--seccomp none`.
pub fn install_thread(kind: ThreadKind, rules: Rules) -> Result<(), JailError> {
    let mode = MODE.load(Ordering::Relaxed);
    let mismatch = if mode == SeccompMode::Kill as i32 || mode == SeccompMode::Trap as i32 {
        SeccompAction::Trap
    } else if mode == SeccompMode::Log as i32 {
        SeccompAction::Log
    } else {
        return Ok(());
    };
    install_sigsys_handler()?;
    // seccomp(2) directly: seccompiler's apply_filter would first set no_new_privs with a
    // prctl the process's list does not allow (it is set already).
    set_filter(build(&rules, mismatch)?, 0)
        .map(|_| ())
        .map_err(|e| JailError::Seccomp(format!("{kind:?} thread: {e}")))
}

/// seccomp(SECCOMP_SET_MODE_FILTER, `flags`, `prog`); no_new_privs must be set already.
fn set_filter(mut prog: BpfProgram, flags: libc::c_ulong) -> std::io::Result<libc::c_long> {
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_mut_ptr().cast(),
    };
    // SAFETY: seccomp(SET_MODE_FILTER) reads the program through `fprog`, which points into
    // `prog`, alive for the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            flags,
            &fprog as *const libc::sock_fprog,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r)
}

fn install_sigsys_handler() -> Result<(), JailError> {
    // SAFETY: installs a handler that only uses async-signal-safe calls.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) < 0 {
            return Err(JailError::Seccomp(
                "cannot install the SIGSYS handler".into(),
            ));
        }
    }
    Ok(())
}

/// Where the trap handler reports the blocked syscall (-1: nowhere).
static REPORT_FD: AtomicI32 = AtomicI32::new(-1);

/// Sets the fd (a pipe to the supervisor) that trap mode reports blocked syscalls on.
/// The report fd set with `set_report_fd`, or -1.
pub fn report_fd() -> i32 {
    REPORT_FD.load(Ordering::Relaxed)
}

pub fn set_report_fd(fd: i32) {
    REPORT_FD.store(fd, Ordering::Relaxed);
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // siginfo_t for SIGSYS (x86_64/aarch64): call address at offset 16, syscall number at 24.
    // SAFETY: the kernel passes a valid siginfo_t; the offset is inside the struct.
    let nr = unsafe { *(info.cast::<u8>().add(24).cast::<i32>()) };
    let mut buf = *b"SECCOMP 0000000000\n";
    let mut n = nr.unsigned_abs();
    let mut i = buf.len() - 2;
    loop {
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 || i == 8 {
            break;
        }
        i -= 1;
    }
    let fd = REPORT_FD.load(Ordering::Relaxed);
    // SAFETY: write(2) is async-signal-safe; buf is a local array.
    unsafe {
        libc::write(if fd >= 0 { fd } else { 2 }, buf.as_ptr().cast(), buf.len());
        // With SIGSYS blocked (it is, inside its own handler) the next trapped syscall kills
        // the process with SIGSYS. reboot(2) is never on any allow-list.
        libc::syscall(libc::SYS_reboot, 0, 0, 0, 0);
        libc::_exit(128 + libc::SIGSYS);
    }
}

fn build(rules: &Rules, mismatch: SeccompAction) -> Result<BpfProgram, JailError> {
    let err = |e: &dyn std::fmt::Display| JailError::Seccomp(e.to_string());
    let mut map: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for a in rules {
        let entry = map.entry(a.nr).or_default();
        for combo in &a.when {
            let conds = combo
                .iter()
                .map(|c| match *c {
                    Arg::Eq(i, v) => {
                        SeccompCondition::new(i, SeccompCmpArgLen::Qword, SeccompCmpOp::Eq, v)
                    }
                    Arg::Masked(i, m, v) => SeccompCondition::new(
                        i,
                        SeccompCmpArgLen::Qword,
                        SeccompCmpOp::MaskedEq(m),
                        v,
                    ),
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| err(&e))?;
            entry.push(SeccompRule::new(conds).map_err(|e| err(&e))?);
        }
    }
    let arch = std::env::consts::ARCH.try_into().map_err(|e| err(&e))?;
    let filter =
        SeccompFilter::new(map, mismatch, SeccompAction::Allow, arch).map_err(|e| err(&e))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| err(&e))
}

/// Installs the allow-list (and the clone3 -> ENOSYS filter) for this thread and every thread
/// it creates afterwards. Must run single-threaded, after no_new_privs.
pub fn install(mode: SeccompMode, rules: Rules) -> Result<(), JailError> {
    let mismatch = match mode {
        SeccompMode::None => return Ok(()),
        SeccompMode::Kill => SeccompAction::KillProcess,
        SeccompMode::Trap => SeccompAction::Trap,
        SeccompMode::Log => SeccompAction::Log,
    };
    set_mode(mode);
    if mode == SeccompMode::Trap {
        install_sigsys_handler()?;
    }
    let main = build(&rules, mismatch)?;
    // glibc tries clone3 first; its flags live in memory seccomp cannot read, so make it fail
    // with ENOSYS (glibc then uses clone, whose flags the main filter checks).
    let clone3 = {
        let mut m = BTreeMap::new();
        m.insert(libc::SYS_clone3, vec![]);
        let arch = std::env::consts::ARCH
            .try_into()
            .map_err(|e: seccompiler::BackendError| JailError::Seccomp(e.to_string()))?;
        let f = SeccompFilter::new(
            m,
            SeccompAction::Allow,
            SeccompAction::Errno(libc::ENOSYS as u32),
            arch,
        )
        .map_err(|e| JailError::Seccomp(e.to_string()))?;
        BpfProgram::try_from(f).map_err(|e| JailError::Seccomp(e.to_string()))?
    };
    seccompiler::apply_filter(&clone3).map_err(|e| JailError::Seccomp(e.to_string()))?;
    if mode == SeccompMode::Kill {
        install_notifying(main)
    } else {
        seccompiler::apply_filter(&main).map_err(|e| JailError::Seccomp(e.to_string()))
    }
}

/// Kill mode. The filter answers a forbidden syscall with SECCOMP_RET_USER_NOTIF instead of
/// killing outright, and its listener fd goes to the supervisor over the report socket: the
/// calling thread stays blocked in the kernel (the syscall never runs) until the supervisor,
/// having read the syscall number from the notification, kills the worker with SIGKILL. So
/// every kill is reported with its syscall, with no dependence on the kernel's rate-limited
/// audit log. The worker keeps no copy of the listener (it could otherwise answer its own
/// notifications and let the syscall run), and if the listener cannot be handed over the
/// worker does not start: without a listener the kernel would answer ENOSYS, not kill.
fn install_notifying(mut prog: BpfProgram) -> Result<(), JailError> {
    const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    for ins in prog.iter_mut() {
        if ins.code == RET_K && ins.k == libc::SECCOMP_RET_KILL_PROCESS {
            ins.k = libc::SECCOMP_RET_USER_NOTIF;
        }
    }
    let report = REPORT_FD.load(Ordering::Relaxed);
    if report < 0 {
        return Err(JailError::Seccomp(
            "no supervisor to hand the seccomp listener to".into(),
        ));
    }
    let fd = set_filter(
        prog,
        libc::SECCOMP_FILTER_FLAG_NEW_LISTENER as libc::c_ulong,
    )
    .map_err(|e| JailError::Seccomp(format!("installing the filter: {e}")))? as i32;
    let sent = send_fd(report, fd);
    // SAFETY: closes the listener fd we own; the supervisor has its own copy now.
    unsafe { libc::close(fd) };
    sent.map_err(|e| JailError::Seccomp(format!("handing the listener to the supervisor: {e}")))
}

/// Control-message room for one fd, and a msghdr over it: for passing the seccomp listener
/// from the worker to the supervisor.
pub(crate) struct FdMsgBuf(Vec<u8>);

impl FdMsgBuf {
    pub(crate) fn new() -> Self {
        // SAFETY: CMSG_SPACE is a pure computation.
        let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<i32>() as u32) } as usize;
        FdMsgBuf(vec![0u8; space])
    }

    /// A msghdr with one iovec and this control buffer; both must outlive its use.
    pub(crate) fn msghdr(&mut self, iov: &mut libc::iovec) -> libc::msghdr {
        // SAFETY: a zeroed msghdr is valid; its pointers are set to live buffers below.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov;
        msg.msg_iovlen = 1;
        msg.msg_control = self.0.as_mut_ptr().cast();
        msg.msg_controllen = self.0.len();
        msg
    }
}

/// Sends `fd` over the unix socket `sock` (one byte of payload, SCM_RIGHTS).
fn send_fd(sock: i32, fd: i32) -> std::io::Result<()> {
    let mut byte = *b"L";
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut cbuf = FdMsgBuf::new();
    let msg = cbuf.msghdr(&mut iov);
    // SAFETY: msg has a control buffer of CMSG_SPACE(4) bytes, so the first header and its
    // data fit; the fd is copied into the data.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<i32>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<i32>(), fd);
    }
    // SAFETY: sendmsg with the message built above.
    if unsafe { libc::sendmsg(sock, &msg, 0) } != 1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A syscall's name, for reports (the allow-list's names plus the ones attackers try).
pub fn syscall_name(nr: i64, rules: &Rules) -> String {
    if let Some(a) = rules.iter().find(|a| a.nr == nr) {
        return a.name.to_string();
    }
    let known: &[(i64, &str)] = &[
        (libc::SYS_open, "open"),
        (libc::SYS_openat, "openat"),
        (libc::SYS_openat2, "openat2"),
        (libc::SYS_execve, "execve"),
        (libc::SYS_execveat, "execveat"),
        (libc::SYS_socket, "socket"),
        (libc::SYS_connect, "connect"),
        (libc::SYS_bind, "bind"),
        (libc::SYS_ptrace, "ptrace"),
        (libc::SYS_kill, "kill"),
        (libc::SYS_mount, "mount"),
        (libc::SYS_setuid, "setuid"),
        (libc::SYS_setresuid, "setresuid"),
        (libc::SYS_io_uring_setup, "io_uring_setup"),
        (libc::SYS_io_uring_register, "io_uring_register"),
        (libc::SYS_mprotect, "mprotect"),
        (libc::SYS_mmap, "mmap"),
        (libc::SYS_fork, "fork"),
        (libc::SYS_vfork, "vfork"),
        (libc::SYS_unshare, "unshare"),
        (libc::SYS_setns, "setns"),
        (libc::SYS_ioctl, "ioctl"),
        (libc::SYS_reboot, "reboot"),
        (libc::SYS_sched_getaffinity, "sched_getaffinity"),
        (libc::SYS_prlimit64, "prlimit64"),
        (libc::SYS_wait4, "wait4"),
        (libc::SYS_chdir, "chdir"),
        (libc::SYS_pivot_root, "pivot_root"),
        (libc::SYS_capset, "capset"),
    ];
    known
        .iter()
        .find(|(n, _)| *n == nr)
        .map(|(_, s)| s.to_string())
        .unwrap_or_else(|| format!("#{nr}"))
}
