//! The jail every backend worker runs in.
//!
//! The order is the one the security model asks for: everything privileged (the listener, the
//! image or tap, the io_uring rings) is opened first by the caller; then [`enter`] takes away,
//! for good, everything the worker does not need to serve a frontend:
//!
//! - `namespace` mode: new user, mount, pid, net, ipc, uts and cgroup namespaces (made by the
//!   supervisor's `clone`), `/` made private, `pivot_root` into an empty tmpfs that is then
//!   remounted read-only, the old root detached; an unprivileged uid/gid outside the namespace;
//! - `chroot` mode (for hosts without user namespaces; needs root): `chroot` into an empty
//!   directory, then setgroups/setgid/setuid to the unprivileged user;
//! - in both: every fd not on the keep-list closed, environment cleared, tight rlimits,
//!   all capabilities dropped (effective, permitted, inheritable, ambient, bounding set),
//!   no_new_privs, not dumpable, a Landlock ruleset that grants no filesystem access, no TCP
//!   bind/connect and no signals or abstract sockets outside the domain, and a seccomp-bpf
//!   allow-list (see [`seccomp`]).
//!
//! Nothing here silently downgrades: a missing kernel feature is an error that names it.

pub mod cgroup;
pub mod seccomp;
pub mod supervisor;

#[cfg(feature = "jail-probe")]
pub mod probe;

use std::ffi::CString;
use std::io;
use std::os::fd::RawFd;

use log::warn;

/// Whether this test build leaves `layer` out (`--jail-probe-without`); never in a product
/// build.
pub fn layer_removed(layer: &str) -> bool {
    #[cfg(feature = "jail-probe")]
    return probe::without(layer);
    #[cfg(not(feature = "jail-probe"))]
    {
        let _ = layer;
        false
    }
}

/// How the worker is isolated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SandboxMode {
    /// New user/mount/pid/net/ipc/uts/cgroup namespaces and pivot_root into an empty root.
    Namespace,
    /// chroot into an empty directory and switch to an unprivileged user (needs root).
    Chroot,
    /// No isolation at all. For debugging only: prints a warning.
    None,
}

/// What seccomp does with a syscall that is not on the allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SeccompMode {
    /// Kill the worker (the supervisor logs the syscall and starts a fresh worker).
    Kill,
    /// Fail the syscall with SIGSYS delivered to the worker (it dies, reported like kill).
    Trap,
    /// Allow the syscall but log it: for bringing up a new kernel, libc or architecture.
    Log,
    /// No seccomp filter. For debugging only.
    None,
}

/// The flags every backend has for its jail.
#[derive(Debug, Clone, clap::Args)]
pub struct SandboxArgs {
    /// Isolation of the worker process: namespace (default), chroot (hosts without user
    /// namespaces; needs root) or none (debugging only).
    #[arg(long, value_enum, value_name = "MODE", default_value = "namespace")]
    pub sandbox: SandboxMode,

    /// Seccomp action for syscalls outside the allow-list: kill (default), trap, log (allow
    /// and log: for a new kernel or libc) or none.
    #[arg(long, value_enum, value_name = "ACTION", default_value = "kill")]
    pub seccomp: SeccompMode,

    /// Run the jailed worker as NAME, UID or UID:GID. Default: nobody (65534) when started
    /// as root, else the invoking user, in both cases without any capability.
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,

    /// Put each worker in a cgroup of its own with this memory limit (SIZE with K, M, G
    /// suffixes); the supervisor's cgroup must be delegated to it (cgroup v2, or v1).
    #[arg(long, value_name = "SIZE")]
    pub memory_max: Option<String>,

    /// Each worker's cgroup allows at most N tasks (threads, io_uring workers included).
    #[arg(long, value_name = "N")]
    pub pids_max: Option<u64>,

    /// Each worker's cgroup gets this CPU weight (1-10000; 100 is the default share).
    #[arg(long, value_name = "W")]
    pub cpu_weight: Option<u64>,
}

/// Why `--user` or `--sandbox` cannot work for this invoker.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("invalid --user '{0}': expected NAME, UID or UID:GID of an existing non-root user")]
    Invalid(String),
    #[error("--user '{0}': no such user")]
    NoSuchUser(String),
    #[error("--user '{0}': the worker must not run as root")]
    Root(String),
    #[error("--user '{0}': only root can run the worker as another user (running as uid {1})")]
    NotRoot(String, u32),
    #[error("--sandbox chroot needs root (chroot and setuid); use --sandbox namespace")]
    ChrootNeedsRoot,
    #[error("--memory-max")]
    MemoryMax(#[source] crate::size::SizeError),
    #[error("--cpu-weight {0} is out of range 1-10000")]
    CpuWeight(u64),
    #[error("--pids-max 0: a worker needs tasks")]
    PidsMax,
}

impl SandboxArgs {
    /// The per-worker cgroup limits asked for.
    pub fn cgroup_limits(&self) -> Result<cgroup::CgroupLimits, UserError> {
        let memory_max = match &self.memory_max {
            Some(s) => Some(crate::size::parse_size(s).map_err(UserError::MemoryMax)?),
            None => None,
        };
        if let Some(w) = self.cpu_weight.filter(|w| !(1..=10000).contains(w)) {
            return Err(UserError::CpuWeight(w));
        }
        if self.pids_max == Some(0) {
            return Err(UserError::PidsMax);
        }
        Ok(cgroup::CgroupLimits {
            memory_max,
            pids_max: self.pids_max,
            cpu_weight: self.cpu_weight,
        })
    }

    /// Resolves `--user` and checks that the mode can work for this invoker.
    pub fn check(&self) -> Result<Ids, UserError> {
        let ids = resolve_user(self.user.as_deref())?;
        // SAFETY: geteuid has no arguments.
        if self.sandbox == SandboxMode::Chroot && unsafe { libc::geteuid() } != 0 {
            return Err(UserError::ChrootNeedsRoot);
        }
        Ok(ids)
    }
}

/// A uid/gid pair as seen from the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ids {
    pub uid: u32,
    pub gid: u32,
}

/// The nobody-like id used when root starts a backend without --user.
pub const NOBODY: u32 = 65534;

/// Resolves `--user` (NAME, UID or UID:GID), or the default when absent.
pub fn resolve_user(user: Option<&str>) -> Result<Ids, UserError> {
    // SAFETY: geteuid/getegid have no arguments and cannot fail.
    let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let Some(s) = user else {
        return Ok(if euid == 0 {
            Ids {
                uid: NOBODY,
                gid: NOBODY,
            }
        } else {
            Ids {
                uid: euid,
                gid: egid,
            }
        });
    };
    let bad = || UserError::Invalid(s.to_owned());
    let ids = if let Some((u, g)) = s.split_once(':') {
        Ids {
            uid: u.parse().map_err(|_| bad())?,
            gid: g.parse().map_err(|_| bad())?,
        }
    } else if let Ok(uid) = s.parse::<u32>() {
        Ids { uid, gid: uid }
    } else {
        lookup_user(s).ok_or_else(|| UserError::NoSuchUser(s.to_owned()))?
    };
    if ids.uid == 0 || ids.gid == 0 {
        return Err(UserError::Root(s.to_owned()));
    }
    if euid != 0 && ids.uid != euid {
        return Err(UserError::NotRoot(s.to_owned(), euid));
    }
    Ok(ids)
}

fn lookup_user(name: &str) -> Option<Ids> {
    let c = CString::new(name).ok()?;
    // SAFETY: passwd is a plain C struct of integers and pointers, for which all-zero
    // (null pointers) is a valid value; getpwnam_r fills it in.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16384];
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: all pointers are valid for the sizes given; getpwnam_r fills pwd/buf.
    let r =
        unsafe { libc::getpwnam_r(c.as_ptr(), &mut pwd, buf.as_mut_ptr(), buf.len(), &mut out) };
    if r != 0 || out.is_null() {
        return None;
    }
    Some(Ids {
        uid: pwd.pw_uid,
        gid: pwd.pw_gid,
    })
}

/// Everything [`enter`] needs.
#[derive(Debug, Clone)]
pub struct JailConfig {
    pub mode: SandboxMode,
    pub seccomp: SeccompMode,
    /// The worker's ids on the host.
    pub ids: Ids,
    /// Directory to chroot into (chroot mode): empty, owned by root.
    pub chroot_dir: Option<std::path::PathBuf>,
    /// RLIMIT_NOFILE: fds the worker may hold (its own plus what a frontend sends).
    pub nofile: u64,
    /// RLIMIT_NPROC: tasks (threads) the worker may have.
    pub nproc: u64,
    /// RLIMIT_FSIZE: largest file offset the worker may write (the image size).
    pub fsize: u64,
    /// Where each worker's cgroup goes, if limits were asked for.
    pub cgroups: Option<cgroup::Cgroups>,
}

/// Why the jail could not be entered. Each names the missing piece.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("{what} failed: {err}{hint}")]
    Step {
        what: &'static str,
        err: io::Error,
        hint: &'static str,
    },
    #[error("Landlock: {0} (the kernel must have Landlock enabled: CONFIG_SECURITY_LANDLOCK and landlock in the lsm= boot list; run with --sandbox none to go without, at your own risk)")]
    Landlock(String),
    #[error("seccomp: {0}")]
    Seccomp(String),
}

fn step(what: &'static str, r: libc::c_long) -> Result<(), JailError> {
    if r < 0 {
        return Err(JailError::Step {
            what,
            err: io::Error::last_os_error(),
            hint: "",
        });
    }
    Ok(())
}

fn step_hint(what: &'static str, r: libc::c_long, hint: &'static str) -> Result<(), JailError> {
    if r < 0 {
        return Err(JailError::Step {
            what,
            err: io::Error::last_os_error(),
            hint,
        });
    }
    Ok(())
}

/// Closes every fd except `keep` (which must include what the worker still needs).
pub fn close_other_fds(keep: &[RawFd]) -> Result<(), JailError> {
    let mut keep: Vec<u32> = keep
        .iter()
        .filter(|&&f| f >= 0)
        .map(|&f| f as u32)
        .collect();
    keep.sort_unstable();
    keep.dedup();
    let mut next = 0u32;
    for &k in &keep {
        if k > next {
            // SAFETY: close_range has no memory arguments.
            step("close_range", unsafe {
                libc::syscall(libc::SYS_close_range, next, k - 1, 0)
            })?;
        }
        next = k + 1;
    }
    // SAFETY: as above.
    step("close_range", unsafe {
        libc::syscall(libc::SYS_close_range, next, u32::MAX, 0)
    })
}

fn set_rlimit(res: libc::__rlimit_resource_t, v: u64, what: &'static str) -> Result<(), JailError> {
    set_rlimits(res, v, v, what)
}

fn set_rlimits(
    res: libc::__rlimit_resource_t,
    soft: u64,
    hard: u64,
    what: &'static str,
) -> Result<(), JailError> {
    let lim = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: setrlimit reads the struct we pass.
    step(what, unsafe { libc::setrlimit(res, &lim) } as libc::c_long)
}

/// Keeps only the capabilities in `keep`: in the bounding, permitted and effective sets; the
/// ambient and inheritable sets are emptied. `keep_capabilities(0)` drops every capability.
fn keep_capabilities(keep: u64) -> Result<(), JailError> {
    drop_bounding_set(keep)?;
    // SAFETY: prctl with integer arguments.
    step("clearing ambient capabilities", unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    } as libc::c_long)?;
    capset(keep)
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAP_V3: u32 = 0x2008_0522; // _LINUX_CAPABILITY_VERSION_3

/// Sets effective = permitted = `keep` (as far as currently permitted), inheritable = none.
fn capset(keep: u64) -> Result<(), JailError> {
    let hdr = CapHeader {
        version: CAP_V3,
        pid: 0,
    };
    let mut cur = [CapData::default(); 2];
    // SAFETY: capget writes a v3 header's two data structs into `cur`.
    step("capget", unsafe {
        libc::syscall(libc::SYS_capget, &hdr as *const CapHeader, cur.as_mut_ptr())
    })?;
    let mut data = [CapData::default(); 2];
    for (i, d) in data.iter_mut().enumerate() {
        let k = (keep >> (32 * i)) as u32 & cur[i].permitted;
        d.effective = k;
        d.permitted = k;
    }
    // SAFETY: capset reads a v3 header and two data structs, which we pass.
    step("capset", unsafe {
        libc::syscall(libc::SYS_capset, &hdr as *const CapHeader, data.as_ptr())
    })
}

/// Capabilities the supervisor keeps: signalling its workers, which run as another uid
/// (KILL); writing their uid/gid maps (SETUID, SETGID); and what a chroot-mode worker, which
/// has no user namespace of its own, needs before it drops everything (SYS_CHROOT, SETPCAP,
/// SETUID, SETGID).
const SUPERVISOR_CAPS: &[u32] = &[5, 6, 7, 8, 18]; // KILL SETGID SETUID SETPCAP SYS_CHROOT

/// RLIMIT_FSIZE for workers started from now on, when a resize raised it above
/// [`JailConfig::fsize`] (set in the supervisor; forks inherit it).
pub static FSIZE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Narrows a privileged supervisor to what its job needs, after it opened the listener and the
/// image: every other capability leaves the bounding, permitted and effective
/// sets (CAP_SYS_ADMIN stays only where the kernel restricts user namespaces to it),
/// no_new_privs is set and the process is made non-dumpable. Does nothing when unprivileged.
pub fn restrict_supervisor(mode: SandboxMode) -> Result<(), JailError> {
    // SAFETY: geteuid has no arguments.
    if unsafe { libc::geteuid() } != 0 || mode == SandboxMode::None {
        return Ok(());
    }
    let mut keep: u64 = SUPERVISOR_CAPS.iter().fold(0, |m, &c| m | 1 << c);
    if mode == SandboxMode::Namespace && userns_needs_cap_sys_admin() {
        keep |= 1 << 21; // CAP_SYS_ADMIN
    }
    keep_capabilities(keep)?;
    // SAFETY: prctl with integer arguments.
    let r = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    step("no_new_privs", r as libc::c_long)?;
    // SAFETY: prctl with integer arguments.
    let r = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    step("dumpable", r as libc::c_long)
}

/// Whether this kernel lets only CAP_SYS_ADMIN create user namespaces (Debian's
/// kernel.unprivileged_userns_clone=0, Ubuntu's AppArmor restriction).
fn userns_needs_cap_sys_admin() -> bool {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_string())
            .ok()
    };
    read("/proc/sys/kernel/unprivileged_userns_clone").as_deref() == Some("0")
        || read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns").as_deref() == Some("1")
}

fn landlock() -> Result<(), JailError> {
    use landlock::{
        Access, AccessFs, AccessNet, CompatLevel, Compatible, Ruleset, RulesetAttr, RulesetStatus,
        Scope, ABI,
    };
    let abi = ABI::V6;
    let status = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(abi))
        .and_then(|r| r.handle_access(AccessNet::from_all(abi)))
        .and_then(|r| r.scope(Scope::from_all(abi)))
        .and_then(|r| r.create())
        .and_then(|r| landlock::RulesetCreatedAttr::no_new_privs(r, true).restrict_self())
        .map_err(|e| JailError::Landlock(e.to_string()))?;
    match status.ruleset {
        RulesetStatus::FullyEnforced => Ok(()),
        RulesetStatus::PartiallyEnforced => {
            // Filesystem access is always fully handled (ABI 1 covers open/exec); what may be
            // missing on an older kernel is the network or scope part.
            warn!("Landlock is only partially enforced on this kernel (ABI < 6): no network/signal scoping");
            Ok(())
        }
        RulesetStatus::NotEnforced => Err(JailError::Landlock(
            "not enforced: the kernel has no Landlock".into(),
        )),
    }
}

/// In namespace mode, before anything else: settle on the unprivileged ids, which the
/// supervisor mapped to themselves (`ID ID 1`), so the worker is not root even inside its own
/// user namespace (uid 0 does not exist there) and keeps, until they are dropped below, only the
/// capabilities the namespace's creator gets. The supplementary groups inherited from the host
/// are dropped.
fn become_namespace_user(ids: Ids) -> Result<(), JailError> {
    // SAFETY: plain syscalls with integer arguments.
    unsafe {
        step(
            "setresgid in the user namespace",
            libc::setresgid(ids.gid, ids.gid, ids.gid) as libc::c_long,
        )?;
        // Allowed when the supervisor was privileged; otherwise setgroups is denied by design
        // and the groups are the invoking user's own.
        if libc::setgroups(0, std::ptr::null()) < 0
            && io::Error::last_os_error().raw_os_error() != Some(libc::EPERM)
        {
            return step("setgroups", -1);
        }
        step(
            "setresuid in the user namespace",
            libc::setresuid(ids.uid, ids.uid, ids.uid) as libc::c_long,
        )
    }
}

fn c(s: &str) -> CString {
    CString::new(s).expect("no NUL in a constant path")
}

/// Mount namespace: private propagation, an empty tmpfs as the new root, the old root gone.
fn pivot_into_empty_root() -> Result<(), JailError> {
    let none = std::ptr::null::<libc::c_char>();
    // SAFETY: mount/chdir/pivot_root/umount2 with valid NUL-terminated strings or null.
    unsafe {
        step_hint(
            "making / private",
            libc::mount(
                none,
                c("/").as_ptr(),
                none,
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) as libc::c_long,
            " (is this a new mount namespace?)",
        )?;
        // Any existing directory works as the mount point: the tmpfs hides it only inside
        // this mount namespace.
        let mut target = None;
        for cand in ["/tmp", "/mnt", "/run", "/proc"] {
            let t = c(cand);
            let r = libc::mount(
                c("vhostbox").as_ptr(),
                t.as_ptr(),
                c("tmpfs").as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                c("size=4k,nr_inodes=2,mode=0555").as_ptr().cast(),
            );
            if r == 0 {
                target = Some(t);
                break;
            }
        }
        let Some(t) = target else {
            return step("mounting the empty root tmpfs", -1);
        };
        step(
            "chdir to the new root",
            libc::chdir(t.as_ptr()) as libc::c_long,
        )?;
        let dot = c(".");
        step(
            "pivot_root",
            libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()),
        )?;
        step(
            "detaching the old root",
            libc::umount2(dot.as_ptr(), libc::MNT_DETACH) as libc::c_long,
        )?;
        step("chdir /", libc::chdir(c("/").as_ptr()) as libc::c_long)?;
        step(
            "remounting the root read-only",
            libc::mount(
                none,
                c("/").as_ptr(),
                none,
                libc::MS_REMOUNT
                    | libc::MS_BIND
                    | libc::MS_RDONLY
                    | libc::MS_NOSUID
                    | libc::MS_NODEV
                    | libc::MS_NOEXEC,
                std::ptr::null(),
            ) as libc::c_long,
        )?;
        let name = b"vhostbox";
        step(
            "sethostname",
            libc::sethostname(name.as_ptr().cast(), name.len()) as libc::c_long,
        )?;
    }
    Ok(())
}

fn chroot_into(dir: &std::path::Path, ids: Ids) -> Result<(), JailError> {
    let d = CString::new(dir.as_os_str().as_encoded_bytes()).map_err(|_| JailError::Step {
        what: "chroot",
        err: io::Error::from(io::ErrorKind::InvalidInput),
        hint: "",
    })?;
    // SAFETY: chdir/chroot with valid strings; set*id with integers.
    unsafe {
        step(
            "chdir to the chroot directory",
            libc::chdir(d.as_ptr()) as libc::c_long,
        )?;
        step_hint(
            "chroot",
            libc::chroot(c(".").as_ptr()) as libc::c_long,
            " (--sandbox chroot needs root)",
        )?;
        step("chdir /", libc::chdir(c("/").as_ptr()) as libc::c_long)?;
        // The bounding set must go while we still have CAP_SETPCAP.
        drop_bounding_set(0)?;
        step(
            "setgroups",
            libc::setgroups(0, std::ptr::null()) as libc::c_long,
        )?;
        step(
            "setresgid",
            libc::setresgid(ids.gid, ids.gid, ids.gid) as libc::c_long,
        )?;
        step(
            "setresuid",
            libc::setresuid(ids.uid, ids.uid, ids.uid) as libc::c_long,
        )?;
    }
    Ok(())
}

/// Drops every capability not in `keep` from the bounding set. Capabilities already gone are
/// skipped, so this also succeeds after an earlier call took CAP_SETPCAP away.
fn drop_bounding_set(keep: u64) -> Result<(), JailError> {
    for cap in 0..64u32 {
        if keep & (1 << cap) != 0 {
            continue;
        }
        // SAFETY: prctl with integer arguments.
        match unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap, 0, 0, 0) } {
            1 => {}
            _ => continue, // not held, or beyond the kernel's last capability (EINVAL)
        }
        // SAFETY: prctl with integer arguments.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        step("dropping the capability bounding set", r as libc::c_long)?;
    }
    Ok(())
}

/// Changing the effective uid/gid clears PR_SET_PDEATHSIG, so set it again: a worker must
/// never outlive its supervisor (it would keep serving a socket nobody manages, and its rings).
/// If the supervisor died in between, the report pipe has no reader left: exit.
fn rearm_parent_death_signal() {
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
    let fd = seccomp::report_fd();
    if fd >= 0 {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: poll on one initialised pollfd with a zero timeout.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        if n > 0 && p.revents & (libc::POLLERR | libc::POLLHUP) != 0 {
            // SAFETY: ends this process; nothing to clean up.
            unsafe { libc::_exit(1) };
        }
    }
}

fn clear_env() {
    // SAFETY: called while the worker is single-threaded; clearenv only frees libc's copy.
    unsafe { libc::clearenv() };
}

/// Enters the jail. Call in the worker, single-threaded, after everything privileged is open.
/// `keep` lists the fds to keep (0-2 are always kept, for logging). `rules` is the backend's
/// seccomp allow-list.
pub fn enter(cfg: &JailConfig, keep: &[RawFd], rules: seccomp::Rules) -> Result<(), JailError> {
    if cfg.mode == SandboxMode::None {
        return Ok(());
    }
    let mut k = vec![0, 1, 2];
    k.extend_from_slice(keep);
    match cfg.mode {
        SandboxMode::Namespace => {
            become_namespace_user(cfg.ids)?;
            close_other_fds(&k)?;
            pivot_into_empty_root()?;
        }
        SandboxMode::Chroot => {
            close_other_fds(&k)?;
            let dir = cfg.chroot_dir.as_deref().ok_or(JailError::Step {
                what: "chroot",
                err: io::Error::from(io::ErrorKind::NotFound),
                hint: " (no directory)",
            })?;
            chroot_into(dir, cfg.ids)?;
        }
        SandboxMode::None => unreachable!(),
    }
    rearm_parent_death_signal();
    clear_env();
    if !layer_removed("rlimit-nofile") {
        set_rlimit(libc::RLIMIT_NOFILE, cfg.nofile, "RLIMIT_NOFILE")?;
    }
    // RLIMIT_NPROC counts every task of the uid in its user namespace: in namespace mode that is
    // this worker alone; in chroot mode other processes of the same host uid (other backends
    // running as nobody) would count too, so it is left alone there.
    if cfg.mode == SandboxMode::Namespace && !layer_removed("rlimit-nproc") {
        set_rlimit(libc::RLIMIT_NPROC, cfg.nproc, "RLIMIT_NPROC")?;
    }
    if !layer_removed("rlimit-fsize") {
        // The soft limit is the one enforced; the hard one is left open so that the
        // supervisor can move the soft one when the disk is resized (prlimit on its child,
        // which needs no capability below the hard limit). The worker itself cannot: its
        // seccomp list has neither setrlimit nor prlimit64.
        let soft = cfg
            .fsize
            .max(FSIZE.load(std::sync::atomic::Ordering::Relaxed));
        set_rlimits(
            libc::RLIMIT_FSIZE,
            soft,
            libc::RLIM_INFINITY,
            "RLIMIT_FSIZE",
        )?;
    }
    // A write past RLIMIT_FSIZE then fails with EFBIG (the guest gets IOERR) instead of killing
    // the worker with SIGXFSZ.
    // SAFETY: setting a signal's disposition to SIG_IGN.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    set_rlimit(libc::RLIMIT_CORE, 0, "RLIMIT_CORE")?;
    if !layer_removed("rlimit-memlock") {
        set_rlimit(libc::RLIMIT_MEMLOCK, 0, "RLIMIT_MEMLOCK")?;
    }
    keep_capabilities(0)?;
    // SAFETY: prctl with integer arguments.
    unsafe {
        step(
            "no_new_privs",
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) as libc::c_long,
        )?;
        // Left out (test builds), the worker is made dumpable outright: it would otherwise
        // stay non-dumpable from the supervisor and from the id change.
        let dumpable = libc::c_ulong::from(layer_removed("dumpable"));
        step(
            "PR_SET_DUMPABLE",
            libc::prctl(libc::PR_SET_DUMPABLE, dumpable, 0, 0, 0) as libc::c_long,
        )?;
    }
    if !layer_removed("landlock") {
        landlock()?;
    }
    seccomp::install(cfg.seccomp, rules)
}
