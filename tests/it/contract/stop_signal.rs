//! `StopSignal`: a SIGTERM sent to the process (what an orchestrator sends) is received, and
//! does not kill the process once the listener exists.

use std::time::Duration;
use whizbang::StopSignal;

#[actix::test]
async fn sigterm_is_received_by_the_stop_signal() -> anyhow::Result<()> {
    let mut stop = StopSignal::new()?;
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &std::process::id().to_string()])
        .status()?;
    anyhow::ensure!(sent.success(), "kill -TERM failed: {sent}");
    tokio::time::timeout(Duration::from_secs(10), stop.recv())
        .await
        .map_err(|_| anyhow::anyhow!("SIGTERM was not received within 10 s"))?;
    Ok(())
}
