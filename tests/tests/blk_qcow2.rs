//! qcow2 images and backing chains (`--format`), driven by libblkio against the real, jailed
//! binary, with QEMU's own tools as the independent peer: qemu-img makes the chains, qemu-io
//! writes into a middle layer, and afterwards `qemu-img check` and `qemu-img convert` read what
//! vhostbox-blk wrote. Every byte of the disk is compared with a model of what it must hold.

use std::path::{Path, PathBuf};
use std::process::Command;

use blkio::ReqFlags;
use vhostbox_tests::blkio_client::Client;
use vhostbox_tests::{pattern, qcow2_contents, qcow2_overlay, qemu_img, run_to_exit, Backend};

const MIB: u64 = 1 << 20;
const DISK: u64 = 8 * MIB;
const BLOCK: usize = 4096;

fn sha(path: &Path) -> Vec<u8> {
    let o = Command::new("sha256sum").arg(path).output().unwrap();
    o.stdout[..64].to_vec()
}

/// A raw base image of DISK bytes, each 4 KiB block holding its pattern (generation 1), and
/// the model of the disk that starts as its copy.
fn base_image(path: &Path) -> Vec<u8> {
    let mut model = vec![0u8; DISK as usize];
    for (lba, b) in model.chunks_mut(BLOCK).enumerate() {
        pattern(b, lba as u64, 1);
    }
    std::fs::write(path, &model).unwrap();
    model
}

/// Reads the whole disk in 64 KiB requests and compares it with `model`.
fn verify(c: &mut Client, model: &[u8], what: &str) {
    const CHUNK: usize = 64 << 10;
    for off in (0..model.len()).step_by(CHUNK) {
        c.buf(0, CHUNK).fill(0xee);
        assert_eq!(c.read(0, off as u64, 0, CHUNK), 0, "read at {off}");
        if c.buf(0, CHUNK) != &model[off..off + CHUNK] {
            let first = (0..CHUNK)
                .find(|&i| c.buf(0, CHUNK)[i] != model[off + i])
                .unwrap();
            panic!("{what}: byte {} differs from the model", off + first);
        }
    }
}

fn write_at(c: &mut Client, model: &mut [u8], off: usize, len: usize, gen: u64) {
    for (i, b) in c.buf(0, len).chunks_mut(BLOCK).enumerate() {
        pattern(b, (off / BLOCK + i) as u64, gen);
    }
    model[off..off + len].copy_from_slice(c.buf(0, len));
    assert_eq!(c.write(0, off as u64, 0, len), 0, "write at {off}");
}

fn zero(c: &mut Client, model: &mut [u8], off: usize, len: usize, discard: bool) {
    if discard {
        c.queues[0].discard(off as u64, len as u64, 0, ReqFlags::empty());
    } else {
        c.queues[0].write_zeroes(off as u64, len as u64, 0, ReqFlags::empty());
    }
    assert_eq!(c.one(0), 0, "discard/write-zeroes at {off}");
    model[off..off + len].fill(0);
}

struct Chain {
    dir: tempfile::TempDir,
    model: Vec<u8>,
}

impl Chain {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// base.raw <- mid.qcow2 (1 MiB at 1 MiB rewritten by qemu-io) <- top.qcow2, with relative
/// backing names, as qemu-img writes them.
fn three_levels() -> Chain {
    let dir = tempfile::tempdir().unwrap();
    let mut model = base_image(&dir.path().join("base.raw"));
    qcow2_overlay(dir.path(), "base.raw", "raw", "mid.qcow2");
    let o = Command::new("qemu-io")
        .current_dir(dir.path())
        .args(["-f", "qcow2", "-c", "write -P 0xa5 1M 1M", "mid.qcow2"])
        .output()
        .unwrap();
    assert!(o.status.success(), "qemu-io: {o:?}");
    model[MIB as usize..2 * MIB as usize].fill(0xa5);
    qcow2_overlay(dir.path(), "mid.qcow2", "qcow2", "top.qcow2");
    Chain { dir, model }
}

#[test]
fn a_qcow2_chain_reads_through_and_writes_only_to_the_top() {
    let ch = three_levels();
    let mut model = ch.model.clone();
    let (base, mid, top) = (
        ch.path("base.raw"),
        ch.path("mid.qcow2"),
        ch.path("top.qcow2"),
    );
    let (base_sum, mid_sum) = (sha(&base), sha(&mid));
    let top_len = std::fs::metadata(&top).unwrap().len();
    let sock = ch.path("blk.sock");
    let mut be = Backend::blk(&sock, &top, &["--format", "qcow2", "--num-queues", "1"]);
    let log = be.wait_log("ready");
    assert!(
        log.contains("(qcow2 over ")
            && log.contains("mid.qcow2 (qcow2) over ")
            && log.contains("base.raw (raw))"),
        "the chain is not logged: {log}"
    );
    let mut c = Client::connect(&sock, 1, 2 * MIB as usize);
    assert_eq!(
        c.blkio.get_u64("capacity").unwrap(),
        DISK,
        "virtual size, not the file's"
    );
    verify(&mut c, &model, "through the chain");

    // Writes: single blocks, a 1 MiB write over clusters the middle layer holds (half of it)
    // and the base holds, and one that is not cluster-aligned.
    write_at(&mut c, &mut model, 0, 16 * BLOCK, 3);
    write_at(
        &mut c,
        &mut model,
        (MIB + MIB / 2) as usize,
        MIB as usize,
        4,
    );
    write_at(
        &mut c,
        &mut model,
        5 * MIB as usize + 3 * BLOCK,
        5 * BLOCK,
        5,
    );
    // Zeroing whole clusters over backing data: they must read zero, not fall through.
    zero(&mut c, &mut model, 4 * MIB as usize, 128 << 10, false);
    zero(&mut c, &mut model, 6 * MIB as usize, 64 << 10, true);
    // A zeroed range inside one cluster that the top already holds.
    zero(&mut c, &mut model, BLOCK, BLOCK, true);
    c.queues[0].flush(0, ReqFlags::empty());
    assert_eq!(c.one(0), 0, "flush");
    verify(&mut c, &model, "after the writes");

    // The base is locked against writers while it is served.
    let o = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0 0 4k"])
        .arg(&base)
        .output()
        .unwrap();
    assert!(
        !o.status.success(),
        "qemu-io wrote into the served chain's base"
    );
    drop(c);
    assert!(be.signal_and_wait(libc::SIGTERM).success());

    assert_eq!(sha(&base), base_sum, "the base changed");
    assert_eq!(sha(&mid), mid_sum, "the middle layer changed");
    assert!(
        std::fs::metadata(&top).unwrap().len() > top_len,
        "top.qcow2 did not grow"
    );
    let out = qcow2_contents(ch.dir.path(), "top.qcow2");
    assert!(
        out == model,
        "qemu-img reads something else than was written"
    );

    // A new backend on the same chain reads it all back (metadata reached the file).
    let mut be = Backend::blk(&sock, &top, &["--format", "qcow2"]);
    let mut c = Client::connect(&sock, 1, 2 * MIB as usize);
    verify(&mut c, &model, "after a restart");
    drop(c);
    be.signal_and_wait(libc::SIGTERM);
}

#[test]
fn a_worker_that_replaces_a_killed_one_sees_every_completed_qcow2_write() {
    let ch = three_levels();
    let mut model = ch.model.clone();
    let top = ch.path("top.qcow2");
    let sock = ch.path("blk.sock");
    let mut be = Backend::blk(&sock, &top, &["--format", "qcow2"]);
    let mut c = Client::connect(&sock, 1, 2 * MIB as usize);
    // New clusters, no guest flush: completed is enough.
    write_at(&mut c, &mut model, 3 * MIB as usize, MIB as usize, 7);
    write_at(&mut c, &mut model, 6 * MIB as usize + BLOCK, 2 * BLOCK, 8);
    let old = be.worker_pid();
    be.kill_worker();
    drop(c);
    be.wait_log_count("ready; waiting for a frontend", 2);
    assert_ne!(be.worker_pid(), old);
    let mut c = Client::connect(&sock, 1, 2 * MIB as usize);
    verify(&mut c, &model, "in the new worker");
    drop(c);
    assert!(be.signal_and_wait(libc::SIGTERM).success());
    assert!(
        qcow2_contents(ch.dir.path(), "top.qcow2") == model,
        "qemu-img reads another disk"
    );
}

#[test]
fn a_compressed_qcow2_image_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = base_image(&dir.path().join("base.raw"));
    // Half of it zeros: compressed clusters and unallocated ones.
    model[..DISK as usize / 2].fill(0);
    std::fs::write(dir.path().join("base.raw"), &model).unwrap();
    qemu_img(
        dir.path(),
        &[
            "convert", "-c", "-f", "raw", "-O", "qcow2", "base.raw", "c.qcow2",
        ],
    );
    let sock = dir.path().join("blk.sock");
    let _be = Backend::blk(&sock, &dir.path().join("c.qcow2"), &[]);
    let mut c = Client::connect(&sock, 1, 2 * MIB as usize);
    verify(&mut c, &model, "compressed");
    // Writing over a compressed cluster allocates a normal one.
    write_at(&mut c, &mut model, 7 * MIB as usize, 3 * BLOCK, 9);
    verify(&mut c, &model, "after overwriting compressed clusters");
}

#[test]
fn formats_are_checked_and_refusals_are_specific() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ds = |n: &str| d.join(n).to_str().unwrap().to_owned();
    base_image(&d.join("base.raw"));
    qemu_img(d, &["create", "-q", "-f", "qcow2", "plain.qcow2", "8M"]);
    qcow2_overlay(d, "base.raw", "raw", "over.qcow2");
    qemu_img(d, &["create", "-q", "-f", "vmdk", "x.vmdk", "8M"]);
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            "secret,id=s0,data=hunter2",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s0",
            "enc.qcow2",
            "8M",
        ],
    );
    // a.qcow2 -> b.qcow2 -> a.qcow2.
    qemu_img(d, &["create", "-q", "-f", "qcow2", "b.qcow2", "8M"]);
    qcow2_overlay(d, "b.qcow2", "qcow2", "a.qcow2");
    qemu_img(
        d,
        &["rebase", "-u", "-b", "a.qcow2", "-F", "qcow2", "b.qcow2"],
    );
    // An overlay whose base is gone.
    std::fs::copy(d.join("base.raw"), d.join("gone.raw")).unwrap();
    qcow2_overlay(d, "gone.raw", "raw", "orphan.qcow2");
    std::fs::remove_file(d.join("gone.raw")).unwrap();

    let sock = ds("blk.sock");
    let cases: &[(&str, &[&str], &str)] = &[
        (
            "plain.qcow2",
            &["--format", "raw"],
            "is qcow2, but it was given as raw",
        ),
        (
            "base.raw",
            &["--format", "qcow2"],
            "is raw, but it was given as qcow2",
        ),
        ("over.qcow2", &[], "give --format qcow2 to follow it"),
        ("x.vmdk", &[], "is vmdk, which vhostbox-blk does not serve"),
        (
            "x.vmdk",
            &["--format", "qcow2"],
            "is vmdk, but it was given as qcow2",
        ),
        (
            "enc.qcow2",
            &["--format", "qcow2"],
            "encrypted qcow2 image (LUKS)",
        ),
        ("a.qcow2", &["--format", "qcow2"], "loops back to"),
        (
            "orphan.qcow2",
            &["--format", "qcow2"],
            "cannot open backing file",
        ),
    ];
    for (image, extra, want) in cases {
        let img = ds(image);
        let mut args = vec!["--socket-path", sock.as_str(), "--image", img.as_str()];
        args.extend_from_slice(extra);
        let (code, err) = run_to_exit("vhostbox-blk", &args);
        assert_eq!(code, 2, "{image} {extra:?}: {err}");
        assert!(
            err.contains(want),
            "{image} {extra:?}: want '{want}' in: {err}"
        );
        assert!(!Path::new(&sock).exists(), "{image}: the socket was left");
    }
    // A probed qcow2 image without a backing file is served as qcow2 (it reads zeros, where
    // its raw bytes would show the header).
    let mut be = Backend::blk(Path::new(&sock), &d.join("plain.qcow2"), &[]);
    let mut c = Client::connect(Path::new(&sock), 1, 64 << 10);
    c.buf(0, 4096).fill(1);
    assert_eq!(c.read(0, 0, 0, 4096), 0);
    assert!(c.buf(0, 4096).iter().all(|&b| b == 0), "served the header");
    drop(c);
    assert!(be.log().contains("(qcow2)"), "{}", be.log());
    be.signal_and_wait(libc::SIGTERM);
}

#[test]
fn resize_grows_the_qcow2_virtual_size_and_the_backing_file_does_not_show_through() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut model = base_image(&d.join("base.raw"));
    // A 4 MiB overlay over the 8 MiB base: the base's second half is beyond the disk.
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "top.qcow2",
            "4M",
        ],
    );
    model.truncate(4 * MIB as usize);
    let sock = d.join("blk.sock");
    let csock = d.join("ctl.sock");
    let mut be = Backend::blk(
        &sock,
        &d.join("top.qcow2"),
        &["--format", "qcow2", "--control", csock.to_str().unwrap()],
    );
    let c = Client::connect(&sock, 1, 2 * MIB as usize);
    assert_eq!(c.blkio.get_u64("capacity").unwrap(), 4 * MIB);
    for (args, want) in [
        (&["resize"][..], "give a size"),
        (&["resize", "2M", "--force"], "shrinking a qcow2 image"),
        (&["resize", "5000"], "not a positive multiple"),
    ] {
        let (code, _, err) = vhostbox_tests::vhostboxctl(&csock, args);
        assert_ne!(code, 0, "{args:?}");
        assert!(err.contains(want), "{args:?}: want '{want}' in {err}");
    }
    // Grown while a frontend is connected: the serving worker grows the image.
    let (code, r, err) = vhostbox_tests::vhostboxctl(&csock, &["resize", "8M"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(r["new"], 8 * MIB, "{r}");
    be.wait_log("capacity 4194304 -> 8388608 bytes");
    // The header on disk says so already: the serving worker wrote it.
    let info = qemu_img(d, &["info", "-U", "--output=json", "top.qcow2"]);
    assert!(info.contains("\"virtual-size\": 8388608"), "{info}");
    drop(c);
    // The next connection (a new worker, reading the header) sees 8 MiB, zeros past 4 MiB.
    let mut c = Client::connect(&sock, 1, 2 * MIB as usize);
    assert_eq!(c.blkio.get_u64("capacity").unwrap(), 8 * MIB);
    model.resize(8 * MIB as usize, 0);
    verify(&mut c, &model, "after growing");
    write_at(&mut c, &mut model, 6 * MIB as usize, 8 * BLOCK, 6);
    verify(&mut c, &model, "after writing into the new range");
    drop(c);
    assert!(be.signal_and_wait(libc::SIGTERM).success());
    assert!(
        qcow2_contents(d, "top.qcow2") == model,
        "qemu-img reads another disk"
    );
}
