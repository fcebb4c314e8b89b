//! Network block storage over NBD, through libnbd.
//!
//! The NBD URI is parsed here (`nbd://host[:port][/export]`, `nbd+unix:///[export]?socket=PATH`);
//! the supervisor connects the sockets ([`connect`]), before every worker, since the jail has
//! no network and no `socket()`/`connect()`. libnbd then does the handshake and every request
//! over a connected socket it is given ([`Conn::handshake`], `nbd_connect_socket`), in the
//! worker. libnbd is loaded at run time (`dlopen("libnbd.so.0")`, in the supervisor, before
//! any worker exists) so that building vhostbox needs no libnbd and only `--nbd` needs it
//! installed.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::io;
use std::net::TcpStream;
use std::os::fd::{IntoRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

/// The default NBD port.
pub const NBD_PORT: u16 = 10809;

/// Where the NBD server is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Unix(PathBuf),
    Tcp { host: String, port: u16 },
}

/// A parsed `--nbd` URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    pub target: Target,
    pub export: String,
}

impl std::fmt::Display for NbdUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.target {
            Target::Unix(p) => write!(f, "nbd+unix:///{}?socket={}", self.export, p.display()),
            Target::Tcp { host, port } if host.contains(':') => {
                write!(f, "nbd://[{host}]:{port}/{}", self.export)
            }
            Target::Tcp { host, port } => write!(f, "nbd://{host}:{port}/{}", self.export),
        }
    }
}

/// Why a `--nbd` URI cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UriError {
    #[error("'{0}': TLS (nbds) is not supported: tunnel it, or use nbd+unix:// to a local server")]
    Tls(String),
    #[error("'{0}': use nbd://HOST[:PORT][/EXPORT] or nbd+unix:///[EXPORT]?socket=PATH")]
    Scheme(String),
    #[error("'{0}': nbd+unix:// needs ?socket=PATH (an absolute path)")]
    Socket(String),
    #[error("'{0}': no host")]
    Host(String),
    #[error("'{0}': bad port")]
    Port(String),
    #[error("'{0}': query parameters other than socket= are not supported")]
    Query(String),
}

/// Percent-decoding of an export name (`%2F` and the like).
fn unescape(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl std::str::FromStr for NbdUri {
    type Err = UriError;

    /// The NBD URI format (the NBD project's doc/uri.md), without TLS.
    fn from_str(uri: &str) -> Result<Self, UriError> {
        let e = || uri.to_owned();
        let (scheme, rest) = uri.split_once("://").ok_or_else(|| UriError::Scheme(e()))?;
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let export = unescape(path).ok_or_else(|| UriError::Scheme(e()))?;
        match scheme {
            "nbds" | "nbds+unix" => Err(UriError::Tls(e())),
            "nbd+unix" => {
                let socket = query
                    .and_then(|q| q.strip_prefix("socket="))
                    .and_then(unescape)
                    .filter(|s| s.starts_with('/'))
                    .ok_or_else(|| UriError::Socket(e()))?;
                if query.is_some_and(|q| q.contains('&')) {
                    return Err(UriError::Query(e()));
                }
                if !authority.is_empty() {
                    return Err(UriError::Scheme(e()));
                }
                Ok(NbdUri {
                    target: Target::Unix(socket.into()),
                    export,
                })
            }
            "nbd" => {
                if query.is_some() {
                    return Err(UriError::Query(e()));
                }
                let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
                    let (h, p) = v6.split_once(']').ok_or_else(|| UriError::Host(e()))?;
                    (h, p.strip_prefix(':'))
                } else {
                    match authority.rsplit_once(':') {
                        Some((h, p)) => (h, Some(p)),
                        None => (authority, None),
                    }
                };
                if host.is_empty() {
                    return Err(UriError::Host(e()));
                }
                let port = match port {
                    None => NBD_PORT,
                    Some(p) => p
                        .parse::<u16>()
                        .ok()
                        .filter(|&p| p != 0)
                        .ok_or_else(|| UriError::Port(e()))?,
                };
                Ok(NbdUri {
                    target: Target::Tcp {
                        host: host.to_owned(),
                        port,
                    },
                    export,
                })
            }
            _ => Err(UriError::Scheme(e())),
        }
    }
}

/// Connects a socket to the server (no handshake: libnbd does that over it). Runs in the
/// supervisor.
pub fn connect(uri: &NbdUri) -> io::Result<RawFd> {
    match &uri.target {
        Target::Unix(p) => Ok(UnixStream::connect(p)?.into_raw_fd()),
        Target::Tcp { host, port } => {
            let s = TcpStream::connect((host.as_str(), *port))?;
            s.set_nodelay(true)?;
            Ok(s.into_raw_fd())
        }
    }
}

type Handle = *mut c_void;

/// The libnbd calls used, resolved from the shared library.
struct Lib {
    create: unsafe extern "C" fn() -> Handle,
    close: unsafe extern "C" fn(Handle),
    get_error: unsafe extern "C" fn() -> *const c_char,
    get_errno: unsafe extern "C" fn() -> c_int,
    set_export_name: unsafe extern "C" fn(Handle, *const c_char) -> c_int,
    connect_socket: unsafe extern "C" fn(Handle, c_int) -> c_int,
    get_size: unsafe extern "C" fn(Handle) -> i64,
    is_read_only: unsafe extern "C" fn(Handle) -> c_int,
    can_flush: unsafe extern "C" fn(Handle) -> c_int,
    can_trim: unsafe extern "C" fn(Handle) -> c_int,
    can_zero: unsafe extern "C" fn(Handle) -> c_int,
    can_multi_conn: unsafe extern "C" fn(Handle) -> c_int,
    can_fua: unsafe extern "C" fn(Handle) -> c_int,
    pread: unsafe extern "C" fn(Handle, *mut c_void, usize, u64, u32) -> c_int,
    pwrite: unsafe extern "C" fn(Handle, *const c_void, usize, u64, u32) -> c_int,
    flush: unsafe extern "C" fn(Handle, u32) -> c_int,
    trim: unsafe extern "C" fn(Handle, u64, u64, u32) -> c_int,
    zero: unsafe extern "C" fn(Handle, u64, u64, u32) -> c_int,
    shutdown: unsafe extern "C" fn(Handle, u32) -> c_int,
    aio_is_dead: unsafe extern "C" fn(Handle) -> c_int,
}

const CMD_FLAG_FUA: u32 = 0x01;
const CMD_FLAG_NO_HOLE: u32 = 0x02;

static LIB: OnceLock<Result<Lib, String>> = OnceLock::new();

/// The library's name, as Debian's libnbd0 installs it.
const SONAME: &CStr = c"libnbd.so.0";

fn sym(h: *mut c_void, name: &CStr) -> Result<*mut c_void, String> {
    // SAFETY: dlsym on a handle dlopen returned, with a NUL-terminated name.
    let p = unsafe { libc::dlsym(h, name.as_ptr()) };
    if p.is_null() {
        return Err(format!(
            "libnbd has no {}: too old (1.14 or later is needed)",
            name.to_string_lossy()
        ));
    }
    Ok(p)
}

/// Loads libnbd (once). Call it in the supervisor, before any worker: workers inherit it.
// Each transmute's target type is its field's, spelled out once in `Lib`.
#[allow(clippy::missing_transmute_annotations)]
pub fn load() -> Result<(), String> {
    LIB.get_or_init(|| {
        // SAFETY: dlopen with a NUL-terminated name; the handle is never closed.
        let h = unsafe { libc::dlopen(SONAME.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if h.is_null() {
            return Err(
                "cannot load libnbd.so.0, which --nbd needs (Debian: apt install libnbd0)".into(),
            );
        }
        macro_rules! f {
            ($name:literal) => {
                // SAFETY: the symbol is libnbd's function of that name; the field's type is
                // its C prototype from libnbd.h (pointers as *mut c_void, sizes as in C).
                unsafe { std::mem::transmute::<*mut c_void, _>(sym(h, $name)?) }
            };
        }
        Ok(Lib {
            create: f!(c"nbd_create"),
            close: f!(c"nbd_close"),
            get_error: f!(c"nbd_get_error"),
            get_errno: f!(c"nbd_get_errno"),
            set_export_name: f!(c"nbd_set_export_name"),
            connect_socket: f!(c"nbd_connect_socket"),
            get_size: f!(c"nbd_get_size"),
            is_read_only: f!(c"nbd_is_read_only"),
            can_flush: f!(c"nbd_can_flush"),
            can_trim: f!(c"nbd_can_trim"),
            can_zero: f!(c"nbd_can_zero"),
            can_multi_conn: f!(c"nbd_can_multi_conn"),
            can_fua: f!(c"nbd_can_fua"),
            pread: f!(c"nbd_pread"),
            pwrite: f!(c"nbd_pwrite"),
            flush: f!(c"nbd_flush"),
            trim: f!(c"nbd_trim"),
            zero: f!(c"nbd_zero"),
            shutdown: f!(c"nbd_shutdown"),
            aio_is_dead: f!(c"nbd_aio_is_dead"),
        })
    })
    .as_ref()
    .map(|_| ())
    .map_err(Clone::clone)
}

fn lib() -> &'static Lib {
    match LIB.get() {
        Some(Ok(l)) => l,
        _ => panic!("nbd::load was not called"),
    }
}

/// What the server offers for an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    pub read_only: bool,
    pub can_flush: bool,
    pub can_trim: bool,
    pub can_zero: bool,
    pub can_multi_conn: bool,
    pub can_fua: bool,
}

/// One NBD connection (a libnbd handle), past its handshake.
pub struct Conn {
    h: Handle,
    pub info: ExportInfo,
    /// The socket (libnbd owns it), for the jail's keep-list.
    pub fd: RawFd,
    /// One request at a time on a connection: queues that share one take turns.
    turn: Mutex<()>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("fd", &self.fd)
            .field("info", &self.info)
            .finish()
    }
}

// SAFETY: a libnbd handle may be used from any thread (libnbd serialises calls on a handle
// with its own lock); we also take `turn` around every request.
unsafe impl Send for Conn {}
// SAFETY: as above.
unsafe impl Sync for Conn {}

/// libnbd's error for the last call on this thread, as an io::Error.
fn last_error() -> io::Error {
    let l = lib();
    // SAFETY: both read libnbd's thread-local error; the string is valid until the next call.
    let (errno, msg) = unsafe {
        let m = (l.get_error)();
        let msg = if m.is_null() {
            String::from("unknown libnbd error")
        } else {
            CStr::from_ptr(m).to_string_lossy().into_owned()
        };
        ((l.get_errno)(), msg)
    };
    let kind = io::Error::from_raw_os_error(if errno == 0 { libc::EIO } else { errno }).kind();
    io::Error::new(kind, msg)
}

fn check(r: c_int) -> io::Result<()> {
    if r < 0 {
        Err(last_error())
    } else {
        Ok(())
    }
}

impl Conn {
    /// Runs the NBD handshake over the connected socket `fd` (which the handle then owns,
    /// whatever the outcome) for `export`.
    pub fn handshake(fd: RawFd, export: &str) -> io::Result<Conn> {
        let l = lib();
        let name = CString::new(export).map_err(|_| io::Error::other("NUL in export name"))?;
        // SAFETY: nbd_create has no arguments; a null result is an error.
        let h = unsafe { (l.create)() };
        if h.is_null() {
            // SAFETY: fd is ours to close when no handle took it.
            unsafe { libc::close(fd) };
            return Err(last_error());
        }
        // Dropping it (on an error below) closes the handle, and the socket once it owns it.
        let mut conn = Conn {
            h,
            info: ExportInfo {
                size: 0,
                read_only: true,
                can_flush: false,
                can_trim: false,
                can_zero: false,
                can_multi_conn: false,
                can_fua: false,
            },
            fd,
            turn: Mutex::new(()),
        };
        // SAFETY: a live handle and a NUL-terminated name (libnbd copies it).
        if let Err(e) = check(unsafe { (l.set_export_name)(h, name.as_ptr()) }) {
            // SAFETY: the handle did not take fd.
            unsafe { libc::close(fd) };
            return Err(e);
        }
        // SAFETY: a live handle; it takes ownership of fd (and closes it in nbd_close).
        check(unsafe { (l.connect_socket)(h, fd) })?;
        let flag = |f: unsafe extern "C" fn(Handle) -> c_int| {
            // SAFETY: a live, connected handle.
            (unsafe { f(h) }) == 1
        };
        // SAFETY: a live, connected handle.
        let size = unsafe { (l.get_size)(h) };
        if size < 0 {
            return Err(last_error());
        }
        conn.info = ExportInfo {
            size: size as u64,
            read_only: flag(l.is_read_only),
            can_flush: flag(l.can_flush),
            can_trim: flag(l.can_trim),
            can_zero: flag(l.can_zero),
            can_multi_conn: flag(l.can_multi_conn),
            can_fua: flag(l.can_fua),
        };
        Ok(conn)
    }

    /// Whether the connection is gone (the server closed it or failed): nothing more can
    /// be done on it.
    pub fn is_dead(&self) -> bool {
        // SAFETY: a live handle.
        (unsafe { (lib().aio_is_dead)(self.h) }) == 1
    }

    /// Reads `len` bytes at `offset` into `buf`.
    ///
    /// # Safety
    /// `buf` must be valid for `len` bytes of writes for the call.
    pub unsafe fn pread(&self, buf: *mut u8, len: usize, offset: u64) -> io::Result<()> {
        let _t = self.turn.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: the caller's contract on buf; a live handle.
        check(unsafe { (lib().pread)(self.h, buf.cast(), len, offset, 0) })
    }

    /// Writes `len` bytes from `buf` at `offset`; `fua`: durable when it completes.
    ///
    /// # Safety
    /// `buf` must be valid for `len` bytes of reads for the call.
    pub unsafe fn pwrite(
        &self,
        buf: *const u8,
        len: usize,
        offset: u64,
        fua: bool,
    ) -> io::Result<()> {
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        let _t = self.turn.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: the caller's contract on buf; a live handle.
        check(unsafe { (lib().pwrite)(self.h, buf.cast(), len, offset, flags) })
    }

    pub fn flush(&self) -> io::Result<()> {
        if !self.info.can_flush {
            return Ok(());
        }
        let _t = self.turn.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: a live handle.
        check(unsafe { (lib().flush)(self.h, 0) })
    }

    /// Discards a range (a hint: a server that cannot keeps the data).
    pub fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        if !self.info.can_trim {
            return Ok(());
        }
        let _t = self.turn.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: a live handle.
        check(unsafe { (lib().trim)(self.h, len, offset, 0) })
    }

    /// Makes a range read back as zeros (`unmap`: it may be deallocated). False when the
    /// server has no WRITE_ZEROES: the caller writes zeros.
    pub fn zero(&self, offset: u64, len: u64, unmap: bool) -> io::Result<bool> {
        if !self.info.can_zero {
            return Ok(false);
        }
        let flags = if unmap { 0 } else { CMD_FLAG_NO_HOLE };
        let _t = self.turn.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: a live handle.
        check(unsafe { (lib().zero)(self.h, len, offset, flags) })?;
        Ok(true)
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let l = lib();
        // SAFETY: a live handle, closed once here. Shutdown sends NBD_CMD_DISC (the server
        // then knows the client left on purpose); it fails harmlessly on a dead connection.
        unsafe {
            (l.shutdown)(self.h, 0);
            (l.close)(self.h);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<NbdUri, UriError> {
        s.parse()
    }

    #[test]
    fn uris() {
        assert_eq!(
            p("nbd://example.com").unwrap(),
            NbdUri {
                target: Target::Tcp {
                    host: "example.com".into(),
                    port: NBD_PORT
                },
                export: String::new()
            }
        );
        assert_eq!(
            p("nbd://10.0.0.1:10810/disk%201").unwrap(),
            NbdUri {
                target: Target::Tcp {
                    host: "10.0.0.1".into(),
                    port: 10810
                },
                export: "disk 1".into()
            }
        );
        let v6 = p("nbd://[::1]:2000/e").unwrap();
        assert_eq!(
            v6.target,
            Target::Tcp {
                host: "::1".into(),
                port: 2000
            }
        );
        assert_eq!(v6.to_string(), "nbd://[::1]:2000/e");
        let u = p("nbd+unix:///vm1?socket=/run/nbd.sock").unwrap();
        assert_eq!(u.target, Target::Unix("/run/nbd.sock".into()));
        assert_eq!(u.export, "vm1");
        assert_eq!(u.to_string(), "nbd+unix:///vm1?socket=/run/nbd.sock");
        assert_eq!(p("nbd+unix://?socket=/s").unwrap().export, "");
    }

    #[test]
    fn bad_uris() {
        for (s, want) in [
            ("nbds://h/e", "TLS"),
            ("nbds+unix:///e?socket=/s", "TLS"),
            ("http://h/e", "use nbd://"),
            ("/dev/nbd0", "use nbd://"),
            ("nbd+unix:///e", "socket=PATH"),
            ("nbd+unix:///e?socket=rel", "socket=PATH"),
            ("nbd+unix:///e?socket=/s&tls=on", "other than socket"),
            ("nbd://:10809/e", "no host"),
            ("nbd://h:0/e", "bad port"),
            ("nbd://h:99999/e", "bad port"),
            ("nbd://h:x/e", "bad port"),
            ("nbd://h/e?tls=on", "other than socket"),
            ("nbd://h/%zz", "use nbd://"),
        ] {
            let e = p(s).expect_err(s).to_string();
            assert!(e.contains(want), "{s}: {e}");
        }
    }
}
