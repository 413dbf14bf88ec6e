//! Replaying the event store through a perspective: rebuilding a read model from scratch, or
//! resuming a replay from the perspective's checkpoint after a restart.
//!
//! Owns reading the event store in position order, page by page, applying the events of the
//! perspective's types one at a time (so each stream stays in order), and saving the checkpoint
//! after each page. It must not run while the same read model is being reset by its owner; it
//! does not clear the read model itself (the application decides what "from scratch" means for
//! its own tables) — it only chooses where to start. After each page it reports its
//! [`ReplayProgress`] to the caller's callback (the `operator` feature draws it as a progress
//! bar); it does not print anything itself.

use crate::error::{DispatchError, StartError};
use crate::handler::EventMeta;
use crate::read_model::{AppliedOnce, OneEvent};
use crate::registry::{PerspectiveRun, RegistryView};
use crate::store::Store;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Where a replay starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayFrom {
    /// Position 0: every stored event of the perspective's types.
    Scratch,
    /// After the perspective's checkpoint (position 0 when it has none).
    Checkpoint,
}

/// What a replay did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayReport {
    /// Events applied.
    pub applied: u64,
    /// The checkpoint saved at the end: the last position read.
    pub checkpoint: u64,
    /// Stopped by a [`ReplayStop`] before it read to the end: `checkpoint` is where a replay
    /// `from checkpoint` resumes.
    pub stopped: bool,
}

/// Asks a running replay to stop once the page it is applying is done and its checkpoint
/// saved (a SIGTERM handler sets it): nothing of a page is applied twice on resuming.
#[derive(Debug, Clone, Default)]
pub struct ReplayStop(Arc<AtomicBool>);

impl ReplayStop {
    /// A stop nobody has asked for yet.
    pub fn new() -> ReplayStop {
        ReplayStop::default()
    }

    /// Asks the replay to stop after its current page.
    pub fn stop(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// Whether a stop was asked for.
    pub fn is_stopped(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Why [`crate::RuntimeBuilder::replay`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The store could not be opened or a perspective not registered.
    #[error(transparent)]
    Start(#[from] StartError),
    /// The replay itself failed: no perspective of that name, a store error, or a perspective
    /// that failed on an event (the checkpoint stays at the last page applied whole).
    #[error(transparent)]
    Replay(#[from] DispatchError),
    /// Stopped by a signal after `applied` events, its checkpoint saved at `checkpoint`: a
    /// replay `--from checkpoint` resumes there.
    #[error(
        "stopped by a signal after {applied} events; checkpoint saved at position {checkpoint}: \
         run the replay again with --from checkpoint to resume"
    )]
    Stopped {
        /// The position the checkpoint was saved at.
        checkpoint: u64,
        /// Events applied before the stop.
        applied: u64,
    },
}

impl From<crate::config::ConfigError> for ReplayError {
    fn from(e: crate::config::ConfigError) -> Self {
        ReplayError::Start(e.into())
    }
}

/// How far a replay has come: reported once before the first page and after every page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayProgress {
    /// The position the replay started after (0 from scratch, the checkpoint otherwise).
    pub start: u64,
    /// The last position read so far (`start` before the first page).
    pub position: u64,
    /// The event store's last position when the replay started, raised to `position` when
    /// events stored since are read too: `end - start` positions is the work to do.
    pub end: u64,
    /// Events applied to the perspective so far (events of its types only).
    pub applied: u64,
    /// Whether the replay has read to the end and saved its checkpoint (the last report).
    pub done: bool,
}

impl ReplayProgress {
    /// Positions read so far.
    pub fn read(&self) -> u64 {
        self.position.saturating_sub(self.start)
    }

    /// Positions to read in all, as far as is known now.
    pub fn total(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }
}

/// Replays the event store through every registration named `perspective`, `page_size` events
/// per read, calling `progress` before the first page and after each one, until the end or
/// until `stop` is asked for (checked between pages).
pub(crate) async fn replay(
    store: &Arc<dyn Store>,
    registry: &RegistryView,
    perspective: &str,
    from: ReplayFrom,
    page_size: u32,
    progress: &mut (dyn FnMut(&ReplayProgress) + Send),
    stop: &ReplayStop,
) -> Result<ReplayReport, DispatchError> {
    let table = registry.current();
    let targets = table.perspectives_named(perspective);
    if targets.is_empty() {
        return Err(DispatchError::HandlerNotFound {
            message_type: format!("perspective {perspective}"),
        });
    }
    let mut position = match from {
        ReplayFrom::Scratch => 0,
        ReplayFrom::Checkpoint => store.load_checkpoint(perspective).await?.unwrap_or(0),
    };
    let mut report = ReplayProgress {
        start: position,
        position,
        end: store.last_position().await?.max(position),
        applied: 0,
        done: false,
    };
    progress(&report);
    let mut applied = 0;
    loop {
        if stop.is_stopped() {
            return Ok(ReplayReport {
                applied,
                checkpoint: position,
                stopped: true,
            });
        }
        let page = store.read_all(position, page_size.max(1)).await?;
        let Some(last) = page.last().map(|e| e.position) else {
            break;
        };
        for event in page {
            for (event_type, run) in &targets {
                if *event_type != event.envelope.message_type {
                    continue;
                }
                let message_id = event.envelope.message_id;
                let meta =
                    EventMeta::of(&event.envelope, Some(event.version), Some(event.position));
                let failed = |error: String| DispatchError::PerspectiveFailed { message_id, error };
                match run {
                    PerspectiveRun::Plain(handle) => handle
                        .apply(&event.envelope, meta)
                        .await
                        .map_err(|e| failed(e.to_string()))?,
                    // A rebuild: applied whatever was recorded, and recorded again.
                    PerspectiveRun::Once { handle, .. } => {
                        let one = OneEvent {
                            handle,
                            envelope: &event.envelope,
                            meta,
                            failure: Default::default(),
                        };
                        let outcome = store
                            .apply_once(perspective, message_id, true, &one)
                            .await?;
                        if outcome == AppliedOnce::Refused {
                            let why = one.failure.into_inner().unwrap_or_else(|p| p.into_inner());
                            return Err(failed(why.map(|e| e.to_string()).unwrap_or_default()));
                        }
                    }
                }
                applied += 1;
            }
        }
        position = last;
        store.save_checkpoint(perspective, position).await?;
        report.position = position;
        report.end = report.end.max(position);
        report.applied = applied;
        progress(&report);
    }
    report.done = true;
    progress(&report);
    Ok(ReplayReport {
        applied,
        checkpoint: position,
        stopped: false,
    })
}
