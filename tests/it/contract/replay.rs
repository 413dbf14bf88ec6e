//! Rebuilding a perspective from the event store, and resuming from its checkpoint, on the
//! memory store and on Postgres.

use crate::support::pg;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};
use whizbang::config::StoreBackend;
use whizbang::replay::ReplayFrom;
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
    c.store.database_url = pg::database_url();
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
