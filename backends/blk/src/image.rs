//! Image formats: raw, and qcow2 (with backing chains) through the `imago` crate.
//!
//! The supervisor probes the format, follows the backing chain named in the qcow2 headers and
//! opens (and locks) every file of it before anything is jailed ([`open_chain`]). It reads the
//! headers with imago too, but keeps no format state: a worker rebuilds the chain from its own
//! duplicates of those fds ([`Image::build`]), before its jail, so that a worker that replaces
//! a dead one reads the metadata its predecessor wrote rather than a stale copy. imago never
//! opens a file itself here: every open goes through a gate that refuses it.

use std::collections::HashSet;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use imago::io_buffers::{IoVector, IoVectorMut};
use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::{DenyImplicitOpenGate, FormatAccess, FormatDriverBuilder, StorageOpenOptions};

/// The image formats vhostbox-blk serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        })
    }
}

/// A `--format` that is neither raw nor qcow2.
#[derive(Debug, thiserror::Error)]
#[error("invalid format '{0}': use raw or qcow2")]
pub struct FormatError(pub String);

impl std::str::FromStr for Format {
    type Err = FormatError;
    fn from_str(s: &str) -> Result<Self, FormatError> {
        match s {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            _ => Err(FormatError(s.to_owned())),
        }
    }
}

/// What an image's first bytes say it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probed {
    Raw,
    Qcow2 {
        /// The header's crypt_method: 0 none, 1 AES, 2 LUKS.
        crypt_method: u32,
    },
    /// A format vhostbox does not serve, by name.
    Other(&'static str),
}

/// The deepest backing chain followed (QEMU has no fixed limit; a chain this long is a
/// mistake or an attack, and every level is one more open file in the jail).
pub const MAX_CHAIN: usize = 32;

/// Why an image or its chain cannot be served (nothing was served).
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot read the header of {0}")]
    Read(PathBuf, #[source] io::Error),
    #[error("{path} is {found}, which vhostbox-blk does not serve (raw and qcow2 only)")]
    Unsupported { path: PathBuf, found: &'static str },
    #[error(
        "{path} is {found}, but it was given as {given}: refusing to serve it as something it \
         is not (check --format, or the backing format in the overlay's header)"
    )]
    Mismatch {
        path: PathBuf,
        given: Format,
        found: String,
    },
    #[error(
        "{0} is an encrypted qcow2 image ({1}): encryption is not supported (decrypt it with \
         qemu-img convert, or use dm-crypt under a raw image)"
    )]
    Encrypted(PathBuf, &'static str),
    #[error("{0} needs an external data file: not supported")]
    ExternalDataFile(PathBuf),
    #[error(
        "{path} was probed as qcow2 and names a backing file ({backing}): give --format qcow2 \
         to follow it (a probed header is not trusted to name host files)"
    )]
    ProbedBacking { path: PathBuf, backing: String },
    #[error("{path} names backing file '{backing}', which is not a local file name")]
    BackingName { path: PathBuf, backing: String },
    #[error("{path} names backing format '{format}': only raw and qcow2 are served")]
    BackingFormat { path: PathBuf, format: String },
    #[error("cannot open backing file {0}")]
    OpenBacking(PathBuf, #[source] io::Error),
    #[error("the backing chain of {0} loops back to {1}")]
    Loop(PathBuf, PathBuf),
    #[error("the backing chain of {0} is more than {MAX_CHAIN} images deep")]
    TooDeep(PathBuf),
    #[error("{0} is not a usable qcow2 image")]
    Qcow2(PathBuf, #[source] io::Error),
    #[error("{path}: virtual size {size} is not a positive multiple of the block size {block}")]
    Size {
        path: PathBuf,
        size: u64,
        block: u32,
    },
    #[error(transparent)]
    Lock(#[from] crate::lock::LockError),
}

/// Reads the first 4 KiB of `file` (an aligned buffer, so it works with O_DIRECT) and says
/// what format it holds.
pub fn probe(file: &File) -> io::Result<Probed> {
    const LEN: usize = 4096;
    let layout = std::alloc::Layout::from_size_align(LEN, LEN).expect("valid layout");
    // SAFETY: the layout has non-zero size.
    let buf = unsafe { std::alloc::alloc_zeroed(layout) };
    if buf.is_null() {
        return Err(io::Error::from(io::ErrorKind::OutOfMemory));
    }
    let n = loop {
        // SAFETY: buf points to LEN writable bytes.
        let r = unsafe { libc::pread(file.as_raw_fd(), buf.cast(), LEN, 0) };
        if r >= 0 {
            break Ok(r as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            break Err(e);
        }
    };
    let result = n.map(|n| {
        // SAFETY: the first n bytes were written by pread (and all LEN were zeroed).
        let head = unsafe { std::slice::from_raw_parts(buf, LEN) };
        probe_bytes(&head[..n])
    });
    // SAFETY: buf was allocated above with this layout.
    unsafe { std::alloc::dealloc(buf, layout) };
    result
}

/// The format a header's bytes show (the signatures QEMU's probes look for).
pub fn probe_bytes(b: &[u8]) -> Probed {
    let be32 = |at: usize| {
        b.get(at..at + 4)
            .map(|s| u32::from_be_bytes(s.try_into().expect("4 bytes")))
    };
    if b.starts_with(b"QFI\xfb") {
        return match be32(4) {
            Some(2 | 3) => Probed::Qcow2 {
                crypt_method: be32(32).unwrap_or(0),
            },
            Some(1) => Probed::Other("qcow (version 1)"),
            _ => Probed::Other("qcow of an unknown version"),
        };
    }
    let at = |off: usize, sig: &[u8]| b.get(off..off + sig.len()) == Some(sig);
    let other = if at(0, b"QED\0") {
        "qed"
    } else if at(0, b"KDMV") || at(0, b"# Disk DescriptorFile") {
        "vmdk"
    } else if at(0, b"vhdxfile") {
        "vhdx"
    } else if at(0, b"conectix") {
        "vpc (VHD)"
    } else if at(0, b"LUKS\xba\xbe") {
        "luks"
    } else if at(0x40, &0xbeda_107f_u32.to_le_bytes()) {
        "vdi"
    } else if at(0, b"WithoutFreeSpace") || at(0, b"WithouFreSpacExt") {
        "parallels"
    } else {
        return Probed::Raw;
    };
    Probed::Other(other)
}

/// One file of a qcow2 chain below the top image: opened read-only and locked by the
/// supervisor.
#[derive(Debug)]
pub struct Layer {
    pub path: PathBuf,
    pub file: File,
    pub format: Format,
}

/// The top image's format, its virtual size, and the files below it (nearest first).
#[derive(Debug)]
pub struct Chain {
    pub format: Format,
    pub size: u64,
    pub below: Vec<Layer>,
}

/// imago's storage over a duplicate of `file`, and the duplicate's fd.
fn storage(
    file: &File,
    path: &Path,
    write: bool,
    direct: bool,
) -> io::Result<(imago::file::File, RawFd)> {
    let opts = StorageOpenOptions::new()
        .write(write)
        .direct(direct)
        .filename(path);
    let dup = file.try_clone()?;
    let fd = dup.as_raw_fd();
    Ok((imago::file::File::from_open_file(dup, opts)?, fd))
}

/// A backing file's name and format as a qcow2 header gives them.
type BackingRef = (String, Option<String>);

/// What a qcow2 header names: the virtual size, and the backing file, if any.
fn qcow2_header(
    file: &File,
    path: &Path,
    direct: bool,
) -> Result<(u64, Option<BackingRef>), ImageError> {
    let q = Qcow2::<imago::file::File>::builder(
        storage(file, path, false, direct)
            .map_err(|e| ImageError::Qcow2(path.into(), e))?
            .0,
    )
    .backing(None)
    .data_file(None)
    .write(false)
    .open(DenyImplicitOpenGate::default())
    .map_err(|e| ImageError::Qcow2(path.into(), e))?;
    if q.requires_external_data_file() {
        return Err(ImageError::ExternalDataFile(path.into()));
    }
    let backing = q
        .implicit_backing_file()
        .map(|b| (b.clone(), q.implicit_backing_format().cloned()));
    let size = FormatAccess::new(q).size();
    Ok((size, backing))
}

/// Checks the probed format against the one given (if any) and refuses what is not served.
fn settle(path: &Path, given: Option<Format>, probed: Probed) -> Result<Format, ImageError> {
    let found = match probed {
        Probed::Raw => Format::Raw,
        Probed::Qcow2 { crypt_method } => {
            if crypt_method != 0 {
                let how = if crypt_method == 1 { "AES" } else { "LUKS" };
                return Err(ImageError::Encrypted(path.into(), how));
            }
            Format::Qcow2
        }
        Probed::Other(name) => {
            return Err(match given {
                Some(g) => ImageError::Mismatch {
                    path: path.into(),
                    given: g,
                    found: name.into(),
                },
                None => ImageError::Unsupported {
                    path: path.into(),
                    found: name,
                },
            })
        }
    };
    match given {
        Some(g) if g != found => Err(ImageError::Mismatch {
            path: path.into(),
            given: g,
            found: found.to_string(),
        }),
        _ => Ok(found),
    }
}

/// Probes `file` (the image at `path`, already opened), settles its format against `given`
/// (`--format`, None to probe), and for qcow2 opens, checks and locks (`lock`) every file of
/// its backing chain, read-only. A probed qcow2 image may not name a backing file.
pub fn open_chain(
    path: &Path,
    file: &File,
    given: Option<Format>,
    direct: bool,
    lock: bool,
) -> Result<Chain, ImageError> {
    let probed = probe(file).map_err(|e| ImageError::Read(path.into(), e))?;
    let format = settle(path, given, probed)?;
    if format == Format::Raw {
        return Ok(Chain {
            format,
            size: 0,
            below: Vec::new(),
        });
    }
    let mut seen = HashSet::new();
    let id = |f: &File| f.metadata().map(|m| (m.dev(), m.ino()));
    seen.insert(id(file).map_err(|e| ImageError::Read(path.into(), e))?);
    let (size, mut next) = qcow2_header(file, path, direct)?;
    if let (None, Some((b, _))) = (given, &next) {
        return Err(ImageError::ProbedBacking {
            path: path.into(),
            backing: b.clone(),
        });
    }
    let mut below = Vec::new();
    let mut above = path.to_path_buf();
    while let Some((name, fmt)) = next.take() {
        if below.len() == MAX_CHAIN {
            return Err(ImageError::TooDeep(path.into()));
        }
        if name.is_empty() || name.starts_with("json:") || name.contains("://") {
            return Err(ImageError::BackingName {
                path: above,
                backing: name,
            });
        }
        let named = Path::new(&name);
        let bpath = if named.is_absolute() {
            named.to_path_buf()
        } else {
            above.parent().unwrap_or(Path::new(".")).join(named)
        };
        let given = match fmt.as_deref() {
            None => None,
            Some(s) => Some(s.parse::<Format>().map_err(|_| ImageError::BackingFormat {
                path: above.clone(),
                format: s.to_owned(),
            })?),
        };
        let mut opts = OpenOptions::new();
        opts.read(true);
        opts.custom_flags(libc::O_CLOEXEC | if direct { libc::O_DIRECT } else { 0 });
        let bfile = opts
            .open(&bpath)
            .map_err(|e| ImageError::OpenBacking(bpath.clone(), e))?;
        if !seen.insert(id(&bfile).map_err(|e| ImageError::Read(bpath.clone(), e))?) {
            return Err(ImageError::Loop(path.into(), bpath));
        }
        let probed = probe(&bfile).map_err(|e| ImageError::Read(bpath.clone(), e))?;
        let bformat = settle(&bpath, given, probed)?;
        if given.is_none() {
            log::warn!(
                "{} names backing file {} without a format: probed as {bformat}",
                above.display(),
                bpath.display()
            );
        }
        if bformat == Format::Qcow2 {
            next = qcow2_header(&bfile, &bpath, direct)?.1;
        }
        if lock {
            let how = crate::lock::lock_path(&bpath, &bfile, true)?;
            log::info!("backing file {}: {how}", bpath.display());
        }
        log::info!(
            "backing file {} ({bformat}) under {}",
            bpath.display(),
            above.display()
        );
        below.push(Layer {
            path: bpath.clone(),
            file: bfile,
            format: bformat,
        });
        above = bpath;
    }
    Ok(Chain {
        format,
        size,
        below,
    })
}

type Access = FormatAccess<imago::file::File>;

/// A worker's open qcow2 chain: reads and writes share it, discard takes it alone (imago's
/// discard may move data mappings that a concurrent read or write still uses).
pub struct Image {
    access: RwLock<Access>,
    /// The duplicated fds imago holds, for the jail's keep-list.
    pub fds: Vec<RawFd>,
}

impl fmt::Debug for Image {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Image").field("fds", &self.fds).finish()
    }
}

fn poisoned<T>(_: T) -> io::Error {
    io::Error::other("image lock poisoned")
}

impl Image {
    /// Opens the chain from duplicates of the supervisor's fds: `top` (read-write unless
    /// `readonly`) over `below`. Runs in the worker before its jail.
    pub fn build(
        top: &File,
        top_path: &Path,
        below: &[Layer],
        readonly: bool,
        direct: bool,
    ) -> io::Result<Self> {
        let mut fds = Vec::new();
        let mut under: Option<Access> = None;
        let layers = below
            .iter()
            .rev()
            .map(|l| (&l.file, l.path.as_path(), l.format, false))
            .chain(std::iter::once((top, top_path, Format::Qcow2, !readonly)));
        for (file, path, format, write) in layers {
            let (s, fd) = storage(file, path, write, direct)?;
            fds.push(fd);
            let access = match format {
                Format::Raw => FormatAccess::new(
                    Raw::builder(s)
                        .write(write)
                        .open(DenyImplicitOpenGate::default())?,
                ),
                Format::Qcow2 => FormatAccess::new(
                    Qcow2::<imago::file::File>::builder(s)
                        .backing(under.take())
                        .data_file(None)
                        .write(write)
                        .open(DenyImplicitOpenGate::default())?,
                ),
            };
            under = Some(access);
        }
        Ok(Image {
            access: RwLock::new(under.expect("the top image")),
            fds,
        })
    }

    /// The virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.access.read().map_or(0, |a| a.size())
    }

    /// Reads into `iov` from `offset`.
    ///
    /// # Safety
    /// The iovecs must point to writable memory that nothing else touches during the call.
    pub unsafe fn read(&self, iov: &[libc::iovec], offset: u64) -> io::Result<usize> {
        let mut v = IoVectorMut::with_capacity(iov.len());
        for i in iov.iter().filter(|i| i.iov_len > 0) {
            // SAFETY: the caller's contract: valid, writable, unaliased for the call.
            v.push(unsafe { std::slice::from_raw_parts_mut(i.iov_base.cast::<u8>(), i.iov_len) });
        }
        let n = v.len() as usize;
        self.access.read().map_err(poisoned)?.readv(v, offset)?;
        Ok(n)
    }

    /// Writes `iov` at `offset`; with `dsync`, makes it durable before returning.
    ///
    /// # Safety
    /// The iovecs must point to readable memory that nothing writes during the call.
    pub unsafe fn write(&self, iov: &[libc::iovec], offset: u64, dsync: bool) -> io::Result<usize> {
        let mut v = IoVector::with_capacity(iov.len());
        for i in iov.iter().filter(|i| i.iov_len > 0) {
            // SAFETY: the caller's contract: valid for reads for the call.
            v.push(unsafe { std::slice::from_raw_parts(i.iov_base.cast::<u8>(), i.iov_len) });
        }
        let n = v.len() as usize;
        let a = self.access.read().map_err(poisoned)?;
        a.writev(v, offset)?;
        if dsync {
            a.flush()?;
            return a.sync().map(|()| n);
        }
        // Metadata the write changed (a new cluster's L2 entry, refcounts) goes to the file
        // before the write completes (no sync: the page cache keeps it). The guest outlives
        // a worker: one killed after completing a write must not take the write's mapping
        // with it.
        a.flush()?;
        Ok(n)
    }

    /// Writes cached metadata back to the files, then syncs them: what is written before is
    /// durable, metadata after the data it points to.
    pub fn flush(&self) -> io::Result<()> {
        let a = self.access.read().map_err(poisoned)?;
        a.flush()?;
        a.sync()
    }

    /// Grows the virtual size to `size` (nothing if it is that large already): the L1 table
    /// grows to cover it, the new range reads zero (a longer backing file does not show
    /// through), and the header is written and synced before this returns.
    pub fn grow(&self, size: u64) -> io::Result<()> {
        let a = self.access.write().map_err(poisoned)?;
        a.resize_grow(size, imago::format::PreallocateMode::Zero)?;
        a.flush()?;
        a.sync()
    }

    /// Makes a range read back as zeros, freeing the overlay's clusters where whole clusters
    /// are covered (they become zero clusters, so the backing file no longer shows through).
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.access
            .write()
            .map_err(poisoned)?
            .discard_to_zero(offset, len)
    }

    /// Makes a range read back as zeros; with `unmap`, as [`Image::discard`].
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if unmap {
            return self.discard(offset, len);
        }
        self.access
            .read()
            .map_err(poisoned)?
            .write_zeroes(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_signatures() {
        let mut q = vec![0u8; 512];
        q[..4].copy_from_slice(b"QFI\xfb");
        q[4..8].copy_from_slice(&3u32.to_be_bytes());
        assert_eq!(probe_bytes(&q), Probed::Qcow2 { crypt_method: 0 });
        q[32..36].copy_from_slice(&2u32.to_be_bytes());
        assert_eq!(probe_bytes(&q), Probed::Qcow2 { crypt_method: 2 });
        q[4..8].copy_from_slice(&1u32.to_be_bytes());
        assert_eq!(probe_bytes(&q), Probed::Other("qcow (version 1)"));
        assert_eq!(probe_bytes(b"KDMV...."), Probed::Other("vmdk"));
        assert_eq!(probe_bytes(b"vhdxfile"), Probed::Other("vhdx"));
        let mut vdi = vec![0u8; 512];
        vdi[0x40..0x44].copy_from_slice(&0xbeda_107f_u32.to_le_bytes());
        assert_eq!(probe_bytes(&vdi), Probed::Other("vdi"));
        assert_eq!(probe_bytes(&[0u8; 512]), Probed::Raw);
        assert_eq!(probe_bytes(b"QFI"), Probed::Raw, "short file");
        assert_eq!(probe_bytes(b""), Probed::Raw);
    }

    #[test]
    fn format_must_match() {
        let p = Path::new("/i");
        let q = Probed::Qcow2 { crypt_method: 0 };
        assert_eq!(settle(p, None, q).unwrap(), Format::Qcow2);
        assert_eq!(settle(p, None, Probed::Raw).unwrap(), Format::Raw);
        assert!(matches!(
            settle(p, Some(Format::Raw), q),
            Err(ImageError::Mismatch { .. })
        ));
        assert!(matches!(
            settle(p, Some(Format::Qcow2), Probed::Raw),
            Err(ImageError::Mismatch { .. })
        ));
        assert!(matches!(
            settle(p, None, Probed::Qcow2 { crypt_method: 1 }),
            Err(ImageError::Encrypted(_, "AES"))
        ));
        assert!(matches!(
            settle(p, None, Probed::Other("vmdk")),
            Err(ImageError::Unsupported { found: "vmdk", .. })
        ));
    }
}
