//! Live migration of a QEMU guest on vhostbox-blk: two QEMUs on this machine (TCG), a source
//! and an `-incoming` destination on a unix socket, each with its own jailed vhostbox-blk (two
//! queues) on the same raw image, migrated over QMP while the guest keeps the device DMAing
//! into its page cache.
//!
//! The guest (booted with `init_on_alloc=0`, so that freed pages keep their old contents)
//! writes 48 MiB of random data with O_DIRECT and hashes it from the disk; then, in a loop,
//! drops its page cache, reads the data back buffered (the device writes it into fresh page
//! cache pages) and hashes it twice: the first hash is computed while the pages arrive, the
//! second from the cache alone. A page the device wrote on the source but did not log is
//! stale on the destination, and the cached hash there differs from the disk's.
//!
//! The test can fail: the negative control runs the same migration with the source backend's
//! hand-written logging off (the test-only build, `VHOSTBOX_PROBE_SKIP_DMA_LOG=1`) and must
//! see a wrong hash on the destination.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vhostbox_tests::{blk_args, guest_dir, probe_bin, repo, sparse_image, Backend};

const ITERATIONS: u32 = 10;

const GUEST: &str = r#"#!/bin/sh
r() { echo "RESULT $*" >/dev/ttyS1; }
dd if=/dev/urandom of=/dev/vda bs=1M count=48 oflag=direct 2>/dev/null
echo 3 > /proc/sys/vm/drop_caches
r disk $(dd if=/dev/vda bs=1M count=48 iflag=direct 2>/dev/null | md5sum | cut -c1-32)
i=0
while [ $i -lt ITERATIONS ]; do
  echo 3 > /proc/sys/vm/drop_caches
  c=$(dd if=/dev/vda bs=1M count=48 2>/dev/null | md5sum | cut -c1-32)
  c2=$(dd if=/dev/vda bs=1M count=48 2>/dev/null | md5sum | cut -c1-32)
  r iter $i $c $c2
  i=$((i+1))
done
r disk-after $(dd if=/dev/vda bs=1M count=48 iflag=direct 2>/dev/null | md5sum | cut -c1-32)
r done
"#;

struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Qmp {
    fn connect(path: &Path) -> Qmp {
        let deadline = Instant::now() + Duration::from_secs(30);
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(Instant::now() < deadline, "QMP {}: {e}", path.display());
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        };
        let mut q = Qmp {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
        };
        q.line();
        q.cmd("qmp_capabilities", serde_json::json!({}));
        q
    }

    fn line(&mut self) -> serde_json::Value {
        let mut l = String::new();
        self.r.read_line(&mut l).unwrap();
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("QMP said {l:?}: {e}"))
    }

    fn cmd(&mut self, c: &str, args: serde_json::Value) -> serde_json::Value {
        let m = serde_json::json!({"execute": c, "arguments": args});
        writeln!(self.w, "{m}").unwrap();
        loop {
            let v = self.line();
            if let Some(e) = v.get("error") {
                panic!("QMP {c}: {e}");
            }
            if let Some(r) = v.get("return") {
                return r.clone();
            }
        }
    }
}

struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn qemu(dir: &Path, side: &str, sock: &Path, overlay: &Path, extra: &[String]) -> Qemu {
    let mut cmd = Command::new(repo().join("scripts/run-guest.sh"));
    cmd.args(["--blk", sock.to_str().unwrap(), "--blk-queues", "2"])
        .args(["--overlay", overlay.to_str().unwrap()])
        .arg("--console")
        .arg(dir.join(format!("console-{side}.txt")))
        .arg("--result")
        .arg(dir.join(format!("result-{side}.txt")))
        .args(["--append", "init_on_alloc=0"])
        .arg("--")
        .arg("-qmp")
        .arg(format!(
            "unix:{},server=on,wait=off",
            dir.join(format!("qmp-{side}")).display()
        ))
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("qemu-{side}.err"))).unwrap());
    Qemu(cmd.spawn().unwrap())
}

fn results(dir: &Path, side: &str) -> String {
    std::fs::read_to_string(dir.join(format!("result-{side}.txt"))).unwrap_or_default()
}

fn wait_for(dir: &Path, side: &str, needle: &str, secs: u64) -> String {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let r = results(dir, side);
        if r.contains(needle) {
            return r;
        }
        let err = std::fs::read_to_string(dir.join(format!("qemu-{side}.err"))).unwrap_or_default();
        assert!(
            Instant::now() < deadline,
            "{side}: no {needle:?} in {secs} s\nresults:\n{r}\nqemu:\n{err}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One migration. Returns (the disk hash, every cached hash the destination computed, the
/// migration's downtime in ms).
fn migrate_once(engine: &str, skip_dma_log: bool) -> (String, Vec<String>, u64) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let img = sparse_image(&dir.join("disk.img"), 64 << 20);
    let script = dir.join("test.sh");
    std::fs::write(
        &script,
        GUEST.replace("ITERATIONS", &ITERATIONS.to_string()),
    )
    .unwrap();
    let overlay = dir.join("overlay.cpio.gz");
    let st = Command::new(repo().join("scripts/mk-overlay.sh"))
        .arg(&overlay)
        .arg(format!("{}:/test.sh", script.display()))
        .status()
        .unwrap();
    assert!(st.success());
    // Shared storage: both backends open the image, so neither may lock it (docs/migration.md).
    let extra = ["--lock", "off", "--num-queues", "2", "--engine", engine];
    let (sa, sb) = (dir.join("a.sock"), dir.join("b.sock"));
    let src = if skip_dma_log {
        Backend::start_exe_env(
            &probe_bin("vhostbox-blk"),
            &sa,
            &blk_args(&sa, &img, &extra),
            &[("VHOSTBOX_PROBE_SKIP_DMA_LOG", "1")],
        )
    } else {
        Backend::blk(&sa, &img, &extra)
    };
    let dst = Backend::blk(&sb, &img, &extra);
    let mig = dir.join("migrate.sock");
    let _qa = qemu(dir, "a", &sa, &overlay, &[]);
    let _qb = qemu(
        dir,
        "b",
        &sb,
        &overlay,
        &["-incoming".into(), format!("unix:{}", mig.display())],
    );
    // Migrate once the loop runs: the device is DMAing into the page cache meanwhile.
    wait_for(dir, "a", "RESULT iter 0 ", 240);
    let mut q = Qmp::connect(&dir.join("qmp-a"));
    // Slow enough for several dirty-page rounds while the guest reads.
    q.cmd(
        "migrate-set-parameters",
        serde_json::json!({"max-bandwidth": 48u64 << 20}),
    );
    q.cmd(
        "migrate",
        serde_json::json!({"uri": format!("unix:{}", mig.display())}),
    );
    let deadline = Instant::now() + Duration::from_secs(240);
    let info = loop {
        let r = q.cmd("query-migrate", serde_json::json!({}));
        match r["status"].as_str() {
            Some("completed") => break r,
            Some("failed") | Some("cancelled") => panic!("migration: {r}"),
            _ => {}
        }
        assert!(Instant::now() < deadline, "migration never completed: {r}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let rounds = info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0);
    assert!(rounds >= 2, "one RAM pass only: {info}");
    let downtime = info["downtime"].as_u64().unwrap_or(0);
    let r = wait_for(dir, "b", "RESULT done", 400);
    let src_log = src.log();
    assert!(
        src_log.contains("dirty-page logging on"),
        "the source never logged:\n{src_log}"
    );
    let first = results(dir, "a");
    let disk = first
        .lines()
        .find_map(|l| l.strip_prefix("RESULT disk "))
        .expect("disk hash")
        .to_owned();
    let cached: Vec<String> = r
        .lines()
        .filter_map(|l| l.strip_prefix("RESULT iter "))
        .flat_map(|l| {
            l.split_whitespace()
                .skip(1)
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(
        !cached.is_empty(),
        "no iteration ran on the destination: {r}"
    );
    let after = r
        .lines()
        .find_map(|l| l.strip_prefix("RESULT disk-after "))
        .expect("final disk hash");
    assert_eq!(after, disk, "the disk itself changed");
    drop(dst);
    (disk, cached, downtime)
}

/// Migrated with both engines, every hash the destination computes from its page cache is the
/// disk's. With the source's logging of engine writes off, one is not (tried up to three
/// times: which pages go stale depends on timing).
#[test]
fn live_migration_keeps_device_written_pages() {
    if guest_dir().is_none() {
        return;
    }
    for engine in ["io-uring", "sync"] {
        let (disk, cached, downtime) = migrate_once(engine, false);
        let bad: Vec<_> = cached.iter().filter(|c| **c != disk).collect();
        assert!(
            bad.is_empty(),
            "{engine}: the destination's page cache differs from the disk ({disk}): {bad:?}"
        );
        eprintln!(
            "{engine}: migrated, downtime {downtime} ms, {} hashes ok",
            cached.len()
        );
    }
    let mut caught = false;
    for attempt in 1..=3 {
        let (disk, cached, _) = migrate_once("io-uring", true);
        if cached.iter().any(|c| *c != disk) {
            eprintln!("negative control caught on attempt {attempt}");
            caught = true;
            break;
        }
    }
    assert!(
        caught,
        "a source that does not log its engine's writes passed three migrations: the test \
         cannot see the bug it is for"
    );
}
