//! The backing store: a raw image file, a host block device, or a null device.
//!
//! Everything here is opened and measured before the process could be sandboxed; afterwards
//! only the fd is used. Data-path I/O (read, write, flush) goes through an [`crate::engine`];
//! the rare management operations (discard, write-zeroes) are done here, synchronously.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use crate::image::{Chain, Format, Image, ImageError, Layer};
use crate::nbd::{Conn, ExportInfo, NbdUri};

/// Errors while opening the backing store.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot open image {0}")]
    Open(PathBuf, #[source] io::Error),
    #[error("image {0} is neither a regular file nor a block device")]
    NotAFileOrDevice(PathBuf),
    #[error("cannot get the size of {0}")]
    Size(PathBuf, #[source] io::Error),
    #[error(
        "size of {path} ({size} bytes) is not a multiple of the logical block size {block_size}"
    )]
    Unaligned {
        path: PathBuf,
        size: u64,
        block_size: u32,
    },
    #[error("image {0} is empty")]
    Empty(PathBuf),
    #[error("--logical-block-size {requested} is smaller than the host device's {host} bytes")]
    BlockSizeTooSmall { requested: u32, host: u32 },
    #[error("null device size {0} is not a positive multiple of the logical block size {1}")]
    NullSize(u64, u32),
    #[error(transparent)]
    Lock(#[from] crate::lock::LockError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("{0}")]
    NbdLib(String),
    #[error("cannot reach the NBD server of {0}")]
    NbdConnect(String, #[source] io::Error),
    #[error("NBD handshake with {0} failed")]
    NbdHandshake(String, #[source] io::Error),
    #[error("the NBD export {0} is read-only: give --readonly")]
    NbdReadOnly(String),
    #[error("the NBD export {0} is empty")]
    NbdEmpty(String),
}

/// The largest size `resize` sets (1 PiB).
pub const MAX_DISK_BYTES: u64 = 1 << 50;

/// Why a resize was refused (nothing changed).
#[derive(Debug, thiserror::Error)]
pub enum ResizeError {
    #[error(
        "a block device's size is its own: grow the device (lvextend, losetup -c, ...), then \
         resize with no size to take up the new one"
    )]
    BlockDeviceSize,
    #[error("the null device has no backing to re-read: give a size")]
    NullReread,
    #[error("the device is read-only: its image is not resized (to {0} bytes)")]
    ReadOnly(u64),
    #[error("{0} bytes is not a positive multiple of the logical block size {1}")]
    Unaligned(u64, u32),
    #[error("{0} bytes is more than the largest size, {MAX_DISK_BYTES}")]
    TooLarge(u64),
    #[error(
        "shrinking from {old} to {new} bytes cuts off data the guest may use: refused unless \
         forced"
    )]
    Shrink { old: u64, new: u64 },
    #[error("cannot resize the image")]
    Io(#[source] io::Error),
    #[error("a qcow2 image's size is in its header, not its file: give a size")]
    Qcow2Reread,
    #[error(
        "shrinking a qcow2 image ({old} to {new} bytes) is not supported, even forced (stop \
         the device, then qemu-img resize --shrink)"
    )]
    Qcow2Shrink { old: u64, new: u64 },
    #[error("an NBD export's size is the server's: resize it there (not supported yet)")]
    Nbd,
}

/// What kind of backing store it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskKind {
    File,
    BlockDevice,
    Null,
    /// An export of an NBD server.
    Nbd,
}

/// An NBD-backed disk: where the server is, and the connections.
#[derive(Debug)]
struct Nbd {
    uri: NbdUri,
    /// Connections per worker: one per queue where the server allows several
    /// (NBD_FLAG_CAN_MULTI_CONN), else one that the queues share.
    connections: usize,
    /// What the supervisor's own handshake at start-up found.
    info: ExportInfo,
    /// Sockets connected for the next worker (supervisor: made before the fork, closed
    /// after; the worker takes its copies).
    pending: std::sync::Mutex<Vec<RawFd>>,
    /// The worker's connections, past their handshake.
    conns: OnceLock<Vec<Arc<Conn>>>,
}

/// Host I/O topology to advertise (VIRTIO_BLK_F_TOPOLOGY).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topology {
    /// log2(physical block size / logical block size)
    pub physical_block_exp: u8,
    pub alignment_offset: u8,
    /// Suggested minimum I/O size, in logical blocks.
    pub min_io_size: u16,
    /// Optimal I/O size, in logical blocks.
    pub opt_io_size: u32,
}

impl Topology {
    /// No hints: blocks are the logical block size, no preferred I/O size.
    pub const NONE: Topology = Topology {
        physical_block_exp: 0,
        alignment_offset: 0,
        min_io_size: 1,
        opt_io_size: 0,
    };
}

/// An opened backing store.
#[derive(Debug)]
pub struct Disk {
    file: Option<File>,
    pub kind: DiskKind,
    /// Size in bytes (a multiple of `block_size`); changes with `resize`.
    size: AtomicU64,
    pub block_size: u32,
    pub topology: Topology,
    pub readonly: bool,
    /// The format of `file`: qcow2 images are served through [`Image`].
    pub format: Format,
    /// The image's path (qcow2: for imago's messages) and whether it is opened O_DIRECT.
    path: Option<PathBuf>,
    direct: bool,
    /// A qcow2 image's backing chain, nearest first (opened and locked by the supervisor).
    below: Vec<Layer>,
    /// The worker's open qcow2 chain ([`Disk::open_format`]); None for raw images.
    image: OnceLock<Arc<Image>>,
    nbd: Option<Nbd>,
}

const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKSSZGET: libc::c_ulong = 0x1268;
const BLKPBSZGET: libc::c_ulong = 0x127b;
const BLKIOMIN: libc::c_ulong = 0x1278;
const BLKIOOPT: libc::c_ulong = 0x1279;
const BLKALIGNOFF: libc::c_ulong = 0x127a;
const BLKDISCARD: libc::c_ulong = 0x1277;
const BLKZEROOUT: libc::c_ulong = 0x127f;

fn ioctl_u32(fd: RawFd, req: libc::c_ulong) -> io::Result<u32> {
    let mut v: libc::c_uint = 0;
    // SAFETY: these BLK* ioctls write one unsigned int to the pointer we pass.
    let r = unsafe { libc::ioctl(fd, req, &mut v as *mut libc::c_uint) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

fn ioctl_range(fd: RawFd, req: libc::c_ulong, offset: u64, len: u64) -> io::Result<()> {
    let range: [u64; 2] = [offset, len];
    // SAFETY: BLKDISCARD and BLKZEROOUT read two u64 (offset, length) from the pointer.
    let r = unsafe { libc::ioctl(fd, req, range.as_ptr()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn fallocate(fd: RawFd, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    loop {
        // SAFETY: fallocate has no memory arguments.
        let r = unsafe { libc::fallocate(fd, mode, offset as libc::off_t, len as libc::off_t) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Host I/O hints in bytes: physical block size, minimum I/O, optimal I/O, alignment offset.
type HostTopology = (u32, u32, u32, u32);

/// A block device's size, logical block size and I/O hints, from its ioctls.
fn block_device_geometry(fd: RawFd) -> io::Result<(u64, u32, HostTopology)> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 to the pointer.
    if unsafe { libc::ioctl(fd, BLKGETSIZE64, &mut size as *mut u64) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let lbs = ioctl_u32(fd, BLKSSZGET).unwrap_or(512);
    let pbs = ioctl_u32(fd, BLKPBSZGET).unwrap_or(lbs);
    let iomin = ioctl_u32(fd, BLKIOMIN).unwrap_or(0);
    let ioopt = ioctl_u32(fd, BLKIOOPT).unwrap_or(0);
    let align = ioctl_u32(fd, BLKALIGNOFF).unwrap_or(0);
    Ok((size, lbs, (pbs, iomin, ioopt, align)))
}

/// The file system block of an image file: the unit below which writes are
/// read-modify-write, advertised as its physical block (4096 if it cannot be told).
fn fs_block_size(fd: RawFd) -> u32 {
    // SAFETY: statfs is a plain C struct of integers: all-zero bytes are a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs fills the statfs struct we own.
    let fsbs = if unsafe { libc::fstatfs(fd, &mut st) } == 0 {
        st.f_bsize as u32
    } else {
        4096
    };
    if fsbs.is_power_of_two() && fsbs <= 65536 {
        fsbs
    } else {
        4096
    }
}

fn log2(v: u32) -> u8 {
    if v == 0 {
        0
    } else {
        (31 - v.leading_zeros()) as u8
    }
}

impl Disk {
    /// Opens a raw image file or block device (no probing: see [`Disk::open_as`]).
    pub fn open(
        path: &Path,
        readonly: bool,
        direct: bool,
        block_size: Option<u32>,
    ) -> Result<Self, DiskError> {
        Self::open_with(path, readonly, direct, block_size, None, false)
    }

    /// Opens an image file or block device. `block_size` is the logical block size to expose
    /// (None: the device's own for block devices, 512 for files). The format is probed and
    /// must be `format` when that is given; a qcow2 image's backing chain is opened too, and
    /// with `lock_chain` its files are locked against writers.
    pub fn open_as(
        path: &Path,
        readonly: bool,
        direct: bool,
        block_size: Option<u32>,
        format: Option<Format>,
        lock_chain: bool,
    ) -> Result<Self, DiskError> {
        Self::open_with(path, readonly, direct, block_size, Some(format), lock_chain)
    }

    /// `format`: None for raw without probing (unit tests), else as for `open_as`.
    fn open_with(
        path: &Path,
        readonly: bool,
        direct: bool,
        block_size: Option<u32>,
        format: Option<Option<Format>>,
        lock_chain: bool,
    ) -> Result<Self, DiskError> {
        let mut opts = OpenOptions::new();
        opts.read(true).write(!readonly);
        let mut flags = libc::O_CLOEXEC;
        if direct {
            flags |= libc::O_DIRECT;
        }
        opts.custom_flags(flags);
        let file = opts
            .open(path)
            .map_err(|e| DiskError::Open(path.to_owned(), e))?;
        let meta = file
            .metadata()
            .map_err(|e| DiskError::Size(path.to_owned(), e))?;
        let fd = file.as_raw_fd();
        let (kind, size, host_lbs, topo) = if meta.file_type().is_block_device() {
            let (size, lbs, topo) =
                block_device_geometry(fd).map_err(|e| DiskError::Size(path.to_owned(), e))?;
            (DiskKind::BlockDevice, size, lbs, topo)
        } else if meta.file_type().is_file() {
            (
                DiskKind::File,
                meta.len(),
                512,
                (fs_block_size(fd), 0, 0, 0),
            )
        } else {
            return Err(DiskError::NotAFileOrDevice(path.to_owned()));
        };
        let chain = match format {
            None => Chain {
                format: Format::Raw,
                size: 0,
                below: Vec::new(),
            },
            Some(given) => crate::image::open_chain(path, &file, given, direct, lock_chain)?,
        };
        let size = if chain.format == Format::Qcow2 {
            chain.size
        } else {
            size
        };
        let block_size = block_size.unwrap_or(host_lbs);
        if block_size < host_lbs {
            return Err(DiskError::BlockSizeTooSmall {
                requested: block_size,
                host: host_lbs,
            });
        }
        if size == 0 {
            return Err(DiskError::Empty(path.to_owned()));
        }
        if !size.is_multiple_of(u64::from(block_size)) {
            return Err(DiskError::Unaligned {
                path: path.to_owned(),
                size,
                block_size,
            });
        }
        let (pbs, iomin, ioopt, align) = topo;
        let pbs = pbs.max(block_size);
        let topology = Topology {
            physical_block_exp: log2(pbs / block_size),
            alignment_offset: (align / block_size).min(255) as u8,
            min_io_size: (iomin / block_size).clamp(1, u32::from(u16::MAX)) as u16,
            opt_io_size: ioopt / block_size,
        };
        Ok(Self {
            file: Some(file),
            kind,
            size: AtomicU64::new(size),
            block_size,
            topology,
            readonly,
            format: chain.format,
            path: Some(path.to_owned()),
            direct,
            below: chain.below,
            image: OnceLock::new(),
            nbd: None,
        })
    }

    /// The worker's side of a qcow2 image: opens the chain from duplicates of the
    /// supervisor's fds (before the jail) and returns the fds to keep. Nothing for raw images;
    /// in a process that already opened it (`--sandbox none`), the open chain is kept.
    pub fn open_format(&self) -> io::Result<Vec<RawFd>> {
        if self.format != Format::Qcow2 {
            return Ok(Vec::new());
        }
        if let Some(img) = self.image.get() {
            return Ok(img.fds.clone());
        }
        let (Some(file), Some(path)) = (&self.file, &self.path) else {
            return Ok(Vec::new());
        };
        let img = Image::build(file, path, &self.below, self.readonly, self.direct)?;
        // A resize the supervisor took while no worker had the image open.
        if img.size() < self.size() && !self.readonly {
            img.grow(self.size())?;
        }
        self.set_size(img.size());
        let fds = img.fds.clone();
        let _ = self.image.set(Arc::new(img));
        Ok(fds)
    }

    /// The worker's side of a resize to `size`: a qcow2 image's virtual size grows (through
    /// its open chain); for raw images the supervisor already grew the file.
    pub fn grow(&self, size: u64) -> io::Result<()> {
        if let Some(img) = self.image() {
            img.grow(size)?;
        }
        self.set_size(size);
        Ok(())
    }

    /// The open qcow2 chain, once [`Disk::open_format`] made it.
    pub fn image(&self) -> Option<&Arc<Image>> {
        self.image.get()
    }

    /// The files of a qcow2 image's backing chain, nearest first, with their formats.
    pub fn chain(&self) -> impl Iterator<Item = (&Path, Format)> {
        self.below.iter().map(|l| (l.path.as_path(), l.format))
    }

    /// A device of `size` bytes that reads zeros and drops writes.
    pub fn null(size: u64, block_size: u32, readonly: bool) -> Result<Self, DiskError> {
        if size == 0 || !size.is_multiple_of(u64::from(block_size)) {
            return Err(DiskError::NullSize(size, block_size));
        }
        Ok(Self::fileless(
            DiskKind::Null,
            size,
            block_size,
            readonly,
            None,
        ))
    }

    /// A disk with no local file (null, NBD).
    fn fileless(
        kind: DiskKind,
        size: u64,
        block_size: u32,
        readonly: bool,
        nbd: Option<Nbd>,
    ) -> Self {
        Self {
            file: None,
            kind,
            size: AtomicU64::new(size),
            block_size,
            topology: Topology::NONE,
            readonly,
            format: Format::Raw,
            path: None,
            direct: false,
            below: Vec::new(),
            image: OnceLock::new(),
            nbd,
        }
    }

    /// An NBD export (`--nbd`): loads libnbd, connects and shakes hands once to learn the
    /// export's size and what the server offers, then lets go. Workers get connections of
    /// their own ([`Disk::nbd_prepare`]). `queues` connections per worker where the server
    /// allows several.
    pub fn nbd(
        uri: &NbdUri,
        readonly: bool,
        block_size: u32,
        queues: usize,
    ) -> Result<Self, DiskError> {
        crate::nbd::load().map_err(DiskError::NbdLib)?;
        let name = uri.to_string();
        let fd = crate::nbd::connect(uri).map_err(|e| DiskError::NbdConnect(name.clone(), e))?;
        let info = Conn::handshake(fd, &uri.export)
            .map_err(|e| DiskError::NbdHandshake(name.clone(), e))?
            .info;
        if info.read_only && !readonly {
            return Err(DiskError::NbdReadOnly(name));
        }
        if info.size == 0 {
            return Err(DiskError::NbdEmpty(name));
        }
        if !info.size.is_multiple_of(u64::from(block_size)) {
            return Err(DiskError::Unaligned {
                path: name.into(),
                size: info.size,
                block_size,
            });
        }
        let nbd = Nbd {
            uri: uri.clone(),
            connections: if info.can_multi_conn {
                queues.max(1)
            } else {
                1
            },
            info,
            pending: std::sync::Mutex::new(Vec::new()),
            conns: OnceLock::new(),
        };
        Ok(Self::fileless(
            DiskKind::Nbd,
            info.size,
            block_size,
            readonly,
            Some(nbd),
        ))
    }

    /// The supervisor's side, before a worker is forked: connects its sockets.
    pub fn nbd_prepare(&self) -> Result<(), String> {
        let Some(n) = &self.nbd else { return Ok(()) };
        let mut pending = n.pending.lock().unwrap_or_else(|e| e.into_inner());
        for _ in pending.len()..n.connections {
            match crate::nbd::connect(&n.uri) {
                Ok(fd) => pending.push(fd),
                Err(e) => return Err(format!("cannot reach the NBD server of {}: {e}", n.uri)),
            }
        }
        Ok(())
    }

    /// The supervisor's side, after a worker was forked: closes its copies of the sockets.
    pub fn nbd_spawned(&self) {
        let Some(n) = &self.nbd else { return };
        for fd in n
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            // SAFETY: a socket nbd_prepare connected and nothing else holds in this process.
            unsafe { libc::close(fd) };
        }
    }

    /// The worker's side: the handshake on each socket the supervisor connected for it.
    /// The export must not have changed size. Returns the sockets, for the jail.
    pub fn nbd_open(&self) -> io::Result<Vec<RawFd>> {
        let Some(n) = &self.nbd else {
            return Ok(Vec::new());
        };
        if let Some(c) = n.conns.get() {
            return Ok(c.iter().map(|c| c.fd).collect());
        }
        let fds: Vec<RawFd> = n
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect();
        if fds.is_empty() {
            return Err(io::Error::other(
                "no NBD connection was made for this worker",
            ));
        }
        let mut conns = Vec::new();
        let mut fds = fds.into_iter();
        while let Some(fd) = fds.next() {
            match Conn::handshake(fd, &n.uri.export) {
                Ok(c) if c.info.size != n.info.size => {
                    fds.for_each(|fd| {
                        // SAFETY: sockets this worker owns and no handle took.
                        unsafe { libc::close(fd) };
                    });
                    return Err(io::Error::other(format!(
                        "the NBD export changed size from {} to {} bytes",
                        n.info.size, c.info.size
                    )));
                }
                Ok(c) => conns.push(Arc::new(c)),
                Err(e) => {
                    fds.for_each(|fd| {
                        // SAFETY: as above.
                        unsafe { libc::close(fd) };
                    });
                    return Err(e);
                }
            }
        }
        let fds = conns.iter().map(|c| c.fd).collect();
        let _ = n.conns.set(conns);
        Ok(fds)
    }

    /// The connection queue `i` uses (NBD disks, once the worker made them).
    pub fn nbd_conn(&self, i: usize) -> Option<Arc<Conn>> {
        let c = self.nbd.as_ref()?.conns.get()?;
        Some(c[i % c.len()].clone())
    }

    /// The NBD export and its connections per worker, for the log.
    pub fn nbd_summary(&self) -> Option<String> {
        let n = self.nbd.as_ref()?;
        Some(format!(
            "NBD export {} ({} connection(s) per worker{}{}{})",
            n.uri,
            n.connections,
            if n.info.can_multi_conn {
                ", multi-conn"
            } else {
                ""
            },
            if n.info.can_trim { ", trim" } else { "" },
            if n.info.can_zero {
                ", write-zeroes"
            } else {
                ""
            },
        ))
    }

    /// The open image (None for the null device).
    pub fn file(&self) -> Option<&File> {
        self.file.as_ref()
    }

    /// The image's fd (None for the null device).
    pub fn fd(&self) -> Option<RawFd> {
        self.file.as_ref().map(|f| f.as_raw_fd())
    }

    /// Capacity in bytes.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    /// Capacity in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.size() >> 9
    }

    /// The worker's side of a resize the supervisor made: the capacity it checks requests
    /// against and reports in the config space.
    pub fn set_size(&self, size: u64) {
        self.size.store(size, Ordering::Relaxed);
    }

    /// The supervisor's side of `resize`: `want` is the new size (the image file is grown or
    /// cut to it, the null device takes it), or None to take up a size that changed under
    /// the device (a grown block device or file). Shrinking cuts off data the guest may use
    /// and is refused unless `force`. Returns the old and the new size.
    pub fn resize(&self, want: Option<u64>, force: bool) -> Result<(u64, u64), ResizeError> {
        let old = self.size();
        let bs = u64::from(self.block_size);
        if self.kind == DiskKind::Nbd {
            return Err(ResizeError::Nbd);
        }
        let new = match (self.kind, want) {
            (DiskKind::BlockDevice, Some(_)) => return Err(ResizeError::BlockDeviceSize),
            (DiskKind::Null, None) => return Err(ResizeError::NullReread),
            (_, Some(n)) if self.readonly => return Err(ResizeError::ReadOnly(n)),
            (_, None) if self.format == Format::Qcow2 => return Err(ResizeError::Qcow2Reread),
            (_, Some(n)) => n,
            (DiskKind::BlockDevice, None) => {
                let fd = self.fd().ok_or(ResizeError::NullReread)?;
                block_device_geometry(fd).map_err(ResizeError::Io)?.0
            }
            (_, None) => self
                .file
                .as_ref()
                .ok_or(ResizeError::NullReread)?
                .metadata()
                .map_err(ResizeError::Io)?
                .len(),
        };
        if new == 0 || !new.is_multiple_of(bs) {
            return Err(ResizeError::Unaligned(new, self.block_size));
        }
        if new > MAX_DISK_BYTES {
            return Err(ResizeError::TooLarge(new));
        }
        if self.format == Format::Qcow2 && new < old {
            return Err(ResizeError::Qcow2Shrink { old, new });
        }
        if want.is_some() && new < old && !force {
            return Err(ResizeError::Shrink { old, new });
        }
        // A qcow2 image is grown by the worker, whose imago holds its metadata
        // ([`Disk::grow`]); one that starts later grows it to this size ([`Disk::open_format`]).
        if let (Some(f), Some(n), DiskKind::File, Format::Raw) =
            (&self.file, want, self.kind, self.format)
        {
            f.set_len(n).map_err(ResizeError::Io)?;
        }
        self.set_size(new);
        Ok((old, new))
    }

    /// Makes data written so far durable.
    pub fn flush(&self) -> io::Result<()> {
        if let Some(conns) = self.nbd.as_ref().and_then(|n| n.conns.get()) {
            if self.readonly {
                return Ok(());
            }
            return conns.iter().try_for_each(|c| c.flush());
        }
        if let Some(img) = self.image() {
            return if self.readonly { Ok(()) } else { img.flush() };
        }
        match &self.file {
            Some(f) if !self.readonly => f.sync_data(),
            _ => Ok(()),
        }
    }

    /// Discards a byte range: a hint, the content afterwards is unspecified.
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        if let Some(img) = self.image() {
            return img.discard(offset, len);
        }
        if let Some(c) = self.nbd_conn(0) {
            return crate::engine::nbd_result(&c, c.trim(offset, len));
        }
        let Some(fd) = self.fd() else { return Ok(()) };
        let r = match self.kind {
            DiskKind::BlockDevice => ioctl_range(fd, BLKDISCARD, offset, len),
            _ => fallocate(
                fd,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            ),
        };
        match r {
            // Discard is advisory: a store that cannot deallocate simply keeps the data.
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
            r => r,
        }
    }

    /// Makes a byte range read back as zeros. With `unmap`, the space may be deallocated.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if let Some(img) = self.image() {
            return img.write_zeroes(offset, len, unmap);
        }
        if let Some(c) = self.nbd_conn(0) {
            if crate::engine::nbd_result(&c, c.zero(offset, len, unmap))? {
                return Ok(());
            }
            // No WRITE_ZEROES on this server: write zeros.
            let zeros = vec![0u8; 1 << 20];
            let mut off = offset;
            while off < offset + len {
                let n = ((offset + len - off) as usize).min(zeros.len());
                // SAFETY: zeros holds at least n bytes.
                let r = unsafe { c.pwrite(zeros.as_ptr(), n, off, false) };
                crate::engine::nbd_result(&c, r)?;
                off += n as u64;
            }
            return Ok(());
        }
        let Some(fd) = self.fd() else { return Ok(()) };
        if self.kind == DiskKind::BlockDevice {
            return ioctl_range(fd, BLKZEROOUT, offset, len);
        }
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        let first = if unmap {
            fallocate(fd, punch, offset, len)
        } else {
            fallocate(
                fd,
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            )
        };
        match first {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {}
            r => return r,
        }
        // The filesystem lacks ZERO_RANGE (tmpfs, for one): punch and re-allocate, or if even
        // punching is unsupported, write zeros.
        if fallocate(fd, punch, offset, len).is_ok() {
            if !unmap {
                fallocate(fd, libc::FALLOC_FL_KEEP_SIZE, offset, len)?;
            }
            return Ok(());
        }
        self.write_zero_buffers(fd, offset, len)
    }

    fn write_zero_buffers(&self, fd: RawFd, mut offset: u64, len: u64) -> io::Result<()> {
        const CHUNK: usize = 1 << 20;
        // An aligned zero buffer works with and without O_DIRECT.
        let layout = std::alloc::Layout::from_size_align(CHUNK, 4096).expect("valid layout");
        // SAFETY: the layout has non-zero size.
        let buf = unsafe { std::alloc::alloc_zeroed(layout) };
        if buf.is_null() {
            return Err(io::Error::from(io::ErrorKind::OutOfMemory));
        }
        let end = offset + len;
        let mut result = Ok(());
        while offset < end {
            let n = ((end - offset) as usize).min(CHUNK);
            // SAFETY: buf points to CHUNK >= n initialised bytes.
            let r = unsafe { libc::pwrite(fd, buf.cast(), n, offset as libc::off_t) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                result = Err(e);
                break;
            }
            if r == 0 {
                result = Err(io::Error::from(io::ErrorKind::WriteZero));
                break;
            }
            offset += r as u64;
        }
        // SAFETY: buf was allocated above with this layout.
        unsafe { std::alloc::dealloc(buf, layout) };
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom, Write};

    fn image(size: usize, fill: u8) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&vec![fill; size]).unwrap();
        f
    }

    #[test]
    fn opens_file_and_reports_size() {
        let f = image(1 << 20, 0);
        let d = Disk::open(f.path(), false, false, None).unwrap();
        assert_eq!(d.kind, DiskKind::File);
        assert_eq!(d.size(), 1 << 20);
        assert_eq!(d.sectors(), 2048);
        assert_eq!(d.block_size, 512);
        assert!(d.topology.physical_block_exp <= 7);
    }

    #[test]
    fn rejects_unaligned_size_and_missing_file() {
        let f = image(1000, 0);
        let e = Disk::open(f.path(), false, false, None).unwrap_err();
        assert!(matches!(e, DiskError::Unaligned { .. }), "{e}");
        let f = image(4096 + 512, 0);
        let e = Disk::open(f.path(), false, false, Some(4096)).unwrap_err();
        assert!(e.to_string().contains("not a multiple"), "{e}");
        let e = Disk::open(Path::new("/nonexistent/x.img"), false, false, None).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/x.img"), "{e}");
        let e = Disk::open(Path::new("/dev/null"), false, false, None).unwrap_err();
        assert!(matches!(e, DiskError::NotAFileOrDevice(_)), "{e}");
    }

    #[test]
    fn write_zeroes_and_discard_on_file() {
        let f = image(64 << 10, 0xab);
        let d = Disk::open(f.path(), false, false, None).unwrap();
        d.write_zeroes(4096, 8192, false).unwrap();
        d.write_zeroes(32768, 4096, true).unwrap();
        d.discard(49152, 4096).unwrap();
        let mut buf = Vec::new();
        let mut fh = File::open(f.path()).unwrap();
        fh.seek(SeekFrom::Start(0)).unwrap();
        fh.read_to_end(&mut buf).unwrap();
        assert_eq!(buf.len(), 64 << 10);
        assert!(buf[..4096].iter().all(|&b| b == 0xab));
        assert!(buf[4096..12288].iter().all(|&b| b == 0));
        assert!(buf[12288..32768].iter().all(|&b| b == 0xab));
        assert!(buf[32768..36864].iter().all(|&b| b == 0));
    }

    #[test]
    fn null_device_size_checked() {
        assert!(Disk::null(0, 512, false).is_err());
        assert!(Disk::null(1000, 512, false).is_err());
        assert_eq!(Disk::null(1 << 30, 4096, false).unwrap().sectors(), 2 << 20);
    }
}
