//! The Debian package (scripts/build-deb.sh, which scripts/test.sh runs first): unpacked into
//! a scratch root with `dpkg-deb -x`, it holds what the package promises, and what it holds
//! works: the binaries run, `man` shows the pages, the vhost-user.json files name binaries
//! that are in it.

use std::path::{Path, PathBuf};
use std::process::Command;

use vhostbox_tests::repo;

fn deb() -> PathBuf {
    let dir = repo().join("target/debian");
    let found: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    let n = p.file_name().unwrap().to_string_lossy().into_owned();
                    n.starts_with("vhostbox_") && n.ends_with(".deb")
                })
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        found.len(),
        1,
        "expected one vhostbox_*.deb in {}: run scripts/build-deb.sh (scripts/test.sh does)",
        dir.display()
    );
    found[0].clone()
}

fn out(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        o.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[test]
fn the_package_unpacks_to_working_binaries_units_descriptors_and_man_pages() {
    let deb = deb();
    let fields = out(Command::new("dpkg-deb").args(["-f"]).arg(&deb).args([
        "Package",
        "Version",
        "Architecture",
        "Depends",
    ]));
    assert!(fields.contains("Package: vhostbox\n"), "{fields}");
    assert!(
        fields.contains(&format!("Version: {}", env!("CARGO_PKG_VERSION"))),
        "{fields}"
    );
    assert!(
        fields.contains("Depends: ") && fields.contains("libc6"),
        "{fields}"
    );

    let root = tempfile::tempdir().unwrap();
    out(Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(root.path()));
    let r = |p: &str| root.path().join(p);
    for bin in ["vhostbox-blk", "vhostbox-net", "vhostboxctl"] {
        let p = r(&format!("usr/bin/{bin}"));
        assert!(executable(&p), "{} missing or not executable", p.display());
        let v = out(Command::new(&p).arg("--version"));
        assert!(
            v.contains(env!("CARGO_PKG_VERSION")),
            "{bin} --version: {v}"
        );
    }
    for unit in [
        "vhostbox-blk@.service",
        "vhostbox-blk@.socket",
        "vhostbox-net@.service",
        "vhostbox-net@.socket",
    ] {
        let p = r(&format!("lib/systemd/system/{unit}"));
        let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let shipped = std::fs::read_to_string(
            repo()
                .join("backends")
                .join(if unit.contains("blk") { "blk" } else { "net" })
                .join("dist")
                .join(unit),
        )
        .unwrap();
        assert_eq!(text, shipped, "{unit} is the one in the repo");
    }
    for (json, ty) in [
        ("50-vhostbox-blk.json", "block"),
        ("50-vhostbox-net.json", "net"),
    ] {
        let p = r(&format!("usr/share/qemu/vhost-user/{json}"));
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        assert_eq!(v["type"], ty);
        // The binary it names is in the package and describes itself the same way.
        let bin = v["binary"].as_str().unwrap();
        let inside = r(bin.trim_start_matches('/'));
        assert!(
            executable(&inside),
            "{json} names {bin}, not in the package"
        );
        let caps: serde_json::Value =
            serde_json::from_str(&out(Command::new(&inside).arg("--print-capabilities"))).unwrap();
        assert_eq!(caps["type"], ty);
    }
    // `man vhostbox-blk` works against the unpacked tree, and shows the clap definitions.
    for (page, says) in [
        ("vhostbox-blk", "--socket-path"),
        ("vhostbox-net", "--queue-pairs"),
        ("vhostboxctl", "--control"),
    ] {
        assert!(r(&format!("usr/share/man/man1/{page}.1.gz")).exists());
        let text = out(Command::new("man")
            .args(["-P", "cat"])
            .arg(page)
            .env("MANPATH", r("usr/share/man"))
            .env("MANWIDTH", "100"));
        assert!(text.contains(says), "man {page}:\n{text}");
        assert!(
            text.contains("--metrics") || page == "vhostboxctl",
            "man {page}:\n{text}"
        );
    }
    assert!(r("usr/share/doc/vhostbox/README.md").exists());
}
