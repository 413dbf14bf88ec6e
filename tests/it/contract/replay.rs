//! Rebuilding a perspective from the event store, and resuming from its checkpoint, on the
//! memory store and on Postgres; and the `replay` operator command a service embeds, with its
//! progress.

use crate::support::pg;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};
use whizbang::config::StoreBackend;
use whizbang::replay::{ReplayFrom, ReplayReport, ReplayStop};
use whizbang::{
    Command, Config, Decision, Event, EventMeta, Message, Perspective, PerspectiveError, Receptor,
    ReceptorContext, ReceptorError, Runtime,
};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Add {
    stream: String,
    n: u32,
}
impl Message for Add {
    const TYPE_NAME: &'static str = "ReplayAdd";
    fn stream_id(&self) -> String {
        self.stream.clone()
    }
}
impl Command for Add {}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Added {
    stream: String,
    n: u32,
}
impl Message for Added {
    const TYPE_NAME: &'static str = "ReplayAdded";
    fn stream_id(&self) -> String {
        self.stream.clone()
    }
}
impl Event for Added {}

struct AddReceptor;
impl Receptor<Add> for AddReceptor {
    type Result = Added;
    async fn handle(
        &self,
        c: Add,
        _ctx: ReceptorContext,
    ) -> Result<Decision<Added>, ReceptorError> {
        Ok(Decision::event(Added {
            stream: c.stream,
            n: c.n,
        }))
    }
}

#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<(String, u32)>>>);
impl Perspective<Added> for Log {
    async fn apply(&self, e: Added, _m: EventMeta) -> Result<(), PerspectiveError> {
        self.0.lock().unwrap().push((e.stream, e.n));
        Ok(())
    }
}

fn config(backend: StoreBackend) -> Config {
    let mut c = Config::default();
    c.service.name = "replay-test".into();
    c.store.backend = backend;
    c.store.database_url = pg::database_url().into();
    c.store.schema = pg::new_schema();
    c.store.startup_timeout_ms = 5_000;
    c
}

async fn rebuild_and_resume(backend: StoreBackend) {
    let log = Log::default();
    let config = config(backend);
    let schema = config.store.schema.clone();
    let rt = Runtime::builder(config)
        .receptor::<Add, _>(AddReceptor)
        .perspective::<Added, _>("log", log.clone())
        .start()
        .await
        .expect("runtime starts");
    for n in 0..30 {
        let _: Added = rt
            .local_invoke(Add {
                stream: format!("s{}", n % 3),
                n,
            })
            .await
            .unwrap();
    }
    let live = log.0.lock().unwrap().clone();
    assert_eq!(live.len(), 30);
    assert_eq!(rt.store().last_position().await.unwrap(), 30);

    // Rebuild from scratch into an emptied read model: the same events, in the same order.
    log.0.lock().unwrap().clear();
    let report = rt
        .replay_perspective("log", ReplayFrom::Scratch)
        .await
        .unwrap();
    assert_eq!(report.applied, 30);
    assert_eq!(report.checkpoint, 30);
    assert_eq!(*log.0.lock().unwrap(), live);

    // Resume: only what was stored after the checkpoint.
    for n in 30..35 {
        let _: Added = rt
            .local_invoke(Add {
                stream: "s9".into(),
                n,
            })
            .await
            .unwrap();
    }
    log.0.lock().unwrap().clear();
    let report = rt
        .replay_perspective("log", ReplayFrom::Checkpoint)
        .await
        .unwrap();
    assert_eq!(report.applied, 5);
    assert_eq!(report.checkpoint, 35);
    let resumed: Vec<u32> = log.0.lock().unwrap().iter().map(|(_, n)| *n).collect();
    assert_eq!(resumed, (30..35).collect::<Vec<_>>());
    assert!(
        rt.replay_perspective("nope", ReplayFrom::Scratch)
            .await
            .is_err()
    );
    rt.shutdown().await.unwrap();
    if backend == StoreBackend::Postgres {
        pg::drop_schemas(&[&schema])
            .await
            .expect("the test's schema is dropped");
    }
}

#[actix_rt::test]
async fn memory_rebuild_and_resume() {
    rebuild_and_resume(StoreBackend::Memory).await;
}

#[actix_rt::test]
async fn postgres_rebuild_and_resume() {
    let _pg = pg::slot().await;
    rebuild_and_resume(StoreBackend::Postgres).await;
}

/// A replay asked to stop (as the `replay` command is on SIGTERM) stops after the page it is
/// applying, its checkpoint saved; resumed from the checkpoint it applies the rest, nothing
/// twice.
#[actix_rt::test]
async fn a_stopped_replay_keeps_its_checkpoint_and_resumes_without_repeats() {
    let _pg = pg::slot().await;
    let config = config(StoreBackend::Postgres);
    let schema = config.store.schema.clone();
    let rt = Runtime::builder(config.clone())
        .receptor::<Add, _>(AddReceptor)
        .perspective::<Added, _>("log", Log::default())
        .start()
        .await
        .expect("runtime starts");
    for n in 0..25 {
        let _: Added = rt
            .local_invoke(Add {
                stream: format!("s{}", n % 3),
                n,
            })
            .await
            .unwrap();
    }
    rt.shutdown().await.unwrap();

    let rebuilt = Log::default();
    let stop = ReplayStop::new();
    let asked = stop.clone();
    let report = Runtime::builder(config.clone())
        .perspective::<Added, _>("log", rebuilt.clone())
        .replay_until(
            "log",
            ReplayFrom::Scratch,
            10,
            &mut |p| {
                if p.applied >= 10 {
                    asked.stop();
                }
            },
            &stop,
        )
        .await
        .expect("the replay runs");
    assert_eq!(
        report,
        ReplayReport {
            applied: 10,
            checkpoint: 10,
            stopped: true
        }
    );
    let report = Runtime::builder(config)
        .perspective::<Added, _>("log", rebuilt.clone())
        .replay("log", ReplayFrom::Checkpoint, 10, &mut |_| {})
        .await
        .expect("the replay resumes");
    assert_eq!((report.applied, report.checkpoint), (15, 25));
    assert!(!report.stopped);
    let applied: Vec<u32> = rebuilt.0.lock().unwrap().iter().map(|(_, n)| *n).collect();
    assert_eq!(
        applied,
        (0..25).collect::<Vec<_>>(),
        "each event once, in order"
    );
    pg::drop_schemas(&[&schema])
        .await
        .expect("the test's schema is dropped");
}

/// `replay` as a service embeds it (`whizbang::operator`): parsed from a command line,
/// run on a builder with the perspective registered (the service itself not started), it
/// rebuilds the read model and reports its progress as plain lines, then resumes from its
/// checkpoint with nothing left to apply.
#[actix_rt::test]
async fn operator_replay_rebuilds_with_progress_lines() {
    use clap::Parser;
    use whizbang::operator::OperatorCommand;

    #[derive(Parser)]
    struct Service {
        #[command(subcommand)]
        command: OperatorCommand,
    }

    let _pg = pg::slot().await;
    let config = config(StoreBackend::Postgres);
    let schema = config.store.schema.clone();
    let live = Log::default();
    let rt = Runtime::builder(config.clone())
        .receptor::<Add, _>(AddReceptor)
        .perspective::<Added, _>("log", live.clone())
        .start()
        .await
        .expect("runtime starts");
    for n in 0..25 {
        let _: Added = rt
            .local_invoke(Add {
                stream: format!("s{}", n % 4),
                n,
            })
            .await
            .unwrap();
    }
    rt.shutdown().await.unwrap();

    let replay = |from: &str| {
        Service::try_parse_from([
            "my-service",
            "replay",
            "log",
            "--from",
            from,
            "--page-size",
            "10",
            "--progress",
            "lines",
            "--progress-interval",
            "0",
        ])
        .expect("the command line parses")
        .command
    };
    let rebuilt = Log::default();
    let (mut progress, mut summary) = (Vec::new(), Vec::new());
    let report = replay("scratch")
        .run_with(
            Runtime::builder(config.clone()).perspective::<Added, _>("log", rebuilt.clone()),
            &mut progress,
            &mut summary,
        )
        .await
        .expect("the replay runs");
    assert_eq!((report.applied, report.checkpoint), (25, 25));
    assert_eq!(*rebuilt.0.lock().unwrap(), *live.0.lock().unwrap());
    let progress = String::from_utf8(progress).unwrap();
    let lines: Vec<&str> = progress.lines().collect();
    let expected = [
        "replay log: 0/25 events read (0%), 0 applied",
        "replay log: 10/25 events read (40%), 10 applied",
        "replay log: 20/25 events read (80%), 20 applied",
        "replay log: 25/25 events read (100%), 25 applied",
        "replay log: done, 25 events read, 25 applied in ",
    ];
    assert_eq!(lines.len(), expected.len(), "{progress}");
    for (line, start) in lines.iter().zip(expected) {
        assert!(
            line.starts_with(start),
            "{line:?} starts with {start:?}\n{progress}"
        );
    }
    assert!(lines[1].contains("events/s, ETA "), "{progress}");
    assert!(lines[4].ends_with("checkpoint 25"), "{progress}");
    assert_eq!(
        String::from_utf8(summary).unwrap(),
        "replayed perspective log from scratch: 25 events applied, checkpoint at position 25\n"
    );

    // From the checkpoint: nothing new, nothing applied.
    let resumed = Log::default();
    let (mut progress, mut summary) = (Vec::new(), Vec::new());
    let report = replay("checkpoint")
        .run_with(
            Runtime::builder(config.clone()).perspective::<Added, _>("log", resumed.clone()),
            &mut progress,
            &mut summary,
        )
        .await
        .expect("the resume runs");
    assert_eq!((report.applied, report.checkpoint), (0, 25));
    assert!(resumed.0.lock().unwrap().is_empty());
    let progress = String::from_utf8(progress).unwrap();
    assert!(
        progress.starts_with("replay log: 0/0 events read (100%)")
            && progress.contains("replay log: done, 0 events read, 0 applied"),
        "{progress}"
    );

    // A perspective the service does not have is an error, not an empty success.
    let err = replay("scratch")
        .run_with(
            Runtime::builder(config).perspective::<Added, _>("other", Log::default()),
            &mut Vec::new(),
            &mut Vec::new(),
        )
        .await
        .expect_err("no perspective named log");
    assert!(err.to_string().contains("perspective log"), "{err}");
    pg::drop_schemas(&[&schema])
        .await
        .expect("the test's schema is dropped");
}
