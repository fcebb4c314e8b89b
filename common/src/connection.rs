//! A worker's one connection: wait for a frontend on the listener, relay it to
//! vhost-user-backend, serve until it goes away or SIGTERM comes, then return (the worker exits
//! and the supervisor forks the next one).
//!
//! SIGTERM and SIGINT end the connection cleanly: the device drains what it has in flight, then
//! the frontend is cut off. The signals are blocked from the worker's first instruction (it
//! inherits the supervisor's mask), so one that comes while the worker is still setting up is
//! kept pending and taken here.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use log::{error, info};
use vhost::vhost_user::Error as VhostUserError;
use vhost_user_backend::{Error as DaemonError, ShutdownHandle, VhostUserBackend, VhostUserDaemon};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::launch::{Connection, GuestMemHandle};
use crate::listener::VhostListener;
use crate::relay::Relay;
use crate::sandbox::seccomp::{heartbeat_rules, install_thread, signal_rules, Rules, ThreadKind};
use crate::sandbox::supervisor::EXIT_JAIL_FAILED;

/// What a device runs on SIGTERM before the frontend is cut off.
pub type Drainer = Box<dyn Fn() + Send>;

/// Errors of serving the connection.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("cannot set up signal handling")]
    Signals(#[source] io::Error),
    #[error("waiting for a connection")]
    Poll(#[source] io::Error),
    #[error("accepting the frontend")]
    Accept(#[source] io::Error),
    #[error("starting the relay")]
    Relay(#[source] io::Error),
    #[error("vhost-user daemon: {0}")]
    Daemon(DaemonError),
    #[error("adding the device's fds to the queue threads")]
    Watch(#[source] io::Error),
}

/// Shutdown requested by a signal; shared with the signal thread.
struct ShutdownState {
    requested: AtomicBool,
    wake: EventFd,
    connection: Mutex<Option<(ShutdownHandle, Option<Drainer>)>>,
    listen_fd: RawFd,
}

impl ShutdownState {
    fn requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    fn set_connection(&self, c: Option<(ShutdownHandle, Option<Drainer>)>) {
        *self.connection.lock().unwrap_or_else(|e| e.into_inner()) = c;
    }
}

/// Blocks SIGTERM, SIGINT and SIGHUP in the calling thread (and every thread it creates later).
/// Called first thing: a signal that arrives while the socket is being bound then waits for the
/// supervisor's handling instead of killing the process before it could remove its socket.
pub fn block_shutdown_signals() {
    let set = signal_set();
    // SAFETY: sigprocmask with an initialised set and a null old-set pointer.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
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

/// Starts the thread that waits for SIGTERM, SIGINT and SIGHUP (blocked in every thread).
/// Must be called before any other thread exists.
fn start_signal_thread(listen_fd: RawFd, drain_rules: Rules) -> io::Result<Arc<ShutdownState>> {
    let state = Arc::new(ShutdownState {
        requested: AtomicBool::new(false),
        wake: EventFd::new(EFD_NONBLOCK)?,
        connection: Mutex::new(None),
        listen_fd,
    });
    // A handler must exist for these signals to reach a process that is pid 1 of its pid
    // namespace (a jailed worker) once unblocked; it never runs because they stay blocked.
    extern "C" fn ignore(_: libc::c_int) {}
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: sigaction is a plain C struct for which all-zero is valid; it is then filled
        // in with a no-op handler and an empty mask.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = ignore as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
    block_shutdown_signals();
    let set = signal_set();
    let st = state.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let rules = signal_rules(std::process::id(), drain_rules);
            if let Err(e) = install_thread(ThreadKind::Signals, rules) {
                // Without its filter the thread must not run: stop the worker now.
                log::error!("signal thread: {e}");
                std::process::exit(EXIT_JAIL_FAILED);
            }
            signal_loop(&set, &st)
        })?;
    Ok(state)
}

/// Starts the thread that answers the supervisor's heartbeat (the watchdog's evidence that
/// this worker is alive), under its own seccomp list.
fn start_heartbeat_thread(extra: Rules) -> io::Result<()> {
    std::thread::Builder::new()
        .name("heartbeat".into())
        .spawn(move || {
            let mut rules = heartbeat_rules(std::process::id());
            rules.extend(extra);
            if let Err(e) = install_thread(ThreadKind::Heartbeat, rules) {
                log::error!("heartbeat thread: {e}");
                std::process::exit(EXIT_JAIL_FAILED);
            }
            crate::sandbox::supervisor::answer_heartbeats()
        })
        .map(|_| ())
}

/// Waits for SIGTERM, SIGINT or SIGHUP, forever.
fn signal_loop(set: &libc::sigset_t, st: &ShutdownState) {
    loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: `set` is initialised and `sig` is a valid out pointer.
        if unsafe { libc::sigwait(set, &mut sig) } != 0 {
            continue;
        }
        info!("signal {sig} received, shutting down");
        st.requested.store(true, Ordering::SeqCst);
        let _ = st.wake.write(1);
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
    }
}

/// Waits until the listener has a connection pending (true) or shutdown was requested (false).
fn wait_for_connection(st: &ShutdownState) -> Result<bool, ConnectionError> {
    loop {
        if st.requested() {
            return Ok(false);
        }
        let mut fds = [st.listen_fd, st.wake.as_raw_fd()].map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        });
        // SAFETY: `fds` is a valid array of two pollfd structs.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(ConnectionError::Poll(e));
        }
        if st.requested() {
            return Ok(false);
        }
        if fds[0].revents & libc::POLLIN != 0 {
            return Ok(true);
        }
    }
}

/// Serves one frontend from `listener` with the device's `conn`, or returns at once if SIGTERM
/// came first.
pub fn serve<B>(
    name: &str,
    listener: &VhostListener,
    relay: Relay,
    mut conn: Connection<B>,
    mem: GuestMemHandle,
) -> Result<(), ConnectionError>
where
    B: VhostUserBackend<Bitmap = crate::dirty::DirtyLog, Vring = crate::launch::GuestVring>
        + Clone
        + 'static,
{
    let drain_rules = std::mem::take(&mut conn.drain_rules);
    let st =
        start_signal_thread(listener.raw_fd(), drain_rules).map_err(ConnectionError::Signals)?;
    start_heartbeat_thread(std::mem::take(&mut conn.config_rules))
        .map_err(ConnectionError::Signals)?;
    info!("ready; waiting for a frontend");
    crate::sandbox::supervisor::report_ready();
    let frontend = loop {
        if !wait_for_connection(&st)? {
            info!("shut down before a frontend connected");
            return Ok(());
        }
        // None: the frontend gave up between poll and accept; wait for the next.
        if let Some(s) = listener.accept().map_err(ConnectionError::Accept)? {
            break s;
        }
    };
    let mut daemon = VhostUserDaemon::new(name.to_owned(), conn.backend.clone(), mem)
        .map_err(ConnectionError::Daemon)?;
    let handlers = daemon.get_epoll_handlers();
    for w in &conn.watch {
        let h = handlers
            .get(w.thread)
            .ok_or_else(|| ConnectionError::Watch(io::Error::other("no such queue thread")))?;
        h.register_listener(w.fd, w.events, w.id)
            .map_err(ConnectionError::Watch)?;
    }
    drop(handlers);
    let mut library_side = relay
        .start(frontend, conn.hook)
        .map_err(ConnectionError::Relay)?;
    daemon
        .start(&mut library_side)
        .map_err(ConnectionError::Daemon)?;
    // Accepted: nothing may listen any more.
    drop(library_side);
    st.set_connection(daemon.shutdown_handle().map(|h| (h, conn.drain)));
    if st.requested() {
        daemon.request_shutdown();
    }
    info!("frontend connected");
    crate::sandbox::supervisor::report_serving();
    match daemon.wait() {
        Ok(()) => info!("frontend disconnected"),
        Err(DaemonError::HandleRequest(
            VhostUserError::Disconnected | VhostUserError::PartialMessage,
        )) => info!("frontend disconnected"),
        Err(e) if st.requested() => info!("connection closed: {e}"),
        Err(e) => error!("connection ended with an error: {e}"),
    }
    st.set_connection(None);
    // Stops and joins the queue threads; the backend's state goes with the process.
    drop(daemon);
    if let Some(f) = conn.finished {
        f();
    }
    Ok(())
}
