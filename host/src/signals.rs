//! SIGTERM and SIGINT, caught from before the host serves anything.
//!
//! The handlers must be installed before the first listener opens: a
//! supervisor that sees the host answer and stops it at once would otherwise
//! kill it with the default action, and `destroy` would never run.

use tokio::signal::unix::{Signal, SignalKind, signal};

/// The signals that stop a host cleanly (drain, `destroy`, exit 0).
pub struct StopSignals {
    term: Signal,
    int: Signal,
}

impl StopSignals {
    /// Install the handlers. Call this before starting the host.
    pub fn install() -> std::io::Result<Self> {
        Ok(Self { term: signal(SignalKind::terminate())?, int: signal(SignalKind::interrupt())? })
    }

    /// Wait for the first stop signal; returns its name.
    pub async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}
