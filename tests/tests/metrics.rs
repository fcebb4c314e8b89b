//! `--metrics` and `--control`: what the supervisor serves about a running backend.
//!
//! The metrics text is parsed by the Python `prometheus_client` OpenMetrics parser (a real
//! Prometheus text parser, not a regex); the figures are checked against I/O the test did and
//! verified itself. The control socket is driven through `vhostboxctl` and by hand, with the
//! hostile cases: malformed JSON, a huge line, silent clients, a client that never reads.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use blkio::ReqFlags;
use vhostbox_tests::blkio_client::Client;
use vhostbox_tests::openmetrics::{http, scrape, value};
use vhostbox_tests::{pattern, probe_bin, sparse_image, Backend};

/// The service process served every request without dying (a seccomp kill would be replaced
/// silently as far as the clients can tell).
fn assert_service_never_died(be: &Backend) {
    let log = be.log();
    assert!(
        !log.contains("service process") || !(log.contains("killed") || log.contains("ended")),
        "the service process died:\n{log}"
    );
}

fn ctl(sock: &Path, args: &[&str]) -> (i32, serde_json::Value, String) {
    vhostbox_tests::vhostboxctl(sock, args)
}

/// 8 writes and 8 verified reads of 4 KiB on queue `q`.
fn verified_io(c: &mut Client, q: usize) {
    for lba in 0..8u64 {
        pattern(c.buf(0, 4096), lba, 7);
        assert_eq!(c.write(q, lba * 4096, 0, 4096), 0);
    }
    for lba in 0..8u64 {
        c.buf(4096, 4096).fill(0);
        assert_eq!(c.read(q, lba * 4096, 4096, 4096), 0);
        let mut want = vec![0u8; 4096];
        pattern(&mut want, lba, 7);
        assert!(
            c.buf(4096, 4096) == want.as_slice(),
            "lba {lba} read back wrong"
        );
    }
}

/// After 16 verified I/Os on queue 1, queue 1 shows exactly those and queue 0 nothing; the
/// control socket's status shows the frontend that did them.
#[test]
fn metrics_count_verified_io_on_its_queue_only() {
    let dir = tempfile::tempdir().unwrap();
    let img = sparse_image(&dir.path().join("disk.img"), 16 << 20);
    let sock = dir.path().join("blk.sock");
    let msock = dir.path().join("metrics.sock");
    let csock = dir.path().join("control.sock");
    let m = format!("unix:{}", msock.display());
    let be = Backend::blk(
        &sock,
        &img,
        &[
            "--num-queues",
            "2",
            "--metrics",
            &m,
            "--control",
            csock.to_str().unwrap(),
        ],
    );
    let before = scrape(&msock);
    assert_eq!(value(&before, "vhostbox_frontend_connected", &[]), 0.0);
    assert_eq!(value(&before, "vhostbox_connections_total", &[]), 0.0);

    let mut c = Client::connect(&sock, 2, 1 << 20);
    verified_io(&mut c, 1);
    let s = scrape(&msock);
    let req = |q: &str, t: &str| {
        value(
            &s,
            "vhostbox_blk_requests_total",
            &[("queue", q), ("type", t)],
        )
    };
    assert_eq!(req("1", "write"), 8.0);
    assert_eq!(req("1", "read"), 8.0);
    for t in [
        "read",
        "write",
        "flush",
        "get_id",
        "discard",
        "write_zeroes",
        "unsupported",
    ] {
        assert_eq!(req("0", t), 0.0, "queue 0 {t}");
    }
    let bytes = |q: &str, d: &str| {
        value(
            &s,
            "vhostbox_blk_bytes_total",
            &[("queue", q), ("direction", d)],
        )
    };
    assert_eq!(bytes("1", "read"), 32768.0);
    assert_eq!(bytes("1", "write"), 32768.0);
    assert_eq!(bytes("0", "read"), 0.0);
    let done = |q: &str, st: &str| {
        value(
            &s,
            "vhostbox_blk_completions_total",
            &[("queue", q), ("status", st)],
        )
    };
    assert_eq!(done("1", "ok"), 16.0);
    assert_eq!(done("1", "ioerr"), 0.0);
    assert_eq!(done("0", "ok"), 0.0);
    assert_eq!(
        value(
            &s,
            "vhostbox_blk_request_duration_seconds_count",
            &[("queue", "1")]
        ),
        16.0
    );
    assert_eq!(
        value(
            &s,
            "vhostbox_blk_request_duration_seconds_bucket",
            &[("queue", "1"), ("le", "+Inf")]
        ),
        16.0
    );
    assert_eq!(
        value(
            &s,
            "vhostbox_blk_request_duration_seconds_count",
            &[("queue", "0")]
        ),
        0.0
    );
    assert_eq!(value(&s, "vhostbox_blk_in_flight", &[("queue", "1")]), 0.0);
    assert_eq!(value(&s, "vhostbox_frontend_connected", &[]), 1.0);
    assert_eq!(value(&s, "vhostbox_connections_total", &[]), 1.0);
    assert_eq!(value(&s, "vhostbox_worker_restarts_total", &[]), 0.0);
    assert!(
        value(
            &s,
            "vhostbox_cpu_seconds_total",
            &[("process", "supervisor")]
        ) > 0.0
    );

    // The control socket tells the same story.
    let (code, st, err) = ctl(&csock, &["status"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(st["backend"], "vhostbox-blk");
    assert_eq!(st["state"], "serving");
    assert_eq!(st["connections"], 1);
    assert_eq!(st["queues"], 2);
    assert_eq!(st["worker"]["pid"], be.worker_pid());
    assert_eq!(st["worker"]["serving"], true);
    assert_eq!(st["frontend"]["rings_enabled"], serde_json::json!([0, 1]));
    let features = u64::from_str_radix(
        st["frontend"]["features"]
            .as_str()
            .unwrap()
            .trim_start_matches("0x"),
        16,
    )
    .unwrap();
    assert_ne!(features & 1 << 32, 0, "VIRTIO_F_VERSION_1 acked: {st}");
    let (code, stats, err) = ctl(&csock, &["stats"]);
    assert_eq!(code, 0, "{err}");
    let w = &stats["metrics"]["vhostbox_blk_requests_total"];
    let q1_writes = w
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["queue"] == "1" && x["type"] == "write")
        .unwrap();
    assert_eq!(q1_writes["value"], 8);

    // Counters add up over connections; the frontend gauge follows the connection.
    drop(c);
    let mut c = Client::connect(&sock, 2, 1 << 20);
    verified_io(&mut c, 1);
    let s = scrape(&msock);
    assert_eq!(
        value(
            &s,
            "vhostbox_blk_requests_total",
            &[("queue", "1"), ("type", "read")]
        ),
        16.0
    );
    assert_eq!(value(&s, "vhostbox_connections_total", &[]), 2.0);
    assert_eq!(
        value(&s, "vhostbox_worker_exits_total", &[("how", "finished")]),
        1.0
    );
    // The first worker was reaped: its CPU time is in (getrusage is exact, where a live
    // worker's /proc figure counts in 10 ms ticks).
    assert!(value(&s, "vhostbox_cpu_seconds_total", &[("process", "workers")]) > 0.0);
    drop(c);
    assert_service_never_died(&be);
}

/// A worker killed by its seccomp filter shows up in the counters with the syscall.
#[test]
fn a_seccomp_kill_is_counted_with_its_syscall() {
    let dir = tempfile::tempdir().unwrap();
    let img = sparse_image(&dir.path().join("disk.img"), 16 << 20);
    let sock = dir.path().join("blk.sock");
    let msock = dir.path().join("metrics.sock");
    let m = format!("unix:{}", msock.display());
    let be = Backend::start_exe(
        &probe_bin("vhostbox-blk"),
        &sock,
        &vhostbox_tests::blk_args(
            &sock,
            &img,
            &["--metrics", &m, "--jail-probe", "seccomp-after=4"],
        ),
    );
    let first = be.worker_pid();
    let s = scrape(&msock);
    assert_eq!(
        value(&s, "vhostbox_worker_exits_total", &[("how", "seccomp")]),
        0.0
    );
    {
        let mut c = Client::connect(&sock, 1, 1 << 20);
        // Reads until the worker dies (in its 3rd to 6th request): a request then never completes.
        for _ in 0..20 {
            let p = c.ptr(0);
            c.queues[0].read(0, p, 4096, 0, ReqFlags::empty());
            let mut comp = [std::mem::MaybeUninit::uninit()];
            let mut t = Duration::from_secs(3);
            match c.queues[0].do_io(&mut comp, 1, Some(&mut t), None) {
                Ok(1) => continue,
                _ => break,
            }
        }
    }
    be.wait_log("killed by seccomp");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while be.worker_pid() == first {
        assert!(
            std::time::Instant::now() < deadline,
            "no replacement worker"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let s = scrape(&msock);
    assert_eq!(
        value(&s, "vhostbox_seccomp_kills_total", &[("syscall", "socket")]),
        1.0
    );
    assert_eq!(
        value(&s, "vhostbox_worker_exits_total", &[("how", "seccomp")]),
        1.0
    );
    assert_eq!(value(&s, "vhostbox_worker_restarts_total", &[]), 1.0);
    // It died in its 3rd to 6th request (seccomp-after=4): the ones before it were counted.
    let reads = value(
        &s,
        "vhostbox_blk_requests_total",
        &[("queue", "0"), ("type", "read")],
    );
    assert!((2.0..=5.0).contains(&reads), "{reads} reads counted");
}

fn start_null(dir: &Path, extra: &[&str]) -> Backend {
    let sock = dir.join("blk.sock");
    let csock = dir.join("control.sock");
    let mut args = vec![
        "--socket-path",
        sock.to_str().unwrap(),
        "--null",
        "1M",
        "--control",
        csock.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    Backend::start("vhostbox-blk", &sock, &args)
}

/// Sends `line` (a newline is added) and returns the one reply line as JSON.
fn ask(s: &mut BufReader<UnixStream>, line: &[u8]) -> serde_json::Value {
    s.get_mut().write_all(line).unwrap();
    s.get_mut().write_all(b"\n").unwrap();
    let mut r = String::new();
    s.read_line(&mut r).unwrap();
    serde_json::from_str(&r).unwrap_or_else(|e| panic!("{e}: {r:?}"))
}

fn connect(p: &Path) -> BufReader<UnixStream> {
    let s = UnixStream::connect(p).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    BufReader::new(s)
}

/// Malformed, huge and silent clients get an error or are dropped; none stops the supervisor
/// from answering the next client or from stopping cleanly.
#[test]
fn hostile_control_clients_get_errors_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut be = start_null(dir.path(), &[]);
    let csock = dir.path().join("control.sock");

    // Silent clients, more than the supervisor keeps: connected first, they never send.
    let silent: Vec<UnixStream> = (0..40)
        .map(|_| UnixStream::connect(&csock).unwrap())
        .collect();

    let mut c = connect(&csock);
    let e = |v: serde_json::Value| {
        assert_eq!(v["ok"], false, "{v}");
        v["error"].as_str().unwrap().to_string()
    };
    assert!(e(ask(&mut c, b"{not json")).contains("not JSON"));
    assert!(e(ask(&mut c, b"[1,2]")).contains("JSON object"));
    assert!(e(ask(&mut c, b"\"status\"")).contains("JSON object"));
    assert!(e(ask(&mut c, br#"{"command":5}"#)).contains("\"command\""));
    assert!(e(ask(&mut c, br#"{"command":"reboot"}"#)).contains("unknown command 'reboot'"));
    assert!(e(ask(&mut c, &[0xff, 0xfe, b'{'])).contains("not JSON"));
    assert!(e(ask(&mut c, br#"{"command":"resize","size":"12Q"}"#)).contains("12Q"));
    assert!(
        e(ask(&mut c, br#"{"command":"resize","size":1000}"#)).contains("not a positive multiple")
    );
    assert!(e(ask(&mut c, br#"{"command":"resize","size":4096}"#)).contains("refused unless"));
    assert!(e(ask(&mut c, br#"{"command":"resize","size":[1]}"#)).contains("a number of bytes"));
    assert!(e(ask(&mut c, br#"{"command":"resize","force":"yes"}"#)).contains("force"));
    // The same connection still works after all that.
    let st = ask(&mut c, br#"{"command":"status"}"#);
    assert_eq!(st["ok"], true, "{st}");

    // A line of 1 MiB with no newline: an error, then the connection is closed.
    let mut big = connect(&csock);
    let junk = vec![b'x'; 1 << 20];
    // The supervisor may close before taking it all: a write error is fine.
    let _ = big.get_mut().write_all(&junk);
    let mut r = String::new();
    big.read_line(&mut r).unwrap();
    assert!(r.contains("request longer than 65536 bytes"), "{r:?}");

    // A client that asks a lot and never reads: the others are still answered.
    let mut greedy = UnixStream::connect(&csock).unwrap();
    greedy.set_nonblocking(true).unwrap();
    let many = b"{\"command\":\"stats\"}\n";
    for _ in 0..2000 {
        if greedy.write_all(many).is_err() {
            break;
        }
    }
    let mut fresh = connect(&csock);
    let st = ask(&mut fresh, br#"{"command":"status"}"#);
    assert_eq!(st["ok"], true, "{st}");
    assert_eq!(st["state"], "waiting");

    // The device itself is untouched: a frontend is served.
    let mut client = Client::connect(&be.socket.clone(), 1, 1 << 16);
    assert_eq!(client.read(0, 0, 0, 4096), 0);
    drop(client);

    assert_service_never_died(&be);
    // SIGTERM with all of them still connected: a clean stop, the socket files gone.
    let st = be.signal_and_wait(libc::SIGTERM);
    assert_eq!(st.code(), Some(0), "{}", be.log());
    assert!(!csock.exists());
    drop(silent);
    drop(greedy);
}

/// The HTTP side refuses what is not a scrape, and a head too large, with the right status.
#[test]
fn the_metrics_endpoint_answers_only_scrapes() {
    let dir = tempfile::tempdir().unwrap();
    let msock = dir.path().join("metrics.sock");
    let m = format!("unix:{}", msock.display());
    let be = start_null(dir.path(), &["--metrics", &m]);
    assert_eq!(http(&msock, "GET /nope HTTP/1.1\r\n\r\n").0, 404);
    assert_eq!(http(&msock, "POST /metrics HTTP/1.1\r\n\r\n").0, 405);
    let huge = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "y".repeat(20000));
    assert_eq!(http(&msock, &huge).0, 431);
    let (code, body) = http(&msock, "GET /metrics HTTP/1.0\r\n\r\n");
    assert_eq!(code, 200);
    assert!(body.ends_with("# EOF\n"));
    assert_service_never_died(&be);
}

/// Flags: a bad --metrics address and a --control path in a missing directory are usage
/// errors (exit 2) that say which flag.
#[test]
fn bad_service_flags_are_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("b.sock");
    for (flag, val, says) in [
        ("--metrics", "localhost", "--metrics 'localhost'"),
        ("--metrics", "unix:", "--metrics 'unix:'"),
        ("--control", "/nonexistent/dir/c.sock", "--control"),
        ("--metrics", "unix:/nonexistent/dir/m.sock", "--metrics"),
    ] {
        let (code, out) = vhostbox_tests::run_to_exit(
            "vhostbox-blk",
            &[
                "--socket-path",
                sock.to_str().unwrap(),
                "--null",
                "1M",
                flag,
                val,
            ],
        );
        assert_eq!(code, 2, "{flag} {val}: {out}");
        assert!(out.contains(says), "{flag} {val}: {out}");
        assert!(!sock.exists(), "{flag} {val} left the socket behind");
    }
}

/// The endpoints are served by a process of their own, jailed like a worker, holding only the
/// two listeners and its socket to the supervisor; killed, it is replaced and serves again.
/// So what a client sends is parsed where a bug reaches nothing.
#[test]
fn a_jailed_service_process_serves_the_endpoints() {
    let dir = tempfile::tempdir().unwrap();
    let msock = dir.path().join("metrics.sock");
    let m = format!("unix:{}", msock.display());
    let be = start_null(dir.path(), &["--metrics", &m]);
    let csock = dir.path().join("control.sock");
    let svc = be.service_pid();
    vhostbox_tests::assert_jailed(svc);
    let fds: Vec<String> = std::fs::read_dir(format!("/proc/{svc}/fd"))
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            std::fs::read_link(&p)
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    let sockets = fds.iter().filter(|f| f.starts_with("socket:")).count();
    assert_eq!(
        sockets, 3,
        "two listeners and the supervisor's socket: {fds:?}"
    );
    assert_eq!(fds.len(), 6, "and stdin, stdout, stderr only: {fds:?}");
    // The worker holds none of them.
    let worker = be.worker_pid();
    assert_ne!(worker, svc);
    let (code, st, err) = ctl(&csock, &["status"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(st["worker"]["pid"], worker);

    // SAFETY: kill() on the backend's service process, started (indirectly) by this test.
    unsafe { libc::kill(svc, libc::SIGKILL) };
    be.wait_log(&format!("service process {svc} ended"));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while be.service_pid() == svc {
        assert!(
            std::time::Instant::now() < deadline,
            "no new service process"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (code, st, err) = ctl(&csock, &["status"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(st["state"], "waiting");
    let s = scrape(&msock);
    assert_eq!(value(&s, "vhostbox_worker_restarts_total", &[]), 0.0);
}
