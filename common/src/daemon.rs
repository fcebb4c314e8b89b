//! The listener and the serve loop.
//!
//! A backend process owns one listening socket for its whole life: bound once from
//! `--socket-path` (before any sandbox could forbid it) or inherited with `--fd`. Each frontend
//! connection gets a fresh [`VhostUserDaemon`] built on a fresh per-connection backend, so guest
//! memory maps, vrings and in-flight requests of one frontend never leak into the next. When the
//! frontend goes away, that state is dropped and the same listener accepts the next frontend;
//! the path is never bound again (rebinding races with the VMM and is impossible in a jail).
//!
//! SIGTERM and SIGINT end the loop cleanly: the current connection is shut down, the device
//! drains what it has in flight, and the socket file (if this process created it) is removed.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use log::{error, info, warn};
use vhost::vhost_user::Listener;
use vhost_user_backend::{
    ShutdownHandle, VhostUserBackend, VhostUserDaemon, VringEpollHandler, VringRwLock,
};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::event::{EventConsumer, EventNotifier};

/// Errors of the listener and the serve loop.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
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
    #[error("cannot set up signal handling")]
    Signals(#[source] io::Error),
    #[error("cannot create the per-connection device")]
    Device(#[source] io::Error),
    #[error("vhost-user daemon: {0}")]
    VhostUser(vhost_user_backend::Error),
    #[error("waiting for a connection")]
    Poll(#[source] io::Error),
}

/// Where the listener comes from: `--socket-path PATH` or `--fd N`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenOn {
    Path(PathBuf),
    Fd(RawFd),
}

impl ListenOn {
    /// From the two mutually exclusive flags.
    pub fn from_args(socket_path: Option<PathBuf>, fd: Option<RawFd>) -> Result<Self, String> {
        match (socket_path, fd) {
            (Some(p), None) => Ok(Self::Path(p)),
            (None, Some(fd)) if fd >= 0 => Ok(Self::Fd(fd)),
            (None, Some(fd)) => Err(format!("invalid --fd {fd}")),
            _ => Err("exactly one of --socket-path and --fd is required".into()),
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
    pub fn to_listen_on(&self) -> Result<ListenOn, String> {
        ListenOn::from_args(self.socket_path.clone(), self.fd)
    }
}

/// The process's one listening socket.
pub struct VhostListener {
    listener: Listener,
    /// Set when this process bound the path and so must remove it on exit.
    owned_path: Option<PathBuf>,
}

impl VhostListener {
    /// Binds `path`. A stale socket file nobody listens on is replaced; a live one is an error.
    pub fn bind(path: &Path) -> Result<Self, DaemonError> {
        match fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                if UnixStream::connect(path).is_ok() {
                    return Err(DaemonError::SocketBusy(path.to_owned()));
                }
                fs::remove_file(path).map_err(|e| DaemonError::RemoveStale(path.to_owned(), e))?;
            }
            Ok(_) => return Err(DaemonError::NotASocket(path.to_owned())),
            Err(_) => {}
        }
        // The path must only appear once the socket listens: bind(2) creates it before
        // listen(2), and a frontend started as soon as the path exists would get ECONNREFUSED
        // in between. So bind a temporary name next to it and rename it into place.
        let tmp = temp_name(path);
        let l = match &tmp {
            Some(t) => {
                let _ = fs::remove_file(t);
                let l = UnixListener::bind(t).map_err(|e| DaemonError::Bind(path.to_owned(), e))?;
                if let Err(e) = fs::rename(t, path) {
                    let _ = fs::remove_file(t);
                    return Err(DaemonError::Bind(path.to_owned(), e));
                }
                l
            }
            None => UnixListener::bind(path).map_err(|e| DaemonError::Bind(path.to_owned(), e))?,
        };
        Ok(Self {
            listener: Listener::from(l),
            owned_path: Some(path.to_owned()),
        })
    }

    /// Binds the path or takes over the fd.
    pub fn open(on: &ListenOn) -> Result<Self, DaemonError> {
        match on {
            ListenOn::Path(p) => Self::bind(p),
            ListenOn::Fd(fd) => Self::from_fd(*fd),
        }
    }

    /// Takes over an inherited listening socket (systemd socket activation, libvirt, a test).
    pub fn from_fd(fd: RawFd) -> Result<Self, DaemonError> {
        let ok = sockopt(fd, libc::SO_DOMAIN) == Some(libc::AF_UNIX)
            && sockopt(fd, libc::SO_TYPE) == Some(libc::SOCK_STREAM)
            && sockopt(fd, libc::SO_ACCEPTCONN) == Some(1);
        if !ok {
            return Err(DaemonError::BadFd(fd));
        }
        // SAFETY: the fd was checked above to be an open listening unix socket; the process
        // inherited it for this purpose and nothing else in the process owns it.
        let l = unsafe { UnixListener::from_raw_fd(fd) };
        // SAFETY: FD_CLOEXEC on a valid fd we now own; keeps it from leaking into children.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        Ok(Self {
            listener: Listener::from(l),
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

/// Per-thread exit events that live as long as the process.
///
/// vhost-user-backend takes the consumer half of `exit_event()` into its epoll as a raw fd
/// and never closes it, so a fresh eventfd per connection would leak one fd per worker per
/// reconnect. These eventfds are created once; each connection gets a consumer that aliases the
/// persistent fd (ownership is given up again by the library, so it is never closed) and a
/// duplicated notifier that the library may close.
pub struct ExitEvents {
    fds: Vec<OwnedFd>,
}

impl ExitEvents {
    pub fn new(threads: usize) -> io::Result<Self> {
        let mut fds = Vec::with_capacity(threads);
        for _ in 0..threads {
            // SAFETY: eventfd has no memory arguments; the result is checked.
            let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: fd is a fresh eventfd owned by nobody else.
            fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        Ok(Self { fds })
    }

    /// The pair to return from `VhostUserBackend::exit_event`.
    pub fn pair(&self, thread: usize) -> Option<(EventConsumer, EventNotifier)> {
        let fd = self.fds.get(thread)?;
        let dup = fd.try_clone().ok()?;
        // SAFETY: the consumer aliases our persistent fd. vhost-user-backend immediately calls
        // into_raw_fd() on it and never closes it, so the alias never closes our fd.
        let consumer = unsafe { EventConsumer::from_raw_fd(fd.as_raw_fd()) };
        // SAFETY: `dup` is a fresh fd that the notifier takes ownership of.
        let notifier =
            unsafe { EventNotifier::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(dup)) };
        Some((consumer, notifier))
    }

    /// Clears pending exit notifications before the next connection.
    pub fn reset(&self) {
        for fd in &self.fds {
            let mut v = 0u64;
            // SAFETY: reads 8 bytes into a u64 we own from a non-blocking eventfd.
            unsafe { libc::read(fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        }
    }

    /// The raw fds, for the sandbox's keep-list.
    pub fn raw_fds(&self) -> Vec<RawFd> {
        self.fds.iter().map(|f| f.as_raw_fd()).collect()
    }
}

/// The bytes GET_CONFIG asks for; empty (and a warning) when the range lies outside `space`.
pub fn config_slice(space: &[u8], offset: u32, size: u32) -> Vec<u8> {
    let start = offset as usize;
    match start.checked_add(size as usize) {
        Some(end) if end <= space.len() => space[start..end].to_vec(),
        _ => {
            warn!("GET_CONFIG beyond the config space: offset {offset} size {size}");
            Vec::new()
        }
    }
}

/// A device that can serve frontends one after another.
pub trait Device {
    /// The per-connection backend handed to vhost-user-backend.
    type Backend: VhostUserBackend<Bitmap = (), Vring = VringRwLock> + Clone + 'static;

    /// Fresh per-connection state.
    fn connect(&mut self) -> io::Result<Self::Backend>;

    /// Called once the worker threads exist, to register the backend's own fds (completion
    /// eventfds, a tap) with their epoll loops.
    fn attach(
        &mut self,
        _backend: &Self::Backend,
        _handlers: &[Arc<VringEpollHandler<Self::Backend>>],
    ) -> io::Result<()> {
        Ok(())
    }

    /// Called after the connection ended and the worker threads were joined.
    fn disconnected(&mut self) {}

    /// A relay to put between the frontend and vhost-user-backend (see [`crate::vu_shim`]),
    /// for devices whose frontends enable rings before setting features.
    fn shim(&mut self) -> Option<&mut crate::vu_shim::Shim> {
        None
    }

    /// What to run when SIGTERM or SIGINT stops the connection, before the frontend is cut
    /// off: a device with requests in flight completes them there.
    fn drainer(&self, _backend: &Self::Backend) -> Option<Box<dyn Fn() + Send>> {
        None
    }
}

/// [`serve`], as a process exit code: 0 after a clean end, 1 (logged) otherwise.
pub fn serve_exit_code<D: Device>(
    name: &str,
    listener: &mut VhostListener,
    device: &mut D,
    once: bool,
) -> i32 {
    match serve(name, listener, device, once) {
        Ok(()) => 0,
        Err(e) => {
            error!("{}", crate::error_chain(&e));
            1
        }
    }
}

/// `--sandbox none`: serves from this process, with all of its privileges, and says so.
pub fn serve_unconfined<D: Device>(
    name: &str,
    listener: &mut VhostListener,
    device: &mut D,
) -> i32 {
    warn!(
        "*** --sandbox none: the backend runs UNCONFINED, with all the privileges of its user ***"
    );
    serve_exit_code(name, listener, device, false)
}

/// Shutdown requested by a signal; shared with the signal thread.
struct ShutdownState {
    requested: AtomicBool,
    wake: OwnedFd,
    connection: Mutex<Option<(ShutdownHandle, Option<Drainer>)>>,
    listen_fd: RawFd,
}

type Drainer = Box<dyn Fn() + Send>;

/// Blocks SIGTERM, SIGINT and SIGHUP in the calling thread (and every thread it creates later).
/// Call first thing in main: a signal that arrives while the socket is being bound then waits
/// for the supervisor's or the serve loop's handling instead of killing the process before it
/// could remove its socket.
pub fn block_shutdown_signals() {
    let set = signal_set();
    // SAFETY: sigprocmask with an initialised set and a null old-set pointer.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

/// Blocks SIGTERM, SIGINT and SIGHUP in this thread (and so in every thread created after it)
/// and starts a thread that waits for them. Must be called before any other thread exists.
fn start_signal_thread(listen_fd: RawFd) -> io::Result<Arc<ShutdownState>> {
    // SAFETY: eventfd has no memory arguments; the result is checked.
    let wake = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if wake < 0 {
        return Err(io::Error::last_os_error());
    }
    let state = Arc::new(ShutdownState {
        requested: AtomicBool::new(false),
        // SAFETY: a fresh eventfd owned by nobody else.
        wake: unsafe { OwnedFd::from_raw_fd(wake) },
        connection: Mutex::new(None),
        listen_fd,
    });
    let set = signal_set();
    // A handler must exist for these signals to reach a process that is pid 1 of its pid
    // namespace (a jailed worker); it never runs because the signals stay blocked.
    extern "C" fn ignore(_: libc::c_int) {}
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: installs a no-op handler; the struct is fully initialised.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = ignore as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
    // SAFETY: `set` is an initialised sigset_t; a null old-set pointer is allowed.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    let st = state.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` is initialised and `sig` is a valid out pointer.
            if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                continue;
            }
            info!("signal {sig} received, shutting down");
            st.requested.store(true, Ordering::SeqCst);
            let one = 1u64;
            // SAFETY: writes 8 bytes from a u64 we own to our eventfd.
            unsafe { libc::write(st.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
            if let Some((h, drain)) = st
                .connection
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
            {
                if let Some(d) = drain {
                    d();
                }
                h.shutdown();
            }
            // Wakes an accept() that raced with the signal. SAFETY: plain syscall on our fd.
            unsafe { libc::shutdown(st.listen_fd, libc::SHUT_RDWR) };
        })?;
    Ok(state)
}

fn signal_set() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the zeroed set; sigaddset on valid signal numbers.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
        set
    }
}

/// Waits until the listener has a connection pending (true) or shutdown was requested (false).
fn wait_for_connection(listen_fd: RawFd, st: &ShutdownState) -> Result<bool, DaemonError> {
    loop {
        if st.requested.load(Ordering::SeqCst) {
            return Ok(false);
        }
        let mut fds = [
            libc::pollfd {
                fd: listen_fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: st.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd structs.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(DaemonError::Poll(e));
        }
        if st.requested.load(Ordering::SeqCst) {
            return Ok(false);
        }
        if fds[0].revents & libc::POLLIN != 0 {
            return Ok(true);
        }
    }
}

/// Serves one frontend already connected on `stream` until it goes away, without signal
/// handling or a listener: the fuzz targets drive a device's whole vhost-user handling this
/// way. The device must have a relay ([`Device::shim`]), which takes the stream. Returns how
/// the connection ended.
pub fn serve_stream<D: Device>(
    name: &str,
    device: &mut D,
    stream: UnixStream,
) -> Result<(), DaemonError> {
    let (backend, mut daemon) = open_connection(name, device)?;
    let shim = device
        .shim()
        .ok_or_else(|| DaemonError::Device(io::Error::other("the device has no relay")))?;
    let started = shim
        .relay(stream)
        .map_err(DaemonError::Device)
        .and_then(|l| daemon.start(l).map_err(DaemonError::VhostUser));
    let r = started.and_then(|_| daemon.wait().map_err(DaemonError::VhostUser));
    close_connection(device, daemon, backend);
    rearm_relay(device)?;
    r
}

/// A fresh backend for the next frontend and the vhost-user daemon that will serve it, with the
/// device's extra fds in the worker threads' epolls.
fn open_connection<D: Device>(
    name: &str,
    device: &mut D,
) -> Result<(D::Backend, VhostUserDaemon<D::Backend>), DaemonError> {
    let backend = device.connect().map_err(DaemonError::Device)?;
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let daemon = VhostUserDaemon::new(name.to_owned(), backend.clone(), mem)
        .map_err(DaemonError::VhostUser)?;
    device
        .attach(&backend, &daemon.get_epoll_handlers())
        .map_err(DaemonError::Device)?;
    Ok((backend, daemon))
}

/// Ends a connection: dropping the daemon stops and joins the worker threads; the backend's
/// per-connection state (memory maps, vrings, in-flight requests) goes with it.
fn close_connection<D: Device>(
    device: &mut D,
    daemon: VhostUserDaemon<D::Backend>,
    backend: D::Backend,
) {
    drop(daemon);
    drop(backend);
    device.disconnected();
}

/// Readies the device's relay, if it has one, for the next frontend.
fn rearm_relay<D: Device>(device: &mut D) -> Result<(), DaemonError> {
    match device.shim() {
        Some(shim) => shim.rearm().map_err(DaemonError::Device),
        None => Ok(()),
    }
}

/// Serves frontends on `listener` until SIGTERM/SIGINT (or, with `once`, until the first
/// frontend disconnects: a jailed worker serves one connection and exits). Each connection gets
/// a fresh backend from `device`; when the frontend disconnects its state is dropped and the
/// next one is served.
pub fn serve<D: Device>(
    name: &str,
    listener: &mut VhostListener,
    device: &mut D,
    once: bool,
) -> Result<(), DaemonError> {
    let st = start_signal_thread(listener.raw_fd()).map_err(DaemonError::Signals)?;
    info!("ready; waiting for a frontend");
    while wait_for_connection(listener.raw_fd(), &st)? {
        let (backend, mut daemon) = open_connection(name, device)?;
        let started = match device.shim() {
            None => daemon.start(&mut listener.listener),
            Some(shim) => match listener.listener.accept() {
                Ok(Some(frontend)) => match shim.relay(frontend) {
                    Ok(l) => daemon.start(l),
                    Err(e) => return Err(DaemonError::Device(e)),
                },
                Ok(None) => continue,
                Err(e) => {
                    warn!("accepting a frontend failed: {e}");
                    continue;
                }
            },
        };
        if let Err(e) = started {
            if st.requested.load(Ordering::SeqCst) {
                break;
            }
            warn!("accepting a frontend failed: {e}");
            continue;
        }
        *st.connection.lock().unwrap_or_else(|e| e.into_inner()) = daemon
            .shutdown_handle()
            .map(|h| (h, device.drainer(&backend)));
        if st.requested.load(Ordering::SeqCst) {
            daemon.request_shutdown();
        }
        info!("frontend connected");
        crate::sandbox::supervisor::report_serving();
        match daemon.wait() {
            Ok(()) => info!("frontend disconnected"),
            Err(e) if st.requested.load(Ordering::SeqCst) => info!("connection closed: {e}"),
            // vhost-user-backend reports an orderly close of the socket as an error.
            Err(e) if e.to_string().contains("peer disconnected") => {
                info!("frontend disconnected")
            }
            Err(e) => error!("connection ended with an error: {e}"),
        }
        *st.connection.lock().unwrap_or_else(|e| e.into_inner()) = None;
        close_connection(device, daemon, backend);
        if once {
            return Ok(());
        }
        rearm_relay(device)?;
        if !st.requested.load(Ordering::SeqCst) {
            info!("waiting for the next frontend");
        }
    }
    info!("shut down");
    Ok(())
}
