//! Replaying the event store through a perspective: rebuilding a read model from scratch, or
//! resuming a replay from the perspective's checkpoint after a restart.
//!
//! Owns reading the event store in position order, page by page, applying the events of the
//! perspective's types one at a time (so each stream stays in order), and saving the checkpoint
//! after each page. It must not run while the same read model is being reset by its owner; it
//! does not clear the read model itself (the application decides what "from scratch" means for
//! its own tables) — it only chooses where to start.

use crate::error::DispatchError;
use crate::registry::RegistryView;
use crate::store::Store;
use std::sync::Arc;

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
}

/// Replays the event store through every registration named `perspective`.
pub(crate) async fn replay(
    store: &Arc<dyn Store>,
    registry: &RegistryView,
    perspective: &str,
    from: ReplayFrom,
    page_size: u32,
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
    let mut applied = 0;
    loop {
        let page = store.read_all(position, page_size.max(1)).await?;
        let Some(last) = page.last().map(|e| e.position) else {
            break;
        };
        for event in page {
            for (event_type, handle) in &targets {
                if *event_type != event.envelope.message_type {
                    continue;
                }
                let message_id = event.envelope.message_id;
                handle.apply(&event.envelope).await.map_err(|e| {
                    DispatchError::PerspectiveFailed {
                        message_id,
                        error: e.to_string(),
                    }
                })?;
                applied += 1;
            }
        }
        position = last;
        store.save_checkpoint(perspective, position).await?;
    }
    Ok(ReplayReport {
        applied,
        checkpoint: position,
    })
}
