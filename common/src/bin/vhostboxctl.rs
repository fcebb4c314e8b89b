//! vhostboxctl: the client of a vhostbox backend's control socket (`--control PATH`).
//!
//! Sends one JSON request line, prints the reply (pretty JSON) and exits 0 if the backend
//! answered `"ok": true`, 1 if it answered with an error (printed on stderr), 2 if it could not
//! ask (bad flags, no socket, no answer).

use std::process::ExitCode;

use clap::Parser;
use vhostbox_common::ctl::{ask, Args};

fn main() -> ExitCode {
    let a = Args::parse();
    match ask(&a) {
        Ok(v) => {
            if v.get("ok") == Some(&serde_json::Value::Bool(true)) {
                let mut v = v;
                if let Some(m) = v.as_object_mut() {
                    m.remove("ok");
                }
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                ExitCode::SUCCESS
            } else {
                let e = v
                    .get("error")
                    .and_then(|e| e.as_str())
                    .unwrap_or("no reason given");
                eprintln!("vhostboxctl: {e}");
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("vhostboxctl: {e}");
            ExitCode::from(2)
        }
    }
}
