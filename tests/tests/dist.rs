//! What ships next to the binaries: the systemd template units (checked by systemd-analyze,
//! which must print nothing at all: an unknown key is only a warning there), the vhost-user.json
//! descriptors and `--print-capabilities`, checked against QEMU's vhost-user.json schema rules.

use std::fs;
use std::process::Command;

use serde_json::Value;
use vhostbox_tests::{bin_path, repo};

#[test]
fn the_template_units_pass_systemd_analyze_verify_without_a_word() {
    let d = tempfile::tempdir().unwrap();
    let mut units = Vec::new();
    for b in ["blk", "net"] {
        let dist = repo().join(format!("backends/{b}/dist"));
        let bin = bin_path(&format!("vhostbox-{b}"));
        // The units name /usr/bin/...: point them at the binary under test.
        let service = fs::read_to_string(dist.join(format!("vhostbox-{b}@.service")))
            .unwrap()
            .replace(&format!("/usr/bin/vhostbox-{b}"), bin.to_str().unwrap());
        fs::write(d.path().join(format!("vhostbox-{b}@.service")), service).unwrap();
        fs::copy(
            dist.join(format!("vhostbox-{b}@.socket")),
            d.path().join(format!("vhostbox-{b}@.socket")),
        )
        .unwrap();
        units.push(format!("vhostbox-{b}@vm1.service"));
        units.push(format!("vhostbox-{b}@vm1.socket"));
    }
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&units)
        .current_dir(d.path())
        .env("SYSTEMD_LOG_LEVEL", "notice")
        .output()
        .expect("systemd-analyze (apt install systemd)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(err.trim(), "", "systemd-analyze had something to say");
}

/// QEMU's docs/interop/vhost-user.json: the descriptor's `type` is a VHostUserBackendType and
/// `binary` an absolute path; `--print-capabilities` prints a VHostUserBackendCapabilities of
/// the same type, whose "block" features are VHostUserBackendBlockFeature values. Each
/// advertised feature's option must be accepted.
#[test]
fn descriptors_and_print_capabilities_follow_the_vhost_user_json_schema() {
    const TYPES: &[&str] = &[
        "9p",
        "balloon",
        "block",
        "caif",
        "console",
        "crypto",
        "gpu",
        "input",
        "net",
        "rng",
        "rpmb",
        "rproc-serial",
        "scsi",
        "vsock",
        "fs",
    ];
    for (b, ty) in [("blk", "block"), ("net", "net")] {
        let name = format!("vhostbox-{b}");
        let desc = repo().join(format!("backends/{b}/dist/50-{name}.json"));
        let desc: Value = serde_json::from_str(&fs::read_to_string(desc).unwrap()).unwrap();
        assert!(TYPES.contains(&ty));
        assert_eq!(desc["type"], ty);
        assert_eq!(desc["binary"], format!("/usr/bin/{name}"));
        assert!(desc["description"].as_str().is_some_and(|d| !d.is_empty()));
        assert_eq!(desc.as_object().unwrap().len(), 3, "{desc}");

        let out = Command::new(bin_path(&name))
            .arg("--print-capabilities")
            .output()
            .unwrap();
        assert!(out.status.success());
        let caps: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(caps["type"], ty, "{caps}");
        if ty == "block" {
            assert_eq!(
                caps["features"],
                serde_json::json!(["read-only", "blk-file"])
            );
            // The options those features promise (vhost-user.rst, "vhost-user-blk").
            let d = tempfile::tempdir().unwrap();
            let img = vhostbox_tests::sparse_image(&d.path().join("d.img"), 1 << 20);
            let sock = d.path().join("s.sock");
            let mut be = vhostbox_tests::Backend::start(
                &name,
                &sock,
                &[
                    "--socket-path",
                    sock.to_str().unwrap(),
                    "--blk-file",
                    img.to_str().unwrap(),
                    "--read-only",
                ],
            );
            let log = be.wait_log("ready; waiting for a frontend");
            assert!(log.contains("read-only"), "{log}");
            assert_eq!(be.signal_and_wait(libc::SIGTERM).code(), Some(0));
        } else {
            assert_eq!(
                caps.as_object().unwrap().len(),
                1,
                "only the type for {ty}: {caps}"
            );
        }
    }
}
