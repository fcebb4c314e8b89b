//! The process's one listening socket: bound once from `--socket-path` (before any sandbox
//! could forbid it), inherited with `--fd`, or passed by systemd's socket activation
//! (`LISTEN_FDS`), and kept for the whole life of the process. Every worker accepts its one
//! frontend on it; the path is never bound again (rebinding races with the VMM and is
//! impossible in a jail).

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// The name a socket unit gives the vhost-user socket (`FileDescriptorName=vhost-user`) when it
/// passes more than one.
pub const ACTIVATED_NAME: &str = "vhost-user";

/// Errors of the listener.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("socket path {0} is busy: another process is listening on it")]
    SocketBusy(PathBuf),
    #[error("socket path {0} exists and is not a socket")]
    NotASocket(PathBuf),
    #[error("cannot remove stale socket {0}")]
    RemoveStale(PathBuf, #[source] io::Error),
    #[error("cannot bind socket {0}")]
    Bind(PathBuf, #[source] io::Error),
    #[error("cannot set the {what} of socket {path}")]
    Perms {
        path: PathBuf,
        what: &'static str,
        #[source]
        err: io::Error,
    },
    #[error("--fd {0} is not a listening unix stream socket")]
    BadFd(RawFd),
    #[error("invalid --fd {0}")]
    NegativeFd(RawFd),
    #[error("exactly one of --socket-path and --fd is required (or socket activation)")]
    NoSocket,
    #[error("--socket-group '{0}': no such group")]
    NoSuchGroup(String),
    #[error("--socket-mode '{0}': expected octal permission bits such as 0660")]
    BadMode(String),
    #[error("socket activation: {0}")]
    Activation(String),
    #[error("--socket-group and --socket-mode apply to the socket --socket-path creates")]
    PermsNeedPath,
}

/// Who may connect to a socket this process binds: `--socket-group` and `--socket-mode`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SocketPerms {
    /// Group of the socket file (the process must be root or a member).
    pub gid: Option<u32>,
    /// Permission bits of the socket file; connecting needs write permission.
    pub mode: Option<u32>,
}

/// Where the listener comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenOn {
    /// `--socket-path PATH`: bound here, removed at exit.
    Path(PathBuf),
    /// `--fd N`: inherited.
    Fd(RawFd),
    /// systemd socket activation: fd `fd`, named `name` (`LISTEN_FDNAMES`).
    Activated { fd: RawFd, name: String },
}

impl ListenOn {
    /// From the two mutually exclusive flags.
    pub fn from_args(socket_path: Option<PathBuf>, fd: Option<RawFd>) -> Result<Self, ListenError> {
        match (socket_path, fd) {
            (Some(p), None) => Ok(Self::Path(p)),
            (None, Some(fd)) if fd >= 0 => Ok(Self::Fd(fd)),
            (None, Some(fd)) => Err(ListenError::NegativeFd(fd)),
            _ => Err(ListenError::NoSocket),
        }
    }
}

/// The socket systemd passed this process, if it did (`LISTEN_PID` is ours): the only one, or
/// the one named [`ACTIVATED_NAME`].
pub fn activated_socket() -> Result<Option<(RawFd, String)>, ListenError> {
    let fds: Vec<(RawFd, String)> = sd_notify::listen_fds_with_names()
        .map_err(|e| ListenError::Activation(e.to_string()))?
        .collect();
    match fds.len() {
        0 => Ok(None),
        1 => Ok(fds.into_iter().next()),
        n => fds
            .into_iter()
            .find(|(_, name)| name == ACTIVATED_NAME)
            .map(Some)
            .ok_or_else(|| {
                ListenError::Activation(format!(
                    "LISTEN_FDS passes {n} sockets and none is named '{ACTIVATED_NAME}' \
                     (FileDescriptorName= in the socket unit)"
                ))
            }),
    }
}

/// The flags that say where the listener comes from.
#[derive(Debug, Clone, clap::Args)]
pub struct ListenArgs {
    /// Unix socket path to listen on for the frontend (created; a stale socket is replaced).
    /// Required unless --fd is given or systemd passes the socket (LISTEN_FDS), which then
    /// takes precedence.
    #[arg(long, value_name = "PATH", conflicts_with = "fd")]
    pub socket_path: Option<PathBuf>,

    /// Use the already-listening unix socket on file descriptor N instead of --socket-path
    /// (a launcher that bound it).
    #[arg(long, value_name = "N")]
    pub fd: Option<RawFd>,

    /// Group of the socket file --socket-path creates (NAME or GID), e.g. the group QEMU runs
    /// as under libvirt; combine with --socket-mode 0660.
    #[arg(long, value_name = "GROUP", requires = "socket_path")]
    pub socket_group: Option<String>,

    /// Permission bits of the socket file --socket-path creates, in octal (default: 0777
    /// less the umask). A frontend needs write permission to connect.
    #[arg(long, value_name = "MODE", requires = "socket_path")]
    pub socket_mode: Option<String>,
}

impl ListenArgs {
    /// Where to listen: socket activation first, then the flags.
    pub fn to_listen_on(&self) -> Result<ListenOn, ListenError> {
        if let Some((fd, name)) = activated_socket()? {
            return Ok(ListenOn::Activated { fd, name });
        }
        ListenOn::from_args(self.socket_path.clone(), self.fd)
    }

    /// `--socket-group` and `--socket-mode`, resolved.
    pub fn perms(&self) -> Result<SocketPerms, ListenError> {
        if self.socket_path.is_none() && (self.socket_group.is_some() || self.socket_mode.is_some())
        {
            return Err(ListenError::PermsNeedPath);
        }
        let gid = match &self.socket_group {
            Some(g) => Some(
                g.parse::<u32>()
                    .ok()
                    .or_else(|| lookup_group(g))
                    .ok_or_else(|| ListenError::NoSuchGroup(g.clone()))?,
            ),
            None => None,
        };
        let mode = match &self.socket_mode {
            Some(m) => Some(parse_mode(m).ok_or_else(|| ListenError::BadMode(m.clone()))?),
            None => None,
        };
        Ok(SocketPerms { gid, mode })
    }
}

/// Octal permission bits, 0-0777 (with or without a leading 0 or 0o).
fn parse_mode(s: &str) -> Option<u32> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    if digits.is_empty() || digits.len() > 4 {
        return None;
    }
    u32::from_str_radix(digits, 8).ok().filter(|m| *m <= 0o777)
}

fn lookup_group(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: group is a plain C struct of integers and pointers, for which all-zero (null
    // pointers) is a valid value; getgrnam_r fills it in.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 65536];
    let mut out: *mut libc::group = std::ptr::null_mut();
    // SAFETY: all pointers are valid for the sizes given; getgrnam_r fills grp/buf.
    let r =
        unsafe { libc::getgrnam_r(c.as_ptr(), &mut grp, buf.as_mut_ptr(), buf.len(), &mut out) };
    (r == 0 && !out.is_null()).then_some(grp.gr_gid)
}

/// Why the socket file could not be removed at exit.
#[derive(Debug, thiserror::Error)]
#[error("cannot remove socket {0}; remove it by hand")]
pub struct RemoveError(pub PathBuf, #[source] pub io::Error);

/// The process's one listening socket.
pub struct VhostListener {
    listener: UnixListener,
    /// Set when this process bound the path and so must remove it on exit.
    owned_path: Option<PathBuf>,
    /// The socket outlives this process (it is in systemd's fd store): keep the path.
    keep_path: bool,
}

impl VhostListener {
    /// Binds `path` with `perms`. A stale socket file nobody listens on is replaced; a live
    /// one is an error.
    pub fn bind(path: &Path, perms: SocketPerms) -> Result<Self, ListenError> {
        match fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                if UnixStream::connect(path).is_ok() {
                    return Err(ListenError::SocketBusy(path.to_owned()));
                }
                fs::remove_file(path).map_err(|e| ListenError::RemoveStale(path.to_owned(), e))?;
            }
            Ok(_) => return Err(ListenError::NotASocket(path.to_owned())),
            Err(_) => {}
        }
        // The path must only appear once the socket listens: bind(2) creates it before
        // listen(2), and a frontend started as soon as the path exists would get ECONNREFUSED
        // in between. So bind a temporary name next to it and rename it into place.
        let tmp = temp_name(path);
        let l = match &tmp {
            Some(t) => {
                let _ = fs::remove_file(t);
                let l = UnixListener::bind(t).map_err(|e| ListenError::Bind(path.to_owned(), e))?;
                // Group and mode before the name appears: no frontend sees it half set up.
                if let Err(e) = set_perms(t, perms, path) {
                    let _ = fs::remove_file(t);
                    return Err(e);
                }
                if let Err(e) = fs::rename(t, path) {
                    let _ = fs::remove_file(t);
                    return Err(ListenError::Bind(path.to_owned(), e));
                }
                l
            }
            None => {
                let l =
                    UnixListener::bind(path).map_err(|e| ListenError::Bind(path.to_owned(), e))?;
                if let Err(e) = set_perms(path, perms, path) {
                    let _ = fs::remove_file(path);
                    return Err(e);
                }
                l
            }
        };
        Ok(Self {
            listener: l,
            owned_path: Some(path.to_owned()),
            keep_path: false,
        })
    }

    /// Binds the path or takes over the fd.
    pub fn open(on: &ListenOn, perms: SocketPerms) -> Result<Self, ListenError> {
        match on {
            ListenOn::Path(p) => Self::bind(p, perms),
            ListenOn::Fd(fd) => Self::from_fd(*fd),
            ListenOn::Activated { fd, name } => Self::from_fd(*fd).map_err(|_| {
                ListenError::Activation(format!(
                    "fd {fd} ('{name}') is not a listening unix stream socket \
                     (ListenStream= in the socket unit)"
                ))
            }),
        }
    }

    /// Takes over an inherited listening socket (systemd socket activation, libvirt, a test).
    pub fn from_fd(fd: RawFd) -> Result<Self, ListenError> {
        let ok = sockopt(fd, libc::SO_DOMAIN) == Some(libc::AF_UNIX)
            && sockopt(fd, libc::SO_TYPE) == Some(libc::SOCK_STREAM)
            && sockopt(fd, libc::SO_ACCEPTCONN) == Some(1);
        if !ok {
            return Err(ListenError::BadFd(fd));
        }
        // SAFETY: the fd was checked above to be an open listening unix socket; the process
        // inherited it for this purpose and nothing else in the process owns it.
        let l = unsafe { UnixListener::from_raw_fd(fd) };
        // SAFETY: FD_CLOEXEC on a valid fd we now own; keeps it from leaking into children.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        Ok(Self {
            listener: l,
            owned_path: None,
            keep_path: false,
        })
    }

    /// The raw fd, for the sandbox's keep-list.
    pub fn raw_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    /// Whether this process bound the path (and will remove it when dropped).
    pub fn path(&self) -> Option<&Path> {
        self.owned_path.as_deref()
    }

    /// Takes the next pending frontend connection (None if it went away meanwhile).
    pub fn accept(&self) -> io::Result<Option<UnixStream>> {
        loop {
            match self.listener.accept() {
                Ok((s, _)) => return Ok(Some(s)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::ConnectionAborted
                    ) =>
                {
                    return Ok(None)
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl VhostListener {
    /// Removes the socket file this process bound (nothing for an inherited socket). A socket
    /// left behind is an error the caller must report: the next start would find a stale
    /// socket it may not be able to replace either.
    pub fn remove(mut self) -> Result<(), RemoveError> {
        if self.keep_path {
            return Ok(());
        }
        match self.owned_path.take() {
            Some(p) => match fs::remove_file(&p) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(RemoveError(p, e)),
            },
            None => Ok(()),
        }
    }

    /// Who can connect to the socket this process bound, for the log: one line, and a warning
    /// when only its owner can.
    pub fn access_summary(&self) -> Option<(String, Option<String>)> {
        let p = self.owned_path.as_deref()?;
        let m = fs::metadata(p).ok()?;
        let mode = m.permissions().mode() & 0o777;
        let line = format!(
            "listening on {} (mode {mode:04o}, owner {}:{})",
            p.display(),
            m.uid(),
            m.gid()
        );
        let warn = (mode & 0o022 == 0).then(|| {
            format!(
                "only uid {} can connect to {} (mode {mode:04o}): a frontend running as another \
                 user (libvirt runs QEMU as libvirt-qemu) gets \"Permission denied\"; use \
                 --socket-group GROUP --socket-mode 0660",
                m.uid(),
                p.display()
            )
        });
        Some((line, warn))
    }
}

impl VhostListener {
    /// The listening socket lives on after this process (systemd's fd store passes it to
    /// the next one): leave the path for it at exit.
    pub fn keep_path_at_exit(&mut self) {
        self.keep_path = true;
    }
}

impl Drop for VhostListener {
    fn drop(&mut self) {
        if self.keep_path {
            return;
        }
        if let Some(p) = &self.owned_path {
            let _ = fs::remove_file(p);
        }
    }
}

fn set_perms(file: &Path, perms: SocketPerms, path: &Path) -> Result<(), ListenError> {
    let err = |what, err| ListenError::Perms {
        path: path.to_owned(),
        what,
        err,
    };
    if let Some(gid) = perms.gid {
        std::os::unix::fs::chown(file, None, Some(gid)).map_err(|e| err("group", e))?;
    }
    if let Some(mode) = perms.mode {
        fs::set_permissions(file, fs::Permissions::from_mode(mode)).map_err(|e| err("mode", e))?;
    }
    Ok(())
}

/// `.NAME.PID.tmp` in the socket's directory, if that still fits in a sockaddr_un.
fn temp_name(path: &Path) -> Option<std::path::PathBuf> {
    let name = path.file_name()?.to_str()?;
    let t = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    (t.as_os_str().len() < 108).then_some(t)
}

fn sockopt(fd: RawFd, opt: libc::c_int) -> Option<libc::c_int> {
    let mut val: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `val`, a c_int we own.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&mut val as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    (r == 0).then_some(val)
}
