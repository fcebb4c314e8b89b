//! vhostbox-netbench: packets per second through a vhost-user-net backend, with no VM.
//!
//! The client is the test frontend the protocol tests use (tests/src/frontend.rs: the vhost
//! crate's `Frontend`, memfd guest memory, split rings with EVENT_IDX), driven in a tight loop:
//! - `tx64` / `tx1500`: it keeps the TX ring full of 64- or 1500-byte frames and counts the
//!   ones the backend returns;
//! - `rx64` / `rx1500`: it keeps the RX ring full of 2 KiB buffers and counts the frames the
//!   backend fills.
//!
//! Contenders, each started fresh per measurement and alternated (A B A B ..) so machine drift
//! hits both:
//! - `vhostbox-net`, jailed as shipped, on a tap in a private network namespace. TX frames go
//!   into the tap (the kernel then drops them: they are addressed to nobody); RX frames are
//!   written into the tap by a generator thread through an AF_PACKET socket (sendmmsg batches).
//! - `testpmd`: DPDK's vhost PMD as the backend (`--vdev net_vhost0,iface=SOCK`), forwarding
//!   mode `rxonly` for TX and `txonly` for RX: a reference point for the virtqueue path alone,
//!   with no kernel device behind it (so it does less work per packet than vhostbox-net).
//!
//! Figures per workload and contender (medians over the rounds): packets/s, Gbit/s of frame
//! bytes, and the backend's CPU time per packet (utime + stime from /proc, all its threads).
//! A contender that fails to start is reported as such, with no number.
//!
//!   vhostbox-netbench [--secs S] [--rounds N] [--only tx64,rx64,..] [--no-testpmd]
//!                     [--out FILE.md]
//!
//! With `--out FILE.md` it also writes FILE.svg: median packets/s per workload and contender
//! on a log scale (the contenders differ by an order of magnitude).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhostbox_bench::{cpu_secs, median};
use vhostbox_tests::frontend::{
    DeviceOptions, VhostUserDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use vhostbox_tests::netns::{NetNs, PacketSocket};
use vhostbox_tests::{bin_path, Backend};

const TAP: &str = "benchtap0";
const QSIZE: u16 = 256;
const HDR: usize = 12;
const RX_BUF: usize = 2048;

#[derive(Clone, Copy, PartialEq)]
enum Dir {
    Tx,
    Rx,
}

struct Workload {
    name: &'static str,
    dir: Dir,
    frame: usize,
}

const WORKLOADS: &[Workload] = &[
    Workload {
        name: "tx64",
        dir: Dir::Tx,
        frame: 64,
    },
    Workload {
        name: "tx1500",
        dir: Dir::Tx,
        frame: 1500,
    },
    Workload {
        name: "rx64",
        dir: Dir::Rx,
        frame: 64,
    },
    Workload {
        name: "rx1500",
        dir: Dir::Rx,
        frame: 1500,
    },
];

#[derive(Clone, Copy, PartialEq)]
enum Who {
    Vhostbox,
    Testpmd,
}

impl Who {
    fn name(self) -> &'static str {
        match self {
            Who::Vhostbox => "vhostbox-net",
            Who::Testpmd => "testpmd (vhost PMD)",
        }
    }
}

struct Sample {
    pps: f64,
    cpu_us_per_pkt: f64,
}

/// An Ethernet frame of `len` bytes to a locally administered unicast address nobody owns.
fn frame(len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f[12..14].copy_from_slice(&[0x88, 0xb5]);
    for (i, b) in f.iter_mut().enumerate().skip(14) {
        *b = i as u8;
    }
    f
}

/// Runs the client loop for `secs` after `warm` seconds; returns packets counted in the
/// measured window and its duration, calling `mark` at the start of the window.
fn drive(
    dev: &mut VhostUserDevice,
    w: &Workload,
    warm: f64,
    secs: f64,
    mut mark: impl FnMut(),
) -> (u64, f64) {
    let mem = dev.mem().clone();
    let qi = if w.dir == Dir::Tx { 1 } else { 0 };
    let mut free_bufs: Vec<u64> = Vec::new();
    let mut by_head = vec![0u64; usize::from(QSIZE)];
    let tx_buf = mem.alloc(HDR + w.frame, 64);
    if w.dir == Dir::Tx {
        let mut bytes = vec![0u8; HDR];
        bytes.extend_from_slice(&frame(w.frame));
        mem.write(tx_buf, &bytes);
    } else {
        for _ in 0..QSIZE {
            free_bufs.push(mem.alloc(RX_BUF, 64));
        }
    }
    let q = dev.queue(qi);
    let start = Instant::now();
    let mut window: Option<(Instant, u64)> = None;
    let mut count = 0u64;
    loop {
        // Fill the ring.
        while q.num_free() > 0 {
            if w.dir == Dir::Tx {
                q.add(&[(tx_buf, (HDR + w.frame) as u32, false)]);
            } else {
                let Some(b) = free_bufs.pop() else { break };
                let head = q.add(&[(b, RX_BUF as u32, true)]);
                by_head[usize::from(head)] = b;
            }
        }
        q.kick_if_needed();
        let mut got = 0;
        while let Some((head, _)) = q.poll_used() {
            got += 1;
            if w.dir == Dir::Rx {
                free_bufs.push(by_head[usize::from(head)]);
            }
        }
        if got == 0 {
            if let Some((head, _)) = q.wait_used(Duration::from_millis(2)) {
                if w.dir == Dir::Rx {
                    free_bufs.push(by_head[usize::from(head)]);
                }
                got = 1;
            }
        }
        count += got;
        let t = start.elapsed().as_secs_f64();
        match window {
            None if t >= warm => {
                mark();
                window = Some((Instant::now(), count));
            }
            Some((t0, c0)) if t0.elapsed().as_secs_f64() >= secs => {
                return (count - c0, t0.elapsed().as_secs_f64());
            }
            _ => {}
        }
    }
}

fn connect(sock: &Path) -> Result<VhostUserDevice, String> {
    let opts = DeviceOptions {
        queue_size: QSIZE,
        mem_size: 64 << 20,
        connect_timeout: Duration::from_secs(10),
        ..Default::default()
    };
    VhostUserDevice::connect_with(sock, 2, VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX, &opts)
        .map_err(|e| format!("connecting: {e}"))
}

/// The RX generator for vhostbox-net: AF_PACKET on the tap's host end, sendmmsg in batches.
fn generator(sock: PacketSocket, len: usize, stop: Arc<AtomicBool>) {
    let f = frame(len);
    const BATCH: usize = 64;
    let mut iov: Vec<libc::iovec> = (0..BATCH)
        .map(|_| libc::iovec {
            iov_base: f.as_ptr() as *mut libc::c_void,
            iov_len: f.len(),
        })
        .collect();
    // SAFETY: zeroed mmsghdr is valid; each points at one iovec of the array above.
    let mut msgs: Vec<libc::mmsghdr> = (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
    for (m, v) in msgs.iter_mut().zip(iov.iter_mut()) {
        m.msg_hdr.msg_iov = v;
        m.msg_hdr.msg_iovlen = 1;
    }
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: sendmmsg over the array of initialised headers; the frame outlives the call.
        let r = unsafe { libc::sendmmsg(sock.raw_fd(), msgs.as_mut_ptr(), BATCH as u32, 0) };
        if r < 0 {
            // ENOBUFS when the tap's queue is full: the backend is behind; try again.
            std::thread::yield_now();
        }
    }
}

fn run_vhostbox(w: &Workload, secs: f64, dir: &Path) -> Result<Sample, String> {
    let ns = NetNs::new().map_err(|e| format!("network namespace: {e}"))?;
    let sock = dir.join("net.sock");
    let _ = fs::remove_file(&sock);
    let backend = ns.run(|| {
        Backend::start(
            "vhostbox-net",
            &sock,
            &[
                "--socket-path",
                sock.to_str().unwrap(),
                "--tap",
                TAP,
                "--queue-size",
                "256",
            ],
        )
    });
    ns.wait_link(TAP);
    ns.ip(&["link", "set", TAP, "up"]);
    let mut dev = connect(&sock)?;
    let worker = backend.worker_pid();
    let stop = Arc::new(AtomicBool::new(false));
    let gen = if w.dir == Dir::Rx {
        let ps = ns
            .run(|| PacketSocket::bind(TAP, false))
            .map_err(|e| format!("packet socket: {e}"))?;
        let (len, st) = (w.frame, stop.clone());
        Some(std::thread::spawn(move || generator(ps, len, st)))
    } else {
        None
    };
    let sample = measure(&mut dev, w, secs, worker);
    stop.store(true, Ordering::Relaxed);
    if let Some(g) = gen {
        let _ = g.join();
    }
    drop(dev);
    drop(backend);
    sample
}

/// Drives `dev` (0.5 s warm-up, then `secs`) and turns the count and the CPU time `pid` used
/// meanwhile into a sample.
fn measure(dev: &mut VhostUserDevice, w: &Workload, secs: f64, pid: i32) -> Result<Sample, String> {
    let mut cpu0 = 0.0;
    let (n, t) = drive(dev, w, 0.5, secs, || cpu0 = cpu_secs(pid as u32));
    let cpu = cpu_secs(pid as u32) - cpu0;
    if n == 0 {
        return Err("no packets".into());
    }
    Ok(Sample {
        pps: n as f64 / t,
        cpu_us_per_pkt: cpu * 1e6 / n as f64,
    })
}

struct Testpmd {
    child: Child,
}

impl Drop for Testpmd {
    fn drop(&mut self) {
        // SAFETY: SIGINT to our own child; testpmd stops cleanly on it.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn testpmd_bin() -> Option<PathBuf> {
    let out = Command::new("sh")
        .args(["-c", "command -v dpdk-testpmd"])
        .output()
        .ok()?;
    let p = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (!p.is_empty()).then(|| PathBuf::from(p))
}

fn run_testpmd(exe: &Path, w: &Workload, secs: f64, dir: &Path) -> Result<Sample, String> {
    let sock = dir.join("pmd.sock");
    let _ = fs::remove_file(&sock);
    let mode = if w.dir == Dir::Tx { "rxonly" } else { "txonly" };
    let log = fs::File::create(dir.join("testpmd.log")).map_err(|e| e.to_string())?;
    let mut args: Vec<String> = [
        "-l",
        "0-1",
        "--no-pci",
        "--no-huge",
        "-m",
        "1024",
        "--file-prefix",
        "vhostbox-bench",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push("--vdev".into());
    args.push(format!("net_vhost0,iface={},queues=1", sock.display()));
    args.extend(
        [
            "--",
            "--nb-cores=1",
            "--total-num-mbufs=8192",
            "--forward-mode",
            mode,
            "--auto-start",
            "--stats-period=0",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    if w.dir == Dir::Rx {
        args.push(format!("--txpkts={}", w.frame));
    }
    let child = Command::new(exe)
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .spawn()
        .map_err(|e| format!("starting testpmd: {e}"))?;
    let pmd = Testpmd { child };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        if Instant::now() > deadline {
            return Err(format!(
                "testpmd did not create {}: {}",
                sock.display(),
                fs::read_to_string(dir.join("testpmd.log")).unwrap_or_default()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut dev = connect(&sock)?;
    let pid = pmd.child.id() as i32;
    let sample = measure(&mut dev, w, secs, pid);
    drop(dev);
    drop(pmd);
    sample
}

fn main() {
    let mut secs = 3.0;
    let mut rounds = 3;
    let mut only: Option<Vec<String>> = None;
    let mut testpmd = true;
    let mut out: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--secs" => secs = args.next().and_then(|v| v.parse().ok()).expect("--secs S"),
            "--rounds" => {
                rounds = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--rounds N")
            }
            "--only" => {
                only = Some(
                    args.next()
                        .expect("--only LIST")
                        .split(',')
                        .map(String::from)
                        .collect(),
                )
            }
            "--no-testpmd" => testpmd = false,
            "--out" => out = Some(PathBuf::from(args.next().expect("--out FILE"))),
            "-h" | "--help" => {
                println!("vhostbox-netbench [--secs S] [--rounds N] [--only tx64,rx64,..] [--no-testpmd] [--out FILE.md]");
                return;
            }
            other => {
                eprintln!("vhostbox-netbench: unknown argument {other}");
                std::process::exit(2);
            }
        }
    }
    let _ = bin_path("vhostbox-net");
    let pmd = if testpmd { testpmd_bin() } else { None };
    if testpmd && pmd.is_none() {
        eprintln!(
            "testpmd: dpdk-testpmd not found (scripts/bench.sh --net installs it); not compared"
        );
    }
    let mut who = vec![Who::Vhostbox];
    if pmd.is_some() {
        who.push(Who::Testpmd);
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut table = String::new();
    table.push_str(
        "| workload | contender | Mpps | Gbit/s | backend CPU µs/packet |\n|---|---|---|---|---|\n",
    );
    let mut ratios = Vec::new();
    let mut bars: Vec<(&str, Vec<(&str, f64)>)> = Vec::new();
    for w in WORKLOADS {
        if only
            .as_ref()
            .is_some_and(|o| !o.iter().any(|n| n == w.name))
        {
            continue;
        }
        let mut samples: Vec<Vec<Sample>> = who.iter().map(|_| Vec::new()).collect();
        let mut errors: Vec<Option<String>> = who.iter().map(|_| None).collect();
        for r in 0..rounds {
            for (i, &c) in who.iter().enumerate() {
                let res = match c {
                    Who::Vhostbox => run_vhostbox(w, secs, dir.path()),
                    Who::Testpmd => run_testpmd(pmd.as_ref().unwrap(), w, secs, dir.path()),
                };
                match res {
                    Ok(s) => {
                        eprintln!(
                            "{} round {r}: {:<20} {:>8.3} Mpps  {:>6.2} µs CPU/packet",
                            w.name,
                            c.name(),
                            s.pps / 1e6,
                            s.cpu_us_per_pkt
                        );
                        samples[i].push(s);
                    }
                    Err(e) => {
                        eprintln!("{} round {r}: {}: FAILED: {e}", w.name, c.name());
                        errors[i] = Some(e);
                    }
                }
            }
        }
        let mut med = Vec::new();
        for (i, &c) in who.iter().enumerate() {
            if samples[i].is_empty() {
                table.push_str(&format!(
                    "| {} | {} | did not run: {} | | |\n",
                    w.name,
                    c.name(),
                    errors[i]
                        .clone()
                        .unwrap_or_default()
                        .lines()
                        .next()
                        .unwrap_or("")
                ));
                med.push(None);
                continue;
            }
            let pps = median(samples[i].iter().map(|s| s.pps).collect());
            let cpu = median(samples[i].iter().map(|s| s.cpu_us_per_pkt).collect());
            table.push_str(&format!(
                "| {} | {} | {:.3} | {:.2} | {:.2} |\n",
                w.name,
                c.name(),
                pps / 1e6,
                pps * w.frame as f64 * 8.0 / 1e9,
                cpu
            ));
            med.push(Some((pps, cpu)));
        }
        bars.push((
            w.name,
            who.iter()
                .zip(&med)
                .filter_map(|(c, m)| m.map(|(pps, _)| (c.name(), pps)))
                .collect(),
        ));
        if let (Some(Some(a)), Some(Some(b))) = (med.first(), med.get(1)) {
            ratios.push(format!(
                "| {} | {:.2} | {:.2} |",
                w.name,
                a.0 / b.0,
                a.1 / b.1
            ));
        }
    }
    if !ratios.is_empty() {
        table.push_str(
            "\n| workload | packets/s vhostbox ÷ testpmd | CPU per packet vhostbox ÷ testpmd |\n|---|---|---|\n",
        );
        for r in ratios {
            table.push_str(&r);
            table.push('\n');
        }
    }
    println!("{table}");
    if let Some(o) = out {
        fs::write(&o, &table).expect("writing --out");
        fs::write(o.with_extension("svg"), svg(&bars)).expect("writing the plot");
    }
}

/// Horizontal bars of packets/s on a log scale from 10 kpps to 100 Mpps.
fn svg(bars: &[(&str, Vec<(&str, f64)>)]) -> String {
    use std::fmt::Write;
    let (row, left, width) = (18.0, 190.0, 560.0);
    let rows: usize = bars.iter().map(|b| b.1.len() + 1).sum();
    let h = 60.0 + rows as f64 * row;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"800\" height=\"{h}\" \
         font-family=\"sans-serif\" font-size=\"11\">\n<text x=\"10\" y=\"20\" \
         font-size=\"14\">Median packets/s per workload (log scale, 10 kpps to 100 Mpps)</text>\n"
    );
    let x = |pps: f64| left + width * ((pps.max(1e4).log10() - 4.0) / 4.0).clamp(0.0, 1.0);
    for (k, label) in ["10k", "100k", "1M", "10M", "100M"].iter().enumerate() {
        let gx = left + width * k as f64 / 4.0;
        let _ = writeln!(
            s,
            "<line x1=\"{gx}\" y1=\"30\" x2=\"{gx}\" y2=\"{}\" stroke=\"#ddd\"/>\
             <text x=\"{gx}\" y=\"{}\" text-anchor=\"middle\">{label}</text>",
            h - 20.0,
            h - 6.0
        );
    }
    let mut y = 40.0;
    for (name, v) in bars {
        let _ = writeln!(
            s,
            "<text x=\"10\" y=\"{}\" font-weight=\"bold\">{name}</text>",
            y + 12.0
        );
        y += row;
        for (i, (who, pps)) in v.iter().enumerate() {
            let color = ["#2a6fb0", "#b05a2a"][i % 2];
            let _ = writeln!(
                s,
                "<text x=\"20\" y=\"{}\">{who}</text><rect x=\"{left}\" y=\"{}\" \
                 width=\"{}\" height=\"{}\" fill=\"{color}\"/><text x=\"{}\" y=\"{}\">{:.2} Mpps</text>",
                y + 12.0,
                y + 2.0,
                x(*pps) - left,
                row - 5.0,
                x(*pps) + 4.0,
                y + 12.0,
                pps / 1e6
            );
            y += row;
        }
    }
    s.push_str("</svg>\n");
    s
}
