//! The service manager's side: systemd's notification protocol (`NOTIFY_SOCKET`), through the
//! `sd-notify` crate. Only the supervisor talks to it; a jailed worker cannot reach the socket.
//!
//! - `READY=1` once the first worker waits for a frontend on the listening socket;
//! - `STATUS=` whenever that changes (waiting, serving, a worker replaced);
//! - `WATCHDOG=1` every half `WATCHDOG_USEC`, and only while the current worker answers the
//!   supervisor's heartbeat, so a hung or stopped worker gets the service restarted;
//! - `STOPPING=1` when a stop signal comes.
//!
//! Nothing is sent when `NOTIFY_SOCKET` is unset. A failed send is logged once and never stops
//! the backend.

use std::cell::Cell;
use std::time::Duration;

use log::{debug, warn};
use sd_notify::NotifyState;

use crate::metrics;

/// Sends state changes to the service manager, if there is one.
#[derive(Debug)]
pub struct Notifier {
    enabled: bool,
    watchdog: Option<Duration>,
    failed: Cell<bool>,
}

impl Notifier {
    /// From the environment systemd sets (`NOTIFY_SOCKET`, `WATCHDOG_USEC`, `WATCHDOG_PID`).
    pub fn from_env() -> Self {
        Notifier {
            enabled: std::env::var_os("NOTIFY_SOCKET").is_some(),
            watchdog: sd_notify::watchdog_enabled().filter(|d| !d.is_zero()),
            failed: Cell::new(false),
        }
    }

    /// The watchdog timeout systemd asked for, if any.
    pub fn watchdog(&self) -> Option<Duration> {
        self.watchdog.filter(|_| self.enabled)
    }

    fn send(&self, states: &[NotifyState]) {
        if !self.enabled {
            return;
        }
        debug!("notify: {states:?}");
        if let Err(e) = sd_notify::notify(states) {
            if !self.failed.replace(true) {
                warn!("cannot notify the service manager (NOTIFY_SOCKET): {e}");
            }
        }
    }

    /// The socket is served: `READY=1` and the status.
    pub fn ready(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    /// A new status line.
    pub fn status(&self, status: &str) {
        self.send(&[NotifyState::Status(status)]);
    }

    /// One watchdog ping.
    pub fn watchdog_ping(&self) {
        self.send(&[NotifyState::Watchdog]);
    }

    /// Hands `fd` to the service manager's file descriptor store under `name`
    /// (`FDSTORE=1`): after a restart of the service it comes back in `LISTEN_FDS`.
    pub fn store_fd(&self, fd: std::os::fd::RawFd, name: &str) -> bool {
        if !self.enabled {
            return false;
        }
        // SAFETY: `fd` is open for the duration of the call (the caller owns it).
        let b = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        match sd_notify::notify_with_fds(&[NotifyState::FdStore, NotifyState::FdName(name)], &[b]) {
            Ok(()) => true,
            Err(e) => {
                warn!("cannot hand the socket to the service manager's fd store: {e}");
                false
            }
        }
    }

    /// A stop has begun.
    pub fn stopping(&self) {
        self.send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    }
}

/// The current worker, as the supervisor sees it.
#[derive(Debug, Clone)]
pub struct WorkerReport {
    pub pid: i32,
    /// 1 for the first worker, counting up with each replacement.
    pub generation: u64,
    /// It reported a frontend connected.
    pub serving: bool,
    pub uptime: Duration,
}

/// What the service process sends the supervisor to get a [`Report`].
pub const REPORT_REQUEST: &[u8] = b"REPORT\n";

/// What the supervisor knows, for `--metrics` and `--control`.
#[derive(Debug, Clone)]
pub struct Report {
    pub name: &'static str,
    pub uptime: Duration,
    pub worker: Option<WorkerReport>,
    pub connections: u64,
    pub restarts: u64,
    pub seccomp_kills: std::collections::BTreeMap<String, u64>,
    pub exits: std::collections::BTreeMap<String, u64>,
    pub cpu_supervisor: f64,
    pub cpu_workers: f64,
    pub stopping: bool,
    pub queues: usize,
}

/// Every series: the supervisor's, then the device's from the shared page.
pub fn snapshot(r: &Report, defs: &[metrics::Def]) -> metrics::Snapshot {
    use metrics::{ConnWord, Value};
    use prometheus_client::metrics::MetricType::{Counter, Gauge, Info};
    let mut s = metrics::Snapshot::default();
    let l = |k: &str, v: &str| vec![(k.to_string(), v.to_string())];
    s.push(
        "build",
        "The backend and its version.",
        Info,
        vec![
            ("backend".into(), r.name.into()),
            ("version".into(), env!("CARGO_PKG_VERSION").into()),
        ],
        Value::Int(1),
    );
    s.push(
        "connections",
        "Frontend connections served.",
        Counter,
        vec![],
        Value::Int(r.connections),
    );
    s.push(
        "frontend_connected",
        "1 while a frontend is connected.",
        Gauge,
        vec![],
        Value::Int(metrics::conn(ConnWord::Connected)),
    );
    s.push(
        "worker_restarts",
        "Workers replaced after they died (a clean end of a connection is not counted).",
        Counter,
        vec![],
        Value::Int(r.restarts),
    );
    for how in [
        "finished",
        "failed",
        "signal",
        "seccomp",
        "setup_failed",
        "backing_lost",
    ] {
        s.push(
            "worker_exits",
            "Workers that ended, by how: finished (the connection ended), failed (non-zero \
             exit), signal, seccomp (killed by the filter), setup_failed, backing_lost (its \
             NBD server went away).",
            Counter,
            l("how", how),
            Value::Int(r.exits.get(how).copied().unwrap_or(0)),
        );
    }
    if r.seccomp_kills.is_empty() {
        // The family is always there, so a query for it finds zero rather than nothing.
        s.families.push(metrics::Family {
            name: "seccomp_kills".into(),
            help: "Workers killed by the seccomp filter, by the syscall they tried.".into(),
            kind: Counter,
            samples: vec![],
        });
    }
    for (name, n) in &r.seccomp_kills {
        s.push(
            "seccomp_kills",
            "Workers killed by the seccomp filter, by the syscall they tried.",
            Counter,
            l("syscall", name),
            Value::Int(*n),
        );
    }
    for (who, v) in [("supervisor", r.cpu_supervisor), ("workers", r.cpu_workers)] {
        s.push(
            "cpu_seconds",
            "CPU time (user and system) of the supervisor and of all its workers.",
            Counter,
            l("process", who),
            Value::Float(v),
        );
    }
    if let Some(p) = metrics::Page::get() {
        s.push_queues(p, defs);
    }
    s
}

/// `resize`'s arguments: `size` (bytes, or a string such as "10G"; absent: re-read the
/// backing's size) and `force` (allow shrinking).
fn resize_args(
    name: &str,
    args: &serde_json::Map<String, serde_json::Value>,
) -> Result<(Option<u64>, bool), String> {
    if name != "vhostbox-blk" {
        return Err(format!("resize: {name} has no disk to resize"));
    }
    let size = match args.get("size") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::Number(n)) => {
            Some(n.as_u64().ok_or("resize: size: not a byte count")?)
        }
        Some(serde_json::Value::String(s)) => {
            Some(crate::size::parse_size(s).map_err(|e| format!("resize: {e}"))?)
        }
        Some(_) => {
            return Err("resize: size: a number of bytes or a string such as \"10G\"".into())
        }
    };
    let force = match args.get("force") {
        None => false,
        Some(serde_json::Value::Bool(b)) => *b,
        Some(_) => return Err("resize: force: true or false".into()),
    };
    Ok((size, force))
}

const COMMANDS: &str = "status, stats, resize, set-limits, upgrade, help";

/// One control command.
pub fn command(
    r: &Report,
    defs: &[metrics::Def],
    command: &str,
    args: &serde_json::Map<String, serde_json::Value>,
) -> Result<serde_json::Value, String> {
    use metrics::ConnWord;
    match command {
        "status" => {
            let rings = metrics::conn(ConnWord::RingsEnabled);
            let worker = r.worker.as_ref().map(|w| {
                serde_json::json!({
                    "pid": w.pid,
                    "generation": w.generation,
                    "serving": w.serving,
                    "uptime_seconds": w.uptime.as_secs_f64(),
                })
            });
            let connected = metrics::conn(ConnWord::Connected) == 1;
            Ok(serde_json::json!({
                "backend": r.name,
                "version": env!("CARGO_PKG_VERSION"),
                "pid": std::process::id(),
                "uptime_seconds": r.uptime.as_secs_f64(),
                "state": if r.stopping { "stopping" } else if connected { "serving" } else { "waiting" },
                "worker": worker,
                "connections": r.connections,
                "restarts": r.restarts,
                "queues": r.queues,
                "limits": crate::settings::Settings::get().map(|s| s.to_json()),
                "frontend": {
                    "connected": connected,
                    "features": format!("{:#x}", metrics::conn(ConnWord::Features)),
                    "protocol_features": format!("{:#x}", metrics::conn(ConnWord::ProtocolFeatures)),
                    "rings_enabled": (0..64).filter(|i| rings & 1 << i != 0).collect::<Vec<u32>>(),
                    "memory_regions": metrics::conn(ConnWord::MemRegions),
                },
            }))
        }
        "stats" => Ok(serde_json::json!({ "metrics": snapshot(r, defs).json() })),
        "resize" => {
            resize_args(r.name, args)?;
            Err("resize: only the service process can ask the supervisor".into())
        }
        "set-limits" => {
            let s = crate::settings::Settings::get()
                .ok_or_else(|| format!("set-limits: {} has no limits to set", r.name))?;
            let mut limits = args.clone();
            limits.remove("command");
            s.update(&limits).map_err(|e| format!("set-limits: {e}"))?;
            log::info!("set-limits: now {}", s.to_json());
            Ok(serde_json::json!({ "limits": s.to_json() }))
        }
        "upgrade" => Err(format!(
            "upgrade: not supported by this version of {}; restart the service instead \
             (frontends with reconnect enabled reconnect to the new process)",
            r.name
        )),
        "help" => {
            let limits: serde_json::Map<_, _> = crate::settings::Settings::get()
                .map(|s| s.defs())
                .unwrap_or_default()
                .iter()
                .map(|d| (d.name.to_string(), serde_json::Value::from(d.help)))
                .collect();
            Ok(serde_json::json!({ "commands": COMMANDS, "limits": limits }))
        }
        other => Err(format!("unknown command '{other}' (commands: {COMMANDS})")),
    }
}

impl Report {
    /// As sent from the supervisor to the service process.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "uptime": self.uptime.as_secs_f64(),
            "worker": self.worker.as_ref().map(|w| serde_json::json!({
                "pid": w.pid,
                "generation": w.generation,
                "serving": w.serving,
                "uptime": w.uptime.as_secs_f64(),
            })),
            "connections": self.connections,
            "restarts": self.restarts,
            "seccomp_kills": self.seccomp_kills,
            "exits": self.exits,
            "cpu_supervisor": self.cpu_supervisor,
            "cpu_workers": self.cpu_workers,
            "stopping": self.stopping,
            "queues": self.queues,
        })
    }

    /// What [`Report::to_json`] made; `None` if it is not that.
    pub fn from_json(name: &'static str, v: &serde_json::Value) -> Option<Report> {
        let secs = |v: &serde_json::Value| {
            v.as_f64()
                .filter(|s| s.is_finite() && *s >= 0.0)
                .map(Duration::from_secs_f64)
        };
        let counts = |v: &serde_json::Value| -> Option<std::collections::BTreeMap<String, u64>> {
            v.as_object()?
                .iter()
                .map(|(k, v)| Some((k.clone(), v.as_u64()?)))
                .collect()
        };
        let worker = match &v["worker"] {
            serde_json::Value::Null => None,
            w => Some(WorkerReport {
                pid: i32::try_from(w["pid"].as_i64()?).ok()?,
                generation: w["generation"].as_u64()?,
                serving: w["serving"].as_bool()?,
                uptime: secs(&w["uptime"])?,
            }),
        };
        Some(Report {
            name,
            uptime: secs(&v["uptime"])?,
            worker,
            connections: v["connections"].as_u64()?,
            restarts: v["restarts"].as_u64()?,
            seccomp_kills: counts(&v["seccomp_kills"])?,
            exits: counts(&v["exits"])?,
            cpu_supervisor: v["cpu_supervisor"].as_f64()?,
            cpu_workers: v["cpu_workers"].as_f64()?,
            stopping: v["stopping"].as_bool()?,
            queues: usize::try_from(v["queues"].as_u64()?).ok()?,
        })
    }
}

/// The service process's side: what it answers clients with, from the supervisor's
/// [`Report`] and the shared metrics page.
struct Remote {
    /// The socket to the supervisor.
    chan: std::os::fd::RawFd,
    name: &'static str,
    defs: &'static [metrics::Def],
}

impl Remote {
    /// Asks the supervisor for its figures.
    fn report(&self) -> Result<Report, String> {
        let v = self.ask(REPORT_REQUEST)?;
        Report::from_json(self.name, &v)
            .ok_or_else(|| "the supervisor's report is incomplete".into())
    }

    /// Asks the supervisor to resize the device (it holds the image).
    fn resize(&self, size: Option<u64>, force: bool) -> Result<serde_json::Value, String> {
        let req = format!(
            "{}{} {}",
            crate::sandbox::supervisor::RESIZE_REQUEST,
            size.map_or("-".to_string(), |n| n.to_string()),
            u8::from(force)
        );
        let v = self.ask(req.as_bytes())?;
        match v.get("error").and_then(|e| e.as_str()) {
            Some(e) => Err(format!("resize: {e}")),
            None => Ok(v),
        }
    }

    /// One request to the supervisor and its JSON reply (5 s at most).
    fn ask(&self, req: &[u8]) -> Result<serde_json::Value, String> {
        // SAFETY: sends our buffer on our socket.
        let n = unsafe { libc::send(self.chan, req.as_ptr().cast(), req.len(), 0) };
        if n < 0 {
            return Err("the supervisor is gone".into());
        }
        let mut p = libc::pollfd {
            fd: self.chan,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut p, 1, 5000) } != 1 {
            return Err("the supervisor did not answer".into());
        }
        let mut buf = vec![0u8; 64 << 10];
        // SAFETY: recv into our buffer of that size.
        let n = unsafe { libc::recv(self.chan, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n <= 0 {
            return Err("the supervisor is gone".into());
        }
        serde_json::from_slice(&buf[..n as usize])
            .map_err(|e| format!("the supervisor's reply: {e}"))
    }
}

impl crate::control::Handler for Remote {
    fn metrics(&mut self) -> String {
        match self.report() {
            Ok(r) => snapshot(&r, self.defs).openmetrics(),
            Err(e) => {
                warn!("metrics: {e}");
                String::new()
            }
        }
    }

    fn command(
        &mut self,
        command: &str,
        args: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<serde_json::Value, String> {
        if command == "resize" {
            let (size, force) = resize_args(self.name, args)?;
            return self.resize(size, force);
        }
        let r = self.report()?;
        self::command(&r, self.defs, command, args)
    }
}

/// The service process (forked and jailed like a worker, with its own allow-list): serves
/// `--metrics` and `--control` until the supervisor goes away. Returns its exit status.
pub fn serve_endpoints(
    srv: &mut crate::control::Server,
    name: &'static str,
    defs: &'static [metrics::Def],
    jail: &crate::sandbox::JailConfig,
    ctx: crate::sandbox::supervisor::WorkerCtx,
) -> i32 {
    use crate::sandbox::{self, seccomp, SeccompMode};
    // SAFETY: prctl with a static name.
    unsafe { libc::prctl(libc::PR_SET_NAME, c"vbx-service".as_ptr(), 0, 0, 0) };
    let chan = ctx.report_fd;
    let mut keep = srv.fds();
    keep.push(chan);
    // Trap rather than notify in kill mode: its report handler writes the syscall on `chan`,
    // and the process dies all the same.
    let mut cfg = jail.clone();
    if cfg.seccomp == SeccompMode::Kill {
        cfg.seccomp = SeccompMode::Trap;
    }
    seccomp::set_report_fd(chan);
    // SAFETY: getpid has no arguments.
    let pid = unsafe { libc::getpid() } as u32;
    if let Err(e) = sandbox::enter(&cfg, &keep, seccomp::service_rules(pid)) {
        log::error!(
            "service process: cannot enter the sandbox: {}",
            crate::error_chain(&e)
        );
        return crate::sandbox::supervisor::EXIT_JAIL_FAILED;
    }
    let mut remote = Remote { chan, name, defs };
    loop {
        let mut fds = vec![libc::pollfd {
            fd: chan,
            events: libc::POLLIN,
            revents: 0,
        }];
        srv.pollfds(&mut fds);
        let timeout = srv.timeout().map_or(-1, |d| {
            i32::try_from(d.as_micros().div_ceil(1000)).unwrap_or(i32::MAX)
        });
        // SAFETY: fds is a valid array of pollfds of that length.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if r < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return 1;
        }
        if fds[0].revents & (libc::POLLHUP | libc::POLLERR) != 0 {
            return 0;
        }
        if fds[0].revents & libc::POLLIN != 0 {
            // Nothing is sent unasked: a stale reply (one that came after its timeout).
            let mut b = [0u8; 64];
            // SAFETY: recv into a local buffer.
            unsafe { libc::recv(chan, b.as_mut_ptr().cast(), b.len(), libc::MSG_DONTWAIT) };
        }
        srv.handle(&fds[1..], &mut remote);
    }
}
