//! In-flight I/O tracking with the real binary (jailed, supervised) and a frontend that behaves
//! like QEMU with `reconnect-ms`: it asks for the in-flight region (GET_INFLIGHT_FD), keeps it,
//! and when the backend dies connects again with the same guest memory, rings and region
//! (SET_INFLIGHT_FD) and restarts each queue at its used index.
//!
//! - A dead worker's state with a completion out of order (forged in the region and the rings
//!   while no worker runs): the successor resubmits exactly the open requests and none twice,
//!   and continues at the right place in the avail ring. Without tracking this cannot work:
//!   the ring base alone would re-run the completed request and lose the oldest one.
//! - Real kills: writes at queue depth 32 on 2 queues, the worker SIGKILLed at random moments
//!   15 times: every request completes exactly once and the image holds what was written.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use vhostbox_tests::blkreq;
use vhostbox_tests::frontend::{
    DeviceOptions, VhostUserDevice, Virtqueue, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use vhostbox_tests::{pattern, sparse_image, Backend};

const QSIZE: u16 = 128;

fn start(dir: &Path, size: u64) -> (Backend, std::path::PathBuf) {
    start_on(dir, &sparse_image(&dir.join("disk.img"), size))
}

/// A backend on `dir`/blk.sock serving the existing image `img`.
fn start_on(dir: &Path, img: &Path) -> (Backend, std::path::PathBuf) {
    let img = img.to_owned();
    let sock = dir.join("blk.sock");
    let b = Backend::blk(
        &sock,
        &img,
        &[
            "--num-queues",
            "2",
            "--queue-size",
            &QSIZE.to_string(),
            "--seccomp",
            "kill",
            // Through to the disk: requests stay in flight long enough for kills to hit them.
            "--direct",
        ],
    );
    (b, img)
}

/// Connects with 2 queues, EVENT_IDX and an in-flight region, as QEMU's vhost-user-blk does.
fn connect(sock: &Path) -> VhostUserDevice {
    VhostUserDevice::connect_with(
        sock,
        2,
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX,
        &opts(),
    )
    .unwrap()
}

fn opts() -> DeviceOptions {
    DeviceOptions {
        queue_size: QSIZE,
        inflight: true,
        ..Default::default()
    }
}

/// A write of `data` at `sector` as one chain (header, data, status); returns (head, status
/// address). Not kicked.
fn add_write(q: &mut Virtqueue, sector: u64, data: &[u8]) -> (u16, u64) {
    let buf = q.mem().alloc(data.len(), 512);
    q.mem().write(buf, data);
    blkreq::add(q, blkreq::T_OUT, sector, &[(buf, data.len() as u32, false)])
}

fn block(sector: u64, gen: u64) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    pattern(&mut b, sector, gen);
    b
}

// Offsets in the in-flight region (queue 0 at offset 0; see vhost-user "Inflight I/O tracking").
const VERSION: usize = 8;
const DESC_NUM: usize = 10;
const LAST_BATCH_HEAD: usize = 12;
const USED_IDX: usize = 14;
fn desc(i: u16) -> usize {
    16 + 16 * usize::from(i)
}

#[test]
fn successor_resubmits_exactly_the_open_requests_after_an_out_of_order_completion() {
    let dir = tempfile::tempdir().unwrap();
    let (backend, img) = start(dir.path(), 4 << 20);
    let sock = backend.socket.clone();
    let mut dev = connect(&sock);
    let r = dev.inflight().expect("the backend offers INFLIGHT_SHMFD");
    assert_eq!(r.info.num_queues, 2);
    assert_eq!(r.info.queue_size, QSIZE);
    assert!(r.info.mmap_size >= 2 * (16 + 16 * u64::from(QSIZE)));

    // One ordinary write: the worker takes the region up (version 1, QSIZE descriptors).
    let (h0, st0) = add_write(dev.queue(0), 0, &block(0, 1));
    dev.queue(0).kick();
    assert_eq!(
        dev.queue(0).wait_used(Duration::from_secs(5)).map(|u| u.0),
        Some(h0)
    );
    assert_eq!(dev.mem().read_vec(st0, 1), vec![0]);
    let bytes = dev.inflight().unwrap().bytes();
    assert_eq!(u16::from_le_bytes([bytes[VERSION], bytes[VERSION + 1]]), 1);
    assert_eq!(
        u16::from_le_bytes([bytes[DESC_NUM], bytes[DESC_NUM + 1]]),
        QSIZE
    );
    assert_eq!(bytes[desc(h0)], 0, "a completed request is not left marked");

    // The worker dies. What it left, as a worker that had taken A, B, C and D (in that order)
    // and completed B only would leave it: all four in the avail ring, B in the used ring, A, C
    // and D marked in flight with their submission order.
    backend.kill_worker();
    let mut reqs = Vec::new();
    for k in 0..4u64 {
        let sector = 8 * (k + 1);
        let (h, st) = add_write(dev.queue(0), sector, &block(sector, 7));
        reqs.push((h, st, sector));
    }
    let (a, b, c, d) = (reqs[0].0, reqs[1].0, reqs[2].0, reqs[3].0);
    let q = dev.queue(0);
    let used = q.used_addr();
    let mem = q.mem().clone();
    let idx = mem.read_u16(used + 2);
    mem.write_u32(used + 4 + 8 * u64::from(idx % QSIZE), b.into());
    mem.write_u32(used + 4 + 8 * u64::from(idx % QSIZE) + 4, 1);
    mem.write(reqs[1].1, &[0]);
    mem.write_u16(used + 2, idx.wrapping_add(1));
    let region = dev.inflight().unwrap();
    for (n, &(h, _, _)) in reqs.iter().enumerate() {
        let mut e = [0u8; 16];
        e[0] = u8::from(h != b);
        e[8..16].copy_from_slice(&(100 + n as u64).to_le_bytes());
        region.write(desc(h), &e);
    }
    region.write(LAST_BATCH_HEAD, &b.to_le_bytes());
    region.write(USED_IDX, &idx.wrapping_add(1).to_le_bytes());
    // The frontend takes B's completion (it saw it before the backend died).
    assert_eq!(dev.queue(0).poll_used().map(|u| u.0), Some(b));

    // Reconnect: the frontend says "start at the used index" (idx + 1 = B's avail position),
    // which would run B again and never A; the region says otherwise.
    let mut dev = dev.reconnect(&sock).unwrap();
    let mut got = Vec::new();
    while let Some((h, len)) = dev.queue(0).wait_used(Duration::from_secs(5)) {
        assert_eq!(len, 1);
        got.push(h);
        if got.len() == 3 {
            break;
        }
    }
    got.sort();
    let mut want = vec![a, c, d];
    want.sort();
    assert_eq!(got, want, "resubmitted: {}", backend.log());
    assert!(
        dev.queue(0).wait_used(Duration::from_millis(300)).is_none(),
        "a request completed twice"
    );
    let log = backend.wait_log("resubmitting 3 request(s)");
    let f = fs::File::open(&img).unwrap();
    for &(h, st, sector) in &reqs {
        let mut on_disk = vec![0u8; 4096];
        f.read_exact_at(&mut on_disk, sector * 512).unwrap();
        if h == b {
            assert!(on_disk.iter().all(|&x| x == 0), "B was run again\n{log}");
        } else {
            assert_eq!(on_disk, block(sector, 7), "request {h} not written\n{log}");
            assert_eq!(dev.mem().read_vec(st, 1), vec![0]);
        }
    }
    // New requests are taken from the right place: after D, not B, C or D again.
    let (e, _) = add_write(dev.queue(0), 64, &block(64, 9));
    dev.queue(0).kick();
    assert_eq!(
        dev.queue(0).wait_used(Duration::from_secs(5)).map(|u| u.0),
        Some(e)
    );
    assert!(dev.queue(0).wait_used(Duration::from_millis(200)).is_none());
}

#[test]
fn every_request_completes_once_across_15_worker_kills() {
    let dir = tempfile::tempdir().unwrap();
    let blocks: u64 = 1024;
    let (backend, img) = start(dir.path(), blocks * 4096);
    let sock = backend.socket.clone();
    let mut dev = connect(&sock);
    let mut expect: Vec<u64> = vec![0; blocks as usize];
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rnd = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut kills = 0;
    let mut resubmitted_rounds = 0;
    for round in 1..=30u64 {
        // Per queue, 32 writes to distinct blocks (no two in flight overlap).
        let mut outstanding = [Vec::new(), Vec::new()];
        let mut used_blocks = std::collections::HashSet::new();
        for (qi, out) in outstanding.iter_mut().enumerate() {
            for _ in 0..32 {
                let mut blk = rnd(blocks);
                while !used_blocks.insert(blk) {
                    blk = rnd(blocks);
                }
                let (h, st) = add_write(dev.queue(qi), blk * 8, &block(blk, round));
                out.push((h, st, blk));
            }
            dev.queue(qi).kick();
        }
        let before = backend.log().matches("resubmitting").count();
        if round % 2 == 0 {
            std::thread::sleep(Duration::from_micros(rnd(800)));
            backend.kill_worker();
            kills += 1;
            dev = dev.reconnect(&sock).unwrap();
        }
        for (qi, out) in outstanding.iter_mut().enumerate() {
            while !out.is_empty() {
                let (h, len) = dev
                    .queue(qi)
                    .wait_used(Duration::from_secs(10))
                    .unwrap_or_else(|| {
                        panic!(
                            "round {round}: {} request(s) never completed on queue {qi}\n{}",
                            out.len(),
                            backend.log()
                        )
                    });
                let pos = out
                    .iter()
                    .position(|r| r.0 == h)
                    .unwrap_or_else(|| panic!("round {round}: request {h} completed twice"));
                let (_, st, blk) = out.swap_remove(pos);
                assert_eq!(len, 1);
                assert_eq!(dev.mem().read_vec(st, 1), vec![0], "status of {h}");
                expect[blk as usize] = round;
            }
        }
        if backend.log().matches("resubmitting").count() > before {
            resubmitted_rounds += 1;
        }
    }
    eprintln!("{kills} kills; {resubmitted_rounds} left requests in flight that were resubmitted");
    let data = fs::read(&img).unwrap();
    for (blk, &gen) in expect.iter().enumerate() {
        let want = if gen == 0 {
            vec![0u8; 4096]
        } else {
            block(blk as u64, gen)
        };
        assert!(
            data[blk * 4096..(blk + 1) * 4096] == want[..],
            "block {blk} does not hold round {gen}'s data"
        );
    }
}

/// SIGTERM drains: the worker completes and publishes every request it took before it exits,
/// so nothing is left marked in the region for a successor to redo. 8 rounds, each stopping a
/// fresh backend with 64 writes just submitted.
#[test]
fn sigterm_completes_what_is_in_flight_before_exiting() {
    let mut drained = 0;
    for round in 0..8u64 {
        let dir = tempfile::tempdir().unwrap();
        let (mut backend, img) = start(dir.path(), 4 << 20);
        let sock = backend.socket.clone();
        let mut dev = connect(&sock);
        let mut reqs = Vec::new();
        for qi in 0..2 {
            for k in 0..32u64 {
                let blk = qi as u64 * 32 + k;
                let (h, st) = add_write(dev.queue(qi), blk * 8, &block(blk, round + 1));
                reqs.push((qi, h, st, blk));
            }
            dev.queue(qi).kick();
        }
        std::thread::sleep(Duration::from_micros(100 * round));
        let st = backend.signal_and_wait(libc::SIGTERM);
        assert!(st.success(), "exit status {st}\n{}", backend.log());
        let log = backend.log();
        if log.contains("completed before stopping") {
            drained += 1;
        }
        // Nothing is marked in flight, in either queue's part of the region.
        let bytes = dev.inflight().unwrap().bytes();
        let part = bytes.len() / 2;
        for qi in 0..2 {
            for i in 0..QSIZE {
                assert_eq!(
                    bytes[qi * part + desc(i)],
                    0,
                    "round {round}: queue {qi} descriptor {i} left in flight\n{log}"
                );
            }
        }
        // Every request the worker took is in the used ring, done and on disk; the rest were
        // never taken (the guest would hand them to the next worker).
        let data = fs::read(&img).unwrap();
        for qi in 0..2 {
            while let Some((h, _)) = dev.queue(qi).poll_used() {
                let &(_, _, st, blk) = reqs.iter().find(|r| r.0 == qi && r.1 == h).unwrap();
                assert_eq!(dev.mem().read_vec(st, 1), vec![0], "round {round}");
                let b = blk as usize * 4096;
                assert!(
                    data[b..b + 4096] == block(blk, round + 1)[..],
                    "round {round}"
                );
            }
        }
    }
    eprintln!("{drained} of 8 stops had requests in flight to complete");
}

/// The supervisor itself is SIGKILLed with writes in flight (its worker dies with it), and a new
/// backend is started on the same socket path and image, as systemd's Restart= would: the
/// frontend reconnects with its region and every request completes exactly once.
#[test]
fn a_restarted_backend_takes_over_after_the_supervisor_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let (mut backend, img) = start(dir.path(), 4 << 20);
    let sock = backend.socket.clone();
    let mut dev = connect(&sock);
    let mut out = [Vec::new(), Vec::new()];
    for (qi, o) in out.iter_mut().enumerate() {
        for k in 0..32u64 {
            let blk = qi as u64 * 32 + k;
            let (h, st) = add_write(dev.queue(qi), blk * 8, &block(blk, 5));
            o.push((h, st, blk));
        }
        dev.queue(qi).kick();
    }
    let worker = backend.worker_pid();
    backend.child.kill().unwrap();
    backend.child.wait().unwrap();
    // The worker goes with its supervisor.
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{worker}")).exists() {
        assert!(
            Instant::now() < deadline,
            "worker {worker} outlived its supervisor"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let log1 = backend.log();
    drop(backend);
    let (backend, _) = start_on(dir.path(), &img);
    let mut dev = dev.reconnect(&sock).unwrap();
    for (qi, o) in out.iter_mut().enumerate() {
        while !o.is_empty() {
            let (h, _) = dev
                .queue(qi)
                .wait_used(Duration::from_secs(10))
                .unwrap_or_else(|| panic!("{} never completed\n{}", o.len(), backend.log()));
            let pos = o
                .iter()
                .position(|r| r.0 == h)
                .unwrap_or_else(|| panic!("request {h} completed twice\n{log1}"));
            let (_, st, _) = o.swap_remove(pos);
            assert_eq!(dev.mem().read_vec(st, 1), vec![0]);
        }
    }
    let data = fs::read(&img).unwrap();
    for blk in 0..64usize {
        assert!(data[blk * 4096..(blk + 1) * 4096] == block(blk as u64, 5)[..]);
    }
    eprintln!(
        "the new backend resubmitted: {}",
        backend
            .log()
            .lines()
            .find(|l| l.contains("resubmitting"))
            .unwrap_or("nothing (all had completed)")
    );
}
