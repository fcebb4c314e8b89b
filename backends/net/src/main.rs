use clap::Parser;

use vhostbox_net::args::Args;
use vhostbox_net::config::Config;

fn main() {
    let args = Args::parse();
    let cfg = match Config::try_from(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vhostbox-net: {e}");
            std::process::exit(vhostbox_common::EXIT_USAGE);
        }
    };
    vhostbox_common::logging::init("vhostbox-net", cfg.log_level);
    std::process::exit(vhostbox_net::run(cfg));
}
