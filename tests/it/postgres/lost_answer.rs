//! A statement whose answer the store gave up on must not commit behind the store's back. A
//! TCP proxy between the store and Postgres holds what the store sends (a hung server, a
//! half-open connection); the store times out and drops the connection, and the proxy keeps the
//! held work batch to deliver later, as a server that resumes reads it. The store's next call
//! ends that connection's server process first, so the held batch never runs.
//!
//! Without that, the held batch committed after the coordinator's recovery batch had already
//! given up the claims it never heard of: its rows stayed claimed for a writer that did not have
//! them, and the stream's next rows were published ahead of them (chaos run, hung Postgres).

use crate::support::pg::{self, drop_schemas, new_schema, on_postgres};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use uuid::Uuid;
use whizbang::envelope::{Envelope, MessageKind};
use whizbang::store::postgres::PostgresStore;
use whizbang::store::*;

/// Forwards connections to the test server; while `held`, what clients send is kept back, and
/// a client that goes away with bytes kept back leaves them to be sent on `release`.
#[derive(Clone)]
struct Proxy {
    held: Arc<AtomicBool>,
    release: Arc<Notify>,
}

impl Proxy {
    async fn start(upstream: String) -> (Proxy, u16) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let proxy = Proxy {
            held: Arc::new(AtomicBool::new(false)),
            release: Arc::new(Notify::new()),
        };
        let p = proxy.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    continue;
                };
                tokio::spawn(p.clone().pipe(client, server));
            }
        });
        (proxy, port)
    }

    async fn pipe(self, client: TcpStream, server: TcpStream) {
        let (mut client_rx, mut client_tx) = client.into_split();
        let (mut server_rx, mut server_tx) = server.into_split();
        let down = tokio::spawn(async move {
            let _ = tokio::io::copy(&mut server_rx, &mut client_tx).await;
        });
        let mut kept = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            tokio::select! {
                read = client_rx.read(&mut buf) => {
                    let n = read.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    if self.held.load(Ordering::SeqCst) {
                        kept.extend_from_slice(&buf[..n]);
                        continue;
                    }
                    if server_tx.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                // What was kept back reaches the server late, as a hung server reads it when
                // it resumes (the client may have given up on it long before).
                () = self.release.notified(), if !kept.is_empty() => {
                    if server_tx.write_all(&std::mem::take(&mut kept)).await.is_err() {
                        break;
                    }
                }
            }
        }
        down.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_whose_answer_was_lost_never_commits_after_the_store_moved_on() {
    let _pg = pg::slot().await;
    let schema = new_schema();
    let (proxy, port) = Proxy::start("127.0.0.1:5432".into()).await;
    let mut c = on_postgres(whizbang::Config::default(), &schema);
    c.store.database_url = format!("postgres://postgres@127.0.0.1:{port}/postgres").into();
    c.store.statement_timeout_ms = 1_000;
    c.store.startup_timeout_ms = 10_000;
    c.store.pool_size = 2;
    c.service.name = "lost-answer".into();
    let store: Arc<dyn Store> = Arc::new(PostgresStore::connect(&c).await.expect("connects"));
    let a = Uuid::now_v7();
    store
        .register_instance(a, "lost-answer", "a")
        .await
        .unwrap();
    let event = Envelope::new(MessageKind::Event, "Tick", "lost-1".to_string(), vec![1]);
    let unit = UnitOfWork {
        events: vec![event.clone()],
        outbox: vec![NewOutboxRow {
            envelope: event.clone(),
            topic: "t".into(),
            partition: 0,
        }],
        claim_for_writer: true,
        ..UnitOfWork::default()
    };

    // The server "hangs": the batch goes unanswered and the store gives up on it.
    proxy.held.store(true, Ordering::SeqCst);
    let asked = Instant::now();
    let lost = store
        .process_work_batch(
            a,
            WorkBatch {
                units: vec![unit],
                ..WorkBatch::default()
            },
        )
        .await;
    assert!(
        matches!(&lost, Err(StoreError::Unavailable { message, .. }) if message.contains("no answer")),
        "{lost:?}"
    );
    assert!(asked.elapsed() < Duration::from_secs(5));

    // It "resumes": the store's next call (the coordinator's recovery batch) goes through...
    proxy.held.store(false, Ordering::SeqCst);
    let recovery = store
        .process_work_batch(
            a,
            WorkBatch {
                in_flight: Some(InFlight::default()),
                claim: Some(ClaimBudget {
                    outbox: 10,
                    inbox: 10,
                }),
                ..WorkBatch::default()
            },
        )
        .await
        .expect("the recovery batch");
    assert!(recovery.claimed_outbox.is_empty());
    // ...and only then does the server read the batch the store gave up on.
    proxy.release.notify_one();
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        let stored = store.read_stream("lost-1", 0).await.unwrap();
        assert!(
            stored.is_empty(),
            "the batch the store gave up on committed after the store moved on"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(store);
    drop_schemas(&[&schema]).await.unwrap();
}
