//! Writes the man pages of vhostbox-blk, vhostbox-net and vhostboxctl (roff, section 1) into
//! the directory given, from their clap definitions (clap_mangen): what `--help` says and what
//! `man` shows cannot drift apart. scripts/build-deb.sh runs it.

use std::path::PathBuf;

use clap::CommandFactory;

fn main() {
    let out = PathBuf::from(
        std::env::args_os()
            .nth(1)
            .unwrap_or_else(|| "target/man".into()),
    );
    std::fs::create_dir_all(&out).expect("creating the output directory");
    let pages = [
        ("vhostbox-blk", vhostbox_blk::args::Args::command()),
        ("vhostbox-net", vhostbox_net::args::Args::command()),
        ("vhostboxctl", vhostbox_common::ctl::Args::command()),
    ];
    for (name, cmd) in pages {
        let cmd = cmd.name(name);
        let mut roff = Vec::new();
        clap_mangen::Man::new(cmd)
            .section("1")
            .manual("vhostbox")
            .source(format!("vhostbox {}", env!("CARGO_PKG_VERSION")))
            .render(&mut roff)
            .expect("rendering");
        let path = out.join(format!("{name}.1"));
        std::fs::write(&path, roff).expect("writing the page");
        println!("{}", path.display());
    }
}
