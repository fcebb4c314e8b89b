//! Test-only jail probe (feature `jail-probe`, never in release builds): after entering the
//! jail, the worker does one thing an attacker who owns it would try, and reports the outcome
//! on its log as `PROBE <name>: failed (<why>)` or `PROBE <name>: SUCCEEDED`. An attempt that
//! seccomp forbids never reports: the worker is killed and the supervisor logs the syscall.
//!
//! Probes (`--jail-probe NAME[=ARG]`): `open-passwd`, `open-old-root=PATH`, `open-root`,
//! `exec-sh`, `socket-inet`, `socket-netlink`, `tcp-connect=PORT`, `kill=PID`, `ptrace=PID`,
//! `mount`, `setuid-root`, `io-uring-setup`, `io-uring-openat`, `io-uring-nop`,
//! `mprotect-exec`, `mmap-exec`, `nofile=N`, `threads=N`, `mlock`, `fsize=OFFSET`, `alloc=MIB`.
//!
//! `--jail-probe-without LAYER,...` leaves single layers out, so that a test can show a probe
//! that fails under the whole jail succeeding without the one layer that stopped it.
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

fn count_arg(arg: Option<&str>) -> io::Result<u64> {
    arg.and_then(|a| a.parse().ok())
        .ok_or_else(|| io::Error::other("this probe needs =N"))
}

/// A TCP connection to 127.0.0.1:`port` (Landlock's network rules refuse it).
fn tcp_connect(port: u16) -> io::Result<String> {
    std::net::TcpStream::connect(("127.0.0.1", port)).map(|s| {
        let local = s.local_addr().map(|a| a.to_string()).unwrap_or_default();
        std::mem::forget(s);
        format!("connected from {local}")
    })
}

fn pid_arg(arg: Option<&str>) -> io::Result<libc::pid_t> {
    arg.and_then(|a| a.parse().ok())
        .ok_or_else(|| io::Error::other("this probe needs =PID"))
}

/// An operation for the device's pre-made io_uring, which its restrictions must refuse.
pub enum RingProbe<'a> {
    /// IORING_OP_OPENAT of a path.
    OpenAt(&'a CStr),
    /// IORING_OP_NOP on the fixed file: not among the allowed opcodes, and it needs no file,
    /// so only the ring's restrictions can refuse it (with EACCES).
    Nop,
}

/// Submits an operation on the device's ring and returns the completion's result.
pub type UringProbe = Box<dyn FnMut(RingProbe<'_>) -> io::Result<i32>>;

/// What a device lends the probes.
#[derive(Default)]
pub struct ProbeKit {
    /// Its pre-made io_uring, if it has one.
    pub ring: Option<UringProbe>,
    /// Its backing file, if it has one (the RLIMIT_FSIZE probe writes past the limit).
    pub file: Option<std::os::fd::RawFd>,
}

/// The jail layers this test build leaves out (`--jail-probe-without`).
static WITHOUT: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();

/// Records the layers to leave out; before any worker starts.
pub fn set_without(layers: &[String]) {
    if !layers.is_empty() {
        log::warn!("PROBE: jail layers left out: {}", layers.join(", "));
    }
    let _ = WITHOUT.set(layers.to_vec());
}

/// Whether `layer` is to be left out.
pub fn without(layer: &str) -> bool {
    WITHOUT.get().is_some_and(|v| v.iter().any(|l| l == layer))
}

/// Runs probe `spec` in the jailed worker. `uring_openat` opens a path through the device's
/// ring (`None` if it has none). Returns the worker's exit code.
///
/// Kept whole on purpose: one match arm per probe, each a few lines of the attempt itself,
/// reads as the list of attacks it is.
pub fn run(spec: &str, kit: &mut ProbeKit) -> i32 {
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
        "io-uring-openat" | "io-uring-nop" => match kit.ring.as_mut() {
            Some(ring) if name == "io-uring-nop" => {
                ring(RingProbe::Nop).map(|r| format!("result {r}"))
            }
            Some(ring) => ring(RingProbe::OpenAt(passwd)).map(|fd| format!("fd {fd}")),
            None => Err(io::Error::other("no io_uring in this configuration")),
        },
        "tcp-connect" => arg
            .and_then(|a| a.parse::<u16>().ok())
            .ok_or_else(|| io::Error::other("needs =PORT"))
            .and_then(tcp_connect),
        "open-root" => {
            // SAFETY: a valid NUL-terminated path; the fd, if any, is leaked on purpose.
            let fd = unsafe { libc::open(c"/".as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY) };
            check(fd as libc::c_long).map(|fd| format!("fd {fd}"))
        }
        "nofile" => count_arg(arg).and_then(|n| {
            (0..n)
                // SAFETY: dup of stderr; the fds are leaked on purpose.
                .try_for_each(|_| check(unsafe { libc::dup(2) } as libc::c_long).map(|_| ()))
                .map(|_| format!("{n} fds"))
        }),
        "threads" => count_arg(arg).and_then(|n| {
            let mut held = Vec::new();
            for i in 0..n {
                let t = std::thread::Builder::new()
                    .spawn(std::thread::park)
                    .map_err(|e| io::Error::new(e.kind(), format!("thread {i}: {e}")))?;
                held.push(t);
            }
            Ok(format!("{n} threads"))
        }),
        "alloc" => count_arg(arg).map(|mib| {
            // Touch every page, so the memory is really the worker's (cgroup memory limit).
            let mut v: Vec<u8> = Vec::with_capacity((mib as usize) << 20);
            v.resize((mib as usize) << 20, 1);
            std::hint::black_box(&v);
            format!("{mib} MiB touched")
        }),
        "mlock" => {
            let page = [0u8; 4096];
            // SAFETY: locks a page of our own stack; unlocked when the process ends.
            check(unsafe { libc::mlock(page.as_ptr().cast(), page.len()) } as libc::c_long)
                .map(|_| "4 KiB locked".into())
        }
        "fsize" => match (kit.file, count_arg(arg)) {
            (Some(fd), Ok(at)) => {
                let b = [0u8; 512];
                // SAFETY: pwrite from a local buffer to the device's backing file.
                let r = unsafe { libc::pwrite(fd, b.as_ptr().cast(), b.len(), at as libc::off_t) };
                check(r as libc::c_long).map(|n| format!("{n} bytes at {at}"))
            }
            (None, _) => Err(io::Error::other("no backing file in this configuration")),
            (_, Err(e)) => Err(e),
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
