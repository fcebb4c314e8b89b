//! The service manager's side: systemd's notification protocol (`NOTIFY_SOCKET`), through the
//! `sd-notify` crate. Only the supervisor talks to it; a jailed worker cannot reach the socket.
//!
//! - `READY=1` once the first worker waits for a frontend on the listening socket;
//! - `STATUS=` whenever that changes (waiting, serving, a worker replaced);
//! - `WATCHDOG=1` every half `WATCHDOG_USEC`, and only while the current worker answers the
//!   supervisor's heartbeat, so a hung or stopped worker gets the service restarted;
//! - `STOPPING=1` when a stop signal comes.
//!
//! Nothing is sent when `NOTIFY_SOCKET` is unset. A failed send is logged once and never stops
//! the backend.

use std::cell::Cell;
use std::time::Duration;

use log::{debug, warn};
use sd_notify::NotifyState;

/// Sends state changes to the service manager, if there is one.
#[derive(Debug)]
pub struct Notifier {
    enabled: bool,
    watchdog: Option<Duration>,
    failed: Cell<bool>,
}

impl Notifier {
    /// From the environment systemd sets (`NOTIFY_SOCKET`, `WATCHDOG_USEC`, `WATCHDOG_PID`).
    pub fn from_env() -> Self {
        Notifier {
            enabled: std::env::var_os("NOTIFY_SOCKET").is_some(),
            watchdog: sd_notify::watchdog_enabled().filter(|d| !d.is_zero()),
            failed: Cell::new(false),
        }
    }

    /// The watchdog timeout systemd asked for, if any.
    pub fn watchdog(&self) -> Option<Duration> {
        self.watchdog.filter(|_| self.enabled)
    }

    fn send(&self, states: &[NotifyState]) {
        if !self.enabled {
            return;
        }
        debug!("notify: {states:?}");
        if let Err(e) = sd_notify::notify(states) {
            if !self.failed.replace(true) {
                warn!("cannot notify the service manager (NOTIFY_SOCKET): {e}");
            }
        }
    }

    /// The socket is served: `READY=1` and the status.
    pub fn ready(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    /// A new status line.
    pub fn status(&self, status: &str) {
        self.send(&[NotifyState::Status(status)]);
    }

    /// One watchdog ping.
    pub fn watchdog_ping(&self) {
        self.send(&[NotifyState::Watchdog]);
    }

    /// A stop has begun.
    pub fn stopping(&self) {
        self.send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    }
}
