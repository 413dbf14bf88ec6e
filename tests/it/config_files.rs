//! Contract 8 for configuration files: a bad file gets an error that names the key and the
//! file, nothing starts; the shipped `config/whizbang.toml` loads and matches the defaults; the
//! example refuses a bad file with a non-zero exit.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use whizbang::Config;
use whizbang::config::{ConfigError, FlushStrategy, StoreBackend, TransportKind};

/// A file in the temp directory, removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, text: &str) -> TempFile {
        let path = std::env::temp_dir().join(format!(
            "whizbang-{}-{}-{name}",
            std::process::id(),
            uuid::Uuid::now_v7().simple()
        ));
        std::fs::write(&path, text).expect("temp file written");
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Loads `text` from a file and expects an error about `key`.
fn expect_error(text: &str, key: &str) -> anyhow::Result<ConfigError> {
    let file = TempFile::new("bad.toml", text);
    let e = match Config::load(&file.0) {
        Ok(_) => anyhow::bail!("loaded a config that should fail on {key}:\n{text}"),
        Err(e) => e,
    };
    anyhow::ensure!(e.key() == Some(key), "key {:?} for {text:?}: {e}", e.key());
    let message = e.to_string();
    anyhow::ensure!(
        message.contains(&file.0.display().to_string()),
        "the message does not name the file: {message}"
    );
    anyhow::ensure!(
        message.contains(key),
        "the message does not name the key: {message}"
    );
    Ok(e)
}

#[test]
fn an_unknown_key_is_named() -> anyhow::Result<()> {
    expect_error(
        "[coordinator]\nflush_intervall_ms = 5\n",
        "coordinator.flush_intervall_ms",
    )?;
    expect_error(
        "[partitions]\npartition_count = 16\n[partitons]\nlease_seconds = 30\n",
        "partitons",
    )?;
    expect_error("colour = \"blue\"\n", "colour")?;
    Ok(())
}

#[test]
fn a_wrong_type_is_named() -> anyhow::Result<()> {
    expect_error("[transport]\nprefetch = \"lots\"\n", "transport.prefetch")?;
    expect_error("[store]\nmax_attempts = 2.5\n", "store.max_attempts")?;
    expect_error(
        "[coordinator]\nflush_strategy = \"whenever\"\n",
        "coordinator.flush_strategy",
    )?;
    expect_error(
        "[partitions]\npartition_count = -1\n",
        "partitions.partition_count",
    )?;
    Ok(())
}

#[test]
fn an_out_of_range_value_is_named() -> anyhow::Result<()> {
    expect_error(
        "[partitions]\npartition_count = 0\n",
        "partitions.partition_count",
    )?;
    expect_error(
        "[partitions]\nlease_seconds = 10\nheartbeat_seconds = 10\n",
        "partitions.lease_seconds",
    )?;
    expect_error(
        "[partitions]\nlease_seconds = 5\nheartbeat_seconds = 10\n",
        "partitions.lease_seconds",
    )?;
    expect_error("[store]\nmax_attempts = 0\n", "store.max_attempts")?;
    expect_error(
        "[store]\nbackoff_base_ms = 500\nbackoff_max_ms = 100\n",
        "store.backoff_base_ms",
    )?;
    expect_error("[transport]\nprefetch = 0\n", "transport.prefetch")?;
    Ok(())
}

#[test]
fn a_missing_file_names_the_file() -> anyhow::Result<()> {
    let path = std::env::temp_dir().join(format!(
        "whizbang-missing-{}.toml",
        uuid::Uuid::now_v7().simple()
    ));
    let e = Config::load(&path)
        .err()
        .ok_or_else(|| anyhow::anyhow!("loaded a file that does not exist"))?;
    anyhow::ensure!(e.key().is_none(), "{e}");
    anyhow::ensure!(e.to_string().contains(&path.display().to_string()), "{e}");
    Ok(())
}

#[test]
fn a_good_file_loads() -> anyhow::Result<()> {
    let file = TempFile::new(
        "good.toml",
        "[partitions]\npartition_count = 64\nlease_seconds = 30\nheartbeat_seconds = 5\n\
         [coordinator]\nflush_strategy = \"interval\"\n\
         [routing]\ntopics = { A = \"a\" }\nsubscriptions = [{ topic = \"b\", name = \"me\" }]\n",
    );
    let c = Config::load(&file.0)?;
    anyhow::ensure!(c.partitions.partition_count == 64);
    anyhow::ensure!(c.partitions.lease_seconds == 30 && c.partitions.heartbeat_seconds == 5);
    anyhow::ensure!(c.coordinator.flush_strategy == FlushStrategy::Interval);
    anyhow::ensure!(c.routing.topics.get("A").map(String::as_str) == Some("a"));
    anyhow::ensure!(c.routing.subscriptions.len() == 1 && c.routing.subscriptions[0].name == "me");
    // Everything not given is the default.
    anyhow::ensure!(c.partitions.max_partitions_per_instance == 100);
    anyhow::ensure!(c.store.backend == StoreBackend::Memory);
    Ok(())
}

fn shipped_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config/whizbang.toml")
}

#[test]
fn the_shipped_config_loads_and_matches_the_defaults() -> anyhow::Result<()> {
    let c = Config::load(shipped_config())?;
    let d = Config::default();
    // The figures the README and the design promise.
    anyhow::ensure!(c.partitions.partition_count == 10_000);
    anyhow::ensure!(c.partitions.max_partitions_per_instance == 100);
    anyhow::ensure!(c.partitions.lease_seconds == 300);
    anyhow::ensure!(c.coordinator.flush_interval_ms == 100);
    // Every knob in the file is at its default (endpoints, names and routing excepted: the
    // environment may override the former, the example needs the latter).
    let knobs: [(&str, u64, u64); 21] = [
        (
            "store.pool_size",
            c.store.pool_size.into(),
            d.store.pool_size.into(),
        ),
        (
            "store.max_attempts",
            c.store.max_attempts.into(),
            d.store.max_attempts.into(),
        ),
        (
            "store.backoff_base_ms",
            c.store.backoff_base_ms,
            d.store.backoff_base_ms,
        ),
        (
            "store.backoff_max_ms",
            c.store.backoff_max_ms,
            d.store.backoff_max_ms,
        ),
        (
            "store.dedup_retention_hours",
            c.store.dedup_retention_hours,
            d.store.dedup_retention_hours,
        ),
        (
            "store.connect_timeout_ms",
            c.store.connect_timeout_ms,
            d.store.connect_timeout_ms,
        ),
        (
            "partitions.partition_count",
            c.partitions.partition_count.into(),
            d.partitions.partition_count.into(),
        ),
        (
            "partitions.max_partitions_per_instance",
            c.partitions.max_partitions_per_instance.into(),
            d.partitions.max_partitions_per_instance.into(),
        ),
        (
            "partitions.lease_seconds",
            c.partitions.lease_seconds,
            d.partitions.lease_seconds,
        ),
        (
            "partitions.heartbeat_seconds",
            c.partitions.heartbeat_seconds,
            d.partitions.heartbeat_seconds,
        ),
        (
            "coordinator.flush_interval_ms",
            c.coordinator.flush_interval_ms,
            d.coordinator.flush_interval_ms,
        ),
        (
            "coordinator.poll_interval_ms",
            c.coordinator.poll_interval_ms,
            d.coordinator.poll_interval_ms,
        ),
        (
            "coordinator.claim_batch_size",
            c.coordinator.claim_batch_size.into(),
            d.coordinator.claim_batch_size.into(),
        ),
        (
            "coordinator.max_batch_size",
            c.coordinator.max_batch_size.into(),
            d.coordinator.max_batch_size.into(),
        ),
        (
            "coordinator.max_batches_in_flight",
            c.coordinator.max_batches_in_flight.into(),
            d.coordinator.max_batches_in_flight.into(),
        ),
        (
            "transport.publisher_window",
            c.transport.publisher_window.into(),
            d.transport.publisher_window.into(),
        ),
        (
            "transport.prefetch",
            c.transport.prefetch.into(),
            d.transport.prefetch.into(),
        ),
        (
            "transport.max_message_bytes",
            c.transport.max_message_bytes.into(),
            d.transport.max_message_bytes.into(),
        ),
        (
            "transport.send_timeout_ms",
            c.transport.send_timeout_ms,
            d.transport.send_timeout_ms,
        ),
        (
            "coordinator.flush_strategy",
            (c.coordinator.flush_strategy == FlushStrategy::Scoped).into(),
            (d.coordinator.flush_strategy == FlushStrategy::Scoped).into(),
        ),
        (
            "store.backend / transport.kind",
            (c.store.backend == StoreBackend::Memory && c.transport.kind == TransportKind::Memory)
                .into(),
            (d.store.backend == StoreBackend::Memory && d.transport.kind == TransportKind::Memory)
                .into(),
        ),
    ];
    let differ: Vec<String> = knobs
        .iter()
        .filter(|(_, file, default)| file != default)
        .map(|(k, file, default)| format!("{k}: file {file}, default {default}"))
        .collect();
    anyhow::ensure!(
        differ.is_empty(),
        "config/whizbang.toml differs: {differ:?}"
    );
    Ok(())
}

/// `cargo run --example order_service -- --config <bad file>` exits non-zero and says why.
/// Examples have no `CARGO_BIN_EXE_*`, so this goes through cargo (a no-op build when the
/// example is up to date, e.g. under `cargo test --all-targets`).
#[test]
fn the_example_refuses_a_bad_config_file() -> anyhow::Result<()> {
    let bad = TempFile::new("example.toml", "[partitions]\npartition_count = 0\n");
    // Output goes to files, not pipes: a full pipe would block the child while we poll it.
    let out = TempFile::new("example.out", "");
    let err = TempFile::new("example.err", "");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut child = Command::new(cargo)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "run",
            "--quiet",
            "--example",
            "order_service",
            "--",
            "--config",
        ])
        .arg(&bad.0)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out.0)?)
        .stderr(std::fs::File::create(&err.0)?)
        .spawn()?;
    // A build may be needed (or wait for the build lock): a generous deadline, polled.
    let deadline = Duration::from_secs(600);
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            anyhow::bail!("cargo run --example order_service did not finish in {deadline:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = std::fs::read_to_string(&err.0)?;
    anyhow::ensure!(
        !status.success(),
        "the example accepted a bad config: {stderr}"
    );
    anyhow::ensure!(
        !stderr.contains("could not compile"),
        "the example did not build: {stderr}"
    );
    anyhow::ensure!(
        stderr.contains("partitions.partition_count"),
        "the error does not name the key: {stderr}"
    );
    anyhow::ensure!(
        stderr.contains(&bad.0.display().to_string()),
        "the error does not name the file: {stderr}"
    );
    Ok(())
}
