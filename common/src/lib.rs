//! What every vhostbox backend shares: the listener and the serve loop that hands one frontend
//! connection after another to a fresh device instance, size parsing for the command line, and
//! logging.

pub mod daemon;
pub mod inflight;
pub mod logging;
pub mod poll;
pub mod ring;
pub mod sandbox;
pub mod size;
pub mod vu_shim;

/// Exit status for a configuration or environment error (bad flag, missing file, busy socket).
pub const EXIT_USAGE: i32 = 2;

/// An error and its sources, "outer: inner: innermost", on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
