//! Exactly-once read models (`whizbang::ReadModel`) on the in-memory store, where their effects
//! are staged (`ReadModelTx::on_commit`) and run with the record of their progress: `EventMeta`
//! carries the event's version and position; an async read model shows each event once, also
//! when the event is delivered again; a failing inline read model rolls back its command alone,
//! while ordinary commands committed in the coordinator's batches beside it go through. The
//! Postgres side is `postgres::read_models`.

use crate::support::*;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};
use whizbang::{
    Command, Consistency, Decision, DispatchError, EventMeta, Message, PerspectiveError, ReadModel,
    ReadModelTx, Receptor, ReceptorContext, ReceptorError, Runtime,
};

/// What the read model holds: (stream, seq, version, position) per event applied.
type Rows = Arc<Mutex<Vec<(String, u32, Option<u64>, Option<u64>)>>>;

/// Stages one row per event; refuses the event whose seq is `refuse`.
#[derive(Clone, Default)]
struct Staged {
    rows: Rows,
    refuse: Option<u32>,
}

impl ReadModel<Bumped> for Staged {
    async fn apply(
        &self,
        event: Bumped,
        meta: EventMeta,
        tx: &mut ReadModelTx<'_>,
    ) -> Result<(), PerspectiveError> {
        if Some(event.seq) == self.refuse {
            return Err(PerspectiveError(format!("seq {} is refused", event.seq)));
        }
        let rows = self.rows.clone();
        tx.on_commit(move || {
            rows.lock()
                .unwrap()
                .push((meta.stream_id, event.seq, meta.version, meta.position));
        });
        Ok(())
    }
}

/// An ordinary command beside the inline ones: its event has no read model, so its unit goes
/// through the coordinator's group commit.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Note {
    stream: String,
}
impl Message for Note {
    const TYPE_NAME: &'static str = "test.rm.Note";
    fn stream_id(&self) -> String {
        self.stream.clone()
    }
}
impl Command for Note {}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Noted {
    stream: String,
}
impl Message for Noted {
    const TYPE_NAME: &'static str = "test.rm.Noted";
    fn stream_id(&self) -> String {
        self.stream.clone()
    }
}
impl whizbang::Event for Noted {}

struct NoteReceptor;
impl Receptor<Note> for NoteReceptor {
    type Result = Noted;
    async fn handle(&self, c: Note, _: ReceptorContext) -> Result<Decision<Noted>, ReceptorError> {
        Ok(Decision::event(Noted { stream: c.stream }))
    }
}

#[actix::test]
async fn an_async_read_model_shows_each_event_once_with_its_version_and_position()
-> anyhow::Result<()> {
    let bus = whizbang::transport::memory::MemoryBus::new();
    let model = Staged::default();
    let rt = on_bus(
        subscribed(config(&unique("rm-async")), "rm-topic", "rm-sub"),
        &bus,
    )
    .receptor::<Bump, _>(BumpReceptor)
    .read_model::<Bumped, _>("rows", model.clone(), Consistency::Async)
    .start()
    .await?;
    let stream = unique("rm");
    for seq in 1..=5u32 {
        let _: Bumped = rt
            .local_invoke(Bump {
                stream: stream.clone(),
                seq,
            })
            .await?;
        // Read-your-writes as for any perspective: the effect ran before local_invoke returned.
        let rows = model.rows.lock().unwrap().clone();
        anyhow::ensure!(rows.len() == seq as usize, "after #{seq}: {rows:?}");
    }
    let rows = model.rows.lock().unwrap().clone();
    for (i, (_, seq, version, position)) in rows.iter().enumerate() {
        anyhow::ensure!(*seq == i as u32 + 1);
        anyhow::ensure!(
            *version == Some(*seq as u64) && *position == Some(*seq as u64),
            "event {seq}: version {version:?}, position {position:?}"
        );
    }
    // An event received from elsewhere, delivered twice: applied once, with no place in this
    // event store.
    let received = Bumped::new(unique("rm-received"), 1);
    let envelope = event_envelope(&received);
    bus.inject("rm-topic", envelope.clone());
    bus.inject("rm-topic", envelope);
    wait_until("the received event is applied", || {
        model.rows.lock().unwrap().len() == 6
    })
    .await?;
    rt.shutdown().await?;
    let rows = model.rows.lock().unwrap().clone();
    anyhow::ensure!(rows.len() == 6, "{rows:?}");
    anyhow::ensure!(
        rows[5] == (received.stream.clone(), 1, None, None),
        "{:?}",
        rows[5]
    );
    Ok(())
}

#[actix::test]
async fn a_failing_inline_read_model_rolls_back_its_command_alone() -> anyhow::Result<()> {
    const POISON: u32 = 7;
    let model = Staged {
        refuse: Some(POISON),
        ..Staged::default()
    };
    let notes = Recorder::new();
    let rt = Runtime::builder(config(&unique("rm-inline")))
        .receptor::<Bump, _>(BumpReceptor)
        .receptor::<Note, _>(NoteReceptor)
        .read_model::<Bumped, _>("rows", model.clone(), Consistency::Inline)
        .perspective::<Noted, _>("notes", NotedSeen(notes.clone()))
        .start()
        .await?;
    let bumps: Vec<Bump> = (1..=12u32)
        .map(|seq| Bump {
            stream: format!("rm-inline-{}", seq % 3),
            seq,
        })
        .collect();
    let note_streams: Vec<String> = (0..12).map(|i| format!("rm-note-{i}")).collect();
    let (bumped, noted) = futures::future::join(
        futures::future::join_all(
            bumps
                .iter()
                .map(|b| rt.local_invoke::<Bump, Bumped>(b.clone())),
        ),
        futures::future::join_all(
            note_streams
                .iter()
                .map(|s| rt.local_invoke::<Note, Noted>(Note { stream: s.clone() })),
        ),
    )
    .await;
    for (b, answer) in bumps.iter().zip(&bumped) {
        match (b.seq == POISON, answer) {
            (
                true,
                Err(DispatchError::InlineReadModelFailed {
                    read_model, error, ..
                }),
            ) => {
                anyhow::ensure!(read_model == "rows" && error.contains("refused"), "{error}")
            }
            (false, Ok(_)) => {}
            (_, other) => anyhow::bail!("seq {}: {other:?}", b.seq),
        }
    }
    for answer in &noted {
        anyhow::ensure!(answer.is_ok(), "an ordinary command beside it: {answer:?}");
    }
    anyhow::ensure!(notes.total() == note_streams.len());
    // Nothing of the poison command: no event in its stream at its place, no row.
    let poison_stream = format!("rm-inline-{}", POISON % 3);
    let stored = rt.store().read_stream(&poison_stream, 1).await?;
    let seqs: Vec<u32> = stored
        .iter()
        .map(|e| whizbang::message::decode::<Bumped>(&e.envelope.payload).map(|b| b.seq))
        .collect::<Result<_, _>>()?;
    anyhow::ensure!(!seqs.contains(&POISON), "{seqs:?}");
    let rows = model.rows.lock().unwrap().clone();
    anyhow::ensure!(rows.len() == 11, "{rows:?}");
    anyhow::ensure!(rows.iter().all(|r| r.1 != POISON));
    // Each applied once, with the version its stream gave it.
    for (stream, _, version, _) in &rows {
        let n = rows
            .iter()
            .filter(|r| &r.0 == stream && &r.2 == version)
            .count();
        anyhow::ensure!(
            n == 1 && version.is_some(),
            "{stream} {version:?}: {rows:?}"
        );
    }
    rt.shutdown().await?;
    Ok(())
}

/// Records `Noted` events (the recorder logs sequence numbers; a note counts as 1).
#[derive(Clone)]
struct NotedSeen(Recorder);

impl whizbang::Perspective<Noted> for NotedSeen {
    async fn apply(&self, e: Noted, meta: EventMeta) -> Result<(), PerspectiveError> {
        self.0.apply(Bumped::new(e.stream, 1), meta).await
    }
}
