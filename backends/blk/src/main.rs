use clap::Parser;

use vhostbox_blk::args::Args;
use vhostbox_blk::config::Config;

fn main() {
    let args = Args::parse();
    let cfg = match Config::try_from(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vhostbox-blk: {e}");
            std::process::exit(vhostbox_common::EXIT_USAGE);
        }
    };
    vhostbox_common::logging::init("vhostbox-blk", cfg.log_level);
    std::process::exit(vhostbox_blk::run(cfg));
}
