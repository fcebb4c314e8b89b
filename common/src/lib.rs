//! What every vhostbox backend shares: the launcher ([`launch`]: command line, supervisor,
//! one jailed worker per connection), the listener, the vhost-user relay and in-flight
//! tracking, the sandbox, and small helpers (busy-poll policy, ring checks, sizes, logging).
//!
//! A backend crate provides only its device: see [`launch::Device`].

pub mod backend;
pub mod cli;
pub mod connection;
pub mod control;
pub mod ctl;
pub mod dirty;
pub mod guest;
pub mod inflight;
pub mod launch;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod poll;
pub mod relay;
pub mod ring;
pub mod sandbox;
pub mod service;
pub mod settings;
pub mod size;
#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// Exit status for a configuration or environment error (bad flag, missing file, busy socket).
pub const EXIT_USAGE: i32 = 2;

/// Exit status when everything stopped cleanly but the socket file this process bound could not
/// be removed (for example its directory is not writable once privileges are dropped).
pub const EXIT_SOCKET_LEFT: i32 = 4;

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

/// The exit events a backend hands out in `VhostUserBackend::exit_event`, one per queue
/// thread: without one, dropping the daemon hangs joining the queue threads.
///
/// vhost-user-backend takes the consumer into its epoll as a raw fd and never closes it. The
/// backend outlives every epoll of the library (the library holds clones of it), so these
/// fds are closed when the backend is dropped.
#[derive(Default)]
pub struct ExitEvents {
    consumers: Mutex<Vec<RawFd>>,
}

impl ExitEvents {
    /// A fresh pair for the library.
    pub fn take(&self) -> Option<(EventConsumer, EventNotifier)> {
        let (c, n) =
            new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()?;
        self.consumers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(c.as_raw_fd());
        Some((c, n))
    }
}

impl Drop for ExitEvents {
    fn drop(&mut self) {
        for fd in self
            .consumers
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            // SAFETY: the library gave up ownership of this fd (into_raw_fd) and, the backend
            // being dropped, no epoll of the library uses it any more.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
}
