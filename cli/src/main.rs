//! `whizbang`: the operator's command line for a service's Postgres store.
//!
//! ```text
//! whizbang [--config PATH] migrate                          apply the embedded schema (baseline, functions)
//! whizbang [--config PATH] dead-letters list                show parked messages
//! whizbang [--config PATH] dead-letters requeue MESSAGE_ID  retry one (attempts reset)
//! whizbang [--config PATH] dead-letters skip MESSAGE_ID     drop one; its stream moves on
//! ```
//!
//! The configuration is the service's own TOML file (default `config/whizbang.toml`), with the
//! usual environment overrides (`WHIZBANG_DATABASE_URL`, `WHIZBANG_SCHEMA`, ...). Only the
//! `postgres` store backend has anything durable to operate on: with `store.backend = "memory"`
//! every command refuses. The database password is never printed.
//!
//! Exit codes: 0 done, 1 the operation failed (database unreachable, no such dead letter, a
//! changed migration file), 2 bad usage or an unusable configuration.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use uuid::Uuid;
use whizbang::Config;
use whizbang::config::{StoreBackend, redact};
use whizbang::store::postgres::PostgresStore;
use whizbang::store::postgres::migrate;
use whizbang::store::{DeadLetter, Store, StoreError};

#[derive(Parser)]
#[command(
    name = "whizbang",
    version,
    about = "Operate a whizbang service's Postgres store: migrations and dead letters"
)]
struct Cli {
    /// The service's configuration file (environment overrides apply).
    #[arg(long, global = true, default_value = "config/whizbang.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Applies the pending schema migrations (under an advisory lock; safe to run while
    /// instances start).
    Migrate,
    /// Messages parked after `store.max_attempts`; their streams wait behind them.
    #[command(subcommand)]
    DeadLetters(DeadLetters),
}

#[derive(Subcommand)]
enum DeadLetters {
    /// Lists every dead-lettered outbox and inbox row.
    List,
    /// Puts a dead letter back as pending with its attempts reset.
    Requeue {
        /// The message id (a UUID).
        message_id: Uuid,
    },
    /// Drops a dead letter so the rest of its stream is processed.
    Skip {
        /// The message id (a UUID).
        message_id: Uuid,
    },
}

/// What went wrong, and so which exit code.
enum Failure {
    /// Exit 2: the configuration cannot be used for this.
    Usage(String),
    /// Exit 1: the operation itself failed.
    Runtime(String),
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        Failure::Runtime(e.to_string())
    }
}

whizbang::use_mimalloc!();

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    // Usage errors exit with 2, --help and --version with 0 (clap's convention).
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
        Err(Failure::Runtime(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(1)
        }
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let config = Config::load(&cli.config).map_err(|e| Failure::Usage(e.to_string()))?;
    if config.store.backend == StoreBackend::Memory {
        return Err(Failure::Usage(format!(
            "{}: store.backend is \"memory\": nothing durable to operate on \
             (set store.backend = \"postgres\", e.g. config/postgres.toml)",
            cli.config.display()
        )));
    }
    // A URL that does not parse is a configuration error, whatever the command.
    let endpoint = redact(&config.store.database_url);
    let (mut pg, tls) = whizbang::store::postgres::tls::database_config(&config).map_err(|e| {
        Failure::Usage(format!(
            "{}: {} ({endpoint})",
            cli.config.display(),
            redact(&e)
        ))
    })?;
    // The runtime's deadlines: connect timeout, keepalives, TCP_USER_TIMEOUT.
    whizbang::store::postgres::connect::with_deadlines(&mut pg, &config);
    pg.application_name("whizbang-cli");
    match cli.command {
        Command::Migrate => migrate_command(&config, &pg, tls).await,
        Command::DeadLetters(command) => {
            let store = PostgresStore::connect(&config).await?;
            match command {
                DeadLetters::List => {
                    let letters = store.dead_letters().await?;
                    print!("{}", dead_letter_table(&letters, store.schema()));
                    Ok(())
                }
                DeadLetters::Requeue { message_id } => {
                    store
                        .requeue_dead_letter(message_id)
                        .await
                        .map_err(|e| not_found(e, message_id, store.schema()))?;
                    println!(
                        "requeued {message_id} in schema {}: pending again with its attempts reset",
                        store.schema()
                    );
                    Ok(())
                }
                DeadLetters::Skip { message_id } => {
                    store
                        .skip_dead_letter(message_id)
                        .await
                        .map_err(|e| not_found(e, message_id, store.schema()))?;
                    println!(
                        "skipped {message_id} in schema {}: dropped, its stream moves on",
                        store.schema()
                    );
                    Ok(())
                }
            }
        }
    }
}

fn not_found(e: StoreError, id: Uuid, schema: &str) -> Failure {
    match e {
        StoreError::NotFound(_) => Failure::Runtime(format!(
            "no dead letter with message id {id} in schema {schema} (see `whizbang dead-letters list`)"
        )),
        other => other.into(),
    }
}

/// Connects (retrying as the runtime does at start) and applies the embedded migrations.
async fn migrate_command(
    config: &Config,
    pg: &tokio_postgres::Config,
    tls: whizbang::store::postgres::tls::DatabaseTls,
) -> Result<(), Failure> {
    let endpoint = whizbang::store::postgres::connect::endpoint(pg);
    let mut client = whizbang::store::postgres::connect::connect_at_start(config, pg, &tls).await?;
    let schema = &config.store.schema;
    let applied = migrate::migrate(&mut client, schema).await?;
    if applied.is_empty() {
        println!(
            "schema {schema} at {endpoint} is up to date ({} migrations)",
            migrate::MIGRATIONS.len()
        );
    } else {
        println!("applied to schema {schema} at {endpoint}:");
        for name in &applied {
            println!("  {name}");
        }
    }
    Ok(())
}

/// The dead letters as an aligned table; one line saying so when there are none.
fn dead_letter_table(letters: &[DeadLetter], schema: &str) -> String {
    if letters.is_empty() {
        return format!("no dead letters in schema {schema}\n");
    }
    let header = ["QUEUE", "MESSAGE ID", "TYPE", "STREAM", "ATTEMPTS", "ERROR"];
    let rows: Vec<[String; 6]> = letters
        .iter()
        .map(|d| {
            [
                d.queue.as_str().to_string(),
                d.message_id.to_string(),
                d.message_type.clone(),
                d.stream_id.clone(),
                d.attempts.to_string(),
                // One line per row, whatever the error said.
                d.error.replace(['\n', '\r'], " "),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; 6]| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i == cells.len() - 1 {
                out.push_str(cell);
            } else {
                let pad = widths[i] - cell.chars().count();
                out.push_str(cell);
                out.push_str(&" ".repeat(pad + 2));
            }
        }
        out.trim_end().to_string() + "\n"
    };
    let mut out = line(header);
    for row in &rows {
        out.push_str(&line(row.each_ref().map(String::as_str)));
    }
    out.push_str(&format!(
        "{} dead letter(s) in schema {schema}\n",
        letters.len()
    ));
    out
}
