//! The process's one listening socket: bound once from `--socket-path` (before any sandbox
//! could forbid it) or inherited with `--fd`, and kept for the whole life of the process. Every
//! worker accepts its one frontend on it; the path is never bound again (rebinding races with
//! the VMM and is impossible in a jail).

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

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
    #[error("--fd {0} is not a listening unix stream socket")]
    BadFd(RawFd),
    #[error("invalid --fd {0}")]
    NegativeFd(RawFd),
    #[error("exactly one of --socket-path and --fd is required")]
    NoSocket,
}

/// Where the listener comes from: `--socket-path PATH` or `--fd N`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenOn {
    Path(PathBuf),
    Fd(RawFd),
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

/// The flags that say where the listener comes from.
#[derive(Debug, Clone, clap::Args)]
pub struct ListenArgs {
    /// Unix socket path to listen on for the frontend (created; a stale socket is replaced).
    #[arg(
        long,
        value_name = "PATH",
        required_unless_present = "fd",
        conflicts_with = "fd"
    )]
    pub socket_path: Option<PathBuf>,

    /// Use the already-listening unix socket on file descriptor N instead of --socket-path
    /// (socket activation, or a launcher that bound it).
    #[arg(long, value_name = "N")]
    pub fd: Option<RawFd>,
}

impl ListenArgs {
    pub fn to_listen_on(&self) -> Result<ListenOn, ListenError> {
        ListenOn::from_args(self.socket_path.clone(), self.fd)
    }
}

/// The process's one listening socket.
pub struct VhostListener {
    listener: UnixListener,
    /// Set when this process bound the path and so must remove it on exit.
    owned_path: Option<PathBuf>,
}

impl VhostListener {
    /// Binds `path`. A stale socket file nobody listens on is replaced; a live one is an error.
    pub fn bind(path: &Path) -> Result<Self, ListenError> {
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
                if let Err(e) = fs::rename(t, path) {
                    let _ = fs::remove_file(t);
                    return Err(ListenError::Bind(path.to_owned(), e));
                }
                l
            }
            None => UnixListener::bind(path).map_err(|e| ListenError::Bind(path.to_owned(), e))?,
        };
        Ok(Self {
            listener: l,
            owned_path: Some(path.to_owned()),
        })
    }

    /// Binds the path or takes over the fd.
    pub fn open(on: &ListenOn) -> Result<Self, ListenError> {
        match on {
            ListenOn::Path(p) => Self::bind(p),
            ListenOn::Fd(fd) => Self::from_fd(*fd),
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

impl Drop for VhostListener {
    fn drop(&mut self) {
        if let Some(p) = &self.owned_path {
            let _ = fs::remove_file(p);
        }
    }
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
