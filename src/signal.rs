//! The process being asked to stop: SIGTERM (what an orchestrator such as Kubernetes or systemd
//! sends) or Ctrl-C (SIGINT).
//!
//! Owns listening for those signals. It must not stop anything itself: the service decides what
//! to do (stop taking work, then [`crate::Runtime::shutdown`]).

/// Listens for SIGTERM and Ctrl-C from the moment it is made, so a signal that arrives before
/// [`StopSignal::recv`] is awaited is not lost (and does not kill the process).
///
/// ```no_run
/// # async fn serve(runtime: whizbang::Runtime) -> Result<(), Box<dyn std::error::Error>> {
/// let mut stop = whizbang::StopSignal::new()?;
/// stop.recv().await;
/// runtime.shutdown().await?;
/// # Ok(())
/// # }
/// ```
pub struct StopSignal {
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
}

impl StopSignal {
    /// Starts listening; must be called inside a Tokio (actix) runtime.
    pub fn new() -> std::io::Result<StopSignal> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(StopSignal {
                terminate: signal(SignalKind::terminate())?,
                interrupt: signal(SignalKind::interrupt())?,
            })
        }
        #[cfg(not(unix))]
        {
            Ok(StopSignal {})
        }
    }

    /// Waits for the next SIGTERM or Ctrl-C.
    pub async fn recv(&mut self) {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.terminate.recv() => {}
                _ = self.interrupt.recv() => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
