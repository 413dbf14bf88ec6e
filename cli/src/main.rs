//! `whizbang`: the operator's command line for a service's Postgres store.
//!
//! ```text
//! whizbang [--config PATH] migrate                        apply the embedded schema (baseline, functions)
//! whizbang [--config PATH] status [--watch [--interval SECS]] [--output table|json]
//!                                                         instances, leases, backlog, dead letters, checkpoints
//! whizbang [--config PATH] dead-letters list [FILTERS] [--output table|json]
//! whizbang [--config PATH] dead-letters show MESSAGE_ID [--output table|json]
//! whizbang [--config PATH] dead-letters requeue (MESSAGE_ID... | --all [FILTERS])
//! whizbang [--config PATH] dead-letters skip (MESSAGE_ID... | --all [FILTERS])
//! whizbang [--config PATH] dead-letters broker [--subscription TOPIC:SUB]... [--show] [--output table|json]
//!                                                         the broker's dead-letter queues (RabbitMQ)
//!
//! FILTERS: --queue outbox|inbox  --message-type TYPE  --stream STREAM_ID  --since 90s|15m|2h|3d|TIMESTAMP
//! ```
//!
//! The configuration is the service's own TOML file (default `config/whizbang.toml`), with the
//! usual environment overrides (`WHIZBANG_DATABASE_URL`, `WHIZBANG_SCHEMA`, ...). Only the
//! `postgres` store backend has anything durable to operate on: with `store.backend = "memory"`
//! every command refuses. The database password is never printed.
//!
//! Every read command (`status`, `dead-letters list|show`) connects with
//! `default_transaction_read_only=on` and needs nothing but `SELECT` on the schema's tables: it
//! never migrates, and on a schema that is not migrated it says so and exits 1. `requeue` and
//! `skip` change dead-lettered rows only, and act on many rows only when told `--all`.
//! The commands a service embeds in its own binary (`replay`) are in the library, behind its
//! `operator` feature. `docs/operations.md` shows each command with its output.
//!
//! Exit codes: 0 done, 1 the operation failed (database unreachable, schema not migrated, no
//! such dead letter, a changed migration file), 2 bad usage or an unusable configuration.

mod broker;
mod payload;
mod render;

use clap::{Args, Parser, Subcommand, ValueEnum};
use render::StatusContext;
use std::io::{IsTerminal as _, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use uuid::Uuid;
use whizbang::Config;
use whizbang::config::ExposeSecret;
use whizbang::config::{StoreBackend, redact};
use whizbang::store::postgres::connect::{connect_at_start, endpoint};
use whizbang::store::postgres::inspect::{self, DeadLetterFilter, Since};
use whizbang::store::postgres::migrate;
use whizbang::store::postgres::tls::DatabaseTls;
use whizbang::store::{Queue, StoreError};

#[derive(Parser)]
#[command(
    name = "whizbang",
    version,
    about = "Operate a whizbang service's Postgres store: status, migrations and dead letters"
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
    /// Instances with their heartbeats and leases, the backlog of each queue with its oldest
    /// row's age, retrying and dead-lettered rows, perspective checkpoints (read-only).
    Status {
        /// Redraws every --interval seconds until Ctrl-C or SIGTERM.
        #[arg(long)]
        watch: bool,
        /// Seconds between two redraws of --watch.
        #[arg(long, default_value_t = 2.0, requires = "watch", value_parser = positive_seconds)]
        interval: f64,
        #[command(flatten)]
        output: OutputArg,
    },
    /// Messages parked after `store.max_attempts`; their streams wait behind them.
    #[command(subcommand)]
    DeadLetters(DeadLetters),
}

#[derive(Subcommand)]
enum DeadLetters {
    /// Lists the dead-lettered outbox and inbox rows the filters select (read-only).
    List {
        #[command(flatten)]
        filters: Filters,
        #[command(flatten)]
        output: OutputArg,
    },
    /// Prints one dead letter: its envelope, its error, and its payload decoded from
    /// MessagePack to JSON (read-only).
    Show {
        /// The message id (a UUID).
        message_id: Uuid,
        #[command(flatten)]
        output: OutputArg,
    },
    /// Puts dead letters back as pending with their attempts reset: the ones named, or with
    /// --all every one the filters select.
    Requeue(Action),
    /// Drops dead letters so the rest of their streams is processed: the ones named, or with
    /// --all every one the filters select.
    Skip(Action),
    /// The broker's dead-letter queues of the subscriptions (RabbitMQ `TOPIC.SUB.dead`: the
    /// deliveries the consumers rejected): how many messages each holds, and with --show each
    /// one's id, type and stream. Read by receiving and releasing every message, which puts it
    /// back in place (nothing is removed; each one's delivery count goes up).
    Broker {
        /// TOPIC:SUBSCRIPTION; repeatable (default: the configuration's [routing]
        /// subscriptions).
        #[arg(long = "subscription")]
        subscriptions: Vec<String>,
        /// Also list each message.
        #[arg(long)]
        show: bool,
        /// Read at most this many messages per queue (the count is then a lower bound).
        #[arg(long, default_value_t = 10_000)]
        limit: usize,
        #[command(flatten)]
        output: OutputArg,
    },
}

#[derive(Args)]
struct Action {
    /// Message ids (UUIDs); all of them must be dead letters, or nothing is changed.
    #[arg(conflicts_with = "all")]
    message_ids: Vec<Uuid>,
    /// Acts on every dead letter the filters select (all of them without filters).
    #[arg(long)]
    all: bool,
    #[command(flatten)]
    filters: Filters,
}

#[derive(Args, Default)]
struct Filters {
    /// Only rows of this queue.
    #[arg(long, value_enum)]
    queue: Option<QueueArg>,
    /// Only messages of this type name.
    #[arg(long)]
    message_type: Option<String>,
    /// Only rows of this stream.
    #[arg(long = "stream")]
    stream: Option<String>,
    /// Only rows stored since: a duration (90s, 15m, 2h, 3d) or a timestamp
    /// (2026-12-07T15:00:00Z).
    #[arg(long, value_parser = since)]
    since: Option<Since>,
}

impl Filters {
    fn any(&self) -> bool {
        self.queue.is_some()
            || self.message_type.is_some()
            || self.stream.is_some()
            || self.since.is_some()
    }

    fn filter(&self, ids: Option<Vec<Uuid>>) -> DeadLetterFilter {
        DeadLetterFilter {
            queue: self.queue.map(|q| match q {
                QueueArg::Outbox => Queue::Outbox,
                QueueArg::Inbox => Queue::Inbox,
            }),
            message_type: self.message_type.clone(),
            stream_id: self.stream.clone(),
            stored_since: self.since.clone(),
            message_ids: ids,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum QueueArg {
    Outbox,
    Inbox,
}

#[derive(Args)]
struct OutputArg {
    /// `table` for a person, `json` for a script (keys in docs/operations.md).
    #[arg(long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

/// `--since`: `<number><s|m|h|d>` ago, or any other text as a timestamp for Postgres to read.
fn since(text: &str) -> Result<Since, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty".into());
    }
    let unit = text.chars().last().unwrap_or('s');
    let number = &text[..text.len() - unit.len_utf8()];
    let scale = match unit {
        's' => 1.0,
        'm' => 60.0,
        'h' => 3_600.0,
        'd' => 86_400.0,
        _ => return Ok(Since::At(text.to_string())),
    };
    if number.is_empty() {
        return Err(format!(
            "`{text}` is neither a duration (90s, 15m, 2h, 3d) nor a timestamp"
        ));
    }
    match number.parse::<f64>() {
        Ok(n) => match Duration::try_from_secs_f64(n * scale) {
            Ok(ago) => Ok(Since::Ago(ago)),
            Err(_) => Err(format!("`{text}` is not a duration from now back")),
        },
        // `2026-12-07`, `2026-12-07 15:00`: for Postgres to read.
        Err(_) => Ok(Since::At(text.to_string())),
    }
}

fn positive_seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(s) if (0.1..=86_400.0).contains(&s) => Ok(s),
        _ => Err(format!(
            "`{text}` is not a number of seconds from 0.1 to 86400"
        )),
    }
}

/// What went wrong, and so which exit code.
enum Failure {
    /// Exit 2: the configuration or the command line cannot be used for this.
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
    if let Command::DeadLetters(DeadLetters::Broker {
        subscriptions,
        show,
        limit,
        output,
    }) = &cli.command
    {
        // The broker alone: no database needed.
        let queues = broker::queues(&config, subscriptions).map_err(Failure::Usage)?;
        let read = broker::read(&config, &queues, (*limit).max(1), Duration::from_secs(1))
            .await
            .map_err(Failure::Runtime)?;
        match output.output {
            Output::Table => print!("{}", broker::table(&read, *show)),
            Output::Json => print_json(&broker::json(&read, *show)),
        }
        return Ok(());
    }
    if config.store.backend == StoreBackend::Memory {
        return Err(Failure::Usage(format!(
            "{}: store.backend is \"memory\": nothing durable to operate on \
             (set store.backend = \"postgres\", e.g. config/postgres.toml)",
            cli.config.display()
        )));
    }
    // A URL that does not parse is a configuration error, whatever the command.
    let url = redact(config.store.database_url.expose_secret());
    let (mut pg, tls) = whizbang::store::postgres::tls::database_config(&config)
        .map_err(|e| Failure::Usage(format!("{}: {} ({url})", cli.config.display(), redact(&e))))?;
    if tls.is_plain() && !whizbang::store::postgres::tls::only_local_hosts(&pg) {
        // As the runtime warns at start: libpq's default `prefer` would have tried TLS.
        tracing::warn!(
            database = %endpoint(&pg),
            "the database connection is not encrypted: the password and the data travel in \
             clear; set sslmode=require (or verify-full with store.tls_ca_file) in \
             store.database_url"
        );
    }
    // The runtime's deadlines: connect timeout, keepalives, TCP_USER_TIMEOUT.
    whizbang::store::postgres::connect::with_deadlines(&mut pg, &config);
    pg.application_name("whizbang-cli");
    let target = Target {
        config: &config,
        pg: &pg,
        tls: &tls,
    };
    match cli.command {
        Command::Migrate => migrate_command(&config, &pg, tls.clone()).await,
        Command::Status {
            watch,
            interval,
            output,
        } => status_command(&target, watch, interval, output.output).await,
        Command::DeadLetters(DeadLetters::List { filters, output }) => {
            let client = target.read_only().await?;
            let letters =
                inspect::dead_letters(&client, target.schema(), &filters.filter(None)).await?;
            match output.output {
                Output::Table => print!(
                    "{}",
                    render::dead_letters_table(&letters, target.schema(), filters.any())
                ),
                Output::Json => print_json(&render::dead_letters_json(&letters)),
            }
            Ok(())
        }
        Command::DeadLetters(DeadLetters::Show { message_id, output }) => {
            let client = target.read_only().await?;
            let letter = inspect::dead_letter(&client, target.schema(), message_id)
                .await
                .map_err(|e| not_found(e, target.schema()))?;
            match output.output {
                Output::Table => print!("{}", render::dead_letter_text(&letter, target.schema())),
                Output::Json => print_json(&render::dead_letter_json(&letter)),
            }
            Ok(())
        }
        Command::DeadLetters(DeadLetters::Requeue(action)) => {
            act_command(&target, action, Act::Requeue).await
        }
        Command::DeadLetters(DeadLetters::Skip(action)) => {
            act_command(&target, action, Act::Skip).await
        }
        Command::DeadLetters(DeadLetters::Broker { .. }) => Ok(()),
    }
}

/// The database and schema a command works on.
struct Target<'a> {
    config: &'a Config,
    pg: &'a tokio_postgres::Config,
    tls: &'a DatabaseTls,
}

impl Target<'_> {
    fn schema(&self) -> &str {
        &self.config.store.schema
    }

    fn endpoint(&self) -> String {
        endpoint(self.pg)
    }

    /// A connection whose every transaction is read-only (retried as the runtime does at
    /// start while the database is unreachable).
    async fn read_only(&self) -> Result<tokio_postgres::Client, StoreError> {
        connect_at_start(self.config, &inspect::read_only(self.pg), self.tls).await
    }

    /// A connection that may change rows (never used to migrate).
    async fn read_write(&self) -> Result<tokio_postgres::Client, StoreError> {
        connect_at_start(self.config, self.pg, self.tls).await
    }
}

fn print_json(doc: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(doc).unwrap_or_else(|e| format!("\"{e}\""))
    );
}

fn not_found(e: StoreError, schema: &str) -> Failure {
    match e {
        StoreError::NotFound(what) => Failure::Runtime(format!(
            "no {what} in schema {schema} (see `whizbang dead-letters list`)"
        )),
        other => other.into(),
    }
}

/// `status`, once or (`--watch`) until Ctrl-C or SIGTERM.
async fn status_command(
    target: &Target<'_>,
    watch: bool,
    interval: f64,
    output: Output,
) -> Result<(), Failure> {
    let cx = StatusContext {
        endpoint: &target.endpoint(),
        partition_count: target.config.partitions.partition_count,
        lease: Duration::from_secs(target.config.partitions.lease_seconds),
    };
    let mut client = target.read_only().await?;
    if !watch {
        let status = inspect::status(&mut client, target.schema()).await?;
        match output {
            Output::Table => print!("{}", render::status_table(&status, &cx)),
            Output::Json => print_json(&render::status_json(&status, &cx)),
        }
        return Ok(());
    }
    let mut stop = whizbang::StopSignal::new()
        .map_err(|e| Failure::Runtime(format!("cannot listen for Ctrl-C and SIGTERM: {e}")))?;
    let redraw = std::io::stdout().is_terminal() && output == Output::Table;
    let every = Duration::from_secs_f64(interval);
    loop {
        if client.is_closed() {
            match target.read_only().await {
                Ok(c) => client = c,
                Err(e) => eprintln!("error: {e}"),
            }
        }
        match inspect::status(&mut client, target.schema()).await {
            Ok(status) => {
                let mut out = std::io::stdout().lock();
                let written = match output {
                    Output::Table if redraw => write!(
                        out,
                        "\x1b[H\x1b[2J{}\n(every {}; Ctrl-C to stop)\n",
                        render::status_table(&status, &cx),
                        render::duration(every)
                    ),
                    Output::Table => writeln!(out, "{}", render::status_table(&status, &cx)),
                    // One document per line (JSON Lines), for a script to read as they come.
                    Output::Json => writeln!(out, "{}", render::status_json(&status, &cx)),
                };
                // Stdout closed (a pipe's reader gone): nothing left to watch for.
                if written.and_then(|()| out.flush()).is_err() {
                    return Ok(());
                }
            }
            // Waiting will not migrate the schema.
            Err(e @ StoreError::NotMigrated { .. }) => return Err(e.into()),
            Err(e) => eprintln!("error: {e} (retrying)"),
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.recv() => return Ok(()),
        }
    }
}

#[derive(Clone, Copy)]
enum Act {
    Requeue,
    Skip,
}

/// `dead-letters requeue|skip`: the ids named, or with `--all` what the filters select.
async fn act_command(target: &Target<'_>, action: Action, act: Act) -> Result<(), Failure> {
    let verb = match act {
        Act::Requeue => "requeue",
        Act::Skip => "skip",
    };
    let filter = if action.all {
        action.filters.filter(None)
    } else if action.message_ids.is_empty() {
        return Err(Failure::Usage(format!(
            "name the dead letters to {verb} (MESSAGE_ID ...), or pass --all to {verb} every \
             one the filters select (see `whizbang dead-letters list`)"
        )));
    } else if action.filters.any() {
        return Err(Failure::Usage(format!(
            "filters select dead letters for --all; to {verb} the ones named, drop the filters"
        )));
    } else {
        action.filters.filter(Some(action.message_ids.clone()))
    };
    let mut client = target.read_write().await?;
    let schema = target.schema();
    let acted = match act {
        Act::Requeue => inspect::requeue(&mut client, schema, &filter).await,
        Act::Skip => inspect::skip(&mut client, schema, &filter).await,
    }
    .map_err(|e| not_found(e, schema))?;
    let (done, what) = match act {
        Act::Requeue => ("requeued", "pending again with their attempts reset"),
        Act::Skip => ("skipped", "dropped; their streams move on"),
    };
    for a in &acted {
        println!("{done} {} {}", a.queue.as_str(), a.message_id);
    }
    println!(
        "{} dead letter(s) {done} in schema {schema}: {what}",
        acted.len()
    );
    Ok(())
}

/// Connects (retrying as the runtime does at start) and applies the embedded migrations.
async fn migrate_command(
    config: &Config,
    pg: &tokio_postgres::Config,
    tls: DatabaseTls,
) -> Result<(), Failure> {
    let endpoint = endpoint(pg);
    let mut client = connect_at_start(config, pg, &tls).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_a_duration_or_a_timestamp() {
        assert_eq!(since("90s"), Ok(Since::Ago(Duration::from_secs(90))));
        assert_eq!(since("15m"), Ok(Since::Ago(Duration::from_secs(900))));
        assert_eq!(since("1.5h"), Ok(Since::Ago(Duration::from_secs(5_400))));
        assert_eq!(since("3d"), Ok(Since::Ago(Duration::from_secs(259_200))));
        assert_eq!(
            since("2026-12-07T15:00:00Z"),
            Ok(Since::At("2026-12-07T15:00:00Z".into()))
        );
        assert_eq!(since("2026-12-07"), Ok(Since::At("2026-12-07".into())));
        assert!(since("").is_err());
        assert!(since("h").is_err());
        assert!(since("1e400d").is_err());
        assert!(since("99999999999999999999d").is_err());
    }

    #[test]
    fn watch_intervals_are_bounded() {
        assert_eq!(positive_seconds("0.5"), Ok(0.5));
        for bad in ["0", "0.05", "-1", "NaN", "inf", "1e300", "soon"] {
            assert!(positive_seconds(bad).is_err(), "{bad}");
        }
    }
}
