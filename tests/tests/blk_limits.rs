//! I/O limits (`--limit-*`, `set-limits` on `--control`), driven by libblkio against the real,
//! jailed binary.
//!
//! Every read is verified against the pattern written first. What is asserted about time is
//! only what a token bucket guarantees whatever the machine's speed: N requests at rate R
//! with a burst of B cannot finish in less than (N - B) / R. Whether requests waited at all is
//! read from the backend's own counter (`blk_throttled_requests`), not from a clock.

use std::path::Path;
use std::time::{Duration, Instant};

use blkio::ReqFlags;
use vhostbox_tests::blkio_client::Client;
use vhostbox_tests::openmetrics::{scrape, value};
use vhostbox_tests::{pattern, sparse_image, vhostboxctl, Backend};

const BLOCKS: u64 = 256;

fn ctl(sock: &Path, args: &[&str]) -> (i32, serde_json::Value) {
    let (code, v, _) = vhostboxctl(sock, args);
    (code, v)
}

/// Requests every queue held back so far.
fn throttled(msock: &Path) -> f64 {
    let s = scrape(msock);
    (0..2)
        .map(|q| {
            value(
                &s,
                "vhostbox_blk_throttled_requests_total",
                &[("queue", &q.to_string())],
            )
        })
        .sum()
}

/// Fills the first BLOCKS 4 KiB blocks with their pattern.
fn fill(c: &mut Client) {
    for lba in 0..BLOCKS {
        pattern(c.buf(0, 4096), lba, 3);
        assert_eq!(c.write(0, lba * 4096, 0, 4096), 0);
    }
}

/// `n` 4 KiB requests spread over `queues` (round robin), up to 16 in flight on each; reads
/// are checked against the pattern, writes rewrite it. Returns how long they took.
fn io(c: &mut Client, queues: usize, n: usize, write: bool) -> Duration {
    const DEPTH: usize = 16;
    let t0 = Instant::now();
    let mut issued = 0usize;
    let quota: Vec<usize> = (0..queues)
        .map(|q| n / queues + usize::from(q < n % queues))
        .collect();
    let mut issued_on = vec![0usize; queues];
    let mut inflight = vec![0usize; queues];
    let mut done = 0usize;
    let mut lba_of = vec![0u64; queues * DEPTH];
    let mut free: Vec<Vec<usize>> = (0..queues)
        .map(|q| (q * DEPTH..(q + 1) * DEPTH).collect())
        .collect();
    while done < n {
        for q in 0..queues {
            while issued_on[q] < quota[q] && inflight[q] < DEPTH {
                let slot = free[q].pop().unwrap();
                let lba = (issued as u64 * 7) % BLOCKS;
                lba_of[slot] = lba;
                let p = c.ptr(slot * 4096);
                if write {
                    pattern(c.buf(slot * 4096, 4096), lba, 3);
                    c.queues[q].write(lba * 4096, p, 4096, slot, ReqFlags::empty());
                } else {
                    c.buf(slot * 4096, 4096).fill(0);
                    c.queues[q].read(lba * 4096, p, 4096, slot, ReqFlags::empty());
                }
                inflight[q] += 1;
                issued_on[q] += 1;
                issued += 1;
            }
        }
        for q in 0..queues {
            if inflight[q] == 0 {
                continue;
            }
            for (slot, ret) in c.wait(q, 1) {
                assert_eq!(ret, 0, "request in slot {slot} failed");
                if !write {
                    let mut want = vec![0u8; 4096];
                    pattern(&mut want, lba_of[slot], 3);
                    assert!(
                        c.buf(slot * 4096, 4096) == want.as_slice(),
                        "lba {} read back wrong",
                        lba_of[slot]
                    );
                }
                free[q].push(slot);
                inflight[q] -= 1;
                done += 1;
            }
        }
    }
    t0.elapsed()
}

/// A read limit from the command line holds reads (on both queues together) and not writes;
/// `set-limits` lifts it, sets a total one and a byte rate, all at run time; a worker
/// restart keeps the limits; bad requests change nothing.
#[test]
fn limits_hold_the_device_and_change_at_run_time() {
    let dir = tempfile::tempdir().unwrap();
    let img = sparse_image(&dir.path().join("disk.img"), 16 << 20);
    let sock = dir.path().join("blk.sock");
    let msock = dir.path().join("metrics.sock");
    let csock = dir.path().join("control.sock");
    let m = format!("unix:{}", msock.display());
    let mut be = Backend::blk(
        &sock,
        &img,
        &[
            "--num-queues",
            "2",
            "--limit-read-iops",
            "200",
            "--limit-iops-burst",
            "10",
            "--metrics",
            &m,
            "--control",
            csock.to_str().unwrap(),
        ],
    );
    let (code, st) = ctl(&csock, &["status"]);
    assert_eq!(code, 0);
    assert_eq!(st["limits"]["read-iops"], 200);
    assert_eq!(st["limits"]["iops"], 0);
    assert_eq!(st["limits"]["iops-burst"], 10);

    let mut c = Client::connect(&sock, 2, 2 * 16 * 4096);
    fill(&mut c);
    assert_eq!(throttled(&msock), 0.0, "writes are not read-limited");

    // 300 reads at 200/s with a burst of 10: at least 1.45 s, on both queues together.
    let t = io(&mut c, 2, 300, false);
    assert!(t >= Duration::from_millis(1400), "300 reads in {t:?}");
    let held = throttled(&msock);
    assert!(held > 0.0, "no read was held back");
    let s = scrape(&msock);
    for q in ["0", "1"] {
        let ok = value(
            &s,
            "vhostbox_blk_completions_total",
            &[("queue", q), ("status", "ok")],
        );
        assert!(ok >= 150.0, "queue {q}: {ok} completions");
        let err = value(
            &s,
            "vhostbox_blk_completions_total",
            &[("queue", q), ("status", "ioerr")],
        );
        assert_eq!(err, 0.0, "a throttled request failed");
    }
    io(&mut c, 2, 200, true);
    assert_eq!(throttled(&msock), held, "a write waited for the read limit");

    // Lifted at run time: nothing waits any more.
    let (code, r) = ctl(&csock, &["set-limits", "--read-iops", "0"]);
    assert_eq!(code, 0, "{r}");
    assert_eq!(r["limits"]["read-iops"], 0);
    std::thread::sleep(Duration::from_millis(100)); // a held queue looks again within 50 ms
    let before = throttled(&msock);
    io(&mut c, 2, 300, false);
    assert_eq!(throttled(&msock), before, "a read waited with no limit set");

    // A total limit: reads and writes together, 100/s, burst 10.
    let (code, r) = ctl(&csock, &["set-limits", "--iops", "100"]);
    assert_eq!(code, 0, "{r}");
    let t0 = Instant::now();
    io(&mut c, 2, 80, false);
    io(&mut c, 2, 80, true);
    let t = t0.elapsed();
    assert!(t >= Duration::from_millis(1500), "160 requests in {t:?}");
    assert!(throttled(&msock) > before);

    // A byte rate: 512 KiB/s of reads with a 64 KiB burst; 1 MiB of reads takes >= 1.875 s.
    let (code, r) = ctl(
        &csock,
        &[
            "set-limits",
            "--iops",
            "0",
            "--read-bps",
            "512K",
            "--bps-burst",
            "64K",
        ],
    );
    assert_eq!(code, 0, "{r}");
    assert_eq!(r["limits"]["read-bps"], 512 << 10);
    let t = io(&mut c, 2, 256, false);
    assert!(t >= Duration::from_millis(1800), "1 MiB in {t:?}");

    // Bad requests are refused and change nothing.
    for (bad, why) in [
        (
            r#"{"command":"set-limits","nope":1}"#,
            "unknown setting 'nope'",
        ),
        (
            r#"{"command":"set-limits","iops":-1}"#,
            "iops: not a whole number",
        ),
        (
            r#"{"command":"set-limits","iops":"fast"}"#,
            "iops: a number",
        ),
        (r#"{"command":"set-limits","read-bps":"12Q"}"#, "read-bps:"),
        (
            r#"{"command":"set-limits","iops":2251799813685249}"#,
            "more than the largest value",
        ),
        (
            r#"{"command":"set-limits","iops":5,"write-iops":[1]}"#,
            "write-iops: a number",
        ),
        (r#"{"command":"set-limits"}"#, "name at least one"),
    ] {
        let (code, _, err) = vhostboxctl(&csock, &["raw", bad]);
        assert_eq!(code, 1, "{bad}: {err}");
        assert!(err.contains(why), "{bad}: {err}");
    }
    let (code, _, err) = vhostboxctl(&csock, &["set-limits"]);
    assert_eq!(code, 2, "{err}");
    let (_, st) = ctl(&csock, &["status"]);
    assert_eq!(st["limits"]["iops"], 0, "{st}");
    assert_eq!(st["limits"]["write-iops"], 0, "{st}");
    assert_eq!(st["limits"]["read-bps"], 512 << 10, "{st}");

    // The limits are the supervisor's: a new worker keeps them.
    drop(c);
    let (code, _) = ctl(
        &csock,
        &["set-limits", "--read-bps", "0", "--read-iops", "100"],
    );
    assert_eq!(code, 0);
    be.kill_worker();
    let mut c = Client::connect(&sock, 2, 2 * 16 * 4096);
    let before = throttled(&msock);
    let t = io(&mut c, 2, 60, false);
    assert!(t >= Duration::from_millis(450), "60 reads in {t:?}");
    assert!(throttled(&msock) > before, "the new worker is not limited");
    drop(c);
    assert!(be.alive());
    assert!(!be.log().contains("killed by seccomp"), "{}", be.log());
}

/// Limits on the command line are checked like every other flag.
#[test]
fn bad_limit_flags_are_usage_errors() {
    for bad in [
        &["--limit-iops", "-1"][..],
        &["--limit-bps", "fast"],
        &["--limit-read-bps", "2000000T"],
        &["--limit-write-iops", "1.5"],
    ] {
        let mut args = vec![
            "--socket-path",
            "/tmp/vhostbox-limits-never.sock",
            "--null",
            "1G",
        ];
        args.extend_from_slice(bad);
        let (code, err) = vhostbox_tests::run_to_exit("vhostbox-blk", &args);
        assert_eq!(code, 2, "{bad:?}: {err}");
        assert!(
            err.contains("limit") || err.contains("-1"),
            "{bad:?}: {err}"
        );
        assert!(!Path::new("/tmp/vhostbox-limits-never.sock").exists());
    }
}
