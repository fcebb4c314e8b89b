//! The supervisor's two service endpoints, served from its single-threaded poll loop:
//!
//! - `--metrics ADDR`: HTTP `GET /metrics` with the OpenMetrics text exposition, on a TCP
//!   address (`127.0.0.1:9101`) or a unix socket (`unix:/run/vhostbox/blk0.metrics`);
//! - `--control PATH`: a unix socket taking one JSON object per line (`{"command":"status"}`)
//!   and answering each with one line of JSON (`{"ok":true,...}` or `{"ok":false,"error":...}`).
//!   `vhostboxctl` is its client.
//!
//! Both are non-blocking all the way: a client that connects and stays silent, sends a huge
//! line or never reads its reply holds one slot of [`MAX_CLIENTS`] until [`IDLE`] passes or a
//! newer client needs the slot, and never stalls the supervisor, whose real work is its
//! workers. Every buffer is bounded.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use log::{debug, warn};

use crate::listener::{ListenError, SocketPerms, VhostListener};
use crate::sandbox::supervisor;

/// Clients served at once, over both endpoints; a new one beyond this closes the one idle the
/// longest.
pub const MAX_CLIENTS: usize = 16;
/// A client that sends or reads nothing for this long is closed.
pub const IDLE: Duration = Duration::from_secs(10);
/// The longest control request line.
pub const MAX_LINE: usize = 64 << 10;
/// The longest HTTP request head.
pub const MAX_HTTP_HEAD: usize = 8 << 10;
/// Replies waiting for a client that does not read them: requests after this wait.
pub const MAX_PENDING_OUT: usize = 1 << 20;

/// Where `--metrics` listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// A `--metrics` value that is neither.
#[derive(Debug, thiserror::Error)]
#[error(
    "--metrics '{0}': expected HOST:PORT (127.0.0.1:9101, [::1]:9101) or unix:PATH \
     (or an absolute path)"
)]
pub struct MetricsAddrError(pub String);

impl std::str::FromStr for MetricsAddr {
    type Err = MetricsAddrError;
    fn from_str(s: &str) -> Result<Self, MetricsAddrError> {
        if let Some(p) = s.strip_prefix("unix:") {
            if !p.is_empty() {
                return Ok(MetricsAddr::Unix(p.into()));
            }
        } else if s.starts_with('/') {
            return Ok(MetricsAddr::Unix(s.into()));
        } else if let Ok(a) = s.parse() {
            return Ok(MetricsAddr::Tcp(a));
        }
        Err(MetricsAddrError(s.into()))
    }
}

/// Why an endpoint could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("--metrics: {0}")]
    MetricsUnix(#[source] ListenError),
    #[error("--metrics: cannot listen on {0}")]
    MetricsTcp(SocketAddr, #[source] io::Error),
    #[error("--control: {0}")]
    Control(#[source] ListenError),
}

/// What the supervisor answers with.
pub trait Handler {
    /// The OpenMetrics text.
    fn metrics(&mut self) -> String;
    /// One control command: its result object, or why not.
    fn command(
        &mut self,
        command: &str,
        args: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<serde_json::Value, String>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Metrics,
    Control,
}

enum Lst {
    Unix(VhostListener),
    Tcp(TcpListener),
}

impl Lst {
    fn fd(&self) -> RawFd {
        match self {
            Lst::Unix(l) => l.raw_fd(),
            Lst::Tcp(l) => l.as_raw_fd(),
        }
    }

    fn accept(&self) -> io::Result<Option<Stream>> {
        match self {
            Lst::Unix(l) => Ok(l.accept()?.map(Stream::Unix)),
            Lst::Tcp(l) => match l.accept() {
                Ok((s, _)) => Ok(Some(Stream::Tcp(s))),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => Ok(None),
                Err(e) => Err(e),
            },
        }
    }
}

enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn fd(&self) -> RawFd {
        match self {
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tcp(s) => s.as_raw_fd(),
        }
    }
    fn shutdown_write(&self) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Write),
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Write),
        };
    }
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(b),
            Stream::Tcp(s) => s.read(b),
        }
    }
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(b),
            Stream::Tcp(s) => s.write(b),
        }
    }
}

struct Client {
    stream: Stream,
    ep: Endpoint,
    input: Vec<u8>,
    out: Vec<u8>,
    sent: usize,
    deadline: Instant,
    /// Close once `out` is written (HTTP, or a request the client cannot follow up).
    last: bool,
    /// The reply is out and our side shut: what the client still sends is read and dropped
    /// until it closes (closing with unread data would reset the connection, and the client
    /// could lose the reply), for [`IDLE`] at most.
    draining: bool,
}

impl Drop for Client {
    fn drop(&mut self) {
        supervisor::let_workers_forget(self.stream.fd());
    }
}

/// The endpoints and their clients.
pub struct Server {
    listeners: Vec<(Lst, Endpoint)>,
    clients: Vec<Client>,
}

impl Server {
    /// Opens the endpoints asked for (none: `None`).
    pub fn open(
        metrics: Option<&MetricsAddr>,
        control: Option<&std::path::Path>,
        perms: SocketPerms,
    ) -> Result<Option<Server>, ServeError> {
        let mut listeners = Vec::new();
        match metrics {
            Some(MetricsAddr::Unix(p)) => {
                let l = VhostListener::bind(p, perms).map_err(ServeError::MetricsUnix)?;
                listeners.push((Lst::Unix(l), Endpoint::Metrics));
            }
            Some(MetricsAddr::Tcp(a)) => {
                let l = TcpListener::bind(a).map_err(|e| ServeError::MetricsTcp(*a, e))?;
                l.set_nonblocking(true)
                    .map_err(|e| ServeError::MetricsTcp(*a, e))?;
                listeners.push((Lst::Tcp(l), Endpoint::Metrics));
            }
            None => {}
        }
        if let Some(p) = control {
            let l = VhostListener::bind(p, perms).map_err(ServeError::Control)?;
            listeners.push((Lst::Unix(l), Endpoint::Control));
        }
        if listeners.is_empty() {
            return Ok(None);
        }
        for (l, _) in &listeners {
            set_nonblocking(l.fd());
            supervisor::keep_from_workers(l.fd());
        }
        Ok(Some(Server {
            listeners,
            clients: Vec::new(),
        }))
    }

    /// The listening fds.
    pub fn fds(&self) -> Vec<RawFd> {
        self.listeners.iter().map(|(l, _)| l.fd()).collect()
    }

    /// Where the metrics endpoint listens (a TCP port 0 becomes the real one).
    pub fn metrics_addr(&self) -> Option<String> {
        self.listeners.iter().find_map(|(l, ep)| match (l, ep) {
            (Lst::Tcp(t), Endpoint::Metrics) => t.local_addr().ok().map(|a| a.to_string()),
            (Lst::Unix(u), Endpoint::Metrics) => u.path().map(|p| format!("unix:{}", p.display())),
            _ => None,
        })
    }

    /// Appends what to poll: the listeners, then each client (reading or writing).
    pub fn pollfds(&self, out: &mut Vec<libc::pollfd>) {
        for (l, _) in &self.listeners {
            out.push(pollfd(l.fd(), libc::POLLIN));
        }
        for c in &self.clients {
            let ev = if c.out.len() > c.sent {
                libc::POLLOUT
            } else {
                libc::POLLIN
            };
            out.push(pollfd(c.stream.fd(), ev));
        }
    }

    /// How long until the next client times out.
    pub fn timeout(&self) -> Option<Duration> {
        self.clients
            .iter()
            .map(|c| c.deadline.saturating_duration_since(Instant::now()))
            .min()
    }

    /// Handles what `pollfds` (in that order) reported.
    pub fn handle(&mut self, polled: &[libc::pollfd], h: &mut dyn Handler) {
        let nl = self.listeners.len();
        let ready = |i: usize| polled.get(i).map_or(0, |p| p.revents);
        // Clients first (their indices are the ones polled), then new ones.
        let now = Instant::now();
        let mut keep = Vec::with_capacity(self.clients.len());
        for (i, mut c) in std::mem::take(&mut self.clients).into_iter().enumerate() {
            let rev = ready(nl + i);
            let alive = if rev != 0 {
                if !c.draining {
                    c.deadline = now + IDLE;
                }
                c.service(rev, h)
            } else {
                now < c.deadline
            };
            if alive {
                keep.push(c);
            } else {
                debug!("control: closing a client");
            }
        }
        self.clients = keep;
        for i in 0..nl {
            if ready(i) & libc::POLLIN == 0 {
                continue;
            }
            let (l, ep) = &self.listeners[i];
            // Several may be waiting: take them all, up to the limit.
            loop {
                match l.accept() {
                    Ok(Some(s)) => {
                        if self.clients.len() >= MAX_CLIENTS {
                            // Full: the client idle the longest makes room, so clients that
                            // connect and stay silent cannot lock everyone else out.
                            let oldest = (0..self.clients.len())
                                .min_by_key(|&i| self.clients[i].deadline)
                                .unwrap_or(0);
                            debug!("control: {MAX_CLIENTS} clients; closing the idlest");
                            self.clients.swap_remove(oldest);
                        }
                        set_nonblocking(s.fd());
                        supervisor::keep_from_workers(s.fd());
                        self.clients.push(Client {
                            stream: s,
                            ep: *ep,
                            input: Vec::new(),
                            out: Vec::new(),
                            sent: 0,
                            deadline: now + IDLE,
                            last: false,
                            draining: false,
                        });
                    }
                    Ok(None) => break,
                    Err(e) => {
                        warn!("control: accept: {e}");
                        break;
                    }
                }
            }
        }
    }

    /// Removes the unix socket files (at exit).
    pub fn remove(self) {
        for (l, _) in self.listeners {
            if let Lst::Unix(u) = l {
                if let Err(e) = u.remove() {
                    warn!("{}", crate::error_chain(&e));
                }
            }
        }
    }
}

fn pollfd(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

fn set_nonblocking(fd: RawFd) {
    // SAFETY: fcntl on an fd we own.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
}

impl Client {
    /// Reads, answers, writes what it can. False: close it.
    fn service(&mut self, rev: libc::c_short, h: &mut dyn Handler) -> bool {
        if rev & (libc::POLLERR | libc::POLLNVAL) != 0 {
            return false;
        }
        if self.draining {
            let mut buf = [0u8; 4096];
            for _ in 0..16 {
                match self.stream.read(&mut buf) {
                    Ok(0) => return false,
                    Ok(_) => continue,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return e.kind() == io::ErrorKind::WouldBlock,
                }
            }
            return true;
        }
        if rev & libc::POLLOUT != 0 {
            if !self.flush() {
                return false;
            }
            if self.out.is_empty() && self.ep == Endpoint::Control && !self.draining {
                // Requests that waited for the replies before them.
                self.lines(h);
                return self.flush();
            }
            return true;
        }
        if rev & (libc::POLLIN | libc::POLLHUP) == 0 {
            return true;
        }
        if self.last {
            // Everything after the last request is ignored.
            return self.flush();
        }
        let limit = match self.ep {
            Endpoint::Metrics => MAX_HTTP_HEAD,
            Endpoint::Control => MAX_LINE,
        };
        let mut buf = [0u8; 4096];
        // Read what is there, but never more than the limit (plus one buffer, to see that
        // it was passed).
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => {
                    // The client closed its side: answer what it sent, then close.
                    self.last = true;
                    break;
                }
                Ok(n) => {
                    self.input.extend_from_slice(&buf[..n]);
                    if self.input.len() > limit {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => return false,
            }
        }
        match self.ep {
            Endpoint::Metrics => self.http(h),
            Endpoint::Control => self.lines(h),
        }
        if self.out.is_empty() && self.last {
            return false;
        }
        self.flush()
    }

    fn http(&mut self, h: &mut dyn Handler) {
        let head_end = find(&self.input, b"\r\n\r\n").or_else(|| find(&self.input, b"\n\n"));
        let Some(_) = head_end else {
            if self.input.len() > MAX_HTTP_HEAD {
                self.respond(431, "text/plain", "request head too large\n".into());
            } else if self.last {
                self.respond(400, "text/plain", "incomplete request\n".into());
            }
            return;
        };
        let line = self.input.split(|&b| b == b'\n').next().unwrap_or(&[]);
        let line = String::from_utf8_lossy(line);
        let mut parts = line.split_whitespace();
        let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let path = target.split('?').next().unwrap_or("");
        match (method, path) {
            ("GET" | "HEAD", "/metrics" | "/") => {
                let body = h.metrics();
                let body = if method == "HEAD" {
                    String::new()
                } else {
                    body
                };
                self.respond(
                    200,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    body,
                );
            }
            ("GET" | "HEAD", _) => self.respond(404, "text/plain", "try /metrics\n".into()),
            _ => self.respond(405, "text/plain", "only GET\n".into()),
        }
    }

    fn respond(&mut self, code: u16, ctype: &str, body: String) {
        let reason = match code {
            200 => "OK",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            _ => "Request Header Fields Too Large",
        };
        self.out = format!(
            "HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes();
        self.sent = 0;
        self.last = true;
    }

    fn lines(&mut self, h: &mut dyn Handler) {
        while let Some(end) = self
            .input
            .iter()
            .position(|&b| b == b'\n')
            .filter(|_| self.out.len() < MAX_PENDING_OUT)
        {
            let line: Vec<u8> = self.input.drain(..=end).collect();
            let line = &line[..line.len() - 1];
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let reply = answer(line, h);
            self.out.extend_from_slice(reply.to_string().as_bytes());
            self.out.push(b'\n');
        }
        if self.out.len() >= MAX_PENDING_OUT {
            // The rest waits until the client reads what it asked for.
        } else if self.input.len() > MAX_LINE {
            let e = error(&format!("request longer than {MAX_LINE} bytes"));
            self.out.extend_from_slice(e.to_string().as_bytes());
            self.out.push(b'\n');
            self.input.clear();
            self.last = true;
        } else if self.last && !self.input.is_empty() {
            // A last line without its newline still gets its answer.
            let line = std::mem::take(&mut self.input);
            let reply = answer(&line, h);
            self.out.extend_from_slice(reply.to_string().as_bytes());
            self.out.push(b'\n');
        }
    }

    /// Writes what it can; false when the client is done or gone.
    fn flush(&mut self) -> bool {
        while self.sent < self.out.len() {
            match self.stream.write(&self.out[self.sent..]) {
                Ok(0) => return false,
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(_) => return false,
            }
        }
        self.out.clear();
        self.sent = 0;
        if self.last {
            self.stream.shutdown_write();
            self.draining = true;
        }
        true
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn error(msg: &str) -> serde_json::Value {
    serde_json::json!({ "ok": false, "error": msg })
}

/// One request line's reply.
fn answer(line: &[u8], h: &mut dyn Handler) -> serde_json::Value {
    let req: serde_json::Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => return error(&format!("not JSON: {e}")),
    };
    let Some(obj) = req.as_object() else {
        return error("a request is a JSON object, e.g. {\"command\":\"status\"}");
    };
    let Some(cmd) = obj.get("command").and_then(|c| c.as_str()) else {
        return error("no \"command\" (a string) in the request");
    };
    match h.command(cmd, obj) {
        Ok(serde_json::Value::Object(mut m)) => {
            m.insert("ok".into(), true.into());
            serde_json::Value::Object(m)
        }
        Ok(v) => serde_json::json!({ "ok": true, "result": v }),
        Err(e) => error(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct H;
    impl Handler for H {
        fn metrics(&mut self) -> String {
            "m 1\n# EOF\n".into()
        }
        fn command(
            &mut self,
            c: &str,
            _: &serde_json::Map<String, serde_json::Value>,
        ) -> Result<serde_json::Value, String> {
            match c {
                "status" => Ok(serde_json::json!({"x": 1})),
                _ => Err(format!("unknown command '{c}'")),
            }
        }
    }

    #[test]
    fn addresses() {
        assert_eq!(
            "127.0.0.1:9101".parse::<MetricsAddr>().unwrap(),
            MetricsAddr::Tcp("127.0.0.1:9101".parse().unwrap())
        );
        assert_eq!(
            "unix:/run/m".parse::<MetricsAddr>().unwrap(),
            MetricsAddr::Unix("/run/m".into())
        );
        assert_eq!(
            "/run/m".parse::<MetricsAddr>().unwrap(),
            MetricsAddr::Unix("/run/m".into())
        );
        for bad in ["", "unix:", "localhost", "9101", "1.2.3.4"] {
            assert!(bad.parse::<MetricsAddr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn answers() {
        let a = |s: &str| answer(s.as_bytes(), &mut H);
        assert_eq!(
            a(r#"{"command":"status"}"#),
            serde_json::json!({"ok": true, "x": 1})
        );
        assert!(a("{").to_string().contains("not JSON"));
        assert!(a("[1]").to_string().contains("JSON object"));
        assert!(a(r#"{"cmd":"status"}"#)
            .to_string()
            .contains("no \\\"command\\\""));
        assert!(a(r#"{"command":7}"#)
            .to_string()
            .contains("no \\\"command\\\""));
        assert!(a(r#"{"command":"nope"}"#)
            .to_string()
            .contains("unknown command 'nope'"));
    }
}
