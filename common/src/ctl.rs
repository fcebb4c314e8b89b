//! `vhostboxctl`, the client of a backend's control socket (`--control PATH`): its command
//! line and the one request it makes. The binary is `src/bin/vhostboxctl.rs`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// Control a running vhostbox backend through its control socket.
///
/// The backend serves the socket when started with --control PATH. Each command sends one
/// JSON request line ({"command": ...}) and prints the JSON reply.
///
/// EXIT STATUS: 0 when the backend did what was asked, 1 when it answered with an error,
/// 2 when the request could not be made (bad flags, no socket, no reply within --timeout).
#[derive(Debug, Parser)]
#[command(name = "vhostboxctl", version)]
pub struct Args {
    /// The backend's control socket (its --control PATH).
    #[arg(long, short = 'c', value_name = "PATH", env = "VHOSTBOX_CONTROL")]
    pub control: PathBuf,

    /// Seconds to wait for the reply.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    pub timeout: u64,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The backend, its worker, the frontend's features and rings, connections, restarts.
    Status,
    /// Every counter (the figures --metrics serves), as JSON.
    Stats,
    /// Grow the disk the guest sees, while it runs (vhostbox-blk): the image file is grown to
    /// SIZE, and the guest is told (VHOST_USER_BACKEND_CONFIG_CHANGE_MSG). Without SIZE, the
    /// size of the file or block device is read again (after lvextend, losetup -c, ...).
    Resize {
        /// The new size in bytes, or with a K, M, G or T suffix.
        size: Option<String>,
        /// Allow shrinking, which cuts off data the guest may use.
        #[arg(long)]
        force: bool,
    },
    /// Change I/O limits of the running device (vhostbox-blk). Limits not named keep their
    /// values; 0 removes one. Takes effect within 50 ms, without dropping a request.
    SetLimits {
        /// Reads and writes per second, together.
        #[arg(long, value_name = "N")]
        iops: Option<u64>,
        /// Reads per second.
        #[arg(long, value_name = "N")]
        read_iops: Option<u64>,
        /// Writes per second.
        #[arg(long, value_name = "N")]
        write_iops: Option<u64>,
        /// Bytes per second, together, with an optional K, M, G suffix.
        #[arg(long, value_name = "SIZE")]
        bps: Option<String>,
        /// Bytes read per second.
        #[arg(long, value_name = "SIZE")]
        read_bps: Option<String>,
        /// Bytes written per second.
        #[arg(long, value_name = "SIZE")]
        write_bps: Option<String>,
        /// The most operations an IOPS bucket holds (0: a tenth of a second's worth).
        #[arg(long, value_name = "N")]
        iops_burst: Option<u64>,
        /// The most bytes a byte bucket holds (0: a tenth of a second's worth).
        #[arg(long, value_name = "SIZE")]
        bps_burst: Option<String>,
    },
    /// Hand the running device over to a new vhostbox binary.
    Upgrade,
    /// List the commands the backend knows.
    Commands,
    /// Send a request line as given (JSON), for what has no subcommand.
    Raw {
        /// A JSON object with a "command".
        json: String,
    },
}

/// The request line for a command.
pub fn request(c: &Command) -> Result<String, String> {
    use serde_json::json;
    let v = match c {
        Command::Status => json!({"command": "status"}),
        Command::Stats => json!({"command": "stats"}),
        Command::Resize { size, force } => {
            json!({"command": "resize", "size": size, "force": force})
        }
        Command::SetLimits {
            iops,
            read_iops,
            write_iops,
            bps,
            read_bps,
            write_bps,
            iops_burst,
            bps_burst,
        } => {
            let mut m = serde_json::Map::new();
            m.insert("command".into(), json!("set-limits"));
            let given = [
                ("iops", iops.map(|v| json!(v))),
                ("read-iops", read_iops.map(|v| json!(v))),
                ("write-iops", write_iops.map(|v| json!(v))),
                ("bps", bps.as_ref().map(|v| json!(v))),
                ("read-bps", read_bps.as_ref().map(|v| json!(v))),
                ("write-bps", write_bps.as_ref().map(|v| json!(v))),
                ("iops-burst", iops_burst.map(|v| json!(v))),
                ("bps-burst", bps_burst.as_ref().map(|v| json!(v))),
            ];
            for (k, v) in given {
                if let Some(v) = v {
                    m.insert(k.into(), v);
                }
            }
            if m.len() == 1 {
                return Err("set-limits: name at least one limit (see --help)".into());
            }
            serde_json::Value::Object(m)
        }
        Command::Upgrade => json!({"command": "upgrade"}),
        Command::Commands => json!({"command": "help"}),
        Command::Raw { json } => {
            let v: serde_json::Value =
                serde_json::from_str(json).map_err(|e| format!("raw: not JSON: {e}"))?;
            return Ok(v.to_string());
        }
    };
    Ok(v.to_string())
}

/// Sends the request and reads the reply.
pub fn ask(a: &Args) -> Result<serde_json::Value, String> {
    let line = request(&a.command)?;
    let s = UnixStream::connect(&a.control)
        .map_err(|e| format!("cannot connect to {}: {e}", a.control.display()))?;
    let t = Some(Duration::from_secs(a.timeout.max(1)));
    s.set_read_timeout(t)
        .and_then(|_| s.set_write_timeout(t))
        .map_err(|e| e.to_string())?;
    (&s).write_all(format!("{line}\n").as_bytes())
        .map_err(|e| format!("sending the request: {e}"))?;
    let mut reply = String::new();
    BufReader::new(&s)
        .read_line(&mut reply)
        .map_err(|e| format!("no reply from {}: {e}", a.control.display()))?;
    if reply.is_empty() {
        return Err(format!(
            "{} closed the connection without a reply",
            a.control.display()
        ));
    }
    serde_json::from_str(&reply).map_err(|e| format!("the reply is not JSON: {e}"))
}
