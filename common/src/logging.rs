//! A small stderr logger: `LEVEL vhostbox-xxx[pid]: message`, level from `--log-level` or the
//! `VHOSTBOX_LOG` environment variable. It allocates nothing per record beyond what `format!`
//! needs and takes no lock besides stderr's own.

use std::io::Write;

use log::{LevelFilter, Log, Metadata, Record};

struct StderrLogger {
    name: &'static str,
}

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let _ = writeln!(
            std::io::stderr().lock(),
            "{:5} {}[{}]: {}",
            record.level(),
            self.name,
            std::process::id(),
            record.args()
        );
    }

    fn flush(&self) {}
}

/// A log level name that is none of the known ones.
#[derive(Debug, thiserror::Error)]
#[error("invalid log level '{0}': use off, error, warn, info, debug or trace")]
pub struct LevelError(pub String);

/// Parses a level name (`off`, `error`, `warn`, `info`, `debug`, `trace`).
pub fn parse_level(s: &str) -> Result<LevelFilter, LevelError> {
    s.parse::<LevelFilter>()
        .map_err(|_| LevelError(s.to_owned()))
}

/// Installs the logger once; later calls are ignored.
pub fn init(name: &'static str, level: LevelFilter) {
    let level = std::env::var("VHOSTBOX_LOG")
        .ok()
        .and_then(|v| parse_level(&v).ok())
        .unwrap_or(level);
    if log::set_boxed_logger(Box::new(StderrLogger { name })).is_ok() {
        log::set_max_level(level);
    }
}
