//! Test-only jail probe (feature `jail-probe`, never in release builds): after entering the
//! jail, the worker does one thing an attacker who owns it would try, and reports the outcome
//! on its log as `PROBE <name>: failed (<why>)` or `PROBE <name>: SUCCEEDED`. An attempt that
//! seccomp forbids never reports: the worker is killed and the supervisor logs the syscall.
//!
//! Probes (`--jail-probe NAME[=ARG]`): `open-passwd`, `open-old-root=PATH`, `exec-sh`,
//! `socket-inet`, `socket-netlink`, `kill=PID`, `ptrace=PID`, `mount`, `setuid-root`,
//! `io-uring-setup`, `io-uring-openat`, `mprotect-exec`, `mmap-exec`.
//!
//! One probe fires while serving instead: `seccomp-after=N` makes every worker serve normally
//! and, after a random number of requests between N/2 and 3N/2, call socket(AF_INET) from the
//! queue thread, which its seccomp filter answers by killing it mid-I/O. Tests use it to show
//! that a worker killed by its own filter recovers like any other crash ([`arm_crash`],
//! [`tick`]).

use std::ffi::{CStr, CString};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

/// Requests left before the armed worker makes its forbidden call; 0: not armed.
static CRASH_IN: AtomicU64 = AtomicU64::new(0);

/// If `spec` is `seccomp-after=N`, arms this worker to die after about N requests and returns
/// true: the worker then serves instead of running a probe.
pub fn arm_crash(spec: &str) -> bool {
    let Some(n) = spec
        .strip_prefix("seccomp-after=")
        .and_then(|n| n.parse::<u64>().ok())
        .filter(|&n| n > 0)
    else {
        return false;
    };
    let mut r = [0u8; 8];
    // SAFETY: getrandom writes at most 8 bytes into `r`.
    unsafe { libc::getrandom(r.as_mut_ptr().cast(), r.len(), 0) };
    let at = n / 2 + 1 + u64::from_ne_bytes(r) % n;
    log::warn!("PROBE seccomp-after: this worker makes a forbidden call after {at} requests");
    CRASH_IN.store(at, Ordering::Relaxed);
    true
}

/// Counts one request; the armed worker's last one calls socket(AF_INET), which is not allowed.
pub fn tick() {
    let left = CRASH_IN.load(Ordering::Relaxed);
    if left == 0 {
        return;
    }
    if left == 1 {
        // SAFETY: socket with integer arguments; seccomp kills the process before it returns.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        log::error!("PROBE seccomp-after: socket(AF_INET) returned {fd}: the filter let it pass");
        // SAFETY: _exit ends the process without unwinding.
        unsafe { libc::_exit(EXIT_PROBE_SUCCEEDED) };
    }
    CRASH_IN.store(left - 1, Ordering::Relaxed);
}

/// Exit code of a probe whose attempt succeeded (the jail failed).
pub const EXIT_PROBE_SUCCEEDED: i32 = 4;

fn check(r: libc::c_long) -> io::Result<libc::c_long> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn open(path: &str) -> io::Result<libc::c_long> {
    let p = CString::new(path).map_err(io::Error::other)?;
    // SAFETY: a valid NUL-terminated path; the fd, if any, is leaked on purpose.
    check(unsafe { libc::open(p.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) } as libc::c_long)
}

fn pid_arg(arg: Option<&str>) -> io::Result<libc::pid_t> {
    arg.and_then(|a| a.parse().ok())
        .ok_or_else(|| io::Error::other("this probe needs =PID"))
}

/// Submits an OPENAT of a path on a ring the device made before the jail; returns the fd.
pub type UringOpen = Box<dyn FnMut(&CStr) -> io::Result<i32>>;

/// Runs probe `spec` in the jailed worker. `uring_openat` opens a path through the device's
/// ring (`None` if it has none). Returns the worker's exit code.
///
/// Kept whole on purpose: one match arm per probe, each a few lines of the attempt itself,
/// reads as the list of attacks it is.
pub fn run(spec: &str, uring_openat: Option<&mut UringOpen>) -> i32 {
    let (name, arg) = match spec.split_once('=') {
        Some((n, a)) => (n, Some(a)),
        None => (spec, None),
    };
    let passwd = c"/etc/passwd";
    let outcome: io::Result<String> = match name {
        "open-passwd" => open("/etc/passwd").map(|fd| format!("fd {fd}")),
        "open-old-root" => match arg {
            Some(p) => open(p).map(|fd| format!("fd {fd}")),
            None => Err(io::Error::other("needs =PATH")),
        },
        "exec-sh" => {
            let argv = [c"/bin/sh".as_ptr(), std::ptr::null()];
            let envp = [std::ptr::null()];
            // SAFETY: NULL-terminated argv/envp of valid C strings; returns only on failure.
            check(unsafe { libc::execve(argv[0], argv.as_ptr(), envp.as_ptr()) } as libc::c_long)
                .map(|_| "exec returned".into())
        }
        "socket-inet" => {
            // SAFETY: socket with integer arguments; the fd, if any, is leaked on purpose.
            let r = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            check(r as libc::c_long).map(|fd| format!("fd {fd}"))
        }
        "socket-netlink" => check(
            // SAFETY: as above.
            unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_ROUTE) }
                as libc::c_long,
        )
        .map(|fd| format!("fd {fd}")),
        "kill" => pid_arg(arg).and_then(|pid| {
            // SAFETY: kill with integer arguments.
            check(unsafe { libc::kill(pid, libc::SIGKILL) } as libc::c_long)
                .map(|_| format!("killed {pid}"))
        }),
        "ptrace" => pid_arg(arg).and_then(|pid| {
            // SAFETY: ptrace(PTRACE_ATTACH) with integer arguments and null pointers.
            check(unsafe {
                libc::ptrace(
                    libc::PTRACE_ATTACH,
                    pid,
                    std::ptr::null_mut::<libc::c_void>(),
                    std::ptr::null_mut::<libc::c_void>(),
                )
            })
            .map(|_| format!("attached to {pid}"))
        }),
        "mount" => {
            // SAFETY: valid C strings and a null data pointer.
            check(unsafe {
                libc::mount(
                    c"none".as_ptr(),
                    c"/".as_ptr(),
                    c"tmpfs".as_ptr(),
                    0,
                    std::ptr::null(),
                )
            } as libc::c_long)
            .map(|_| "mounted a tmpfs on /".into())
        }
        // SAFETY: setuid with an integer argument.
        "setuid-root" => check(unsafe { libc::setuid(0) } as libc::c_long).map(|_| "uid 0".into()),
        "io-uring-setup" => {
            // SAFETY: a zeroed io_uring_params is the documented default input.
            let mut p: [u8; 120] = [0; 120];
            // SAFETY: io_uring_setup(entries, params) with a buffer the size of the params struct.
            check(unsafe { libc::syscall(libc::SYS_io_uring_setup, 8u32, p.as_mut_ptr()) })
                .map(|fd| format!("fd {fd}"))
        }
        "io-uring-openat" => match uring_openat {
            Some(open) => open(passwd).map(|fd| format!("fd {fd}")),
            None => Err(io::Error::other("no io_uring in this configuration")),
        },
        "mprotect-exec" | "mmap-exec" => {
            let exec = name == "mmap-exec";
            let prot0 = if exec {
                libc::PROT_READ | libc::PROT_EXEC
            } else {
                libc::PROT_READ | libc::PROT_WRITE
            };
            // SAFETY: an anonymous private mapping; it is never dereferenced.
            let m = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    prot0,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if m == libc::MAP_FAILED {
                Err(io::Error::last_os_error())
            } else if exec {
                Ok("executable mapping".into())
            } else {
                // SAFETY: changes the protection of the page mapped above.
                check(
                    unsafe { libc::mprotect(m, 4096, libc::PROT_READ | libc::PROT_EXEC) }
                        as libc::c_long,
                )
                .map(|_| "page made executable".into())
            }
        }
        _ => {
            log::error!("PROBE {name}: unknown probe");
            return 2;
        }
    };
    match outcome {
        Ok(what) => {
            log::error!("PROBE {name}: SUCCEEDED ({what})");
            EXIT_PROBE_SUCCEEDED
        }
        Err(e) => {
            log::warn!("PROBE {name}: failed ({e})");
            0
        }
    }
}
