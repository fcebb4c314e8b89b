//! Image locking compatible with QEMU's (block/file-posix.c): open file description (OFD)
//! locks on single bytes of the image, so vhostbox-blk, QEMU, qemu-img, qemu-nbd and
//! qemu-storage-daemon see each other's claims.
//!
//! QEMU's scheme: for each block permission bit *i* (consistent read 0, write 1, write unchanged
//! 2, resize 3), a process that *uses* the permission holds a shared lock on byte 100 + *i*,
//! and one that does *not share* it with others holds a shared lock on byte 200 + *i*. Taking
//! a permission conflicts with someone's byte 200 + *i*; refusing to share it conflicts with
//! someone's byte 100 + *i*. All locks are shared (F_RDLCK): a conflict is found by asking
//! whether an exclusive lock on the byte could be taken (F_OFD_GETLK), which sees only the
//! other open file descriptions' locks, not our own.
//!
//! OFD locks belong to the open file description. They are taken on an open of the image of
//! their own ([`lock_path`]), which the supervisor keeps for its whole life and every forked
//! worker closes as its first action, so they go away the moment the supervisor exits (a
//! worker killed with it may take a while to die). On
//! the description the workers use they would outlive it: a worker's io_uring holds that file
//! as a registered file until the ring's asynchronous teardown, and a backend restarted at once
//! (systemd `Restart=`) would find its own image still locked.

use std::io;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;

/// QEMU's block permissions, by bit.
const PERMS: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];
const CONSISTENT_READ: u8 = 1 << 0;
const WRITE: u8 = 1 << 1;
const RESIZE: u8 = 1 << 3;

/// What a device takes and what it refuses to share, as QEMU's virtio-blk does for a disk
/// without `share-rw`: a writer uses consistent read and write, and shares neither write nor
/// resize; a read-only device uses consistent read and still refuses writers (its guest must
/// not see the image change under it).
fn claims(readonly: bool) -> (u8, u8) {
    let used = if readonly {
        CONSISTENT_READ
    } else {
        CONSISTENT_READ | WRITE
    };
    (used, WRITE | RESIZE)
}

/// Why the image cannot be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "image {path} is in use: another process (QEMU, qemu-img, qemu-nbd, or another \
         vhostbox-blk) {what} (--lock off overrides this; see docs/vhostbox-blk.md)"
    )]
    InUse { path: PathBuf, what: String },
    #[error("cannot lock image {0}")]
    Sys(PathBuf, #[source] io::Error),
}

fn flock_at(byte: i64, ty: libc::c_short) -> libc::flock {
    // SAFETY: flock is a plain C struct of integers: all-zero is valid.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = ty;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    fl
}

fn fcntl_lock(fd: RawFd, cmd: libc::c_int, fl: &mut libc::flock) -> io::Result<()> {
    // SAFETY: fcntl with an OFD lock command reads and may write the flock we own.
    let r = unsafe { libc::fcntl(fd, cmd, fl as *mut libc::flock) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Whether another open file description holds a lock on `byte`.
fn held_by_other(fd: RawFd, byte: i64) -> io::Result<bool> {
    let mut fl = flock_at(byte, libc::F_WRLCK as libc::c_short);
    fcntl_lock(fd, libc::F_OFD_GETLK, &mut fl)?;
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// Takes QEMU-compatible locks on the open image `fd` at `path`. Locks first and checks after,
/// as QEMU does, so two processes starting together cannot both miss each other; on a conflict
/// the caller drops the fd, which releases what was taken.
pub fn lock_image(fd: RawFd, path: &Path, readonly: bool) -> Result<String, LockError> {
    let sys = |e| LockError::Sys(path.to_owned(), e);
    let (used, unshared) = claims(readonly);
    let bits = |mask: u8| (0..PERMS.len()).filter(move |i| mask & (1 << i) != 0);
    let take = |byte: i64| {
        let mut fl = flock_at(byte, libc::F_RDLCK as libc::c_short);
        fcntl_lock(fd, libc::F_OFD_SETLK, &mut fl).map_err(sys)
    };
    for i in bits(used) {
        take(PERM_BASE + i as i64)?;
    }
    for i in bits(unshared) {
        take(SHARED_BASE + i as i64)?;
    }
    // What we use must not be unshared by another; what we do not share must not be used.
    let checks = [
        (
            used,
            SHARED_BASE,
            "does not share the {} permission this device needs",
        ),
        (
            unshared,
            PERM_BASE,
            "holds the {} permission, which this device does not share",
        ),
    ];
    for (mask, base, what) in checks {
        for i in bits(mask) {
            if held_by_other(fd, base + i as i64).map_err(sys)? {
                return Err(LockError::InUse {
                    path: path.to_owned(),
                    what: what.replace("{}", PERMS[i]),
                });
            }
        }
    }
    let names = |m: u8| bits(m).map(|i| PERMS[i]).collect::<Vec<_>>().join(", ");
    Ok(format!(
        "locked (QEMU's OFD locks): uses {}; shares no {}",
        names(used),
        names(unshared)
    ))
}

/// Locks the image at `path` on an open of its own, checked to be the same file as `data`
/// (the open the device serves), and keeps that open for the rest of the process's life.
pub fn lock_path(path: &Path, data: &std::fs::File, readonly: bool) -> Result<String, LockError> {
    use std::os::fd::{AsRawFd, IntoRawFd};
    use std::os::unix::fs::MetadataExt;
    let sys = |e| LockError::Sys(path.to_owned(), e);
    let f = std::fs::File::open(path).map_err(sys)?;
    let (a, b) = (f.metadata().map_err(sys)?, data.metadata().map_err(sys)?);
    if (a.dev(), a.ino()) != (b.dev(), b.ino()) {
        return Err(LockError::Sys(
            path.to_owned(),
            io::Error::other("the path was replaced while it was being opened"),
        ));
    }
    let how = lock_image(f.as_raw_fd(), path, readonly)?;
    // Held until the process exits; a forked worker closes its copy first thing.
    let fd = f.into_raw_fd();
    vhostbox_common::sandbox::supervisor::keep_from_workers(fd);
    Ok(how)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn image() -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("i.img");
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        (d, p)
    }

    fn open(p: &Path, rw: bool) -> std::fs::File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(rw)
            .open(p)
            .unwrap()
    }

    #[test]
    fn a_writer_excludes_writers_and_readers_but_readers_share() {
        let (_d, p) = image();
        let w = open(&p, true);
        lock_image(w.as_raw_fd(), &p, false).unwrap();
        let w2 = open(&p, true);
        let e = lock_image(w2.as_raw_fd(), &p, false).unwrap_err();
        assert!(
            e.to_string()
                .contains("does not share the write permission"),
            "{e}"
        );
        let r = open(&p, false);
        let e = lock_image(r.as_raw_fd(), &p, true).unwrap_err();
        assert!(e.to_string().contains("holds the write permission"), "{e}");
        drop((w, w2, r));
        let r1 = open(&p, false);
        let r2 = open(&p, false);
        lock_image(r1.as_raw_fd(), &p, true).unwrap();
        lock_image(r2.as_raw_fd(), &p, true).unwrap();
        let w = open(&p, true);
        let e = lock_image(w.as_raw_fd(), &p, false).unwrap_err();
        assert!(e.to_string().contains("in use"), "{e}");
        // The claims go with the fds.
        drop((r1, r2, w));
        let w = open(&p, true);
        lock_image(w.as_raw_fd(), &p, false).unwrap();
    }
}
