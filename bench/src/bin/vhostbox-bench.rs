//! vhostbox-bench: vhost-user-blk backends side by side, with no VM. Each run starts a
//! contender fresh, drives it with libblkio (the `blkio` crate) for a fixed time, and records
//! IOPS, MiB/s, latency (mean, p50, p99) and the backend's CPU time per I/O (utime + stime of
//! its whole process tree, from /proc). Contenders alternate (A B C A B C ...) over several
//! rounds so machine drift hits all of them; the report gives medians and ratios against the
//! first contender that is not vhostbox (qemu-storage-daemon). Workloads named "polled" use a
//! client that spins on its used ring instead of sleeping on the completion eventfd.
//!
//!   vhostbox-bench [--rounds N] [--secs S] [--only SUBSTR] [--out DIR]
//!
//! Writes DIR/results.md (tables), DIR/results.csv (every run) and DIR/iops.svg (a plot).
//! scripts/bench.sh builds release binaries and runs it. Not a test: no thresholds.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, ReqFlags};
use vhostbox_bench::{median, tree_cpu};

#[derive(Clone, Copy, PartialEq)]
enum Dev {
    Null,
    File,
}

struct Workload {
    name: &'static str,
    write: bool,
    random: bool,
    bs: usize,
    qd: usize,
    queues: usize,
    /// The client spins on its used ring (a libblkio poll queue) instead of sleeping on the
    /// completion eventfd: what a polling frontend (SPDK, DPDK) sees, with no wake-ups on
    /// either side. Both contenders get the same client.
    poll_client: bool,
}

const WORKLOADS: &[Workload] = &[
    Workload {
        name: "4k randread QD1",
        write: false,
        random: true,
        bs: 4096,
        qd: 1,
        queues: 1,
        poll_client: false,
    },
    Workload {
        name: "4k randread QD32",
        write: false,
        random: true,
        bs: 4096,
        qd: 32,
        queues: 1,
        poll_client: false,
    },
    Workload {
        name: "4k randread QD32x2q",
        write: false,
        random: true,
        bs: 4096,
        qd: 32,
        queues: 2,
        poll_client: false,
    },
    Workload {
        name: "4k randwrite QD32",
        write: true,
        random: true,
        bs: 4096,
        qd: 32,
        queues: 1,
        poll_client: false,
    },
    Workload {
        name: "128k seqread QD8",
        write: false,
        random: false,
        bs: 128 << 10,
        qd: 8,
        queues: 1,
        poll_client: false,
    },
    Workload {
        name: "4k randread QD1 polled",
        write: false,
        random: true,
        bs: 4096,
        qd: 1,
        queues: 1,
        poll_client: true,
    },
    Workload {
        name: "4k randread QD32 polled",
        write: false,
        random: true,
        bs: 4096,
        qd: 32,
        queues: 1,
        poll_client: true,
    },
];

const IMAGE_SIZE: u64 = 1 << 30;

#[derive(Clone)]
struct Contender {
    name: String,
    /// The vhostbox-blk binary to run; None for qemu-storage-daemon and the direct client.
    vhostbox: Option<PathBuf>,
    sync: bool,
    /// No backend at all: the same libblkio client reads the image itself with its io_uring
    /// driver. The same kernel work without vhost-user or a second process: the limit.
    direct: bool,
    /// vhostbox with `--metrics` on (its counters in the shared page, latency timed).
    metrics: bool,
    /// vhostbox with `--limit-iops` at this rate (and a burst of 1/100 s of it).
    limit_iops: Option<u64>,
}

/// The direct contender's name in the reports.
const LIMIT: &str = "direct io_uring (limit)";

/// vhostbox-blk with each engine, then qemu-storage-daemon; with VHOSTBOX_BENCH_BASELINE set to
/// another vhostbox-blk binary (an earlier build), that one too, with each engine, so a change
/// is measured against what it replaces in the same run.
fn contenders() -> Vec<Contender> {
    let ours = bin_dir().join("vhostbox-blk");
    let vb = |name: &str, exe: &Path, sync| Contender {
        name: name.into(),
        vhostbox: Some(exe.to_owned()),
        sync,
        direct: false,
        metrics: false,
        limit_iops: None,
    };
    let mut v = vec![
        vb("vhostbox io-uring", &ours, false),
        Contender {
            metrics: true,
            ..vb("vhostbox io-uring +metrics", &ours, false)
        },
        vb("vhostbox sync", &ours, true),
        Contender {
            name: "qemu-storage-daemon".into(),
            vhostbox: None,
            sync: false,
            direct: false,
            metrics: false,
            limit_iops: None,
        },
        Contender {
            name: LIMIT.into(),
            vhostbox: None,
            sync: false,
            direct: true,
            metrics: false,
            limit_iops: None,
        },
    ];
    // VHOSTBOX_BENCH_LIMIT_IOPS=N: also vhostbox with an IOPS limit of N, to see how closely
    // it is held (its "vs limit" cell is then against N).
    if let Some(n) = std::env::var("VHOSTBOX_BENCH_LIMIT_IOPS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        v.push(Contender {
            limit_iops: Some(n),
            ..vb(&format!("vhostbox io-uring --limit-iops {n}"), &ours, false)
        });
    }
    if let Ok(base) = std::env::var("VHOSTBOX_BENCH_BASELINE") {
        v.push(vb("baseline io-uring", Path::new(&base), false));
        v.push(vb("baseline sync", Path::new(&base), true));
    }
    v
}

/// A helper process (qemu-nbd), killed when the run ends.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Sample {
    iops: f64,
    mibs: f64,
    lat_mean_us: f64,
    lat_p50_us: f64,
    lat_p99_us: f64,
    cpu_us_per_io: f64,
}

/// VHOSTBOX_BENCH_FORMAT=qcow2: the file rows serve a qcow2 copy of the image (fully
/// allocated, by qemu-img convert) through vhostbox (`--format qcow2`) and
/// qemu-storage-daemon (its qcow2 driver); the direct io_uring row stays on the raw file, the
/// physical limit.
fn qcow2() -> bool {
    std::env::var("VHOSTBOX_BENCH_FORMAT").is_ok_and(|v| v == "qcow2")
}

/// VHOSTBOX_BENCH_NBD=1: the file rows reach the image through qemu-nbd (started by the tool,
/// on a unix socket): vhostbox with `--nbd`, qemu-storage-daemon with its nbd driver; the
/// direct io_uring row stays on the file.
fn nbd() -> bool {
    std::env::var_os("VHOSTBOX_BENCH_NBD").is_some()
}

fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("VHOSTBOX_BIN_DIR") {
        return d.into();
    }
    std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .to_owned()
}

fn start(c: &Contender, dev: Dev, queues: usize, sock: &Path, img: &Path) -> Result<Child, String> {
    let _ = fs::remove_file(sock);
    let q = queues.to_string();
    let mut cmd;
    if let Some(exe) = &c.vhostbox {
        cmd = Command::new(exe);
        cmd.arg("--socket-path")
            .arg(sock)
            .args(["--num-queues", &q]);
        cmd.args(["--engine", if c.sync { "sync" } else { "io-uring" }]);
        if c.metrics {
            let m = sock.with_extension("metrics");
            let _ = fs::remove_file(&m);
            cmd.arg("--metrics").arg(format!("unix:{}", m.display()));
        }
        if let Some(n) = c.limit_iops {
            let burst = (n / 100).max(1).to_string();
            cmd.args(["--limit-iops", &n.to_string(), "--limit-iops-burst", &burst]);
        }
        match dev {
            Dev::Null => cmd.args(["--null", "1G"]),
            Dev::File if nbd() => cmd.arg("--nbd").arg(format!(
                "nbd+unix:///?socket={}",
                img.with_file_name("nbd.sock").display()
            )),
            Dev::File => cmd.arg("--image").arg(img),
        };
        if dev == Dev::File && qcow2() {
            cmd.args(["--format", "qcow2"]);
        }
        if let Ok(extra) = std::env::var("VHOSTBOX_BENCH_ARGS") {
            cmd.args(extra.split_whitespace());
        }
    } else {
        cmd = Command::new("qemu-storage-daemon");
        match dev {
            Dev::Null => cmd.args([
                "--blockdev",
                "driver=null-co,node-name=disk,size=1073741824,read-zeroes=off",
            ]),
            Dev::File if nbd() => cmd.arg("--blockdev").arg(format!(
                "driver=nbd,node-name=disk,server.type=unix,server.path={}",
                img.with_file_name("nbd.sock").display()
            )),
            Dev::File if qcow2() => cmd.arg("--blockdev").arg(format!(
                "driver=qcow2,node-name=disk,file.driver=file,file.filename={},\
                 file.aio=io_uring,cache.direct=off",
                img.display()
            )),
            Dev::File => cmd.arg("--blockdev").arg(format!(
                "driver=file,node-name=disk,filename={},aio=io_uring,cache.direct=off",
                img.display()
            )),
        };
        cmd.arg("--export").arg(format!(
            "type=vhost-user-blk,id=exp,node-name=disk,addr.type=unix,addr.path={},writable=on,num-queues={q}",
            sock.display()
        ));
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", c.name))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        if let Ok(Some(st)) = child.try_wait() {
            return Err(format!("{} exited at start: {st}", c.name));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err(format!("{} never listened", c.name));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(child)
}

/// One queue's share of a run: (I/Os, latencies in ns).
fn drive(
    mut q: Blkioq,
    base: *mut u8,
    w: &Workload,
    qi: usize,
    until: Instant,
    warm: Instant,
) -> (u64, Vec<u32>) {
    let blocks = IMAGE_SIZE / w.bs as u64;
    let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ (qi as u64 + 1);
    let mut seq = (qi as u64) * (blocks / 2);
    let mut next_off = || {
        if w.random {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng % blocks) * w.bs as u64
        } else {
            seq = (seq + 1) % blocks;
            seq * w.bs as u64
        }
    };
    let mut started = vec![Instant::now(); w.qd];
    let submit = |q: &mut Blkioq, slot: usize, off: u64| {
        // SAFETY: each slot owns bs bytes of the mapped region at base + slot * bs.
        let buf = unsafe { base.add(slot * w.bs) };
        if w.write {
            q.write(off, buf, w.bs, slot, ReqFlags::empty());
        } else {
            q.read(off, buf, w.bs, slot, ReqFlags::empty());
        }
    };
    for (slot, s) in started.iter_mut().enumerate() {
        *s = Instant::now();
        submit(&mut q, slot, next_off());
    }
    let mut comps: Vec<std::mem::MaybeUninit<Completion>> =
        (0..w.qd).map(|_| std::mem::MaybeUninit::uninit()).collect();
    let mut ios = 0u64;
    let mut lats = Vec::with_capacity(1 << 20);
    let mut inflight = w.qd;
    while inflight > 0 {
        let n = q.do_io(&mut comps, 1, None, None).expect("do_io");
        let now = Instant::now();
        for c in &comps[..n] {
            // SAFETY: do_io initialised the first n completions.
            let c = unsafe { c.assume_init_read() };
            assert_eq!(c.ret, 0, "I/O failed: {}", c.ret);
            let slot = c.user_data;
            if now >= warm {
                ios += 1;
                lats.push(
                    now.duration_since(started[slot])
                        .as_nanos()
                        .min(u32::MAX as u128) as u32,
                );
            }
            if now < until {
                started[slot] = now;
                submit(&mut q, slot, next_off());
            } else {
                inflight -= 1;
            }
        }
    }
    (ios, lats)
}

/// One run of `c` on `w`; None where it does not apply (the direct client has no null
/// device).
fn run_one(
    c: &Contender,
    dev: Dev,
    w: &Workload,
    secs: f64,
    dir: &Path,
) -> Result<Option<Sample>, String> {
    let sock = dir.join("bench.sock");
    let img = dir.join(if qcow2() && !c.direct {
        "bench.qcow2"
    } else {
        "bench.img"
    });
    if c.direct {
        return match dev {
            Dev::Null => Ok(None),
            Dev::File => measure(None, "io_uring", &img, w, secs).map(Some),
        };
    }
    let mut child = start(c, dev, w.queues, &sock, &img)?;
    let result = measure(Some(child.id()), "virtio-blk-vhost-user", &sock, w, secs);
    // SAFETY: kill() on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
    result.map(Some)
}

/// Drives `w` for `secs` through libblkio's `driver` at `path`; the backend's CPU is that of
/// process tree `backend` (none for the direct client, which has no backend).
fn measure(
    backend: Option<u32>,
    driver: &str,
    path: &Path,
    w: &Workload,
    secs: f64,
) -> Result<Sample, String> {
    let cpu_of = |pid: Option<u32>| pid.map_or(0.0, tree_cpu);
    let result = (|| {
        let mut b = Blkio::new(driver).map_err(|e| e.to_string())?;
        b.set_str("path", path.to_str().unwrap())
            .map_err(|e| e.to_string())?;
        b.connect().map_err(|e| format!("connect: {e}"))?;
        // The io_uring driver polls only with O_DIRECT: the direct client always sleeps, and
        // its cached reads complete at submission anyway.
        let (irq, poll) = if w.poll_client && backend.is_some() {
            (0, w.queues)
        } else {
            (w.queues, 0)
        };
        b.set_i32("num-queues", irq as i32)
            .map_err(|e| e.to_string())?;
        b.set_i32("num-poll-queues", poll as i32)
            .map_err(|e| e.to_string())?;
        let out = b.start().map_err(|e| format!("start: {e}"))?;
        let len = w.queues * w.qd * w.bs;
        let region = b.alloc_mem_region(len).map_err(|e| e.to_string())?;
        b.map_mem_region(&region).map_err(|e| e.to_string())?;
        let base = region.addr;
        let t0 = Instant::now();
        let warm = t0 + Duration::from_millis(500);
        let until = warm + Duration::from_secs_f64(secs);
        let mut cpu_warm = 0.0;
        let results: Vec<(u64, Vec<u32>)> = std::thread::scope(|s| {
            let qs = if poll > 0 {
                out.poll_queues
            } else {
                out.queues
            };
            let hs: Vec<_> = qs
                .into_iter()
                .enumerate()
                .map(|(i, q)| {
                    let qbase = base + i * w.qd * w.bs;
                    s.spawn(move || drive(q, qbase as *mut u8, w, i, until, warm))
                })
                .collect();
            std::thread::sleep(warm.saturating_duration_since(Instant::now()));
            cpu_warm = cpu_of(backend);
            hs.into_iter()
                .map(|h| h.join().expect("queue thread"))
                .collect()
        });
        let cpu1 = cpu_of(backend);
        let elapsed = Instant::now().duration_since(warm).as_secs_f64();
        let ios: u64 = results.iter().map(|r| r.0).sum();
        let mut lats: Vec<u32> = results.into_iter().flat_map(|r| r.1).collect();
        lats.sort_unstable();
        let pct = |p: f64| {
            lats.get(((lats.len() as f64 * p) as usize).min(lats.len().saturating_sub(1)))
                .copied()
                .unwrap_or(0) as f64
                / 1000.0
        };
        let mean = lats.iter().map(|&l| l as f64).sum::<f64>() / lats.len().max(1) as f64 / 1000.0;
        let cpu = cpu1 - cpu_warm;
        b.unmap_mem_region(&region);
        b.free_mem_region(&region);
        Ok(Sample {
            iops: ios as f64 / elapsed,
            mibs: ios as f64 * w.bs as f64 / elapsed / (1 << 20) as f64,
            lat_mean_us: mean,
            lat_p50_us: pct(0.5),
            lat_p99_us: pct(0.99),
            cpu_us_per_io: cpu * 1e6 / ios.max(1) as f64,
        })
    })();
    result
}

/// `--only` and `--contender`: a substring, or with a trailing `$` the whole name.
fn matches(name: &str, pat: &str) -> bool {
    match pat.strip_suffix('$') {
        Some(exact) => name == exact,
        None => name.contains(pat),
    }
}

fn main() {
    let mut rounds = 3;
    let mut secs = 3.0;
    let mut only = String::new();
    let mut who = String::new();
    let mut out = PathBuf::from("build/bench");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--rounds" => rounds = val().parse().expect("--rounds N"),
            "--secs" => secs = val().parse().expect("--secs S"),
            "--only" => only = val(),
            "--contender" => who = val(),
            "--out" => out = val().into(),
            _ => {
                eprintln!(
                    "usage: vhostbox-bench [--rounds N] [--secs S] [--only SUBSTR[$]] [--contender SUBSTR[$]] [--out DIR]"
                );
                std::process::exit(2);
            }
        }
    }
    fs::create_dir_all(&out).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // A fully written image, so reads hit real data in the page cache, not holes.
    let img = dir.path().join("bench.img");
    {
        let chunk = vec![0x5au8; 1 << 20];
        let mut f = fs::File::create(&img).unwrap();
        for _ in 0..(IMAGE_SIZE >> 20) {
            std::io::Write::write_all(&mut f, &chunk).unwrap();
        }
    }
    if qcow2() {
        let st = Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(&img)
            .arg(dir.path().join("bench.qcow2"))
            .status()
            .expect("qemu-img");
        assert!(st.success(), "qemu-img convert failed");
    }
    // Killed on drop (the end of main).
    let _nbd_server = nbd().then(|| {
        let sock = dir.path().join("nbd.sock");
        let child = Command::new("qemu-nbd")
            .args([
                "-f",
                "raw",
                "--persistent",
                "--shared=16",
                "--cache=writeback",
                "-k",
            ])
            .arg(&sock)
            .arg(&img)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-nbd");
        while !sock.exists() {
            std::thread::sleep(Duration::from_millis(10));
        }
        KillOnDrop(child)
    });
    // (device, workload) -> contender -> samples
    let mut all: BTreeMap<(usize, usize), BTreeMap<usize, Vec<Sample>>> = BTreeMap::new();
    let mut failed: BTreeMap<usize, String> = BTreeMap::new();
    let mut csv = String::from("round,device,workload,contender,iops,mibs,lat_mean_us,lat_p50_us,lat_p99_us,cpu_us_per_io\n");
    let devs = [(Dev::Null, "null"), (Dev::File, "file")];
    let contenders = contenders();
    for round in 0..rounds {
        for (di, (dev, dname)) in devs.iter().enumerate() {
            for (wi, w) in WORKLOADS.iter().enumerate() {
                let label = format!("{dname} {}", w.name);
                if !matches(&label, &only) {
                    continue;
                }
                for (ci, c) in contenders.iter().enumerate() {
                    // --contender: only those (for profiling one; ratios need the peer).
                    if !matches(&c.name, &who) {
                        continue;
                    }
                    if failed.contains_key(&ci) {
                        continue;
                    }
                    match run_one(c, *dev, w, secs, dir.path()) {
                        Ok(None) => {}
                        Ok(Some(s)) => {
                            eprintln!(
                                "round {round} {label:28} {:22} {:>10.0} IOPS {:>8.1} MiB/s p50 {:>7.1} us p99 {:>7.1} us cpu {:>6.2} us/IO",
                                c.name, s.iops, s.mibs, s.lat_p50_us, s.lat_p99_us, s.cpu_us_per_io
                            );
                            let _ = writeln!(
                                csv,
                                "{round},{dname},{},{},{:.0},{:.2},{:.2},{:.2},{:.2},{:.3}",
                                w.name,
                                c.name,
                                s.iops,
                                s.mibs,
                                s.lat_mean_us,
                                s.lat_p50_us,
                                s.lat_p99_us,
                                s.cpu_us_per_io
                            );
                            all.entry((di, wi))
                                .or_default()
                                .entry(ci)
                                .or_default()
                                .push(s);
                        }
                        Err(e) => {
                            eprintln!("{}: {e} (no figures for it)", c.name);
                            failed.insert(ci, e);
                        }
                    }
                }
            }
        }
    }
    // Report: medians and ratios against qemu-storage-daemon.
    let peer = contenders
        .iter()
        .position(|c| c.vhostbox.is_none() && !c.direct)
        .unwrap();
    let limit = contenders.iter().position(|c| c.direct);
    let mut md = String::new();
    let _ = writeln!(md, "Medians of {rounds} alternating rounds of {secs} s each (after 0.5 s warm-up); ratios against {}; vs limit: IOPS against the same client reading the image with no backend ({LIMIT}, file only; its CPU is not a backend's and is not shown).\n", contenders[peer].name);
    let _ = writeln!(md, "| device | workload | contender | IOPS | MiB/s | mean us | p50 us | p99 us | CPU us/IO | IOPS ratio | p50 ratio | CPU/IO ratio | vs limit |");
    let _ = writeln!(
        md,
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    let mut bars: Vec<(String, Vec<(usize, f64)>)> = Vec::new();
    for (&(di, wi), per) in &mut all {
        let med = |v: &mut Vec<Sample>, f: fn(&Sample) -> f64| median(v.iter().map(f).collect());
        let mut meds: BTreeMap<usize, [f64; 6]> = BTreeMap::new();
        for (&ci, v) in per.iter_mut() {
            meds.insert(
                ci,
                [
                    med(v, |s| s.iops),
                    med(v, |s| s.mibs),
                    med(v, |s| s.lat_mean_us),
                    med(v, |s| s.lat_p50_us),
                    med(v, |s| s.lat_p99_us),
                    med(v, |s| s.cpu_us_per_io),
                ],
            );
        }
        let p = meds.get(&peer).copied();
        let label = format!("{} {}", devs[di].1, WORKLOADS[wi].name);
        let mut bar = Vec::new();
        let lim = limit.and_then(|l| meds.get(&l)).copied();
        for (&ci, m) in &meds {
            let ratio = |i: usize| p.map_or("—".to_string(), |p| format!("{:.2}x", m[i] / p[i]));
            let direct = contenders[ci].direct;
            let cpu = |s: String| if direct { "—".to_string() } else { s };
            let vs_limit = match contenders[ci].limit_iops {
                Some(n) => format!("{:.3}x of {n}", m[0] / n as f64),
                None => lim.map_or("—".to_string(), |l| format!("{:.2}x", m[0] / l[0])),
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} | {} | {} | {} |",
                devs[di].1,
                WORKLOADS[wi].name,
                contenders[ci].name,
                m[0],
                m[1],
                m[2],
                m[3],
                m[4],
                cpu(format!("{:.2}", m[5])),
                ratio(0),
                ratio(3),
                cpu(ratio(5)),
                vs_limit
            );
            bar.push((ci, m[0]));
        }
        bars.push((label, bar));
    }
    for (ci, e) in &failed {
        let _ = writeln!(md, "\n{} did not run: {e}", contenders[*ci].name);
    }
    fs::write(out.join("results.md"), &md).unwrap();
    fs::write(out.join("results.csv"), &csv).unwrap();
    fs::write(out.join("iops.svg"), svg(&bars, &contenders)).unwrap();
    println!("{md}");
    eprintln!("wrote {}/results.md, results.csv, iops.svg", out.display());
}

/// A horizontal bar chart of median IOPS, normalised per workload to its fastest contender.
fn svg(bars: &[(String, Vec<(usize, f64)>)], contenders: &[Contender]) -> String {
    let colors = ["#2b6cb0", "#63b3ed", "#c05621", "#718096", "#a0aec0"];
    let row = 16.0;
    let group = row * contenders.len() as f64 + 14.0;
    let h = 40.0 + group * bars.len() as f64 + 30.0;
    let (x0, width) = (230.0, 520.0);
    let mut s = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"800\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"11\">\n<text x=\"10\" y=\"20\" font-size=\"14\">Median IOPS per workload (bar length relative to the fastest; figure = IOPS)</text>\n");
    for (gi, (label, v)) in bars.iter().enumerate() {
        let top = 40.0 + gi as f64 * group;
        let max = v.iter().map(|x| x.1).fold(0.0, f64::max).max(1.0);
        let _ = writeln!(s, "<text x=\"10\" y=\"{}\">{label}</text>", top + row);
        for (k, (ci, iops)) in v.iter().enumerate() {
            let y = top + k as f64 * row;
            let w = width * iops / max;
            let _ = writeln!(s, "<rect x=\"{x0}\" y=\"{y}\" width=\"{w:.1}\" height=\"{}\" fill=\"{}\"/><text x=\"{:.1}\" y=\"{}\">{iops:.0}</text>", row - 3.0, colors[*ci % colors.len()], x0 + w + 4.0, y + row - 5.0);
        }
    }
    for (ci, c) in contenders.iter().enumerate() {
        let x = 10.0 + ci as f64 * 155.0;
        let _ = writeln!(s, "<rect x=\"{x}\" y=\"{}\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"{}\" y=\"{}\">{}</text>", h - 22.0, colors[ci % colors.len()], x + 16.0, h - 12.0, c.name);
    }
    s.push_str("</svg>\n");
    s
}
