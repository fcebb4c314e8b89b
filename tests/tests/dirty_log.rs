//! Dirty-page logging (live migration) against the real vhostbox-blk binary, driven by the
//! `vhost` crate's `Frontend` through the test frontend: SET_LOG_BASE with a shared memfd,
//! VHOST_F_LOG_ALL on and off through SET_FEATURES, and the bitmap compared with a reference
//! of every guest page the frontend saw the backend write. Both engines: io_uring and
//! `preadv` write guest buffers behind vm-memory's back, and those are the writes a backend
//! most easily forgets to log.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::{VhostBackend, VhostUserDirtyLogRegion};
use vhostbox_tests::blkreq::{self, S_OK, T_GET_ID, T_IN, T_OUT};
use vhostbox_tests::frontend::{
    DeviceOptions, VhostUserDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_INDIRECT_DESC,
};
use vhostbox_tests::{blk_args, pattern, probe_bin, sparse_image, Backend};

const LOG_ALL: u64 = vhost::vhost_user::VhostUserVirtioFeatures::LOG_ALL.bits();
const PAGE: u64 = 4096;
const MEM: usize = 16 << 20;
const ENGINES: [&str; 2] = ["io-uring", "sync"];

/// A shared memfd of `len` bytes, as QEMU allocates its log.
fn memfd(len: u64) -> std::fs::File {
    // SAFETY: a NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"test-dirty-log".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor nothing else owns.
    let f = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    f.set_len(len).unwrap();
    f
}

/// The pages whose bit is set in `log`.
fn dirty_pages(log: &std::fs::File) -> std::collections::BTreeSet<u64> {
    let mut bits = vec![0u8; log.metadata().unwrap().len() as usize];
    log.read_exact_at(&mut bits, 0).unwrap();
    let mut pages = std::collections::BTreeSet::new();
    for (i, b) in bits.iter().enumerate() {
        for bit in 0..8 {
            if b & (1 << bit) != 0 {
                pages.insert(i as u64 * 8 + bit);
            }
        }
    }
    pages
}

fn clear(log: &std::fs::File) {
    let n = log.metadata().unwrap().len() as usize;
    log.write_all_at(&vec![0u8; n], 0).unwrap();
}

fn pages_of(addr: u64, len: u64) -> impl Iterator<Item = u64> {
    addr / PAGE..(addr + len).div_ceil(PAGE)
}

fn set_log(dev: &mut VhostUserDevice, log: &std::fs::File, size: u64, offset: u64) -> bool {
    let region = VhostUserDirtyLogRegion {
        mmap_size: size,
        mmap_offset: offset,
        mmap_handle: log.as_raw_fd(),
    };
    dev.frontend().set_log_base(0, Some(region)).is_ok()
}

fn start(dir: &Path, engine: &str) -> (Backend, std::path::PathBuf) {
    start_with(dir, engine, false)
}

/// `skip_dma_log`: the test-only build that forgets the writes vm-memory cannot see.
fn start_with(dir: &Path, engine: &str, skip_dma_log: bool) -> (Backend, std::path::PathBuf) {
    let img = sparse_image(&dir.join("disk.img"), 8 << 20);
    let mut data = vec![0u8; 8 << 20];
    for (i, b) in data.chunks_mut(512).enumerate() {
        pattern(b, i as u64, 7);
    }
    std::fs::write(&img, &data).unwrap();
    let sock = dir.join("blk.sock");
    let extra = ["--engine", engine, "--seccomp", "kill"];
    let be = if skip_dma_log {
        Backend::start_exe_env(
            &probe_bin("vhostbox-blk"),
            &sock,
            &blk_args(&sock, &img, &extra),
            &[("VHOSTBOX_PROBE_SKIP_DMA_LOG", "1")],
        )
    } else {
        Backend::blk(&sock, &img, &extra)
    };
    (be, img)
}

fn connect(sock: &Path) -> VhostUserDevice {
    let opts = DeviceOptions {
        mem_size: MEM,
        protocol_features: (VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::LOG_SHMFD)
            .bits(),
        ..Default::default()
    };
    let dev = VhostUserDevice::connect_with(
        sock,
        1,
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC,
        &opts,
    )
    .unwrap();
    assert_ne!(
        dev.protocol_features() & VhostUserProtocolFeatures::LOG_SHMFD.bits(),
        0,
        "vhostbox-blk offers LOG_SHMFD"
    );
    dev
}

/// One read of `sectors` sectors at `sector` into a fresh buffer that starts `skew` bytes into
/// a page (so it spans pages unevenly), in `segs` segments. Returns the pages the backend was
/// seen to write: the data, the status byte and the used ring entry and index.
fn read_and_expect(
    dev: &mut VhostUserDevice,
    sector: u64,
    sectors: u32,
    segs: u32,
    skew: u64,
) -> Vec<u64> {
    let q = dev.queue(0);
    let mem = q.mem().clone();
    let len = u64::from(sectors) * 512;
    let buf = mem.alloc((len + skew + PAGE) as usize, PAGE) + skew;
    let per = len / u64::from(segs);
    let n = u64::from(segs);
    let bufs: Vec<_> = (0..n)
        .map(|i| {
            let l = if i == n - 1 { len - per * (n - 1) } else { per };
            (buf + i * per, l as u32, true)
        })
        .collect();
    let used_slot = q.used_addr() + 4 + 8 * u64::from(q.last_used() % q.size());
    let (head, st) = blkreq::add(q, T_IN, sector, &bufs);
    q.kick();
    let (id, _) = q.wait_used(Duration::from_secs(20)).expect("a completion");
    assert_eq!(id, head);
    assert_eq!(mem.read_vec(st, 1)[0], S_OK);
    let got = mem.read_vec(buf, len as usize);
    for (i, b) in got.chunks(512).enumerate() {
        let mut want = vec![0u8; 512];
        pattern(&mut want, sector + i as u64, 7);
        assert_eq!(b, &want[..], "sector {}", sector + i as u64);
    }
    let mut pages: Vec<u64> = pages_of(buf, len).collect();
    pages.extend(pages_of(st, 1));
    pages.extend(pages_of(used_slot, 8));
    pages.extend(pages_of(q.used_addr() + 2, 2));
    pages
}

/// Every page the backend wrote while logging is in the log; a page it only read (a write
/// request's data) is not; nothing is logged while VHOST_F_LOG_ALL is off, before and after.
#[test]
fn every_page_the_backend_writes_is_logged_and_only_while_logging() {
    for engine in ENGINES {
        let dir = tempfile::tempdir().unwrap();
        let (be, img) = start(dir.path(), engine);
        let mut dev = connect(&be.socket);
        let log_len = (MEM as u64 / PAGE).div_ceil(8);
        let log = memfd(log_len);
        assert!(
            set_log(&mut dev, &log, log_len, 0),
            "{engine}: SET_LOG_BASE"
        );
        let features = dev.negotiated_features();

        // Logging off (log set, LOG_ALL not acknowledged): nothing is marked.
        read_and_expect(&mut dev, 0, 8, 1, 0);
        assert!(dirty_pages(&log).is_empty(), "{engine}: logged while off");

        dev.frontend().set_features(features | LOG_ALL).unwrap();
        let mut want = std::collections::BTreeSet::new();
        // Reads large enough to go to the engine (io_uring, or preadv), several segments,
        // uneven offsets; and a small one (served at once from the page cache).
        want.extend(read_and_expect(&mut dev, 16, 256, 4, 512));
        want.extend(read_and_expect(&mut dev, 1000, 64, 3, 1536));
        want.extend(read_and_expect(&mut dev, 3, 1, 1, 100));
        // GET_ID: written through vm-memory.
        let q = dev.queue(0);
        let mem = q.mem().clone();
        let id = mem.alloc(2 * PAGE as usize, PAGE) + PAGE - 8;
        let used_slot = q.used_addr() + 4 + 8 * u64::from(q.last_used() % q.size());
        let (st, _) = blkreq::run(q, T_GET_ID, 0, &[(id, 20, true)]);
        assert_eq!(st, S_OK);
        want.extend(pages_of(id, 20));
        want.extend(pages_of(used_slot, 8));
        // A write: its data pages are only read by the backend and must stay clean.
        let data = mem.alloc(3 * PAGE as usize, PAGE);
        mem.write(data, &vec![0xa5; 2 * PAGE as usize]);
        let used_slot = q.used_addr() + 4 + 8 * u64::from(q.last_used() % q.size());
        let (st, _) = blkreq::run(q, T_OUT, 4000, &[(data, 2 * PAGE as u32, false)]);
        assert_eq!(st, S_OK);
        want.extend(pages_of(used_slot, 8));
        let got = dirty_pages(&log);
        let missing: Vec<_> = want.difference(&got).collect();
        assert!(
            missing.is_empty(),
            "{engine}: pages written but not logged: {missing:?} (logged {got:?})"
        );
        for p in pages_of(data, 2 * PAGE) {
            assert!(
                !got.contains(&p),
                "{engine}: page {p} only read, but logged"
            );
        }
        let mut host = vec![0u8; 2 * PAGE as usize];
        std::fs::File::open(&img)
            .unwrap()
            .read_exact_at(&mut host, 4000 * 512)
            .unwrap();
        assert!(
            host.iter().all(|&b| b == 0xa5),
            "{engine}: the write landed"
        );

        // Off again: nothing more is marked.
        dev.frontend().set_features(features).unwrap();
        clear(&log);
        read_and_expect(&mut dev, 40, 128, 2, 0);
        assert!(
            dirty_pages(&log).is_empty(),
            "{engine}: logged after LOG_ALL was turned off"
        );
        drop(dev);
        drop(be);
    }
}

/// The negative control: a backend that logs only what vm-memory sees (the test-only build
/// with the io_uring/preadv marking switched off) is caught by the same reference comparison.
#[test]
fn a_backend_that_forgets_engine_writes_is_caught() {
    for engine in ENGINES {
        let dir = tempfile::tempdir().unwrap();
        let (be, _img) = start_with(dir.path(), engine, true);
        let mut dev = connect(&be.socket);
        let log_len = (MEM as u64 / PAGE).div_ceil(8);
        let log = memfd(log_len);
        assert!(set_log(&mut dev, &log, log_len, 0));
        let features = dev.negotiated_features();
        dev.frontend().set_features(features | LOG_ALL).unwrap();
        let want = read_and_expect(&mut dev, 16, 256, 4, 512);
        let got = dirty_pages(&log);
        let missing = want.iter().filter(|p| !got.contains(p)).count();
        // The data pages (32 of them) go missing; the status byte and used ring do not.
        assert!(
            missing >= 32,
            "{engine}: only {missing} pages missing: {got:?}"
        );
    }
}

/// SET_LOG_BASE with a log the worker could not use safely is refused: the connection ends
/// (its reply has no status field, and a migration without a usable log would corrupt the
/// destination), the frontend sees the error at once, the image is untouched, and the backend
/// serves the next connection with correct data. A good log after the bad ones works, and
/// SET_LOG_FD is accepted with an eventfd and refused with anything else.
#[test]
fn hostile_log_bases_are_refused_and_the_backend_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let (be, img) = start(dir.path(), "io-uring");
    let before = std::fs::read(&img).unwrap();
    let need = (MEM as u64 / PAGE).div_ceil(8);
    let pipe = || {
        let mut p = [0; 2];
        // SAFETY: pipe into a two-element array.
        assert_eq!(unsafe { libc::pipe(p.as_mut_ptr()) }, 0);
        // SAFETY: the write end is a fresh fd we own and no longer need.
        unsafe { libc::close(p[1]) };
        // SAFETY: the read end is a fresh fd we own.
        std::fs::File::from(unsafe { OwnedFd::from_raw_fd(p[0]) })
    };
    let cases: Vec<(&str, std::fs::File, u64, u64, &str)> = vec![
        ("empty", memfd(need), 0, 0, "0 bytes at offset 0"),
        ("past the end", memfd(need), need * 2, 0, "-byte file"),
        ("offset past the end", memfd(need), need, need, "-byte file"),
        (
            "offset overflows",
            memfd(need),
            need,
            u64::MAX - 8,
            "-byte file",
        ),
        ("too small", memfd(need), need / 2, 0, "covers"),
        ("over 1 GiB", memfd(need), (1 << 30) + 4096, 0, "more than"),
        ("a pipe", pipe(), need, 0, "not a memfd or regular file"),
    ];
    let mut sector = 0;
    let mut workers = std::collections::BTreeSet::new();
    for (what, f, size, offset, why) in cases {
        let mut dev = connect(&be.socket);
        workers.insert(be.worker_pid());
        read_and_expect(&mut dev, sector, 8, 1, 0);
        sector += 8;
        let t = std::time::Instant::now();
        assert!(!set_log(&mut dev, &f, size, offset), "{what}: accepted");
        // Seen as a closed connection, not a reply timeout (10 s).
        assert!(t.elapsed() < Duration::from_secs(5), "{what}: slow refusal");
        let log = be.wait_log("ending the connection");
        assert!(
            log.lines()
                .any(|l| l.contains("refused SET_LOG_BASE") && l.contains(why)),
            "{what}: no refusal naming {why:?}: {log}"
        );
        drop(dev);
        be.wait_log_count("frontend disconnected", workers.len());
    }
    assert_eq!(std::fs::read(&img).unwrap(), before, "the image changed");
    // The next connection is served, and a good log works on it.
    let mut dev = connect(&be.socket);
    let log = memfd(need);
    assert!(set_log(&mut dev, &log, need, 0), "a good log refused");
    let features = dev.negotiated_features();
    dev.frontend().set_features(features | LOG_ALL).unwrap();
    let want = read_and_expect(&mut dev, 100, 64, 2, 0);
    let got = dirty_pages(&log);
    assert!(want.iter().all(|p| got.contains(p)), "{want:?} vs {got:?}");
    // SET_LOG_FD with an eventfd is accepted (and needs no reply content); with a file, it
    // is refused and the connection goes on.
    let efd = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
    dev.frontend().set_log_fd(efd.as_raw_fd()).unwrap();
    assert!(dev.frontend().set_log_fd(log.as_raw_fd()).is_err());
    read_and_expect(&mut dev, 200, 8, 1, 0);
}
