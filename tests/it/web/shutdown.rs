//! SIGTERM with requests in flight, over real HTTP: the requests in flight finish with their real
//! answer (`201`), new connections are refused, then the runtime stops (`serve_until` returns).

use super::harness::{Slow, call, client, order_json, orders_config};
use crate::orders::api;
use crate::orders::{CreateOrder, OrderCreated, OrderSummaries};
use crate::support::{DEADLINE, wait_until};
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use whizbang::{Consistency, Runtime, StopSignal};

#[actix::test]
async fn sigterm_finishes_the_requests_in_flight_then_stops() -> anyhow::Result<()> {
    let entered = Arc::new(AtomicUsize::new(0));
    let summaries = OrderSummaries::memory();
    let runtime = Runtime::builder(orders_config())
        .receptor::<CreateOrder, _>(Slow {
            delay: Duration::from_millis(1_500),
            entered: entered.clone(),
        })
        .read_model::<OrderCreated, _>("order-summary", summaries.clone(), Consistency::Async)
        .start()
        .await?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let server = api::server(listener, &runtime, summaries.clone(), 2, DEADLINE)?;
    // The signal listener is made once the requests are in flight (below), so a SIGTERM another
    // case of this process sends earlier cannot stop this server before its requests start.
    let (give_signal, signal) = tokio::sync::oneshot::channel::<StopSignal>();
    let serving = actix::spawn(api::serve_until(server, runtime, async move {
        if let Ok(mut stop) = signal.await {
            stop.recv().await;
        }
    }));

    let client = client();
    let in_flight: Vec<_> = (0..3)
        .map(|i| {
            let request = client
                .post(format!("http://{addr}/orders"))
                .insert_header(("Content-Type", "application/json"));
            actix::spawn(call(request, Some(order_json(&format!("S-{i}")))))
        })
        .collect();
    wait_until("three requests in the receptor", || {
        entered.load(Ordering::SeqCst) == 3
    })
    .await?;

    let stop = StopSignal::new()?;
    give_signal
        .send(stop)
        .map_err(|_| anyhow::anyhow!("the server stopped early"))?;
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &std::process::id().to_string()])
        .status()?;
    anyhow::ensure!(sent.success(), "kill -TERM failed: {sent}");

    // New connections are refused while the requests in flight are still running.
    let started = Instant::now();
    loop {
        match tokio::net::TcpStream::connect(addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
            _ if started.elapsed() > DEADLINE => anyhow::bail!("still accepting after SIGTERM"),
            _ => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
    assert!(
        in_flight.iter().all(|r| !r.is_finished()),
        "the requests in flight were answered before the listener closed"
    );

    for (i, reply) in in_flight.into_iter().enumerate() {
        let reply = reply.await??;
        assert_eq!(reply.status, 201, "S-{i}: {}", reply.body);
        assert_eq!(reply.body["order_id"], format!("S-{i}"));
    }
    tokio::time::timeout(DEADLINE, serving).await???;
    assert_eq!(summaries.count().await?, 3);
    Ok(())
}
