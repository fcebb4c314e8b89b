//! The benchmark tools keep working: each is run briefly against the real binaries and its
//! report is checked for figures from every contender. These are not benchmarks: nothing here
//! looks at how fast anything was (docs/benchmarks.md has the figures), only that the tools
//! measured something and named what they could not measure.

use std::path::Path;
use std::process::Command;

use vhostbox_tests::bin_path;

/// The rows of a vhostbox-bench results.md table for `device` and `workload`:
/// (contender, IOPS, IOPS ratio).
fn rows(md: &str, device: &str, workload: &str) -> Vec<(String, f64, String)> {
    md.lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            // "", device, workload, contender, IOPS, MiB/s, mean, p50, p99, CPU, ratios.., ""
            if cells.len() < 14 || cells[1] != device || cells[2] != workload {
                return None;
            }
            Some((
                cells[3].to_string(),
                cells[4].parse().ok()?,
                cells[10].to_string(),
            ))
        })
        .collect()
}

fn bench(out: &Path, only: &str, extra_env: Option<(&str, &str)>) -> (bool, String) {
    let mut cmd = Command::new(bin_path("vhostbox-bench"));
    cmd.args(["--rounds", "1", "--secs", "0.3", "--only", only, "--out"])
        .arg(out);
    if let Some((k, v)) = extra_env {
        cmd.env(k, v);
    }
    let o = cmd.output().expect("run vhostbox-bench");
    let log = String::from_utf8_lossy(&o.stderr).into_owned();
    (o.status.success(), log)
}

#[test]
fn blk_bench_reports_every_contender() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, log) = bench(dir.path(), "null 4k randread QD1", None);
    assert!(ok, "vhostbox-bench failed:\n{log}");
    let md = std::fs::read_to_string(dir.path().join("results.md")).unwrap();
    assert!(!md.contains("did not run"), "a contender failed:\n{md}");
    // The filter matches both the sleeping-client and the polling-client workload.
    for workload in ["4k randread QD1", "4k randread QD1 polled"] {
        let r = rows(&md, "null", workload);
        let names: Vec<&str> = r.iter().map(|x| x.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "vhostbox io-uring",
                "vhostbox io-uring +metrics",
                "vhostbox sync",
                "qemu-storage-daemon"
            ],
            "{workload}:\n{md}"
        );
        for (name, iops, _) in &r {
            assert!(*iops > 0.0, "{workload}: {name} measured no I/O:\n{md}");
        }
        assert_eq!(r[3].2, "1.00x", "ratios are against the peer:\n{md}");
    }
    let csv = std::fs::read_to_string(dir.path().join("results.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 2 * 4, "one line per run:\n{csv}");
    let svg = std::fs::read_to_string(dir.path().join("iops.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
}

/// VHOSTBOX_BENCH_LIMIT_IOPS adds a limited vhostbox, whose "vs limit" cell is against its
/// own limit.
#[test]
fn blk_bench_can_measure_a_limited_device() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, log) = bench(
        dir.path(),
        "null 4k randread QD32$",
        Some(("VHOSTBOX_BENCH_LIMIT_IOPS", "2000")),
    );
    assert!(ok, "vhostbox-bench failed:\n{log}");
    let md = std::fs::read_to_string(dir.path().join("results.md")).unwrap();
    let row = md
        .lines()
        .find(|l| l.contains("| vhostbox io-uring --limit-iops 2000 |"))
        .unwrap_or_else(|| panic!("no limited row:\n{md}"));
    assert!(row.trim_end().ends_with("of 2000 |"), "{row}");
    let iops: f64 = row.split('|').nth(4).unwrap().trim().parse().unwrap();
    assert!(iops > 0.0, "{row}");
}

/// On the image, the same client without any backend is the limit row, and every row has its
/// ratio against it.
#[test]
fn blk_bench_has_the_direct_limit_row_on_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, log) = bench(dir.path(), "file 4k randread QD1", None);
    assert!(ok, "vhostbox-bench failed:\n{log}");
    let md = std::fs::read_to_string(dir.path().join("results.md")).unwrap();
    for workload in ["4k randread QD1", "4k randread QD1 polled"] {
        let lines: Vec<&str> = md
            .lines()
            .filter(|l| l.starts_with(&format!("| file | {workload} |")))
            .collect();
        let names: Vec<&str> = lines
            .iter()
            .map(|l| l.split('|').nth(3).unwrap().trim())
            .collect();
        assert_eq!(
            names,
            [
                "vhostbox io-uring",
                "vhostbox io-uring +metrics",
                "vhostbox sync",
                "qemu-storage-daemon",
                "direct io_uring (limit)"
            ],
            "{workload}:\n{md}"
        );
        let limit: Vec<&str> = lines[4].split('|').map(str::trim).collect();
        assert!(limit[4].parse::<f64>().unwrap() > 0.0, "{md}");
        assert_eq!(limit[9], "—", "the limit has no backend CPU:\n{md}");
        assert_eq!(limit[13], "1.00x", "{md}");
        for l in &lines[..4] {
            let c: Vec<&str> = l.split('|').map(str::trim).collect();
            assert!(c[13].ends_with('x') && c[13] != "—", "{l}");
        }
    }
    // The null device has no limit row.
    let (ok, log) = bench(dir.path(), "null 4k randread QD1 polled", None);
    assert!(ok, "{log}");
    let md = std::fs::read_to_string(dir.path().join("results.md")).unwrap();
    assert!(
        !md.contains("| null | 4k randread QD1 polled | direct"),
        "{md}"
    );
}

#[test]
fn blk_bench_names_a_contender_that_cannot_start() {
    let dir = tempfile::tempdir().unwrap();
    // An unknown flag makes vhostbox-blk exit at start (status 2); the peer still runs.
    let (ok, log) = bench(
        dir.path(),
        "null 4k randread QD1 polled",
        Some(("VHOSTBOX_BENCH_ARGS", "--no-such-flag")),
    );
    assert!(ok, "vhostbox-bench failed:\n{log}");
    let md = std::fs::read_to_string(dir.path().join("results.md")).unwrap();
    for name in [
        "vhostbox io-uring",
        "vhostbox io-uring +metrics",
        "vhostbox sync",
    ] {
        assert!(
            md.contains(&format!("{name} did not run: {name} exited at start")),
            "{name} not reported as failed:\n{md}"
        );
    }
    let r = rows(&md, "null", "4k randread QD1 polled");
    assert_eq!(r.len(), 1, "only the peer has figures:\n{md}");
    assert_eq!(r[0].0, "qemu-storage-daemon");
    assert!(r[0].1 > 0.0);
}

#[test]
fn net_bench_reports_tx_and_rx() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("net.md");
    // testpmd (the peer) is a heavy install kept to the benchmark path; the tool itself, its
    // tap, namespace and generator are what this checks.
    let o = Command::new(bin_path("vhostbox-netbench"))
        .args(["--secs", "0.3", "--rounds", "1", "--only", "tx64,rx1500"])
        .args(["--no-testpmd", "--out"])
        .arg(&out)
        .output()
        .expect("run vhostbox-netbench");
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "vhostbox-netbench failed:\n{log}");
    let md = std::fs::read_to_string(&out).unwrap();
    for workload in ["tx64", "rx1500"] {
        let row: Vec<&str> = md
            .lines()
            .find(|l| l.starts_with(&format!("| {workload} | vhostbox-net |")))
            .unwrap_or_else(|| panic!("no {workload} row:\n{md}"))
            .split('|')
            .map(str::trim)
            .collect();
        let mpps: f64 = row[3].parse().unwrap();
        assert!(mpps > 0.0, "{workload} moved no packets:\n{md}");
    }
    assert!(std::fs::read_to_string(out.with_extension("svg"))
        .unwrap()
        .starts_with("<svg"));
}
